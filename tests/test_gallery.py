"""embedding.gallery: exact and FAISS indexes, ids and labels, files (numpy + faiss, no Keras
model). The numbers are checked against numpy's own brute force and sort."""

import importlib.util
import json
import os

import numpy as np
import pytest

from embedding import Gallery, GalleryFileError, cosine_similarity
from embedding.gallery import INDEX_TYPES, UnknownIdError, indexes
from embedding.metrics import Calibration, CalibrationError, calibrate

HAS_FAISS = importlib.util.find_spec("faiss") is not None
FAISS_INDEXES = ("flat", "hnsw", "ivfpq")
ALL_INDEXES = [
    pytest.param(name, marks=pytest.mark.skipif(name != "exact" and not HAS_FAISS, reason="faiss"))
    for name in INDEX_TYPES
]


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """FAISS's OpenMP k-means slows down several-fold when its threads compete with other
    processes for few cores (10 s instead of 1.5 s for one IVF-PQ training here)."""
    if not HAS_FAISS:
        yield
        return
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted(n, d=320, queries=1000, noise=0.5, seed=0):
    """n random unit vectors, and `queries` noisy copies of some of them (cosine ~0.89):
    (gallery, queries, the row each query was made from)."""
    rng = np.random.default_rng(seed)
    gallery = unit(rng.standard_normal((n, d), dtype=np.float32))
    source = rng.choice(n, queries, replace=False)
    noisy = gallery[source] + noise / np.sqrt(d) * rng.standard_normal((queries, d))
    return gallery, unit(noisy), source


def numpy_top_k(gallery, queries, k):
    """Reference: full score matrix, stable sort (ties keep insertion order)."""
    scores = unit(queries) @ unit(gallery).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def build(name, vectors, labels=None, **params):
    labels = labels if labels is not None else [f"p{i}" for i in range(len(vectors))]
    return Gallery(index=name, **params).add(vectors, labels)


# ----------------------------------------------------------------------------
# Similarity helpers (moved from test_embedding_metrics.py)
# ----------------------------------------------------------------------------


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


def test_cosine_similarity_refuses_nan():
    with pytest.raises(ValueError, match="NaN or infinity"):
        cosine_similarity(np.r_[np.nan, 1.0], np.ones(2))
    with pytest.raises(ValueError, match="NaN or infinity"):
        cosine_similarity(np.ones((2, 2)), np.array([[1.0, np.inf]]))


# ----------------------------------------------------------------------------
# Exact search
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_search_equals_numpy_sort_across_chunks(monkeypatch, dtype):
    """Tiny chunks and query blocks force the merge across chunks. The gallery rows are
    scaled +-basis vectors (normalised exactly, in float16 too), so every score is
    exactly a query coordinate and rows of one direction tie exactly: the order must
    be a stable sort's (ties keep insertion order), id for id."""
    monkeypatch.setattr(indexes, "_CHUNK_BYTES", 4 * 8 * 100)  # 100 gallery rows per chunk
    monkeypatch.setattr(indexes, "_QUERY_BLOCK", 5)
    rng = np.random.default_rng(1)
    n = 530
    axis, sign = rng.integers(0, 8, n), rng.choice([-1.0, 1.0], n)
    vectors = np.zeros((n, 8))
    vectors[np.arange(n), axis] = sign * rng.uniform(0.5, 3.0, n)
    queries = rng.standard_normal((12, 8))
    gallery = build("exact", vectors, dtype=dtype)
    assert gallery.embeddings.dtype == np.dtype(dtype)
    # k <= 3: the grouped prefilter (3 groups of 32 a chunk); 7, 20: the partition
    # fallback; 100, 530: whole chunks sorted
    for k in (1, 3, 7, 20, 100, n):
        ids, scores = gallery.search_ids(queries, k=k)
        expected_ids, expected_scores = numpy_top_k(vectors, queries, k)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(scores, expected_scores)
    tied = Gallery().add(np.ones((3, 4)), ["x", "y", "z"])
    assert tied.search(np.ones(4), k=3)[0] == ["x", "y", "z"]


def test_exact_float16_halves_memory_and_keeps_ranking():
    gallery_vectors, queries, source = planted(5000, d=64, queries=200)
    full = build("exact", gallery_vectors)
    half = build("exact", gallery_vectors, dtype="float16")
    assert half.embeddings.nbytes * 2 == full.embeddings.nbytes
    ids16, scores16 = half.search_ids(queries, k=1)
    ids32, scores32 = full.search_ids(queries, k=1)
    np.testing.assert_array_equal(ids16[:, 0], source)
    np.testing.assert_allclose(scores16, scores32, atol=2e-3)


