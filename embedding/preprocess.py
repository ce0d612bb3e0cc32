"""timm-exact evaluation preprocessing, with PIL and numpy only.

`Preprocessor(pretrained_cfg)` reproduces what
`timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))` does
to an RGB PIL image, without importing timm or torch:

1. resize so the shorter side becomes `floor(size / crop_pct)` with the
   configured PIL filter (torchvision's `Resize(int)`: the long side is
   `int(short_target * long / short)`; non-square targets use timm's
   `ResizeKeepRatio`, rounding both sides), skipped when the size is already
   right, as torchvision does;
2. centre crop to `input_size` (torchvision's `CenterCrop`: zero padding when the
   image is smaller, offsets `int(round((size - crop) / 2))`);
3. scale to [0, 1] in float32, subtract `mean`, divide by `std`.

The output is channels-last (H, W, C) float32, ready for the Keras models: C is the
model's input channels (`in_chans`, the first entry of the checkpoint's
`input_size`), 3 (RGB) for timm's ImageNet checkpoints, 1 for greyscale ones.

Each input is first read by `embedding.images.load_image` (the accepted kinds,
channel conversion, array layouts, 16-bit images, the pixel limit and the reduced
JPEG decoding are described there); float arrays are resized per channel in PIL's
32-bit float mode, so they are not quantised to 8 bits first.

Bounded resources: when the full resize would be large (an extreme aspect ratio: a
20000x1 image would become 5,120,000x256 before the crop) only the region the
centre crop keeps is resized, with the same filter taps as the full resize (equal
to it on every case the tests try), so memory stays of the order of the output.
Huge JPEGs are decoded down to twice the resize target (`Preprocessor.draft_size`).

The image-reading names (`load_image`, `as_input_list`, `check_input_kind`,
`describe_input` and their constants) live in `embedding.images` and are
re-exported here, their old home.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from embedding.images import (  # noqa: F401  (re-exported: their home before images.py)
    ACCEPTED_INPUTS,
    CHANNEL_MODES,
    CHANNEL_ORDERS,
    DATA_FORMATS,
    DEFAULT_MAX_PIXELS,
    DRAFT_ABOVE_PIXELS,
    FLOAT_TOLERANCE,
    LUMA_WEIGHTS,
    as_input_list,
    check_input_kind,
    describe_input,
    load_image,
)
from weights_convert.pretrained import channel_mean_std

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # timm's default when a config has none

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
# A full resize to more than this many times the crop's pixels resizes only the crop region
REGION_RESIZE_FACTOR = 8
# half-width of each PIL filter's kernel, in output pixels (PIL's Resample.c)
_FILTER_SUPPORT = {0: 0.5, 1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5, 5: 1.0}  # by Image.Resampling value


@dataclass(frozen=True)
class PreprocessConfig:
    """The evaluation transform of a timm `pretrained_cfg`."""

    input_size: tuple[int, int]  # (height, width)
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN  # one per channel
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3

    @classmethod
    def from_pretrained_cfg(
        cls, cfg: Mapping | None, use_test_size: bool = False, channels: int | None = None
    ):
        """As `timm.data.resolve_data_config({}, pretrained_cfg=cfg, use_test_size=...)`:
        with `use_test_size`, the checkpoint's `test_input_size` and `test_crop_pct`
        (where it has them) replace `input_size` and `crop_pct`. `channels`: the
        model's input channels (default the first entry of a 3-entry `input_size`,
        else 3); mean / std are fitted to them as timm does (`channel_mean_std`)."""
        cfg = dict(cfg or {})
        if use_test_size:
            if cfg.get("test_input_size") is not None:
                cfg["input_size"] = cfg["test_input_size"]
            if cfg.get("test_crop_pct"):
                cfg["crop_pct"] = cfg["test_crop_pct"]
        size = cfg.get("input_size") or (3, 224, 224)
        if isinstance(size, int):
            size = (3, size, size)
        size = tuple(int(s) for s in size)
        if len(size) == 3:
            if channels is not None and size[0] != channels:
                raise ValueError(
                    f"pretrained_cfg input_size {size} is for {size[0]}-channel inputs; the "
                    f"model takes {channels} channels."
                )
            channels = size[0]
            size = size[1:]
        channels = 3 if channels is None else int(channels)
        if channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels}.")
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"Bad input_size {cfg.get('input_size')!r} in pretrained_cfg.")
        interpolation = cfg.get("interpolation") or "bilinear"
        if interpolation not in _FILTERS:
            raise ValueError(
                f"Unsupported interpolation {interpolation!r}; one of {', '.join(_FILTERS)}."
            )
        crop_mode = cfg.get("crop_mode") or "center"
        if crop_mode not in ("center", "squash"):
            raise ValueError(f"Unsupported crop_mode {crop_mode!r}; 'center' or 'squash'.")
        mean, std = channel_mean_std(cfg, channels)
        return cls(
            input_size=size,
            crop_pct=float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
            crop_mode=crop_mode,
            interpolation=interpolation,
            mean=mean,
            std=std,
            channels=channels,
        )

    @property
    def scale_size(self) -> tuple[int, int]:
        return tuple(math.floor(s / self.crop_pct) for s in self.input_size)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step, for an image of `height` x `width`."""
        (sh, sw), (th, tw) = self.scale_size, self.input_size
        if self.crop_mode == "squash":
            return sh, sw
        if th == tw:  # torchvision Resize(int): shorter side -> sh, long side truncated
            short, long = min(height, width), max(height, width)
            new_short, new_long = sh, int(sh * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        # timm ResizeKeepRatio(longest=0): shortest relative side matches, both rounded
        ratio = min(height / sh, width / sw)
        return round(height / ratio), round(width / ratio)


# ----------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision CenterCrop on an (H, W, C) array: zero pad if needed, then crop."""
    ih, iw = array.shape[:2]
    if height > ih or width > iw:
        top = (height - ih) // 2 if height > ih else 0
        left = (width - iw) // 2 if width > iw else 0
        bottom = (height - ih + 1) // 2 if height > ih else 0
        right = (width - iw + 1) // 2 if width > iw else 0
        array = np.pad(array, ((top, bottom), (left, right), (0, 0)))
        ih, iw = array.shape[:2]
    top = int(round((ih - height) / 2.0))
    left = int(round((iw - width) / 2.0))
    return array[top : top + height, left : left + width]


def _kept_span(resized: int, target: int) -> tuple[int, int]:
    """(start, length) along one axis of the resized image that the centre crop keeps."""
    if resized > target:
        return int(round((resized - target) / 2.0)), target
    return 0, resized  # padded, not cropped: everything is kept


def _resize_region(image: Image.Image, new_w: int, new_h: int, span_x, span_y, resample):
    """The part of `image.resize((new_w, new_h))` that the centre crop keeps.

    PIL resizes in two passes, horizontal then vertical, and so does this: the
    short axis is resized whole (exactly as the full resize) and then cropped;
    the long axis is resized only over the kept span, with PIL's `box=`
    argument, reading only the source rows its kernel reaches. The box
    coordinates are rounded floats, so along the long axis a value can differ
    from the full resize by the rounding of one 8-bit step (smooth filters), or
    a nearest / box filter can take the neighbouring source pixel. Memory is of
    the order of the short side times the crop, whatever the aspect ratio.
    `span_x`, `span_y`: (start, length) from `_kept_span`.
    """
    width, height = image.size
    (x_start, x_len), (y_start, y_len) = span_x, span_y
    wide = new_w > new_h  # the long axis is x: resize x over the span only
    # source rows the vertical pass reads (all of them when y is resized whole)
    if wide or new_h == height:
        r0, r1 = 0, height
        if new_h == height:
            r0, r1 = y_start, y_start + y_len
    else:
        scale_y = height / new_h
        reach = _FILTER_SUPPORT[int(resample)] * max(1.0, scale_y) + 2
        r0 = max(0, math.floor(y_start * scale_y - reach))
        r1 = min(height, math.ceil((y_start + y_len) * scale_y + reach))
    strip = image.crop((0, r0, width, r1)) if (r0, r1) != (0, height) else image
    rows = r1 - r0
    if new_w == width:
        strip = strip.crop((x_start, 0, x_start + x_len, rows))
    elif wide:
        x0, x1 = x_start * width / new_w, (x_start + x_len) * width / new_w
        strip = strip.resize((x_len, rows), resample, box=(x0, 0, x1, rows))
    else:
        strip = strip.resize((new_w, rows), resample).crop((x_start, 0, x_start + x_len, rows))
    if new_h == height:
        return strip
    if not wide:
        y0, y1 = y_start * height / new_h - r0, (y_start + y_len) * height / new_h - r0
        return strip.resize((x_len, y_len), resample, box=(0, y0, x_len, y1))
    return strip.resize((x_len, new_h), resample).crop((0, y_start, x_len, y_start + y_len))


class Preprocessor:
    """Callable: one input -> float32 (H, W, C) array, normalised as timm evaluates.

    Built from a timm `pretrained_cfg` dict (or a `PreprocessConfig`); C is
    `channels` (the model's input channels; default the checkpoint's input_size).
    `max_pixels`: larger images are refused before decoding (None: no limit
    but PIL's own); `data_format`: the default layout of 3-D arrays (None:
    detect, see `load_image`).
    """

    def __init__(
        self,
        pretrained_cfg=None,
        *,
        use_test_size: bool = False,
        max_pixels=DEFAULT_MAX_PIXELS,
        data_format=None,
        channels: int | None = None,
    ):
        if isinstance(pretrained_cfg, PreprocessConfig):
            self.config = pretrained_cfg
        else:
            self.config = PreprocessConfig.from_pretrained_cfg(
                pretrained_cfg, use_test_size, channels
            )
        if max_pixels is not None and (isinstance(max_pixels, bool) or int(max_pixels) < 1):
            raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}.")
        if data_format not in DATA_FORMATS:
            raise ValueError(
                "data_format must be None, 'channels_last' or 'channels_first', "
                f"got {data_format!r}."
            )
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        self.data_format = data_format
        self._mean = np.asarray(self.config.mean, dtype=np.float32)
        self._std = np.asarray(self.config.std, dtype=np.float32)
        self._filter = _FILTERS[self.config.interpolation]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (*self.config.input_size, self.config.channels)

    def __repr__(self):
        return f"Preprocessor({self.config})"

    def _resize_crop_pil(self, image: Image.Image) -> np.ndarray:
        """Resize + centre crop of a PIL image (RGB or F), as an array before padding."""
        height, width = image.height, image.width
        new_h, new_w = self.config.resized_size(height, width)
        target_h, target_w = self.config.input_size
        if (new_h, new_w) == (height, width):
            return np.asarray(image)
        if new_h * new_w <= REGION_RESIZE_FACTOR * target_h * target_w:
            return np.asarray(image.resize((new_w, new_h), self._filter))  # timm's exact path
        spans = _kept_span(new_w, target_w), _kept_span(new_h, target_h)
        return np.asarray(_resize_region(image, new_w, new_h, *spans, self._filter))

    def resize_crop(self, image):
        """Resize + centre crop to (H, W, C), still in 0..255 (uint8 for PIL input and
        uint8 arrays, float32 otherwise)."""
        if isinstance(image, Image.Image):
            array = np.asarray(self._resize_crop_pil(image), dtype=np.uint8)
        elif image.dtype == np.uint8:  # channels PIL has no mode for: each as an "L" image
            array = self._resize_each_channel(image, "L", np.uint8)
        else:  # float (H, W, C) in [0, 1]: resize each channel in PIL's float mode
            array = self._resize_each_channel(image * np.float32(255.0), "F", np.float32)
        if array.ndim == 2:  # a one-channel ("L") image
            array = array[:, :, None]
        return _center_crop(array, *self.config.input_size)

    def _resize_each_channel(self, array, mode, dtype):
        planes = [
            self._resize_crop_pil(Image.fromarray(np.ascontiguousarray(array[:, :, c]), mode=mode))
            for c in range(array.shape[2])
        ]
        return np.stack([np.asarray(plane, dtype=dtype) for plane in planes], axis=2)

    def normalize(self, array: np.ndarray) -> np.ndarray:
        """0..255 values -> (x / 255 - mean) / std, float32."""
        x = array.astype(np.float32) / np.float32(255.0)
        return (x - self._mean) / self._std

    def draft_size(self) -> tuple[int, int]:
        """(width, height) a huge JPEG may be decoded down to: twice the resize target."""
        scale_h, scale_w = self.config.scale_size
        return 2 * scale_w, 2 * scale_h

    def load(self, item, channel_order: str = "rgb", index=None, data_format=None):
        """`load_image` with this preprocessor's limits and layout."""
        return load_image(
            item,
            channel_order,
            index,
            data_format=data_format or self.data_format,
            max_pixels=self.max_pixels,
            draft_size=self.draft_size(),
            channels=self.config.channels,
        )

    def __call__(
        self, item, channel_order: str = "rgb", index: int | None = None, data_format=None
    ) -> np.ndarray:
        image = self.load(item, channel_order, index, data_format)
        return np.ascontiguousarray(self.normalize(self.resize_crop(image)), dtype=np.float32)
