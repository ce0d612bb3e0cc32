"""Port timm ConvNeXt / ConvNeXt V2 checkpoints into the Keras models, and back.

    from weights_convert import load_timm, port_timm_weights, export_timm
    model = load_timm("timm/convnext_atto.d2_in1k")        # Hub id (cached), file or folder
    backbone = load_timm("path/to/model.safetensors", include_top=False)
    export_timm(model, "out.safetensors")                   # back to timm's layout

    python -m weights_convert SOURCE -o OUT.keras           # or OUT.weights.h5

Only safetensors are read (never a pickled .pth/.bin). The architecture comes
from timm's `config.json` when there is one, else it is inferred from the
tensors. Loading is strict, all or nothing: every checkpoint tensor is used
exactly once and every Keras weight is assigned, or one error lists what is
missing, unexpected and mis-shaped.

The mapping is data: `LAYER_RULES` turns a Keras layer name into a timm module
path, `WEIGHT_RULES` turns a (layer kind, Keras variable name) into a timm
parameter name plus one of four tensor transforms (identity, conv, depthwise,
dense). Nothing else is special-cased.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

import keras
import numpy as np

from convnext_layers import LAYER_NORM_EPSILON, DepthwiseConv, GlobalResponseNorm, LayerScale
from convnext_v1 import VARIANTS as V1_VARIANTS
from convnext_v1 import create_convnext_v1
from convnext_v2 import VARIANTS as V2_VARIANTS
from convnext_v2 import create_convnext_v2

logger = logging.getLogger("weights_convert")

DEFAULT_MODEL = "timm/convnext_atto.d2_in1k"

# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt, non-float, NaN/Inf."""


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected, mis-shaped keys."""


class UnsupportedArchitectureError(ValueError):
    """A timm architecture the Keras models cannot represent exactly."""


class CheckpointNotFoundError(FileNotFoundError):
    """A source that is neither a local checkpoint nor a reachable / cached Hub id."""


# ----------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------

# timm architecture -> (family, variant); family "v1" (convnext_v1) or "v2".
ARCHITECTURES = {
    **{f"convnext_{v}": ("v1", v) for v in V1_VARIANTS},
    **{f"convnextv2_{v}": ("v2", v) for v in V2_VARIANTS},
}
# timm stores the MLP of these as 1x1 convs, fc1/fc2 of shape (O, I, 1, 1)
CONV_MLP_VARIANTS = frozenset({"atto", "femto", "pico", "nano"})

_OLS = (
    "an overlapping 3x3-conv stem (stem_type='{}'); the Keras models only have the 4x4 patch stem"
)
# timm architectures (published or registered) that need something the models lack.
REFUSED_ARCHITECTURES = {
    "convnext_atto_ols": _OLS.format("overlap_tiered"),
    "convnext_femto_ols": _OLS.format("overlap_tiered"),
    "convnext_pico_ols": _OLS.format("overlap_tiered"),
    "convnext_nano_ols": _OLS.format("overlap"),
    "convnext_atto_rms": "RmsNorm2d normalisation layers (norm_layer='rmsnorm2d'); "
    "the Keras models only have LayerNorm",
    "convnext_zepto_rms": "SimpleNorm normalisation layers without bias (norm_layer='simplenorm') "
    "and the zepto size (depths 2-2-4-2, widths 32-256); the Keras models only have LayerNorm",
    "convnext_zepto_rms_ols": "SimpleNorm normalisation layers (norm_layer='simplenorm'), "
    "the zepto size and " + _OLS.format("overlap_tiered"),
    "convnext_tiny_hnf": "head_norm_first=True: a LayerNorm on the feature map before pooling "
    "(norm_pre) instead of the head LayerNorm after it",
    "convnext_large_mlp": "head_hidden_size=1536: a Linear + GELU pre-logits layer in the head "
    "(head.pre_logits.fc)",
    "convnext_xxlarge": "LayerNorm eps 1e-5 (the models use 1e-6) and the xxlarge size "
    "(depths 3-4-30-3, widths 384-3072)",
    "test_convnext": "gelu_tanh activation and LayerNorm eps 1e-5 (a timm test model)",
    "test_convnext2": "gelu_tanh activation and LayerNorm eps 1e-5 (a timm test model)",
    "test_convnext3": "SiLU activation, per-stage kernel sizes and LayerNorm eps 1e-5 "
    "(a timm test model)",
}

# model_args (timm config.json) that do not change the weights or the forward pass
_HARMLESS_MODEL_ARGS = {
    "num_classes",
    "in_chans",
    "drop_rate",
    "drop_path_rate",
    "head_init_scale",
    "ls_init_value",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
}


def canonical_architecture(name: str) -> str:
    """timm architecture of a name: 'timm/convnext_atto.d2_in1k' -> 'convnext_atto'."""
    name = str(name).strip()
    for prefix in ("hf-hub:", "hf_hub:", "timm:"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    name = name.rsplit("/", 1)[-1]
    return name.split(".", 1)[0].lower()


def check_architecture(arch: str) -> tuple[str, str]:
    """(family, variant) of a timm architecture name, or a clear error why it is not supported."""
    name = canonical_architecture(arch)
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if name in REFUSED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"timm architecture {name!r} is not supported: it needs "
            f"{REFUSED_ARCHITECTURES[name]}. Supported: {', '.join(ARCHITECTURES)}."
        )
    raise UnsupportedArchitectureError(
        f"Unknown timm architecture {arch!r}. Supported: {', '.join(ARCHITECTURES)}."
    )


def is_conv_mlp(arch: str) -> bool:
    """Whether timm stores this architecture's block MLP as 1x1 convs (O, I, 1, 1)."""
    return check_architecture(arch)[1] in CONV_MLP_VARIANTS


