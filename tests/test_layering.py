"""Data flows one way (docs/architecture.md, "Layout"): no ehrsr module imports a module of a
higher layer, reports import no training / profiling / measuring code, and nothing uses a private
name of ehrsr from outside the place that owns it. Every import counts, function-level ones
included, and so does an attribute read through an imported module (``config._to_plain``).

Private means (PEP 8's leading underscore): a ``_name`` defined in a module belongs to that module
(to the package, when the module is a package's ``__init__``); a ``_module`` belongs to its
package. The scripts in ``benchmarks/`` are checked too: they use no private name of ehrsr, and
every call they make to an ehrsr function passes only keywords that function takes (resolved by
import and checked with ``inspect.signature``), so a changed signature fails here, not on the day
someone runs the script."""

from __future__ import annotations

import ast
import importlib
import inspect
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ehrsr"
BENCHMARKS = ROOT / "benchmarks"

# lowest first; a module may import its own layer and the layers below
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ehrsr.errors", "ehrsr.faults", "ehrsr.files", "ehrsr.interrupts", "ehrsr.study_schema", "ehrsr.config", "ehrsr.resources",
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


def is_private(name: str) -> bool:
    """A leading underscore, dunders (``__init__``, ``__version__``) aside."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


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


def is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/")).is_dir()


def is_module(module: str) -> bool:
    """Whether the dotted name is an ehrsr module or package of this checkout."""
    path = ROOT / module.replace(".", "/")
    return _within(module, "ehrsr") and (path.is_dir() or path.with_suffix(".py").is_file())


def may_use_private(user: str, owner: str) -> bool:
    """A private name of ``owner`` (a module, or a package's ``__init__``) may be used by ``owner``
    itself, and by the modules of ``owner`` when it is a package."""
    return user == owner or (is_package(owner) and _within(user, owner))


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclass(frozen=True)
class Use:
    """One use of ehrsr in a source: ``from target import names`` / ``import target``
    (``attribute`` False), or ``target.names[0]`` read through a name bound to module ``target``."""

    target: str
    names: tuple[str, ...]
    line: int
    attribute: bool = False


def _resolve_relative(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def bound_names(tree: ast.AST, module: str, is_pkg: bool) -> dict[str, str]:
    """Local name -> the dotted ehrsr object it is bound to by an import (a module or a name in
    one), at any depth. Names the source also assigns or defines are left out: they may mean
    something else where they are used."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _within(alias.name, "ehrsr"):
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(node, module, is_pkg)
            if _within(target, "ehrsr"):
                for alias in node.names:
                    if alias.name != "*":
                        bound[alias.asname or alias.name] = f"{target}.{alias.name}"
    rebound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            rebound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            rebound.add(node.name)
        elif isinstance(node, ast.arg):
            rebound.add(node.arg)
    return {name: target for name, target in bound.items() if name not in rebound}


def dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def uses_of(source: str, module: str, is_pkg: bool = False) -> list[Use]:
    """Every import of ehrsr in ``source`` and every attribute read through an imported ehrsr module."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Use(alias.name, (), node.lineno) for alias in node.names if _within(alias.name, "ehrsr")]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(node, module, is_pkg)
            if _within(target, "ehrsr"):
                found.append(Use(target, tuple(alias.name for alias in node.names), node.lineno))
    bound = bound_names(tree, module, is_pkg)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = dotted(node.value)
            if parts is None or parts[0] not in bound:
                continue
            owner = ".".join([bound[parts[0]], *parts[1:]])
            if is_module(owner):
                found.append(Use(owner, (node.attr,), node.lineno, attribute=True))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What is wrong with the ehrsr uses of ``module`` (empty when it follows the rules). Modules
    outside ehrsr (benchmarks) have no layer; the private-name rules hold for them too."""
    problems = []
    in_package = _within(module, "ehrsr")
    mine = layer_of(module) if in_package else None
    for use in uses_of(source, module, is_package):
        target = use.target
        where = f"{module}:{use.line} {'reads' if use.attribute else 'imports'} {target}"
        if mine is not None and not use.attribute:
            if layer_of(target) > mine:
                problems.append(f"{where}: a higher layer ({LAYERS[layer_of(target)][0]} above {LAYERS[mine][0]})")
            if _within(module, "ehrsr.reports") and any(_within(target, bad) for bad in REPORTS_FORBIDDEN):
                problems.append(f"{where}: reports only read the storage")
        parts = target.split(".")
        private_at = next((i for i, part in enumerate(parts) if is_private(part)), None)
        if private_at is not None and not _within(module, ".".join(parts[:private_at])):
            problems.append(f"{where}: a private module of another package")
        private_names = [n for n in use.names if is_private(n)]
        if private_names and not may_use_private(module, target):
            problems.append(f"{where}: private names {private_names} of another module")
    return problems


def source_files(root: Path = ROOT) -> list[Path]:
    """The ehrsr package and the benchmark scripts."""
    return sorted((root / "ehrsr").rglob("*.py")) + sorted((root / "benchmarks").glob("*.py"))


def all_violations(root: Path = ROOT) -> list[str]:
    problems = []
    for path in source_files(root):
        problems += violations(path.read_text(), module_name(path, root), is_package=path.name == "__init__.py")
    return problems


# ---------------------------------------------------------------------------------------------
# keywords of calls from benchmarks into ehrsr


def resolve(dotted_name: str) -> Any:
    """The object a dotted ehrsr name stands for (importing its module), or None."""
    parts = dotted_name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj
    return None


def stale_calls(source: str, module: str) -> list[str]:
    """Calls in ``source`` to ehrsr functions and classes (bound by import) with a keyword the
    callee does not take, or more positional arguments than it takes."""
    tree = ast.parse(source)
    bound = bound_names(tree, module, False)
    problems: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        parts = dotted(node.func)
        if parts is None or parts[0] not in bound:
            continue
        name = ".".join([bound[parts[0]], *parts[1:]])
        callee = resolve(name)
        if not callable(callee):
            continue
        try:
            signature = inspect.signature(callee)
        except (TypeError, ValueError):  # builtins without a signature
            continue
        kinds = [p.kind for p in signature.parameters.values()]
        where = f"{module}:{node.lineno} calls {name}"
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            takes = {p.name for p in signature.parameters.values()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            unknown = [kw.arg for kw in node.keywords if kw.arg is not None and kw.arg not in takes]
            if unknown:
                problems.append((node.lineno, f"{where} with keyword{'s' if len(unknown) > 1 else ''} "
                                              f"{', '.join(unknown)} it does not take {signature}"))
        if inspect.Parameter.VAR_POSITIONAL not in kinds and not any(isinstance(a, ast.Starred) for a in node.args):
            positional = sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                             for k in kinds)
            if len(node.args) > positional:
                problems.append((node.lineno, f"{where} with {len(node.args)} positional arguments; it takes "
                                              f"{positional} {signature}"))
    return [problem for _, problem in sorted(problems)]


def benchmark_scripts(root: Path = ROOT) -> list[Path]:
    return sorted((root / "benchmarks").glob("*.py"))


# ---------------------------------------------------------------------------------------------
# the rules, on the real code


def test_every_module_imports_only_downward_and_no_private_name_leaves_its_module() -> None:
    problems = all_violations()
    assert not problems, "\n".join(problems)
    assert len(list(PACKAGE.rglob("*.py"))) > 40 and len(benchmark_scripts()) > 15  # the walk really saw both


def test_benchmarks_call_ehrsr_with_arguments_it_takes() -> None:
    problems = []
    checked = 0
    for path in benchmark_scripts():
        source = path.read_text()
        problems += stale_calls(source, module_name(path))
        checked += sum(isinstance(n, ast.Call) for n in ast.walk(ast.parse(source)))
    assert not problems, "\n".join(problems)
    assert checked > 100


# ---------------------------------------------------------------------------------------------
# the checkers catch what they are for


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
        # a private name of a top-level module, used by another package
        ("ehrsr.fulltrain.recipe", "from ehrsr.config import _from_dict\n", "private names ['_from_dict']"),
        # ... or by a sibling module of the same package
        ("ehrsr.profiling.latency_model", "from ehrsr.profiling.latency import _cpu_name\n", "private names"),
        ("ehrsr.profiling.latency_model", "from .latency import _cpu_name\n", "private names"),
        # read through the module instead of imported
        ("ehrsr.data.task", "from ehrsr import config\nx = config._to_plain(1)\n", "reads ehrsr.config: private"),
        ("ehrsr.data.task", "import ehrsr.config as c\nc._to_plain(1)\n", "reads ehrsr.config: private"),
        ("ehrsr.data.task", "import ehrsr.config\nehrsr.config._to_plain(1)\n", "reads ehrsr.config: private"),
        ("ehrsr.deploy.pick", "def f():\n    from ehrsr.profiling import latency\n    return latency._cpu_name()\n",
         "private names ['_cpu_name']"),
        # benchmarks have no layer, but the same privacy
        ("benchmarks.x", "from ehrsr.blocks.ssm import _scan_orders\n", "private names"),
        ("benchmarks.x", "from ehrsr.blocks import ssm\nssm._mamba_kernel()\n", "private names ['_mamba_kernel']"),
        ("benchmarks.x", "from ehrsr.data import datasets\ndatasets._builtin_files([])\n", "private names"),
    ],
)
def test_the_checker_catches_each_kind_of_violation(module: str, source: str, expected: str) -> None:
    problems = violations(source, module)
    assert problems and expected in problems[0], problems


