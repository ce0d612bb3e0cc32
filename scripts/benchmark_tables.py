"""Regenerate the documentation's benchmark tables from `benchmarks/results/*.json`.

    python scripts/benchmark_tables.py          # rewrite the tables wherever they are
    python scripts/benchmark_tables.py --check  # exit 1 if a page is out of date

A page asks for a table by fencing its place (see `markdown_pages`):

    <!-- benchmark-table:inference:begin -->
    <!-- benchmark-table:inference:end -->

and this script writes it there, with the date, the machine and the load average of
the run it comes from. The tables (`TABLES`): `inference` and `inference-memory`
(speed and peak memory against timm), `against-compiled-float32` and
`against-compiled-bfloat16` (round three: timm eager and timm + torch.compile; the
`-epyc` ones: the same on a second machine; `-malloc-epyc`: there, with glibc's malloc
keeping freed memory in every side's process; `-kept-epyc`: there, with the library
keeping its own process's freed memory, `torch_keep_freed_memory`; `-heap-epyc`: with
JAX's batches sized for glibc's heaps too, `jax_heap_sized_batches`),
`end-to-end`, `cold-start` and `cold-start-user-install`, `gallery`, `gallery-sweep` and
`gallery-stores`, `export-parity`, `serve`. A new results file gets a new entry in
`TABLES`; rerunning a benchmark into the same file and then this script updates every
page that shows it.

The gallery tables are the benchmark's own (`gallery_benchmark.markdown`); the others
are laid out for a reader here (one column per backend, phases without the
zero-second ones), from the JSON the benchmarks' own `.md` files were written from.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from markdown_pages import ROOT, fenced_names, replace_between, update_pages  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PREFIX = "benchmark-table"
# the benchmark's side names -> column titles
COLUMNS = {
    "keras-jax": "JAX",
    "keras-tensorflow": "TensorFlow",
    "keras-torch": "PyTorch",
    "keras-jax +XLA_FLAGS": "JAX + XLA_FLAGS",
}
FORMATS = {"onnx": "ONNX", "litert": "LiteRT", "saved_model": "SavedModel (reloaded)"}


def read(name: str) -> dict:
    with open(RESULTS / f"{name}.json") as f:
        return json.load(f)


def _benchmark_module(module: str):
    """benchmarks/<module>.py, whose renderer is one of these tables' source."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(module)


def _load_range(values) -> str:
    values = [v for v in values if v is not None]
    return f"{min(values):.1f}-{max(values):.1f}" if values else "n/a"


def _machine(report: dict) -> str:
    m = report["machine"]
    return f"{m['cpu']}, {m['usable_cpus'] or m['logical_cpus']} usable CPUs"


def _caption(report: dict, rows) -> str:
    loads = [v for row in rows for v in row.get("load_1min", [])]
    return (
        f"Measured {report['created'][:10]} on {_machine(report)}; 1-minute load average "
        f"{_load_range(loads)} during the run (`benchmarks/results/{report['_name']}.md` "
        "has every figure)." + _benchmark_module("benchmark").allocator_sentence(report)
    )


