"""Image loading and timm-exact evaluation preprocessing, with PIL and numpy only.

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

Inputs (`load_image`): a path (str or `pathlib.Path`), raw encoded bytes, a
binary file object, a PIL image, or a numpy array (H, W), (H, W, 1), (H, W, 3)
or (H, W, 4) of uint8 (0..255), uint16 (0..65535), bool, or float in [0, 1].
Images are brought to the model's channels as timm's dataset loader does
(`Image.convert(mode)`, mode "RGB" for 3 channels, "L" for 1, "LA" for 2, "RGBA"
for 4): for an RGB model grey, palette and RGBA images become RGB (alpha dropped);
for a greyscale model colour images become luma, one channel, never replicated to
three (float arrays use the same ITU-R 601-2 weights). An array of any other
channel count is taken as it is when it matches the model. 16-bit images (PIL modes
I;16*, I, and F) are first scaled to 8 bits (`round(v / 257)`), where PIL alone
would clip them to white. Numpy arrays are RGB unless `channel_order="bgr"` is
given (OpenCV frames). uint8 arrays take the exact PIL path; float arrays are
resized per channel in PIL's 32-bit float mode, so they are not quantised to 8
bits first. EXIF orientation is not applied (timm does not either).

Channels-first arrays (C, H, W) are recognised when only the first axis can be
channels; when both could be (a (3, 512, 4) array is a 3x512 RGBA image or a
512x4 RGB one) the array is refused unless `data_format="channels_last"` or
`"channels_first"` says which.

Bounded resources, whatever the input:

* images with more than `max_pixels` pixels (default `DEFAULT_MAX_PIXELS`, PIL's
  own decompression-bomb limit) are refused before they are decoded (an
  `ImageLoadError`, so `on_error="skip"` skips them); PIL's own
  `DecompressionBombError` becomes the same error;
* when the full resize would be large (an extreme aspect ratio: a 20000x1 image
  would become 5,120,000x256 before the crop) only the region the centre crop
  keeps is resized, with the same filter taps as the full resize (equal to it
  on every case the tests try), so memory stays of the order of the output;
* JPEGs above `DRAFT_ABOVE_PIXELS` are decoded at a reduced DCT scale
  (`Image.draft`) that still leaves at least twice the resize target, which is
  not bit-equal to timm (it decodes at full size) but needs a fraction of the
  memory;
* a file that fails to load is closed at once, and a kept error holds no
  traceback, so thousands of bad files do not exhaust the open-file limit.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from convnext_common.files import open_regular_file
from embedding.errors import (
    EmptyInputError,
    ImageLoadError,
    InputTypeError,
    TooManyPixelsError,
    UnsupportedInputError,
    without_traceback,
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
CHANNEL_ORDERS = ("rgb", "bgr")
# PIL mode of an image of this many channels (what timm's loader converts to)
CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's "L" conversion (ITU-R 601-2)
DATA_FORMATS = (None, "channels_last", "channels_first")
# PIL's own warning limit; above twice this PIL refuses to open an image at all
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# JPEGs larger than this are decoded at a reduced DCT scale (see the module docstring)
DRAFT_ABOVE_PIXELS = 24_000_000
# A full resize to more than this many times the crop's pixels resizes only the crop region
REGION_RESIZE_FACTOR = 8
# float images may exceed [0, 1] by this much (rounding), and are clipped; beyond it, refused
FLOAT_TOLERANCE = 1e-3
# half-width of each PIL filter's kernel, in output pixels (PIL's Resample.c)
_FILTER_SUPPORT = {0: 0.5, 1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5, 5: 1.0}  # by Image.Resampling value
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ACCEPTED_INPUTS = (
    "a path (str or pathlib.Path), encoded bytes, a binary file object, a PIL image, "
    "or an (H, W[, C]) numpy array"
)


def describe_input(item) -> str:
    """A short human-readable name for an input: its path, or its type and shape."""
    if item is None or isinstance(item, (bool, int, float, complex)):
        return repr(item)
    if isinstance(item, (str, pathlib.PurePath)):
        return str(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{type(item).__name__} of {len(item)} bytes>"
    if isinstance(item, Image.Image):
        return f"<PIL image {item.mode} {item.width}x{item.height}>"
    if isinstance(item, np.ndarray):
        return f"<ndarray shape={item.shape} dtype={item.dtype}>"
    name = getattr(item, "name", None)
    if isinstance(name, str):
        return name
    return f"<{type(item).__module__}.{type(item).__qualname__}>"


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
# Loading
# ----------------------------------------------------------------------------


def _is_single(inputs) -> bool:
    if isinstance(inputs, np.ndarray):
        return inputs.ndim <= 3
    if hasattr(inputs, "read"):  # a binary file object is one image, not a list of lines
        return True
    return isinstance(inputs, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image))


def as_input_list(inputs) -> list:
    """`inputs` as a list of single images: one image -> [it]; a list, tuple, other
    iterable or (N, H, W, C) array -> its items.

    Raises `InputTypeError` (a `TypeError`) for None, numbers, mappings and other
    non-images, and `EmptyInputError` (a `ValueError`) for no images at all.
    """
    if _is_single(inputs):
        return [inputs]
    if (
        inputs is None
        or isinstance(inputs, (dict, bool, int, float, complex))
        or not hasattr(inputs, "__iter__")
    ):
        raise InputTypeError(
            f"inputs must be one image or a list of images ({ACCEPTED_INPUTS}); "
            f"got {describe_input(inputs)}"
        )
    items = list(inputs)
    if not items:
        raise EmptyInputError("inputs is empty: give at least one image")
    return items


class _PixelLimitExceeded(ValueError):
    """Raised by `_check_pixels`; `load_image` reports it as a `TooManyPixelsError`."""


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"empty image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise _PixelLimitExceeded(
            f"{width}x{height} = {width * height:,} pixels is more than max_pixels="
            f"{max_pixels:,} (a decompression bomb?); raise max_pixels (--max-pixels) "
            "to accept larger images"
        )


def _decode(source, max_pixels: int | None, draft_size) -> Image.Image:
    """Open and decode an encoded image; the file is closed whatever happens.

    The pixel count is checked from the header, before anything is decoded.
    `draft_size` (width, height): for a JPEG above `DRAFT_ABOVE_PIXELS`, decode
    at the smallest DCT scale that keeps at least this size.
    """
    with Image.open(source) as image:  # __exit__ closes the file, keeps decoded pixels
        _check_pixels(image.width, image.height, max_pixels)
        if (
            draft_size is not None
            and image.format == "JPEG"
            and image.width * image.height > DRAFT_ABOVE_PIXELS
        ):
            image.draft(None, (max(1, draft_size[0]), max(1, draft_size[1])))
        try:
            image.load()  # decode now, so a truncated file fails here and not later
        except (OSError, SyntaxError, EOFError, ValueError) as error:
            image.close()  # also releases a memory map of the file
            reason = str(error) or type(error).__name__
            raise ValueError(f"corrupt or truncated {image.format} image data ({reason})") from None
        except BaseException:
            image.close()
            raise
    return image


def _sixteen_bit_to_8(image: Image.Image) -> Image.Image:
    """16-bit grey (I;16*, I: 0..65535) or float (F) PIL image -> 8-bit "L", round(v / 257).

    Mode F holds no bit depth: values within [0, 1] are taken as [0, 1], within
    [0, 255] as 8-bit and larger ones as 16-bit.
    """
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("float (mode F) image contains NaN or infinity")
        top = float(values.max(initial=0.0))
        scale = 1.0 if top <= 1.0 + FLOAT_TOLERANCE else 255.0 if top <= 255.0 else 65535.0
        scaled = np.rint(np.clip(values / scale, 0.0, 1.0) * 255.0)
    else:
        values = np.clip(values.astype(np.int64), 0, 65535)
        scaled = (values * 255 + 32767) // 65535  # round(v * 255 / 65535), in integers
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _to_mode(image: Image.Image, channels: int = 3):
    """A PIL image in the mode of `channels` channels (`CHANNEL_MODES`), as timm's loader
    converts it; for other channel counts a float (H, W, channels) array when the
    image has that many channels (it never has: PIL holds at most 4), else an error."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = _sixteen_bit_to_8(image)
    mode = CHANNEL_MODES.get(channels)
    if mode is None:
        raise ValueError(
            f"a {channels}-channel model takes (H, W, {channels}) arrays; a {image.mode} "
            f"image has {len(image.getbands())}"
        )
    return image if image.mode == mode else image.convert(mode)


