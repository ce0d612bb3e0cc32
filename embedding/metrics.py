"""Verification metrics for similarity scores (numpy only, no scikit-learn).

Convention: a pair is *accepted* (predicted "same") when `score >= threshold`;
`labels` are 1 / True for genuine (same-identity) pairs, 0 / False for impostors.

    m = verification_metrics(scores, labels)
    m.eer, m.eer_threshold, m.roc_auc, m.tar_at_far[1e-3], m.best_accuracy, m.best_threshold

* `roc_curve` equals scikit-learn's `roc_curve(labels, scores,
  drop_intermediate=False)`: one point per distinct score (tied scores move
  together), thresholds descending from +inf.
* `roc_auc` is the trapezoidal area under that curve (= `roc_auc_score`).
* EER: where the false-positive rate meets the false-negative rate (1 - TPR),
  linearly interpolated between the two ROC points where FPR - FNR changes
  sign; its threshold is interpolated the same way.
* TAR at FAR f: the highest TPR among thresholds whose FPR <= f. With fewer
  than 1/f impostor pairs, that is the TAR at zero false accepts
  (`far_resolution` says the smallest measurable FAR).
* Best accuracy: over thresholds at the midpoints between consecutive distinct
  scores (and below / above all of them).
* `kfold_accuracy`: LFW's protocol, folds are contiguous blocks in input order
  (LFW's pairs file lists its 10 folds one after another); each fold's
  threshold is the best-accuracy threshold of the other folds.
* Operating point at a target FAR f (`calibrate`, and the thresholds of
  `tar_at_far`): among the ROC points whose FPR <= f, the one with the highest
  TPR; among equal TPRs, the lowest FPR (the highest threshold: it rejects
  more impostors and no more genuine pairs). The threshold is a score value
  (accept `score >= threshold`), the one scikit-learn's `roc_curve` gives for
  that point.
* `calibrate` adds percentile bootstrap intervals: pairs are resampled with
  replacement (`n_bootstrap` times, seeded), every statistic is recomputed on
  each resample, and the interval is the (1 - confidence)/2 and
  (1 + confidence)/2 empirical quantiles (`inverted_cdf`: no interpolation).
* `identification_metrics`: 1:N search as NIST's face recognition vendor tests
  (FRVT 1:N, NISTIR 8271) report it; definitions in its docstring.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field

import numpy as np

from embedding.errors import InputError

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
    return _eer_from_roc(fpr, tpr, thresholds)


def _eer_from_roc(fpr, tpr, thresholds):
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


def _check_rate(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}.")
    if not 0.0 <= value <= 1.0:  # False for NaN too
        raise ValueError(f"{name} must lie in [0, 1], got {value}.")
    return float(value)


def _operating_index(fpr, tpr, target: float) -> int:
    """Index of the ROC point with the highest TPR whose FPR <= target, the lowest
    FPR among equal TPRs (fpr and tpr are non-decreasing; fpr[0] = tpr[0] = 0)."""
    last = int(np.searchsorted(fpr, target, side="right")) - 1
    return int(np.searchsorted(tpr[: last + 1], tpr[last], side="left"))


def _tar_at_far(fpr, tpr, thresholds, fars):
    out = {}
    for far in fars:
        far = _check_rate("FAR targets", far)
        i = _operating_index(fpr, tpr, far)
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
    rate, rate_threshold = _eer_from_roc(fpr, tpr, thresholds)
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


# ----------------------------------------------------------------------------
# Operating points: a threshold at a target false-accept rate
# ----------------------------------------------------------------------------

CALIBRATION_KIND = "keras-convnext-calibration"
CALIBRATION_FORMAT = 1
INTERVAL_NAMES = ("threshold", "tar", "frr", "eer")


class CalibrationError(InputError, ValueError):
    """A calibration record or file that cannot be used (missing fields, NaN, wrong types)."""


def _finite_number(name, value, error=CalibrationError) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise error(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise error(f"{name} must be finite, got {value}.")
    return float(value)


@dataclass
class Calibration:
    """A verification threshold chosen at a target false-accept rate, with its evidence.

    `threshold`: accept when cosine similarity >= threshold. On the calibration
    pairs it gives false-accept rate `far` (<= `target_far`) and false-reject rate
    `frr` (TAR = 1 - frr). `intervals` maps "threshold", "tar", "frr" and "eer" to
    (low, high) bootstrap intervals at `confidence` (empty when `n_bootstrap` is 0).
    `model` optionally names what produced the scores. Plain JSON via
    `to_dict`/`from_dict`, `save`/`load`; saved with a `Gallery` too.
    """

    threshold: float
    target_far: float
    far: float
    frr: float
    eer: float
    eer_threshold: float
    n_genuine: int
    n_impostor: int
    intervals: dict = field(default_factory=dict)
    confidence: float = 0.95
    n_bootstrap: int = 0
    seed: int = 0
    model: str | None = None

    def __post_init__(self):
        self.threshold = _finite_number("threshold", self.threshold)

    @property
    def tar(self) -> float:
        return 1.0 - self.frr

    @property
    def far_resolution(self) -> float:
        """The smallest non-zero FAR the calibration pairs can measure (1 / impostors)."""
        return 1.0 / self.n_impostor

    def to_dict(self) -> dict:
        out = {"kind": CALIBRATION_KIND, "format": CALIBRATION_FORMAT, **asdict(self)}
        out["intervals"] = {k: [float(v[0]), float(v[1])] for k, v in self.intervals.items()}
        return out

    @classmethod
    def from_dict(cls, record) -> Calibration:
        """Validated: every field present with the right type, rates in [0, 1], the
        threshold finite; a `CalibrationError` names what is wrong."""
        if not isinstance(record, dict) or record.get("kind") != CALIBRATION_KIND:
            raise CalibrationError(
                f"not a calibration record (expected kind {CALIBRATION_KIND!r})."
            )
        if record.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(
                f"calibration format {record.get('format')!r} is not {CALIBRATION_FORMAT}."
            )
        values = {}
        for name in ("threshold", "eer_threshold"):
            values[name] = _finite_number(name, record.get(name))
        for name in ("target_far", "far", "frr", "eer", "confidence"):
            value = _finite_number(name, record.get(name))
            if not 0.0 <= value <= 1.0:
                raise CalibrationError(f"{name} must lie in [0, 1], got {value}.")
            values[name] = value
        for name in ("n_genuine", "n_impostor", "n_bootstrap", "seed"):
            value = record.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CalibrationError(f"{name} must be a non-negative int, got {value!r}.")
            values[name] = value
        if values["n_impostor"] < 1 or values["n_genuine"] < 1:
            raise CalibrationError("a calibration needs genuine and impostor pairs (counts >= 1).")
        if values["far"] > values["target_far"]:
            raise CalibrationError(
                f"far {values['far']} exceeds target_far {values['target_far']}."
            )
        intervals = record.get("intervals", {})
        if not isinstance(intervals, dict) or set(intervals) - set(INTERVAL_NAMES):
            raise CalibrationError(f"intervals must map some of {INTERVAL_NAMES} to [low, high].")
        values["intervals"] = {}
        for name, pair in intervals.items():
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise CalibrationError(f"intervals[{name!r}] must be [low, high], got {pair!r}.")
            low, high = (float(v) if isinstance(v, (int, float)) else math.nan for v in pair)
            if math.isnan(low) or math.isnan(high) or low > high:
                raise CalibrationError(f"intervals[{name!r}] must be [low <= high], got {pair!r}.")
            values["intervals"][name] = (low, high)
        model = record.get("model")
        if model is not None and not isinstance(model, str):
            raise CalibrationError(f"model must be a string or null, got {model!r}.")
        return cls(**values, model=model)

    def save(self, path) -> str:
        """Write the record as JSON, atomically."""
        from weights_convert import atomic_write

        text = json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n"

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path) -> Calibration:
        """Read a JSON file written by `save`, or the calibration saved in a gallery
        `.npz` (`Gallery.calibration`); a `CalibrationError` if there is none."""
        path = os.fspath(path)
        if zipfile.is_zipfile(path):
            return cls._from_gallery_file(path)
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CalibrationError(f"{path}: not a calibration JSON file ({error}).") from None
        except IsADirectoryError:
            raise CalibrationError(f"{path} is a folder, not a calibration JSON file.") from None
        try:
            return cls.from_dict(record)
        except CalibrationError as error:
            raise CalibrationError(f"{path}: {error}") from None

    @classmethod
    def _from_gallery_file(cls, path) -> Calibration:
        from embedding.gallery import read_npz

        meta = read_npz(path, error=CalibrationError, names=["meta"]).get("meta")
        try:
            record = json.loads(str(meta))["calibration"] if meta is not None else None
        except (ValueError, KeyError, TypeError):
            record = None
        if record is None:
            raise CalibrationError(f"{path}: the gallery file holds no calibration.")
        try:
            return cls.from_dict(record)
        except CalibrationError as error:
            raise CalibrationError(f"{path}: {error}") from None

    def summary(self) -> str:
        def interval(name):
            if name not in self.intervals:
                return ""
            low, high = self.intervals[name]
            return f"  [{low:.4f}, {high:.4f}]"

        note = ""
        if self.target_far < self.far_resolution:
            note = (
                f"  (below the FAR resolution {self.far_resolution:.2g} of "
                f"{self.n_impostor} impostor pairs: no false accept allowed)"
            )
        level = f"{self.confidence:.0%} bootstrap intervals, {self.n_bootstrap} resamples"
        lines = [
            f"operating point at FAR <= {self.target_far:g}{note}",
            f"  threshold: {self.threshold:.4f}{interval('threshold')}",
            f"  FAR: {self.far:.6f}   FRR: {self.frr:.4f}{interval('frr')}   "
            f"TAR: {self.tar:.4f}{interval('tar')}",
            f"  EER: {self.eer:.4f}{interval('eer')} (threshold {self.eer_threshold:.4f})",
        ]
        if self.intervals:
            lines.append(f"  ({level})")
        return "\n".join(lines)


def _point_statistics(fpr, tpr, thresholds, target_far):
    """(eer, tar, threshold, far) of one ROC curve at `target_far`."""
    rate, _ = _eer_from_roc(fpr, tpr, thresholds)
    i = _operating_index(fpr, tpr, target_far)
    return rate, float(tpr[i]), float(thresholds[i]), float(fpr[i])


def bootstrap_statistics(scores, labels, target_far=1e-3, n_bootstrap=1000, seed=0):
    """(n_bootstrap, 3) array of (EER, TAR, threshold) on resampled pairs.

    Resample b draws `np.random.default_rng(seed).integers(0, n, n)` pair indices
    (the b-th draw of one generator) and equals the statistics of `scores[idx]`,
    `labels[idx]` computed from scratch; it runs in O(n) per resample because
    the scores are sorted once. A resample without genuine or impostor pairs
    gives NaN. The threshold is +inf where no genuine pair can be accepted.
    """
    scores, labels = check_scores_labels(scores, labels)
    n = scores.size
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    new_group = np.r_[False, np.diff(sorted_scores) != 0]
    group_scores = sorted_scores[np.r_[True, new_group[1:]]]  # distinct scores, descending
    group_of_pair = np.empty(n, dtype=np.int64)  # tie group of each pair
    group_of_pair[order] = np.cumsum(new_group)
    groups = group_scores.size
    rng = np.random.default_rng(seed)
    out = np.full((n_bootstrap, 3), np.nan)
    for b in range(n_bootstrap):
        draw = rng.integers(0, n, n)
        genuine = labels[draw]
        tp = np.bincount(group_of_pair[draw[genuine]], minlength=groups)
        fp = np.bincount(group_of_pair[draw[~genuine]], minlength=groups)
        present = (tp + fp) > 0  # scores not drawn are no ROC point of this resample
        tps, fps = np.cumsum(tp[present]), np.cumsum(fp[present])
        if tps[-1] == 0 or fps[-1] == 0:
            continue
        tpr = np.r_[0.0, tps / tps[-1]]
        fpr = np.r_[0.0, fps / fps[-1]]
        thresholds = np.r_[np.inf, group_scores[present]]
        out[b] = _point_statistics(fpr, tpr, thresholds, target_far)[:3]
    return out


def _interval(values, confidence):
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail], method="inverted_cdf")
    return (float(low), float(high))


def calibrate(
    scores,
    labels,
    target_far: float = 1e-3,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    model: str | None = None,
) -> Calibration:
    """The threshold whose false-accept rate on these pairs does not exceed `target_far`.

    Among the ROC points with FPR <= target_far, the highest TPR and, among equal
    TPRs, the lowest FPR (module docstring); `far` and `frr` are measured there.
    With `n_bootstrap` > 0, percentile bootstrap intervals (pairs resampled with
    replacement, seeded) at `confidence` for the threshold, TAR, FRR and EER.

    Raises ValueError when no threshold accepts a genuine pair within the target
    (the best-scoring pairs are impostors): more calibration pairs or a larger
    target are needed, a threshold above every score would reject everyone.
    """
    scores, labels = check_scores_labels(scores, labels)
    target_far = _check_rate("target_far", target_far)
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)):
        raise TypeError(f"n_bootstrap must be an int, got {n_bootstrap!r}.")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}.")
    confidence = _check_rate("confidence", confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}.")
    fpr, tpr, thresholds = roc_curve(scores, labels)
    rate, tar, threshold, far = _point_statistics(fpr, tpr, thresholds, target_far)
    if not math.isfinite(threshold):
        raise ValueError(
            f"No threshold accepts any genuine pair at FAR <= {target_far:g}: the highest "
            f"scores belong to impostor pairs ({int((~labels).sum())} impostor pairs, FAR "
            f"resolution {1.0 / (~labels).sum():.2g}). Calibrate on more pairs or choose a "
            "larger target_far."
        )
    _, eer_threshold = _eer_from_roc(fpr, tpr, thresholds)
    intervals = {}
    if n_bootstrap:
        stats = bootstrap_statistics(scores, labels, target_far, int(n_bootstrap), seed)
        intervals = {
            "threshold": _interval(stats[:, 2], confidence),
            "tar": _interval(stats[:, 1], confidence),
            "eer": _interval(stats[:, 0], confidence),
        }
        low, high = intervals["tar"]
        intervals["frr"] = (1.0 - high, 1.0 - low)
    n_pos = int(labels.sum())
    return Calibration(
        threshold=threshold,
        target_far=target_far,
        far=far,
        frr=1.0 - tar,
        eer=rate,
        eer_threshold=eer_threshold,
        n_genuine=n_pos,
        n_impostor=int(labels.size - n_pos),
        intervals=intervals,
        confidence=confidence,
        n_bootstrap=int(n_bootstrap),
        seed=int(seed),
        model=model,
    )


# ----------------------------------------------------------------------------
# Identification (1:N)
# ----------------------------------------------------------------------------


@dataclass
class IdentificationMetrics:
    """See `identification_metrics`. Rates are fractions in [0, 1]."""

    rank_rates: dict[int, float]  # closed set: rank-r identification rate
    fnir_at_fpir: dict[float, float]  # open set: FNIR at each target FPIR
    threshold_at_fpir: dict[float, float]
    fnir_rank: int
    n_mated: int
    n_nonmated: int

    def summary(self) -> str:
        lines = [f"probes: {self.n_mated} mated, {self.n_nonmated} non-mated"]
        for rank, rate in self.rank_rates.items():
            lines.append(f"rank-{rank} identification rate: {rate:.4f}")
        for fpir, fnir in self.fnir_at_fpir.items():
            lines.append(
                f"FNIR@FPIR={fpir:g} (rank {self.fnir_rank}): {fnir:.4f} "
                f"(threshold {self.threshold_at_fpir[fpir]:.4f})"
            )
        return "\n".join(lines)


def identification_metrics(
    scores, gallery_labels, probe_labels, *, ranks=(1, 5), fpirs=(1e-2, 1e-3), fnir_rank=1
) -> IdentificationMetrics:
    """Closed- and open-set identification rates of probes searched against a gallery.

    Args:
        scores: (P, G) similarity of each probe to each gallery vector (e.g.
            `cosine_similarity(probes, gallery.embeddings)`).
        gallery_labels: (G,) identity of each gallery vector (several vectors
            may share one).
        probe_labels: (P,) identity of each probe. A probe is *mated* when its
            identity is in the gallery, *non-mated* otherwise.

    Definitions (as NIST FRVT 1:N, NISTIR 8271, reports them):
      * An identity's score for a probe is the highest score among its gallery
        vectors; candidates are identities ranked by that score. The mate's rank
        is 1 + the number of other identities scoring >= the mate (ties count
        against the probe).
      * Rank-r identification rate (closed set, over mated probes): the
        fraction whose mate has rank <= r. `rank_rates[1]` is rank-1 accuracy.
      * FPIR(T) (over non-mated probes): the fraction whose best candidate
        scores >= T (a false positive identification).
      * FNIR(T) (over mated probes): the fraction whose mate is not returned at
        rank <= `fnir_rank` with score >= T.
      * FNIR at FPIR f: the threshold is chosen as in `calibrate` (mated probes
        playing the genuine pairs, non-mated the impostors): the lowest FNIR
        among thresholds (score values) with FPIR <= f, the highest such
        threshold among equal FNIRs. Needs non-mated probes; without mated
        probes the rates are NaN.
    """
    scores = np.asarray(scores, dtype=np.float64)
    gallery_labels = np.asarray(gallery_labels)
    probe_labels = np.asarray(probe_labels)
    if scores.ndim != 2 or scores.shape != (probe_labels.size, gallery_labels.size):
        raise ValueError(
            f"scores must be (probes, gallery) = ({probe_labels.size}, {gallery_labels.size}), "
            f"got {scores.shape}."
        )
    if scores.size == 0:
        raise ValueError("identification_metrics needs at least one probe and one gallery vector.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity.")
    fnir_rank = int(fnir_rank)
    if fnir_rank < 1 or any(int(r) < 1 for r in ranks):
        raise ValueError("ranks and fnir_rank must be >= 1.")
    identities, column_identity = np.unique(gallery_labels, return_inverse=True)
    # best score per identity: reduce the columns grouped by identity
    by_identity = np.argsort(column_identity, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(column_identity[by_identity])) + 1]
    identity_scores = np.maximum.reduceat(scores[:, by_identity], starts, axis=1)  # (P, I)
    mate = np.searchsorted(identities, probe_labels)
    mate = np.minimum(mate, identities.size - 1)
    mated = identities[mate] == probe_labels
    n_mated, n_nonmated = int(mated.sum()), int((~mated).sum())

    rows = np.flatnonzero(mated)
    mate_scores = identity_scores[rows, mate[rows]]
    others = identity_scores[rows].copy()
    others[np.arange(rows.size), mate[rows]] = -np.inf
    mate_rank = 1 + (others >= mate_scores[:, None]).sum(axis=1)
    rank_rates = {
        int(r): float(np.mean(mate_rank <= int(r))) if n_mated else math.nan for r in ranks
    }

    fnir, thresholds = {}, {}
    if n_nonmated:
        nonmated_top = identity_scores[~mated].max(axis=1)
        reachable = mate_scores[mate_rank <= fnir_rank]  # mates that can be accepted at all
        for fpir in fpirs:
            fpir = _check_rate("FPIR targets", fpir)
            if n_mated == 0:
                fnir[fpir], thresholds[fpir] = math.nan, math.nan
                continue
            if reachable.size == 0:
                fnir[fpir], thresholds[fpir] = 1.0, math.inf
                continue
            all_scores = np.r_[reachable, nonmated_top]
            is_mate = np.r_[np.ones(reachable.size, bool), np.zeros(nonmated_top.size, bool)]
            fpr, tpr, ts = roc_curve(all_scores, is_mate)
            i = _operating_index(fpr, tpr, fpir)
            fnir[fpir] = 1.0 - float(tpr[i]) * reachable.size / n_mated
            thresholds[fpir] = float(ts[i])
    return IdentificationMetrics(
        rank_rates=rank_rates,
        fnir_at_fpir=fnir,
        threshold_at_fpir=thresholds,
        fnir_rank=fnir_rank,
        n_mated=n_mated,
        n_nonmated=n_nonmated,
    )
