"""The README cannot rot: its Python examples run, its variant table is current."""

import re
import sys
from pathlib import Path

import pytest
import skimage.data
from conftest import random_timm_model, save_timm_checkpoint
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
sys.path.insert(0, str(ROOT / "scripts"))

import variant_table  # noqa: E402

# ```python blocks run, in order, in one namespace (later examples reuse earlier
# names); ```python no-test blocks (Hub downloads, long runs) are shown only.
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


@pytest.mark.slow
@pytest.mark.once("torch")  # documentation: the examples name no backend
def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Offline: the examples' `a.jpg`, `b.jpg` and `my_checkpoint/` (a random-weight
    convnext_atto in the Hub layout) are made here."""
    assert len(BLOCKS) >= 5
    save_timm_checkpoint(
        random_timm_model("convnext_atto", seed=5), tmp_path / "my_checkpoint", "convnext_atto"
    )
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "a.jpg")
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "b.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_CONVNEXT_CACHE", str(tmp_path / "cache"))
    namespace = {}
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md[python block {index}]", "exec"), namespace)


def test_variant_table_lists_every_variant():
    table = README.split(variant_table.BEGIN)[1].split(variant_table.END)[0].strip()
    assert table.startswith(variant_table.HEADER)
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert names == variant_table.variant_names()


@pytest.mark.parametrize("name", ["atto", "tiny"])
def test_variant_table_rows_are_current(name):
    assert variant_table.table_row(name) in README


@pytest.mark.slow
@pytest.mark.once("torch")  # parameter counts and tags: the same on every backend
def test_generated_tables_are_current():
    """Both generated tables (sizes; architectures with their published tags) as the
    code and timm's registry give them now."""
    assert variant_table.updated_readme(README) == README
