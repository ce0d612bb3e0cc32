"""What every gallery accepts, whatever holds it (memory, a file, SQLite, PostgreSQL): the one
place that checks labels, ids, k, vectors, metadata and names before anything is stored.

Text (labels, metadata keys and strings, gallery names) must be valid Unicode without NUL
characters: PostgreSQL's `text` and `jsonb` cannot hold U+0000 and numpy's string arrays drop
it at the end of a string, so a NUL is refused everywhere rather than stored differently by
each store. Metadata is one JSON object per vector (str keys; values JSON: str, int, finite
float, bool, None, lists and objects of them), at most `MAX_METADATA_BYTES` as JSON.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from embedding.errors import InputError
from embedding.gallery.vectors import check_finite

MAX_METADATA_BYTES = 64 * 1024  # one vector's metadata, as UTF-8 JSON
# a label names a person or an id; long text belongs in the metadata (a file keeps labels in a
# fixed-width array: N x the longest label x 4 bytes)
MAX_LABEL_CHARS = 1024
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


class GalleryValueError(InputError, ValueError):
    """A value a gallery cannot hold: a label or metadata that is not text or JSON, a NUL."""


class DimensionError(InputError, ValueError):
    """Vectors whose length differs from the gallery's."""


class EmptyGalleryError(InputError, ValueError):
    """A search of a gallery that holds no vectors."""


class UnknownIdError(KeyError):
    """Ids that are not in the gallery."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def check_text(value: str, what: str) -> str:
    """`value` unchanged, or a GalleryValueError: a NUL character or a lone surrogate."""
    if "\x00" in value:
        raise GalleryValueError(
            f"{what} {_preview(value)} contains a NUL character (\\x00), which no gallery "
            "store can keep (PostgreSQL refuses it); remove it."
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise GalleryValueError(
            f"{what} {_preview(value)} is not valid Unicode (a lone surrogate); "
            "decode the text properly first."
        ) from None
    return value


def _preview(value: str) -> str:
    return repr(value[:40] + ("..." if len(value) > 40 else ""))


def check_labels(labels, count: int) -> list[str]:
    """`count` labels as a list of str (a single str for one vector)."""
    if isinstance(labels, str):
        labels = [labels]
    elif isinstance(labels, (bytes, bytearray)):
        raise TypeError(f"labels must be str, got bytes {bytes(labels)[:20]!r}: decode them first.")
    labels = list(labels)
    for label in labels:
        if not isinstance(label, str):
            kind = type(label).__name__
            hint = ": decode it first" if isinstance(label, (bytes, bytearray)) else ""
            raise TypeError(f"labels must be str, got {label!r} ({kind}){hint}.")
        if len(label) > MAX_LABEL_CHARS:
            raise GalleryValueError(
                f"a label of {len(label):,} characters; labels hold at most "
                f"{MAX_LABEL_CHARS:,} (put long text in the metadata)."
            )
        check_text(label, "label")
    if len(labels) != count:
        raise ValueError(f"{count} embeddings but {len(labels)} labels.")
    return [str(label) for label in labels]


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a positive int, got {k!r} ({type(k).__name__}).")
    if k < 1:
        raise ValueError(f"k must be a positive int, got {k}.")
    return int(k)


def as_ids(ids, what="ids") -> np.ndarray:
    """(n,) int64 ids from an int or a sequence of non-negative ints."""
    array = np.asarray(ids)
    if array.ndim == 0:
        array = array[None]
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise TypeError(
            f"{what} must be integers (a 1-D sequence), got {array.dtype} {array.shape}."
        )
    if (array < 0).any() or (array.dtype.kind == "u" and array.max() > np.iinfo(np.int64).max):
        raise ValueError(f"{what} must be between 0 and 2**63 - 1.")
    return array.astype(np.int64)


def check_new_ids(ids, count: int) -> np.ndarray:
    """`count` ids given for new vectors: ints, none repeated within the call."""
    new_ids = as_ids(ids)
    if new_ids.size != count:
        raise ValueError(f"{count} embeddings but {new_ids.size} ids.")
    unique, counts = np.unique(new_ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"ids repeat within this call: {unique[counts > 1][:5].tolist()}.")
    return new_ids


def check_vectors(embeddings, dim: int | None, what="Embeddings") -> np.ndarray:
    """(N, D) float32 from (N, D) or (D,); a DimensionError when D is not `dim`."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2:
        raise ValueError(f"{what} must be (N, D) or (D,), got shape {vectors.shape}.")
    if dim is not None and vectors.shape[1] != dim:
        raise DimensionError(f"Gallery holds {dim}-dim vectors, got {vectors.shape[1]}.")
    if vectors.shape[1] < 1 and vectors.shape[0]:
        raise ValueError(f"{what} have no dimensions (shape {vectors.shape}).")
    return check_finite(vectors, what)


