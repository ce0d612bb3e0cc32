"""docs/face-checkpoints.md and docs/timm-checkpoints.md cannot rot: their ```python
blocks run, page by page in one namespace each, offline (```python no-test blocks need
the Hub and are shown only), and a comment line right below a `print(...)` is what it
prints."""

import contextlib
import io
import re
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("face-checkpoints.md", "timm-checkpoints.md")


def python_blocks(page):
    text = (ROOT / "docs" / page).read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def stated_outputs(block):
    """The `# ...` lines that directly follow a `print(...)` line."""
    lines = block.splitlines()
    return [
        line[2:]
        for before, line in zip(lines, lines[1:], strict=False)
        if before.lstrip().startswith("print(") and line.startswith("# ")
    ]


@pytest.mark.once("torch")  # documentation: the examples name no backend
@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run_and_print_what_they_say(page, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    assert blocks
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what the examples write goes too
    namespace = {}
    for index, block in enumerate(blocks):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block, f"docs/{page}[python block {index}]", "exec"), namespace)
        for expected in stated_outputs(block):
            assert expected in printed.getvalue().splitlines(), (expected, printed.getvalue())
