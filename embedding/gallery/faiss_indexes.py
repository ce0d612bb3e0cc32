"""The FAISS indexes behind a gallery: flat (exact), HNSW and IVF-PQ (the `faiss` extra).

See `embedding.gallery.indexes` for the calls every index answers and the parameters.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from embedding.gallery.index_base import VectorIndex, positive_param


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


def exact_top_k(queries, vectors, ids, k):
    """Top k of a few `vectors` (n, D) with `ids` (n,) for each query: (m, k) ids and scores,
    best first (ties to the lower row), padded with id -1 and score -inf beyond n."""
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    found = np.full((len(queries), k), -1, dtype=np.int64)
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    found[:, : order.shape[1]] = ids[order]
    best[:, : order.shape[1]] = np.take_along_axis(scores, order, axis=1)
    return found, best


class FaissIndex(VectorIndex):
    """Shared FAISS plumbing: ids through `add_with_ids`, `serialize_index` for files."""

    def __init__(self, dim: int, **params):
        super().__init__(dim, **params)
        self.faiss = faiss_module()
        self._index = self._build()

    def _build(self):
        raise NotImplementedError

    def _search_parameters(self, subset=None):
        """FAISS search parameters (None: the index's own); with `subset`, a selector
        that keeps the search among those ids."""
        if subset is None:
            return None
        params = self.faiss.SearchParameters()
        params.sel = self._keep_alive(self.faiss.IDSelectorBatch(subset))
        return params

    def _keep_alive(self, selector):
        # FAISS holds only a pointer to a selector: the Python object must outlive the search
        self._selectors = getattr(self, "_selectors", [])[-3:] + [selector]
        return selector

    def __len__(self):
        return int(self._index.ntotal)

    def add(self, vectors, ids):
        self._index.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(ids))

    def remove(self, ids):
        selector = self.faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        self._index.remove_ids(selector)

    def search(self, queries, k, subset=None):
        if subset is not None:
            subset = np.ascontiguousarray(subset, dtype=np.int64)
            if subset.size == 0:
                empty = np.full((len(queries), k), -1, dtype=np.int64)
                return empty, np.full((len(queries), k), -np.inf, dtype=np.float32)
        params = self._search_parameters(subset)
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
    EXACT_SUBSET = 4096

    def __init__(self, dim: int, **params):
        self._removed = np.zeros(0, dtype=np.int64)
        super().__init__(dim, **params)

    @classmethod
    def _check_param(cls, key, value, dim):
        return positive_param(key, value, low=2 if key == "m" else 1)

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

    def _search_parameters(self, subset=None):
        params = self.faiss.SearchParametersHNSW()
        params.efSearch = self.params["ef_search"]
        if subset is not None:  # live ids only: the removed ones are not among them
            params.sel = self._keep_alive(self.faiss.IDSelectorBatch(subset))
        elif self._removed.size:
            removed = self._keep_alive(self.faiss.IDSelectorBatch(self._removed))
            params.sel = self._keep_alive(self.faiss.IDSelectorNot(removed))
        return params

    def search(self, queries, k, subset=None):
        """A graph walk that skips most vectors finds few of them: a filter that keeps
        at most `EXACT_SUBSET` vectors is searched exactly among their stored vectors."""
        if subset is None or len(subset) > self.EXACT_SUBSET:
            return super().search(queries, k, subset)
        subset = np.asarray(subset, dtype=np.int64)
        vectors = np.zeros((len(subset), self.dim), dtype=np.float32)
        for row, vector_id in enumerate(subset.tolist()):
            vectors[row] = self._index.reconstruct(vector_id)
        return exact_top_k(queries, vectors, subset, k)

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
            return positive_param(key, value, high=16)
        value = positive_param(key, value, allow_none=key != "nprobe")
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

    def _search_parameters(self, subset=None):
        if subset is None:
            return None
        params = self.faiss.SearchParametersIVF()
        params.nprobe = self.params["nprobe"]
        params.sel = self._keep_alive(self.faiss.IDSelectorBatch(subset))
        return params

    def search(self, queries, k, subset=None):
        self._index.nprobe = self.params["nprobe"]
        return super().search(queries, k, subset)

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
