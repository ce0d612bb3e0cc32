"""The registered layers of the ConvNeXt models (so `.keras` files load with no
`custom_objects`). All tensors are channels-last: (batch, height, width, channels).

Each layer computes exactly what its timm counterpart computes; where a backend
has a faster formulation of the same numbers, the layer asks `fast_ops` whether
it may use it (CPU inference only, never while exporting) and otherwise runs its
portable keras-ops formulation.
"""

from __future__ import annotations

import functools

import keras
from keras import ops

from convnext_layers import fast_ops
from convnext_layers.fast_ops.jax_kernels import depthwise_shifted_sum  # noqa: F401 (its old home)

GRN_EPSILON = 1e-6
_SQRT_HALF = 0.7071067811865476


# ----------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------


def exact_gelu(x):
    """GELU with the exact erf, x * (1 + erf(x / sqrt(2))) / 2, as timm's nn.GELU().

    (torch: F.gelu, which keras' gelu runs; elsewhere the erf formula, measured
    faster than keras' erfc-based gelu: jax 44-90 vs 128-168 ms, tensorflow
    86-97 vs 124-126 ms on (32, 56, 56, 160) float32.)
    """
    if keras.backend.backend() == "torch":
        return keras.activations.gelu(x, approximate=False)
    return 0.5 * x * (1.0 + ops.erf(x * _SQRT_HALF))


def tanh_gelu(x):
    """GELU's tanh approximation (timm's 'gelu_tanh')."""
    return keras.activations.gelu(x, approximate=True)


# registered under the legacy name too: `.keras` files written before 2026-11 name it so
keras.saving.get_custom_objects()["convnext>_exact_gelu"] = exact_gelu
exact_gelu = keras.saving.register_keras_serializable(package="convnext")(exact_gelu)
tanh_gelu = keras.saving.register_keras_serializable(package="convnext")(tanh_gelu)


@keras.saving.register_keras_serializable(package="convnext")
def quick_gelu(x):
    """timm's QuickGELU: x * sigmoid(1.702 x)."""
    return x * ops.sigmoid(1.702 * x)


@keras.saving.register_keras_serializable(package="convnext")
def leaky_relu(x):
    """torch's LeakyReLU default (negative slope 0.01; keras' default is 0.2)."""
    return keras.activations.leaky_relu(x, negative_slope=0.01)


@keras.saving.register_keras_serializable(package="convnext")
def hard_mish(x):
    """timm's HardMish: x / 2 * clip(x + 2, 0, 2)."""
    return 0.5 * x * ops.clip(x + 2.0, 0.0, 2.0)


# timm act_layer name (`convnext_layers.timm_args.ACTIVATION_NAMES`) -> keras activation.
# keras' own hard_sigmoid / hard_silu are torch's Hardsigmoid / Hardswish (relu6(x + 3) / 6),
# its elu / selu use torch's constants, and CELU with timm's alpha 1 is ELU.
ACTIVATIONS = {
    "gelu": exact_gelu,
    "gelu_tanh": tanh_gelu,
    "quick_gelu": quick_gelu,
    "silu": keras.activations.silu,
    "mish": keras.activations.mish,
    "relu": keras.activations.relu,
    "relu6": keras.activations.relu6,
    "leaky_relu": leaky_relu,
    "elu": keras.activations.elu,
    "celu": keras.activations.elu,
    "selu": keras.activations.selu,
    "sigmoid": keras.activations.sigmoid,
    "tanh": keras.activations.tanh,
    "hard_sigmoid": keras.activations.hard_sigmoid,
    "hard_swish": keras.activations.hard_silu,
    "hard_mish": hard_mish,
    "identity": keras.activations.linear,
}


