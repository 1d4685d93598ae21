"""PSNR / SSIM by BasicSR's conventions (checked from first principles) and the validation pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ehrsr.data import ValSet, imresize
from ehrsr.data.task import TaskConfig
from ehrsr.metrics import BicubicUpsampler, bicubic_baseline, evaluate, psnr, rgb_to_y, ssim, to_uint8_image
from tests.data_helpers import synthetic_image

# ---------------------------------------------------------------------------------------------
# Y conversion and cropping, separately


def test_y_of_black_white_and_primaries():
    # BT.601 studio range: black -> 16, white -> 16 + 65.481 + 128.553 + 24.966 = 235.
    img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_y(img)[0], [16.0, 235.0, 81.481, 144.553, 40.966], atol=1e-12)


def test_y_is_not_rounded():
    img = np.array([[[1, 2, 3]]], dtype=np.uint8)
    expected = 16 + (65.481 * 1 + 128.553 * 2 + 24.966 * 3) / 255
    assert rgb_to_y(img)[0, 0] == pytest.approx(expected, abs=1e-12)
    assert expected != round(expected)


def test_crop_border_ignores_the_frame():
    gt = np.full((6, 6, 3), 100, dtype=np.uint8)
    pred = gt.copy()
    pred[0, :] = 0  # only the frame differs
    pred[:, 5] = 0
    assert psnr(pred, gt, crop_border=1) == math.inf
    assert psnr(pred, gt, crop_border=0) < 30


# ---------------------------------------------------------------------------------------------
# PSNR by hand


def test_psnr_rgb_by_hand():
    gt = np.full((4, 4, 3), 100, dtype=np.uint8)
    pred = gt.copy()
    pred[1, 2] = (110, 110, 110)
    # one of 16 pixels off by 10 in all 3 channels: MSE = 3 * 100 / 48 = 6.25
    assert psnr(pred, gt, crop_border=0, y_channel=False) == pytest.approx(10 * math.log10(255**2 / 6.25), abs=1e-9)


def test_psnr_y_by_hand():
    gt = np.full((4, 4, 3), 100, dtype=np.uint8)
    pred = gt.copy()
    pred[1, 2] = (110, 110, 110)
    # a grey step of 10 moves Y by 10 * (65.481 + 128.553 + 24.966) / 255 = 10 * 219 / 255
    dy = 10 * 219 / 255
    assert psnr(pred, gt, crop_border=0) == pytest.approx(10 * math.log10(255**2 / (dy**2 / 16)), abs=1e-9)
    # crop 1: the differing pixel (1, 2) is inside the remaining 2x2
    assert psnr(pred, gt, crop_border=1) == pytest.approx(10 * math.log10(255**2 / (dy**2 / 4)), abs=1e-9)


def test_psnr_identical_is_inf():
    img = synthetic_image(16, 16)
    assert psnr(img, img, crop_border=2) == math.inf


def test_float_tensors_are_rounded_to_uint8_levels_first():
    gt = np.full((8, 8, 3), 100, dtype=np.uint8)
    # 100.4 rounds to 100 (no error); 100.6 rounds to 101 (error of one level everywhere)
    near = torch.full((1, 3, 8, 8), 100.4 / 255)
    far = torch.full((1, 3, 8, 8), 100.6 / 255)
    assert psnr(near, gt, crop_border=0) == math.inf
    assert psnr(far, gt, crop_border=0, y_channel=False) == pytest.approx(10 * math.log10(255**2), abs=1e-9)
    # values outside [0, 1] are clamped like BasicSR's tensor2img
    assert to_uint8_image(torch.tensor([[[1.7, -0.2]]])).tolist() == [[[255], [0]]]


def test_psnr_batch_is_mean_of_images():
    a = torch.from_numpy(synthetic_image(16, 16, 1).transpose(2, 0, 1).copy()).float() / 255
    b = torch.from_numpy(synthetic_image(16, 16, 2).transpose(2, 0, 1).copy()).float() / 255
    c = torch.from_numpy(synthetic_image(16, 16, 3).transpose(2, 0, 1).copy()).float() / 255
    batch = psnr(torch.stack([a, b]), torch.stack([c, c]), crop_border=1)
    assert batch == pytest.approx((psnr(a, c, 1) + psnr(b, c, 1)) / 2, abs=1e-12)


def test_size_mismatch_and_bad_dtype_raise():
    with pytest.raises(ValueError, match="image sizes differ"):
        psnr(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="uint8"):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)), 0)
    with pytest.raises(ValueError, match="removes the whole"):
        psnr(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), 2)


# ---------------------------------------------------------------------------------------------
# SSIM against a direct implementation of the MATLAB reference formula


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s ssim_index.m written as loops: 11x11 Gaussian (sigma 1.5), 'valid' windows."""
    t = np.arange(11) - 5
    g = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * 1.5**2))
    w = g / g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            x, y = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
            cxy = (w * x * y).sum() - mx * my
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_reference_on_y():
    gt = synthetic_image(20, 23, seed=4)
    noisy = np.clip(gt.astype(int) + np.random.default_rng(0).integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
    y = lambda im: 16 + (im.astype(float) / 255) @ np.array([65.481, 128.553, 24.966])  # noqa: E731
    expected = reference_ssim(y(noisy[2:-2, 2:-2]), y(gt[2:-2, 2:-2]))
    assert ssim(noisy, gt, crop_border=2) == pytest.approx(expected, abs=1e-10)
    assert 0.2 < expected < 0.99


def test_ssim_rgb_is_mean_over_channels():
    gt = synthetic_image(15, 15, seed=5)
    pred = synthetic_image(15, 15, seed=6)
    expected = np.mean([reference_ssim(pred[:, :, c].astype(float), gt[:, :, c].astype(float)) for c in range(3)])
    assert ssim(pred, gt, crop_border=0, y_channel=False) == pytest.approx(expected, abs=1e-10)


def test_ssim_identical_is_one_and_small_images_rejected():
    img = synthetic_image(16, 16)
    assert ssim(img, img, crop_border=0) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(img, img, crop_border=3)


# ---------------------------------------------------------------------------------------------
# validation pass


@pytest.fixture(scope="module")
def val_set() -> ValSet:
    images = [synthetic_image(52, 60, seed=10), synthetic_image(40, 44, seed=11)]
    return ValSet.from_images(images, TaskConfig(scale=2), names=["a", "b"])


def test_bicubic_baseline_equals_manual_imresize(val_set):
    result = bicubic_baseline(val_set)
    manual = []
    for item in val_set:
        up = imresize(item.lr.astype(np.float64) / 255, 2.0)
        up_u8 = np.clip(np.round(up * 255), 0, 255).astype(np.uint8)
        manual.append(psnr(up_u8, item.hr, crop_border=2))
    assert [r["psnr"] for r in result.per_image] == pytest.approx(manual, abs=1e-9)
    assert result.psnr == pytest.approx(np.mean(manual), abs=1e-9)
    assert result.lpips is None and result.per_image[0]["name"] == "a"
    assert result.convention == "PSNR/SSIM on Y (BT.601), crop_border=2, uint8-rounded"


class PointwiseSR(nn.Module):
    """1x1 conv + PixelShuffle: every output pixel depends on one input pixel, so tiling is exact."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3 * scale * scale, 1)
        self.shuffle = nn.PixelShuffle(scale)
        self.calls: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape[-2:]))
        return torch.sigmoid(self.shuffle(self.conv(x)))


def test_tiled_inference_equals_whole_image(val_set):
    model = PointwiseSR()
    whole = evaluate(model, val_set, crop_border=2)
    assert len(model.calls) == 2
    model.calls.clear()
    tiled = evaluate(model, val_set, crop_border=2, tile_size=16, tile_overlap=4)
    assert len(model.calls) > 4 and max(max(c) for c in model.calls) == 16
    assert [r["psnr"] for r in tiled.per_image] == pytest.approx([r["psnr"] for r in whole.per_image], abs=1e-6)
    model.calls.clear()
    # 26x30 = 780 LR pixels > 500: tiles of isqrt(500) = 22 (4 of them); 20x22 = 440 runs whole
    evaluate(model, val_set, crop_border=2, max_pixels=500)
    assert model.calls == [(22, 22)] * 4 + [(20, 22)]


class NeedsMultipleOf8(nn.Module):
    size_multiple = 8

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2] % 8 == 0 and x.shape[-1] % 8 == 0
        assert not torch.is_grad_enabled() and not self.training
        self.seen.append(tuple(x.shape[-2:]))
        return nn.functional.interpolate(x, scale_factor=2, mode="nearest") * self.w


def test_pads_to_size_multiple_crops_back_and_restores_mode(val_set):
    model = NeedsMultipleOf8()
    model.train()
    result = evaluate(model, val_set, crop_border=2)
    assert model.seen == [(32, 32), (24, 24)]  # 26x30 and 20x22 padded up
    assert model.training
    for row, item in zip(result.per_image, val_set):
        nearest = item.lr.repeat(2, axis=0).repeat(2, axis=1)
        assert row["psnr"] == pytest.approx(psnr(nearest, item.hr, 2), abs=1e-9)


def test_scale_mismatch_is_reported(val_set):
    with pytest.raises(ValueError, match="does the model's scale match"):
        evaluate(PointwiseSR(scale=3), val_set, crop_border=2)


def test_bicubic_upsampler_identity_at_scale_1():
    x = torch.rand(1, 3, 5, 5)
    assert torch.equal(BicubicUpsampler(1)(x), x)


def test_restoration_baseline_is_the_input_quality_without_crop():
    images = [synthetic_image(32, 32, seed=12)]
    val = ValSet.from_images(images, TaskConfig(task="denoise", noise_sigma=10), names=["n"])
    result = bicubic_baseline(val)
    assert result.convention.startswith("PSNR/SSIM on Y (BT.601), crop_border=0")
    assert result.psnr == pytest.approx(psnr(val[0].lr, val[0].hr, crop_border=0), abs=1e-12)


@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_the_smallest_measurable_side_is_where_psnr_and_ssim_stop_working(scale: int) -> None:
    from ehrsr.data import mod_crop
    from ehrsr.metrics import smallest_measurable_side

    def measurable(side: int) -> bool:
        hr = mod_crop(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8), scale)
        crop = scale if scale > 1 else 0
        try:
            psnr(hr, hr, crop), ssim(hr, hr, crop)
        except ValueError:
            return False
        return True

    least = smallest_measurable_side(scale)
    assert least % scale == 0 and measurable(least)
    assert not any(measurable(side) for side in range(1, least))
