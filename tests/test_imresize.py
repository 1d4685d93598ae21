"""MATLAB-compatible bicubic imresize, checked against hand-derived values and MATLAB's rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ehrsr.data import imresize
from ehrsr.data.imresize import cubic_kernel, resize_weights


def keys_cubic(t: float) -> float:
    """Keys (1981) cubic convolution, a = -0.5, written out independently of the module."""
    t = abs(t)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    if t <= 2:
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0


def reference_resize_1d(signal: list[float], scale: float) -> list[float]:
    """MATLAB's imresize along one axis as a plain loop (imresize.m's contributions + mirror fold)."""
    n = len(signal)
    out_len = math.ceil(n * scale)
    antialias = scale < 1
    width = 4 / scale if antialias else 4
    result = []
    for x in range(1, out_len + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        taps = [left + k for k in range(math.ceil(width) + 2)]
        weights = [scale * keys_cubic(scale * (u - j)) if antialias else keys_cubic(u - j) for j in taps]
        total = sum(weights)
        value = 0.0
        for j, w in zip(taps, weights):
            # mirror: ... 2 1 | 1 2 ... n | n n-1 ...  (1-based)
            k = (j - 1) % (2 * n)
            source = k if k < n else 2 * n - 1 - k
            value += w / total * signal[source]
        result.append(value)
    return result


def test_cubic_kernel_values():
    # Hand-derived: k(0)=1, k(1)=k(2)=0, k(0.5)=1.5/8-2.5/4+1=0.5625, k(1.5)=-0.5*3.375+2.5*2.25-6+2=-0.0625
    t = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -0.5, -1.5])
    np.testing.assert_allclose(cubic_kernel(t), [1, 0.5625, 0, -0.0625, 0, 0, 0.5625, -0.0625], atol=1e-15)


def test_upscale_x2_first_output_weights_hand_derived():
    # x = 1 -> u = 1/2 + 0.5 * (1 - 1/2) = 0.75; taps at -2..3, distances 2.75 .. -2.25:
    # k(1.75) = -0.0234375 (index -1 -> mirrored to 2), k(0.75) = 0.2265625 (index 0 -> 1),
    # k(0.25) = 0.8671875 (index 1), k(1.25) = -0.0703125 (index 2). Sum = 1.
    weights = resize_weights(4, 8, 2.0)
    np.testing.assert_allclose(weights[0], [0.2265625 + 0.8671875, -0.0234375 - 0.0703125, 0, 0], atol=1e-15)
    # x = 2 -> u = 1.25: taps -1..4 at distances 2.25, 1.25, 0.25, -0.75, -1.75, -2.75
    # -> index 0 (mirror of 1): -0.0703125, 1: 0.8671875, 2: 0.2265625, 3: -0.0234375
    np.testing.assert_allclose(weights[1], [0.8671875 - 0.0703125, 0.2265625, -0.0234375, 0], atol=1e-15)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-14)


def test_downscale_half_weights_are_stretched_kernel():
    # scale 1/2 with antialiasing: h(t) = 0.5 k(0.5 t), 8 input pixels wide. Output 3 of 8:
    # u = 3 / 0.5 + 0.5 * (1 - 2) = 5.5, so inputs 2..9 at distances 3.5 .. -3.5 weigh
    # 0.5 * [k(1.75), k(1.25), k(0.75), k(0.25), k(0.25), k(0.75), k(1.25), k(1.75)].
    expected = 0.5 * np.array([-0.0234375, -0.0703125, 0.2265625, 0.8671875, 0.8671875, 0.2265625, -0.0703125, -0.0234375])
    weights = resize_weights(16, 8, 0.5)
    np.testing.assert_allclose(weights[2, 1:9], expected, atol=1e-15)
    assert np.count_nonzero(weights[2]) == 8


@pytest.mark.parametrize("scale", [2.0, 3.0, 4.0, 0.5, 1 / 3, 0.25, 1.5])
def test_matches_loop_reference_1d(scale):
    rng = np.random.default_rng(0)
    signal = rng.random(13)
    img = np.tile(signal[None, :], (2, 1))  # (2, 13): resize along width only matters for rows
    out = imresize(img, (1.0, scale))  # rows: scale 1 is the identity
    np.testing.assert_allclose(out[0], reference_resize_1d(list(signal), scale), atol=1e-12)


def test_separable_2d_equals_rows_then_columns_reference():
    rng = np.random.default_rng(1)
    img = rng.random((7, 9))
    out = imresize(img, 0.5)
    rows = np.array([reference_resize_1d(list(r), 0.5) for r in img])  # (7, 5)
    both = np.array([reference_resize_1d(list(c), 0.5) for c in rows.T]).T  # (4, 5)
    np.testing.assert_allclose(out, both, atol=1e-12)


@pytest.mark.parametrize("scale", [0.25, 1 / 3, 0.5, 2.0, 3.0, 4.0])
def test_constant_image_stays_constant(scale):
    img = np.full((17, 23, 3), 0.3137)
    out = imresize(img, scale)
    np.testing.assert_allclose(out, 0.3137, atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "scale", "expected"),
    [
        ((256, 256), 0.25, (64, 64)),
        ((64, 64), 4, (256, 256)),
        ((5, 7), 0.25, (2, 2)),  # ceil(1.25), ceil(1.75)
        ((10, 10), 1 / 3, (4, 4)),  # ceil(3.33)
        ((3, 5), 4, (12, 20)),
        ((510, 339), 0.5, (255, 170)),  # ceil(169.5): odd sizes round up, as MATLAB does
        ((1, 1), 3, (3, 3)),
    ],
)
def test_output_size_rule(shape, scale, expected):
    assert imresize(np.zeros(shape), scale).shape == expected


def test_output_shape_argument_and_channels():
    img = np.random.default_rng(2).random((12, 16, 3))
    out = imresize(img, output_shape=(6, 4))
    assert out.shape == (6, 4, 3)
    # MATLAB uses output/input per dimension as the scales: same as giving them explicitly.
    np.testing.assert_allclose(out, imresize(img, (0.5, 0.25)), atol=1e-12)


def test_quarter_of_a_linear_ramp_samples_the_ramp_at_mapped_centres():
    # The cubic kernel reproduces linear functions, so away from the borders x1/4 of f(i) = i
    # (1-based) gives f(u) at u = 4x - 1.5: 2.5 (the mean of 1..4), 6.5, 10.5, ...
    ramp = np.tile(np.arange(1, 65, dtype=np.float64)[None, :], (8, 1))
    out = imresize(ramp, 0.25)
    assert out.shape == (2, 16)
    interior = np.arange(3, 15)  # the stretched kernel reaches 8 pixels: skip 2 outputs per side
    np.testing.assert_allclose(out[0, interior - 1], 4 * interior - 1.5, atol=1e-12)
    # At the borders the mirror fold bends the ramp: the first output is not 2.5.
    assert abs(out[0, 0] - 2.5) > 0.05


def test_down_then_up_of_smooth_image_is_close():
    y, x = np.mgrid[0:64, 0:64] / 64.0
    img = (0.5 + 0.25 * np.sin(2 * np.pi * x) * np.cos(2 * np.pi * y))[:, :, None]
    restored = imresize(imresize(img, 0.25), 4)
    assert restored.shape == img.shape
    assert np.abs(restored - img)[8:-8, 8:-8].max() < 0.01


def test_torch_chw_and_batch_equal_numpy_hwc():
    img = np.random.default_rng(3).random((10, 14, 3))
    expected = imresize(img, 0.5)
    chw = torch.from_numpy(img.transpose(2, 0, 1).copy())
    out = imresize(chw, 0.5)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy().transpose(1, 2, 0), expected, atol=1e-12)
    batch = imresize(chw.unsqueeze(0).repeat(2, 1, 1, 1).float(), 0.5)
    assert batch.shape == (2, 3, 5, 7) and batch.dtype == torch.float32
    np.testing.assert_allclose(batch[1].numpy().transpose(1, 2, 0), expected, atol=1e-5)


def test_not_rounded_or_clipped():
    img = np.zeros((8, 8))
    img[:, 4:] = 1.0
    out = imresize(img, 2)
    assert out.max() > 1.0 and out.min() < 0.0  # bicubic overshoot at the edge is kept


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="float array"):
        imresize(np.zeros((4, 4), dtype=np.uint8), 0.5)
    with pytest.raises(ValueError, match="exactly one of scale or output_shape"):
        imresize(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="scale must be a positive"):
        imresize(np.zeros((4, 4)), -2)
    with pytest.raises(ValueError, match="float tensor"):
        imresize(torch.zeros(3, 4, 4, dtype=torch.uint8), 2)
