"""Every script in benchmarks/ runs with ``--smoke``: its real code path at the smallest size.

The scripts are found by globbing ``benchmarks/*.py`` (helpers start with ``_``), so a new script
without ``--smoke`` fails here. Two child processes run them side by side (tests/smoke_runner.py:
each imports torch once, takes the next script nobody has taken and calls its
``main(["--smoke"])``); each script must exit with status 0 and print its table. Their timings are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._common import parse_args
from tests.smoke_runner import claim, run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
# the longest first (they start searches or worker processes), so the two runners end together
SLOW_FIRST = ("baselines.py", "profiling_share.py", "full_training.py", "profile_reference.py", "dataset_memory.py",
              "revisits.py", "storage_overhead.py")
TABLE = re.compile(r"^\|.*\|\n\|[-|: ]+\|\n(\|.*\|\n)+", re.M)  # header, separator, at least one row


def has_table(text: str) -> bool:
    return TABLE.search(text if text.endswith("\n") else text + "\n") is not None


def in_order(scripts: list[Path]) -> list[Path]:
    """``SLOW_FIRST`` first, then the rest by name."""
    return sorted(scripts, key=lambda p: (SLOW_FIRST.index(p.name) if p.name in SLOW_FIRST else len(SLOW_FIRST), p.name))


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("smoke")
    runs = []
    for i in range(2):
        out = folder / f"runner{i}.json"
        # one thread each: two runners share 2 cores without oversubscribing them
        process = subprocess.Popen([sys.executable, "-m", "tests.smoke_runner", str(out), str(folder / "claims"),
                                    *map(str, in_order(SCRIPTS))],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        runs.append((process, out))
    results: dict[str, dict] = {}
    for process, out in runs:
        try:
            log, _ = process.communicate(timeout=900)
        except subprocess.TimeoutExpired:  # the scripts it did not finish fail below as "did not run"
            process.kill()
            log, _ = process.communicate()
        if out.exists():
            results.update({r["script"]: r for r in json.loads(out.read_text())})
        print(log)
    timings = sorted(results.values(), key=lambda r: -r["seconds"])
    print("\n".join(f"{r['script']}: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU" for r in timings))
    return results


def test_the_glob_sees_every_benchmark() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"gpu_check.py", "baselines.py", "validation_power.py", "blocks.py"} <= names and len(names) >= 18
    assert all(p.stem.isidentifier() for p in SCRIPTS)  # importable as benchmarks.<stem>


@pytest.mark.slow
@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_smoke_run_exits_0_and_prints_its_table(script: str, smoke_results: dict[str, dict]) -> None:
    result = smoke_results.get(script)
    assert result is not None, f"{script} did not run (its runner process died; see the captured output)"
    detail = f"{result['error'] or ''}\n--- stderr (end) ---\n{result['stderr_tail']}"
    assert result["status"] == 0, f"{script} --smoke exited with status {result['status']}\n{detail}"
    assert has_table(result["stdout"]), f"{script} --smoke printed no table:\n{result['stdout'][-2000:]}\n{detail}"


def test_the_table_check_needs_a_header_a_separator_and_a_row() -> None:
    assert has_table("title\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert has_table("| a |\n|-----|\n|   1 |")
    assert not has_table("| a | b |\n|---|---|\n")  # no row
    assert not has_table("| a | b |\n| 1 | 2 |\n")  # no separator
    assert not has_table("a table would go here\n")


NO_SMOKE = """
import argparse

def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    print("| size |\\n|---|\\n|", args.size, "|")
"""


def test_a_script_without_smoke_fails_its_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "__init__.py").write_text("")
    (tmp_path / "planted" / "nosmoke.py").write_text(NO_SMOKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run_script(Path("nosmoke.py"), package="planted")
    assert result["status"] == 2 and "unrecognized arguments: --smoke" in result["stderr_tail"]
    assert not has_table(result["stdout"])


def test_smoke_defaults_replace_the_scripts_own_and_explicit_flags_win() -> None:
    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_argument("--size", type=int, default=256)
        p.add_argument("--repeats", type=int, default=7)
        return p

    smoke = {"size": 16, "repeats": 1}
    plain = parse_args(parser(), [], smoke)
    assert (plain.size, plain.repeats, plain.smoke) == (256, 7, False)
    small = parse_args(parser(), ["--smoke"], smoke)
    assert (small.size, small.repeats, small.smoke) == (16, 1, True)
    assert parse_args(parser(), ["--smoke", "--size", "32"], smoke).size == 32
    with pytest.raises(ValueError, match="sizes"):
        parse_args(parser(), ["--smoke"], {"sizes": [16]})


def test_two_runners_never_claim_the_same_script(tmp_path: Path) -> None:
    assert claim(tmp_path, Path("benchmarks/blocks.py"))
    assert not claim(tmp_path, Path("benchmarks/blocks.py"))
    assert claim(tmp_path, Path("benchmarks/revisits.py"))
