"""Reading one image input, with PIL and numpy only: `load_image` and its checks.

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
returned as float (H, W, C) arrays in [0, 1], which `embedding.preprocess` resizes
per channel in PIL's 32-bit float mode, so they are not quantised to 8 bits first.
EXIF orientation is not applied (timm does not either).

Channels-first arrays (C, H, W) are recognised when only the first axis can be
channels; when both could be (a (3, 512, 4) array is a 3x512 RGBA image or a
512x4 RGB one) the array is refused unless `data_format="channels_last"` or
`"channels_first"` says which.

Bounded resources, whatever the input:

* images with more than `max_pixels` pixels (default `DEFAULT_MAX_PIXELS`, PIL's
  own decompression-bomb limit) are refused before they are decoded (an
  `ImageLoadError`, so `on_error="skip"` skips them); PIL's own
  `DecompressionBombError` becomes the same error;
* JPEGs above `DRAFT_ABOVE_PIXELS` are decoded at a reduced DCT scale
  (`Image.draft`) down to `draft_size` (the `Preprocessor` asks for at least twice
  its resize target), which is not bit-equal to timm (it decodes at full size) but
  needs a fraction of the memory;
* a file that fails to load is closed at once, and a kept error holds no
  traceback, so thousands of bad files do not exhaust the open-file limit.

Also here: `as_input_list` (one input or many -> a list), `check_input_kind` and
`describe_input` (an input's name in error messages).
"""

from __future__ import annotations

import io
import os
import pathlib

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

CHANNEL_ORDERS = ("rgb", "bgr")
# PIL mode of an image of this many channels (what timm's loader converts to)
CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's "L" conversion (ITU-R 601-2)
DATA_FORMATS = (None, "channels_last", "channels_first")
# PIL's own warning limit; above twice this PIL refuses to open an image at all
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# JPEGs larger than this are decoded at a reduced DCT scale (see the module docstring)
DRAFT_ABOVE_PIXELS = 24_000_000
# float images may exceed [0, 1] by this much (rounding), and are clipped; beyond it, refused
FLOAT_TOLERANCE = 1e-3
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
