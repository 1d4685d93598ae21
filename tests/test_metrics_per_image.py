"""Per-image PSNR/SSIM in the validation result and their compact encoding for Optuna attributes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ehrsr.data import ValSet
from ehrsr.data.task import TaskConfig
from ehrsr.metrics import (
    BicubicUpsampler,
    EvalResult,
    bicubic_baseline,
    decode_per_image,
    encode_per_image,
    psnr,
    ssim,
    to_uint8_image,
)
from tests.data_helpers import synthetic_image


def test_evaluate_exposes_per_image_names_and_values() -> None:
    images = [synthetic_image(52, 60, seed=10), synthetic_image(40, 44, seed=11), synthetic_image(36, 48, seed=12)]
    val = ValSet.from_images(images, TaskConfig(scale=2), names=["a", "b", "c"])
    result = bicubic_baseline(val)
    assert result.image_names == ["a", "b", "c"]
    model = BicubicUpsampler(2)  # what bicubic_baseline evaluates
    for item, p, s in zip(val, result.psnr_per_image, result.ssim_per_image):
        lr = torch.from_numpy(item.lr.transpose(2, 0, 1).copy()).unsqueeze(0).double() / 255
        out = to_uint8_image(model(lr).float())
        assert p == pytest.approx(psnr(out, item.hr, crop_border=2), abs=1e-9)
        assert s == pytest.approx(ssim(out, item.hr, crop_border=2), abs=1e-9)
    assert result.psnr == pytest.approx(sum(result.psnr_per_image) / 3)  # existing fields unchanged
    assert result.ssim == pytest.approx(sum(result.ssim_per_image) / 3)


def test_encoding_round_trips_through_json_at_four_decimals() -> None:
    result = EvalResult(
        psnr=0.0, ssim=0.0, lpips=None,
        per_image=[
            {"name": "chelsea@0", "psnr": 29.123456789, "ssim": 0.812345678, "lpips": None},
            {"name": "coffee@3", "psnr": math.inf, "ssim": 1.0, "lpips": None},
        ],
    )
    stored = json.loads(json.dumps(encode_per_image(result)))  # what an Optuna user attr keeps
    assert stored == {"chelsea@0": [29.1235, 0.8123], "coffee@3": [None, 1.0]}
    decoded = decode_per_image(stored)
    assert decoded == {"chelsea@0": (29.1235, 0.8123), "coffee@3": (math.inf, 1.0)}
    assert list(decoded) == result.image_names  # order kept


def test_decode_rejects_malformed_attributes() -> None:
    with pytest.raises(ValueError, match=r"\[psnr, ssim\]"):
        decode_per_image({"a": [29.0]})
    with pytest.raises(ValueError, match="must be a dict"):
        decode_per_image([29.0, 0.8])