def test_the_checker_allows_downward_imports_and_a_module_own_names() -> None:
    assert violations("from ehrsr.search.study import load_study\n", "ehrsr.search.driver") == []
    assert violations("from ehrsr.ablation.table import controlled_table\n", "ehrsr.reports.report") == []
    assert violations("import ehrsr\nfrom ehrsr.study_schema import StudyInfo\n", "ehrsr.deploy.pick") == []
    assert violations("from ehrsr.reports import write_report\n", "ehrsr.pipeline") == []
    # a package's private module, inside the package; a package's own private names, inside it
    assert violations("from ehrsr.search._private import x\n", "ehrsr.search.driver") == []
    assert violations("from ehrsr.search import _helper\n", "ehrsr.search.driver") == []
    # a module's public names read through the module; private attributes of non-ehrsr objects
    assert violations("from ehrsr.blocks import ssm\nssm.SCAN_KERNEL = 'torch'\n", "benchmarks.x") == []
    assert violations("import optuna\nstudy._storage\n", "benchmarks.x") == []
    # a local name that shadows an imported module is not the module
    assert violations("from ehrsr import config\nconfig = {}\nconfig._x = 1\n", "ehrsr.model") == []


def test_the_whole_scan_fails_on_a_private_name_planted_in_a_copy(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "ehrsr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(BENCHMARKS, tmp_path / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    assert all_violations(tmp_path) == []
    recipe = tmp_path / "ehrsr" / "fulltrain" / "recipe.py"
    recipe.write_text(recipe.read_text() + "\n\ndef planted():\n    from ehrsr.config import _coerce\n    return _coerce\n")
    (tmp_path / "benchmarks" / "planted.py").write_text("from ehrsr.profiling import latency\nlatency._canonical(1)\n")
    problems = all_violations(tmp_path)
    assert len(problems) == 2, problems
    assert "ehrsr.fulltrain.recipe" in problems[0] and "'_coerce'" in problems[0]
    assert "benchmarks.planted:2 reads ehrsr.profiling.latency" in problems[1]


TRAIN_BEFORE_SETTINGS = """
from ehrsr.training import TrainSettings, train
from ehrsr.blocks import ssm

def run(model, data):
    train(model, data, steps=10, lr=1e-3, batch_size=8, patch_size=32, device="cpu")
    train(model, data, TrainSettings(steps=10), device="cpu", seed=1)    # fine
    TrainSettings.from_dict({"steps": 3}, ignore=("seed",), strict=True)
    ssm.selective_scan(1, 2, 3, 4, 5, 6, "auto", 8)
    ssm.selective_scan(*range(7))                                        # not checked: unpacked
    train(model, data, **{"steps": 10})                                  # not checked: unpacked
"""


def test_the_call_checker_names_each_stale_keyword() -> None:
    problems = stale_calls(TRAIN_BEFORE_SETTINGS, "benchmarks.x")
    assert len(problems) == 3, problems
    assert problems[0].startswith("benchmarks.x:6 calls ehrsr.training.train with keywords steps, lr, batch_size, "
                                  "patch_size it does not take")
    assert "benchmarks.x:8 calls ehrsr.training.TrainSettings.from_dict with keyword strict" in problems[1]
    assert "benchmarks.x:9 calls ehrsr.blocks.ssm.selective_scan with 8 positional arguments; it takes 7" in problems[2]
