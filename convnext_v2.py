"""ConvNeXt V2 ("ConvNeXt V2: Co-designing and Scaling ConvNets with Masked
Autoencoders", Woo et al. 2023) in Keras 3.

V2 is V1 with Global Response Normalization after each block's GELU and no layer
scale; the blocks are shared with `convnext_v1` (see `convnext_layers`).

    from convnext_v2 import create_convnext_v2
    model = create_convnext_v2("atto")                                   # ImageNet head
    cifar = create_convnext_v2("tiny", num_classes=10, input_shape=(32, 32, 3))
"""

from __future__ import annotations

from convnext_layers import SHARED_VARIANTS, Variant, build_convnext, resolve_variant

VARIANTS = {
    **SHARED_VARIANTS,
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
