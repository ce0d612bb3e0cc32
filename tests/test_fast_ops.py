"""Every fast path in `convnext_layers.fast_ops` against its fallback, on the current
backend: switched off by `portable()`, by KERAS_CONVNEXT_FAST_PATHS=0, by a simulated
failure of its private call (then switched off for the process, with one warning),
and, for the CPU-only ones, by a device that is not a CPU. The fallback must give the
fast path's numbers on random inputs; a spy on the private call checks the fast path
really ran (or really did not)."""

import contextlib
import math
import os
import weakref

import keras
import numpy as np
import pytest
from conftest import BACKEND, random_timm_model, result_line, run_python, timm_state_numpy

import weights_convert as wc
from convnext_common import allocator, cpu
from convnext_layers import (
    ConvNeXtConfig,
    DepthwiseConv,
    DownsampleConv,
    GlobalResponseNorm,
    PointwiseDense,
    exact_gelu,
    fast_ops,
)
from convnext_layers import layers as layers_module
from convnext_layers import plan as plan_module
from convnext_layers.fast_ops import (
    jax_kernels,
    keras_internals,
    tensorflow_kernels,
    torch_kernels,
)
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


def _shifted_sum_case(kernel_size, shape):
    layer = lambda: DepthwiseConv(kernel_size)  # noqa: E731
    return ("jax", (jax_kernels, "depthwise_shifted_sum"), layer, shape)


# name -> (backend it exists on, its private call (owner, attribute), layer, input shape)
LAYER_CASES = {
    "torch_conv_nhwc/depthwise": (
        "torch",
        (torch_kernels, "torch_conv2d_nhwc"),
        lambda: DepthwiseConv(7),
        (9, 11, 8),
    ),
    "torch_conv_nhwc/downsample": (
        "torch",
        (torch_kernels, "torch_conv2d_nhwc"),
        lambda: DownsampleConv(6, 3, strides=2, explicit_padding=1),
        (9, 12, 5),
    ),
    "jax_shifted_sum": _shifted_sum_case(7, (9, 11, 8)),
    # maps the kernel reaches past on both sides: the padding no position reaches is cut
    "jax_shifted_sum/map_under_the_kernel": _shifted_sum_case(7, (2, 3, 8)),
    "jax_shifted_sum/one_pixel_kernel_9": _shifted_sum_case(9, (1, 4, 8)),
    "onednn_linear/gelu": (
        "torch",
        (torch_kernels, "_onednn_linear_pointwise"),
        lambda: PointwiseDense(12, activation=exact_gelu),
        (4, 5, 6),
    ),
    "onednn_linear": (
        "torch",
        (torch_kernels, "_onednn_linear_pointwise"),
        lambda: PointwiseDense(12),
        (4, 5, 6),
    ),
    "tensorflow_fused_dense": (
        "tensorflow",
        (tensorflow_kernels, "tensorflow_dense"),
        lambda: PointwiseDense(12, activation=exact_gelu),
        (4, 5, 6),
    ),
    "tensorflow_pointwise_conv": (
        "tensorflow",
        (tensorflow_kernels, "tensorflow_pointwise_conv"),
        lambda: PointwiseDense(12, dtype="bfloat16"),
        (4, 5, 6),
    ),
    "torch_addcmul": (
        "torch",
        (torch_kernels, "torch_multiply_add"),
        lambda: GlobalResponseNorm(),
        (5, 4, 6),
    ),
    "torch_grn_bfloat16": (
        "torch",
        (torch_kernels, "torch_response_norm"),
        lambda: GlobalResponseNorm(dtype="bfloat16"),
        (5, 4, 6),
    ),
}


def _layer_output(case, weights, x):
    """A fresh one-layer model with `weights`, through predict_on_batch (the compiled /
    no-grad inference path where the fused ops run), as float32."""
    _, _, make_layer, shape = LAYER_CASES[case]
    inputs = keras.Input(shape=shape)
    model = keras.Model(inputs, make_layer()(inputs))
    model.set_weights(weights)
    return np.asarray(model.predict_on_batch(x), dtype="float32")


def _layer_tolerance(case):
    """The same numbers in float32; in bfloat16 up to the output's rounding (2^-8
    relative) when the two formulations sum in different orders."""
    dtype = LAYER_CASES[case][2]().compute_dtype
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == "float32" else {"atol": 1e-2, "rtol": 2**-7}


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
    np.testing.assert_allclose(fallback, fast, **_layer_tolerance(case))
    if mode == "failure":
        assert name in fast_ops.disabled_fast_paths()
        calls = spy.calls
        _layer_output(case, weights, x)  # switched off: not tried again
        assert spy.calls == calls
    else:
        assert spy.calls == 0, f"the fast path ran in mode {mode}"
        assert fast_ops.disabled_fast_paths() == {}


# fast path -> (backend, its private call, a layer in a dtype it was not measured in)
UNMEASURED_DTYPES = {
    "tensorflow_pointwise_conv": (
        "tensorflow",
        (tensorflow_kernels, "tensorflow_pointwise_conv"),
        lambda: PointwiseDense(12, dtype="float32"),
    ),
    "torch_grn_bfloat16": (
        "torch",
        (torch_kernels, "torch_response_norm"),
        lambda: GlobalResponseNorm(dtype="float32"),
    ),
}


