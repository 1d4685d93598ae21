"""Data flows one way (docs/architecture.md, "Layout"): no ehrsr module imports a module of a
higher layer, reports import no training / profiling / measuring code, and no module reaches into
another package's private modules or names. Every import counts, function-level ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ehrsr"

# lowest first; a module may import its own layer and the layers below
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ehrsr.errors", "ehrsr.faults", "ehrsr.interrupts", "ehrsr.study_schema", "ehrsr.config", "ehrsr.resources",
     "ehrsr.stats"),
    ("ehrsr.blocks",),
    ("ehrsr", "ehrsr.model", "ehrsr.reparam"),  # "ehrsr": the package itself (build_model, __version__)
    ("ehrsr.data", "ehrsr.metrics", "ehrsr.profiling", "ehrsr.training", "ehrsr.baselines"),
    ("ehrsr.search",),
    ("ehrsr.ablation", "ehrsr.deploy", "ehrsr.fulltrain"),
    ("ehrsr.reports",),
    ("ehrsr.pipeline",),
    ("ehrsr.cli",),
)

# reports read the storage: they may use the ablation's table (pure, read-only) but nothing that
# trains, profiles, measures or charges
REPORTS_FORBIDDEN: tuple[str, ...] = (
    "ehrsr.training", "ehrsr.profiling", "ehrsr.ablation.runner", "ehrsr.deploy", "ehrsr.search.runner",
    "ehrsr.search.trial", "ehrsr.search.driver", "ehrsr.search.record",
)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of the longest matching prefix."""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(module, prefix) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer; add it to LAYERS in tests/test_layering.py")
    return best


def package_of(module: str) -> str:
    """The package a module belongs to (a package belongs to itself)."""
    if (PACKAGE.parent / module.replace(".", "/")).is_dir():
        return module
    return module.rpartition(".")[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every ehrsr import in ``source``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if _within(alias.name, "ehrsr")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if _within(target, "ehrsr"):
                found.append((target, [alias.name for alias in node.names], node.lineno))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What is wrong with the imports of ``module`` (empty when it follows the rules)."""
    problems = []
    mine = layer_of(module)
    for target, names, line in imports_of(source, module, is_package):
        where = f"{module}:{line} imports {target}"
        if layer_of(target) > mine:
            problems.append(f"{where}: a higher layer ({LAYERS[layer_of(target)][0]} above {LAYERS[mine][0]})")
        if _within(module, "ehrsr.reports") and any(_within(target, bad) for bad in REPORTS_FORBIDDEN):
            problems.append(f"{where}: reports only read the storage")
        target_package = package_of(target)
        parts = target.split(".")
        private_at = next((i for i, part in enumerate(parts) if part.startswith("_")), None)
        if private_at is not None and not _within(module, ".".join(parts[:private_at])):
            problems.append(f"{where}: a private module of another package")
        private_names = [n for n in names if n.startswith("_")]
        if private_names and not _within(module, target_package):
            problems.append(f"{where}: private names {private_names} of another package")
    return problems


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_imports_only_downward() -> None:
    problems = []
    for path in _modules():
        module = module_name(path)
        problems += violations(path.read_text(), module, is_package=path.name == "__init__.py")
    assert not problems, "\n".join(problems)
    assert len(_modules()) > 40  # the walk really saw the package


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("ehrsr.search.driver", "def f():\n    from ehrsr.reports import write_report\n", "higher layer"),
        ("ehrsr.search.driver", "import ehrsr.pipeline\n", "higher layer"),
        ("ehrsr.ablation.runner", "from ehrsr.reports.pareto import knee_trial\n", "higher layer"),
        ("ehrsr.reports.report", "from ehrsr.deploy.pick import pick_deployment\n", "only read the storage"),
        ("ehrsr.reports.report", "from ehrsr.ablation.runner import run_controlled_ablation\n", "only read"),
        ("ehrsr.reports.plots", "from ehrsr.training import train\n", "only read the storage"),
        ("ehrsr.deploy.pick", "from ehrsr.search._private import x\n", "private module"),
        ("ehrsr.pipeline", "from ehrsr.search.study import _task\n", "private names"),
        ("ehrsr.blocks.naf", "from ..search import space\n", "higher layer"),  # relative imports too
    ],
)
def test_the_checker_catches_each_kind_of_violation(module: str, source: str, expected: str) -> None:
    problems = violations(source, module)
    assert problems and expected in problems[0], problems


def test_the_checker_allows_downward_and_same_package_imports() -> None:
    assert violations("from ehrsr.search.study import _task\n", "ehrsr.search.driver") == []
    assert violations("from ehrsr.ablation.table import controlled_table\n", "ehrsr.reports.report") == []
    assert violations("import ehrsr\nfrom ehrsr.study_schema import StudyInfo\n", "ehrsr.deploy.pick") == []
    assert violations("from ehrsr.reports import write_report\n", "ehrsr.pipeline") == []