# ----------------------------------------------------------------------------
# Mapping rules
# ----------------------------------------------------------------------------

# Keras layer name -> timm module path (regex, template).
LAYER_RULES = (
    (r"stem_conv", "stem.0"),
    (r"stem_norm", "stem.1"),
    (r"stage(\d+)_downsample_norm", r"stages.\1.downsample.0"),
    (r"stage(\d+)_downsample_conv", r"stages.\1.downsample.1"),
    (r"stage(\d+)_block(\d+)_dwconv", r"stages.\1.blocks.\2.conv_dw"),
    (r"stage(\d+)_block(\d+)_norm", r"stages.\1.blocks.\2.norm"),
    (r"stage(\d+)_block(\d+)_pwconv1", r"stages.\1.blocks.\2.mlp.fc1"),
    (r"stage(\d+)_block(\d+)_grn", r"stages.\1.blocks.\2.mlp.grn"),
    (r"stage(\d+)_block(\d+)_pwconv2", r"stages.\1.blocks.\2.mlp.fc2"),
    (r"stage(\d+)_block(\d+)_layer_scale", r"stages.\1.blocks.\2"),
    (r"head_norm", "head.norm"),
    (r"head_fc", "head.fc"),
)


# Tensor transforms: timm (PyTorch layout) <-> Keras layout, as (to_keras, to_timm).
def _dense_to_keras(w):
    # timm's conv-MLP variants (atto..nano) store fc1/fc2 as 1x1 convs (O, I, 1, 1)
    if w.ndim == 4 and w.shape[2:] != (1, 1):
        raise ValueError(f"not a 1x1 conv: {w.shape}")
    return np.transpose(w.reshape(w.shape[0], w.shape[1]))


TRANSFORMS = {
    "identity": (lambda w: w, lambda w: w),
    "conv": (  # (O, I, kh, kw) <-> (kh, kw, I, O)
        lambda w: np.transpose(w, (2, 3, 1, 0)),
        lambda w: np.transpose(w, (3, 2, 0, 1)),
    ),
    "depthwise": (  # (C, 1, kh, kw) <-> (kh, kw, C, 1)
        lambda w: np.transpose(w, (2, 3, 0, 1)),
        lambda w: np.transpose(w, (2, 3, 0, 1)),
    ),
    "dense": (_dense_to_keras, lambda w: np.transpose(w)),  # (O, I) <-> (I, O)
}

# (Keras layer class, Keras variable name) -> (timm parameter name, transform)
WEIGHT_RULES = {
    (DepthwiseConv, "kernel"): ("weight", "depthwise"),
    (keras.layers.Conv2D, "kernel"): ("weight", "conv"),
    (keras.layers.Dense, "kernel"): ("weight", "dense"),
    (keras.layers.LayerNormalization, "gamma"): ("weight", "identity"),
    (keras.layers.LayerNormalization, "beta"): ("bias", "identity"),
    (LayerScale, "gamma"): ("gamma", "identity"),
    (GlobalResponseNorm, "weight"): ("weight", "identity"),
    (keras.layers.Layer, "bias"): ("bias", "identity"),
}

# Keras layer names under which the classifier and the head norm live
CLASSIFIER_PREFIX = "head.fc."
HEAD_NORM_PREFIX = "head.norm."


def timm_module_path(layer_name: str) -> str | None:
    """timm module path of a Keras layer name, or None if it holds no timm weights."""
    for pattern, template in LAYER_RULES:
        if re.fullmatch(pattern, layer_name):
            return re.sub(pattern, template, layer_name)
    return None


def _weight_rule(layer, variable_name):
    for (kind, name), rule in WEIGHT_RULES.items():
        if isinstance(layer, kind) and name == variable_name:
            return rule
    raise KeyError(f"No timm mapping for weight {variable_name!r} of {type(layer).__name__}")


