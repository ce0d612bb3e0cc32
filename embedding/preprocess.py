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

The output is channels-last (H, W, 3) float32, ready for the Keras models.

Inputs (`load_image`): a path (str or `pathlib.Path`), raw encoded bytes, a
binary file object, a PIL image, or a numpy array (H, W), (H, W, 1), (H, W, 3)
or (H, W, 4) of uint8 (0..255), bool, or float in [0, 1]. Grey, palette, RGBA
and other PIL modes go through `Image.convert("RGB")` (alpha is dropped, exactly
as timm's dataset loader does). Numpy arrays are RGB unless
`channel_order="bgr"` is given (OpenCV frames). uint8 arrays take the exact
PIL path; float arrays are resized per channel in PIL's 32-bit float mode, so
they are not quantised to 8 bits first. EXIF orientation is not applied (timm
does not either).
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


class ImageLoadError(ValueError):
    """An input could not be read as an image.

    `index` is its position in the batch (None for a single image), `name` a
    short description of the input (its path, or its type and shape), `reason`
    what went wrong.
    """

    def __init__(self, name: str, reason: str, index: int | None = None):
        self.name = name
        self.reason = reason
        self.index = index
        where = f"input #{index} ({name})" if index is not None else f"input {name}"
        super().__init__(f"Cannot use {where} as an image: {reason}")


def describe_input(item) -> str:
    """A short human-readable name for an input: its path, or its type and shape."""
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
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping | None, use_test_size: bool = False):
        """As `timm.data.resolve_data_config({}, pretrained_cfg=cfg, use_test_size=...)`:
        with `use_test_size`, the checkpoint's `test_input_size` and `test_crop_pct`
        (where it has them) replace `input_size` and `crop_pct`."""
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
            if size[0] != 3:
                raise ValueError(f"Only 3-channel models are supported; input_size={size}.")
            size = size[1:]
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
        mean = tuple(float(v) for v in (cfg.get("mean") or IMAGENET_MEAN))
        std = tuple(float(v) for v in (cfg.get("std") or IMAGENET_STD))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean/std must have 3 values, got {mean!r} and {std!r}.")
        return cls(
            input_size=size,
            crop_pct=float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
            crop_mode=crop_mode,
            interpolation=interpolation,
            mean=mean,
            std=std,
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


def _open_pil(source) -> Image.Image:
    image = Image.open(source)
    image.load()  # decode now, so a truncated file fails here and not later
    return image


def _array_to_image(array: np.ndarray, channel_order: str):
    """uint8/bool arrays -> PIL RGB image; float arrays -> float32 (H, W, 3) in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(
            f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, got shape "
            f"{array.shape} (channels-first arrays must be transposed to HWC first)"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"empty image of shape {array.shape}")
    if array.ndim == 3 and channel_order == "bgr":
        array = array[:, :, [2, 1, 0, 3][: array.shape[2]]]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype == np.uint8:
        image = Image.fromarray(np.ascontiguousarray(array))
        return image if image.mode == "RGB" else image.convert("RGB")
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise ValueError("float image contains NaN or infinity")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float images must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}] "
                "(pass uint8 for 0..255 data)"
            )
        if array.ndim == 2:
            return np.repeat(array[:, :, None], 3, axis=2)
        return np.ascontiguousarray(array[:, :, :3])  # alpha dropped, as convert("RGB")
    raise ValueError(f"unsupported array dtype {array.dtype} (use uint8, bool or float in [0, 1])")


def load_image(item, channel_order: str = "rgb", index: int | None = None):
    """Read one input as an RGB PIL image (or a float (H, W, 3) array in [0, 1]).

    Raises `ImageLoadError` naming the input (and `index`, if given) when it is
    unreadable or of an unsupported kind.
    """
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}.")
    try:
        if isinstance(item, Image.Image):
            image = item
        elif isinstance(item, np.ndarray):
            return _array_to_image(item, channel_order)
        elif isinstance(item, (str, os.PathLike)):
            image = _open_pil(os.fspath(item))
        elif isinstance(item, (bytes, bytearray, memoryview)):
            image = _open_pil(io.BytesIO(bytes(item)))
        elif hasattr(item, "read"):
            image = _open_pil(item)
        else:
            raise TypeError(
                "unsupported input type; use a path, bytes, a PIL image or an (H, W, C) numpy array"
            )
        if image.width < 1 or image.height < 1:
            raise ValueError("empty image")
        return image if image.mode == "RGB" else image.convert("RGB")
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(describe_input(item), "file not found", index) from None
    except UnidentifiedImageError:
        raise ImageLoadError(
            describe_input(item), "not a readable image file (corrupt or unknown format)", index
        ) from None
    except (OSError, ValueError, TypeError, SyntaxError) as error:  # PIL raises all of these
        raise ImageLoadError(describe_input(item), str(error) or type(error).__name__, index) from (
            error
        )


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


class Preprocessor:
    """Callable: one input -> float32 (H, W, 3) array, normalised as timm evaluates.

    Built from a timm `pretrained_cfg` dict (or a `PreprocessConfig`).
    """

    def __init__(self, pretrained_cfg=None, use_test_size: bool = False):
        if isinstance(pretrained_cfg, PreprocessConfig):
            self.config = pretrained_cfg
        else:
            self.config = PreprocessConfig.from_pretrained_cfg(pretrained_cfg, use_test_size)
        self._mean = np.asarray(self.config.mean, dtype=np.float32)
        self._std = np.asarray(self.config.std, dtype=np.float32)
        self._filter = _FILTERS[self.config.interpolation]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (*self.config.input_size, 3)

    def __repr__(self):
        return f"Preprocessor({self.config})"

    def resize_crop(self, image):
        """Resize + centre crop, still in 0..255 (uint8 for PIL input, float32 otherwise)."""
        if isinstance(image, Image.Image):
            height, width = image.height, image.width
            new_h, new_w = self.config.resized_size(height, width)
            if (new_h, new_w) != (height, width):
                image = image.resize((new_w, new_h), self._filter)
            array = np.asarray(image, dtype=np.uint8)
        else:  # float (H, W, 3) in [0, 1]: resize each channel in PIL's float mode
            height, width = image.shape[:2]
            new_h, new_w = self.config.resized_size(height, width)
            channels = image * np.float32(255.0)
            if (new_h, new_w) != (height, width):
                channels = np.stack(
                    [
                        np.asarray(
                            Image.fromarray(
                                np.ascontiguousarray(channels[:, :, c]), mode="F"
                            ).resize((new_w, new_h), self._filter),
                            dtype=np.float32,
                        )
                        for c in range(3)
                    ],
                    axis=2,
                )
            array = channels
        return _center_crop(array, *self.config.input_size)

    def normalize(self, array: np.ndarray) -> np.ndarray:
        """0..255 values -> (x / 255 - mean) / std, float32."""
        x = array.astype(np.float32) / np.float32(255.0)
        return (x - self._mean) / self._std

    def __call__(self, item, channel_order: str = "rgb", index: int | None = None) -> np.ndarray:
        image = load_image(item, channel_order=channel_order, index=index)
        return np.ascontiguousarray(self.normalize(self.resize_crop(image)), dtype=np.float32)
