"""`embedding.faces`: crops, alignment, detectors, `embed_faces`, enrol / identify (+ CLI).

The only face photograph shipped offline is scikit-image's `astronaut()` (one face); frames
with several faces and rotated / scaled faces are made from it with known transforms.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from conftest import random_timm_model, save_timm_checkpoint
from PIL import Image
from skimage.transform import SimilarityTransform, warp

from embedding import Embedder, Gallery, faces
from embedding import cli as embedding_cli
from embedding.faces import (
    ARCFACE_TEMPLATE,
    Detection,
    FaceError,
    MissingExtraError,
    align_face,
    crop_face,
    detections_from_relative,
    detections_from_xyxy,
    detections_from_yunet,
    estimate_alignment,
    face_crop_box,
    landmark_template,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # input side of the random test checkpoint
ASTRONAUT = skimage.data.astronaut()  # (512, 512, 3), one face


@pytest.fixture(scope="session")
def faces_checkpoint(tmp_path_factory):
    model = random_timm_model("convnext_atto", seed=13)
    folder = tmp_path_factory.mktemp("faces_atto64")
    cfg = {"input_size": (3, SIZE, SIZE), "crop_pct": 0.875}
    return str(save_timm_checkpoint(model, folder, "convnext_atto", pretrained_cfg=cfg))


@pytest.fixture(scope="session")
def embedder(faces_checkpoint):
    return Embedder(faces_checkpoint, batch_size=4, cache=False)  # padded batches: 1, 2, 4


@pytest.fixture(scope="session")
def astronaut_face():
    """The default detector's one detection on the astronaut."""
    found = faces.detect_faces(ASTRONAUT)
    assert len(found) == 1
    return found[0]


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ----------------------------------------------------------------------------
# Detector and crops
# ----------------------------------------------------------------------------


def test_default_detector_finds_the_astronaut(astronaut_face):
    """Reference: scikit-image's own LBP frontal-face cascade, an independent detector."""
    from skimage.feature import Cascade

    lbp = Cascade(skimage.data.lbp_frontal_face_cascade_filename())
    (reference,) = lbp.detect_multi_scale(
        img=ASTRONAUT, scale_factor=1.2, step_ratio=1, min_size=(60, 60), max_size=(200, 200)
    )
    ref_box = (
        reference["c"],
        reference["r"],
        reference["c"] + reference["width"],
        reference["r"] + reference["height"],
    )
    face = astronaut_face
    assert iou(face.box, ref_box) > 0.7, (face.box, ref_box)
    assert face.score is not None and face.score > 0
    eyes = face.landmarks  # both eyes found: left (image side) first, in the upper half
    assert eyes.shape == (2, 2) and eyes[0, 0] < eyes[1, 0]
    x1, y1, x2, y2 = face.box
    assert np.all((eyes[:, 0] > x1) & (eyes[:, 0] < x2))
    assert np.all((eyes[:, 1] > y1) & (eyes[:, 1] < (y1 + y2) / 2))
    assert faces.detect_faces(skimage.data.coffee()) == []


def test_crop_with_margin_contains_the_box_and_stays_inside(astronaut_face):
    # Hand-computed: box 50x40, margin 0.2 -> 10 px left/right, 8 px top/bottom, clamped.
    assert face_crop_box((0, 10, 50, 50), 100, 80) == (0, 2, 60, 58)  # touches the left
    assert face_crop_box((20, 0, 70, 40), 100, 80) == (10, 0, 80, 48)  # the top
    assert face_crop_box((50, 20, 100, 60), 100, 80) == (40, 12, 100, 68)  # the right
    assert face_crop_box((20, 40, 70, 80), 100, 80) == (10, 32, 80, 80)  # the bottom
    assert face_crop_box((-30, -20, 20, 20), 100, 80) == (0, 0, 30, 28)  # past a corner
    assert face_crop_box((10.5, 10.2, 20.5, 30.7), 100, 80, margin=0) == (10, 10, 21, 31)
    assert face_crop_box((0, 10, 50, 40), 100, 80, box_format="xywh") == (0, 2, 60, 58)

    height, width = ASTRONAUT.shape[:2]
    x1, y1, x2, y2 = astronaut_face.box
    w, h = x2 - x1, y2 - y1
    boxes = {  # the detected box moved to touch each border
        "left": (0, y1, w, y2),
        "top": (x1, 0, x2, h),
        "right": (width - w, y1, width, y2),
        "bottom": (x1, height - h, x2, height),
        "detected": astronaut_face.box,
    }
    for name, box in boxes.items():
        for margin in (0.0, 0.2, 0.5):
            left, top, right, bottom = face_crop_box(box, width, height, margin)
            assert left >= 0 and top >= 0 and right <= width and bottom <= height, name
            assert left <= box[0] and top <= box[1] and right >= box[2] and bottom >= box[3]
            crop = crop_face(ASTRONAUT, box, margin)
            assert isinstance(crop, Image.Image) and crop.size == (right - left, bottom - top)
            np.testing.assert_array_equal(np.asarray(crop), ASTRONAUT[top:bottom, left:right])
    # every input kind gives the same crop; BGR frames come back RGB; float stays float
    box = astronaut_face.box
    reference = np.asarray(crop_face(ASTRONAUT, box))
    for item in (Image.fromarray(ASTRONAUT), ASTRONAUT[:, :, ::-1]):
        order = "bgr" if isinstance(item, np.ndarray) else "rgb"
        np.testing.assert_array_equal(
            np.asarray(crop_face(item, box, channel_order=order)), reference
        )
    float_crop = crop_face(ASTRONAUT / 255.0, box)
    assert float_crop.dtype == np.float32
    np.testing.assert_allclose(float_crop * 255, reference, atol=1e-3)


