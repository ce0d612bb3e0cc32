"""timm's whole ConvNeXt constructor (convnext_layers.timm_args): every argument of
`timm.models.convnext.ConvNeXt.__init__` is held exactly or refused by name.

Each checkpoint is made as people publish theirs: a timm model with every parameter
randomised, written by timm's own `save_for_hf(model, dir, model_args=...)`. The
Keras model must equal timm's within 1e-4 at 64x64 (timm's own strides) on every
backend, or the argument is refused, naming it, before any weight is read.
"""

import inspect
import json
import os

import keras
import numpy as np
import pytest
import timm
import torch
from conftest import nchw_to_nhwc, random_timm_model, save_timm_hf

import weights_convert as wc
from convnext_layers import (
    TIMM_ARGUMENTS,
    ConfigError,
    ConvNeXt,
    ConvNeXtConfig,
    DepthwiseConv,
    fast_ops,
)
from convnext_layers.fast_ops import jax_kernels, torch_kernels
from convnext_layers.layers import ACTIVATIONS
from convnext_layers.timm_args import ACTIVATION_ALIASES, ACTIVATION_NAMES, split_timm_args

ATOL = 1e-4
SIDE = 64  # timm's own strides from 64 px up (smaller inputs get lowered ones)
SMALL = {"depths": [1, 1, 1, 1], "dims": [16, 24, 32, 40]}  # fast stand-in network
# (timm architecture, model_args): the four rows on the published sizes, V1 and
# V2; every other argument on a small network of the same architecture
# fmt: off
CASES = {
    "face_v1": ("convnext_atto", {"patch_size": 2, "num_classes": 512}),
    "face_v2": ("convnextv2_atto", {"patch_size": 2, "num_classes": 512}),
    "output_stride_16": ("convnext_atto", {"output_stride": 16}),
    "output_stride_8_v2": ("convnextv2_atto", {"output_stride": 8}),
    "no_layer_scale": ("convnext_atto", {"ls_init_value": None}),
    "greyscale": ("convnext_atto", {"in_chans": 1}),
    "four_channels_kernel_sizes_no_bias": (
        "convnext_atto",
        {**SMALL, "in_chans": 4, "kernel_sizes": [3, 5, 7, 9], "conv_bias": False},
    ),
    "linear_mlp_head_hidden_size_max_pool_norm_eps": (
        "convnext_atto",
        {**SMALL, "conv_mlp": False, "head_hidden_size": 48, "global_pool": "max",
         "norm_eps": 1e-3},
    ),
    "head_norm_first_catavgmax_quick_gelu": (
        "convnext_atto",
        {**SMALL, "head_norm_first": True, "global_pool": "catavgmax", "act_layer": "quick_gelu"},
    ),
    "avgmax_hard_swish_rms_norm": (
        "convnext_atto",
        {**SMALL, "global_pool": "avgmax", "act_layer": "hard_swish", "norm_layer": "rmsnorm2d"},
    ),
    "simple_norm_overlap_act_silu": (
        "convnext_atto",
        {**SMALL, "norm_layer": "simplenorm", "stem_type": "overlap_act", "act_layer": "silu"},
    ),
    "overlap_tiered_output_stride_8": (
        "convnext_atto", {**SMALL, "stem_type": "overlap_tiered", "output_stride": 8}
    ),
    "depths_dims_empty_stage": (
        "convnext_atto", {"depths": [1, 2, 0, 1], "dims": [16, 24, 24, 40]}
    ),
    "patch_1": ("convnext_atto", {**SMALL, "patch_size": 1}),
    "patch_8_output_stride_16": ("convnext_atto", {**SMALL, "patch_size": 8, "output_stride": 16}),
    "v2_kernel_size_head_hidden_size": (
        "convnextv2_atto", {**SMALL, "kernel_sizes": 5, "head_hidden_size": 32}
    ),
    "face_grey_dilated_no_layer_scale": (
        "convnext_atto",
        {**SMALL, "patch_size": 2, "output_stride": 16, "in_chans": 1, "ls_init_value": None},
    ),
    "grn_with_layer_scale": ("convnext_atto", {**SMALL, "use_grn": True}),
    "training_only": (
        "convnext_atto",
        {**SMALL, "drop_rate": 0.1, "drop_path_rate": 0.2, "head_init_scale": 0.5},
    ),
}
# fmt: on
# refused before any weight is read: (model_args written into config.json, what the error names)
REFUSED = {
    "no_pooling": ({"global_pool": ""}, "global_pool=''"),
    "prelu": ({"act_layer": "prelu"}, "act_layer='prelu'"),
    "batch_norm": ({"norm_layer": "batchnorm2d"}, "norm_layer='batchnorm2d'"),
    "output_stride_4": ({"output_stride": 4}, "output_stride=4"),
    "unknown_argument": ({"stem_kernel_size": 5}, "stem_kernel_size=5"),
}


def images(channels, seed=0, batch=2):
    shape = (batch, channels, SIDE, SIDE)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


