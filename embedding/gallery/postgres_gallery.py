"""One gallery of a PostgreSQL store (`embedding.gallery.postgres_store` describes the layout,
the search and the transactions), and the tables and indexes behind it."""

from __future__ import annotations

import numpy as np

from embedding.gallery.checks import (
    DimensionError,
    EmptyGalleryError,
    UnknownIdError,
    as_ids,
    check_k,
    check_labels,
    check_metadata,
    check_new_ids,
    check_vectors,
)
from embedding.gallery.filters import check_where
from embedding.gallery.index_base import positive_param
from embedding.gallery.store_base import (
    GalleryConflictError,
    GalleryNotFoundError,
    StoredGallery,
    StoreError,
)
from embedding.gallery.vectors import check_finite, l2_normalize
from embedding.metrics import Calibration

try:  # the `postgres` extra, optional: the other stores need neither
    import psycopg
    from pgvector import HalfVector
    from pgvector.psycopg import register_vector
    from psycopg import sql
    from psycopg.types.json import Jsonb
except ImportError:  # reported when a postgresql:// store is opened
    psycopg = sql = Jsonb = HalfVector = register_vector = None

EXTRA = "pip install 'keras-convnext[postgres]' (psycopg, pgvector)"
CATALOG = "embedding_galleries"
BULK_ROWS = 5000
INDEXES = {
    "hnsw": {"dtype": "float32", "m": 16, "ef_construction": 64, "ef_search": 128},
    "exact": {"dtype": "float32"},
}
COLUMN_TYPES = {"float32": ("vector", "vector_ip_ops", 2000), "float16": ("halfvec",
                "halfvec_ip_ops", 4000)}  # fmt: skip
MAX_DIM = 16000  # pgvector's column limit


def check_params(index, params: dict, dim=None) -> dict:
    """The index's parameters, defaults filled in; a ValueError/TypeError for anything else."""
    if index not in INDEXES:
        raise StoreError(
            f"index {index!r} is not offered by PostgreSQL stores: use {', '.join(INDEXES)}."
        )
    unknown = sorted(set(params) - set(INDEXES[index]))
    if unknown:
        raise TypeError(
            f"index {index!r} has no parameter {', '.join(map(repr, unknown))}; its "
            f"parameters: {', '.join(INDEXES[index])}."
        )
    merged = {**INDEXES[index], **params}
    if merged["dtype"] not in COLUMN_TYPES:
        raise ValueError(
            f"dtype must be one of {', '.join(COLUMN_TYPES)}; got {merged['dtype']!r}."
        )
    for key in set(merged) - {"dtype"}:
        merged[key] = positive_param(key, merged[key], low=2 if key == "m" else 1, high=1000)
    check_column_dim(index, merged["dtype"], dim)
    return merged


def check_column_dim(index, dtype, dim):
    if dim is None:
        return
    limit = COLUMN_TYPES[dtype][2] if index == "hnsw" else MAX_DIM
    if dim > limit:
        raise DimensionError(
            f"pgvector's {index} index on {COLUMN_TYPES[dtype][0]} holds at most {limit} "
            f"dimensions, not {dim}" + (" (dtype='float16' goes to 4000)." if dim <= 4000 else ".")
        )


def server_message(error) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def table(uid: int, suffix: str = ""):
    """The identifier of a gallery's table (or of one of its indexes), from its integer uid."""
    return sql.Identifier(f"embedding_gallery_{int(uid)}{suffix}")


def create_table(conn, uid, dim, index, params, with_hnsw):
    column, _, _ = COLUMN_TYPES[params["dtype"]]
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (seq bigint GENERATED ALWAYS AS IDENTITY, id bigint PRIMARY KEY, "
            "label text NOT NULL, metadata jsonb NOT NULL DEFAULT '{{}}', "
            "added timestamptz NOT NULL DEFAULT now(), embedding {}({}) NOT NULL)"
        ).format(table(uid), sql.SQL(column), sql.Literal(int(dim)))
    )
    for suffix, definition in (
        ("_seq", "(seq)"),
        ("_label", "USING hash (label)"),
        ("_metadata", "USING gin (metadata jsonb_path_ops)"),
    ):
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} " + definition).format(table(uid, suffix), table(uid))
        )
    if with_hnsw and index == "hnsw":
        create_hnsw(conn, uid, params, rows=0, dim=dim)