@pytest.mark.parametrize(
    "box, kwargs, fragment",
    [
        ((1, 2, 3), {}, "4 numbers"),
        ((1, 2, 3, 4, 5), {}, "4 numbers"),
        ("abcd", {}, "4 numbers"),
        ((10, 10, float("nan"), 20), {}, "NaN"),
        ((50, 10, 20, 40), {}, "x1 < x2"),
        ((10, 50, 40, 20), {}, "y1 < y2"),
        ((10, 10, 0, 20), {"box_format": "xywh"}, "width > 0"),
        ((600, 10, 700, 90), {}, "outside"),
        ((-90, 10, -10, 90), {}, "outside"),
        ((10, 10, 50, 50), {"box_format": "cxcywh"}, "'xyxy' or 'xywh'"),
        ((10, 10, 50, 50), {"margin": -0.1}, "margin"),
    ],
)
def test_bad_boxes_are_refused_clearly(box, kwargs, fragment):
    with pytest.raises(ValueError, match=None) as info:
        crop_face(ASTRONAUT, box, **kwargs)
    assert fragment in str(info.value)
    if fragment == "4 numbers":  # names the valid forms
        assert "[x1, y1, x2, y2]" in str(info.value) and "[x, y, width, height]" in str(info.value)


def test_bgr_and_rgb_frames_give_the_same_embeddings(embedder, monkeypatch):
    rgb = embedder.embed_faces(ASTRONAUT)
    bgr = embedder.embed_faces(ASTRONAUT[:, :, ::-1], channel_order="bgr")
    pil = embedder.embed_faces(Image.fromarray(ASTRONAUT))
    assert len(rgb) == len(bgr) == len(pil) == 1
    assert rgb[0].aligned  # the Haar eyes give a two-point alignment
    np.testing.assert_allclose(np.linalg.norm(rgb[0].embedding), 1.0, atol=1e-6)
    for other in (bgr, pil):
        assert other[0].box == rgb[0].box
        np.testing.assert_allclose(other[0].embedding, rgb[0].embedding, atol=1e-6)
    # float frames: the crops stay float arrays, RGB whatever order the frame (here: the
    # embedder's default) had
    rgb_float = embedder.embed_faces(ASTRONAUT / 255.0)
    monkeypatch.setattr(embedder, "channel_order", "bgr")
    bgr_float = embedder.embed_faces(ASTRONAUT[:, :, ::-1] / 255.0)
    assert len(rgb_float) == len(bgr_float) == 1 and rgb_float[0].box == rgb[0].box
    np.testing.assert_allclose(bgr_float[0].embedding, rgb_float[0].embedding, atol=1e-6)


# ----------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------

# The astronaut's eyes (pixel centres; the Haar eye detections, rounded). Five landmarks
# consistent with the template: the template placed by the similarity that puts its eyes there.
ASTRONAUT_EYES = np.array([[201.0, 100.0], [247.0, 103.0]])
TO_ASTRONAUT = SimilarityTransform.from_estimate(ARCFACE_TEMPLATE[:2], ASTRONAUT_EYES)
ASTRONAUT_LANDMARKS = TO_ASTRONAUT(ARCFACE_TEMPLATE)
ASTRONAUT_BOX = (177.0, 66.0, 272.0, 161.0)


def transformed_astronaut(degrees, scale):
    """The photograph rotated by `degrees` and scaled by `scale` about the face centre, on a
    canvas of side 512 * scale with the face in the middle: (image, the transform used)."""
    centre = np.array(
        [(ASTRONAUT_BOX[0] + ASTRONAUT_BOX[2]) / 2, (ASTRONAUT_BOX[1] + ASTRONAUT_BOX[3]) / 2]
    )
    side = int(round(512 * scale))
    transform = (
        SimilarityTransform(translation=-centre)
        + SimilarityTransform(scale=scale, rotation=np.deg2rad(degrees))
        + SimilarityTransform(translation=(side / 2, side / 2))
    )
    image = warp(ASTRONAUT, transform.inverse.params, output_shape=(side, side, 3), order=1)
    return (np.clip(np.rint(image * 255), 0, 255)).astype(np.uint8), transform


