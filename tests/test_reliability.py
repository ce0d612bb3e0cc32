"""Issue 10, reliability: every bad input a clear error of its own type, bounded
resources for any image, one folder walker, command lines that print one
`error:` line (never a traceback), and fine-tuning that resumes in a new process.

Each class of problem has several concrete cases; the messages must name the
problem. The heavy cases (subprocesses, training) are marked slow.
"""

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import keras
import numpy as np
import pytest
import skimage.data
from conftest import BACKEND, random_timm_model, save_timm_checkpoint
from PIL import Image

import embedding.finetune as ft
import weights_convert
from convnext_common.files import check_output_path
from embedding import Embedder, Preprocessor, load_image
from embedding import cli as embedding_cli
from embedding import preprocess as preprocess_module
from embedding.errors import (
    EmptyInputError,
    FinetuneConfigError,
    FinetuneDataError,
    ImageLoadError,
    InputTypeError,
    NonFiniteError,
    OutputPathError,
    PairsFileError,
    ResumeMismatchError,
    UnsupportedInputError,
)
from embedding.files import find_image_files, identity_folders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


# ----------------------------------------------------------------------------
# Fixtures: a tiny embedding model as a .keras file, images, folders
# ----------------------------------------------------------------------------


def tiny_model(size=SIZE, dim=16, name="tiny"):
    image = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="gelu")(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(dim)(x)
    return keras.Model(image, x, name=name)


TINY_CFG = {"input_size": [3, SIZE, SIZE], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}


@pytest.fixture(scope="module")
def tiny_keras(tmp_path_factory):
    """A tiny embedding model saved as this project saves models (.keras + sidecar)."""
    keras.utils.set_random_seed(0)
    model = ft.as_embedding_model(tiny_model())
    model.pretrained_cfg = dict(TINY_CFG)
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.keras")
    ft.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def tiny_embedder(tiny_keras):
    return Embedder(model=ft.load_model(tiny_keras), batch_size=4)


def photo(name="astronaut"):
    return getattr(skimage.data, name)()


def png_bytes(array, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, **kwargs).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width, height) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header) and
    whose data is one deflated byte: refused at the header or it would decode forever."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


