"""Embedding files: which format an output path asks for (the one place that decides),
and reading any embedding file back into `EmbeddingRows`.

The name decides, so that a name never promises a format it does not hold:

- `NAME.npz`: one numpy archive (`embedding.npz`; the default of earlier versions);
- `NAME.parquet`: one Parquet file (`embedding.parquet`);
- a folder (one that exists, a name ending in `/`, or a name without a suffix): a
  folder of Parquet parts, `part-NNNNNN.parquet`, one per chunk of the job;
- any other suffix is refused, naming these three.

Reading (`read_embeddings`) takes the same three; a folder of parts written by `embed`
must be complete (every chunk of its job there, all from that one job), and a folder
of other Parquet files (e.g. written by Ray Data's `write_parquet` after
`embedding.raydata.embed_dataset`) is read whole, in name order.
"""

from __future__ import annotations

import json
import os

import numpy as np

from embedding.npz import read_npz
from embedding.parquet import (
    EmbeddingFileError,
    EmbeddingRows,
    part_files,
    read_columns,
    read_rows,
)

FORMATS = ("npz", "parquet", "folder")
_SUFFIXES = {".npz": "npz", ".parquet": "parquet"}
FORMAT_CHOICES = (
    ".npz (a numpy archive), .parquet (one Parquet file), or a folder of Parquet parts "
    "(a name without a suffix, or ending in /)"
)
# what may differ between the parts of one job written by different shards
SHARD_KEYS = ("shard_index", "num_shards")
NPZ_MEMBERS = ("embeddings", "paths", "labels", "index", "skipped", "skipped_index")


def output_format(path, option: str = "-o") -> str:
    """ "npz", "parquet" or "folder" for an output path (see the module docstring), or an
    `EmbeddingFileError` naming the suffix and the valid choices."""
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or os.path.isdir(text):
        return "folder"
    suffix = os.path.splitext(os.path.basename(text))[1]
    if not suffix:
        return "folder"
    kind = _SUFFIXES.get(suffix.lower())
    if kind is None:
        raise EmbeddingFileError(
            f"{option} {text}: the name decides the format, and {suffix} names none; give "
            f"{FORMAT_CHOICES}"
        )
    return kind


def input_format(path) -> str:
    """ "npz", "parquet" or "folder" for an existing embedding file: a folder, else the
    suffix, else the file's first bytes (PAR1: Parquet; anything else is read as .npz)."""
    text = os.fspath(path)
    if os.path.isdir(text):
        return "folder"
    kind = _SUFFIXES.get(os.path.splitext(text)[1].lower())
    if kind is not None:
        return kind
    try:
        with open(text, "rb") as f:
            return "parquet" if f.read(4) == b"PAR1" else "npz"
    except OSError:
        return "npz"  # the npz reader names the problem


def is_parquet(path) -> bool:
    """Whether an existing embedding file is Parquet (a file or a folder of parts)."""
    return input_format(path) in ("parquet", "folder")


def job_without_shard(identity: dict | None) -> dict:
    return {k: v for k, v in (identity or {}).items() if k not in SHARD_KEYS}


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def read_embeddings(path, *, complete: bool = True) -> EmbeddingRows:
    """Any embedding file as `EmbeddingRows` (readable rows, unreadable rows, metadata).

    `complete`: a folder of parts written by `embed` must hold every chunk of its job
    (False: whatever parts are there, e.g. one shard's, for `merge`). Raises
    `EmbeddingFileError` naming what is wrong; FileNotFoundError when there is nothing.
    """
    kind = input_format(path)
    if kind == "npz":
        return read_npz_rows(path)
    if kind == "parquet":
        return read_rows(path)
    return read_folder(path, complete=complete)