# ----------------------------------------------------------------------------
# The constructor, argument by argument
# ----------------------------------------------------------------------------


@pytest.mark.once("jax")  # reads timm's signature and the tables: no backend
def test_every_timm_constructor_argument_is_classified():
    """Fails when timm's ConvNeXt gains an argument this project does not know."""
    parameters = inspect.signature(timm.models.convnext.ConvNeXt.__init__).parameters
    names = [name for name in parameters if name != "self"]
    unknown = sorted(set(names) - set(TIMM_ARGUMENTS))
    assert not unknown, f"timm's ConvNeXt has arguments this project does not classify: {unknown}"
    assert sorted(set(TIMM_ARGUMENTS) - set(names)) == []  # no stale entries
    fields = {f for f in ConvNeXtConfig.__dataclass_fields__}
    model_arguments = set(inspect.signature(ConvNeXt.__init__).parameters)
    covered = {name for _, args in CASES.values() for name in args}
    untested = [n for n, (kind, _) in TIMM_ARGUMENTS.items() if kind != "placement"]
    assert sorted(set(untested) - covered) == []  # each one is in a parity case below
    for name, (kind, where) in TIMM_ARGUMENTS.items():
        assert kind in ("config", "model", "init", "placement"), name
        if kind == "config":
            assert where in fields, name
        elif kind == "model":
            assert where in model_arguments, name


# one architecture per kind of layer timm's registry builds (the other rows differ in sizes)
BUILT = (
    "convnext_atto", "convnext_atto_ols", "convnext_atto_rms", "convnext_zepto_rms_ols",
    "convnext_tiny_hnf", "convnext_large_mlp", "convnextv2_atto", "test_convnext3",
)  # fmt: skip


@pytest.mark.once("jax")
def test_every_architecture_row_goes_to_timm_and_back():
    """`from_timm_args` reads `to_timm_args` back exactly for every registered architecture;
    `timm.models.convnext.ConvNeXt(**to_timm_args())` builds the registry's network (the same
    tensors, by name and shape) for one of each kind."""
    for arch, config in wc.ARCHITECTURES.items():
        assert ConvNeXtConfig.from_timm_args(config.to_timm_args()) == config, arch
    for arch in BUILT:
        with torch.device("meta"):
            ours = timm.models.convnext.ConvNeXt(**wc.ARCHITECTURES[arch].to_timm_args())
            theirs = timm.create_model(arch)
        shapes = lambda model: {k: tuple(v.shape) for k, v in model.state_dict().items()}  # noqa: E731
        assert shapes(ours) == shapes(theirs), arch


@pytest.mark.parametrize("case", sorted(CASES))
def test_constructor_argument_matches_timm(case, tmp_path):
    arch, args = CASES[case]
    timm_model = random_timm_model(arch, seed=len(case), **args)
    folder = save_timm_hf(timm_model, tmp_path / "ckpt", args)
    x = images(args.get("in_chans", 3), seed=len(case))
    with torch.no_grad():
        expected = timm_model(torch.from_numpy(x)).numpy()
    model = wc.load_timm(folder, verbose=False)
    np.testing.assert_allclose(model.predict_on_batch(nchw_to_nhwc(x)), expected, atol=ATOL, rtol=0)
    # the arguments live in the model's own config: a .keras file holds them
    config = model.convnext_config
    assert config.in_chans == args.get("in_chans", 3)
    assert config.output_stride == args.get("output_stride", 32)
    if "drop_rate" in args:
        assert (model.drop_rate, model.drop_path_rate) == (
            args["drop_rate"],
            args["drop_path_rate"],
        )
    assert ConvNeXt.from_config(model.get_config()).convnext_config == config


