"""Operating points: a verification threshold at a target false-accept rate, with
bootstrap intervals, saved as JSON (or with a gallery). Numpy only."""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field

import numpy as np

from convnext_common.files import atomic_write_text
from embedding.errors import InputError
from embedding.metrics.verification import (
    check_rate,
    check_scores_labels,
    eer_from_roc,
    operating_index,
    roc_curve,
)
from embedding.npz import read_npz

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
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n")

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
    rate, _ = eer_from_roc(fpr, tpr, thresholds)
    i = operating_index(fpr, tpr, target_far)
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
    target_far = check_rate("target_far", target_far)
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)):
        raise TypeError(f"n_bootstrap must be an int, got {n_bootstrap!r}.")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}.")
    confidence = check_rate("confidence", confidence)
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
    _, eer_threshold = eer_from_roc(fpr, tpr, thresholds)
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