def weight_map(model: keras.Model):
    """Yield (keras variable, timm key, transform name) for every mapped weight."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        module = timm_module_path(layer.name)
        if module is None:
            continue
        for variable in layer.weights:
            variable_name = variable.path.split("/")[-1]
            timm_name, transform = _weight_rule(layer, variable_name)
            yield variable, f"{module}.{timm_name}", transform


# ----------------------------------------------------------------------------
# Strict porting
# ----------------------------------------------------------------------------


def _shape_after(shape, transform, direction=0):
    """Shape of a tensor of `shape` after a transform, without touching data."""
    dummy = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape))
    return tuple(TRANSFORMS[transform][direction](dummy).shape)


def _numpy_dtype(dtype):
    """numpy dtype for a Keras dtype string, or None when numpy has none."""
    if dtype == "bfloat16":
        try:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def _to_keras_value(source, transform, dtype):
    value = TRANSFORMS[transform][0](np.asarray(source))
    target = _numpy_dtype(dtype)
    if target is None:  # let the backend cast from float32
        target = np.dtype(np.float32)
    return np.ascontiguousarray(value, dtype=target)


def _skipped(key, skip_prefixes):
    return bool(skip_prefixes) and key.startswith(tuple(skip_prefixes))


def plan_port(model: keras.Model, state_dict: dict, *, skip_prefixes: Iterable[str] = ()):
    """Check `state_dict` against `model` without assigning anything.

    Returns [(keras variable, timm key, transform)] for every weight to copy, or
    raises one `CheckpointMismatchError` listing missing keys, unexpected keys,
    shape mismatches (timm layout: expected, found), non-float and non-finite
    tensors. Keys under `skip_prefixes` are ignored on both sides: checkpoint
    tensors there are not loaded, Keras weights there keep their initial values.
    """
    skip_prefixes = tuple(skip_prefixes)
    plan, missing, mismatched, bad = [], [], [], []
    used = set()
    for variable, key, transform in weight_map(model):
        if _skipped(key, skip_prefixes):
            continue
        if key not in state_dict:
            missing.append(key)
            continue
        source = state_dict[key]
        found = tuple(np.shape(source))
        expected = _shape_after(tuple(variable.shape), transform, direction=1)
        try:
            fits = _shape_after(found, transform) == tuple(variable.shape)
        except ValueError:
            fits = False
        used.add(key)
        if not fits:
            mismatched.append((key, expected, found))
            continue
        plan.append((variable, key, transform))
    unexpected = sorted(k for k in state_dict if k not in used and not _skipped(k, skip_prefixes))
    for _, key, _ in plan:
        array = np.asarray(state_dict[key])
        if array.dtype.kind != "f":
            bad.append(f"non-float tensor {key} (dtype {array.dtype})")
        elif not np.isfinite(array).all():
            bad.append(f"tensor {key} holds NaN or Inf values")
    if missing or unexpected or mismatched or bad:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        for key, expected, found in mismatched:
            lines.append(f"shape mismatch {key}: expected {expected}, found {found}")
        lines.extend(bad)
        raise CheckpointMismatchError(
            f"Checkpoint does not fit the model {model.name!r} (nothing was loaded):\n  "
            + "\n  ".join(lines)
        )
    return plan


def _progress_bar(total, enabled, desc):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False, file=sys.stderr)


def port_state_dict(
    model: keras.Model,
    state_dict: dict,
    *,
    skip_prefixes: Iterable[str] = (),
    progress: bool = False,
) -> keras.Model:
    """Copy a timm state dict (name -> array) into a built `model`, strictly.

    Every mapped Keras weight must find a tensor of the right shape and every
    tensor must be used, or a `CheckpointMismatchError` (a ValueError) lists
    what is missing, unexpected and mis-shaped; nothing is assigned unless
    everything matches. fp16 / bf16 / fp64 tensors are cast to each weight's
    dtype. `skip_prefixes` (e.g. ("head.fc.",)) leaves those keys out on both
    sides.
    """
    plan = plan_port(model, state_dict, skip_prefixes=skip_prefixes)
    with _progress_bar(len(plan), progress, "porting") as bar:
        for variable, key, transform in plan:
            variable.assign(_to_keras_value(state_dict[key], transform, variable.dtype))
            if bar is not None:
                bar.update()
    return model


def _forget_uninitialized(variables):
    """Drop never-initialised variables from Keras' deferred-initialisation list."""
    try:
        from keras.src.backend.common import global_state

        ids = {id(v) for v in variables}
        pending = global_state.get_global_attribute("uninitialized_variables") or []
        global_state.set_global_attribute(
            "uninitialized_variables", [v for v in pending if id(v) not in ids]
        )
    except Exception:  # pragma: no cover - other Keras versions
        pass


def build_ported(
    build: Callable[[], keras.Model],
    state_dict: dict,
    *,
    skip_prefixes: Iterable[str] = (),
    progress: bool = False,
) -> keras.Model:
    """`build()` a model and load `state_dict` into it, strictly (see `port_state_dict`).

    Same result as `port_state_dict(build(), state_dict)`, but faster: the
    model is built inside a `keras.StatelessScope`, so its variables are
    created uninitialised and then initialised straight from the checkpoint
    (no random initialisation first, which on JAX compiles one kernel per weight
    shape). Weights under `skip_prefixes` get their normal initialisers.
    Nothing is returned on a mismatch.
    """
    with keras.StatelessScope(initialize_variables=False):
        model = build()
    variables = list(model.weights)
    deferred = all(
        getattr(v, "_value", 0) is None and getattr(v, "_initializer", None) is not None
        for v in variables
    )
    if not deferred:  # pragma: no cover - a Keras without deferred initialisation
        _initialize_pending()
        return port_state_dict(model, state_dict, skip_prefixes=skip_prefixes, progress=progress)
    try:
        plan = plan_port(model, state_dict, skip_prefixes=skip_prefixes)
    except Exception:
        _forget_uninitialized(variables)
        raise
    with _progress_bar(len(plan), progress, "porting") as bar:

        def initializer(key, transform):
            def initialize(shape, dtype=None):
                value = _to_keras_value(state_dict[key], transform, dtype)
                if bar is not None:
                    bar.update()
                return value

            return initialize

        for variable, key, transform in plan:
            variable._initializer = initializer(key, transform)
        _initialize_pending()
    return model


def _initialize_pending():
    from keras.src.backend.common.variables import initialize_all_variables

    initialize_all_variables()


# ----------------------------------------------------------------------------
# Export (Keras -> timm)
# ----------------------------------------------------------------------------


def model_architecture(model: keras.Model) -> str:
    """timm architecture of a Keras ConvNeXt: `model.timm_architecture` or inferred."""
    arch = getattr(model, "timm_architecture", None)
    if arch:
        check_architecture(arch)
        return canonical_architecture(arch)
    names = {layer.name: layer for layer in model._flatten_layers(include_self=False)}
    depths = [0, 0, 0, 0]
    for name in names:
        match = re.fullmatch(r"stage(\d)_block(\d+)_dwconv", name)
        if match:
            stage, block = int(match[1]), int(match[2])
            depths[stage] = max(depths[stage], block + 1)
    if "stem_conv" not in names:
        raise ValueError(f"{model.name!r} is not a ConvNeXt from convnext_v1 / convnext_v2.")
    widths = [names["stem_conv"].filters] + [
        names[f"stage{s}_downsample_conv"].filters for s in (1, 2, 3)
    ]
    family = (
        "v2" if any(isinstance(layer, GlobalResponseNorm) for layer in names.values()) else "v1"
    )
    table = V2_VARIANTS if family == "v2" else V1_VARIANTS
    for variant, config in table.items():
        if list(config.depths) == depths and list(config.widths) == widths:
            return f"convnext{'v2' if family == 'v2' else ''}_{variant}"
    raise ValueError(f"No timm architecture has depths {depths} and widths {widths}.")


