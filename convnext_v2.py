"""ConvNeXt V2 ("ConvNeXt V2: Co-designing and Scaling ConvNets with Masked
Autoencoders", Woo et al. 2023) in Keras 3.

V2 is V1 with Global Response Normalization after each block's GELU and no layer
scale; both are rows of the same `ConvNeXtConfig` (see `convnext_layers`).

    from convnext_v2 import create_convnext_v2
    model = create_convnext_v2("atto")                                   # ImageNet head
    cifar = create_convnext_v2("tiny", num_classes=10, input_shape=(32, 32, 3))
"""

from __future__ import annotations

from convnext_layers import ConvNeXt, create_variant
from convnext_v1 import VARIANTS as V1_VARIANTS
from convnext_v1 import ConvNeXtConfig


def _v2(config: ConvNeXtConfig) -> ConvNeXtConfig:
    return config.replace(use_grn=True, layer_scale_init_value=None)


# timm's convnextv2_<key> model_args, one row each
VARIANTS = {
    **{size: _v2(V1_VARIANTS[size]) for size in ("atto", "femto", "pico", "nano")},
    **{size: _v2(V1_VARIANTS[size]) for size in ("tiny", "small", "base", "large")},
    "huge": _v2(ConvNeXtConfig(depths=(3, 3, 27, 3), widths=(352, 704, 1408, 2816))),
}
SIZES = tuple(VARIANTS)


def create_convnext_v2(
    variant: str = "tiny",
    num_classes: int = 1000,
    input_shape=None,
    include_top: bool = True,
    pooling=None,
    drop_path_rate: float = 0.0,
    classifier_activation=None,
    input_tensor=None,
    name: str | None = None,
    output_stages=None,
    **kwargs,
) -> ConvNeXt:
    """Build a ConvNeXt V2 `ConvNeXt` model (a functional `keras.Model`).

    Same arguments and small-input stride rule as
    `convnext_v1.create_convnext_v1`, without `layer_scale_init_value`;
    `variant` is one of atto, femto, pico, nano, tiny, small, base, large, huge.
    """
    return create_variant(
        VARIANTS,
        "ConvNeXt V2",
        "convnextv2_",
        variant,
        num_classes=num_classes,
        input_shape=input_shape,
        include_top=include_top,
        pooling=pooling,
        drop_path_rate=drop_path_rate,
        classifier_activation=classifier_activation,
        input_tensor=input_tensor,
        name=name,
        output_stages=output_stages,
        **kwargs,
    )