@pytest.mark.parametrize("name", sorted(UNMEASURED_DTYPES))
def test_fast_paths_step_aside_in_dtypes_they_were_not_measured_in(name, monkeypatch, rng):
    backend, (owner, attribute), make_layer = UNMEASURED_DTYPES[name]
    if backend != BACKEND:
        pytest.skip(f"a {backend} fast path")
    inputs = keras.Input(shape=(4, 5, 6))
    model = keras.Model(inputs, make_layer()(inputs))
    model.set_weights(random_weights(model, rng))
    spy = Spy(monkeypatch, owner, attribute)
    model.predict_on_batch(rng.standard_normal((2, 4, 5, 6)).astype("float32"))
    assert spy.calls == 0


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX shifted sum's gradient rule")
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("shape", [(9, 11, 8), (2, 3, 8)])  # (2, 3): a map under the kernel
def test_shifted_sum_gradient_equals_the_convolutions(policy, shape, monkeypatch):
    """Training through the shifted sum uses its own gradient rule (jax_kernels.jax_depthwise).
    Its gradients of input, kernel and bias equal those of XLA's grouped conv (the
    portable path) in float32, on an odd-sized input with every weight random; in
    mixed bfloat16 they keep their dtypes and stay within bfloat16 rounding of them."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(11)
    layers = {p: DepthwiseConv(7, dtype=p) for p in {policy, "float32"}}
    for layer in layers.values():
        layer.build((None, *shape))
    kernel, bias = (jnp.asarray(w) for w in random_weights(layers["float32"], rng))
    dtype = layers[policy].compute_dtype
    x = jnp.asarray(rng.standard_normal((3, *shape)), dtype)
    probe = jnp.asarray(rng.standard_normal((3, *shape)), dtype)

    def loss(layer):
        def of(x, kernel, bias):
            with keras.StatelessScope(state_mapping=[(layer.kernel, kernel), (layer.bias, bias)]):
                out = layer(x)
            return jnp.sum(out.astype("float32") * probe.astype("float32"))

        return jax.grad(of, argnums=(0, 1, 2))

    with monkeypatch.context() as patch:
        spy = Spy(patch, jax_kernels, "_jax_depthwise_rule")
        fast = jax.jit(loss(layers[policy]))(x, kernel, bias)
    assert spy.calls >= 1, "the fast path did not run"
    with fast_ops.portable():  # float32 throughout, on the same (rounded) inputs
        reference = loss(layers["float32"])(x.astype("float32"), kernel, bias)
    tolerance = 1e-5 if policy == "float32" else 2e-2  # bfloat16: 8 significant bits
    for got, want, name, input_dtype in zip(
        fast, reference, ("input", "kernel", "bias"), (dtype, "float32", "float32"), strict=True
    ):
        assert got.dtype == input_dtype, name
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(
            np.asarray(got, "float32"), np.asarray(want), atol=tolerance * scale, err_msg=name
        )


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


# the layer-by-layer inference's kernels that compute a layer or a block's output part
# other than the layers' own calls do (each checked against them within its roundings)
BLOCK_KERNELS = ("tensorflow_layer_norm", "torch_residual_dense", "torch_whole_block")


def _layers_own_kernels(monkeypatch):
    """Keeps `BLOCK_KERNELS` off, for the tests whose layer-by-layer and functional
    numbers must be identical."""
    use_fast_path = fast_ops.use_fast_path

    def without_block_kernels(name, x=None):
        return name not in BLOCK_KERNELS and use_fast_path(name, x)

    monkeypatch.setattr(fast_ops, "use_fast_path", without_block_kernels)


def test_layerwise_call_is_the_functional_call(small_v2_weights, monkeypatch):
    """With only this path off (the layers keep theirs) the numbers are identical."""
    _layers_own_kernels(monkeypatch)
    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    with monkeypatch.context() as patch:
        spy = Spy(patch, plan_module.LayerPlan, "run")
        layerwise = keras.ops.convert_to_numpy(model(x))
        layerwise_predict = model.predict_on_batch(x)
    assert spy.calls >= 2
    monkeypatch.setattr(fast_ops, "_DISABLED", {"layerwise_call": "test"})
    spy = Spy(monkeypatch, plan_module.LayerPlan, "run")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), layerwise)
    functional_predict = _fresh_v2(weights).predict_on_batch(x)
    assert spy.calls == 1  # building the second model's graph, never inference
    np.testing.assert_allclose(functional_predict, layerwise_predict, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ("portable", "environment", "failure"))
def test_layerwise_call_fallback_equals_it(small_v2_weights, mode, monkeypatch):
    _layers_own_kernels(monkeypatch)
    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    fast = keras.ops.convert_to_numpy(model(x))
    with monkeypatch.context() as patch:
        spy = Spy(patch, plan_module.LayerPlan, "run", fail=mode == "failure")
        with _switched_off(mode, patch, "layerwise_call"):
            fallback = keras.ops.convert_to_numpy(model(x))
    if mode == "failure":  # the functional call, with the same layer kernels
        assert spy.calls >= 1
        np.testing.assert_array_equal(fallback, fast)
        assert list(fast_ops.disabled_fast_paths()) == ["layerwise_call"]
    else:
        assert spy.calls == 0
        np.testing.assert_allclose(fallback, fast, atol=1e-5, rtol=1e-5)


def test_layerwise_call_frees_each_intermediate(small_v2_weights, monkeypatch):
    """At most a layer's input and output and a block's shortcut are alive at once
    (keras' functional runner keeps every intermediate until the call ends)."""
    _layers_own_kernels(monkeypatch)
    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    plan = model._layer_plan
    assert plan.runs_directly("float32")
    alive, peak = [], [0]

    def watched(layer, tensor):
        output = plan_module.apply_layer_directly(layer, tensor)
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
    _layers_own_kernels(monkeypatch)
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
    [
        ("head_fc", "bias"),
        ("stage2_downsample_conv", "kernel"),
        ("stage1_block1_dwconv", "kernel"),
        ("stage0_block1_norm", "beta"),
        ("stage2_block0_grn", "weight"),
    ],
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


def _fresh_v1(rng):
    model = create_convnext_v1("atto", num_classes=5, input_shape=(32, 32, 3))
    model.set_weights(random_weights(model, rng, scale=0.2))
    return model


@pytest.mark.parametrize("layer,weight", [("stage0_block1_layer_scale", "gamma"),
                                          ("stage1_block0_pwconv2", "kernel")])  # fmt: skip
def test_predict_batch_sees_new_weights_of_a_block_output(layer, weight, rng):
    """V1: the layer scale and the Dense before it, folded into one weight on torch."""
    model = _fresh_v1(rng)
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32")
    before = model.predict_batch(x)
    variable = getattr(model.get_layer(layer), weight)
    variable.assign(np.full(variable.shape, 0.3, "float32"))
    after = model.predict_batch(x)
    reference = create_convnext_v1("atto", num_classes=5, input_shape=(32, 32, 3))
    reference.set_weights(model.get_weights())
    np.testing.assert_allclose(after, reference.predict_on_batch(x), atol=1e-5, rtol=1e-5)
    assert not np.allclose(after, before, atol=1e-3)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's per-executable compiler options")
@pytest.mark.parametrize("mode", ("portable", "failure"))
def test_jax_compiler_options_fallback_equals_them(mode, monkeypatch):
    """V1's predict_batch executable is compiled with its own XLA options; an option
    XLA refuses (as a future XLA might) falls back to the default compilation."""
    rng = np.random.default_rng(4)
    model = _fresh_v1(rng)
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32")
    assert jax_kernels.jax_compiler_options(model) == jax_kernels.JAX_V1_COMPILER_OPTIONS
    reference = model.predict_on_batch(x)  # keras' own jit, default options
    if mode == "failure":
        monkeypatch.setattr(jax_kernels, "JAX_V1_COMPILER_OPTIONS", {"xla_no_such_option": ""})
        with pytest.warns(RuntimeWarning, match="jax_compiler_options"):
            got = model.predict_batch(x)
        assert list(fast_ops.disabled_fast_paths()) == ["jax_compiler_options"]
    else:
        with fast_ops.portable():
            assert jax_kernels.jax_compiler_options(model) == {}
        got = model.predict_batch(x)
        assert fast_ops.disabled_fast_paths() == {}
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's per-executable compiler options")
def test_jax_compiler_options_only_where_measured(monkeypatch):
    """Only models without GRN (where they were faster), never over the user's own
    XLA_FLAGS for the same option, never off a CPU."""
    v1 = create_convnext_v1("atto", num_classes=5, input_shape=(32, 32, 3))
    v2 = create_convnext_v2("atto", num_classes=5, input_shape=(32, 32, 3))
    assert jax_kernels.jax_compiler_options(v1) == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert jax_kernels.jax_compiler_options(v2) == {}
    assert jax_kernels.jax_compiler_options(keras.Sequential([keras.layers.Dense(2)])) == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=all")
    assert jax_kernels.jax_compiler_options(v1) == {}
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(fast_ops, "on_cpu", lambda x=None: False)
    assert jax_kernels.jax_compiler_options(v1) == {}


@pytest.fixture(scope="module")
def float32_compute_case(small_v2_weights):
    """A bfloat16 V2 model's predict_batch on JAX (computed in float32 on a float32 copy
    of the architecture, its products on bfloat16 operands) and the float32 model's,
    with its weights and inputs."""
    weights, x = small_v2_weights
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast_ops, "_DISABLED", {})
        spy = Spy(patch, jax_kernels, "float32_twin")
        products = Spy(patch, jax_kernels, "bfloat16_product")
        fast = _fresh_v2(weights).with_head(dtype="bfloat16").predict_batch(x)
        assert spy.calls == 1 and fast_ops.disabled_fast_paths() == {}
        dense_layers = sum(isinstance(layer, keras.layers.Dense) for layer in
                           fast_ops.flatten_layers(_fresh_v2(weights)))  # fmt: skip
        assert products.calls == dense_layers - 1  # every Dense but the float32 head's
    reference = _fresh_v2(weights).predict_batch(x)  # float32 arithmetic, float32 weights
    return weights, x, fast, reference


def _bfloat16_v2_switched_off(weights, x, mode, monkeypatch, spied, name):
    """A bfloat16 V2 model's predict_batch on JAX with fast path `name` kept from running
    by `mode` (a failure: of `jax_kernels.<spied>`), and how often `spied` was called."""
    model = _fresh_v2(weights).with_head(dtype="bfloat16")
    with monkeypatch.context() as patch:
        spy = Spy(patch, jax_kernels, spied, fail=mode == "failure")
        if mode == "off_cpu":
            patch.setattr(fast_ops, "on_cpu", lambda x=None: False)
        with _switched_off(mode, patch, name):
            outputs = model.predict_batch(x)
    return outputs, spy.calls


@pytest.mark.slow  # JAX compiles a model per mode
@pytest.mark.skipif(BACKEND != "jax", reason="a JAX fast path")
@pytest.mark.parametrize("mode", MODES)
def test_jax_float32_compute_fallback_equals_it(float32_compute_case, mode, monkeypatch):
    """Switched off, a bfloat16 model computes in bfloat16, within bfloat16's rounding of
    float32; the fast path (float32 arithmetic on the bfloat16 weights) is closer to
    float32 than that. A float32 model never gets a float32 copy."""
    weights, x, fast, reference = float32_compute_case
    assert jax_kernels.float32_twin(_fresh_v2(weights)) is None
    fallback, calls = _bfloat16_v2_switched_off(
        weights, x, mode, monkeypatch, "_float32_runner", "jax_float32_compute"
    )
    assert calls == (1 if mode == "failure" else 0)
    assert list(fast_ops.disabled_fast_paths()) == (["jax_float32_compute"] * (mode == "failure"))
    fast_error = np.abs(fast - reference).max()
    fallback_error = np.abs(np.float32(fallback) - reference).max()
    assert fast_error < fallback_error < 0.05 * np.abs(reference).max()


