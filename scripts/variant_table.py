"""Regenerate the documentation's model tables: the variant sizes (parameters and
GMACs at 224x224; fenced `variant-table`, in README.md and docs/models.md) and the
supported timm architectures (what each has, and how many of timm's published tags
it covers; fenced `architecture-table`, in docs/converting.md). Any page of
`markdown_pages.pages()` may hold either.

    python scripts/variant_table.py          # rewrite the tables wherever they are
    python scripts/variant_table.py --check  # exit 1 if a page is out of date

Parameters come from the Keras models themselves (`count_params`, built without
allocating their weights), MACs from `convnext_layers.count_macs`; published tags
and their licences from timm's registry (`timm.list_models(pretrained=True)`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from markdown_pages import fences, replace_between, update_pages  # noqa: E402

BEGIN, END = fences("variant-table")
ARCH_BEGIN, ARCH_END = fences("architecture-table")

HEADER = (
    "| variant | V1 params | V1 GMACs | V2 params | V2 GMACs | depths | widths |\n"
    "|---|---:|---:|---:|---:|---|---|"
)
ARCH_HEADER = (
    "| timm architecture | stem | norm | head | params | published tags | licences |\n"
    "|---|---|---|---|---:|---:|---|"
)


def _measure(build):
    """(parameters, MACs at 224) of `build()`, without allocating its weights."""
    import keras

    from convnext_layers import count_macs, fast_ops

    with keras.StatelessScope(initialize_variables=False):
        model = build()
    try:
        return model.count_params(), count_macs(model)
    finally:
        fast_ops.forget_deferred(model.weights)


def variant_names() -> list[str]:
    import convnext_v1
    import convnext_v2

    return list(dict.fromkeys([*convnext_v1.SIZES, *convnext_v2.SIZES]))


def table_row(name: str) -> str:
    """One Markdown row: parameters (1000 classes) and GMACs at 224x224 per family."""
    import convnext_v1
    import convnext_v2

    cells = []
    for family, create, sizes in (
        (convnext_v1, convnext_v1.create_convnext_v1, convnext_v1.SIZES),
        (convnext_v2, convnext_v2.create_convnext_v2, convnext_v2.SIZES),
    ):
        if name in sizes:
            params, macs = _measure(lambda: create(name, input_shape=(224, 224, 3)))  # noqa: B023
            cells += [f"{params:,}", f"{macs / 1e9:.2f}"]
            config = family.VARIANTS[name]
        else:
            cells += ["-", "-"]
    depths = ", ".join(map(str, config.depths))
    widths = ", ".join(map(str, config.widths))
    return f"| {name} | {' | '.join(cells)} | ({depths}) | ({widths}) |"


def variant_table() -> str:
    return "\n".join([HEADER, *(table_row(name) for name in variant_names())])


def published_tags() -> dict[str, list]:
    """{architecture: [(tag, licence)]} of timm's published ConvNeXt weights."""
    import timm
    from timm.models import get_pretrained_cfg

    tags = {}
    for tag in timm.list_models("convnext*", pretrained=True):
        license_name = get_pretrained_cfg(tag).to_dict().get("license") or "?"
        tags.setdefault(tag.split(".")[0], []).append((tag, license_name))
    return tags


def _describe(config) -> tuple[str, str, str]:
    stem = config.stem if config.stem == "patch" else f"{config.stem} 3x3"
    norm = config.norm + (f" eps {config.norm_eps:g}" if config.norm_eps != 1e-6 else "")
    head = "norm, fc"
    if config.head_norm_first:
        head = "norm_pre, fc"
    elif config.head_hidden_size:
        head = f"norm, MLP {config.head_hidden_size}, fc"
    if config.use_grn:
        norm += ", GRN"
    return stem, norm, head


def architecture_row(arch: str, tags) -> str:
    import weights_convert as wc

    config = wc.ARCHITECTURES[arch]
    params, _ = _measure(lambda: wc.keras_model_for(arch, input_shape=(224, 224, 3)))
    stem, norm, head = _describe(config)
    licences = ", ".join(sorted({license_name for _, license_name in tags})) or "-"
    return f"| `{arch}` | {stem} | {norm} | {head} | {params:,} | {len(tags)} | {licences} |"


def architecture_table() -> str:
    import weights_convert as wc

    tags = published_tags()
    names = [a for a in wc.ARCHITECTURES if not a.startswith("test_")]
    rows = [architecture_row(arch, tags.get(arch, [])) for arch in names]
    total = sum(len(v) for k, v in tags.items() if k in wc.ARCHITECTURES)
    footer = (
        f"\n\n{len(names)} architectures, {total} of timm's "
        f"{sum(len(v) for v in tags.values())} published tags (plus timm's test models "
        "`test_convnext`, `test_convnext2`, `test_convnext3`)."
    )
    return "\n".join([ARCH_HEADER, *rows]) + footer


def updated_page(text: str, tables: dict[str, str] | None = None) -> str:
    """`text` with its variant and architecture tables current (`tables`: the two
    tables by fence name, computed once for several pages; None computes them)."""
    if tables is None:
        tables = current_tables()
    for name, table in tables.items():
        text = replace_between(text, name, table)
    return text


def current_tables() -> dict[str, str]:
    return {"variant-table": variant_table(), "architecture-table": architecture_table()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a page is stale")
    args = parser.parse_args(argv)
    import timm  # noqa: F401  (before keras: see tests/conftest.py)

    tables = current_tables()
    return update_pages(lambda text: updated_page(text, tables), args.check, "variant_table.py")


if __name__ == "__main__":
    sys.exit(main())
