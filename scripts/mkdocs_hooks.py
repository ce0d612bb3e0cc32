"""MkDocs hooks (`hooks:` in mkdocs.yml) for the manual.

A ```` ```python no-test ```` fence marks an example the tests show but do not run
(tests/test_docs.py); GitHub reads its first word as the language, but Python-Markdown's
fences take no bare word after it, so the page would lose everything up to the next
fence. Here it becomes a plain ```` ```python ```` fence before the page is rendered.
"""

from __future__ import annotations

import re

NO_TEST_FENCE = re.compile(r"^(\s*```python) no-test[ \t]*$", flags=re.M)


def on_page_markdown(markdown: str, **_) -> str:
    return NO_TEST_FENCE.sub(r"\1", markdown)
