"""Face detections and detectors: the `Detection` record, adapters from other detectors'
outputs (YOLO / ultralytics, MediaPipe, OpenCV's YuNet), OpenCV's Haar cascade (the
offline default, a weak baseline), and the policy that picks faces from what was found.

A detector is any callable `rgb_uint8_array (H, W, 3) -> list of detections`, each a
`Detection` or a tuple `(box_xyxy, score, landmarks or None)`. OpenCV (the `faces`
extra) is imported when a detector is first made.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from embedding.errors import FACES_EXTRA, MissingExtraError
from embedding.faces.geometry import parse_box, parse_landmarks
from embedding.images import load_image

POLICIES = ("all", "largest", "most_confident")
DEFAULT_MIN_SIZE = 32  # pixels, smaller side of the box: smaller faces carry little identity


def _import_cv2(feature: str):
    # the `faces` extra: imported on first use, so the rest of the package needs no OpenCV
    try:
        import cv2
    except ImportError as error:
        raise MissingExtraError(f"{feature} needs OpenCV: {FACES_EXTRA}.") from error
    return cv2


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


def as_detections(found) -> list[Detection]:
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


class PerThreadDetector:
    """A detector many threads can call at once: each thread gets its own `factory()`
    (OpenCV's detectors keep state between calls: YuNet its input size, a cascade its
    buffers), made on the thread's first call."""

    def __init__(self, factory: Callable[[], Callable]):
        self.factory = factory
        self._local = threading.local()

    def __repr__(self):
        return f"PerThreadDetector({self.factory!r})"

    def __call__(self, image: np.ndarray) -> list[Detection]:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = self._local.detector = self.factory()
        return detector(image)


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
    return find_faces(picture, detector, policy, min_size)


def find_faces(picture, detector, policy, min_size) -> list[Detection]:
    detector = detector or default_detector()
    return select_faces(as_detections(detector(_detector_input(picture))), policy, min_size)
