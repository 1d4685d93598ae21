"""Full training: recipe overrides, EMA, exact resume, exports, the model card, evaluate, bad input."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ehrsr import EHRSRConfig, build_model, reparameterize
from ehrsr.data import TaskConfig
from ehrsr.fulltrain import (
    FullTrainError,
    FullTrainSettings,
    ModelEMA,
    Recipe,
    ValData,
    add_evaluate_parser,
    add_train_parser,
    full_train,
    load_checkpoint,
    prepare_sets,
)
from ehrsr.fulltrain.recipe import parse_overrides
from ehrsr.metrics import evaluate
from tests.data_helpers import synthetic_image, write_image

REPO = Path(__file__).resolve().parents[1]

TINY = {"width": 8, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1, "scale": 2}
# small, fast, and an EMA that moves visibly in a few steps (the default 0.999 would barely move)
FAST = ["batch_size=2", "patch_size=8", "val_every=2", "checkpoint_every=2", "ema_decay=0.5", "lr=5e-3"]


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser()
    sub = root.add_subparsers()
    add_train_parser(sub)
    add_evaluate_parser(sub)
    return root


def cli(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fulltrain")
    for i in range(2):
        write_image(root / "train" / f"t{i}.png", synthetic_image(48, 56, seed=i))
        write_image(root / "val" / f"v{i}.png", synthetic_image(36, 30, seed=10 + i))
        write_image(root / "val2" / f"w{i}.png", synthetic_image(28, 34, seed=20 + i))
    (root / "cfg.json").write_text(json.dumps(TINY))
    return root


def settings(data: Path, out: Path, steps: int, **changes) -> FullTrainSettings:
    overrides = {k: v for k, v in parse_overrides(FAST).items()}
    recipe = Recipe.from_dict({**overrides, "steps": steps})
    base = dict(config=EHRSRConfig.from_dict(TINY), recipe=recipe, out_dir=out, train_data=data / "train",
                val_data=(ValData("S", data / "val"),), cache_dir=data / "cache", progress=False, finish=False)
    return FullTrainSettings(**{**base, **changes})


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    argv = ["train", "--config", str(data / "cfg.json"), "--train-data", str(data / "train"),
            "--val-data", f"S={data / 'val'}", "--val-data", f"T={data / 'val2'}", "--out", str(out),
            "--cache-dir", str(data / "cache"), "-q"]
    for item in FAST:
        argv += ["--set", item]
    return [*argv, *extra]


# ---------------------------------------------------------------------------------------------
# recipe


def test_recipe_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(FullTrainError, match=r"unknown recipe key 'learning_rate'.*valid keys: steps"):
        parse_overrides(["learning_rate=1e-3"])
    assert parse_overrides(["lr=2e-4", "betas=[0.8, 0.9]", "schedule=multistep"]) == {
        "lr": 2e-4, "betas": [0.8, 0.9], "schedule": "multistep"}
    with pytest.raises(FullTrainError, match="ema_decay must be in"):
        Recipe.from_dict({"ema_decay": 1.0})
    with pytest.raises(FullTrainError, match="schedule must be one of"):
        Recipe.from_dict({"schedule": "linear"})
    # multistep halves at the milestones (fractions of steps)
    recipe = Recipe(steps=100, schedule="multistep", lr=1.0)
    assert [recipe.learning_rate(s) for s in (0, 49, 50, 80, 90, 95, 99)] == [1.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.0625]


# ---------------------------------------------------------------------------------------------
# EMA


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_after_n_steps_is_the_formula_on_the_recorded_weights(warmup):
    decay = 0.9
    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model, decay, warmup=warmup)
    generator = torch.Generator().manual_seed(0)
    recorded = [{k: v.clone().double() for k, v in model.state_dict().items()}]  # w_0
    for _ in range(5):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        recorded.append({k: v.clone().double() for k, v in model.state_dict().items()})
        ema.update(model)
    n = len(recorded) - 1
    # decay of update t: d, or min(d, (1 + t) / (10 + t)) with warm-up (0.1, 0.18, 0.25, ... here)
    d = [min(decay, (1 + t) / (10 + t)) if warmup else decay for t in range(n)]
    for key, value in ema.state_dict().items():
        # ema_n = (prod_t d_t) w_0 + sum_k (1 - d_{k-1}) (prod_{t >= k} d_t) w_k
        expected = math.prod(d) * recorded[0][key]
        for k in range(1, n + 1):
            expected = expected + (1 - d[k - 1]) * math.prod(d[k:]) * recorded[k][key]
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
    assert ema.updates == n
    assert not torch.allclose(ema.state_dict()["weight"], model.weight)  # it lags the raw weights


# ---------------------------------------------------------------------------------------------
# resume


def test_resume_after_a_kill_equals_an_uninterrupted_run_bit_for_bit(data, tmp_path):
    config = EHRSRConfig.from_dict({**TINY, "noise": {"enabled": True}})  # noise draws from torch's RNG
    straight = full_train(settings(data, tmp_path / "a", 4, config=config))
    assert straight.finished and straight.resumed_from is None
    first = full_train(settings(data, tmp_path / "b", 4, config=config, stop_after=3))  # killed after step 3
    assert not first.finished and load_checkpoint(tmp_path / "b/checkpoints/last.pt")["step"] == 2
    second = full_train(settings(data, tmp_path / "b", 4, config=config, resume=True))
    assert second.resumed_from == 2 and second.finished
    a = load_checkpoint(tmp_path / "a/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "b/checkpoints/last.pt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name])
    assert a["history"] == b["history"] and a["best"] == b["best"]
    assert torch.equal(a["rng"]["sampler"], b["rng"]["sampler"]) and torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # and the EMA really differs from the raw weights, so comparing both means something
    assert any(not torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])


# ---------------------------------------------------------------------------------------------
# a finished run through the CLI handler


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    rc = cli(train_argv(data, out, "--steps", "4", "--set", "optimizer=adamw", "--set", "weight_decay=0.01",
                        "--set", "betas=[0.8, 0.95]"))
    assert rc == 0
    return out


def test_cli_settings_reach_the_optimizer_and_the_run_folder(finished):
    checkpoint = load_checkpoint(finished / "checkpoints/last.pt")
    groups = checkpoint["optimizer"]["param_groups"]
    assert tuple(groups[0]["betas"]) == (0.8, 0.95) and groups[0]["weight_decay"] == 0.01
    assert groups[1]["weight_decay"] == 0.0  # biases and norms are not decayed
    recipe = Recipe.from_dict(__import__("yaml").safe_load((finished / "recipe.yaml").read_text()))
    assert recipe.optimizer == "adamw" and recipe.steps == 4 and recipe.betas == (0.8, 0.95)
    assert checkpoint["recipe"] == recipe.to_dict()
    rows = (finished / "validation.csv").read_text().splitlines()
    assert rows[0] == "step,set,psnr,ssim,lr,loss" and len(rows) == 1 + 2 * 2  # steps 2 and 4, sets S and T
    assert (finished / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((finished / "best.json").read_text())
    s_rows = [r.split(",") for r in rows[1:] if r.split(",")[1] == "S"]
    assert best["psnr"] == max(float(r[2]) for r in s_rows)


def test_exports_load_into_build_model_and_reproduce_the_ema_model(finished):
    config = EHRSRConfig.load(finished / "config.json")
    ema_state = load_checkpoint(finished / "checkpoints/last.pt")["ema"]
    ema = build_model(config).eval()
    ema.load_state_dict(ema_state)
    trained = build_model(config).eval()
    trained.load_state_dict(load_file(str(finished / "model.safetensors")))
    deploy = reparameterize(build_model(config)).eval()
    deploy.load_state_dict(load_file(str(finished / "model_deploy.safetensors")))
    x = torch.rand(1, 3, 13, 17, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = ema(x)
        assert torch.equal(trained(x), reference)
        torch.testing.assert_close(deploy(x), reference, rtol=0, atol=1e-5)
        # the weights were trained: not the bicubic base an untrained (zero-head) network returns
        assert (reference - build_model(config).eval()(x)).abs().max() > 1e-3


def test_model_card_numbers_equal_the_stored_evaluation(finished, data):
    evaluation = json.loads((finished / "evaluation.json").read_text())
    card = (finished / "MODEL.md").read_text()
    for name, numbers in evaluation["sets"].items():
        assert f"| {name} | 2 | EHR-SR | {numbers['psnr']:.2f} | {numbers['ssim']:.4f} |" in card
        assert f"| {name} | 2 | Bicubic | {numbers['bicubic']['psnr']:.2f} | {numbers['bicubic']['ssim']:.4f} |" in card
    cost = evaluation["cost"]
    assert f"Parameters: {cost['params_deploy']:,}" in card and f"{cost['macs'] / 1e9:.3f} G at 1x3x256x256" in card
    assert f"{cost['latency_ms']:.2f} ms median" in card and cost["device"] in card
    assert cost["input_shape"] == [1, 3, 256, 256]
    # the stored numbers are those of ehrsr.metrics.evaluate on the exported deploy weights
    config = EHRSRConfig.load(finished / "config.json")
    deploy = reparameterize(build_model(config)).eval()
    deploy.load_state_dict(load_file(str(finished / "model_deploy.safetensors")))
    _, sets = prepare_sets(TaskConfig(scale=2), data / "train", (ValData("S", data / "val"),), cache_dir=data / "cache")
    result = evaluate(deploy, sets[0][1], crop_border=2)
    assert evaluation["sets"]["S"]["psnr"] == result.psnr and evaluation["sets"]["S"]["ssim"] == result.ssim


def test_evaluate_matches_ehrsr_metrics_evaluate(finished, data, capsys):
    rc = cli(["evaluate", "--weights", str(finished / "model_deploy.safetensors"), "--val-data", f"S={data / 'val'}",
              "--cache-dir", str(data / "cache")])
    out = capsys.readouterr().out
    assert rc == 0
    evaluation = json.loads((finished / "evaluation.json").read_text())["sets"]["S"]
    assert f"| EHR-SR | x2 | {evaluation['psnr']:.2f}/{evaluation['ssim']:.4f} |" in out
    assert f"| Bicubic | x2 | {evaluation['bicubic']['psnr']:.2f}/{evaluation['bicubic']['ssim']:.4f} |" in out


def test_evaluate_reads_other_architectures_through_spandrel(data, tmp_path, capsys):
    spandrel = pytest.importorskip("spandrel")
    from spandrel.architectures.Compact import Compact  # Real-ESRGAN's SRVGGNetCompact

    torch.manual_seed(0)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).eval()
    torch.save(net.state_dict(), tmp_path / "compact_x2.pth")
    rc = cli(["evaluate", "--weights", str(tmp_path / "compact_x2.pth"), "--val-data", f"S={data / 'val'}",
              "--cache-dir", str(data / "cache")])
    out = capsys.readouterr().out
    assert rc == 0, out
    _, sets = prepare_sets(TaskConfig(scale=2), None, (ValData("S", data / "val"),), cache_dir=data / "cache")
    descriptor = spandrel.ModelLoader().load_from_file(str(tmp_path / "compact_x2.pth"))
    result = evaluate(descriptor.model.eval(), sets[0][1], crop_border=2)
    assert re.search(rf"\| RealESRGAN Compact \(spandrel\) \| x2 \| {result.psnr:.2f}/{result.ssim:.4f} \|", out), out


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing lost


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_train_input_is_one_line_and_exit_2(data, tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({**TINY, "widht": 8}))
    argv = train_argv(data, tmp_path / "o")
    argv[argv.index("--config") + 1] = str(tmp_path / "bad.json")
    assert cli(argv) == 2
    assert "unknown configuration key 'widht'" in one_error_line(capsys)
    assert cli(train_argv(data, tmp_path / "o", "--scale", "4")) == 2
    assert "--scale 4: the configuration is x2" in one_error_line(capsys)
    (tmp_path / "recipe.yaml").write_text("lr: 1.0e-3\nepochs: 3\n")
    assert cli(train_argv(data, tmp_path / "o", "--recipe", str(tmp_path / "recipe.yaml"))) == 2
    assert "unknown keys epochs" in one_error_line(capsys)
    assert cli(train_argv(data, tmp_path / "o", "--set", "lr")) == 2
    assert "expected KEY=VALUE" in one_error_line(capsys)
    (tmp_path / "file").write_text("")
    assert cli(train_argv(data, tmp_path / "file" / "out")) == 2
    assert one_error_line(capsys) == f"error: output folder {tmp_path / 'file' / 'out'} is not writable: a file is in its path"
    assert cli(train_argv(data, tmp_path / "fresh", "--resume")) == 2
    assert "no checkpoint to resume from" in one_error_line(capsys)
    # LR images made at x4 for a x2 configuration
    from ehrsr.data import imresize

    for i in range(2):
        hr = synthetic_image(36, 32, seed=30 + i)
        write_image(tmp_path / "hr" / f"p{i}.png", hr)
        lr = imresize(torch.from_numpy(hr).permute(2, 0, 1)[None].double(), 0.25)[0].permute(1, 2, 0)
        write_image(tmp_path / "lr" / f"p{i}.png", lr.round().clamp(0, 255).byte().numpy())
    argv = train_argv(data, tmp_path / "o")
    argv[argv.index(f"S={data / 'val'}")] = f"S={tmp_path / 'hr'},{tmp_path / 'lr'}"
    assert cli(argv) == 2
    assert "are x4 of their HR images, but the model is x2" in one_error_line(capsys)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_corrupt_checkpoint_is_refused_and_kept(data, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints/last.pt").write_bytes(b"not a checkpoint")
    assert cli(train_argv(data, out, "--steps", "2")) == 2
    assert "is damaged or not a checkpoint" in one_error_line(capsys)
    assert (out / "checkpoints/last.pt").read_bytes() == b"not a checkpoint"


def test_resume_with_other_settings_is_refused(finished, data, capsys):
    before = (finished / "checkpoints/last.pt").read_bytes()
    assert cli(train_argv(data, finished, "--steps", "8")) == 2
    message = one_error_line(capsys)
    assert "holds a run with other settings" in message and "steps: 4 -> 8" in message
    assert (finished / "checkpoints/last.pt").read_bytes() == before


def test_bad_evaluate_input_is_one_line_and_exit_2(finished, data, tmp_path, capsys):
    assert cli(["evaluate", "--weights", str(tmp_path / "none.safetensors")]) == 2
    assert "weights file not found" in one_error_line(capsys)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert cli(["evaluate", "--weights", str(tmp_path / "junk.pth"), "--val-data", f"S={data / 'val'}"]) == 2
    assert "spandrel cannot read it" in one_error_line(capsys)
    assert cli(["evaluate", "--weights", str(finished / "model.safetensors"), "--scale", "4"]) == 2
    assert "is x2" in one_error_line(capsys)


def test_configuration_sources_pick_file_and_exactly_one(tmp_path):
    from ehrsr.fulltrain import resolve_config

    pick = {"profile": {"name": "laptop"}, "study": "s", "trial": 7, "config": TINY, "weights": "laptop.safetensors",
            "train": {"steps": 108, "lr": 1e-3}}
    (tmp_path / "laptop.json").write_text(json.dumps(pick))
    source = resolve_config(pick=tmp_path / "laptop.json")
    assert source.config == EHRSRConfig.from_dict(TINY) and source.search_train == pick["train"]
    assert "study s, trial 7, profile laptop" in source.description
    (tmp_path / "c.yaml").write_text("width: 12\nscale: 3\n")
    assert resolve_config(config=tmp_path / "c.yaml").config == EHRSRConfig(width=12, scale=3)
    with pytest.raises(FullTrainError, match="exactly one of"):
        resolve_config(pick=tmp_path / "laptop.json", config=tmp_path / "c.yaml")
    with pytest.raises(FullTrainError, match="exactly one of"):
        resolve_config()
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(FullTrainError, match="is not valid JSON"):
        resolve_config(pick=tmp_path / "broken.json")


# ---------------------------------------------------------------------------------------------
# TensorBoard curves, and Ctrl-C / SIGTERM


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run folder's event files, read by TensorBoard's own reader, with its
    purging of out-of-order steps off: a duplicate step left in the files shows here."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0}, purge_orphaned_data=False)
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def steps_of(curves: dict[str, list[tuple[int, float]]], tag: str) -> list[int]:
    return [step for step, _ in curves[tag]]


def test_curves_of_a_killed_and_resumed_run_equal_the_uninterrupted_ones(data, tmp_path):
    # points close every 3 steps and at every checkpoint (checkpoint_every=2): 2, 3, 4, 6
    full_train(settings(data, tmp_path / "a", 6, log_every=3))
    killed = full_train(settings(data, tmp_path / "b", 6, log_every=3, stop_after=3))  # killed after step 3
    assert load_checkpoint(tmp_path / "b/checkpoints/last.pt")["step"] == 2 and killed.steps_done == 3
    assert steps_of(scalars(tmp_path / "b"), "train/loss") == [2, 3]  # the point of step 3 is past the checkpoint
    full_train(settings(data, tmp_path / "b", 6, log_every=3, resume=True))
    straight, resumed = scalars(tmp_path / "a"), scalars(tmp_path / "b")
    expected_tags = {"train/loss", "train/grad_norm", "train/lr", "train/steps_per_second",
                     "val/S/psnr", "val/S/ssim"}  # no CUDA here: no memory curve
    assert set(straight) == set(resumed) == expected_tags
    for tag in expected_tags:
        steps = steps_of(resumed, tag)
        # unique, in order, and covering the run: step 3 was written by both calls, kept once
        assert steps == ([2, 4, 6] if tag.startswith("val/") else [2, 3, 4, 6]), tag
        if tag != "train/steps_per_second":  # a clock; everything else repeats exactly on the CPU
            assert resumed[tag] == straight[tag], tag
    assert len(list((tmp_path / "b").glob("events.out.tfevents.*"))) == 2  # one file per call
    # the curves say what validation.csv says: its PSNR, and its loss column (the mean since the
    # previous validation) is the mean over the points' own steps (points 3 and 4 cover steps 3..4)
    rows = [line.split(",") for line in (tmp_path / "b/validation.csv").read_text().splitlines()[1:]]
    assert resumed["val/S/psnr"] == [(int(r[0]), pytest.approx(float(r[2]), abs=1e-5)) for r in rows if r[1] == "S"]
    csv_loss = {int(r[0]): float(r[5]) for r in rows if r[1] == "S"}
    loss = dict(resumed["train/loss"])
    assert csv_loss == pytest.approx({2: loss[2], 4: (loss[3] + loss[4]) / 2, 6: loss[6]}, rel=1e-6)
    recipe = Recipe.from_dict({**parse_overrides(FAST), "steps": 6})
    assert dict(resumed["train/lr"]) == pytest.approx({s: recipe.learning_rate(s - 1) for s in (2, 3, 4, 6)}, rel=1e-6)


def test_a_fresh_run_drops_curves_of_an_earlier_run_killed_before_its_first_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    full_train(settings(data, out, 6, log_every=1, stop_after=1))  # killed after step 1, no checkpoint yet
    assert not (out / "checkpoints/last.pt").exists() and steps_of(scalars(out), "train/loss") == [1]
    full_train(settings(data, out, 6, log_every=1))
    assert steps_of(scalars(out), "train/loss") == [1, 2, 3, 4, 5, 6]


def test_drop_events_after_keeps_every_event_up_to_the_step(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from ehrsr.fulltrain.curves import drop_events_after

    writer = SummaryWriter(str(tmp_path))
    for step in range(1, 8):
        writer.add_scalar("x", step * 10.0, step)
    writer.close()
    assert drop_events_after(tmp_path, 7) == 0  # nothing above: the file is left as it is
    assert drop_events_after(tmp_path, 4) == 3
    assert scalars(tmp_path) == {"x": [(s, s * 10.0) for s in range(1, 5)]}
    assert not list(tmp_path.glob(".*.tmp"))  # the rewrite left no temporary file


STOP_STEPS = 12


def stop_recipe() -> Recipe:
    # checkpoints only at the end: without a handler, a stop would keep nothing
    return Recipe.from_dict({**parse_overrides(FAST), "steps": STOP_STEPS, "checkpoint_every": 1000})


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    full_train(settings(data, out, STOP_STEPS, recipe=stop_recipe(), log_every=1))
    return out


@pytest.mark.parametrize(("signal_number", "name", "status"),
                         [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130)])
def test_sigterm_or_ctrl_c_writes_a_checkpoint_and_the_resumed_run_is_the_uninterrupted_one(
        data, tmp_path, uninterrupted, signal_number, name, status):
    out = tmp_path / "stopped"
    argv = train_argv(data, out, "--steps", str(STOP_STEPS), "--set", "checkpoint_every=1000", "--log-every", "1")
    argv[argv.index(f"T={data / 'val2'}") - 1: argv.index(f"T={data / 'val2'}") + 1] = []  # the settings() run's sets
    # the same thread count as this process, so the steps run here after the resume add up the same
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, str(REPO / "run_search.py"), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "validation.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the first validation (step 2) is written: training is under way
    proc.send_signal(signal_number)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    step = load_checkpoint(out / "checkpoints/last.pt")["step"]
    assert 2 <= step < STOP_STEPS
    assert err.strip().splitlines()[-1] == (f"interrupted ({name}): checkpoint at step {step} in "
                                            f"{out / 'checkpoints/last.pt'}; run the same command again to resume")
    assert steps_of(scalars(out), "train/loss") == list(range(1, step + 1))  # a point closed at the stop
    resumed = full_train(settings(data, out, STOP_STEPS, recipe=stop_recipe(), log_every=1))
    assert resumed.resumed_from == step and resumed.finished
    a = load_checkpoint(uninterrupted / "checkpoints/last.pt")
    b = load_checkpoint(out / "checkpoints/last.pt")
    # the checkpoint held whole steps: the resumed run is the uninterrupted one, bit for bit
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    curves = scalars(out)
    assert steps_of(curves, "train/loss") == list(range(1, STOP_STEPS + 1))
    assert steps_of(curves, "val/S/psnr") == list(range(2, STOP_STEPS + 1, 2))
    assert curves["train/loss"] == scalars(uninterrupted)["train/loss"]
