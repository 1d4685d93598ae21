"""The controlled ablation end to end with the real runner (training, evaluation, profiling) on a
tiny space and tiny images: a few seconds per variant on a CPU."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from ehrsr import build_model, reparameterize
from ehrsr.ablation import load_controlled_ablation, run_controlled_ablation
from ehrsr.search.study import ContextSpec, build_context
from tests.test_reports_ablation import reference_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def write_images(folder, crops):
    folder.mkdir()
    image = skdata.astronaut()  # (512, 512, 3) uint8
    for index, (top, left) in enumerate(crops):
        Image.fromarray(np.ascontiguousarray(image[top : top + 96, left : left + 96])).save(folder / f"{index}.png")


@pytest.mark.slow
def test_controlled_ablation_with_the_real_runner(tmp_path):
    write_images(tmp_path / "train", [(100, 100), (200, 250), (300, 150)])
    write_images(tmp_path / "val", [(40, 300)])
    study = reference_study(tmp_path)
    spec = ContextSpec(
        task={"task": "sr", "scale": 4}, train_data=str(tmp_path / "train"), val_data=str(tmp_path / "val"),
        objectives=["psnr", "latency"], profile_shape=[1, 3, 16, 16], profile_dtype="float32", threads=1,
        limits={}, crop_border=4, cache_dir=str(tmp_path / "cache"),
    )
    ctx = build_context(spec, torch.device("cpu"))
    ctx.profile_warmup, ctx.profile_repeats = 1, 3
    result = run_controlled_ablation(study, ctx, seeds=1, progress=False)
    assert result.runs_run == 5 and result.stopped is None
    ablation = optuna.load_study(study_name="abl-ablation", storage=study._storage)
    statuses = {t.user_attrs["variant"]: t.user_attrs["status"] for t in ablation.trials}
    assert statuses == dict.fromkeys(["reference", "baseline", "-wab", "-fsb", "+moe"], "complete")
    assert all(t.user_attrs["steps_done"] == 6 for t in ablation.trials)
    # each run stores its final per-image quality (one validation image: "0")
    assert all(list(t.user_attrs["per_image"]) == ["0"] for t in ablation.trials)
    assert all(t.user_attrs["per_image"]["0"][0] == pytest.approx(t.user_attrs["metrics"]["psnr"], abs=1e-4)
               for t in ablation.trials)
    table = result.table.set_index("variant")
    configs = {v.name: v.config for v in result.variants}
    assert (table["n_complete"] == 1).all()
    for name in ("baseline", "-wab", "-fsb", "+wab", "+fsb", "+moe"):
        assert math.isfinite(table.at[name, "delta_psnr_mean"])
        # parameter deltas are exact: count the deploy forms here and compare
        other = configs[table.at[name, "vs"]]

        def count(config):
            return sum(p.numel() for p in reparameterize(build_model(config)).parameters())

        assert table.at[name, "delta_params_deploy_mean"] == count(configs[name]) - count(other)
    assert table.at["-wab", "delta_params_deploy_mean"] < 0 < table.at["+moe", "delta_params_deploy_mean"]
    # one seed x one image: a delta but no interval and no verdict
    assert table.at["-wab", "units_psnr"] == "1 x seed x image" and table.at["-wab", "verdict"] == "n/a"
    loaded, plan = load_controlled_ablation(study)
    assert plan["steps"] == 6 and list(loaded["variant"]) == list(result.table["variant"])
