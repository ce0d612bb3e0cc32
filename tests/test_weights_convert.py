"""weights_convert: timm checkpoints -> Keras (and back), strict, offline.

Every checkpoint here is a `timm.create_model(arch)` with every parameter
randomised (conftest.random_timm_model), saved as safetensors; nothing is
downloaded. Shape-only checks use timm models on the meta device and Keras
models built without initialising their variables, so even convnextv2_huge
costs about a second.
"""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import timm
import torch
from conftest import built_unallocated, nchw_to_nhwc, random_timm_model, save_timm_checkpoint
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

import weights_convert as wc
from weights_convert.pretrained import IMAGENET_MEAN, IMAGENET_STD

ATOL = 1e-4
TIMM_ARCHITECTURES = timm.list_models("convnext*")
PUBLISHED_TAGS = timm.list_models("convnext*", pretrained=True)
# numeric parity marked slow (CI runs them); the two largest: keys, shapes, counts only
NUMERIC_SLOW = {"small", "base", "large", "large_mlp", "xlarge"}
SHAPES_ONLY = {"xxlarge", "huge"}


def architecture_kind(config) -> tuple:
    """What an architecture is made of beyond its sizes (stem, norm, activation, GRN,
    layer scale, kernel sizes, head, ...): architectures of one kind differ only in
    widths, depths and epsilon, which are data to the same layers."""
    fields = dataclasses.asdict(config)
    for size in ("depths", "widths", "norm_eps"):
        del fields[size]
    fields["head_hidden_size"] = fields["head_hidden_size"] is not None
    return tuple(sorted(fields.items()))


def _size(config) -> int:
    return sum(d * w * w for d, w in zip(config.depths, config.widths, strict=True))


