"""Port timm ConvNeXt / ConvNeXt V2 checkpoints into the Keras models, and back.

The mapping is data: `LAYER_RULES` turns a Keras layer name into a timm module
path, `WEIGHT_RULES` turns a (layer kind, Keras variable name) into a timm
parameter name plus one of four tensor transforms (identity, conv, depthwise,
dense). Nothing else is special-cased.
"""

from __future__ import annotations

import re

import keras
import numpy as np

from convnext_layers import DepthwiseConv, GlobalResponseNorm, LayerScale

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


def port_state_dict(model: keras.Model, state_dict: dict) -> keras.Model:
    """Copy a timm state dict (name -> array) into `model`, strictly.

    Every mapped Keras weight must find a tensor of the right shape and every
    tensor must be used, or a ValueError lists what is missing, unexpected and
    mis-shaped; nothing is assigned unless everything matches.
    """
    assignments, missing, mismatched = [], [], []
    used = set()
    for variable, key, transform in weight_map(model):
        if key not in state_dict:
            missing.append(key)
            continue
        value = TRANSFORMS[transform][0](np.asarray(state_dict[key]))
        if tuple(value.shape) != tuple(variable.shape):
            mismatched.append((key, tuple(variable.shape), tuple(value.shape)))
            continue
        assignments.append((variable, value))
        used.add(key)
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected or mismatched:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        for key, expected, found in mismatched:
            lines.append(f"shape mismatch {key}: expected {expected}, found {found}")
        raise ValueError("Checkpoint does not fit the model:\n  " + "\n  ".join(lines))
    for variable, value in assignments:
        variable.assign(value.astype(variable.dtype))
    return model


def export_state_dict(model: keras.Model) -> dict[str, np.ndarray]:
    """The model's weights as a timm state dict (name -> numpy array)."""
    return {
        key: np.ascontiguousarray(TRANSFORMS[transform][1](keras.ops.convert_to_numpy(variable)))
        for variable, key, transform in weight_map(model)
    }
