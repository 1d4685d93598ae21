"""MAC rules and counters on small hand-built modules: analytic counts, both counters agreeing
operator family by operator family, zero-cost declarations, and unknown operators reported."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ehrsr.profiling import OP_RULES, ZERO_COST_OPS, count_macs
from ehrsr.profiling.rules import einsum_macs, fft_macs, matmul_macs, sdpa_macs


class Lambda(nn.Module):
    """A module around a function, with optional parameters, for one-op test models."""

    def __init__(self, fn, **params: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, value in params.items():
            self.register_parameter(name, nn.Parameter(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


# ---------------------------------------------------------------------------------------------
# analytic counts for plain conv / linear models (both counters must equal them)


def test_conv_stack_equals_analytic_count() -> None:
    h, w = 20, 24
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),  # full 3x3
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
        nn.Conv2d(16, 32, 3, padding=1, groups=4),  # grouped
        nn.Conv2d(32, 32, 3, stride=2, padding=2, dilation=2),  # strided + dilated: 10 x 12 out
        nn.Conv2d(32, 48, 1),  # pointwise, no padding
        nn.PixelShuffle(4),  # free: data movement
    )
    expected = (
        h * w * 3 * 16 * 9
        + h * w * 16 * 1 * 9
        + h * w * 32 * (16 // 4) * 9
        + (h // 2) * (w // 2) * 32 * 32 * 9
        + (h // 2) * (w // 2) * 32 * 48
    )
    result = count_macs(model, (1, 3, h, w))
    assert result.macs == expected  # fvcore
    assert result.macs_ptflops == expected  # ptflops with our rules (its own adds biases)
    assert result.by_operator == {"conv": expected}
    assert result.unsupported_ops == {}
    assert result.params == sum(p.numel() for p in model.parameters())
    assert result.params_deploy == result.params  # every parameter is on the data path


def test_batch_scales_counts_and_transposed_conv_uses_input_pixels() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(4, 8, 4, stride=2, padding=1), nn.Conv2d(8, 2, 3))
    result = count_macs(model, (3, 4, 10, 10))
    # transposed conv: every input pixel scatters a (8, 4, 4) kernel per input channel
    transposed = 3 * 10 * 10 * (4 * 8 * 4 * 4)
    conv = 3 * 18 * 18 * (2 * 8 * 9)  # 20x20 -> 18x18 valid conv
    assert result.macs == result.macs_ptflops == transposed + conv


def test_linear_layers_equal_analytic_count() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16, bias=False))
    result = count_macs(model, (2, 10, 32))
    expected = 2 * 10 * 32 * 64 + 2 * 10 * 64 * 16
    assert result.macs == result.macs_ptflops == expected
    assert result.by_operator == {"linear": expected}
    assert result.unsupported_ops == {}


# ---------------------------------------------------------------------------------------------
# pure rules


def test_matmul_rule_broadcasts_batch_of_either_operand() -> None:
    assert matmul_macs((5, 4), (4, 3)) == 60
    assert matmul_macs((2, 5, 4), (4, 3)) == 120
    assert matmul_macs((5, 4), (2, 4, 3)) == 120  # fvcore's own rule says 60 here
    assert matmul_macs((4,), (4, 3)) == 12
    assert matmul_macs((7, 1, 5, 4), (3, 4, 2)) == 7 * 3 * 5 * 4 * 2


def test_einsum_rule_is_exact_along_the_optimal_path() -> None:
    assert einsum_macs("bij,bjk->bik", [(3, 5, 4), (3, 4, 6)]) == 3 * 5 * 4 * 6
    assert einsum_macs("b c h w, d c -> b d h w", [(1, 16, 8, 8), (8, 16)]) == 16 * 64 * 8
    # chain: (20x30 @ 30x5) first, then (10x20 @ 20x5)
    assert einsum_macs("ij,jk,kl->il", [(10, 20), (20, 30), (30, 5)]) == 20 * 30 * 5 + 10 * 20 * 5
    assert einsum_macs("...ij,jk", [(2, 3, 5, 4), (4, 5)]) == 2 * 3 * 5 * 4 * 5
    assert einsum_macs("ii->i", [(4, 4)]) == 0  # single operand: no products


def test_sdpa_rule_counts_both_products() -> None:
    assert sdpa_macs((2, 4, 16, 8), (2, 4, 32, 8), (2, 4, 32, 6)) == 2 * 4 * 16 * 32 * (8 + 6)


def test_fft_rule_is_5_over_2_n_log_n_complex_and_half_real() -> None:
    assert fft_macs(8, batch=1, real=False) == round(2.5 * 8 * 3)
    assert fft_macs(8, batch=3, real=True) == round(3 * 1.25 * 8 * 3)
    assert fft_macs(1, batch=5, real=True) == 0


def test_zero_cost_list_and_rules_never_overlap_and_cover_both_forms() -> None:
    assert not ZERO_COST_OPS & set(OP_RULES)
    for traced, dispatched in [("aten::_convolution", "aten::conv2d"), ("aten::fft_rfft2", "aten::_fft_r2c")]:
        assert traced in OP_RULES and dispatched in OP_RULES
    for free in ("aten::add", "aten::mul", "aten::sigmoid", "aten::gelu", "aten::silu", "aten::softplus",
                 "aten::softmax", "aten::pixel_shuffle", "aten::index_add", "aten::topk", "aten::roll"):
        assert free in ZERO_COST_OPS


# ---------------------------------------------------------------------------------------------
# every family through both counters, against the analytic value


def _sdpa_model() -> nn.Module:
    def fn(m, x):  # (B, C, H, W) -> tokens, 2 heads, float additive mask
        b, c, h, w = x.shape
        q = x.flatten(2).transpose(1, 2).reshape(b, h * w, 2, c // 2).transpose(1, 2)  # (B, 2, L, C/2)
        mask = torch.zeros(h * w, h * w, dtype=x.dtype)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    return Lambda(fn)


CASES = {
    # name: (model factory, input shape, family, expected MACs)
    "bicubic": (lambda: Lambda(lambda m, x: F.interpolate(x, scale_factor=2, mode="bicubic")), (1, 3, 8, 6), "upsample", 16 * 3 * 16 * 12),
    "bilinear": (lambda: Lambda(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear")), (1, 3, 8, 6), "upsample", 4 * 3 * 16 * 12),
    "nearest": (lambda: Lambda(lambda m, x: F.interpolate(x, scale_factor=3, mode="nearest")), (1, 3, 8, 6), "upsample", 3 * 24 * 18),
    "adaptive_avg_pool": (lambda: nn.AdaptiveAvgPool2d(1), (2, 5, 8, 8), "pool", 2 * 5 * 64),
    "layer_norm": (lambda: nn.LayerNorm(6), (2, 4, 5, 6), "norm", 5 * 2 * 4 * 5 * 6),
    "layer_norm_no_affine": (lambda: nn.LayerNorm(6, elementwise_affine=False), (2, 4, 5, 6), "norm", 4 * 2 * 4 * 5 * 6),
    "group_norm": (lambda: nn.GroupNorm(2, 4), (2, 4, 5, 6), "norm", 5 * 2 * 4 * 5 * 6),
    "batch_norm_eval": (lambda: nn.BatchNorm2d(4), (2, 4, 5, 6), "norm", 2 * 2 * 4 * 5 * 6),
    "instance_norm": (lambda: nn.InstanceNorm2d(4, affine=True), (2, 4, 5, 6), "norm", 5 * 2 * 4 * 5 * 6),
    "matmul_broadcast": (lambda: Lambda(lambda m, x: m.w @ x, w=torch.rand(7, 5)), (2, 5, 3), "matmul", 2 * 7 * 5 * 3),
    "bmm": (lambda: Lambda(lambda m, x: torch.bmm(x, x.transpose(1, 2))), (2, 5, 3), "matmul", 2 * 5 * 3 * 5),
    "baddbmm": (lambda: Lambda(lambda m, x: torch.baddbmm(x @ x.transpose(1, 2), x, x.transpose(1, 2))), (2, 5, 3), "matmul", 2 * (2 * 5 * 3 * 5)),
    "einsum": (lambda: Lambda(lambda m, x: torch.einsum("bchw,dc->bdhw", x, m.w), w=torch.rand(8, 4)), (1, 4, 5, 6), "matmul", 4 * 30 * 8),
    "sdpa": (_sdpa_model, (1, 8, 4, 5), "attention", sdpa_macs((1, 2, 20, 4), (1, 2, 20, 4), (1, 2, 20, 4))),
    "rfft2_irfft2": (
        lambda: Lambda(lambda m, x: torch.fft.irfft2(torch.fft.rfft2(x, norm="ortho") * 2, s=x.shape[-2:], norm="ortho")),
        (1, 3, 8, 16),
        "fft",
        2 * round(3 * 1.25 * 128 * 7),  # r2c and c2r of 8x16 = 128 points, 3 transforms each
    ),
    "fft_complex": (lambda: Lambda(lambda m, x: torch.fft.fft(x, dim=-1).abs()), (2, 3, 16), "fft", round(6 * 2.5 * 16 * 4)),
    "grid_sample": (
        lambda: Lambda(lambda m, x: F.grid_sample(x, torch.zeros(1, 6, 7, 2), align_corners=False)),
        (1, 3, 8, 8),
        "grid_sample",
        4 * 3 * 6 * 7,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_family_is_priced_identically_by_both_counters(name: str) -> None:
    factory, shape, family, expected = CASES[name]
    result = count_macs(factory(), shape)
    assert result.unsupported_ops == {}, result.unsupported_ops
    assert result.by_operator.get(family) == expected, result.by_operator
    assert result.by_operator_ptflops.get(family) == expected, result.by_operator_ptflops
    assert result.macs == result.macs_ptflops


def test_selective_scan_custom_op_uses_the_blocks_rule() -> None:
    from ehrsr.blocks.ssm import selective_scan_macs  # registers torch.ops.ehrsr.selective_scan

    b, d, n, length = 2, 6, 4, 10

    class Scan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.A = nn.Parameter(-torch.rand(d, n))
            self.D = nn.Parameter(torch.ones(d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (b, d, l)
            bc = x[:, :n]  # (b, n, l): input-dependent B and C
            return torch.ops.ehrsr.selective_scan(x, F.softplus(x), self.A, bc, bc, self.D)

    result = count_macs(Scan(), (b, d, length))
    expected = selective_scan_macs(b, d, length, n)
    assert expected == 4 * b * d * length * n + 2 * b * d * length
    assert result.by_operator == {"selective_scan": expected}
    assert result.by_operator_ptflops == {"selective_scan": expected}
    assert result.unsupported_ops == {}


def test_unknown_matmul_like_operator_is_reported_not_priced_zero_silently() -> None:
    # cdist is a genuinely unpriced product: it must show up as unsupported in both counters
    model = Lambda(lambda m, x: torch.cdist(x, m.w) + x.sum(), w=torch.rand(4, 3))
    result = count_macs(model, (5, 3))
    assert any("cdist" in name for name in result.unsupported_ops), result.unsupported_ops
    assert result.macs == 0  # nothing else is priced


def test_elementwise_only_model_costs_zero_with_nothing_unsupported() -> None:
    def fn(m, x):
        y = torch.sigmoid(x) * F.gelu(x) + F.silu(x) - F.softplus(x) / 2
        return torch.roll(y, 1, dims=-1).softmax(-1).clamp(0, 1)

    result = count_macs(Lambda(fn), (1, 3, 8, 8))
    assert result.macs == result.macs_ptflops == 0
    assert result.unsupported_ops == {}


def test_weights_only_work_is_constant_and_training_branches_are_not_deploy_params() -> None:
    class FusedEveryForward(nn.Module):
        """SPAN's Conv3XC pattern: training branches fused into ``eval_conv`` inside forward."""

        def __init__(self) -> None:
            super().__init__()
            self.branch3 = nn.Conv2d(4, 4, 3, padding=1)
            self.branch1 = nn.Conv2d(4, 4, 1)
            self.eval_conv = nn.Conv2d(4, 4, 3, padding=1)
            self.table = nn.Parameter(torch.rand(4, 4))  # weights-only matmul, then used on the data

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                fused = self.branch3.weight + F.pad(self.branch1.weight, (1, 1, 1, 1))
                self.eval_conv.weight.data = fused
            mix = self.table @ self.table.t()  # constant for a deployed model: not counted
            y = self.eval_conv(x)
            return torch.einsum("bchw,dc->bdhw", y, mix)

    model = FusedEveryForward().eval()
    result = count_macs(model, (1, 4, 6, 6))
    conv = 36 * 4 * 4 * 9
    mixing = 36 * 4 * 4
    assert result.macs == result.macs_ptflops == conv + mixing
    assert result.macs_constant == 4 * 4 * 4  # table @ table.T
    # eval_conv (144 + 4) and table (16) reach the data path; branch3 and branch1 only feed eval_conv
    assert result.params_deploy == 4 * 4 * 9 + 4 + 16
    assert result.params == result.params_deploy + (4 * 4 * 9 + 4) + (4 * 4 + 4)


def test_counting_restores_training_flags_and_leaves_device_and_grad_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5))
    model.train()
    with torch.no_grad():
        result = count_macs(model, (1, 3, 5, 5))
    assert result.macs == 9 * 4 * 3 * 9
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("bad", [(1, 3, 0, 4), (1, 3, -2, 4), (), "1x3x8x8", (1, 3, 2.5, 4), None])
def test_bad_input_shape_raises_value_error(bad) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(nn.Conv2d(3, 3, 1), bad)


def test_forward_error_is_reported_with_model_and_shape() -> None:
    from ehrsr.profiling import CountingError

    with pytest.raises(CountingError, match=r"Conv2d.*\(1, 4, 8, 8\)"):
        count_macs(nn.Conv2d(3, 3, 1), (1, 4, 8, 8))  # wrong channel count


def test_fft_rule_counts_padding_size_given_as_s() -> None:
    model = Lambda(lambda m, x: torch.fft.rfftn(x, s=(4, 8), dim=(-2, -1)).abs())
    result = count_macs(model, (1, 2, 3, 5))
    assert result.by_operator == {"fft": round(2 * 1.25 * 32 * math.log2(32))}
    assert result.by_operator_ptflops == result.by_operator
