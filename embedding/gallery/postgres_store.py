"""Galleries in PostgreSQL with pgvector: the store many servers share.

    store = PostgresStore("postgresql://app@127.0.0.1:5432/faces")   # or open_store(...)
    g = store.gallery("staff", create=True)          # index "hnsw" (default) or "exact"
    g = store.gallery("staff", ef_search=200)        # a search-time setting for this object

Needs the `postgres` extra (psycopg 3, pgvector's Python package) and a server with the
pgvector extension (0.8 or later for filtered HNSW search; `CREATE EXTENSION vector` is run
when the first gallery is created, which needs the right to create it).

Layout: a catalog `embedding_galleries` (name, dim, index and its parameters, calibration
`jsonb`, the next id, the count, a change counter) and one table per gallery,
`embedding_gallery_<uid>` (the name stays data; the table is named by the catalog's number):
`id` (primary key), `label` (a hash index: any length), `metadata jsonb` (a GIN index),
`added timestamptz`, `embedding vector(D)` or `halfvec(D)` (dtype "float16"), and for index
"hnsw" an HNSW index with inner-product operators (`vector_ip_ops`: the vectors are unit
vectors, so inner product is cosine similarity) built with `m` and `ef_construction`.

Search: `ORDER BY embedding <#> query LIMIT k` per query (all the queries of a call in one
statement), `hnsw.ef_search` set for the transaction from the `ef_search` parameter (the
FAISS HNSW index's name); a `where=` filter becomes `metadata @> %s` (jsonb containment)
with `hnsw.iterative_scan = relaxed_order`, so a selective filter still finds k rows.
Every value is a query parameter; identifiers are composed by `psycopg.sql` from the
catalog's integer uid, never from text.

Changes: each call is one transaction that first locks the gallery's catalog row (writers
to one gallery queue; readers never wait for them, except during a bulk load). An add of at
least `BULK_ROWS` rows that also at least doubles the gallery drops the HNSW index, copies
the rows (COPY, binary) and builds the index again, in the same transaction (building is
~5x faster than inserting into the graph): searches of that gallery wait for its commit.
A removed row is deleted at once; PostgreSQL's vacuum reclaims its space later.
"""

from __future__ import annotations

import contextlib
import os
import threading

from embedding.gallery.checks import check_dim, check_name
from embedding.gallery.postgres_gallery import (
    CATALOG,
    EXTRA,
    Jsonb,
    PostgresGallery,
    check_params,
    create_table,
    psycopg,
    register_vector,
    server_message,
    sql,
    table,
)
from embedding.gallery.store_base import (
    GalleryConflictError,
    GalleryStore,
    StoreError,
    reopen_params,
)

CATALOG_COMMENT = "keras-convnext gallery catalog, schema 1"
LOCK_KEY = 0x6B6572617347  # pg_advisory_xact_lock key: one creator of the catalog at a time
_ABANDONED = []  # connections inherited across fork: never closed (that would end the parent's)