def export_state_dict(model: keras.Model, *, conv_mlp: bool | None = None) -> dict[str, np.ndarray]:
    """The model's weights as a timm state dict (name -> float32 numpy array, C order).

    `conv_mlp` (default: from the architecture) writes the block MLP as 1x1
    convs (O, I, 1, 1), as timm's atto..nano models hold it.
    """
    if conv_mlp is None:
        conv_mlp = is_conv_mlp(model_architecture(model))
    state = {}
    for variable, key, transform in weight_map(model):
        value = TRANSFORMS[transform][1](keras.ops.convert_to_numpy(variable))
        if conv_mlp and transform == "dense" and ".mlp.fc" in key:
            value = value.reshape(value.shape + (1, 1))
        state[key] = np.ascontiguousarray(value)
    return state


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a temporary path next to `path`; move it onto `path` if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp" + suffix, dir=folder
    )
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename, so a crash leaves old or new
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path, write) -> str:
    """Call `write(tmp)` with a temporary path next to `path`, then move it onto `path`.

    The temporary name keeps the target's extension (`.keras`, `.weights.h5`,
    `.npz`, ...), which Keras' savers check. Returns `path`.
    """
    path = os.fspath(path)
    suffix = ".weights.h5" if path.endswith(".weights.h5") else os.path.splitext(path)[1]
    with atomic_path(path, suffix) as tmp:
        write(tmp)
    return path


def export_timm(model: keras.Model, path, *, conv_mlp: bool | None = None) -> str:
    """Write the model's weights as a timm safetensors file (atomically); returns the path.

    `timm.create_model(arch, num_classes=...).load_state_dict(load_file(path))`
    accepts it strictly; a timm -> Keras -> timm round trip is bit-exact.
    """
    from safetensors.numpy import save_file

    arch = model_architecture(model)
    state = export_state_dict(model, conv_mlp=is_conv_mlp(arch) if conv_mlp is None else conv_mlp)
    metadata = {"format": "pt", "architecture": arch}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=metadata)
    return os.fspath(path)