def _channels_last(array: np.ndarray, data_format: str | None, channels: int = 3) -> np.ndarray:
    """A 3-D array in (H, W, C) layout, following `data_format` (None: detect)."""
    if array.ndim != 3:
        return array
    counts = {1, 3, 4, channels}
    first, last = array.shape[0] in counts, array.shape[2] in counts
    if data_format is None:
        if first and last:
            raise ValueError(
                f"shape {array.shape} is ambiguous: a {array.shape[0]}x{array.shape[1]} image "
                f"with {array.shape[2]} channels, or a {array.shape[1]}x{array.shape[2]} one "
                f"with {array.shape[0]} channels first; pass data_format='channels_last' or "
                "'channels_first'"
            )
        data_format = "channels_first" if first else "channels_last"
    if data_format == "channels_first":
        if not first:
            raise ValueError(
                f"data_format='channels_first' needs {', '.join(map(str, sorted(counts)))} "
                f"channels on the first axis, got shape {array.shape}"
            )
        return np.moveaxis(array, 0, -1)
    return array


def _float_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """A float (H, W) / (H, W, C) image in [0, 1] with `channels` channels, converted as
    PIL converts (grey <-> RGB[A], luma by `LUMA_WEIGHTS`, opaque alpha added)."""
    if array.ndim == 2:
        array = array[:, :, None]
    have = array.shape[2]
    if have == channels:
        return np.ascontiguousarray(array)
    if have not in (1, 3, 4) or channels not in CHANNEL_MODES:
        raise ValueError(f"a {have}-channel array cannot feed a {channels}-channel model")
    colour = array[:, :, :3] if have >= 3 else np.repeat(array[:, :, :1], 3, axis=2)
    alpha = array[:, :, 3:4] if have == 4 else np.ones_like(array[:, :, :1])
    if channels == 3:
        return np.ascontiguousarray(colour)
    if channels == 4:
        return np.concatenate([colour, alpha], axis=2)
    grey = (
        array[:, :, :1] if have == 1 else (colour @ np.asarray(LUMA_WEIGHTS, np.float32))[..., None]
    )
    return np.ascontiguousarray(grey if channels == 1 else np.concatenate([grey, alpha], axis=2))


