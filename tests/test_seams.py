"""Seams: every training setting a search-space YAML gives reaches the code that uses it.

The values below are deliberately unusual, so a setting dropped on the way (a default taking
its place) cannot pass: the YAML's lr / weight_decay must be what AdamW is built with, its loss
the function training calls, its batch and patch the shape of every training batch, its steps
the number of optimizer updates, both in a search trial (space -> ``run_configuration``) and in
the controlled ablation (a stored reference trial -> ``run_controlled_ablation``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optuna
import pytest
import torch

import ehrsr.training
from ehrsr.data import TaskConfig, TrainSet, ValSet
from ehrsr.search.objectives import parse_objectives
from ehrsr.search.runner import (
    TRAIN_SETTINGS_VERSION,
    RunContext,
    run_configuration,
)
from ehrsr.search.space import space_from_text
from ehrsr.study_schema import PER_IMAGE_ATTR
from ehrsr.training import LOSSES, TrainSettings
from tests.data_helpers import synthetic_image
from tests.reports_study import study_attrs

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

LR, WEIGHT_DECAY, BATCH, PATCH, STEPS = 3.7e-4, 0.037, 3, 12, 7


def seam_yaml(loss: str) -> str:
    """tiny.yaml cut down to a micro network, every training setting set to a distinctive value."""
    return f"""\
description: seam test space
model:
  width: 8
  msg.levels: 0
  trunk_blocks: 1
  fsb.enabled: {{choices: [false, true]}}
  fsb.cutoff: 0.3
training:
  patch_size: {PATCH}
  batch_size: {BATCH}
  lr: {LR}
  weight_decay: {WEIGHT_DECAY}
  loss: {loss}
  min_steps: {STEPS}
  eta: 3
  max_steps: {STEPS}
  seconds_per_trial_estimate: 1
"""


@pytest.fixture(scope="module")
def ctx() -> RunContext:
    task = TaskConfig(scale=2)
    train_set = TrainSet.from_images([synthetic_image(48, 56, seed=i) for i in range(2)], task)
    val_set = ValSet.from_images([synthetic_image(32, 40, seed=9)], task)
    return RunContext(
        train_set=train_set, val_set=val_set, objectives=parse_objectives("psnr,latency"), crop_border=2,
        profile_shape=(1, 3, 16, 16), profile_seconds=1e-6,  # the minimum of 5 timed passes
    )


class Spies:
    """Records what training received: optimizer hyperparameters and steps, losses, batches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.optimizers: list[dict[str, Any]] = []
        self.losses: list[str] = []
        self.batches: list[tuple[int, int, tuple[int, ...]]] = []
        spies = self

        class SpyAdamW(torch.optim.AdamW):
            def __init__(self, params: Any, **kwargs: Any) -> None:
                super().__init__(params, **kwargs)
                self.record = {
                    "lr": kwargs["lr"],
                    "weight_decays": [g["weight_decay"] for g in self.param_groups],
                    "steps": 0,
                    "peak_lr": 0.0,
                }
                spies.optimizers.append(self.record)

            def step(self, closure: Any = None) -> Any:
                self.record["steps"] += 1
                self.record["peak_lr"] = max(self.record["peak_lr"], self.param_groups[0]["lr"])
                return super().step(closure)

        monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
        for name, function in list(ehrsr.training._LOSS_FUNCTIONS.items()):
            monkeypatch.setitem(ehrsr.training._LOSS_FUNCTIONS, name, self._loss_spy(name, function))
        original_sample = TrainSet.sample

        def sample(train_set: TrainSet, batch_size: int, patch_size: int, *args: Any, **kwargs: Any) -> Any:
            lr_patch, hr_patch = original_sample(train_set, batch_size, patch_size, *args, **kwargs)
            self.batches.append((batch_size, patch_size, tuple(lr_patch.shape)))
            return lr_patch, hr_patch

        monkeypatch.setattr(TrainSet, "sample", sample)

    def _loss_spy(self, name: str, function: Any) -> Any:
        def spy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            self.losses.append(name)
            return function(pred, target)

        return spy

    def assert_one_run_with(self, loss: str) -> None:
        """Exactly the YAML's settings, in one training run."""
        assert len(self.optimizers) == 1
        optimizer = self.optimizers[0]
        assert optimizer["lr"] == LR and optimizer["peak_lr"] == pytest.approx(LR)
        # the decayed group gets the YAML's weight decay; biases, norms and scalars none
        assert optimizer["weight_decays"] == [WEIGHT_DECAY, 0.0]
        assert optimizer["steps"] == STEPS
        assert self.losses == [loss] * STEPS
        assert self.batches == [(BATCH, PATCH, (BATCH, 3, PATCH, PATCH))] * STEPS

    def clear(self) -> None:
        self.optimizers.clear()
        self.losses.clear()
        self.batches.clear()


