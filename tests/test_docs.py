"""The README and the manual (docs/) cannot rot: every ```python block of every page
runs, and every generated table (variants, architectures, benchmarks) is current.

Fences: ```python blocks run, in order, one namespace per page (later blocks reuse
earlier names), offline, in a fresh folder holding the files the examples name
(`docs_example_files`); ```python no-test blocks (Hub downloads, long runs, other
libraries) are shown only; ```bash, ```json and ```text blocks are not run.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from conftest import random_timm_model, save_timm_checkpoint
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark_tables  # noqa: E402
import markdown_pages  # noqa: E402
import variant_table  # noqa: E402

PAGES = markdown_pages.pages()
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", flags=re.S | re.M)
RUN, SHOW_ONLY = "python", "python no-test"
README = (ROOT / "README.md").read_text()
README_MAX_LINES = 250  # issue 22: the README is the front door, the manual is docs/


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fences of `text` that run, in order."""
    return [m["body"] for m in FENCE.finditer(text) if m["info"].strip() == RUN]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [page for page in PAGES if python_blocks(page.read_text())]


@pytest.fixture(scope="module")
def docs_example_files(tmp_path_factory):
    """What the examples name: `my_checkpoint/` (a random-weight convnext_atto in the
    Hub layout), `a.jpg` (a cat), `b.jpg` and `face1.jpg` (the astronaut), `face2.jpg`
    (her mirror image: the same face, another photograph)."""
    folder = tmp_path_factory.mktemp("docs-examples")
    save_timm_checkpoint(
        random_timm_model("convnext_atto", seed=5), folder / "my_checkpoint", "convnext_atto"
    )
    astronaut = skimage.data.astronaut()
    Image.fromarray(skimage.data.chelsea()).save(folder / "a.jpg")
    Image.fromarray(astronaut).save(folder / "b.jpg")
    Image.fromarray(astronaut).save(folder / "face1.jpg")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(folder / "face2.jpg")
    return folder


@pytest.mark.once("torch")  # documentation: reads text only
def test_python_fences_run_or_say_they_do_not():
    """A misspelt marker (`python no_test`, `py`) would silently leave a block unrun."""
    for page in PAGES:
        for match in FENCE.finditer(page.read_text()):
            info = match["info"].strip()
            if info.startswith("py"):
                assert info in (RUN, SHOW_ONLY), f"{page_id(page)}: fence ```{info}"


@pytest.mark.once("torch")
def test_readme_is_a_front_door():
    """The README stays short, keeps its three runnable quick starts and links the
    manual's pages (the rest of the manual is found from docs/index.md and the nav)."""
    assert len(README.splitlines()) <= README_MAX_LINES
    assert len(python_blocks(README.split("## Variants")[0])) >= 3
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / link).is_file(), link


@pytest.mark.slow
@pytest.mark.once("torch")  # documentation: the examples name no backend
@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_page_python_examples_run(page, docs_example_files, tmp_path, monkeypatch):
    for item in docs_example_files.iterdir():
        (tmp_path / item.name).symlink_to(item)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_CONVNEXT_CACHE", str(docs_example_files / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": "__docs__"}
    for index, block in enumerate(python_blocks(page.read_text())):
        exec(compile(block, f"{page_id(page)}[python block {index}]", "exec"), namespace)


def test_variant_table_lists_every_variant():
    table = README.split(variant_table.BEGIN)[1].split(variant_table.END)[0].strip()
    assert table.startswith(variant_table.HEADER)
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert names == variant_table.variant_names()


@pytest.mark.parametrize("name", ["atto", "tiny"])
def test_variant_table_rows_are_current(name):
    assert variant_table.table_row(name) in README


@pytest.mark.slow
# parameter counts and tags: the same on every backend; in JAX's lane of .ci/run, the
# shorter one (2,092 s against TensorFlow's + PyTorch's 2,165 s in one run; 13 s on JAX
# and 11 s on PyTorch alone, 40 s on PyTorch in that run)
@pytest.mark.once("jax")
def test_generated_model_tables_are_current():
    """Both generated tables (sizes; architectures with their published tags), on every
    page that shows them, as the code and timm's registry give them now."""
    tables = variant_table.current_tables()
    shown = set()
    for page in PAGES:
        text = page.read_text()
        assert variant_table.updated_page(text, tables) == text, page_id(page)
        shown |= {name for name in tables if markdown_pages.fences(name)[0] in text}
    assert shown == set(tables)


@pytest.mark.once("torch")  # JSON and text only
def test_benchmark_tables_are_current():
    """Every fenced benchmark table is what scripts/benchmark_tables.py makes from
    benchmarks/results/ now, and every table it knows is shown somewhere."""
    shown = set()
    for page in PAGES:
        text = page.read_text()
        assert benchmark_tables.updated_page(text) == text, page_id(page)
        shown |= set(markdown_pages.fenced_names(text, benchmark_tables.PREFIX))
    assert shown == set(benchmark_tables.TABLES)


# the performance tables' column titles -> the benchmark's side names
BACKEND_COLUMNS = {"JAX": "keras-jax", "TensorFlow": "keras-tensorflow", "PyTorch": "keras-torch"}


