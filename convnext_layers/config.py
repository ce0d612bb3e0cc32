"""`ConvNeXtConfig`: what a ConvNeXt network is, as data.

One frozen dataclass describes every ConvNeXt / ConvNeXt V2 architecture timm
registers: sizes, stem, normalisation and its epsilon, activation, GRN / layer
scale, and the head layout. The field names follow timm's `ConvNeXt` constructor
(`dims` is `widths` here), so `ConvNeXtConfig.from_timm_args(model_args)` reads
timm's `model_args` directly (`convnext_layers.timm_args` says how each of timm's
constructor arguments is held); the variant tables in `convnext_v1` / `convnext_v2`
are rows of it, and a `ConvNeXt` model saves it in its `.keras` config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from convnext_layers.errors import ConfigError
from convnext_layers.strides import OUTPUT_STRIDES, StageLayout, plan_layout
from convnext_layers.timm_args import (
    ACTIVATION_NAMES,
    NORM_NAMES,
    TIMM_ARGUMENTS,
    canonical_activation,
    split_timm_args,
    timm_args,
)

STEMS = ("patch", "overlap", "overlap_tiered", "overlap_act")
NORMS = tuple(dict.fromkeys(NORM_NAMES.values()))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """timm's make_divisible: round to the nearest multiple of `divisor`, never below
    90% of `value` (the middle width of the 'overlap_tiered' stem)."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


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
        patch_size: the patch stem's kernel and stride (4). A stride of 2 gives stage 0
            a norm + 2x2 stride-2 downsampling of its own, as timm (the
            face-recognition ConvNeXts: 112x112 inputs); the overlapping stems ignore it.
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
        in_chans: input channels (timm's `in_chans`: 3 for RGB, 1 for greyscale, ...).
        output_stride: 32, or 16 / 8 for timm's dilated backbones (dense tasks):
            the last stages keep their resolution and dilate their convolutions.
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
    in_chans: int = 3
    output_stride: int = 32

    def __post_init__(self):
        self._check_sizes()
        _choice("stem", self.stem, STEMS)
        _choice("norm", self.norm, NORMS)
        activation = canonical_activation(self.activation)
        if activation is None:
            _choice("activation", self.activation, ACTIVATION_NAMES)
        object.__setattr__(self, "activation", activation)
        for name in ("patch_size", "in_chans"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive int, got {getattr(self, name)!r}.")
        if self.output_stride not in OUTPUT_STRIDES or isinstance(self.output_stride, bool):
            raise ConfigError(
                f"output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))} (as timm), "
                f"got {self.output_stride!r}."
            )
        self._check_numbers()
        hidden = self.head_hidden_size
        if hidden is not None and (not _is_int(hidden) or hidden < 1):
            raise ConfigError(f"head_hidden_size must be a positive int or None, got {hidden!r}.")
        if hidden is not None and self.head_norm_first:
            raise ConfigError("head_hidden_size cannot be combined with head_norm_first (as timm).")

    def _check_sizes(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("depths", "widths"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise ConfigError(f"{name} must be a sequence of 4 ints, got {value!r}.")
            set_(name, tuple(value))
        kernel_sizes = self.kernel_sizes
        if isinstance(kernel_sizes, int) and not isinstance(kernel_sizes, bool):
            kernel_sizes = (kernel_sizes,) * 4
        if not hasattr(kernel_sizes, "__len__"):
            raise ConfigError(f"kernel_sizes must be an int or 4 ints, got {kernel_sizes!r}.")
        set_("kernel_sizes", tuple(kernel_sizes))
        for name, least in (("depths", 0), ("widths", 1), ("kernel_sizes", 1)):
            value = getattr(self, name)
            if len(value) != 4 or not all(_is_int(v) and v >= least for v in value):
                kind = "non-negative" if least == 0 else "positive"
                raise ConfigError(f"{name} must be 4 {kind} ints, got {value!r}.")
            set_(name, tuple(int(v) for v in value))
        if not all(k % 2 == 1 for k in self.kernel_sizes):
            raise ConfigError(
                f"kernel_sizes must be odd (timm's 'same' padding of an even kernel shrinks "
                f"the map and breaks the residual), got {self.kernel_sizes!r}."
            )

    def _check_numbers(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
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

    # -- derived -----------------------------------------------------------

    @property
    def num_features(self) -> int:
        """Channels of the last stage (the pooled feature size)."""
        return self.widths[-1]

    @property
    def pre_logits_size(self) -> int:
        """Size of timm's pre-logits features (`forward_head(pre_logits=True)`)."""
        return self.head_hidden_size or self.widths[-1]

    def layout(self, height=None, width=None) -> StageLayout:
        """Strides and dilations of every downsampling layer for an input of
        `height` x `width` (`convnext_layers.strides.plan_layout`)."""
        return plan_layout(
            height, width, self.stem, self.patch_size, self.output_stride, self.widths
        )

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
        `model_args` over a registered architecture's row `base`). The head's and
        training's arguments (num_classes, global_pool, drop rates) are left to the
        model (`timm_args.split_timm_args` gives them); anything the models cannot
        compute exactly is a `ConfigError` naming the argument and its value."""
        changes, _ = split_timm_args(model_args)
        try:
            return cls(**changes) if base is None else dataclasses.replace(base, **changes)
        except ConfigError as error:  # name timm's argument (dims, not widths)
            field = str(error).split(" ", 1)[0]
            for name, value in model_args.items():
                if TIMM_ARGUMENTS.get(name, (None, None))[1] == field:
                    raise ConfigError(f"timm argument {name}={value!r}: {error}") from None
            raise

    def to_timm_args(self) -> dict:
        """The arguments of `timm.models.convnext.ConvNeXt` that build this network."""
        return timm_args(self)

    def replace(self, **changes) -> ConvNeXtConfig:
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
