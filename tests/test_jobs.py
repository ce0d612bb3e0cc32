"""embedding.jobs: streaming, resumable and sharded embedding (`embed` and `merge`).

The bar: an interrupted run (an exception in-process, SIGKILL of the command line)
continued by the same call gives exactly the vectors and order of an uninterrupted
run, and the shards of a split run, merged, equal one run. A random-weight
convnext_atto at 64x64 (`small_checkpoint`) keeps it fast."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from conftest import BACKEND
from PIL import Image

from embedding import Embedder, Gallery, jobs
from embedding import cli as embedding_cli
from embedding.jobs import JobError, embed_files, merge_parts, parts_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
MEMBERS = ("embeddings", "paths", "labels", "index", "skipped", "skipped_index", "skipped_reason")


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """300 small JPEGs (random crops of 4 scikit-image photographs, one folder each)
    and one unreadable file: (root, sorted file list as `embed` finds it)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        h, w = image.shape[:2]
        (root / name).mkdir()
        for k in range(75):
            y, x = rng.integers(0, h // 3), rng.integers(0, w // 3)
            crop = Image.fromarray(image[y : y + h // 2, x : x + w // 2]).resize((48, 40))
            crop.save(root / name / f"{k:03d}.jpg", quality=85)
    (root / "coffee" / "broken.jpg").write_bytes(b"not a jpeg")
    return root, embedding_cli.find_images([str(root)])


@pytest.fixture(scope="session")
def embedder(small_checkpoint):
    return Embedder(small_checkpoint[0], batch_size=8, cache=False)


def contents(path):
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in MEMBERS}


def assert_same_output(a, b):
    first, second = contents(a), contents(b)
    for name in MEMBERS:
        assert first[name].dtype == second[name].dtype, name
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_interrupted_job_resumes_to_the_same_output(embedder, photo_folder, tmp_path):
    _, paths = photo_folder
    paths = paths[210:240]  # two folders, and the unreadable file
    reference = tmp_path / "reference.npz"
    result = embed_files(embedder, paths, reference, chunk_size=4, progress=False)
    assert (result.count, result.skipped, result.chunks, result.resumed) == (29, 1, 8, 0)
    assert not os.path.exists(parts_folder(reference))  # removed at the end

    output = tmp_path / "out.npz"
    real_embed_chunk, calls = jobs._embed_chunk, []

    def interrupted(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the fourth chunk is embedded
        calls.append(args[4])
        return real_embed_chunk(*args)

    jobs._embed_chunk = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            embed_files(embedder, paths, output, chunk_size=4, progress=False)
    finally:
        jobs._embed_chunk = real_embed_chunk
    assert not output.exists()
    assert sorted(os.listdir(parts_folder(output))) == [
        "chunk-000000.npz", "chunk-000001.npz", "chunk-000002.npz", "job.json"
    ]  # fmt: skip

    redone, notes = [], []

    def counting(*args):
        redone.append(args[4])
        return real_embed_chunk(*args)

    jobs._embed_chunk = counting
    try:
        result = embed_files(
            embedder, paths, output, chunk_size=4, progress=False, log=notes.append
        )
    finally:
        jobs._embed_chunk = real_embed_chunk
    assert redone == [12, 16, 20, 24, 28]  # only the chunks that were missing
    assert result.resumed == 3 and "resuming: 3 of 8 chunks already done" in notes[0]
    assert_same_output(reference, output)
    data = contents(output)
    assert data["skipped"].tolist() == [p for p in paths if p.endswith("broken.jpg")]
    assert set(data["labels"].tolist()) == {"coffee", "rocket"}
    gallery = Gallery.load(output)  # the output is a gallery
    assert gallery.search(data["embeddings"][5], k=1)[0] == [data["labels"][5]]


def test_changed_settings_are_refused(embedder, photo_folder, tmp_path, monkeypatch):
    _, paths = photo_folder
    paths = paths[:40]
    output = tmp_path / "out.npz"
    monkeypatch.setattr(jobs, "_assemble", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # every chunk done, killed before the output
        embed_files(embedder, paths, output, chunk_size=16, progress=False)
    monkeypatch.undo()

    with pytest.raises(JobError, match=r"--chunk-size \(16 before, 8 now\)"):
        embed_files(embedder, paths, output, chunk_size=8, progress=False)
    with pytest.raises(JobError, match=r"the input files \(40 files before, 39 now\)"):
        embed_files(embedder, paths[1:], output, chunk_size=16, progress=False)
    with pytest.raises(JobError, match=r"other settings: the input files\. "):  # same count
        embed_files(embedder, paths[1:] + paths[:1], output, chunk_size=16, progress=False)
    with pytest.raises(JobError, match=r"--shard-index \(0 before, 1 now\)"):
        embed_files(
            embedder, paths, output, chunk_size=16, progress=False, shard_index=1, num_shards=2
        )
    other = Embedder(model=embedder.model, pretrained_cfg=embedder.pretrained_cfg, batch_size=8)
    weights = other.model.get_weights()
    other.model.set_weights([w * 1.01 for w in weights])
    try:
        with pytest.raises(JobError, match=r"the model weights \(another --model"):
            embed_files(other, paths, output, chunk_size=16, progress=False)
    finally:
        other.model.set_weights(weights)
    result = embed_files(embedder, paths, output, chunk_size=16, progress=False, restart=True)
    assert result.resumed == 0 and result.count == 40


def test_shards_merged_equal_one_run(embedder, photo_folder, tmp_path):
    _, paths = photo_folder
    paths = paths[210:255]  # the unreadable file is in chunk 1, shard 1's
    one = tmp_path / "one.npz"
    embed_files(embedder, paths, one, chunk_size=8, progress=False)
    parts = []
    for shard in (1, 0):
        part = tmp_path / f"part{shard}.npz"
        result = embed_files(
            embedder, paths, part, chunk_size=8, progress=False, shard_index=shard, num_shards=2
        )
        assert result.chunks == 3 and result.skipped == shard
        parts.append(part)
    merged = tmp_path / "merged.npz"
    result = merge_parts(parts, merged)  # in any order
    assert (result.count, result.skipped) == (44, 1)
    assert_same_output(one, merged)
    code = embedding_cli.main(["merge", *map(str, parts), "-o", str(tmp_path / "cli.npz")])
    assert code == 0
    assert_same_output(one, tmp_path / "cli.npz")
    job = json.loads(str(np.load(merged)["job"]))
    assert job["num_shards"] == 1 and job["merged_from"] == 2

    with pytest.raises(JobError, match=r"shard\(s\) \[0\] missing"):
        merge_parts(parts[:1], tmp_path / "x.npz")
    with pytest.raises(JobError, match=r"shard\(s\) \[1\] given more than once"):
        merge_parts([parts[0], parts[0], parts[1]], tmp_path / "x.npz")
    other = tmp_path / "other.npz"
    embed_files(
        embedder, paths[:12], other, chunk_size=4, progress=False, shard_index=0, num_shards=2
    )
    with pytest.raises(JobError, match=r"different jobs: --chunk-size \(8 before, 4 now\)"):
        merge_parts([parts[0], other], tmp_path / "x.npz")
    plain = tmp_path / "plain.npz"
    Gallery().add(np.eye(3), ["a", "b", "c"]).save(plain)
    with pytest.raises(JobError, match="missing arrays"):
        merge_parts([plain], tmp_path / "x.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(JobError, match="not a valid part file"):
        merge_parts([parts[0], tmp_path / "broken.npz"], tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_command_line_checks_shard_options_first(tmp_path, capsys):
    cases = [
        (["--shard-index", "2", "--num-shards", "2"], "--shard-index must be in 0..1"),
        (["--shard-index", "0"], "--shard-index and --num-shards go together"),
        (["--chunk-size", "0"], "--chunk-size must be >= 1"),
        (["-o", str(tmp_path / "a-file")], "is a file, not a folder"),  # a folder of parts?
        (["-o", str(tmp_path / "a-file" / "o.npz")], "is a file, not a folder"),
    ]
    (tmp_path / "a-file").write_text("not a folder")
    for extra, message in cases:
        code = embedding_cli.main(["embed", str(tmp_path), "-o", str(tmp_path / "o.npz"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err
        assert "Traceback" not in err and len(err.splitlines()) == 1
    code = embedding_cli.main(["merge", str(tmp_path / "nope.npz"), "-o", str(tmp_path / "m.npz")])
    assert code == 2 and "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# The command line in subprocesses: SIGKILL and resume; two devices
# ----------------------------------------------------------------------------


def run_embed(args, cache, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_CONVNEXT_CACHE=str(cache))
    command = [sys.executable, "-m", "embedding", "embed", *map(str, args), "--no-progress"]
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        **kwargs,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.once("torch")  # process plumbing: chunks on disk, resumption
def test_killed_embed_command_resumes_exactly(small_checkpoint, photo_folder, tmp_path):
    root, _ = photo_folder
    cache = tmp_path / "cache"
    common = ["--model", small_checkpoint[0], "--batch-size", "8", "--chunk-size", "16"]
    reference = tmp_path / "reference.npz"
    done = run_embed([root, "-o", reference, *common], cache)
    assert done.wait(timeout=600) == 0, done.stderr.read()[-2000:]

    output = tmp_path / "out.npz"
    parts = parts_folder(output)
    victim = run_embed([root, "-o", output, *common], cache)
    deadline = time.time() + 600
    while not os.path.exists(os.path.join(parts, "chunk-000001.npz")):
        assert victim.poll() is None and time.time() < deadline, victim.stderr.read()[-2000:]
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not output.exists(), "the run finished before it was killed: nothing was tested"
    finished = len([n for n in os.listdir(parts) if n.startswith("chunk-")])
    assert 2 <= finished < 19

    again = run_embed([root, "-o", output, *common], cache)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-2000:]
    assert f"resuming: {finished} of 19 chunks already done" in stderr
    assert "300 embeddings of dim 320, 1 skipped" in stdout
    assert not os.path.exists(parts)
    assert_same_output(reference, output)


TWO_DEVICES = """
import json, sys
import keras
import numpy as np
from embedding import Embedder
from embedding import jobs
from embedding.finetune import resolve_distribution

folder, out = sys.argv[1], sys.argv[2]
paths = json.loads(sys.argv[3])
embedder = Embedder(folder, batch_size=8, cache=False)
devices = len(resolve_distribution("auto").device_mesh.devices.ravel())
jobs.embed_files(embedder, paths, out + "/two.npz", chunk_size=20, progress=False)
jobs.embed_files(embedder, paths, out + "/one.npz", chunk_size=20, progress=False,
                 distribution=None)
print("RESULT" + json.dumps({"devices": devices}))
"""


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.DataParallel needs JAX")
def test_two_devices_embed_like_one(small_checkpoint, photo_folder, tmp_path):
    _, paths = photo_folder
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONPATH=ROOT,
        KERAS_CONVNEXT_CACHE=str(tmp_path / "cache"),
    )
    chosen = json.dumps(paths[200:247])  # 47 files, one unreadable: partial last batches
    proc = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES, small_checkpoint[0], str(tmp_path), chosen],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    assert json.loads(line[len("RESULT") :])["devices"] == 2
    two, one = contents(tmp_path / "two.npz"), contents(tmp_path / "one.npz")
    for name in MEMBERS[1:]:
        np.testing.assert_array_equal(two[name], one[name])
    assert two["embeddings"].shape == (46, 320)
    np.testing.assert_allclose(two["embeddings"], one["embeddings"], atol=1e-5)


# ----------------------------------------------------------------------------
# Parquet outputs: one file, a folder of parts; read back by Gallery, merge, evaluate
# ----------------------------------------------------------------------------


def rows_of(path):
    from embedding.formats import read_embeddings

    return read_embeddings(path)


def assert_same_rows(rows, reference):
    """Equal to the .npz `reference` output: vectors bit for bit, paths, labels, index,
    the unreadable files and their reasons."""
    data = contents(reference)
    np.testing.assert_array_equal(rows.embeddings, data["embeddings"])
    for name in ("paths", "labels", "index", "skipped", "skipped_index", "skipped_reason"):
        np.testing.assert_array_equal(getattr(rows, name), data[name], err_msg=name)


def test_parquet_file_is_one_row_per_image_with_the_model_in_its_metadata(
    embedder, photo_folder, tmp_path
):
    _, paths = photo_folder
    paths = paths[200:240]  # the unreadable file among them
    reference = tmp_path / "reference.npz"
    embed_files(embedder, paths, reference, chunk_size=8, progress=False)
    output = tmp_path / "vectors.parquet"
    result = embed_files(embedder, paths, output, chunk_size=8, progress=False)
    assert (result.count, result.skipped) == (39, 1)
    assert output.read_bytes()[:4] == b"PAR1"  # the name promised Parquet: it is Parquet
    table = pq.read_table(output)  # read by pyarrow alone
    assert table.column_names == ["index", "path", "label", "embedding", "error"]
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[320]"
    assert table.column("path").to_pylist() == paths  # one row per image, in order
    broken = [row for row in table.to_pylist() if row["error"] is not None]
    assert [row["path"] for row in broken] == [p for p in paths if p.endswith("broken.jpg")]
    assert broken[0]["embedding"] is None and "not a readable image" in broken[0]["error"]
    meta = json.loads(table.schema.metadata[b"keras_convnext"])
    model = meta["model"]
    assert model["architecture"] == "convnext_atto" and model["dim"] == 320
    assert model["weights_sha256"] == jobs.job_identity(embedder, paths, 8, 0, 1)["weights"]
    assert model["preprocessing"]["input_size"] == [64, 64]
    assert meta["job"]["files"]["count"] == 40 and meta["job"]["chunk_size"] == 8
    assert_same_rows(rows_of(output), reference)
    gallery = Gallery.load(output)  # Parquet loads as a gallery
    vectors = contents(reference)["embeddings"]
    assert len(gallery) == 39 and gallery.search(vectors[3], k=1)[0] == [table["label"][3].as_py()]

    notes = []  # a rerun over the finished output does nothing
    again = embed_files(embedder, paths, output, chunk_size=8, progress=False, log=notes.append)
    assert again.resumed == again.chunks == 5 and notes[0].startswith("nothing to do")


def test_interrupted_parquet_job_resumes_to_the_same_output(embedder, photo_folder, tmp_path):
    _, paths = photo_folder
    paths = paths[210:240]
    reference = tmp_path / "reference.npz"
    embed_files(embedder, paths, reference, chunk_size=4, progress=False)
    real_embed_chunk, calls = jobs._embed_chunk, []

    def interrupted(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[4])
        return real_embed_chunk(*args)

    for output in (tmp_path / "out.parquet", tmp_path / "parts"):
        calls.clear()
        jobs._embed_chunk = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):
                embed_files(embedder, paths, output, chunk_size=4, progress=False)
        finally:
            jobs._embed_chunk = real_embed_chunk
        notes = []
        result = embed_files(embedder, paths, output, chunk_size=4, progress=False,
                             log=notes.append)  # fmt: skip
        assert result.resumed == 3 and "3 of 8" in notes[0], notes
        assert_same_rows(rows_of(output), reference)


def test_folder_of_parts_resumes_what_is_missing_and_refuses_another_model(
    embedder, photo_folder, tmp_path
):
    from embedding.parquet import part_files

    _, paths = photo_folder
    paths = paths[200:240]
    reference = tmp_path / "reference.npz"
    embed_files(embedder, paths, reference, chunk_size=8, progress=False)
    output = tmp_path / "parts"
    for shard in (1, 0):  # two shards fill one folder: no merge step
        embed_files(embedder, paths, output, chunk_size=8, shard_index=shard, num_shards=2,
                    progress=False)  # fmt: skip
    assert sorted(part_files(output)) == [0, 1, 2, 3, 4]
    assert_same_rows(rows_of(output), reference)

    parts = part_files(output)
    os.remove(parts[1])
    (tmp_path / "parts" / "part-000003.parquet").write_bytes(b"PAR1 damaged")
    notes = []
    result = embed_files(embedder, paths, output, chunk_size=8, progress=False, log=notes.append)
    assert result.resumed == 3 and any("redoing a damaged part" in n for n in notes)
    assert_same_rows(rows_of(output), reference)
    with pytest.raises(Exception, match="incomplete, 1 of 5 parts missing"):
        os.remove(part_files(output)[4])
        Gallery.load(output)  # an unfinished job is no gallery

    other = Embedder(model=embedder.model, pretrained_cfg=embedder.pretrained_cfg, batch_size=8)
    weights = other.model.get_weights()
    other.model.set_weights([w * 1.01 for w in weights])
    try:
        with pytest.raises(JobError, match=r"other settings: the model weights"):
            embed_files(other, paths, output, chunk_size=8, progress=False)
    finally:
        other.model.set_weights(weights)
    assert sorted(part_files(output)) == [0, 1, 2, 3]  # nothing of ours was touched


def test_merge_reads_parquet_parts_and_refuses_another_models(embedder, photo_folder, tmp_path):
    _, paths = photo_folder
    paths = paths[210:255]
    one = tmp_path / "one.npz"
    embed_files(embedder, paths, one, chunk_size=8, progress=False)
    parts = []
    for shard, name in ((0, "part0.parquet"), (1, "part1")):  # a file and a folder
        parts.append(tmp_path / name)
        embed_files(embedder, paths, parts[-1], chunk_size=8, shard_index=shard, num_shards=2,
                    progress=False)  # fmt: skip
    for output in ("merged.npz", "merged.parquet", "merged"):
        result = merge_parts(parts, tmp_path / output)
        assert (result.count, result.skipped) == (44, 1)
        assert_same_rows(rows_of(tmp_path / output), one)
    code = embedding_cli.main(["merge", *map(str, parts), "-o", str(tmp_path / "cli.parquet")])
    assert code == 0
    assert_same_rows(rows_of(tmp_path / "cli.parquet"), one)
    with pytest.raises(JobError, match=r"do not cover the job's 45 files: \d+ missing"):
        merge_parts(parts[:1], tmp_path / "x.parquet")
    with pytest.raises(JobError, match="more than once"):
        merge_parts([parts[0], parts[0], parts[1]], tmp_path / "x.parquet")

    other = Embedder(model=embedder.model, pretrained_cfg=embedder.pretrained_cfg, batch_size=8)
    weights = other.model.get_weights()
    other.model.set_weights([w * 1.01 for w in weights])
    try:
        foreign = tmp_path / "foreign.parquet"
        embed_files(other, paths, foreign, chunk_size=8, shard_index=1, num_shards=2,
                    progress=False)  # fmt: skip
    finally:
        other.model.set_weights(weights)
    with pytest.raises(JobError, match=r"different jobs: the model weights"):
        merge_parts([parts[0], foreign], tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_the_output_name_decides_the_format(tmp_path, capsys):
    """An unknown suffix is refused before any work, naming the choices; a name the
    format check accepts is written in that format (see the tests above)."""
    (tmp_path / "img.png").write_bytes(b"")
    for name in ("out.csv", "out.npy", "vectors.h5"):
        code = embedding_cli.main(["embed", str(tmp_path), "-o", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: -o ") and "names none" in err, err
        assert ".npz (a numpy archive), .parquet (one Parquet file), or a folder" in err
        assert len(err.splitlines()) == 1
    code = embedding_cli.main(["merge", str(tmp_path / "a.npz"), "-o", str(tmp_path / "m.txt")])
    assert code == 2 and "names none" in capsys.readouterr().err


def test_evaluate_scores_pairs_from_an_embeddings_file(lfw_people, tiny_keras, tmp_path, capsys):
    """`evaluate --embeddings FILE` gives the metrics of recomputing the embeddings."""
    root, pairs = lfw_people
    assert embedding_cli.main(["embed", root, "-o", str(tmp_path / "v.parquet"), "--model",
                               tiny_keras, "--no-progress"]) == 0  # fmt: skip
    results = {}
    for name, extra in (("recomputed", ["--model", tiny_keras]),
                        ("file", ["--embeddings", str(tmp_path / "v.parquet")])):  # fmt: skip
        out = tmp_path / f"{name}.json"
        code = embedding_cli.main(["evaluate", pairs, "--root", root, "--json", str(out),
                                   "--no-progress", *extra])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        results[name] = json.loads(out.read_text())
    for key in ("eer", "roc_auc", "best_accuracy"):
        assert abs(results["file"][key] - results["recomputed"][key]) <= 1e-6, key
    capsys.readouterr()
    code = embedding_cli.main(["evaluate", pairs, "--root", root, "--model", tiny_keras,
                               "--embeddings", str(tmp_path / "v.parquet")])  # fmt: skip
    assert code == 2 and "fixes the model" in capsys.readouterr().err


def test_nothing_readable_writes_nothing_in_any_format(embedder, photo_folder, tmp_path):
    _, paths = photo_folder
    broken = [p for p in paths if p.endswith("broken.jpg")]
    for name in ("none.npz", "none.parquet", "none"):
        with pytest.raises(jobs.NothingReadableError) as caught:
            embed_files(embedder, broken, tmp_path / name, progress=False)
        assert caught.value.skipped[0][0] == broken[0]
        assert not (tmp_path / name).exists()  # not even the folder it made
