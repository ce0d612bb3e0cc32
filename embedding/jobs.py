"""Streaming, resumable embedding of many image files into one `.npz`, one Parquet file
or a folder of Parquet parts (the output's name decides: `embedding.formats`).

    from embedding.jobs import embed_files, merge_parts
    embed_files(embedder, paths, "vectors.npz")                    # resumes if interrupted
    embed_files(embedder, paths, "vectors.parquet")                # one Parquet file
    embed_files(embedder, paths, "vectors/")                       # a folder of Parquet parts
    embed_files(embedder, paths, "part0.npz", shard_index=0, num_shards=2)   # machine 0
    merge_parts(["part0.npz", "part1.npz"], "vectors.npz")         # = one run over all

The file list is cut into chunks of `chunk_size` consecutive files. For a file output
(.npz, .parquet) each finished chunk is written at once (atomically) as
`chunk-NNNNNN.npz` into a hidden folder next to the output, `.OUT.parts/`, together
with `job.json`, the job's identity. Run the same call again after an interruption
(Ctrl-C, `kill -9`, a preempted machine) and it skips the chunks on disk. At the end
the chunks are streamed into the output (one chunk in memory at a time), atomically,
and the folder is removed. A folder output is its chunks: `OUT/part-NNNNNN.parquet`,
each written atomically when its chunk is done, nothing to assemble; the shards of a
job (and the Ray engine, `embedding.raydata`) may all write into one folder. A chunk is
always embedded the same way (same batches, same padding), so a resumed run's output
equals an uninterrupted run's. A rerun over an output this job finished does nothing.

The identity (`embedding.job_files.job_identity`): the file list, the model (SHA-256 of
its weights and of its layer names and types, so another checkpoint, pooling or head
norm is noticed), the preprocessing, `chunk_size` and the shard. If it differs from
the one on disk, the run is refused with a `JobError` naming what changed
(`restart=True` discards the old chunks). The batch size and the device count are not
part of it: they may change between runs (results then agree to float rounding, not
bit for bit).

Sharding over machines: chunk c belongs to shard c % num_shards. Every machine runs the
same file list with its own `shard_index`; `merge_parts` checks that the parts come
from one job and cover every file once, and interleaves them back into file-list
order, equal to a single run's output.

`.npz` members (all read without pickle; the file loads as a `Gallery`): `embeddings`
(N, D) float32, `paths` (N,), `labels` (N,) (by default each image's folder name),
`index` (N,) int64 (position in the file list), `skipped` (S,) (unreadable paths),
`skipped_index` (S,), `skipped_reason` (S,), `model` (the source), `job` (JSON: the
identity, `shard_index`, `num_shards`). Parquet: one row per image, unreadable ones
with an `error` instead of an `embedding`, the model and job in the file's metadata
(`embedding.parquet`).

On JAX with several local devices, `distribution="auto"` embeds with
`keras.distribution.DataParallel` (every batch padded to the full batch size,
split over the devices); `None` uses one device.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from convnext_common.files import atomic_write
from embedding import runs
from embedding.distribution import clone_under, device_count, resolve_distribution
from embedding.errors import ImageLoadError
from embedding.formats import (
    SHARD_KEYS,
    input_format,
    job_without_shard,
    output_format,
    read_embeddings,
)
from embedding.job_files import (
    CHUNK_SIZE,
    JOB_FILE,
    PER_SHARD,
    FolderJob,
    JobError,
    JobResult,
    NothingReadableError,
    PartsFolder,
    check_chunk,
    chunk_path,
    chunk_rows,
    differences,
    finished_output,
    folder_labels,
    int_setting,
    job_identity,
    model_record,
    parts_folder,
    prepare_folder,
    read_small,
    shard_chunks,
    write_chunk,
    write_npz_output,
    write_parquet_output,
    write_rows_npz,
)
from embedding.model import predict_padded
from embedding.npz import NpyMemberReader, NpzStreamWriter
from embedding.parquet import EmbeddingFileError, EmbeddingRows, metadata_record, write_rows

__all__ = [
    "CHUNK_SIZE", "JOB_FILE", "JobError", "JobResult", "NothingReadableError", "embed_files",
    "folder_labels", "job_identity", "merge_parts", "parts_folder", "shard_chunks",
]  # fmt: skip


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
    """Embed image files into `output` (.npz, .parquet or a folder of Parquet parts: the
    name decides, `embedding.formats.output_format`) in resumable chunks (module docstring).

    Args:
        embedder: an `embedding.Embedder` (its model, preprocessing, batch size).
        paths: the image files, in the order the output keeps.
        labels: one per path (default: each file's folder name).
        chunk_size: files per chunk file (the unit of resumption).
        shard_index, num_shards: embed only chunks c with c % num_shards == shard_index.
        restart: discard chunks of an earlier run instead of resuming.
        progress: a tqdm bar (images/s) on stderr.
        distribution: "auto", None or a `keras.distribution.Distribution`.
        log: called with one-line notes (resuming, a damaged chunk redone, nothing to do).
    """
    try:
        kind = output_format(output, option="output")
    except EmbeddingFileError as error:
        raise JobError(str(error)) from None
    paths, labels = _checked_paths(paths, labels)
    chunk_size = int_setting("chunk_size", chunk_size, 1)
    num_shards = int_setting("num_shards", num_shards, 1)
    shard_index = int_setting("shard_index", shard_index, 0)
    if shard_index >= num_shards:
        raise ValueError(f"shard_index must be below num_shards ({num_shards}), got {shard_index}.")
    log = log or (lambda message: None)
    output = os.fspath(output)
    identity = job_identity(embedder, paths, chunk_size, shard_index, num_shards)
    chunks = shard_chunks(len(paths), chunk_size, shard_index, num_shards)
    if kind == "folder":
        job = FolderJob(paths, labels, output, identity, model_record(embedder, identity), log)

        def embed_missing(missing, write):
            with _Embedding(embedder, distribution, missing, len(paths), progress) as run:
                for chunk, start, stop in missing:
                    arrays = _embed_chunk(embedder, run.model, run.dist, paths[start:stop],
                                          start, run.bar)  # fmt: skip
                    write(chunk, arrays)

        return job.run(chunks, restart, embed_missing)
    finished = None if restart else finished_output(output, kind, identity)
    if finished is not None:
        log(f"nothing to do: {output} holds this job's output already")
        return JobResult(output, *finished, len(chunks), len(chunks))
    key = runs.json_digest(identity)
    folder = parts_folder(output)
    prepare_folder(folder, identity, restart)
    done = _finished_chunks(folder, chunks, key, int(embedder.dim), log)

    missing = [c for c in chunks if c[0] not in done]
    total = sum(stop - start for _, start, stop in chunks)
    with _Embedding(embedder, distribution, missing, total, progress) as run:
        for chunk, start, stop in missing:
            arrays = _embed_chunk(embedder, run.model, run.dist, paths[start:stop], start, run.bar)
            write_chunk(folder, chunk, arrays, key)

    count, skipped = _assemble(folder, chunks, key, output, paths, labels, identity, embedder)
    shutil.rmtree(folder, ignore_errors=True)
    return JobResult(output, count, skipped, len(chunks), len(done))


class _Embedding:
    """The model (laid out under the distribution) and the progress bar (of `total`
    files) of the `missing` chunks; the model is set up only when some chunk is missing."""

    def __init__(self, embedder, distribution, missing, total, progress):
        self.model, self.dist = None, None
        if missing:
            self.model, self.dist = _distribution_model(embedder, distribution)
        initial = total - sum(stop - start for _, start, stop in missing)
        self.bar = tqdm(
            total=total, initial=initial, disable=not progress, unit="img", desc="embed"
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


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
        path = chunk_path(folder, chunk)
        if os.path.exists(path):
            try:
                check_chunk(path, key, start, stop, dim)
                done[chunk] = stop - start
            except JobError as error:
                log(f"redoing a damaged chunk: {error}")
                os.remove(path)
    if done:
        log(f"resuming: {len(done)} of {len(chunks)} chunks already done (in {folder})")
    return done


def _assemble(folder, chunks, key, output, paths, labels, identity, embedder):
    """Stream the chunk files into `output` (.npz or .parquet); returns (vectors, skipped)."""
    dim = int(embedder.dim)
    index_parts, skipped_parts, reason_parts = [], [], []
    for chunk, start, stop in chunks:  # small arrays first: sizes and string widths
        arrays = check_chunk(chunk_path(folder, chunk), key, start, stop, dim)
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

    def chunk_arrays():
        for chunk, _, _ in chunks:
            with np.load(chunk_path(folder, chunk), allow_pickle=False) as data:
                yield {name: data[name] for name in data.files}

    if output_format(output) == "parquet":
        meta = metadata_record(model_record(embedder, identity), identity)
        pieces = (chunk_rows(arrays, paths, labels, meta) for arrays in chunk_arrays())
        write_parquet_output(output, pieces)
    else:
        vectors = (arrays["embeddings"] for arrays in chunk_arrays())
        write_npz_output(output, dim, len(index), vectors, index, skipped, reasons, paths,
                         labels, embedder.source, identity)  # fmt: skip
    return len(index), len(skipped)


# ----------------------------------------------------------------------------
# Merging the parts of a sharded job
# ----------------------------------------------------------------------------


def merge_parts(parts: Sequence, output) -> JobResult:
    """Join the outputs of every shard of one job into `output`, in file-list order.

    Parts and output may be .npz, .parquet or folders of parts (`embedding.formats`).
    Each part must come from the same job (files, model, preprocessing, chunk size) and
    together they must cover every file exactly once; the result equals one unsharded
    run's output. .npz into .npz streams the vectors; any Parquet part or output reads
    the parts into memory ((N, D) float32 at once).
    """
    parts = [os.fspath(p) for p in parts]
    if not parts:
        raise JobError("merge needs at least one part.")
    try:
        kind = output_format(output, option="output")
    except EmbeddingFileError as error:
        raise JobError(str(error)) from None
    if kind == "npz" and all(input_format(p) == "npz" for p in parts):
        return _merge_npz(parts, output)
    return _merge_rows(parts, output, kind)


def _read_part(path) -> EmbeddingRows:
    """A part's rows, or a JobError saying why it is none."""
    try:
        rows = read_embeddings(path, complete=False)
    except FileNotFoundError:
        raise JobError(f"part {path}: no such file.") from None
    except EmbeddingFileError as error:
        raise JobError(f"part {error}") from None
    job = rows.job
    if not isinstance(job, dict) or not all(
        isinstance(job.get(f), int) and not isinstance(job.get(f), bool)
        for f in ("dim", "chunk_size")
    ):
        raise JobError(f"{path} was not written by `embed` (no valid job record).")
    return rows


def _check_coverage(rows: EmbeddingRows, count: int) -> None:
    """A JobError unless the merged rows hold each of the job's `count` files once."""
    covered = np.concatenate([rows.index, rows.skipped_index])
    if covered.size and (covered.min() < 0 or covered.max() >= count):
        raise JobError(f"the parts list files outside the job's {count} files.")
    seen = np.bincount(covered, minlength=count)
    repeated, missing = np.flatnonzero(seen > 1), np.flatnonzero(seen == 0)
    if repeated.size:
        raise JobError(
            f"the parts embed {repeated.size} file(s) more than once (first: file "
            f"#{repeated[0]}); give each shard's part once."
        )
    if missing.size:
        raise JobError(
            f"the parts do not cover the job's {count} files: {missing.size} missing (first: "
            f"file #{missing[0]}); add the missing shards' parts."
        )


def _merge_rows(parts: list, output, kind) -> JobResult:
    """`merge_parts` when a part or the output is Parquet: in memory."""
    pieces = [(path, _read_part(path)) for path in parts]
    first_path, first = pieces[0]
    for path, rows in pieces[1:]:
        changed = differences(first.job, rows.job, ignore=(*SHARD_KEYS, "merged_from"))
        if changed:
            raise JobError(
                f"{path} and {first_path} come from different jobs: {'; '.join(changed)}."
            )
    merged = EmbeddingRows.concatenate([rows for _, rows in pieces])
    _check_coverage(merged, int((first.job.get("files") or {}).get("count", 0)))
    job = {**job_without_shard(first.job), "shard_index": 0, "num_shards": 1}
    model = dict((first.meta or {}).get("model") or {})
    for key, name in (("weights_sha256", "weights"), ("layers_sha256", "layers"),
                      ("preprocessing", "preprocessing"), ("dim", "dim")):  # fmt: skip
        model.setdefault(key, job.get(name))
    if kind == "folder":
        parts_out = PartsFolder(output, job, model)
        parts_out.prepare(restart=False)
        parts_out.finished([], lambda message: None)  # another job's parts there: refused
        size = job["chunk_size"]
        for chunk in sorted(set((np.r_[merged.index, merged.skipped_index] // size).tolist())):
            parts_out.write_rows(chunk, merged.select(chunk * size, (chunk + 1) * size))
    else:
        merged.meta = metadata_record(model, {**job, "merged_from": len(parts)})
        if kind == "parquet":
            write_rows(output, merged)
        else:
            write_rows_npz(output, merged)
    return JobResult(os.fspath(output), merged.index.size, merged.skipped_index.size, 0, 0)


def _part_record(path):
    """(path, job identity, small arrays) of one part, or a JobError saying it is none."""
    small = ("index", "skipped", "skipped_index", "skipped_reason", "job", "model")
    arrays = read_small(path, small, "part ")
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
        changed = differences(first, identity, ignore=PER_SHARD)
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


def _merge_npz(parts: list, output) -> JobResult:
    """`merge_parts` of .npz parts into an .npz: the vectors streamed (one run of
    consecutive rows from one part at a time)."""
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
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if owner.size else []
        bounds = list(zip(starts, [*starts[1:], owner.size], strict=True))

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
