"""The face pipeline: a frame -> detections (or given boxes) -> aligned or cropped faces
-> their embeddings, in one batch of the embedder's model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from embedding.faces.detectors import (
    DEFAULT_MIN_SIZE,
    Detection,
    find_faces,
    make_detection,
    select_faces,
)
from embedding.faces.geometry import (
    DEFAULT_MARGIN,
    crop_region,
    estimate_alignment,
    face_crop_box,
    image_size,
    warp_to_template,
)
from embedding.gallery import l2_normalize
from embedding.images import load_image

# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Face:
    """One face of a frame and its embedding.

    box: (x1, y1, x2, y2) pixels as detected or given; score: the detector's (None for given
    boxes); landmarks: (5, 2) / (2, 2) or None; embedding: (D,) float32, unit norm;
    aligned: warped onto the template (else cropped); crop_box: the (left, top, right, bottom)
    pixels cropped when not aligned, else None.
    """

    box: tuple[float, float, float, float]
    score: float | None
    landmarks: np.ndarray | None
    embedding: np.ndarray
    aligned: bool
    crop_box: tuple[int, int, int, int] | None = None


def face_image(
    picture, detection: Detection, output_size, align: bool = True, margin: float = DEFAULT_MARGIN
):
    """(crop, crop_box or None): the aligned face when `align` and landmarks are there, else
    the box with `margin` cropped from `picture` (as `load_image` returns it)."""
    if align and detection.landmarks is not None:
        transform = estimate_alignment(detection.landmarks, output_size)
        return warp_to_template(picture, transform, output_size), None
    region = face_crop_box(detection.box, *image_size(picture), margin)
    return crop_region(picture, region), region


def _mirror(crop):
    if isinstance(crop, Image.Image):
        return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.ascontiguousarray(crop[:, ::-1])


def embed_crops(embedder, crops: Sequence, flip: bool = False) -> np.ndarray:
    """(N, D) unit embeddings of RGB face crops, in one `embedder.embed` call; `flip` averages
    each crop's embedding with its mirror image's and re-normalises."""
    if not crops:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    crops = list(crops)
    batch = crops + [_mirror(c) for c in crops] if flip else crops
    vectors = embedder.embed(batch, channel_order="rgb")  # crops are RGB whatever the frame was
    if flip:
        vectors = l2_normalize(vectors[: len(crops)] + vectors[len(crops) :])
    return vectors


def _is_point_set(value) -> bool:
    try:
        return np.asarray(value, dtype=np.float64).ndim == 2
    except (TypeError, ValueError):
        return False


def given_detections(boxes, landmarks=None, box_format: str = "xyxy") -> list[Detection]:
    """Explicit boxes (one box or a list / (N, 4) array) and optional landmarks (one set per
    box, or a single (5, 2) / (2, 2) set for a single box) -> `Detection`s without scores."""
    single = (
        np.ndim(boxes) == 1
        if isinstance(boxes, np.ndarray)
        else (len(boxes) == 4 and all(np.ndim(v) == 0 for v in boxes))
    )
    boxes = [boxes] if single else list(boxes)
    if landmarks is None:
        landmarks = [None] * len(boxes)
    elif len(boxes) == 1 and _is_point_set(landmarks):
        landmarks = [landmarks]
    if len(landmarks) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(landmarks)} landmark sets.")
    detections = []
    for index, (box, points) in enumerate(zip(boxes, landmarks, strict=True)):
        try:
            detections.append(make_detection(box, None, points, box_format))
        except ValueError as error:
            raise ValueError(f"face #{index}: {error}") from None
    return detections


def embed_faces(
    embedder,
    frame,
    detector: Callable | None = None,
    boxes=None,
    landmarks=None,
    *,
    align: bool = True,
    margin: float = DEFAULT_MARGIN,
    flip: bool = False,
    policy: str = "all",
    min_size: float = DEFAULT_MIN_SIZE,
    box_format: str = "xyxy",
    channel_order: str | None = None,
) -> list[Face]:
    """Find, crop or align, and embed every face of `frame` (see the module doc).

    frame: any input `embedder.embed` takes (`channel_order`, default the embedder's, says
        whether numpy arrays are RGB or BGR).
    detector: a callable `rgb_uint8 (H, W, 3) -> detections` (default `default_detector()`),
        or instead `boxes` (one box or a list, in `box_format`) with optional `landmarks` (one
        (5, 2) / (2, 2) set per box).
    align: warp faces with landmarks onto the template at the model's input size; faces
        without landmarks (or all, with align=False) are cropped with `margin` on each side.
    flip: average each face's embedding with its mirror image's, re-normalised.
    policy, min_size: see `select_faces` (they apply to given boxes too).
    Returns one `Face` per kept face, embedded in one batch.
    """
    picture = load_image(frame, channel_order=channel_order or embedder.channel_order)
    if boxes is not None:
        if detector is not None:
            raise ValueError("pass either a detector or explicit boxes, not both.")
        detections = select_faces(given_detections(boxes, landmarks, box_format), policy, min_size)
    elif landmarks is not None:
        raise ValueError("landmarks need boxes: pass boxes=[...] with one box per face.")
    else:
        detections = find_faces(picture, detector, policy, min_size)
    output_size = embedder.preprocessor.config.input_size
    made = [face_image(picture, d, output_size, align, margin) for d in detections]
    vectors = embed_crops(embedder, [crop for crop, _ in made], flip)
    return [
        Face(d.box, d.score, d.landmarks, vector, region is None, region)
        for d, (_, region), vector in zip(detections, made, vectors, strict=True)
    ]