@pytest.mark.skipif(BACKEND != "jax", reason="a JAX fast path")
@pytest.mark.parametrize("activation", (None, "exact_gelu"))
def test_jax_bfloat16_product_is_the_bfloat16_operands_product(activation, rng):
    """The product of the input and kernel rounded to bfloat16 (what a bfloat16 Dense
    multiplies), summed in float32: against NumPy's float64 sum of the same roundings."""
    import ml_dtypes  # jax's own dependency: the reference's bfloat16 rounding

    dense = PointwiseDense(48, activation=exact_gelu if activation else None)
    dense.build((None, 40))
    dense.set_weights([rng.standard_normal(w.shape).astype("float32") for w in dense.weights])
    x = rng.standard_normal((2, 5, 7, 40)).astype("float32")
    got = np.asarray(jax_kernels.bfloat16_product(dense, keras.ops.convert_to_tensor(x)))

    def rounded(a):
        return a.astype(ml_dtypes.bfloat16).astype("float64")

    kernel, bias = dense.get_weights()
    expected = rounded(x) @ rounded(kernel) + bias
    if activation:
        expected = 0.5 * expected * (1.0 + np.vectorize(math.erf)(expected / np.sqrt(2.0)))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)
    if not activation:  # the operands' rounding is what it computes, not float32's product
        assert np.abs(got - (x @ kernel + bias)).max() > 1e-3


@pytest.fixture(scope="module")
def bfloat16_products_case(float32_compute_case):
    """`float32_compute_case` and the bfloat16 model's predict_batch with
    `jax_bfloat16_products` alone off (its float32 twin's products in float32)."""
    weights, x, fast, reference = float32_compute_case
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast_ops, "_DISABLED", {})
        use_fast_path = fast_ops.use_fast_path

        def without_bfloat16_products(name, x=None):
            return name != "jax_bfloat16_products" and use_fast_path(name, x)

        patch.setattr(fast_ops, "use_fast_path", without_bfloat16_products)
        float32_products = _fresh_v2(weights).with_head(dtype="bfloat16").predict_batch(x)
    return weights, x, fast, float32_products, reference


@pytest.mark.slow  # JAX compiles a model per mode
@pytest.mark.skipif(BACKEND != "jax", reason="a JAX fast path")
@pytest.mark.parametrize("mode", MODES)
def test_jax_bfloat16_products_fallback_equals_it(bfloat16_products_case, mode, monkeypatch):
    """Failing, the float32 twin's products run in float32 (its numbers exactly); switched
    off with every fast path, the bfloat16 call. Either way the fast path is within
    bfloat16's rounding of float32, as the fallbacks are."""
    weights, x, fast, float32_products, reference = bfloat16_products_case
    fallback, calls = _bfloat16_v2_switched_off(
        weights, x, mode, monkeypatch, "bfloat16_product", "jax_bfloat16_products"
    )
    fallback = np.float32(fallback)
    assert calls == (1 if mode == "failure" else 0)  # switched off at its first failure
    assert list(fast_ops.disabled_fast_paths()) == (["jax_bfloat16_products"] * (mode == "failure"))
    if mode == "failure":
        np.testing.assert_array_equal(fallback, float32_products)
    scale = np.abs(reference).max()
    assert np.abs(fast - float32_products).max() > 0  # the products really changed
    for got in (fast, fallback):
        assert np.abs(got - reference).max() < 0.05 * scale


@pytest.mark.skipif(BACKEND != "jax", reason="a JAX fast path")
def test_jax_bfloat16_products_only_in_a_bfloat16_models_twin(small_v2_weights, monkeypatch):
    """A float32 model's Dense layers keep their own call; a bfloat16 V1 model's twin
    keeps YNNPACK's fusions for its products, V1's float32 options where this fast path
    is off."""
    weights, x = small_v2_weights
    float32_model = _fresh_v2(weights)
    spy = Spy(monkeypatch, jax_kernels, "bfloat16_product")
    float32_model.predict_batch(x)
    assert spy.calls == 0
    assert jax_kernels.float32_twin_products(float32_model) is False
    v1 = create_convnext_v1("atto", num_classes=5, input_shape=(32, 32, 3), dtype="bfloat16")
    assert jax_kernels.float32_twin_products(v1) is True
    twin_layers = fast_ops.flatten_layers(jax_kernels.float32_twin(v1))
    marked = [layer.name for layer in twin_layers if layer in jax_kernels._BFLOAT16_PRODUCT_LAYERS]
    dense = [layer.name for layer in twin_layers if isinstance(layer, keras.layers.Dense)]
    assert marked == [name for name in dense if name.startswith("stage")]  # not the head's
    assert len(marked) == len(dense) - 1
    assert jax_kernels.jax_compiler_options(v1) == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    }
    monkeypatch.setattr(fast_ops, "_DISABLED", {"jax_bfloat16_products": "test"})
    assert jax_kernels.jax_compiler_options(v1) == jax_kernels.JAX_V1_COMPILER_OPTIONS


# ----------------------------------------------------------------------------
# A CPU without bfloat16 instructions: a bfloat16 model computes in float32
# ----------------------------------------------------------------------------

# backend -> (module, the function that makes a bfloat16 model's float32 twin run)
FLOAT32_TWINS = {
    "torch": (torch_kernels, "float32_runner"),
    "tensorflow": (tensorflow_kernels, "float32_runner"),
    "jax": (jax_kernels, "_float32_runner"),
}


@pytest.fixture
def cpu_without_bfloat16(monkeypatch):
    """This CPU's flags known and naming no bfloat16 instructions (an AVX-512 Xeon
    without AVX512_BF16), whatever CPU runs the test."""
    monkeypatch.setattr(cpu, "has_bfloat16_instructions", lambda: False)


def _as_float32(weights):
    return [np.asarray(w, "float32") for w in weights]


@pytest.mark.skipif(BACKEND not in FLOAT32_TWINS, reason="no float32 twin on this backend")
def test_without_bfloat16_instructions_a_bfloat16_model_is_float32_arithmetic(
    small_v2_weights, cpu_without_bfloat16, monkeypatch
):
    """predict_batch of a bfloat16 model is then the float32 model's on the bfloat16
    weights (float32 arithmetic, every product too), and sees a weight update."""
    owner, function = FLOAT32_TWINS[BACKEND]
    weights, x = small_v2_weights
    model = _fresh_v2(weights).with_head(dtype="bfloat16")
    spy = Spy(monkeypatch, owner, function)
    products = Spy(monkeypatch, jax_kernels, "bfloat16_product")
    for update in (None, 0.5):
        if update is not None:  # the next weights, rounded to bfloat16 by the model
            model.set_weights([w * update + 0.01 for w in weights])
        fast = model.predict_batch(x)
        reference = _fresh_v2(_as_float32(model.get_weights())).predict_batch(x)
        scale = np.abs(reference).max()
        np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-5 * scale)
    assert spy.calls == 1 and products.calls == 0
    assert fast_ops.disabled_fast_paths() == {}
    if BACKEND == "jax":  # V1's float32 compiler options, its products in float32
        v1 = create_convnext_v1("atto", num_classes=5, input_shape=(32, 32, 3), dtype="bfloat16")
        assert jax_kernels.float32_twin_products(v1) is False
        twin_layers = fast_ops.flatten_layers(jax_kernels.float32_twin(v1))
        assert not any(layer in jax_kernels._BFLOAT16_PRODUCT_LAYERS for layer in twin_layers)
        assert jax_kernels.jax_compiler_options(v1) == jax_kernels.JAX_V1_COMPILER_OPTIONS


@pytest.mark.skipif(BACKEND == "jax", reason="JAX computes in float32 on every CPU (above)")
@pytest.mark.skipif(BACKEND not in FLOAT32_TWINS, reason="no float32 twin on this backend")
@pytest.mark.parametrize("mode", MODES)
def test_float32_compute_fallback_equals_it(
    small_v2_weights, cpu_without_bfloat16, mode, monkeypatch
):
    """Kept from running, a bfloat16 model computes in bfloat16: within bfloat16's
    rounding of the float32 arithmetic on its weights, which the fast path gives. A
    failure of the float32 copy switches the fast path off once."""
    weights, x = small_v2_weights
    model = _fresh_v2(weights).with_head(dtype="bfloat16")
    reference = _fresh_v2(_as_float32(model.get_weights())).predict_batch(x)
    with monkeypatch.context() as patch:
        spy = Spy(patch, fast_ops, "float32_copy" if BACKEND == "torch" else "float32_architecture",
                  fail=mode == "failure")  # fmt: skip
        if mode == "off_cpu":
            patch.setattr(fast_ops, "on_cpu", lambda x=None: False)
        with _switched_off(mode, patch, "float32_compute"):
            fallback = np.float32(model.predict_batch(x))
    assert spy.calls == (1 if mode == "failure" else 0)
    assert list(fast_ops.disabled_fast_paths()) == (["float32_compute"] * (mode == "failure"))
    scale = np.abs(reference).max()
    assert 1e-4 * scale < np.abs(fallback - reference).max() < 0.05 * scale


