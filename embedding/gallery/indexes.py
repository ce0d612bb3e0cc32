"""The vector indexes behind `Gallery`: exact (numpy) and FAISS (flat, HNSW, IVF-PQ).

Every index stores unit vectors under int64 ids and answers the same calls:

    index.add(vectors (n, D) float32, ids (n,) int64)
    index.remove(ids)                                 # ids the index holds
    ids, scores = index.search(queries (m, D), k)     # (m, k) int64, (m, k) float32
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

import math
import warnings

import numpy as np

# Bytes of gallery rows the exact index multiplies at once, and queries per block:
# bounds the temporary (scores, and the float32 copy of a float16 chunk) to ~32 MiB.
_CHUNK_BYTES = 32 * 2**20
_QUERY_BLOCK = 256
_GROUP = 32  # columns per group in the top-k prefilter


def faiss_module():
    """`import faiss`, or an ImportError that says how to install it."""
    try:  # the `faiss` extra, optional: index="exact" needs nothing else
        import faiss
    except ImportError as error:
        raise ImportError(
            "This gallery index needs the FAISS library: pip install 'keras-convnext[faiss]' "
            "(or pip install faiss-cpu). index='exact' needs nothing extra."
        ) from error
    return faiss


def _positive_int(name, value, *, allow_none=False, low=1, high=None):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}.")
    return value


class VectorIndex:
    """Common parameter handling; subclasses implement the storage and the search."""

    name = ""
    defaults: dict = {}
    search_time = ()  # parameters that may change after vectors were added

    def __init__(self, dim: int, **params):
        self.dim = int(dim)
        self.params = self.check_params(params, dim)

    @classmethod
    def check_params(cls, params: dict, dim: int | None = None) -> dict:
        """Defaults filled in and every value validated; unknown names are a TypeError."""
        unknown = sorted(set(params) - set(cls.defaults))
        if unknown:
            valid = ", ".join(cls.defaults) or "none"
            raise TypeError(
                f"index {cls.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"its parameters: {valid}."
            )
        merged = {**cls.defaults, **params}
        return {key: cls._check_param(key, value, dim) for key, value in merged.items()}

    @classmethod
    def _check_param(cls, key, value, dim):
        return _positive_int(key, value)

    def set_search_params(self, **params):
        fixed = sorted(set(params) - set(self.search_time))
        if fixed:
            allowed = ", ".join(self.search_time) or "none"
            raise TypeError(
                f"index {self.name!r}: {', '.join(fixed)} cannot change after building "
                f"(search-time parameters: {allowed})."
            )
        self.params.update(self.check_params({**self.params, **params}, self.dim))

    @property
    def needs_training(self) -> bool:
        return False

    def train(self, vectors):
        """Nothing to learn (IVF-PQ overrides this)."""


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

    def search(self, queries, k):
        k = min(k, self._size)
        rows = max(1, _CHUNK_BYTES // (4 * self.dim))
        out_ids = np.empty((len(queries), k), dtype=np.int64)
        out_scores = np.empty((len(queries), k), dtype=np.float32)
        for q0 in range(0, len(queries), _QUERY_BLOCK):
            block = queries[q0 : q0 + _QUERY_BLOCK]
            found_positions, found_scores = [], []
            for g0 in range(0, self._size, rows):
                chunk = self._matrix[g0 : min(g0 + rows, self._size)]
                scores = block @ chunk.astype(np.float32, copy=False).T  # (q, rows)
                columns, best = _chunk_top_k(scores, k)
                found_positions.append(columns + g0)
                found_scores.append(best)
            positions = np.concatenate(found_positions, axis=1)
            scores = np.concatenate(found_scores, axis=1)
            order = np.lexsort((positions, -scores), axis=1)[:, :k]  # score, then position
            out_ids[q0 : q0 + len(block)] = self._ids[np.take_along_axis(positions, order, 1)]
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


# ----------------------------------------------------------------------------
# FAISS
# ----------------------------------------------------------------------------


class FaissIndex(VectorIndex):
    """Shared FAISS plumbing: ids through `add_with_ids`, `serialize_index` for files."""

    def __init__(self, dim: int, **params):
        super().__init__(dim, **params)
        self.faiss = faiss_module()
        self._index = self._build()

    def _build(self):
        raise NotImplementedError

    def _search_parameters(self):
        return None

    def __len__(self):
        return int(self._index.ntotal)

    def add(self, vectors, ids):
        self._index.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(ids))

    def remove(self, ids):
        selector = self.faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        self._index.remove_ids(selector)

    def search(self, queries, k):
        params = self._search_parameters()
        kwargs = {"params": params} if params is not None else {}
        scores, ids = self._index.search(np.ascontiguousarray(queries), k, **kwargs)
        scores = scores.astype(np.float32, copy=False)
        scores[ids < 0] = -np.inf
        return ids.astype(np.int64, copy=False), scores

    def to_arrays(self) -> dict:
        return {"faiss_index": self.faiss.serialize_index(self._index)}

    # -- loading ------------------------------------------------------------

    @classmethod
    def from_arrays(cls, dim, params, arrays, ids):
        data = arrays.get("faiss_index")
        if data is None and len(ids) == 0:
            return cls(dim, **params)  # an empty gallery saved before its first add
        if data is None:
            raise ValueError("missing array 'faiss_index'")
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError(f"faiss_index must be 1-D uint8 bytes, got {data.dtype} {data.shape}")
        index = cls.__new__(cls)
        VectorIndex.__init__(index, dim, **params)
        index.faiss = faiss_module()
        try:
            raw = index.faiss.deserialize_index(np.ascontiguousarray(data))
        except (RuntimeError, MemoryError) as error:
            raise ValueError(
                f"FAISS cannot read the index: {str(error).splitlines()[-1]}"
            ) from None
        index._index = index.faiss.downcast_index(raw)
        if index._index is not raw:  # the typed proxy must own the C++ object, not `raw`
            raw.this.disown()
            index._index.this.own(True)
        index._restore(arrays)
        index._check_loaded(ids)
        return index

    def _restore(self, arrays):
        """Read extra arrays (HNSW's removed ids)."""

    def _core(self):
        """The index inside the id map (flat, HNSW) or the index itself (IVF)."""
        return self.faiss.downcast_index(self._index.index)

    def _expected_core(self):
        raise NotImplementedError

    def _stored_ids(self) -> np.ndarray:
        return self.faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def _check_loaded(self, ids):
        faiss = self.faiss
        wrapper = getattr(self, "_wrapper_type", None)
        if wrapper is not None and not isinstance(self._index, wrapper):
            raise ValueError(
                f"the FAISS index is a {type(self._index).__name__}, expected "
                f"{wrapper.__name__} for index {self.name!r}"
            )
        core = self._core()
        expected = self._expected_core()
        if type(core) is not expected:
            raise ValueError(
                f"the FAISS index holds a {type(core).__name__}, expected {expected.__name__} "
                f"for index {self.name!r}"
            )
        if core.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("the FAISS index does not use inner-product similarity")
        if core.d != self.dim:
            raise ValueError(f"the FAISS index holds {core.d}-dim vectors, expected {self.dim}")
        self._check_core(core)
        stored = np.sort(self._stored_ids())
        expected_ids = np.sort(np.concatenate([ids, self._hidden_ids()]))
        if stored.shape != expected_ids.shape or not np.array_equal(stored, expected_ids):
            raise ValueError(
                f"the FAISS index holds {stored.size} vectors whose ids differ from the "
                f"{expected_ids.size} ids of the labels (index and labels do not belong together)"
            )

    def _check_core(self, core):
        """Index-specific parameter checks against `self.params`."""

    def _hidden_ids(self) -> np.ndarray:
        """Ids still in the FAISS structure but removed from the gallery."""
        return np.zeros(0, dtype=np.int64)


class FlatIndex(FaissIndex):
    """FAISS `IndexFlatIP` (exact inner product, FAISS's own kernels) in an `IndexIDMap2`."""

    name = "flat"
    defaults = {}

    def _build(self):
        return self.faiss.IndexIDMap2(self.faiss.IndexFlatIP(self.dim))

    @property
    def _wrapper_type(self):
        return self.faiss.IndexIDMap2

    def _expected_core(self):
        return self.faiss.IndexFlatIP

    @property
    def embeddings(self) -> np.ndarray:
        return self._core().reconstruct_n(0, self._index.ntotal)


class HNSWIndex(FaissIndex):
    """FAISS `IndexHNSWFlat` (graph search over full vectors) in an `IndexIDMap2`.

    An HNSW graph cannot delete nodes, so `remove` marks ids as removed (searches
    skip them through an `IDSelector`); when a quarter of the graph is removed, or
    a removed id is added again, the graph is rebuilt from the stored vectors.
    """

    name = "hnsw"
    defaults = {"m": 32, "ef_construction": 80, "ef_search": 128}
    search_time = ("ef_search",)
    REBUILD_FRACTION = 0.25

    def __init__(self, dim: int, **params):
        self._removed = np.zeros(0, dtype=np.int64)
        super().__init__(dim, **params)

    @classmethod
    def _check_param(cls, key, value, dim):
        return _positive_int(key, value, low=2 if key == "m" else 1)

    def _build(self):
        core = self.faiss.IndexHNSWFlat(self.dim, self.params["m"], self.faiss.METRIC_INNER_PRODUCT)
        core.hnsw.efConstruction = self.params["ef_construction"]
        return self.faiss.IndexIDMap2(core)

    @property
    def _wrapper_type(self):
        return self.faiss.IndexIDMap2

    def _expected_core(self):
        return self.faiss.IndexHNSWFlat

    def _check_core(self, core):
        neighbours = core.hnsw.nb_neighbors(1)
        if neighbours != self.params["m"]:
            raise ValueError(f"the HNSW graph has m={neighbours}, the file says {self.params['m']}")

    def __len__(self):
        return int(self._index.ntotal) - self._removed.size

    def _hidden_ids(self):
        return self._removed

    def _search_parameters(self):
        params = self.faiss.SearchParametersHNSW()
        params.efSearch = self.params["ef_search"]
        if self._removed.size:
            # kept alive on the object: FAISS holds only a pointer to the selector
            self._selector_batch = self.faiss.IDSelectorBatch(self._removed)
            self._selector = self.faiss.IDSelectorNot(self._selector_batch)
            params.sel = self._selector
        return params

    def add(self, vectors, ids):
        if self._removed.size and np.isin(ids, self._removed).any():
            self._rebuild()
        super().add(vectors, ids)

    def remove(self, ids):
        self._removed = np.union1d(self._removed, np.asarray(ids, dtype=np.int64))
        if self._removed.size > self.REBUILD_FRACTION * self._index.ntotal:
            self._rebuild()

    def _live(self):
        vectors = self._core().storage.reconstruct_n(0, self._index.ntotal)
        ids = self._stored_ids()
        keep = ~np.isin(ids, self._removed)
        return vectors[keep], ids[keep]

    def _rebuild(self):
        vectors, ids = self._live()
        self._index = self._build()
        self._removed = np.zeros(0, dtype=np.int64)
        if len(ids):
            super().add(vectors, ids)

    @property
    def embeddings(self) -> np.ndarray:
        return self._live()[0]

    def to_arrays(self) -> dict:
        return {**super().to_arrays(), "removed": self._removed}

    def _restore(self, arrays):
        removed = arrays.get("removed", np.zeros(0, dtype=np.int64))
        if removed.dtype != np.int64 or removed.ndim != 1:
            raise ValueError(f"removed must be 1-D int64, got {removed.dtype} {removed.shape}")
        self._removed = np.unique(removed)


class IVFPQIndex(FaissIndex):
    """FAISS `IndexIVFPQ`: `nlist` k-means cells, each vector stored as `subquantizers`
    codes of `nbits` bits (40 bytes for D=320 by default); a search visits `nprobe`
    cells. It must learn its cells and codebooks first: `train(sample)`, or the first
    `add` trains on (a seeded sample of `train_size` of) what it adds.
    """

    name = "ivfpq"
    defaults = {
        "nlist": None,
        "subquantizers": None,
        "nbits": 8,
        "nprobe": 32,
        "train_size": None,
    }
    search_time = ("nprobe",)
    TRAIN_SEED = 1234

    @staticmethod
    def default_subquantizers(dim: int) -> int:
        """The divisor of `dim` closest to dim / 8 (8 dimensions per code)."""
        divisors = [m for m in range(1, dim + 1) if dim % m == 0]
        return min(divisors, key=lambda m: (abs(m - dim / 8), m))

    @classmethod
    def _check_param(cls, key, value, dim):
        if key == "nbits":
            return _positive_int(key, value, high=16)
        value = _positive_int(key, value, allow_none=key != "nprobe")
        if key == "subquantizers" and value is None and dim is not None:
            return cls.default_subquantizers(dim)
        if key == "subquantizers" and value is not None and dim is not None and dim % value:
            raise ValueError(
                f"subquantizers must divide the dimension {dim}; got {value} "
                f"(e.g. {cls.default_subquantizers(dim)})."
            )
        return value

    def _build(self):
        if self.params["nlist"] is None:
            return None  # built at training time, once the gallery size is known
        faiss = self.faiss
        index = faiss.IndexIVFPQ(
            faiss.IndexFlatIP(self.dim),
            self.dim,
            self.params["nlist"],
            self.params["subquantizers"],
            self.params["nbits"],
            faiss.METRIC_INNER_PRODUCT,
        )
        index.nprobe = self.params["nprobe"]
        return index

    def __len__(self):
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def needs_training(self) -> bool:
        return self._index is None or not self._index.is_trained

    def min_training_size(self, nlist: int | None = None) -> int:
        return max(nlist or self.params["nlist"] or 1, 2 ** self.params["nbits"])

    def train(self, vectors):
        n = len(vectors)
        if self.params["nlist"] is None:
            self.params["nlist"] = max(1, min(round(math.sqrt(n)), n // 39 or 1))
        needed = self.min_training_size()
        if n < needed:
            raise ValueError(
                f"index 'ivfpq' needs at least {needed} vectors to train "
                f"(nlist={self.params['nlist']}, 2**nbits={2 ** self.params['nbits']} codes), "
                f"got {n}. Add more vectors in the first call, call train() with a larger "
                "sample, or use index='exact' / 'flat' / 'hnsw' for a small gallery."
            )
        size = self.params["train_size"] or 64 * self.params["nlist"]
        if n > size:
            rows = np.random.default_rng(self.TRAIN_SEED).choice(n, size, replace=False)
            vectors = vectors[np.sort(rows)]
        self._index = self._build()
        # FAISS prints one warning per k-means (one per subquantizer) below 39 points per
        # centroid; one Python warning says it instead
        recommended = 39 * max(self.params["nlist"], 2 ** self.params["nbits"])
        if len(vectors) < recommended:
            warnings.warn(
                f"Training 'ivfpq' on {len(vectors)} vectors; FAISS recommends at least "
                f"{recommended} (39 per centroid). Recall may suffer.",
                stacklevel=3,
            )
        self._index.cp.min_points_per_centroid = 1
        self._index.pq.cp.min_points_per_centroid = 1
        self._index.train(np.ascontiguousarray(vectors))

    def add(self, vectors, ids):
        if self.needs_training:
            self.train(vectors)
        super().add(vectors, ids)

    def set_search_params(self, **params):
        super().set_search_params(**params)
        if self._index is not None:
            self._index.nprobe = self.params["nprobe"]

    def search(self, queries, k):
        self._index.nprobe = self.params["nprobe"]
        return super().search(queries, k)

    def to_arrays(self) -> dict:
        if self._index is None:
            return {}  # empty and untrained: nothing to save
        return super().to_arrays()

    @property
    def embeddings(self) -> np.ndarray:
        raise NotImplementedError(
            "index 'ivfpq' keeps compressed codes, not the vectors; use index='exact', "
            "'flat' or 'hnsw' to read them back."
        )

    def _core(self):
        return self._index

    def _expected_core(self):
        return self.faiss.IndexIVFPQ

    def _check_core(self, core):
        found = {"nlist": core.nlist, "subquantizers": core.pq.M, "nbits": core.pq.nbits}
        for key, value in found.items():
            if value != self.params[key]:
                raise ValueError(
                    f"the IVF-PQ index has {key}={value}, the file says {self.params[key]}"
                )
        if not core.is_trained:
            raise ValueError("the IVF-PQ index is not trained")
        core.nprobe = self.params["nprobe"]

    def _stored_ids(self):
        lists = self._index.invlists
        parts = [
            self.faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
            for i in range(lists.nlist)
            if lists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


INDEXES = {cls.name: cls for cls in (ExactIndex, FlatIndex, HNSWIndex, IVFPQIndex)}
INDEX_TYPES = tuple(INDEXES)


def index_class(name) -> type[VectorIndex]:
    """The class for an index name; a ValueError lists the valid names."""
    if name not in INDEXES:
        raise ValueError(f"index must be one of {', '.join(INDEX_TYPES)}; got {name!r}.")
    return INDEXES[name]
