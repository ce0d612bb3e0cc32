"""ConvNeXt V2 ("ConvNeXt V2: Co-designing and Scaling ConvNets with Masked
Autoencoders", Woo et al. 2023) in Keras 3.

V2 is V1 with Global Response Normalization after each block's GELU and no layer
scale; the blocks are shared with `convnext_v1` (see `convnext_layers`).

    from convnext_v2 import create_convnext_v2
    model = create_convnext_v2("atto")                                   # ImageNet head
    cifar = create_convnext_v2("tiny", num_classes=10, input_shape=(32, 32, 3))
"""

from __future__ import annotations

from convnext_layers import Variant, build_convnext, resolve_variant

VARIANTS = {
    "atto": Variant(depths=(2, 2, 6, 2), widths=(40, 80, 160, 320)),
    "femto": Variant(depths=(2, 2, 6, 2), widths=(48, 96, 192, 384)),
    "pico": Variant(depths=(2, 2, 6, 2), widths=(64, 128, 256, 512)),
    "nano": Variant(depths=(2, 2, 8, 2), widths=(80, 160, 320, 640)),
    "tiny": Variant(depths=(3, 3, 9, 3), widths=(96, 192, 384, 768)),
    "small": Variant(depths=(3, 3, 27, 3), widths=(96, 192, 384, 768)),
    "base": Variant(depths=(3, 3, 27, 3), widths=(128, 256, 512, 1024)),
    "large": Variant(depths=(3, 3, 27, 3), widths=(192, 384, 768, 1536)),
    "huge": Variant(depths=(3, 3, 27, 3), widths=(352, 704, 1408, 2816)),
}


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
):
    """Build a ConvNeXt V2 `keras.Model`.

    Same arguments and small-input stride rule as
    `convnext_v1.create_convnext_v1`, without `layer_scale_init_value`;
    `variant` is one of atto, femto, pico, nano, tiny, small, base, large, huge.
    """
    config = resolve_variant(variant, VARIANTS, "ConvNeXt V2")
    return build_convnext(
        config,
        use_grn=True,
        layer_scale_init_value=None,
        num_classes=num_classes,
        input_shape=input_shape,
        include_top=include_top,
        pooling=pooling,
        drop_path_rate=drop_path_rate,
        classifier_activation=classifier_activation,
        input_tensor=input_tensor,
        output_stages=output_stages,
        name=name or f"convnext_v2_{variant.lower()}",
    )