def create_hnsw(conn, uid, params, rows, dim):
    """The HNSW index of a gallery's table, built in memory (maintenance_work_mem sized to
    the rows) with the gallery's `m` and `ef_construction`."""
    _, operators, _ = COLUMN_TYPES[params["dtype"]]
    needed_mb = int(rows * (dim * 4 + params["m"] * 16) * 1.5 / 2**20) + 64
    conn.execute(
        "SELECT set_config('maintenance_work_mem', %s, true)", (f"{min(needed_mb, 4096)}MB",)
    )
    conn.execute(
        sql.SQL(
            "CREATE INDEX {} ON {} USING hnsw (embedding {}) WITH (m = {}, ef_construction = {})"
        ).format(
            table(uid, "_hnsw"),
            table(uid),
            sql.SQL(operators),
            sql.Literal(int(params["m"])),
            sql.Literal(int(params["ef_construction"])),
        )
    )


class PostgresGallery(StoredGallery):
    """One gallery of a `PostgresStore`: every call is SQL (nothing is kept in memory but
    this object's search-time settings)."""

    def __init__(self, store, name: str, uid: int, search_params: dict):
        self.store, self.name, self._uid = store, name, uid
        self.location = f"{store.location}#{name}"
        self._search_params = {}
        if search_params:
            self.set_search_params(**search_params)

    # -- the catalog row -------------------------------------------------------------

    def _row(self, conn, lock=False) -> dict:
        row = self.store.catalog_row(conn, self.name, lock=lock)
        if row is None or row["uid"] != self._uid:
            raise GalleryNotFoundError(f"{self.location}: the gallery was dropped.")
        return row

    def _info(self) -> dict:
        with self.store.transaction() as conn:
            return self._row(conn)

    def __len__(self):
        return int(self._info()["count"])

    @property
    def dim(self):
        return self._info()["dim"]

    @property
    def index_type(self) -> str:
        return self._info()["index_type"]

    @property
    def index_params(self) -> dict:
        return {**self._info()["params"], **self._search_params}

    @property
    def calibration(self):
        record = self._info()["calibration"]
        return Calibration.from_dict(record) if record is not None else None

    @calibration.setter
    def calibration(self, calibration):
        record = Jsonb(calibration.to_dict()) if calibration is not None else None
        with self.store.transaction() as conn:
            self._row(conn, lock=True)
            conn.execute(
                sql.SQL("UPDATE {} SET calibration = %s, version = version + 1 WHERE uid = %s")
                .format(sql.Identifier(CATALOG)),
                (record, self._uid),
            )  # fmt: skip

    def set_search_params(self, **params):
        """`ef_search` (hnsw) for this object's searches."""
        allowed = ("ef_search",) if self.index_type == "hnsw" else ()
        for key, value in params.items():
            if key not in allowed:
                raise TypeError(
                    f"index {self.index_type!r}: {key} is not a search-time parameter here "
                    f"(search-time parameters: {', '.join(allowed) or 'none'})."
                )
            self._search_params[key] = positive_param(key, value, high=1000)
        return self

    # -- reading ---------------------------------------------------------------------

    def _select(self, columns: str, tail: str = "ORDER BY seq", values=()):
        """Rows of this gallery's table; `columns` and `tail` are fixed SQL of this module."""
        with self.store.transaction() as conn:
            self._row(conn)
            query = sql.SQL(f"SELECT {columns} FROM {{}} {tail}").format(table(self._uid))
            return conn.execute(query, values).fetchall() if self._has_table(conn) else []

    def _has_table(self, conn) -> bool:
        found = conn.execute("SELECT to_regclass(%s)", (f"embedding_gallery_{self._uid}",))
        return found.fetchone()[0] is not None

    @property
    def ids(self) -> np.ndarray:
        return np.asarray([r[0] for r in self._select("id")], dtype=np.int64)

    @property
    def labels(self) -> list[str]:
        return [r[0] for r in self._select("label")]

    def counts(self) -> dict[str, int]:
        rows = self._select("label, count(*)", "GROUP BY label ORDER BY min(seq)")
        return {label: int(count) for label, count in rows}

    def _by_id(self, ids, column):
        ids = as_ids(ids)
        found = dict(self._select(f"id, {column}", "WHERE id = ANY(%s)", (ids.tolist(),)))
        missing = [i for i in ids.tolist() if i not in found]
        if missing:
            raise UnknownIdError(
                f"{len(missing)} id(s) not in the gallery: {missing[:5]}"
                + (" ..." if len(missing) > 5 else "")
            )
        return [found[i] for i in ids.tolist()]

    def labels_of(self, ids) -> list[str]:
        return self._by_id(ids, "label")

    def metadata_of(self, ids) -> list[dict]:
        return self._by_id(ids, "metadata")

    def rows(self):
        rows = self._select("id, embedding, label, metadata")
        dim = self.dim or 0
        vectors = np.zeros((len(rows), dim), dtype=np.float32)
        for i, row in enumerate(rows):
            vectors[i] = row[1].to_numpy()
        ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        return ids, vectors, [r[2] for r in rows], [r[3] for r in rows]

    @property
    def embeddings(self) -> np.ndarray:
        return self.rows()[1]

    # -- searching -------------------------------------------------------------------

    def _query(self, queries, k, where):
        """(ids (M, k), labels (M, k) object array, scores (M, k), single)."""
        k = check_k(k)
        conditions = check_where(where)
        q = np.asarray(queries, dtype=np.float32)
        single = q.ndim == 1
        q = q[None] if single else q
        with self.store.transaction() as conn:
            row = self._row(conn)
            if row["count"] == 0:
                raise EmptyGalleryError("The gallery is empty.")
            dim = row["dim"]
            if q.ndim != 2 or q.shape[1] != dim:
                raise DimensionError(f"Query must be ({dim},) or (M, {dim}), got {q.shape}.")
            q = l2_normalize(check_finite(q, "Queries"))
            k = min(k, int(row["count"]))
            hnsw = row["index_type"] == "hnsw"
            if hnsw:
                ef = self._search_params.get("ef_search", row["params"]["ef_search"])
                conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(max(ef, k)),))
                if conditions:
                    conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
            filters, values = _filter_sql(conditions)
            column, _, _ = COLUMN_TYPES[row["params"]["dtype"]]
            statement = sql.SQL(
                "SELECT q.i, t.id, t.label, t.score FROM unnest(%s::int[], %s::vector[]) "
                "AS q(i, v) CROSS JOIN LATERAL (SELECT id, label, "
                "-(embedding <#> q.v::{column}) AS score FROM {table} {filters} "
                "ORDER BY embedding <#> q.v::{column}{tie} LIMIT %s) t"
            ).format(
                column=sql.SQL(column),
                table=table(row["uid"]),
                filters=filters,
                tie=sql.SQL("" if hnsw else ", seq"),
            )
            rows = conn.execute(statement, (list(range(len(q))), list(q), *values, k)).fetchall()
        ids = np.full((len(q), k), -1, dtype=np.int64)
        labels = np.full((len(q), k), "", dtype=object)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        found: dict[int, list] = {}
        for i, vector_id, label, score in rows:
            found.setdefault(i, []).append((-score, vector_id, label))
        for i, hits in found.items():
            hits.sort()  # relaxed_order: a filtered HNSW scan may return them slightly unsorted
            for column_index, (negative, vector_id, label) in enumerate(hits[:k]):
                ids[i, column_index], labels[i, column_index] = vector_id, label
                scores[i, column_index] = -negative
        return ids, labels, scores, single

    def search_ids(self, queries, k: int = 5, where=None):
        ids, _, scores, single = self._query(queries, k, where)
        return (ids[0], scores[0]) if single else (ids, scores)

    def search(self, queries, k: int = 5, where=None):
        _, labels, scores, single = self._query(queries, k, where)
        labels = labels.astype(str)
        return (labels[0].tolist(), scores[0]) if single else (labels, scores)

    # -- changing --------------------------------------------------------------------

    def _bump(self, conn, added=0, next_id=None):
        conn.execute(
            sql.SQL(
                "UPDATE {} SET count = count + %s, version = version + 1, "
                "next_id = greatest(next_id, %s) WHERE uid = %s"
            ).format(sql.Identifier(CATALOG)),
            (added, next_id if next_id is not None else 0, self._uid),
        )

    def add(self, embeddings, labels, metadata=None, *, ids=None):
        row = self._info()
        vectors = l2_normalize(check_vectors(embeddings, row["dim"]))
        labels = check_labels(labels, vectors.shape[0])
        metadata = check_metadata(metadata, vectors.shape[0])
        given = check_new_ids(ids, len(labels)) if ids is not None else None
        if not len(labels):
            return np.zeros(0, dtype=np.int64)
        check_column_dim(row["index_type"], row["params"]["dtype"], vectors.shape[1])
        with self.store.transaction() as conn:
            row = self._row(conn, lock=True)
            index, params, dim = row["index_type"], row["params"], vectors.shape[1]
            if row["dim"] is None:
                create_table(conn, self._uid, dim, index, params, with_hnsw=False)
                conn.execute(
                    sql.SQL("UPDATE {} SET dim = %s WHERE uid = %s").format(
                        sql.Identifier(CATALOG)
                    ),
                    (dim, self._uid),
                )
                rebuild = index == "hnsw"
            else:
                check_vectors(vectors, row["dim"])  # another process set the dimension
                rebuild = index == "hnsw" and len(labels) >= max(BULK_ROWS, row["count"])
                if rebuild:
                    conn.execute(
                        sql.SQL("DROP INDEX IF EXISTS {}").format(table(self._uid, "_hnsw"))
                    )
            if given is not None:
                taken = conn.execute(
                    sql.SQL("SELECT id FROM {} WHERE id = ANY(%s) ORDER BY id LIMIT 5").format(
                        table(self._uid)
                    ),
                    (given.tolist(),),
                ).fetchall()
                if taken:
                    raise GalleryConflictError(
                        f"ids already in the gallery: {[r[0] for r in taken]} (remove them first)."
                    )
            new_ids = (
                given
                if given is not None
                else np.arange(row["next_id"], row["next_id"] + len(labels), dtype=np.int64)
            )
            self._copy(conn, new_ids, vectors, labels, metadata, params["dtype"])
            if rebuild:
                create_hnsw(conn, self._uid, params, rows=row["count"] + len(labels), dim=dim)
            self._bump(conn, len(labels), int(new_ids.max()) + 1)
        return new_ids.copy()

    def _copy(self, conn, ids, vectors, labels, metadata, dtype):
        column = COLUMN_TYPES[dtype][0]
        wrap = (lambda v: HalfVector(v)) if column == "halfvec" else (lambda v: v)
        statement = sql.SQL(
            "COPY {} (id, label, metadata, embedding) FROM STDIN WITH (FORMAT BINARY)"
        ).format(table(self._uid))
        with conn.cursor().copy(statement) as copy:
            copy.set_types(["int8", "text", "jsonb", column])
            for i, label, entry, vector in zip(
                ids.tolist(), labels, metadata, vectors, strict=True
            ):
                copy.write_row((i, label, Jsonb(entry), wrap(vector)))

    def _delete(self, conn, condition: str, values) -> list[int]:
        deleted = conn.execute(
            sql.SQL(f"DELETE FROM {{}} WHERE {condition} RETURNING id").format(table(self._uid)),
            values,
        ).fetchall()
        if deleted:
            self._bump(conn, -len(deleted))
        return [r[0] for r in deleted]

    def remove(self, ids):
        ids = np.unique(as_ids(ids))
        if not ids.size:
            return self
        with self.store.transaction() as conn:
            self._row(conn, lock=True)
            deleted = self._delete(conn, "id = ANY(%s)", (ids.tolist(),))
            if len(deleted) != ids.size:
                missing = np.setdiff1d(ids, deleted)
                raise UnknownIdError(
                    f"{missing.size} id(s) not in the gallery: {missing[:5].tolist()}"
                    + (" ..." if missing.size > 5 else "")
                )
        return self

    def remove_label(self, label) -> int:
        (label,) = check_labels(label, 1)
        with self.store.transaction() as conn:
            self._row(conn, lock=True)
            return len(self._delete(conn, "label = %s", (label,)))

    def relabel(self, ids, labels):
        ids = as_ids(ids)
        labels = check_labels([labels] * ids.size if isinstance(labels, str) else labels, ids.size)
        chosen = dict(zip(ids.tolist(), labels, strict=True))  # a repeated id: its last label
        if not chosen:
            return self
        with self.store.transaction() as conn:
            self._row(conn, lock=True)
            changed = conn.execute(
                sql.SQL(
                    "UPDATE {} AS t SET label = v.label FROM unnest(%s::bigint[], %s::text[]) "
                    "AS v(id, label) WHERE t.id = v.id RETURNING t.id"
                ).format(table(self._uid)),
                (list(chosen), list(chosen.values())),
            ).fetchall()
            if len(changed) != len(chosen):
                missing = sorted(set(chosen) - {r[0] for r in changed})
                raise UnknownIdError(
                    f"{len(missing)} id(s) not in the gallery: {missing[:5]}"
                    + (" ..." if len(missing) > 5 else "")
                )
            self._bump(conn)
        return self


def _filter_sql(conditions):
    """(a WHERE clause, its values) for a `check_where` filter: jsonb containment."""
    if not conditions:
        return sql.SQL(""), ()
    equal = {key: values[0] for key, values in conditions if len(values) == 1}
    parts, values = [], []
    if equal:
        parts.append(sql.SQL("metadata @> %s"))
        values.append(Jsonb(equal))
    for key, options in conditions:
        if len(options) > 1:
            parts.append(sql.SQL("metadata @> ANY(%s::jsonb[])"))
            values.append([Jsonb({key: option}) for option in options])
    return sql.SQL("WHERE ") + sql.SQL(" AND ").join(parts), tuple(values)
