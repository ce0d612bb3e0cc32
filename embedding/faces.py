"""Faces: from a camera frame to identities.

    frame (path, bytes, PIL image, HWC uint8/float array; OpenCV BGR with channel_order="bgr")
      -> detector: boxes [x1, y1, x2, y2] in pixels, scores, landmarks (5 points, 2 eyes or none)
      -> per face: an aligned crop (similarity transform onto the ArcFace 5-point template, at
         the model's input size) or, without landmarks, a crop with a margin clamped to the frame
      -> `Embedder.embed` on all crops in one batch (the checkpoint's own preprocessing)
      -> unit embeddings -> `Gallery` (enrol, identify)

    from embedding import Embedder
    from embedding.faces import crop_face, align_face, enroll_folder, identify

    emb = Embedder("my_checkpoint")
    faces = emb.embed_faces(frame_bgr, channel_order="bgr", policy="largest")
    faces[0].box, faces[0].score, faces[0].landmarks, faces[0].embedding   # (D,) unit norm

Conventions
-----------
* Boxes are pixel coordinates of the frame: `[x1, y1, x2, y2]` ("xyxy": left, top, right,
  bottom) or `[x, y, width, height]` ("xywh"), named with `box_format`. Detectors always return
  xyxy. A crop covers the whole pixels the box (plus margin) touches, clamped to the frame.
* Landmarks are (x, y) pixel coordinates, x to the right, y down, (0, 0) the centre of the
  top-left pixel (the convention of OpenCV's `warpAffine`, scikit-image's `warp` and the ArcFace
  template). Five points, in this order (`LANDMARK_NAMES`), named by the side of the IMAGE they
  appear on (the order of insightface / RetinaFace / SCRFD / YOLOv8-face keypoints):
  0 left eye, 1 right eye, 2 nose tip, 3 left mouth corner, 4 right mouth corner.
  Five points given in the subject's left/right instead (the eye and mouth pairs swapped) are
  recognised geometrically and reordered. Two points are the eyes, left eye first; their order
  cannot be checked, so it must follow this convention.
* Alignment estimates a similarity transform (rotation, uniform scale, translation; least squares
  with scikit-image's `SimilarityTransform`) from the landmarks onto `ARCFACE_TEMPLATE` (the
  112x112 5-point template of insightface's ArcFace models) scaled to the model's input size, and
  warps with `skimage.transform.warp` (bilinear). With only the two eyes, rotation and scale come
  from the eyes and the eyes land on their template positions. Aligned crops ignore `margin`:
  the template decides the framing. They are made at the model's input size and then go
  through the checkpoint's preprocessing like any image (with crop_pct < 1, the model sees
  their central crop_pct part, as it would for any image of that size).

Detectors
---------
A detector is any callable `rgb_uint8_array (H, W, 3) -> list of detections`, each a `Detection`
or a tuple `(box_xyxy, score, landmarks or None)` (a YOLO-style (N, 4|5|...) array is accepted
too). Adapters: `detections_from_xyxy` (YOLO / ultralytics `boxes.data` + `keypoints.data`),
`detections_from_relative` (MediaPipe's relative xmin, ymin, width, height and keypoints),
`detections_from_yunet` / `YuNetDetector` (OpenCV's `FaceDetectorYN`, with your model file).

The default detector, `HaarCascadeDetector`, is OpenCV's Viola-Jones frontal-face cascade plus
its eye cascade (two-point alignment), shipped inside the `opencv-python-headless` 4.x wheel, so
it works offline with no download (`pip install "keras-convnext[faces]"`; OpenCV 5 removed the
cascade classifier). It is a WEAK BASELINE: frontal, upright, well-lit faces only; it misses
profiles, small and rotated faces, fires on face-like texture (coins, patterns), and its eye
landmarks are rough. For real use plug in a modern detector with 5 landmarks (RetinaFace, SCRFD,
YOLOv8-face, YuNet, MediaPipe; the README's "Faces" section has one adapter for each), e.g.

    from insightface.app import FaceAnalysis     # SCRFD: xyxy boxes, scores, 5 keypoints
    app = FaceAnalysis(allowed_modules=["detection"]); app.prepare(ctx_id=-1)
    scrfd = lambda rgb: [(f.bbox, f.det_score, f.kps) for f in app.get(rgb[:, :, ::-1])]
    faces = emb.embed_faces(frame_bgr, detector=scrfd, channel_order="bgr")
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from embedding.gallery import Gallery, l2_normalize
from embedding.preprocess import ImageLoadError, describe_input, load_image

BOX_FORMATS = ("xyxy", "xywh")
_BOX_FORMS = (
    "[x1, y1, x2, y2] (box_format='xyxy') or [x, y, width, height] (box_format='xywh'), in pixels"
)
POLICIES = ("all", "largest", "most_confident")
DEFAULT_MARGIN = 0.2
DEFAULT_MIN_SIZE = 32  # pixels, smaller side of the box: smaller faces carry little identity
FACES_EXTRA = 'pip install "keras-convnext[faces]" (opencv-python-headless>=4.8,<5, scikit-image)'

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


class MissingExtraError(ImportError):
    """An optional dependency of the faces module (OpenCV, scikit-image) is not installed."""


class FaceError(ValueError):
    """No usable face where one is needed (no face found, nothing to enrol, gallery mismatch)."""


# ----------------------------------------------------------------------------
# Optional dependencies (imported on first use)
# ----------------------------------------------------------------------------


def _import_cv2(feature: str):
    try:
        import cv2
    except ImportError as error:
        raise MissingExtraError(f"{feature} needs OpenCV: {FACES_EXTRA}.") from error
    return cv2


def _import_skimage_transform():
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


def _image_size(picture) -> tuple[int, int]:
    """(width, height) of what `load_image` returns (PIL image or float (H, W, 3) array)."""
    if isinstance(picture, Image.Image):
        return picture.width, picture.height
    return picture.shape[1], picture.shape[0]


def _crop(picture, region):
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
    return _crop(picture, face_crop_box(box, *_image_size(picture), margin, box_format))


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


def _warp(picture, transform, output_size):
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
    return _warp(picture, estimate_alignment(landmarks, output_size), output_size)


# ----------------------------------------------------------------------------
# Detections and detectors
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Detection:
    """One face a detector found: box (x1, y1, x2, y2) pixels, score (None if the source has
    none; larger is more confident, not necessarily a probability), landmarks (5, 2) / (2, 2)
    (x, y) pixels or None."""

    box: tuple[float, float, float, float]
    score: float | None = None
    landmarks: np.ndarray | None = None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return self.width * self.height


def make_detection(box, score=None, landmarks=None, box_format: str = "xyxy") -> Detection:
    """A validated `Detection` (ValueError naming the problem)."""
    if score is not None:
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"detection score must be finite, got {score}.")
    points = None if landmarks is None else parse_landmarks(landmarks)
    return Detection(parse_box(box, box_format), score, points)


def _as_detections(found) -> list[Detection]:
    """What a detector returned -> list of `Detection`."""
    if isinstance(found, np.ndarray):
        return detections_from_xyxy(found)
    detections = []
    for index, item in enumerate(found):
        if isinstance(item, Detection):
            item = (item.box, item.score, item.landmarks)
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise TypeError(
                f"detection #{index}: a detector must return Detection objects or "
                f"(box_xyxy, score[, landmarks]) tuples, got {type(item).__name__}."
            )
        try:
            detections.append(make_detection(*item))
        except ValueError as error:
            raise ValueError(f"detection #{index}: {error}") from None
    return detections


def _keypoints(landmarks, count: int) -> np.ndarray | None:
    """Per-detection keypoints (N, K, 2|3) or (N, 2K) -> (N, K, 2) float64 (visibility dropped)."""
    if landmarks is None:
        return None
    points = np.asarray(landmarks, dtype=np.float64)
    if points.ndim == 2 and points.shape[0] == count and points.shape[1] % 2 == 0:
        points = points.reshape(count, -1, 2)
    if points.ndim != 3 or points.shape[0] != count or points.shape[2] not in (2, 3):
        raise ValueError(
            f"landmarks for {count} detections must be (N, K, 2), (N, K, 3) (x, y, "
            f"visibility) or (N, 2K); got shape {points.shape}."
        )
    return points[:, :, :2]


def detections_from_xyxy(boxes, landmarks=None) -> list[Detection]:
    """YOLO-style pixel boxes: (N, 4) x1, y1, x2, y2, or (N, 5+) with the score in column 4
    (ultralytics `results[0].boxes.data`: x1, y1, x2, y2, confidence, class).
    `landmarks`: (N, 5, 2), (N, 5, 3) (YOLOv8-face `keypoints.data`) or (N, 10), or None."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return []
    if array.ndim != 2 or array.shape[1] < 4:
        raise ValueError(
            f"expected an (N, 4) or (N, 5+) array of x1, y1, x2, y2[, score, ...]; "
            f"got shape {array.shape}."
        )
    points = _keypoints(landmarks, len(array))
    return [
        make_detection(
            row[:4],
            row[4] if len(row) > 4 else None,
            None if points is None else points[i],
        )
        for i, row in enumerate(array)
    ]


