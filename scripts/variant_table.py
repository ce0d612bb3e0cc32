"""Regenerate the README's variant table (parameters and GMACs at 224x224).

    python scripts/variant_table.py          # rewrite the table in README.md
    python scripts/variant_table.py --check  # exit 1 if README.md is out of date

Parameters come from the Keras models themselves (`count_params`), MACs from
`convnext_layers.count_macs` (convolutions and dense layers, one image).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BEGIN = "<!-- variant-table:begin -->"
END = "<!-- variant-table:end -->"


HEADER = (
    "| variant | V1 params | V1 GMACs | V2 params | V2 GMACs | depths | widths |\n"
    "|---|---:|---:|---:|---:|---|---|"
)


def variant_names() -> list[str]:
    import convnext_v1
    import convnext_v2

    return list(dict.fromkeys([*convnext_v1.VARIANTS, *convnext_v2.VARIANTS]))


def table_row(name: str) -> str:
    """One Markdown row: parameters (1000 classes) and GMACs at 224x224 per family."""
    import convnext_v1
    import convnext_v2
    from convnext_layers import count_macs

    cells = []
    for family, create in (
        (convnext_v1, convnext_v1.create_convnext_v1),
        (convnext_v2, convnext_v2.create_convnext_v2),
    ):
        if name in family.VARIANTS:
            model = create(name)
            cells += [f"{model.count_params():,}", f"{count_macs(model) / 1e9:.2f}"]
            config = family.VARIANTS[name]
            del model
        else:
            cells += ["-", "-"]
    depths = ", ".join(map(str, config.depths))
    widths = ", ".join(map(str, config.widths))
    return f"| {name} | {' | '.join(cells)} | ({depths}) | ({widths}) |"


def variant_table() -> str:
    return "\n".join([HEADER, *(table_row(name) for name in variant_names())])


def replace_between_markers(text: str, table: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    updated = replace_between_markers(text, variant_table())
    if args.check:
        if updated != text:
            print("README.md variant table is out of date: run scripts/variant_table.py")
            return 1
        return 0
    fd, tmp = tempfile.mkstemp(dir=ROOT, suffix=".md.tmp")
    with os.fdopen(fd, "w") as f:
        f.write(updated)
    os.replace(tmp, readme)
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
