"""Every fast path in `convnext_layers.fast_ops` against its fallback, on the current
backend: switched off by `portable()`, by KERAS_CONVNEXT_FAST_PATHS=0, by a simulated
failure of its private call (then switched off for the process, with one warning),
and, for the CPU-only ones, by a device that is not a CPU. The fallback must give the
fast path's numbers on random inputs; a spy on the private call checks the fast path
really ran (or really did not)."""

import contextlib
import weakref

import keras
import numpy as np
import pytest
from conftest import BACKEND, random_timm_model, timm_state_numpy

import weights_convert as wc
from convnext_layers import (
    DepthwiseConv,
    DownsampleConv,
    GlobalResponseNorm,
    PointwiseDense,
    exact_gelu,
    fast_ops,
)
from convnext_layers import layers as layers_module
from convnext_layers import model as model_module
from convnext_v1 import create_convnext_v1
from convnext_v2 import create_convnext_v2

MODES = ("portable", "environment", "failure", "off_cpu")


@pytest.fixture(autouse=True)
def fresh_fast_paths(monkeypatch):
    """Each test starts with every fast path on and leaves no switched-off path behind."""
    monkeypatch.setattr(fast_ops, "_DISABLED", {})
    monkeypatch.delenv("KERAS_CONVNEXT_FAST_PATHS", raising=False)


class Spy:
    """Replaces `owner.name` by a wrapper counting its calls (and raising if `fail`)."""

    def __init__(self, monkeypatch, owner, name, fail=False):
        self.calls = 0
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            if fail:
                raise RuntimeError("simulated failure of a private API")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def random_weights(model, rng, scale=0.5):
    return [(rng.standard_normal(w.shape) * scale).astype("float32") for w in model.weights]


# ----------------------------------------------------------------------------
# guarded(): what a failure does
# ----------------------------------------------------------------------------


def test_guarded_switches_a_failing_fast_path_off_once_with_a_warning():
    def broken():
        raise RuntimeError("boom")

    with pytest.warns(RuntimeWarning, match="'demo' failed .*boom"):
        assert fast_ops.guarded("demo", broken, lambda: 7) == 7
    assert "demo" in fast_ops.disabled_fast_paths()
    assert not fast_ops.fast_paths_allowed("demo")
    assert fast_ops.fast_paths_allowed("other")


def test_guarded_keeps_the_fast_path_when_the_input_is_bad():
    # the fallback fails too: the input was at fault, not the private API
    def bad_input():
        raise ValueError("wrong shape")

    with pytest.raises(ValueError, match="wrong shape"):
        fast_ops.guarded("demo", bad_input, bad_input)
    assert fast_ops.disabled_fast_paths() == {}


def test_portable_and_environment_switch_everything_off(monkeypatch):
    assert fast_ops.fast_paths_allowed("onednn_linear")
    with fast_ops.portable():
        assert not any(fast_ops.fast_paths_allowed(name) for name in fast_ops.FAST_PATHS)
    assert fast_ops.fast_paths_allowed()
    monkeypatch.setenv("KERAS_CONVNEXT_FAST_PATHS", "0")
    assert not fast_ops.fast_paths_allowed()


# ----------------------------------------------------------------------------
# The layers' fast paths
# ----------------------------------------------------------------------------

# name -> (backend it exists on, its private call (owner, attribute), layer, input shape)
LAYER_CASES = {
    "torch_conv_nhwc/depthwise": (
        "torch",
        (fast_ops, "torch_conv2d_nhwc"),
        lambda: DepthwiseConv(7),
        (9, 11, 8),
    ),
    "torch_conv_nhwc/downsample": (
        "torch",
        (fast_ops, "torch_conv2d_nhwc"),
        lambda: DownsampleConv(6, 3, strides=2, explicit_padding=1),
        (9, 12, 5),
    ),
    "jax_shifted_sum": (
        "jax",
        (layers_module, "depthwise_shifted_sum"),
        lambda: DepthwiseConv(7),
        (9, 11, 8),
    ),
    "onednn_linear/gelu": (
        "torch",
        (fast_ops, "_onednn_linear_pointwise"),
        lambda: PointwiseDense(12, activation=exact_gelu),
        (4, 5, 6),
    ),
    "onednn_linear": (
        "torch",
        (fast_ops, "_onednn_linear_pointwise"),
        lambda: PointwiseDense(12),
        (4, 5, 6),
    ),
    "tensorflow_fused_dense": (
        "tensorflow",
        (fast_ops, "tensorflow_dense"),
        lambda: PointwiseDense(12, activation=exact_gelu),
        (4, 5, 6),
    ),
    "torch_addcmul": (
        "torch",
        (fast_ops, "torch_multiply_add"),
        lambda: GlobalResponseNorm(),
        (5, 4, 6),
    ),
}


