"""ONNX export for any image size (dynamic batch, height, width) and tiled inference of fixed-size files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ehrsr import EHRSRConfig, build_model, reparameterize
from ehrsr.fulltrain import export_onnx_dynamic, tiled_onnx_inference
from tests.model_helpers import randomize_head

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ALL_MODULES = {
    "width": 8, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1,
    **{m: {"enabled": True} for m in ("ssm", "fsb", "moe", "repmix", "noise")},
    "wab": {"enabled": True, "window_size": 4, "heads": 2}, "repmix": {"enabled": True, "kernel_size": 5},
}


def test_all_modules_export_dynamically_or_say_which_cannot(tmp_path):
    model = reparameterize(randomize_head(build_model(EHRSRConfig.from_dict(ALL_MODULES)))).eval()
    result = export_onnx_dynamic(model, tmp_path / "all.onnx", example_hw=(45, 37))
    session = onnxruntime.InferenceSession(str(tmp_path / "all.onnx"), providers=["CPUExecutionProvider"])
    if result.dynamic:
        assert result.passed and set(result.checks) >= {"1x3x61x47", "1x3x33x65", "2x3x61x47"}
        for hw in ((61, 47), (33, 65)):  # two odd sizes, neither the export size
            x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
            (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            with torch.inference_mode():
                reference = model(x).numpy()
            assert out.shape == reference.shape == (1, 3, 4 * hw[0], 4 * hw[1])
            assert np.abs(out - reference).max() <= 1e-4
    else:
        # a fixed export must say why, name the modules, and still run through tiles
        assert result.problem and result.blocking_modules and result.fixed_hw == (45, 37)
        x = torch.rand(1, 3, 61, 47, generator=torch.Generator().manual_seed(0))
        out = tiled_onnx_inference(session, x.numpy(), result.fixed_hw, overlap=8)
        assert out.shape == (1, 3, 61 * 4, 47 * 4)


class _PixelShuffleSR(torch.nn.Module):
    """Receptive field of one pixel: tiled and whole-image outputs must agree exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3 * 4, 1)
        self.shuffle = torch.nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


def test_tiled_inference_of_a_fixed_size_file_covers_any_image(tmp_path):
    torch.manual_seed(0)
    model = _PixelShuffleSR().eval()
    torch.onnx.export(model, (torch.rand(1, 3, 16, 16),), str(tmp_path / "fixed.onnx"), dynamo=False, opset_version=17)
    session = onnxruntime.InferenceSession(str(tmp_path / "fixed.onnx"), providers=["CPUExecutionProvider"])
    for hw in ((40, 29), (9, 13)):  # larger than a tile (overlapping tiles), and smaller (padded)
        x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(1))
        out = tiled_onnx_inference(session, x.numpy(), (16, 16), overlap=4)
        with torch.inference_mode():
            reference = model(x).numpy()
        assert out.shape == reference.shape
        np.testing.assert_allclose(out, reference, rtol=0, atol=1e-5)
