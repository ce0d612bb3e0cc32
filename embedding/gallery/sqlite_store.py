"""Galleries in one SQLite file (the standard library's `sqlite3`): the embedded store for
anything that enrols.

    store = SQLiteStore("galleries.db")           # or open_store("sqlite:///galleries.db")
    g = store.gallery("staff", create=True)       # index "exact" (default), "flat" or "hnsw"

The file holds every named gallery: `galleries` (name, dim, index and its parameters,
calibration JSON, the next id, a change counter `version`), `vectors` (id, label, metadata
JSON, time added, the change that wrote the row `rev`, the unit vector as float32 bytes) and
`removed` (the id and change of each removal). WAL mode: readers never wait for the writer;
`synchronous=FULL`: a committed change survives a power cut; `secure_delete`: a removed
vector is overwritten in the file, not just unlinked. Every value is a bound parameter.

Search runs in memory: each process keeps a `Gallery` (exact, or a FAISS index) built from the
rows. Before every call it reads the gallery's `version` (one indexed row); when another
process has committed since, it reads only the rows written and the ids removed after the
version it holds (`rev > held`), so a change costs its own size, not a reload. One change is
one transaction (`BEGIN IMMEDIATE`: writers queue, up to `BUSY_TIMEOUT_S`): a process killed
in the middle leaves all of it or none.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time

import numpy as np

from embedding.gallery import Gallery
from embedding.gallery.checks import (
    UnknownIdError,
    as_ids,
    check_labels,
    check_metadata,
    check_name,
    check_new_ids,
    check_vectors,
    metadata_json,
)
from embedding.gallery.indexes import index_class
from embedding.gallery.store_base import (
    GalleryConflictError,
    GalleryNotFoundError,
    GalleryStore,
    MemoryBackedGallery,
    StoreError,
    reopen_params,
)
from embedding.gallery.vectors import l2_normalize
from embedding.metrics import Calibration

KIND = "keras-convnext-gallery-store"
SCHEMA_VERSION = 1
INDEXES = ("exact", "flat", "hnsw")  # IVF-PQ must be trained: each process would train its own
BUSY_TIMEOUT_S = 60.0
_BATCH = 10_000  # rows per executemany / fetch

SCHEMA = (
    "CREATE TABLE gallery_store (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE galleries (
        uid INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        dim INTEGER,
        index_type TEXT NOT NULL,
        params TEXT NOT NULL,
        calibration TEXT,
        next_id INTEGER NOT NULL DEFAULT 0,
        version INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL)""",
    """CREATE TABLE vectors (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        gallery INTEGER NOT NULL REFERENCES galleries (uid),
        id INTEGER NOT NULL,
        label TEXT NOT NULL,
        metadata TEXT,
        added REAL NOT NULL,
        rev INTEGER NOT NULL,
        vector BLOB NOT NULL,
        UNIQUE (gallery, id))""",
    "CREATE INDEX vectors_by_rev ON vectors (gallery, rev)",
    "CREATE INDEX vectors_by_label ON vectors (gallery, label)",
    """CREATE TABLE removed (
        gallery INTEGER NOT NULL REFERENCES galleries (uid),
        id INTEGER NOT NULL,
        rev INTEGER NOT NULL,
        PRIMARY KEY (gallery, id))""",
    "CREATE INDEX removed_by_rev ON removed (gallery, rev)",
)


