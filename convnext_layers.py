"""Building blocks shared by ConvNeXt V1 (`convnext_v1`) and V2 (`convnext_v2`).

The two families differ in one place only: a V1 block ends with a learnable
per-channel layer scale, a V2 block instead applies Global Response
Normalization (GRN) after the GELU. Everything else -- the variant table format,
the stem, the downsampling layers, the block, the head and the small-input
stride rule -- lives here, once.

Layer names mirror timm's module paths (`stages.2.blocks.4.conv_dw` becomes
`stage2_block4_dwconv`), so `weights_convert` maps checkpoints with a handful of
rules. All tensors are channels-last: (batch, height, width, channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

LAYER_NORM_EPSILON = 1e-6  # timm uses 1e-6 in every ConvNeXt LayerNorm
GRN_EPSILON = 1e-6
POOLING_CHOICES = (None, "avg", "max")


@dataclass(frozen=True)
class Variant:
    """Depth (blocks per stage) and width (channels per stage) of one model size."""

    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]


# Sizes both families share (timm's convnext_<name> and convnextv2_<name>); each
# family module adds its own largest size.
SHARED_VARIANTS = {
    "atto": Variant(depths=(2, 2, 6, 2), widths=(40, 80, 160, 320)),
    "femto": Variant(depths=(2, 2, 6, 2), widths=(48, 96, 192, 384)),
    "pico": Variant(depths=(2, 2, 6, 2), widths=(64, 128, 256, 512)),
    "nano": Variant(depths=(2, 2, 8, 2), widths=(80, 160, 320, 640)),
    "tiny": Variant(depths=(3, 3, 9, 3), widths=(96, 192, 384, 768)),
    "small": Variant(depths=(3, 3, 27, 3), widths=(96, 192, 384, 768)),
    "base": Variant(depths=(3, 3, 27, 3), widths=(128, 256, 512, 1024)),
    "large": Variant(depths=(3, 3, 27, 3), widths=(192, 384, 768, 1536)),
}


def resolve_variant(variant: str, table: dict[str, Variant], family: str) -> Variant:
    if not isinstance(variant, str) or variant.lower() not in table:
        raise ValueError(
            f"Unknown {family} variant {variant!r}. Valid variants: {', '.join(table)}."
        )
    return table[variant.lower()]


# ----------------------------------------------------------------------------
# Custom layers (all registered, so `.keras` files load without custom_objects)
# ----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="convnext")
class DepthwiseConv(keras.layers.DepthwiseConv2D):
    """The 7x7 depthwise convolution of a ConvNeXt block, "same" padding, stride 1.

    (B, H, W, C) -> (B, H, W, C). Weights are those of `keras.layers.DepthwiseConv2D`
    (kernel (k, k, C, 1), bias (C,)); only the way the product is computed may
    differ per backend, chosen for speed without changing the numbers.
    """

    def __init__(self, kernel_size=7, **kwargs):
        kwargs.setdefault("padding", "same")
        super().__init__(kernel_size=kernel_size, **kwargs)

    # How the product is computed, per backend, chosen by measurement
    # (benchmarks/dwconv_formulations.py: one layer on (32, 56, 56, 96) float32,
    # through predict_on_batch, 2-core x86-64 AVX-512 CPU, median ms; the same
    # ranking held on (32, 56, 56, 40) and (32, 14, 14, 160)):
    #   jax:        lax grouped conv (what keras.ops.depthwise_conv runs; NHWC or
    #               NCHW dimension numbers alike) 805-1670, 49 shifted
    #               multiply-adds 111-210 -> shifted sum (XLA fuses it into one
    #               loop; its grouped convolution on CPU is a slow generic path).
    #   tensorflow: tf.nn.depthwise_conv2d (the parent's call) 39-42, shifted sum
    #               858 -> native op.
    #   torch:      keras.ops.depthwise_conv 147-251 (NHWC -> contiguous NCHW ->
    #               channels_last copies), shifted sum 1374-3826, F.conv2d(groups=C)
    #               on x.permute(0, 3, 1, 2) 71-110 -> the permuted view: a
    #               contiguous NHWC tensor IS a channels_last NCHW tensor, so no
    #               copy is made and oneDNN's channels_last depthwise kernel runs.
    # Anything the fast paths do not cover (channels_first, strides, dilation,
    # depth_multiplier > 1) goes through the parent's generic call.
    def _fast_path(self):
        return (
            self.data_format == "channels_last"
            and tuple(self.strides) == (1, 1)
            and tuple(self.dilation_rate) == (1, 1)
            and self.depth_multiplier == 1
            and self.padding == "same"
            and self.kernel_size[0] == self.kernel_size[1]
            and self.kernel_size[0] % 2 == 1
        )

    def call(self, inputs):
        backend = keras.backend.backend()
        if backend not in ("jax", "torch") or not self._fast_path():
            return super().call(inputs)
        kernel = ops.cast(self.kernel, inputs.dtype)
        bias = ops.cast(self.bias, inputs.dtype) if self.use_bias else None
        if backend == "torch":
            outputs = _depthwise_torch(inputs, kernel, bias)
        else:
            outputs = _depthwise_shifted_sum(inputs, kernel, bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


def _depthwise_shifted_sum(x, kernel, bias):
    """'same' stride-1 depthwise conv as sum_ij pad(x)[:, i:i+H, j:j+W] * kernel[i, j].

    Accumulates in float32 (as a convolution kernel does) for half-precision inputs.
    """
    k = kernel.shape[0]
    pad = k // 2
    height, width = x.shape[1], x.shape[2]
    dtype = x.dtype
    if keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16"):
        x, kernel = ops.cast(x, "float32"), ops.cast(kernel, "float32")
        bias = None if bias is None else ops.cast(bias, "float32")
    padded = ops.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = None
    for i in range(k):
        for j in range(k):
            term = padded[:, i : i + height, j : j + width, :] * kernel[i, j, :, 0]
            out = term if out is None else out + term
    if bias is not None:
        out = out + bias
    return ops.cast(out, dtype)


def _depthwise_torch(x, kernel, bias):
    """'same' stride-1 depthwise conv with torch's native kernel, NHWC in and out."""
    k, channels = kernel.shape[0], kernel.shape[2]
    weight = kernel.permute(2, 3, 0, 1)  # (k, k, C, 1) -> (C, 1, k, k)
    return _torch_conv2d_nhwc(x, weight, bias, padding=k // 2, groups=channels)


def _torch_conv2d_nhwc(x, weight, bias, **conv_arguments):
    """torch's conv2d on an NHWC tensor without layout copies: (B, H, W, C) in,
    (B, H', W', O) out; `weight` in torch's (O, C / groups, kh, kw) layout."""
    import torch.nn.functional as F

    # x.permute(0, 3, 1, 2) of a contiguous NHWC tensor is a channels_last NCHW
    # view (no copy); conv2d keeps that memory format, so permuting back is
    # again a view of a contiguous NHWC result.
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, **conv_arguments)
    return y.permute(0, 2, 3, 1)


