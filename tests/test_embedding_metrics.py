"""embedding.metrics against scikit-learn and direct numpy computations (numpy only, fast)."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from embedding import (
    Calibration,
    CalibrationError,
    best_accuracy_threshold,
    calibrate,
    eer,
    identification_metrics,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_metrics,
)


def random_case(seed, n=2000, ties=False):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    scores = rng.normal(size=n) + 1.2 * labels
    if ties:
        scores = np.round(scores * 2) / 2  # ~15 distinct values, many ties
    return scores, labels


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_roc_matches_sklearn(seed, ties):
    scores, labels = random_case(seed, ties=ties)
    fpr, tpr, thr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_all_tied_scores():
    scores, labels = np.full(10, 0.3), np.r_[np.ones(5), np.zeros(5)]
    assert roc_auc(scores, labels) == pytest.approx(0.5)
    rate, threshold = eer(scores, labels)
    assert rate == pytest.approx(0.5) and threshold == pytest.approx(0.3)
    assert best_accuracy_threshold(scores, labels)[0] == pytest.approx(0.5)


def _brute_rates(scores, labels, threshold):
    accept = scores >= threshold
    return accept[~labels].mean(), 1 - accept[labels].mean()  # FAR, FRR


@pytest.mark.parametrize("ties", [False, True])
def test_eer_tar_accuracy_brute_force(ties):
    scores, labels = random_case(3, n=600, ties=ties)
    labels = labels.astype(bool)
    rate, threshold = eer(scores, labels)
    candidates = np.r_[np.unique(scores), np.inf]
    gaps = [abs(np.subtract(*_brute_rates(scores, labels, t))) for t in candidates]
    best = candidates[int(np.argmin(gaps))]
    far, frr = _brute_rates(scores, labels, best)
    assert min(far, frr) - 1e-12 <= rate <= max(far, frr) + 1e-12  # interpolated between
    for far_target, (tar, thr) in tar_at_far(scores, labels, (0.1, 0.01)).items():
        far_at, frr_at = _brute_rates(scores, labels, thr)
        assert far_at <= far_target and tar == pytest.approx(1 - frr_at)
        better = [t for t in candidates if _brute_rates(scores, labels, t)[0] <= far_target]
        assert tar == pytest.approx(max(1 - _brute_rates(scores, labels, t)[1] for t in better))
    accuracy, thr = best_accuracy_threshold(scores, labels)
    brute = max(np.mean((scores >= t) == labels) for t in np.r_[candidates, -np.inf])
    assert accuracy == pytest.approx(brute) and np.mean((scores >= thr) == labels) == accuracy


def test_eer_of_two_gaussians_is_analytic():
    rng = np.random.default_rng(0)
    n, d = 200_000, 1.5
    scores = np.r_[rng.normal(d, 1.0, n), rng.normal(0.0, 1.0, n)]
    labels = np.r_[np.ones(n), np.zeros(n)]
    expected = 0.5 * math.erfc(d / 2 / math.sqrt(2))  # Phi(-d/2)
    rate, threshold = eer(scores, labels)
    assert abs(rate - expected) < 0.005 and abs(threshold - d / 2) < 0.02
    m = verification_metrics(scores, labels, folds=None)
    assert m.eer == pytest.approx(rate) and m.kfold is None


def test_verification_metrics_and_kfold():
    scores, labels = random_case(4, n=600)
    m = verification_metrics(scores, labels)
    assert set(m.tar_at_far) == {1e-2, 1e-3, 1e-4}
    assert m.n_genuine + m.n_impostor == 600 and m.far_resolution == 1 / m.n_impostor
    assert len(m.kfold.accuracies) == 10 and m.kfold.std >= 0
    assert 0.6 < m.kfold.mean <= m.best_accuracy + 0.05
    assert "10-fold accuracy" in m.summary() and "roc" not in m.to_dict()
    # perfectly separable: every fold is right
    separable = np.r_[np.ones(50), np.zeros(50)]
    sep = kfold_accuracy(separable * 0.8, separable, folds=5)
    assert sep.mean == 1.0 and sep.std == 0.0


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, 0.2], [1, 1], "Only genuine"),
        ([0.1, 0.2], [0, 0], "Only impostor"),
        ([0.1, 0.2, 0.3], [1, 0], "differ in length"),
        ([0.1, np.nan], [1, 0], "NaN"),
        ([0.1, 0.2], [1, 2], "0/1"),
        ([], [], "No scores"),
        ([[0.1, 0.2]], [[1, 0]], "1-D"),
    ],
)
def test_degenerate_inputs_are_rejected(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        verification_metrics(scores, labels)


# ----------------------------------------------------------------------------
# Operating point at a target FAR
# ----------------------------------------------------------------------------


def sklearn_operating_point(scores, labels, target_far):
    """From scikit-learn's ROC: the highest TPR with FPR <= target, the lowest FPR among
    equal TPRs; (threshold, fpr, tpr)."""
    fpr, tpr, thresholds = sk_roc_curve(labels, scores)
    allowed = fpr <= target_far
    best = tpr[allowed].max()
    i = int(np.flatnonzero(allowed & (tpr == best))[0])
    return thresholds[i], fpr[i], tpr[i]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_far_threshold_matches_sklearn(seed, ties):
    scores, labels = random_case(seed, n=3000, ties=ties)
    if ties:
        scores = np.round(scores * 4) / 4 + 3  # ~25 distinct values: big ties at every point
    for target in (1e-3, 1e-2, 0.05, 0.2, 0.5):
        threshold, fpr, tpr = sklearn_operating_point(scores, labels, target)
        if not np.isfinite(threshold):  # the top scores are impostors: refused
            with pytest.raises(ValueError, match="No threshold accepts any genuine pair"):
                calibrate(scores, labels, target, n_bootstrap=0)
            continue
        c = calibrate(scores, labels, target, n_bootstrap=0)
        assert c.threshold == threshold and c.far == fpr and c.tar == pytest.approx(tpr)
        accepted = scores >= c.threshold  # what `verify` does with it
        assert accepted[~labels].mean() == c.far <= target
        assert accepted[labels].mean() == pytest.approx(1 - c.frr, abs=1e-12)
        tar, thr = tar_at_far(scores, labels, [target])[target]
        assert (tar, thr) == (pytest.approx(tpr), threshold)


def test_unreachable_target_is_refused():
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    labels = np.array([0, 1, 1, 0])  # the best score is an impostor
    with pytest.raises(ValueError, match="No threshold accepts any genuine pair at FAR <= 0.1"):
        calibrate(scores, labels, 0.1)
    assert calibrate(scores, labels, 0.5, n_bootstrap=0).threshold == 0.7


def test_bootstrap_replicates_equal_a_direct_computation():
    """Each resample's statistics, computed in O(n) from the scores sorted once, equal
    scikit-learn's ROC and `eer` on that resample built explicitly."""
    from embedding.metrics import bootstrap_statistics

    scores, labels = random_case(5, n=800, ties=True)
    stats = bootstrap_statistics(scores, labels, 0.05, n_bootstrap=6, seed=11)
    rng = np.random.default_rng(11)
    for row in stats:
        draw = rng.integers(0, scores.size, scores.size)
        threshold, _, tpr = sklearn_operating_point(scores[draw], labels[draw], 0.05)
        assert row[1] == pytest.approx(tpr, abs=1e-12) and row[2] == threshold
        assert row[0] == pytest.approx(eer(scores[draw], labels[draw])[0], abs=1e-12)


