"""Labelled galleries of embeddings for 1:N search, with exact and FAISS indexes.

    from embedding import Gallery
    g = Gallery()                                   # index="exact": numpy, no extra dependency
    g = Gallery(index="hnsw", ef_search=128)        # or "flat", "ivfpq" (pip install faiss-cpu)
    g.add(vectors, ["alice", "bob", ...])           # ids 0, 1, ... unless given
    labels, scores = g.search(query, k=5)           # best first; (M, D) queries -> (M, k)
    ids, scores = g.search_ids(queries, k=5)
    g.remove([3]); g.relabel([4], ["carol"])
    g.save("gallery.npz"); g = Gallery.load("gallery.npz")

Every vector has a label (a str; one label may have many vectors) and a unique
int64 id. The index (`embedding.gallery.indexes`) does the search; the gallery
owns the ids, the labels, an optional `Calibration` and the file format.

File format (one `.npz`, written atomically, read with `allow_pickle=False`):
`format` = 2, `meta` (JSON: index name and parameters, dim, count, next id,
calibration), `ids` (N,) int64, `labels` (N,) unicode, and either `embeddings`
(N, D) float32/float16 (exact) or `faiss_index` (FAISS's own
`serialize_index` bytes, uint8; HNSW adds `removed`). Files without `format`
(or `format` 1: `embeddings` + `labels`, as `python -m embedding embed` and
earlier versions wrote), and `embed`'s Parquet outputs, load as an exact gallery
with ids 0..N-1. Everything
read is checked (members, dtypes, shapes, counts, the FAISS index's type,
metric, dimension and ids against the labels); a damaged, truncated,
mismatched or pickled file raises `GalleryFileError` naming the problem.
"""

from __future__ import annotations

import json

import numpy as np

from convnext_common.files import atomic_write
from embedding.errors import InputError
from embedding.formats import EmbeddingFileError, is_parquet, read_embeddings
from embedding.gallery.indexes import INDEX_TYPES, index_class
from embedding.gallery.vectors import check_finite, cosine_similarity, l2_normalize
from embedding.metrics import Calibration
from embedding.npz import read_npz

__all__ = [
    "Gallery",
    "GalleryFileError",
    "UnknownIdError",
    "INDEX_TYPES",
    "cosine_similarity",
    "l2_normalize",
]

GALLERY_FORMAT = 2
_KIND = "keras-convnext-gallery"


class GalleryFileError(InputError, ValueError):
    """A gallery file that cannot be used: not an archive, damaged, mismatched, pickled."""


