"""The JAX kernels of `fast_ops` (see the package docstring for the guard): the
depthwise conv as shifted multiply-adds with its own gradient rule, a V1 block's
tail over row blocks inside a jit, and `predict_batch`'s compiled call with its
XLA options.

jax is imported inside each function: importing this module loads no backend.
"""

from __future__ import annotations

import functools
import os
import weakref

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

    (B, H, W, C), kernel (k, k, C, 1), k odd -> (B, H, W, C). Accumulates in float32
    (as a convolution kernel does) for half-precision inputs. On a map of static size
    smaller than the kernel's reach (H or W at most k // 2) only the terms that read
    some of x are summed (convnextv2_atto at 32x32, batch 2, fresh processes: the
    first `predict_on_batch` 2.2-2.3 s against 2.5-3.5 s with all 49; the same
    numbers, the skipped terms being zeros).
    """
    k = kernel.shape[0]
    pad = k // 2
    height, width = x.shape[1], x.shape[2]
    # a map smaller than the kernel's reach (H <= pad): the rows (columns) of padding
    # no output position reaches are not made, nor their all-zero terms summed
    pad_h = pad if height is None else min(pad, height - 1)
    pad_w = pad if width is None else min(pad, width - 1)
    if height is None or width is None:  # symbolic sizes: slice with the runtime shape
        height, width = ops.shape(x)[1], ops.shape(x)[2]
    dtype = x.dtype
    if keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16"):
        x, kernel = ops.cast(x, "float32"), ops.cast(kernel, "float32")
        bias = None if bias is None else ops.cast(bias, "float32")
    padded = ops.pad(x, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
    out = None
    for i in range(pad - pad_h, pad + pad_h + 1):
        for j in range(pad - pad_w, pad + pad_w + 1):
            top, left = i - (pad - pad_h), j - (pad - pad_w)
            term = padded[:, top : top + height, left : left + width, :] * kernel[i, j, :, 0]
            out = term if out is None else out + term
    if bias is not None:
        out = out + bias
    return ops.cast(out, dtype)


def layer_kernels(x):
    """`fast_ops.layer_kernels` on JAX, inside a jit and in float32: `jax_by_row_blocks`,
    and `jax_apply` (a bfloat16 model's products in bfloat16, `float32_twin`)."""
    if not traced_float32(x):
        return None
    by_rows = jax_by_row_blocks if fast_ops.use_fast_path("jax_row_blocks", x) else None
    apply = jax_apply if fast_ops.use_fast_path("jax_bfloat16_products", x) else None
    if by_rows is None and apply is None:
        return None
    return fast_ops.LayerKernels(
        "jax_row_blocks" if by_rows else "jax_bfloat16_products", apply, by_rows
    )


# `jax_bfloat16_products`: the Dense layers of a bfloat16 model's float32 twin
# (`float32_twin`) whose products read bfloat16 operands into float32 sums.
# XLA:CPU hands such a dot (bfloat16 x bfloat16 -> float32) to YNNPACK's
# bfloat16 kernels (AVX512-BF16 here), where a bfloat16 -> bfloat16 dot is
# computed in float32; and its bfloat16 weights are read as they are, not cast
# to float32 on every call.
_BFLOAT16_PRODUCT_LAYERS = weakref.WeakSet()


def jax_apply(layer, x):
    """`layer.call(x)` for the layer-by-layer inference on JAX, with the Dense layers of
    a bfloat16 model's float32 twin as `bfloat16_product` (guarded, "jax_bfloat16_products")."""
    name = "jax_bfloat16_products"
    if layer in _BFLOAT16_PRODUCT_LAYERS and fast_ops.fast_paths_allowed(name):
        return fast_ops.guarded(name, lambda: bfloat16_product(layer, x), lambda: layer.call(x))
    return layer.call(x)


def bfloat16_product(layer, x):
    """A plain Dense layer's call on float32 `x` (..., in) -> (..., out) with its product
    on bfloat16 operands summed in float32 (bias and activation in float32): the
    numbers of the bfloat16 model's product, before its output is rounded."""
    # jax: on the jax backend alone (importing this module loads no backend)
    import jax.numpy as jnp

    kernel = layer.kernel.value.astype(jnp.bfloat16)
    out = jnp.matmul(x.astype(jnp.bfloat16), kernel, preferred_element_type=jnp.float32)
    if layer.use_bias:
        out = out + layer.bias.value
    return out if layer.activation is None else layer.activation(out)


def jax_depthwise(x, kernel, bias, shifted_sum):
    """`shifted_sum(x, kernel, bias)`, the 'same' stride-1 depthwise conv as shifted
    multiply-adds ((B, H, W, C), kernel (k, k, C, 1), bias (C,) -> (B, H, W, C)), with
    its gradient given to JAX instead of derived through its k*k slices:
      d/dx      = the same shifted sum over the output gradient, kernel flipped;
      d/dkernel = for each of the k*k shifts, the shifted input times the output
                  gradient summed over B, H, W, in float32 (`_depthwise_kernel_gradient`);
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
        grad_kernel = _depthwise_kernel_gradient(x, grad, kernel.shape).astype(kernel.dtype)
        grad_bias = jnp.sum(grad.astype(jnp.float32), axis=(0, 1, 2)).astype(bias.dtype)
        return grad_x.astype(x.dtype), grad_kernel, grad_bias

    depthwise.defvjp(forward, backward)
    return depthwise


def _depthwise_kernel_gradient(x, grad, kernel_shape):
    """d/dkernel of the 'same' stride-1 depthwise conv: input x and output gradient
    (B, H, W, C) -> float32 (k, k, C, 1), entry (i, j, c) the sum over B, H, W of the
    padded input shifted by (i, j) times the gradient.

    One shift per step of a `lax.map` (one small loop body to compile). XLA's own
    filter gradient of the grouped conv, used before, computed a dense (C, k, k, C)
    product and kept its diagonal where C is small (C times the work: 107 of 404 ms of
    a convnextv2_atto training step at batch 32 x 32 went to stages 1 and 2's).
    convnextv2_atto's training step, 2-core CPU, fresh processes, alternating: at
    batch 8 x 224 610 / 632 ms against 1096 / 1382 ms, at batch 32 x 32 221 / 284 ms
    against 322 / 384 ms; compiled as fast (13-17 s either way). Unrolled, the k*k
    sums compiled 6-7 s slower."""
    # jax: on the jax backend alone (importing this module loads no backend)
    import jax
    import jax.numpy as jnp

    k, channels = kernel_shape[0], kernel_shape[2]
    pad = k // 2
    height, width = x.shape[1], x.shape[2]
    pad_h, pad_w = min(pad, height - 1), min(pad, width - 1)
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
    grad = grad.astype(jnp.float32)
    span_h, span_w = 2 * pad_h + 1, 2 * pad_w + 1  # the offsets that read some of x

    def one_term(offset):
        top, left = offset // span_w, offset % span_w
        shifted = jax.lax.dynamic_slice(
            padded, (0, top, left, 0), (padded.shape[0], height, width, channels)
        )
        return jnp.sum(shifted * grad, axis=(0, 1, 2))

    sums = jax.lax.map(one_term, jnp.arange(span_h * span_w))  # (span_h * span_w, C)
    sums = sums.reshape(span_h, span_w, channels)
    edge_h, edge_w = pad - pad_h, pad - pad_w  # kernel rows / columns that read only padding
    out = jnp.pad(sums, ((edge_h, edge_h), (edge_w, edge_w), (0, 0)))
    return out[..., None]


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
# ... and of a bfloat16 V1 model's float32 twin with its products in bfloat16
# (`jax_bfloat16_products`): YNNPACK's fusions for its dots alone, each dot on its
# own; fresh processes, median ms, XLA's defaults -> these: convnext_atto b8 70.3,
# 79.9 -> 59.2, 62.4; b32 274.8 -> 246.0; b1 12.2 -> 12.8; convnext_tiny b8 374.1,
# 345.7 -> 363.8, 370.3; b32 1419.9 -> 1336.5; b1 48.2 -> 52.6. With GRN they were
# slower (convnextv2_atto b8 64.7, 72.0 -> 97.6, 84.3), which keeps the defaults.
JAX_V1_BFLOAT16_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


def jax_compiler_options(model) -> dict:
    """The XLA options `predict_batch` compiles `model` with on JAX: the measured ones
    for a CPU and a ConvNeXt without GRN (those of its bfloat16 products where it runs
    them, `float32_twin_products`), unless the user's XLA_FLAGS set the same option
    (theirs wins) or the fast path is off; else none (XLA's defaults)."""
    config = getattr(model, "convnext_config", None)
    if config is None or config.use_grn or not fast_ops.use_fast_path("jax_compiler_options"):
        return {}
    # YNNPACK runs the products of a bfloat16 model's twin: its fusions stay on for them
    options = (
        JAX_V1_BFLOAT16_COMPILER_OPTIONS
        if float32_twin_products(model)
        else JAX_V1_COMPILER_OPTIONS
    )
    user_flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in options.items() if k not in user_flags}


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
        if twin is None:
            return None
        runner = _compiled(_float32_runner(twin), model)
        # products in float32 too: nothing reads the bfloat16 weights as they are
        return runner if float32_twin_products(model) else _cast_once_per_update(runner)

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
    the default compilation as their fallback), each run over `heap_sized` batches
    where `measured_heap_sized(model)`."""
    # jax: on the jax backend alone (importing this module loads no backend)
    import jax

    sized = heap_sized if measured_heap_sized(model) else lambda jitted: jitted
    default = sized(jax.jit(run))
    options = jax_compiler_options(model)
    if not options:
        return default
    tuned = sized(jax.jit(run, compiler_options=options))

    def compiled(values, x):
        if not fast_ops.fast_paths_allowed("jax_compiler_options"):
            return default(values, x)
        return fast_ops.guarded(
            "jax_compiler_options", lambda: tuned(values, x), lambda: default(values, x)
        )

    return compiled


# `jax_heap_sized_batches`: XLA:CPU runs an executable with one temporary buffer for
# all its intermediates, allocated with malloc on one of its worker threads. glibc
# serves such a thread from a secondary arena, whose heaps hold at most 64 MiB: a
# larger block is mapped on its own and unmapped when freed, whatever the
# thresholds, so every pass page-faults it in again (convnextv2_atto float32 at
# batch 32: a 139 MiB buffer, 35,700-37,300 faults a pass). A batch whose buffer is
# larger than HEAP_SIZED_TEMP_BYTES (what XLA's buffer assignment reports,
# `memory_analysis`) runs as equal chunks whose buffer is at most that, with glibc's
# thresholds raised (`fast_ops.keep_freed_memory`), so the buffer stays in the heap.
# `predict_batch`, fresh processes, 3 warm-up and 8-12 timed passes, median ms (CPU ms
# a pass), this fast path off -> on (2-core AMD EPYC, one process per figure):
#   convnextv2_atto float32 b32 (chunks of 11, then 8): 534, 516, 560 (915-949) ->
#       441, 461, 436 (746-772); 507, 614, 639 (879-1,107) -> 553, 478, 340 (597-939)
#   convnextv2_atto bfloat16 b32 (its float32 twin): 468, 501 -> 429, 419
#   convnextv2_atto float32 b8 (34.7 MiB: whole, the thresholds alone): 113, 100 -> 86, 95
#   V1, not kept: convnext_atto float32 b32 (chunks of 8) 358, 391, 406, 318, 345
#       (599-753) -> 370, 439, 364, 370, 354 (648-769); bfloat16 b32 300, 337 -> 295,
#       319; convnext_tiny float32 b8 (chunks of 4) 566, 511 -> 522, 527
# Faults a pass fall from 34,000-39,600 (b32) and 8,900 (b8) to 0-5,700. The first
# call compiles once more where a batch is chunked (the whole batch's executable,
# for its buffer's size): convnextv2_atto b32 2.6-4.2 -> 5.3-7.6 s.
HEAP_SIZED_TEMP_BYTES = 48 * 2**20


def measured_heap_sized(model) -> bool:
    """Whether `predict_batch` runs `model` over `heap_sized` batches: a ConvNeXt with
    GRN (V2), where it was measured faster; V1 models (whose block tails already run
    over row blocks, `jax_by_row_blocks`) measured the same or slower, and keep the
    whole batch and glibc's defaults."""
    config = getattr(model, "convnext_config", None)
    return config is not None and config.use_grn


def heap_sized(jitted):
    """`call(values, x)`: `jitted(values, x)` (a `jax.jit` of a model call on a batch
    `x`, (B, ...) -> outputs with B rows), over `heap_sized_chunk` chunks of the
    batch on a CPU (`jax_heap_sized_batches`); the whole batch elsewhere."""
    chunk_sizes = {}  # (input shape, dtype) -> rows a run takes

    def call(values, x):
        name = "jax_heap_sized_batches"
        if x.shape[0] < 2 or not fast_ops.use_fast_path(name):
            return jitted(values, x)
        if not fast_ops.keep_freed_memory(name):  # chunks alone leave the buffer mapped
            return jitted(values, x)

        def chunked():
            key = (tuple(x.shape), str(x.dtype))
            if key not in chunk_sizes:
                chunk_sizes[key] = heap_sized_chunk(jitted, values, x)
            return run_in_chunks(jitted, values, x, chunk_sizes[key])

        return fast_ops.guarded(name, chunked, lambda: jitted(values, x))

    return call


def heap_sized_chunk(jitted, values, x) -> int:
    """The rows of `x` (B, ...) one run of `jitted` takes: B where XLA's temporary
    buffer for the whole batch is at most HEAP_SIZED_TEMP_BYTES, or where not even one
    image's is; else the size of equal chunks whose buffer is (checked on their own
    executable, which the chunks then run)."""
    batch = x.shape[0]
    temp = _temp_bytes(jitted, values, x.shape, x.dtype)
    if temp <= HEAP_SIZED_TEMP_BYTES:
        return batch
    size = max(1, batch * HEAP_SIZED_TEMP_BYTES // temp)
    while True:
        size = _equal_chunk(batch, size)
        if _temp_bytes(jitted, values, (size, *x.shape[1:]), x.dtype) <= HEAP_SIZED_TEMP_BYTES:
            return size
        if size == 1:
            return batch  # not even one image's buffer fits: chunks would only cost speed
        size //= 2


def _equal_chunk(batch: int, most: int) -> int:
    """The rows of equal chunks of `batch` of at most `most` rows: a divisor of `batch`
    (nothing padded) where one is at least half of `most`, else the size of the
    fewest chunks (the last one padded)."""
    divisor = next((d for d in range(most, 0, -1) if batch % d == 0), 1)
    if 2 * divisor >= most:
        return divisor
    return -(-batch // -(-batch // most))


def _temp_bytes(jitted, values, shape, dtype) -> int:
    """XLA's temporary buffer, in bytes, of `jitted`'s executable for an input of
    `shape` and `dtype` (compiled here; jax's caches keep it for the call)."""
    # jax: on the jax backend alone (importing this module loads no backend)
    import jax

    compiled = jitted.lower(values, jax.ShapeDtypeStruct(shape, dtype)).compile()
    analysis = compiled.memory_analysis()
    return 0 if analysis is None else int(analysis.temp_size_in_bytes)


def run_in_chunks(jitted, values, x, size):
    """`jitted(values, x)` over chunks of `size` rows of `x` (B, ...), the last padded
    with zeros to `size` (one executable for every chunk) and its padding dropped;
    the outputs (any structure of (rows, ...) arrays) concatenated along rows."""
    # jax: on the jax backend alone (importing this module loads no backend)
    import jax
    import jax.numpy as jnp

    batch = x.shape[0]
    if size >= batch:
        return jitted(values, x)
    parts = []
    for start in range(0, batch, size):
        rows = min(size, batch - start)
        chunk = x[start : start + rows]
        if rows < size:
            padding = jnp.zeros((size - rows, *x.shape[1:]), x.dtype)
            chunk = jnp.concatenate([jnp.asarray(chunk), padding])
        outputs = jitted(values, chunk)
        parts.append(jax.tree_util.tree_map(lambda y, rows=rows: y[:rows], outputs))
    return jax.tree_util.tree_map(lambda *ys: jnp.concatenate(ys), *parts)


# XLA:CPU (jax 0.10) computes a bfloat16 model's elementwise ops, and its dots whose
# output is bfloat16, in float32, with conversions around each: slower than float32
# (convnext_atto b32, 1 thread, CPU ms: 853 in bfloat16, 701 in float32). So a
# bfloat16 model computes in float32 on a CPU, its weights kept in bfloat16. A dot of
# bfloat16 operands into a float32 output is the exception: XLA hands it to
# YNNPACK's bfloat16 kernels, so the twin's Dense layers multiply that way
# (`jax_bfloat16_products`, below). predict_batch in bfloat16, fresh processes,
# median ms of two runs, the twin's products in float32 -> in bfloat16 (2-core AMD
# EPYC, AVX512-BF16, with XLA's default options for both): convnext_tiny b1 116.8,
# 108.7 -> 49.5, 49.2; b8 556.3, 543.8 -> 356.3, 364.5; b32 1964.6, 2129.2 -> 1438.9,
# 1381.9; convnextv2_atto b1 15.7, 14.0 -> 11.0, 12.2; b8 96.2, 82.1 -> 65.6, 66.6;
# b32 334.0, 331.0 -> 307.3, 264.6; convnext_atto (before: V1's float32 options)
# b1 14.6, 13.2 -> 12.0, 10.9; b8 91.7, 85.4 -> 90.0, 71.5; b32 308.3, 322.4 -> 328.7,
# 299.3 (then 246.0 with `JAX_V1_BFLOAT16_COMPILER_OPTIONS`).
def float32_twin(model):
    """A float32 copy of `model`'s architecture whose variables are never allocated
    (`_float32_runner` passes the model's values, cast), where `model` is a ConvNeXt
    whose body computes in bfloat16 and the fast path "jax_float32_compute" may run
    (on a CPU); else None."""
    if not _runs_in_float32(model):
        return None
    twin = fast_ops.float32_architecture(model)
    if twin is None or not _bfloat16_products_measured():
        return twin
    # the products of the layers that compute in bfloat16 (not the float32 head's)
    pairs = zip(fast_ops.flatten_layers(model), fast_ops.flatten_layers(twin), strict=True)
    for original, layer in pairs:
        if original.compute_dtype == "bfloat16" and _plain_dense(layer):
            _BFLOAT16_PRODUCT_LAYERS.add(layer)
    return twin


def float32_twin_products(model) -> bool:
    """Whether `predict_batch` runs `model` as its float32 twin with its products in
    bfloat16 (`jax_bfloat16_products`): a model whose body is bfloat16, on a CPU with
    bfloat16 instructions (or flags unknown), with both fast paths allowed."""
    return (
        _runs_in_float32(model)
        and fast_ops.use_fast_path("jax_bfloat16_products")
        and _bfloat16_products_measured()
    )


# `jax_bfloat16_products` on a CPU without bfloat16 instructions (an Intel Xeon with
# AVX-512 but no AVX512_BF16, 2 CPUs), where YNNPACK converts the operands in
# software: predict_batch median ms, bfloat16 (the products in bfloat16) against
# float32: convnext_atto b1 20.5 / 17.4, b8 122.3 / 89.8; convnext_tiny b8 740.5 /
# 440.2. There the twin keeps its float32 products.
def _bfloat16_products_measured() -> bool:
    """The CPU is not known to lack bfloat16 instructions (`fast_ops.cpu_lacks_bfloat16`):
    where `jax_bfloat16_products` was measured faster."""
    return not fast_ops.cpu_lacks_bfloat16()


def _runs_in_float32(model) -> bool:
    """`model` is a ConvNeXt whose body computes in bfloat16 and the fast path
    "jax_float32_compute" may run (on a CPU): what `float32_twin` copies."""
    plan = getattr(model, "_layer_plan", None)
    return (
        plan is not None
        and plan.body_dtype() == "bfloat16"
        and fast_ops.use_fast_path("jax_float32_compute")
    )


def _plain_dense(layer) -> bool:
    """`layer` is a built keras Dense over the last axis (2-D kernel), without LoRA or
    quantization: what `bfloat16_product` computes."""
    return (
        isinstance(layer, keras.layers.Dense)
        and not layer.lora_enabled
        and layer.quantization_mode is None
        and len(layer.kernel.shape) == 2
    )


# A twin whose products are float32 too (a CPU without bfloat16 instructions) would
# otherwise convert every weight to float32 inside the jit on every call: convnext_tiny
# at batch 8 took 637 ms against float32's 490 (Intel Xeon without AVX512_BF16).
def _cast_once_per_update(runner):
    """`runner(values, x)` given the bfloat16 values converted to float32 outside it,
    once per weight update: JAX arrays are immutable, so the same array objects (kept
    alive here, so that no new array takes an old one's id) hold the same values."""
    # jax: on the jax backend alone (importing this module loads no backend)
    import jax
    import jax.numpy as jnp

    cast = jax.jit(lambda values: [v.astype(jnp.float32) for v in values])
    converted = {}  # "of": the values converted, "values": them as float32

    def call(values, x):
        seen = converted.get("of")
        if seen is None or any(a is not b for a, b in zip(seen, values, strict=True)):
            converted.update(of=list(values), values=cast(list(values)))
        return runner(converted["values"], x)

    return call


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
