"""The whole network over a pairwise covering of its switches, scales 1-4 and odd input sizes."""

from __future__ import annotations

import pytest
import torch

from ehrsr import EHRSR, MODULE_TOGGLES, EHRSRConfig, build_model
from tests.model_helpers import randomize_head
from tests.pairwise import pairwise_rows, uncovered_pairs

FACTORS: dict[str, list] = {
    **{name: [False, True] for name in MODULE_TOGGLES},
    "block_type": ["naf", "gated"],
    "skip_fusion": ["add", "concat"],
    "attention_gate": [False, True],
    "downsample": ["conv", "unshuffle"],
    "levels": [0, 1, 2, 3],
    "scale": [1, 2, 3, 4],
}
ROWS = pairwise_rows(FACTORS, seed=0)


def _config(row: dict) -> EHRSRConfig:
    levels = row["levels"]
    return EHRSRConfig.from_dict(
        {
            "scale": row["scale"],
            "width": 8,
            "block_type": row["block_type"],
            "msg": {
                "levels": levels,
                "depths": [1] * levels,
                "skip_fusion": row["skip_fusion"],
                "attention_gate": row["attention_gate"],
                "downsample": row["downsample"],
            },
            "trunk_blocks": 2,
            "wab": {"enabled": row["wab"], "window_size": 4, "heads": 2},
            "ssm": {"enabled": row["ssm"], "d_state": 4},
            "fsb": {"enabled": row["fsb"]},
            "moe": {"enabled": row["moe"], "n_experts": 3},
            "repmix": {"enabled": row["repmix"], "kernel_size": 5},
            "noise": {"enabled": row["noise"]},
        }
    )


def test_rows_cover_every_pair() -> None:
    assert uncovered_pairs(FACTORS, ROWS) == set()
    # every toggle appears both on and off, alone with each other toggle in both states
    assert len(ROWS) < 40


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items() if v not in (False,)))
def test_forward_backward_determinism(row: dict) -> None:
    cfg = _config(row)
    torch.manual_seed(0)
    model = randomize_head(build_model(cfg))  # a zero head would hide every other weight
    x = torch.rand(2, 3, 37, 53)
    y = model(x)
    assert y.shape == (2, 3, 37 * cfg.scale, 53 * cfg.scale)
    assert torch.isfinite(y).all()

    (y.square().mean() + model.aux_loss()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    # same seed, same weights and same output (eval mode: noise injection is deterministic there)
    torch.manual_seed(0)
    twin = randomize_head(build_model(cfg))
    model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), atol=0, rtol=0)


def test_trunk_level_moves_the_trunk() -> None:
    sizes = {}
    for level in (0, 1, 2):
        cfg = EHRSRConfig.from_dict({"width": 8, "trunk_level": level, "ssm": {"enabled": True, "d_state": 2}})
        model = build_model(cfg)
        seen = []
        model.trunk.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
        model(torch.rand(1, 3, 16, 20))
        sizes[level] = seen[0]
    # the trunk runs at H / 2^level with width * 2^level channels
    assert sizes == {0: (1, 8, 16, 20), 1: (1, 16, 8, 10), 2: (1, 32, 4, 5)}


def test_conv_only_baseline_has_no_token_mixers() -> None:
    model = build_model(EHRSRConfig(width=8))
    kinds = {type(m).__name__ for m in model.modules()}
    assert not kinds & {"WindowAttentionBlock", "SSMBlock", "FrequencySeparationBlock", "MoEBlock", "RepMixBlock"}
    everything = build_model(EHRSRConfig.from_dict({"width": 8, **{m: {"enabled": True} for m in MODULE_TOGGLES}}))
    kinds = {type(m).__name__ for m in everything.modules()}
    assert {"WindowAttentionBlock", "SSMBlock", "FrequencySeparationBlock", "MoEBlock", "RepMixBlock",
            "NoiseInjection"} <= kinds


def test_untrained_network_is_exactly_bicubic_or_identity() -> None:
    # the head starts at zero: SR starts from the bicubic-upsampled input, restoration from the
    # input (odd sizes: the base is the unpadded input's, not the padded one's)
    x = torch.rand(2, 3, 13, 19)
    for scale in (2, 3, 4):
        sr = build_model({"width": 8, "scale": scale, "msg": {"levels": 2, "depths": [1, 1]}}).eval()
        with torch.no_grad():
            bicubic = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
            torch.testing.assert_close(sr(x), bicubic, atol=0, rtol=0)
    restore = build_model(EHRSRConfig(width=8, scale=1)).eval()
    with torch.no_grad():
        torch.testing.assert_close(restore(x), x, atol=0, rtol=0)


def test_zero_head_still_trains_the_body() -> None:
    # the first step moves the head; from the second step gradients reach every other weight
    torch.manual_seed(0)
    model = build_model({"width": 8, "scale": 2, "msg": {"levels": 1, "depths": [1]}})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 24, 24)
    body = {name: p for name, p in model.named_parameters() if not name.startswith("head.")}
    for step in range(2):
        optimizer.zero_grad()
        (model(x) - target).abs().mean().backward()
        reached = {name for name, p in body.items() if p.grad is not None and p.grad.any()}
        if step == 0:
            assert not reached and model.head[0].weight.grad.any()
        else:  # blocks with zero-initialised layer scales (NAF) join one step later still
            assert {name for name in body if name.startswith(("stem.0.", "down.0.", "up.0."))} <= reached
        optimizer.step()


def test_bad_input_and_config_types() -> None:
    model = build_model({"width": 8})
    assert isinstance(model, EHRSR)
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        model(torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match="EHRSRConfig or a dict"):
        build_model("width=8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown configuration key"):
        build_model({"wdth": 8})
