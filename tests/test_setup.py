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
