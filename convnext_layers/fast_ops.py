"""Every private or backend-specific API the models use, each behind a guard with a
plain fallback (as timm keeps its odd kernels in `timm/layers/fast_norm.py`).

The fast paths (name: what it is; the fallback that replaces it):

- "onednn_linear" (torch): oneDNN's fused linear + bias (+ exact GELU),
  the private `torch.ops.mkldnn._linear_pointwise`; fallback `F.linear` (+ GELU).
- "torch_conv_nhwc" (torch): `F.conv2d` on the channels_last view of an NHWC
  tensor (no layout copy), for the depthwise, stem and downsampling convs;
  fallback keras' own conv.
- "torch_addcmul" (torch): GRN's `x * scale + bias` as one `torch.addcmul`;
  fallback the keras-ops expression.
- "torch_kernels" (torch): in the layer-by-layer inference, keras' LayerNormalization
  and Add run as `F.layer_norm` / `torch.add` straight (what keras computes, without
  its op dispatch), and conv weights are re-laid out once per weight update
  (`torch_prepared`, torch's private tensor version counter); fallback each
  layer's `call`.
- "tensorflow_fused_dense" (tensorflow): a 2-D MatMul -> BiasAdd -> activation
  chain that grappler fuses into `_FusedMatMul`; fallback keras' Dense.
- "tensorflow_layer_norm" (tensorflow): in the layer-by-layer inference, keras'
  LayerNormalization written as the FusedBatchNormV3 subgraph that grappler's
  oneDNN remapper fuses into one `_MklLayerNorm`; fallback the layer's `call`.
- "jax_compiler_options" (jax): `predict_batch`'s executable for a model without
  GRN (V1) is compiled with XLA's experimental YNNPACK fusions off (an option of
  that one executable, not the process-wide XLA_FLAGS); fallback the default
  compilation.
- "jax_row_blocks" (jax): in the layer-by-layer inference traced by a jit, in
  float32, a block's per-position tail (LayerNorm, the two pointwise Dense
  layers, layer scale, the residual add) runs over blocks of rows with
  `jax.lax.map` when its hidden tensor is large (`row_blocks`,
  `jax_by_row_blocks`), so each block stays in the cache; fallback the tail in
  one piece.
- "torch_row_blocks" (torch): the same blocks in the layer-by-layer inference
  without autograd, in float32, one after another (`torch_by_row_blocks`);
  fallback the tail in one piece.
- "jax_shifted_sum" (jax): the 7x7 depthwise conv as 49 shifted multiply-adds
  instead of XLA's grouped conv, for inference and training: its gradient has
  its own rule (`jax_depthwise`), measured for training on a CPU as well;
  fallback keras' depthwise conv.
- "layerwise_call" (every backend): `ConvNeXt`'s inference call runs its layers
  one after another, keeping only the current tensor and a block's shortcut
  (keras' functional runner keeps every intermediate until the call ends);
  fallback keras' functional call.
- "compiled_inference" (every backend): `ConvNeXt.predict_batch`, a cached
  jit / tf.function / inference_mode call without `predict_on_batch`'s
  per-call machinery; fallback `predict_on_batch`.
- "flatten_layers" (Keras internal `Model._flatten_layers`); fallback a walk
  over `.layers`.
- "deferred_variables" (Keras' private variable-initialisation hooks, used to
  build a model straight from checkpoint values without random init first);
  fallback build, then assign.

Rules:
- A fast path runs only where it was measured: on a CPU (`on_cpu`), for
  inference (the JAX shifted sum also for training), in the dtypes it was
  checked with. Anywhere else (a GPU, a gradient, an exporter tracing the
  graph) the portable formulation runs.
- `guarded(name, fast, fallback)` runs a fast path. If it raises, the fallback
  runs; if the fallback succeeds the fast path is broken, so it is switched off
  for the rest of the process with one warning (`_disable`); if the fallback
  fails too the input was bad, and its error is raised with the fast path left
  on. A new torch or Keras release can cost speed, never correctness.
- `portable()` (a context manager) and `KERAS_CONVNEXT_FAST_PATHS=0` switch
  every fast path off, e.g. while `model.export` traces a graph; the tests
  (tests/test_fast_ops.py) use them, and simulated failures of each private
  call, to check each fallback against its fast path on every backend.

Each private call goes through one small function here (`_onednn_linear_pointwise`,
`_keras_flatten_layers`, `_keras_initialize_all_variables`, ...), the one place a
test patches to simulate its failure.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
import warnings

import keras

_state = threading.local()
_DISABLED: dict[str, str] = {}  # fast path name -> why it was switched off

FAST_PATHS = (
    "onednn_linear",
    "torch_conv_nhwc",
    "torch_addcmul",
    "torch_kernels",
    "tensorflow_fused_dense",
    "tensorflow_layer_norm",
    "jax_shifted_sum",
    "jax_compiler_options",
    "jax_row_blocks",
    "torch_row_blocks",
    "layerwise_call",
    "compiled_inference",
    "flatten_layers",
    "deferred_variables",
)


def _env_allows() -> bool:
    return os.environ.get("KERAS_CONVNEXT_FAST_PATHS", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


@contextlib.contextmanager
def portable():
    """Within this block every layer uses its portable formulation (keras ops only)."""
    depth = getattr(_state, "portable", 0)
    _state.portable = depth + 1
    try:
        yield
    finally:
        _state.portable = depth


def fast_paths_allowed(name: str | None = None) -> bool:
    """Whether fast paths may run now (and fast path `name` is not switched off)."""
    if getattr(_state, "portable", 0) or not _env_allows():
        return False
    return name is None or name not in _DISABLED


def disabled_fast_paths() -> dict[str, str]:
    """{fast path: reason} for every fast path switched off in this process."""
    return dict(_DISABLED)


def _disable(name: str, error: BaseException) -> None:
    if name not in _DISABLED:
        _DISABLED[name] = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"keras-convnext: fast path {name!r} failed ({_DISABLED[name]}); using the "
            "portable formulation from now on (same numbers, slower).",
            RuntimeWarning,
            stacklevel=4,
        )


def guarded(name: str, fast, fallback):
    """`fast()`, or `fallback()` if it raises (see the module docstring: the fast path
    is switched off only when the fallback succeeds where it failed)."""
    try:
        return fast()
    except Exception as error:
        result = fallback()  # bad input raises here, and the fast path stays on
        _disable(name, error)
        return result


def on_cpu(x=None) -> bool:
    """Whether `x` (a backend tensor; on torch it must be given) lives on a CPU.
    Every fast path here was measured on a CPU only."""
    backend = keras.backend.backend()
    if backend == "torch":
        return getattr(getattr(x, "device", None), "type", None) == "cpu"
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        return not _tensorflow_gpus()
    return False


@functools.lru_cache(maxsize=1)
def _tensorflow_gpus() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


def use_fast_path(name: str, x=None) -> bool:
    """Fast path `name` is allowed now and `x` is on a CPU."""
    return fast_paths_allowed(name) and on_cpu(x)


# the names the first version of this module had
def torch_on_cpu(x) -> bool:
    return on_cpu(x)


def jax_on_cpu() -> bool:
    return on_cpu()


def torch_conv_usable(x) -> bool:
    return use_fast_path("torch_conv_nhwc", x)


# ----------------------------------------------------------------------------
# torch
# ----------------------------------------------------------------------------


def torch_value(variable, dtype):
    """A keras variable's torch tensor in `dtype`, without keras' op dispatch."""
    value = variable.value
    return value if value.dtype == dtype else value.to(dtype)


def torch_prepared(layer, variable, dtype, prepare):
    """`prepare(torch_value(variable, dtype))`, cached on `layer` while the variable's
    tensor is the same object, unmodified (torch's version counter, which every
    in-place update such as `variable.assign` bumps), for inference only: with
    gradients the preparation is redone each call so it stays in the graph.

    For weights torch wants in another layout (a conv kernel made contiguous in
    torch's (O, I, kh, kw) order): redoing that copy every call was ~45 us of a
    7x7 depthwise conv's ~85 us on an 8x8x40 input (1 thread)."""
    import torch

    value = torch_value(variable, dtype)
    if torch.is_grad_enabled() and value.requires_grad:
        return prepare(value)
    cache = layer.__dict__.get("_convnext_torch_prepared")
    if cache is None:
        cache = {}
        object.__setattr__(layer, "_convnext_torch_prepared", cache)
    key = (id(variable), dtype)
    entry = cache.get(key)
    if entry is None or entry[0] is not value or entry[1] != value._version:
        entry = cache[key] = (value, value._version, prepare(value).detach())
    return entry[2]


def _torch_layer_norm(layer, x):
    import torch.nn.functional as F

    gamma = torch_value(layer.gamma, x.dtype)
    beta = torch_value(layer.beta, x.dtype)
    return F.layer_norm(x, (x.shape[-1],), gamma, beta, layer.epsilon)


def _plain_layer_norm(layer, x) -> bool:
    """`layer` is keras' LayerNormalization over the last axis of `x`, with both
    scale and offset, computing in float32 (what the fused kernels replace)."""
    if type(layer) is not keras.layers.LayerNormalization:
        return False
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return (
        list(axis) in ([-1], [len(x.shape) - 1])
        and layer.center
        and layer.scale
        and not getattr(layer, "rms_scaling", False)
        and layer.compute_dtype == "float32"
    )


def torch_apply(layer, x):
    """`layer.call(x)` for layer-by-layer inference on torch, with keras' own
    LayerNormalization and Add computed straight in torch (the same kernels keras
    calls: `F.layer_norm`, `torch.add`) without keras' op dispatch, measured at
    ~37 vs ~6 us and ~9 vs ~2 us per call on an 8x8x40 input (1 thread)."""
    kind = type(layer)
    if kind is keras.layers.Add and len(x) == 2:
        return x[0] + x[1]
    if _plain_layer_norm(layer, x):
        return _torch_layer_norm(layer, x)
    return layer.call(x)


class LayerKernels(collections.namedtuple("LayerKernels", "name apply by_rows")):
    """What the layer-by-layer inference runs differently on a backend: fast path
    `name`; `apply(layer, x)` for each layer (None: the layer's own `call`);
    `by_rows(tail, x, shortcut, width)` for a block's per-position tail (None: in
    one piece; see `model.Residual`)."""


def layer_kernels(x) -> LayerKernels | None:
    """The `LayerKernels` of the layer-by-layer inference on `x` where its backend has
    some and they may run, else None (each layer's own `call`):
    torch `torch_apply` (and, without autograd in float32, `torch_by_row_blocks`);
    TensorFlow `tensorflow_apply`; JAX, inside a jit and in float32,
    `jax_by_row_blocks`."""
    backend = keras.backend.backend()
    if backend == "torch" and use_fast_path("torch_kernels", x):
        return LayerKernels("torch_kernels", torch_apply, _torch_row_runner(x))
    if backend == "tensorflow" and use_fast_path("tensorflow_layer_norm", x):
        return LayerKernels("tensorflow_layer_norm", tensorflow_apply, None)
    if backend == "jax" and _jax_traced_float32(x) and use_fast_path("jax_row_blocks", x):
        return LayerKernels("jax_row_blocks", None, jax_by_row_blocks)
    return None


# A block's per-position tail (LayerNorm -> Dense 4C -> GELU -> Dense C -> layer
# scale -> + shortcut) runs over row blocks whose hidden (4C-wide, float32) part
# is about ROW_BLOCK_BYTES, where the whole hidden tensor is more than
# ROW_BLOCKS_FROM blocks (smaller ones run in one piece): in one piece the hidden
# tensor goes out to memory and back between the two matrix products, a block
# stays in the cache. Measured on a 2-core x86-64 with AVX-512, float32, median
# of 15, the tail without LayerNorm:
#   rows x C         JAX jit (lax.map)           torch eager (oneDNN linear)
#   100352 x 40      40.0 -> 21.6-22.1 ms        54.0 -> 23.1-26.2 ms (7-28 blocks)
#   25088 x 80       24.5 -> 16.2-17.0 ms        17.7 -> 16.0-17.1 ms
#   6272 x 160       16.2 -> 14.6 ms             15.7 -> 14.4-14.9 ms
#   1568 x 320       15.6 ms whole, 16.0-25.6 split
# TensorFlow (grappler's fused MatMul, slices + concat) measured no faster
# (25.5 ms whole, 27.8-28.4 ms in blocks) and keeps one piece.
ROW_BLOCK_BYTES = 4 * 2**20
ROW_BLOCKS_FROM = 3


def row_blocks(rows: int, width: int) -> tuple[int, int] | None:
    """(count, size): how `rows` positions of a tail whose widest tensor has `width`
    float32 channels are split, `count` equal blocks of `size` rows (and the
    `rows - count * size` left, fewer than `count`, in one more piece); None to
    keep it whole."""
    size = max(1, ROW_BLOCK_BYTES // (4 * width))
    if rows <= ROW_BLOCKS_FROM * size:
        return None
    count = -(-rows // size)
    # a divisor of the row count near it gives blocks with nothing left over
    count = next((n for n in range(count, 2 * count) if rows % n == 0), count)
    return count, rows // count


def _as_images(rows):
    """(rows, C) -> (1, rows, 1, C): the rank the layers were built for."""
    return rows.reshape(1, rows.shape[0], 1, rows.shape[-1])


def torch_by_row_blocks(tail, x, shortcut, width):
    """`jax_by_row_blocks` for eager torch without autograd: the blocks one after
    another, each written into one output tensor; guarded ("torch_row_blocks")
    with the tail in one piece as its fallback."""

    def blocked():
        rows = x.shape[0] * x.shape[1] * x.shape[2]
        blocks = row_blocks(rows, width)
        if blocks is None:
            return tail(x, shortcut)
        size = blocks[1]
        flat = [a.reshape(rows, a.shape[-1]) for a in (x, shortcut)]
        out = None
        for start in range(0, rows, size):
            part = tail(*(_as_images(a[start : start + size]) for a in flat))
            part = part.reshape(-1, part.shape[-1])
            if out is None:
                out = part.new_empty((rows, part.shape[-1]))
            out[start : start + part.shape[0]] = part
        return out.reshape(*shortcut.shape[:-1], out.shape[-1])

    return guarded("torch_row_blocks", blocked, lambda: tail(x, shortcut))


def _torch_row_runner(x):
    """`torch_by_row_blocks` where it may run on `x`: float32, no autograd."""
    import torch

    if torch.is_grad_enabled() or x.dtype != torch.float32:
        return None
    return torch_by_row_blocks if fast_paths_allowed("torch_row_blocks") else None


def _onednn_linear_pointwise(x, weight, bias, attr, scalars, algorithm):
    """The private oneDNN op (the one place it is called)."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, scalars, algorithm)


def _onednn_linear_usable(x, weight) -> bool:
    """oneDNN's fused linear replaces F.linear only for CPU inference in float32 /
    bfloat16 (the op has no autograd formula and was measured on CPU only)."""
    import torch

    if not use_fast_path("onednn_linear", x):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def torch_linear(x, weight, bias, fuse_gelu: bool):
    """(x @ weight.T + bias), then the exact GELU if `fuse_gelu`: (..., in) -> (..., out).

    Returns (output, gelu_applied): the caller applies its activation itself when
    the fused op was not used.
    """
    import torch.nn.functional as F

    if _onednn_linear_usable(x, weight):
        if fuse_gelu:  # "none": the erf GELU, not the tanh approximation

            def fast():
                return _onednn_linear_pointwise(x, weight, bias, "gelu", [], "none"), True

            def fallback():
                return F.gelu(F.linear(x, weight, bias)), True

        else:

            def fast():
                return _onednn_linear_pointwise(x, weight, bias, "none", [], ""), False

            def fallback():
                return F.linear(x, weight, bias), False

        return guarded("onednn_linear", fast, fallback)
    return F.linear(x, weight, bias), False


def torch_conv2d_nhwc(x, weight, bias, **conv_arguments):
    """torch's conv2d on an NHWC tensor without layout copies: (B, H, W, C) in,
    (B, H', W', O) out; `weight` in torch's (O, C / groups, kh, kw) layout.

    x.permute(0, 3, 1, 2) of a contiguous NHWC tensor is a channels_last NCHW
    view (no copy); conv2d keeps that memory format, so permuting back is again
    a view of a contiguous NHWC result.
    """
    import torch.nn.functional as F

    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, **conv_arguments)
    return y.permute(0, 2, 3, 1)


def torch_conv_weight_channels_last(kernel):
    """keras' (kh, kw, I, O) conv kernel as torch's (O, I, kh, kw), channels_last."""
    import torch

    return kernel.permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)


def torch_multiply_add(x, scale, bias):
    """x * scale + bias with broadcasting, in one pass (addcmul)."""
    import torch

    return torch.addcmul(bias, x, scale)


# ----------------------------------------------------------------------------
# jax
# ----------------------------------------------------------------------------


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


def _jax_traced_float32(x) -> bool:
    """`x` is a float32 JAX value being traced by a jit (in eager calls each
    `lax.map` would be compiled anew)."""
    import jax

    tracer = getattr(getattr(jax, "core", None), "Tracer", None)  # public, but jax.core shrinks
    return tracer is not None and isinstance(x, tracer) and x.dtype == "float32"


def jax_by_row_blocks(tail, x, shortcut, width):
    """`tail(x, shortcut)` for a per-position tail, (B, H, W, C) x 2 -> (B, H, W, C'),
    over blocks of rows (`row_blocks`) with `jax.lax.map`, the rows left over after
    the equal blocks in one more piece; each block is passed to `tail` as
    (1, rows, 1, C). The same numbers up to the matrix products' summation order."""
    import jax

    rows = x.shape[0] * x.shape[1] * x.shape[2]
    blocks = row_blocks(rows, width)
    if blocks is None:
        return tail(x, shortcut)
    count, block = blocks
    whole = count * block
    flat = [a.reshape(rows, a.shape[-1]) for a in (x, shortcut)]

    def one_block(pair):
        out = tail(*(_as_images(a) for a in pair))
        return out.reshape(block, out.shape[-1])

    stacked = [a[:whole].reshape(count, block, a.shape[-1]) for a in flat]
    out = jax.lax.map(one_block, stacked).reshape(whole, -1)
    if whole < rows:
        rest = tail(*(_as_images(a[whole:]) for a in flat))
        out = jax.numpy.concatenate([out, rest.reshape(rows - whole, -1)])
    return out.reshape(shortcut.shape[:-1] + out.shape[-1:])


# ----------------------------------------------------------------------------
# tensorflow
# ----------------------------------------------------------------------------


def tensorflow_dense(inputs, kernel, bias, activation):
    """Dense as a 2-D MatMul -> BiasAdd -> activation chain, which TensorFlow's graph
    optimizer rewrites into one oneDNN `_FusedMatMul` (keras' tensordot on the 4-D
    input leaves reshapes in between). (..., in) -> (..., out)."""
    import tensorflow as tf

    units = kernel.shape[1]
    x = tf.matmul(tf.reshape(inputs, (-1, kernel.shape[0])), kernel)
    if bias is not None:
        x = tf.nn.bias_add(x, bias)
    if activation is not None:
        x = activation(x)
    outputs = tf.reshape(x, tf.concat([tf.shape(inputs)[:-1], [units]], axis=0))
    outputs.set_shape(inputs.shape[:-1] + [units])
    return outputs


def tensorflow_apply(layer, x):
    """`layer.call(x)` for layer-by-layer inference on TensorFlow, with keras'
    LayerNormalization as `tensorflow_layer_norm`."""
    if _plain_layer_norm(layer, x):
        return tensorflow_layer_norm(x, layer.gamma.value, layer.beta.value, layer.epsilon)
    return layer.call(x)


def tensorflow_layer_norm(x, gamma, beta, epsilon):
    """LayerNorm over the last axis, (..., C) -> (..., C), written as the subgraph
    that TensorFlow's graph optimizer (grappler's remapper, with oneDNN) rewrites
    into one `_MklLayerNorm` kernel: x as 2-D rows (R, C) -> reshaped (1, R, C, 1)
    -> FusedBatchNormV3 in training mode over NCHW (per "channel" = per row: its
    mean and biased variance), unit scale and zero offset made by Fill -> reshaped
    back -> * gamma + beta. keras' LayerNormalization on (32, 56, 56, 40) float32
    took 9.2 ms in a tf.function, this 1.4 ms (same numbers within 2e-6).

    The rewrite needs a 2-D input and the Fills left in the graph, i.e. a row count
    unknown when traced (constant folding turns the Fills of a static size into
    constants): `inference_function` traces with the batch size left open. Where
    the rewrite does not happen (eager, static sizes, no oneDNN) the same subgraph
    runs unfused and still computes LayerNorm. The raw op keeps `epsilon` as
    given (`tf.nn.fused_batch_norm` raises it to 1.001e-5)."""
    import tensorflow as tf

    channels = x.shape[-1]
    rows = tf.reshape(x, [-1, channels])
    count = tf.shape(rows)[0]
    fill_shape = tf.reshape(count, [1])
    y = tf.reshape(rows, tf.stack([1, count, channels, 1]))
    empty = tf.constant([], x.dtype)
    y = tf.raw_ops.FusedBatchNormV3(
        x=y,
        scale=tf.ones(fill_shape, x.dtype),
        offset=tf.zeros(fill_shape, x.dtype),
        mean=empty,
        variance=empty,
        epsilon=float(epsilon),
        data_format="NCHW",
        is_training=True,
    ).y
    y = tf.reshape(y, tf.shape(rows)) * gamma + beta
    outputs = tf.reshape(y, tf.shape(x))
    outputs.set_shape(x.shape)
    return outputs


# ----------------------------------------------------------------------------
# Keras internals
# ----------------------------------------------------------------------------


def _keras_flatten_layers(model):
    """The private Keras walk (the one place it is called)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def flatten_layers(model):
    """Every layer inside `model`, nested models' layers included (not the model)."""

    def walk():  # the same order as keras' walk, through the public `.layers`
        found, seen = [], set()
        queue = collections.deque(getattr(model, "layers", []))
        while queue:
            layer = queue.popleft()
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            found.append(layer)
            queue.extendleft(getattr(layer, "layers", None) or [])
        return found

    if fast_paths_allowed("flatten_layers"):
        return guarded("flatten_layers", lambda: _keras_flatten_layers(model), walk)
    return walk()


def _keras_initialize_all_variables():
    """Keras' private initialisation of deferred variables (the one place it is called)."""
    from keras.src.backend.common.variables import initialize_all_variables

    initialize_all_variables()


def supports_deferred_variables() -> bool:
    """Whether variables made inside `keras.StatelessScope(initialize_variables=False)`
    can be initialised later from values of our choice (Keras' private initialisation
    hooks are present, and the fast path is on)."""
    if not fast_paths_allowed("deferred_variables"):
        return False
    try:
        from keras.src.backend.common import global_state  # noqa: F401
        from keras.src.backend.common.variables import initialize_all_variables  # noqa: F401
    except ImportError:
        return False
    return True


def initialize_deferred(variables, values) -> None:
    """Initialise deferred `variables` from `values(variable) -> initializer or None`
    (None keeps the variable's own initializer). Private Keras API: use
    `build_with_initial_values`, which falls back when this is missing or fails."""
    for variable in variables:
        make = values(variable)
        if make is not None:
            variable._initializer = make
    _keras_initialize_all_variables()


def forget_deferred(variables) -> None:
    """Drop never-initialised variables from Keras' pending list (after a failed build),
    so a later unrelated initialisation does not trip over them."""
    try:
        from keras.src.backend.common import global_state

        ids = {id(v) for v in variables}
        pending = global_state.get_global_attribute("uninitialized_variables") or []
        global_state.set_global_attribute(
            "uninitialized_variables", [v for v in pending if id(v) not in ids]
        )
    except Exception as error:  # pragma: no cover - other Keras versions
        _disable("deferred_variables", error)


def variables_are_deferred(variables) -> bool:
    """Whether every variable was created uninitialised (deferred) by a StatelessScope."""
    return all(
        getattr(v, "_value", 0) is None and getattr(v, "_initializer", None) is not None
        for v in variables
    )


def build_with_initial_values(build, initial_values):
    """`build()` a model whose variables start from values of our choice.

    `initial_values(model)` returns `value_of(variable)`: an initializer
    `(shape, dtype) -> array` for the variable, or None to keep its own. With
    Keras' private hooks the model is built with uninitialised variables, which
    are then initialised once from those values (no random initialisation first:
    on JAX that compiles one kernel per weight shape); without them, or if they
    fail, the model is built normally and the values assigned. Whatever `build`
    or `initial_values` raise is raised, with nothing left pending.
    """
    if supports_deferred_variables():
        with keras.StatelessScope(initialize_variables=False):
            model = build()
        variables = list(model.weights)
        if variables_are_deferred(variables):
            try:
                value_of = initial_values(model)
            except BaseException:
                forget_deferred(variables)
                raise
            try:
                initialize_deferred(variables, value_of)
                return model
            except Exception as error:
                forget_deferred(variables)
                _disable("deferred_variables", error)
        else:  # pragma: no cover - a Keras that initialises inside the scope anyway
            initialize_deferred([], lambda v: None)
    model = build()
    value_of = initial_values(model)
    for variable in model.weights:
        make = value_of(variable)
        if make is not None:
            variable.assign(make(tuple(variable.shape), variable.dtype))
    return model


# ----------------------------------------------------------------------------
# Inference entry point
# ----------------------------------------------------------------------------


def inference_function(model):
    """A callable running `model(x, training=False)` on one NumPy batch for inference,
    with less per-call work than `predict_on_batch` (which on JAX also walks every
    layer, gathers and writes back every variable each call; on TensorFlow goes
    through a distribution strategy; on torch through the trainer's data path):

    - jax: one `jax.jit` of the call inside a `keras.StatelessScope` over the
      model's variables, whose current values are passed in each call (so weight
      updates are seen);
    - tensorflow: a `tf.function` of the call, one concrete function per input
      shape and dtype;
    - torch: the eager call under `torch.inference_mode()`.

    Returns None where this is not used: a backend other than these three, or a
    `keras.distribution` in effect (predict_on_batch honours its layouts).
    """
    if keras.distribution.distribution() is not None:
        return None
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_inference(model)
    if backend == "tensorflow":
        return _tensorflow_inference(model)
    if backend == "torch":
        return _torch_inference(model)
    return None


def _to_numpy(outputs):
    return keras.tree.map_structure(lambda y: keras.ops.convert_to_numpy(y), outputs)


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
    if config is None or config.use_grn or not use_fast_path("jax_compiler_options"):
        return {}
    user_flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in JAX_V1_COMPILER_OPTIONS.items() if k not in user_flags}


def _jax_inference(model):
    import jax

    variables = list(model.variables)

    def run(values, x):
        with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
            return model(x, training=False)

    default = jax.jit(run)
    options = jax_compiler_options(model)
    if options:
        tuned = jax.jit(run, compiler_options=options)

        def compiled(values, x):
            if not fast_paths_allowed("jax_compiler_options"):
                return default(values, x)
            return guarded(
                "jax_compiler_options", lambda: tuned(values, x), lambda: default(values, x)
            )
    else:
        compiled = default

    def infer(x):
        return _to_numpy(compiled([v.value for v in variables], x))

    return infer


def _tensorflow_inference(model):
    import tensorflow as tf

    function = tf.function(lambda x: model(x, training=False), autograph=False)
    concrete = {}

    def infer(x):
        # the batch size is left open: one trace serves every batch size, and
        # grappler's LayerNorm rewrite needs it (`tensorflow_layer_norm`)
        key = (tuple(x.shape[1:]), str(x.dtype))
        if key not in concrete:
            spec = tf.TensorSpec((None, *x.shape[1:]), x.dtype)
            concrete[key] = function.get_concrete_function(spec)
        return _to_numpy(concrete[key](tf.constant(x)))

    return infer


def _torch_inference(model):
    import torch

    def infer(x):
        with torch.inference_mode():
            return _to_numpy(model(keras.ops.convert_to_tensor(x), training=False))

    return infer


def backend() -> str:
    return keras.backend.backend()