@pytest.mark.skipif(BACKEND == "jax", reason="JAX computes in float32 on every CPU")
@pytest.mark.skipif(BACKEND not in FLOAT32_TWINS, reason="no float32 twin on this backend")
def test_float32_compute_steps_aside_where_bfloat16_is_native(small_v2_weights, monkeypatch):
    """On a CPU with bfloat16 instructions (the suite's default, tests/conftest.py) or
    with its flags unknown, and for a float32 model anywhere, no float32 twin."""
    owner, function = FLOAT32_TWINS[BACKEND]
    weights, x = small_v2_weights
    spy = Spy(monkeypatch, owner, function)
    for native in (True, None):
        monkeypatch.setattr(cpu, "has_bfloat16_instructions", lambda native=native: native)
        _fresh_v2(weights).with_head(dtype="bfloat16").predict_batch(x)
    monkeypatch.setattr(cpu, "has_bfloat16_instructions", lambda: False)
    _fresh_v2(weights).predict_batch(x)
    assert spy.calls == 0


# backend -> (fast path, the function that runs each layer in the layer-by-layer inference)
LAYER_KERNELS = {
    "torch": ("torch_kernels", torch_kernels, "torch_apply"),
    "tensorflow": ("tensorflow_layer_norm", tensorflow_kernels, "tensorflow_apply"),
}


@pytest.mark.skipif(BACKEND not in LAYER_KERNELS, reason="no layer kernels on this backend")
@pytest.mark.parametrize("mode", MODES)
def test_layer_kernels_fallback_equals_them(small_v2_weights, mode, monkeypatch):
    name, owner, apply = LAYER_KERNELS[BACKEND]
    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    with monkeypatch.context() as patch, _inference_mode():
        spy = Spy(patch, owner, apply)
        fast = [keras.ops.convert_to_numpy(model(x)), model.predict_batch(x)]
    assert spy.calls > 10  # the stem's, the downsampling's and the head's layers at least
    with monkeypatch.context() as patch, _inference_mode():
        spy = Spy(patch, owner, apply, fail=mode == "failure")
        if mode == "off_cpu":
            patch.setattr(fast_ops, "on_cpu", lambda x=None: False)
        with _switched_off(mode, patch, name):
            fallback = [keras.ops.convert_to_numpy(model(x)), model.predict_on_batch(x)]
    for got, want in zip(fallback, fast, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if mode == "failure":
        assert spy.calls == 1 and list(fast_ops.disabled_fast_paths()) == [name]
    else:
        assert spy.calls == 0 and fast_ops.disabled_fast_paths() == {}


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "simplenorm"])
@pytest.mark.parametrize("use_grn", [False, True])
def test_pointwise_tail_is_the_inverted_bottleneck(norm, use_grn):
    """Where a block's per-position part starts, and the hidden width it reaches:
    V1 from the norm on (4C wide), V2 none (GRN's statistics span the image)."""
    config = ConvNeXtConfig(
        depths=(1, 1, 1, 1), widths=(40, 80, 160, 320), norm=norm, use_grn=use_grn,
        layer_scale_init_value=None if use_grn else 1e-6,
    )  # fmt: skip
    block = plan_module.block_layers(40, 7, "block", 0.1, config)
    if use_grn:
        assert block._tail is None
    else:
        assert block._tail == (1, 160)
        assert block.branch[1].name == "block_norm"
        assert isinstance(block.branch[-1], layers_module.StochasticDepth)


# backend -> the fast path that splits a block's per-position tail into row blocks
ROW_BLOCKS = {"jax": "jax_row_blocks", "torch": "torch_row_blocks"}


SMALL_ROW_BLOCK = 4 * 160 * 10  # bytes: 10 rows of convnext_atto's stage-0 hidden tensor


@pytest.fixture(scope="module")
def row_block_case():
    """convnext_atto V1 weights, a 44 x 44 image, and predict_batch's and
    predict_on_batch's outputs with the per-position tails split into row blocks
    (made small: stage 0 into 13 blocks of 9 rows and a rest of 4, stage 1 into 5
    of 5, stage 2 whole); checks on the way that blocks were used there and not in
    an eager JAX call or under torch's autograd (V2 has no per-position tail:
    `test_pointwise_tail_is_the_inverted_bottleneck`)."""
    rng = np.random.default_rng(6)
    weights = random_weights(create_convnext_v1("atto", num_classes=5), rng, scale=0.2)
    x = rng.standard_normal((1, 44, 44, 3)).astype("float32")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast_ops, "_DISABLED", {})
        patch.setattr(fast_ops, "ROW_BLOCK_BYTES", SMALL_ROW_BLOCK)
        assert fast_ops.row_blocks(121, 160) == (13, 9)
        assert fast_ops.row_blocks(25, 320) == (5, 5)
        assert fast_ops.row_blocks(4, 640) is None
        model = _v1_44(weights)
        spy = Spy(patch, fast_ops, "_as_images")
        split = [model.predict_batch(x), model.predict_on_batch(x)]
        calls = spy.calls
        assert calls > 0
        unsplit = keras.ops.convert_to_numpy(model(x))  # eager JAX; torch with autograd
        assert spy.calls == calls
        assert fast_ops.disabled_fast_paths() == {}
    return weights, x, split, unsplit


def _v1_44(weights):
    model = create_convnext_v1("atto", num_classes=5, input_shape=(44, 44, 3))
    model.set_weights(weights)
    return model


@pytest.mark.skipif(BACKEND not in ROW_BLOCKS, reason="no row blocks on this backend")
@pytest.mark.parametrize("mode", MODES)
def test_row_blocks_fallback_equals_them(row_block_case, mode, monkeypatch):
    """The tails over row blocks give the numbers of the tails in one piece."""
    name = ROW_BLOCKS[BACKEND]
    weights, x, split, unsplit = row_block_case
    monkeypatch.setattr(fast_ops, "ROW_BLOCK_BYTES", SMALL_ROW_BLOCK)
    model = _v1_44(weights)
    with monkeypatch.context() as patch:
        spy = Spy(patch, fast_ops, "row_blocks", fail=mode == "failure")
        if mode == "off_cpu":
            patch.setattr(fast_ops, "on_cpu", lambda x=None: False)
        with _switched_off(mode, patch, name):
            fallback = [model.predict_batch(x), model.predict_on_batch(x)]
    for got in (*fallback, unsplit, split[1]):
        np.testing.assert_allclose(got, split[0], atol=1e-5, rtol=1e-5)
    if mode == "failure":
        assert spy.calls >= 1 and list(fast_ops.disabled_fast_paths()) == [name]
    else:
        assert spy.calls == 0 and fast_ops.disabled_fast_paths() == {}


@pytest.mark.skipif(BACKEND != "tensorflow", reason="a tensorflow fast path")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_tensorflow_layer_norm_is_layer_norm(scale, dtype, rng):
    """The FusedBatchNormV3 formulation, eager and in a graph traced with an open
    batch size (where grappler fuses it), equals LayerNorm computed in float64 with
    the layer's epsilon (1e-6: at scale 1e-3 the variance is 1e-6, where
    `tf.nn.fused_batch_norm`'s floor of 1.001e-5 would change the result); in
    bfloat16 (statistics in float32) within the roundings of bfloat16 arithmetic
    (u = 2^-8): x - mean, times 1/std, times gamma, each rounded (3u relative to the
    product gamma * x_hat), then the sum with beta (u relative to the output). Where the
    product and beta nearly cancel, the error is relative to them, not to the small
    output: seen once in a full run, 0.0109 at an output of 0.09."""
    import tensorflow as tf

    x = (scale * rng.standard_normal((3, 5, 7, 24))).astype("float32")
    gamma, beta = (rng.standard_normal(24).astype("float32") for _ in "gb")
    if dtype == "bfloat16":  # the reference sees the rounded inputs the kernel sees
        x, gamma, beta = (tf.cast(tf.cast(v, dtype), "float32").numpy() for v in (x, gamma, beta))
    x64 = x.astype("float64")
    mean = x64.mean(-1, keepdims=True)
    variance = ((x64 - mean) ** 2).mean(-1, keepdims=True)
    product = (x64 - mean) / np.sqrt(variance + 1e-6) * gamma
    expected = product + beta

    def norm(v):
        return tensorflow_kernels.tensorflow_layer_norm(
            v, tf.constant(gamma, dtype), tf.constant(beta, dtype), 1e-6
        )

    graph = tf.function(norm).get_concrete_function(tf.TensorSpec((None, 5, 7, 24), dtype))
    if dtype == "float32":
        bound = np.full(x.shape, 2e-5)
    else:  # the three roundings of the product and the sum's (see above)
        bound = 2**-8 * (3 * np.abs(product) + np.abs(expected))
    for got in (norm(tf.constant(x, dtype)), graph(tf.constant(x, dtype))):
        assert tuple(got.shape) == x.shape and got.dtype == dtype
        error = np.abs(tf.cast(got, "float32").numpy() - expected)
        assert np.all(error <= bound), (error - bound).max()