@keras.saving.register_keras_serializable(package="convnext")
class DownsampleConv(keras.layers.Conv2D):
    """The stem's and the downsampling layers' convolution: `keras.layers.Conv2D`
    (same weights, config and numbers), (B, H, W, Cin) -> (B, H', W', Cout).

    On torch, keras' Conv2D copies a channels_last input into a contiguous NCHW
    tensor and the result back (measured on convnext_atto, batch 32: 5 such
    copies, 7% of the forward pass). With "valid" padding -- always, at the
    standard strides -- this calls F.conv2d on the permuted views instead, as
    `DepthwiseConv` does, and oneDNN works on channels_last memory directly.
    """

    def call(self, inputs):
        if not (
            keras.backend.backend() == "torch"
            and self.data_format == "channels_last"
            and self.padding == "valid"
            and self.groups == 1
            and tuple(self.dilation_rate) == (1, 1)
        ):
            return super().call(inputs)
        kernel = ops.cast(self.kernel, inputs.dtype).permute(3, 2, 0, 1)  # (k,k,I,O) -> (O,I,k,k)
        bias = ops.cast(self.bias, inputs.dtype) if self.use_bias else None
        outputs = _torch_conv2d_nhwc(inputs, kernel, bias, stride=self.strides)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="convnext")