def read_npz_rows(path) -> EmbeddingRows:
    """The rows of an `.npz` written by `embed` / `merge` (or a plain one with
    `embeddings` + `labels`, whose rows are numbered in order)."""
    arrays = read_npz(path, error=EmbeddingFileError, what="embedding file")
    missing = [n for n in ("embeddings", "labels") if n not in arrays]
    if missing:
        raise EmbeddingFileError(f"{path}: not an embedding file (missing arrays {missing}).")
    vectors = arrays["embeddings"]
    count = vectors.shape[0] if vectors.ndim == 2 else -1
    if count < 0 or vectors.dtype.kind != "f":
        raise EmbeddingFileError(
            f"{path}: embeddings must be a 2-D float array, got {vectors.dtype} {vectors.shape}."
        )
    job = None
    if "job" in arrays:
        try:
            job = json.loads(str(arrays["job"]))
        except ValueError:
            raise EmbeddingFileError(f"{path}: its job record is not JSON.") from None
    zeros = np.zeros(0, np.int64)
    rows = EmbeddingRows(
        embeddings=np.asarray(vectors, np.float32),
        paths=arrays.get("paths", np.full(count, "")).astype(str),
        labels=arrays["labels"].astype(str),
        index=arrays.get("index", np.arange(count, dtype=np.int64)).astype(np.int64),
        skipped=arrays.get("skipped", np.zeros(0, str)).astype(str),
        skipped_index=arrays.get("skipped_index", zeros).astype(np.int64),
        skipped_reason=arrays.get("skipped_reason", np.zeros(0, str)).astype(str),
        meta=None if job is None else {"model": {"source": str(arrays.get("model"))}, "job": job},
    )
    lengths = {len(rows.paths), len(rows.labels), len(rows.index)}
    if lengths != {count} or len(rows.skipped) != len(rows.skipped_index):
        raise EmbeddingFileError(f"{path}: its arrays do not have one entry per embedding.")
    return rows


def _part_job(rows, part) -> dict:
    job = rows.job
    if not isinstance(job, dict) or not isinstance(job.get("chunk_size"), int):
        raise EmbeddingFileError(f"{part}: not written by `embed` (no job record).")
    return job


def read_folder(folder, *, complete: bool = True) -> EmbeddingRows:
    """The rows of a folder of parts (see `read_embeddings`)."""
    folder = os.fspath(folder)
    parts = part_files(folder)
    if not parts:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".parquet") and n[0] not in "._")
        if not names:
            raise EmbeddingFileError(
                f"{folder}: it is a folder, and holds no Parquet files (an embedding folder "
                "holds part-NNNNNN.parquet)."
            )
        pieces = [read_rows(os.path.join(folder, n)) for n in names]
        offset = 0
        for piece in pieces:  # no job of ours: number the rows in name order
            size = piece.index.size + piece.skipped_index.size
            piece.index, piece.skipped_index = piece.index + offset, piece.skipped_index + offset
            offset += size
        return EmbeddingRows.concatenate(pieces)
    pieces = {chunk: read_rows(path, require_meta=True) for chunk, path in parts.items()}
    first_chunk = min(pieces)
    job = _part_job(pieces[first_chunk], parts[first_chunk])
    for chunk, rows in pieces.items():
        if job_without_shard(_part_job(rows, parts[chunk])) != job_without_shard(job):
            raise EmbeddingFileError(
                f"{folder}: {os.path.basename(parts[chunk])} and "
                f"{os.path.basename(parts[first_chunk])} come from different jobs (another "
                "model, file list or chunk size); remove the folder or embed into another one."
            )
    if complete:
        files = (job.get("files") or {}).get("count")
        expected = -(-int(files or 0) // job["chunk_size"])
        missing = sorted(set(range(expected)) - set(pieces))
        if missing:
            raise EmbeddingFileError(
                f"{folder}: incomplete, {len(missing)} of {expected} parts missing (first: "
                f"part {missing[0]}); run the same `embed` command again to finish it."
            )
    return EmbeddingRows.concatenate(list(pieces.values()), pieces[first_chunk].meta)


def skipped_files(path) -> list[tuple[str, str]]:
    """(path, reason) of the unreadable images an embedding output lists, reading only
    those columns or members."""
    kind = input_format(path)
    if kind == "npz":
        arrays = read_npz(path, error=EmbeddingFileError, names=("skipped", "skipped_reason"))
        names = arrays.get("skipped", np.zeros(0, str)).tolist()
        return list(
            zip(names, arrays.get("skipped_reason", np.zeros(0, str)).tolist(), strict=True)
        )
    files = [path] if kind == "parquet" else list(part_files(path).values())
    out = []
    for name in files:
        for row in read_columns(name, ("path", "error")):
            if row["error"] is not None:
                out.append((row["path"], row["error"]))
    return out
