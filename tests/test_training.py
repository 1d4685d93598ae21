"""Brief training: schedule, budgets, callbacks, resume, divergence / OOM errors, and a real gain."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from ehrsr import build_model
from ehrsr.data import TaskConfig, TrainSet, prepare_data
from ehrsr.metrics import bicubic_baseline, evaluate
from ehrsr.training import (
    LOSSES,
    TrainingDiverged,
    TrainingError,
    TrainingOutOfMemory,
    TrainSettings,
    learning_rate_at,
    train,
)
from tests.data_helpers import synthetic_image


@pytest.fixture(scope="module")
def train_set() -> TrainSet:
    images = [synthetic_image(64, 72, seed=i) for i in range(3)]
    return TrainSet.from_images(images, TaskConfig(scale=2))


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model({"scale": 2, "width": 8, "msg": {"levels": 0, "depths": []}, "trunk_blocks": 1})


def test_learning_rate_schedule_values():
    kwargs = {"base_lr": 1e-3, "steps": 110, "warmup_steps": 10}
    assert learning_rate_at(0, **kwargs) == pytest.approx(1e-4)  # first warm-up step: base / 10
    assert learning_rate_at(9, **kwargs) == pytest.approx(1e-3)
    assert learning_rate_at(10, **kwargs) == pytest.approx(1e-3)  # cosine starts at the peak
    assert learning_rate_at(60, **kwargs) == pytest.approx(0.5e-3)  # half way through the decay
    assert learning_rate_at(110, **kwargs) == pytest.approx(0.0, abs=1e-15)
    assert learning_rate_at(5, base_lr=1.0, steps=10, warmup_steps=0) == pytest.approx(0.5)


def test_training_lowers_the_loss_and_reports_history(train_set):
    result = train(tiny_model(), train_set, TrainSettings(steps=40, batch_size=4, patch_size=16, lr=2e-3), log_every=10)
    assert result.steps_done == 40 and result.stop_reason == "steps" and not result.stopped_early
    assert [step for step, _ in result.history] == [10, 20, 30, 40]
    assert result.final_loss == result.history[-1][1]
    assert result.history[-1][1] < result.history[0][1]
    assert result.train_seconds > 0 and result.eval_seconds == 0


def test_same_seed_same_weights(train_set):
    a, b = tiny_model(), tiny_model()
    train(a, train_set, TrainSettings(steps=5, batch_size=2, patch_size=8), seed=7)
    train(b, train_set, TrainSettings(steps=5, batch_size=2, patch_size=8), seed=7)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_on_eval_runs_in_eval_mode_is_timed_and_can_stop(train_set, monkeypatch):
    # a fake clock: time moves only inside on_eval (50 ms per call), so the evaluation time is
    # exact and training time is 0 whatever the machine
    import ehrsr.training

    clock = {"now": 100.0}
    monkeypatch.setattr(ehrsr.training, "_clock", lambda: clock["now"])
    calls = []

    def on_eval(step: int, model: nn.Module) -> bool:
        calls.append((step, model.training))
        clock["now"] += 0.05
        return step < 6

    model = tiny_model()
    result = train(model, train_set, TrainSettings(steps=20, batch_size=2, patch_size=8), eval_steps=(3, 6, 9), on_eval=on_eval)
    assert calls == [(3, False), (6, False)]
    assert model.training  # back in train mode
    assert result.steps_done == 6 and result.stopped_early and result.stop_reason == "on_eval"
    assert result.eval_seconds == pytest.approx(0.1) and result.train_seconds == 0.0
    # the schedule spans the full 20 steps: the last update used step index 5 of 20
    last_lr = result.state["optimizer"]["param_groups"][0]["lr"]
    assert last_lr == pytest.approx(learning_rate_at(5, base_lr=1e-3, steps=20, warmup_steps=1))


def test_time_budget_stops_the_run(train_set):
    result = train(tiny_model(), train_set, TrainSettings(steps=1000, batch_size=2, patch_size=8), seconds=0.0)
    assert result.steps_done == 1 and result.stop_reason == "seconds" and result.stopped_early


def test_resuming_continues_the_same_run(train_set):
    straight, resumed = tiny_model(), tiny_model()
    settings = TrainSettings(steps=12, batch_size=2, patch_size=8)
    kwargs = {"settings": settings, "seed": 3}
    train(straight, train_set, **kwargs)
    first = train(resumed, train_set, eval_steps=(5,), on_eval=lambda step, model: False, **kwargs)
    assert first.steps_done == 5
    second = train(resumed, train_set, start_state=first.state, **kwargs)
    assert second.steps_done == 12
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_huge_learning_rate_is_reported_as_divergence(train_set):
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: (loss|gradient norm) is (nan|inf)") as info:
        train(tiny_model(), train_set, TrainSettings(steps=50, lr=1e30, warmup_steps=0, grad_clip=None, batch_size=2, patch_size=8))
    assert isinstance(info.value, TrainingError) and info.value.step >= 1


class OutOfMemoryModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_batch_and_patch_size(train_set):
    with pytest.raises(TrainingOutOfMemory, match=r"step 1 with batch_size=4, patch_size=8 \(LR pixels\)") as info:
        train(OutOfMemoryModel(), train_set, TrainSettings(steps=3, batch_size=4, patch_size=8))
    assert isinstance(info.value, TrainingError) and info.value.batch_size == 4


class AuxModel(nn.Module):
    """Pixel-shuffle SR whose aux_loss pulls a separate parameter towards 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.pulled = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))

    def aux_loss(self) -> torch.Tensor:
        return self.pulled**2