def _layer_output(case, weights, x):
    """A fresh one-layer model with `weights`, through predict_on_batch (the compiled /
    no-grad inference path where the fused ops run)."""
    _, _, make_layer, shape = LAYER_CASES[case]
    inputs = keras.Input(shape=shape)
    model = keras.Model(inputs, make_layer()(inputs))
    model.set_weights(weights)
    return np.asarray(model.predict_on_batch(x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_fallback_equals_fast_path(case, mode, monkeypatch, rng):
    backend, (owner, attribute), make_layer, shape = LAYER_CASES[case]
    if backend != BACKEND:
        pytest.skip(f"a {backend} fast path")
    name = case.split("/")[0]
    layer = make_layer()
    layer.build((None, *shape))
    weights = random_weights(layer, rng)
    x = rng.standard_normal((3, *shape)).astype("float32")

    with monkeypatch.context() as patch:
        spy = Spy(patch, owner, attribute)
        fast = _layer_output(case, weights, x)
    assert spy.calls >= 1, "the fast path did not run"

    with monkeypatch.context() as patch:
        spy = Spy(patch, owner, attribute, fail=mode == "failure")
        if mode == "environment":
            patch.setenv("KERAS_CONVNEXT_FAST_PATHS", "0")
        if mode == "off_cpu":
            patch.setattr(fast_ops, "on_cpu", lambda x=None: False)
        if mode == "failure":
            with pytest.warns(RuntimeWarning, match=name):
                fallback = _layer_output(case, weights, x)
        elif mode == "portable":
            with fast_ops.portable():
                fallback = _layer_output(case, weights, x)
        else:
            fallback = _layer_output(case, weights, x)
    np.testing.assert_allclose(fallback, fast, atol=1e-5, rtol=1e-5)
    if mode == "failure":
        assert name in fast_ops.disabled_fast_paths()
        calls = spy.calls
        _layer_output(case, weights, x)  # switched off: not tried again
        assert spy.calls == calls
    else:
        assert spy.calls == 0, f"the fast path ran in mode {mode}"
        assert fast_ops.disabled_fast_paths() == {}


# ----------------------------------------------------------------------------
# The model's fast paths
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_v2_weights():
    """convnextv2_atto (GRN, no layer scale) weights, random at a scale that keeps every
    block visible, and a batch of inputs."""
    rng = np.random.default_rng(3)
    model = create_convnext_v2("atto", num_classes=5, input_shape=(32, 32, 3))
    weights = random_weights(model, rng, scale=0.2)
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32")
    return weights, x


def _fresh_v2(weights, **kwargs):
    model = create_convnext_v2("atto", num_classes=5, input_shape=(32, 32, 3), **kwargs)
    model.set_weights(weights)
    return model


def _switched_off(mode, patch, name):
    """A context in which `mode` keeps fast path `name` from running."""
    if mode == "environment":
        patch.setenv("KERAS_CONVNEXT_FAST_PATHS", "0")
    if mode == "portable":
        return fast_ops.portable()
    if mode == "failure":
        return pytest.warns(RuntimeWarning, match=name)
    return contextlib.nullcontext()


def test_layerwise_call_is_the_functional_call(small_v2_weights, monkeypatch):
    """With only this path off (the layers keep theirs) the numbers are identical."""
    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    with monkeypatch.context() as patch:
        spy = Spy(patch, model_module.LayerPlan, "run")
        layerwise = keras.ops.convert_to_numpy(model(x))
        layerwise_predict = model.predict_on_batch(x)
    assert spy.calls >= 2
    monkeypatch.setattr(fast_ops, "_DISABLED", {"layerwise_call": "test"})
    spy = Spy(monkeypatch, model_module.LayerPlan, "run")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), layerwise)
    functional_predict = _fresh_v2(weights).predict_on_batch(x)
    assert spy.calls == 1  # building the second model's graph, never inference
    np.testing.assert_allclose(functional_predict, layerwise_predict, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ("portable", "environment", "failure"))