@pytest.mark.skipif(BACKEND != "torch", reason="a torch fast path")
@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize(("height", "width"), [(7, 9), (56, 56)])
def test_torch_bfloat16_response_norm_is_grn(scale, height, width, rng):
    """The bfloat16 GRN equals GRN computed in float64 on the same bfloat16 values within
    the roundings it makes (u = 2^-8 relative, bfloat16's spacing): the factor
    1 + weight * Nx and the bias rounded to bfloat16 (u/2 each), the product and the sum
    (u/2 each), so |error| <= u * (|x * factor| + |bias| + |y|); and each square rounded
    to bfloat16 before the float32 sum and the sum rounded to bfloat16 once (u/2
    relative each), so Gx within u/2 and Nx = Gx / mean(Gx) within u: u * |x * weight *
    Nx| more. At scale 30 the sum of squares over H x W (7 x 9, and 56 x 56 as in
    convnextv2_atto's first stage) would lose digits if it were accumulated in
    bfloat16."""
    import torch

    x = (scale * rng.standard_normal((2, height, width, 16))).astype("float32")
    weight, bias = (rng.standard_normal(16).astype("float32") for _ in "wb")
    x, weight, bias = (torch.from_numpy(v).bfloat16() for v in (x, weight, bias))
    x64, w64, b64 = (v.double().numpy() for v in (x, weight, bias))
    gx = np.sqrt((x64**2).sum(axis=(1, 2), keepdims=True))
    factor = 1.0 + w64 * gx / (gx.mean(axis=-1, keepdims=True) + 1e-6)
    expected = x64 * factor + b64
    with torch.inference_mode():
        got = torch_kernels.torch_response_norm(x, weight, bias, 1e-6)
    assert got.dtype == torch.bfloat16 and tuple(got.shape) == x64.shape
    nx_term = np.abs(x64 * w64 * gx / (gx.mean(axis=-1, keepdims=True) + 1e-6))
    bound = 2**-8 * (np.abs(x64 * factor) + np.abs(b64) + np.abs(expected) + nx_term)
    error = np.abs(got.double().numpy() - expected)
    assert np.all(error <= bound), (error - bound).max()
    # the same numbers from a tensor that is not contiguous (an NCHW tensor's NHWC view)
    view = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert not view.is_contiguous()
    with torch.inference_mode():
        assert torch.equal(torch_kernels.torch_response_norm(view, weight, bias, 1e-6), got)


# backend -> (fast path, its module, the private call that computes a block's output part)
RESIDUAL_DENSE = {
    "torch": ("torch_residual_dense", torch_kernels, "_onednn_linear_add"),
}


@pytest.mark.skipif(BACKEND not in RESIDUAL_DENSE, reason="no block output kernel here")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scales", [0, 1, 2])
def test_residual_dense_is_the_block_output(dtype, scales, rng):
    """shortcut + gammas * (x @ kernel + bias) from the fused product equals it computed
    in float64 on the same values, within the roundings it makes: the folded weight and
    bias rounded to the dtype (u/2 relative each, u = 2^-8 in bfloat16), the sum of
    `in` products in float32 (at most `in` * 2^-24 of the sum of their magnitudes) and
    the output rounded to the dtype (u/2), so |error| <= u * (|x| @ |W'| + |b'| + |y|)
    with u = 2^-24 * `in` in float32."""
    _, module, _ = RESIDUAL_DENSE[BACKEND]
    width, out = 64, 24
    x, shortcut = (rng.standard_normal(shape).astype("float32") for shape in
                   [(2, 5, 3, width), (2, 5, 3, out)])  # fmt: skip
    dense = PointwiseDense(out, dtype=dtype)
    dense.build((None, width))
    dense.set_weights([rng.standard_normal(w.shape).astype("float32") for w in dense.weights])
    gammas = []
    for _ in range(scales):
        scale = layers_module.LayerScale(dtype=dtype)
        scale.build((None, out))
        scale.set_weights([rng.uniform(0.2, 2.0, out).astype("float32")])
        gammas.append(scale.gamma)
    x, shortcut = (keras.ops.convert_to_tensor(v, dtype) for v in (x, shortcut))
    x64, shortcut64 = (
        keras.ops.convert_to_numpy(keras.ops.cast(v, "float64")) for v in (x, shortcut)
    )
    kernel, bias = (keras.ops.convert_to_numpy(w).astype("float64") for w in dense.weights)
    gamma = np.prod([keras.ops.convert_to_numpy(g).astype("float64") for g in gammas], axis=0)
    expected = shortcut64 + gamma * (x64 @ kernel + bias)
    with _inference_mode():
        got = module.residual_dense(x, shortcut, dense, tuple(gammas), _raise)
    assert keras.backend.standardize_dtype(got.dtype) == dtype
    got = keras.ops.convert_to_numpy(keras.ops.cast(got, "float64"))
    assert got.shape == expected.shape
    u = 2**-8 if dtype == "bfloat16" else 2**-24 * width
    magnitude = np.abs(x64) @ np.abs(kernel * gamma) + np.abs(bias * gamma) + np.abs(expected)
    error = np.abs(got - expected)
    assert np.all(error <= u * magnitude), (error - u * magnitude).max()


@pytest.mark.skipif(BACKEND not in RESIDUAL_DENSE, reason="no block output kernel here")
@pytest.mark.parametrize(
    "dtype,mode", [*(("float32", mode) for mode in MODES), ("bfloat16", "failure")]
)
def test_residual_dense_fallback_equals_it(dtype, mode, monkeypatch, rng):
    """V1 (layer scale after the Dense) in the layer-by-layer inference: one fused
    product per block, the same numbers as the three layers one by one."""
    name, module, private = RESIDUAL_DENSE[BACKEND]
    weights = _fresh_v1(rng).get_weights()
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32")

    def predict():
        model = create_convnext_v1("atto", num_classes=5, input_shape=(32, 32, 3), dtype=dtype)
        model.set_weights(weights)
        return model.predict_batch(x)

    with monkeypatch.context() as patch:
        spy = Spy(patch, module, private)
        fast = predict()
    assert spy.calls == 12  # convnext_atto's blocks (traced once on TensorFlow)
    with monkeypatch.context() as patch:
        spy = Spy(patch, module, private, fail=mode == "failure")
        if mode == "off_cpu":
            patch.setattr(fast_ops, "on_cpu", lambda x=None: False)
        with _switched_off(mode, patch, name):
            fallback = predict()
    if dtype == "float32":
        np.testing.assert_allclose(fallback, fast, atol=1e-5, rtol=1e-5)
    else:  # the roundings differ (the kernel's own bound: the float64 test above); the
        # project's bfloat16 bar, cosine 0.999 to float32, holds between the two
        cosine = np.sum(fallback * fast, axis=1)
        cosine /= np.linalg.norm(fallback, axis=1) * np.linalg.norm(fast, axis=1)
        assert cosine.min() >= 0.999, cosine
    if mode == "failure":
        # on torch the first block ran whole (`torch_kernels.whole_block`), then again
        # layer by layer, where this kernel's own guard switched it off
        assert spy.calls == (2 if BACKEND == "torch" else 1)
        assert list(fast_ops.disabled_fast_paths()) == [name]
    else:
        assert spy.calls == 0 and fast_ops.disabled_fast_paths() == {}


