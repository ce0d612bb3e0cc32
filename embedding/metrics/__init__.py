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

from embedding.metrics.calibration import (
    CALIBRATION_FORMAT,
    CALIBRATION_KIND,
    INTERVAL_NAMES,
    Calibration,
    CalibrationError,
    bootstrap_statistics,
    calibrate,
)
from embedding.metrics.identification import IdentificationMetrics, identification_metrics
from embedding.metrics.verification import (
    DEFAULT_FARS,
    DEFAULT_THRESHOLD,
    KFoldResult,
    VerificationMetrics,
    best_accuracy_threshold,
    check_scores_labels,
    check_threshold,
    eer,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_metrics,
)

__all__ = [
    "CALIBRATION_FORMAT", "CALIBRATION_KIND", "DEFAULT_FARS", "DEFAULT_THRESHOLD",
    "INTERVAL_NAMES", "Calibration", "CalibrationError", "IdentificationMetrics", "KFoldResult",
    "VerificationMetrics", "best_accuracy_threshold", "bootstrap_statistics", "calibrate",
    "check_scores_labels", "check_threshold", "eer", "identification_metrics", "kfold_accuracy",
    "roc_auc", "roc_curve", "tar_at_far", "verification_metrics",
]  # fmt: skip