def test_layerwise_call_fallback_equals_it(small_v2_weights, mode, monkeypatch):
    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    fast = keras.ops.convert_to_numpy(model(x))
    with monkeypatch.context() as patch:
        spy = Spy(patch, model_module.LayerPlan, "run", fail=mode == "failure")
        with _switched_off(mode, patch, "layerwise_call"):
            fallback = keras.ops.convert_to_numpy(model(x))
    if mode == "failure":  # the functional call, with the same layer kernels
        assert spy.calls >= 1
        np.testing.assert_array_equal(fallback, fast)
        assert list(fast_ops.disabled_fast_paths()) == ["layerwise_call"]
    else:
        assert spy.calls == 0
        np.testing.assert_allclose(fallback, fast, atol=1e-5, rtol=1e-5)


def test_layerwise_call_frees_each_intermediate(small_v2_weights):
    """At most a layer's input and output and a block's shortcut are alive at once
    (keras' functional runner keeps every intermediate until the call ends)."""
    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    plan = model._layer_plan
    assert plan.runs_directly("float32")
    alive, peak = [], [0]

    def watched(layer, tensor):
        output = model_module.apply_layer_directly(layer, tensor)
        alive.append(weakref.ref(output))
        peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
        return output

    with _inference_mode():
        out = plan.run(keras.ops.convert_to_tensor(x), apply=watched)
        expected = model(x)
    assert len(alive) == len(plan.layers()) > 60
    assert peak[0] <= 3, f"{peak[0]} layer outputs alive at once"
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(out), keras.ops.convert_to_numpy(expected)
    )


def _inference_mode():
    """No autograd graph on torch (it would hold the intermediates for a backward pass)."""
    if BACKEND == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


@pytest.mark.parametrize("output_stages", [(1, 3), (2,)])
def test_layerwise_call_returns_the_functional_structure(
    small_v2_weights, output_stages, monkeypatch
):
    _, x = small_v2_weights
    features = create_convnext_v2(
        "atto", include_top=False, output_stages=output_stages, input_shape=(32, 32, 3)
    )
    features.set_weights(random_weights(features, np.random.default_rng(5), scale=0.2))
    ours = features(x)
    with monkeypatch.context() as patch:
        patch.setattr(fast_ops, "_DISABLED", {"layerwise_call": "test"})
        reference = features(x)
    assert type(ours) is type(reference)
    for a, b in zip(keras.tree.flatten(ours), keras.tree.flatten(reference), strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


@pytest.mark.parametrize("mode", ("portable", "environment", "failure"))
def test_predict_batch_fallback_equals_its_fast_path(small_v2_weights, mode, monkeypatch):
    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    with monkeypatch.context() as patch:
        spy = Spy(patch, fast_ops, "inference_function")
        fast = model.predict_batch(x)
        np.testing.assert_array_equal(model.predict_batch(x), fast)  # cached
    assert spy.calls == 1
    reference = _fresh_v2(weights).predict_on_batch(x)
    np.testing.assert_allclose(fast, reference, atol=1e-6, rtol=1e-6)

    model = _fresh_v2(weights)
    with monkeypatch.context() as patch:
        if mode == "failure":
            patch.setattr(fast_ops, "inference_function", lambda m: _raise)
        with _switched_off(mode, patch, "compiled_inference"):
            fallback = model.predict_batch(x)
    np.testing.assert_allclose(fallback, fast, atol=1e-5, rtol=1e-5)
    if mode == "failure":
        assert "compiled_inference" in fast_ops.disabled_fast_paths()


def _raise(*args):
    raise RuntimeError("simulated failure of a compiled inference function")


@pytest.mark.parametrize(
    "layer,weight",
    [("head_fc", "bias"), ("stage2_downsample_conv", "kernel"), ("stage1_block1_dwconv", "kernel")],
)
def test_predict_batch_sees_new_weights(small_v2_weights, layer, weight):
    """Weights assigned after a call are used by the next one (the compiled function
    takes them as arguments; torch's re-laid-out conv weights are rebuilt)."""
    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    before = model.predict_batch(x)
    variable = getattr(model.get_layer(layer), weight)
    variable.assign(np.full(variable.shape, 0.3, "float32"))
    after = model.predict_batch(x)
    reference = _fresh_v2(model.get_weights())
    np.testing.assert_allclose(after, reference.predict_on_batch(x), atol=1e-5, rtol=1e-5)
    assert not np.allclose(after, before, atol=1e-3)


@pytest.mark.skipif(BACKEND != "torch", reason="torch kernels")
@pytest.mark.parametrize("mode", MODES)
def test_torch_kernels_fallback_equals_them(small_v2_weights, mode, monkeypatch):
    import torch

    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    with monkeypatch.context() as patch, torch.inference_mode():
        spy = Spy(patch, fast_ops, "torch_apply")
        fast = keras.ops.convert_to_numpy(model(x))
    assert spy.calls > 50
    with monkeypatch.context() as patch, torch.inference_mode():
        spy = Spy(patch, fast_ops, "torch_apply", fail=mode == "failure")
        if mode == "off_cpu":
            patch.setattr(fast_ops, "on_cpu", lambda x=None: False)
        with _switched_off(mode, patch, "torch_kernels"):
            fallback = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(fallback, fast, atol=1e-5, rtol=1e-5)
    if mode == "failure":
        assert spy.calls == 1 and list(fast_ops.disabled_fast_paths()) == ["torch_kernels"]
    else:
        assert spy.calls == 0 and fast_ops.disabled_fast_paths() == {}


@pytest.mark.skipif(BACKEND != "torch", reason="torch kernels")
def test_torch_kernels_equal_the_layers_own_calls(rng):
    import torch

    norm = keras.layers.LayerNormalization(epsilon=1e-6)
    norm.build((None, 5, 6, 8))
    norm.set_weights([rng.standard_normal(8).astype("float32") for _ in range(2)])
    add = keras.layers.Add()
    add.build([(None, 5, 6, 8)] * 2)
    a, b = (torch.from_numpy(rng.standard_normal((2, 5, 6, 8)).astype("float32")) for _ in "ab")
    with torch.inference_mode():
        assert torch.equal(fast_ops.torch_apply(norm, a), norm.call(a))
        assert torch.equal(fast_ops.torch_apply(add, [a, b]), add.call([a, b]))
        rms = keras.layers.LayerNormalization(epsilon=1e-6, rms_scaling=True)
        rms.build((None, 5, 6, 8))
        assert torch.equal(fast_ops.torch_apply(rms, a), rms.call(a))  # not the kernel's case


# ----------------------------------------------------------------------------
# Keras internals
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ("portable", "environment", "failure"))
def test_flatten_layers_fallback_lists_the_same_layers(mode, monkeypatch):
    inner = create_convnext_v1("atto", include_top=False, pooling="avg", input_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3))
    outer = keras.Model(inputs, keras.layers.Dense(3, name="outer_fc")(inner(inputs)))
    with monkeypatch.context() as patch:
        spy = Spy(patch, fast_ops, "_keras_flatten_layers")
        fast = [layer.name for layer in fast_ops.flatten_layers(outer)]
    assert spy.calls == 1 and "stage3_block1_pwconv2" in fast and "outer_fc" in fast
    with monkeypatch.context() as patch:
        spy = Spy(patch, fast_ops, "_keras_flatten_layers", fail=mode == "failure")
        with _switched_off(mode, patch, "flatten_layers"):
            fallback = [layer.name for layer in fast_ops.flatten_layers(outer)]
    assert fallback == fast
    assert spy.calls == (1 if mode == "failure" else 0)