# ----------------------------------------------------------------------------
# Every index type: planted neighbours, save -> load -> same results
# ----------------------------------------------------------------------------


def check_planted(name, n, tmp_path, d=320, **params):
    vectors, queries, source = planted(n, d=d)
    gallery = build(name, vectors, **params)
    ids, scores = gallery.search_ids(queries, k=10)
    hit = np.mean(ids[:, 0] == source)
    assert hit == 1.0 if name in ("exact", "flat") else hit >= 0.99, (name, hit)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    labels, _ = gallery.search(queries[:5], k=1)
    assert labels[:, 0].tolist() == [f"p{i}" for i in source[:5]]
    path = tmp_path / f"{name}.npz"
    gallery.save(path)
    loaded = Gallery.load(path)
    assert loaded.index_type == name and loaded.index_params == gallery.index_params
    again_ids, again_scores = loaded.search_ids(queries, k=10)
    np.testing.assert_array_equal(again_ids, ids)
    np.testing.assert_array_equal(again_scores, scores)
    return hit


@pytest.mark.parametrize("name", ALL_INDEXES)
def test_planted_neighbours_small(name, tmp_path):
    check_planted(name, 5000, tmp_path, d=64)


@pytest.mark.slow
@pytest.mark.once("jax")  # numpy and FAISS only
@pytest.mark.parametrize("name", ALL_INDEXES)
def test_planted_neighbours_100k(name, tmp_path):
    """The issue's bar: the planted neighbour first for >= 99% of 1000 queries in a
    10^5 gallery (exact indexes: all of them), and identical results after a reload."""
    check_planted(name, 100_000, tmp_path)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss")
def test_flat_index_equals_exact_index():
    vectors, queries, _ = planted(3000, d=48, queries=50)
    exact_ids, exact_scores = build("exact", vectors).search_ids(queries, k=5)
    flat_ids, flat_scores = build("flat", vectors).search_ids(queries, k=5)
    np.testing.assert_array_equal(flat_ids, exact_ids)
    np.testing.assert_allclose(flat_scores, exact_scores, atol=1e-5)


# ----------------------------------------------------------------------------
# Ids: add, remove, relabel
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_INDEXES)
def test_add_remove_relabel_by_id(name, tmp_path):
    vectors, queries, source = planted(600, d=32, queries=40, noise=0.2)
    params = {"nlist": 4, "subquantizers": 16} if name == "ivfpq" else {}  # 2 dims a code
    gallery = Gallery(index=name, **params)
    gallery.add(vectors[:300], [f"a{i}" for i in range(300)], ids=np.arange(1000, 1300))
    gallery.add(vectors[300:], [f"b{i}" for i in range(300)])  # ids continue: 1300..1599
    np.testing.assert_array_equal(gallery.ids, np.arange(1000, 1600))
    ids, _ = gallery.search_ids(queries, k=1)
    np.testing.assert_array_equal(ids[:, 0], source + 1000)

    gone = source[:10] + 1000
    gallery.remove(gone)
    assert len(gallery) == 590 and not np.isin(gone, gallery.ids).any()
    ids, _ = gallery.search_ids(queries, k=3)
    assert not np.isin(ids, gone).any()
    np.testing.assert_array_equal(ids[10:, 0], source[10:] + 1000)

    target = int(source[20] + 1000)
    gallery.relabel([target], "carol")
    assert gallery.labels_of([target]) == ["carol"]
    assert gallery.search(queries[20], k=1)[0] == ["carol"]

    gallery.add(vectors[source[:2]], ["back0", "back1"], ids=gone[:2])  # a removed id again
    assert gallery.search(queries[0], k=1)[0] == ["back0"]

    gallery.save(tmp_path / "g.npz")
    loaded = Gallery.load(tmp_path / "g.npz")
    np.testing.assert_array_equal(loaded.ids, gallery.ids)
    assert loaded.labels == gallery.labels
    np.testing.assert_array_equal(
        loaded.search_ids(queries, k=3)[0], gallery.search_ids(queries, k=3)[0]
    )
    assert loaded.add(vectors[:1], "next").ids[-1] == 1600  # next id survives the file

    with pytest.raises(UnknownIdError, match=r"not in the gallery: \[5\]"):
        gallery.remove([5])
    with pytest.raises(KeyError):
        gallery.relabel([999_999], "x")
    with pytest.raises(ValueError, match="already in the gallery"):
        gallery.add(vectors[:1], ["dup"], ids=[1300])
    with pytest.raises(ValueError, match="repeat"):
        gallery.add(vectors[:2], ["u", "v"], ids=[7, 7])