def _uint8_channels(array: np.ndarray, channels: int):
    """A uint8 (H, W[, C]) array as a PIL image of `channels` channels (the exact PIL
    conversion timm's loader makes), or as the (H, W, C) array itself when it has
    `channels` channels and no PIL mode does."""
    have = 1 if array.ndim == 2 else array.shape[2]
    if have == channels and channels not in CHANNEL_MODES:
        return np.ascontiguousarray(array)
    if have not in (1, 3, 4) or channels not in CHANNEL_MODES:
        raise ValueError(f"a {have}-channel array cannot feed a {channels}-channel model")
    image = Image.fromarray(np.ascontiguousarray(array if array.ndim == 2 else array[..., :have]))
    return _to_mode(image, channels)


def _array_to_image(
    array: np.ndarray, channel_order: str, data_format: str | None = None, max_pixels=None,
    channels: int = 3,
):  # fmt: skip
    """uint8/uint16/bool arrays -> PIL image of `channels` channels (an (H, W, C) uint8
    array when no PIL mode has that many); float arrays -> float32 (H, W, channels)."""
    array = _channels_last(array, data_format, channels)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in {3, 4, channels}):
        raise ValueError(
            f"expected an (H, W) array or (H, W, C) / (C, H, W) with 1, 3 or 4 channels "
            f"(or the model's {channels}), got shape {array.shape}"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"empty image of shape {array.shape}")
    _check_pixels(array.shape[1], array.shape[0], max_pixels)
    if array.ndim == 3 and channel_order == "bgr" and array.shape[2] in (3, 4):
        array = array[:, :, [2, 1, 0, 3][: array.shape[2]]]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype == np.uint16:  # 16-bit (OpenCV's IMREAD_UNCHANGED): as 16-bit PIL images
        array = ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if array.dtype == np.uint8:
        return _uint8_channels(array, channels)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise ValueError("float image contains NaN or infinity")
        lo, hi = float(array.min()), float(array.max())
        if lo < -FLOAT_TOLERANCE or hi > 1.0 + FLOAT_TOLERANCE:
            raise ValueError(
                f"float images must lie in [0, 1], found values in [{lo:.6g}, {hi:.6g}] "
                "(pass uint8 for 0..255 data)"
            )
        if lo < 0.0 or hi > 1.0:  # rounding error within FLOAT_TOLERANCE
            array = np.clip(array, 0.0, 1.0)
        return _float_channels(array, channels)
    raise ValueError(
        f"unsupported array dtype {array.dtype} (use uint8, uint16, bool or float in [0, 1])"
    )


