"""Embedding files in Parquet: what `embed -o OUT.parquet`, `embed -o FOLDER` (a folder of
parts), `merge` and the Ray engine write, and what `Gallery`, `evaluate --embeddings` and
`merge` read back.

One row per image, in the order of the job's file list:

- `index` int64: the image's position in the job's file list;
- `path` string, `label` string (the identity: by default the image's folder name);
- `embedding` fixed-size list of float32 (the model's dimension), null when the image
  could not be read;
- `error` string: why the image could not be read, null when it could.

The file's key-value metadata, key `keras_convnext`, is one JSON object: `format` (1),
`model` (its `source`, `architecture`, `weights_sha256` and `layers_sha256` from
`embedding.runs`, the `preprocessing`, `dim`) and `job` (the identity of the
`embedding.jobs` job that wrote it: file list, model, preprocessing, chunk size,
shard). DuckDB, pandas, Polars, LanceDB or Hugging Face `datasets` read the columns as
they are; this package reads the metadata to refuse mixing two models' vectors.

A folder of parts holds `part-NNNNNN.parquet`, chunk NNNNNN of the job's file list
(the same rows, cut where the job's chunks end); names beginning with `.` or `_` are
not parts (temporary files of a write in progress, notes).

pyarrow is optional (the `parquet` extra; `ray` brings it too): this module imports it
when a function needs it, and says how to install it if it is missing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from convnext_common.files import atomic_path
from embedding.errors import InputError, MissingExtraError
from embedding.files import folder_label

PARQUET_EXTRA = 'pip install "keras-convnext[parquet]" (pyarrow)'
METADATA_KEY = b"keras_convnext"
FORMAT = 1
COLUMNS = ("index", "path", "label", "embedding", "error")
PART_PATTERN = re.compile(r"^part-(\d{6,})\.parquet$")


class EmbeddingFileError(InputError, ValueError):
    """An embedding file (.npz, .parquet or a folder of parts) that cannot be used:
    damaged, not an embedding file, incomplete, or from another model or job."""


def arrow():
    """(pyarrow, pyarrow.parquet), or a `MissingExtraError` saying how to install them."""
    try:  # optional dependency: the parquet extra
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:
        raise MissingExtraError(f"Parquet files need pyarrow: {PARQUET_EXTRA}.") from error
    return pyarrow, pyarrow.parquet


def part_name(chunk: int) -> str:
    """The file name of chunk `chunk`'s part in a folder of parts."""
    return f"part-{chunk:06d}.parquet"


def part_files(folder) -> dict[int, str]:
    """{chunk: path} of the parts in `folder` (temporary and hidden files left out)."""
    folder = os.fspath(folder)
    found = {}
    for name in sorted(os.listdir(folder)):
        match = PART_PATTERN.match(name)
        if match:
            found[int(match.group(1))] = os.path.join(folder, name)
    return found


# ----------------------------------------------------------------------------
# The rows, in memory
# ----------------------------------------------------------------------------


@dataclass
class EmbeddingRows:
    """The content of an embedding file, split as the `.npz` keeps it: the readable
    images' rows (`embeddings` (N, D) float32, `paths`, `labels`, `index`, ascending)
    and the unreadable ones' (`skipped`, `skipped_index`, `skipped_reason`);
    `meta` is the metadata record (`model`, `job`), None for a file without it."""

    embeddings: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, str))
    skipped_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    skipped_reason: np.ndarray = field(default_factory=lambda: np.zeros(0, str))
    meta: dict | None = None
    skipped_labels: np.ndarray | None = None  # None: each skipped path's folder name

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def job(self) -> dict | None:
        return (self.meta or {}).get("job")

    @classmethod
    def concatenate(cls, parts: list[EmbeddingRows], meta=None) -> EmbeddingRows:
        """The rows of several parts, in index order."""
        index = np.concatenate([p.index for p in parts])
        order = np.argsort(index, kind="stable")
        skipped_index = np.concatenate([p.skipped_index for p in parts])
        skip_order = np.argsort(skipped_index, kind="stable")

        def joined(name, order, dtype=str):
            return np.concatenate([np.asarray(getattr(p, name), dtype=dtype) for p in parts])[order]

        return cls(
            embeddings=np.concatenate([p.embeddings for p in parts])[order],
            paths=joined("paths", order),
            labels=joined("labels", order),
            index=index[order],
            skipped=joined("skipped", skip_order),
            skipped_index=skipped_index[skip_order],
            skipped_reason=joined("skipped_reason", skip_order),
            meta=meta if meta is not None else parts[0].meta,
            skipped_labels=np.concatenate([p.labels_of_skipped() for p in parts])[skip_order],
        )

    def select(self, start: int, stop: int) -> EmbeddingRows:
        """The rows whose index lies in start..stop-1."""
        good = (self.index >= start) & (self.index < stop)
        bad = (self.skipped_index >= start) & (self.skipped_index < stop)
        return EmbeddingRows(
            embeddings=self.embeddings[good],
            paths=self.paths[good],
            labels=self.labels[good],
            index=self.index[good],
            skipped=self.skipped[bad],
            skipped_index=self.skipped_index[bad],
            skipped_reason=self.skipped_reason[bad],
            meta=self.meta,
            skipped_labels=self.labels_of_skipped()[bad],
        )

    def labels_of_skipped(self) -> np.ndarray:
        """The unreadable rows' labels: their own, else each path's folder name."""
        if self.skipped_labels is not None:
            return np.asarray(self.skipped_labels, str).reshape(-1)
        return np.asarray([folder_label(p) for p in self.skipped.tolist()], str).reshape(-1)


