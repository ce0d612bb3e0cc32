"""The Markdown pages whose generated parts the scripts keep current (README.md and
every page under docs/), and how a generated part is fenced and replaced.

A generated part sits between two HTML comments, which Markdown renders as nothing:

    <!-- NAME:begin -->
    ...written by a script, never by hand...
    <!-- NAME:end -->

`scripts/variant_table.py` fills `variant-table` and `architecture-table`;
`scripts/benchmark_tables.py` fills `benchmark-table:<table>`. A page may hold any of
them, any number of times; `tests/test_docs.py` checks that every one is current.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convnext_common.files import atomic_write_text  # noqa: E402  (from ROOT, put on the path)


def pages() -> list[Path]:
    """README.md, then every Markdown page under docs/ (sorted, recursively)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fences(name: str) -> tuple[str, str]:
    """The begin and end comments of the generated part `name`."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def fenced_names(text: str, prefix: str) -> list[str]:
    """The `X` of every `<!-- PREFIX:X:begin -->` line of `text`, in order (a fence
    quoted in a code block, indented, is not one)."""
    return re.findall(rf"^<!-- {re.escape(prefix)}:([\w.-]+):begin -->$", text, flags=re.M)


def replace_between(text: str, name: str, content: str) -> str:
    """`text` with every part fenced as `name` replaced by `content` (unchanged when
    there is none). A begin without its end is a ValueError naming the fence."""
    begin, end = fences(name)
    pieces = text.split(begin)
    out = [pieces[0]]
    for piece in pieces[1:]:
        if end not in piece:
            raise ValueError(f"{begin} has no {end} after it")
        out.append(f"{begin}\n{content}\n{end}{piece.split(end, 1)[1]}")
    return "".join(out)


def update_pages(update: Callable[[str], str], check: bool, script: str) -> int:
    """Apply `update(text) -> text` to every page: write the pages it changes
    (atomically), or with `check` list them and return 1 if there are any."""
    stale = []
    for page in pages():
        text = page.read_text()
        updated = update(text)
        if updated == text:
            continue
        stale.append(page.relative_to(ROOT))
        if not check:
            atomic_write_text(page, updated)
            print(f"updated {page.relative_to(ROOT)}")
    if check and stale:
        print(f"out of date: {', '.join(map(str, stale))}: run python scripts/{script}")
        return 1
    return 0