@pytest.mark.parametrize("loss", LOSSES)
def test_space_settings_reach_the_optimizer_loss_and_batches_of_a_trial(ctx, monkeypatch, loss) -> None:
    space = space_from_text(seam_yaml(loss), name="seams")
    study = optuna.create_study(directions=["maximize", "minimize"])
    sampled = space.suggest(study.ask(), scale=2)
    assert sampled.train == TrainSettings(
        steps=STEPS, lr=LR, weight_decay=WEIGHT_DECAY, loss=loss, batch_size=BATCH, patch_size=PATCH
    )
    spies = Spies(monkeypatch)
    result = run_configuration(sampled.config, sampled.train, ctx, seed=0)
    assert result.status == "complete" and result.steps_done == STEPS
    spies.assert_one_run_with(loss)


def test_a_reference_trials_stored_settings_reach_every_ablation_run(ctx, monkeypatch, tmp_path) -> None:
    from ehrsr.ablation import run_controlled_ablation

    yaml_text = seam_yaml("mse")
    space = space_from_text(yaml_text, name="seams")
    sampled = space.config_from_params({"fsb.enabled": True}, scale=2)
    # the reference trial as the search stores it
    study = optuna.create_study(
        study_name="seams", storage=f"sqlite:///{tmp_path / 'seams.db'}", directions=["maximize", "minimize"]
    )
    attrs = study_attrs(("psnr", "latency"))
    attrs["space"] = {"name": "seams", "path": None, "yaml": yaml_text}
    attrs["task"] = {**attrs["task"], "scale": 2}
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    stored_train = {**dataclasses.asdict(sampled.train), "seed": 0}
    study.add_trial(optuna.trial.create_trial(
        params={"fsb.enabled": True}, distributions=space.distributions, values=[30.0, 1.0],
        user_attrs={"config": sampled.config.to_dict(), "train": stored_train, "status": "complete"},
    ))

    spies = Spies(monkeypatch)
    calls: list[TrainSettings] = []

    def runner(config: Any, train: TrainSettings, run_ctx: Any, *, seed: int) -> Any:
        spies.clear()
        calls.append(train)
        result = run_configuration(config, train, run_ctx, seed=seed)
        spies.assert_one_run_with("mse")  # checked run by run, as each run builds its own optimizer
        return result

    result = run_controlled_ablation(study, ctx, seeds=1, progress=False, runner=runner)
    assert result.runs_run == len(calls) >= 2  # reference and baseline (fsb off) at least
    assert all(train == sampled.train for train in calls)
    runs = optuna.load_study(study_name=result.study_name, storage=study._storage).get_trials()
    assert all(t.user_attrs["train"] == stored_train for t in runs)  # stored as the search stores it
    assert all(t.user_attrs["status"] == "complete" for t in runs)
    # the final evaluation's per-image quality is stored with every run (one validation image here)
    assert all(list(t.user_attrs[PER_IMAGE_ATTR]) == [ctx.val_set[0].name] for t in runs)
    assert all(t.user_attrs[PER_IMAGE_ATTR][ctx.val_set[0].name][0] == pytest.approx(t.user_attrs["metrics"]["psnr"],
                                                                                    abs=1e-4) for t in runs)


