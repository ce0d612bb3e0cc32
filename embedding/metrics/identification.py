"""Identification (1:N) metrics: closed-set rank rates and open-set FNIR at FPIR. Numpy only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from embedding.metrics.verification import check_rate, operating_index, roc_curve

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
            fpir = check_rate("FPIR targets", fpir)
            fnir[fpir], thresholds[fpir] = _fnir_at_fpir(reachable, nonmated_top, n_mated, fpir)
    return IdentificationMetrics(
        rank_rates=rank_rates,
        fnir_at_fpir=fnir,
        threshold_at_fpir=thresholds,
        fnir_rank=fnir_rank,
        n_mated=n_mated,
        n_nonmated=n_nonmated,
    )


def _fnir_at_fpir(reachable, nonmated_top, n_mated: int, fpir: float) -> tuple[float, float]:
    """(FNIR, threshold) at a target FPIR: `reachable` are the scores of the mates found
    within the FNIR rank, `nonmated_top` the best score of each non-mated probe."""
    if n_mated == 0:
        return math.nan, math.nan
    if reachable.size == 0:
        return 1.0, math.inf
    all_scores = np.r_[reachable, nonmated_top]
    is_mate = np.r_[np.ones(reachable.size, bool), np.zeros(nonmated_top.size, bool)]
    fpr, tpr, ts = roc_curve(all_scores, is_mate)
    i = operating_index(fpr, tpr, fpir)
    return 1.0 - float(tpr[i]) * reachable.size / n_mated, float(ts[i])