def randomize_timm_parameters(model, seed: int = 0):
    """Set every parameter of a timm (torch) model to random values, in place; returns it
    in eval mode. For checking a conversion: timm initialises layer scale to 1e-6 and
    GRN to zero, which makes almost every block an identity and hides it from any
    comparison. Norm weights go to 1 +- 0.2, other 1-D parameters (biases, layer
    scale, GRN) to +-0.2, weights to N(0, 1/fan_in) so activations keep a sane scale.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:
                param.copy_(0.2 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)
    return model.eval()


# ----------------------------------------------------------------------------
# Reading safetensors (validating, memory-mapped)
# ----------------------------------------------------------------------------

_FLOAT_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
_ITEM_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, metadata) of a safetensors file, validated; F32/F16/F64 are memory-mapped.

    BF16 tensors are widened to float32 exactly. Raises `CheckpointError` for a
    truncated or corrupt file and for non-float tensors.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    name = os.path.basename(path)
    if size < 8:
        raise CheckpointError(f"{name}: truncated safetensors file ({size} bytes).")
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > min(size - 8, _MAX_HEADER):
            raise CheckpointError(
                f"{name}: truncated or not a safetensors file (header of {header_size} bytes, "
                f"file of {size})."
            )
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{name}: corrupt safetensors header ({error}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header (not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + header_size
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    tensors, non_float = {}, []
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            count = math.prod(shape)
            valid = (
                dtype in _ITEM_SIZES
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and 0 <= begin <= end
                and end - begin == count * _ITEM_SIZES[dtype]
            )
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(f"{name}: corrupt safetensors entry for {key!r}: {info!r}.")
        if start + end > size:
            raise CheckpointError(
                f"{name}: truncated file: tensor {key!r} ends at byte {start + end}, "
                f"the file has {size}."
            )
        if dtype not in _FLOAT_DTYPES and dtype != "BF16":
            non_float.append(f"{key} ({dtype})")
            continue
        raw = data[start + begin : start + end]
        if dtype == "BF16":
            bits = raw.view("<u2").astype(np.uint32) << 16
            tensors[key] = bits.view(np.float32).reshape(shape)
        else:
            tensors[key] = raw.view(_FLOAT_DTYPES[dtype]).reshape(shape)
    if non_float:
        raise CheckpointError(
            f"{name}: non-float tensors, not ConvNeXt weights: {', '.join(non_float)}."
        )
    return tensors, metadata


# ----------------------------------------------------------------------------
# Sources: Hub id, file, folder
# ----------------------------------------------------------------------------

_HUB_ID = re.compile(r"^(?:hf-hub:|hf_hub:)?([\w.-]+/[\w.-]+)(?:@([\w./-]+))?$")
_TRUE = {"1", "on", "yes", "true"}


def _hub_cache_dir():
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _local_hint(source):
    return (
        f"Pass a local checkpoint instead: load_timm('path/to/model.safetensors') or a folder "
        f"holding model.safetensors + config.json (as on the Hub); on the command line "
        f"`python -m weights_convert path/to/model.safetensors -o out.keras`. To fill the cache, "
        f"run once with network: load_timm({source!r})."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connect (False under HF_HUB_OFFLINE).

    Asked once before a download, so that with no network the Hub cache is
    used at once instead of after huggingface_hub's ~20 s of retries.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_download(repo_id, revision, filename, required, offline):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=_hub_cache_dir(),
            local_files_only=offline,
            library_name="keras-convnext",
        )
    except LocalEntryNotFoundError as error:
        if not required and offline:
            return None
        cache = _hub_cache_dir() or "the default Hugging Face cache"
        env_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
        why = (
            "HF_HUB_OFFLINE is set and it is not in the cache"
            if env_offline
            else "the Hub is unreachable (no network) and it is not in the cache"
            if offline
            else f"it could not be downloaded ({type(error).__name__}) and is not in the cache"
        )
        raise CheckpointNotFoundError(
            f"Cannot get {filename} of {repo_id}: {why} ({cache}). " + _local_hint(repo_id)
        ) from None
    except EntryNotFoundError:
        if not required:
            return None
        raise CheckpointNotFoundError(
            f"{repo_id} has no {filename}; only safetensors checkpoints are read (a pickled "
            ".pth/.bin is never loaded). " + _local_hint(repo_id)
        ) from None
    except Exception as error:  # network, auth, unknown repo
        if not required:
            return None
        raise CheckpointNotFoundError(
            f"Cannot get {filename} of {repo_id} from the Hugging Face Hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            + _local_hint(repo_id)
        ) from None


def hub_repo_id(source) -> str | None:
    """The Hub repo id `source` names (`timm/NAME.TAG`, `hf-hub:timm/...`, `...@rev`), or
    None for an existing local path or anything else."""
    text = os.fspath(source)
    if os.path.exists(text) or text.endswith(".safetensors") or text.startswith((".", "/")):
        return None
    match = _HUB_ID.match(text)
    return match[1] if match else None


def resolve_source(source) -> tuple[str, str | None, str | None]:
    """(safetensors path, config.json path or None, Hub repo id or None) of a source."""
    text = os.fspath(source)
    if os.path.isdir(text):
        weights = os.path.join(text, "model.safetensors")
        if not os.path.isfile(weights):
            found = ", ".join(sorted(os.listdir(text))[:10]) or "nothing"
            raise CheckpointNotFoundError(
                f"Folder {text!r} has no model.safetensors (found: {found}); only safetensors "
                "checkpoints are read."
            )
        config = os.path.join(text, "config.json")
        return weights, config if os.path.isfile(config) else None, None
    if os.path.isfile(text):
        if not text.endswith(".safetensors"):
            raise CheckpointError(
                f"{text!r} is not a .safetensors file. Only safetensors checkpoints are read: a "
                "pickled .pth/.bin can run code when loaded. Convert it with "
                "safetensors.torch.save_file where you trust it."
            )
        config = os.path.join(os.path.dirname(os.path.abspath(text)), "config.json")
        return text, config if os.path.isfile(config) else None, None
    repo_id = hub_repo_id(text)
    if repo_id is not None:
        revision = _HUB_ID.match(text)[2]
        offline = not hub_reachable()
        weights = _hub_download(repo_id, revision, "model.safetensors", True, offline)
        config = _hub_download(repo_id, revision, "config.json", False, offline)
        return weights, config, repo_id
    raise CheckpointNotFoundError(
        f"{text!r} is neither an existing file / folder nor a Hub id like {DEFAULT_MODEL!r}."
    )


# ----------------------------------------------------------------------------
# Architecture inference and configs
# ----------------------------------------------------------------------------


def infer_architecture(state_dict: dict) -> str:
    """timm architecture name of a ConvNeXt state dict, from its tensor names and shapes.

    Depths from the block indices, widths from the shapes, V2 from `grn`,
    conv-MLP from 4-D `fc1`. Features the Keras models lack (overlapping stem,
    RMS / simple norms, norm_pre, head MLP, other kernel sizes) raise
    `UnsupportedArchitectureError` naming them.
    """
    keys = set(state_dict)
    shape = lambda k: tuple(np.shape(state_dict[k]))
    if "stem.0.weight" not in keys or not any(k.startswith("stages.") for k in keys):
        raise CheckpointError(
            "Not a timm ConvNeXt state dict: no stem.0.weight / stages.* tensors "
            f"(first keys: {', '.join(sorted(keys)[:5])})."
        )
    missing_features = []
    if "stem.2.weight" in keys or shape("stem.0.weight")[2:] != (4, 4):
        missing_features.append("an overlapping 3x3-conv stem (timm '_ols' models)")
    if "stem.1.weight" in keys and "stem.1.bias" not in keys:
        missing_features.append("bias-free RMS / simple norms (timm '_rms' models)")
    if any(k.startswith("norm_pre.") for k in keys):
        missing_features.append("a LayerNorm before pooling, norm_pre (head_norm_first, '_hnf')")
    if any(k.startswith("head.pre_logits.") for k in keys):
        missing_features.append("an MLP pre-logits layer in the head (head_hidden_size, '_mlp')")
    depths = [0, 0, 0, 0]
    for key in keys:
        match = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            stage, block = int(match[1]), int(match[2])
            if stage > 3:
                missing_features.append(f"a fifth stage ({key})")
                break
            depths[stage] = max(depths[stage], block + 1)
    if missing_features:
        raise UnsupportedArchitectureError(
            "The checkpoint needs " + "; ".join(missing_features) + ", which the Keras ConvNeXt "
            f"models do not have. Supported architectures: {', '.join(ARCHITECTURES)}."
        )
    if 0 in depths:
        raise CheckpointError(f"Not a 4-stage ConvNeXt state dict (blocks per stage {depths}).")
    widths = [shape(f"stages.{s}.blocks.0.conv_dw.weight")[0] for s in range(4)]
    kernels = {shape(f"stages.{s}.blocks.0.conv_dw.weight")[2:] for s in range(4)}
    if kernels != {(7, 7)}:
        raise UnsupportedArchitectureError(
            f"The checkpoint's depthwise kernels are {sorted(kernels)}; the Keras models use 7x7."
        )
    v2 = any(".mlp.grn." in k for k in keys)
    conv_mlp = len(shape("stages.0.blocks.0.mlp.fc1.weight")) == 4
    family = "v2" if v2 else "v1"
    table = V2_VARIANTS if v2 else V1_VARIANTS
    for variant, config in table.items():
        if list(config.depths) == depths and list(config.widths) == widths:
            arch = f"convnext{'v2' if v2 else ''}_{variant}"
            if conv_mlp != (variant in CONV_MLP_VARIANTS):
                layout = "1x1-conv" if conv_mlp else "linear"
                raise UnsupportedArchitectureError(
                    f"The checkpoint has {arch}'s depths and widths but a {layout} MLP, which "
                    f"timm's {arch} does not use; pass arch= explicitly if it is {arch}."
                )
            return arch
    hint = ""
    if depths == [3, 4, 30, 3]:
        hint = f" ({REFUSED_ARCHITECTURES['convnext_xxlarge']}: convnext_xxlarge is not supported)"
    raise UnsupportedArchitectureError(
        f"No ConvNeXt {family.upper()} variant has depths {depths} and widths {widths}{hint}. "
        f"Supported architectures: {', '.join(ARCHITECTURES)}."
    )


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TUPLE_KEYS = ("input_size", "test_input_size", "min_input_size", "mean", "std", "pool_size",
               "test_pool_size")  # fmt: skip


def _builtin_pretrained_cfg(arch):
    family = ARCHITECTURES.get(arch, ("v1", None))[0]
    return {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "num_classes": 1000,
        "pool_size": (7, 7),
        "first_conv": "stem.0",
        "classifier": "head.fc",
        "license": "cc-by-nc-4.0" if family == "v2" else "apache-2.0",
    }


def _timm_module():
    """timm, if it can be used here: already imported, or importable without TensorFlow loaded
    (importing torch after TensorFlow crashes some builds)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if "tensorflow" in sys.modules:
        return None
    try:
        import timm

        return timm
    except Exception:
        return None


