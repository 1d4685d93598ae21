"""The newcomer's path after a search (README "Quick start"): a deployment pick, ``train --pick``
on it, then ``evaluate`` of the trained weights, all through the command line (``ehrsr.cli.main``)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import save_file

from ehrsr import EHRSRConfig, build_model
from ehrsr.cli import main
from ehrsr.deploy import DeviceProfile, pick_deployment
from tests.data_helpers import synthetic_image, write_image
from tests.reports_study import study_attrs

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

TINY = {"width": 8, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1, "scale": 2}


def _tiny_pick(root: Path) -> Path:
    """A study with one finished trial (a tiny x2 network with non-trivial weights) and its pick."""
    root.mkdir(parents=True)
    study = optuna.create_study(study_name="quick", storage=f"sqlite:///{root / 'study.db'}",
                                directions=["maximize", "minimize"])
    for key, value in study_attrs(("psnr", "latency")).items():
        study.set_user_attr(key, value)
    config = EHRSRConfig.from_dict(TINY)
    model = build_model(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    (root / "weights").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "weights/trial_0.safetensors"))
    study.add_trial(optuna.trial.create_trial(values=[30.0, 1.0], user_attrs={
        "config": config.to_dict(), "weights": "weights/trial_0.safetensors", "status": "complete",
        "metrics": {"psnr": 30.0, "ssim": 0.8, "lpips": None, "latency_ms": 1.0},
        "train": {"lr": 1e-3, "steps": 8, "batch_size": 4, "patch_size": 16, "loss": "l1", "seed": 0},
    }))
    profile = DeviceProfile(name="test-cpu", kind="cpu", threads=1, input_size=(16, 16), warmup=1, repeats=3)
    return pick_deployment(study, profile, root, weights_root=root, progress=False).json_path


def test_pick_then_train_then_evaluate_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(2):
        write_image(tmp_path / "train" / f"t{i}.png", synthetic_image(48, 56, seed=i))
        write_image(tmp_path / "val" / f"v{i}.png", synthetic_image(36, 30, seed=10 + i))
    pick = _tiny_pick(tmp_path / "reports")
    assert pick == tmp_path / "reports" / "deploy" / "test-cpu.json"
    out = tmp_path / "run"
    data = ["--val-data", f"S={tmp_path / 'val'}", "--cache-dir", str(tmp_path / "cache")]
    rc = main(["train", "--pick", str(pick), "--steps", "3", "--out", str(out), "--train-data", str(tmp_path / "train"),
               *data, "-q", "--set", "batch_size=2", "--set", "patch_size=8", "--set", "val_every=3"])
    assert rc == 0
    # the run trained the pick's configuration, not a default one
    pick_config = EHRSRConfig.from_dict(json.loads(pick.read_text())["config"])
    assert EHRSRConfig.from_dict(json.loads((out / "config.json").read_text())) == pick_config
    evaluation = json.loads((out / "evaluation.json").read_text())["sets"]["S"]
    capsys.readouterr()
    rc = main(["evaluate", "--weights", str(out / "model_deploy.safetensors"), *data])
    printed = capsys.readouterr().out
    assert rc == 0
    # evaluate recomputes the number the training run stored, from the deploy weights alone
    assert f"| EHR-SR | x2 | {evaluation['psnr']:.2f}/{evaluation['ssim']:.4f} |" in printed
