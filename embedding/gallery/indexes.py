"""The vector indexes behind `Gallery`: exact (numpy) and FAISS (flat, HNSW, IVF-PQ).

Every index stores unit vectors under int64 ids and answers the same calls:

    index.add(vectors (n, D) float32, ids (n,) int64)
    index.remove(ids)                                 # ids the index holds
    ids, scores = index.search(queries (m, D), k)     # (m, k) int64, (m, k) float32
    ids, scores = index.search(queries, k, subset=ids) # only among these ids (a filter)
    index.to_arrays() / IndexClass.from_arrays(dim, params, arrays, ids)

`search` returns inner products (= cosine similarity for unit vectors), best first;
where an approximate index finds fewer than k vectors the row is padded with id -1
and score -inf. The `Gallery` validates user input (shapes, NaN, ids, labels)
before it reaches an index; the indexes validate what they read from a file.

Index names and their parameters (defaults in brackets):

* `exact` (numpy; exact): `dtype` ["float32"] or "float16"; 4 D (2 D) bytes per vector.
* `flat` (FAISS `IndexFlatIP`; exact): no parameters; 4 D bytes per vector.
* `hnsw` (FAISS `IndexHNSWFlat`; approximate): `m` [32] graph neighbours,
  `ef_construction` [80], `ef_search` [128]; 4 D + ~8 m bytes per vector.
* `ivfpq` (FAISS `IndexIVFPQ`; approximate): `nlist` [round(sqrt(n)) at training]
  cells, `subquantizers` [the divisor of D nearest D / 8] codes of `nbits` [8]
  bits, `nprobe` [32] cells searched, `train_size` [64 nlist] training sample;
  `subquantizers` bytes per vector.
"""

from __future__ import annotations

import numpy as np

from embedding.gallery.faiss_indexes import (  # noqa: F401  (re-exported: indexes.HNSWIndex)
    FaissIndex,
    FlatIndex,
    HNSWIndex,
    IVFPQIndex,
    faiss_module,
)
from embedding.gallery.index_base import VectorIndex, positive_param  # noqa: F401

# Bytes of gallery rows the exact index multiplies at once, and queries per block:
# bounds the temporary (scores, and the float32 copy of a float16 chunk) to ~32 MiB.
_CHUNK_BYTES = 32 * 2**20
_QUERY_BLOCK = 256
_GROUP = 32  # columns per group in the top-k prefilter


# ----------------------------------------------------------------------------
# Exact search in numpy
# ----------------------------------------------------------------------------


def _chunk_top_k(scores: np.ndarray, k: int):
    """Per row of `scores` (q, n): the columns of the k best, ties to the lower column.

    Returns (columns (q, k'), their scores), k' = min(k, n), best first. The k-th
    largest of the maxima of groups of 32 columns bounds the k-th largest score from
    below, so one comparison pass leaves few candidates to sort; ties at the bound
    all stay candidates, and the sort by (score, column) makes the choice exact.
    """
    rows_count, n = scores.shape
    if k >= n:
        columns = np.argsort(-scores, axis=1, kind="stable")
        return columns, np.take_along_axis(scores, columns, axis=1)
    groups = n // _GROUP
    if groups >= k:
        maxima = scores[:, : groups * _GROUP].reshape(rows_count, groups, _GROUP).max(axis=2)
        bound = np.partition(maxima, groups - k, axis=1)[:, groups - k]
    else:  # too few columns to group: the k-th largest itself
        bound = np.partition(scores, n - k, axis=1)[:, n - k]
    rows, columns = np.nonzero(scores >= bound[:, None])
    values = scores[rows, columns]
    order = np.lexsort((columns, -values, rows))  # by row, best score, lowest column
    rows, columns, values = rows[order], columns[order], values[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, rows)  # place within its row
    keep = rank < k  # every row has at least k candidates
    return columns[keep].reshape(rows_count, k), values[keep].reshape(rows_count, k)