def timm_default_cfg(arch, tag=None, num_classes=None) -> dict:
    """timm's own pretrained_cfg for `arch[.tag]` from its registry (offline), or {}.

    Without a tag, the first of the architecture's pretrained tags whose
    num_classes matches is used, and its tag / source fields are dropped.
    """
    timm = _timm_module()
    if timm is None:
        return {}
    try:
        from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg

        if tag:
            cfg = get_pretrained_cfg(f"{arch}.{tag}")
            return {} if cfg is None else cfg.to_dict()
        cfgs = get_arch_pretrained_cfgs(arch) or {}
        chosen = next(
            (c for c in cfgs.values() if num_classes is None or c.num_classes == num_classes), None
        ) or get_pretrained_cfg(arch)
        if chosen is None:
            return {}
        cfg = chosen.to_dict()
        for key in ("tag", "hf_hub_id", "url", "file", "source", "hf_hub_filename"):
            cfg.pop(key, None)
        return cfg
    except Exception:
        return {}


def _clean_cfg(cfg):
    out = {}
    for key, value in cfg.items():
        if key == "state_dict" or value is None:
            continue
        if key in _TUPLE_KEYS and isinstance(value, list | tuple):
            value = tuple(value)
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out


def _classifier_size(state_dict):
    fc = state_dict.get("head.fc.weight")
    return 0 if fc is None else int(np.shape(fc)[0])


def _finish_config(state_dict, config, arch, tag=None):
    """config with architecture, num_classes and a full pretrained_cfg."""
    file_cfg = dict(config.get("pretrained_cfg") or {})
    tag = tag or file_cfg.get("tag")
    num_classes = _classifier_size(state_dict)
    pretrained_cfg = _builtin_pretrained_cfg(arch)
    needed = set(pretrained_cfg) | {"test_input_size", "test_crop_pct"}
    if not needed <= set(file_cfg):  # consult timm only when the file lacks something
        pretrained_cfg.update(_clean_cfg(timm_default_cfg(arch, tag, num_classes)))
    pretrained_cfg.update(_clean_cfg(file_cfg))
    pretrained_cfg["num_classes"] = num_classes
    pretrained_cfg.setdefault("architecture", arch)
    if tag:
        pretrained_cfg.setdefault("tag", tag)
    out = {k: v for k, v in config.items() if k != "pretrained_cfg"}
    out.update(architecture=arch, num_classes=num_classes, pretrained_cfg=pretrained_cfg)
    return out


def _check_model_args(config, arch):
    args = dict(config.get("model_args") or {})
    odd = {
        k: v
        for k, v in args.items()
        if k not in _HARMLESS_MODEL_ARGS and not (k == "global_pool" and v in ("avg", ""))
    }
    if config.get("global_pool") not in (None, "avg", ""):
        odd["global_pool"] = config["global_pool"]
    if odd:
        raise UnsupportedArchitectureError(
            f"config.json builds {arch} with model_args the Keras models do not have: "
            + ", ".join(f"{k}={v!r}" for k, v in sorted(odd.items()))
        )


