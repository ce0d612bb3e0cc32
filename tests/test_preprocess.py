"""embedding.preprocess: bounded memory for any image, decompression bombs refused per
image, no file held by a failed input, 16-bit images scaled, array layouts detected or
refused (the reliability cases of the image loader).
"""

import os
import time

import numpy as np
import pytest
from conftest import (
    BACKEND,
    SIZE,
    bad_files,
    open_fds,
    photo,
    png_bytes,
    png_header_only,
    result_line,
    run_python,
)
from PIL import Image

import embedding.finetune as ft
from embedding import Embedder, Preprocessor, load_image
from embedding import images as images_module
from embedding import preprocess as preprocess_module
from embedding.errors import (
    ImageLoadError,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Images: memory bounded by the output size, for any aspect ratio
# ----------------------------------------------------------------------------

MEMORY_SCRIPT = """
import io, sys
import numpy as np
from PIL import Image

def memory_mb(field):  # VmRSS: now; VmHWM: peak of this process image (ru_maxrss is not:
    with open("/proc/self/status") as f:  # Linux carries it over from the forked parent)
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024

width, height, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
buffer = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width), np.uint8)).save(
    buffer, format="PNG")
data = buffer.getvalue()
if mode == "embed":
    import keras
    from embedding import Embedder
    image = keras.Input((224, 224, 3))
    x = keras.layers.Conv2D(4, 8, strides=8)(image)
    model = keras.Model(image, keras.layers.GlobalAveragePooling2D()(x))
    embedder = Embedder(model=model, pretrained_cfg={"input_size": (3, 224, 224)}, batch_size=1)
    embedder.embed(np.zeros((300, 400, 3), np.uint8))  # compile, warm up
    run = lambda: embedder.embed(data)
else:
    from embedding import Preprocessor
    preprocessor = Preprocessor({"input_size": (3, 224, 224)})
    run = lambda: preprocessor(data)
try:  # reset the peak to the present (Linux >= 4.0), so the peak is this call's own
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass  # the peak then includes the warm-up: an upper bound
baseline = memory_mb("VmRSS")
out = run()
print("RESULT", memory_mb("VmHWM") - baseline, out.shape)
"""


def _peak_above_baseline(width, height, mode):
    proc = run_python(MEMORY_SCRIPT, width, height, mode, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return float(line.split()[1])


@pytest.mark.parametrize("width, height", [(20000, 1), (1, 20000), (60000, 3)])
def test_extreme_aspect_ratio_preprocessing_stays_small(width, height):
    """A 20000x1 PNG used to become a 5,120,000x256 image before the crop (14 GB)."""
    peak = _peak_above_baseline(width, height, "preprocess")
    print(f"{width}x{height}: peak {peak:.1f} MB above baseline")
    assert peak < 100


@pytest.mark.slow
@pytest.mark.parametrize("width, height", [(20000, 1), (1, 20000)])
def test_extreme_aspect_ratio_embedding_under_500_mb(width, height):
    peak = _peak_above_baseline(width, height, "embed")
    print(f"[{BACKEND}] embed {width}x{height}: peak {peak:.1f} MB above baseline")
    assert peak < 500


@pytest.mark.parametrize(
    "shape, interpolation",
    [((6, 3000), "bicubic"), ((2500, 7), "bilinear"), ((40, 2000), "lanczos"), ((900, 60), "box")],
)
def test_region_resize_is_the_full_resize_up_to_rounding(shape, interpolation):
    """Only the crop region is resized for extreme shapes; it is the same resize: the
    short axis exactly, the long axis up to one 8-bit step (smooth filters) or a
    neighbouring pixel (box). Natural image content, as a camera gives."""
    height, width = shape
    image = Image.fromarray(photo("chelsea")).resize((width, height), Image.BILINEAR)
    pre = Preprocessor({"input_size": (3, 64, 64), "interpolation": interpolation})
    new_h, new_w = pre.config.resized_size(height, width)
    full = np.asarray(image.resize((new_w, new_h), pre._filter))
    expected = preprocess_module._center_crop(full, 64, 64)
    got = pre.resize_crop(image)
    assert got.shape == expected.shape == (64, 64, 3)
    difference = np.abs(got.astype(int) - expected.astype(int))
    assert difference.max() <= (40 if interpolation == "box" else 2)
    assert difference.mean() < 0.5


def test_ordinary_images_take_the_exact_path(monkeypatch):
    """Photos of any usual aspect ratio never take the region path (timm-exact)."""

    def fail(*args):
        raise AssertionError("region path taken")

    monkeypatch.setattr(preprocess_module, "_resize_region", fail)
    pre = Preprocessor({"input_size": (3, 224, 224), "crop_pct": 0.875})
    for width, height in [(640, 480), (480, 640), (1920, 1080), (4000, 3000), (300, 1200)]:
        assert pre(np.zeros((height, width, 3), np.uint8)).shape == (224, 224, 3)


# ----------------------------------------------------------------------------
# Images: decompression bombs are per-image errors, with a configurable limit
# ----------------------------------------------------------------------------


def test_decompression_bombs_are_refused_before_decoding():
    pre = Preprocessor({"input_size": (3, SIZE, SIZE)})
    started = time.perf_counter()
    for width, height, fragment in [
        (10000, 10000, "max_pixels"),  # above our limit, below PIL's own refusal
        (14000, 14000, "PIL"),  # PIL's DecompressionBombError, now an ImageLoadError
        (2**20, 2**20, "PIL"),
    ]:
        with pytest.raises(ImageLoadError, match=fragment) as info:
            pre(png_header_only(width, height), index=3)
        assert info.value.index == 3 and "pixels" in str(info.value)
    assert time.perf_counter() - started < 5  # nothing was decoded


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(photo("coffee")[:40, :50]).save(path)
    with pytest.raises(ImageLoadError, match="2,000 pixels is more than max_pixels=1,000"):
        Preprocessor({"input_size": (3, SIZE, SIZE)}, max_pixels=1000)(path)
    assert Preprocessor({"input_size": (3, SIZE, SIZE)}, max_pixels=2000)(path).shape == (
        SIZE,
        SIZE,
        3,
    )
    with pytest.raises(ImageLoadError, match="max_pixels"):  # arrays and PIL images too
        load_image(np.zeros((40, 50, 3), np.uint8), max_pixels=1000)
    with pytest.raises(ImageLoadError, match="max_pixels"):
        load_image(Image.new("RGB", (50, 40)), max_pixels=1000)
    with pytest.raises(ValueError, match="max_pixels"):
        Preprocessor({"input_size": (3, SIZE, SIZE)}, max_pixels=0)


def test_huge_jpegs_are_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    """Above DRAFT_ABOVE_PIXELS a JPEG is decoded by DCT scaling to at least twice the
    resize target; the result stays close to the full decode."""
    path = tmp_path / "big.jpg"
    big = Image.fromarray(photo("chelsea")).resize((2000, 1500), Image.BICUBIC)
    big.save(path, quality=95)
    pre = Preprocessor({"input_size": (3, 64, 64)})
    full = pre(path)
    decoded = []
    original = images_module._decode

    def spy(*args):
        image = original(*args)
        decoded.append(image.size)
        return image

    monkeypatch.setattr(images_module, "_decode", spy)
    monkeypatch.setattr(images_module, "DRAFT_ABOVE_PIXELS", 1_000_000)
    drafted = pre(path)
    assert decoded == [(250, 188)]  # 1/8 scale: still >= 2 x 73 on the short side
    assert drafted.shape == full.shape
    assert np.abs(drafted - full).mean() < 0.05  # normalised units (std ~0.23)


def test_bombs_among_good_images_are_skipped(tiny_embedder, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(photo("coffee")).save(good)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(14000, 14000))
    small_bomb = tmp_path / "bomb2.png"
    small_bomb.write_bytes(png_header_only(10000, 10000))
    result = tiny_embedder.embed_many([str(good), str(bomb), str(small_bomb), str(good)])
    assert result.indices.tolist() == [0, 3] and result.skipped == [1, 2]
    assert "bomb.png" in str(result.failures[0]) and "pixels" in str(result.failures[1])


# ----------------------------------------------------------------------------
# Images: a failed input releases every file it held
# ----------------------------------------------------------------------------


def test_failed_images_hold_no_open_files(tmp_path):
    paths = bad_files(tmp_path, 120)
    pre = Preprocessor({"input_size": (3, SIZE, SIZE)})
    before = open_fds()
    failures = []
    for index, path in enumerate(paths):
        try:
            pre(path, index=index)
        except ImageLoadError as error:
            failures.append(error)  # kept, as embed_many keeps them
    assert len(failures) == len(paths)
    assert open_fds() <= before + 2
    for error in failures:
        assert error.__traceback__ is None or error.__cause__ is None
        assert "Too many open files" not in str(error)


FD_LIMIT_SCRIPT = """
import json, os, resource, sys
import keras
import numpy as np
from PIL import Image
from embedding import Embedder
sys.path.insert(0, "tests")
folder = sys.argv[1]
image = keras.Input((32, 32, 3))
model = keras.Model(image, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(image)))
embedder = Embedder(model=model, pretrained_cfg={"input_size": (3, 32, 32)}, batch_size=8)
paths = sorted(os.path.join(folder, n) for n in os.listdir(folder))
good = os.path.join(folder, "zz_good.png")
paths = [p for p in paths if p != good] + [good] * 5
in_use = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 40, in_use + 40))
result = embedder.embed_many(paths, on_error="skip")
reasons = sorted({f.reason.split(" (")[0][:40] for f in result.failures})
print("RESULT" + json.dumps({"embedded": len(result.indices), "failed": len(result.failures),
      "fds": len(os.listdir("/proc/self/fd")) - in_use, "reasons": reasons}))
"""


@pytest.mark.slow
def test_300_bad_files_under_a_low_open_file_limit(tmp_path):
    """Before: 306 handles stayed open and the good files after them failed with
    `Too many open files` under `ulimit -n 256`."""
    bad_files(tmp_path, 306)
    Image.fromarray(photo("coffee")).save(tmp_path / "zz_good.png")
    out = result_line(run_python(FD_LIMIT_SCRIPT, tmp_path))
    assert out["embedded"] == 5 and out["failed"] == 306, out
    assert not any("open files" in r for r in out["reasons"]), out
    assert out["fds"] <= 8, out


# ----------------------------------------------------------------------------
# Images: 16-bit images are scaled, not clipped to white
# ----------------------------------------------------------------------------


def test_sixteen_bit_images_equal_their_8_bit_twins(tmp_path):
    import cv2

    pre = Preprocessor({"input_size": (3, 64, 64)})
    grey8 = photo("camera")
    rgb8 = photo("astronaut")
    grey16, rgb16 = grey8.astype(np.uint16) * 257, rgb8.astype(np.uint16) * 257
    expected_grey, expected_rgb = pre(grey8), pre(rgb8)
    (tmp_path / "grey16.png").write_bytes(png_bytes(grey16))
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    ok, encoded = cv2.imencode(".png", rgb16[:, :, ::-1])
    (tmp_path / "rgb16.png").write_bytes(encoded.tobytes())
    big_endian = Image.frombytes("I;16B", grey16.shape[::-1], grey16.astype(">u2").tobytes())
    grey_cases = {
        "I;16 png": tmp_path / "grey16.png",
        "I;16B": big_endian,
        "I": Image.fromarray(grey16.astype(np.int32)),
        "F 16-bit": Image.fromarray(grey16.astype(np.float32)),
        "F [0, 1]": Image.fromarray(grey8.astype(np.float32) / 255),
        "uint16 array": grey16,
    }
    for name, item in grey_cases.items():
        np.testing.assert_array_equal(pre(item), expected_grey, err_msg=name)
    for name, item in {"RGB 16-bit png": tmp_path / "rgb16.png", "uint16 RGB": rgb16}.items():
        np.testing.assert_array_equal(pre(item), expected_rgb, err_msg=name)
    white = pre(np.full_like(grey8, 255))
    assert np.abs(pre(tmp_path / "grey16.png") - white).mean() > 0.5  # not clipped to white


# ----------------------------------------------------------------------------
# Arrays: channels-first layouts, float rounding
# ----------------------------------------------------------------------------


def test_channels_first_arrays_are_detected_or_refused():
    pre = Preprocessor({"input_size": (3, SIZE, SIZE)})
    rgb = photo("coffee")[:120, :90]
    reference = pre(rgb)
    np.testing.assert_array_equal(pre(np.moveaxis(rgb, -1, 0)), reference)  # (3, H, W)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(pre(np.moveaxis(rgba, -1, 0)), reference)  # (4, H, W)
    grey = photo("camera")[:64, :48]
    np.testing.assert_array_equal(pre(grey[None]), pre(grey))  # (1, H, W)

    ambiguous = np.random.default_rng(0).integers(0, 255, (3, 512, 4), np.uint8)
    for array in (ambiguous, np.zeros((4, 40, 3), np.uint8), np.zeros((1, 20, 4), np.uint8)):
        with pytest.raises(ImageLoadError, match="ambiguous.*data_format"):
            pre(array)
    as_first = pre(ambiguous, data_format="channels_first")
    np.testing.assert_array_equal(as_first, pre(np.moveaxis(ambiguous, 0, -1)))
    as_last = pre(ambiguous, data_format="channels_last")
    assert np.abs(as_first - as_last).max() > 0.1
    with pytest.raises(ImageLoadError, match="channels_first"):
        pre(np.zeros((40, 30, 3), np.uint8), data_format="channels_first")
    with pytest.raises(ValueError, match="data_format"):
        pre(rgb, data_format="NCHW")
    with pytest.raises(ImageLoadError, match="shape"):
        pre(np.zeros((5, 40, 7), np.uint8))  # no channel axis at all


def test_channels_first_through_the_embedder(tiny_keras):
    chw = np.moveaxis(photo("chelsea"), -1, 0)
    emb = Embedder(model=ft.load_model(tiny_keras), data_format="channels_first")
    np.testing.assert_allclose(
        emb.embed(chw), emb.embed(photo("chelsea"), data_format="channels_last"), atol=1e-6
    )
    batch = np.stack([chw[:, :200, :200]] * 2)  # (N, C, H, W)
    assert Embedder(model=emb.model).embed(batch).shape == (2, emb.dim)


def test_float_images_tolerate_rounding_only():
    pre = Preprocessor({"input_size": (3, SIZE, SIZE)})
    base = photo("coffee")[:80, :80].astype(np.float32) / 255
    base[0, 0, 0], base[1, 1, 1] = 1.0, 0.0
    clean = pre(base)
    for drift in (1e-7, 1e-5, 5e-4):  # float rounding: clipped back into [0, 1]
        noisy = base.copy()
        noisy[0, 0, 0], noisy[1, 1, 1] = 1.0 + drift, -drift
        np.testing.assert_array_equal(pre(noisy), clean)
    ones = np.ones((8, 8, 3), np.float32)
    np.testing.assert_array_equal(pre(ones * np.float32(1.0000001)), pre(ones))
    for bad, fragment in [(1.01, "[0, 1]"), (-0.5, "[0, 1]"), (255.0, "uint8"), (np.nan, "NaN")]:
        array = base.copy()
        array[3, 3, 0] = bad
        with pytest.raises(ImageLoadError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            pre(array)
