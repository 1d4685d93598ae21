"""No import cycles between ehrsr's modules: a module that imports another which (directly or
through others) imports it back works only in some import orders, and usually means a helper sits
in the wrong module. Every import counts, function-level ones included; imports under
``if TYPE_CHECKING:`` do not, since they never run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ehrsr"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:
                skipped.update(id(inner) for inner in ast.walk(statement))
    return skipped


def edges_of(module: str, source: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``module`` imports when it runs (at any depth). ``from P
    import name`` is an edge to the submodule ``P.name`` when there is one, else to ``P``."""
    tree = ast.parse(source)
    skipped = _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return {name for name in found if name in modules and name != module}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def graph_of(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """``{module: (source, is_package)}`` -> ``{module: modules it imports}``."""
    modules = set(sources)
    return {name: edges_of(name, source, is_package, modules) for name, (source, is_package) in sources.items()}


def package_sources() -> dict[str, tuple[str, bool]]:
    return {module_name(path): (path.read_text(), path.name == "__init__.py") for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_of_ehrsr_is_part_of_an_import_cycle() -> None:
    sources = package_sources()
    assert len(sources) > 40 and "ehrsr.search.budget" in sources  # the walk really saw the package
    cycles = find_cycles(graph_of(sources))
    assert not cycles, "import cycles (move the shared helper to where both can import it):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        # a function-level import closes the circle as well as a top-level one
        ({"p.a": ("from p.b import f\n", False), "p.b": ("def f():\n    from p.a import g\n", False)},
         [["p.a", "p.b"]]),
        # three modules around, one of them through a relative import
        ({"p.a": ("from .b import x\n", False), "p.b": ("import p.c\n", False), "p.c": ("from p import a\n", False),
          "p": ("", True)},
         [["p.a", "p.b", "p.c"]]),
        # a submodule importing a name its package's __init__ re-exports, while __init__ imports it
        ({"p": ("from p.a import f\n", True), "p.a": ("from p import g\n", False)}, [["p", "p.a"]]),
    ],
)
def test_the_checker_finds_planted_cycles(sources: dict[str, tuple[str, bool]], expected: list[list[str]]) -> None:
    assert find_cycles(graph_of(sources)) == expected


def test_the_checker_ignores_what_never_runs_and_imports_of_submodules() -> None:
    sources = {
        # a type-only import back: no cycle at run time
        "p.a": ("from p.b import f\n", False),
        "p.b": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.a import g\n", False),
        # "from p import c" imports the submodule p.c, not p's __init__
        "p": ("from p.c import h\n", True),
        "p.c": ("", False),
        "p.d": ("from p import c\n", False),
    }
    graph = graph_of(sources)
    assert graph["p.b"] == set() and graph["p.d"] == {"p.c"}
    assert find_cycles(graph) == []
