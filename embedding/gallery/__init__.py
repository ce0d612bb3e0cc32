"""Labelled galleries of embeddings for 1:N search: in memory, in files, in SQLite or PostgreSQL.

    from embedding import Gallery
    g = Gallery()                                   # in memory; index="exact": numpy only
    g = Gallery(index="hnsw", ef_search=128)        # or "flat", "ivfpq" (pip install faiss-cpu)
    g.add(vectors, ["alice", "bob", ...], metadata=[{"camera": "door"}, ...])  # ids 0, 1, ...
    labels, scores = g.search(query, k=5)           # best first; (M, D) queries -> (M, k)
    ids, scores = g.search_ids(queries, k=5, where={"camera": "door"})
    g.remove([3]); g.remove_label("bob"); g.relabel([4], ["carol"])
    g.save("gallery.npz"); g = Gallery.load("gallery.npz")

    # stored galleries: every change durable when the call returns, shared between processes
    g = Gallery.open("sqlite:///galleries.db#staff", create=True)   # or a file, postgresql://...
    ids = g.add(vectors, labels)                    # one transaction: all of it or none
    with open_store("postgresql://app@127.0.0.1/faces") as store:   # several named galleries
        store.names(); g = store.gallery("staff", create=True)

Every vector has a label (a str; one label may have many vectors), a unique int64 id and
metadata (a JSON object, {} by default). The index (`embedding.gallery.indexes`) does the
search; the gallery owns the ids, the labels, the metadata, an optional `Calibration` and the
file format. The stores (`embedding.gallery.stores`: a folder of files, SQLite, PostgreSQL)
give the same calls over a database; what each value may be: `embedding.gallery.checks`;
filters: `embedding.gallery.filters`.

`Gallery.add` returns the gallery, so calls chain, as it always has; the ids it gave are
`gallery.added_ids`. A stored gallery's `add` returns the ids (its one transaction's).

File format (one `.npz`, written atomically, read with `allow_pickle=False`):
`format` = 2, `meta` (JSON: index name and parameters, dim, count, next id,
calibration), `ids` (N,) int64, `labels` (N,) unicode, `metadata` (optional: UTF-8
bytes, uint8, of a JSON list of N objects; absent when every object is empty; older
versions ignore it), and either `embeddings` (N, D) float32/float16 (exact) or
`faiss_index` (FAISS's own `serialize_index` bytes, uint8; HNSW adds `removed`).
Files without `format` (or `format` 1: `embeddings` + `labels`, as
`python -m embedding embed` and earlier versions wrote) load as an exact gallery with
ids 0..N-1. Everything read is checked (members, dtypes, shapes, counts, the FAISS
index's type, metric, dimension and ids against the labels, the metadata as JSON); a
damaged, truncated, mismatched or pickled file raises `GalleryFileError` naming the problem.
"""

from __future__ import annotations

import json

import numpy as np

from convnext_common.files import atomic_write
from embedding.errors import InputError
from embedding.gallery.checks import (
    DimensionError,
    EmptyGalleryError,
    GalleryValueError,
    UnknownIdError,
    as_ids,
    check_dim,
    check_k,
    check_labels,
    check_metadata,
    check_new_ids,
    check_vectors,
    metadata_json,
)
from embedding.gallery.filters import FilterError, check_where, json_key
from embedding.gallery.indexes import INDEX_TYPES, index_class
from embedding.gallery.vectors import check_finite, cosine_similarity, l2_normalize
from embedding.metrics import Calibration
from embedding.npz import read_npz

__all__ = [
    "Gallery",
    "GalleryFileError",
    "GalleryConflictError",
    "GalleryNotFoundError",
    "GalleryStore",
    "StoredGallery",
    "DimensionError",
    "EmptyGalleryError",
    "FilterError",
    "GalleryValueError",
    "StoreError",
    "UnknownIdError",
    "INDEX_TYPES",
    "copy_gallery",
    "cosine_similarity",
    "l2_normalize",
    "open_gallery",
    "open_store",
]

GALLERY_FORMAT = 2
_KIND = "keras-convnext-gallery"


class GalleryFileError(InputError, ValueError):
    """A gallery file that cannot be used: not an archive, damaged, mismatched, pickled."""