@pytest.mark.skipif(not HAS_FAISS, reason="faiss")
def test_hnsw_rebuilds_after_many_removals():
    vectors, queries, source = planted(400, d=32, queries=50, noise=0.2)
    gallery = build("hnsw", vectors)
    gallery.remove(np.arange(50))  # 12.5%: marked, the graph is kept
    assert gallery._index._removed.size == 50 and len(gallery) == 350
    gallery.remove(np.arange(50, 120))  # 30%: rebuilt without them
    assert gallery._index._removed.size == 0 and gallery._index._index.ntotal == 280
    ids, _ = gallery.search_ids(queries, k=1)
    kept = source >= 120
    np.testing.assert_array_equal(ids[kept, 0], source[kept])
    assert not np.isin(ids, np.arange(120)).any()


@pytest.mark.skipif(not HAS_FAISS, reason="faiss")
def test_ivfpq_training_and_missing_results():
    vectors, _, _ = planted(300, d=32, queries=1)
    with pytest.raises(ValueError, match="at least 256 vectors to train"):
        Gallery(index="ivfpq").add(vectors[:100], ["x"] * 100)
    gallery = Gallery(index="ivfpq", nlist=16, nprobe=1).train(vectors)
    gallery.add(vectors[:20], [f"p{i}" for i in range(20)])
    labels, scores = gallery.search(vectors[0], k=20)  # one cell of 16 holds fewer than 20
    missing = np.isneginf(scores)
    assert missing.any() and all(label == "" for label, m in zip(labels, missing, strict=True) if m)
    assert gallery.search_ids(vectors[0], k=20)[0][missing].tolist() == [-1] * missing.sum()
    gallery.set_search_params(nprobe=16)
    assert not np.isneginf(gallery.search(vectors[0], k=20)[1]).any()
    with pytest.raises(TypeError, match="cannot change after building"):
        gallery.set_search_params(nlist=4)
    with pytest.raises(NotImplementedError, match="compressed codes"):
        _ = gallery.embeddings


# ----------------------------------------------------------------------------
# Hostile input
# ----------------------------------------------------------------------------


def test_bad_calls_are_refused_with_clear_errors():
    gallery = Gallery().add(np.eye(4), ["a", "b", "c", "d"])
    cases = [
        (lambda: gallery.search(np.r_[np.nan, 0, 0, 1]), ValueError, "NaN or infinity"),
        (lambda: gallery.search(np.r_[np.inf, 0, 0, 1]), ValueError, "NaN or infinity"),
        (lambda: gallery.search(np.eye(4), k=2.5), TypeError, "k must be a positive int"),
        (lambda: gallery.search(np.eye(4), k=True), TypeError, "k must be a positive int"),
        (lambda: gallery.search(np.eye(4), k=0), ValueError, "k must be a positive int"),
        (lambda: gallery.search(np.ones(3)), ValueError, r"\(4,\) or \(M, 4\)"),
        (lambda: gallery.add(np.ones(4), b"z"), TypeError, "labels must be str"),
        (lambda: gallery.add(np.ones((2, 4)), ["a", b"z"]), TypeError, "decode it"),
        (lambda: gallery.add(np.ones(4), [7]), TypeError, "labels must be str"),
        (lambda: gallery.add(np.ones((2, 4)), ["one"]), ValueError, "2 embeddings but 1"),
        (lambda: gallery.add(np.r_[np.nan, 0, 0, 1], "x"), ValueError, "NaN or infinity"),
        (lambda: gallery.add(np.ones(4), "x", ids=[-1]), ValueError, "between 0 and"),
        (lambda: gallery.add(np.ones(4), "x", ids=[1.5]), TypeError, "ids must be integers"),
        (lambda: gallery.remove(["a"]), TypeError, "ids must be integers"),
        (lambda: Gallery(index="annoy"), ValueError, "exact, flat, hnsw, ivfpq"),
        (lambda: Gallery(dtype="int8"), ValueError, "float32, float16"),
        (lambda: Gallery(nprobe=4), TypeError, "has no parameter 'nprobe'"),
        (lambda: Gallery().search(np.ones(4)), ValueError, "empty"),
    ]
    if HAS_FAISS:
        cases += [
            (lambda: Gallery(index="hnsw", m=1.5), TypeError, "m must be an int"),
            (lambda: Gallery(64, index="ivfpq", subquantizers=7), ValueError, "divide"),
        ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
    assert gallery.labels == ["a", "b", "c", "d"]  # nothing half-added


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def rewrite(path, target, **changes):
    """A copy of the .npz at `path` with members replaced (None: removed)."""
    with np.load(path, allow_pickle=False) as data:
        members = {name: data[name] for name in data.files}
    for name, value in changes.items():
        if value is None:
            members.pop(name)
        else:
            members[name] = value
    np.savez(target, **members)
    return target


def expect_refused(path, message):
    with pytest.raises(GalleryFileError, match=message):
        Gallery.load(path)


def test_plain_npz_from_embed_and_old_saves_still_loads(tmp_path):
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((4, 8)))
    old = tmp_path / "old.npz"  # what Gallery.save and `embed` wrote before: no ids
    np.savez(
        old,
        embeddings=vectors,
        labels=np.array(["a", "b", "a", "c"]),
        paths=np.array(["x/a/1.jpg", "x/b/1.jpg", "x/a/2.jpg", "x/c/1.jpg"]),
        skipped=np.array([], dtype=str),
        model=np.asarray("timm/convnext_atto.d2_in1k"),
    )
    gallery = Gallery.load(old)
    assert gallery.labels == ["a", "b", "a", "c"] and gallery.ids.tolist() == [0, 1, 2, 3]
    assert gallery.search(vectors[2], k=1)[0] == ["a"]
    np.savez(tmp_path / "v1.npz", embeddings=vectors, labels=np.array(list("abcd")), format=1)
    assert len(Gallery.load(tmp_path / "v1.npz")) == 4