@pytest.mark.skipif(BACKEND != "torch", reason="a torch fast path")
def test_torch_residual_dense_steps_aside_where_it_was_not_measured(monkeypatch, rng):
    """Not with gradients (training, or a tape over inference), not in float16, not
    when the shortcut's shape or dtype is not the product's."""
    import torch

    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            assert torch_kernels._residual_dense_runner(torch.zeros(2, dtype=dtype)) is not None
        assert torch_kernels._residual_dense_runner(torch.zeros(2, dtype=torch.float16)) is None
    assert torch_kernels._residual_dense_runner(torch.zeros(2)) is None  # autograd on
    model = _fresh_v1(rng)
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32")
    spy = Spy(monkeypatch, torch_kernels, "_onednn_linear_add")
    model(x, training=True)
    model(x)  # eager, under autograd
    assert spy.calls == 0
    dense = PointwiseDense(8)
    dense.build((None, 4))
    with torch.inference_mode():
        x4 = torch.zeros(2, 3, 4)
        for shortcut in (torch.zeros(2, 3, 4), torch.zeros(2, 3, 8, dtype=torch.bfloat16)):
            unfused = torch_kernels._checked_residual_dense(x4, shortcut, dense, (), lambda: "u")
            assert unfused == "u"
    assert spy.calls == 0


@pytest.mark.skipif(BACKEND != "torch", reason="a torch fast path")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_torch_whole_block_is_the_block_layer_by_layer(version, dtype, monkeypatch, rng):
    """Each block run at once gives the very numbers of the block layer by layer (the
    same kernels on the same weights)."""
    create = create_convnext_v1 if version == "v1" else create_convnext_v2
    model = create("atto", num_classes=5, input_shape=(32, 32, 3), dtype=dtype)
    model.set_weights(random_weights(model, rng, scale=0.3))
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32")
    with monkeypatch.context() as patch:
        spy = Spy(patch, plan_module.Residual, "_layers")
        whole = model.predict_batch(x)
    assert spy.calls == 0
    with monkeypatch.context() as patch:
        patch.setattr(fast_ops, "_DISABLED", {"torch_whole_block": "test"})
        spy = Spy(patch, plan_module.Residual, "_layers")
        layer_by_layer = model.predict_batch(x)
    assert spy.calls == 12  # convnext_atto's blocks
    np.testing.assert_array_equal(whole, layer_by_layer)


@pytest.mark.skipif(BACKEND != "torch", reason="a torch fast path")
@pytest.mark.parametrize("mode", MODES)
def test_torch_whole_block_fallback_equals_it(small_v2_weights, mode, monkeypatch):
    weights, x = small_v2_weights
    fast = _fresh_v2(weights).predict_batch(x)
    model = _fresh_v2(weights)

    def failing_program(parts, x):
        return _raise

    with monkeypatch.context() as patch:
        spy = Spy(patch, plan_module.Residual, "_layers")
        if mode == "failure":
            patch.setattr(torch_kernels, "_whole_block_program", failing_program)
        if mode == "off_cpu":
            patch.setattr(fast_ops, "on_cpu", lambda x=None: False)
        with _switched_off(mode, patch, "torch_whole_block"):
            fallback = model.predict_batch(x)
    np.testing.assert_allclose(fallback, fast, atol=1e-5, rtol=1e-5)
    if mode == "failure":  # the first block failed whole; each block ran layer by layer
        np.testing.assert_array_equal(fallback, fast)
        assert spy.calls == 12 and list(fast_ops.disabled_fast_paths()) == ["torch_whole_block"]
    else:
        assert fast_ops.disabled_fast_paths() == {}


def _random_bfloat16_atto(version, rng):
    create = create_convnext_v1 if version == "v1" else create_convnext_v2
    model = create("atto", num_classes=5, input_shape=(32, 32, 3), dtype="bfloat16")
    model.set_weights(random_weights(model, rng, scale=0.3))
    return model


@pytest.mark.skipif(BACKEND != "torch", reason="a torch fast path")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_torch_packed_weights_give_the_plain_weights_numbers(version, monkeypatch, rng):
    """In bfloat16 each block's two products read packed weights, with the very
    numbers of the plain weights; in float32 they are not packed."""
    model = _random_bfloat16_atto(version, rng)
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32")
    with monkeypatch.context() as patch:
        spy = Spy(patch, torch_kernels, "_packed_linear_weight")
        packed = model.predict_batch(x)
        np.testing.assert_array_equal(model.predict_batch(x), packed)
    assert spy.calls == 24  # two products in each of convnext_atto's 12 blocks, once
    with monkeypatch.context() as patch:
        patch.setattr(fast_ops, "_DISABLED", {"torch_packed_weights": "test"})
        spy = Spy(patch, torch_kernels, "_packed_linear_weight")
        plain = model.predict_batch(x)
    assert spy.calls == 0
    np.testing.assert_array_equal(packed, plain)

    float32_model = create_convnext_v1("atto", num_classes=5, input_shape=(32, 32, 3))
    with monkeypatch.context() as patch:
        spy = Spy(patch, torch_kernels, "_packed_linear_weight")
        float32_model.predict_batch(x)
    assert spy.calls == 0


@pytest.mark.skipif(BACKEND != "torch", reason="a torch fast path")
@pytest.mark.parametrize("mode", (*MODES, "unusable"))
def test_torch_packed_weights_fallback_equals_them(mode, monkeypatch, rng):
    """Packing that fails, or packed weights the product refuses ("unusable"): the
    plain weights' numbers, `torch_packed_weights` alone switched off, and the next
    pass runs whole blocks on plain weights."""
    weights = _random_bfloat16_atto("v2", rng).get_weights()
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32")
    model = _random_bfloat16_atto("v2", rng)
    model.set_weights(weights)
    fast = model.predict_batch(x)
    model = _random_bfloat16_atto("v2", rng)
    model.set_weights(weights)
    with monkeypatch.context() as patch:
        spy = Spy(patch, torch_kernels, "_packed_linear_weight", fail=mode == "failure")
        if mode == "unusable":
            patch.setattr(torch_kernels, "_packed_linear_weight", lambda weight, rows: "opaque")
        if mode == "off_cpu":
            patch.setattr(fast_ops, "on_cpu", lambda x=None: False)
        context = _switched_off("failure" if mode == "unusable" else mode, patch, "torch_packed")
        with context:
            fallback = model.predict_batch(x)
    if mode in ("failure", "unusable"):
        np.testing.assert_array_equal(fallback, fast)
        assert list(fast_ops.disabled_fast_paths()) == ["torch_packed_weights"]
        with monkeypatch.context() as patch:
            layers = Spy(patch, plan_module.Residual, "_layers")
            np.testing.assert_array_equal(model.predict_batch(x), fast)
        assert layers.calls == 0
    else:
        assert spy.calls == 0 and fast_ops.disabled_fast_paths() == {}


@pytest.mark.skipif(BACKEND != "torch", reason="a torch fast path")
def test_torch_whole_block_steps_aside_where_a_layer_would(small_v2_weights, monkeypatch):
    """LoRA on a Dense, autograd, float16: the block runs layer by layer."""
    import torch

    weights, x = small_v2_weights
    model = _fresh_v2(weights)
    with monkeypatch.context() as patch:
        spy = Spy(patch, plan_module.Residual, "_layers")
        model.get_layer("stage1_block0_pwconv1").enable_lora(2)
        model.predict_batch(x)
        assert spy.calls == 1
    with monkeypatch.context() as patch, torch.no_grad():
        kernels = fast_ops.layer_kernels(torch.zeros(1, 2, 2, 3))
        assert kernels.whole is torch_kernels.whole_block
        assert fast_ops.layer_kernels(torch.zeros(1, 2, 2, 3, dtype=torch.float16)).whole is None
    assert fast_ops.layer_kernels(torch.zeros(1, 2, 2, 3)).whole is None  # autograd on
    assert fast_ops.disabled_fast_paths() == {}


# The page-fault tests' subprocess half: `report_median_faults(step, rounds)` prints
# whether the process kept its freed memory and the median count of minor page faults
# of `step()` over `rounds` (now and then one round of a kept process faults its
# pages in afresh once, as the heap moves)
_MEDIAN_FAULTS = """
    import json, resource, statistics
    from convnext_layers import fast_ops

    def report_median_faults(step, rounds):
        faults = []
        for _ in range(rounds):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            step()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print("RESULT" + json.dumps({"kept": fast_ops.kept_freed_memory(),
                                     "faults": statistics.median(faults)}))
"""


def _assert_kept_memory_stops_the_faults(script, nbytes, input_bytes=0):
    """`script` (calling `report_median_faults` on a step that allocates and frees
    `nbytes`) in two fresh processes: with fast paths off (glibc's defaults) the
    kernel maps those pages afresh each round; with them on, the process reuses them.
    `input_bytes`: what the step copies its input into (JAX copies a numpy batch into
    buffers of its own), which may be faulted in afresh on either side and is not
    what the fast path keeps: allowed on top of the 1/20 of `nbytes`."""
    if not allocator.glibc_malloc_in_use():
        pytest.skip("glibc's malloc thresholds: a glibc system without a preloaded allocator")
    environ = {k: v for k, v in os.environ.items() if k not in allocator.allocator_env()}
    page = os.sysconf("SC_PAGE_SIZE")
    pages = nbytes // page
    code = _MEDIAN_FAULTS + script
    defaults = result_line(
        run_python(code, env=environ, env_extra={"KERAS_CONVNEXT_FAST_PATHS": "0"})
    )
    assert not defaults["kept"] and defaults["faults"] >= pages / 2 + input_bytes / page, defaults
    kept = result_line(run_python(code, env=environ))
    assert kept["kept"] and kept["faults"] < pages / 20 + input_bytes / page, (kept, defaults)


