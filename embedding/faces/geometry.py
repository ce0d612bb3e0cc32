"""Face geometry: boxes and crops, landmarks, and alignment onto the ArcFace template.

Conventions (boxes in pixels, `[x1, y1, x2, y2]` or `[x, y, width, height]`; landmarks
as (x, y) pixel centres, five in image order) are given in `embedding.faces`.
scikit-image (the `faces` extra) is imported when an alignment is first made.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from embedding.errors import FACES_EXTRA, MissingExtraError
from embedding.images import load_image

BOX_FORMATS = ("xyxy", "xywh")
_BOX_FORMS = (
    "[x1, y1, x2, y2] (box_format='xyxy') or [x, y, width, height] (box_format='xywh'), in pixels"
)
DEFAULT_MARGIN = 0.2
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
ARCFACE_SIZE = 112
# insightface's `arcface_dst` (insightface/utils/face_align.py): where the 5 landmarks sit in a
# 112x112 aligned face, (x, y) pixel centres, in the order of LANDMARK_NAMES.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)


def _import_skimage_transform():
    # the `faces` extra: imported on first use, so faces without alignment need no scikit-image
    try:
        import skimage.transform
    except ImportError as error:
        raise MissingExtraError(f"Face alignment needs scikit-image: {FACES_EXTRA}.") from error
    return skimage.transform


# ----------------------------------------------------------------------------
# Boxes and crops
# ----------------------------------------------------------------------------


def parse_box(box, box_format: str = "xyxy") -> tuple[float, float, float, float]:
    """A box in either format -> (x1, y1, x2, y2) floats; ValueError naming the problem."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}.")
    try:
        values = np.asarray(box, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"box must be 4 numbers, {_BOX_FORMS}; got {box!r}.") from None
    if values.shape != (4,):
        raise ValueError(f"box must be 4 numbers, {_BOX_FORMS}; got shape {values.shape}: {box!r}.")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"box has NaN or infinite coordinates: {values.tolist()}.")
    x1, y1, a, b = (float(v) for v in values)
    if box_format == "xywh":
        if a <= 0 or b <= 0:
            raise ValueError(
                f"box [x, y, width, height] = {values.tolist()} needs width > 0 and height > 0."
            )
        return x1, y1, x1 + a, y1 + b
    if a <= x1 or b <= y1:
        raise ValueError(
            f"box [x1, y1, x2, y2] = {values.tolist()} needs x1 < x2 and y1 < y2 "
            "(for [x, y, width, height] pass box_format='xywh')."
        )
    return x1, y1, a, b


def face_crop_box(
    box, width: int, height: int, margin: float = DEFAULT_MARGIN, box_format: str = "xyxy"
) -> tuple[int, int, int, int]:
    """The integer pixel region (left, top, right, bottom) a crop of `box` takes.

    `margin` is added on each side as a fraction of the box's width (left and right) and height
    (top and bottom); the region then extends outwards to whole pixels (floor / ceil, so it
    always contains the box) and is clamped to the `width` x `height` image. Slice it as
    `array[top:bottom, left:right]` or `pil_image.crop((left, top, right, bottom))`.
    """
    x1, y1, x2, y2 = parse_box(box, box_format)
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be >= 0 (a fraction of the box size), got {margin}.")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise ValueError(
            f"box [x1, y1, x2, y2] = {[x1, y1, x2, y2]} lies entirely outside the "
            f"{width}x{height} image."
        )
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    left = max(0, math.floor(x1 - dx))
    top = max(0, math.floor(y1 - dy))
    right = min(int(width), math.ceil(x2 + dx))
    bottom = min(int(height), math.ceil(y2 + dy))
    return left, top, right, bottom


def image_size(picture) -> tuple[int, int]:
    """(width, height) of what `load_image` returns (PIL image or float (H, W, 3) array)."""
    if isinstance(picture, Image.Image):
        return picture.width, picture.height
    return picture.shape[1], picture.shape[0]


def crop_region(picture, region):
    left, top, right, bottom = region
    if isinstance(picture, Image.Image):
        return picture.crop(region)
    return np.ascontiguousarray(picture[top:bottom, left:right])


def crop_face(
    image,
    box,
    margin: float = DEFAULT_MARGIN,
    box_format: str = "xyxy",
    channel_order: str = "rgb",
):
    """Crop `box` plus `margin` (fraction of the box size, each side), clamped to the image.

    `image`: anything the embedder takes (path, bytes, PIL image, HWC uint8 or [0, 1] float
    array; `channel_order="bgr"` for OpenCV frames). Returns RGB: a PIL image, or a float32
    (h, w, 3) array for float input. The region is `face_crop_box(box, W, H, margin)`.
    """
    picture = load_image(image, channel_order=channel_order)
    return crop_region(picture, face_crop_box(box, *image_size(picture), margin, box_format))


# ----------------------------------------------------------------------------
# Landmarks and alignment
# ----------------------------------------------------------------------------