class UnknownIdError(KeyError):
    """Ids that are not in the gallery."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _check_labels(labels, count: int) -> list[str]:
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
    if len(labels) != count:
        raise ValueError(f"{count} embeddings but {len(labels)} labels.")
    return [str(label) for label in labels]


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a positive int, got {k!r} ({type(k).__name__}).")
    if k < 1:
        raise ValueError(f"k must be a positive int, got {k}.")
    return int(k)


def _as_ids(ids, what="ids") -> np.ndarray:
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


class Gallery:
    """Labelled embeddings for 1:N search by cosine similarity.

    Args:
        dim: vector length (default: from the first `add`).
        index: "exact" (default; numpy, no extra dependency), "flat" (FAISS exact
            inner product), "hnsw" (FAISS graph, approximate) or "ivfpq" (FAISS
            inverted file + product quantisation, approximate, ~D/8 bytes per vector).
        **params: the index's parameters (see `embedding.gallery.indexes`):
            exact `dtype` ("float32" | "float16"); hnsw `m`, `ef_construction`,
            `ef_search`; ivfpq `nlist`, `subquantizers`, `nbits`, `nprobe`, `train_size`.

    Vectors are L2-normalised when added. Labels are str (one label may have
    several vectors); ids are unique non-negative ints, by default counting up
    from 0. `calibration` (an `embedding.metrics.Calibration` or None) is saved
    and loaded with the gallery.
    """

    def __init__(self, dim: int | None = None, *, index: str = "exact", **params):
        cls = index_class(index)
        if dim is not None:
            dim = int(dim)
            if dim < 1:
                raise ValueError(f"dim must be >= 1, got {dim}.")
        self._params = cls.check_params(params, dim)  # fail now, not at the first add
        self.index_type = index
        self.dim = dim
        self._index = cls(dim, **self._params) if dim is not None else None
        self._ids: list[int] = []
        self._labels: list[str] = []
        self._next_id = 0
        self._cache = None  # (ids array, labels array, id -> position lookup)
        self.calibration = None

    def __len__(self):
        return len(self._ids)

    def __repr__(self):
        return (
            f"Gallery({len(self)} vectors, dim={self.dim}, index={self.index_type!r}, "
            f"{len(set(self._labels))} labels)"
        )

    # -- contents -----------------------------------------------------------

    @property
    def index_params(self) -> dict:
        return dict(self._index.params if self._index is not None else self._params)

    @property
    def ids(self) -> np.ndarray:
        """(N,) int64 ids in insertion order."""
        return self._arrays()[0].copy()

    @property
    def labels(self) -> list[str]:
        """Labels in insertion order."""
        return list(self._labels)

    @property
    def embeddings(self) -> np.ndarray:
        """(N, D) stored unit vectors in insertion order (not for 'ivfpq', which keeps codes)."""
        if self._index is None:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        return self._index.embeddings

    def _arrays(self):
        if self._cache is None:
            ids = np.asarray(self._ids, dtype=np.int64)
            order = np.argsort(ids, kind="stable")
            self._cache = (ids, np.asarray(self._labels, dtype=str), order, ids[order])
        return self._cache

    def _positions(self, ids, what="ids") -> np.ndarray:
        """Insertion positions of `ids`; an UnknownIdError lists those not in the gallery."""
        ids = _as_ids(ids, what)
        _, _, order, sorted_ids = self._arrays()
        where = np.searchsorted(sorted_ids, ids)
        found = where < sorted_ids.size
        found[found] = sorted_ids[where[found]] == ids[found]
        if not found.all():
            missing = ids[~found]
            raise UnknownIdError(
                f"{missing.size} id(s) not in the gallery: {missing[:5].tolist()}"
                + (" ..." if missing.size > 5 else "")
            )
        return order[where]

    def labels_of(self, ids) -> list[str]:
        """The label of each id."""
        return [self._labels[i] for i in self._positions(ids)]

    # -- changing -----------------------------------------------------------

    def _check_vectors(self, embeddings, what="Embeddings") -> np.ndarray:
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2:
            raise ValueError(f"{what} must be (N, D) or (D,), got shape {vectors.shape}.")
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise ValueError(f"Gallery holds {self.dim}-dim vectors, got {vectors.shape[1]}.")
        return check_finite(vectors, what)

    def _ensure_index(self, dim):
        if self._index is None:
            self.dim = int(dim)
            self._index = index_class(self.index_type)(self.dim, **self._params)

    def add(self, embeddings, labels, ids=None) -> Gallery:
        """Add (N, D) or (D,) embeddings with N labels (a str for a single vector).

        `ids`: N unique new ids (default: counting up from the largest id so far + 1).
        Returns the gallery, so calls chain; the new ids are `gallery.ids[-N:]`.
        """
        vectors = self._check_vectors(embeddings)
        labels = _check_labels(labels, vectors.shape[0])
        if ids is None:
            new_ids = np.arange(self._next_id, self._next_id + len(labels), dtype=np.int64)
        else:
            new_ids = _as_ids(ids)
            if new_ids.size != len(labels):
                raise ValueError(f"{len(labels)} embeddings but {new_ids.size} ids.")
            unique, counts = np.unique(new_ids, return_counts=True)
            if (counts > 1).any():
                raise ValueError(f"ids repeat within this call: {unique[counts > 1][:5].tolist()}.")
            taken = np.isin(new_ids, self._arrays()[0])
            if taken.any():
                raise ValueError(
                    f"ids already in the gallery: {new_ids[taken][:5].tolist()} "
                    "(remove them first, or relabel them)."
                )
        if not len(labels):
            return self
        self._ensure_index(vectors.shape[1])
        self._index.add(l2_normalize(vectors), new_ids)
        self._ids.extend(new_ids.tolist())
        self._labels.extend(labels)
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        self._cache = None
        return self

    def train(self, vectors) -> Gallery:
        """Learn an 'ivfpq' index's cells and codebooks from a sample (others: no-op).

        Without it, the first `add` trains on what it adds.
        """
        vectors = self._check_vectors(vectors, "Training vectors")
        self._ensure_index(vectors.shape[1])
        self._index.train(l2_normalize(vectors))
        return self

    def remove(self, ids) -> Gallery:
        """Remove the vectors with these ids (an UnknownIdError if any is not here)."""
        positions = self._positions(ids)
        if positions.size == 0:
            return self
        self._index.remove(self._arrays()[0][positions])
        keep = np.ones(len(self._ids), dtype=bool)
        keep[positions] = False
        self._ids = [i for i, k in zip(self._ids, keep, strict=True) if k]
        self._labels = [label for label, k in zip(self._labels, keep, strict=True) if k]
        self._cache = None
        return self

    def relabel(self, ids, labels) -> Gallery:
        """Give these ids new labels (one str for all of them, or one per id)."""
        positions = self._positions(ids)
        if isinstance(labels, str):
            labels = [labels] * positions.size
        labels = _check_labels(labels, positions.size)
        for position, label in zip(positions.tolist(), labels, strict=True):
            self._labels[position] = label
        self._cache = None
        return self

    def set_search_params(self, **params) -> Gallery:
        """Change search-time parameters (hnsw `ef_search`, ivfpq `nprobe`)."""
        if self._index is None:
            self._params = index_class(self.index_type).check_params(
                {**self._params, **params}, self.dim
            )
        else:
            self._index.set_search_params(**params)
        return self

    # -- searching ----------------------------------------------------------

    def _check_queries(self, queries):
        if len(self) == 0:
            raise ValueError("The gallery is empty.")
        q = np.asarray(queries, dtype=np.float32)
        single = q.ndim == 1
        if single:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"Query must be ({self.dim},) or (M, {self.dim}), got {q.shape}.")
        check_finite(q, "Queries")
        return l2_normalize(q), single

    def search_ids(self, queries, k: int = 5):
        """Top-k (ids, scores) by cosine similarity, best first.

        queries (D,) -> ((k,) ids, (k,) scores); (M, D) -> ((M, k), (M, k)).
        k is capped at the gallery size. An approximate index that finds fewer
        than k vectors pads with id -1 and score -inf. Exact indexes break ties
        by insertion order.
        """
        k = _check_k(k)
        q, single = self._check_queries(queries)
        ids, scores = self._index.search(q, min(k, len(self)))
        return (ids[0], scores[0]) if single else (ids, scores)

    def search(self, queries, k: int = 5):
        """Top-k (labels, scores) by cosine similarity, best first.

        query (D,) -> (list of k labels, (k,) scores); query (M, D) -> ((M, k)
        str array, (M, k) scores). Like `search_ids`; a missing result (id -1)
        has the label "".
        """
        ids, scores = self.search_ids(queries, k)
        all_ids, labels, order, sorted_ids = self._arrays()
        found = ids >= 0
        where = np.searchsorted(sorted_ids, np.where(found, ids, 0))
        top = np.where(found, labels[order[np.minimum(where, sorted_ids.size - 1)]], "")
        return (top.tolist(), scores) if ids.ndim == 1 else (top, scores)

    # -- files --------------------------------------------------------------

    def save(self, path) -> str:
        """Write the gallery as one `.npz` (see the module docstring), atomically."""
        if self._index is None and self.dim is not None:
            self._ensure_index(self.dim)
        index_arrays = self._index.to_arrays() if self._index is not None else {}
        meta = {
            "kind": _KIND,
            "index": self.index_type,
            "params": self.index_params,
            "dim": self.dim,
            "count": len(self),
            "next_id": self._next_id,
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
        }
        members = {
            "format": np.asarray(GALLERY_FORMAT),
            "meta": np.asarray(json.dumps(meta)),
            "ids": self._arrays()[0],
            "labels": np.asarray(self._labels, dtype=str).reshape(-1),
            **index_arrays,
        }

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **members)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path) -> Gallery:
        """Read a gallery file (this format or the plain `embeddings` + `labels` one).

        An `embed` output in Parquet (a .parquet file or a folder of parts,
        `embedding.formats`) loads as the plain kind: its readable rows' vectors and labels.

        Raises `GalleryFileError` (a ValueError) for anything wrong with the file,
        FileNotFoundError if there is none, ImportError for a FAISS index without faiss
        (or a Parquet file without pyarrow).
        """
        if is_parquet(path):
            try:
                rows = read_embeddings(path)
            except EmbeddingFileError as error:
                raise GalleryFileError(str(error)) from None
            return cls._from_plain(path, {"embeddings": rows.embeddings, "labels": rows.labels})
        arrays = read_npz(path, error=GalleryFileError, what="gallery file")
        version = arrays.get("format")
        if version is None or (version.shape == () and version.dtype.kind in "iu" and version == 1):
            return cls._from_plain(path, arrays)
        if version.shape != () or version.dtype.kind not in "iu":
            raise GalleryFileError(f"{path}: 'format' must be an integer, got {version!r}.")
        if int(version) != GALLERY_FORMAT:
            raise GalleryFileError(
                f"{path}: gallery format {int(version)} is not one this version reads "
                f"(1 or {GALLERY_FORMAT})."
            )
        try:
            return cls._from_v2(arrays)
        except (ValueError, TypeError) as error:
            raise GalleryFileError(f"{path}: not a valid gallery file ({error}).") from None

    @classmethod
    def _from_plain(cls, path, arrays):
        missing = {"embeddings", "labels"} - set(arrays)
        if missing:
            raise GalleryFileError(
                f"{path}: not a valid gallery file (missing arrays {sorted(missing)})."
            )
        vectors, labels = arrays["embeddings"], arrays["labels"]
        if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
            raise GalleryFileError(
                f"{path}: embeddings must be a 2-D float array, "
                f"got {vectors.dtype} {vectors.shape}."
            )
        if labels.ndim != 1 or labels.dtype.kind != "U":
            raise GalleryFileError(
                f"{path}: labels must be a 1-D string array, got {labels.dtype} {labels.shape}."
            )
        if labels.shape[0] != vectors.shape[0]:
            raise GalleryFileError(
                f"{path}: {vectors.shape[0]} embeddings but {labels.shape[0]} labels."
            )
        if not np.all(np.isfinite(vectors)):
            raise GalleryFileError(f"{path}: embeddings contain NaN or infinity.")
        gallery = cls(dim=int(vectors.shape[1]) or None)
        if vectors.shape[0]:
            gallery.add(vectors, labels.tolist())
        return gallery

    @classmethod
    def _from_v2(cls, arrays):
        for name in ("meta", "ids", "labels"):
            if name not in arrays:
                raise ValueError(f"missing array {name!r}")
        meta_array = arrays["meta"]
        if meta_array.shape != () or meta_array.dtype.kind != "U":
            raise ValueError("'meta' must be one JSON string")
        try:
            meta = json.loads(str(meta_array))
        except json.JSONDecodeError as error:
            raise ValueError(f"'meta' is not valid JSON: {error}") from None
        if not isinstance(meta, dict) or meta.get("kind") != _KIND:
            raise ValueError(f"'meta' is not a {_KIND} record")
        for key, kind in (("index", str), ("params", dict), ("count", int), ("next_id", int)):
            if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
                raise ValueError(f"meta[{key!r}] must be a {kind.__name__}, got {meta.get(key)!r}")
        dim = meta.get("dim")
        count = meta["count"]
        if not (dim is None and count == 0) and (
            not isinstance(dim, int) or isinstance(dim, bool) or dim < 1
        ):
            raise ValueError(f"meta['dim'] must be a positive int, got {dim!r}")
        ids, labels = arrays["ids"], arrays["labels"]
        if ids.dtype != np.int64 or ids.shape != (count,):
            raise ValueError(f"ids must be ({count},) int64, got {ids.dtype} {ids.shape}")
        if labels.shape != (count,) or (count and labels.dtype.kind != "U"):
            raise ValueError(
                f"labels must be ({count},) strings, got {labels.dtype} {labels.shape}"
            )
        if count and ((ids < 0).any() or np.unique(ids).size != count):
            raise ValueError("ids must be unique and non-negative")
        if count and meta["next_id"] <= int(ids.max()):
            raise ValueError(f"meta['next_id'] {meta['next_id']} is not above the largest id")
        gallery = cls(dim, index=meta["index"], **meta["params"])
        if meta.get("calibration") is not None:
            gallery.calibration = Calibration.from_dict(meta["calibration"])
        if dim is not None:
            index_type = index_class(meta["index"])
            gallery._index = index_type.from_arrays(dim, gallery._params, arrays, ids)
            if len(gallery._index) != count:
                raise ValueError(
                    f"the index holds {len(gallery._index)} vectors, meta says {count}"
                )
        gallery._ids = ids.tolist()
        gallery._labels = labels.tolist()
        gallery._next_id = meta["next_id"]
        return gallery
