"""Streaming, resumable embedding of many image files into one `.npz`.

    from embedding.jobs import embed_files, merge_parts
    embed_files(embedder, paths, "vectors.npz")                    # resumes if interrupted
    embed_files(embedder, paths, "part0.npz", shard_index=0, num_shards=2)   # machine 0
    merge_parts(["part0.npz", "part1.npz"], "vectors.npz")         # = one run over all

The file list is cut into chunks of `chunk_size` consecutive files. Each
finished chunk is written at once (atomically) as `chunk-NNNNNN.npz` into a
hidden folder next to the output, `.OUT.npz.parts/`, together with
`job.json`, the job's identity. Run the same call again after an interruption
(Ctrl-C, `kill -9`, a preempted machine) and it skips the chunks on disk. At
the end the chunks are streamed into the output (one chunk in memory at a
time), atomically, and the folder is removed. A chunk is always embedded the
same way (same batches, same padding), so a resumed run's output equals an
uninterrupted run's.

The identity (`job.json`): the file list (count and SHA-256 of the paths),
the model (SHA-256 of its weights and of its layer names and types, so
another checkpoint, pooling or head norm is noticed), the preprocessing,
`chunk_size` and the shard. If it differs from the folder's, the run is
refused with a `JobError` naming what changed (`restart=True` discards the
old chunks). The batch size and the device count are not part of it: they
may change between runs (results then agree to float rounding, not bit for
bit).

Sharding over machines: chunk c belongs to shard c % num_shards. Every
machine runs the same file list with its own `shard_index`; `merge_parts`
checks that the parts come from one job and cover every shard once, and
interleaves them back into file-list order, equal to a single run's output.

Output members (all read without pickle; the file loads as a `Gallery`):
`embeddings` (N, D) float32, `paths` (N,), `labels` (N,) (by default each
image's folder name), `index` (N,) int64 (position in the file list),
`skipped` (S,) (unreadable paths), `skipped_index` (S,), `skipped_reason` (S,),
`model` (the source), `job` (JSON: the identity, `shard_index`, `num_shards`).

On JAX with several local devices, `distribution="auto"` embeds with
`keras.distribution.DataParallel` (every batch padded to the full batch size,
split over the devices); `None` uses one device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from convnext_common.files import atomic_write
from embedding import runs
from embedding.distribution import clone_under, device_count, resolve_distribution
from embedding.errors import ImageLoadError, InputError
from embedding.files import folder_label
from embedding.model import predict_padded
from embedding.npz import NpyMemberReader, NpzStreamWriter, read_npz

JOB_FORMAT = 1
CHUNK_SIZE = 1024
JOB_FILE = "job.json"
# what may differ between the parts of one sharded job (and nothing else)
_PER_SHARD = ("shard_index",)
_SETTING_NAMES = {
    "files": "the input files",
    "weights": "the model weights (another --model or checkpoint file)",
    "layers": "the model's layers (--pooling or --no-head-norm)",
    "preprocessing": "the preprocessing (the checkpoint's pretrained_cfg)",
    "dim": "the embedding dimension",
    "chunk_size": "--chunk-size",
    "num_shards": "--num-shards",
    "shard_index": "--shard-index",
    "format": "the job format",
}


class JobError(InputError, ValueError):
    """An embedding job that cannot go on: changed settings, damaged or mismatched parts."""


class NothingReadableError(JobError):
    """Not one image of an (unsharded) job could be read: no output is written.

    `skipped` holds (path, reason) for every image, for the caller to report.
    """

    def __init__(self, message: str, skipped: list[tuple[str, str]]):
        super().__init__(message)
        self.skipped = skipped


@dataclass
class JobResult:
    output: str
    count: int  # vectors written
    skipped: int  # unreadable files
    chunks: int  # chunks of this shard
    resumed: int  # chunks found on disk from an earlier run


# ----------------------------------------------------------------------------
# Chunks, shards and the job's identity
# ----------------------------------------------------------------------------


def shard_chunks(count: int, chunk_size: int, shard_index: int = 0, num_shards: int = 1):
    """[(chunk index, start, stop)] of the chunks shard `shard_index` embeds."""
    chunks = -(-count // chunk_size)
    return [
        (c, c * chunk_size, min((c + 1) * chunk_size, count))
        for c in range(shard_index, chunks, num_shards)
    ]


def _int_setting(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    return int(value)


def job_identity(embedder, paths, chunk_size, shard_index, num_shards) -> dict:
    """What an embedding job's results depend on (see the module docstring)."""
    config = dataclasses.asdict(embedder.preprocessor.config)
    return {
        "format": JOB_FORMAT,
        "files": {"count": len(paths), "sha256": runs.digest(paths)},
        "weights": runs.weights_digest(embedder.model),
        "layers": runs.layers_digest(embedder.model),
        "preprocessing": json.loads(json.dumps(config, default=str)),
        "dim": int(embedder.dim),
        "chunk_size": chunk_size,
        "num_shards": num_shards,
        "shard_index": shard_index,
    }


