"""The README cannot rot: its Python examples run, its variant table is current."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
sys.path.insert(0, str(ROOT / "scripts"))

import variant_table  # noqa: E402

# ```python blocks run; ```python no-test blocks (network, long runs) are shown only
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_variant_table_lists_every_variant():
    table = README.split(variant_table.BEGIN)[1].split(variant_table.END)[0].strip()
    assert table.startswith(variant_table.HEADER)
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert names == variant_table.variant_names()


@pytest.mark.parametrize("name", ["atto", "tiny"])
def test_variant_table_rows_are_current(name):
    assert variant_table.table_row(name) in README