def load_checkpoint(source, *, arch: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(state_dict, config) of a Hub id, a .safetensors file or a folder.

    state_dict maps timm names to float numpy arrays (memory-mapped where the
    dtype allows). config has "architecture" (timm name: `arch`, else
    config.json's, else inferred from the tensors), "num_classes" (the
    checkpoint's classifier size, 0 without one) and "pretrained_cfg" (timm's,
    completed from timm's registry when importable, else ImageNet defaults).
    """
    weights, config_path, repo_id = resolve_source(source)
    state_dict, metadata = read_safetensors(weights)
    config = {}
    if config_path is not None:
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"Cannot read {config_path}: {error}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path} is not a JSON object.")
    tag = None
    if repo_id and "." in repo_id.rsplit("/", 1)[-1]:
        tag = repo_id.rsplit("/", 1)[-1].split(".", 1)[1]
    if arch is not None:
        name = canonical_architecture(arch)
    elif config.get("architecture"):
        name = canonical_architecture(config["architecture"])
    else:
        name = infer_architecture(state_dict)
    check_architecture(name)
    if arch is None:
        _check_model_args(config, name)
    config = _finish_config(state_dict, config, name, tag)
    config["source"] = os.fspath(source)
    if metadata.get("format") not in (None, "pt", "np", "numpy", "torch"):
        logger.debug("safetensors metadata format %r", metadata.get("format"))
    return state_dict, config


# ----------------------------------------------------------------------------
# Building Keras models
# ----------------------------------------------------------------------------


def _input_shape(input_shape, pretrained_cfg, channels):
    if input_shape is not None:
        return tuple(input_shape)
    size = (pretrained_cfg or {}).get("input_size") or (3, 224, 224)
    return (int(size[-2]), int(size[-1]), int(channels or size[0]))


def keras_model_for(
    config_or_arch,
    *,
    include_top: bool = True,
    num_classes: int | None = None,
    input_shape=None,
    pooling=None,
    output_stages=None,
    in_chans: int | None = None,
) -> keras.Model:
    """The (untrained) Keras model matching a timm architecture or a `load_checkpoint` config.

    num_classes: default the config's (1000 for a bare architecture name).
    With include_top and num_classes=0 the model ends like timm's
    `num_classes=0` model: global average pooling + head LayerNorm (timm's
    pre-logits). input_shape: default the pretrained_cfg input size.
    """
    if isinstance(config_or_arch, dict):
        config = config_or_arch
        arch = config.get("architecture")
        if not arch:
            raise ValueError("config has no 'architecture'.")
    else:
        arch, config = config_or_arch, {}
    family, variant = check_architecture(arch)
    create = create_convnext_v2 if family == "v2" else create_convnext_v1
    pretrained_cfg = config.get("pretrained_cfg") or {}
    if num_classes is None:
        num_classes = config.get("num_classes", pretrained_cfg.get("num_classes", 1000))
    shape = _input_shape(input_shape, pretrained_cfg, in_chans)
    name = canonical_architecture(arch)
    if include_top and num_classes == 0:  # timm's num_classes=0: pooled, head-normed features
        backbone = create(variant, include_top=False, pooling="avg", input_shape=shape, name=name)
        x = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="head_norm")(
            backbone.output
        )
        return keras.Model(backbone.input, x, name=name)
    return create(
        variant,
        num_classes=num_classes,
        include_top=include_top,
        pooling=pooling,
        input_shape=shape,
        output_stages=output_stages,
        name=name,
    )


def annotate_model(model, arch, pretrained_cfg):
    """Attach `timm_architecture` and timm's `pretrained_cfg` to `model`; returns it."""
    # plain attributes (not tracked by Keras), so they survive every backend
    object.__setattr__(model, "timm_architecture", arch)
    object.__setattr__(model, "pretrained_cfg", dict(pretrained_cfg))
    return model


def _head_plan(state_dict, include_top, num_classes, has_head_norm_layer):
    """(num_classes for the model, skip prefixes, notice or None)."""
    ckpt_classes = _classifier_size(state_dict)
    has_norm = any(k.startswith(HEAD_NORM_PREFIX) for k in state_dict)
    if not include_top:
        return None, ((HEAD_NORM_PREFIX, CLASSIFIER_PREFIX) if not has_head_norm_layer
                      else (CLASSIFIER_PREFIX,)), None  # fmt: skip
    classes = ckpt_classes if num_classes is None else int(num_classes)
    skip, notes = [], []
    if classes != ckpt_classes:
        skip.append(CLASSIFIER_PREFIX)
        if classes == 0:
            notes.append(f"the checkpoint's {ckpt_classes}-class classifier is dropped")
        elif ckpt_classes == 0:
            notes.append(f"the checkpoint has no classifier: a fresh {classes}-class one is made")
        else:
            notes.append(
                f"num_classes={classes} differs from the checkpoint's {ckpt_classes}: backbone "
                "and head norm ported, classifier freshly initialised"
            )
    if not has_norm:
        skip.append(HEAD_NORM_PREFIX)
        notes.append(
            "the checkpoint has no head norm (e.g. fcmae): head LayerNorm left at weight 1, "
            "bias 0, as timm does"
        )
    return classes, tuple(skip), "; ".join(notes) or None


def load_timm(
    source=DEFAULT_MODEL,
    *,
    arch: str | None = None,
    include_top: bool = True,
    num_classes: int | None = None,
    input_shape=None,
    pooling=None,
    output_stages=None,
    verbose: bool = True,
) -> keras.Model:
    """A ready Keras model from a timm checkpoint: Hub id, .safetensors file or folder.

    Args:
        source: "timm/NAME.TAG" or "hf-hub:timm/NAME.TAG" (downloaded once into
            the Hugging Face cache; HF_HUB_OFFLINE=1 uses the cache only), a
            local .safetensors file, or a folder with model.safetensors and
            timm's config.json.
        arch: timm architecture, overriding config.json / inference.
        include_top: keep the head. False ports everything but the head
            (pooling / output_stages as in `convnext_v1.create_convnext_v1`).
        num_classes: default the checkpoint's. Another value keeps the ported
            backbone and head norm and makes a fresh classifier (logged once);
            0 gives timm's pre-logits features (pool + head norm). A checkpoint
            without classifier (fcmae, dinov3) gives those by default.
        input_shape: default the pretrained_cfg input size, e.g. (224, 224, 3);
            (None, None, 3) accepts any size.
        verbose: progress bar while porting.

    The returned model has `pretrained_cfg` (timm's dict: input_size, crop_pct,
    interpolation, mean, std, num_classes, license, ...) and
    `timm_architecture` attributes.
    """
    state_dict, config = load_checkpoint(source, arch=arch)
    arch_name = config["architecture"]
    in_chans = int(np.shape(state_dict["stem.0.weight"])[1])
    classes, skip, note = _head_plan(state_dict, include_top, num_classes, False)
    if note:
        logger.warning("%s: %s.", arch_name, note)

    def build():
        return keras_model_for(
            config,
            include_top=include_top,
            num_classes=classes,
            input_shape=input_shape,
            pooling=pooling,
            output_stages=output_stages,
            in_chans=in_chans,
        )

    model = build_ported(build, state_dict, skip_prefixes=skip, progress=verbose)
    return annotate_model(model, arch_name, config["pretrained_cfg"])


def port_timm_weights(
    model: keras.Model,
    source,
    *,
    skip_prefixes: Iterable[str] | None = None,
    progress: bool = False,
) -> keras.Model:
    """Load a timm checkpoint (Hub id, file or folder) into a model you built, strictly.

    By default the head is matched to the model: a model without `head_norm` /
    `head_fc` layers skips those checkpoint tensors, everything else must fit
    exactly (see `port_state_dict`). Pass `skip_prefixes` to decide yourself.
    """
    state_dict, config = load_checkpoint(source)
    if skip_prefixes is None:
        layers = {layer.name for layer in model._flatten_layers(include_self=False)}
        skip_prefixes = tuple(
            prefix
            for prefix, layer in ((HEAD_NORM_PREFIX, "head_norm"), (CLASSIFIER_PREFIX, "head_fc"))
            if layer not in layers
        )
    port_state_dict(model, state_dict, skip_prefixes=skip_prefixes, progress=progress)
    if getattr(model, "pretrained_cfg", None) is None:
        annotate_model(model, config["architecture"], config["pretrained_cfg"])
    return model


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

OUTPUT_SUFFIXES = (".keras", ".weights.h5")


def sidecar_path(output) -> str:
    """'model.keras' / 'model.weights.h5' -> 'model.config.json' (architecture + pretrained_cfg)."""
    output = os.fspath(output)
    for suffix in OUTPUT_SUFFIXES:
        if output.endswith(suffix):
            return output[: -len(suffix)] + ".config.json"
    return output + ".config.json"


def save_converted(model: keras.Model, output, extra: dict | None = None) -> str:
    """Save to OUT.keras / OUT.weights.h5 plus the sidecar config, both atomically.

    The sidecar (`sidecar_path`) holds the architecture, num_classes, timm's
    pretrained_cfg and any `extra` entries; `load_converted` reads both back.
    """
    output = os.fspath(output)
    suffix = next((s for s in OUTPUT_SUFFIXES if output.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"Output must end in .keras or .weights.h5, got {output!r}.")
    with atomic_path(output, suffix) as tmp:
        if suffix == ".keras":
            model.save(tmp)
        else:
            model.save_weights(tmp)
    has_classifier = any(layer.name == "head_fc" for layer in model.layers)
    meta = {
        "architecture": getattr(model, "timm_architecture", None),
        "num_classes": int(model.output_shape[-1]) if has_classifier else 0,
        "pretrained_cfg": getattr(model, "pretrained_cfg", {}),
        **(extra or {}),
    }
    with atomic_path(sidecar_path(output)) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=2, default=_json_default)
    return output


def _json_default(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def load_converted(path) -> keras.Model:
    """A `.keras` file written by `save_converted`, with `pretrained_cfg` and
    `timm_architecture` restored from its sidecar (empty / None without one)."""
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"load_converted reads .keras files, got {path!r}.")
    model = keras.saving.load_model(path, compile=False)
    meta = {}
    if os.path.exists(sidecar_path(path)):
        with open(sidecar_path(path)) as f:
            meta = json.load(f)
    annotate_model(model, meta.get("architecture"), meta.get("pretrained_cfg") or {})
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_convert",
        description="Convert a timm ConvNeXt / ConvNeXt V2 safetensors checkpoint to Keras.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"Hub id, .safetensors file or folder (default {DEFAULT_MODEL})",
    )
    parser.add_argument("-o", "--output", required=True, help="OUT.keras or OUT.weights.h5")
    parser.add_argument("--arch", help="timm architecture, overriding config.json / inference")
    parser.add_argument("--num-classes", type=int, help="new classifier size (default: as saved)")
    parser.add_argument("--no-top", action="store_true", help="backbone only, no head")
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="input height and width (default: the checkpoint's)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    argv = None if argv is None else [os.fspath(a) for a in argv]
    args = parser.parse_args(argv)  # fmt: skip
    if not args.output.endswith(OUTPUT_SUFFIXES):
        parser.error(f"-o must end in .keras or .weights.h5, got {args.output!r}")
    start = time.perf_counter()
    try:
        model = load_timm(
            args.source,
            arch=args.arch,
            include_top=not args.no_top,
            num_classes=args.num_classes,
            input_shape=None if args.input_size is None else (*args.input_size, 3),
            verbose=not args.quiet,
        )
        converted = time.perf_counter() - start
        save_converted(model, args.output)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    saved = time.perf_counter() - start - converted
    print(
        f"{model.timm_architecture}: {model.count_params():,} parameters, converted in "
        f"{converted:.2f} s, saved in {saved:.2f} s -> {args.output} "
        f"(+ {sidecar_path(args.output)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
