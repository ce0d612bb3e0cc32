"""L2 normalisation and cosine similarity (numpy only), shared by the gallery and the embedder."""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def check_finite(x: np.ndarray, what: str) -> np.ndarray:
    """`x` unchanged, or a ValueError naming `what` and the first non-finite row."""
    bad = ~np.isfinite(x)
    if bad.any():
        first = np.unravel_index(int(np.flatnonzero(bad)[0]), x.shape)
        where = f" (first at index {first[0]})" if x.ndim > 1 else ""
        raise ValueError(
            f"{what} contain NaN or infinity{where}: {int(bad.sum())} non-finite value(s). "
            "An embedding with NaN cannot be compared; check the model and its input."
        )
    return x


def l2_normalize(x, axis: int = -1) -> np.ndarray:
    """x / max(||x||, 1e-12) along `axis`, float32 (a zero vector stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, _EPS)


def cosine_similarity(a, b):
    """Cosine similarity of vectors or rows of matrices.

    (D,), (D,) -> float; (N, D), (D,) -> (N,); (D,), (M, D) -> (M,);
    (N, D), (M, D) -> (N, M). A zero vector has similarity 0 with everything.
    NaN or infinite inputs are refused (ValueError): they have no similarity.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.ndim not in (1, 2) or b.ndim not in (1, 2):
        raise ValueError(f"Expected vectors or matrices, got shapes {a.shape} and {b.shape}.")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"Dimension mismatch: {a.shape} vs {b.shape}.")
    check_finite(a, "The first vectors")
    check_finite(b, "The second vectors")
    out = l2_normalize(a) @ l2_normalize(b).T
    return float(out) if out.ndim == 0 else out
