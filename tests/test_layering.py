"""The package's layers, read from the source with ``ast`` (nothing is imported).

``llmrank.ir`` and ``llmrank.passes`` are the engine; ``llmrank.exporters`` and the public
modules in ``llmrank/`` (api, workflow, cli, ...) are built on it. The engine must not reach up
into them, and no two modules may import each other at module level (a cycle makes the import
order decide which names exist).
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
#: folder -> the package it is installed as (pyproject's package-dir)
PACKAGES = {"llmrank": "llmrank", "ir": "llmrank.ir", "passes": "llmrank.passes", "exporters": "llmrank.exporters"}
ENGINE = ("llmrank.ir", "llmrank.passes")

def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module: str, *, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements, skipping ``if TYPE_CHECKING:`` blocks; ``module_level``: not those
    inside functions (class bodies run at import time, so they count)."""
    found: list = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                continue
            elif module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            else:
                visit(child)

    visit(tree)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The project modules an import statement loads (``from pkg import sub`` loads pkg.sub)."""
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
        return {_known(n) for n in names if _known(n)}
    base = node.module or ""
    if node.level:
        package = module if MODULES[module].stem == "__init__" else module.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            package = package.rsplit(".", 1)[0]
        base = f"{package}.{base}" if base else package
    out = set()
    for alias in node.names:
        target = f"{base}.{alias.name}"
        found = target if target in MODULES else _known(base)
        if found:
            out.add(found)
    return out


def _known(name: str) -> str | None:
    """The longest project module that ``name`` is or lies in."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph(*, module_level: bool) -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = {t for node in _imports(tree, module, module_level=module_level) for t in _targets(node, module)} - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _is_upper(module: str) -> bool:
    """The public layer: llmrank/ itself (api, workflow, cli, ...) and the exporters."""
    return module.startswith("llmrank.exporters") or not module.startswith(("llmrank.ir", "llmrank.passes"))


def test_the_graph_is_read():
    """The walk sees the imports it must judge (a broken walk would pass every check below)."""
    graph = _graph(module_level=True)
    assert "llmrank.passes.calibrate" in graph["llmrank.passes.pipeline"]
    assert "llmrank.passes.scorers" in graph["llmrank.passes.score"]  # from llmrank.passes import scorers as S
    assert "llmrank.exporters.atomic" in graph["llmrank.exporters.hf"]  # from .atomic import ...
    assert "llmrank.passes.blocks.checkpoint" in graph["llmrank.passes.blocks.driver"]  # sub-packages are walked
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_engine_does_not_import_the_public_layer():
    graph = _graph(module_level=False)
    bad = sorted((m, t) for m, targets in graph.items() if m.startswith(ENGINE) for t in targets if _is_upper(t))
    assert bad == []


def test_no_import_cycles_at_module_level():
    assert _cycles(_graph(module_level=True)) == []


def test_no_import_cycles_between_the_modules_named_in_issue_20():
    """Not even through imports inside functions: pipeline <-> program, workflow <-> healcmd."""
    graph = _graph(module_level=False)
    pairs = [("llmrank.passes.pipeline", "llmrank.passes.program"), ("llmrank.workflow", "llmrank.healcmd")]
    assert [(a, b) for a, b in pairs if b in graph[a] and a in graph[b]] == []


def test_the_longest_first_list_names_test_files_that_exist():
    """conftest.LONGEST_FIRST orders `make test`; a renamed file would silently drop out of it."""
    from conftest import LONGEST_FIRST

    missing = [name for name in LONGEST_FIRST if not (ROOT / "tests" / name).is_file()]
    assert not missing, f"tests/conftest.py LONGEST_FIRST names files that do not exist: {missing}"
