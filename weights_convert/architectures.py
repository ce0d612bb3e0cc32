"""timm's ConvNeXt architectures as `ConvNeXtConfig` rows, and how a checkpoint's
architecture is found: by name (config.json, a Hub id, `arch=`) or from its tensors.

`ARCHITECTURES` is derived from the variant tables of `convnext_v1` and
`convnext_v2` (one row per timm `convnext_*` / `convnext_v2_*` architecture) plus
timm's three small test models; adding an architecture is a row there.
"""

from __future__ import annotations

import re

import numpy as np

from convnext_layers.config import ConfigError, ConvNeXtConfig
from convnext_v1 import VARIANTS as V1_VARIANTS
from convnext_v2 import VARIANTS as V2_VARIANTS
from weights_convert.errors import CheckpointError, UnsupportedArchitectureError

_TEST_MODEL = ConvNeXtConfig(
    depths=(1, 2, 4, 2), widths=(24, 32, 48, 64), norm_eps=1e-5, activation="gelu_tanh"
)
# timm architecture name -> the network it builds
ARCHITECTURES: dict[str, ConvNeXtConfig] = {
    **{f"convnext_{name}": config for name, config in V1_VARIANTS.items()},
    **{f"convnextv2_{name}": config for name, config in V2_VARIANTS.items()},
    # timm's untrained test models (tiny, for timm's own test suite)
    "test_convnext": _TEST_MODEL,
    "test_convnext2": _TEST_MODEL.replace(depths=(1, 1, 1, 1), widths=(32, 64, 96, 128)),
    "test_convnext3": _TEST_MODEL.replace(
        depths=(1, 1, 1, 1), widths=(32, 64, 96, 128), kernel_sizes=(7, 5, 5, 3), activation="silu"
    ),
}


