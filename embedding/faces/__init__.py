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
YOLOv8-face, YuNet, MediaPipe; the docs' faces page, "Detectors", has one adapter for each), e.g.

    from insightface.app import FaceAnalysis     # SCRFD: xyxy boxes, scores, 5 keypoints
    app = FaceAnalysis(allowed_modules=["detection"]); app.prepare(ctx_id=-1)
    scrfd = lambda rgb: [(f.bbox, f.det_score, f.kps) for f in app.get(rgb[:, :, ::-1])]
    faces = emb.embed_faces(frame_bgr, detector=scrfd, channel_order="bgr")
"""

from embedding.errors import FaceError, MissingExtraError
from embedding.faces.detectors import (
    DEFAULT_MIN_SIZE,
    POLICIES,
    Detection,
    HaarCascadeDetector,
    PerThreadDetector,
    YuNetDetector,
    as_detections,
    default_detector,
    detect_faces,
    detections_from_relative,
    detections_from_xyxy,
    detections_from_yunet,
    make_detection,
    select_faces,
)
from embedding.faces.enrollment import (
    Enrollment,
    Identification,
    enroll,
    enroll_folder,
    identify,
    people_folders,
)
from embedding.faces.geometry import (
    ARCFACE_SIZE,
    ARCFACE_TEMPLATE,
    BOX_FORMATS,
    DEFAULT_MARGIN,
    LANDMARK_NAMES,
    align_face,
    crop_face,
    estimate_alignment,
    face_crop_box,
    landmark_template,
    parse_box,
    parse_landmarks,
)
from embedding.faces.pipeline import Face, embed_crops, embed_faces, face_image, given_detections

__all__ = [
    "ARCFACE_SIZE", "ARCFACE_TEMPLATE", "BOX_FORMATS", "DEFAULT_MARGIN", "DEFAULT_MIN_SIZE",
    "LANDMARK_NAMES", "POLICIES", "Detection", "Enrollment", "Face", "FaceError",
    "HaarCascadeDetector", "Identification", "MissingExtraError", "PerThreadDetector",
    "YuNetDetector", "align_face",
    "as_detections", "crop_face", "default_detector", "detect_faces", "detections_from_relative",
    "detections_from_xyxy", "detections_from_yunet", "embed_crops", "embed_faces", "enroll",
    "enroll_folder", "estimate_alignment", "face_crop_box", "face_image", "given_detections",
    "identify", "landmark_template", "make_detection", "parse_box", "parse_landmarks",
    "people_folders", "select_faces",
]  # fmt: skip