_TORCH_TENSOR_REUSED = """
    import numpy as np
    import torch
    from convnext_v2 import create_convnext_v2

    model = create_convnext_v2("atto", include_top=False, input_shape=(32, 32, 3))
    model.predict_batch(np.zeros((1, 32, 32, 3), "float32"))
    torch.ones(16 * 2**20)
    report_median_faults(lambda: torch.ones(16 * 2**20), rounds=5)
"""


@pytest.mark.slow  # two fresh processes
@pytest.mark.skipif(BACKEND != "torch", reason="a torch fast path")
def test_torch_keep_freed_memory_stops_the_page_faults():
    """With glibc's defaults (fast paths off) the kernel maps a large freed tensor's
    16,384 pages afresh each time; after `predict_batch` the process reuses them."""
    _assert_kept_memory_stops_the_faults(_TORCH_TENSOR_REUSED, 16 * 2**20 * 4)


def _allocator_mode(mode, patch):
    """Sets up `mode` of the allocator fast paths' step-aside tests: a device other
    than a CPU, an allocator the environment configures, a C library not glibc."""
    if mode == "off_cpu":
        patch.setattr(fast_ops, "on_cpu", lambda x=None: False)
    if mode == "allocator_env":
        patch.setenv("MALLOC_ARENA_MAX", "2")
    if mode == "not_glibc":
        patch.setattr(allocator, "_glibc", lambda: None)


@pytest.mark.skipif(BACKEND != "torch", reason="a torch fast path")
@pytest.mark.parametrize("mode", (*MODES, "allocator_env", "not_glibc"))
def test_torch_keep_freed_memory_steps_aside(small_v2_weights, mode, monkeypatch):
    """Raised once, at `predict_batch`'s first call on a CPU; not where fast paths are
    off, the environment configures the allocator or the C library is not glibc."""
    if not allocator.glibc_malloc_in_use() and not allocator.allocator_env():
        pytest.skip("glibc's malloc thresholds: a glibc system")
    weights, x = small_v2_weights
    for name in allocator.allocator_env():
        monkeypatch.delenv(name)
    monkeypatch.setattr(fast_ops, "_freed_memory", {})
    with monkeypatch.context() as patch:
        spy = Spy(patch, allocator, "raise_malloc_thresholds")
        model = _fresh_v2(weights)
        fast = model.predict_batch(x)
        model.predict_batch(x)
    assert spy.calls == 1 and fast_ops.kept_freed_memory()

    monkeypatch.setattr(fast_ops, "_freed_memory", {})
    with monkeypatch.context() as patch:
        spy = Spy(patch, allocator, "raise_malloc_thresholds", fail=mode == "failure")
        _allocator_mode(mode, patch)
        with _switched_off(mode, patch, "torch_keep_freed_memory"):
            fallback = _fresh_v2(weights).predict_batch(x)
    np.testing.assert_allclose(fallback, fast, atol=1e-5, rtol=1e-5)
    assert not fast_ops.kept_freed_memory()
    if mode == "failure":
        assert spy.calls == 1
        assert list(fast_ops.disabled_fast_paths()) == ["torch_keep_freed_memory"]
    else:
        assert spy.calls == 0 and fast_ops.disabled_fast_paths() == {}
    if mode in ("allocator_env", "not_glibc"):
        # decided once per process, as glibc reads its environment once
        with monkeypatch.context() as patch:
            spy = Spy(patch, allocator, "raise_malloc_thresholds")
            _fresh_v2(weights).predict_batch(x)
        assert spy.calls == 0 and not fast_ops.kept_freed_memory()


@pytest.mark.skipif(BACKEND != "torch", reason="the backend whose kernels read weights")
@pytest.mark.parametrize("mode", ("portable", "environment", "failure"))
def test_stored_values_are_what_value_returns(mode, monkeypatch, rng):
    """The kernels' weights read as stored, or through `.value` (a StatelessScope's
    values inside one), give the layer's own numbers."""
    layer = DepthwiseConv(7, name="dw")
    layer.build((None, 9, 9, 4))
    layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.weights])
    x = keras.ops.convert_to_tensor(rng.standard_normal((2, 9, 9, 4)).astype("float32"))
    zeros = keras.ops.zeros(layer.kernel.shape)
    with _inference_mode():
        fast = keras.ops.convert_to_numpy(layer(x))
        with keras.StatelessScope(state_mapping=[(layer.kernel, zeros)]):
            scoped = keras.ops.convert_to_numpy(layer(x))
        with monkeypatch.context() as patch:
            spy = Spy(patch, keras_internals, "_keras_stored_value", fail=mode == "failure")
            with _switched_off(mode, patch, "stored_values"):
                fallback = keras.ops.convert_to_numpy(layer(x))
    bias = keras.ops.convert_to_numpy(layer.bias)
    np.testing.assert_allclose(scoped, np.broadcast_to(bias, scoped.shape), atol=1e-6)
    np.testing.assert_allclose(fallback, fast, atol=1e-5, rtol=1e-5)
    assert spy.calls == (1 if mode == "failure" else 0)
    expected = ["stored_values"] if mode == "failure" else []
    assert list(fast_ops.disabled_fast_paths()) == expected


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
        assert torch.equal(torch_kernels.torch_apply(norm, a), norm.call(a))
        assert torch.equal(torch_kernels.torch_apply(add, [a, b]), add.call([a, b]))
        rms = keras.layers.LayerNormalization(epsilon=1e-6, rms_scaling=True)
        rms.build((None, 5, 6, 8))
        assert torch.equal(torch_kernels.torch_apply(rms, a), rms.call(a))  # not the kernel's case


@pytest.mark.skipif(BACKEND != "torch", reason="torch kernels")
@pytest.mark.parametrize("width", [40, 64, 96])
def test_torch_bfloat16_layer_norm_is_the_layers_own(width, rng, monkeypatch):
    """In bfloat16, from `BFLOAT16_LAYER_NORM_FROM_WIDTH` channels on, the kernel
    normalises in float32 as keras does and rounds once to bfloat16: at most one
    bfloat16 step (2^-7 relative) from keras' own result; below that width (where that
    measured slower) it runs keras' own recipe, the same numbers. Its float32 scale and
    offset, converted once, follow an update of the weights."""
    import torch

    spy = Spy(monkeypatch, torch_kernels, "_torch_layer_norm")

    norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype="bfloat16")
    norm.build((None, 5, 6, width))
    norm.set_weights([rng.standard_normal(width).astype("float32") for _ in range(2)])
    x = 3 * rng.standard_normal((2, 5, 6, width)).astype("float32") + 1
    x = torch.from_numpy(x).bfloat16()
    with torch.inference_mode():
        got, expected = torch_kernels.torch_apply(norm, x), norm.call(x)
    assert got.dtype == torch.bfloat16 and spy.calls == 1
    norm.gamma.assign(-norm.gamma)  # other numbers: the kernel must not keep the old scale
    with torch.inference_mode():
        updated = torch_kernels.torch_apply(norm, x)
        if width < torch_kernels.BFLOAT16_LAYER_NORM_FROM_WIDTH:
            assert torch.equal(updated, norm.call(x))
        norm.gamma.assign(-norm.gamma)
        assert not torch.equal(updated, got)
        assert torch.equal(torch_kernels.torch_apply(norm, x), got)
    if width < torch_kernels.BFLOAT16_LAYER_NORM_FROM_WIDTH:
        assert torch.equal(got, expected)
        return
    got, expected = got.double().numpy(), expected.double().numpy()
    x64 = x.double().numpy()
    gamma, beta = (keras.ops.convert_to_numpy(w).astype("float64") for w in norm.weights)
    centred = x64 - x64.mean(-1, keepdims=True)
    normalised = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6)
    exact = normalised * gamma + beta
    # both compute in float32 (a few roundings of 2^-24 of the terms' size: delta)
    # before one rounding to bfloat16 (at most 2^-8 relative, one step 2^-7)
    delta = 2**-20 * (np.abs(normalised * gamma) + np.abs(beta))
    assert np.all(np.abs(got - expected) <= 2**-7 * np.abs(expected) + 2 * delta), "> a step"
    assert np.all(np.abs(got - exact) <= 2**-8 * np.abs(exact) + delta)


