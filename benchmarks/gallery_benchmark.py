"""Gallery search at scale: every index type against exact search and a naive Python loop.

    python benchmarks/gallery_benchmark.py --sizes 100000,1000000 --dim 320 \\
        --output benchmarks/results/gallery_cpu

Data: N random unit vectors of dimension D (standard normal, normalised: in
320 dimensions two of them have cosine ~N(0, 0.056)), and Q queries, each a
noisy copy of a random gallery vector (noise 0.5 / sqrt(D) per coordinate,
cosine ~0.89 to its source: a planted near-duplicate).

For every index (`embedding.Gallery(index=...)` with its default parameters):
  build s        `Gallery(index=...).add(vectors, labels)` (IVF-PQ: training included)
  index MB       the index's own bytes (the exact matrix; FAISS's serialised index)
  RSS MB         growth of the process's resident memory over the build: the index plus
                 the gallery's bookkeeping (a list of ids and of references to the
                 labels, which exist before the build: ~70 bytes per vector)
  queries/s      `search_ids(queries, k=10)` on all Q queries at once (one warm-up call first)
  planted@1      fraction of queries whose planted source comes first
  recall@1, @10  agreement with the exact index's top 1 / top 10 (exact indexes: 1 by definition)

With --sweep, the built HNSW and IVF-PQ indexes are also searched with larger
`ef_search` / `nprobe` (no rebuild): the speed/recall trade-off.

The naive loop is what a user writes without an index (as deepface's `find` did):
for each query, a Python loop computing the cosine with every stored vector, then a
sort. It is timed on a subsample of the gallery and extrapolated linearly to N
(per-vector work is constant), and labelled as such.

The load average is recorded before and after every measurement: compare numbers
only from one run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from embedding.gallery import Gallery  # noqa: E402

# search-time settings also measured on the same built index (--sweep): speed against recall
SWEEPS = {"hnsw": ("ef_search", (256, 512)), "ivfpq": ("nprobe", (64, 128))}
INDEXES = {  # name in the table -> Gallery arguments
    "exact": {"index": "exact"},
    "exact float16": {"index": "exact", "dtype": "float16"},
    "flat": {"index": "flat"},
    "hnsw": {"index": "hnsw"},
    "ivfpq": {"index": "ivfpq"},
}


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def planted_data(n, dim, queries, seed):
    """(gallery (n, dim) unit float32, queries (q, dim), the source row of each query)."""
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):  # in place, chunk by chunk: no second copy
        block = gallery[start : start + 65536]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    source = rng.choice(n, queries, replace=False)
    noisy = gallery[source] + (0.5 / np.sqrt(dim)) * rng.standard_normal((queries, dim))
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    return gallery, noisy.astype(np.float32), source


def index_bytes(gallery: Gallery) -> int:
    index = gallery._index
    if gallery.index_type == "exact":
        return int(index.embeddings.nbytes)
    return int(index.faiss.serialize_index(index._index).nbytes)


def naive_search(query, representations, k=10):
    """The per-query loop a user writes without an index (cosine, then sort)."""
    similarities = []
    for label, vector in representations:
        similarity = np.dot(query, vector) / (np.linalg.norm(query) * np.linalg.norm(vector))
        similarities.append((similarity, label))
    similarities.sort(key=lambda pair: pair[0], reverse=True)
    return similarities[:k]


def measure_naive(vectors, queries, n, sample, sample_queries):
    sample = min(sample, len(vectors))
    representations = [(f"p{i}", vectors[i]) for i in range(sample)]
    naive_search(queries[0], representations[:100])  # warm-up
    start = time.perf_counter()
    for query in queries[:sample_queries]:
        naive_search(query, representations)
    per_query = (time.perf_counter() - start) / sample_queries
    return {
        "index": "naive Python loop",
        "params": {},
        "queries_per_s": 1.0 / (per_query * n / sample),
        "extrapolated_from": f"{sample_queries} queries over {sample:,} vectors",
        "seconds_per_query_at_n": per_query * n / sample,
        "load_after": load_average(),
    }


def search_row(gallery, queries, source, exact_top, k):
    """Queries/s, planted@1 and recall against exact of `gallery` as it is set now."""
    gallery.search_ids(queries[:10], k=k)  # warm-up
    start = time.perf_counter()
    ids, _ = gallery.search_ids(queries, k=k)
    search = time.perf_counter() - start
    row = {
        "params": gallery.index_params,
        "queries_per_s": len(queries) / search,
        "planted_at_1": float(np.mean(ids[:, 0] == source)),
        "load_after": load_average(),
    }
    if exact_top is not None:
        row["recall_at_1"] = float(np.mean(ids[:, 0] == exact_top[:, 0]))
        row["recall_at_10"] = float(
            np.mean([np.intersect1d(a, b).size / k for a, b in zip(ids, exact_top, strict=True)])
        )
    return row, ids


def measure(name, args, vectors, queries, source, exact_top, k, sweep=False):
    """[row of the default settings, rows of the --sweep settings], top-k ids (defaults)."""
    labels = [f"p{i}" for i in range(len(vectors))]
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    gallery = Gallery(**args).add(vectors, labels)
    build = time.perf_counter() - start
    grown = rss_mb() - before
    row, ids = search_row(gallery, queries, source, exact_top, k)
    rows = [
        {
            "index": name,
            "build_s": build,
            "index_mb": index_bytes(gallery) / 2**20,
            "rss_growth_mb": grown,
            **row,
        }
    ]
    if sweep and name in SWEEPS:
        key, values = SWEEPS[name]
        for value in values:
            gallery.set_search_params(**{key: value})
            extra, _ = search_row(gallery, queries, source, exact_top, k)
            rows.append({"index": f"{name}, {key}={value} (same index)", **extra})
    del gallery
    gc.collect()
    return rows, ids


def markdown(report) -> str:
    lines = [
        f"# Gallery benchmark ({report['date']})",
        "",
        f"{report['machine']}; numpy {report['numpy']}, faiss {report['faiss']}; "
        f"{report['faiss_threads']} thread(s); dimension {report['dim']}, {report['queries']} "
        f"planted queries, k={report['k']}; load average {report['load_start']} at the start, "
        f"{report['load_end']} at the end.",
        "",
        "| gallery | index | build s | index MB | RSS MB | queries/s | planted@1 | "
        "recall@1 | recall@10 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in report["sizes"]:
        for row in size["rows"]:
            if "extrapolated_from" in row:
                lines.append(
                    f"| {size['n']:,} | {row['index']} (extrapolated from "
                    f"{row['extrapolated_from']}) | - | - | - | {row['queries_per_s']:.3g} | "
                    "- | - | - |"
                )
                continue
            recall1 = f"{row['recall_at_1']:.4f}" if "recall_at_1" in row else "-"
            recall10 = f"{row['recall_at_10']:.4f}" if "recall_at_10" in row else "-"
            built = (
                f"{row['build_s']:.1f} | {row['index_mb']:.0f} | {row['rss_growth_mb']:.0f}"
                if "build_s" in row
                else "- | - | -"
            )
            lines.append(
                f"| {size['n']:,} | {row['index']} | {built} | {row['queries_per_s']:,.0f} | "
                f"{row['planted_at_1']:.4f} | {recall1} | {recall10} |"
            )
    lines += ["", "Parameters (defaults; IVF-PQ's nlist is chosen at training):", ""]
    for size in report["sizes"]:
        for row in size["rows"]:
            if row["params"] and "build_s" in row:
                lines.append(f"- {size['n']:,} {row['index']}: `{row['params']}`")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="gallery sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=320)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--indexes", default=",".join(INDEXES), help="subset of " + ",".join(INDEXES)
    )
    parser.add_argument("--naive-sample", type=int, default=20000, metavar="N")
    parser.add_argument("--naive-queries", type=int, default=3, metavar="Q")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for FAISS (OpenMP) and numpy's BLAS (default: theirs); 1 avoids "
        "OpenMP's slowdowns on a machine whose cores other processes also use",
    )
    parser.add_argument("--output", default=os.path.join(HERE, "results", "gallery_cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also search the built hnsw / ivfpq index with larger ef_search / nprobe",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.dim, args.queries, args.naive_sample = "3000", 32, 50, 500
    names = [n for n in args.indexes.split(",") if n]
    unknown = sorted(set(names) - set(INDEXES))
    if unknown:
        parser.error(f"unknown index {unknown}; choose from {', '.join(INDEXES)}")
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)  # numpy's BLAS, for the exact index
    try:
        import faiss

        if args.threads:
            faiss.omp_set_num_threads(args.threads)
        faiss_version, threads = faiss.__version__, faiss.omp_get_max_threads()
    except ImportError:
        faiss_version, threads = None, 0
        names = [n for n in names if INDEXES[n]["index"] == "exact"]
    report = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss_version,
        "faiss_threads": threads,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "load_start": load_average(),
        "sizes": [],
    }
    for n in (int(s) for s in args.sizes.split(",")):
        vectors, queries, source = planted_data(n, args.dim, args.queries, args.seed)
        rows, exact_top = [], None
        if "exact" not in names and len(names):  # the reference for recall, not timed
            reference = Gallery().add(vectors, ["x"] * n)
            exact_top = reference.search_ids(queries, k=args.k)[0]
            del reference
        for name in names:
            measured, ids = measure(
                name, INDEXES[name], vectors, queries, source, exact_top, args.k, args.sweep
            )
            if name == "exact":
                exact_top = ids
                measured[0]["recall_at_1"] = measured[0]["recall_at_10"] = 1.0
            rows.extend(measured)
            for row in measured:
                print(json.dumps({"n": n, **row}), flush=True)
        naive = measure_naive(vectors, queries, n, args.naive_sample, args.naive_queries)
        rows.append(naive)
        print(json.dumps({"n": n, **naive}), flush=True)
        report["sizes"].append({"n": n, "rows": rows})
        del vectors
        gc.collect()
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
