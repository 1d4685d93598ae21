"""README's set-up installs exactly what CI installs, so a newcomer's test run is CI's test run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# pip options that change where files come from or how much pip prints, not what is installed
_QUIET_FLAGS = {"-q", "--quiet", "-U", "--upgrade", "--no-index"}
_OPTIONS_WITH_VALUE = {"--find-links", "-f", "--dest", "-d", "--cache-dir"}


def pip_installs(script: str) -> list[list[str]]:
    """The arguments of every ``pip install`` command in a shell script (comments, quoting,
    ``python -m`` and source/verbosity options removed); installs of pip itself are left out."""
    installs = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if "pip" not in words or "install" not in words or words.index("install") != words.index("pip") + 1:
            continue
        arguments, rest = [], iter(words[words.index("install") + 1 :])
        for word in rest:
            if word in _OPTIONS_WITH_VALUE:
                next(rest, None)
            elif word not in _QUIET_FLAGS:
                arguments.append(word)
        if arguments != ["pip"]:
            installs.append(arguments)
    return installs


def readme_setup() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Set-up\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "README's Set-up section has no bash block"
    return "\n".join(blocks)


def test_readme_setup_installs_what_ci_installs():
    readme = pip_installs(readme_setup())
    ci = pip_installs((REPO / ".ci" / "run").read_text())
    assert readme == ci, f"README's set-up {readme} differs from .ci/run's {ci}"
    assert ["-e", ".[test]"] in ci and any(a[0].startswith("torch==") for a in ci), ci


def test_pip_installs_parses_the_forms_used():
    script = """
    python -m pip install --quiet --upgrade pip
    pip install torch==2.14.1 torchvision==0.29.1     # or the build that suits you
    python -m pip install --quiet --find-links "$CACHE" "torch==2.14.1" "torchvision==0.29.1"
    python -m pip download --dest "$CACHE" torch==2.14.1
    pip install -e ".[test]"
    """
    assert pip_installs(script) == [
        ["torch==2.14.1", "torchvision==0.29.1"],
        ["torch==2.14.1", "torchvision==0.29.1"],
        ["-e", ".[test]"],
    ]


def test_the_test_extra_holds_what_the_tests_import():
    test = re.search(r"^test = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), flags=re.MULTILINE).group(1)
    for extra in ("iqa", "onnx", "baselines"):
        assert extra in re.search(r"ehrsr\[([^\]]*)\]", test).group(1).split(","), (extra, test)


def test_in_ci_a_test_needing_a_missing_optional_package_fails_instead_of_skipping(tmp_path):
    # tests/conftest.py's hook, run by a pytest of its own on two probes: one calls
    # pytest.importorskip inside a test, the other at module level (during collection)
    import os
    import subprocess
    import sys

    (tmp_path / "test_inside.py").write_text(
        "import pytest\n\n\ndef test_it():\n    pytest.importorskip('ehrsr_no_such_package')\n")
    (tmp_path / "test_module.py").write_text(
        "import pytest\n\npytest.importorskip('ehrsr_no_such_package_2')\n\n\ndef test_it():\n    pass\n")

    def run(ci: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "CI": ci, "PYTHONPATH": str(REPO)}
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "tests.conftest", "-p",
                               "no:cacheprovider", "--continue-on-collection-errors", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    outside = run("")
    assert outside.returncode == 0 and "2 skipped" in outside.stdout, outside.stdout[-2000:]
    inside = run("true")
    assert inside.returncode != 0, inside.stdout[-2000:]
    for module in ("ehrsr_no_such_package", "ehrsr_no_such_package_2"):
        assert f"{module} is missing, but CI installs every optional package" in inside.stdout, inside.stdout[-2000:]
    assert "skipped" not in inside.stdout
