"""Smoke test of benchmarks/benchmark.py in --quick mode, for the current
KERAS_BACKEND only. It checks the structure of the JSON / Markdown it writes and
that the numbers are positive and finite; it never asserts a speed."""

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import BACKEND, benchmark_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "benchmark.py")


def _run(args, tmp_path):
    """Runs the script with its own temporary folder, which it must leave empty."""
    output = str(tmp_path / "result")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cmd = [sys.executable, SCRIPT, "--quick", "--backend", BACKEND, "--output", output, *args]
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(scratch)) == [], "the benchmark left temporary files behind"
    with open(output + ".json") as f:
        report = json.load(f)
    with open(output + ".md") as f:
        markdown = f.read()
    return report, markdown


def test_macs_match_timm_counts():
    # torch.utils.flop_counter on the timm models gives exactly these
    bench = benchmark_script("benchmark")
    assert bench.macs("convnext_atto", 224) == 547_332_480
    assert bench.macs("convnextv2_atto", 224) == 547_332_480
    assert bench.macs("convnext_tiny", 224) == 4_455_531_264
    assert bench.parse_variant("convnextv2_nano") == ("v2", "nano")
    # the script keeps its own size table (its parent process must not import
    # Keras); it has to agree with the models'
    import convnext_v1
    import convnext_v2

    for module in (convnext_v1, convnext_v2):
        for name in module.SIZES:
            variant = module.VARIANTS[name]
            if name in bench._SIZES:
                assert bench._SIZES[name] == (variant.depths, variant.widths), name
    with pytest.raises(ValueError):
        bench.parse_variant("resnet50")


@pytest.mark.slow
@pytest.mark.once("torch")  # the plumbing: 22 s on torch, 82 s on JAX (its workers compile)
def test_quick_benchmark_writes_table(tmp_path):
    calls = ["predict_batch", "predict_on_batch"]
    # one batch size (a worker process per side and size: 3 here, each a fresh process);
    # the pivot tables' one line per batch size is checked with two below, without workers
    report, markdown = _run(
        ["--variant", "convnext_atto", "--batch-size", "1", "--call", ",".join(calls)], tmp_path
    )
    assert report["config"]["quick"] is True
    assert report["config"]["backends"] == [BACKEND]
    assert report["config"]["variants"] == ["convnext_atto"]
    assert report["config"]["batch_sizes"] == [1]
    assert report["config"]["calls"] == calls
    for key in ("cpu", "logical_cpus", "os", "python", "device"):
        assert key in report["machine"]
    rows = report["results"]
    names = ["timm"] + [f"keras-{BACKEND} {call}" for call in calls]
    assert [(row["batch_size"], row["name"]) for row in rows] == [(1, name) for name in names]
    for row in rows:
        assert row["variant"] == "convnext_atto"
        for key in ("images_per_s", "gflops_per_s", "median_s", "min_s", "peak_rss_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["runs"] == report["config"]["rounds"] * report["config"]["iterations"]
        assert row["params"] == 3_695_520  # convnext_atto, both implementations
        assert all(load is None or load >= 0 for load in row["load_1min"])
        assert row["images_per_s"] == pytest.approx(row["batch_size"] / row["median_s"])
    timm_row, *keras_rows = rows
    assert timm_row["ratio_to_timm"] == timm_row["rss_ratio_to_timm"] == 1.0
    for row in keras_rows:
        assert row["ratio_to_timm"] == pytest.approx(row["images_per_s"] / timm_row["images_per_s"])
        assert row["rss_ratio_to_timm"] == pytest.approx(
            row["peak_rss_mb"] / timm_row["peak_rss_mb"]
        )
    # Markdown: two pivot tables (speed, memory: one line per batch size), then the
    # full table (one line per row), then the first calls (and the fraction of this
    # CPU's peak where /proc/cpuinfo gives a clock)
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    speed, memory, full, *extra = tables
    assert [len(table) for table in extra] == [len(speed)] * len(extra)
    assert ("fraction of this CPU's float32 peak" in markdown) == (len(extra) == 3)
    assert "CPU time per pass relative to timm eager" in markdown
    assert all(row["cpu_median_s"] > 0 for row in rows)
    assert "First call in seconds" in markdown and all(row["first_call_s"] > 0 for row in rows)
    assert speed[0] == "| variant | batch | " + " | ".join(names) + " |"
    assert len(speed) == len(memory) == 2 + 1
    assert full[0].startswith("| variant | batch | implementation | img/s | vs timm | GFLOP/s")
    assert len(full) == 2 + len(rows)
    # two batch sizes: one line each in the pivot tables, one per row in the full one
    two = copy.deepcopy(report)
    two["config"]["batch_sizes"] = [1, 2]
    two["results"] += [{**row, "batch_size": 2} for row in copy.deepcopy(rows)]
    bench = benchmark_script("benchmark")
    tables = [t for t in bench.render_markdown(two).split("\n\n") if t.startswith("|")]
    speed, memory, full = (t.splitlines() for t in tables[:3])
    assert len(speed) == len(memory) == 2 + 2 and len(full) == 2 + 2 * len(rows)


def test_timm_compiled_side_and_ratios_to_it(monkeypatch):
    """--timm-compile adds timm + torch.compile second; every row gets its ratio to it,
    and the fraction of the CPU's peak, derived from /proc/cpuinfo's facts."""
    bench = benchmark_script("benchmark")
    sides = bench.sides_for(["torch"], ["predict_batch"], None, timm_compile=True)
    assert [(s.side, s.name) for s in sides] == [
        ("timm", "timm"),
        ("timm-compile", "timm +compile"),
        ("keras", "keras-torch"),
    ]
    facts = {"mhz": 2000.0, "flags": {"fma", "avx2", "avx512f"}, "siblings": 2, "cores": 2}
    monkeypatch.setattr(bench, "_cpu_facts", lambda: facts)
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    peak = bench.cpu_peak_gflops()
    assert peak["float32"] == pytest.approx(2 * 2.0 * 64)  # cores x GHz x 2 x 16 lanes x 2 FMA
    assert peak["bfloat16"] == peak["float32"]  # no bfloat16 instructions
    facts["flags"] = facts["flags"] | {"avx512_bf16"}
    assert bench.cpu_peak_gflops()["bfloat16"] == pytest.approx(2 * 2.0 * 128)
    facts["flags"] = facts["flags"] | {"amx_bf16"}
    assert bench.cpu_peak_gflops()["bfloat16"] == pytest.approx(2 * 2.0 * 1024)
    assert "AMX-BF16" in bench.cpu_peak_gflops()["derivation"]
    facts["siblings"] = 4  # two threads per core: one core's worth of FMA units
    assert bench.cpu_peak_gflops()["float32"] == pytest.approx(1 * 2.0 * 64)
    facts["mhz"] = None
    assert bench.cpu_peak_gflops() == {}


def test_xla_flags_side_is_an_extra_jax_worker():
    bench = benchmark_script("benchmark")
    sides = bench.sides_for(["jax", "torch"], ["predict_batch"], "--xla_cpu_foo=true")
    assert [side.name for side in sides] == [
        "timm",
        "keras-jax",
        "keras-torch",
        "keras-jax +XLA_FLAGS",
    ]
    assert sides[-1].env == {"XLA_FLAGS": "--xla_cpu_foo=true"}
    assert all(side.env == {} for side in sides[:-1])
    assert [s.name for s in bench.sides_for(["torch"], ["call"], "--x")] == ["timm", "keras-torch"]


def test_allocator_settings_label_the_run(monkeypatch):
    """glibc's malloc settings in the benchmark's environment (which every worker, timm's
    too, inherits) are recorded and named under the table; a run without any says
    nothing about them."""
    bench = benchmark_script("benchmark")
    for name in [k for k in os.environ if k.startswith(bench.ALLOCATOR_ENV_PREFIXES)]:
        monkeypatch.delenv(name)
    assert bench.allocator_env() == {}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4294967296")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4294967296")
    monkeypatch.setenv("MALLOCATOR_UNRELATED", "x")  # not glibc's: a prefix with an underscore
    settings = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
    assert bench.allocator_env() == settings
    report = {
        "config": {
            "batch_sizes": [1], "resolution": 224, "dtype": "float32", "device": "cpu",
            "warmup": 1, "rounds": 1, "iterations": 1, "calls": ["predict_batch"],
            "allocator_env": settings,
        },
        "machine": {"cpu": "x86-64", "usable_cpus": 2, "os": "Linux", "python": "3.11"},
        "results": [],
    }  # fmt: skip
    head = bench.run_description(report)
    assert head.endswith(
        "ran with `MALLOC_MMAP_THRESHOLD_=4294967296`, `MALLOC_TRIM_THRESHOLD_=4294967296`."
    )
    report["config"]["allocator_env"] = {}
    assert "malloc" not in bench.run_description(report).lower()
    # the library's own setting (`torch_keep_freed_memory`), as a worker reported it
    report["results"] = [
        {"name": "timm", "malloc_thresholds_raised": False},
        {"name": "keras-torch", "malloc_thresholds_raised": True},
    ]
    assert bench.run_description(report).endswith(
        " keras-torch raised glibc's malloc thresholds in its own process at its first call, "
        "as the library does by default on a CPU (`torch_keep_freed_memory`); the other sides "
        "ran with glibc's defaults."
    )
    report["results"].append({"name": "keras-jax", "malloc_thresholds_raised": True})
    assert bench.run_description(report).endswith(
        " keras-torch, keras-jax raised glibc's malloc thresholds in its own process at its "
        "first call, as the library does by default on a CPU (`torch_keep_freed_memory`; "
        "`jax_heap_sized_batches`, for models with GRN); the other sides ran with glibc's "
        "defaults."
    )