def bad_files(folder, count):
    """`count` unreadable files of several kinds: truncated PNG / JPEG / PPM (memory
    mapped by PIL), garbage, empty, and bomb headers."""
    os.makedirs(folder, exist_ok=True)
    good_png = png_bytes(photo("coffee"))
    jpeg = io.BytesIO()
    Image.fromarray(photo("coffee")).save(jpeg, format="JPEG")
    ppm = io.BytesIO()
    Image.fromarray(photo("coffee")).save(ppm, format="PPM")
    kinds = [
        ("png", good_png[: len(good_png) // 3]),
        ("jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 3]),
        ("ppm", ppm.getvalue()[: len(ppm.getvalue()) // 2]),
        ("jpg", b"definitely not an image"),
        ("png", b""),
        ("png", png_header_only(30000, 30000)),
    ]
    paths = []
    for k in range(count):
        ext, data = kinds[k % len(kinds)]
        path = os.path.join(folder, f"bad_{k:04d}.{ext}")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_python(code, *args, timeout=600, env_extra=None):
    env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def result_line(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder nobody can create files in: permission bits for a normal user; as root
    (whom they do not bind) sysfs, where even root cannot create files."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        yield str(folder)
        folder.chmod(0o755)
        return
    try:
        open("/sys/.keras-convnext-write-check", "w").close()
    except OSError:
        yield "/sys"
        return
    pytest.skip("no folder here refuses root's writes")


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
    original = preprocess_module._decode

    def spy(*args):
        image = original(*args)
        decoded.append(image.size)
        return image

    monkeypatch.setattr(preprocess_module, "_decode", spy)
    monkeypatch.setattr(preprocess_module, "DRAFT_ABOVE_PIXELS", 1_000_000)
    drafted = pre(path)
    assert decoded == [(250, 188)]  # 1/8 scale: still >= 2 x 73 on the short side
    assert drafted.shape == full.shape
    assert np.abs(drafted - full).mean() < 0.05  # normalised units (std ~0.23)


def test_cli_max_pixels(lfw_people, tiny_keras, tmp_path, capsys):
    root, _ = lfw_people
    argv = ["embed", root, "-o", tmp_path / "v.npz", "--model", tiny_keras, "--max-pixels"]
    code, _, err = run_cli([*argv, "100"], capsys)
    assert_one_error_line(code, err, "none of the 12 images")
    assert "max_pixels" in err and not (tmp_path / "v.npz").exists()
    code, _, err = run_cli([*argv, "0"], capsys)
    assert_one_error_line(code, err, "--max-pixels")


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


# ----------------------------------------------------------------------------
# Arguments: None, numbers, empty lists, None inside a list
# ----------------------------------------------------------------------------


def test_embed_arguments_of_the_wrong_kind(tiny_embedder):
    emb = tiny_embedder
    for bad in (None, 5, 2.5, {"a": 1}):
        with pytest.raises(InputTypeError, match="one image or a list of images") as info:
            emb.embed(bad)
        assert isinstance(info.value, TypeError) and "path" in str(info.value)
    for empty in ([], (), np.zeros((0, 8, 8, 3), np.uint8)):
        with pytest.raises(EmptyInputError, match="empty"):
            emb.embed(empty)
    good = photo("coffee")
    with pytest.raises(UnsupportedInputError, match=r"#1 \(None\).*NoneType.*path") as info:
        emb.embed([good, None])
    assert isinstance(info.value, TypeError) and info.value.index == 1
    result = emb.embed_many([good, None, 7, good], on_error="skip")
    assert result.indices.tolist() == [0, 3] and result.skipped == [1, 2]
    with pytest.raises(UnsupportedInputError, match="int"):
        load_image(7)


def test_verification_refuses_nan(tiny_embedder, tiny_keras):
    emb = tiny_embedder
    vector = emb.embed(photo("coffee"))[0]
    nan_vector = vector.copy()
    nan_vector[0] = np.nan
    for a, b in ((nan_vector, vector), (vector, np.full_like(vector, np.inf))):
        with pytest.raises(NonFiniteError, match="NaN or infinity"):
            emb.verify(a, b)
    for threshold in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteError, match="finite"):
            emb.verify(vector, vector, threshold=threshold)
        with pytest.raises(NonFiniteError):
            Embedder(model=emb.model, threshold=threshold)
    with pytest.raises(InputTypeError):
        emb.verify(vector, vector, threshold="0.5")
    assert emb.verify(vector, vector, threshold=0.9).verified


@pytest.fixture(scope="module")
def nan_keras(tmp_path_factory):
    """A .keras embedding model that outputs NaN (a broken checkpoint's symptom)."""
    model = tiny_model()
    dense = model.layers[-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel, np.full_like(bias, np.nan)])
    model = ft.as_embedding_model(model)
    model.pretrained_cfg = dict(TINY_CFG)
    path = str(tmp_path_factory.mktemp("nan") / "nan.keras")
    ft.save_model(model, path)
    return path


def test_nan_embeddings_are_refused(nan_keras):
    emb = Embedder(model=ft.load_model(nan_keras))
    with pytest.raises(NonFiniteError, match="NaN or infinite embeddings.*#0"):
        emb.embed(photo("coffee"))
    with pytest.raises(NonFiniteError):
        emb.verify(photo("coffee"), photo("chelsea"))


# ----------------------------------------------------------------------------
# Folders: one walker, one label rule for embed and finetune
# ----------------------------------------------------------------------------


@pytest.fixture
def nested_people(tmp_path):
    root = tmp_path / "people"
    files = {
        "alice/1.jpg": "astronaut",
        "alice/sub/deeper/2.jpg": "astronaut",
        "alice/sub/3.PNG": "astronaut",
        "bob/1.png": "coffee",
        "bob/.hidden.jpg": "coffee",
        ".cache/4.jpg": "coffee",
        "carol/x/y/z/5.jpeg": "chelsea",
        "loose.jpg": "rocket",
    }
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(source)[:64, :64]).save(path, format="PNG")
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "alice" / "loop").symlink_to(root, target_is_directory=True)  # not followed
    return root


def test_one_walker_labels_by_top_level_folder(nested_people):
    root = str(nested_people)
    found = {os.path.relpath(f.path, root): (f.label, f.loose) for f in find_image_files([root])}
    assert found == {
        "alice/1.jpg": ("alice", False),
        "alice/sub/3.PNG": ("alice", False),
        "alice/sub/deeper/2.jpg": ("alice", False),
        "bob/1.png": ("bob", False),
        "carol/x/y/z/5.jpeg": ("carol", False),
        "loose.jpg": ("people", True),
    }
    given = find_image_files([os.path.join(root, "alice/sub/deeper/2.jpg")])
    assert [f.label for f in given] == ["deeper"]  # a file given by name: its folder
    labelled, loose = identity_folders(root)
    assert [f.label for f in labelled] == ["alice"] * 3 + ["bob", "carol"]
    assert [os.path.basename(f.path) for f in loose] == ["loose.jpg"]
    assert embedding_cli.find_images([root]) == [f.path for f in find_image_files([root])]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_image_files([os.path.join(root, "nowhere")])
    with pytest.raises(EmptyInputError, match="identity sub-folders"):
        identity_folders(os.path.join(root, "carol", "x", "y", "z"))


def test_embed_and_finetune_label_alike(nested_people, tiny_keras, tmp_path, capsys):
    root = str(nested_people)
    out = tmp_path / "v.npz"
    assert embedding_cli.main(["embed", root, "-o", str(out), "--model", tiny_keras]) == 0
    with np.load(out, allow_pickle=False) as data:
        labels = dict(zip(data["paths"].tolist(), data["labels"].tolist(), strict=True))
    assert labels[os.path.join(root, "alice", "sub", "deeper", "2.jpg")] == "alice"
    images = ft.ImageSet.from_folder(root, Preprocessor(TINY_CFG))
    by_name = dict(zip(images.names, images.identities.tolist(), strict=True))
    assert by_name[os.path.join("alice", "sub", "deeper", "2.jpg")] == "alice"
    assert images.loose == [os.path.join(root, "loose.jpg")]


# ----------------------------------------------------------------------------
# Output paths: refused before any work
# ----------------------------------------------------------------------------


def test_output_paths_that_cannot_be_written(tmp_path, unwritable_dir):
    (tmp_path / "a_file").write_text("x")
    cases = [
        (str(tmp_path), "is a folder"),
        (str(tmp_path / "a_file" / "out.npz"), "is a file, not a folder"),
        (os.path.join(unwritable_dir, "out.npz"), "cannot write"),
        ("", "empty"),
    ]
    for path, fragment in cases:
        with pytest.raises(OutputPathError, match=fragment):
            check_output_path(path, option="-o")
    with pytest.raises(OutputPathError, match=r"end in \.keras"):
        check_output_path(str(tmp_path / "w.weights.h5"), suffixes=(".keras",))
    deep = tmp_path / "new" / "deeper" / "out.npz"
    assert check_output_path(deep) == str(deep) and not deep.parent.exists()


# ----------------------------------------------------------------------------
# Command lines: one `error:` line, non-zero exit, never a traceback
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    """Model sources that must be refused: (source, fragment of the message)."""
    import torch

    folder = tmp_path_factory.mktemp("bad_models")
    atto = random_timm_model("convnext_atto", seed=1)
    good = save_timm_checkpoint(atto, folder / "atto", "convnext_atto")
    data = (good / "model.safetensors").read_bytes()
    (folder / "truncated").mkdir()
    (folder / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "mismatched").mkdir()
    (folder / "mismatched" / "model.safetensors").write_bytes(data)
    config = json.loads((good / "config.json").read_text())
    config["architecture"] = "convnext_femto"
    (folder / "mismatched" / "config.json").write_text(json.dumps(config))
    torch.save(atto.state_dict(), folder / "pickled.pth")
    Image.fromarray(photo("coffee")).save(folder / "photo.jpg")
    (folder / "broken.keras").write_bytes(b"PK\x03\x04 not a zip")
    two_inputs = ft.build_training_model(ft.as_embedding_model(tiny_model()), 3)
    two_inputs.save(folder / "train.keras")
    os.symlink(folder / "loop", folder / "loop")
    return [
        (str(folder / "nosuch"), "no such file"),
        (str(folder / "loop"), "looping symbolic link"),
        (str(folder / "truncated"), "truncated"),
        (str(folder / "mismatched"), "stem.0.weight"),
        (str(folder / "pickled.pth"), "safetensors"),
        (str(folder / "photo.jpg"), "safetensors"),
        (str(folder / "broken.keras"), "broken.keras"),
        (str(folder / "train.keras"), "not an image model"),
    ]


def run_cli(argv, capsys):
    """`python -m embedding ARGV` in this process: (exit status, stdout, stderr)."""
    try:
        code = embedding_cli.main([str(a) for a in argv])
    except SystemExit as error:  # argparse
        code = error.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code, err, *fragments):
    """Exit status 2 and one line starting with `error:`: no argparse usage block or
    `PROG: error:` line, no traceback."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err and "usage:" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_bad_models_name_the_model_option(bad_models, lfw_people, tmp_path, capsys):
    root, pairs = lfw_people
    image = os.path.join(root, "alice", "alice_0001.jpg")
    for source, fragment in bad_models:
        for argv in (
            ["embed", root, "-o", tmp_path / "v.npz"],
            ["verify", image, image],
            ["evaluate", pairs, "--root", root],
            ["finetune", root, "-o", tmp_path / "t.keras"],
        ):
            code, _, err = run_cli([*argv, "--model", source, "--no-cache"], capsys)
            assert_one_error_line(code, err, "--model", fragment)
    assert not (tmp_path / "v.npz").exists() and not (tmp_path / "t.keras").exists()
    code, _, err = run_cli(["demo", "--model", bad_models[0][0]], capsys)
    assert_one_error_line(code, err, "--model", "no such file")


def test_cli_reads_its_own_keras_outputs(tiny_keras, lfw_people, tmp_path, capsys):
    """`--model tuned.keras` (finetune's output) works; refused: --pooling with it."""
    root, pairs = lfw_people
    image = os.path.join(root, "alice", "alice_0001.jpg")
    code, out, err = run_cli(["verify", image, image, "--model", tiny_keras], capsys)
    assert code == 0 and "SAME" in out, err
    out_path = tmp_path / "v.npz"
    code, _, err = run_cli(
        ["embed", root, "-o", out_path, "--model", tiny_keras, "--pooling", "max"], capsys
    )
    assert_one_error_line(code, err, "--pooling")


@pytest.mark.slow
def test_cli_embeds_with_a_converted_classifier(lfw_people, tmp_path, capsys):
    """A `weights_convert` .keras with its classifier gives timm's pre-logits."""
    root, _ = lfw_people
    classifier_path = str(tmp_path / "classifier.keras")
    from convnext_v2 import create_convnext_v2

    classifier = create_convnext_v2("atto", num_classes=7, input_shape=(SIZE, SIZE, 3))
    classifier.pretrained_cfg = dict(TINY_CFG)
    weights_convert.save_converted(classifier, classifier_path)
    out_path = tmp_path / "v.npz"
    code, out, err = run_cli(["embed", root, "-o", out_path, "--model", classifier_path], capsys)
    assert code == 0, err
    with np.load(out_path) as data:  # timm's pre-logits (320), not the 7 logits
        assert data["embeddings"].shape[1] == 320


def test_cli_outputs_are_checked_before_the_model_loads(
    lfw_people, tiny_keras, tmp_path, unwritable_dir, monkeypatch, capsys
):
    root, pairs = lfw_people

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the cheap checks")

    monkeypatch.setattr(embedding_cli.options, "make_embedder", no_model)
    monkeypatch.setattr(embedding_cli.options, "check_model_source", no_model)
    (tmp_path / "a_file").write_text("x")
    model = ["--model", tiny_keras]
    cases = [
        (["embed", root, "-o", tmp_path], "-o", "is a folder"),
        (["embed", root, "-o", os.path.join(unwritable_dir, "v.npz")], "-o", "cannot write"),
        (["embed", root, "-o", tmp_path / "a_file" / "v.npz"], "-o", "is a file"),
        (["embed", root, tmp_path / "nothere", "-o", tmp_path / "v.npz"], "nothere", "no such"),
        (["evaluate", pairs, "--root", root, "--json", tmp_path], "--json", "is a folder"),
        (
            ["evaluate", pairs, "--root", root, "--json", os.path.join(unwritable_dir, "m.json")],
            "--json",
            "cannot write",
        ),
        (["evaluate", pairs, "--root", tmp_path / "wrong"], "--root", "no such folder"),
        (["finetune", root, "-o", tmp_path / "w.weights.h5"], "-o", ".keras"),
        (["finetune", root, "-o", os.path.join(unwritable_dir, "t.keras")], "-o", "cannot write"),
        (["finetune", tmp_path / "nodata", "-o", tmp_path / "t.keras"], "DATA_DIR", "no such"),
        (["verify", root, root], "image1", "folder"),
        (["verify", tmp_path / "x.jpg", tmp_path / "y.jpg"], "image1", "no such file"),
    ]
    for argv, *fragments in cases:
        code, _, err = run_cli([*argv, *model], capsys)
        assert_one_error_line(code, err, *fragments)


def test_cli_usage_errors_are_one_error_line(lfw_people, tiny_keras, tmp_path, capsys):
    """argparse's own refusals (bad values, unknown options or commands, missing
    arguments) read like every other error, in both command lines."""
    root, _ = lfw_people
    image = os.path.join(root, "alice", "alice_0001.jpg")
    out = ["-o", tmp_path / "v.npz"]
    cases = [
        (["embed", root, *out, "--batch-size", "0"], "--batch-size", "at least 1"),
        (["embed", root, *out, "--batch-size", "1e9"], "--batch-size", "whole number"),
        (["embed", root, *out, "--workers", "-1"], "--workers"),
        (["embed", root, *out, "--no-such-option"], "--no-such-option"),
        (["embed", root], "-o/--output", "embed --help"),
        (["verify", image, image, "--threshold", "1e400"], "--threshold", "finite"),
        (["identify", image, "--gallery", root, "--threshold", "nan"], "--threshold", "finite"),
        (["--backend", "foo", "embed", root, *out], "--backend", "'jax'"),
        (["nosuchcommand"], "nosuchcommand", "'embed'"),
        ([], "COMMAND"),
    ]
    for argv, *fragments in cases:
        code, _, err = run_cli([*argv, "--model", tiny_keras] if argv else argv, capsys)
        assert_one_error_line(code, err, *fragments)
    from weights_convert import cli as convert_cli

    for argv, fragment in (
        (["x", "-o", tmp_path / "m.keras", "--num-classes", "1.5"], "--num-classes"),
        ([], "-o/--output"),
    ):
        try:
            code = convert_cli.main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code
        assert_one_error_line(code, capsys.readouterr().err, fragment, "weights_convert --help")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_pipes_and_devices_are_refused_not_read(
    lfw_people, tiny_embedder, tiny_keras, tmp_path, capsys
):
    """A named pipe would block the reader until a writer comes (forever), a device such
    as /dev/zero never ends: both are refused by kind, per image, without reading."""
    root, _ = lfw_people
    good = os.path.join(root, "alice", "alice_0001.jpg")
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(good, folder / "good.jpg")
    os.mkfifo(folder / "pipe.jpg")
    os.symlink(os.devnull, folder / "device.png")
    expected = {"pipe.jpg": "named pipe", "device.png": "character device"}

    def timeout(signum, frame):
        raise AssertionError("reading blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    try:
        for name, kind in expected.items():
            with pytest.raises(ImageLoadError, match=kind):
                load_image(str(folder / name))
        inputs = sorted(map(str, folder.iterdir()))  # device.png, good.jpg, pipe.jpg
        result = tiny_embedder.embed_many(inputs)
        code, _, err = run_cli(["verify", os.devnull, good, "--model", tiny_keras], capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.indices.tolist() == [1] and result.skipped == [0, 2]
    assert "character device" in str(result.failures[0]) and "pipe" in str(result.failures[1])
    assert_one_error_line(code, err, "image1", "character device")


@pytest.fixture(scope="module")
def lfw_people(tmp_path_factory):
    """ROOT/name/name_000k.jpg for 4 people x 3 views, and a 2-fold pairs file (each fold:
    a same-person pair, then a different-person pair)."""
    root = tmp_path_factory.mktemp("lfw")
    people = {"alice": "astronaut", "bob": "coffee", "cat": "chelsea", "dan": "rocket"}
    for name, source in people.items():
        (root / name).mkdir()
        for k in (1, 2, 3):
            image = np.roll(photo(source), 25 * k, axis=1)[::4, ::4]
            Image.fromarray(image).save(root / name / f"{name}_{k:04d}.jpg")
    lines = ["alice 1 2", "alice 1 bob 1", "bob 1 3", "bob 2 cat 3"]
    pairs = root / "pairs.txt"
    pairs.write_text("\n".join(["2 1", *lines]) + "\n")
    return str(root), str(pairs)


def test_cli_pairs_files(lfw_people, tiny_keras, tmp_path, capsys):
    root, good_pairs = lfw_people
    cases = {
        "1 2\nalice 1 2\nalice 1 bob 1\n": ("pairs.txt:1", "1 fold"),
        "10 300\nalice 1 2\nalice 1 bob 1\n": ("6000", "found 2"),
        "2 1\nalice 1 2\nalice 1\nbob 1 2\nalice 1 bob 1\n": ("pairs.txt:3", "name1 n1"),
        "alice one two\nalice 1 bob 1\n": ("pairs.txt:1", "'one'"),
        "../etc 1 2\nalice 1 bob 1\n": ("pairs.txt:1", "folder name"),
        "alice 1 2\nalice 1 3\n": ("2 same-person and 0 different",),
        "\n\n": ("empty pairs file",),
        "alice 1 2\nalice 1 bob 9\ndave 1 2\nalice 2 bob 1\n": ("3 image(s)", "bob_0009", "--root"),
    }
    path = tmp_path / "pairs.txt"
    for text, fragments in cases.items():
        path.write_text(text)
        code, out, err = run_cli(["evaluate", path, "--root", root, "--model", tiny_keras], capsys)
        assert_one_error_line(code, err, *fragments)
        assert "model:" not in out  # refused before anything was embedded
    path.write_bytes(b"\xff\xfe\x00 binary")
    code, _, err = run_cli(["evaluate", path, "--root", root], capsys)
    assert_one_error_line(code, err, "UTF-8")
    with pytest.raises(PairsFileError, match="pairs.txt:1"):
        path.write_text("1 2\nalice 1 2\nbob 1 2\n")
        embedding_cli.read_pairs(path, root)
    for flag in (["--folds", "1"], ["--folds", "x"]):  # argparse: exit 2, one line
        code, _, err = run_cli(["evaluate", good_pairs, "--root", root, *flag], capsys)
        assert_one_error_line(code, err, "--folds")

    report = tmp_path / "m.json"
    missing = tmp_path / "missing_pairs.txt"
    missing.write_text("alice 1 2\nalice 1 bob 1\nbob 1 3\nbob 2 cat 3\ncat 1 eve 1\n")
    argv = ["evaluate", missing, "--root", root, "--model", tiny_keras, "--folds", "2"]
    code, out, err = run_cli([*argv, "--skip-missing", "--json", report], capsys)
    assert code == 0, err
    assert "1 image(s) missing" in err and "1 of 5 pairs dropped" in err and "EER" in out
    assert json.loads(report.read_text())["n_genuine"] == 2


def test_cli_evaluate_skips_unreadable_images(lfw_people, tiny_keras, tmp_path, capsys):
    """An unreadable image drops its pairs with one "skipped: PATH: REASON" line (the
    same line `embed` and `enroll` print) and a count; the rest is evaluated."""
    root = tmp_path / "people"
    shutil.copytree(lfw_people[0], root)
    broken = root / "bob" / "bob_0003.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("alice 1 2\nalice 1 bob 1\nbob 1 3\nbob 2 cat 3\ncat 1 2\n")
    argv = ["evaluate", pairs, "--root", root, "--model", tiny_keras, "--folds", "2"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped: {broken}: "), err
    assert "1 image(s) unreadable, 1 of 5 pairs dropped" in err and "EER" in out


def test_cli_verify_threshold_and_nan(lfw_people, nan_keras, tiny_keras, capsys):
    root, _ = lfw_people
    image = os.path.join(root, "alice", "alice_0001.jpg")
    for threshold in ("nan", "inf", "-inf", "abc"):
        code, out, err = run_cli(
            ["verify", image, image, "--model", tiny_keras, "--threshold", threshold], capsys
        )
        assert_one_error_line(code, err, "--threshold")
        assert "verdict" not in out
    code, out, err = run_cli(["verify", image, image, "--model", nan_keras], capsys)
    assert_one_error_line(code, err, "NaN")
    assert "verdict" not in out and "DIFFERENT" not in out


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["embed", tmp_path / "missing", "-o", tmp_path / "v.npz"]
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, "missing", "no such file")
    with pytest.raises(embedding_cli.CommandError, match="no such file"):
        embedding_cli.main(["--debug", *map(str, argv)])


def test_cli_all_images_unreadable_writes_nothing(tmp_path, tiny_keras, capsys):
    bad_files(tmp_path / "bad", 6)
    out = tmp_path / "v.npz"
    code, _, err = run_cli(["embed", tmp_path / "bad", "-o", out, "--model", tiny_keras], capsys)
    assert_one_error_line(code, err, "none of the 6 images")
    assert err.count("skipped:") == 6 and not out.exists()


@pytest.mark.slow
def test_cli_errors_in_a_real_process_have_no_traceback(bad_models, tmp_path):
    """`python -m embedding` itself (not `main` in this process): one line, exit 2."""
    truncated = bad_models[1][0]
    Image.fromarray(photo("coffee")).save(tmp_path / "coffee.png")
    procs = [
        ["embed", tmp_path, "-o", tmp_path / "v.npz", "--model", truncated, "--no-cache"],
        ["evaluate", tmp_path / "none.txt", "--root", tmp_path],
    ]
    for argv in procs:
        proc = subprocess.run(
            [sys.executable, "-m", "embedding", *map(str, argv)],
            env={**os.environ, "PYTHONPATH": ROOT},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


# ----------------------------------------------------------------------------
# Fine-tuning: data that cannot form pairs, settings, resume keys
# ----------------------------------------------------------------------------


def write_identities(root, counts, size=40, seed=0):
    """One folder per identity with counts[k] PNGs of a noisy identity pattern."""
    rng = np.random.default_rng(seed)
    for k, count in enumerate(counts):
        folder = os.path.join(root, f"person_{k}")
        os.makedirs(folder)
        base = rng.integers(0, 255, (6, 6, 3))
        for j in range(count):
            image = np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).resize((size, size), Image.BILINEAR).save(
                os.path.join(folder, f"{j}.png")
            )
    return root


FT_FAST = dict(epochs=1, batch_size=8, verbose=0, augment=False)


@pytest.mark.parametrize(
    "counts, settings, fragments",
    [
        ([1] * 6, {}, ["one image each", "add images", "--holdout 0"]),
        ([1] * 6, {"holdout_by": "image"}, ["Nothing could be held out", "--holdout 0"]),
        ([2] * 6, {"holdout_by": "image"}, ["no identity has more than 2", "add images"]),
        ([6] * 3, {}, ["at least 4 identities", "--holdout-by image"]),
    ],
)
def test_finetune_data_that_cannot_form_pairs(tmp_path, tiny_keras, counts, settings, fragments):
    data = write_identities(str(tmp_path / "data"), counts)
    with pytest.raises(FinetuneDataError) as info:
        ft.finetune(data, tiny_keras, output=str(tmp_path / "t.keras"), **FT_FAST, **settings)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not os.path.exists(tmp_path / "t.keras")


@pytest.mark.slow
def test_finetune_small_data_that_works_says_what_it_held_out(tmp_path, tiny_keras, capsys):
    """4 identities x 6 images: by identity, 2 held out (0.2 rounds to 1, at least 2
    needed) and said so; by image, 2 images of each (so that same-identity pairs exist)."""
    data = write_identities(str(tmp_path / "data"), [6] * 4)
    result = ft.finetune(data, tiny_keras, **{**FT_FAST, "verbose": 2})
    printed = capsys.readouterr().out
    assert "held out 2 of 4 identities" in printed and "rounds to 1" in printed
    assert result.split.startswith("held out 2 of 4 identities")
    by_image = ft.finetune(data, tiny_keras, holdout_by="image", **FT_FAST)
    assert by_image.metrics_before.n_genuine == 4  # 2 images held out of each of 4
    if not result.improved:
        assert "never beat the input model" in printed


@pytest.mark.slow
def test_finetune_skips_and_reports_corrupt_images(tmp_path, tiny_keras):
    data = write_identities(str(tmp_path / "data"), [4] * 5)
    bad = bad_files(os.path.join(data, "person_1"), 3)
    result = ft.finetune(data, tiny_keras, holdout=0, **FT_FAST)
    assert sorted(f.name for f in result.skipped) == sorted(bad)
    everything_bad = str(tmp_path / "bad_data")
    for k in range(4):
        bad_files(os.path.join(everything_bad, f"p{k}"), 2)
    with pytest.raises(FinetuneDataError, match="none of the 8 images could be read"):
        ft.finetune(everything_bad, tiny_keras, holdout=0, **FT_FAST)


def test_finetune_settings_are_validated(tmp_path):
    cases = [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"epochs": 2, "freeze_epochs": 3}, "freeze_epochs"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"holdout": 1.0}, "holdout"),
        ({"holdout_by": "person"}, "'identity' or 'image'"),
        ({"margin": 2.0}, "margin"),
        ({"batch_size": 2.5}, "batch_size must be a whole number"),
        ({"pooling": "median"}, "pooling"),
        ({"augment": "yes"}, "augment"),
    ]
    for settings, fragment in cases:
        with pytest.raises(FinetuneConfigError, match=fragment):
            ft.FinetuneConfig(**settings)
    with pytest.raises(TypeError, match="Unknown fine-tuning setting.*epoch"):
        ft.FinetuneConfig().replace(epoch=3)
    x = np.zeros((8, SIZE, SIZE, 3), np.float32)
    with pytest.raises(OutputPathError, match=r"\.keras"):
        ft.finetune((x, np.arange(8) % 4), tiny_model(), output=str(tmp_path / "w.weights.h5"))
    assert not os.listdir(tmp_path)


def _interrupt_after_first_epoch(monkeypatch):
    original = ft.TrainBatches.set_epoch

    def interrupt(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        original(self, epoch)

    monkeypatch.setattr(ft.TrainBatches, "set_epoch", interrupt)
    return original


@pytest.mark.slow
def test_resume_key_names_every_changed_setting(tmp_path, monkeypatch):
    x = np.random.default_rng(0).normal(size=(48, SIZE, SIZE, 3)).astype("float32")
    data = (x, np.arange(48) % 6)
    out = str(tmp_path / "tuned.keras")
    base = dict(epochs=3, batch_size=8, holdout=0.25, holdout_by="image", verbose=0)

    def model():
        keras.utils.set_random_seed(0)
        return tiny_model()

    original = _interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(data, model(), output=out, **base)
    monkeypatch.setattr(ft.TrainBatches, "set_epoch", original)
    with open(out + ".ckpt/state.json") as f:
        saved = json.load(f)["identity"]
    for key in (
        "learning_rate",
        "augment",
        "hflip",
        "pooling",
        "head_norm",
        "image_size",
        "embedding_dim",
        "margin",
        "seed",
        "model_content",
        "data",
    ):
        assert key in saved
    changes = [
        ({"learning_rate": 0.01}, ["learning_rate: was 0.001, now 0.01"]),
        ({"augment": False}, ["augment: was True, now False"]),
        ({"hflip": False, "margin": 0.5}, ["hflip", "margin: was 0.35, now 0.5"]),
        ({"pooling": "max"}, ["pooling: was avg, now max"]),
        ({"head_norm": False}, ["head_norm"]),
        ({"image_size": 64}, ["image_size: was None, now 64"]),
        ({"embedding_dim": 8}, ["embedding_dim"]),
        ({"holdout": 0.5}, ["holdout: was 0.25"]),
        ({"seed": 1}, ["seed: was 0, now 1"]),
    ]
    for change, fragments in changes:
        with pytest.raises(ResumeMismatchError, match="different run") as info:
            ft.finetune(data, model(), output=out, **{**base, **change})
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))
    keras.utils.set_random_seed(5)
    with pytest.raises(ResumeMismatchError, match="model content"):
        ft.finetune(data, tiny_model(), output=out, **base)  # other weights
    with pytest.raises(ResumeMismatchError, match="data .*was 48 images of 6 identities, now 40"):
        ft.finetune((x[:40], np.arange(40) % 6), model(), output=out, **base)
    with open(out + ".ckpt/train.keras", "rb") as f:
        intact = f.read()
    with open(out + ".ckpt/train.keras", "wb") as f:
        f.write(intact[: len(intact) // 2])
    with pytest.raises(ResumeMismatchError, match="cannot be loaded.*--no-resume"):
        ft.finetune(data, model(), output=out, **base)
    with open(out + ".ckpt/train.keras", "wb") as f:
        f.write(intact)
    resumed = ft.finetune(data, model(), output=out, **base)
    assert resumed.resumed_from == 1 and [h["epoch"] for h in resumed.history] == [1, 2, 3]


@pytest.mark.slow
def test_training_checkpoint_loads_in_a_fresh_process(tmp_path):
    """What the resume needs registered is registered by importing the library alone:
    before, loading `train.keras` failed with "Could not locate class 'ArcFace'"."""
    path = str(tmp_path / "train.keras")
    model = ft.build_training_model(ft.as_embedding_model(tiny_model()), 4)
    model.compile(optimizer="adamw", loss="sparse_categorical_crossentropy")
    model.save(path)
    proc = run_python(
        """
        import sys
        import embedding.finetune as ft
        model = ft.load_training_checkpoint(sys.argv[1])
        print("RESULT" + str([layer.__class__.__name__ for layer in model.layers][-1:]))
        """,
        path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "['ArcFace']" in proc.stdout


# ----------------------------------------------------------------------------
# Fine-tuning: killed with SIGKILL, resumed in a new process, same result
# ----------------------------------------------------------------------------

# Runs the CLI or the Python API; with BLOCK set, the run stops (sleeps) once the
# first epoch's checkpoint is written, so that the test can kill it at that point.
FINETUNE_RUNNER = """
import os, sys, time
import embedding.finetune as ft
if os.environ.get("BLOCK"):
    original = ft.TrainBatches.set_epoch
    def block(self, epoch):
        if epoch == 1:
            print("BLOCKED", flush=True)
            time.sleep(600)
        original(self, epoch)
    ft.TrainBatches.set_epoch = block
kind, data, model, out = sys.argv[1:5]
if kind == "cli":
    from embedding.cli import main
    sys.exit(main(["finetune", data, "--model", model, "-o", out, "--epochs", "3",
                   "--batch-size", "8", "--holdout", "0.3", "--keep-checkpoint",
                   "--no-progress", "--seed", "1"]))
result = ft.finetune(data, model, output=out, epochs=3, batch_size=8, holdout=0.3,
                     keep_checkpoint=True, verbose=2, seed=1)
print("RESUMED_FROM", result.resumed_from)
"""


def _run_finetune(kind, data, model, out, block=False):
    args = [sys.executable, "-c", FINETUNE_RUNNER, kind, data, model, out]
    env = {**os.environ, "PYTHONPATH": ROOT, "BLOCK": "1" if block else ""}
    if not block:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    state = os.path.join(out + ".ckpt", "state.json")
    deadline = time.time() + 600
    while not os.path.exists(state):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with open(state) as f:
        return json.load(f)["epoch"]


def _final_eers(out):
    with open(os.path.join(out + ".ckpt", "state.json")) as f:
        state = json.load(f)
    return [h["heldout_eer"] for h in state["history"]], state["best_eer"]


@pytest.fixture(scope="module")
def digit_keras(tmp_path_factory):
    """A small model that keeps where the strokes are (GAP alone would make every digit
    look alike and the held-out EER 0.5 at every epoch: a test that could not fail)."""
    keras.utils.set_random_seed(0)
    image = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 4, strides=4, activation="gelu")(image)
    x = keras.layers.Dense(32)(keras.layers.Flatten()(x))
    model = ft.as_embedding_model(keras.Model(image, x, name="digits"))
    model.pretrained_cfg = dict(TINY_CFG)
    path = str(tmp_path_factory.mktemp("digit_model") / "digits.keras")
    ft.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def digit_identities(tmp_path_factory):
    from test_finetune import write_digit_folder

    return write_digit_folder(str(tmp_path_factory.mktemp("digits") / "data"), 8, SIZE)


@pytest.mark.slow
@pytest.mark.once("jax", "torch")  # the bar: JAX and PyTorch
@pytest.mark.parametrize("kind", ["cli", "api"])
def test_killed_finetune_resumes_in_a_new_process(kind, digit_identities, digit_keras, tmp_path):
    """SIGKILL once the first epoch's state.json exists; the same command in a new
    process resumes after epoch 1 and ends with the uninterrupted run's held-out EER."""
    straight = str(tmp_path / "straight.keras")
    _run_finetune(kind, digit_identities, digit_keras, straight)
    killed = str(tmp_path / "killed.keras")
    assert _run_finetune(kind, digit_identities, digit_keras, killed, block=True) == 1
    printed = _run_finetune(kind, digit_identities, digit_keras, killed)
    assert "Resuming from" in printed and "after epoch 1/3" in printed
    (eers_a, best_a), (eers_b, best_b) = _final_eers(straight), _final_eers(killed)
    print(f"[{BACKEND}] {kind}: uninterrupted {eers_a}, resumed {eers_b}")
    assert len(eers_b) == 3 and len(set(eers_a)) > 1  # training changes the EER
    np.testing.assert_allclose(eers_b, eers_a, atol=1e-6)
    assert abs(best_a - best_b) <= 1e-6
    with (
        open(weights_convert.sidecar_path(killed)) as f,
        open(weights_convert.sidecar_path(straight)) as g,
    ):
        assert abs(json.load(f)["heldout_eer"] - json.load(g)["heldout_eer"]) <= 1e-6