def blob_image(points, shape, sigma):
    """Float (H, W, 3) image, zero except a Gaussian blob (peak 1) at each (x, y) point."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    blobs = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) for x, y in points)
    return np.repeat(np.clip(blobs, 0, 1)[:, :, None], 3, axis=2)


def blob_centres(image, expected, radius):
    """Intensity centroid of the blob near each expected (x, y) point."""
    channel = image[:, :, 0]
    centres = []
    for x, y in expected:
        x0, y0 = int(round(x)), int(round(y))
        window = channel[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
        yy, xx = np.mgrid[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
        centres.append([(window * xx).sum() / window.sum(), (window * yy).sum() / window.sum()])
    return np.array(centres)


@pytest.mark.parametrize("degrees", [-30, 30])
@pytest.mark.parametrize("scale", [0.5, 2.0])
@pytest.mark.parametrize("output_size", [112, SIZE])
def test_alignment_maps_landmarks_onto_the_template(degrees, scale, output_size):
    """The face rotated and scaled by a known similarity T, its landmarks moved by the same T:
    the estimated transform must be the analytic one (template scaling o A^-1 o T^-1), and in
    the warped image the landmarks (marked by blobs drawn at T(landmarks)) must sit on the
    template within 1 pixel."""
    image, transform = transformed_astronaut(degrees, scale)
    landmarks = transform(ASTRONAUT_LANDMARKS)
    # output pixels per 112-template pixel: the template scaled as an image, centred
    k = output_size / 112
    to_output = SimilarityTransform(scale=k, translation=(0.5 * k - 0.5, 0.5 * k - 0.5))
    # image -> original photograph -> 112 template -> output
    analytic = SimilarityTransform(
        to_output.params @ TO_ASTRONAUT.inverse.params @ transform.inverse.params
    )
    template = to_output(ARCFACE_TEMPLATE)
    np.testing.assert_allclose(landmark_template(output_size), template, atol=1e-9)

    estimated = estimate_alignment(landmarks, output_size)
    np.testing.assert_allclose(estimated.params, analytic.params, atol=1e-6)

    # pixels: blobs of about 1.2 output pixels
    output_per_image_pixel = estimated.scale
    blobs = blob_image(landmarks, image.shape[:2], sigma=1.2 / output_per_image_pixel)
    warped = align_face(blobs, landmarks, output_size)
    assert warped.shape == (output_size, output_size, 3)
    centres = blob_centres(warped, template, radius=max(4, output_size // 14))
    error = np.abs(centres - template).max()
    assert error < 1.0, (centres, template)
    print(f"rotation {degrees} scale {scale} size {output_size}: max error {error:.3f} px")

    # two eyes only: rotation and scale from the eyes, eyes onto the template's eyes
    eyes = estimate_alignment(landmarks[:2], output_size)
    np.testing.assert_allclose(eyes(landmarks[:2]), template[:2], atol=1e-6)
    np.testing.assert_allclose(eyes.params, analytic.params, atol=1e-6)
    photo = align_face(image, landmarks, output_size)
    assert isinstance(photo, Image.Image) and photo.size == (output_size, output_size)


def test_landmark_order_and_bad_landmarks():
    landmarks = ASTRONAUT_LANDMARKS
    reference = estimate_alignment(landmarks).params
    subject_order = landmarks[[1, 0, 2, 4, 3]]  # left/right named from the subject's side
    np.testing.assert_allclose(estimate_alignment(subject_order).params, reference, atol=1e-9)
    np.testing.assert_allclose(estimate_alignment(landmarks.ravel()).params, reference, atol=1e-9)
    for bad, fragment in [
        (landmarks[:3], "(5, 2) or (2, 2)"),
        (np.full((5, 2), np.nan), "NaN"),
        (np.zeros((2, 2)), "coincide"),
        ("eyes", "numbers"),
    ]:
        with pytest.raises(ValueError, match=None) as info:
            align_face(ASTRONAUT, bad)
        assert fragment in str(info.value)


@pytest.mark.parametrize("degrees, scale", [(-30, 0.5), (30, 2.0), (30, 0.5), (-30, 2.0)])
def test_aligned_embeddings_agree_better_than_unaligned(embedder, degrees, scale):
    """Random-weight model. Its embeddings of any two photos are close (1 - cos ~ 1e-3 for
    unrelated images here), so the test compares 1 - cos: the face and its rotated, scaled copy
    must be at least 10x closer aligned (measured: 30-3000x) than cropped from their boxes
    (the rotated copy's box: the axis-aligned bounds of the moved face box)."""
    image, transform = transformed_astronaut(degrees, scale)
    corners = np.array(
        [[ASTRONAUT_BOX[i], ASTRONAUT_BOX[j]] for i in (0, 2) for j in (1, 3)], dtype=float
    )
    moved = transform(corners)
    moved_box = (*moved.min(axis=0), *moved.max(axis=0))
    landmarks = transform(ASTRONAUT_LANDMARKS)
    original = embedder.embed_faces(
        ASTRONAUT, boxes=[ASTRONAUT_BOX], landmarks=[ASTRONAUT_LANDMARKS]
    )
    rotated = embedder.embed_faces(image, boxes=[moved_box], landmarks=[landmarks], min_size=0)
    plain = embedder.embed_faces(ASTRONAUT, boxes=[ASTRONAUT_BOX], align=False)
    plain_rotated = embedder.embed_faces(image, boxes=[moved_box], align=False, min_size=0)
    aligned_gap = 1 - float(original[0].embedding @ rotated[0].embedding)
    unaligned_gap = 1 - float(plain[0].embedding @ plain_rotated[0].embedding)
    print(
        f"{degrees} deg x{scale}: 1 - cos aligned {aligned_gap:.2e}, unaligned {unaligned_gap:.2e}"
    )
    assert original[0].aligned and not plain[0].aligned
    assert aligned_gap * 10 < unaligned_gap


# ----------------------------------------------------------------------------
# Detectors and the pipeline
# ----------------------------------------------------------------------------

TWO_FACES = np.concatenate([ASTRONAUT, ASTRONAUT[:, ::-1]], axis=1)  # (512, 1024, 3)
# The astronaut at half size (face ~52 px) left of the mirrored full-size one (face ~100 px):
# the default detector lists the smaller face first.
GROUP = np.zeros((512, 768, 3), np.uint8)
GROUP[:256, :256] = np.asarray(
    Image.fromarray(ASTRONAUT).resize((256, 256), Image.Resampling.BILINEAR)
)
GROUP[:, 256:] = ASTRONAUT[:, ::-1]


def test_embed_faces_equals_manual_crop_and_embed(embedder):
    """A detector callable and explicit boxes give what crop_face / align_face + embed give."""
    eyes_right = ASTRONAUT_EYES * [-1, 1] + [1023, 0]  # the mirrored face's eyes
    eyes_right = eyes_right[::-1]  # image order: left first
    found = [
        ((177, 66, 272, 161), 0.9, ASTRONAUT_LANDMARKS),  # 5 points
        ((752, 66, 847, 161), 0.8, eyes_right),  # 2 eyes
        ((600, 300, 700, 420), 0.7, None),  # no landmarks: a crop with margin
    ]
    calls = []

    def detector(image):
        calls.append(image)
        return found

    result = embedder.embed_faces(TWO_FACES, detector=detector)
    assert len(calls) == 1 and calls[0].dtype == np.uint8
    np.testing.assert_array_equal(calls[0], TWO_FACES)
    crops = [
        align_face(TWO_FACES, ASTRONAUT_LANDMARKS, SIZE),
        align_face(TWO_FACES, eyes_right, SIZE),
        crop_face(TWO_FACES, found[2][0], margin=0.2),
    ]
    manual = embedder.embed(crops)
    assert [f.aligned for f in result] == [True, True, False]
    assert [f.score for f in result] == [0.9, 0.8, 0.7]
    assert result[2].crop_box == (580, 276, 720, 444)  # 100x120 box + 20 and 24 px
    for face, vector, (box, _, _) in zip(result, manual, found, strict=True):
        assert face.box == tuple(float(v) for v in box)
        np.testing.assert_allclose(face.embedding, vector, atol=1e-6)

    given = embedder.embed_faces(
        TWO_FACES,
        boxes=[f[0] for f in found],
        landmarks=[f[2] for f in found],
    )
    assert [f.score for f in given] == [None, None, None]
    for face, vector in zip(given, manual, strict=True):
        np.testing.assert_allclose(face.embedding, vector, atol=1e-6)
    xywh = embedder.embed_faces(TWO_FACES, boxes=(600, 300, 100, 120), box_format="xywh")
    np.testing.assert_allclose(xywh[0].embedding, manual[2], atol=1e-6)

    # flip: mean of the crop's and its mirror image's embeddings, re-normalised
    flipped = embedder.embed_faces(TWO_FACES, detector=detector, flip=True)
    mirrored = embedder.embed([c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for c in crops])
    expected = manual + mirrored
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    for face, vector in zip(flipped, expected, strict=True):
        np.testing.assert_allclose(face.embedding, vector, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(face.embedding), 1.0, atol=1e-6)

    # policies and min_size
    largest = embedder.embed_faces(TWO_FACES, detector=detector, policy="largest")
    assert [f.box for f in largest] == [(600.0, 300.0, 700.0, 420.0)]
    confident = embedder.embed_faces(TWO_FACES, detector=detector, policy="most_confident")
    assert confident[0].box == (177.0, 66.0, 272.0, 161.0)
    big = embedder.embed_faces(TWO_FACES, detector=detector, min_size=96)  # boxes 95, 95, 100
    assert [f.box for f in big] == [(600.0, 300.0, 700.0, 420.0)]
    assert embedder.embed_faces(TWO_FACES, detector=lambda image: []) == []


def test_embed_faces_bad_arguments(embedder):
    with pytest.raises(ValueError, match="policy must be one of all, largest, most_confident"):
        embedder.embed_faces(ASTRONAUT, boxes=[ASTRONAUT_BOX], policy="first")
    with pytest.raises(ValueError, match="needs scores"):
        embedder.embed_faces(ASTRONAUT, boxes=[ASTRONAUT_BOX], policy="most_confident")
    with pytest.raises(ValueError, match="either a detector or explicit boxes"):
        embedder.embed_faces(ASTRONAUT, detector=lambda i: [], boxes=[ASTRONAUT_BOX])
    with pytest.raises(ValueError, match="landmarks need boxes"):
        embedder.embed_faces(ASTRONAUT, landmarks=[ASTRONAUT_LANDMARKS])
    with pytest.raises(ValueError, match="2 boxes but 1 landmark"):
        embedder.embed_faces(ASTRONAUT, boxes=[ASTRONAUT_BOX] * 2, landmarks=[ASTRONAUT_EYES])
    with pytest.raises(ValueError, match=r"face #1: box must be 4 numbers"):
        embedder.embed_faces(ASTRONAUT, boxes=[ASTRONAUT_BOX, (1, 2, 3)])
    with pytest.raises(TypeError, match=r"detection #0: .*\(box_xyxy, score\[, landmarks\]\)"):
        embedder.embed_faces(ASTRONAUT, detector=lambda i: ["face"])
    with pytest.raises(ValueError, match=r"detection #0: .*x1 < x2"):
        embedder.embed_faces(ASTRONAUT, detector=lambda i: [((50, 50, 10, 10), 1.0)])


def test_detector_adapters():
    # YOLO / ultralytics: boxes.data (x1, y1, x2, y2, conf, cls), keypoints.data (x, y, conf)
    data = np.array([[10, 20, 110, 140, 0.9, 0], [200, 30, 260, 100, 0.4, 0]], dtype=np.float32)
    keypoints = np.zeros((2, 5, 3))
    keypoints[:, :, :2] = ASTRONAUT_LANDMARKS
    yolo = detections_from_xyxy(data, keypoints)
    assert [d.box for d in yolo] == [(10, 20, 110, 140), (200, 30, 260, 100)]
    assert [round(d.score, 6) for d in yolo] == [0.9, 0.4]
    np.testing.assert_allclose(yolo[0].landmarks, ASTRONAUT_LANDMARKS)
    assert detections_from_xyxy(data[:, :4])[0].score is None
    assert detections_from_xyxy(np.zeros((0, 6))) == []
    with pytest.raises(ValueError, match=r"\(N, 4\) or \(N, 5\+\)"):
        detections_from_xyxy(np.zeros((2, 3)))

    # MediaPipe: relative xmin, ymin, width, height; 6 relative keypoints (right eye, left eye,
    # nose tip, mouth centre, right ear, left ear), in a 200 x 100 (width x height) image.
    boxes = [[0.25, 0.1, 0.5, 0.8]]
    keypoints = [[[0.6, 0.4], [0.4, 0.4], [0.5, 0.55], [0.5, 0.7], [0.7, 0.45], [0.3, 0.45]]]
    (mp,) = detections_from_relative(
        boxes, width=200, height=100, scores=[0.95], landmarks=keypoints
    )
    assert mp.box == (50.0, 10.0, 150.0, 90.0) and mp.score == 0.95
    # the eyes in image order (left first), whichever way MediaPipe names them
    np.testing.assert_allclose(mp.landmarks, [[80.0, 40.0], [120.0, 40.0]])
    five = np.array([[[0.4, 0.4], [0.6, 0.4], [0.5, 0.55], [0.42, 0.7], [0.58, 0.7]]])
    (mp5,) = detections_from_relative(boxes, width=200, height=100, landmarks=five)
    np.testing.assert_allclose(mp5.landmarks, five[0] * [200, 100])

    # OpenCV FaceDetectorYN: x, y, w, h, 5 x (x, y), score
    row = np.r_[[10, 20, 100, 120], ASTRONAUT_LANDMARKS.ravel(), 0.87]
    (yunet,) = detections_from_yunet(row[None].astype(np.float32))
    assert yunet.box == (10.0, 20.0, 110.0, 140.0) and yunet.score == pytest.approx(0.87)
    np.testing.assert_allclose(yunet.landmarks, ASTRONAUT_LANDMARKS, atol=1e-4)
    assert detections_from_yunet(None) == []

    # a detector may also return a YOLO-style array
    assert faces.as_detections(data)[1].box == (200, 30, 260, 100)
    assert isinstance(faces.as_detections([Detection((1, 2, 3, 4), 0.5)])[0], Detection)


def test_missing_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    with pytest.raises(MissingExtraError, match=r"keras-convnext\[faces\]"):
        faces.HaarCascadeDetector()
    with pytest.raises(MissingExtraError, match=r"keras-convnext\[faces\]"):
        faces.YuNetDetector("model.onnx")


def test_yunet_detector_needs_the_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such YuNet model file"):
        faces.YuNetDetector(tmp_path / "face_detection_yunet.onnx")


def fake_yunet_model(path, side, box, landmarks, stride=32):
    """An ONNX file with YuNet's interface (input [1, 3, side, side]; outputs cls/obj/bbox/kps
    for strides 8, 16, 32) whose only confident anchor encodes `box` and `landmarks` the way
    OpenCV's FaceDetectorYN decodes them. No real YuNet model is available offline."""
    from onnx import TensorProto, helper, numpy_helper, save

    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
        helper.make_node("Reshape", ["mean", "shape"], ["mean3"]),
        helper.make_node("Mul", ["mean3", "zero"], ["nothing"]),  # outputs depend on the input
    ]
    constants = [
        numpy_helper.from_array(np.array([1, 1, 1], np.int64), "shape"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    outputs = []
    (x1, y1, x2, y2), points = box, np.asarray(landmarks, dtype=np.float64)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    for kind, channels in (("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10)):
        for step in (8, 16, 32):
            cells = side // step
            value = np.zeros((1, cells * cells, channels), np.float32)
            if step == stride:
                row, col = int(cy // step), int(cx // step)
                encoded = {
                    "cls": [1.0],
                    "obj": [1.0],
                    "bbox": [cx / step - col, cy / step - row]
                    + [np.log((x2 - x1) / step), np.log((y2 - y1) / step)],
                    "kps": (points / step - [col, row]).ravel(),
                }[kind]
                value[0, row * cells + col] = encoded
            name = f"{kind}_{step}"
            constants.append(numpy_helper.from_array(value, name + "_value"))
            nodes.append(helper.make_node("Add", [name + "_value", "nothing"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape))
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])
    graph = helper.make_graph(nodes, "fake_yunet", [image], outputs, constants)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


def test_yunet_detector_through_opencv(embedder, tmp_path):
    """`YuNetDetector` runs OpenCV's real FaceDetectorYN decoding on a stand-in model file."""
    pytest.importorskip("onnx")
    path = fake_yunet_model(tmp_path / "yunet.onnx", 512, ASTRONAUT_BOX, ASTRONAUT_LANDMARKS)
    detector = faces.YuNetDetector(path)
    (found,) = detector(ASTRONAUT)
    np.testing.assert_allclose(found.box, ASTRONAUT_BOX, atol=1e-3)  # float32 decoding
    assert found.score == pytest.approx(1.0)
    np.testing.assert_allclose(found.landmarks, ASTRONAUT_LANDMARKS, atol=1e-4)
    (face,) = embedder.embed_faces(ASTRONAUT, detector=detector)
    manual = embedder.embed(align_face(ASTRONAUT, found.landmarks, SIZE))
    assert face.aligned and face.landmarks.shape == (5, 2)
    np.testing.assert_allclose(face.embedding, manual[0], atol=1e-6)


# ----------------------------------------------------------------------------
# Enrol and identify
# ----------------------------------------------------------------------------


def save(array, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return str(path)


@pytest.fixture(scope="session")
def people(tmp_path_factory):
    """PEOPLE/alice: 3 photos of the astronaut (whole, downscaled, cropped); PEOPLE/bob: the
    mirrored astronaut, a photo of two faces (its largest is enrolled), a photo without a face
    (coffee) and a corrupt file; a loose photo."""
    root = tmp_path_factory.mktemp("people")
    small = np.asarray(Image.fromarray(ASTRONAUT).resize((384, 384), Image.Resampling.BILINEAR))
    save(ASTRONAUT, root / "alice" / "a1.jpg", quality=95)
    save(small, root / "alice" / "a2.png")
    save(ASTRONAUT[20:400, 60:460], root / "alice" / "sub" / "a3.jpg", quality=95)
    save(ASTRONAUT[:, ::-1], root / "bob" / "b1.jpg", quality=95)
    save(skimage.data.coffee(), root / "bob" / "b2.jpg", quality=95)
    save(GROUP, root / "bob" / "b4.png")
    (root / "bob" / "b3.jpg").write_bytes(b"these bytes are not an image")
    save(ASTRONAUT, root / "loose.jpg")
    (root / "carol").mkdir()  # a person folder without photos: nobody to enrol
    return root


def test_enroll_and_identify_library(embedder, people):
    result = faces.enroll_folder(embedder, people)
    assert result.gallery.labels == ["alice", "alice", "alice", "bob", "bob"]
    assert result.counts() == {"alice": 3, "bob": 2}
    assert [os.path.relpath(s, people) for s in result.sources] == [
        "alice/a1.jpg",
        "alice/a2.png",
        os.path.join("alice", "sub", "a3.jpg"),
        "bob/b1.jpg",
        "bob/b4.png",
    ]
    reasons = {os.path.relpath(photo, people): reason for photo, reason in result.skipped}
    assert reasons.keys() == {"loose.jpg", "bob/b2.jpg", "bob/b3.jpg"}
    assert reasons["bob/b2.jpg"] == "no face found" and "corrupt" in reasons["bob/b3.jpg"]
    assert "person folder" in reasons["loose.jpg"]
    # row 0 is the largest face of a1.jpg, embedded as embed_faces does it
    (a1,) = embedder.embed_faces(str(people / "alice" / "a1.jpg"), policy="largest")
    np.testing.assert_allclose(result.gallery.embeddings[0], a1.embedding, atol=1e-6)
    group = embedder.embed_faces(GROUP)  # b4.png: only its larger face is enrolled
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in group]
    assert len(group) == 2 and areas[1] > areas[0]  # the larger face is not the first found
    np.testing.assert_allclose(result.gallery.embeddings[4], group[1].embedding, atol=1e-6)

    found = faces.identify(embedder, TWO_FACES, result.gallery, threshold=0.0)
    expected = embedder.embed_faces(TWO_FACES)
    assert len(found) == len(expected) == 2
    for match, face in zip(found, expected, strict=True):
        scores = result.gallery.embeddings @ face.embedding
        assert match.face.box == face.box
        assert match.label == result.gallery.labels[int(np.argmax(scores))]
        assert match.score == pytest.approx(float(scores.max()), abs=1e-5)
        assert match.matched == (match.score >= 0.0) and match.threshold == 0.0
    assert not any(
        m.matched for m in faces.identify(embedder, TWO_FACES, result.gallery, threshold=1.01)
    )
    with pytest.raises(FaceError, match="320-dim"):
        faces.identify(embedder, TWO_FACES, Gallery().add(np.ones((1, 8)), ["x"]))


def test_enroll_errors(embedder, tmp_path):
    with pytest.raises(FileNotFoundError):
        faces.enroll_folder(embedder, tmp_path / "nowhere")
    (tmp_path / "empty" / "nobody").mkdir(parents=True)
    with pytest.raises(FaceError, match="no person folders with images"):
        faces.enroll_folder(embedder, tmp_path / "empty")
    save(skimage.data.coffee(), tmp_path / "faceless" / "dave" / "coffee.jpg")
    with pytest.raises(FaceError, match="no face found in any of the 1 photo"):
        faces.enroll_folder(embedder, tmp_path / "faceless")


def _parse_identify(text):
    """'face N: box [...] detector_score S best LABEL similarity X VERDICT' lines."""
    rows = []
    for line in text.splitlines():
        if line.startswith("face "):
            box = tuple(float(v) for v in line.split("[")[1].split("]")[0].split(","))
            tokens = line.split("]")[1].split()
            rows.append((box, tokens[3], float(tokens[5]), tokens[6]))
    return rows


def test_cli_enroll_and_identify(embedder, faces_checkpoint, people, tmp_path, capsys, monkeypatch):
    """Through `main`, with the session's embedder standing in for the one `--model` would
    build (a fresh model costs a compilation per run; test_cli_subprocess builds it for real)."""
    built = []

    def make_embedder(args):
        built.append(args.model)
        return embedder

    monkeypatch.setattr(embedding_cli.options, "make_embedder", make_embedder)
    common = ["--model", faces_checkpoint, "--no-progress"]
    gallery_path = tmp_path / "gallery.npz"
    code = embedding_cli.main(["enroll", str(people), "-o", str(gallery_path), *common])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "enrolled alice: 3 photos\nenrolled bob: 2 photos\n" in captured.out
    assert "5 faces of 2 people (dim 320), 3 skipped" in captured.out
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 3 and any("b2.jpg: no face found" in line for line in skipped)
    gallery = Gallery.load(gallery_path)
    assert gallery.labels == ["alice", "alice", "alice", "bob", "bob"]

    frame = save(TWO_FACES, tmp_path / "two.png")
    code = embedding_cli.main(["identify", frame, "--gallery", str(gallery_path), *common])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = _parse_identify(captured.out)
    assert "threshold: 0.5 (uncalibrated default" in captured.out
    expected = embedder.embed_faces(frame)
    assert [row[0] for row in rows] == [face.box for face in expected]
    for (_, label, score, verdict), face in zip(rows, expected, strict=True):
        scores = gallery.embeddings @ face.embedding
        assert label == gallery.labels[int(np.argmax(scores))]
        assert score == pytest.approx(float(scores.max()), abs=2e-6)
        assert verdict == ("MATCH" if score >= 0.5 else "UNKNOWN")
    code = embedding_cli.main(
        [
            "identify",
            frame,
            "--gallery",
            str(gallery_path),
            "--threshold",
            "1.01",
            "--policy",
            "largest",
            *common,
        ]
    )
    rows = _parse_identify(capsys.readouterr().out)
    assert code == 0 and len(rows) == 1 and rows[0][3] == "UNKNOWN"
    assert built == [faces_checkpoint] * 3


def test_cli_enroll_into_a_store_and_identify_from_it(
    embedder, faces_checkpoint, people, tmp_path, capsys, monkeypatch
):
    """`enroll --gallery sqlite:///...#staff` adds to a stored gallery (twice: it grows, one
    transaction each, the photo of each face in its metadata); `identify --gallery` reads it."""
    monkeypatch.setattr(embedding_cli.options, "make_embedder", lambda args: embedder)
    common = ["--model", faces_checkpoint, "--no-progress"]
    location = f"sqlite:///{tmp_path / 'faces.db'}#staff"
    for round_ in (1, 2):
        code = embedding_cli.main(["enroll", str(people), "--gallery", location, *common])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert f"5 faces of 2 people (ids {5 * round_ - 5}-{5 * round_ - 1}; it holds " \
            f"{5 * round_})" in captured.out  # fmt: skip
    gallery = Gallery.open(location)
    assert gallery.labels == ["alice", "alice", "alice", "bob", "bob"] * 2
    photos = [m["photo"] for m in gallery.metadata_of(gallery.ids[:5])]
    assert all(
        f"{os.sep}{label}{os.sep}" in p for p, label in zip(photos, gallery.labels[:5], strict=True)
    )
    frame = save(TWO_FACES, tmp_path / "two.png")
    code = embedding_cli.main(["identify", frame, "--gallery", location, *common])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    expected = embedder.embed_faces(frame)
    for (_, label, score, _), face in zip(_parse_identify(captured.out), expected, strict=True):
        scores = gallery.embeddings @ face.embedding
        assert label == gallery.labels[int(np.argmax(scores))]
        assert score == pytest.approx(float(scores.max()), abs=2e-6)
    for argv, message in [
        (["identify", frame, "--gallery", f"sqlite:///{tmp_path / 'faces.db'}#nope"],
         "no gallery named 'nope'"),
        (["identify", frame, "--gallery", "redis://x/y"], "unknown store scheme 'redis'"),
        (["enroll", str(people), "--gallery", "sqlite://host/x.db"], "no host"),
    ]:  # fmt: skip
        assert embedding_cli.main([*argv, *common]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_cli_face_errors_are_one_line(faces_checkpoint, people, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_CONVNEXT_CACHE", str(tmp_path / "cache"))
    common = ["--model", faces_checkpoint, "--no-progress", "--no-cache"]
    (tmp_path / "empty").mkdir()
    save(skimage.data.coffee(), tmp_path / "faceless" / "dave" / "coffee.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\x89PNG not an image")
    coffee = save(skimage.data.coffee(), tmp_path / "coffee.jpg")
    bad_gallery = tmp_path / "bad.npz"
    bad_gallery.write_bytes(b"not a zip file")
    good_gallery = tmp_path / "gallery.npz"
    Gallery().add(np.eye(320)[:2], ["a", "b"]).save(good_gallery)
    cases = [
        (["enroll", str(tmp_path / "empty"), "-o", str(tmp_path / "g.npz")], "no person folders"),
        (["enroll", str(tmp_path / "nowhere"), "-o", str(tmp_path / "g.npz")], "no such folder"),
        (["enroll", str(tmp_path / "faceless"), "-o", str(tmp_path / "g.npz")], "no face found"),
        (["identify", coffee, "--gallery", str(tmp_path / "missing.npz")], "no such gallery"),
        (["identify", coffee, "--gallery", str(bad_gallery)], "not a valid gallery"),
        (["identify", str(corrupt), "--gallery", str(good_gallery)], "corrupt.jpg"),
        (["identify", coffee, "--gallery", str(good_gallery)], "coffee.jpg: no face found"),
        (["identify", coffee, "--gallery", str(good_gallery), "--margin", "-1"], "--margin"),
        (
            ["identify", coffee, "--gallery", str(good_gallery), "--yunet", "nope.onnx"],
            "no such YuNet model file",
        ),
    ]
    for argv, fragment in cases:
        code = embedding_cli.main([*argv, *common])
        err = capsys.readouterr().err.strip()
        assert code == 2, argv
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert not (tmp_path / "g.npz").exists()


@pytest.mark.slow
@pytest.mark.once("torch")  # process plumbing; embeddings per backend are tested above
def test_cli_subprocess(faces_checkpoint, people, tmp_path):
    """One real `python -m embedding enroll` + `identify` run, as a user types it."""
    env = {**os.environ, "PYTHONPATH": ROOT, "KERAS_CONVNEXT_CACHE": str(tmp_path / "cache")}
    common = ["--model", faces_checkpoint, "--no-progress"]
    gallery = tmp_path / "gallery.npz"
    run = lambda *argv: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "embedding", *argv, *common],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
    )
    enrolled = run("enroll", str(people), "-o", str(gallery))
    assert enrolled.returncode == 0, enrolled.stderr
    assert "5 faces of 2 people" in enrolled.stdout
    identified = run("identify", str(people / "alice" / "a1.jpg"), "--gallery", str(gallery))
    assert identified.returncode == 0, identified.stderr
    rows = _parse_identify(identified.stdout)
    assert len(rows) == 1
    # the same photo is enrolled: its best match is itself, similarity 1
    assert rows[0][1] == "alice" and rows[0][2] == pytest.approx(1.0, abs=1e-5)
    missing = run("identify", str(people / "alice" / "a1.jpg"), "--gallery", "nope.npz")
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: ")
    assert "Traceback" not in missing.stderr
