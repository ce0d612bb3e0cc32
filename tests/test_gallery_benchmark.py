"""Smoke test of benchmarks/gallery_benchmark.py --quick: the report's structure and the
exact index's recall; it never asserts a speed."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gallery_benchmark.py")


@pytest.mark.once("jax")  # numpy and FAISS only
def test_quick_run_writes_json_and_markdown(tmp_path):
    output = tmp_path / "gallery"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--indexes", "exact,flat,ivfpq", "--output", output],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.with_suffix(".json").read_text())
    rows = report["sizes"][0]["rows"]
    assert [row["index"] for row in rows] == ["exact", "flat", "ivfpq", "naive Python loop"]
    exact, flat = rows[0], rows[1]
    assert exact["planted_at_1"] == 1.0 and flat["recall_at_10"] == 1.0
    assert all(row["queries_per_s"] > 0 for row in rows)
    assert rows[-1]["extrapolated_from"] == "3 queries over 500 vectors"
    table = output.with_suffix(".md").read_text()
    assert "| 3,000 | ivfpq |" in table and "naive Python loop (extrapolated from" in table
