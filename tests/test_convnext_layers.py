"""Behaviour shared by both families (blocks, strides, head, training,
serialization, errors), checked on V1 and V2 alike."""

import keras
import numpy as np
import pytest
import torch
from conftest import keras_inference, nchw_to_nhwc, random_timm_model, timm_state_numpy

from convnext_layers import (
    ConvNeXt,
    ConvNeXtConfig,
    DownsampleConv,
    PointwiseDense,
    StochasticDepth,
    count_macs,
    exact_gelu,
    final_feature_size,
    plan_strides,
)
from convnext_v1 import create_convnext_v1
from convnext_v2 import create_convnext_v2
from weights_convert import port_state_dict

FAMILIES = {"v1": create_convnext_v1, "v2": create_convnext_v2}
TIMM_PREFIX = {"v1": "convnext_", "v2": "convnextv2_"}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def test_include_top_false_and_pooling(family):
    create = FAMILIES[family]
    features = create("atto", include_top=False, input_shape=(96, 96, 3))
    assert features.output_shape == (None, 3, 3, 320)
    for pooling in ("avg", "max"):
        pooled = create("atto", include_top=False, pooling=pooling, input_shape=(96, 96, 3))
        assert pooled.output_shape == (None, 320)
    head = create("atto", num_classes=7, input_shape=(96, 96, 3))
    assert head.output_shape == (None, 7)
    assert [layer.name for layer in head.layers[-3:]] == ["head_pool", "head_norm", "head_fc"]


def test_layer_names_follow_timm_structure():
    model = create_convnext_v1("tiny", input_shape=(64, 64, 3))
    for name in (
        "stem_conv",
        "stem_norm",
        "stage1_downsample_conv",
        "stage2_block4_dwconv",
        "stage3_block2_pwconv2",
        "head_fc",
    ):
        model.get_layer(name)


def test_odd_input_size_matches_timm_features(family):
    """225x197 is not a multiple of 32; timm floors every stride-k conv."""
    timm_model = random_timm_model(f"{TIMM_PREFIX[family]}atto", seed=5)
    model = FAMILIES[family]("atto", include_top=False, input_shape=(225, 197, 3))
    state = {k: v for k, v in timm_state_numpy(timm_model).items() if not k.startswith("head.")}
    port_state_dict(model, state)
    images = np.random.default_rng(5).standard_normal((1, 3, 225, 197), dtype=np.float32)
    with torch.no_grad():
        expected = nchw_to_nhwc(timm_model.forward_features(torch.from_numpy(images)).numpy())
    out = numpy(model(nchw_to_nhwc(images)))
    assert out.shape == expected.shape == (1, 7, 6, 320)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "side,strides,final",
    [
        (224, (4, 2, 2, 2), 7),
        (64, (4, 2, 2, 2), 2),
        (63, (2, 2, 2, 2), 4),
        (32, (2, 2, 2, 2), 2),
        (28, (1, 2, 2, 2), 3),
        (8, (1, 2, 2, 1), 2),
        (2, (1, 1, 1, 1), 2),
    ],
)
def test_stride_plan_keeps_last_stage_at_least_2x2(side, strides, final):
    assert plan_strides(side, side) == strides
    assert final_feature_size(side, strides) == final
    model = create_convnext_v1("atto", include_top=False, input_shape=(side, side + 3, 3))
    assert model.output_shape[1] == final  # the smaller side decides


@pytest.mark.parametrize("shape,final", [((32, 32, 3), (2, 2)), ((28, 28, 1), (3, 3))])
def test_small_inputs_keep_2x2_and_load_imagenet_weights(family, shape, final):
    timm_model = random_timm_model(f"{TIMM_PREFIX[family]}atto", seed=6)
    small = FAMILIES[family]("atto", include_top=False, input_shape=shape[:2] + (3,))
    state = {k: v for k, v in timm_state_numpy(timm_model).items() if not k.startswith("head.")}
    port_state_dict(small, state)  # same weight shapes as the 224 model
    assert small.output_shape[1:3] == final
    grey = FAMILIES[family]("atto", include_top=False, input_shape=shape)
    assert grey.output_shape[1:3] == final
    out = numpy(small(np.ones((2,) + shape[:2] + (3,), "float32")))
    assert np.isfinite(out).all()