def images(batch, size, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def timm_outputs(model, x):
    with torch.no_grad():
        t = torch.from_numpy(x)
        features = model.forward_features(t)
        return {
            "logits": model.forward_head(features).numpy(),
            "pre_logits": model.forward_head(features, pre_logits=True).numpy(),
            "stages": [s.numpy() for s in model.forward_intermediates(t, intermediates_only=True)],
        }


def shape_only_state(arch, **kwargs):
    """timm's state dict for `arch` as zero-stride numpy arrays: right shapes, no memory."""
    with torch.device("meta"):
        model = timm.create_model(arch, **kwargs)
    zero = np.zeros(1, np.float32)
    state = {
        k: np.lib.stride_tricks.as_strided(zero, tuple(v.shape), (0,) * v.ndim)
        for k, v in model.state_dict().items()
    }
    return state, sum(p.numel() for p in model.parameters())


def assert_weights_equal(model, state, keys=None):
    for variable, key, transform in wc.weight_map(model):
        if keys is None or key.startswith(keys):
            expected = wc.TRANSFORMS[transform][0](np.asarray(state[key]))
            np.testing.assert_array_equal(to_numpy(variable), expected, err_msg=key)


@pytest.fixture(scope="module")
def atto_file(tmp_path_factory):
    """A bare convnext_atto model.safetensors (no config.json next to it) and its timm model."""
    model = random_timm_model("convnext_atto", seed=3)
    folder = tmp_path_factory.mktemp("bare")
    path = str(folder / "model.safetensors")
    save_torch({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path, model


# ----------------------------------------------------------------------------
# Parity with timm at 224 (atto V1 / V2): logits, pre-logits, every stage
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["timm_atto_checkpoint", "timm_v2_atto_checkpoint"])
def test_atto_matches_timm_at_224(fixture, request):
    folder, timm_model = request.getfixturevalue(fixture)
    x = images(4, 224, seed=5)
    expected = timm_outputs(timm_model, x)
    model = wc.load_timm(folder, verbose=False)
    assert model.input_shape == (None, None, None, 3)
    pre_logits = keras.Model(model.input, [model.get_layer("head_norm").output, model.output])
    features, logits = (to_numpy(t) for t in pre_logits(nchw_to_nhwc(x)))
    np.testing.assert_allclose(logits, expected["logits"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(features, expected["pre_logits"], atol=ATOL, rtol=0)
    assert (logits.argmax(-1) == expected["logits"].argmax(-1)).all()

    stages = wc.load_timm(folder, include_top=False, output_stages=(0, 1, 2, 3), verbose=False)
    for got, want in zip(stages(nchw_to_nhwc(x)), expected["stages"], strict=True):
        np.testing.assert_allclose(to_numpy(got), nchw_to_nhwc(want), atol=ATOL, rtol=0)


def test_pre_logits_model_with_num_classes_zero(timm_v2_atto_checkpoint):
    folder, timm_model = timm_v2_atto_checkpoint
    x = images(2, 64, seed=6)
    model = wc.load_timm(folder, num_classes=0, input_shape=(64, 64, 3), verbose=False)
    assert model.output_shape == (None, 320)
    np.testing.assert_allclose(
        to_numpy(model(nchw_to_nhwc(x))), timm_outputs(timm_model, x)["pre_logits"], atol=ATOL
    )


# ----------------------------------------------------------------------------
# Every architecture timm publishes: converts and matches, or is refused
# ----------------------------------------------------------------------------


def test_every_timm_architecture_and_tag_is_supported():
    assert len(TIMM_ARCHITECTURES) >= 28 and len(PUBLISHED_TAGS) >= 98
    missing = sorted(set(TIMM_ARCHITECTURES) - set(wc.ARCHITECTURES))
    assert not missing, f"timm architectures without a row: {missing}"
    refused = [t for t in PUBLISHED_TAGS if t.split(".")[0] not in wc.ARCHITECTURES]
    assert refused == []
    for test_model in ("test_convnext", "test_convnext2", "test_convnext3"):
        assert test_model in wc.ARCHITECTURES


@pytest.mark.parametrize("arch", sorted(wc.ARCHITECTURES))
def test_key_shape_and_parameter_coverage(arch):
    """Each checkpoint key maps to exactly one Keras weight of the same shape, and back."""
    state, timm_params = shape_only_state(arch)
    with built_unallocated(lambda: wc.keras_model_for(arch, input_shape=(64, 64, 3))) as model:
        plan = wc.plan_port(model, state)
        assert len(plan) == len(state) == len(model.weights)
        assert model.count_params() == timm_params
        assert wc.infer_architecture(state) == arch


def _tag_state(tag):
    """Shapes of the tensors timm publishes for `tag` (fcmae files carry no head at all)."""
    cfg = timm.models.get_pretrained_cfg(tag)
    state, _ = shape_only_state(tag.split(".")[0], num_classes=cfg.num_classes)
    if tag.endswith(".fcmae"):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return state, cfg.to_dict()


@pytest.mark.parametrize("tag", PUBLISHED_TAGS)
def test_every_published_tag_converts(tag):
    """What varies per tag (classifier size, no head, preprocessing) is accepted: the
    architecture is found from the tensors alone, every tensor finds its weight, the
    pretrained_cfg validates, and the default model ends in the tag's outputs."""
    arch = tag.split(".")[0]
    state, cfg = _tag_state(tag)
    assert wc.infer_architecture(state) == arch
    info = {
        "architecture": arch,
        "num_classes": wc.checkpoint.classifier_size(state),
        "pretrained_cfg": wc.check_pretrained_cfg(cfg),
    }
    with built_unallocated(lambda: wc.keras_model_for(info)) as model:
        skip, _ = wc.head_plan(model, state)
        plan = wc.plan_port(model, state, skip_prefixes=skip)
        assert {key for _, key, _ in plan} == set(state)
        expected = cfg["num_classes"] or wc.ARCHITECTURES[arch].pre_logits_size
        assert model.output_shape == (None, expected)


def _parity_params():
    """Every backend checks the smallest architecture of each kind numerically (its
    layers on that backend). A run over all three backends (.ci/run) checks each of
    the others in one backend's session, largest first and in turn between torch and
    TensorFlow, so every architecture is checked. Not on JAX: it compiles each
    architecture anew (10 s a model in one CI run, against 4 s on torch and 6 s on
    TensorFlow), and its lane carries the most compilation. `large_mlp`, the only one
    of its kind (a hidden head layer), is large: its head is checked on every backend
    by test_timm_args at a small size."""
    configs = {arch: wc.ARCHITECTURES[arch] for arch in sorted(wc.ARCHITECTURES)}
    smallest = {}
    for arch, config in sorted(configs.items(), key=lambda item: _size(item[1])):
        smallest.setdefault(architecture_kind(config), arch)
    every_backend = set(smallest.values()) - {"convnext_large_mlp"}
    turns = ("torch", "tensorflow")
    by_size = sorted(configs, key=lambda arch: -_size(configs[arch]))
    in_turn = [
        a for a in by_size if a not in every_backend and a.split("_", 1)[1] not in SHAPES_ONLY
    ]
    params = []
    for arch in configs:
        variant = arch.split("_", 1)[1]
        marks = []
        if variant in SHAPES_ONLY:
            marks.append(pytest.mark.skip("keys / shapes / counts only (size)"))
        elif variant in NUMERIC_SLOW:
            marks.append(pytest.mark.slow)
        if arch in in_turn:
            marks.append(pytest.mark.once(turns[in_turn.index(arch) % len(turns)]))
        params.append(pytest.param(arch, marks=marks))
    return params


@pytest.mark.parametrize("arch", _parity_params())
def test_architecture_matches_timm_on_small_input(arch, tmp_path):
    """Logits and pre-logits at 64x64 with every parameter random (the published
    classifier size of the architecture's first tag)."""
    tags = [t for t in PUBLISHED_TAGS if t.split(".")[0] == arch]
    classes = timm.models.get_pretrained_cfg(tags[0]).num_classes if tags else 1000
    timm_model = random_timm_model(arch, seed=7, num_classes=classes or 1000)
    folder = save_timm_checkpoint(timm_model, tmp_path, arch)
    x = images(2, 64, seed=8)
    model = wc.load_timm(folder, verbose=False)
    assert model.timm_architecture == arch
    expected = timm_outputs(timm_model, x)
    logits = model.predict_on_batch(nchw_to_nhwc(x))
    np.testing.assert_allclose(logits, expected["logits"], atol=ATOL, rtol=0)
    assert (logits.argmax(-1) == expected["logits"].argmax(-1)).all()
    features = model.with_head(num_classes=0)
    np.testing.assert_allclose(
        features.predict_on_batch(nchw_to_nhwc(x)), expected["pre_logits"], atol=ATOL, rtol=0
    )


def test_any_resolution_without_input_shape(timm_atto_checkpoint):
    """A loaded checkpoint takes any size on every backend, like timm."""
    folder, timm_model = timm_atto_checkpoint
    model = wc.load_timm(folder, verbose=False)
    assert model.input_shape == (None, None, None, 3)
    for height, width in ((64, 64), (224, 224), (288, 256)):
        x = np.random.default_rng(height).standard_normal((2, 3, height, width), np.float32)
        expected = timm_outputs(timm_model, x)["logits"]
        for got in (model.predict_on_batch(nchw_to_nhwc(x)), to_numpy(model(nchw_to_nhwc(x)))):
            np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_refused_architectures_name_what_is_wrong():
    with pytest.raises(wc.UnsupportedArchitectureError, match="Unknown timm ConvNeXt"):
        wc.check_architecture("convnext_gigantic")
    with pytest.raises(wc.UnsupportedArchitectureError, match="non-empty string"):
        wc.check_architecture(None)
    state, _ = shape_only_state("convnext_atto")
    state["stages.0.blocks.0.conv_dw.weight"] = np.zeros((40, 1, 5, 5), np.float32)
    with pytest.raises(wc.UnsupportedArchitectureError, match="differs from convnext_atto"):
        wc.infer_architecture(state)


def test_unknown_model_args_are_refused(tmp_path, timm_atto_checkpoint):
    folder, _ = timm_atto_checkpoint
    config = read_json(os.path.join(folder, "config.json"))
    config["model_args"] = {"num_classes": 1000, "output_stride": 16, "layer_norm_mode": 5}
    os.makedirs(tmp_path / "ckpt")
    os.link(os.path.join(folder, "model.safetensors"), tmp_path / "ckpt" / "model.safetensors")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(wc.UnsupportedArchitectureError, match="layer_norm_mode=5"):
        wc.load_checkpoint(tmp_path / "ckpt")
    config["model_args"] = {"norm_eps": 1e-5, "global_pool": "max"}  # these are taken
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    _, info = wc.load_checkpoint(tmp_path / "ckpt")
    assert info["convnext_config"].norm_eps == 1e-5 and info["pooling"] == "max"


# ----------------------------------------------------------------------------
# Sources, configs, inference
# ----------------------------------------------------------------------------


def test_bare_file_infers_architecture_and_default_cfg(atto_file):
    path, timm_model = atto_file
    state, config = wc.load_checkpoint(path)
    assert config["architecture"] == "convnext_atto"
    assert config["num_classes"] == 1000
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["interpolation"] == "bicubic" and cfg["license"] == "apache-2.0"
    assert cfg["mean"] == IMAGENET_MEAN and cfg["std"] == IMAGENET_STD
    assert 0.8 <= cfg["crop_pct"] <= 1.0
    x = images(1, 64)
    model = wc.load_timm(path, input_shape=(64, 64, 3), verbose=False)
    np.testing.assert_allclose(
        to_numpy(model(nchw_to_nhwc(x))), timm_outputs(timm_model, x)["logits"], atol=ATOL
    )


def test_config_json_is_kept(timm_v2_atto_checkpoint):
    folder, _ = timm_v2_atto_checkpoint
    model = wc.load_timm(folder, include_top=False, pooling="avg", verbose=False)
    assert model.timm_architecture == "convnextv2_atto"
    cfg = model.pretrained_cfg
    assert isinstance(cfg, dict) and cfg["license"] == "cc-by-nc-4.0"
    assert cfg["num_classes"] == 1000 and cfg["input_size"] == (3, 224, 224)
    assert {"crop_pct", "interpolation", "mean", "std", "test_input_size"} <= set(cfg)


def test_inference_rules():
    v2, _ = shape_only_state("convnextv2_nano")
    assert wc.infer_architecture(v2) == "convnextv2_nano"
    state, _ = shape_only_state("convnext_tiny")
    assert wc.infer_architecture(state) == "convnext_tiny"
    fake = dict(state)  # linear tiny with conv-MLP tensors is not a published layout
    fake["stages.0.blocks.0.mlp.fc1.weight"] = np.zeros((384, 96, 1, 1), np.float32)
    with pytest.raises(wc.UnsupportedArchitectureError, match="differs from convnext_tiny"):
        wc.infer_architecture(fake)
    with pytest.raises(wc.CheckpointError, match="Not a timm ConvNeXt"):
        wc.infer_architecture({"weight": np.zeros(3, np.float32)})


def test_arch_override_and_sources(atto_file, tmp_path):
    path, _ = atto_file
    assert wc.load_checkpoint(path, arch="timm/convnext_atto.d2_in1k")[1]["architecture"] == (
        "convnext_atto"
    )
    with pytest.raises(wc.CheckpointNotFoundError, match="neither an existing"):
        wc.load_checkpoint(str(tmp_path / "nope.safetensors"))
    with pytest.raises(wc.CheckpointNotFoundError, match="no model.safetensors"):
        wc.load_checkpoint(tmp_path)
    pickle_file = tmp_path / "pytorch_model.bin"
    pickle_file.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(wc.CheckpointError, match="only safetensors checkpoints are read"):
        wc.load_checkpoint(pickle_file)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"PK")
    with pytest.raises(wc.CheckpointError, match="not a .safetensors file"):
        wc.load_checkpoint(other)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(wc.CheckpointNotFoundError, match="looping symbolic link"):
        wc.load_checkpoint(loop)
    folder = tmp_path / "looping_folder"
    folder.mkdir()
    os.symlink(folder / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(wc.CheckpointNotFoundError, match="looping symbolic link"):
        wc.load_checkpoint(folder)


def _hub_cache(tmp_path, folder, repo="timm/convnext_atto.d2_in1k"):
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hf_home" / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / rev
    snapshot.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        os.link(os.path.join(folder, name), snapshot / name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return tmp_path / "hf_home"


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_from_local_cache_offline(variable, tmp_path, monkeypatch, timm_atto_checkpoint):
    folder, timm_model = timm_atto_checkpoint
    home = _hub_cache(tmp_path, folder)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, str(home / "hub") if variable == "HF_HUB_CACHE" else str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x = images(1, 64)
    expected = timm_outputs(timm_model, x)["logits"]
    for source in (wc.DEFAULT_MODEL, "hf-hub:timm/convnext_atto.d2_in1k"):
        model = wc.load_timm(source, input_shape=(64, 64, 3), verbose=False)
        assert model.pretrained_cfg["tag"] == "d2_in1k"
        np.testing.assert_allclose(to_numpy(model(nchw_to_nhwc(x))), expected, atol=ATOL)
    with pytest.raises(wc.CheckpointNotFoundError) as info:
        wc.load_timm("timm/convnext_femto.d1_in1k", verbose=False)
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "model.safetensors" in message
    assert "local" in message


# ----------------------------------------------------------------------------
# Strictness (point 4): one error, nothing half-loaded
# ----------------------------------------------------------------------------


def _write_state(tmp_path, state, name="model.safetensors", config_from=None, folder="edited"):
    folder = tmp_path / folder
    folder.mkdir(exist_ok=True)
    save_numpy(state, str(folder / name))
    if config_from is not None:
        os.link(os.path.join(config_from, "config.json"), folder / "config.json")
    return folder


def test_missing_unexpected_and_mismatched_in_one_error(tmp_path, timm_atto_checkpoint):
    folder, _ = timm_atto_checkpoint
    state = dict(load_numpy(os.path.join(folder, "model.safetensors")))
    del state["stages.0.blocks.0.gamma"]
    state["stages.9.extra.weight"] = np.ones(3, np.float32)
    state["stem.0.bias"] = np.ones(41, np.float32)
    edited = _write_state(tmp_path, state, config_from=folder)
    with pytest.raises(wc.CheckpointMismatchError) as info:
        wc.load_timm(edited, verbose=False)
    message = str(info.value)
    assert "missing keys (1): stages.0.blocks.0.gamma" in message
    assert "unexpected keys (1): stages.9.extra.weight" in message
    assert "shape mismatch stem.0.bias: expected (40,), found (41,)" in message


def test_checkpoint_of_another_variant(timm_atto_checkpoint, timm_v2_atto_checkpoint):
    folder, _ = timm_atto_checkpoint
    with pytest.raises(wc.CheckpointMismatchError, match=r"expected \(48, 3, 4, 4\)"):
        wc.load_timm(folder, arch="convnext_femto", verbose=False)
    v2_folder, _ = timm_v2_atto_checkpoint
    with pytest.raises(wc.CheckpointMismatchError) as info:
        wc.load_timm(v2_folder, arch="convnext_atto", verbose=False)
    assert "missing keys (12)" in str(info.value) and "mlp.grn.weight" in str(info.value)


def test_failed_port_leaves_model_untouched(timm_atto_checkpoint, timm_v2_atto_checkpoint):
    model = wc.keras_model_for("convnext_atto", input_shape=(64, 64, 3))
    before = [to_numpy(w).copy() for w in model.weights]
    with pytest.raises(wc.CheckpointMismatchError):
        wc.port_timm_weights(model, timm_v2_atto_checkpoint[0])
    for old, new in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, to_numpy(new))
    wc.port_timm_weights(model, timm_atto_checkpoint[0])
    assert_weights_equal(model, timm_atto_checkpoint[1].state_dict())
    assert model.timm_architecture == "convnext_atto"


def test_truncated_and_corrupt_files(tmp_path, atto_file):
    path, _ = atto_file
    with open(path, "rb") as f:
        data = f.read()
    for name, content, match in [
        ("truncated.safetensors", data[: len(data) // 2], "truncated"),
        ("tiny.safetensors", data[:5], "truncated"),
        ("header.safetensors", data[:8] + b"{not json" + data[17:], "corrupt"),
        ("garbage.safetensors", b"\xff" * 64, "truncated or not a safetensors"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(wc.CheckpointError, match=match):
            wc.load_timm(tmp_path / name, verbose=False)


def test_non_float_and_non_finite_tensors(tmp_path, atto_file):
    path, _ = atto_file
    state = dict(load_numpy(path))
    with_int = dict(state, **{"stem.0.bias": np.arange(40, dtype=np.int64)})
    folder = _write_state(tmp_path, with_int)
    with pytest.raises(wc.CheckpointError, match=r"non-float tensors.*stem\.0\.bias \(I64\)"):
        wc.load_timm(folder, verbose=False)
    for bad in (np.nan, np.inf):
        broken = dict(state)
        broken["stages.2.blocks.3.norm.weight"] = broken["stages.2.blocks.3.norm.weight"].copy()
        broken["stages.2.blocks.3.norm.weight"][7] = bad
        folder = _write_state(tmp_path, broken)
        with pytest.raises(wc.CheckpointMismatchError, match="norm.weight holds NaN or Inf"):
            wc.load_timm(folder, verbose=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load(dtype, tmp_path, timm_v2_atto_checkpoint):
    _, timm_model = timm_v2_atto_checkpoint
    half = {k: v.to(dtype).contiguous() for k, v in timm_model.state_dict().items()}
    save_torch(half, str(tmp_path / "half.safetensors"))
    model = wc.load_timm(tmp_path / "half.safetensors", input_shape=(64, 64, 3), verbose=False)
    widened = {k: v.float().numpy() for k, v in half.items()}
    assert_weights_equal(model, widened)
    assert all(w.dtype == "float32" for w in model.weights)


# ----------------------------------------------------------------------------
# Heads (point 5): new classifier, no top, checkpoints without classifier
# ----------------------------------------------------------------------------


def test_new_classifier_keeps_backbone_and_says_so_once(timm_atto_checkpoint, caplog):
    folder, timm_model = timm_atto_checkpoint
    with caplog.at_level(logging.WARNING, logger="weights_convert"):
        cifar = wc.load_timm(folder, num_classes=10, input_shape=(32, 32, 3), verbose=False)
    notes = [r for r in caplog.records if r.name == "weights_convert"]
    assert len(notes) == 1 and "classifier freshly initialised" in notes[0].getMessage()
    assert cifar.output_shape == (None, 10)
    state = timm_model.state_dict()
    assert_weights_equal(cifar, state, keys=("stem.", "stages.", "head.norm."))
    assert not np.allclose(to_numpy(cifar.get_layer("head_fc").kernel)[:, :10], 0)


def test_include_top_false_ports_everything_but_the_head(timm_atto_checkpoint, caplog):
    folder, timm_model = timm_atto_checkpoint
    with caplog.at_level(logging.WARNING, logger="weights_convert"):
        backbone = wc.load_timm(folder, include_top=False, input_shape=(64, 64, 3), verbose=False)
    assert not caplog.records
    assert backbone.output_shape == (None, 2, 2, 320)
    assert not any(layer.name.startswith("head_") for layer in backbone.layers)
    assert_weights_equal(backbone, timm_model.state_dict())
    x = images(2, 64)
    np.testing.assert_allclose(
        to_numpy(backbone(nchw_to_nhwc(x))),
        nchw_to_nhwc(timm_outputs(timm_model, x)["stages"][-1]),
        atol=ATOL,
    )


def test_port_into_built_backbone(timm_v2_atto_checkpoint):
    folder, timm_model = timm_v2_atto_checkpoint
    model = wc.keras_model_for("convnextv2_atto", include_top=False, pooling="avg")
    wc.port_timm_weights(model, folder)  # head.norm / head.fc skipped: no such layers
    assert_weights_equal(model, timm_model.state_dict())


@pytest.mark.parametrize("kind", ["fcmae", "dinov3"])
def test_checkpoints_without_classifier(kind, tmp_path, caplog):
    """fcmae: no head at all; dinov3: head.norm only. Output = timm's num_classes=0 model."""
    arch = "convnextv2_atto" if kind == "fcmae" else "convnext_atto"
    timm_model = random_timm_model(arch, seed=11, num_classes=0)
    if kind == "fcmae":  # timm leaves the missing head norm at its init: weight 1, bias 0
        with torch.no_grad():
            timm_model.head.norm.weight.fill_(1.0)
            timm_model.head.norm.bias.zero_()
    state = {
        k: v.contiguous()
        for k, v in timm_model.state_dict().items()
        if not (kind == "fcmae" and k.startswith("head."))
    }
    save_torch(state, str(tmp_path / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="weights_convert"):
        model = wc.load_timm(tmp_path, input_shape=(64, 64, 3), verbose=False)
    assert model.output_shape == (None, 320)
    assert bool(caplog.records) == (kind == "fcmae")
    x = images(2, 64)
    np.testing.assert_allclose(
        to_numpy(model(nchw_to_nhwc(x))), timm_outputs(timm_model, x)["logits"], atol=ATOL
    )
    head = wc.load_timm(tmp_path, num_classes=5, input_shape=(64, 64, 3), verbose=False)
    assert head.output_shape == (None, 5)


def test_large_classifier(tmp_path):
    timm_model = random_timm_model("convnext_atto", seed=12, num_classes=21841)
    folder = save_timm_checkpoint(timm_model, tmp_path, "convnext_atto")
    model = wc.load_timm(folder, input_shape=(64, 64, 3), verbose=False)
    assert model.output_shape == (None, 21841) and model.pretrained_cfg["num_classes"] == 21841
    x = images(1, 64)
    np.testing.assert_allclose(
        to_numpy(model(nchw_to_nhwc(x))), timm_outputs(timm_model, x)["logits"], atol=ATOL
    )


# ----------------------------------------------------------------------------
# Export (point 6)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture", ["timm_atto_checkpoint", "timm_v2_atto_checkpoint"]
)  # conv-MLP layout
def test_round_trip_is_bit_exact(fixture, request, tmp_path):
    folder, timm_model = request.getfixturevalue(fixture)
    arch = read_json(os.path.join(folder, "config.json"))["architecture"]
    model = wc.load_timm(folder, verbose=False)
    out = wc.export_timm(model, tmp_path / "out.safetensors")
    exported = load_torch(out)
    fresh = timm.create_model(arch)
    fresh.load_state_dict(exported, strict=True)
    original = timm_model.state_dict()
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].shape == value.shape, key
        assert torch.equal(exported[key], value), key
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_export_linear_mlp_and_headless(tmp_path):
    timm_model = random_timm_model("convnext_tiny", seed=13)
    state = {k: v.detach().numpy() for k, v in timm_model.state_dict().items()}
    model = wc.build_ported(
        lambda: wc.keras_model_for("convnext_tiny", input_shape=(64, 64, 3)), state
    )
    exported = wc.export_state_dict(model)
    assert exported["stages.0.blocks.0.mlp.fc1.weight"].shape == (384, 96)
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    features = wc.build_ported(
        lambda: wc.keras_model_for("convnext_tiny", num_classes=0, input_shape=(64, 64, 3)),
        state,
        skip_prefixes=("head.fc.",),
    )
    wc.export_timm(features, tmp_path / "features.safetensors")
    timm.create_model("convnext_tiny", num_classes=0).load_state_dict(
        load_torch(str(tmp_path / "features.safetensors")), strict=True
    )


# ----------------------------------------------------------------------------
# Speed, memory, command line (point 7)
# ----------------------------------------------------------------------------


def test_atto_converts_in_under_two_seconds(timm_atto_checkpoint):
    folder, _ = timm_atto_checkpoint
    wc.load_timm(folder, verbose=False)  # first call: backend warm-up (tracing caches)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        wc.load_timm(folder, verbose=False)
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 2.0, seconds


def test_command_line_in_process(tmp_path, timm_atto_checkpoint, capsys):
    folder, timm_model = timm_atto_checkpoint
    out = tmp_path / "atto.keras"
    assert wc.main([os.path.join(folder, "model.safetensors"), "-o", str(out), "-q"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1
    assert summary[0].startswith("convnext_atto: 3,695,520 parameters, licence apache-2.0, ")
    assert " converted in " in summary[0] and " s -> " in summary[0]
    # the .keras file alone says what the model is: no sidecar, keras' own loader
    loaded = keras.saving.load_model(out)
    assert type(loaded).__name__ == "ConvNeXt"
    assert loaded.timm_architecture == "convnext_atto"
    assert loaded.pretrained_cfg["input_size"] == [3, 224, 224]
    x = images(1, 96)
    np.testing.assert_allclose(
        to_numpy(loaded(nchw_to_nhwc(x))), timm_outputs(timm_model, x)["logits"], atol=ATOL
    )
    weights = tmp_path / "atto.weights.h5"
    assert wc.main([folder, "-o", str(weights), "-q", "--num-classes", "7"]) == 0
    assert wc.load_converted(weights).output_shape == (None, 7)
    assert sorted(os.listdir(tmp_path)) == ["atto.config.json", "atto.keras", "atto.weights.h5"]
    # every output is made as open(path, "w") would make it, under the umask
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(tmp_path):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.parametrize(
    "output,message",
    [
        ("bad.pt", "must end in .keras or .weights.h5"),
        ("folder.keras", "is a folder"),
        ("read_only/x.keras", "not writable"),
        ("a_file/x.keras", "is not a folder"),
    ],
)
def test_command_line_refuses_bad_outputs_before_converting(
    output, message, tmp_path, timm_atto_checkpoint, capsys, monkeypatch
):
    folder, _ = timm_atto_checkpoint
    (tmp_path / "folder.keras").mkdir()
    (tmp_path / "read_only").mkdir(mode=0o555)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(wc.convert, "load_timm", lambda *a, **k: pytest.fail("converted first"))
    if os.geteuid() == 0 and output.startswith("read_only"):
        pytest.skip("root writes into read-only folders")
    assert wc.main([folder, "-o", str(tmp_path / output), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize(
    "source,message",
    [
        ("missing.safetensors", "neither an existing file"),
        ("junk.safetensors", "truncated"),
        ("pickle.pth", "pickled"),
    ],
)
def test_command_line_bad_sources_one_error_line(source, message, tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    (tmp_path / "pickle.pth").write_bytes(b"\x80\x04")
    assert wc.main([str(tmp_path / source), "-o", str(tmp_path / "out.keras"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not os.path.exists(tmp_path / "out.keras")


def run_python(args):
    """`python ARGS` in a fresh process on this backend, from the repository root."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(wc.__file__))),
        timeout=300,
    )


@pytest.mark.slow
def test_command_line_subprocess_with_progress_bar(tmp_path, timm_atto_checkpoint):
    folder, _ = timm_atto_checkpoint
    out = tmp_path / "atto.keras"
    result = run_python(["-m", "weights_convert", folder, "-o", str(out)])
    assert result.returncode == 0, result.stderr
    assert "porting" in result.stderr  # tqdm bar
    assert result.stdout.startswith("convnext_atto: 3,695,520 parameters")
    assert out.exists()


@pytest.mark.slow
def test_peak_memory_is_bounded(tmp_path):
    """Peak RSS growth while converting convnext_tiny < 2 x checkpoint + model."""
    timm_model = random_timm_model("convnext_tiny", seed=14)
    folder = save_timm_checkpoint(timm_model, tmp_path, "convnext_tiny")
    checkpoint = os.path.getsize(os.path.join(folder, "model.safetensors"))
    script = (
        "import os, sys, threading, time, weights_convert as wc\n"
        "wc.keras_model_for('convnext_atto', input_shape=(64, 64, 3))\n"  # backend warm-up
        "page = os.sysconf('SC_PAGESIZE')\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * page\n"
        "base, peak, done = rss(), [0], []\n"
        "def watch():\n"
        "    while not done:\n"
        "        peak[0] = max(peak[0], rss()); time.sleep(0.002)\n"
        "t = threading.Thread(target=watch); t.start()\n"
        "wc.load_timm(sys.argv[1], verbose=False)\n"
        "done.append(1); t.join(); print(max(peak[0], rss()) - base)\n"
    )
    result = run_python(["-c", script, folder])
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split()[-1])
    model_bytes = checkpoint  # fp32 checkpoint == fp32 weights
    assert growth < 2 * checkpoint + model_bytes, (growth, checkpoint)


# ----------------------------------------------------------------------------
# Malformed checkpoints and configs: one clear error each, as the reference refuses
# ----------------------------------------------------------------------------


def _raw_safetensors(path, header, data=b""):
    """Write a safetensors file from a header dict (or raw header bytes) and data bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _entry(begin, end, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


MALFORMED_SAFETENSORS = {
    "metadata_string": ({"__metadata__": "x", "a": _entry(0, 8)}, 8, "__metadata__"),
    "metadata_list": ({"__metadata__": [1, 2], "a": _entry(0, 8)}, 8, "__metadata__"),
    "metadata_int_value": ({"__metadata__": {"k": 5}, "a": _entry(0, 8)}, 8, "__metadata__"),
    "float_offsets": (
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}},
        8,
        "corrupt safetensors entry",
    ),
    "bool_shape": (
        {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
        4,
        "corrupt safetensors entry",
    ),
    "unknown_dtype": (
        {"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}},
        8,
        "corrupt safetensors entry",
    ),
    "extra_field": ({"a": dict(_entry(0, 8), extra=1)}, 8, "corrupt safetensors entry"),
    "overlap": ({"a": _entry(0, 8), "b": _entry(4, 12)}, 12, "overlaps"),
    "gap": ({"a": _entry(0, 8), "b": _entry(12, 20)}, 20, "gap"),
    "trailing_bytes": ({"a": _entry(0, 8)}, 12, "after the last tensor"),
    "size_mismatch": ({"a": _entry(0, 12)}, 12, "corrupt safetensors entry"),
    "not_an_object": ([1, 2], 0, "not a JSON object"),
    "duplicate_key": (b'{"a": ' + json.dumps(_entry(0, 8)).encode() + b', "a": '
                      + json.dumps(_entry(0, 8)).encode() + b"}", 8, "duplicate key"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED_SAFETENSORS))
def test_malformed_safetensors_are_refused_like_the_reference(case, tmp_path):
    from safetensors import SafetensorError

    header, data_size, message = MALFORMED_SAFETENSORS[case]
    path = _raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * data_size)
    with pytest.raises(wc.CheckpointError, match=message):
        wc.read_safetensors(path)
    if case not in ("metadata_int_value", "extra_field", "duplicate_key"):  # reference is laxer
        with pytest.raises((SafetensorError, ValueError, TypeError)):
            load_numpy(str(path))
    # a well-formed file of the same kind is read by both
    good = _raw_safetensors(tmp_path / "good.safetensors", {"a": _entry(0, 8)}, b"\0" * 8)
    np.testing.assert_array_equal(wc.read_safetensors(good)[0]["a"], load_numpy(str(good))["a"])


BAD_CONFIGS = {
    "pretrained_cfg_list": ({"pretrained_cfg": [1, 2]}, "pretrained_cfg must be a JSON object"),
    "model_args_string": ({"model_args": "abc"}, "model_args must be a JSON object"),
    "architecture_int": ({"architecture": 5}, "architecture must be"),
    "num_classes_string": ({"num_classes": "x"}, "num_classes must be an int"),
    "mean_string": ({"pretrained_cfg": {"mean": "abc"}}, "mean must be a list of finite numbers"),
    "mean_empty": ({"pretrained_cfg": {"mean": []}}, "mean must be a list of finite numbers"),
    "std_zero": ({"pretrained_cfg": {"std": [0, 0, 0]}}, "std must be positive numbers"),
    "mean_nan": ({"pretrained_cfg": {"mean": [0.5, float("nan"), 0.5]}}, "mean must be"),
    "input_size_negative": ({"pretrained_cfg": {"input_size": [3, -1, 5]}}, "input_size"),
    "interpolation": ({"pretrained_cfg": {"interpolation": "magic"}}, "interpolation must be"),
    "crop_pct": ({"pretrained_cfg": {"crop_pct": 2}}, "crop_pct must be"),
    "global_pool": ({"global_pool": "token"}, "global_pool must be"),
    "not_an_object": ([1, 2, 3], "must hold a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_malformed_config_json_is_refused_naming_the_field(case, tmp_path, timm_atto_checkpoint):
    folder, _ = timm_atto_checkpoint
    changes, message = BAD_CONFIGS[case]
    if isinstance(changes, dict):
        config = read_json(os.path.join(folder, "config.json"))
        config.update(changes)
    else:
        config = changes
    edited = tmp_path / "ckpt"
    edited.mkdir()
    os.link(os.path.join(folder, "model.safetensors"), edited / "model.safetensors")
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(wc.CheckpointConfigError, match=message) as info:
        wc.load_timm(edited, verbose=False)
    assert "config.json" in str(info.value)


def test_broken_tensors_give_the_strict_list_not_a_raw_error(tmp_path, timm_atto_checkpoint):
    folder, _ = timm_atto_checkpoint
    state = dict(load_numpy(os.path.join(folder, "model.safetensors")))
    cases = {
        "no_stem": ({k: v for k, v in state.items() if not k.startswith("stem.0.")}, True),
        "flat_fc": (dict(state, **{"head.fc.weight": np.zeros(1000, np.float32)}), True),
        "flat_fc2": (
            dict(state, **{"stages.1.blocks.0.mlp.fc2.weight": np.zeros(80, np.float32)}),
            True,
        ),
        "no_blocks": ({k: v for k, v in state.items() if ".conv_dw." not in k}, False),
    }
    expected = {
        "no_stem": (wc.CheckpointMismatchError, "missing keys .*stem.0.weight"),
        "flat_fc": (wc.CheckpointError, "head.fc.weight must be a 2-D"),
        "flat_fc2": (wc.CheckpointMismatchError, "shape mismatch stages.1.blocks.0"),
        "no_blocks": (wc.CheckpointError, "conv_dw"),
    }
    for name, (edited, with_config) in cases.items():
        path = _write_state(
            tmp_path, edited, config_from=folder if with_config else None, folder=name
        )
        error, message = expected[name]
        with pytest.raises(error, match=message):
            wc.load_timm(path, verbose=False)


def test_config_json_beside_a_bare_file_is_not_used(tmp_path, atto_file):
    path, _ = atto_file
    folder = tmp_path / "with_config"
    folder.mkdir()
    os.link(path, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps(
            {"architecture": "convnext_femto", "pretrained_cfg": {"input_size": [3, 160, 160]}}
        )
    )
    _, info = wc.load_checkpoint(folder / "model.safetensors")  # the file alone
    assert info["architecture"] == "convnext_atto"
    assert info["pretrained_cfg"]["input_size"] == (3, 224, 224)
    with pytest.raises(wc.CheckpointMismatchError):  # the folder: its config.json says femto
        wc.load_timm(folder, verbose=False)


# ----------------------------------------------------------------------------
# Saved models: self-describing files, older files, damaged files, killed writes
# ----------------------------------------------------------------------------


def test_files_from_before_models_carried_their_config_still_load(tmp_path, timm_atto_checkpoint):
    """The layout of an earlier version's output: a plain functional model + sidecar."""
    folder, timm_model = timm_atto_checkpoint
    model = wc.load_timm(folder, input_shape=(64, 64, 3), verbose=False)
    plain = keras.Model(model.inputs, model.outputs, name="convnext_atto")
    plain.save(tmp_path / "old.keras")
    sidecar = {"architecture": "convnext_atto", "num_classes": 1000,
               "pretrained_cfg": {"input_size": [3, 64, 64], "mean": [0.5] * 3}}  # fmt: skip
    (tmp_path / "old.config.json").write_text(json.dumps(sidecar))
    loaded = wc.load_converted(tmp_path / "old.keras")
    assert loaded.timm_architecture == "convnext_atto"
    assert loaded.pretrained_cfg["input_size"] == [3, 64, 64]
    x = images(1, 64)
    np.testing.assert_allclose(
        loaded.predict_on_batch(nchw_to_nhwc(x)), timm_outputs(timm_model, x)["logits"], atol=ATOL
    )


def test_damaged_or_foreign_saved_models_are_refused(tmp_path, atto_file):
    (tmp_path / "truncated.keras").write_bytes(b"PK\x03\x04" + b"\0" * 20)
    (tmp_path / "photo.keras").write_bytes(b"\xff\xd8\xff\xe0 not a zip")
    (tmp_path / "empty.keras").write_bytes(b"")
    for name in ("truncated.keras", "photo.keras", "empty.keras", "missing.keras"):
        with pytest.raises(wc.SavedModelError, match="not a .keras model file|does not exist"):
            wc.load_converted(tmp_path / name)
    with pytest.raises(wc.SavedModelError, match="a saved model is a .keras file"):
        wc.load_converted(atto_file[0])
    with pytest.raises(wc.SavedModelError, match="config.json"):
        wc.load_converted(tmp_path / "alone.weights.h5")


@pytest.mark.slow
@pytest.mark.once("jax")  # file handling: atomic writes of a killed process
def test_killed_conversions_leave_nothing_behind(tmp_path, timm_atto_checkpoint):
    """kill -9 in the middle of writing: the earlier output survives whole, and the next
    run removes the dead run's temporary file."""
    folder, _ = timm_atto_checkpoint
    out = tmp_path / "atto.keras"
    command = [sys.executable, "-m", "weights_convert", folder, "-o", str(out), "-q"]
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(wc.__file__)))
    assert (
        subprocess.run(command, env=env, cwd=cwd, capture_output=True, timeout=300).returncode == 0
    )
    interrupted = 0
    for _ in range(3):
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if any(".tmp-" in n for n in os.listdir(tmp_path)):
                process.kill()
                break
            time.sleep(0.001)
        process.wait()
        interrupted += any(".tmp-" in n for n in os.listdir(tmp_path))
        assert wc.load_converted(out).timm_architecture == "convnext_atto"  # old or new, whole
    assert interrupted, "no write was interrupted"
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["atto.keras"]
    assert wc.load_converted(out).timm_architecture == "convnext_atto"


def test_bare_greyscale_file_gets_timms_channel_statistics(tmp_path):
    """A bare in_chans=1 .safetensors (no config.json): the channels come from the stem's
    tensor, and the ImageNet mean / std are fitted to one channel as timm resolves them."""
    from timm.data.model_config import resolve_input_data_config

    timm_model = random_timm_model("convnext_atto", seed=23, in_chans=1)
    path = str(tmp_path / "model.safetensors")
    save_torch({k: v.contiguous() for k, v in timm_model.state_dict().items()}, path)
    _, info = wc.load_checkpoint(path)
    assert info["convnext_config"].in_chans == 1
    reference = resolve_input_data_config(timm_model)
    cfg = info["pretrained_cfg"]
    assert cfg["input_size"][0] == 1
    np.testing.assert_allclose(cfg["mean"], reference["mean"], atol=1e-12)
    np.testing.assert_allclose(cfg["std"], reference["std"], atol=1e-12)
