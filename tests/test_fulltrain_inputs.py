"""``train`` and ``evaluate`` against hostile input: each problem is one ``error:`` line, exit 2,
and nothing in the run folder is written or lost (docs/full_training.md)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ehrsr import EHRSRConfig, build_model
from ehrsr.files import PathOutsideFolder, hold_lock
from ehrsr.fulltrain import FullTrainError, Recipe
from ehrsr.fulltrain.checkpoint import save_weights
from ehrsr.fulltrain.loop import LOCK_NAME
from ehrsr.fulltrain.recipe import parse_overrides
from tests.data_helpers import synthetic_image, write_image
from tests.test_fulltrain import TINY, cli, one_error_line, train_argv

X4 = {**TINY, "scale": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    for i in range(2):
        write_image(root / "train" / f"t{i}.png", synthetic_image(48, 56, seed=i))
        write_image(root / "val" / f"v{i}.png", synthetic_image(36, 30, seed=10 + i))
        write_image(root / "val2" / f"w{i}.png", synthetic_image(28, 34, seed=20 + i))
    (root / "cfg.json").write_text(json.dumps(TINY))
    (root / "x4.json").write_text(json.dumps(X4))
    return root


def _x4_weights(folder: Path) -> Path:
    config = EHRSRConfig.from_dict(X4)
    path = folder / "x4.safetensors"
    save_weights(build_model(config), path, config, "train")
    return path


@pytest.mark.parametrize("side", [10, 12, 19])
def test_a_validation_image_too_small_to_measure_is_named_by_train_and_evaluate(data, tmp_path, capsys, side) -> None:
    # at x4 an image is cropped to a multiple of 4 and loses 4 px on each side, and SSIM's 11x11
    # window must still fit: 20x20 is the least (10 px left 0, 12 px left 4, 19 px left 8)
    val = tmp_path / "val"
    for i in range(2):
        write_image(val / f"v{i}.png", synthetic_image(36, 30, seed=10 + i))
    write_image(val / "tiny.png", synthetic_image(side, side, seed=3))
    expected = (f"error: --val-data S: image tiny.png ({side}x{side}) is too small for the crop border 4 of x4 and "
                "SSIM's 11x11 window: it needs at least 20x20 px")
    argv = train_argv(data, tmp_path / "run", "--config", str(data / "x4.json"))
    argv[argv.index(f"S={data / 'val'}")] = f"S={val}"
    argv[argv.index("--config") + 1] = str(data / "x4.json")
    assert cli(argv) == 2
    assert one_error_line(capsys) == expected
    assert not any((tmp_path / "run").iterdir())  # nothing written
    assert cli(["evaluate", "--weights", str(_x4_weights(tmp_path)), "--val-data", f"S={val}",
                "--cache-dir", str(data / "cache")]) == 2
    assert one_error_line(capsys) == expected


def test_a_validation_image_of_the_least_measurable_size_is_evaluated(data, tmp_path, capsys) -> None:
    val = tmp_path / "val"
    write_image(val / "least.png", synthetic_image(20, 20, seed=3))
    assert cli(["evaluate", "--weights", str(_x4_weights(tmp_path)), "--val-data", f"S={val}",
                "--cache-dir", str(data / "cache")]) == 0
    assert "| Bicubic | x4 |" in capsys.readouterr().out


FLOAT_FIELDS = [f.name for f in dataclasses.fields(Recipe)
                if isinstance(getattr(Recipe(), f.name), float) or f.name in ("betas", "milestones", "grad_clip")]


@pytest.mark.parametrize("field_name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_of_the_recipe_must_be_finite(field_name: str, value: str) -> None:
    base = Recipe()
    if isinstance(getattr(base, field_name), tuple):
        text = "[" + ", ".join([str(getattr(base, field_name)[0]), f".{value}".replace(".-", "-.")]) + "]"
    else:
        text = value
    with pytest.raises(FullTrainError, match=rf"^recipe: {field_name} must be finite, got "):
        Recipe.from_dict(parse_overrides([f"{field_name}={text}"]))


def test_recipe_floats_are_all_covered() -> None:
    # a new float field of the recipe is checked too (the check reads the dataclass's fields)
    assert {"lr", "weight_decay", "gamma", "ema_decay", "grad_clip", "betas", "milestones"} <= set(FLOAT_FIELDS)


def test_set_lr_inf_is_one_line_and_trains_nothing(data, tmp_path, capsys) -> None:
    assert cli(train_argv(data, tmp_path / "run", "--set", "lr=inf")) == 2
    assert one_error_line(capsys) == "error: recipe: lr must be finite, got inf"
    assert not (tmp_path / "run").exists()
    assert math.isfinite(Recipe.from_dict(parse_overrides(["lr=2e-4"])).lr)


def test_a_second_train_into_the_same_folder_is_refused(data, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("steps: 4\n")  # the first run's files
    with hold_lock(run / LOCK_NAME):  # the first run, training
        assert cli(train_argv(data, run, "--steps", "2")) == 2
        message = one_error_line(capsys)
        assert message.startswith(f"error: {run} is in use by another process (pid ")
        assert message.endswith("lock file .lock); wait for that run to end or choose another --out")
        assert sorted(p.name for p in run.iterdir()) == [".lock", "recipe.yaml"]
        assert (run / "recipe.yaml").read_text() == "steps: 4\n"
    # once the first has ended, a run into another folder and this one both work
    assert cli(train_argv(data, tmp_path / "other", "--steps", "2")) == 0
    assert not (tmp_path / "other" / LOCK_NAME).exists()  # the lock goes with the run
    capsys.readouterr()


def test_a_weight_shape_mismatch_names_the_tensors_and_both_shapes(data, tmp_path, capsys) -> None:
    narrow = EHRSRConfig.from_dict(TINY)
    wide = EHRSRConfig.from_dict({**TINY, "width": 16})
    weights = tmp_path / "narrow.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(narrow).state_dict().items()}, str(weights))
    (tmp_path / "wide.json").write_text(wide.to_json())
    assert cli(["evaluate", "--weights", str(weights), "--config", str(tmp_path / "wide.json")]) == 2
    message = one_error_line(capsys)
    file_state, model_state = build_model(narrow).state_dict(), build_model(wide).state_dict()
    differ = {k for k in file_state if file_state[k].shape != model_state[k].shape}
    named = re.findall(r"([\w.]+) \(file (\([\d, ]*\)), model (\([\d, ]*\))\)", message.split("; deploy form")[0])
    assert len(named) == 3 and f"train form: {len(differ)} tensors of another shape: " in message
    for name, in_file, in_model in named:  # the first three, each with both of its shapes
        assert name in differ
        assert (in_file, in_model) == (str(tuple(file_state[name].shape)), str(tuple(model_state[name].shape)))
    assert "Error(s) in loading state_dict" not in message
    assert message.startswith(f"error: {weights}: the weights do not fit the configuration (train form: ")


def test_a_pick_whose_weights_lead_outside_its_folder_is_refused(data, tmp_path, capsys) -> None:
    from ehrsr.deploy import load_deployed_model
    from ehrsr.reparam import reparameterize

    config = EHRSRConfig.from_dict(TINY)
    deploy = reparameterize(build_model(config))
    secret = tmp_path / "elsewhere" / "secret.safetensors"  # loadable weights: only the path is wrong
    secret.parent.mkdir()
    save_file({k: v.contiguous().clone() for k, v in deploy.state_dict().items()}, str(secret))
    picks = tmp_path / "reports" / "s" / "deploy"
    picks.mkdir(parents=True)
    for name, weights in (("up", "../../../elsewhere/secret.safetensors"), ("absolute", str(secret))):
        pick = picks / f"{name}.json"
        pick.write_text(json.dumps({"config": TINY, "weights": weights, "profile": {"name": name}}))
        assert cli(["evaluate", "--weights", str(pick)]) == 2
        assert one_error_line(capsys) == (f"error: {pick}: weights {weights!r} is not a file inside "
                                          f"{picks.resolve()}: refused")
        with pytest.raises(PathOutsideFolder):
            load_deployed_model(pick)
    # the same file beside the pick loads
    (picks / "secret.safetensors").write_bytes(secret.read_bytes())
    (picks / "ok.json").write_text(json.dumps({"config": TINY, "weights": "secret.safetensors"}))
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(load_deployed_model(picks / "ok.json")(x), deploy.eval()(x))