def test_any_batch_size(family):
    model = FAMILIES[family]("atto", num_classes=5, input_shape=(32, 32, 3))
    images = np.random.default_rng(0).standard_normal((5, 32, 32, 3)).astype("float32")
    full = numpy(model.predict(images, batch_size=5, verbose=0))
    for batch in (1, 3):
        np.testing.assert_allclose(
            numpy(model.predict(images[:batch], verbose=0)), full[:batch], atol=1e-5
        )


def test_save_and_load_gives_identical_outputs(family, tmp_path):
    model = FAMILIES[family]("atto", num_classes=4, input_shape=(32, 32, 3), drop_path_rate=0.2)
    # make layer scale / GRN non-trivial so the round trip is visible
    for weight in model.weights:
        if "layer_scale" in weight.path or "grn" in weight.path:
            weight.assign(np.full(weight.shape, 0.3, "float32"))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects
    images = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(numpy(model(images)), numpy(loaded(images)))
    assert loaded.get_layer("stage3_block1_drop_path").rate == pytest.approx(0.2)


@pytest.mark.slow  # a training run (compiles the train step: 8-17 s on 2 cores)
def test_fit_lowers_the_loss():
    # V1's layers (layer scale, stochastic depth) at a fifth of atto's depth and widths:
    # the train step's compile time grows with the blocks, what is learnt does not; V2
    # training is covered by the ArcFace fine-tuning test on digits (tests/test_finetune.py)
    keras.utils.set_random_seed(0)
    config = ConvNeXtConfig(depths=(1, 1, 2, 1), widths=(8, 16, 24, 32))
    model = ConvNeXt(config, num_classes=3, input_shape=(32, 32, 3), drop_path_rate=0.1)
    assert model.get_layer("stage2_block1_drop_path").rate > 0
    assert model.get_layer("stage2_block1_layer_scale").weights  # V1's layer scale
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 3, 16)
    before = model.evaluate(images, labels, verbose=0)
    model.fit(images, labels, epochs=4, batch_size=16, verbose=0)
    after = model.evaluate(images, labels, verbose=0)
    assert after < before


def test_mixed_bfloat16_builds_and_runs(family):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = FAMILIES[family]("atto", num_classes=3, input_shape=(32, 32, 3))
        out = model(np.ones((2, 32, 32, 3), "float32"))
        assert np.isfinite(numpy(keras.ops.cast(out, "float32"))).all()
        assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
        assert model.get_layer("stem_conv").kernel.dtype == "float32"
        norm = model.get_layer("stage0_block0_norm")
        assert norm.variable_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_stochastic_depth_rates_rise_linearly():
    model = create_convnext_v1("atto", input_shape=(32, 32, 3), drop_path_rate=0.3)
    rates = [layer.rate for layer in model.layers if isinstance(layer, StochasticDepth)]
    # atto has 12 blocks; the first has rate 0 and so no layer at all
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, 12)[1:], rtol=1e-6)