def activation_function(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------
# Convolutions
# ----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="convnext")
class DepthwiseConv(keras.layers.DepthwiseConv2D):
    """The depthwise convolution of a ConvNeXt block (7x7 by default), "same" padding,
    stride 1: (B, H, W, C) -> (B, H, W, C). Weights are those of
    `keras.layers.DepthwiseConv2D` (kernel (k, k, C, 1), bias (C,)).

    How the product is computed, per backend, chosen by measurement
    (benchmarks/formulations.py: one layer on (32, 56, 56, 96) float32 through
    predict_on_batch, 2-core x86-64 AVX-512 CPU, median ms):
      jax (CPU):  XLA's grouped conv 805-1670, 49 shifted multiply-adds 111-210
                  -> the shifted sum (XLA fuses it into one loop).
      tensorflow: tf.nn.depthwise_conv2d 39-42 (keras' call), shifted sum 858.
      torch (CPU): keras' call 147-251 (NHWC -> NCHW -> channels_last copies),
                  F.conv2d(groups=C) on the permuted view 71-110 (no copy).
    """

    def __init__(self, kernel_size=7, **kwargs):
        kwargs.setdefault("padding", "same")
        super().__init__(kernel_size=kernel_size, **kwargs)

    def _fast_path_shape(self):
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
        portable_call = functools.partial(super().call, inputs)
        if not self._fast_path_shape():
            return portable_call()
        return fast_ops.run_kernel("depthwise_conv", inputs, portable_call, self)


@keras.saving.register_keras_serializable(package="convnext")
class DownsampleConv(keras.layers.Conv2D):
    """The stem's and the downsampling layers' convolution: `keras.layers.Conv2D`
    (same weights and numbers), (B, H, W, Cin) -> (B, H', W', Cout), plus
    `explicit_padding`: zeros on every side before a "valid" convolution, as
    torch's `Conv2d(padding=p)` (keras' "same" pads bottom/right only for even
    sizes, which is not what timm's overlapping 3x3 stride-2 stems compute).

    On torch (CPU) it calls F.conv2d on the channels_last view of the NHWC input:
    keras' Conv2D copies it into contiguous NCHW and back (5 such copies were 7%
    of convnext_atto's forward pass).
    """

    def __init__(self, *args, explicit_padding: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.explicit_padding = int(explicit_padding)
        if self.explicit_padding and self.padding != "valid":
            raise ValueError("explicit_padding needs padding='valid'.")

    def call(self, inputs):
        pad = self.explicit_padding

        def portable_call():
            padded = inputs
            if pad:
                padded = ops.pad(inputs, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
            return super(DownsampleConv, self).call(padded)

        if (
            self.data_format == "channels_last"
            and self.padding == "valid"
            and self.groups == 1
            and tuple(self.dilation_rate) == (1, 1)
        ):
            return fast_ops.run_kernel("conv", inputs, portable_call, self)
        return portable_call()

    def compute_output_shape(self, input_shape):
        pad = 2 * self.explicit_padding
        if pad:
            input_shape = list(input_shape)
            for axis in (1, 2):
                if input_shape[axis] is not None:
                    input_shape[axis] += pad
        return super().compute_output_shape(tuple(input_shape))

    def get_config(self):
        return {**super().get_config(), "explicit_padding": self.explicit_padding}


@keras.saving.register_keras_serializable(package="convnext")
class PointwiseDense(keras.layers.Dense):
    """`keras.layers.Dense` (same weights, config and numbers), (..., in) -> (..., out),
    whose plain float call is laid out so each backend runs it as one fused op:

    - torch: oneDNN's linear with bias (and the exact GELU when that is the
      activation) for CPU inference, else `torch.nn.functional.linear`
      (measured on (100352, 40) @ (40, 160): F.linear + F.gelu 46.2 ms, the
      fused op 24.9 ms; addmm first copies the broadcast bias into its output);
    - tensorflow: a 2-D MatMul -> BiasAdd -> activation chain that grappler
      rewrites into one `_FusedMatMul` (46.9 -> 26.7 ms on the same shapes);
    - jax: keras' call (XLA fuses the bias add itself).
    """

    def call(self, inputs, training=None):
        portable_call = functools.partial(super().call, inputs, training=training)
        if self.lora_enabled or self.quantization_mode is not None:
            return portable_call()
        # oneDNN fuses the exact GELU into the matmul on torch
        fuse_gelu = self.activation is exact_gelu
        return fast_ops.run_kernel("dense", inputs, portable_call, self, fuse_gelu)


# `.keras` files written before 2026-11 name it "_PointwiseDense"
keras.saving.get_custom_objects()["convnext>_PointwiseDense"] = PointwiseDense


# ----------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="convnext")
class SimpleNorm(keras.layers.Layer):
    """timm's SimpleNorm: x / sqrt(var(x) + eps) * weight over the channels, with the
    *unbiased* variance (torch.var's default, divisor C - 1), not centred, no bias.

    (..., C) -> (..., C); `weight` (C,) starts at 1. Computed in float32.
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.weight = self.add_weight(name="weight", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        x32 = ops.cast(x, "float32")
        channels = x.shape[-1]
        mean = ops.mean(x32, axis=-1, keepdims=True)
        variance = ops.sum(ops.square(x32 - mean), axis=-1, keepdims=True) / (channels - 1)
        y = x32 * ops.rsqrt(variance + self.epsilon) * ops.cast(self.weight, "float32")
        return ops.cast(y, x.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


# timm norm_layer name -> what builds it (all normalise over the last, channel axis)
NORMS = ("layernorm", "rmsnorm", "simplenorm")


def norm_layer(kind: str, epsilon: float, name: str) -> keras.layers.Layer:
    """LayerNorm (timm's LayerNorm / LayerNorm2d), RMSNorm (timm's RmsNorm2d:
    x * rsqrt(mean(x^2) + eps) * weight, exactly `keras.layers.RMSNormalization`),
    or SimpleNorm."""
    if kind == "layernorm":
        return keras.layers.LayerNormalization(epsilon=epsilon, name=name)
    if kind == "rmsnorm":
        return keras.layers.RMSNormalization(epsilon=epsilon, name=name)
    if kind == "simplenorm":
        return SimpleNorm(epsilon=epsilon, name=name)
    raise ValueError(f"Unknown norm {kind!r}; one of {', '.join(NORMS)}.")


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
        # a backend's kernel where it has one for x's dtype (torch: bfloat16)
        return fast_ops.run_kernel("response_norm", x, lambda: self._response_norm(x), self)

    def _response_norm(self, x):
        """The portable GRN, computed in float32 whatever `x`'s dtype."""
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
        bias = ops.cast(self.bias, "float32")
        y = fast_ops.run_kernel("multiply_add", x32, lambda: x32 * scale + bias, scale, bias)
        return ops.cast(y, x.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


# ----------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="embedding")
class GeneralizedMeanPooling(keras.layers.Layer):
    """Generalised-mean (GeM) global pooling with a learnable exponent `p`.

    (B, H, W, C) -> (B, C): `mean_{H,W}(max(x, eps) ** p) ** (1 / p)`. p = 1 is
    average pooling of the positive part, p -> inf tends to max pooling. `p`
    is a scalar weight (trainable unless `trainable_p=False`), clamped to at
    least 1 in the forward pass. Computed in float32.
    """

    def __init__(self, p=3.0, eps=1e-6, trainable_p=True, **kwargs):
        super().__init__(**kwargs)
        self.init_p = float(p)
        self.eps = float(eps)
        self.trainable_p = bool(trainable_p)

    def build(self, input_shape):
        self.p = self.add_weight(
            name="p",
            shape=(),
            initializer=keras.initializers.Constant(self.init_p),
            trainable=self.trainable_p,
        )

    def call(self, x):
        x32 = ops.maximum(ops.cast(x, "float32"), self.eps)
        p = ops.maximum(ops.cast(self.p, "float32"), 1.0)
        pooled = ops.mean(ops.power(x32, p), axis=(1, 2))
        return ops.cast(ops.power(pooled, 1.0 / p), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "p": self.init_p,
            "eps": self.eps,
            "trainable_p": self.trainable_p,
        }


@keras.saving.register_keras_serializable(package="convnext")
class GlobalAvgMaxPooling(keras.layers.Layer):
    """timm's "avgmax" pooling, (B, H, W, C) -> (B, C): (mean + max) / 2 over H, W; or
    with `concat` its "catavgmax", (B, H, W, C) -> (B, 2C): [mean, max]."""

    def __init__(self, concat: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.concat = bool(concat)

    def call(self, x):
        mean, top = ops.mean(x, axis=(1, 2)), ops.max(x, axis=(1, 2))
        return ops.concatenate([mean, top], axis=-1) if self.concat else 0.5 * (mean + top)

    def compute_output_shape(self, input_shape):
        channels = input_shape[-1]
        return (input_shape[0], None if channels is None else channels * (1 + self.concat))

    def get_config(self):
        return {**super().get_config(), "concat": self.concat}


POOLINGS = ("avg", "max", "avgmax", "catavgmax", "gem")


def pooling_layer(kind: str, name: str, gem_p: float = 3.0) -> keras.layers.Layer:
    """Global pooling (B, H, W, C) -> (B, C): "avg" (timm's), "max", "avgmax", "gem";
    "catavgmax" gives (B, 2C)."""
    if kind == "avg":
        return keras.layers.GlobalAveragePooling2D(name=name)
    if kind == "max":
        return keras.layers.GlobalMaxPooling2D(name=name)
    if kind in ("avgmax", "catavgmax"):
        return GlobalAvgMaxPooling(concat=kind == "catavgmax", name=name)
    if kind == "gem":
        return GeneralizedMeanPooling(p=gem_p, name=name)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {kind!r}.")


def acts_per_position(layer: keras.layers.Layer) -> bool:
    """Whether `layer`, at inference, maps each position's channel vector on its own,
    (..., C) -> (..., C'), so the rows of a (B, H, W, C) tensor may be split into
    blocks and computed block by block (what `Residual` offers the layer-by-layer
    inference). Normalisation over the channels, pointwise Dense, layer scale,
    element-wise activations and stochastic depth (the identity at inference) do;
    convolutions, GRN (statistics over the image) and pooling do not."""
    if isinstance(layer, (keras.layers.LayerNormalization, keras.layers.RMSNormalization)):
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        return list(axis) == [-1]
    return isinstance(
        layer, (PointwiseDense, SimpleNorm, LayerScale, StochasticDepth, keras.layers.Activation)
    )