class LayerScale(keras.layers.Layer):
    """Per-channel learnable scale `x * gamma` that ends a ConvNeXt V1 block.

    (..., C) -> (..., C); `gamma` has shape (C,) and starts at `init_value`.
    """

    def __init__(self, init_value=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma",
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value),
        )

    def call(self, x):
        return x * ops.cast(self.gamma, x.dtype)

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


@keras.saving.register_keras_serializable(package="convnext")
class StochasticDepth(keras.layers.Layer):
    """Drops the whole residual branch of a sample with probability `rate`.

    (B, ...) -> (B, ...). Active only in training, where kept samples are scaled
    by 1 / (1 - rate) so the expected output is unchanged (timm's DropPath with
    `scale_by_keep=True`). At inference it is the identity.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"StochasticDepth rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask_shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        random = keras.random.uniform(mask_shape, seed=self.seed_generator, dtype=x.dtype)
        mask = ops.cast(random < keep, x.dtype)
        return x * mask / keep

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package="convnext")
class GlobalResponseNorm(keras.layers.Layer):
    """ConvNeXt V2's Global Response Normalization.

    (B, H, W, C) -> (B, H, W, C):
        Gx = ||x||_2 over (H, W)            (B, 1, 1, C)
        Nx = Gx / (mean_C(Gx) + 1e-6)       (B, 1, 1, C)
        y  = x + bias + weight * (x * Nx)
    `weight` and `bias` have shape (C,) and start at zero, so a fresh block is
    the identity here. The statistics are computed in float32 under mixed
    precision: a sum of squares over H*W overflows float16 easily.
    """

    def __init__(self, epsilon=GRN_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.weight = self.add_weight(name="weight", shape=(channels,), initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=(channels,), initializer="zeros")

    def call(self, x):
        x32 = ops.cast(x, "float32")
        # (torch.linalg.vector_norm measured slower in the model than this:
        # 95 vs 67 ms per convnextv2_atto pass, batch 32)
        gx = ops.sqrt(ops.sum(ops.square(x32), axis=(1, 2), keepdims=True))
        nx = gx / (ops.mean(gx, axis=-1, keepdims=True) + self.epsilon)
        # x + bias + weight * (x * Nx) == x * (1 + weight * Nx) + bias: the
        # per-(sample, channel) factor is tiny, so the big tensor is read once
        # and written once (on torch eager, GRN's mul/add/pow passes were 45%
        # of convnextv2_atto's time; this form is one addcmul there).
        scale = 1.0 + ops.cast(self.weight, "float32") * nx
        return ops.cast(_multiply_add(x32, scale, ops.cast(self.bias, "float32")), x.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def _multiply_add(x, scale, bias):
    """x * scale + bias with broadcasting, in one pass on torch (addcmul)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.addcmul(bias, x, scale)
    return x * scale + bias


def layer_norm(name):
    return keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=name)


# Per-backend fast paths of the block's GELU and pointwise layers. Same numbers
# (the formulas are timm's/torch's), chosen by measurement with
# benchmarks/formulations.py (median ms per application, predict_on_batch, 2-core
# x86-64 AVX-512 CPU under load, (32, 56, 56, 160) float32 -- stage 0 of atto):
#   GELU  jax: keras gelu(approximate=False) 128-168 (XLA expands erfc into two
#              branches with exp and a divide), 0.5 x (1 + erf(x / sqrt 2)) 44-90.
#         tf:  tf.nn.gelu 124-126 (erfc), 0.5 x (1 + erf(x / sqrt 2)) 86-97.
#         torch: F.gelu (what keras' gelu already runs) 83-93, the erf formula
#              in ops 371-380 (unfused elementwise ops).
#   Dense torch: matmul then add (keras' Dense) 558-637, F.linear 386-408 (one
#              addmm, the bias is added inside the GEMM instead of another pass
#              over the output); (100352, 160) @ (160, 640).
#              jax: XLA already fuses the bias add; keras' call.
#   Dense + GELU, torch on CPU, inference: F.linear then F.gelu 46.2,
#              oneDNN's fused linear + bias + GELU (mkldnn._linear_pointwise)
#              24.9; (100352, 40) @ (40, 160). addmm first copies the broadcast
#              bias into its output -- a whole extra pass; oneDNN adds bias and
#              GELU while the GEMM result is still in cache. Whole convnext_atto:
#              aten::gelu and addmm's bias copies were 42% of keras-torch's time.
#   Dense + GELU, tensorflow, inside tf.function: keras' Dense (tensordot on
#              the 4-D input, then add, then the erf formula) 46.9, a 2-D
#              matmul -> bias_add -> the same formula 26.7 (grappler fuses it
#              into one oneDNN _FusedMatMul); same (100352, 40) @ (40, 160).
#              Whole convnext_atto: 0.90x -> 1.20x timm.
_SQRT_HALF = 0.7071067811865476