class SQLiteStore(GalleryStore):
    """The galleries of one SQLite file (made when the first gallery is created)."""

    default_index = "exact"

    def __init__(self, path, *, location=None):
        path = os.fspath(path)
        if os.path.isdir(path):
            raise StoreError(f"{location or path} is a folder; give a database file.")
        self.path = os.path.abspath(path)
        self.location = location or f"sqlite:///{path}"
        self._lock = threading.RLock()
        self._conn = None
        self._pid = None
        if os.path.exists(self.path):
            self._connection(create=False)  # a foreign or damaged file fails now

    # -- the connection --------------------------------------------------------

    def _connection(self, create: bool):
        """The open connection (reopened in a forked child), or None: no file yet and
        not `create`."""
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self._conn = None  # a parent's connection is never used across fork
        if not os.path.exists(self.path):
            if not create:
                return None
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
            except OSError as error:
                raise StoreError(f"{self.location}: cannot create its folder: {error}") from None
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._check_schema(conn)  # first: a foreign database is left as it was
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA secure_delete = ON")
        except sqlite3.Error as error:
            raise StoreError(f"{self.location}: not a usable SQLite database ({error}).") from None
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _check_schema(self, conn):
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if "gallery_store" not in tables:
            foreign = sorted(t for t in tables if not t.startswith("sqlite_"))
            if foreign:
                raise StoreError(
                    f"{self.location}: a SQLite database of something else (tables: "
                    f"{', '.join(foreign[:5])}); galleries go into a new file."
                )
            with self._transaction(conn):
                if conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'gallery_store'"
                ).fetchone() is None:  # fmt: skip
                    for statement in SCHEMA:
                        conn.execute(statement)
                    conn.executemany(
                        "INSERT INTO gallery_store (key, value) VALUES (?, ?)",
                        [("kind", KIND), ("schema", str(SCHEMA_VERSION))],
                    )
        info = dict(conn.execute("SELECT key, value FROM gallery_store").fetchall())
        if info.get("kind") != KIND or info.get("schema") != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.location}: gallery store schema {info.get('schema')!r} of "
                f"{info.get('kind')!r}; this version reads schema {SCHEMA_VERSION}."
            )

    @contextlib.contextmanager
    def _transaction(self, conn, write=True):
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def write(self):
        """A write transaction (other writers wait); the connection."""
        with self._lock:
            conn = self._connection(create=True)
            try:
                with self._transaction(conn):
                    yield conn
            except sqlite3.OperationalError as error:
                raise StoreError(f"{self.location}: {error}.") from None

    @contextlib.contextmanager
    def read(self):
        """A read transaction (one snapshot); the connection, or None without a file."""
        with self._lock:
            conn = self._connection(create=False)
            if conn is None or conn.in_transaction:  # none yet, or within a write: join it
                yield conn
                return
            with self._transaction(conn, write=False):
                yield conn

    def close(self):
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # -- the galleries -----------------------------------------------------------

    def names(self) -> list[str]:
        with self.read() as conn:
            if conn is None:
                return []
            return [row[0] for row in conn.execute("SELECT name FROM galleries ORDER BY name")]

    def gallery(self, name, dim=None, create=False, index=None, **params) -> SQLiteGallery:
        check_name(name)
        with self.read() as conn:
            row = _gallery_row(conn, name) if conn is not None else None
        if row is None and create:
            index = index or self.default_index
            if index not in INDEXES:
                raise StoreError(
                    f"index {index!r} is not offered by SQLite stores (each process builds "
                    f"its own index from the rows): use {', '.join(INDEXES)}."
                )
            checked = index_class(index).check_params(params, dim)
            with self.write() as conn:
                row = _gallery_row(conn, name)
                if row is None:
                    conn.execute(
                        "INSERT INTO galleries (name, dim, index_type, params, created) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (name, dim, index, json.dumps(checked), time.time()),
                    )
                    row = _gallery_row(conn, name)
        if row is None:
            raise self._not_found(name)
        search_time = reopen_params(
            self.location, name, row["index_type"], row["params"], index, params, row["dim"], dim
        )
        return SQLiteGallery(self, name, row["uid"], search_time)

    def drop(self, name) -> None:
        check_name(name)
        with self.write() as conn:
            row = _gallery_row(conn, name)
            if row is not None:
                self._delete_gallery(conn, row["uid"])
        if row is None:
            raise self._not_found(name)

    @staticmethod
    def _delete_gallery(conn, uid):
        conn.execute("DELETE FROM vectors WHERE gallery = ?", (uid,))
        conn.execute("DELETE FROM removed WHERE gallery = ?", (uid,))
        conn.execute("DELETE FROM galleries WHERE uid = ?", (uid,))


_ALL_ROWS = "SELECT id, label, metadata, vector FROM vectors WHERE gallery = ? ORDER BY seq"
_ROWS_SINCE = (
    "SELECT id, label, metadata, vector FROM vectors WHERE gallery = ? AND rev > ? ORDER BY seq"
)
_COLUMNS = ("uid", "dim", "index_type", "params", "calibration", "next_id", "version")


def _gallery_row(conn, name) -> dict | None:
    row = conn.execute(
        "SELECT uid, dim, index_type, params, calibration, next_id, version "
        "FROM galleries WHERE name = ?",
        (name,),
    ).fetchone()
    if row is None:
        return None
    row = dict(zip(_COLUMNS, row, strict=True))
    row["params"] = json.loads(row["params"])
    return row


