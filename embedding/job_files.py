"""What an embedding job (`embedding.jobs`, `embedding.raydata`) keeps on disk: its
identity, its chunk files, and its output in each format (`embedding.formats`): a
streamed `.npz`, a streamed Parquet file, or a folder of Parquet parts (one per chunk,
the chunk files themselves). Numpy (and pyarrow for Parquet): no Keras.

The identity (`job_identity`): the file list (count and SHA-256 of the paths), the model
(SHA-256 of its weights and of its layer names and types), the preprocessing, the
dimension, `chunk_size` and the shard. A folder of parts keeps it in every part's
metadata without the shard (a chunk's part is the same whichever shard or engine made
it), so the shards of a job, or the Ray engine and the single-process one, can fill one
folder; the other outputs keep it whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np

from convnext_common.files import atomic_write
from embedding import runs
from embedding.errors import InputError
from embedding.files import folder_label
from embedding.formats import job_without_shard
from embedding.npz import NpzStreamWriter, read_npz
from embedding.parquet import (
    EmbeddingFileError,
    EmbeddingRows,
    ParquetStreamWriter,
    metadata_record,
    part_files,
    part_name,
    read_columns,
    read_meta,
    read_rows,
    rows_table,
    write_rows,
)

JOB_FORMAT = 1
CHUNK_SIZE = 1024
JOB_FILE = "job.json"
# what may differ between the parts of one sharded job (and nothing else)
PER_SHARD = ("shard_index",)
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


def int_setting(name, value, low):
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


def model_record(embedder, identity: dict) -> dict:
    """The model part of a Parquet file's metadata: source, architecture, the SHA-256 of
    its weights (the checkpoint as loaded) and layers, preprocessing, dimension."""
    cfg = embedder.pretrained_cfg or {}
    return {
        "source": str(embedder.source) if embedder.source is not None else None,
        "architecture": cfg.get("architecture") or embedder.model.name,
        "weights_sha256": identity["weights"],
        "layers_sha256": identity["layers"],
        "preprocessing": identity["preprocessing"],
        "dim": identity["dim"],
    }


def differences(old: dict, new: dict, ignore=()) -> list[str]:
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


def refuse_other_job(where, old: dict, new: dict) -> None:
    """A JobError when `where` holds the results of a job with other settings."""
    changed = differences(old if isinstance(old, dict) else {}, new)
    if changed:
        raise JobError(
            f"{where} holds results of a run with other settings: "
            + "; ".join(changed)
            + ". Rerun with the same settings to resume, or pass --restart "
            "(restart=True) to discard them."
        )


def folder_labels(paths) -> list[str]:
    """Each path's label by the one rule for files given by name
    (`embedding.files.folder_label`: the identity of `DIR/alice/1.jpg` is `alice`)."""
    return [folder_label(p) for p in paths]


def parts_folder(output) -> str:
    """The hidden folder holding a file output's finished chunks: `.NAME.parts`."""
    output = os.path.abspath(os.fspath(output))
    return os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.parts")


def read_small(path, names, error_prefix) -> dict:
    """Members `names` of an `.npz` (only those are read), errors as JobError."""
    try:
        arrays = read_npz(path, error=JobError, names=names, what=f"{error_prefix}file")
    except FileNotFoundError:
        raise JobError(f"{error_prefix}{path}: no such file.") from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise JobError(f"{error_prefix}{path}: missing arrays {missing}.")
    return arrays


def check_coverage(where, arrays, start, stop, dim) -> None:
    """A JobError unless `arrays` (embeddings, index, skipped_index) cover files
    start..stop-1 exactly once with finite (n, dim) float32 vectors."""
    vectors, index, skipped = arrays["embeddings"], arrays["index"], arrays["skipped_index"]
    if vectors.dtype != np.float32 or vectors.shape != (index.size, dim):
        raise JobError(
            f"{where}: embeddings {vectors.dtype} {vectors.shape}, expected "
            f"({index.size}, {dim}) float32"
        )
    covered = np.sort(np.r_[index, skipped])
    if index.dtype != np.int64 or not np.array_equal(covered, np.arange(start, stop)):
        raise JobError(f"{where} does not cover files {start}..{stop - 1} exactly once")
    if not np.all(np.isfinite(vectors)):
        raise JobError(f"{where}: embeddings contain NaN or infinity")


# ----------------------------------------------------------------------------
# Chunk files of a file output (.npz or .parquet): `.OUT.parts/chunk-NNNNNN.npz`
# ----------------------------------------------------------------------------


def chunk_path(folder, chunk):
    return os.path.join(folder, f"chunk-{chunk:06d}.npz")


