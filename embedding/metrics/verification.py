"""Verification (1:1) metrics of similarity scores, and the verification decision.

Conventions and definitions: see `embedding.metrics`. Numpy only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from embedding.errors import InputTypeError, NonFiniteError

# Threshold used by `verify` until `calibrate` (or an explicit threshold) sets one.
# A cosine similarity of 0.5 is a neutral middle ground for L2-normalised
# pre-logits features; it is not tuned for any task, and `VerifyResult` says so
# (`threshold_source="default"`). Calibrate on labelled pairs for real use.
DEFAULT_THRESHOLD = 0.5


def check_threshold(threshold) -> float:
    """A finite float similarity threshold, else `NonFiniteError` / `InputTypeError`."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)):
        raise InputTypeError(f"threshold must be a number, got {threshold!r}")
    if not math.isfinite(float(threshold)):
        raise NonFiniteError(f"threshold must be a finite number, got {threshold!r}")
    return float(threshold)


DEFAULT_FARS = (1e-2, 1e-3, 1e-4)


def check_scores_labels(scores, labels, *, need_both: bool = True):
    """Validated (float64 scores, bool labels); clear errors for degenerate input."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"scores and labels must be 1-D, got shapes {scores.shape} and {labels.shape}."
        )
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"scores and labels differ in length: {scores.shape[0]} scores, "
            f"{labels.shape[0]} labels."
        )
    if scores.shape[0] == 0:
        raise ValueError("No scores given.")
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise TypeError(f"scores must be real numbers, got dtype {scores.dtype}.")
    scores = scores.astype(np.float64)
    bad = ~np.isfinite(scores)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{int(bad.sum())} score(s) are NaN or infinite (first at index {first}: "
            f"{scores[first]})."
        )
    if labels.dtype != np.bool_:
        values = set(np.unique(labels).tolist())
        if not values <= {0, 1}:
            raise ValueError(
                f"labels must be 0/1 or bool (1 = same identity), got values {sorted(values)[:5]}."
            )
    labels = labels.astype(bool)
    if need_both:
        n_pos = int(labels.sum())
        if n_pos == 0 or n_pos == labels.shape[0]:
            kind = "genuine (1)" if n_pos else "impostor (0)"
            raise ValueError(
                f"Only {kind} pairs given ({labels.shape[0]}); ROC metrics need both genuine "
                "and impostor pairs."
            )
    return scores, labels


def roc_curve(scores, labels):
    """(fpr, tpr, thresholds) at every distinct score, thresholds descending from +inf."""
    scores, labels = check_scores_labels(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    thresholds = np.r_[np.inf, s[last_of_tie]]
    return fpr, tpr, thresholds


def roc_auc(scores, labels) -> float:
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.trapezoid(tpr, fpr))


def eer(scores, labels) -> tuple[float, float]:
    """(equal error rate, its threshold), interpolated where FPR crosses FNR."""
    fpr, tpr, thresholds = roc_curve(scores, labels)
    return eer_from_roc(fpr, tpr, thresholds)


def eer_from_roc(fpr, tpr, thresholds):
    diff = (1.0 - tpr) - fpr  # FNR - FPR: starts at 1, ends at -1, non-increasing
    i = int(np.flatnonzero(diff <= 0)[0])  # first point at or past the crossing
    if diff[i] == 0 or i == 0:
        return float(fpr[i]), float(thresholds[i] if np.isfinite(thresholds[i]) else thresholds[1])
    j = i - 1
    t = diff[j] / (diff[j] - diff[i])
    rate = fpr[j] + t * (fpr[i] - fpr[j])
    low, high = thresholds[i], thresholds[j]
    threshold = low if not np.isfinite(high) else high + t * (low - high)
    return float(rate), float(threshold)


def tar_at_far(scores, labels, fars=DEFAULT_FARS):
    """{far: (tar, threshold)}: the best TPR with FPR <= far, and its threshold."""
    fpr, tpr, thresholds = roc_curve(scores, labels)
    return _tar_at_far(fpr, tpr, thresholds, fars)


def check_rate(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}.")
    if not 0.0 <= value <= 1.0:  # False for NaN too
        raise ValueError(f"{name} must lie in [0, 1], got {value}.")
    return float(value)


def operating_index(fpr, tpr, target: float) -> int:
    """Index of the ROC point with the highest TPR whose FPR <= target, the lowest
    FPR among equal TPRs (fpr and tpr are non-decreasing; fpr[0] = tpr[0] = 0)."""
    last = int(np.searchsorted(fpr, target, side="right")) - 1
    return int(np.searchsorted(tpr[: last + 1], tpr[last], side="left"))


def _tar_at_far(fpr, tpr, thresholds, fars):
    out = {}
    for far in fars:
        far = check_rate("FAR targets", far)
        i = operating_index(fpr, tpr, far)
        out[far] = (float(tpr[i]), float(thresholds[i]))
    return out


def best_accuracy_threshold(scores, labels) -> tuple[float, float]:
    """(best accuracy, threshold) over midpoints between consecutive distinct scores."""
    scores, labels = check_scores_labels(scores, labels, need_both=False)
    distinct = np.unique(scores)
    candidates = np.r_[distinct[0] - 1.0, (distinct[:-1] + distinct[1:]) / 2.0, distinct[-1] + 1.0]
    # accepted positives/negatives at each candidate via sorted counts
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    tp = pos.size - np.searchsorted(pos, candidates, side="left")  # score >= thr
    tn = np.searchsorted(neg, candidates, side="left")  # score < thr
    accuracy = (tp + tn) / scores.size
    best = int(np.argmax(accuracy))  # first best = lowest threshold among ties
    return float(accuracy[best]), float(candidates[best])


@dataclass
class KFoldResult:
    mean: float
    std: float
    accuracies: list[float]
    thresholds: list[float]


def kfold_accuracy(scores, labels, folds: int = 10) -> KFoldResult:
    """LFW-style k-fold accuracy: threshold from k-1 folds, accuracy on the held-out one."""
    scores, labels = check_scores_labels(scores, labels)
    if folds < 2 or scores.size < folds:
        raise ValueError(f"Need folds >= 2 and at least one pair per fold ({scores.size} pairs).")
    blocks = np.array_split(np.arange(scores.size), folds)
    accuracies, thresholds = [], []
    for k, test in enumerate(blocks):
        train = np.concatenate([b for i, b in enumerate(blocks) if i != k])
        _, threshold = best_accuracy_threshold(scores[train], labels[train])
        accuracies.append(float(np.mean((scores[test] >= threshold) == labels[test])))
        thresholds.append(threshold)
    return KFoldResult(
        mean=float(np.mean(accuracies)),
        std=float(np.std(accuracies)),
        accuracies=accuracies,
        thresholds=thresholds,
    )


@dataclass
class VerificationMetrics:
    eer: float
    eer_threshold: float
    roc_auc: float
    tar_at_far: dict[float, float]
    threshold_at_far: dict[float, float]
    far_resolution: float  # 1 / number of impostor pairs
    best_accuracy: float
    best_threshold: float
    n_genuine: int
    n_impostor: int
    kfold: KFoldResult | None = None
    roc: tuple[np.ndarray, np.ndarray, np.ndarray] = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("roc")
        return out

    def summary(self) -> str:
        lines = [
            f"pairs: {self.n_genuine} genuine, {self.n_impostor} impostor",
            f"EER: {self.eer:.4f} (threshold {self.eer_threshold:.4f})",
            f"ROC AUC: {self.roc_auc:.4f}",
        ]
        for far, tar in self.tar_at_far.items():
            note = (
                "  (below FAR resolution: TAR at 0 false accepts)"
                if far < self.far_resolution
                else ""
            )
            lines.append(f"TAR@FAR={far:g}: {tar:.4f}{note}")
        lines.append(
            f"best accuracy: {self.best_accuracy:.4f} (threshold {self.best_threshold:.4f})"
        )
        if self.kfold is not None:
            lines.append(
                f"{len(self.kfold.accuracies)}-fold accuracy: {self.kfold.mean:.4f} "
                f"± {self.kfold.std:.4f}"
            )
        return "\n".join(lines)


def verification_metrics(scores, labels, *, fars=DEFAULT_FARS, folds: int | None = 10):
    """All metrics at once (see the module docstring); `folds=None` skips k-fold."""
    scores, labels = check_scores_labels(scores, labels)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    rate, rate_threshold = eer_from_roc(fpr, tpr, thresholds)
    at_far = _tar_at_far(fpr, tpr, thresholds, fars)
    accuracy, threshold = best_accuracy_threshold(scores, labels)
    kfold = None
    if folds is not None and scores.size >= folds:
        kfold = kfold_accuracy(scores, labels, folds)
    n_pos = int(labels.sum())
    return VerificationMetrics(
        eer=rate,
        eer_threshold=rate_threshold,
        roc_auc=float(np.trapezoid(tpr, fpr)),
        tar_at_far={k: v[0] for k, v in at_far.items()},
        threshold_at_far={k: v[1] for k, v in at_far.items()},
        far_resolution=1.0 / (labels.size - n_pos),
        best_accuracy=accuracy,
        best_threshold=threshold,
        n_genuine=n_pos,
        n_impostor=int(labels.size - n_pos),
        kfold=kfold,
        roc=(fpr, tpr, thresholds),
    )
