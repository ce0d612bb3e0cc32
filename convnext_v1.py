"""ConvNeXt V1 ("A ConvNet for the 2020s", Liu et al. 2022) in Keras 3.

    from convnext_v1 import create_convnext_v1
    model = create_convnext_v1("tiny")                      # (None, None, None, 3) -> (None, 1000)
    feats = create_convnext_v1("large", include_top=False,
                               input_shape=(256, 256, 3))   # -> (None, 8, 8, 1536)

Runs unchanged on the JAX, TensorFlow and PyTorch backends. `VARIANTS` holds one
row per timm `convnext_<variant>` architecture (the sizes atto..xxlarge and timm's
own variants: overlapping stems `_ols`, RMS / simple norms `_rms`, `tiny_hnf`,
`large_mlp`); with `num_classes=1000` the parameter count of every variant equals
timm's.
"""

from __future__ import annotations

from convnext_layers import ConvNeXt, ConvNeXtConfig, create_variant

_ATTO = ConvNeXtConfig(depths=(2, 2, 6, 2), widths=(40, 80, 160, 320), conv_mlp=True)
_FEMTO = ConvNeXtConfig(depths=(2, 2, 6, 2), widths=(48, 96, 192, 384), conv_mlp=True)
_PICO = ConvNeXtConfig(depths=(2, 2, 6, 2), widths=(64, 128, 256, 512), conv_mlp=True)
_NANO = ConvNeXtConfig(depths=(2, 2, 8, 2), widths=(80, 160, 320, 640), conv_mlp=True)
_TINY = ConvNeXtConfig(depths=(3, 3, 9, 3), widths=(96, 192, 384, 768))
_LARGE = ConvNeXtConfig(depths=(3, 3, 27, 3), widths=(192, 384, 768, 1536))
_ZEPTO_RMS = ConvNeXtConfig(
    depths=(2, 2, 4, 2), widths=(32, 64, 128, 256), conv_mlp=True, norm="simplenorm"
)

# timm's convnext_<key> model_args, one row each
VARIANTS = {
    "zepto_rms": _ZEPTO_RMS,
    "zepto_rms_ols": _ZEPTO_RMS.replace(stem="overlap_act"),
    "atto": _ATTO,
    "atto_ols": _ATTO.replace(stem="overlap_tiered"),
    "atto_rms": _ATTO.replace(norm="rmsnorm"),
    "femto": _FEMTO,
    "femto_ols": _FEMTO.replace(stem="overlap_tiered"),
    "pico": _PICO,
    "pico_ols": _PICO.replace(stem="overlap_tiered"),
    "nano": _NANO,
    "nano_ols": _NANO.replace(stem="overlap"),
    "tiny_hnf": _TINY.replace(head_norm_first=True, conv_mlp=True),
    "tiny": _TINY,
    "small": _TINY.replace(depths=(3, 3, 27, 3)),
    "base": ConvNeXtConfig(depths=(3, 3, 27, 3), widths=(128, 256, 512, 1024)),
    "large": _LARGE,
    "large_mlp": _LARGE.replace(head_hidden_size=1536),
    "xlarge": ConvNeXtConfig(depths=(3, 3, 27, 3), widths=(256, 512, 1024, 2048)),
    "xxlarge": ConvNeXtConfig(depths=(3, 4, 30, 3), widths=(384, 768, 1536, 3072), norm_eps=1e-5),
}
# the plain sizes (patch stem, LayerNorm), smallest first: what the README's variant table lists
SIZES = ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "xlarge", "xxlarge")


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
    **kwargs,
) -> ConvNeXt:
    """Build a ConvNeXt V1 `ConvNeXt` model (a functional `keras.Model`).

    Args:
        variant: a key of `VARIANTS`: atto, femto, pico, nano, tiny, small,
            base, large, xlarge, xxlarge, or one of timm's variants (zepto_rms,
            zepto_rms_ols, atto_ols, atto_rms, femto_ols, pico_ols, nano_ols,
            tiny_hnf, large_mlp).
        num_classes: classifier outputs when `include_top` (0: timm's pre-logits).
        input_shape: (height, width, channels); default (None, None, 3), any
            size like timm. A fixed side under 64 gets lowered strides so the
            last stage stays at least 2x2: the stem's stride drops 4 -> 2 -> 1
            first, then the downsampling layers' (stage 3, 2, 1) from 2 to 1.
            Only strides and padding change, never a weight shape, so ImageNet
            weights load into a 32x32 CIFAR model. 64 and up use the standard
            total stride 32; sides need not be multiples of 32.
        include_top: add the head (global average pool, norm, Dense).
        pooling: with `include_top=False`: None gives the last feature map
            (B, H/32, W/32, C); "avg", "max" or "gem" give (B, C).
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
        **kwargs: further `ConvNeXt` options (head_norm, normalize, gem_p,
            pretrained_cfg).

    Input: (B, H, W, C) float images, normalised as the weights expect (timm's
    ImageNet checkpoints: RGB scaled to [0, 1], then mean/std normalised).
    """
    return create_variant(
        VARIANTS,
        "ConvNeXt V1",
        "convnext_",
        variant,
        num_classes=num_classes,
        input_shape=input_shape,
        include_top=include_top,
        pooling=pooling,
        drop_path_rate=drop_path_rate,
        layer_scale_init_value=layer_scale_init_value,
        classifier_activation=classifier_activation,
        input_tensor=input_tensor,
        name=name,
        output_stages=output_stages,
        **kwargs,
    )