def canonical_architecture(name) -> str:
    """timm architecture of a name: 'timm/convnext_atto.d2_in1k' -> 'convnext_atto'."""
    name = str(name).strip()
    for prefix in ("hf-hub:", "hf_hub:", "timm:"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    name = name.rsplit("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(".", 1)[0].lower()


def check_architecture(arch) -> ConvNeXtConfig:
    """The `ConvNeXtConfig` of a timm architecture name, or a clear error."""
    if not isinstance(arch, str) or not arch.strip():
        raise UnsupportedArchitectureError(
            f"A timm architecture name is a non-empty string, got {arch!r}."
        )
    name = canonical_architecture(arch)
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    raise UnsupportedArchitectureError(
        f"Unknown timm ConvNeXt architecture {arch!r}. Supported: {', '.join(ARCHITECTURES)}."
    )


def architecture_config(arch, model_args=None) -> ConvNeXtConfig:
    """The config of `arch` with timm `model_args` (config.json) applied over it."""
    base = check_architecture(arch)
    if not model_args:
        return base
    try:
        return ConvNeXtConfig.from_timm_args(model_args, base)
    except ConfigError as error:
        raise UnsupportedArchitectureError(
            f"config.json builds {canonical_architecture(arch)} with {error}"
        ) from None


def is_conv_mlp(arch) -> bool:
    """Whether timm stores this architecture's block MLP as 1x1 convs (O, I, 1, 1)."""
    return check_architecture(arch).conv_mlp


# ----------------------------------------------------------------------------
# Inference from tensors
# ----------------------------------------------------------------------------


def _signature_of_config(config: ConvNeXtConfig) -> dict:
    """What a checkpoint's tensors show of an architecture (not the norm kind beyond
    bias / no bias, not epsilons or activations)."""
    return {
        "depths": config.depths,
        "widths": config.widths,
        "kernel_sizes": config.kernel_sizes,
        "stem": config.stem if config.stem != "overlap_tiered" else "overlap",
        "stem_width": config.stem_mid_width if config.stem != "patch" else config.patch_size,
        "norm_bias": config.norm == "layernorm",
        "grn": config.use_grn,
        "layer_scale": config.layer_scale_init_value is not None,
        "conv_mlp": config.conv_mlp,
        "norm_pre": config.head_norm_first,
        "head_hidden": config.head_hidden_size,
        "mlp_hidden": int(config.mlp_ratio * config.widths[0]),
    }


def _signature_of_state(state_dict) -> dict:
    keys = set(state_dict)

    def shape(key):
        return tuple(np.shape(state_dict[key]))

    if "stem.0.weight" not in keys or not any(k.startswith("stages.") for k in keys):
        raise CheckpointError(
            "Not a timm ConvNeXt state dict: no stem.0.weight / stages.* tensors "
            f"(first keys: {', '.join(sorted(keys)[:5]) or 'none'})."
        )
    depths = [0, 0, 0, 0]
    for key in keys:
        match = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            stage, block = int(match[1]), int(match[2])
            if stage > 3:
                raise UnsupportedArchitectureError(
                    f"The checkpoint has a fifth stage ({key}); ConvNeXt has four."
                )
            depths[stage] = max(depths[stage], block + 1)
    if 0 in depths:
        raise CheckpointError(f"Not a 4-stage ConvNeXt state dict (blocks per stage {depths}).")
    convs = [
        i for i in range(4) if f"stem.{i}.weight" in keys and len(shape(f"stem.{i}.weight")) == 4
    ]
    stem_0 = shape("stem.0.weight")
    if len(stem_0) != 4:
        raise CheckpointError(f"stem.0.weight must be a 4-D conv kernel, found shape {stem_0}.")
    if convs == [0]:
        stem, stem_width, norm_index = "patch", stem_0[2], 1
    elif convs == [0, 1]:
        stem, stem_width, norm_index = "overlap", stem_0[0], 2
    elif convs == [0, 2]:
        stem, stem_width, norm_index = "overlap_act", stem_0[0], 3
    else:
        raise UnsupportedArchitectureError(f"Unknown stem layout: convs at stem.{convs}.")

    def conv_dw(stage):
        key = f"stages.{stage}.blocks.0.conv_dw.weight"
        if key not in keys or len(shape(key)) != 4:
            raise CheckpointError(f"Missing or malformed {key} (a 4-D depthwise kernel).")
        return shape(key)

    fc1 = "stages.0.blocks.0.mlp.fc1.weight"
    if fc1 not in keys or len(shape(fc1)) not in (2, 4):
        raise CheckpointError(f"Missing or malformed {fc1} (a 2-D or 1x1-conv weight).")
    head_hidden = "head.pre_logits.fc.weight"
    return {
        "depths": tuple(depths),
        "widths": tuple(conv_dw(s)[0] for s in range(4)),
        "kernel_sizes": tuple(conv_dw(s)[2] for s in range(4)),
        "stem": stem,
        "stem_width": stem_width,
        "norm_bias": f"stem.{norm_index}.bias" in keys,
        "grn": any(".mlp.grn." in k for k in keys),
        "layer_scale": "stages.0.blocks.0.gamma" in keys,
        "conv_mlp": len(shape(fc1)) == 4,
        "norm_pre": "norm_pre.weight" in keys,
        "head_hidden": shape(head_hidden)[0] if head_hidden in keys else None,
        "mlp_hidden": shape(fc1)[0],
    }


def infer_architecture(state_dict) -> str:
    """timm architecture name of a ConvNeXt state dict, from its tensor names and shapes.

    Compares what the tensors show (depths, widths, kernels, stem, norms with or
    without bias, GRN, layer scale, conv-MLP layout, norm_pre, head MLP) with
    every row of `ARCHITECTURES`; anything but one match is a clear error.
    """
    found = _signature_of_state(state_dict)
    matches = [
        name for name, config in ARCHITECTURES.items() if _signature_of_config(config) == found
    ]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UnsupportedArchitectureError(
            f"The tensors fit several timm architectures ({', '.join(matches)}); pass arch= "
            "(or --arch) to say which."
        )

    def differences(name):
        expected = _signature_of_config(ARCHITECTURES[name])
        return [k for k in found if found[k] != expected[k]]

    same_size = [
        name
        for name, config in ARCHITECTURES.items()
        if (config.depths, config.widths) == (found["depths"], found["widths"])
    ]
    detail = ""
    if same_size:
        nearest = min(same_size, key=lambda name: len(differences(name)))
        expected = _signature_of_config(ARCHITECTURES[nearest])
        detail = f"; it differs from {nearest} in " + ", ".join(
            f"{k} ({found[k]!r}, {nearest} has {expected[k]!r})" for k in differences(nearest)
        )
    raise UnsupportedArchitectureError(
        f"No timm ConvNeXt architecture has this layout (depths {list(found['depths'])}, "
        f"widths {list(found['widths'])}, {found['stem']} stem){detail}. "
        f"Supported: {', '.join(ARCHITECTURES)}."
    )