def _performance_table(name: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the first table in docs/performance.md's fenced benchmark table
    `name`, each row its stripped cells."""
    page = (ROOT / "docs/performance.md").read_text()
    fenced = page.split(f"<!-- benchmark-table:{name}:begin -->")[1].split("<!--")[0]
    lines = []
    for line in fenced.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break  # the first table only
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines]
    return rows[0], rows[2:]


@pytest.mark.once("torch")
def test_performance_page_shows_the_measured_ratios():
    """Each backend's speed ratio in the results file is the cell of its variant and
    batch on the performance page (read here from the JSON, not from the generator)."""
    with open(ROOT / "benchmarks/results/cpu_r224_float32.json") as f:
        results = json.load(f)["results"]
    header, rows = _performance_table("inference")
    checked = 0
    for row in results:
        if row["name"] not in BACKEND_COLUMNS.values():
            continue
        cells = next(r for r in rows if r[:2] == [row["variant"], str(row["batch_size"])])
        title = next(t for t, name in BACKEND_COLUMNS.items() if name == row["name"])
        assert cells[header.index(title)] == f"{row['ratio_to_timm']:.2f}x", row
        checked += 1
    assert checked == 27  # 3 variants x 3 batch sizes x 3 backends


@pytest.mark.once("torch")
@pytest.mark.parametrize(
    "table,name,batches",
    [
        ("float32", "cpu_r224_float32_compile", 3),
        ("bfloat16", "cpu_r224_bfloat16", 3),
        ("float32-epyc", "cpu_r224_float32_compile_epyc", 3),
        ("bfloat16-epyc", "cpu_r224_bfloat16_epyc", 3),
        ("float32-malloc-epyc", "cpu_r224_float32_malloc_epyc", 2),
        ("bfloat16-malloc-epyc", "cpu_r224_bfloat16_malloc_epyc", 2),
        ("float32-kept-epyc", "cpu_r224_float32_kept_epyc", 3),
        ("bfloat16-kept-epyc", "cpu_r224_bfloat16_kept_epyc", 3),
        ("float32-heap-epyc", "cpu_r224_float32_heap_epyc", 3),
        ("bfloat16-products-epyc", "cpu_r224_bfloat16_products_epyc", 3),
    ],
)
def test_performance_page_shows_the_ratios_against_torch_compile(table, name, batches):
    """Round three's tables: each backend's cell is its ratio to timm eager / to timm +
    torch.compile from the results file, and the best column names the fastest backend
    with its ratio (read here from the JSON, not from the generator)."""
    with open(ROOT / f"benchmarks/results/{name}.json") as f:
        results = json.load(f)["results"]
    header, rows = _performance_table(f"against-compiled-{table}")
    checked = 0
    for variant, batch in {(r["variant"], r["batch_size"]) for r in results}:
        group = {
            r["name"]: r for r in results if (r["variant"], r["batch_size"]) == (variant, batch)
        }
        cells = next(r for r in rows if r[:2] == [variant, str(batch)])
        for title, side in BACKEND_COLUMNS.items():
            row = group[side]
            expected = f"{row['ratio_to_timm']:.2f}x / {row['ratio_to_timm_compiled']:.2f}x"
            assert cells[header.index(title)] == expected, (variant, batch, title)
            checked += 1
        best = max(BACKEND_COLUMNS, key=lambda title: group[BACKEND_COLUMNS[title]]["images_per_s"])
        ratio = (
            group[BACKEND_COLUMNS[best]]["images_per_s"] / group["timm +compile"]["images_per_s"]
        )
        assert cells[header.index("best vs timm + compile")] == f"{ratio:.2f}x ({best})"
    assert checked == 3 * batches * 3  # 3 variants x the batch sizes x 3 backends


@pytest.mark.once("torch")
def test_generated_parts_are_fenced_whole():
    with pytest.raises(ValueError, match="unknown benchmark table 'nope'"):
        benchmark_tables.updated_page("<!-- benchmark-table:nope:begin -->\n")
    with pytest.raises(ValueError, match="has no <!-- variant-table:end -->"):
        markdown_pages.replace_between("<!-- variant-table:begin -->\n", "variant-table", "x")
    stale = "a\n<!-- benchmark-table:export-parity:begin -->\nold\n"
    stale += "<!-- benchmark-table:export-parity:end -->\nb\n"
    updated = benchmark_tables.updated_page(stale)
    assert "old" not in updated and updated.startswith("a\n") and updated.endswith("\nb\n")
    assert "| torch | ONNX | float32 |" in updated


@pytest.mark.once("torch")  # text and a tuple of names
def test_architecture_page_lists_every_fast_path():
    """Each fast path in `fast_ops.FAST_PATHS` has its row (name, backend, what it is,
    fallback) in docs/architecture.md's table, and the table names no other."""
    from convnext_layers import fast_ops

    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| (\w+(?:, \w+)*) \| .+ \| .+ \|$", text, flags=re.M)
    assert sorted(name for name, _ in rows) == sorted(fast_ops.FAST_PATHS)
