"""What ConvNeXt V1 (`convnext_v1`) and V2 (`convnext_v2`) are made of.

- `config`: `ConvNeXtConfig`, one frozen dataclass describing any ConvNeXt timm's
  constructor builds (`timm_args`: how each of timm's arguments is held).
- `strides`: where a ConvNeXt downsamples (`StageLayout`: timm's strides and
  dilations) and the small-input stride rule (`plan_layout`, `plan_strides`).
- `layers`: the registered Keras layers (depthwise conv, downsampling conv,
  pointwise dense, norms, layer scale, stochastic depth, GRN, GeM pooling).
- `model`: `ConvNeXt`, the functional model class every variant, converted
  checkpoint and embedding model is an instance of; `plan`: the steps of its
  forward pass (`LayerPlan`); `loading`: building it straight from weight values.
- `dtypes`: the dtypes a `ConvNeXt` computes in (`ConvNeXt(dtype="bfloat16")`:
  the body in bfloat16, the head in float32).
- `presets`: keras-hub's preset layout (`ConvNeXt.save_to_preset`,
  `ConvNeXt.from_preset`, `upload_preset`).
- `fast_ops`: every private or backend-specific API the layers use, each with a
  portable fallback.

All tensors are channels-last: (batch, height, width, channels).
"""

from convnext_layers.config import STEMS, ConvNeXtConfig, make_divisible
from convnext_layers.errors import ConfigError, ModelArgumentError, PresetError
from convnext_layers.layers import (
    NORMS,
    POOLINGS,
    DepthwiseConv,
    DownsampleConv,
    GeneralizedMeanPooling,
    GlobalResponseNorm,
    LayerScale,
    PointwiseDense,
    SimpleNorm,
    StochasticDepth,
    exact_gelu,
    tanh_gelu,
)
from convnext_layers.model import POOLING_CHOICES, ConvNeXt, count_macs, load_saved_model
from convnext_layers.presets import upload_preset
from convnext_layers.strides import (
    MIN_FINAL_SIZE,
    STANDARD_STRIDES,
    StageLayout,
    final_feature_size,
    plan_layout,
    plan_strides,
)
from convnext_layers.timm_args import TIMM_ARGUMENTS

LAYER_NORM_EPSILON = 1e-6  # timm's default for every ConvNeXt norm (xxlarge: 1e-5)
Variant = ConvNeXtConfig  # the name the variant tables used before the config held everything

__all__ = [
    "LAYER_NORM_EPSILON",
    "MIN_FINAL_SIZE",
    "NORMS",
    "POOLINGS",
    "POOLING_CHOICES",
    "STANDARD_STRIDES",
    "STEMS",
    "ConfigError",
    "PresetError",
    "StageLayout",
    "TIMM_ARGUMENTS",
    "ConvNeXt",
    "ConvNeXtConfig",
    "DepthwiseConv",
    "DownsampleConv",
    "GeneralizedMeanPooling",
    "GlobalResponseNorm",
    "LayerScale",
    "ModelArgumentError",
    "PointwiseDense",
    "SimpleNorm",
    "StochasticDepth",
    "Variant",
    "count_macs",
    "create_variant",
    "exact_gelu",
    "final_feature_size",
    "load_saved_model",
    "make_divisible",
    "plan_layout",
    "plan_strides",
    "resolve_variant",
    "tanh_gelu",
    "upload_preset",
]


def resolve_variant(variant, table: dict, family: str) -> ConvNeXtConfig:
    """The table row of `variant` (case-insensitive), or a ValueError listing the valid ones."""
    if not isinstance(variant, str) or variant.lower() not in table:
        raise ModelArgumentError(
            f"Unknown {family} variant {variant!r}. Valid variants: {', '.join(table)}."
        )
    return table[variant.lower()]


def create_variant(table: dict, family: str, timm_prefix: str, variant: str, **kwargs) -> ConvNeXt:
    """A `ConvNeXt` of `table[variant]`, named and tagged with timm's architecture name."""
    config = resolve_variant(variant, table, family)
    overrides = {}
    if "layer_scale_init_value" in kwargs:
        overrides["layer_scale_init_value"] = kwargs.pop("layer_scale_init_value")
    if overrides:
        config = config.replace(**overrides)
    arch = f"{timm_prefix}{variant.lower()}"
    kwargs.setdefault("timm_architecture", arch)
    if kwargs.get("name") is None:
        kwargs["name"] = f"{family.lower().replace(' ', '_')}_{variant.lower()}"
    return ConvNeXt(config, **kwargs)