def _differences(old: dict, new: dict, ignore=()) -> list[str]:
    """What differs between two job identities (`embedding.runs.changes`), in the
    command line's words."""
    out = []
    for key, before, now in sorted(runs.changes(old, new, ignore=ignore)):
        what = _SETTING_NAMES.get(key, key)
        if key == "files":
            before, now = ((d or {}).get("count") for d in (before, now))
            out.append(f"{what} ({before} files before, {now} now)" if before != now else what)
        elif isinstance(now, (int, str)) and key not in ("weights", "layers"):
            out.append(f"{what} ({before!r} before, {now!r} now)")
        else:
            out.append(what)
    return out


def folder_labels(paths) -> list[str]:
    """Each path's label by the one rule for files given by name
    (`embedding.files.folder_label`: the identity of `DIR/alice/1.jpg` is `alice`)."""
    return [folder_label(p) for p in paths]


def parts_folder(output) -> str:
    """The hidden folder holding an output's finished chunks: `.NAME.parts`."""
    output = os.path.abspath(os.fspath(output))
    return os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.parts")


def _read_small(path, names, error_prefix) -> dict:
    """Members `names` of an `.npz` (only those are read), errors as JobError."""
    try:
        arrays = read_npz(path, error=JobError, names=names, what=f"{error_prefix}file")
    except FileNotFoundError:
        raise JobError(f"{error_prefix}{path}: no such file.") from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise JobError(f"{error_prefix}{path}: missing arrays {missing}.")
    return arrays


# ----------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------


def _distribution_model(embedder, distribution):
    """(model, distribution) to embed with: the embedder's model as it is, or (several
    devices) a clone with its variables laid out under the distribution."""
    distribution = resolve_distribution(distribution)
    if distribution is None:
        return embedder.model, None
    devices = device_count(distribution)
    if embedder.batch_size % devices:
        raise JobError(
            f"batch size {embedder.batch_size} is not a multiple of the {devices} devices "
            "(each device gets an equal share of every batch); pass a multiple, or "
            "distribution=None (--distribute none) to use one device."
        )
    return clone_under(embedder.model, distribution), distribution


def _embed_chunk(embedder, model, distribution, paths, start, bar):
    """Embed `paths` (the chunk starting at file `start`): arrays for a chunk file."""
    vectors, index, skipped, reasons = [], [], [], []
    for offset, prepared in embedder._batches(paths, "rgb", None):  # decoding threads ahead
        good = []
        for i, value in enumerate(prepared):
            if isinstance(value, ImageLoadError):
                skipped.append(start + offset + i)
                reasons.append(value.reason)
            else:
                good.append((start + offset + i, value))
        if good:
            batch = np.stack([array for _, array in good])
            vectors.append(predict_padded(model, batch, embedder.batch_size, distribution))
            index.extend(i for i, _ in good)
        bar.update(len(prepared))
    dim = int(embedder.dim)
    return {
        "embeddings": np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
        "index": np.asarray(index, dtype=np.int64),
        "skipped_index": np.asarray(skipped, dtype=np.int64),
        "skipped_reason": np.asarray(reasons, dtype=str).reshape(-1),
    }


def _chunk_path(folder, chunk):
    return os.path.join(folder, f"chunk-{chunk:06d}.npz")


def _check_chunk(path, key, start, stop, dim):
    """The arrays of a finished chunk file, or a JobError saying what is wrong with it."""
    names = ("embeddings", "index", "skipped_index", "skipped_reason", "key")
    arrays = _read_small(path, names, "chunk ")
    if str(arrays["key"]) != key:
        raise JobError(f"{path} belongs to another job")
    vectors, index, skipped = arrays["embeddings"], arrays["index"], arrays["skipped_index"]
    if vectors.dtype != np.float32 or vectors.shape != (index.size, dim):
        raise JobError(
            f"{path}: embeddings {vectors.dtype} {vectors.shape}, expected "
            f"({index.size}, {dim}) float32"
        )
    covered = np.sort(np.r_[index, skipped])
    if index.dtype != np.int64 or not np.array_equal(covered, np.arange(start, stop)):
        raise JobError(f"{path} does not cover files {start}..{stop - 1} exactly once")
    if not np.all(np.isfinite(vectors)):
        raise JobError(f"{path}: embeddings contain NaN or infinity")
    return arrays