@pytest.mark.parametrize("mode", ("portable", "environment", "failure"))
def test_deferred_initialisation_fallback_ports_the_same_weights(mode, monkeypatch):
    timm_model = random_timm_model("convnext_atto", seed=4)
    state = timm_state_numpy(timm_model)

    def build():
        return create_convnext_v1("atto", input_shape=(32, 32, 3))

    with monkeypatch.context() as patch:
        spy = Spy(patch, fast_ops, "_keras_initialize_all_variables")
        fast = wc.build_ported(build, state)
    assert spy.calls == 1
    with monkeypatch.context() as patch:
        spy = Spy(patch, fast_ops, "_keras_initialize_all_variables", fail=mode == "failure")
        with _switched_off(mode, patch, "deferred_variables"):
            fallback = wc.build_ported(build, state)
    assert spy.calls == (1 if mode == "failure" else 0)
    for a, b in zip(fast.weights, fallback.weights, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), err_msg=a.path
        )
    # and a model built after the fallback initialises normally
    assert np.isfinite(keras.ops.convert_to_numpy(build().weights[0])).all()


def test_with_head_keeps_the_backbone_when_deferred_initialisation_fails(
    small_v2_weights, monkeypatch
):
    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    fast = model.with_head(num_classes=0, normalize=True)
    Spy(monkeypatch, fast_ops, "_keras_initialize_all_variables", fail=True)
    with pytest.warns(RuntimeWarning, match="deferred_variables"):
        fallback = model.with_head(num_classes=0, normalize=True)
    np.testing.assert_array_equal(fallback.predict_on_batch(x), fast.predict_on_batch(x))