def check_input_kind(item, index: int | None = None) -> None:
    """Raise `UnsupportedInputError` (a `TypeError`) unless `item` is a kind of image input."""
    if isinstance(
        item, (Image.Image, np.ndarray, str, os.PathLike, bytes, bytearray, memoryview)
    ) or hasattr(item, "read"):
        return
    raise UnsupportedInputError(
        describe_input(item),
        f"unsupported input type {type(item).__name__}; use {ACCEPTED_INPUTS}",
        index,
    )


def _load(item, channel_order, data_format, max_pixels, draft_size, channels=3):
    check_input_kind(item)
    if isinstance(item, np.ndarray):
        return _array_to_image(item, channel_order, data_format, max_pixels, channels)
    if isinstance(item, Image.Image):
        _check_pixels(item.width, item.height, max_pixels)
        if getattr(item, "tile", None):  # opened but not decoded yet: decode it here
            item.load()
        return _to_mode(item, channels)
    if isinstance(item, (bytes, bytearray, memoryview)):
        item = io.BytesIO(bytes(item))
    elif not hasattr(item, "read"):
        with open_regular_file(os.fspath(item)) as file:  # never a pipe or a device
            return _to_mode(_decode(file, max_pixels, draft_size), channels)
    return _to_mode(_decode(item, max_pixels, draft_size), channels)


def _failure_reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(error, UnidentifiedImageError):
        return "not a readable image file (corrupt or unknown format)"
    if isinstance(error, Image.DecompressionBombError):
        return (
            f"{error} (refused by PIL; raise PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels "
            "to accept it)"
        )
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, MemoryError):
        return "out of memory while decoding"
    if isinstance(error, (OSError, SyntaxError, EOFError)):  # PIL, reading a damaged file
        return f"corrupt or truncated image file ({str(error) or type(error).__name__})"
    return str(error) or type(error).__name__


def load_image(
    item,
    channel_order: str = "rgb",
    index: int | None = None,
    *,
    data_format: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size=None,
    channels: int = 3,
):
    """Read one input as a PIL image of `channels` channels, RGB by default (or a float
    (H, W, channels) array in [0, 1]; a uint8 one for channel counts PIL has no mode for).

    Args:
        item: see the module docstring for the accepted kinds.
        channel_order: "rgb", or "bgr" for OpenCV arrays (numpy inputs only).
        index: the input's position in a batch, for the error message.
        data_format: layout of a 3-D array: None (detect; ambiguous shapes are
            refused), "channels_last" (H, W, C) or "channels_first" (C, H, W).
        max_pixels: refuse larger images before decoding them (None: no limit
            but PIL's own).
        draft_size: (width, height) a JPEG above `DRAFT_ABOVE_PIXELS` may be
            decoded down to (never below).
        channels: the model's input channels (3: RGB; 1: greyscale, converted as
            PIL's "L", not replicated; see the module docstring).

    Raises `ImageLoadError` naming the input (and `index`) when it cannot be
    read, and `UnsupportedInputError` (an `ImageLoadError` and a `TypeError`)
    when it is no kind of image input at all. The error carries no traceback
    and no chained exception, and every file opened for it is closed.
    """
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}.")
    if data_format not in DATA_FORMATS:
        raise ValueError(
            f"data_format must be None, 'channels_last' or 'channels_first', got {data_format!r}."
        )
    try:
        return _load(item, channel_order, data_format, max_pixels, draft_size, channels)
    except ImageLoadError as error:
        failure = error
        if failure.index is None and index is not None:
            failure = type(error)(error.name, error.reason, index)
    except (_PixelLimitExceeded, Image.DecompressionBombError) as error:
        failure = TooManyPixelsError(describe_input(item), _failure_reason(error), index)
    except (OSError, ValueError, TypeError, SyntaxError, EOFError, MemoryError) as error:
        # PIL raises all of these for corrupt data
        failure = ImageLoadError(describe_input(item), _failure_reason(error), index)
    # raised outside the except blocks: no __context__ keeps the failed frames (and files) alive
    raise without_traceback(failure)


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
