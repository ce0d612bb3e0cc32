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
  oneDNN remapper fuses into one `_MklLayerNorm` (float32 and bfloat16, the
  statistics in float32); fallback the layer's `call`.
- "tensorflow_pointwise_conv" (tensorflow): in bfloat16, a Dense without
  activation on a 4-D tensor as a 1x1 Conv2D (TensorFlow's oneDNN convolution
  uses AMX / AVX512-BF16, its MatMul a plain gemm); fallback the fused MatMul.
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
- "jax_float32_compute" (jax): `predict_batch` of a model whose body is
  bfloat16 runs a float32 copy of its architecture (never allocated) on the
  bfloat16 weights cast inside the jit (`jax_kernels.float32_twin`): XLA:CPU
  computes bfloat16 elementwise ops, and dots with a bfloat16 output, in float32
  with conversions around each; fallback the bfloat16 call.
- "torch_row_blocks" (torch): the same blocks in the layer-by-layer inference
  without autograd, in float32, one after another (`torch_by_row_blocks`);
  fallback the tail in one piece.
- "torch_residual_dense" (torch): in the layer-by-layer inference without
  autograd, a block's last Dense, its layer scale and the residual add as one
  oneDNN product that adds the shortcut (`_linear_pointwise.binary`), the scale
  folded into the weights (`torch_kernels.residual_dense`); fallback the three
  layers one by one.
- "torch_grn_bfloat16" (torch): GRN on a bfloat16 tensor kept in bfloat16 (its
  sum of squares a batched product with a row of ones, accumulated in float32, one
  bfloat16 `addcmul`; `torch_kernels.torch_response_norm`); fallback the float32 GRN.