def test_stochastic_depth_drops_whole_samples_only_in_training():
    layer = StochasticDepth(0.5, seed=1)
    x = np.ones((64, 3, 3, 2), "float32")
    np.testing.assert_array_equal(numpy(layer(x, training=False)), x)
    out = numpy(layer(x, training=True))
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}  # kept samples scaled by 1/keep
    assert (per_sample.min(axis=1) == per_sample.max(axis=1)).all()
    assert 10 < (per_sample[:, 0] == 0).sum() < 54


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"variant": "gigantic"}, "Valid variants: "),
        ({"variant": 3}, "Valid variants: "),
        ({"variant": "atto", "pooling": "mean"}, "pooling must be one of"),
        ({"variant": "atto", "input_shape": (224, 224)}, "(height, width, channels)"),
        ({"variant": "atto", "input_shape": (1, 1, 3)}, "too small"),
        ({"variant": "atto", "num_classes": -1}, "num_classes must be >= 0"),
        ({"variant": "atto", "num_classes": True}, "num_classes must be an int"),
        ({"variant": "atto", "num_classes": 2.5}, "num_classes must be an int"),
        ({"variant": "atto", "input_shape": (3, 224, 224)}, "looks channels-first"),
        ({"variant": "atto", "input_shape": (224, 224, 0)}, "positive ints"),
        ({"variant": "atto", "include_top": False, "output_stages": 3}, "tuple of stage"),
        ({"variant": "atto", "include_top": False, "output_stages": (1, 1)}, "distinct"),
        ({"variant": "atto", "output_stages": (1,)}, "include_top=False"),
        ({"variant": "atto", "include_top": "yes"}, "include_top must be True or False"),
        ({"variant": "atto", "drop_path_rate": 1.5}, "drop_path_rate"),
        ({"variant": "atto", "include_top": False, "output_stages": (4,)}, "output_stages"),
    ],
)
def test_bad_arguments_raise_clear_errors(family, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FAMILIES[family](**kwargs)


def test_misspelled_arguments_are_refused_with_the_closest_name(family):
    """keras' functional Model drops unknown keyword arguments without a word."""
    with pytest.raises(TypeError) as info:
        FAMILIES[family]("atto", num_clases=10, drop_path=0.1, colour="red")
    message = str(info.value)
    assert "'num_clases' (did you mean 'num_classes'?)" in message
    assert "'drop_path' (did you mean 'drop_path_rate'?)" in message
    assert (
        "'colour'; the arguments are" in message
        and "num_classes" in message.split("the arguments are")[1]
    )
    assert FAMILIES[family]("atto", num_classes=3, trainable=False).trainable is False


@pytest.mark.parametrize("arch", ["convnext_atto", "convnextv2_atto", "convnext_tiny"])
def test_count_macs_matches_torch_flop_counter(arch):
    from torch.utils.flop_counter import FlopCounterMode

    timm_model = random_timm_model(arch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        timm_model(torch.zeros(1, 3, 224, 224))
    family = "v2" if arch.startswith("convnextv2") else "v1"
    model = FAMILIES[family](arch.split("_")[1], input_shape=(224, 224, 3))
    assert 2 * count_macs(model) == counter.get_total_flops()


def test_input_tensor_and_name(family):
    inputs = keras.Input(shape=(40, 40, 3))
    model = FAMILIES[family]("atto", include_top=False, input_tensor=inputs, name="backbone")
    assert model.name == "backbone"
    assert model.inputs[0] is inputs
    assert model.output_shape == (None, 2, 2, 320)  # 40 < 64: stem stride 2


def assert_layer_matches_reference(ours, reference, rng, shape, batch=2):
    """`ours` and `reference` (layers with the same weight shapes), given the
    same random weights, agree on random inputs on both inference paths."""
    inputs = keras.Input(shape=shape)
    ours = keras.Model(inputs, ours(inputs))
    inputs = keras.Input(shape=shape)
    reference = keras.Model(inputs, reference(inputs))
    weights = [rng.standard_normal(w.shape).astype("float32") for w in ours.get_weights()]
    ours.set_weights(weights)
    reference.set_weights(weights)
    x = rng.standard_normal((batch, *shape)).astype("float32")
    expected = keras_inference(reference, x)["call"]
    for path, out in keras_inference(ours, x).items():
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5, err_msg=path)


@pytest.mark.parametrize("activation", [exact_gelu, None])
def test_pointwise_dense_fast_paths_equal_keras_dense(rng, activation):
    # the per-backend fused calls (oneDNN linear+GELU on torch, MatMul+BiasAdd+GELU
    # on tensorflow) against keras' own Dense + exact GELU, on both inference paths
    exact_gelu = lambda x: keras.activations.gelu(x, approximate=False)  # noqa: E731
    assert_layer_matches_reference(
        PointwiseDense(40, activation=activation),
        keras.layers.Dense(40, activation=None if activation is None else exact_gelu),
        rng,
        shape=(5, 6, 24),
        batch=3,
    )


@pytest.mark.parametrize(
    "kernel,stride,padding", [(4, 4, "valid"), (2, 2, "valid"), (4, 2, "same")]
)
def test_downsample_conv_equals_keras_conv2d(rng, kernel, stride, padding):
    # the channels_last-view torch call (valid) and the fallback (same) alike
    arguments = dict(filters=10, kernel_size=kernel, strides=stride, padding=padding)
    assert_layer_matches_reference(
        DownsampleConv(**arguments), keras.layers.Conv2D(**arguments), rng, shape=(18, 14, 6)
    )