def test_bootstrap_intervals_contain_the_estimate_and_shrink():
    widths = {}
    for n in (400, 4000):
        rng = np.random.default_rng(n)
        labels = rng.random(n) < 0.5
        scores = rng.normal(size=n) + 2.0 * labels
        c = calibrate(scores, labels, 0.05, n_bootstrap=400, seed=1)
        point = {"threshold": c.threshold, "tar": c.tar, "frr": c.frr, "eer": c.eer}
        for name, value in point.items():
            low, high = c.intervals[name]
            assert low <= value <= high, (n, name, low, value, high)
        widths[n] = {k: v[1] - v[0] for k, v in c.intervals.items()}
    for name in ("threshold", "tar", "eer"):  # ~1/sqrt(n): 10x the pairs, ~0.32x the width
        assert widths[4000][name] < 0.6 * widths[400][name], (name, widths)


def test_calibration_record_round_trip_and_refusals(tmp_path):
    scores, labels = random_case(6, n=1000)
    c = calibrate(scores, labels, 0.01, n_bootstrap=50, model="my_model")
    path = tmp_path / "cal.json"
    c.save(path)
    assert Calibration.load(path) == c and json.loads(path.read_text())["threshold"] == c.threshold
    assert "FAR <= 0.01" in c.summary() and "95% bootstrap" in c.summary()
    record = c.to_dict()
    bad = {
        "threshold": ({**record, "threshold": float("nan")}, "threshold must be finite"),
        "inf": ({**record, "threshold": float("inf")}, "threshold must be finite"),
        "text": ({**record, "threshold": "0.5"}, "threshold must be a number"),
        "kind": ({**record, "kind": "other"}, "not a calibration record"),
        "missing": ({k: v for k, v in record.items() if k != "far"}, "far must be a number"),
        "far": ({**record, "far": 0.5}, "exceeds target_far"),
        "counts": ({**record, "n_impostor": 0}, "genuine and impostor"),
        "interval": ({**record, "intervals": {"eer": [0.3, 0.1]}}, "low <= high"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(CalibrationError, match=message):
            Calibration.from_dict(value)
        (tmp_path / f"{name}.json").write_text(json.dumps(value))
        with pytest.raises(CalibrationError, match=f"{name}.json: "):
            Calibration.load(tmp_path / f"{name}.json")
    (tmp_path / "junk.json").write_bytes(b"\x00\xff not json")
    with pytest.raises(CalibrationError, match="not a calibration JSON file"):
        Calibration.load(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="threshold must be finite"):
        Calibration(**{**c.__dict__, "threshold": float("nan")})
    for kwargs, kind, message in [
        ({"target_far": float("nan")}, ValueError, "target_far must lie in"),
        ({"target_far": 2.0}, ValueError, "target_far must lie in"),
        ({"target_far": True}, TypeError, "target_far must be a number"),
        ({"n_bootstrap": -1}, ValueError, "n_bootstrap must be >= 0"),
        ({"confidence": 1.0}, ValueError, "strictly between 0 and 1"),
    ]:
        with pytest.raises(kind, match=message):
            calibrate(scores, labels, **kwargs)


# ----------------------------------------------------------------------------
# Identification (1:N)
# ----------------------------------------------------------------------------


def labelled_search(seed=0):
    """40 enrolled identities with 1-3 gallery vectors each; 120 mated probes (noisy views
    of enrolled identities) and 60 non-mated probes (identities not enrolled)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(70, 16))
    counts = rng.integers(1, 4, 40)
    gallery_id = np.repeat(np.arange(40), counts)
    gallery = centres[gallery_id] + 0.9 * rng.normal(size=(gallery_id.size, 16))
    probe_id = np.r_[rng.integers(0, 40, 120), rng.integers(40, 70, 60)]
    probes = centres[probe_id] + 0.9 * rng.normal(size=(probe_id.size, 16))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    scores = unit(probes) @ unit(gallery).T
    names = np.array([f"id{i:02d}" for i in range(70)])
    return scores, names[gallery_id], names[probe_id]


def brute_identification(scores, gallery_labels, probe_labels, rank, fpir):
    """Loops over probes and identities, and over every candidate threshold."""
    enrolled = set(gallery_labels.tolist())
    ranks, mate_scores, nonmated_top = [], [], []
    for p, label in enumerate(probe_labels):
        best = {}
        for g, identity in enumerate(gallery_labels):
            best[identity] = max(best.get(identity, -np.inf), scores[p, g])
        if label in enrolled:
            others = [s for identity, s in best.items() if identity != label]
            ranks.append(1 + sum(s >= best[label] for s in others))
            mate_scores.append(best[label])
        else:
            nonmated_top.append(max(best.values()))
    ranks, mate_scores, nonmated_top = map(np.array, (ranks, mate_scores, nonmated_top))
    rank1 = np.mean(ranks == 1)
    best_fnir, best_threshold = None, None
    for t in np.r_[np.unique(scores), np.inf]:
        if np.mean(nonmated_top >= t) > fpir:
            continue
        fnir = np.mean(~((ranks <= rank) & (mate_scores >= t)))
        if best_fnir is None or fnir < best_fnir or (fnir == best_fnir and t > best_threshold):
            best_fnir, best_threshold = fnir, t
    rank5 = np.mean(ranks <= 5)
    return rank1, rank5, best_fnir, best_threshold


@pytest.mark.parametrize(("seed", "ties"), [(0, False), (1, False), (2, True)])
def test_identification_matches_direct_numpy(seed, ties):
    scores, gallery_labels, probe_labels = labelled_search(seed)
    if ties:
        scores = np.round(scores * 8) / 8  # many equal scores: ties count against the probe
    else:  # no ties: rank 1 is simply "the best gallery vector has the probe's label"
        enrolled = np.isin(probe_labels, gallery_labels)
        top = gallery_labels[np.argmax(scores, axis=1)]
        expected = np.mean(top[enrolled] == probe_labels[enrolled])
        assert identification_metrics(scores, gallery_labels, probe_labels).rank_rates[
            1
        ] == pytest.approx(expected)
    m = identification_metrics(scores, gallery_labels, probe_labels, fpirs=(0.05, 0.2))
    assert (m.n_mated, m.n_nonmated) == (120, 60)
    for fpir in (0.05, 0.2):
        rank1, rank5, fnir, threshold = brute_identification(
            scores, gallery_labels, probe_labels, 1, fpir
        )
        assert m.rank_rates[1] == pytest.approx(rank1) and m.rank_rates[5] == pytest.approx(rank5)
        assert m.fnir_at_fpir[fpir] == pytest.approx(fnir)
        assert m.threshold_at_fpir[fpir] == threshold
    assert 0 < m.rank_rates[1] < m.rank_rates[5] <= 1
    wide = identification_metrics(scores, gallery_labels, probe_labels, fpirs=(0.2,), fnir_rank=5)
    _, _, fnir5, _ = brute_identification(scores, gallery_labels, probe_labels, 5, 0.2)
    assert wide.fnir_at_fpir[0.2] == pytest.approx(fnir5) and "rank-5" in wide.summary()


def test_identification_rejects_bad_input():
    scores, gallery_labels, probe_labels = labelled_search()
    with pytest.raises(ValueError, match=r"scores must be \(probes, gallery\)"):
        identification_metrics(scores[:, :5], gallery_labels, probe_labels)
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        identification_metrics(bad, gallery_labels, probe_labels)