def _prepare_folder(folder, identity, restart):
    """Create the parts folder, or check an existing one belongs to this job."""
    job_file = os.path.join(folder, JOB_FILE)
    if restart and os.path.isdir(folder):
        shutil.rmtree(folder)
    if os.path.exists(job_file):
        try:
            with open(job_file) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise JobError(
                f"{job_file} is unreadable ({error}); remove {folder} or pass --restart."
            ) from None
        changed = _differences(old if isinstance(old, dict) else {}, identity)
        if changed:
            raise JobError(
                f"{folder} holds chunks of a run with other settings: "
                + "; ".join(changed)
                + ". Rerun with the same settings to resume, or pass --restart "
                "(restart=True) to discard them."
            )
        return
    os.makedirs(folder, exist_ok=True)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(identity, f, indent=2)

    atomic_write(job_file, write)


def embed_files(
    embedder,
    paths: Sequence[str],
    output,
    *,
    labels: Sequence[str] | None = None,
    chunk_size: int = CHUNK_SIZE,
    shard_index: int = 0,
    num_shards: int = 1,
    restart: bool = False,
    progress: bool = True,
    distribution="auto",
    log: Callable[[str], None] | None = None,
) -> JobResult:
    """Embed image files into `output` (.npz) in resumable chunks (module docstring).

    Args:
        embedder: an `embedding.Embedder` (its model, preprocessing, batch size).
        paths: the image files, in the order the output keeps.
        labels: one per path (default: each file's folder name).
        chunk_size: files per chunk file (the unit of resumption).
        shard_index, num_shards: embed only chunks c with c % num_shards == shard_index.
        restart: discard chunks of an earlier run instead of resuming.
        progress: a tqdm bar (images/s) on stderr.
        distribution: "auto", None or a `keras.distribution.Distribution`.
        log: called with one-line notes (resuming, a damaged chunk redone).
    """
    paths, labels = _checked_paths(paths, labels)
    chunk_size = _int_setting("chunk_size", chunk_size, 1)
    num_shards = _int_setting("num_shards", num_shards, 1)
    shard_index = _int_setting("shard_index", shard_index, 0)
    if shard_index >= num_shards:
        raise ValueError(f"shard_index must be below num_shards ({num_shards}), got {shard_index}.")
    log = log or (lambda message: None)
    output = os.fspath(output)
    identity = job_identity(embedder, paths, chunk_size, shard_index, num_shards)
    key = runs.json_digest(identity)
    folder = parts_folder(output)
    _prepare_folder(folder, identity, restart)
    chunks = shard_chunks(len(paths), chunk_size, shard_index, num_shards)
    done = _finished_chunks(folder, chunks, key, int(embedder.dim), log)

    model, dist = None, None
    if len(done) < len(chunks):
        model, dist = _distribution_model(embedder, distribution)
    total = sum(stop - start for _, start, stop in chunks)
    with tqdm(
        total=total, initial=sum(done.values()), disable=not progress, unit="img", desc="embed"
    ) as bar:
        for chunk, start, stop in chunks:
            if chunk in done:
                continue
            arrays = _embed_chunk(embedder, model, dist, paths[start:stop], start, bar)
            arrays["key"] = np.asarray(key)

            def write(tmp, arrays=arrays):
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)

            atomic_write(_chunk_path(folder, chunk), write)

    count, skipped = _assemble(folder, chunks, key, output, paths, labels, identity, embedder)
    shutil.rmtree(folder, ignore_errors=True)
    return JobResult(output, count, skipped, len(chunks), len(done))