def test_none_argument_dropped_by_create_model_follows_the_tensors(tmp_path):
    """`timm.create_model(..., ls_init_value=None)` drops the None (layer scale kept at
    1e-6) while `save_for_hf` records ls_init_value=None: the tensors decide."""
    timm_model = random_timm_model("convnext_atto", seed=3, **SMALL)  # with layer scale
    folder = save_timm_hf(timm_model, tmp_path, {**SMALL, "ls_init_value": None})
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["model_args"]["ls_init_value"] is None
    x = images(3, seed=3)
    with torch.no_grad():
        expected = timm_model(torch.from_numpy(x)).numpy()
    model = wc.load_timm(folder, verbose=False)
    assert model.convnext_config.layer_scale_init_value is not None
    np.testing.assert_allclose(model.predict_on_batch(nchw_to_nhwc(x)), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_arguments_are_refused_by_name_before_any_weight_is_read(
    case, tmp_path, timm_atto_checkpoint, monkeypatch
):
    folder, _ = timm_atto_checkpoint
    model_args, named = REFUSED[case]
    edited = tmp_path / "ckpt"
    edited.mkdir()
    os.link(os.path.join(folder, "model.safetensors"), edited / "model.safetensors")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    (edited / "config.json").write_text(json.dumps({**config, "model_args": model_args}))
    monkeypatch.setattr(
        wc.checkpoint, "read_safetensors", lambda *a: pytest.fail("weights read before the check")
    )
    with pytest.raises(wc.UnsupportedArchitectureError) as info:
        wc.load_timm(edited, verbose=False)
    assert named in str(info.value)


@pytest.mark.once("jax")
def test_split_timm_args_names_every_refusal():
    changes, options = split_timm_args(
        {"dims": [8, 16, 24, 32], "act_layer": "Swish", "global_pool": "fastavg", "in_chans": 1}
    )
    assert changes == {"widths": [8, 16, 24, 32], "activation": "silu", "in_chans": 1}
    assert options == {"pooling": "avg"}
    for args, named in REFUSED.values():
        with pytest.raises(ConfigError, match=f"{named}"):
            split_timm_args(args)


def test_every_activation_equals_timms():
    """Each act_layer name this project accepts computes timm's layer, elementwise."""
    assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)
    x = np.linspace(-6.0, 6.0, 241, dtype=np.float32)
    for name in (*ACTIVATION_NAMES, *ACTIVATION_ALIASES):
        ours = ACTIVATIONS[ACTIVATION_ALIASES.get(name, name)]
        with torch.no_grad():
            expected = timm.layers.get_act_layer(name)()(torch.from_numpy(x)).numpy()
        got = keras.ops.convert_to_numpy(ours(keras.ops.convert_to_tensor(x)))
        np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0, err_msg=name)


# ----------------------------------------------------------------------------
# Fast paths and the small-input plan step aside for layouts they were not written for
# ----------------------------------------------------------------------------


def test_dilated_model_takes_the_plain_depthwise_path_on_every_inference_path(
    tmp_path, monkeypatch
):
    """The depthwise fast kernels (JAX's shifted sum, torch's NHWC conv) were written
    for undilated convs: a dilated block never reaches them, and every inference path
    (layer by layer, predict_batch, predict_on_batch, portable) equals timm."""
    args = {**SMALL, "output_stride": 8}
    timm_model = random_timm_model("convnext_atto", seed=9, **args)
    model = wc.load_timm(save_timm_hf(timm_model, tmp_path, args), verbose=False)
    dilated = [
        layer
        for layer in fast_ops.flatten_layers(model)
        if isinstance(layer, DepthwiseConv) and tuple(layer.dilation_rate) != (1, 1)
    ]
    assert dilated and not any(layer._fast_path_shape() for layer in dilated)
    fast = []  # dilated layers that reached a depthwise fast kernel (recorded, not
    # raised: the fast-path guard would catch an exception and fall back)
    for kernels in (jax_kernels, torch_kernels):
        original = kernels.depthwise_conv

        def spy(inputs, layer, original=original):
            if tuple(layer.dilation_rate) != (1, 1):
                fast.append(layer.name)
            return original(inputs, layer)

        monkeypatch.setattr(kernels, "depthwise_conv", spy)
    x = images(3, seed=9)
    with torch.no_grad():
        expected = timm_model(torch.from_numpy(x)).numpy()
    nhwc = nchw_to_nhwc(x)
    outputs = {
        "layer by layer": keras.ops.convert_to_numpy(model(nhwc)),
        "predict_batch": model.predict_batch(nhwc),
        "predict_on_batch": model.predict_on_batch(nhwc),
    }
    with fast_ops.portable():
        outputs["portable"] = keras.ops.convert_to_numpy(model(nhwc))
    assert fast == []
    for path, got in outputs.items():
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=path)


@pytest.mark.once("jax")
def test_config_errors_name_timms_argument():
    with pytest.raises(ConfigError, match=r"timm argument dims=\[8, 16, 24\]: widths must be 4"):
        ConvNeXtConfig.from_timm_args({"depths": [1, 1, 1, 1], "dims": [8, 16, 24]})
    with pytest.raises(
        ConfigError, match=r"timm argument kernel_sizes=6: kernel_sizes must be odd"
    ):
        ConvNeXtConfig.from_timm_args({"depths": [1] * 4, "dims": [8] * 4, "kernel_sizes": 6})


def test_input_channels_live_in_the_config():
    """An input_shape of other than 3 channels sets the default in_chans (models saved before
    the config held it load so); a config that says otherwise must agree."""
    grey = ConvNeXtConfig(depths=(1, 1, 1, 1), widths=(8, 16, 24, 32), in_chans=1)
    model = ConvNeXt(grey, num_classes=0)
    assert model.input_shape == (None, None, None, 1)
    old = model.get_config()
    del old["config"]["in_chans"]  # a .keras file from before: the channels in input_shape
    old["input_shape"] = [None, None, 1]
    assert ConvNeXt.from_config(old).convnext_config.in_chans == 1
    with pytest.raises(
        ValueError, match="input_shape has 3 channels but the config's in_chans is 1"
    ):
        ConvNeXt(grey, input_shape=(64, 64, 3))