class SQLiteGallery(MemoryBackedGallery):
    """One gallery of a `SQLiteStore`, searched in memory (see the module docstring).

    `rows_read` counts the vector rows this object has read from the file: a change by
    another process costs the rows it wrote, not the gallery.
    """

    def __init__(self, store: SQLiteStore, name: str, uid: int, search_params: dict):
        super().__init__()
        self.store, self.name, self._uid = store, name, uid
        self.location = f"{store.location}#{name}"
        self._search_params = search_params
        self._version = None  # the change the copy in memory holds
        self._calibration = None
        self._pending = None  # (version before, apply) of the write in progress
        self.rows_read = 0

    # -- reading -------------------------------------------------------------------

    def _row(self, conn) -> dict:
        row = _gallery_row(conn, self.name) if conn is not None else None
        if row is None or row["uid"] != self._uid:
            raise GalleryNotFoundError(f"{self.location}: the gallery was dropped.")
        return row

    def _refresh(self):
        with self.store.read() as conn:
            row = self._row(conn)
            if self._memory is not None and row["version"] == self._version:
                return
            if self._memory is None:
                memory = Gallery(row["dim"], index=row["index_type"], **row["params"])
                if self._search_params:
                    memory.set_search_params(**self._search_params)
                self._load_rows(conn, memory, _ALL_ROWS, self._uid)
                self._memory = memory
            else:
                removed = np.asarray(
                    [
                        r[0]
                        for r in conn.execute(
                            "SELECT id FROM removed WHERE gallery = ? AND rev > ?",
                            (self._uid, self._version),
                        )
                    ],  # fmt: skip
                    dtype=np.int64,
                )
                present = removed[np.isin(removed, self._memory.ids)]
                if present.size:
                    self._memory.remove(present)
                self._load_rows(conn, self._memory, _ROWS_SINCE, self._uid, self._version)
            self._calibration = _calibration(row["calibration"])
            self._version = row["version"]

    def _load_rows(self, conn, memory, query, *values):
        """The rows `query` (_ALL_ROWS or _ROWS_SINCE) selects into `memory`: new ids added,
        known ids relabelled."""
        cursor = conn.execute(query, values)
        while rows := cursor.fetchmany(_BATCH):
            self.rows_read += len(rows)
            ids = np.asarray([r[0] for r in rows], dtype=np.int64)
            known = np.isin(ids, memory.ids) if len(memory) else np.zeros(len(ids), bool)
            if known.any():
                memory.relabel(ids[known], [r[1] for r, k in zip(rows, known, strict=True) if k])
            fresh = [r for r, k in zip(rows, known, strict=True) if not k]
            if fresh:
                vectors = np.frombuffer(b"".join(r[3] for r in fresh), dtype="<f4")
                if vectors.size != len(fresh) * memory.dim:
                    raise StoreError(f"{self.location}: vector rows of the wrong size.")
                metadata = [json.loads(r[2]) if r[2] else {} for r in fresh]
                memory.add(
                    vectors.reshape(len(fresh), -1),
                    [r[1] for r in fresh],
                    metadata,
                    ids=[r[0] for r in fresh],
                )

    @property
    def calibration(self):
        with self._lock:
            self._refresh()
            return self._calibration

    @calibration.setter
    def calibration(self, calibration):
        record = json.dumps(calibration.to_dict()) if calibration is not None else None
        with self._lock, self.store.write() as conn:
            self._row(conn)
            conn.execute(
                "UPDATE galleries SET calibration = ?, version = version + 1 WHERE uid = ?",
                (record, self._uid),
            )

    # -- changing ------------------------------------------------------------------

    def _change(self, conn, apply=None) -> int:
        """Bump the version in the open write transaction; returns the new one. `apply`
        is run on the copy in memory after the commit when the copy held the version
        before this change (no other process wrote in between), else the next read
        fetches the rows."""
        version = self._row(conn)["version"]
        conn.execute("UPDATE galleries SET version = ? WHERE uid = ?", (version + 1, self._uid))
        self._pending = (version, apply)
        return version + 1

    def _after_commit(self):
        before, apply = self._pending
        self._pending = None
        if apply is not None and self._memory is not None and self._version == before:
            apply(self._memory)
            self._version = before + 1

    def add(self, embeddings, labels, metadata=None, *, ids=None):
        with self._lock:
            memory = self._current()
            vectors = l2_normalize(check_vectors(embeddings, memory.dim))
            labels = check_labels(labels, vectors.shape[0])
            metadata = check_metadata(metadata, vectors.shape[0])
            given = check_new_ids(ids, len(labels)) if ids is not None else None
            if given is not None and len(memory) and np.isin(given, memory.ids).any():
                taken = given[np.isin(given, memory.ids)]
                raise GalleryConflictError(
                    f"ids already in the gallery: {taken[:5].tolist()} (remove them first)."
                )
            if not len(labels):
                return np.zeros(0, dtype=np.int64)
            with self.store.write() as conn:
                row = self._row(conn)
                if row["dim"] is None:
                    conn.execute("UPDATE galleries SET dim = ? WHERE uid = ?",
                                 (vectors.shape[1], self._uid))  # fmt: skip
                elif row["dim"] != vectors.shape[1]:
                    check_vectors(vectors, row["dim"])  # the DimensionError
                new_ids = (
                    given
                    if given is not None
                    else np.arange(row["next_id"], row["next_id"] + len(labels), dtype=np.int64)
                )
                version = self._change(
                    conn, lambda m: m.add(vectors, labels, metadata, ids=new_ids)
                )
                self._insert(conn, new_ids, vectors, labels, metadata, version)
                conn.execute(
                    "UPDATE galleries SET next_id = max(next_id, ?) WHERE uid = ?",
                    (int(new_ids.max()) + 1, self._uid),
                )
            self._after_commit()
            return new_ids.copy()

    def _insert(self, conn, ids, vectors, labels, metadata, version):
        now = time.time()
        data = np.ascontiguousarray(vectors, dtype="<f4")
        rows = (
            (self._uid, int(i), label, metadata_json(m) if m else None, now, version, v.tobytes())
            for i, label, m, v in zip(ids.tolist(), labels, metadata, data, strict=True)
        )
        try:
            conn.executemany(
                "INSERT INTO vectors (gallery, id, label, metadata, added, rev, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        except sqlite3.IntegrityError:
            raise GalleryConflictError(
                "ids already in the gallery (another process added them first); nothing added."
            ) from None

    def _delete(self, conn, ids: np.ndarray, version: int) -> None:
        deleted = conn.executemany(
            "DELETE FROM vectors WHERE gallery = ? AND id = ?",
            [(self._uid, i) for i in ids.tolist()],
        ).rowcount
        if deleted != ids.size:
            raise UnknownIdError(
                f"{self.location}: another process removed some of these ids first; "
                "nothing removed."
            )
        conn.executemany(
            "INSERT OR REPLACE INTO removed (gallery, id, rev) VALUES (?, ?, ?)",
            [(self._uid, i, version) for i in ids.tolist()],
        )

    def remove(self, ids):
        with self._lock:
            ids = np.unique(as_ids(ids))
            self._current().labels_of(ids)  # an UnknownIdError names the ids not here
            if ids.size:
                with self.store.write() as conn:
                    version = self._change(conn, lambda m: m.remove(ids))
                    self._delete(conn, ids, version)
                self._after_commit()
        return self

    def remove_label(self, label) -> int:
        (label,) = check_labels(label, 1)
        with self._lock:
            self._current()
            with self.store.write() as conn:
                self._row(conn)
                ids = np.asarray(
                    [
                        r[0]
                        for r in conn.execute(
                            "SELECT id FROM vectors WHERE gallery = ? AND label = ?",
                            (self._uid, label),
                        )
                    ],  # fmt: skip
                    dtype=np.int64,
                )
                if ids.size:
                    version = self._change(conn, lambda m: m.remove(ids))
                    self._delete(conn, ids, version)
            if ids.size:
                self._after_commit()
            return int(ids.size)

    def relabel(self, ids, labels):
        with self._lock:
            memory = self._current()
            ids = as_ids(ids)
            memory.labels_of(ids)  # an UnknownIdError names the ids not here
            labels = check_labels([labels] * ids.size if isinstance(labels, str) else labels,
                                  ids.size)  # fmt: skip
            if ids.size:
                with self.store.write() as conn:
                    version = self._change(conn, lambda m: m.relabel(ids, labels))
                    changed = conn.executemany(
                        "UPDATE vectors SET label = ?, rev = ? WHERE gallery = ? AND id = ?",
                        [
                            (lab, version, self._uid, i)
                            for lab, i in zip(labels, ids.tolist(), strict=True)
                        ],
                    ).rowcount
                    if changed != ids.size:
                        raise UnknownIdError(
                            f"{self.location}: another process removed some of these ids "
                            "first; nothing relabelled."
                        )
                self._after_commit()
        return self


def _calibration(record):
    return Calibration.from_dict(json.loads(record)) if record else None