def test_aux_loss_is_added(train_set):
    model = AuxModel()
    result = train(model, train_set, TrainSettings(steps=30, lr=0.1, weight_decay=0.0, batch_size=2, patch_size=8, loss="charbonnier"))
    assert model.pulled.item() < 1.0  # only aux_loss gives it a gradient
    assert result.history[0][1] > 1.0  # the logged loss includes aux (4.0 at the start)


def test_bad_arguments_are_explained(train_set):
    with pytest.raises(TypeError, match="settings must be a TrainSettings, got dict"):
        train(tiny_model(), train_set, {"steps": 1})
    with pytest.raises(ValueError, match=r"patch_size 100 exceeds the largest that fits the training images \(32\)"):
        train(tiny_model(), train_set, TrainSettings(steps=1, batch_size=1, patch_size=100))
    x4 = build_model({"scale": 4, "width": 8, "msg": {"levels": 0, "depths": []}, "trunk_blocks": 1})
    with pytest.raises(ValueError, match=r"the model's scale \(4\) differs from the training data's \(2\)"):
        train(x4, train_set, TrainSettings(steps=1, batch_size=1, patch_size=8))


def test_settings_are_validated_with_the_field_named():
    assert LOSSES == ("l1", "mse", "charbonnier")
    for bad, field in [
        ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -1e-4}, "weight_decay"), ({"loss": "l2"}, "loss"), ({"batch_size": 0}, "batch_size"),
        ({"patch_size": True}, "patch_size"), ({"warmup_steps": -1}, "warmup_steps"), ({"grad_clip": 0}, "grad_clip"),
    ]:
        with pytest.raises(ValueError, match=f"^training setting {field} "):
            TrainSettings(**{"steps": 10, **bad})
    settings = TrainSettings(steps=200, lr=3e-4, weight_decay=0.0, loss="mse", batch_size=4, patch_size=24)
    assert settings.resolved_warmup_steps == 10  # 5% of 200
    assert dataclasses.replace(settings, warmup_steps=3).resolved_warmup_steps == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 1.0  # type: ignore[misc]


def test_settings_round_trip_through_a_stored_dict_and_reject_unknown_keys():
    settings = TrainSettings(steps=7, lr=5e-4, weight_decay=0.02, loss="charbonnier", batch_size=3, patch_size=12)
    stored = {**dataclasses.asdict(settings), "seed": 4}
    assert TrainSettings.from_dict(stored, ignore=("seed",)) == settings
    with pytest.raises(ValueError, match="unknown training setting seed; valid: steps, lr, weight_decay"):
        TrainSettings.from_dict(stored)
    assert TrainSettings.from_dict({"steps": 5}) == TrainSettings(steps=5)  # missing: the defaults


def test_each_named_loss_is_the_one_applied(train_set):
    import ehrsr.training

    pred, target = torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.0])
    functions = ehrsr.training._LOSS_FUNCTIONS
    assert functions["l1"](pred, target).item() == pytest.approx(0.75)
    assert functions["mse"](pred, target).item() == pytest.approx(0.625)
    assert functions["charbonnier"](pred, target).item() == pytest.approx(0.75, abs=1e-6)
    # mse trains (it used to be accepted by the space and crash here)
    result = train(tiny_model(), train_set, TrainSettings(steps=10, loss="mse", batch_size=2, patch_size=8), log_every=5)
    assert result.steps_done == 10 and math.isfinite(result.final_loss)


@pytest.fixture
def one_thread():
    """One intra-op thread: the same float results on every machine, and no collapse when the
    cores are shared (two OpenMP threads on a busy 2-core machine ran this test 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_brief_cpu_training_beats_bicubic_on_builtin_images(tmp_path, one_thread):
    """Under a minute on one CPU core: a tiny conv-only EHR-SR x2 trained on the built-in images
    must beat MATLAB-bicubic upsampling of the same LR on the built-in validation images."""
    train_set, val_set = prepare_data(TaskConfig(scale=2), cache_dir=tmp_path, progress=False)
    torch.manual_seed(0)
    model = build_model({"scale": 2, "width": 16, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1})
    assert model.config.enabled_modules() == ()
    result = train(model, train_set, TrainSettings(steps=500, batch_size=16, patch_size=32, lr=3e-3), seed=0)
    assert result.steps_done == 500 and math.isfinite(result.final_loss)
    bicubic = bicubic_baseline(val_set)
    trained = evaluate(model, val_set, crop_border=2)
    gain_db = trained.psnr - bicubic.psnr
    print(f"\nbicubic {bicubic.psnr:.3f} dB, trained {trained.psnr:.3f} dB, gain {gain_db:+.3f} dB "
          f"({result.train_seconds:.1f} s training)")
    assert gain_db > 0.3
    assert trained.ssim > bicubic.ssim
    assert np.all([row["psnr"] > b["psnr"] for row, b in zip(trained.per_image, bicubic.per_image)])