def _pivot(report: dict, first: tuple[str, str], cell) -> str:
    """(variant, batch) rows; `first` = (title, format of timm's row), then one column
    per Keras side with `cell(row)`."""
    rows = report["results"]
    sides = [name for name in dict.fromkeys(r["name"] for r in rows) if name != "timm"]
    lines = [
        f"| variant | batch | {first[0]} | " + " | ".join(COLUMNS.get(s, s) for s in sides) + " |",
        "|---|---:|---:|" + "---:|" * len(sides),
    ]
    for variant, batch in dict.fromkeys((r["variant"], r["batch_size"]) for r in rows):
        group = {r["name"]: r for r in rows if (r["variant"], r["batch_size"]) == (variant, batch)}
        cells = [first[1].format(**group["timm"])]
        cells += [cell(group[s]) if s in group else "" for s in sides]
        lines.append(f"| {variant} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def inference(name="cpu_r224_float32") -> str:
    report = {**read(name), "_name": name}
    cfg = report["config"]
    table = _pivot(
        report, ("timm eager img/s", "{images_per_s:.1f}"), lambda r: f"{r['ratio_to_timm']:.2f}x"
    )
    return (
        f"{_caption(report, report['results'])} {cfg['resolution']}x{cfg['resolution']}, "
        f"{cfg['dtype']}, Keras `{', '.join(cfg['calls'])}`; ratio = our images/s over timm "
        "eager's, so > 1 is faster.\n\n" + table
    )


def against_compiled(name: str) -> str:
    """Round three's table (a run with `--timm-compile`): per (variant, batch), timm eager's
    images/s, timm + torch.compile's ratio to it, each backend's ratio to timm eager and
    to timm + torch.compile, the best backend's ratio to timm + torch.compile and its
    share of the CPU's peak; then each side's first call (compilation) in seconds."""
    report = {**read(name), "_name": name}
    cfg, rows = report["config"], report["results"]
    backends = [n for n in dict.fromkeys(r["name"] for r in rows) if n.startswith("keras-")]
    peak = (report["machine"].get("peak_gflops") or {}).get(cfg["dtype"])
    titles = [COLUMNS.get(b, b) for b in backends]
    speed = [
        "| variant | batch | timm eager img/s | timm + compile | "
        + " | ".join(titles)
        + " | best vs timm + compile | best GFLOP/s (of peak) |",
        "|---|---:|---:|---:|" + "---:|" * (len(backends) + 2),
    ]
    first = [
        "| variant | batch | timm + compile | " + " | ".join(titles) + " |",
        "|---|---:|---:|" + "---:|" * len(backends),
    ]
    for variant, batch in dict.fromkeys((r["variant"], r["batch_size"]) for r in rows):
        group = {r["name"]: r for r in rows if (r["variant"], r["batch_size"]) == (variant, batch)}
        timm, compiled = group["timm"], group["timm +compile"]
        ours = [group[b] for b in backends if b in group]
        best = max(ours, key=lambda r: r["images_per_s"])
        best_title = COLUMNS.get(best["name"], best["name"])
        share = f" ({best['gflops_per_s'] / peak:.1%})" if peak else ""
        speed.append(
            f"| {variant} | {batch} | {timm['images_per_s']:.1f} "
            f"| {compiled['ratio_to_timm']:.2f}x | "
            + " | ".join(
                f"{r['ratio_to_timm']:.2f}x / {r['ratio_to_timm_compiled']:.2f}x" for r in ours
            )
            + f" | {best['ratio_to_timm_compiled']:.2f}x ({best_title})"
            f" | {best['gflops_per_s']:.0f}{share} |"
        )
        first.append(
            f"| {variant} | {batch} | {compiled['first_call_s']:.1f} | "
            + " | ".join(f"{r['first_call_s']:.1f}" for r in ours)
            + " |"
        )
    derivation = (report["machine"].get("peak_gflops") or {}).get("derivation")
    peak_text = f" Peak {peak:,.0f} GFLOP/s: {derivation}." if peak else ""
    return (
        f"{_caption(report, rows)} {cfg['resolution']}x{cfg['resolution']}, {cfg['dtype']} "
        f"on every side, Keras `{', '.join(cfg['calls'])}`. A backend's cell: its images/s "
        f"over timm eager's / over timm + torch.compile's, so > 1 is faster.{peak_text}\n\n"
        + "\n".join(speed)
        + "\n\nFirst call in seconds (compilation: torch.compile, JAX's jit, TensorFlow's "
        "trace; never inside the timed passes):\n\n" + "\n".join(first)
    )


def inference_memory(name="cpu_r224_float32") -> str:
    report = {**read(name), "_name": name}
    table = _pivot(
        report,
        ("timm peak RSS MB", "{peak_rss_mb:,.0f}"),
        lambda r: f"{r['rss_ratio_to_timm']:.2f}x",
    )
    return (
        f"{_caption(report, report['results'])} Peak resident memory of the inference "
        "worker over timm's, so < 1 is less memory.\n\n" + table
    )


def end_to_end(name="cpu_embed_e2e_b32") -> str:
    report = {**read(name), "_name": name}
    model_only = {r["name"]: r for r in report["results"]}
    lines = [
        "| implementation | images | end to end img/s | vs timm | model alone vs timm |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["end_to_end"]:
        side = model_only.get(row["name"].split()[0])
        alone = f"{side['ratio_to_timm']:.2f}x" if side else "-"
        lines.append(
            f"| {row['name']} | {row['images']} | {row['images_per_s']:.1f} "
            f"| {row['ratio_to_timm']:.2f}x | {alone} |"
        )
    variants = ", ".join(report["config"]["variants"])
    batches = ", ".join(map(str, report["config"]["batch_sizes"]))
    return f"{_caption(report, report['results'])} {variants} at batch {batches}.\n\n" + "\n".join(
        lines
    )


def _table_after(markdown: str, heading: str) -> str:
    """The first Markdown table after the line starting with `heading`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table)


def cold_start(name="cpu_cold_start_atto") -> str:
    report = {**read(name), "_name": name}
    lines = [
        "| process | median s | min-max s | vs timm | load (1 min) | where the time goes (s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in report["cold_start"]:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in row["phases_s"].items() if v >= 0.005)
        lines.append(
            f"| {row['name']} | {row['median_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} "
            f"| {row['ratio_to_timm']:.2f}x | {_load_range(row['load_1min'])} | {phases} |"
        )
    rounds = report["cold_start"][0]["runs"]
    return (
        f"{_caption(report, report['cold_start'])} {rounds} alternating runs per process, "
        "median wall time; one more run per process times the phases from inside.\n\n"
        + "\n".join(lines)
    )


def cold_start_user_install() -> str:
    return cold_start("cpu_cold_start_atto_user_install")


def gallery(name="gallery_cpu") -> str:
    report = read(name)
    markdown = _benchmark_module("gallery_benchmark").markdown(report)
    start, end = (f"{v[0]:.1f}" for v in (report["load_start"], report["load_end"]))
    return (
        f"Measured {report['date'][:10]} on {report['machine']}, {report['faiss_threads']} "
        f"thread(s) for FAISS and numpy's BLAS; 1-minute load average {start} at the start, "
        f"{end} at the end (`benchmarks/results/{name}.md` has the parameters).\n\n"
        + _table_after(markdown, "# Gallery benchmark")
    )


def gallery_sweep() -> str:
    return gallery("gallery_cpu_1m_sweep")


def gallery_stores(name="gallery_stores_cpu") -> str:
    report = read(name)
    markdown = _benchmark_module("gallery_store_benchmark").markdown(report)
    start, end = (f"{v[0]:.1f}" for v in (report["load_start"], report["load_end"]))
    return (
        f"Measured {report['date'][:10]} on {report['machine']}, {report['threads']} thread(s) "
        f"for FAISS and numpy's BLAS; SQLite {report['sqlite']}, PostgreSQL "
        f"{report['postgres']} with pgvector {report['pgvector']} on the same machine; "
        f"1-minute load average {start} at the start, {end} at the end "
        f"(`benchmarks/results/{name}.md` has the parameters).\n\n"
        + _table_after(markdown, "# Gallery store benchmark")
    )


def export_parity(backends=("tensorflow", "jax", "torch")) -> str:
    rows = [row for b in backends for row in read(f"export_{b}")["rows"] if "refused" not in row]
    archs = list(dict.fromkeys(row["arch"] for row in rows))
    lines = [
        "| backend | format | dtype | "
        + " | ".join(f"{arch}: max abs diff / min cosine" for arch in archs)
        + " |",
        "|---|---|---|" + "---:|" * len(archs),
    ]
    cells = {(r["backend"], r["format"], r["dtype"], r["arch"]): r for r in rows}
    for key in dict.fromkeys((r["backend"], r["format"], r["dtype"]) for r in rows):
        values = [cells.get((*key, arch)) for arch in archs]
        text = [f"{v['max_abs_diff']:.1e} / {v['min_cosine']:.7f}" if v else "-" for v in values]
        lines.append(
            f"| {key[0]} | {FORMATS.get(key[1], key[1])} | {key[2]} | " + " | ".join(text) + " |"
        )
    return "\n".join(lines)


def serve(name="serve_cpu") -> str:
    report = read(name)
    markdown = _benchmark_module("serve_benchmark").markdown(report)
    start, end = (f"{v:.1f}" for v in (report["load_start"], report["load_end"]))
    return (
        f"Measured {report['date'][:10]} on {report['machine']}: {report['variant']} at "
        f"{report['resolution']}x{report['resolution']}, {report['rounds']} alternating rounds; "
        f"1-minute load average {start} at the start, {end} at the end, per row in the last "
        f"column (`benchmarks/results/{name}.md`). The ratios compare sides measured "
        "alternately in the same run.\n\n" + _table_after(markdown, "# Serving benchmark")
    )


TABLES = {
    "inference": inference,
    "inference-memory": inference_memory,
    "against-compiled-float32": functools.partial(against_compiled, "cpu_r224_float32_compile"),
    "against-compiled-bfloat16": functools.partial(against_compiled, "cpu_r224_bfloat16"),
    "against-compiled-float32-epyc": functools.partial(
        against_compiled, "cpu_r224_float32_compile_epyc"
    ),
    "against-compiled-bfloat16-epyc": functools.partial(against_compiled, "cpu_r224_bfloat16_epyc"),
    "against-compiled-float32-kept-epyc": functools.partial(
        against_compiled, "cpu_r224_float32_kept_epyc"
    ),
    "against-compiled-bfloat16-kept-epyc": functools.partial(
        against_compiled, "cpu_r224_bfloat16_kept_epyc"
    ),
    "against-compiled-float32-heap-epyc": functools.partial(
        against_compiled, "cpu_r224_float32_heap_epyc"
    ),
    "against-compiled-bfloat16-products-epyc": functools.partial(
        against_compiled, "cpu_r224_bfloat16_products_epyc"
    ),
    "against-compiled-float32-malloc-epyc": functools.partial(
        against_compiled, "cpu_r224_float32_malloc_epyc"
    ),
    "against-compiled-bfloat16-malloc-epyc": functools.partial(
        against_compiled, "cpu_r224_bfloat16_malloc_epyc"
    ),
    "against-compiled-bfloat16-xeon-no-bf16": functools.partial(
        against_compiled, "cpu_r224_bfloat16_xeon_no_bf16"
    ),
    "end-to-end": end_to_end,
    "cold-start": cold_start,
    "cold-start-user-install": cold_start_user_install,
    "gallery": gallery,
    "gallery-sweep": gallery_sweep,
    "gallery-stores": gallery_stores,
    "export-parity": export_parity,
    "serve": serve,
}


def updated_page(text: str) -> str:
    """`text` with every benchmark table it fences current; an unknown table name is a
    ValueError listing the known ones."""
    for name in dict.fromkeys(fenced_names(text, PREFIX)):
        if name not in TABLES:
            raise ValueError(f"unknown benchmark table {name!r}; known: {', '.join(TABLES)}")
        text = replace_between(text, f"{PREFIX}:{name}", TABLES[name]())
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a page is stale")
    args = parser.parse_args(argv)
    return update_pages(updated_page, args.check, "benchmark_tables.py")


if __name__ == "__main__":
    sys.exit(main())
