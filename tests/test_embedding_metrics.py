"""embedding.metrics against scikit-learn, and embedding.gallery (numpy only, fast)."""

import math
import os

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from embedding import (
    Gallery,
    best_accuracy_threshold,
    cosine_similarity,
    eer,
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


def test_cosine_similarity_shapes():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 8)), rng.normal(size=(5, 8))
    full = cosine_similarity(a, b)
    assert full.shape == (3, 5)
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
        b / np.linalg.norm(b, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(full, expected, atol=1e-6)
    assert isinstance(cosine_similarity(a[0], b[0]), float)
    np.testing.assert_allclose(cosine_similarity(a[0], b), full[0], atol=1e-6)
    np.testing.assert_allclose(cosine_similarity(a, b[1]), full[:, 1], atol=1e-6)
    assert cosine_similarity(np.zeros(8), b[0]) == 0.0
    with pytest.raises(ValueError, match="mismatch"):
        cosine_similarity(a, np.ones(4))


def test_gallery_search_save_load(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 16)).astype(np.float32)
    gallery = Gallery().add(vectors[:4], ["ann", "bob", "ann", "cy"]).add(vectors[4], "dee")
    assert len(gallery) == 5 and gallery.dim == 16
    labels, scores = gallery.search(vectors[2] * 3.0, k=3)
    assert labels[0] == "ann" and scores[0] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(scores) <= 0)
    many_labels, many_scores = gallery.search(vectors[:2], k=10)  # k capped
    assert many_labels.shape == (2, 5) and many_scores.shape == (2, 5)
    assert many_labels[1, 0] == "bob"
    tied = Gallery().add(np.ones((3, 4)), ["x", "y", "z"])
    assert tied.search(np.ones(4), k=3)[0] == ["x", "y", "z"]  # ties keep insertion order

    path = tmp_path / "g.npz"
    gallery.save(path)
    assert sorted(os.listdir(tmp_path)) == ["g.npz"]  # no temp file left behind
    loaded = Gallery.load(path)
    assert loaded.labels == gallery.labels
    np.testing.assert_allclose(loaded.embeddings, gallery.embeddings, atol=1e-6)

    with pytest.raises(ValueError, match="16-dim"):
        gallery.add(np.ones((1, 8)), ["bad"])
    with pytest.raises(ValueError, match="labels"):
        gallery.add(np.ones((2, 16)), ["one"])
    with pytest.raises(ValueError, match=r"\(16,\)"):
        gallery.search(np.ones(8))


def test_gallery_load_rejects_bad_files(tmp_path):
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, embeddings=np.ones((2, 4)), labels=np.array(["a", None], dtype=object))
    with pytest.raises(ValueError, match="not a valid gallery"):
        Gallery.load(pickled)  # object arrays need pickle: refused
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, embeddings=np.ones((3, 4)), labels=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="3 embeddings but 2 labels"):
        Gallery.load(mismatch)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, embeddings=np.ones((3,)), labels=np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="2-D float"):
        Gallery.load(wrong)
    missing = tmp_path / "missing.npz"
    np.savez(missing, vectors=np.ones((3, 4)))
    with pytest.raises(ValueError, match="missing arrays"):
        Gallery.load(missing)