def check_chunk(path, key, start, stop, dim):
    """The arrays of a finished chunk file, or a JobError saying what is wrong with it."""
    names = ("embeddings", "index", "skipped_index", "skipped_reason", "key")
    arrays = read_small(path, names, "chunk ")
    if str(arrays["key"]) != key:
        raise JobError(f"{path} belongs to another job")
    check_coverage(path, arrays, start, stop, dim)
    return arrays


def write_chunk(folder, chunk, arrays, key) -> None:
    arrays = {**arrays, "key": np.asarray(key)}

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(chunk_path(folder, chunk), write)


def prepare_folder(folder, identity, restart):
    """Create the chunks folder, or check an existing one belongs to this job."""
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
        refuse_other_job(f"{folder}", old, identity)
        return
    os.makedirs(folder, exist_ok=True)
    atomic_write(job_file, lambda tmp: _dump_json(tmp, identity))


def _dump_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def chunk_rows(arrays, paths, labels, meta=None) -> EmbeddingRows:
    """A chunk's arrays (embeddings, index, skipped_index, skipped_reason) as rows."""
    index, skipped = arrays["index"].tolist(), arrays["skipped_index"].tolist()

    def strings(values, where):
        return np.asarray([values[i] for i in where], dtype=str).reshape(-1)

    return EmbeddingRows(
        embeddings=arrays["embeddings"],
        paths=strings(paths, index),
        labels=strings(labels, index),
        index=arrays["index"],
        skipped=strings(paths, skipped),
        skipped_index=arrays["skipped_index"],
        skipped_reason=np.asarray(arrays["skipped_reason"], str).reshape(-1),
        meta=meta,
        skipped_labels=strings(labels, skipped),
    )


# ----------------------------------------------------------------------------
# File outputs: one .npz or one .parquet, streamed from the chunks
# ----------------------------------------------------------------------------


def _string_pieces(values, index, step=65536):
    for start in range(0, len(index), step):
        yield np.asarray([values[i] for i in index[start : start + step]], dtype=str)


def _width(values, index) -> str:
    longest = max((len(values[i]) for i in index), default=1)
    return f"<U{max(longest, 1)}"


def write_npz_output(output, dim, count, vector_pieces, index, skipped, reasons, paths,
                     labels, source, identity):  # fmt: skip
    """The `.npz` of a job, its vectors streamed from `vector_pieces`."""

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


def write_rows_npz(output, rows: EmbeddingRows) -> None:
    """The `.npz` of `rows` (members as `write_npz_output` writes them)."""
    meta = rows.meta or {}
    members = {
        "embeddings": rows.embeddings.astype(np.float32),
        "paths": rows.paths.astype(str),
        "labels": rows.labels.astype(str),
        "index": rows.index.astype(np.int64),
        "skipped": rows.skipped.astype(str),
        "skipped_index": rows.skipped_index.astype(np.int64),
        "skipped_reason": rows.skipped_reason.astype(str),
        "model": np.asarray(str((meta.get("model") or {}).get("source"))),
        "job": np.asarray(json.dumps(meta.get("job"), sort_keys=True)),
    }

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **members)

    atomic_write(output, write)


def write_parquet_output(output, row_pieces) -> None:
    """One Parquet file from `EmbeddingRows` pieces in index order (a row group each)."""
    with ParquetStreamWriter(output) as writer:
        for rows in row_pieces:
            writer.write(rows_table(rows))


def finished_output(output, kind, identity) -> tuple[int, int] | None:
    """(vectors, skipped) of an existing file output that this very job wrote (a rerun
    has nothing to do), else None."""
    if kind == "folder" or not os.path.isfile(output):
        return None
    try:
        if kind == "npz":
            arrays = read_npz(output, names=("job", "index", "skipped_index"))
            job = json.loads(str(arrays["job"]))
            counts = arrays["index"].size, arrays["skipped_index"].size
        else:
            job = (read_meta(output) or {}).get("job")
            errors = [row["error"] for row in read_columns(output, ("error",))]
            skipped = sum(error is not None for error in errors)
            counts = len(errors) - skipped, skipped
    except (ValueError, KeyError, OSError, InputError):
        return None  # not this job's: it is overwritten
    return counts if job == identity else None


# ----------------------------------------------------------------------------
# A folder of parts: OUT/part-NNNNNN.parquet, one per chunk
# ----------------------------------------------------------------------------


