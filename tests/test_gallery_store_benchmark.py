"""Smoke test of benchmarks/gallery_store_benchmark.py --quick: the report's structure and the
exact stores' recall against numpy; it never asserts a speed."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gallery_store_benchmark.py")


@pytest.mark.once("torch")  # numpy and SQLite only
def test_quick_run_writes_json_and_markdown(tmp_path):
    output = tmp_path / "stores"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--stores", "file exact,sqlite exact",
         "--output", output],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.with_suffix(".json").read_text())
    rows = report["rows"]
    assert [row["store"] for row in rows] == ["file exact", "sqlite exact"]
    for row in rows:
        assert row["planted_at_1"] == 1.0 and row["recall_at_10"] == 1.0
        assert row["queries_per_s"] > 0 and row["bulk_rows_per_s"] > 0 and row["disk_mb"] > 0
    table = output.with_suffix(".md").read_text()
    assert "| 2,000 | sqlite exact |" in table
