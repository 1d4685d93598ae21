"""The six invariants of docs/architecture.md ("Invariants"), each tested on the blocks themselves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ehrsr import EHRSRConfig, build_model, reparameterize
from ehrsr.blocks import (
    FrequencySeparationBlock,
    GatedCNNBlock,
    GatedConv,
    MoEBlock,
    NAFBlock,
    NoiseInjection,
    PartialLargeKernel,
    RepConv,
    RepMixBlock,
    SSMBlock,
    WindowAttentionBlock,
    load_balance_loss,
    selective_scan_parallel,
    selective_scan_sequential,
)
from ehrsr.blocks.attention import attention_mask

C = 16


def _blocks() -> dict[str, nn.Module]:
    return {
        "naf": NAFBlock(C),
        "gated": GatedCNNBlock(C),
        "gated_conv": GatedConv(C),
        "wab": WindowAttentionBlock(C, window_size=4, heads=4, shift=False),
        "wab_shift": WindowAttentionBlock(C, window_size=4, heads=2, shift=True),
        "ssm1": SSMBlock(C, directions=1),
        "ssm4": SSMBlock(C, d_state=4, expand=2.0, directions=4),
        "fsb": FrequencySeparationBlock(C),
        "moe": MoEBlock(C, n_experts=3, top_k=2),
        "moe_capacity": MoEBlock(C, n_experts=4, top_k=1, capacity_factor=1.0),
        "repmix": RepMixBlock(C, kernel_size=7, partial_ratio=0.25),
        "repconv": RepConv(C, C),
        "plk": PartialLargeKernel(C, kernel_size=5, partial_ratio=0.5),
        "noise": NoiseInjection(),
    }


BLOCK_NAMES = list(_blocks())


def _block(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _blocks()[name]


# -- invariant 1: every block preserves shape ------------------------------------------------------


@pytest.mark.parametrize("name", BLOCK_NAMES)
@pytest.mark.parametrize("size", [(8, 8), (7, 13), (1, 5)])
def test_blocks_preserve_shape(name: str, size: tuple[int, int]) -> None:
    block = _block(name)
    x = torch.randn(2, C, *size)
    for mode in (block.train, block.eval):
        mode()
        y = block(x)
        assert y.shape == x.shape, f"{name} changed shape {tuple(x.shape)} -> {tuple(y.shape)}"
        assert torch.isfinite(y).all()


# -- invariant 2: dtype and device follow the input ------------------------------------------------


@pytest.mark.parametrize("name", BLOCK_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_blocks_keep_dtype(name: str, dtype: torch.dtype) -> None:
    block = _block(name).to(dtype).eval()
    x = torch.randn(1, C, 9, 10, dtype=dtype)
    y = block(x)
    assert y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y.float()).all()


def test_float32_islands_do_not_change_module_dtype() -> None:
    # the scan and the FFT compute in float32 on bf16 inputs, but the block's own weights stay bf16
    block = SSMBlock(C).to(torch.bfloat16)
    block(torch.randn(1, C, 6, 6, dtype=torch.bfloat16))
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}


def test_model_keeps_dtype_float64() -> None:
    cfg = EHRSRConfig.from_dict(
        {"width": 8, "scale": 2, **{m: {"enabled": True} for m in ("wab", "ssm", "fsb", "moe", "repmix")},
         "wab": {"enabled": True, "window_size": 4}}
    )
    model = build_model(cfg).double().eval()
    y = model(torch.rand(1, 3, 13, 11, dtype=torch.float64))
    assert y.dtype == torch.float64 and y.shape == (1, 3, 26, 22)


# -- invariant 3: MoE routing weights per token are >= 0 and sum to 1 ------------------------------


@pytest.mark.parametrize(("n_experts", "top_k"), [(2, 1), (3, 2), (4, 2), (4, 1)])
def test_moe_routing_weights_are_a_distribution(n_experts: int, top_k: int) -> None:
    block = _block("moe")
    block = MoEBlock(C, n_experts=n_experts, top_k=top_k)
    block(torch.randn(2, C, 7, 9))
    index, weight = block.last_routing
    assert index.shape == weight.shape == (2 * 7 * 9, top_k)
    assert (weight >= 0).all()
    torch.testing.assert_close(weight.sum(-1), torch.ones(weight.shape[0]), atol=1e-6, rtol=0)
    assert (index >= 0).all() and (index < n_experts).all()
    # the chosen experts of one token are distinct
    if top_k == 2:
        assert (index[:, 0] != index[:, 1]).all()


def test_moe_balance_loss_is_minimal_for_a_uniform_router() -> None:
    block = MoEBlock(C, n_experts=4, top_k=2)
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.bias.zero_()
    block(torch.randn(2, C, 8, 8))
    # Switch loss E * sum_e f_e P_e with P_e = 1/E for every expert gives exactly 1, its minimum
    assert block.last_balance_loss.item() == pytest.approx(1.0, abs=1e-6)
    # a router that sends everything to expert 0 is penalised: f_0 = 1/2 (top-2), P_0 ~ 1 -> about 2
    with torch.no_grad():
        block.router.bias.copy_(torch.tensor([20.0, 0.0, 0.0, 0.0]))
    block(torch.randn(2, C, 8, 8))
    assert block.last_balance_loss.item() > 1.9
    # the formula itself, on hand-made numbers: 2 tokens, 2 experts, top-1
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    chosen = torch.tensor([[0], [0]])
    # f = (1, 0), P = (0.75, 0.25) -> 2 * (1 * 0.75) = 1.5
    assert load_balance_loss(probs, chosen, 2).item() == pytest.approx(1.5)


def test_moe_aux_loss_reaches_the_model_and_training_uses_gradients() -> None:
    cfg = EHRSRConfig.from_dict({"width": 8, "moe": {"enabled": True, "entropy_weight": 0.1}})
    model = build_model(cfg)
    assert model.aux_loss().item() == 0.0  # nothing routed yet
    model(torch.rand(1, 3, 16, 16))
    aux = model.aux_loss()
    assert aux.item() > 0 and aux.requires_grad
    aux.backward()
    assert any(m.router.weight.grad is not None for m in model.modules() if isinstance(m, MoEBlock))
    conv_only = build_model(EHRSRConfig(width=8))
    conv_only(torch.rand(1, 3, 16, 16))
    assert conv_only.aux_loss().item() == 0.0


def test_moe_capacity_limits_tokens_per_expert() -> None:
    block = MoEBlock(C, n_experts=2, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        block.router.bias.copy_(torch.tensor([10.0, 0.0]))  # everyone wants expert 0
    x = torch.randn(1, C, 4, 4)
    assert block.capacity(16) == 8  # ceil(1.0 * 16 tokens * 1 / 2 experts)
    calls = []
    block.experts[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    block(x)
    assert calls == [8]


def test_moe_dispatch_is_sparse_and_matches_dense_computation() -> None:
    block = MoEBlock(C, n_experts=3, top_k=2).eval()
    x = torch.randn(1, C, 5, 6)
    seen = []
    for expert in block.experts:
        expert.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    y = block(x)
    assert sum(seen) == 5 * 6 * 2  # every token visits exactly top_k experts, no expert sees all
    # dense reference: run every expert on every token and mix with the renormalised top-k weights
    tokens = block.local(block.norm(x)).permute(0, 2, 3, 1).reshape(-1, C)
    probs = block.router(tokens).softmax(-1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    dense = torch.stack([e(tokens) for e in block.experts], 1)  # (T, E, C)
    mixed = (dense.gather(1, idx[..., None].expand(-1, -1, C)) * w[..., None]).sum(1)
    expected = x + mixed.view(1, 5, 6, C).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


# -- invariant 4: the frequency branch and noise injection start as identities --------------------


def test_fsb_starts_as_identity_and_changes_once_alpha_moves() -> None:
    block = FrequencySeparationBlock(C, cutoff=0.25)
    x = torch.randn(2, C, 11, 14)
    torch.testing.assert_close(block(x), x, atol=0, rtol=0)
    with torch.no_grad():
        block.alpha.fill_(1.0)
    assert (block(x) - x).abs().max() > 1e-3


def test_fsb_removes_only_high_frequencies() -> None:
    # with gain 1 everywhere, the branch's FFT part is an ideal high-pass: a constant image has none
    block = FrequencySeparationBlock(C, cutoff=0.25)
    const = torch.full((1, C, 12, 12), 0.7)
    spectrum = torch.fft.rfft2(const, norm="ortho")
    _, _, high = block._interpolation(12, 12, const.device)
    high_part = torch.fft.irfft2(spectrum * high, s=(12, 12), norm="ortho")
    assert high_part.abs().max() < 1e-6
    assert high[0, 0] == 0 and high.sum() > 0


def test_noise_injection_starts_as_identity_and_eval_is_deterministic() -> None:
    x = torch.randn(2, C, 6, 7)
    for mode in ("zero", "seeded"):
        block = NoiseInjection(eval_mode=mode, seed=3)
        torch.testing.assert_close(block.train()(x), x, atol=0, rtol=0)  # s = 0 at start
        with torch.no_grad():
            block.scale.fill_(0.5)
        block.eval()
        first, second = block(x), block(x)
        torch.testing.assert_close(first, second, atol=0, rtol=0)
        if mode == "zero":
            torch.testing.assert_close(first, x, atol=0, rtol=0)
        else:
            assert (first - x).abs().max() > 0.1
        block.train()
        assert not torch.equal(block(x), block(x))  # training draws fresh noise


# -- invariant 5: reparameterize equals eval forward, with fewer parameters -----------------------


@pytest.mark.parametrize("name", ["repmix", "repconv", "plk"])
def test_block_fuse_is_exact(name: str) -> None:
    block = _block(name).eval()
    with torch.no_grad():  # make every branch matter (training would move them off their init)
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, C, 9, 11)
    expected = block(x)
    deploy = reparameterize(block)
    torch.testing.assert_close(deploy(x), expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in deploy.parameters()) < sum(p.numel() for p in block.parameters())
    # the original keeps its training branches and its mode
    assert any(len(m.branches) > 0 for m in block.modules() if hasattr(m, "branches"))


def test_model_reparameterize_exact_and_original_untouched() -> None:
    cfg = EHRSRConfig.from_dict(
        {"width": 8, "scale": 3, "repmix": {"enabled": True, "kernel_size": 7}, "msg": {"levels": 1, "depths": [1]}}
    )
    torch.manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    deploy = reparameterize(model)
    assert model.training and not deploy.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.rand(2, 3, 15, 17)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in deploy.parameters()) < n_params


# -- invariant 6: fast paths equal their references ------------------------------------------------


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("size", [(8, 8), (9, 14)])
def test_sdpa_equals_reference_attention(shift: bool, size: tuple[int, int]) -> None:
    block = _block("wab_shift" if shift else "wab").eval()
    x = torch.randn(2, C, *size)
    block.use_sdpa = True
    fast = block(x)
    block.use_sdpa = False
    reference = block(x)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_attention_mask_blocks_padding_and_other_shift_regions() -> None:
    mask = attention_mask(8, 8, pad_h=1, pad_w=0, window_size=4, shift=0, device=torch.device("cpu"))
    # window 2 and 3 are the bottom row of windows; their last token row comes from padding
    assert (mask[2][:, 12:] < -1e3).all() and (mask[2][:, :12] == 0).all()
    assert (mask[0] == 0).all()
    shifted = attention_mask(8, 8, 0, 0, window_size=4, shift=2, device=torch.device("cpu"))
    assert (shifted[0] == 0).all()  # the first window holds one region only
    assert (shifted[3] < -1e3).any()  # the corner window mixes regions that must not attend


def test_window_attention_ignores_padding_content(monkeypatch) -> None:
    # a 6x6 map in 4x4 windows is padded to 8x8; padded keys are masked, so whatever the padding
    # holds, the output on the real pixels must not change
    import ehrsr.blocks.attention as attention

    block = _block("wab").eval()
    x = torch.randn(1, C, 6, 6)
    expected = block(x)
    real_pad = torch.nn.functional.pad
    monkeypatch.setattr(attention.F, "pad", lambda t, pad, *a, **k: real_pad(t, pad, value=123.0))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 7, 64, 257])
def test_parallel_scan_equals_sequential(length: int) -> None:
    torch.manual_seed(length)
    b, d, n = 2, 6, 5
    u = torch.randn(b, d, length)
    delta = torch.nn.functional.softplus(torch.randn(b, d, length))
    a = -torch.exp(torch.randn(d, n))
    bm, cm = torch.randn(b, n, length), torch.randn(b, n, length)
    dvec = torch.randn(d)
    reference = selective_scan_sequential(u, delta, a, bm, cm, dvec)
    for chunk in (None, 1, 4, 16):
        fast = selective_scan_parallel(u, delta, a, bm, cm, dvec, chunk=chunk)
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    op = torch.ops.ehrsr.selective_scan(u, delta, a, bm, cm, dvec)
    torch.testing.assert_close(op, reference, atol=1e-5, rtol=1e-5)


def test_scan_op_gradients_match_reference() -> None:
    torch.manual_seed(0)
    b, d, n, length = 1, 4, 3, 40
    inputs = [
        torch.randn(b, d, length),
        torch.rand(b, d, length),
        -torch.rand(d, n) - 0.1,
        torch.randn(b, n, length),
        torch.randn(b, n, length),
        torch.randn(d),
    ]
    ref_in = [t.clone().requires_grad_() for t in inputs]
    op_in = [t.clone().requires_grad_() for t in inputs]
    selective_scan_sequential(*ref_in).square().sum().backward()
    torch.ops.ehrsr.selective_scan(*op_in).square().sum().backward()
    for ref, fast in zip(ref_in, op_in):
        torch.testing.assert_close(fast.grad, ref.grad, atol=1e-4, rtol=1e-4)


def test_ssm_block_fast_path_equals_sequential_reference() -> None:
    block = _block("ssm4").eval()
    x = torch.randn(1, C, 7, 9)
    fast = block(x)
    block.scan_impl = "sequential"
    torch.testing.assert_close(block(x), fast, atol=1e-5, rtol=1e-5)


def test_scan_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="selective_scan expects"):
        selective_scan_parallel(
            torch.randn(1, 4, 5), torch.randn(1, 4, 6), torch.randn(4, 2), torch.randn(1, 2, 5),
            torch.randn(1, 2, 5), torch.randn(4),
        )


@pytest.mark.parametrize("name", ["wab_shift", "fsb"])
def test_training_works_after_inference_mode_evaluation(name: str) -> None:
    # the search evaluates under inference_mode between training steps; size-keyed caches built
    # there must not leak inference tensors into the next training step
    block = _block(name)
    x = torch.randn(1, C, 9, 10)
    with torch.inference_mode():
        block.eval()(x)
    block.train()
    block(x.requires_grad_()).sum().backward()
    assert x.grad is not None