def _checked_paths(paths, labels) -> tuple[list[str], list[str]]:
    """(paths, labels) as str lists, labels by `folder_labels` when not given."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise JobError("no image files to embed (the list of paths is empty)")
    labels = folder_labels(paths) if labels is None else list(labels)
    if not all(isinstance(label, str) for label in labels):
        raise TypeError("labels must be str (one per path).")
    if len(labels) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(labels)} labels.")
    return paths, labels


def _finished_chunks(folder, chunks, key, dim, log) -> dict[int, int]:
    """{chunk: files} of the chunk files an earlier run finished (a damaged one is
    removed, to be redone)."""
    done = {}
    for chunk, start, stop in chunks:
        path = _chunk_path(folder, chunk)
        if os.path.exists(path):
            try:
                _check_chunk(path, key, start, stop, dim)
                done[chunk] = stop - start
            except JobError as error:
                log(f"redoing a damaged chunk: {error}")
                os.remove(path)
    if done:
        log(f"resuming: {len(done)} of {len(chunks)} chunks already done (in {folder})")
    return done


def _assemble(folder, chunks, key, output, paths, labels, identity, embedder):
    """Stream the chunk files into `output`; returns (vectors, skipped)."""
    dim = int(embedder.dim)
    counts = []
    index_parts, skipped_parts, reason_parts = [], [], []
    for chunk, start, stop in chunks:  # small arrays first: sizes and string widths
        arrays = _check_chunk(_chunk_path(folder, chunk), key, start, stop, dim)
        counts.append(arrays["index"].size)
        index_parts.append(arrays["index"])
        skipped_parts.append(arrays["skipped_index"])
        reason_parts.append(arrays["skipped_reason"])
    index = np.concatenate(index_parts) if index_parts else np.zeros(0, np.int64)
    skipped = np.concatenate(skipped_parts) if skipped_parts else np.zeros(0, np.int64)
    reasons = np.concatenate(reason_parts) if reason_parts else np.zeros(0, str)

    if len(index) == 0 and identity["num_shards"] == 1:
        # An empty output would look like success; a shard may be empty and is merged later.
        shutil.rmtree(folder, ignore_errors=True)
        raise NothingReadableError(
            f"none of the {len(skipped)} images could be read; nothing written to {output}",
            [(paths[i], str(r)) for i, r in zip(skipped.tolist(), reasons.tolist(), strict=True)],
        )

    def vectors():
        for chunk, _, _ in chunks:
            with np.load(_chunk_path(folder, chunk), allow_pickle=False) as data:
                yield data["embeddings"]

    _write_output(
        output,
        dim,
        len(index),
        vectors(),
        index,
        skipped,
        reasons,
        paths,
        labels,
        embedder.source,
        identity,
    )
    return len(index), len(skipped)


def _string_pieces(values, index, step=65536):
    for start in range(0, len(index), step):
        yield np.asarray([values[i] for i in index[start : start + step]], dtype=str)


def _width(values, index) -> str:
    longest = max((len(values[i]) for i in index), default=1)
    return f"<U{max(longest, 1)}"


def _write_output(
    output,
    dim,
    count,
    vector_pieces,
    index,
    skipped,
    reasons,
    paths,
    labels,
    source,
    identity,
):
    def write(tmp):
        with open(tmp, "wb") as f, NpzStreamWriter(f) as npz:
            npz.write_pieces("embeddings", np.float32, (count, dim), vector_pieces)
            npz.write_pieces("paths", _width(paths, index), (count,), _string_pieces(paths, index))
            npz.write_pieces(
                "labels", _width(labels, index), (count,), _string_pieces(labels, index)
            )
            npz.write("index", index)
            npz.write("skipped", np.asarray([paths[i] for i in skipped], dtype=str).reshape(-1))
            npz.write("skipped_index", skipped)
            npz.write("skipped_reason", np.asarray(reasons, dtype=str).reshape(-1))
            npz.write("model", np.asarray(str(source)))
            npz.write("job", np.asarray(json.dumps(identity, sort_keys=True)))

    atomic_write(output, write)


# ----------------------------------------------------------------------------
# Merging the parts of a sharded job
# ----------------------------------------------------------------------------


def _part_record(path):
    """(path, job identity, small arrays) of one part, or a JobError saying it is none."""
    small = ("index", "skipped", "skipped_index", "skipped_reason", "job", "model")
    arrays = _read_small(path, small, "part ")
    try:
        identity = json.loads(str(arrays["job"]))
    except ValueError:
        identity = None
    fields = ("shard_index", "num_shards", "dim", "chunk_size")
    if not isinstance(identity, dict) or not all(
        isinstance(identity.get(f), int) and not isinstance(identity.get(f), bool) for f in fields
    ):
        raise JobError(f"{path} was not written by `embed` (no valid job record).")
    return path, identity, arrays


def _check_one_job(infos) -> dict:
    """The job identity every part shares, each shard once, else a JobError naming the
    difference, the missing or the repeated shards."""
    first_path, first, _ = infos[0]
    for path, identity, _ in infos[1:]:
        changed = _differences(first, identity, ignore=_PER_SHARD)
        if changed:
            raise JobError(
                f"{path} and {first_path} come from different jobs: {'; '.join(changed)}."
            )
    shards = sorted(identity["shard_index"] for _, identity, _ in infos)
    expected = list(range(first["num_shards"]))
    if shards != expected:
        missing = sorted(set(expected) - set(shards))
        repeated = sorted({s for s in shards if shards.count(s) > 1})
        problem = []
        if missing:
            problem.append(f"shard(s) {missing} missing")
        if repeated:
            problem.append(f"shard(s) {repeated} given more than once")
        raise JobError(
            f"the parts do not cover the job's {len(expected)} shards: {', '.join(problem)}."
        )
    return first


def merge_parts(parts: Sequence, output) -> JobResult:
    """Join the outputs of every shard of one job into `output`, in file-list order.

    Each part must come from the same job (files, model, preprocessing, chunk
    size, shard count) and every shard must be there exactly once; the result
    equals one unsharded run's output. Vectors are streamed (one run of
    consecutive rows from one part at a time).
    """
    parts = [os.fspath(p) for p in parts]
    if not parts:
        raise JobError("merge needs at least one part.")
    infos = [_part_record(path) for path in parts]
    first = _check_one_job(infos)

    index = np.concatenate([arrays["index"] for _, _, arrays in infos])
    owner = np.concatenate([np.full(a["index"].size, k) for k, (_, _, a) in enumerate(infos)])
    order = np.argsort(index, kind="stable")
    index, owner = index[order], owner[order]
    if index.size and (np.diff(index) <= 0).any():
        raise JobError("the parts embed some files more than once.")
    skipped_index = np.concatenate([a["skipped_index"] for _, _, a in infos])
    skip_order = np.argsort(skipped_index, kind="stable")
    skipped_names = np.concatenate([a["skipped"].astype(str) for _, _, a in infos])[skip_order]
    reasons = np.concatenate([a["skipped_reason"].astype(str) for _, _, a in infos])[skip_order]
    dim = int(first["dim"])

    archives = [zipfile.ZipFile(path) for path in parts]
    try:
        readers = {
            name: [
                NpyMemberReader(a, name, p, JobError) for a, p in zip(archives, parts, strict=True)
            ]
            for name in ("embeddings", "paths", "labels")
        }
        for k, (_, _, arrays) in enumerate(infos):
            rows = arrays["index"].size
            expected = {"embeddings": ((rows, dim), "f"), "paths": ((rows,), "U"),
                        "labels": ((rows,), "U")}  # fmt: skip
            for name, (shape, kind) in expected.items():
                reader = readers[name][k]
                if reader.shape != shape or reader.dtype.kind != kind:
                    raise JobError(
                        f"{parts[k]}: {name} is {reader.dtype} {reader.shape}, expected "
                        f"{shape} to match its index."
                    )
        runs = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if owner.size else []
        bounds = list(zip(runs, [*runs[1:], owner.size], strict=True))

        def pieces(name):
            for start, stop in bounds:
                yield readers[name][owner[start]].read(int(stop - start))

        def width(name):
            return max((r.dtype for r in readers[name]), key=lambda d: d.itemsize)

        def write(tmp):
            with open(tmp, "wb") as f, NpzStreamWriter(f) as npz:
                npz.write_pieces("embeddings", np.float32, (index.size, dim), pieces("embeddings"))
                npz.write_pieces("paths", width("paths"), (index.size,), pieces("paths"))
                npz.write_pieces("labels", width("labels"), (index.size,), pieces("labels"))
                npz.write("index", index)
                npz.write("skipped", skipped_names)
                npz.write("skipped_index", skipped_index[skip_order])
                npz.write("skipped_reason", reasons)
                npz.write("model", infos[0][2]["model"])
                merged = {**first, "shard_index": 0, "num_shards": 1, "merged_from": len(parts)}
                npz.write("job", np.asarray(json.dumps(merged, sort_keys=True)))

        atomic_write(output, write)
    finally:
        for archive in archives:
            archive.close()
    return JobResult(os.fspath(output), int(index.size), int(skipped_index.size), 0, 0)
