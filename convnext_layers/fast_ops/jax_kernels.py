"""The JAX kernels of `fast_ops` (see the package docstring for the guard): the
depthwise conv as shifted multiply-adds with its own gradient rule, a V1 block's
tail over row blocks inside a jit, and `predict_batch`'s compiled call with its
XLA options.

jax is imported inside each function: importing this module loads no backend.
"""

from __future__ import annotations

import functools
import os

import keras
from keras import ops

from convnext_layers import fast_ops

# kind -> (fast path, function of this module): what `fast_ops.run_kernel` runs
KERNELS = {"depthwise_conv": ("jax_shifted_sum", "depthwise_conv")}


def depthwise_conv(x, layer):
    """`DepthwiseConv`'s call on JAX: the shifted sum (`depthwise_shifted_sum`) with
    its own gradient rule (`jax_depthwise`)."""
    kernel = ops.cast(layer.kernel, x.dtype)
    if layer.use_bias:
        bias = ops.cast(layer.bias, x.dtype)
    else:
        bias = ops.zeros((kernel.shape[2],), x.dtype)
    outputs = jax_depthwise(x, kernel, bias, depthwise_shifted_sum)
    return outputs if layer.activation is None else layer.activation(outputs)


def depthwise_shifted_sum(x, kernel, bias):
    """'same' stride-1 depthwise conv as sum_ij pad(x)[:, i:i+H, j:j+W] * kernel[i, j].

    (B, H, W, C), kernel (k, k, C, 1) -> (B, H, W, C). Accumulates in float32
    (as a convolution kernel does) for half-precision inputs.
    """
    k = kernel.shape[0]
    pad = k // 2
    height, width = x.shape[1], x.shape[2]
    if height is None or width is None:  # symbolic sizes: slice with the runtime shape
        height, width = ops.shape(x)[1], ops.shape(x)[2]
    dtype = x.dtype
    if keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16"):
        x, kernel = ops.cast(x, "float32"), ops.cast(kernel, "float32")
        bias = None if bias is None else ops.cast(bias, "float32")
    padded = ops.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = None
    for i in range(k):
        for j in range(k):
            term = padded[:, i : i + height, j : j + width, :] * kernel[i, j, :, 0]
            out = term if out is None else out + term
    if bias is not None:
        out = out + bias
    return ops.cast(out, dtype)


def layer_kernels(x):
    """`fast_ops.layer_kernels` on JAX: `jax_by_row_blocks` inside a jit, in float32."""
    if traced_float32(x) and fast_ops.use_fast_path("jax_row_blocks", x):
        return fast_ops.LayerKernels("jax_row_blocks", None, jax_by_row_blocks)
    return None


def jax_depthwise(x, kernel, bias, shifted_sum):
    """`shifted_sum(x, kernel, bias)`, the 'same' stride-1 depthwise conv as shifted
    multiply-adds ((B, H, W, C), kernel (k, k, C, 1), bias (C,) -> (B, H, W, C)), with
    its gradient given to JAX instead of derived through its k*k slices:
      d/dx      = the same shifted sum over the output gradient, kernel flipped;
      d/dkernel = XLA's grouped-conv filter gradient (computed in float32);
      d/dbias   = the output gradient summed over B, H, W.
    The forward pass is unchanged. Derived through the slices, convnext_atto's
    training step (2-core CPU, float32) compiled in 16.7-18.5 s at batch 8 x 224;
    with this rule in 8.1-8.2 s, the steps as fast within noise (755-929 ms)."""
    return _jax_depthwise_rule()(x, kernel, bias, shifted_sum)


@functools.lru_cache(maxsize=1)
def _jax_depthwise_rule():
    # jax: on the jax backend alone (importing this module loads no backend)
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def depthwise(x, kernel, bias, shifted_sum):
        return shifted_sum(x, kernel, bias)

    def forward(x, kernel, bias, shifted_sum):
        return shifted_sum(x, kernel, bias), (x, kernel, bias)

    def backward(shifted_sum, saved, grad):
        x, kernel, bias = saved
        grad_x = shifted_sum(grad, kernel[::-1, ::-1], None)
        size, channels = kernel.shape[0], kernel.shape[2]

        def conv(k):
            return jax.lax.conv_general_dilated(
                x.astype(jnp.float32),
                k,
                window_strides=(1, 1),
                padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=channels,
            )

        flat_kernel = jnp.zeros((size, size, 1, channels), jnp.float32)
        _, pull_back = jax.vjp(conv, flat_kernel)
        (grad_kernel,) = pull_back(grad.astype(jnp.float32))
        grad_kernel = grad_kernel.reshape(kernel.shape).astype(kernel.dtype)
        grad_bias = jnp.sum(grad.astype(jnp.float32), axis=(0, 1, 2)).astype(bias.dtype)
        return grad_x.astype(x.dtype), grad_kernel, grad_bias

    depthwise.defvjp(forward, backward)
    return depthwise


def traced_float32(x) -> bool:
    """`x` is a float32 JAX value being traced by a jit (in eager calls each
    `lax.map` would be compiled anew)."""
    # jax: on the jax backend alone (importing this module loads no backend)
    import jax

    tracer = getattr(getattr(jax, "core", None), "Tracer", None)  # public, but jax.core shrinks
    return tracer is not None and isinstance(x, tracer) and x.dtype == "float32"


