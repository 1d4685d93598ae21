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

BASE = {"width": 8, "msg": {"levels": 1, "depths": [1]}, "trunk_blocks": 1}
# the modules whose plain-ops forms export with symbolic sizes (MoE, RepMix, noise) ...
DYNAMIC_MODULES = {**BASE, "moe": {"enabled": True}, "repmix": {"enabled": True, "kernel_size": 5},
                   "noise": {"enabled": True}}
# ... the SSMB, whose selective scan exports as one ONNX Scan node over a dynamic length ...
SSM_NETWORK = {**BASE, "ssm": {"enabled": True, "directions": 4, "d_state": 4}}
# ... and a network whose FSB is made to block (below); its WAB exports dynamically since the
# mask cache is skipped while exporting
FIXED_MODULES = {**BASE, "fsb": {"enabled": True}, "wab": {"enabled": True, "window_size": 4, "heads": 2}}


@pytest.fixture
def fsb_keyed_by_size(monkeypatch):
    """Simulate a module that cannot be exported with symbolic sizes: FSB's frequency weights keyed
    by the input size again (the bug once found)."""
    from ehrsr.blocks.frequency import FrequencySeparationBlock

    real_forward = FrequencySeparationBlock.forward

    def forward(self, x):
        # the dynamic export traces a batch of 2, the fixed one a batch of 1
        if torch.compiler.is_exporting() and x.shape[0] != 1:
            raise TypeError("unhashable type: non-nested SymInt (simulated)")
        return real_forward(self, x)

    monkeypatch.setattr(FrequencySeparationBlock, "forward", forward)


def run(session, x: torch.Tensor) -> np.ndarray:
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return out


def test_dynamic_export_runs_at_other_odd_sizes_and_batches(tmp_path):
    model = reparameterize(randomize_head(build_model(EHRSRConfig.from_dict(DYNAMIC_MODULES)))).eval()
    result = export_onnx_dynamic(model, tmp_path / "m.onnx", example_hw=(13, 11))
    assert result.dynamic and result.passed and result.problem is None, result
    assert set(result.checks) == {"1x3x13x11", "1x3x61x47", "1x3x33x65", "2x3x61x47"}
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 61, 47), (1, 3, 33, 65), (3, 3, 21, 9)):  # odd sizes, none the export size
        x = torch.rand(shape, generator=torch.Generator().manual_seed(shape[2]))
        with torch.inference_mode():
            reference = model(x).numpy()
        out = run(session, x)
        assert out.shape == reference.shape == (shape[0], 3, 4 * shape[2], 4 * shape[3])
        assert np.abs(out - reference).max() <= 1e-4


def test_ssmb_exports_with_dynamic_sizes_as_one_scan_node(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = reparameterize(randomize_head(build_model(EHRSRConfig.from_dict(SSM_NETWORK)))).eval()
    result = export_onnx_dynamic(model, tmp_path / "m.onnx", example_hw=(13, 11))
    assert result.dynamic and result.passed and result.problem is None, result
    nodes = onnx.load(str(tmp_path / "m.onnx")).graph.node
    scans = [node for node in nodes if node.op_type == "Scan"]
    # one Scan for the trunk's SSMB (all 4 directions stacked), scoped to its module so that a
    # profiler's per-node times map back to it; no loop was unrolled into the graph
    assert len(scans) == 1
    scopes = {p.key: p.value for p in scans[0].metadata_props}
    assert "trunk.0.ssm" in scopes["pkg.torch.onnx.name_scopes"], scopes
    assert len(nodes) < 300, len(nodes)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 61, 47), (1, 3, 127, 255)):  # odd sizes, neither the traced nor the example size
        x = torch.rand(shape, generator=torch.Generator().manual_seed(shape[2]))
        with torch.inference_mode():
            reference = model(x).numpy()
            ssmb = model.trunk[0].ssm
            model.trunk[0].ssm = torch.nn.Identity()
            no_ssmb = model(x).numpy()
            model.trunk[0].ssm = ssmb
        out = run(session, x)
        assert out.shape == reference.shape == (1, 3, 4 * shape[2], 4 * shape[3])
        assert np.abs(out - reference).max() <= 1e-4
        assert np.abs(no_ssmb - reference).max() > 100 * 1e-4  # the comparison does see the SSMB


def test_modules_that_cannot_be_dynamic_are_named_and_the_fixed_file_is_tiled(tmp_path, fsb_keyed_by_size):
    model = reparameterize(randomize_head(build_model(EHRSRConfig.from_dict(FIXED_MODULES)))).eval()
    result = export_onnx_dynamic(model, tmp_path / "m.onnx", example_hw=(16, 16))
    assert not result.dynamic and result.fixed_hw == (16, 16) and result.problem
    assert set(result.blocking_modules) == {"fsb"}, result.blocking_modules
    assert result.blocking_modules["fsb"].startswith("FSBConfig: ")  # the section and the exporter's reason
    assert result.passed and set(result.checks) == {"1x3x16x16"}  # right at its own size
    data = result.to_dict()
    assert data["dynamic"] is False and data["blocking_modules"] == result.blocking_modules
    assert data["tiling"] == "ehrsr.deploy.export.tiled_onnx_inference"
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):  # noqa: B017  (onnxruntime's own error type for a wrong shape)
        run(session, torch.rand(1, 3, 61, 47))
    x = torch.rand(1, 3, 61, 47, generator=torch.Generator().manual_seed(0))
    out = tiled_onnx_inference(session, x.numpy(), result.fixed_hw, overlap=8)
    assert out.shape == (1, 3, 61 * 4, 47 * 4)
    # FSB and WAB see the whole input, so tiles differ from one whole-image pass; the corner only
    # the first tile covers must equal PyTorch on that tile
    with torch.inference_mode():
        first_tile = model(x[..., :16, :16]).numpy()
    corner = (16 - 8) * 4
    assert np.abs(out[..., :corner, :corner] - first_tile[..., :corner, :corner]).max() <= 1e-4


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
