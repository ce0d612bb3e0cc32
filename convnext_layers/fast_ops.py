"""Every private or backend-specific API the models use, each behind a guard with a
plain fallback (as timm keeps its odd kernels in `timm/layers/fast_norm.py`).

What lives here, and what replaces it when it is missing or fails:

- `torch_linear`: oneDNN's fused linear + bias + GELU
  (`torch.ops.mkldnn._linear_pointwise`); fallback `F.linear` (+ GELU).
- `torch_conv2d_nhwc`: `F.conv2d` on the channels_last view of an NHWC tensor;
  fallback keras' own conv.
- `tensorflow_dense`: a 2-D MatMul -> BiasAdd -> activation chain that grappler
  fuses into `_FusedMatMul`; fallback keras' Dense.
- jax's shifted-sum depthwise conv (`layers.depthwise_shifted_sum`): 49 shifted
  multiply-adds instead of XLA's grouped conv; fallback keras' depthwise conv.
- `initialize_deferred` / `forget_deferred`: Keras' private variable
  initialisation hooks (`keras.src`); fallback build, then assign.
- `flatten_layers`: `keras.Model._flatten_layers`; fallback a walk over `.layers`.

Rules:
- A fast path runs only where it was measured: CPU, inference, the dtypes it
  was checked with. Anywhere else (a GPU, a gradient, an exporter tracing the
  graph) the portable formulation runs: `fast_paths_allowed()` decides.
- A private API that is missing, or raises once, is switched off for the rest
  of the process with one warning (`_disable`), and its fallback runs from then
  on: a new torch or Keras release can cost speed, never correctness.
- `portable()` (a context manager) and `KERAS_CONVNEXT_FAST_PATHS=0` switch
  every fast path off, e.g. while `model.export` traces a graph; the tests use
  them to check each fallback against its fast path.

All fast paths compute the same numbers as their fallbacks (the layer tests
compare them on every backend).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import keras

_state = threading.local()
_DISABLED: dict[str, str] = {}  # fast path name -> why it was switched off


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
            stacklevel=3,
        )


# ----------------------------------------------------------------------------
# torch
# ----------------------------------------------------------------------------


def torch_on_cpu(x) -> bool:
    return getattr(getattr(x, "device", None), "type", None) == "cpu"


def _onednn_linear_usable(x, weight) -> bool:
    """oneDNN's fused linear replaces F.linear only for CPU inference in float32 /
    bfloat16 (the op has no autograd formula and was measured on CPU only)."""
    import torch

    if not fast_paths_allowed("onednn_linear"):
        return False
    if not (torch_on_cpu(x) and x.dtype in (torch.float32, torch.bfloat16)):
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
        import torch

        try:
            if fuse_gelu:  # "none": the erf GELU, not the tanh approximation
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none"), True
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""), False
        except Exception as error:  # a torch without this op signature
            _disable("onednn_linear", error)
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


def torch_conv_usable(x) -> bool:
    """The channels_last conv path was measured on CPU only."""
    return fast_paths_allowed("torch_conv_nhwc") and torch_on_cpu(x)


def torch_multiply_add(x, scale, bias):
    """x * scale + bias with broadcasting, in one pass (addcmul)."""
    import torch

    return torch.addcmul(bias, x, scale)


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


# ----------------------------------------------------------------------------
# jax
# ----------------------------------------------------------------------------


def jax_on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"


# ----------------------------------------------------------------------------
# Keras internals
# ----------------------------------------------------------------------------


def flatten_layers(model):
    """Every layer inside `model`, nested models' layers included (not the model)."""
    if fast_paths_allowed("flatten_layers"):
        try:
            return list(model._flatten_layers(include_self=False, recursive=True))
        except Exception as error:
            _disable("flatten_layers", error)
    found, stack = [], list(getattr(model, "layers", []))[::-1]
    while stack:
        layer = stack.pop()
        found.append(layer)
        stack.extend(list(getattr(layer, "layers", []) or [])[::-1])
    return found


def supports_deferred_variables() -> bool:
    """Whether variables made inside `keras.StatelessScope(initialize_variables=False)`
    can be initialised later from values of our choice (Keras' private initialisation
    hooks are present)."""
    try:
        from keras.src.backend.common import global_state  # noqa: F401
        from keras.src.backend.common.variables import initialize_all_variables  # noqa: F401
    except ImportError:
        return False
    return "deferred_variables" not in _DISABLED


def initialize_deferred(variables, values) -> None:
    """Initialise deferred `variables` from `values(variable) -> array or None`
    (None keeps the variable's own initializer). Private Keras API: callers check
    `supports_deferred_variables()` first and fall back to assigning."""
    from keras.src.backend.common.variables import initialize_all_variables

    for variable in variables:
        make = values(variable)
        if make is not None:
            variable._initializer = make
    initialize_all_variables()


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


def backend() -> str:
    return keras.backend.backend()