@keras.saving.register_keras_serializable(package="convnext")
def _exact_gelu(x):
    """GELU with the exact erf, x * (1 + erf(x / sqrt(2))) / 2, as timm's nn.GELU()."""
    if keras.backend.backend() == "torch":
        return keras.activations.gelu(x, approximate=False)  # torch.nn.functional.gelu
    return 0.5 * x * (1.0 + ops.erf(x * _SQRT_HALF))


def _onednn_linear_usable(x, weight):
    """Whether torch's oneDNN fused linear can replace F.linear for `x`: CPU,
    float32/bfloat16, and no gradient wanted (the op has no autograd formula)."""
    import torch

    if not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@keras.saving.register_keras_serializable(package="convnext")
class _PointwiseDense(keras.layers.Dense):
    """`keras.layers.Dense` (same weights, config and numbers), (..., in) -> (..., out),
    whose plain float call is laid out so each backend runs it as one fused op:

    - torch: oneDNN's linear with bias (and the exact GELU when that is the
      activation) for CPU inference, else `torch.nn.functional.linear`;
    - tensorflow: a 2-D MatMul -> BiasAdd -> activation chain, which TensorFlow's
      graph optimizer rewrites into one oneDNN matmul with bias and GELU fused
      (keras' tensordot on the 4-D input leaves reshapes in between, so the bias
      add and the GELU stay separate passes);
    - jax: keras' call (XLA fuses the bias add itself).
    """

    def call(self, inputs, training=None):
        backend = keras.backend.backend()
        if self.lora_enabled or backend not in ("torch", "tensorflow"):
            return super().call(inputs, training=training)
        kernel = ops.cast(self.kernel, inputs.dtype)
        bias = None if self.bias is None else ops.cast(self.bias, inputs.dtype)
        if backend == "torch":
            return self._torch_call(inputs, kernel, bias)
        return self._tensorflow_call(inputs, kernel, bias)

    def _torch_call(self, inputs, kernel, bias):
        import torch
        import torch.nn.functional as F

        # kernel (in, out) -> weight (out, in): a transposed view, no copy. (A 1x1
        # conv2d on the channels_last view measured the same, plus a weight
        # transpose copy per call.)
        weight = kernel.t()
        activation = self.activation
        if _onednn_linear_usable(inputs, weight):
            fused = "gelu" if activation is _exact_gelu else "none"
            algorithm = "none" if fused == "gelu" else ""  # "none": erf, not tanh
            x = torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, fused, [], algorithm)
            if fused == "gelu":
                activation = None
        else:
            x = F.linear(inputs, weight, bias)
        return x if activation is None else activation(x)

    def _tensorflow_call(self, inputs, kernel, bias):
        import tensorflow as tf

        units = kernel.shape[1]
        x = tf.matmul(tf.reshape(inputs, (-1, kernel.shape[0])), kernel)
        if bias is not None:
            x = tf.nn.bias_add(x, bias)
        if self.activation is not None:
            x = self.activation(x)
        outputs = tf.reshape(x, tf.concat([tf.shape(inputs)[:-1], [units]], axis=0))
        outputs.set_shape(inputs.shape[:-1] + [units])
        return outputs