def test_a_training_deadline_reaches_training_and_cuts_the_run_short(ctx, monkeypatch) -> None:
    import ehrsr.training

    seen: list[float | None] = []
    original = ehrsr.training.train

    def spy(*args: Any, seconds: float | None = None, **kwargs: Any) -> Any:
        seen.append(seconds)
        return original(*args, seconds=seconds, **kwargs)

    monkeypatch.setattr(ehrsr.training, "train", spy)
    space = space_from_text(seam_yaml("l1"), name="seams")
    sampled = space.config_from_params({"fsb.enabled": False}, scale=2)
    result = run_configuration(sampled.config, sampled.train, ctx, seed=0, train_seconds=0.0)
    assert seen == [0.0]
    assert result.status == "cut_short" and result.steps_done == 1 < STEPS
    assert "deadline" in result.reason and result.per_image is None and result.values is None
    full = run_configuration(sampled.config, sampled.train, ctx, seed=0)
    assert seen[-1] is None and full.status == "complete" and list(full.per_image) == [ctx.val_set[0].name]


def test_an_unknown_stored_setting_is_an_ablation_error(tmp_path) -> None:
    from ehrsr.ablation import AblationError, run_controlled_ablation

    study = optuna.create_study(directions=["maximize", "minimize"])
    for key, value in study_attrs(("psnr", "latency")).items():
        study.set_user_attr(key, value)
    config = {"scale": 4, "width": 8, "msg": {"levels": 0, "depths": []}, "trunk_blocks": 1}
    study.add_trial(optuna.trial.create_trial(values=[30.0, 1.0], user_attrs={
        "config": config, "status": "complete", "train": {"steps": 5, "lr": 1e-3, "momentum": 0.9},
    }))
    with pytest.raises(AblationError, match="reference trial 0's stored training settings: unknown training "
                                            "setting momentum"):
        run_controlled_ablation(study, object(), progress=False, runner=lambda *a, **k: None)


def test_a_study_without_a_record_is_not_resumed_and_new_ones_record_the_train_settings_version(tmp_path) -> None:
    """A study made by an earlier ehrsr (attributes, no study record) is refused in one line: its
    stored settings cannot be checked against what would run now."""
    from ehrsr.search.study import SearchError, SearchSettings, prepare_study

    space_file = tmp_path / "seams.yaml"
    space_file.write_text(seam_yaml("l1"))
    settings = SearchSettings(
        space=str(space_file), budget="trials=1", device="cpu", study_name="s", out_dir=tmp_path / "out",
        objectives="psnr,latency", task={"scale": 2}, cache_dir=str(tmp_path / "cache"),
    )
    fresh = prepare_study(settings, log=lambda *a, **k: None)
    assert fresh.study.user_attrs["train_settings_version"] == TRAIN_SETTINGS_VERSION
    assert fresh.record.train_settings_version == TRAIN_SETTINGS_VERSION
    assert prepare_study(settings, log=lambda *a, **k: None).study.study_name == "s"  # resumable

    storage = f"sqlite:///{tmp_path / 'out' / 'old' / 'study.db'}"
    (tmp_path / "out" / "old").mkdir(parents=True)
    old = optuna.create_study(study_name="old", storage=storage, directions=["maximize", "minimize"])
    old.set_user_attr("context", {"objectives": ["psnr", "latency"]})  # what an earlier ehrsr stored
    old.add_trial(optuna.trial.create_trial(
        params={"fsb.enabled": False}, distributions={"fsb.enabled": optuna.distributions.CategoricalDistribution(
            [False, True])}, values=[30.0, 1.0],
        user_attrs={"train": {"lr": LR, "weight_decay": WEIGHT_DECAY, "steps": STEPS, "seed": 0}},
    ))
    with pytest.raises(SearchError, match=r"^study 'old' was made by an earlier ehrsr \(it has no study record\)"):
        prepare_study(dataclasses.replace(settings, study_name="old"), log=lambda *a, **k: None)
