"""The mapping between Keras weights and timm tensors, and the strict port.

The mapping is data: `LAYER_RULES` turns a Keras layer name into a timm module
path, `WEIGHT_RULES` turns a (layer kind, Keras variable name) into a timm
parameter name plus one of four tensor transforms (identity, conv, depthwise,
dense). `head_plan` is the one place that decides which head tensors a model
takes. Nothing else is special-cased.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Callable, Iterable

import keras
import numpy as np
from tqdm.auto import tqdm

from convnext_layers import (
    ConvNeXt,
    DepthwiseConv,
    GlobalResponseNorm,
    LayerScale,
    SimpleNorm,
    fast_ops,
)
from weights_convert.checkpoint import classifier_size
from weights_convert.errors import CheckpointMismatchError

logger = logging.getLogger("weights_convert")

# Keras layer name -> timm module path (regex, template).
LAYER_RULES = (
    (r"stem_conv", "stem.0"),
    (r"stem_norm", "stem.1"),
    (r"stem_(\d)_(conv|norm)", r"stem.\1"),  # overlapping stems: timm's Sequential index
    (r"stage(\d+)_downsample_norm", r"stages.\1.downsample.0"),
    (r"stage(\d+)_downsample_conv", r"stages.\1.downsample.1"),
    (r"stage(\d+)_block(\d+)_dwconv", r"stages.\1.blocks.\2.conv_dw"),
    (r"stage(\d+)_block(\d+)_norm", r"stages.\1.blocks.\2.norm"),
    (r"stage(\d+)_block(\d+)_pwconv1", r"stages.\1.blocks.\2.mlp.fc1"),
    (r"stage(\d+)_block(\d+)_grn", r"stages.\1.blocks.\2.mlp.grn"),
    (r"stage(\d+)_block(\d+)_pwconv2", r"stages.\1.blocks.\2.mlp.fc2"),
    (r"stage(\d+)_block(\d+)_layer_scale", r"stages.\1.blocks.\2"),
    (r"norm_pre", "norm_pre"),
    (r"head_norm", "head.norm"),
    (r"head_pre_logits", "head.pre_logits.fc"),
    (r"head_fc", "head.fc"),
)


# Tensor transforms: timm (PyTorch layout) <-> Keras layout, as (to_keras, to_timm).
def _dense_to_keras(w):
    # timm's conv-MLP variants (atto..nano) store fc1/fc2 as 1x1 convs (O, I, 1, 1)
    if w.ndim == 4 and w.shape[2:] != (1, 1):
        raise ValueError(f"not a 1x1 conv: {w.shape}")
    if w.ndim not in (2, 4):
        raise ValueError(f"not a dense weight: {w.shape}")
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
    (keras.layers.RMSNormalization, "scale"): ("weight", "identity"),
    (SimpleNorm, "weight"): ("weight", "identity"),
    (LayerScale, "gamma"): ("gamma", "identity"),
    (GlobalResponseNorm, "weight"): ("weight", "identity"),
    (keras.layers.Layer, "bias"): ("bias", "identity"),
}

# timm's head tensors, by module
NORM_PRE_PREFIX = "norm_pre."
HEAD_NORM_PREFIX = "head.norm."
PRE_LOGITS_PREFIX = "head.pre_logits.fc."
CLASSIFIER_PREFIX = "head.fc."


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
    for layer in fast_ops.flatten_layers(model):
        module = timm_module_path(layer.name)
        if module is None:
            continue
        for variable in layer.weights:
            variable_name = variable.path.split("/")[-1]
            timm_name, transform = _weight_rule(layer, variable_name)
            yield variable, f"{module}.{timm_name}", transform


# ----------------------------------------------------------------------------
# Which head tensors a model takes
# ----------------------------------------------------------------------------


def head_plan(model: keras.Model, state_dict) -> tuple[tuple[str, ...], list[str]]:
    """(checkpoint prefixes to leave out on both sides, notices for the user).

    - Tensors of head layers the model does not have (no head, no head norm,
      no classifier) are left out. A `norm_pre` or pre-logits layer the model
      should have is never left out: a mismatch there is an error.
    - A classifier of another size than the checkpoint's, or a checkpoint with no
      classifier: the model's classifier keeps its fresh initialisation.
    - A checkpoint with no head norm (fcmae): the model's head norm keeps its
      initialisation (weight 1, bias 0), as timm does.
    """
    layers = {layer.name for layer in fast_ops.flatten_layers(model)}
    in_ckpt = lambda prefix: any(k.startswith(prefix) for k in state_dict)  # noqa: E731
    skip, notes = [], []
    features_only = getattr(model, "output_stages", None) is not None
    if features_only and "norm_pre" not in layers:
        skip.append(NORM_PRE_PREFIX)
    if not {"head_pre_logits", "head_norm", "head_fc"} & layers:
        skip.append(PRE_LOGITS_PREFIX)  # a backbone (or a pooled backbone) without head
    if "head_norm" not in layers:
        skip.append(HEAD_NORM_PREFIX)
    elif not in_ckpt(HEAD_NORM_PREFIX):
        skip.append(HEAD_NORM_PREFIX)
        notes.append(
            "the checkpoint has no head norm (e.g. fcmae): head norm left at weight 1, bias 0, "
            "as timm does"
        )
    ckpt_classes = classifier_size(state_dict)
    if "head_fc" not in layers:  # features / pre-logits asked for: the classifier goes
        skip.append(CLASSIFIER_PREFIX)
    else:
        classes = int(model.get_layer("head_fc").units)
        if ckpt_classes == 0:
            skip.append(CLASSIFIER_PREFIX)
            notes.append(f"the checkpoint has no classifier: a fresh {classes}-class one is made")
        elif classes != ckpt_classes:
            skip.append(CLASSIFIER_PREFIX)
            notes.append(
                f"num_classes={classes} differs from the checkpoint's {ckpt_classes}: backbone "
                "and head norm ported, classifier freshly initialised"
            )
    return tuple(dict.fromkeys(skip)), notes


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
            import ml_dtypes  # optional (it comes with jax and tensorflow)

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
    return tqdm(total=total, desc=desc, unit="tensor", leave=False, file=sys.stderr)


def _resolve_skip(model, state_dict, skip_prefixes):
    if skip_prefixes != "auto":
        return tuple(skip_prefixes or ())
    skip, notes = head_plan(model, state_dict)
    if notes:
        logger.warning("%s: %s.", model.name, "; ".join(notes))
    return skip


def port_state_dict(
    model: keras.Model,
    state_dict: dict,
    *,
    skip_prefixes: Iterable[str] | str = "auto",
    progress: bool = False,
) -> keras.Model:
    """Copy a timm state dict (name -> array) into a built `model`, strictly.

    Every mapped Keras weight must find a tensor of the right shape and every
    tensor must be used, or a `CheckpointMismatchError` (a ValueError) lists
    what is missing, unexpected and mis-shaped; nothing is assigned unless
    everything matches. fp16 / bf16 / fp64 tensors are cast to each weight's
    dtype. `skip_prefixes` (e.g. ("head.fc.",)) leaves those keys out on both
    sides; the default "auto" asks `head_plan`.
    """
    plan = plan_port(
        model, state_dict, skip_prefixes=_resolve_skip(model, state_dict, skip_prefixes)
    )
    with _progress_bar(len(plan), progress, "porting") as bar:
        for variable, key, transform in plan:
            variable.assign(_to_keras_value(state_dict[key], transform, variable.dtype))
            if bar is not None:
                bar.update()
    return model


def build_ported(
    build: Callable[[], keras.Model],
    state_dict: dict,
    *,
    skip_prefixes: Iterable[str] | str = "auto",
    progress: bool = False,
) -> keras.Model:
    """`build()` a model and load `state_dict` into it, strictly (see `port_state_dict`).

    Same result as `port_state_dict(build(), state_dict)`, but faster: the
    model is built inside a `keras.StatelessScope`, so its variables are
    created uninitialised and then initialised straight from the checkpoint
    (no random initialisation first, which on JAX compiles one kernel per weight
    shape). Weights that are skipped get their normal initialisers.
    Nothing is returned on a mismatch.
    """
    with _progress_bar(None, progress, "porting") as bar:

        def initial_values(model):
            skip = _resolve_skip(model, state_dict, skip_prefixes)
            plan = plan_port(model, state_dict, skip_prefixes=skip)
            if bar is not None:
                bar.reset(total=len(plan))
            sources = {id(variable): (key, transform) for variable, key, transform in plan}

            def value_of(variable):
                if id(variable) not in sources:
                    return None  # skipped: its own initializer
                key, transform = sources[id(variable)]

                def initialize(shape, dtype=None):
                    value = _to_keras_value(state_dict[key], transform, dtype)
                    if bar is not None:
                        bar.update()
                    return value

                return initialize

            return value_of

        return fast_ops.build_with_initial_values(build, initial_values)


def export_state_dict(model: keras.Model, *, conv_mlp: bool = False) -> dict[str, np.ndarray]:
    """The model's weights as a timm state dict (name -> float32 numpy array, C order).

    `conv_mlp` writes the block MLP as 1x1 convs (O, I, 1, 1), as timm's
    conv-MLP architectures (atto..nano, zepto, tiny_hnf) hold it.
    """
    state = {}
    for variable, key, transform in weight_map(model):
        value = TRANSFORMS[transform][1](keras.ops.convert_to_numpy(variable))
        if conv_mlp and transform == "dense" and ".mlp.fc" in key:
            value = value.reshape(value.shape + (1, 1))
        state[key] = np.ascontiguousarray(value)
    return state


def is_convnext(model) -> bool:
    return isinstance(model, ConvNeXt)