def test_calibration_travels_with_the_gallery(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.5
    calibration = calibrate(rng.normal(size=500) + labels, labels, 0.1, n_bootstrap=20)
    gallery = Gallery().add(np.eye(3), ["a", "b", "c"])
    gallery.calibration = calibration
    gallery.save(tmp_path / "g.npz")
    assert Gallery.load(tmp_path / "g.npz").calibration == calibration
    assert sorted(os.listdir(tmp_path)) == ["g.npz"]  # no temporary file left
    assert Calibration.load(tmp_path / "g.npz") == calibration  # what verify --calibration reads
    Gallery().add(np.eye(3), ["a", "b", "c"]).save(tmp_path / "bare.npz")
    with pytest.raises(CalibrationError, match="holds no calibration"):
        Calibration.load(tmp_path / "bare.npz")
    meta = json.loads(str(np.load(tmp_path / "g.npz")["meta"]))
    meta["calibration"]["threshold"] = float("nan")
    rewrite(tmp_path / "g.npz", tmp_path / "nan.npz", meta=np.asarray(json.dumps(meta)))
    expect_refused(tmp_path / "nan.npz", "threshold must be finite")


def test_damaged_and_foreign_files_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    Gallery().add(rng.standard_normal((6, 8)), list("abcdef")).save(good)
    data = good.read_bytes()

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, embeddings=np.ones((2, 4)), labels=np.array(["a", None], dtype=object))
    expect_refused(pickled, "holds pickled objects, which are never loaded")
    lone = tmp_path / "lone.npz"
    np.save(lone.with_suffix(".npy"), np.ones(3))
    os.rename(lone.with_suffix(".npy"), lone)
    expect_refused(lone, "single .npy array")
    (tmp_path / "empty.npz").write_bytes(b"")
    expect_refused(tmp_path / "empty.npz", "the file is empty")
    (tmp_path / "text.npz").write_text("hello, this is not a gallery\n")
    expect_refused(tmp_path / "text.npz", "not a valid gallery file")
    expect_refused(tmp_path, "it is a folder")
    with pytest.raises(FileNotFoundError):
        Gallery.load(tmp_path / "missing.npz")
    for cut in (10, len(data) // 3, len(data) // 2, len(data) - 30):
        (tmp_path / "cut.npz").write_bytes(data[:cut])
        expect_refused(tmp_path / "cut.npz", "not a valid gallery file")
    flipped = bytearray(data)
    start = data.index(b"embeddings.npy") + 200  # inside the vectors: the zip's CRC fails
    flipped[start : start + 4] = b"\x01\x02\x03\x04"
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    expect_refused(tmp_path / "flipped.npz", "CRC")

    meta = json.loads(str(np.load(good)["meta"]))
    cases = {
        "count": ({"labels": np.array(list("abcde"))}, r"labels must be \(6,\)"),
        "ids": ({"ids": np.arange(6, dtype=np.int32)}, r"ids must be \(6,\) int64"),
        "duplicate ids": ({"ids": np.zeros(6, dtype=np.int64)}, "unique"),
        "vectors": ({"embeddings": np.ones((5, 8), np.float32)}, r"shape \(6, 8\)"),
        "dtype": ({"embeddings": np.ones((6, 8), np.float64)}, "index says dtype float32"),
        "nan": ({"embeddings": np.full((6, 8), np.nan, np.float32)}, "NaN"),
        "meta": ({"meta": np.asarray("{not json")}, "not valid JSON"),
        "kind": ({"meta": np.asarray(json.dumps({**meta, "kind": "x"}))}, "not a keras"),
        "index": ({"meta": np.asarray(json.dumps({**meta, "index": "annoy"}))}, "index must"),
        "format": ({"format": np.asarray(7)}, "format 7 is not one this version reads"),
        "missing": ({"ids": None}, "missing array 'ids'"),
    }
    for name, (changes, message) in cases.items():
        expect_refused(rewrite(good, tmp_path / f"{name}.npz", **changes), message)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss")
@pytest.mark.parametrize("name", FAISS_INDEXES)
def test_faiss_files_tampered_or_mismatched_are_refused(name, tmp_path):
    vectors, _, _ = planted(400, d=32, queries=1)
    params = {"nlist": 4} if name == "ivfpq" else {}
    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    build(name, vectors[:300], **params).save(first)
    other = Gallery(index=name, **params).add(vectors[:300], ["q"] * 300, ids=np.arange(5, 305))
    other.save(second)
    index_bytes = np.load(first)["faiss_index"]

    foreign = np.load(second)["faiss_index"]  # another gallery's index, same size and dim
    expect_refused(rewrite(first, tmp_path / "swap.npz", faiss_index=foreign), "ids differ")
    truncated = index_bytes[: index_bytes.size // 2]
    expect_refused(rewrite(first, tmp_path / "cut.npz", faiss_index=truncated), "FAISS cannot")
    garbage = np.frombuffer(b"IxM2" + bytes(range(256)) * 4, dtype=np.uint8)
    expect_refused(rewrite(first, tmp_path / "junk.npz", faiss_index=garbage), "FAISS cannot")
    wrong_type = {"flat": "hnsw", "hnsw": "flat", "ivfpq": "flat"}[name]
    Gallery(index=wrong_type).add(vectors[:300], ["x"] * 300).save(tmp_path / "w.npz")
    wrong = np.load(tmp_path / "w.npz")["faiss_index"]
    expect_refused(rewrite(first, tmp_path / "type.npz", faiss_index=wrong), "expected")
    smaller = Gallery(index=name, **params).add(vectors[:300, :16], ["x"] * 300)
    smaller.save(tmp_path / "d16.npz")
    expect_refused(
        rewrite(
            first, tmp_path / "dim.npz", faiss_index=np.load(tmp_path / "d16.npz")["faiss_index"]
        ),
        "16-dim",
    )
    expect_refused(rewrite(first, tmp_path / "none.npz", faiss_index=None), "missing array")
    expect_refused(
        rewrite(first, tmp_path / "f.npz", faiss_index=index_bytes.astype(np.float32)), "uint8"
    )


# ----------------------------------------------------------------------------
# Metadata and filters in memory (the stores' shared cases: test_gallery_stores.py)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_INDEXES)
def test_filtered_search_keeps_to_the_matching_vectors(name):
    """A filter keeping half of 10,000 vectors: the FAISS indexes search with an id
    selector (HNSW too: above its exact fallback of 4,096), the exact index a subset; the
    planted source is found when it matches, and nothing that does not match is returned."""
    n = 10_000
    vectors, queries, source = planted(n, d=32, queries=100, noise=0.3)
    sides = ["left" if i % 2 else "right" for i in range(n)]
    params = {"nlist": 16} if name == "ivfpq" else {}
    gallery = Gallery(index=name, **params).add(
        vectors, [f"p{i}" for i in range(n)], [{"side": s} for s in sides]
    )
    ids, scores = gallery.search_ids(queries, k=5, where={"side": "left"})
    found = ids >= 0
    assert (ids[found] % 2 == 1).all()  # only "left" vectors
    left = source % 2 == 1
    hit = np.mean(ids[left, 0] == source[left])
    unfiltered = np.mean(gallery.search_ids(queries[left], k=1)[0][:, 0] == source[left])
    # exact: all; approximate: the filter costs no recall (IVF-PQ's codes cost some anyway)
    assert hit == 1.0 if name in ("exact", "flat") else hit >= unfiltered - 0.02, (hit, unfiltered)
    assert not np.isin(source[~left], ids).any()
    assert gallery.counts() == {f"p{i}": 1 for i in range(n)}
    assert gallery.remove_label("p1") == 1 and gallery.remove_label("p1") == 0
    assert gallery.metadata_of([2]) == [{"side": "right"}]