def metadata_record(model_info: dict, job: dict) -> dict:
    """The `keras_convnext` metadata of a file: format, model, job."""
    return {"format": FORMAT, "model": model_info, "job": job}


def rows_table(rows: EmbeddingRows):
    """A pyarrow Table of `rows` (readable and unreadable interleaved by index) with
    the metadata of `rows.meta`."""
    pa, _ = arrow()
    dim = rows.dim
    count = rows.index.size + rows.skipped_index.size
    index = np.concatenate([rows.index, rows.skipped_index]).astype(np.int64)
    order = np.argsort(index, kind="stable")
    readable = np.zeros(count, bool)
    readable[: rows.index.size] = True
    readable = readable[order]
    vectors = np.zeros((count, dim), np.float32)
    vectors[np.flatnonzero(readable)] = rows.embeddings
    paths = np.concatenate([rows.paths.astype(str), rows.skipped.astype(str)])[order]
    labels = np.concatenate([rows.labels.astype(str), rows.labels_of_skipped()])[order]
    errors = [None] * rows.index.size + rows.skipped_reason.astype(str).tolist()
    embedding = pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.reshape(-1), pa.float32()), dim, mask=pa.array(~readable)
    )
    table = pa.table(
        {
            "index": pa.array(index[order], pa.int64()),
            "path": pa.array(paths.tolist(), pa.string()),
            "label": pa.array(labels.tolist(), pa.string()),
            "embedding": embedding,
            "error": pa.array([errors[i] for i in order.tolist()], pa.string()),
        }
    )
    if rows.meta is not None:
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(rows.meta).encode()})
    return table


def write_rows(path, rows: EmbeddingRows) -> str:
    """Write `rows` as one Parquet file, atomically."""
    _, pq = arrow()
    table = rows_table(rows)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return os.fspath(path)


class ParquetStreamWriter:
    """One Parquet file written a table at a time (a row group each), atomically: the
    file appears whole when the `with` block ends without an error."""

    def __init__(self, path):
        self._path = os.fspath(path)
        self._writer = None

    def __enter__(self):
        self._atomic = atomic_path(self._path)
        self._tmp = self._atomic.__enter__()
        return self

    def write(self, table) -> None:
        _, pq = arrow()
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, table.schema)
        self._writer.write_table(table)

    def __exit__(self, *exc):
        if self._writer is not None:
            self._writer.close()
        return self._atomic.__exit__(*exc)


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def read_columns(path, columns) -> list[dict]:
    """Some columns of a Parquet file as a list of row dicts."""
    pa, pq = arrow()
    try:
        return pq.read_table(os.fspath(path), columns=list(columns)).to_pylist()
    except (OSError, pa.ArrowException) as error:
        raise EmbeddingFileError(f"{path}: not a readable Parquet file ({error}).") from None


def read_meta(path) -> dict | None:
    """The `keras_convnext` metadata of a Parquet file (its footer only), or None."""
    pa, pq = arrow()
    try:
        schema = pq.read_schema(os.fspath(path))
    except (OSError, pa.ArrowException) as error:
        raise EmbeddingFileError(f"{path}: not a readable Parquet file ({error}).") from None
    return _meta_of(schema, path)


def _meta_of(schema, path) -> dict | None:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise EmbeddingFileError(f"{path}: its keras_convnext metadata is not JSON.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EmbeddingFileError(
            f"{path}: keras_convnext metadata of format {meta.get('format')!r} is not one "
            f"this version reads ({FORMAT})."
            if isinstance(meta, dict)
            else f"{path}: its keras_convnext metadata is not a JSON object."
        )
    return meta


def _string_column(table, name, path, nullable=False) -> list:
    column = table.column(name)
    values = column.to_pylist()
    if not nullable and any(v is None for v in values):
        raise EmbeddingFileError(f"{path}: column {name!r} has empty (null) values.")
    if not all(v is None or isinstance(v, str) for v in values):
        raise EmbeddingFileError(f"{path}: column {name!r} must hold strings.")
    return values