@pytest.mark.slow
@pytest.mark.once("tensorflow")
def test_quick_end_to_end(tmp_path):
    pytest.importorskip("embedding.embedder")
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    report, markdown = _run(
        ["--variant", "convnext_atto", "--images", str(folder), "--skip-model"], tmp_path
    )
    rows = report["end_to_end"]
    assert [row["name"] for row in rows] == ["timm", f"keras-{BACKEND} Embedder.embed"]
    for row in rows:
        assert row["images"] == 3
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
    assert "End-to-end" in markdown


@pytest.mark.slow
@pytest.mark.once("torch")  # whole processes: 66 s on torch, 98 s on JAX (each compiles)
def test_quick_cold_start(tmp_path):
    """--cold-start: whole processes (timm's script, our command line without and with the
    cache), timed from outside, and one more run each timing its phases from inside."""
    report, markdown = _run(["--variant", "convnext_atto", "--cold-start"], tmp_path)
    rows = report["cold_start"]
    names = ["timm", f"keras-{BACKEND} --no-cache", f"keras-{BACKEND} cached"]
    assert [row["name"] for row in rows] == names
    for row in rows:
        assert row["runs"] == report["config"]["rounds"] == len(row["times_s"])
        assert row["min_s"] <= row["median_s"] <= row["max_s"] and row["median_s"] > 0
        assert "first embedding" in row["phases_s"] and all(
            math.isfinite(v) and v >= 0 for v in row["phases_s"].values()
        )
    assert rows[0]["ratio_to_timm"] == 1.0
    assert any("load model (cache)" in key for key in rows[2]["phases_s"])
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) and "Cold start" in markdown