def parse_landmarks(landmarks) -> np.ndarray:
    """(5, 2) or (2, 2) float64 (x, y) pixel landmarks, five in image order (see module doc)."""
    try:
        points = np.asarray(landmarks, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"landmarks must be numbers, got {landmarks!r}.") from None
    if points.shape in ((10,), (4,)):  # flat x0, y0, x1, y1, ...
        points = points.reshape(-1, 2)
    if points.shape not in ((5, 2), (2, 2)):
        raise ValueError(
            "landmarks must be 5 (x, y) points (left eye, right eye, nose tip, left and right "
            f"mouth corner) or the 2 eyes, as a (5, 2) or (2, 2) array; got shape {points.shape}."
        )
    if not np.all(np.isfinite(points)):
        raise ValueError("landmarks contain NaN or infinite coordinates.")
    if np.linalg.norm(points[1] - points[0]) < 1e-6:
        raise ValueError(f"landmarks: the two eyes coincide at {points[0].tolist()}.")
    if len(points) == 5:
        # Geometric order check: with x right and y down, the eye vector (left -> right eye)
        # turns clockwise onto the eye-to-mouth vector, at any in-plane rotation. A negative
        # turn means left and right were named from the subject's side: swap both pairs.
        eyes = points[1] - points[0]
        down = (points[3] + points[4]) / 2 - (points[0] + points[1]) / 2
        if eyes[0] * down[1] - eyes[1] * down[0] < 0:
            points = points[[1, 0, 2, 4, 3]]
    return points


def _output_size(output_size) -> tuple[int, int]:
    """int or (height, width) -> (height, width)."""
    if isinstance(output_size, (int, np.integer)):
        output_size = (output_size, output_size)
    height, width = (int(v) for v in output_size)
    if height < 1 or width < 1:
        raise ValueError(f"output_size must be positive, got {output_size}.")
    return height, width


def landmark_template(output_size=ARCFACE_SIZE) -> np.ndarray:
    """`ARCFACE_TEMPLATE` scaled to `output_size` (int or (height, width)): (5, 2) float64.

    The 112-pixel template is scaled by min(height, width) / 112 as an image (a pixel centre x
    goes to (x + 0.5) * s - 0.5) and centred along the longer side.
    """
    height, width = _output_size(output_size)
    scale = min(height, width) / ARCFACE_SIZE
    offset = np.array([width, height]) / 2 - ARCFACE_SIZE * scale / 2
    return (ARCFACE_TEMPLATE + 0.5) * scale - 0.5 + offset


def _estimate_similarity(source: np.ndarray, target: np.ndarray):
    transform = _import_skimage_transform()
    if hasattr(transform.SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        estimate = transform.SimilarityTransform.from_estimate(source, target)
        ok = bool(estimate)
    else:
        estimate = transform.SimilarityTransform()
        ok = estimate.estimate(source, target)
    if not ok or not np.all(np.isfinite(estimate.params)):
        raise ValueError(f"landmarks {source.tolist()} are degenerate: no similarity transform.")
    return estimate


def estimate_alignment(landmarks, output_size=ARCFACE_SIZE):
    """Least-squares similarity transform (a `skimage.transform.SimilarityTransform`) mapping
    image (x, y) pixels onto the template at `output_size`: 5 landmarks onto the 5-point
    template, or 2 eyes onto the template's eyes (rotation and scale from the eyes)."""
    points = parse_landmarks(landmarks)
    template = landmark_template(output_size)[: len(points)]
    return _estimate_similarity(points, template)


def warp_to_template(picture, transform, output_size):
    """Warp an RGB PIL image / float array by `transform` (image -> output) to output_size."""
    warp = _import_skimage_transform().warp
    height, width = _output_size(output_size)
    is_pil = isinstance(picture, Image.Image)
    source = np.asarray(picture) if is_pil else picture
    warped = warp(
        source,
        transform.inverse.params,  # output pixel -> image pixel
        output_shape=(height, width, 3),
        order=1,
        mode="constant",
        cval=0.0,
        preserve_range=True,
    )
    if is_pil:
        return Image.fromarray(np.clip(np.rint(warped), 0, 255).astype(np.uint8))
    return np.clip(warped, 0.0, 1.0).astype(np.float32)


def align_face(image, landmarks, output_size=ARCFACE_SIZE, channel_order: str = "rgb"):
    """The face warped so its landmarks land on the ArcFace template at `output_size`.

    `landmarks`: (5, 2) or the 2 eyes (2, 2), (x, y) pixels of `image` (see module doc).
    `output_size`: int or (height, width); `Embedder.embed_faces` uses the model's input size.
    Returns RGB like `crop_face` (PIL image; float32 array for float input); pixels that come
    from outside the image are black.
    """
    picture = load_image(image, channel_order=channel_order)
    return warp_to_template(picture, estimate_alignment(landmarks, output_size), output_size)