def _vectors(table, path, dim) -> tuple[np.ndarray, np.ndarray]:
    """((N, D) float32 with zeros where null, (N,) readable mask) of the embedding column."""
    pa, _ = arrow()
    column = table.column("embedding").combine_chunks()
    kind = column.type
    if pa.types.is_fixed_size_list(kind):
        size = kind.list_size
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        valid = ~column.is_null().to_numpy(zero_copy_only=False)
        sizes = np.unique(lengths[valid])
        if sizes.size > 1:
            raise EmbeddingFileError(f"{path}: embeddings of different lengths {sizes[:5]}.")
        size = int(sizes[0]) if sizes.size else (dim or 0)
    else:
        raise EmbeddingFileError(
            f"{path}: column 'embedding' is {kind}, expected a list of float32."
        )
    if not pa.types.is_floating(kind.value_type):
        raise EmbeddingFileError(f"{path}: embeddings are {kind.value_type}, not floats.")
    if dim is not None and size != dim:
        raise EmbeddingFileError(
            f"{path}: embeddings of dimension {size}, its metadata says {dim}."
        )
    readable = ~column.is_null().to_numpy(zero_copy_only=False)
    vectors = np.zeros((len(column), size), np.float32)
    if readable.any():
        values = column.filter(pa.array(readable)).flatten().to_numpy(zero_copy_only=False)
        vectors[readable] = np.asarray(values, np.float32).reshape(-1, size)
    return vectors, readable


def read_rows(path, *, require_meta: bool = False) -> EmbeddingRows:
    """The rows of one Parquet embedding file (see the module docstring).

    A file without the `index`, `error`, `path` or `label` column (written by another
    tool, e.g. Ray Data's `write_parquet` after `embedding.raydata.embed_dataset`) is read
    with the row order as index, every row with an embedding as readable, paths of "",
    labels from the paths' folder names (it needs `embedding`, and `label` or `path`);
    `require_meta` refuses a file without this package's metadata. Raises
    `EmbeddingFileError` naming the problem.
    """
    pa, pq = arrow()
    path = os.fspath(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as error:
        raise EmbeddingFileError(f"{path}: not a readable Parquet file ({error}).") from None
    meta = _meta_of(table.schema, path)
    if meta is None and require_meta:
        raise EmbeddingFileError(
            f"{path}: not written by `embed` (no keras_convnext metadata naming the model "
            "and the job)."
        )
    names = table.column_names
    if "embedding" not in names or ("label" not in names and "path" not in names):
        raise EmbeddingFileError(
            f"{path}: not an embedding file (it needs an 'embedding' column and a 'label' or "
            f"'path' one; an embedding file has {', '.join(COLUMNS)})."
        )
    dim = (meta or {}).get("model", {}).get("dim")
    vectors, readable = _vectors(table, path, dim)
    count = table.num_rows
    paths = _string_column(table, "path", path) if "path" in names else [""] * count
    labels = (
        _string_column(table, "label", path)
        if "label" in names
        else [folder_label(p) for p in paths]  # embed's rule: the image's folder name
    )
    errors = (
        _string_column(table, "error", path, nullable=True)
        if "error" in table.column_names
        else [None] * count
    )
    if "index" in table.column_names:
        index = table.column("index").to_numpy(zero_copy_only=False)
        if index.dtype.kind not in "iu" or (index < 0).any():
            raise EmbeddingFileError(f"{path}: column 'index' must hold non-negative integers.")
        index = index.astype(np.int64)
    else:
        index = np.arange(count, dtype=np.int64)
    if np.unique(index).size != count:
        raise EmbeddingFileError(f"{path}: some images are listed more than once (index).")
    failed = np.asarray([e is not None for e in errors], bool)
    if (failed & readable).any() or (~failed & ~readable & ("error" in table.column_names)).any():
        raise EmbeddingFileError(
            f"{path}: every row needs either an embedding or an error, not both or neither."
        )
    if not np.all(np.isfinite(vectors[readable])):
        raise EmbeddingFileError(f"{path}: embeddings contain NaN or infinity.")
    good, bad = np.flatnonzero(readable), np.flatnonzero(~readable)
    rows = EmbeddingRows(
        embeddings=vectors[good],
        paths=np.asarray([paths[i] for i in good], str).reshape(-1),
        labels=np.asarray([labels[i] for i in good], str).reshape(-1),
        index=index[good],
        skipped=np.asarray([paths[i] for i in bad], str).reshape(-1),
        skipped_index=index[bad],
        skipped_reason=np.asarray([errors[i] or "" for i in bad], str).reshape(-1),
        meta=meta,
        skipped_labels=np.asarray([labels[i] for i in bad], str).reshape(-1),
    )
    return EmbeddingRows.concatenate([rows], meta)
