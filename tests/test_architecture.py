"""The layering holds: no import cycle among the project's modules, the two variant modules
import the model package alone, and every import inside a function says why it is there.

The layers themselves (packages, interfaces above libraries) are import-linter's contracts
in pyproject.toml, run by `.ci/run` (`lint-imports`); this module checks what they cannot.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("convnext_common", "convnext_layers", "weights_convert", "embedding")
SINGLE_MODULES = ("convnext_v1", "convnext_v2")
PROJECT = (*PACKAGES, *SINGLE_MODULES)
# always installed (the core dependencies and the standard library): never a reason to
# import inside a function
CORE = ("numpy", "PIL", "tqdm", "safetensors", "huggingface_hub", "keras")

pytestmark = pytest.mark.once("jax")  # reads source files only


def module_files():
    """{module name: path} of every module of the project."""
    files = {name: ROOT / f"{name}.py" for name in SINGLE_MODULES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def imported_modules(name: str, path: Path, known) -> set[str]:
    """The project modules `name` imports anywhere in its file (functions included),
    each resolved to the longest known module name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, files) for name, path in files.items()}


def cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def without_package_faces(graph):
    """The graph less the edges from a package's `__init__` into its own modules: a
    package face that re-exports its modules is not a cycle with them (its modules
    import each other, never the face)."""
    return {
        name: {m for m in targets if not m.startswith(name + ".")}
        for name, targets in graph.items()
    }


def test_no_import_cycle_among_the_project_modules():
    graph = without_package_faces(import_graph())
    assert len(graph) > 60  # every module was read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    planted = dict(import_graph())  # the real graph, plus one import back down-up
    planted["embedding.npz"] = {*planted["embedding.npz"], "embedding.gallery"}
    found = cycles(without_package_faces(planted))
    assert any({"embedding.gallery", "embedding.npz"} <= set(cycle) for cycle in found), found


def test_variant_modules_import_the_model_package_alone():
    graph = import_graph()
    assert graph["convnext_v1"] <= {"convnext_layers"}
    assert graph["convnext_v2"] <= {"convnext_layers", "convnext_v1"}


def reason_comment(lines, lineno) -> str:
    """The comment that says why the import on line `lineno` (1-based) is there: on its
    line, or above the block of imports (and `try:`) it belongs to; '' if none."""
    number = lineno - 1
    while number >= 0:
        text = lines[number].strip()
        if text.startswith("#"):
            return text[1:].strip()
        inline = re.sub(r"^noqa(: *[A-Z0-9, ]+)?", "", text.partition("#")[2].strip()).strip()
        if inline and (number == lineno - 1 or text.startswith("try:")):
            return inline
        if not text.startswith(("import ", "from ", "try:")):
            return ""
        number -= 1
    return ""


def function_imports(path: Path):
    """(line, module, comment) of each import inside a function of the file (the comment
    of `reason_comment`)."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source, filename=str(path))
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or "."]
            else:
                continue
            comment = reason_comment(lines, node.lineno)
            for module in modules:
                yield node.lineno, module, comment


def test_imports_inside_functions_say_why():
    """Only an optional dependency (kept optional), a backend or Keras (kept unloaded until
    chosen), or timm/torch (imported before TensorFlow) is imported inside a function, with
    a comment saying which; never the standard library or a core dependency."""
    problems = []
    for path in module_files().values():
        for line, module, comment in function_imports(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if top in sys.stdlib_module_names or (top in CORE and top != "keras"):
                problems.append(f"{where}: the standard library / a core dependency")
            elif not comment:
                problems.append(f"{where} without a comment saying why")
    assert problems == []