- "jax_shifted_sum" (jax): the 7x7 depthwise conv as 49 shifted multiply-adds
  (fewer on a map smaller than the kernel's reach) instead of XLA's grouped conv,
  for inference and training: its gradient has its own rule (`jax_depthwise`),
  measured for training on a CPU as well; fallback keras' depthwise conv.
- "torch_packed_weights" (torch): in bfloat16, a whole block's two products
  (`torch_whole_block`) read weights oneDNN laid out once per weight update
  (`torch.ops.mkldnn._reorder_linear_weight`), bit-equal to the plain ones' products;
  fallback the plain weights.
- "torch_keep_freed_memory" (torch): at `predict_batch`'s first call on a CPU,
  glibc's malloc thresholds raised for the process (`convnext_common.allocator`),
  so large freed tensors stay in the process instead of being handed back to the
  kernel and faulted in again on the next pass; not where the environment sets
  an allocator option (`MALLOC_*`, `GLIBC_TUNABLES`, `LD_PRELOAD`) or the C
  library is not glibc; fallback glibc's defaults.
- "jax_heap_sized_batches" (jax): on a CPU, `predict_batch` runs a batch whose
  XLA temporary buffer is larger than a glibc heap holds as equal chunks whose
  buffer fits (`jax_kernels.heap_sized`), with glibc's malloc thresholds raised for
  the process as for torch (`keep_freed_memory`), so the buffer stays in the
  process instead of being mapped and faulted in again on every pass; not where
  the environment sets an allocator option or the C library is not glibc;
  fallback the whole batch with glibc's defaults.
- "jax_bfloat16_products" (jax): in that float32 twin ("jax_float32_compute"),
  the product of each Dense layer computing in bfloat16 (not the float32 head's)
  reads the input and kernel rounded to bfloat16 and sums them in float32
  (`jax_kernels.bfloat16_product`), which XLA:CPU hands to YNNPACK's bfloat16
  kernels; a V1 twin is compiled with YNNPACK's fusions for its dots alone
  (`JAX_V1_BFLOAT16_COMPILER_OPTIONS`, where V1's float32 options switch YNNPACK
  off); not on a CPU without bfloat16 instructions (`cpu_lacks_bfloat16`);
  fallback the twin's float32 products and V1's float32 options.
- "float32_compute" (torch, tensorflow): on a CPU without bfloat16 instructions
  (`cpu_lacks_bfloat16`: no AVX512_BF16, AMX-BF16 or Arm BF16 in its flags),
  `predict_batch` of a model whose body is bfloat16 runs a float32 twin of its
  architecture on its weights converted to float32 (torch: an allocated copy
  (`float32_copy`) updated when a weight's tensor changes; TensorFlow: converted
  inside the graph, `float32_architecture`), as oneDNN computes bfloat16 there by
  converting around every op; fallback the bfloat16 call.
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
- "stored_values" (Keras' private attribute holding a variable's tensor): the
  kernels read their weights as stored, outside a `keras.StatelessScope`
  (`keras_internals.stored_values`); fallback each variable's `.value`.
- "torch_whole_block" (torch): in the layer-by-layer inference without autograd,
  in float32 and bfloat16, a block that is the plain inverted bottleneck
  (`plan.BlockParts`) runs the same kernels as layer by layer, its weights
  prepared once per weight update and its checks made once per block
  (`torch_kernels.whole_block`); fallback the block layer by layer.

Layout: this module is the guard and the dispatch; each backend's kernels live in
their own module (`torch_kernels`, `jax_kernels`, `tensorflow_kernels`), Keras'
private hooks in `keras_internals`; the row-block arithmetic the JAX and torch
kernels share is here (`row_blocks`). A layer asks for a kernel by kind, never by backend name:
`run_kernel("depthwise_conv", x, portable_call, layer)` runs the current
backend's kernel of that kind where one exists and may run on `x`, else
`portable_call()`; `layer_kernels(x)` and `inference_function(model)` answer
the same way for the layer-by-layer inference and `predict_batch`.

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

Each private call goes through one small function of its backend's module
(`torch_kernels._onednn_linear_pointwise`, `keras_internals._keras_flatten_layers`,
`keras_internals._keras_initialize_all_variables`, ...), the one place a test
patches to simulate its failure.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
import warnings

import keras

from convnext_common import allocator, cpu

_state = threading.local()
_DISABLED: dict[str, str] = {}  # fast path name -> why it was switched off

FAST_PATHS = (
    "onednn_linear",
    "torch_conv_nhwc",
    "torch_addcmul",
    "torch_kernels",
    "tensorflow_fused_dense",
    "tensorflow_layer_norm",
    "tensorflow_pointwise_conv",
    "jax_shifted_sum",
    "jax_compiler_options",
    "jax_row_blocks",
    "jax_float32_compute",
    "torch_row_blocks",
    "torch_grn_bfloat16",
    "torch_residual_dense",
    "layerwise_call",
    "compiled_inference",
    "flatten_layers",
    "deferred_variables",
    "stored_values",
    "torch_whole_block",
    "torch_keep_freed_memory",
    "torch_packed_weights",
    "jax_heap_sized_batches",
    "jax_bfloat16_products",
    "float32_compute",
)


def _read_env() -> bool:
    return os.environ.get("KERAS_CONVNEXT_FAST_PATHS", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def _env_allows() -> bool:
    """KERAS_CONVNEXT_FAST_PATHS allows fast paths: read once per `inference_pass`,
    else on every call."""
    during_pass = getattr(_state, "env_allows", None)
    return _read_env() if during_pass is None else during_pass


@contextlib.contextmanager
def inference_pass():
    """One inference pass: KERAS_CONVNEXT_FAST_PATHS is read once for the whole of it
    (a pass asks ~70 times whether a fast path may run; reading the environment is
    ~0.9 us each time)."""
    previous = getattr(_state, "env_allows", None)
    _state.env_allows = _read_env()
    try:
        yield
    finally:
        _state.env_allows = previous


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


def any_disabled(names) -> bool:
    """Whether any of fast paths `names` is switched off in this process."""
    return bool(_DISABLED) and any(name in _DISABLED for name in names)


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
        import jax  # the backend: asked on jax alone

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        return not _tensorflow_gpus()
    return False


@functools.lru_cache(maxsize=1)
def _tensorflow_gpus() -> bool:
    import tensorflow as tf  # the backend: asked on tensorflow alone

    return bool(tf.config.list_logical_devices("GPU"))


def use_fast_path(name: str, x=None) -> bool:
    """Fast path `name` is allowed now and `x` is on a CPU."""
    return fast_paths_allowed(name) and on_cpu(x)


def plain_layer_norm(layer, x, dtypes=("float32",)) -> bool:
    """`layer` is keras' LayerNormalization over the last axis of `x`, with both
    scale and offset, computing in one of `dtypes` (what the fused kernels
    replace, in the dtypes each was measured in)."""
    if type(layer) is not keras.layers.LayerNormalization:
        return False
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return (
        list(axis) in ([-1], [len(x.shape) - 1])
        and layer.center
        and layer.scale
        and not getattr(layer, "rms_scaling", False)
        and layer.compute_dtype in dtypes
    )


# ----------------------------------------------------------------------------
# The process's allocator: glibc's malloc thresholds, raised once per process
# ----------------------------------------------------------------------------

# this process's allocator, once decided: "kept" (thresholds raised) or "not ours"
# (configured by the environment, or not glibc's: both fixed when the process started)
_freed_memory: dict[str, str] = {}
_allocator_lock = threading.Lock()


def keep_freed_memory(name: str, x=None) -> bool:
    """Raise glibc's malloc thresholds once per process (`convnext_common.allocator`)
    for fast path `name` ("torch_keep_freed_memory", "jax_heap_sized_batches"),
    when it may run on `x` (on a CPU), malloc is glibc's, and the environment sets
    no allocator option of its own (`MALLOC_*`, `GLIBC_TUNABLES`, `LD_PRELOAD`: a
    user's choice is left alone). If glibc refuses, fast path `name` is switched off
    (`guarded`). Returns whether this process's thresholds are raised."""
    decided = _freed_memory.get("allocator")
    if decided is not None:
        return decided == "kept"
    if not use_fast_path(name, x):
        return False
    with _allocator_lock:
        if "allocator" not in _freed_memory:
            if allocator.allocator_env() or not allocator.glibc_malloc_in_use():
                _freed_memory["allocator"] = "not ours"
            else:
                guarded(name, _raise_malloc_thresholds, _leave_the_defaults)
    return _freed_memory.get("allocator") == "kept"


def _raise_malloc_thresholds():
    allocator.raise_malloc_thresholds()
    _freed_memory["allocator"] = "kept"


def _leave_the_defaults():
    """The fallback: glibc's defaults (asked again only while the fast path is on)."""


def kept_freed_memory() -> bool:
    """Whether `keep_freed_memory` raised this process's malloc thresholds."""
    return _freed_memory.get("allocator") == "kept"


# ----------------------------------------------------------------------------
# Dispatch: a kernel by kind, from the current backend's module
# ----------------------------------------------------------------------------


def _backend_module():
    """The current backend's kernel module, or None (a backend without one)."""
    return _BACKEND_MODULES.get(keras.backend.backend())


def run_kernel(kind: str, x, portable_call, *args):
    """The current backend's kernel of `kind` on `x`, `kernel(x, *args)`, guarded by
    its fast path with `portable_call()` as the fallback; `portable_call()` where
    the backend has no kernel of that kind or it may not run on `x` now.

    Each backend module lists its kernels in `KERNELS` ({kind: (fast path name,
    function name)}); the function is looked up when called, so a test can
    replace it. Kinds: "depthwise_conv" (x, layer), "conv" (x, layer),
    "dense" (x, layer, fuse_gelu), "multiply_add" (x, scale, bias),
    "response_norm" (x, layer: GRN)."""
    module = _backend_module()
    entry = None if module is None else module.KERNELS.get(kind)
    if entry is None or not use_fast_path(entry[0], x):
        return portable_call()
    name, function = entry
    return guarded(name, lambda: getattr(module, function)(x, *args), portable_call)


class LayerKernels(
    collections.namedtuple(
        "LayerKernels", "name apply by_rows residual_dense whole", defaults=(None, None)
    )
):
    """What the layer-by-layer inference runs differently on a backend: fast path
    `name`; `apply(layer, x)` for each layer (None: the layer's own `call`);
    `by_rows(tail, x, shortcut, width)` for a block's per-position tail (None: in
    one piece); `residual_dense(x, shortcut, dense, scales, unfused)` for a block's
    last Dense, layer scales and add as one product (None: layer by layer);
    `whole(parts, x, layers, blocked)` for a plain inverted-bottleneck block at once
    (None: layer by layer). See `plan.Residual`."""


def layer_kernels(x) -> LayerKernels | None:
    """The `LayerKernels` of the layer-by-layer inference on `x` where its backend has
    some and they may run, else None (each layer's own `call`):
    each backend module's `layer_kernels(x)` (torch `torch_apply` and, without
    autograd in float32, `torch_by_row_blocks`; TensorFlow `tensorflow_apply`;
    JAX, inside a jit and in float32, `jax_by_row_blocks`)."""
    module = _backend_module()
    return None if module is None else module.layer_kernels(x)


def compiles_per_batch_size() -> bool:
    """Whether the inference path compiles once per batch size on this backend: JAX's
    jit does; the TensorFlow `inference_function` leaves the batch size open (one trace
    for all) and torch runs eagerly. Where it does, callers run batches at a few padded
    sizes (`embedding.model.padded_size`); elsewhere padding would only add work."""
    return keras.backend.backend() not in ("tensorflow", "torch")


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
    module = _backend_module()
    return None if module is None else module.inference_function(model)


def cpu_lacks_bfloat16() -> bool:
    """This CPU's flags are known and name no bfloat16 instructions
    (`convnext_common.cpu`): there every bfloat16 operation is float32 arithmetic with
    conversions around it, and the bfloat16 fast paths, each measured on a CPU with
    AVX512-BF16 or AMX, step aside for float32 ("float32_compute",
    "jax_bfloat16_products")."""
    return cpu.has_bfloat16_instructions() is False


def float32_architecture(model):
    """A float32 copy of `model`'s architecture (its config with dtype float32) whose
    variables are never allocated: it is called in a `keras.StatelessScope` that maps
    its variables (in `model.variables`' order) to values. None where the copy's
    variables are not the model's."""
    with keras.StatelessScope(initialize_variables=False):
        twin = _build_in_float32(model)
    forget_deferred(twin.weights)
    return twin if _same_variables(twin, model) else None


def float32_copy(model):
    """A float32 copy of `model`'s architecture with its variables allocated and set to
    the model's values converted to float32 (without a random initialisation first,
    `build_with_initial_values`); None where the copy's variables are not the model's."""
    by_path = {v.path: v for v in model.variables}

    def value_of(variable):
        source = by_path.get(variable.path)
        if source is None:  # pragma: no cover - the same config builds the same variables
            return None
        return lambda shape, dtype: keras.ops.cast(source.value, dtype)

    twin = build_with_initial_values(lambda: _build_in_float32(model), lambda twin: value_of)
    return twin if _same_variables(twin, model) else None


def _build_in_float32(model):
    return type(model).from_config({**model.get_config(), "dtype": "float32"})


def _same_variables(twin, model) -> bool:
    """`twin` has `model`'s variables, in the same order (the same config builds them)."""
    return [v.path for v in twin.variables] == [v.path for v in model.variables]


def wants_float32_compute(model, x=None) -> bool:
    """`model` is a ConvNeXt whose body computes in bfloat16, and "float32_compute" may
    run on `x` (on torch it must be given): on a CPU without bfloat16 instructions
    (`cpu_lacks_bfloat16`). What `predict_batch` runs as a float32 twin on torch and
    TensorFlow."""
    plan = getattr(model, "_layer_plan", None)
    return (
        plan is not None
        and use_fast_path("float32_compute", x)
        and cpu_lacks_bfloat16()
        and plan.body_dtype() == "bfloat16"
    )


def to_numpy(outputs):
    """A model's outputs (a tensor or a structure of them) as NumPy arrays."""
    return keras.tree.map_structure(lambda y: keras.ops.convert_to_numpy(y), outputs)


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


# The public names the layers, the model and `weights_convert` use, from the modules
# that own them (imported last: those modules use the guard above).
from convnext_layers.fast_ops import jax_kernels, tensorflow_kernels, torch_kernels  # noqa: E402
from convnext_layers.fast_ops.keras_internals import (  # noqa: E402, F401
    build_with_initial_values,
    flatten_layers,
    forget_deferred,
    initialize_deferred,
    stored_values,
    supports_deferred_variables,
    variables_are_deferred,
)

_BACKEND_MODULES = {"torch": torch_kernels, "jax": jax_kernels, "tensorflow": tensorflow_kernels}
