"""report, ablate and deploy on a study made by a real (micro) search."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from ehrsr.cli import main

REPO = Path(__file__).resolve().parents[1]
MICRO = str(REPO / "tests" / "fixtures" / "micro.yaml")


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reports")
    code = main(["--space", MICRO, "--budget", "trials=4", "--out-dir", str(out), "--cache-dir",
                 str(out / "cache"), "--profile-size", "32", "--study-name", "sub", "--no-report", "--quiet",
                 "--no-early-stopping"])
    assert code == 0
    return out


def test_report_regenerates_everything_from_storage(searched: Path, capsys) -> None:
    study_dir = searched / "sub"
    assert not (study_dir / "report.md").exists()  # --no-report: nothing yet
    assert main(["report", "--study-name", "sub", "--out-dir", str(searched)]) == 0
    assert "report written" in capsys.readouterr().out
    for name in ("report.md", "trials.csv", "pareto.csv", "ablation_observational.md", "importance.csv"):
        assert (study_dir / name).stat().st_size > 0, name
    assert list((study_dir / "figures").glob("pareto_psnr_vs_latency.png"))


def test_deploy_picks_and_a_too_strict_profile_exits_2(searched: Path, tmp_path: Path, capsys) -> None:
    devices = tmp_path / "devices.yaml"
    devices.write_text(
        "profiles:\n"
        "  roomy-cpu:\n    kind: cpu\n    threads: 1\n    dtype: float32\n    input_size: [24, 24]\n"
        "    max_latency_ms: 100000\n"
        "  impossible:\n    kind: cpu\n    threads: 1\n    dtype: float32\n    input_size: [24, 24]\n"
        "    max_params: 10\n"
    )
    args = ["deploy", "--study-name", "sub", "--out-dir", str(searched), "--devices-file", str(devices), "--quiet"]
    assert main([*args, "--device-profile", "roomy-cpu"]) == 0
    out = capsys.readouterr().out
    assert "roomy-cpu: trial #" in out
    pick = json.loads((searched / "sub" / "deploy" / "roomy-cpu.json").read_text())
    assert (searched / "sub" / "deploy" / "roomy-cpu.safetensors").exists()
    study = optuna.load_study(study_name="sub", storage=f"sqlite:///{searched / 'sub' / 'study.db'}")
    front = {t.number: t.values[0] for t in study.best_trials}
    assert front[pick["trial"]] == max(front.values())  # no latency pressure: the best PSNR wins

    assert main([*args, "--device-profile", "impossible"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "max_params" in err and len(err.splitlines()) == 1
    assert main([*args, "--device-profile", "no-such-profile"]) == 2
    assert "no-such-profile" in capsys.readouterr().err


def test_ablate_runs_and_is_stored_in_its_own_study(searched: Path, capsys) -> None:
    code = main(["ablate", "--study-name", "sub", "--out-dir", str(searched), "--ablation-seeds", "1",
                 "--quiet", "--budget", "minutes=2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "controlled ablation of trial #" in out
    storage = f"sqlite:///{searched / 'sub' / 'study.db'}"
    ablation = optuna.load_study(study_name="sub-ablation", storage=storage)
    assert any(t.user_attrs.get("variant") == "reference" for t in ablation.trials)
    assert (searched / "sub" / "ablation_controlled.md").exists()


def test_subcommands_need_an_existing_study(tmp_path: Path, capsys) -> None:
    assert main(["report", "--out-dir", str(tmp_path)]) == 2
    assert "--study-name" in capsys.readouterr().err
    assert main(["report", "--study-name", "nope", "--out-dir", str(tmp_path)]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    assert main(["ablate", "--study-name", "nope", "--out-dir", str(tmp_path), "--budget", "trials=3"]) == 2


def test_only_user_errors_become_one_line_and_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    import ehrsr.pipeline
    from ehrsr.ablation import AblationError
    from ehrsr.deploy import DeploymentError, DeviceProfileError
    from ehrsr.errors import ConfigError, UserError
    from ehrsr.search.storage import StorageError
    from ehrsr.search.study import SearchError

    for error in (AblationError, DeploymentError, DeviceProfileError, ConfigError, StorageError, SearchError):
        assert issubclass(error, UserError), error
    args = ["report", "--study-name", "s", "--out-dir", str(tmp_path)]
    calls = []

    def user_mistake(*a, **k):
        calls.append(a)
        raise ConfigError("width must be an integer, got 'x'\nsecond line")

    monkeypatch.setattr(ehrsr.pipeline, "report_study", user_mistake)
    assert main(args) == 2
    assert calls  # the CLI really went through the pipeline
    assert capsys.readouterr().err == "error: width must be an integer, got 'x'\n"

    def bug(*a, **k):
        return {}["missing"]  # a programming error on purpose

    monkeypatch.setattr(ehrsr.pipeline, "report_study", bug)
    with pytest.raises(KeyError):
        main(args)

    def plain_value_error(*a, **k):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(ehrsr.pipeline, "report_study", plain_value_error)
    with pytest.raises(ValueError, match="internal invariant"):
        main(args)


def test_report_and_deploy_into_an_unwritable_folder_are_one_line(searched: Path, tmp_path: Path, capsys) -> None:
    # tests run as root, where chmod does not stop writes: an output folder under a regular file
    # cannot be created or written by anyone
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    storage = f"sqlite:///{searched / 'sub' / 'study.db'}"
    for command in (["report"], ["deploy", "--device-profile", "x"]):
        assert main([*command, "--study-name", "sub", "--storage", storage, "--out-dir", str(blocker)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: output folder") and "not writable" in err


def test_write_failures_during_report_and_deploy_are_one_line(searched: Path, monkeypatch, capsys) -> None:
    # a folder turning read-only (or a full disk) while writing, simulated where the writes happen
    import errno

    from safetensors import SafetensorError

    import ehrsr.pipeline

    target = searched / "sub" / "report.md"

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(target))

    monkeypatch.setattr(ehrsr.pipeline, "write_report", read_only)
    assert main(["report", "--study-name", "sub", "--out-dir", str(searched)]) == 2
    assert capsys.readouterr().err == f"error: cannot write to {target}: Read-only file system\n"

    def serializing(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem })")

    monkeypatch.setattr(ehrsr.pipeline, "pick_deployment", serializing)
    assert main(["deploy", "--study-name", "sub", "--out-dir", str(searched), "--device-profile", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Error while serializing" in err and err.startswith("error: weights file")

    def bug(*a, **k):
        raise FileNotFoundError(errno.ENOENT, "No such file", "x")  # not a write failure: keeps its traceback

    monkeypatch.setattr(ehrsr.pipeline, "write_report", bug)
    with pytest.raises(FileNotFoundError):
        main(["report", "--study-name", "sub", "--out-dir", str(searched)])
