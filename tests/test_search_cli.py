"""run_search.py end to end on the CPU: real searches on the tiny / micro spaces, resume, bad input."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ehrsr.cli import main
from ehrsr.study_schema import STUDY_ATTRS, StudyRecord

REPO = Path(__file__).resolve().parents[1]
MICRO = str(REPO / "tests" / "fixtures" / "micro.yaml")


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(REPO / "run_search.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _study(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'study.db'}")


@pytest.mark.slow
def _short_tiny(folder: Path) -> Path:
    """The shipped tiny space with its trials cut to 12 and 36 steps (its own 324 / 972 make this
    test many minutes); its measured proxy section goes, as it holds for the shipped protocol only."""
    text = (REPO / "ehrsr" / "search_spaces" / "tiny.yaml").read_text()
    text = text[:text.index("\nproxy:")].replace("min_steps: 324", "min_steps: 12").replace("max_steps: 972",
                                                                                            "max_steps: 36")
    path = folder / "tiny.yaml"
    path.write_text(text)
    return path


def test_tiny_search_three_trials_then_resume_to_five(tmp_path: Path) -> None:
    # the command of a newcomer (plus where to write), with the report, ablation and picks, on the
    # tiny space at test length
    common = ["--space", str(_short_tiny(tmp_path)), "--out-dir", str(tmp_path / "reports"),
              "--cache-dir", str(tmp_path / "cache")]
    first = _run([*common, "--budget", "trials=3"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    name = "ehrsr-tiny-sr-x4"
    study = _study(tmp_path / "reports", name)
    ran = [t for t in study.trials if t.state != TrialState.WAITING]
    assert len(ran) == 3
    # the two reference configurations were enqueued and ran first
    assert [t.user_attrs.get("reference") for t in ran[:2]] == ["conv-only", "all-modules"]
    complete = [t for t in ran if t.state == TrialState.COMPLETE]
    assert complete, "no trial finished at full fidelity"
    for t in complete:
        assert t.user_attrs["metrics"]["psnr"] > 15 and t.user_attrs["metrics"]["latency_ms"] > 0
        assert t.values[0] == pytest.approx(t.user_attrs["metrics"]["psnr"])
        assert (tmp_path / "reports" / name / t.user_attrs["weights"]).exists()
    rows = list(csv.DictReader((tmp_path / "reports" / name / "trials.csv").open()))
    assert len(rows) == 3
    assert "Search ehrsr-tiny-sr-x4" in first.stdout and "budget used" in first.stdout
    assert (tmp_path / "reports" / name / "report.md").exists()

    second = _run([*common, "--budget", "trials=5"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(resumed)" in second.stdout
    study = _study(tmp_path / "reports", name)
    ran_again = [t for t in study.trials if t.state != TrialState.WAITING]
    assert len(ran_again) == 5
    # the first three trials are untouched by the resume
    assert [(t.number, t.state, t.values) for t in ran_again[:3]] == [(t.number, t.state, t.values) for t in ran]


def test_micro_search_records_everything_the_reports_need(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    code = main(["--space", MICRO, "--budget", "trials=4", "--out-dir", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--profile-size", "32", "--study-name", "micro", "--no-report", "--quiet", "--seed", "3",
                 "--profile-seconds", "0.000001"])
    assert code == 0
    study = _study(out, "micro")
    assert study.metric_names == ["psnr", "latency"]
    attrs = study.user_attrs
    for key in ("objectives", "space", "task", "data", "device", "profile", "budget", "limits", "conventions",
                "early_stopping", "shares", "record_version"):
        assert key in attrs, key
    assert set(attrs) <= set(STUDY_ATTRS), set(attrs) - set(STUDY_ATTRS)
    assert attrs["space"]["yaml"] == Path(MICRO).read_text()
    # the bicubic baseline, computed independently from the same cached data
    from ehrsr.data import TaskConfig, prepare_data
    from ehrsr.metrics import bicubic_baseline

    expected = bicubic_baseline(prepare_data(TaskConfig(), cache_dir=str(tmp_path / "c"), progress=False)[1])
    assert attrs["baseline"]["psnr"] == pytest.approx(expected.psnr, abs=1e-9)
    assert attrs["baseline"]["name"] == "bicubic (MATLAB)"
    assert "crop_border=4" in attrs["conventions"]["psnr"]
    # --profile-seconds reaches the stored recipe, the stated convention and every latency plan
    assert attrs["profile"]["seconds"] == 1e-6 and "about 1e-06 s" in attrs["conventions"]["latency"]
    assert StudyRecord.from_attrs(attrs).profile.seconds == 1e-6
    measured = [t for t in study.trials if "latency_repeats" in t.user_attrs.get("metrics", {})]
    assert measured and all(t.user_attrs["metrics"]["latency_repeats"] == 5 for t in measured)
    for t in study.trials:
        assert t.user_attrs["status"] in ("complete", "pruned", "refused", "diverged", "oom")
        assert "config" in t.user_attrs and "train" in t.user_attrs
        if t.state == TrialState.COMPLETE:
            assert set(t.user_attrs["seconds"]) >= {"train", "eval", "profile", "total"}
            assert t.user_attrs["charged_seconds"] > 0 and t.user_attrs["device_kind"] == "cpu"
            # per-image quality of the final evaluation: the 18 built-in validation tiles
            per_image = t.user_attrs["per_image"]
            assert len(per_image) == 18
            assert sum(p for p, _ in per_image.values()) / 18 == pytest.approx(t.user_attrs["metrics"]["psnr"], abs=1e-3)
        if t.state == TrialState.PRUNED:
            assert "MO-ASHA" in t.user_attrs["reason"]
            assert any(k.startswith("rung_") for k in t.user_attrs)


def test_no_early_stopping_trains_every_trial_fully(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    code = main(["--space", MICRO, "--budget", "trials=4", "--out-dir", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--profile-size", "32", "--study-name", "full", "--no-report", "--quiet", "--no-early-stopping"])
    assert code == 0
    trials = _study(out, "full").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert all(t.user_attrs["steps_done"] == 8 for t in trials)


def test_limits_refuse_before_training_and_constrain_after(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    code = main(["--space", MICRO, "--budget", "trials=3", "--out-dir", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--profile-size", "32", "--study-name", "lim", "--no-report", "--quiet",
                 "--max-params", "2.5k", "--max-latency-ms", "1000", "--sampler", "random"])
    assert code == 0
    trials = _study(out, "lim").trials
    refused = [t for t in trials if t.user_attrs.get("status") == "refused"]
    # micro's all-modules reference has 2,924 deploy parameters and its conv-only one 2,236: the
    # references run first, so the limit refuses the second whatever the sampler draws after them
    assert any(t.user_attrs.get("reference") == "all-modules" for t in refused), refused
    for t in refused:
        assert t.state == TrialState.FAIL and "params" in t.user_attrs["reason"] and "max-params" in t.user_attrs["reason"]
        assert "charged_seconds" not in t.user_attrs  # refused trials cost no budget
    measured = [t for t in trials if t.state == TrialState.COMPLETE]
    for t in measured:
        assert set(t.constraints) == {"latency_ms"}
        assert t.constraints["latency_ms"] == pytest.approx(t.user_attrs["metrics"]["latency_ms"] - 1000)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "gpu-hours=oops"], "gpu-hours=oops"),
        (["--budget", "weeks=2"], "weeks"),
        (["--budget", "gpu-hours=2"], "cpu-hours"),
        (["--objectives", "psnr,speed"], "unknown objective 'speed'"),
        (["--objectives", "latency,macs"], "quality objective"),
        (["--sampler", "cmaes"], "invalid choice"),
        (["--max-params", "lots"], "--max-params"),
        (["--profile-size", "big"], "--profile-size"),
        (["--workers", "0"], "--workers"),
        (["--space", "nonexistent_space"], "nonexistent_space"),
        (["--device", "tpu"], "--device"),
        (["--scale", "7"], "scale"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    code = main([*args, "--out-dir", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and message in err, err
    assert len(err.splitlines()) == 1, err


def test_help_and_subcommand_help_exit_0(capsys) -> None:
    assert main(["--help"]) == 0
    assert "--budget" in capsys.readouterr().out
    for command in ("report", "ablate", "deploy"):
        assert main([command, "--help"]) == 0
        assert "--study-name" in capsys.readouterr().out


def test_malformed_space_file_names_file_and_key(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: {choices: [8]}\ntraining:\n  patch_size: 16\n")
    code = main(["--space", str(bad), "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "bad.yaml" in err and "widht" in err and len(err.splitlines()) == 1


def test_unreachable_storage_masks_password_and_keeps_existing_study(tmp_path: Path, capsys) -> None:
    url = "postgresql://searcher:s3cret-pw@127.0.0.1:9/ehrsr"
    code = main(["--storage", url, "--budget", "trials=1", "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "s3cret-pw" not in err and "searcher:***@127.0.0.1" in err


def test_unwritable_output_folder(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["--out-dir", str(blocker / "reports"), "--budget", "trials=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not writable" in err


def test_resume_with_other_objectives_is_refused_and_changes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "reports"
    base = ["--space", MICRO, "--out-dir", str(out), "--cache-dir", str(tmp_path / "c"), "--profile-size", "32",
            "--study-name", "same", "--no-report", "--quiet"]
    assert main([*base, "--budget", "trials=2"]) == 0
    before = [(t.number, t.state, t.values) for t in _study(out, "same").trials]
    capsys.readouterr()
    code = main([*base, "--budget", "trials=4", "--objectives", "psnr,macs"])
    err = capsys.readouterr().err
    assert code == 2 and "objectives (--objectives): stored ['psnr', 'latency'], given ['psnr', 'macs']" in err
    assert [(t.number, t.state, t.values) for t in _study(out, "same").trials] == before
