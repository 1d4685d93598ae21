"""LPIPS through pyiqa's real loading code, with weight files the test makes (random, right shapes).

These values are not calibrated LPIPS (the weights are random); the tests check the loading
paths, the offline error, sharing, and the metric's basic behaviour (0 for identical images,
growing with noise).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ehrsr.data import TaskConfig, ValSet
from ehrsr.metrics import (
    ALEXNET_WEIGHTS_FILE,
    LPIPS,
    LPIPS_WEIGHTS_FILE,
    LPIPSUnavailable,
    bicubic_baseline,
)
from tests.data_helpers import make_lpips_weights, synthetic_image

pytest.importorskip("pyiqa", reason="LPIPS needs the optional 'iqa' extra (pyiqa)")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_lpips_weights(tmp_path_factory.mktemp("lpips"))


def test_identical_images_give_zero_and_noise_increases_it(weights):
    metric = LPIPS(weights_path=weights)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    assert metric(x, x).tolist() == [0.0, 0.0]
    scores = [metric((x + s * torch.randn_like(x)).clamp(0, 1), x) for s in (0.02, 0.08, 0.3)]
    assert all(s.shape == (2,) for s in scores)
    assert (scores[0] > 0).all() and (scores[0] < scores[1]).all() and (scores[1] < scores[2]).all()


def test_both_weight_files_are_really_loaded(weights):
    metric = LPIPS(weights_path=weights)
    net = metric._metric.net
    lin = torch.load(weights / LPIPS_WEIGHTS_FILE, weights_only=True)
    alex = torch.load(weights / ALEXNET_WEIGHTS_FILE, weights_only=True)
    assert torch.equal(net.lin2.model[1].weight.detach(), lin["lin2.model.1.weight"])
    assert torch.equal(net.net.slice1[0].weight.detach(), alex["features.0.weight"])


def test_built_once_per_device_and_weights(weights):
    assert LPIPS(weights_path=weights)._metric is LPIPS("cpu", weights_path=weights)._metric


def test_weights_path_may_name_the_linear_layer_file(weights):
    metric = LPIPS(weights_path=weights / LPIPS_WEIGHTS_FILE)  # AlexNet found beside it
    x = torch.rand(1, 3, 32, 32)
    assert metric(x, x).item() == 0.0


def test_missing_weights_name_the_files_and_folders(tmp_path):
    with pytest.raises(LPIPSUnavailable) as info:
        LPIPS(weights_path=tmp_path)
    message = str(info.value)
    assert LPIPS_WEIGHTS_FILE in message and ALEXNET_WEIGHTS_FILE in message
    assert str(tmp_path) in message and "weights_path" in message


def test_offline_default_folders_explain_where_pyiqa_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(LPIPSUnavailable) as info:
        LPIPS(allow_download=False)
    message = str(info.value)
    assert str(tmp_path / "torch" / "hub" / "pyiqa") in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message


def test_wrong_weight_file_is_rejected_not_silently_ignored(tmp_path, weights):
    # pyiqa loads with strict=False: a wrong file would leave random layers without a word.
    (tmp_path / ALEXNET_WEIGHTS_FILE).symlink_to(weights / ALEXNET_WEIGHTS_FILE)
    torch.save({"lin0.model.1.weight": torch.rand(1, 32, 1, 1)}, tmp_path / LPIPS_WEIGHTS_FILE)
    with pytest.raises(LPIPSUnavailable, match=r"lin0\.model\.1\.weight: expected \(1, 64, 1, 1\)"):
        LPIPS(weights_path=tmp_path)


def test_validation_pass_reports_lpips(weights):
    images = [synthetic_image(48, 48, seed=1), synthetic_image(40, 56, seed=2)]
    val_set = ValSet.from_images(images, TaskConfig(scale=2), names=["a", "b"])
    result = bicubic_baseline(val_set, lpips=LPIPS(weights_path=weights))
    values = [row["lpips"] for row in result.per_image]
    assert all(v > 0 for v in values)
    assert result.lpips == pytest.approx(sum(values) / 2)
    assert "LPIPS" in result.convention


def test_construction_leaves_torch_hub_setting_alone(weights, tmp_path, monkeypatch):
    LPIPS(weights_path=weights)  # points the hub at a temporary folder while pyiqa builds
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / "hub")