# ----------------------------------------------------------------------------
# Keras internals
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ("portable", "environment", "failure"))
def test_flatten_layers_fallback_lists_the_same_layers(mode, monkeypatch):
    inner = create_convnext_v1("atto", include_top=False, pooling="avg", input_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3))
    outer = keras.Model(inputs, keras.layers.Dense(3, name="outer_fc")(inner(inputs)))
    with monkeypatch.context() as patch:
        spy = Spy(patch, keras_internals, "_keras_flatten_layers")
        fast = [layer.name for layer in fast_ops.flatten_layers(outer)]
    assert spy.calls == 1 and "stage3_block1_pwconv2" in fast and "outer_fc" in fast
    with monkeypatch.context() as patch:
        spy = Spy(patch, keras_internals, "_keras_flatten_layers", fail=mode == "failure")
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
        spy = Spy(patch, keras_internals, "_keras_initialize_all_variables")
        fast = wc.build_ported(build, state)
    assert spy.calls == 1
    with monkeypatch.context() as patch:
        spy = Spy(patch, keras_internals, "_keras_initialize_all_variables", fail=mode == "failure")
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
    Spy(monkeypatch, keras_internals, "_keras_initialize_all_variables", fail=True)
    with pytest.warns(RuntimeWarning, match="deferred_variables"):
        fallback = model.with_head(num_classes=0, normalize=True)
    np.testing.assert_array_equal(fallback.predict_on_batch(x), fast.predict_on_batch(x))


# ----------------------------------------------------------------------------
# jax_heap_sized_batches: XLA's temporary buffer sized for glibc's heaps
# ----------------------------------------------------------------------------


def _toy_jit():
    """A jitted call with a temporary buffer that grows with the batch, and two
    outputs: (values [w (6, 64), v (64, 3)], x (B, 6)) -> {"y": (B, 3), "s": (B,)}."""
    import jax  # the backend: these tests run on jax alone
    import jax.numpy as jnp

    def call(values, x):
        hidden = jnp.tanh(x @ values[0])
        return {"y": jnp.tanh(hidden * 2.0) @ values[1], "s": hidden.sum(-1)}

    return jax.jit(call)


@pytest.mark.skipif(BACKEND != "jax", reason="a JAX fast path")
def test_heap_sized_chunks_are_equal_fit_the_limit_and_pad_the_last(monkeypatch):
    """The chunk size comes from XLA's own buffer sizes: at most the limit, the fewest
    equal chunks (a divisor of the batch where one is near), the last padded and its
    padding dropped; the outputs are the whole batch's."""
    rng = np.random.default_rng(5)
    values = [rng.standard_normal((6, 64)).astype("float32"), rng.standard_normal((64, 3))]
    values[1] = values[1].astype("float32")
    jitted = _toy_jit()
    temp = {b: jax_kernels._temp_bytes(jitted, values, (b, 6), "float32") for b in (3, 4, 5, 9)}
    assert temp[3] < temp[4] < temp[5] < temp[9], temp  # grows with the batch
    x = rng.standard_normal((5, 6)).astype("float32")
    monkeypatch.setattr(jax_kernels, "HEAP_SIZED_TEMP_BYTES", temp[5])
    assert jax_kernels.heap_sized_chunk(jitted, values, x) == 5  # fits: whole
    monkeypatch.setattr(jax_kernels, "HEAP_SIZED_TEMP_BYTES", temp[3])
    assert jax_kernels.heap_sized_chunk(jitted, values, x) == 3  # 3 + 2 (padded)
    x9 = rng.standard_normal((9, 6)).astype("float32")
    assert jax_kernels.heap_sized_chunk(jitted, values, x9) == 3  # a divisor: 3 x 3
    monkeypatch.setattr(jax_kernels, "HEAP_SIZED_TEMP_BYTES", 1)
    assert jax_kernels.heap_sized_chunk(jitted, values, x) == 5  # no chunk fits: whole
    whole = jitted(values, x)
    for size in (1, 2, 3, 4, 5):
        chunked = jax_kernels.run_in_chunks(jitted, values, x, size)
        for key in ("y", "s"):
            assert chunked[key].shape == whole[key].shape
            np.testing.assert_allclose(chunked[key], whole[key], atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="a JAX fast path")
@pytest.mark.parametrize("mode", (*MODES, "allocator_env", "not_glibc", "v1"))
def test_jax_heap_sized_batches_steps_aside(small_v2_weights, mode, monkeypatch):
    """A V2 model's batch runs in chunks where XLA's buffer is over the limit, the
    thresholds raised once, the numbers the whole batch's; not where
    fast paths are off, the allocator is configured by the environment or is not
    glibc's, nor for a V1 model (measured no faster). A failure switches this path
    alone off."""
    if not allocator.glibc_malloc_in_use() and not allocator.allocator_env():
        pytest.skip("glibc's malloc thresholds: a glibc system")
    weights, x = small_v2_weights
    x = np.concatenate([x, x[::-1], x[:1]])  # 5 images
    for name in allocator.allocator_env():
        monkeypatch.delenv(name)
    # XLA's buffer as 100 bytes an image against a limit of 250: chunks of one image
    monkeypatch.setattr(jax_kernels, "_temp_bytes", lambda jitted, v, shape, d: 100 * shape[0])
    monkeypatch.setattr(jax_kernels, "HEAP_SIZED_TEMP_BYTES", 250)
    monkeypatch.setattr(fast_ops, "_freed_memory", {})
    with fast_ops.portable():
        reference = _fresh_v2(weights).predict_on_batch(x)
    with monkeypatch.context() as patch:
        spy = Spy(patch, jax_kernels, "run_in_chunks")
        raised = Spy(patch, allocator, "raise_malloc_thresholds")
        fast = _fresh_v2(weights).predict_batch(x)
    assert spy.calls == 1 and raised.calls == 1 and fast_ops.kept_freed_memory()
    np.testing.assert_allclose(fast, reference, atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(fast_ops, "_freed_memory", {})
    with monkeypatch.context() as patch:
        spy = Spy(patch, jax_kernels, "run_in_chunks")
        sizer = Spy(patch, jax_kernels, "heap_sized_chunk", fail=mode == "failure")
        _allocator_mode(mode, patch)
        model = _fresh_v1(np.random.default_rng(4)) if mode == "v1" else _fresh_v2(weights)
        with _switched_off(mode, patch, "jax_heap_sized_batches"):
            fallback = model.predict_batch(x)
    if mode == "v1":
        assert not jax_kernels.measured_heap_sized(model)
        with fast_ops.portable():
            reference = model.predict_on_batch(x)
    np.testing.assert_allclose(fallback, reference, atol=1e-5, rtol=1e-5)
    assert spy.calls == 0
    assert sizer.calls == (1 if mode == "failure" else 0)
    disabled = list(fast_ops.disabled_fast_paths())
    assert disabled == (["jax_heap_sized_batches"] if mode == "failure" else [])
    if mode in ("allocator_env", "not_glibc", "v1"):
        assert not fast_ops.kept_freed_memory()


_JAX_BATCH_RERUN = """
    import numpy as np
    from convnext_v2 import create_convnext_v2

    # XLA's temporary buffer at batch 64 of 112x112: about 70 MiB, over the 64 MiB a
    # worker thread's glibc heap holds
    model = create_convnext_v2("atto", include_top=False, input_shape=(112, 112, 3))
    x = np.zeros((64, 112, 112, 3), "float32")
    for _ in range(3):  # each XLA worker thread's arena grows to what a chunk takes
        model.predict_batch(x)
    report_median_faults(lambda: model.predict_batch(x), rounds=7)
"""


@pytest.mark.slow  # two fresh processes, each compiling a model
@pytest.mark.skipif(BACKEND != "jax", reason="a JAX fast path")
def test_jax_heap_sized_batches_stop_the_page_faults():
    """With glibc's defaults (fast paths off) each pass maps XLA's 70 MiB buffer
    afresh, page by page; in chunks with the thresholds raised it is reused. The
    batch's own copies (two 4.6 MiB chunks) are not counted against it: on a busy
    machine (one CI run) a kept process faulted one chunk's 1,178 pages in afresh in
    most passes; on a quiet one, in one pass of seven now and then."""
    batch_bytes = 64 * 112 * 112 * 3 * 4  # _JAX_BATCH_RERUN's x
    _assert_kept_memory_stops_the_faults(_JAX_BATCH_RERUN, 64 * 2**20, batch_bytes)