class PostgresStore(GalleryStore):
    """The galleries of one PostgreSQL database (see the module docstring)."""

    default_index = "hnsw"

    def __init__(self, conninfo: str, *, location=None):
        if psycopg is None:
            raise StoreError(f"PostgreSQL galleries need the postgres extra: {EXTRA}.")
        self.conninfo = conninfo
        self.location = location or "postgresql://..."
        self._lock = threading.RLock()
        self._conn = None
        self._pid = None
        self._connection()  # a wrong host, user or database fails now

    def _connection(self):
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._conn is not None:
            _ABANDONED.append(self._conn)
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=15)
        except psycopg.Error as error:
            raise StoreError(f"{self.location}: cannot connect: {server_message(error)}") from None
        self._conn, self._pid, self._registered = conn, os.getpid(), False
        self._register(conn)
        return conn

    def _register(self, conn):
        """pgvector's types for psycopg, once the extension exists in the database."""
        if not self._registered and conn.execute(
            "SELECT 1 FROM pg_extension WHERE extname = 'vector'"
        ).fetchone():  # fmt: skip
            register_vector(conn)
            self._registered = True

    @contextlib.contextmanager
    def transaction(self):
        """One transaction on the store's connection; database errors become StoreErrors."""
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    yield conn
            except psycopg.Error as error:
                if isinstance(error, psycopg.errors.UniqueViolation):
                    raise GalleryConflictError(
                        f"{self.location}: ids already in the gallery (another process added "
                        "them first); nothing added."
                    ) from None
                raise StoreError(f"{self.location}: {server_message(error)}") from None

    def close(self):
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # -- the catalog -------------------------------------------------------------

    def _has_catalog(self, conn) -> bool:
        found = conn.execute(
            "SELECT obj_description(c.oid, 'pg_class') FROM pg_class c "
            "WHERE c.oid = to_regclass(%s)",
            (CATALOG,),
        ).fetchone()
        if found is None:
            return False
        if found[0] != CATALOG_COMMENT:
            raise StoreError(
                f"{self.location}: a table {CATALOG} exists that is not this project's gallery "
                f"catalog (its comment is {found[0]!r}); use another database or schema."
            )
        return True

    def _ensure_catalog(self, conn):
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
            conn.execute("CREATE EXTENSION vector")
        self._register(conn)
        if self._has_catalog(conn):
            return
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (uid bigserial PRIMARY KEY, name text NOT NULL UNIQUE, "
                "dim integer, index_type text NOT NULL, params jsonb NOT NULL, "
                "calibration jsonb, next_id bigint NOT NULL DEFAULT 0, "
                "count bigint NOT NULL DEFAULT 0, version bigint NOT NULL DEFAULT 0, "
                "created timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(CATALOG))
        )
        conn.execute(
            sql.SQL("COMMENT ON TABLE {} IS {}").format(
                sql.Identifier(CATALOG), sql.Literal(CATALOG_COMMENT)
            )
        )

    def catalog_row(self, conn, name, lock=False) -> dict | None:
        if not self._has_catalog(conn):
            return None
        query = sql.SQL(
            "SELECT uid, dim, index_type, params, calibration, next_id, count, version "
            "FROM {} WHERE name = %s" + (" FOR UPDATE" if lock else "")
        ).format(sql.Identifier(CATALOG))
        row = conn.execute(query, (name,)).fetchone()
        keys = ("uid", "dim", "index_type", "params", "calibration", "next_id", "count", "version")
        return dict(zip(keys, row, strict=True)) if row else None

    def names(self) -> list[str]:
        with self.transaction() as conn:
            if not self._has_catalog(conn):
                return []
            query = sql.SQL("SELECT name FROM {} ORDER BY name").format(sql.Identifier(CATALOG))
            return [row[0] for row in conn.execute(query)]

    def gallery(self, name, dim=None, create=False, index=None, **params) -> PostgresGallery:
        check_name(name)
        dim = check_dim(dim)
        with self.transaction() as conn:
            row = self.catalog_row(conn, name)
        if row is None and create:
            index = index or self.default_index
            checked = check_params(index, params, dim)
            with self.transaction() as conn:
                self._ensure_catalog(conn)
                row = self.catalog_row(conn, name, lock=True)
                if row is None:
                    conn.execute(
                        sql.SQL(
                            "INSERT INTO {} (name, dim, index_type, params) VALUES (%s, %s, %s, %s)"
                        ).format(sql.Identifier(CATALOG)),
                        (name, dim, index, Jsonb(checked)),
                    )
                    row = self.catalog_row(conn, name)
                    if dim is not None:
                        create_table(conn, row["uid"], dim, index, checked, with_hnsw=True)
        if row is None:
            raise self._not_found(name)
        search_time = reopen_params(
            self.location, name, row["index_type"], row["params"], index, params, row["dim"], dim
        )
        return PostgresGallery(self, name, row["uid"], search_time)

    def drop(self, name) -> None:
        check_name(name)
        with self.transaction() as conn:
            row = self.catalog_row(conn, name, lock=True)
            if row is not None:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table(row["uid"])))
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE uid = %s").format(sql.Identifier(CATALOG)),
                    (row["uid"],),
                )
        if row is None:
            raise self._not_found(name)
