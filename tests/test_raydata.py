"""embedding.raydata: embedding on Ray Data, on a local Ray cluster the tests start
(2 CPUs, 127.0.0.1, a small object store) and stop.

The bar: a Ray job over a folder of a few hundred images, some unreadable, gives the
same paths and vectors (within 1e-6) as the single-process `embed`, with the same
unreadable images listed, through the Python API and the command line; an actor
killed after its first batch is replaced and every image is in the output exactly
once; a rerun over a complete output does nothing and over a partial one redoes only
the missing parts. A random-weight convnext_atto at 64x64 (`small_checkpoint`) keeps
it small."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import skimage.data
from conftest import ROOT, bad_files
from PIL import Image

pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from embedding import Embedder, Gallery, jobs, raydata  # noqa: E402
from embedding.formats import read_embeddings  # noqa: E402
from embedding.parquet import part_files  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster: 10-30 s to start, then a job of 200 images

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
ACTOR_TITLE = "MapBatches(EmbedBatches)"  # in the process title of every model actor


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on 127.0.0.1 (2 CPUs, 128 MiB of object store), its workers
    importing this checkout; stopped when the module ends."""
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # else Ray binds the public address
    # no token in ~/.ray shared with a cluster another test session starts at the same time
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=128 << 20,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """200 small JPEGs in 4 identity folders and 7 unreadable files (truncated, garbage,
    empty, a decompression bomb's header): (root, paths, labels) as `embed` lists them."""
    root = tmp_path_factory.mktemp("ray_photos")
    rng = np.random.default_rng(1)
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        h, w = image.shape[:2]
        (root / name).mkdir()
        for k in range(50):
            y, x = rng.integers(0, h // 3), rng.integers(0, w // 3)
            crop = Image.fromarray(image[y : y + h // 2, x : x + w // 2]).resize((56, 44))
            crop.save(root / name / f"{k:03d}.jpg", quality=85)
    bad_files(root / "coffee", 6)
    (root / "rocket" / "zz_broken.jpg").write_bytes(b"not a jpeg")
    paths, labels = raydata.find_images([str(root)])
    return str(root), paths, labels


@pytest.fixture(scope="module")
def embedder(small_checkpoint):
    return Embedder(small_checkpoint[0], batch_size=8, cache=False)


@pytest.fixture(scope="module")
def reference(embedder, image_folder, tmp_path_factory):
    """The single-process `embed` of the folder (a folder of parts, chunks of 32)."""
    _, paths, labels = image_folder
    out = str(tmp_path_factory.mktemp("reference") / "vectors")
    result = jobs.embed_files(embedder, paths, out, labels=labels, chunk_size=32, progress=False)
    assert (result.count, result.skipped) == (200, 7)
    return read_embeddings(out)


def assert_same_rows(rows, reference):
    """Same readable paths (in order), labels, vectors within 1e-6, unreadable ones."""
    assert rows.paths.tolist() == reference.paths.tolist()
    assert rows.labels.tolist() == reference.labels.tolist()
    np.testing.assert_allclose(rows.embeddings, reference.embeddings, rtol=0, atol=1e-6)
    assert rows.skipped.tolist() == reference.skipped.tolist()
    assert rows.skipped_reason.tolist() == reference.skipped_reason.tolist()


def test_embed_dataset_equals_single_process(
    ray_cluster, embedder, image_folder, reference, tmp_path
):
    """The library call on a dataset of encoded bytes (`read_binary_files`): one row per
    file, `embedding` a fixed-size list of float32, null with an `error` when unreadable."""
    root, _, _ = image_folder
    ds = ray_cluster.data.read_binary_files(root, include_paths=True)
    out = raydata.embed_dataset(ds, embedder, column="bytes", batch_size=8, actors=1)
    out = out.materialize()  # run once, read twice below
    table = out.to_arrow_refs()
    import pyarrow as pa

    table = pa.concat_tables(ray_cluster.get(table))
    assert "bytes" not in table.column_names  # the images do not travel on
    assert str(table.schema.field("embedding").type) == "fixed_size_list<item: float>[320]"
    rows = {row["path"]: row for row in table.to_pylist()}
    assert len(rows) == table.num_rows == 207
    for path, vector in zip(reference.paths, reference.embeddings, strict=True):
        row = rows[path]
        assert row["error"] is None
        np.testing.assert_allclose(row["embedding"], vector, rtol=0, atol=1e-6)
    for path, reason in zip(reference.skipped, reference.skipped_reason, strict=True):
        assert rows[path]["embedding"] is None and rows[path]["error"] == reason
    written = tmp_path / "written"
    out.write_parquet(str(written))  # Ray's own writer: loads as a gallery
    gallery = Gallery.load(written)
    assert len(gallery) == 200 and sorted(set(gallery.labels)) == sorted(PHOTOS)


@pytest.mark.once("tensorflow")  # the driver's bookkeeping; the actors' backend: above
def test_folder_job_equals_single_process_and_resumes(
    ray_cluster, embedder, image_folder, reference, tmp_path
):
    """Two actors, paths given as file:// URLs (read through fsspec); then a rerun over
    the complete output does nothing, and one over a partial output redoes only the
    parts that are missing."""
    root, _, _ = image_folder
    paths, labels = raydata.find_images(["file://" + root])
    assert len(paths) == 207 and paths[0].startswith("file://")
    out = str(tmp_path / "ray")
    result = raydata.embed_folder_job(
        embedder, paths, out, labels=labels, chunk_size=32, actors=2, num_cpus_per_actor=0.5,
        progress=False,
    )  # fmt: skip
    assert (result.count, result.skipped, result.chunks, result.resumed) == (200, 7, 7, 0)
    rows = read_embeddings(out)
    rows.paths = np.asarray([p[len("file://") :] for p in rows.paths])
    rows.skipped = np.asarray([p[len("file://") :] for p in rows.skipped])
    assert_same_rows(rows, reference)

    notes = []
    again = raydata.embed_folder_job(
        embedder, paths, out, labels=labels, chunk_size=32, progress=False, log=notes.append
    )
    assert again.resumed == 7 and notes == [f"nothing to do: {out} holds all 7 parts of this job"]
    parts = part_files(out)
    before = {chunk: os.path.getmtime(path) for chunk, path in parts.items()}
    os.remove(parts[2])
    os.remove(parts[6])
    notes.clear()
    again = raydata.embed_folder_job(
        embedder, paths, out, labels=labels, chunk_size=32, actors=1, progress=False,
        log=notes.append,
    )  # fmt: skip
    assert again.resumed == 5 and "resuming: 5 of 7 parts already done" in notes[0]
    after = {chunk: os.path.getmtime(path) for chunk, path in part_files(out).items()}
    assert sorted(after) == list(range(7))
    assert [c for c in after if after[c] != before[c]] == [2, 6]  # only those were redone
    assert read_embeddings(out).embeddings.shape == (200, 320)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def actor_pids() -> list[int]:
    """Process ids of this cluster's model actors (by their process title, among the
    descendants of this process, which started the cluster: another test session may run
    its own)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if ACTOR_TITLE.encode() not in f.read():
                    continue
            pid = int(name)
            while pid > 1 and pid != os.getpid():
                pid = _parent(pid)
        except (OSError, ValueError, IndexError):
            continue
        if pid == os.getpid():
            found.append(int(name))
    return found


@pytest.mark.slow
@pytest.mark.once("torch")  # Ray's fault tolerance and the driver's bookkeeping
def test_killed_actor_is_replaced_and_every_image_is_written_once(
    ray_cluster, embedder, image_folder, reference, tmp_path
):
    """The actor's process is killed (SIGKILL) once its first batches are back (the first
    part is written); Ray starts another, redoes what the dead one held, and the output
    has every image once, equal to the single-process run."""
    _, paths, labels = image_folder
    out = str(tmp_path / "killed")
    outcome = {}

    def run():
        try:
            outcome["result"] = raydata.embed_folder_job(
                embedder, paths, out, labels=labels, chunk_size=16, actors=1, progress=False
            )
        except BaseException as error:  # reported by the test thread
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while not (os.path.isdir(out) and part_files(out)):
        assert thread.is_alive() and time.time() < deadline, outcome
        time.sleep(0.05)
    victims = actor_pids()
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    written_when_killed = len(part_files(out))
    replacements = set()
    while thread.is_alive() and time.time() < deadline + 300:
        replacements.update(set(actor_pids()) - set(victims))
        time.sleep(0.05)
    thread.join(timeout=60)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert written_when_killed < 13, "the job ended before the kill: nothing was tested"
    assert replacements, "no actor took the killed one's place"
    result = outcome["result"]
    assert (result.count, result.skipped) == (200, 7)
    rows = read_embeddings(out)
    index = np.concatenate([rows.index, rows.skipped_index])
    assert np.array_equal(np.sort(index), np.arange(207))  # every image exactly once
    assert_same_rows(rows, reference)


def run_cli(*args, timeout=600):
    env = dict(
        os.environ, PYTHONPATH=ROOT, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled"
    )
    command = [sys.executable, "-m", "embedding", "embed", *map(str, args), "--no-progress"]
    return subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.once("tensorflow")  # process plumbing: the command line joining a cluster
def test_command_line_joins_the_cluster(ray_cluster, small_checkpoint, image_folder, reference,
                                        tmp_path):  # fmt: skip
    root, _, _ = image_folder
    address = ray_cluster.get_runtime_context().gcs_address
    out = tmp_path / "cli"
    common = ["--model", small_checkpoint[0], "--batch-size", "8", "--chunk-size", "32",
              "--engine", "ray", "--address", address]  # fmt: skip
    proc = run_cli(root, "-o", out, *common, "--actors", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "200 embeddings of dim 320, 7 skipped" in proc.stdout
    assert proc.stderr.count("skipped: ") == 7 and "zz_broken.jpg" in proc.stderr
    assert_same_rows(read_embeddings(out), reference)
    assert ray_cluster.is_initialized()  # the command left the cluster it joined running

    refused = run_cli(root, "-o", tmp_path / "one.npz", *common)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: --engine ray writes a folder of Parquet parts")
    assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_too_many_actors_for_the_cluster_are_refused(ray_cluster, embedder):
    """Actors taking every CPU would leave none for decoding: Ray would wait forever."""
    ds = ray_cluster.data.from_items([{"path": "x.jpg"}])
    with pytest.raises(jobs.JobError, match=r"2 actor\(s\) of 1 CPU leave less than 1 CPU"):
        raydata.embed_dataset(ds, embedder, column="path", actors=2)


def test_a_url_lists_a_folder_as_its_local_path_does(tmp_path):
    """fsspec listing (file://) = `embedding.files.find_image_files`: the same files in
    the same order with the same labels, hidden folders left out."""
    from embedding.files import find_image_files

    for name in ("a/x.jpg", "a/sub/y.jpg", "a/z.jpg", "b.jpg", ".h/q.jpg", "c/.hid/k.png",
                 "c/k2.png", "c/notes.txt"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    local = [(f.path, f.label) for f in find_image_files([str(tmp_path)])]
    paths, labels = raydata.find_images([f"file://{tmp_path}"])
    assert [
        (p.removeprefix("file://"), label) for p, label in zip(paths, labels, strict=True)
    ] == local
    assert len(local) == 5