# ----------------------------------------------------------------------------
# Strides for small inputs
# ----------------------------------------------------------------------------

STANDARD_STRIDES = (4, 2, 2, 2)  # stem, then the downsampling before stages 1, 2, 3
# Tried in order until the last stage keeps a feature map of at least 2x2: first
# the stem gives up resolution loss, then the late downsampling layers do.
STRIDE_PLANS = (
    (4, 2, 2, 2),
    (2, 2, 2, 2),
    (1, 2, 2, 2),
    (1, 2, 2, 1),
    (1, 2, 1, 1),
    (1, 1, 1, 1),
)
MIN_FINAL_SIZE = 2


def _conv_output_size(size, kernel, stride):
    # stride == kernel: non-overlapping "valid" conv, as timm (floor);
    # stride < kernel: "same" padding (ceil).
    if stride == kernel:
        return size // stride
    return -(-size // stride)


def final_feature_size(size, strides):
    """Spatial size of the last stage for an input side `size` under `strides`."""
    size = _conv_output_size(size, 4, strides[0])
    for stride in strides[1:]:
        size = _conv_output_size(size, 2, stride)
    return size


def plan_strides(height, width):
    """Strides (stem, down1, down2, down3) for an input of `height` x `width`.

    Inputs with a side of 64 or more (224, 256, 384, ...) get the standard
    strides (4, 2, 2, 2), total stride 32, exactly as timm. A smaller input
    lowers strides, stem first (4 -> 2 -> 1), then the downsampling layers from
    the last stage backwards, until the last stage is at least 2x2. Kernel
    shapes never change, so pretrained weights load into any of these layouts.
    Unknown (None) sizes get the standard strides.
    """
    known = [s for s in (height, width) if s is not None]
    if not known:
        return STANDARD_STRIDES
    side = min(known)
    for strides in STRIDE_PLANS:
        if final_feature_size(side, strides) >= MIN_FINAL_SIZE:
            return strides
    raise ValueError(
        f"Input {height}x{width} is too small: ConvNeXt needs at least "
        f"{MIN_FINAL_SIZE}x{MIN_FINAL_SIZE} pixels (every stride lowered to 1) and "
        f"uses its standard strides from 64x64 up."
    )


# ----------------------------------------------------------------------------
# Network assembly
# ----------------------------------------------------------------------------


def downsample_conv(filters, kernel, stride, name):
    padding = "valid" if stride == kernel else "same"
    return DownsampleConv(filters, kernel, strides=stride, padding=padding, name=name)


def convnext_block(x, width, prefix, drop_path, layer_scale_init_value, use_grn):
    """One ConvNeXt block: (B, H, W, C) -> (B, H, W, C), C = `width`.

    dwconv 7x7 -> LayerNorm -> Dense 4C -> GELU (-> GRN, V2) -> Dense C
    (-> layer scale, V1) -> stochastic depth -> + shortcut.
    """
    shortcut = x
    x = DepthwiseConv(7, name=f"{prefix}_dwconv")(x)
    x = layer_norm(f"{prefix}_norm")(x)
    # exact erf GELU as the Dense's activation, so torch and TensorFlow can fuse the two
    x = _PointwiseDense(4 * width, activation=_exact_gelu, name=f"{prefix}_pwconv1")(x)
    if use_grn:
        x = GlobalResponseNorm(name=f"{prefix}_grn")(x)
    x = _PointwiseDense(width, name=f"{prefix}_pwconv2")(x)
    if layer_scale_init_value is not None:
        x = LayerScale(layer_scale_init_value, name=f"{prefix}_layer_scale")(x)
    if drop_path > 0.0:
        x = StochasticDepth(drop_path, name=f"{prefix}_drop_path")(x)
    return keras.layers.Add(name=f"{prefix}_add")([shortcut, x])


def _check_arguments(num_classes, include_top, pooling, drop_path_rate, output_stages):
    if output_stages is not None:
        stages = tuple(output_stages)
        if (
            not stages
            or any(s not in (0, 1, 2, 3) for s in stages)
            or len(set(stages)) != len(stages)
        ):
            raise ValueError(
                "output_stages must be distinct stage indices from (0, 1, 2, 3); "
                f"got {output_stages!r}."
            )
        if include_top or pooling is not None:
            raise ValueError("output_stages needs include_top=False and pooling=None.")
    if pooling not in POOLING_CHOICES:
        raise ValueError(f"pooling must be one of None, 'avg', 'max'; got {pooling!r}.")
    if include_top and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(
            f"include_top=True needs num_classes >= 1, got {num_classes!r}. "
            "Use include_top=False for a headless backbone."
        )
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")


def _input_layer(input_shape, input_tensor):
    if input_tensor is not None:
        if input_shape is None:
            input_shape = tuple(input_tensor.shape[1:])
        if not keras.backend.is_keras_tensor(input_tensor):
            return keras.Input(tensor=input_tensor, shape=input_shape), input_shape
        return input_tensor, input_shape
    if input_shape is None:
        input_shape = (224, 224, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape must be (height, width, channels), e.g. (224, 224, 3); "
            f"got {input_shape!r} of rank {len(input_shape)}."
        )
    for dim in input_shape[:2]:
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(
                f"input_shape sides must be positive ints or None; got {input_shape!r}."
            )
    if input_shape[2] is None or input_shape[2] < 1:
        raise ValueError(f"input_shape needs a known channel count; got {input_shape!r}.")
    return keras.Input(shape=input_shape, name="image"), input_shape


def build_convnext(
    variant: Variant,
    *,
    use_grn: bool,
    layer_scale_init_value,
    num_classes,
    input_shape,
    include_top,
    pooling,
    drop_path_rate,
    classifier_activation,
    input_tensor,
    name,
    output_stages=None,
):
    """Assemble a functional ConvNeXt; see `create_convnext_v1` for the arguments."""
    _check_arguments(num_classes, include_top, pooling, drop_path_rate, output_stages)
    inputs, input_shape = _input_layer(input_shape, input_tensor)
    strides = plan_strides(input_shape[0], input_shape[1])

    total_blocks = sum(variant.depths)
    # linear rise 0 -> drop_path_rate over all blocks, as timm
    block_rates = [
        drop_path_rate * i / (total_blocks - 1) if total_blocks > 1 else 0.0
        for i in range(total_blocks)
    ]

    x = downsample_conv(variant.widths[0], 4, strides[0], "stem_conv")(inputs)
    x = layer_norm("stem_norm")(x)
    block_index = 0
    stage_outputs = []
    for stage, (depth, width) in enumerate(zip(variant.depths, variant.widths, strict=True)):
        if stage > 0:
            x = layer_norm(f"stage{stage}_downsample_norm")(x)
            x = downsample_conv(width, 2, strides[stage], f"stage{stage}_downsample_conv")(x)
        for block in range(depth):
            x = convnext_block(
                x,
                width,
                prefix=f"stage{stage}_block{block}",
                drop_path=block_rates[block_index],
                layer_scale_init_value=layer_scale_init_value,
                use_grn=use_grn,
            )
            block_index += 1
        stage_outputs.append(x)

    if output_stages is not None:
        # multi-scale features (strides 4, 8, 16, 32 for standard inputs), like
        # timm's features_only
        return keras.Model(inputs, [stage_outputs[s] for s in output_stages], name=name)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
        x = layer_norm("head_norm")(x)
        x = keras.layers.Dense(num_classes, activation=classifier_activation, name="head_fc")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="head_pool")(x)

    model = keras.Model(inputs, x, name=name)
    return model


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one image through `model`'s convolutions and dense
    layers (what `torch.utils.flop_counter` counts for timm, divided by 2).

    Needs a model built with a fixed input size. Norms, activations and
    additions are left out, as in the published ConvNeXt GMAC figures.
    """
    macs = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if not layer.weights:
            continue
        out_shape = layer.output.shape
        positions = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            macs += positions * int(np.prod(kernel.shape))  # (k, k, C, 1)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            macs += positions * int(np.prod(kernel.shape))  # (k, k, I, O) or (I, O)
    return macs
