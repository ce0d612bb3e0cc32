"""Cosine similarity and 1:N search over a labelled gallery of embeddings (numpy only)."""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

GALLERY_FORMAT = 1
_EPS = 1e-12


def l2_normalize(x, axis: int = -1) -> np.ndarray:
    """x / max(||x||, 1e-12) along `axis`, float32 (a zero vector stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, _EPS)


def cosine_similarity(a, b):
    """Cosine similarity of vectors or rows of matrices.

    (D,), (D,) -> float; (N, D), (D,) -> (N,); (D,), (M, D) -> (M,);
    (N, D), (M, D) -> (N, M). A zero vector has similarity 0 with everything.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.ndim not in (1, 2) or b.ndim not in (1, 2):
        raise ValueError(f"Expected vectors or matrices, got shapes {a.shape} and {b.shape}.")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"Dimension mismatch: {a.shape} vs {b.shape}.")
    out = l2_normalize(a) @ l2_normalize(b).T
    return float(out) if out.ndim == 0 else out


def _atomic_savez(path, **arrays):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


class Gallery:
    """Labelled embeddings for 1:N search by cosine similarity.

        g = Gallery()
        g.add(vectors, ["alice", "bob", ...])
        labels, scores = g.search(query, k=5)   # best first
        g.save("gallery.npz"); g = Gallery.load("gallery.npz")

    Vectors are L2-normalised when added. Labels are strings; one label may
    have several vectors. Files are plain `.npz` (float32 `embeddings` (N, D),
    unicode `labels` (N,), `format`), written atomically and read without
    pickle.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self._vectors = np.zeros((0, dim or 0), dtype=np.float32)
        self._labels = np.zeros((0,), dtype=str)

    def __len__(self):
        return self._vectors.shape[0]

    def __repr__(self):
        return f"Gallery({len(self)} vectors, dim={self.dim}, {len(set(self.labels))} labels)"

    @property
    def embeddings(self) -> np.ndarray:
        return self._vectors

    @property
    def labels(self) -> list[str]:
        return self._labels.tolist()

    def add(self, embeddings, labels) -> Gallery:
        """Add (N, D) or (D,) embeddings with N labels (a str for a single vector)."""
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if isinstance(labels, str):
            labels = [labels]
        labels = [str(label) for label in labels]
        if vectors.ndim != 2:
            raise ValueError(f"Embeddings must be (N, D) or (D,), got shape {vectors.shape}.")
        if len(labels) != vectors.shape[0]:
            raise ValueError(f"{vectors.shape[0]} embeddings but {len(labels)} labels.")
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise ValueError(f"Gallery holds {self.dim}-dim vectors, got {vectors.shape[1]}.")
        if not np.all(np.isfinite(vectors)):
            raise ValueError("Embeddings contain NaN or infinity.")
        self.dim = int(vectors.shape[1])
        if self._vectors.shape[1] != self.dim:
            self._vectors = self._vectors.reshape(0, self.dim)
        self._vectors = np.concatenate([self._vectors, l2_normalize(vectors)], axis=0)
        self._labels = np.concatenate([self._labels, np.asarray(labels, dtype=str)])
        return self

    def search(self, query, k: int = 5):
        """Top-k (labels, scores) by cosine similarity, best first.

        query (D,) -> (list of k labels, (k,) scores); query (M, D) -> ((M, k)
        str array, (M, k) scores). k is capped at the gallery size; equal
        scores keep insertion order.
        """
        if len(self) == 0:
            raise ValueError("The gallery is empty.")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        q = np.asarray(query, dtype=np.float32)
        single = q.ndim == 1
        if single:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"Query must be ({self.dim},) or (M, {self.dim}), got {q.shape}.")
        scores = l2_normalize(q) @ self._vectors.T  # (M, N)
        k = min(k, len(self))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_labels = self._labels[order]
        if single:
            return top_labels[0].tolist(), top_scores[0]
        return top_labels, top_scores

    def save(self, path) -> None:
        """Write an `.npz` atomically (temp file in the same folder, then rename)."""
        _atomic_savez(
            path,
            embeddings=self._vectors,
            labels=self._labels.astype(str),
            format=np.asarray(GALLERY_FORMAT),
        )

    @classmethod
    def load(cls, path) -> Gallery:
        """Read a gallery written by `save`; shapes and dtypes are checked, pickle never used."""
        try:
            with np.load(os.fspath(path), allow_pickle=False) as data:
                missing = {"embeddings", "labels"} - set(data.files)
                if missing:
                    raise ValueError(f"missing arrays {sorted(missing)}")
                vectors, labels = data["embeddings"], data["labels"]
        except ValueError as error:
            raise ValueError(f"{path}: not a valid gallery file ({error}).") from error
        if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
            raise ValueError(
                f"{path}: embeddings must be a 2-D float array, "
                f"got {vectors.dtype} {vectors.shape}."
            )
        if labels.ndim != 1 or labels.dtype.kind != "U":
            raise ValueError(
                f"{path}: labels must be a 1-D string array, got {labels.dtype} {labels.shape}."
            )
        if labels.shape[0] != vectors.shape[0]:
            raise ValueError(f"{path}: {vectors.shape[0]} embeddings but {labels.shape[0]} labels.")
        gallery = cls(dim=int(vectors.shape[1]))
        if vectors.shape[0]:
            gallery.add(vectors, labels.tolist())
        return gallery
