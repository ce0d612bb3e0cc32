"""`ConvNeXtConfig`: what a ConvNeXt network is, as data, and the stride rule for
small inputs.

One frozen dataclass describes every ConvNeXt / ConvNeXt V2 architecture timm
registers: sizes, stem, normalisation and its epsilon, activation, GRN / layer
scale, and the head layout. The field names follow timm's `ConvNeXt` constructor
(`dims` is `widths` here), so `ConvNeXtConfig.from_timm_args(model_args)` reads
timm's `model_args` directly; the variant tables in `convnext_v1` / `convnext_v2`
are rows of it, and a `ConvNeXt` model saves it in its `.keras` config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from convnext_common.errors import InputError

STEMS = ("patch", "overlap", "overlap_tiered", "overlap_act")
NORMS = ("layernorm", "rmsnorm", "simplenorm")
ACTIVATION_NAMES = ("gelu", "gelu_tanh", "silu", "swish", "relu")

# timm's norm_layer spellings -> ours (the 2-D and channels-last timm classes compute the same)
_TIMM_NORMS = {
    None: "layernorm",
    "layernorm": "layernorm",
    "layernorm2d": "layernorm",
    "rmsnorm": "rmsnorm",
    "rmsnorm2d": "rmsnorm",
    "simplenorm": "simplenorm",
    "simplenorm2d": "simplenorm",
}
# timm ConvNeXt constructor arguments -> ConvNeXtConfig fields
_TIMM_FIELDS = {
    "depths": "depths",
    "dims": "widths",
    "kernel_sizes": "kernel_sizes",
    "stem_type": "stem",
    "patch_size": "patch_size",
    "norm_layer": "norm",
    "norm_eps": "norm_eps",
    "act_layer": "activation",
    "use_grn": "use_grn",
    "ls_init_value": "layer_scale_init_value",
    "conv_bias": "conv_bias",
    "mlp_ratio": "mlp_ratio",
    "head_norm_first": "head_norm_first",
    "head_hidden_size": "head_hidden_size",
    "conv_mlp": "conv_mlp",
}
# timm constructor arguments that change neither the weights nor the forward pass at inference
TIMM_ARGS_WITHOUT_EFFECT = frozenset(
    {"in_chans", "num_classes", "global_pool", "drop_rate", "drop_path_rate", "head_init_scale",
     "output_stride", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict"}
)  # fmt: skip


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """timm's make_divisible: round to the nearest multiple of `divisor`, never below
    90% of `value` (the middle width of the 'overlap_tiered' stem)."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class ConfigError(InputError, ValueError):
    """A ConvNeXt description with a field of the wrong type or value."""