def jax_by_row_blocks(tail, x, shortcut, width):
    """`tail(x, shortcut)` for a per-position tail, (B, H, W, C) x 2 -> (B, H, W, C'),
    over blocks of rows (`row_blocks`) with `jax.lax.map`, the rows left over after
    the equal blocks in one more piece; each block is passed to `tail` as
    (1, rows, 1, C). The same numbers up to the matrix products' summation order."""
    # jax: on the jax backend alone (importing this module loads no backend)
    import jax

    rows = x.shape[0] * x.shape[1] * x.shape[2]
    blocks = fast_ops.row_blocks(rows, width)
    if blocks is None:
        return tail(x, shortcut)
    count, block = blocks
    whole = count * block
    flat = [a.reshape(rows, a.shape[-1]) for a in (x, shortcut)]

    def one_block(pair):
        out = tail(*(fast_ops._as_images(a) for a in pair))
        return out.reshape(block, out.shape[-1])

    stacked = [a[:whole].reshape(count, block, a.shape[-1]) for a in flat]
    out = jax.lax.map(one_block, stacked).reshape(whole, -1)
    if whole < rows:
        rest = tail(*(fast_ops._as_images(a[whole:]) for a in flat))
        out = jax.numpy.concatenate([out, rest.reshape(rows - whole, -1)])
    return out.reshape(shortcut.shape[:-1] + out.shape[-1:])


# XLA:CPU options of a V1 model's inference executable. Measured with
# `jax.jit(..., compiler_options=...)` (2-core x86-64, float32, median pass, each
# setting in its own process, two runs each): XLA's experimental YNNPACK fusions
# off made convnext_atto 7-11% faster at batch 32 (416-434 -> 386-388 ms), 8-16%
# at batch 8 (99-108 -> 90-91 ms), the same at batch 1; convnext_tiny the same
# (b32 2068-2102 vs 2062-2098 ms, b8 509-520 either way); convnextv2_atto not
# faster (b32 420-424 vs 421-483 ms), so models with GRN keep the default.
JAX_V1_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def jax_compiler_options(model) -> dict:
    """The XLA options `predict_batch` compiles `model` with on JAX: the measured ones
    for a CPU and a ConvNeXt without GRN, unless the user's XLA_FLAGS set the same
    option (theirs wins) or the fast path is off; else none (XLA's defaults)."""
    config = getattr(model, "convnext_config", None)
    if config is None or config.use_grn or not fast_ops.use_fast_path("jax_compiler_options"):
        return {}
    user_flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in JAX_V1_COMPILER_OPTIONS.items() if k not in user_flags}


def inference_function(model):
    """`fast_ops.inference_function` on JAX: one `jax.jit` of the call in a
    `keras.StatelessScope` over the variables, compiled with
    `jax_compiler_options`; a model whose body is bfloat16 computes on a CPU in
    float32 (`float32_twin`), its bfloat16 weights cast inside the jit."""
    variables = list(model.variables)

    def run(values, x):
        with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
            return model(x, training=False)

    compiled = _compiled(run, model)

    def in_float32_runner():
        twin = float32_twin(model)
        return None if twin is None else _compiled(_float32_runner(twin), model)

    in_float32 = fast_ops.guarded("jax_float32_compute", in_float32_runner, lambda: None)
    if in_float32 is not None:
        plain = compiled

        def compiled(values, x):
            if not fast_ops.fast_paths_allowed("jax_float32_compute"):
                return plain(values, x)
            return fast_ops.guarded(
                "jax_float32_compute", lambda: in_float32(values, x), lambda: plain(values, x)
            )

    def infer(x):
        return fast_ops.to_numpy(compiled([v.value for v in variables], x))

    return infer


def _compiled(run, model):
    """`jax.jit(run)`, with `jax_compiler_options(model)` where there are some (guarded,
    the default compilation as their fallback)."""
    # jax: on the jax backend alone (importing this module loads no backend)
    import jax

    default = jax.jit(run)
    options = jax_compiler_options(model)
    if not options:
        return default
    tuned = jax.jit(run, compiler_options=options)

    def compiled(values, x):
        if not fast_ops.fast_paths_allowed("jax_compiler_options"):
            return default(values, x)
        return fast_ops.guarded(
            "jax_compiler_options", lambda: tuned(values, x), lambda: default(values, x)
        )

    return compiled


# XLA:CPU (jax 0.10) has no bfloat16 kernels of its own: its dots and elementwise
# ops in bfloat16 were slower than in float32 under every library option (YNNPACK,
# XNNPACK, oneDNN: a (25088, 160) x (160, 640) dot 80-102 ms against 61-86 ms in
# float32, 1 thread), where torch's and TensorFlow's oneDNN kernels use AMX. So a
# bfloat16 model computes in float32 on a CPU, its weights kept in bfloat16 and cast
# inside the jit: convnext_atto b32, 1 thread, CPU ms: 853 in bfloat16, 701 in float32.
def float32_twin(model):
    """A float32 copy of `model`'s architecture whose variables are never allocated
    (`_float32_runner` passes the model's values, cast), where `model` is a ConvNeXt
    whose body computes in bfloat16 and the fast path "jax_float32_compute" may run
    (on a CPU); else None."""
    plan = getattr(model, "_layer_plan", None)
    if plan is None or plan.body_dtype() != "bfloat16":
        return None
    if not fast_ops.use_fast_path("jax_float32_compute"):
        return None
    config = {**model.get_config(), "dtype": "float32"}
    with keras.StatelessScope(initialize_variables=False):
        twin = type(model).from_config(config)
    fast_ops.forget_deferred(twin.weights)
    if [v.path for v in twin.variables] != [v.path for v in model.variables]:
        return None  # pragma: no cover - the same config builds the same variables
    return twin


def _float32_runner(twin):
    """`run(values, x)`: `twin` on `x` with `values` (the bfloat16 model's, in its
    variables' order) cast to float32."""
    # jax: on the jax backend alone (importing this module loads no backend)
    import jax.numpy as jnp

    variables = list(twin.variables)

    def run(values, x):
        values = [v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v for v in values]
        with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
            return twin(x, training=False)

    return run