class ExactIndex(VectorIndex):
    """Brute force: a (N, D) float32 or float16 matrix, searched by chunked matrix products.

    Queries are taken in blocks of 256 and the gallery in chunks of ~32 MiB, so
    memory beyond the matrix stays bounded (a float16 chunk is widened to float32
    one chunk at a time, never the whole matrix). Equal scores keep insertion order.
    """

    name = "exact"
    defaults = {"dtype": "float32"}
    DTYPES = ("float32", "float16")

    def __init__(self, dim: int, **params):
        super().__init__(dim, **params)
        self._matrix = np.zeros((0, self.dim), dtype=self.params["dtype"])
        self._ids = np.zeros(0, dtype=np.int64)
        self._size = 0

    @classmethod
    def _check_param(cls, key, value, dim):
        if value not in cls.DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(cls.DTYPES)}; got {value!r}.")
        return str(value)

    def __len__(self):
        return self._size

    @property
    def embeddings(self) -> np.ndarray:
        """(N, D) stored vectors in insertion order (a read-only view, no copy)."""
        view = self._matrix[: self._size]
        view.flags.writeable = False
        return view

    def _reserve(self, extra: int):
        needed = self._size + extra
        if needed <= self._matrix.shape[0]:
            return
        capacity = max(needed, 2 * self._matrix.shape[0])  # amortised growth
        matrix = np.empty((capacity, self.dim), dtype=self._matrix.dtype)
        matrix[: self._size] = self._matrix[: self._size]
        ids = np.empty(capacity, dtype=np.int64)
        ids[: self._size] = self._ids[: self._size]
        self._matrix, self._ids = matrix, ids

    def add(self, vectors, ids):
        self._reserve(len(ids))
        self._matrix[self._size : self._size + len(ids)] = vectors
        self._ids[self._size : self._size + len(ids)] = ids
        self._size += len(ids)

    def remove(self, ids):
        keep = ~np.isin(self._ids[: self._size], ids)
        count = int(keep.sum())
        self._matrix[:count] = self._matrix[: self._size][keep]
        self._ids[:count] = self._ids[: self._size][keep]
        self._size = count

    def search(self, queries, k, subset=None):
        if subset is None:
            return self._search_rows(queries, k, self._matrix[: self._size], self._ids)
        rows = np.flatnonzero(np.isin(self._ids[: self._size], subset))  # insertion order kept
        return self._search_rows(queries, k, self._matrix[rows], self._ids[rows])

    @staticmethod
    def _search_rows(queries, k, matrix, row_ids):
        """Top k of `matrix` (n, D) for every query, as (row_ids, scores), ties to lower rows."""
        size = matrix.shape[0]
        k = min(k, size)
        rows = max(1, _CHUNK_BYTES // (4 * matrix.shape[1]))
        out_ids = np.empty((len(queries), k), dtype=np.int64)
        out_scores = np.empty((len(queries), k), dtype=np.float32)
        if k == 0:
            return out_ids, out_scores
        for q0 in range(0, len(queries), _QUERY_BLOCK):
            block = queries[q0 : q0 + _QUERY_BLOCK]
            found_positions, found_scores = [], []
            for g0 in range(0, size, rows):
                chunk = matrix[g0 : min(g0 + rows, size)]
                scores = block @ chunk.astype(np.float32, copy=False).T  # (q, rows)
                columns, best = _chunk_top_k(scores, k)
                found_positions.append(columns + g0)
                found_scores.append(best)
            positions = np.concatenate(found_positions, axis=1)
            scores = np.concatenate(found_scores, axis=1)
            order = np.lexsort((positions, -scores), axis=1)[:, :k]  # score, then position
            out_ids[q0 : q0 + len(block)] = row_ids[np.take_along_axis(positions, order, 1)]
            out_scores[q0 : q0 + len(block)] = np.take_along_axis(scores, order, 1)
        return out_ids, out_scores

    def to_arrays(self) -> dict:
        return {"embeddings": self._matrix[: self._size]}

    @classmethod
    def from_arrays(cls, dim, params, arrays, ids):
        vectors = arrays.get("embeddings")
        if vectors is None:
            raise ValueError("missing array 'embeddings'")
        if vectors.ndim != 2 or vectors.shape != (len(ids), dim):
            raise ValueError(
                f"embeddings must have shape ({len(ids)}, {dim}) (ids x dim), got {vectors.shape}"
            )
        if vectors.dtype != np.dtype(params["dtype"]):
            raise ValueError(
                f"embeddings are {vectors.dtype} but the index says dtype {params['dtype']}"
            )
        if not np.all(np.isfinite(vectors)):
            raise ValueError("embeddings contain NaN or infinity")
        index = cls(dim, **params)
        index.add(vectors, ids)
        return index


INDEXES = {cls.name: cls for cls in (ExactIndex, FlatIndex, HNSWIndex, IVFPQIndex)}
INDEX_TYPES = tuple(INDEXES)


def index_class(name) -> type[VectorIndex]:
    """The class for an index name; a ValueError lists the valid names."""
    if name not in INDEXES:
        raise ValueError(f"index must be one of {', '.join(INDEX_TYPES)}; got {name!r}.")
    return INDEXES[name]
