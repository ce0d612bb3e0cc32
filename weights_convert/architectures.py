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


TENSOR_ARGS = ("in_chans", "patch_size", "ls_init_value")


def architecture_config(
    arch, model_args=None, state_dict=None, from_tensors=TENSOR_ARGS
) -> ConvNeXtConfig:
    """The config of `arch` with timm `model_args` (config.json) applied over it, and
    then what `state_dict`'s tensors show that model_args leave unsaid (`tensor_args`,
    for the arguments `from_tensors` names).

    A None value has two meanings in timm: `ConvNeXt(ls_init_value=None)` has no layer
    scale, but `timm.create_model(..., ls_init_value=None)` drops the argument (the
    architecture's default, 1e-6), and `save_for_hf` still records it as None. Where
    the two readings build different networks, the one the tensors fit is taken.
    """
    base = check_architecture(arch)
    model_args = dict(model_args or {})
    readings = [model_args]
    if any(value is None for value in model_args.values()):
        readings.append({k: v for k, v in model_args.items() if v is not None})
    configs, errors = [], []
    for reading in readings:
        try:
            config = ConvNeXtConfig.from_timm_args(reading, base)
        except ConfigError as error:
            errors.append(error)
            continue
        if state_dict is not None:
            unsaid = [name for name in TENSOR_ARGS if name not in from_tensors]
            config = config.replace(**tensor_args(state_dict, config, [*reading, *unsaid]))
        configs.append(config)
    if not configs:
        raise UnsupportedArchitectureError(
            f"config.json builds {canonical_architecture(arch)} with {errors[0]}"
        ) from None
    if state_dict is not None and len(configs) > 1:
        return next((c for c in configs if _fits(c, state_dict)), configs[0])
    return configs[0]


def tensor_args(state_dict, config: ConvNeXtConfig, model_args=()) -> dict:
    """Config changes the tensors show beyond `model_args`: input channels, the patch
    stem's size (its kernel is its stride) and whether blocks have a layer scale."""
    stem = state_dict.get("stem.0.weight")
    if stem is None or np.ndim(stem) != 4:
        return {}  # not a ConvNeXt: the strict port says what is wrong
    changes = {}
    in_chans, kernel = int(np.shape(stem)[1]), int(np.shape(stem)[2])
    if "in_chans" not in model_args and in_chans != config.in_chans:
        changes["in_chans"] = in_chans
    if config.stem == "patch" and "patch_size" not in model_args and kernel != config.patch_size:
        changes["patch_size"] = kernel
    scaled = any(_LAYER_SCALE.fullmatch(key) for key in state_dict)
    if "ls_init_value" not in model_args and scaled != (config.layer_scale_init_value is not None):
        changes["layer_scale_init_value"] = 1e-6 if scaled else None
    return changes


_LAYER_SCALE = re.compile(r"stages\.\d+\.blocks\.\d+\.gamma")


def _fits(config: ConvNeXtConfig, state_dict) -> bool:
    try:
        return _signature_of_config(config, full=True) == _signature_of_state(state_dict)
    except (CheckpointError, UnsupportedArchitectureError):
        return False


def is_conv_mlp(arch) -> bool:
    """Whether timm stores this architecture's block MLP as 1x1 convs (O, I, 1, 1)."""
    return check_architecture(arch).conv_mlp


# ----------------------------------------------------------------------------
# Inference from tensors
# ----------------------------------------------------------------------------


# shown by the tensors, but not part of what names an architecture (`tensor_args`)
_ARGUMENT_KEYS = ("in_chans", "layer_scale")


def _signature_of_config(config: ConvNeXtConfig, full: bool = False) -> dict:
    """What a checkpoint's tensors show of an architecture (not the norm kind beyond
    bias / no bias, not epsilons, activations or output_stride). Without `full`, the
    patch size, input channels and layer scale are left out (`tensor_args` reads them)."""
    signature = {
        "depths": config.depths,
        "widths": config.widths,
        # a stage without blocks shows no depthwise kernel
        "kernel_sizes": tuple(
            k if d else 0 for k, d in zip(config.kernel_sizes, config.depths, strict=True)
        ),
        "stem": config.stem if config.stem != "overlap_tiered" else "overlap",
        "stem_width": config.stem_mid_width if config.stem != "patch" else config.patch_size,
        "in_chans": config.in_chans,
        "norm_bias": config.norm == "layernorm",
        "grn": config.use_grn,
        "layer_scale": config.layer_scale_init_value is not None,
        "conv_mlp": config.conv_mlp,
        "norm_pre": config.head_norm_first,
        "head_hidden": config.head_hidden_size,
        "mlp_hidden": int(config.mlp_ratio * config.widths[0]),
    }
    return signature if full else _architecture_part(signature)


def _architecture_part(signature: dict) -> dict:
    part = {k: v for k, v in signature.items() if k not in _ARGUMENT_KEYS}
    if part["stem"] == "patch":
        part["stem_width"] = None  # the patch size: a model argument (face models: 2)
    return part


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
    if not any(depths):
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
        if depths[stage] == 0:  # a stage of no blocks: its downsampling tells the width
            key = f"stages.{stage}.downsample.1.weight"
            return (shape(key)[0], 1, 0, 0) if key in keys else (0, 1, 0, 0)
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
        "in_chans": stem_0[1],
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
    without bias, GRN, conv-MLP layout, norm_pre, head MLP) with every row of
    `ARCHITECTURES`; anything but one match is a clear error. Input channels, the
    patch size and layer scale are model arguments (`tensor_args`).
    """
    found = _architecture_part(_signature_of_state(state_dict))
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