# MediaPipe face detection's 6 keypoints: right eye, left eye, nose tip, mouth centre, right ear
# tragion, left ear tragion.
_MEDIAPIPE_EYES, _MEDIAPIPE_MOUTH = (0, 1), 3


def detections_from_relative(
    boxes, *, width: int, height: int, scores=None, landmarks=None
) -> list[Detection]:
    """MediaPipe-style relative boxes: (N, 4) xmin, ymin, box width, box height as fractions
    of the image `width` and `height`; keypoints (N, K, 2) relative too. K=5: the 5 landmarks;
    K=2: the eyes; K=6 (MediaPipe face detection): its eyes are used (two-point alignment),
    put in image order with the mouth centre."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return []
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(
            f"expected an (N, 4) array of relative xmin, ymin, width, height; got {array.shape}."
        )
    scale = np.array([width, height], dtype=np.float64)
    pixels = np.concatenate([array[:, :2] * scale, array[:, 2:] * scale], axis=1)
    points = _keypoints(landmarks, len(array))
    if points is not None:
        points = points * scale
        if points.shape[1] == 6:
            eyes = points[:, _MEDIAPIPE_EYES]
            mouth = points[:, _MEDIAPIPE_MOUTH]
            vector, down = eyes[:, 1] - eyes[:, 0], mouth - eyes.mean(axis=1)
            swap = vector[:, 0] * down[:, 1] - vector[:, 1] * down[:, 0] < 0
            eyes[swap] = eyes[swap][:, ::-1]
            points = eyes
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(array):
            raise ValueError(f"{len(array)} boxes but {len(scores)} scores.")
    return [
        make_detection(
            pixels[i],
            None if scores is None else scores[i],
            None if points is None else points[i],
            box_format="xywh",
        )
        for i in range(len(array))
    ]


def detections_from_yunet(faces) -> list[Detection]:
    """OpenCV `FaceDetectorYN.detect` output, (N, 15): x, y, w, h, then (x, y) of the right
    eye, left eye, nose tip, right and left mouth corner (OpenCV's names), then the score."""
    if faces is None:
        return []
    array = np.asarray(faces, dtype=np.float64)
    if array.size == 0:
        return []
    if array.ndim != 2 or array.shape[1] != 15:
        raise ValueError(f"expected FaceDetectorYN's (N, 15) array, got shape {array.shape}.")
    return [
        make_detection(row[:4], row[14], row[4:14].reshape(5, 2), box_format="xywh")
        for row in array
    ]


def _detector_input(picture) -> np.ndarray:
    """What detectors get: an RGB uint8 (H, W, 3) contiguous array."""
    if isinstance(picture, Image.Image):
        return np.asarray(picture, dtype=np.uint8)
    return np.clip(np.rint(picture * 255.0), 0, 255).astype(np.uint8)


class HaarCascadeDetector:
    """OpenCV's Haar cascades: frontal faces, and the two eyes inside each face as landmarks.

    A weak, offline baseline (see the module doc): frontal upright faces only, false positives
    on face-like texture. Scores are the cascade's final-stage weights (`detectMultiScale3`):
    larger is more confident, not a probability. Eyes are searched in the upper 60% of the
    face box, the largest in each half; a face without one eye per half gets no landmarks.
    Needs `opencv-python-headless` 4.x (the cascades ship inside the wheel).
    """

    def __init__(
        self,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 30,
        eyes: bool = True,
    ):
        cv2 = _import_cv2("The Haar cascade face detector")
        if not hasattr(cv2, "CascadeClassifier"):
            raise MissingExtraError(
                f"OpenCV {cv2.__version__} has no CascadeClassifier (removed in OpenCV 5): "
                f"{FACES_EXTRA}."
            )
        self._cv2 = cv2
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size
        self._faces = self._cascade("haarcascade_frontalface_default.xml")
        self._eyes = self._cascade("haarcascade_eye.xml") if eyes else None

    def _cascade(self, name):
        path = os.path.join(self._cv2.data.haarcascades, name)
        cascade = self._cv2.CascadeClassifier(path)
        if cascade.empty():
            raise MissingExtraError(f"OpenCV could not load its cascade {path}: {FACES_EXTRA}.")
        return cascade

    def __repr__(self):
        return (
            f"HaarCascadeDetector(scale_factor={self.scale_factor}, "
            f"min_neighbors={self.min_neighbors}, min_size={self.min_size}, "
            f"eyes={self._eyes is not None})"
        )

    def __call__(self, image: np.ndarray) -> list[Detection]:
        grey = self._cv2.cvtColor(np.ascontiguousarray(image), self._cv2.COLOR_RGB2GRAY)
        boxes, _, weights = self._faces.detectMultiScale3(
            grey,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
            outputRejectLevels=True,
        )
        detections = []
        for (x, y, w, h), weight in zip(boxes, np.ravel(weights), strict=True):
            eyes = self._find_eyes(grey, int(x), int(y), int(w), int(h))
            detections.append(make_detection((x, y, x + w, y + h), weight, eyes))
        return detections

    def _find_eyes(self, grey, x, y, w, h):
        if self._eyes is None:
            return None
        upper = grey[y : y + (h * 6) // 10, x : x + w]
        smallest = max(5, w // 10)
        found = self._eyes.detectMultiScale(upper, 1.1, 5, minSize=(smallest, smallest))
        halves = ([], [])
        for ex, ey, ew, eh in found:
            centre = (x + ex + (ew - 1) / 2, y + ey + (eh - 1) / 2)  # pixel-centre coordinates
            halves[int(centre[0] >= x + w / 2)].append((ew * eh, centre))
        if not halves[0] or not halves[1]:
            return None
        return np.array([max(halves[0])[1], max(halves[1])[1]], dtype=np.float64)


class YuNetDetector:
    """OpenCV's `FaceDetectorYN` (YuNet: boxes, scores, 5 landmarks) with YOUR model file
    (e.g. `face_detection_yunet_2023mar.onnx` from the OpenCV Zoo; nothing is downloaded)."""

    def __init__(
        self,
        model_path,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        top_k: int = 5000,
    ):
        cv2 = _import_cv2("The YuNet face detector")
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: no such YuNet model file")
        if not hasattr(cv2, "FaceDetectorYN"):
            raise MissingExtraError(f"OpenCV {cv2.__version__} has no FaceDetectorYN.")
        self.model_path = model_path
        self._detector = cv2.FaceDetectorYN.create(
            model_path, "", (320, 320), score_threshold, nms_threshold, top_k
        )

    def __repr__(self):
        return f"YuNetDetector({self.model_path!r})"

    def __call__(self, image: np.ndarray) -> list[Detection]:
        height, width = image.shape[:2]
        self._detector.setInputSize((width, height))
        _, faces = self._detector.detect(np.ascontiguousarray(image[:, :, ::-1]))  # it wants BGR
        return detections_from_yunet(faces)


@functools.lru_cache(maxsize=1)
def default_detector() -> HaarCascadeDetector:
    """The shared default detector (`HaarCascadeDetector()`), built on first use."""
    return HaarCascadeDetector()


def select_faces(
    detections: Sequence[Detection],
    policy: str = "all",
    min_size: float = DEFAULT_MIN_SIZE,
) -> list[Detection]:
    """Drop boxes whose smaller side is under `min_size` pixels, then apply `policy`:
    "all" (in the detector's order), "largest" (box area) or "most_confident" (score)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}.")
    kept = [d for d in detections if min(d.width, d.height) >= min_size]
    if policy == "all" or not kept:
        return kept
    if policy == "largest":
        return [max(kept, key=lambda d: d.area)]
    if any(d.score is None for d in kept):
        raise ValueError("policy 'most_confident' needs scores; these faces have none.")
    return [max(kept, key=lambda d: d.score)]


def detect_faces(
    image,
    detector: Callable | None = None,
    *,
    policy: str = "all",
    min_size: float = DEFAULT_MIN_SIZE,
    channel_order: str = "rgb",
) -> list[Detection]:
    """Run `detector` (default: `default_detector()`) on an image, then `select_faces`."""
    picture = load_image(image, channel_order=channel_order)
    return _detect(picture, detector, policy, min_size)


def _detect(picture, detector, policy, min_size) -> list[Detection]:
    detector = detector or default_detector()
    return select_faces(_as_detections(detector(_detector_input(picture))), policy, min_size)


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
        return _warp(picture, transform, output_size), None
    region = face_crop_box(detection.box, *_image_size(picture), margin)
    return _crop(picture, region), region


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
        detections = _detect(picture, detector, policy, min_size)
    output_size = embedder.preprocessor.config.input_size
    made = [face_image(picture, d, output_size, align, margin) for d in detections]
    vectors = embed_crops(embedder, [crop for crop, _ in made], flip)
    return [
        Face(d.box, d.score, d.landmarks, vector, region is None, region)
        for d, (_, region), vector in zip(detections, made, vectors, strict=True)
    ]


# ----------------------------------------------------------------------------
# Enrol and identify
# ----------------------------------------------------------------------------


@dataclass
class Enrollment:
    """Outcome of `enroll`: the gallery (one row per enrolled photo), which photo each row
    came from (`sources[i]` is row i's), and the skipped photos as (photo, reason)."""

    gallery: Gallery
    sources: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Enrolled photos per label, in gallery order."""
        counts: dict[str, int] = {}
        for label in self.gallery.labels:
            counts[label] = counts.get(label, 0) + 1
        return counts


def enroll(
    embedder,
    people: Mapping[str, Sequence],
    *,
    detector: Callable | None = None,
    align: bool = True,
    margin: float = DEFAULT_MARGIN,
    flip: bool = False,
    min_size: float = DEFAULT_MIN_SIZE,
) -> Enrollment:
    """A `Gallery` of the largest face of every photo: `people` maps a label to its photos.

    Photos that cannot be read or hold no face (after `min_size`) are skipped and listed in
    `Enrollment.skipped`; `FaceError` when no photo at all gives a face.
    """
    from tqdm.auto import tqdm

    output_size = embedder.preprocessor.config.input_size
    crops, labels, sources, skipped = [], [], [], []
    total = sum(len(photos) for photos in people.values())
    with tqdm(total=total, disable=not embedder.progress, unit="photo", desc="detect") as bar:
        for label, photos in people.items():
            for photo in photos:
                bar.update()
                name = describe_input(photo)
                try:
                    picture = load_image(photo, channel_order=embedder.channel_order)
                except ImageLoadError as error:
                    skipped.append((name, error.reason))
                    continue
                found = _detect(picture, detector, "largest", min_size)
                if not found:
                    skipped.append((name, "no face found"))
                    continue
                crops.append(face_image(picture, found[0], output_size, align, margin)[0])
                labels.append(str(label))
                sources.append(name)
    if not crops:
        raise FaceError(f"no face found in any of the {total} photo(s); nothing to enrol.")
    gallery = Gallery().add(embed_crops(embedder, crops, flip), labels)
    return Enrollment(gallery, sources, skipped)


def people_folders(people_dir) -> tuple[dict[str, list[str]], list[str]]:
    """PEOPLE_DIR/<label>/**/<image> -> ({label: [paths]}, loose images outside any folder).

    Labels are the sub-folder names (sorted); images are found as `python -m embedding embed`
    finds them (by extension, recursively, sorted).
    """
    from embedding.cli import IMAGE_EXTENSIONS, find_images

    people_dir = os.fspath(people_dir)
    if not os.path.isdir(people_dir):
        raise FileNotFoundError(f"{people_dir}: no such folder")
    people, loose = {}, []
    for name in sorted(os.listdir(people_dir)):
        path = os.path.join(people_dir, name)
        if os.path.isdir(path):
            photos = find_images([path])
            if photos:
                people[name] = photos
        elif name.lower().endswith(IMAGE_EXTENSIONS):
            loose.append(path)
    if not people:
        raise FaceError(
            f"{people_dir}: no person folders with images "
            "(expected PEOPLE_DIR/<name>/<photo>.jpg, one folder per person)."
        )
    return people, loose


def enroll_folder(embedder, people_dir, **options) -> Enrollment:
    """`enroll` the people of a folder: one sub-folder per person, named by its label, with one
    or more photos each (see `people_folders`). Images lying directly in `people_dir` belong to
    nobody: they are reported as skipped. `options` are `enroll`'s."""
    people, loose = people_folders(people_dir)
    result = enroll(embedder, people, **options)
    result.skipped[:0] = [(path, "not inside a person folder") for path in loose]
    return result


@dataclass(frozen=True, eq=False)
class Identification:
    """A face of the query image, its best gallery match (label, cosine similarity) and the
    verdict `matched = score >= threshold`."""

    face: Face
    label: str
    score: float
    threshold: float
    matched: bool


def identify(
    embedder,
    image,
    gallery: Gallery,
    *,
    threshold: float | None = None,
    detector: Callable | None = None,
    policy: str = "all",
    **options,
) -> list[Identification]:
    """Every face of `image` (policy "all" by default) with its best match in `gallery`.

    `threshold`: accept when the cosine similarity >= it; None uses the embedder's
    (`Embedder.calibrate`) or else `embedding.embedder.DEFAULT_THRESHOLD` (uncalibrated).
    `options` are `embed_faces`'s (align, margin, flip, min_size, channel_order, ...).
    """
    from embedding.embedder import DEFAULT_THRESHOLD

    if len(gallery) == 0:
        raise FaceError("the gallery is empty; enrol people first.")
    if gallery.dim != embedder.dim:
        raise FaceError(
            f"the gallery holds {gallery.dim}-dim embeddings but the model gives "
            f"{embedder.dim}-dim ones; identify with the model the gallery was enrolled with."
        )
    if threshold is None:
        threshold = embedder.threshold if embedder.threshold is not None else DEFAULT_THRESHOLD
    faces = embed_faces(embedder, image, detector, policy=policy, **options)
    if not faces:
        return []
    labels, scores = gallery.search(np.stack([f.embedding for f in faces]), k=1)
    return [
        Identification(face, str(label), float(score), float(threshold), bool(score >= threshold))
        for face, label, score in zip(faces, labels[:, 0], scores[:, 0], strict=True)
    ]
