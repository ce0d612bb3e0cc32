"""ConvNeXt V1 ("A ConvNet for the 2020s", Liu et al. 2022) in Keras 3.

    from convnext_v1 import create_convnext_v1
    model = create_convnext_v1("tiny")                      # (None, 224, 224, 3) -> (None, 1000)
    feats = create_convnext_v1("large", include_top=False,
                               input_shape=(256, 256, 3))   # -> (None, 8, 8, 1536)

Runs unchanged on the JAX, TensorFlow and PyTorch backends. Depths and widths
are timm's `convnext_<variant>`; with `num_classes=1000` the parameter count of
every variant equals timm's.
"""

from __future__ import annotations

from convnext_layers import SHARED_VARIANTS, Variant, build_convnext, resolve_variant

VARIANTS = {
    **SHARED_VARIANTS,
    "xlarge": Variant(depths=(3, 3, 27, 3), widths=(256, 512, 1024, 2048)),
}


def create_convnext_v1(
    variant: str = "tiny",
    num_classes: int = 1000,
    input_shape=None,
    include_top: bool = True,
    pooling=None,
    drop_path_rate: float = 0.0,
    layer_scale_init_value: float | None = 1e-6,
    classifier_activation=None,
    input_tensor=None,
    name: str | None = None,
    output_stages=None,
):
    """Build a ConvNeXt V1 `keras.Model`.

    Args:
        variant: one of `VARIANTS` (atto, femto, pico, nano, tiny, small, base,
            large, xlarge).
        num_classes: classifier outputs when `include_top`.
        input_shape: (height, width, channels), default (224, 224, 3). Sides may
            be None (any size at call time, standard strides). Inputs with a
            side under 64 get lowered strides so the last stage stays at least
            2x2: the stem's stride drops 4 -> 2 -> 1 first, then the
            downsampling layers' (stage 3, 2, 1) from 2 to 1. Only strides and
            padding change, never a weight shape, so ImageNet weights load into
            a 32x32 CIFAR model. 64 and up (224, 256, ...) use the standard
            total stride 32; sides need not be multiples of 32.
        include_top: add the head (global average pool, LayerNorm, Dense).
        pooling: with `include_top=False`: None gives the last feature map
            (B, H/32, W/32, C); "avg" or "max" give (B, C).
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        layer_scale_init_value: initial value of the per-block layer scale, or
            None for no layer scale.
        classifier_activation: activation of the classifier (None: logits).
        input_tensor: optional tensor to use as the model input.
        name: model name, default "convnext_v1_<variant>".
        output_stages: with `include_top=False`, a tuple of stage indices
            (0..3); the model then returns those stages' feature maps, a list
            (strides 4, 8, 16, 32 for a standard input), like timm's
            `features_only`.

    Input: (B, H, W, C) float images, normalised as the weights expect (timm's
    ImageNet checkpoints: RGB scaled to [0, 1], then mean/std normalised).
    """
    config = resolve_variant(variant, VARIANTS, "ConvNeXt V1")
    return build_convnext(
        config,
        use_grn=False,
        layer_scale_init_value=layer_scale_init_value,
        num_classes=num_classes,
        input_shape=input_shape,
        include_top=include_top,
        pooling=pooling,
        drop_path_rate=drop_path_rate,
        classifier_activation=classifier_activation,
        input_tensor=input_tensor,
        output_stages=output_stages,
        name=name or f"convnext_v1_{variant.lower()}",
    )