class Gallery:
    """Labelled embeddings in memory for 1:N search by cosine similarity.

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
    from 0; metadata is a JSON object per vector. `calibration` (an
    `embedding.metrics.Calibration` or None) is saved and loaded with the gallery.
    `Gallery.open(location)` opens a stored gallery (a file, SQLite, PostgreSQL) instead.
    """

    def __init__(self, dim: int | None = None, *, index: str = "exact", **params):
        cls = index_class(index)
        dim = check_dim(dim)
        self._params = cls.check_params(params, dim)  # fail now, not at the first add
        self.index_type = index
        self.dim = dim
        self._index = cls(dim, **self._params) if dim is not None else None
        self._ids: list[int] = []
        self._labels: list[str] = []
        self._metadata: list[dict] = []
        self._next_id = 0
        self._cache = None  # (ids array, labels array, id -> position lookup)
        self._metadata_index = None  # {(key, value): positions}, built by the first filter
        self.calibration = None
        self.added_ids = np.zeros(0, dtype=np.int64)  # the ids the last `add` gave

    @classmethod
    def open(cls, location, *, create: bool = False, dim=None, index=None, **params):
        """A stored gallery (`StoredGallery`): a file path, `sqlite:///PATH#NAME` or
        `postgresql://...#NAME` (NAME defaults to "default"); see `open_gallery`."""
        return open_gallery(location, create=create, dim=dim, index=index, **params)

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

    def counts(self) -> dict[str, int]:
        """{label: number of vectors}, labels in order of first appearance."""
        counts: dict[str, int] = {}
        for label in self._labels:
            counts[label] = counts.get(label, 0) + 1
        return counts

    def _arrays(self):
        if self._cache is None:
            ids = np.asarray(self._ids, dtype=np.int64)
            order = np.argsort(ids, kind="stable")
            # object, not a fixed-width str array: one long label must not cost N times its size
            labels = np.empty(len(self._labels), dtype=object)
            labels[:] = self._labels
            self._cache = (ids, labels, order, ids[order])
        return self._cache

    def _changed(self):
        self._cache = None
        self._metadata_index = None

    def _positions(self, ids, what="ids") -> np.ndarray:
        """Insertion positions of `ids`; an UnknownIdError lists those not in the gallery."""
        ids = as_ids(ids, what)
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

    def metadata_of(self, ids) -> list[dict]:
        """The metadata of each id (copies: changing them changes nothing here)."""
        return [json.loads(metadata_json(self._metadata[i])) for i in self._positions(ids)]

    def rows(self):
        """(ids, unit vectors, labels, metadata) of every vector in insertion order: what a
        copy into another gallery needs (`copy_gallery`)."""
        return self.ids, self.embeddings, self.labels, [dict(m) for m in self._metadata]

    # -- changing -----------------------------------------------------------

    def _ensure_index(self, dim):
        if self._index is None:
            self.dim = int(dim)
            self._index = index_class(self.index_type)(self.dim, **self._params)

    def check_add(self, embeddings, labels, metadata=None, ids=None):
        """The checked (vectors, labels, metadata, new ids) `add` would store; raises on
        anything it would refuse, changes nothing."""
        vectors = check_vectors(embeddings, self.dim)
        labels = check_labels(labels, vectors.shape[0])
        metadata = check_metadata(metadata, vectors.shape[0])
        if ids is None:
            new_ids = np.arange(self._next_id, self._next_id + len(labels), dtype=np.int64)
        else:
            new_ids = check_new_ids(ids, len(labels))
            taken = np.isin(new_ids, self._arrays()[0])
            if taken.any():
                raise ValueError(
                    f"ids already in the gallery: {new_ids[taken][:5].tolist()} "
                    "(remove them first, or relabel them)."
                )
        return vectors, labels, metadata, new_ids

    def add(self, embeddings, labels, metadata=None, *, ids=None) -> Gallery:
        """Add (N, D) or (D,) embeddings with N labels (a str for a single vector).

        `metadata`: None, or one dict (JSON) per vector. `ids`: N unique new ids
        (default: counting up from the largest id so far + 1). Returns the gallery, so
        calls chain; the new ids are `gallery.added_ids` (and `gallery.ids[-N:]`).
        All of it is checked before anything is added.
        """
        vectors, labels, metadata, new_ids = self.check_add(embeddings, labels, metadata, ids)
        self.added_ids = new_ids
        if not len(labels):
            return self
        self._ensure_index(vectors.shape[1])
        self._index.add(l2_normalize(vectors), new_ids)
        self._ids.extend(new_ids.tolist())
        self._labels.extend(labels)
        self._metadata.extend(metadata)
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        self._changed()
        return self

    def train(self, vectors) -> Gallery:
        """Learn an 'ivfpq' index's cells and codebooks from a sample (others: no-op).

        Without it, the first `add` trains on what it adds.
        """
        vectors = check_vectors(vectors, self.dim, "Training vectors")
        self._ensure_index(vectors.shape[1])
        self._index.train(l2_normalize(vectors))
        return self

    def remove(self, ids) -> Gallery:
        """Remove the vectors with these ids (an UnknownIdError if any is not here)."""
        positions = np.unique(self._positions(ids))
        if positions.size == 0:
            return self
        self._index.remove(self._arrays()[0][positions])
        keep = np.ones(len(self._ids), dtype=bool)
        keep[positions] = False
        self._ids = [i for i, k in zip(self._ids, keep, strict=True) if k]
        self._labels = [label for label, k in zip(self._labels, keep, strict=True) if k]
        self._metadata = [m for m, k in zip(self._metadata, keep, strict=True) if k]
        self._changed()
        return self

    def ids_of_label(self, label) -> np.ndarray:
        """(n,) ids of the vectors labelled `label`, in insertion order."""
        (label,) = check_labels(label, 1)
        ids, labels, _, _ = self._arrays()
        return ids[labels == label]

    def remove_label(self, label) -> int:
        """Remove every vector labelled `label`; returns how many (0 if none)."""
        ids = self.ids_of_label(label)
        self.remove(ids)
        return int(ids.size)

    def relabel(self, ids, labels) -> Gallery:
        """Give these ids new labels (one str for all of them, or one per id)."""
        positions = self._positions(ids)
        if isinstance(labels, str):
            labels = [labels] * positions.size
        labels = check_labels(labels, positions.size)
        for position, label in zip(positions.tolist(), labels, strict=True):
            self._labels[position] = label
        self._changed()
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
            raise EmptyGalleryError("The gallery is empty.")
        q = np.asarray(queries, dtype=np.float32)
        single = q.ndim == 1
        if single:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DimensionError(f"Query must be ({self.dim},) or (M, {self.dim}), got {q.shape}.")
        check_finite(q, "Queries")
        return l2_normalize(q), single

    def _filter_ids(self, conditions) -> np.ndarray:
        """Ids (sorted) of the vectors whose metadata satisfies `conditions`."""
        if self._metadata_index is None:
            index: dict = {}
            for position, entry in enumerate(self._metadata):
                for key, value in entry.items():
                    if value is None or isinstance(value, (str, int, float)):
                        index.setdefault((key, json_key(value)), []).append(position)
            self._metadata_index = index
        ids = self._arrays()[0]
        keep = None
        for key, values in conditions:
            found = [self._metadata_index.get((key, json_key(v)), ()) for v in values]
            positions = np.unique(np.concatenate([np.asarray(f, dtype=np.int64) for f in found]))
            keep = positions if keep is None else np.intersect1d(keep, positions)
        return np.sort(ids[keep])

    def search_ids(self, queries, k: int = 5, where=None):
        """Top-k (ids, scores) by cosine similarity, best first.

        queries (D,) -> ((k,) ids, (k,) scores); (M, D) -> ((M, k), (M, k)).
        k is capped at the gallery size. `where`: a metadata filter
        (`embedding.gallery.filters`): only vectors whose metadata matches are found.
        Where fewer than k vectors are found (a filter, an approximate index), the row
        is padded with id -1 and score -inf. Exact indexes break ties by insertion order.
        """
        k = check_k(k)
        conditions = check_where(where)
        q, single = self._check_queries(queries)
        k = min(k, len(self))
        subset = self._filter_ids(conditions) if conditions else None
        ids, scores = self._index.search(q, k, subset=subset)
        if ids.shape[1] < k:  # fewer vectors passed the filter than k
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return (ids[0], scores[0]) if single else (ids, scores)

    def search(self, queries, k: int = 5, where=None):
        """Top-k (labels, scores) by cosine similarity, best first.

        query (D,) -> (list of k labels, (k,) scores); query (M, D) -> ((M, k)
        str array, (M, k) scores). Like `search_ids`; a missing result (id -1)
        has the label "".
        """
        ids, scores = self.search_ids(queries, k, where)
        all_ids, labels, order, sorted_ids = self._arrays()
        found = ids >= 0
        where_ids = np.searchsorted(sorted_ids, np.where(found, ids, 0))
        top = np.where(found, labels[order[np.minimum(where_ids, sorted_ids.size - 1)]], "")
        top = top.astype(str)
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
        if any(self._metadata):
            text = "[" + ",".join(metadata_json(m) for m in self._metadata) + "]"
            members["metadata"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **members)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path) -> Gallery:
        """Read a gallery file (this format or the plain `embeddings` + `labels` one).

        Raises `GalleryFileError` (a ValueError) for anything wrong with the file,
        FileNotFoundError if there is none, ImportError for a FAISS index without faiss.
        """
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
        gallery._labels = check_labels(labels.tolist(), count)
        gallery._metadata = _read_metadata(arrays.get("metadata"), count)
        gallery._next_id = meta["next_id"]
        return gallery


def _read_metadata(member, count: int) -> list[dict]:
    """The `metadata` member of a file: N JSON objects, checked as `add` checks them."""
    if member is None:
        return [{} for _ in range(count)]
    if member.dtype != np.uint8 or member.ndim != 1:
        raise ValueError(f"metadata must be 1-D uint8 bytes, got {member.dtype} {member.shape}")
    try:
        entries = json.loads(member.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"'metadata' is not UTF-8 JSON: {error}") from None
    if not isinstance(entries, list) or len(entries) != count:
        raise ValueError(f"'metadata' must be a JSON list of {count} objects")
    return check_metadata(entries, count)


# The stores build on `Gallery` (a file store keeps one in memory), so they are imported after
# it is defined; `embedding.gallery` is their public face.
from embedding.gallery.store_base import (  # noqa: E402
    GalleryConflictError,
    GalleryNotFoundError,
    GalleryStore,
    StoredGallery,
    StoreError,
)
from embedding.gallery.stores import copy_gallery, open_gallery, open_store  # noqa: E402