class PartsFolder:
    """The parts of one job in a folder (`embedding.parquet`): which are finished, which
    belong to another job, writing one atomically."""

    def __init__(self, folder, identity: dict, model_info: dict):
        self.folder = os.fspath(folder)
        self.identity = job_without_shard(identity)
        self.meta = metadata_record(model_info, self.identity)
        self.created = False  # whether `prepare` made the folder

    def path(self, chunk) -> str:
        return os.path.join(self.folder, part_name(chunk))

    def prepare(self, restart: bool) -> None:
        """Create the folder; with `restart`, remove its parts (only those)."""
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise JobError(f"{self.folder} is a file; a folder of parts needs a folder.")
        self.created = not os.path.exists(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        if restart:
            for path in part_files(self.folder).values():
                os.remove(path)

    def finished(self, chunks, log) -> dict[int, tuple[int, int]]:
        """{chunk: (vectors, skipped)} of `chunks` whose parts are finished; a part of
        another job is refused (JobError naming what differs), a damaged one removed."""
        existing = part_files(self.folder)
        for path in existing.values():  # another job's part anywhere: refuse, not mix
            try:
                meta = read_meta(path)
            except EmbeddingFileError:
                continue  # damaged: redone below if it is one of ours
            refuse_other_job(self.folder, (meta or {}).get("job"), self.identity)
        done = {}
        for chunk, start, stop in chunks:
            if chunk not in existing:
                continue
            try:
                done[chunk] = self.check(existing[chunk], start, stop)
            except (JobError, EmbeddingFileError) as error:
                log(f"redoing a damaged part: {error}")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(existing[chunk])
        return done

    def check(self, path, start, stop) -> tuple[int, int]:
        rows = read_rows(path, require_meta=True)
        if rows.job != self.identity:
            raise JobError(f"{path} belongs to another job")
        arrays = {"embeddings": rows.embeddings, "index": rows.index,
                  "skipped_index": rows.skipped_index}  # fmt: skip
        check_coverage(path, arrays, start, stop, self.identity["dim"])
        return rows.index.size, rows.skipped_index.size

    def write(self, chunk, arrays, paths, labels) -> tuple[int, int]:
        """Write chunk `chunk` (its arrays as `embedding.jobs` makes them) as a part."""
        write_rows(self.path(chunk), chunk_rows(arrays, paths, labels, self.meta))
        return arrays["index"].size, arrays["skipped_index"].size

    def write_rows(self, chunk, rows: EmbeddingRows) -> None:
        """Write chunk `chunk`'s rows as a part, with this job's metadata."""
        rows.meta = self.meta
        write_rows(self.path(chunk), rows)

    def remove(self, chunks) -> None:
        """Remove these chunks' parts (and the folder, if this job made it and it is empty)."""
        for chunk in chunks:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(chunk))
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)  # only when empty


class FolderJob:
    """An embedding job into a folder of parts: which chunks are left, each written as a
    part as soon as it is done (by `embed_missing`, the engine's), and the result."""

    def __init__(self, paths, labels, output, identity, model_info, log):
        self.paths, self.labels, self.output = paths, labels, os.fspath(output)
        self.identity, self.log = identity, log
        self.parts = PartsFolder(output, identity, model_info)

    def run(self, chunks, restart, embed_missing) -> JobResult:
        """`embed_missing(missing chunks, write)` embeds each missing (chunk, start, stop)
        and calls `write(chunk, arrays)` with arrays as `embedding.jobs` makes them."""
        parts, log = self.parts, self.log
        parts.prepare(restart)
        done = parts.finished(chunks, log)
        if len(done) == len(chunks):
            log(f"nothing to do: {self.output} holds all {len(chunks)} parts of this job")
        elif done:
            log(f"resuming: {len(done)} of {len(chunks)} parts already done (in {self.output})")
        counts = dict(done)
        missing = [c for c in chunks if c[0] not in done]

        def write(chunk, arrays):
            counts[chunk] = parts.write(chunk, arrays, self.paths, self.labels)

        if missing:
            embed_missing(missing, write)
        return self.result(counts, len(chunks), len(done))

    def result(self, counts: dict, chunks: int, resumed: int) -> JobResult:
        """The JobResult; a job without one readable image writes nothing (its parts are
        removed: an output without a vector would look like success)."""
        count, skipped = (sum(c[k] for c in counts.values()) for k in (0, 1))
        if count == 0 and self.identity["num_shards"] == 1:
            unreadable = [read_rows(self.parts.path(chunk)) for chunk in sorted(counts)]
            self.parts.remove(counts)
            reasons = [
                pair
                for rows in unreadable
                for pair in zip(rows.skipped.tolist(), rows.skipped_reason.tolist(), strict=True)
            ]
            raise NothingReadableError(
                f"none of the {skipped} images could be read; nothing written to {self.output}",
                reasons,
            )
        return JobResult(self.output, count, skipped, chunks, resumed)
