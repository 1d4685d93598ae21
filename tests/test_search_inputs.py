"""A failed first run must not poison its study: what can be checked is checked before the study
exists (threads, data, loss), a user error inside a trial fails that trial at once, and a study
with no finished trial may be re-created with new settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from PIL import Image

from ehrsr import faults
from ehrsr.cli import main
from ehrsr.search import trial as trial_module
from ehrsr.search.study import SearchError

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "tests" / "fixtures" / "micro.yaml"


def _images(folder: Path, size: int, n: int = 2, prefix: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(size)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{prefix}{i}.png")
    return folder


def _run(tmp_path: Path, capsys, *extra: str, study: str = "s", space: Path = MICRO) -> tuple[int, str, str]:
    code = main(["--space", str(space), "--study-name", study, "--budget", "trials=1", "--profile-size", "32",
                 "--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "r"), "--no-report", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    # progress bars (carriage-return lines) may come first; the error is one line and no traceback
    lines = [line.split("\r")[-1] for line in err.strip().splitlines()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("threads", ["-1", "0", "999"])
def test_threads_out_of_range_is_one_line_and_leaves_nothing(threads: str, tmp_path: Path, capsys) -> None:
    code, _, err = _run(tmp_path, capsys, "--threads", threads)
    cores = len(os.sched_getaffinity(0))
    assert code == 2 and f"--threads must be between 1 and {cores}" in _one_error_line(err)
    assert not (tmp_path / "r" / "s").exists()


def test_training_images_smaller_than_the_patch_are_refused_before_the_study(tmp_path: Path, capsys) -> None:
    train = _images(tmp_path / "train", 40)  # micro: patch 16 LR x4 = 64 px HR
    val = _images(tmp_path / "val", 32)
    code, _, err = _run(tmp_path, capsys, "--train-data", str(train), "--val-data", str(val))
    line = _one_error_line(err)
    assert code == 2 and "no image is large enough for the space's patch size 16" in line and "40x40" in line
    assert not (tmp_path / "r" / "s").exists()


@pytest.mark.parametrize("side", [6, 12])
def test_a_validation_image_too_small_to_measure_is_named(side: int, tmp_path: Path, capsys) -> None:
    # 12 px: cropped to 12 and by 4 px on each side, 4x4 px are left, too few for SSIM's 11x11 window
    train = _images(tmp_path / "train", 72)
    val = _images(tmp_path / "val", 32)
    _images(val, side, n=1, prefix="tiny")
    code, _, err = _run(tmp_path, capsys, "--train-data", str(train), "--val-data", str(val))
    line = _one_error_line(err)
    assert code == 2 and line == (f"error: --val-data: image tiny0.png ({side}x{side}) is too small for the crop "
                                  "border 4 of x4 and SSIM's 11x11 window: it needs at least 20x20 px")
    assert not (tmp_path / "r" / "s").exists()


def test_an_empty_data_folder_is_refused_before_the_study(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = _run(tmp_path, capsys, "--train-data", str(tmp_path / "empty"))
    assert code == 2 and "--train-data" in _one_error_line(err)
    assert not (tmp_path / "r" / "s").exists()


def test_an_unknown_loss_is_refused_before_the_study(tmp_path: Path, capsys) -> None:
    space = tmp_path / "bad.yaml"
    space.write_text(MICRO.read_text().replace("loss: l1", "loss: hinge"))
    code, _, err = _run(tmp_path, capsys, space=space)
    assert code == 2 and "hinge" in _one_error_line(err)
    assert not (tmp_path / "r" / "s").exists()


def test_a_user_error_inside_a_trial_fails_it_at_once(tmp_path: Path, capsys, monkeypatch) -> None:
    def bad_data(*args, **kwargs):
        raise SearchError("data: something only training could find")

    monkeypatch.setattr(trial_module, "run_configuration", bad_data)
    code, _, err = _run(tmp_path, capsys, "--budget", "trials=3")
    assert code == 2 and "something only training could find" in _one_error_line(err)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'r' / 's' / 'study.db'}")
    ran = [t for t in study.trials if t.state != TrialState.WAITING]  # (the second reference waits)
    assert len(ran) == 1  # the search stopped at the first user error
    first = ran[0]
    assert first.state == TrialState.FAIL and first.user_attrs["status"] == "error"
    assert "something only training" in first.user_attrs["reason"]


def test_a_study_without_finished_trials_is_recreated_with_new_settings(tmp_path: Path, capsys,
                                                                         monkeypatch) -> None:
    val = _images(tmp_path / "val", 32)
    first, second = _images(tmp_path / "a", 72), _images(tmp_path / "b", 80)
    monkeypatch.setenv(faults.ENV_VAR, "trial-exception")  # the first run's only trial fails
    code, _, err = _run(tmp_path, capsys, "--train-data", str(first), "--val-data", str(val))
    assert code == 0, err
    monkeypatch.delenv(faults.ENV_VAR)
    code, out, err = _run(tmp_path, capsys, "--train-data", str(second), "--val-data", str(val))
    assert code == 0, err
    assert "no finished trial: re-created with the new settings" in out
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'r' / 's' / 'study.db'}")
    assert study.user_attrs["data"]["train"] == str(second)
    assert [t.state for t in study.trials if t.state != TrialState.WAITING] == [TrialState.COMPLETE]
    # now it holds a finished trial: asking another question is refused again
    code, _, err = _run(tmp_path, capsys, "--train-data", str(first), "--val-data", str(val))
    assert code == 2 and "data.train (--train-data): stored" in _one_error_line(err)