def check_dim(dim) -> int | None:
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"dim must be a positive int, got {dim!r} ({type(dim).__name__}).")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}.")
    return int(dim)


def _check_json(value, where: str, depth: int = 0):
    if depth > 32:
        raise GalleryValueError(f"metadata {where} nests deeper than 32 levels.")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise GalleryValueError(f"metadata {where} is {value}; JSON has no NaN or infinity.")
        return value
    if isinstance(value, np.generic):
        return _check_json(value.item(), where, depth)
    if isinstance(value, str):
        return check_text(value, f"metadata {where}")
    if isinstance(value, (list, tuple)):
        return [_check_json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise GalleryValueError(
                    f"metadata keys must be str, got {key!r} ({type(key).__name__}) in {where}."
                )
            check_text(key, "metadata key")
            out[key] = _check_json(item, f"{where}[{key!r}]", depth + 1)
        return out
    raise GalleryValueError(
        f"metadata {where} is a {type(value).__name__}; metadata values are JSON: str, int, "
        "float, bool, None, lists and dicts of them."
    )


def check_metadata(metadata, count: int) -> list[dict]:
    """`count` metadata objects (dicts; None or {} for none), checked as JSON.

    `metadata` is None (no metadata), one dict for a single vector, or a sequence of
    `count` dicts (or Nones). Returns fresh dicts (lists for tuples).
    """
    if metadata is None:
        return [{} for _ in range(count)]
    if isinstance(metadata, dict):
        metadata = [metadata]
    if isinstance(metadata, (str, bytes)):
        raise TypeError("metadata must be a dict per vector (or a list of them), got a string.")
    metadata = list(metadata)
    if len(metadata) != count:
        raise ValueError(f"{count} embeddings but {len(metadata)} metadata entries.")
    checked = []
    for row, entry in enumerate(metadata):
        if entry is None:
            checked.append({})
            continue
        if not isinstance(entry, dict):
            raise TypeError(
                f"metadata must be a dict per vector; entry {row} is a {type(entry).__name__}."
            )
        entry = _check_json(entry, f"of vector {row}")
        size = len(metadata_json(entry).encode("utf-8"))
        if size > MAX_METADATA_BYTES:
            raise GalleryValueError(
                f"metadata of vector {row} is {size:,} bytes as JSON; at most "
                f"{MAX_METADATA_BYTES:,} per vector."
            )
        checked.append(entry)
    return checked


def metadata_json(entry: dict) -> str:
    """The one JSON text of a metadata object that every store writes (compact, UTF-8)."""
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def check_name(name, what="gallery name") -> str:
    """A gallery name: 1-64 of A-Z a-z 0-9 _ . - , not starting with '.' or '-'."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {name!r} ({type(name).__name__}).")
    if not NAME_PATTERN.fullmatch(name):
        raise GalleryValueError(
            f"{what} {_preview(name)} is not valid: use 1-64 letters, digits, '_', '.' or "
            "'-', starting with a letter, digit or '_'."
        )
    return name