@dataclass(frozen=True)
class ConvNeXtConfig:
    """The architecture of a ConvNeXt: everything that changes its weights or its numbers.

    Attributes:
        depths: blocks per stage, e.g. (2, 2, 6, 2).
        widths: channels per stage, e.g. (40, 80, 160, 320) (timm's `dims`).
        kernel_sizes: depthwise kernel size per stage (7).
        stem: "patch" (a patch_size x patch_size stride-patch_size conv, then a
            norm), "overlap" (two 3x3 stride-2 convs, padding 1, widths[0] each),
            "overlap_tiered" (the first one make_divisible(widths[0] // 2) wide) or
            "overlap_act" (widths[0] wide, with the activation between the two convs).
        patch_size: the patch stem's kernel and stride (4).
        norm: "layernorm", "rmsnorm" (timm's RmsNorm2d) or "simplenorm" (timm's
            SimpleNorm2d); used everywhere (stem, downsampling, blocks, head).
        norm_eps: epsilon of every norm (1e-6; 1e-5 for xxlarge).
        activation: the blocks' activation, timm's act_layer ("gelu": exact erf).
        use_grn: ConvNeXt V2's Global Response Normalization after the activation.
        layer_scale_init_value: V1's per-channel layer scale (initial value), None
            for none (V2).
        conv_bias: biases in every conv and dense layer.
        mlp_ratio: hidden width of the block MLP over its input width (4).
        head_norm_first: the norm runs on the feature map before pooling (timm's
            `norm_pre`), and the head is pool -> classifier (convnext_tiny_hnf).
        head_hidden_size: a Dense + GELU pre-logits layer of this width between the
            head norm and the classifier (convnext_large_mlp: 1536).
        conv_mlp: timm stores the block MLP as 1x1 convs (O, I, 1, 1) rather than
            Linear (O, I); the same numbers, only the checkpoint layout differs.
    """

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    kernel_sizes: tuple[int, ...] = (7, 7, 7, 7)
    stem: str = "patch"
    patch_size: int = 4
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    activation: str = "gelu"
    use_grn: bool = False
    layer_scale_init_value: float | None = 1e-6
    conv_bias: bool = True
    mlp_ratio: float = 4.0
    head_norm_first: bool = False
    head_hidden_size: int | None = None
    conv_mlp: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("depths", "widths"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise ConfigError(f"{name} must be a sequence of 4 positive ints, got {value!r}.")
            set_(name, tuple(value))
        kernel_sizes = self.kernel_sizes
        if isinstance(kernel_sizes, int) and not isinstance(kernel_sizes, bool):
            kernel_sizes = (kernel_sizes,) * 4
        if not hasattr(kernel_sizes, "__len__"):
            raise ConfigError(f"kernel_sizes must be an int or 4 ints, got {kernel_sizes!r}.")
        set_("kernel_sizes", tuple(kernel_sizes))
        for name in ("depths", "widths", "kernel_sizes"):
            value = getattr(self, name)
            if len(value) != 4 or not all(_is_int(v) and v >= 1 for v in value):
                raise ConfigError(f"{name} must be 4 positive ints, got {value!r}.")
            set_(name, tuple(int(v) for v in value))
        if not all(k % 2 == 1 for k in self.kernel_sizes):
            raise ConfigError(f"kernel_sizes must be odd, got {self.kernel_sizes!r}.")
        _choice("stem", self.stem, STEMS)
        _choice("norm", self.norm, NORMS)
        _choice("activation", self.activation, ACTIVATION_NAMES)
        if not _is_int(self.patch_size) or self.patch_size < 1:
            raise ConfigError(f"patch_size must be a positive int, got {self.patch_size!r}.")
        if not _is_number(self.norm_eps) or not 0 < self.norm_eps < 1:
            raise ConfigError(f"norm_eps must be a number in (0, 1), got {self.norm_eps!r}.")
        set_("norm_eps", float(self.norm_eps))
        if not _is_number(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}.")
        set_("mlp_ratio", float(self.mlp_ratio))
        for name in ("use_grn", "conv_bias", "head_norm_first", "conv_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        scale = self.layer_scale_init_value
        if scale is not None:
            if not _is_number(scale):
                raise ConfigError(
                    f"layer_scale_init_value must be a number or None, got {scale!r}."
                )
            set_("layer_scale_init_value", float(scale))
        hidden = self.head_hidden_size
        if hidden is not None and (not _is_int(hidden) or hidden < 1):
            raise ConfigError(f"head_hidden_size must be a positive int or None, got {hidden!r}.")
        if hidden is not None and self.head_norm_first:
            raise ConfigError("head_hidden_size cannot be combined with head_norm_first (as timm).")

    # -- derived -----------------------------------------------------------

    @property
    def num_features(self) -> int:
        """Channels of the last stage (the pooled feature size)."""
        return self.widths[-1]

    @property
    def pre_logits_size(self) -> int:
        """Size of timm's pre-logits features (`forward_head(pre_logits=True)`)."""
        return self.head_hidden_size or self.widths[-1]

    @property
    def stem_mid_width(self) -> int:
        """Width of the first conv of an overlapping stem."""
        if self.stem == "overlap_tiered":
            return make_divisible(self.widths[0] // 2)
        return self.widths[0]

    # -- (de)serialisation -------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-able dict; `ConvNeXtConfig.from_dict` gives the same config back."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data) -> ConvNeXtConfig:
        """Strict: unknown or missing keys are a `ConfigError` naming them."""
        if isinstance(data, ConvNeXtConfig):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"A ConvNeXt config must be a dict, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"Unknown ConvNeXt config keys {unknown}; valid keys: {', '.join(sorted(names))}."
            )
        try:
            return cls(**data)
        except TypeError as error:  # a required field missing
            raise ConfigError(f"Incomplete ConvNeXt config: {error}.") from None

    @classmethod
    def from_timm_args(cls, model_args: dict, base: ConvNeXtConfig | None = None):
        """A config from timm's `ConvNeXt(**model_args)` arguments (e.g. a config.json's
        `model_args` over a registered architecture's row `base`). Arguments that
        do not change the network (num_classes, drop rates, ...) are ignored;
        anything the models do not have is a `ConfigError` naming it."""
        if not isinstance(model_args, dict):
            raise ConfigError(f"model_args must be a JSON object, got {type(model_args).__name__}.")
        changes, unknown = {}, []
        for key, value in model_args.items():
            if key in TIMM_ARGS_WITHOUT_EFFECT:
                continue
            if key not in _TIMM_FIELDS:
                unknown.append(f"{key}={value!r}")
                continue
            if key == "norm_layer":
                if value not in _TIMM_NORMS:
                    raise ConfigError(
                        f"norm_layer={value!r} is not supported; one of "
                        f"{', '.join(k for k in _TIMM_NORMS if k)}."
                    )
                value = _TIMM_NORMS[value]
            if key == "norm_eps" and value is None:
                continue  # timm: each norm's own default, 1e-6 for all of them
            changes[_TIMM_FIELDS[key]] = value
        if unknown:
            raise ConfigError(
                "timm model_args the Keras models do not have: " + ", ".join(sorted(unknown))
            )
        if base is None:
            return cls(**changes)
        return dataclasses.replace(base, **changes)

    def replace(self, **changes) -> ConvNeXtConfig:
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


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
STANDARD_FROM = 64  # sides of 64 px and more always get the standard strides


def stem_strides(stem: str, stride: int) -> tuple[int, ...]:
    """Strides of the stem's convolutions for a total stem stride of 4, 2 or 1."""
    if stem == "patch":
        return (stride,)
    return (min(stride, 2), stride // min(stride, 2))


def _conv_output_size(size, kernel, stride):
    # stride == kernel: non-overlapping "valid" conv, as timm (floor);
    # stride < kernel: "same" padding (ceil).
    if stride == kernel:
        return size // stride
    return -(-size // stride)


def final_feature_size(size, strides, stem: str = "patch", patch_size: int = 4):
    """Spatial size of the last stage for an input side `size` under `strides`."""
    if stem == "patch":
        size = _conv_output_size(size, patch_size, strides[0])
    else:  # 3x3 convs with padding 1: ceil(size / stride) each
        for stride in stem_strides(stem, strides[0]):
            size = -(-size // stride)
    for stride in strides[1:]:
        size = _conv_output_size(size, 2, stride)
    return size


def plan_strides(height, width, stem: str = "patch", patch_size: int = 4):
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
    if side >= STANDARD_FROM:
        return STANDARD_STRIDES
    for strides in STRIDE_PLANS:
        if final_feature_size(side, strides, stem, patch_size) >= MIN_FINAL_SIZE:
            return strides
    raise ValueError(
        f"Input {height}x{width} is too small: ConvNeXt needs at least "
        f"{MIN_FINAL_SIZE}x{MIN_FINAL_SIZE} pixels (every stride lowered to 1) and "
        f"uses its standard strides from {STANDARD_FROM}x{STANDARD_FROM} up."
    )
