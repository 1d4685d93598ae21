"""Whole-network onnxruntime profiles charged to units: names, data flow, passes, fusions, subgraphs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ehrsr.config import EHRSRConfig
from ehrsr.profiling import latency_model as lm
from ehrsr.profiling.onnx_graph import (
    GLUE,
    Graph,
    GraphNode,
    assign_nodes,
    attribute,
    export_scoped,
    node_times,
    profile_onnx,
    scope_path,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_scope_path_rebuilds_the_module_path_from_a_scoped_name():
    assert scope_path("/encoders.0/encoders.0.0/norm1/LayerNormalization") == "encoders.0.0.norm1.LayerNormalization"
    assert scope_path("/trunk/trunk.1/wab/attn/MatMul_3") == "trunk.1.wab.attn.MatMul_3"
    assert scope_path("/stem/stem.0/fused/Conv_output_0_nchwc") == "stem.0.fused.Conv_output_0_nchwc"
    # the dynamo exporter's name scopes, written into the name by export_for_timing
    assert scope_path("/stem/stem.0/stem.0.fused/conv2d") == "stem.0.fused.conv2d"
    assert scope_path("/Resize") == "Resize"  # EHRSR.forward's own operator: no module
    assert scope_path("ReorderOutput_token_12") == ""  # onnxruntime's own node: no scope


def _node(name: str, inputs: list[str], outputs: list[str], op: str = "Op") -> GraphNode:
    return GraphNode(name, op, tuple(inputs), tuple(outputs))


def test_nodes_go_to_their_scope_else_to_the_nearest_unit_along_the_data_flow_else_glue():
    units = ["stem", "trunk.0.conv", "trunk_noise", "head"]
    graph = Graph(
        nodes=(
            _node("/Pad", ["x"], ["padded"]),  # forward's own op: its consumer is the stem
            _node("/stem/stem.0/Conv", ["padded", "w"], ["s"]),
            _node("ReorderOutput_token_1", ["s"], ["s2"]),  # onnxruntime's: producer first
            _node("/trunk/trunk.0/conv/Conv_output_0_nchwc", ["s2"], ["t"]),
            _node("/trunk_noise/Add", ["t"], ["tn"]),  # trunk_noise, a path that starts like "trunk"
            _node("/trunk/trunk.0/conv_extra/Mul", ["tn"], ["u"]),  # not inside trunk.0.conv: data flow
            _node("/head/head.0/Conv", ["u"], ["h"]),
            _node("/Resize", ["x"], ["base"]),  # no producer; its consumer's producer is the head
            _node("/Add", ["h", "base"], ["y"]),
            _node("Orphan", ["constant"], ["z"]),  # connected to no unit
        ),
        nested=frozenset(),
    )
    assigned = assign_nodes(graph, units)
    assert assigned == {
        "/Pad": "stem",
        "/stem/stem.0/Conv": "stem",
        "ReorderOutput_token_1": "stem",
        "/trunk/trunk.0/conv/Conv_output_0_nchwc": "trunk.0.conv",
        "/trunk_noise/Add": "trunk_noise",
        "/trunk/trunk.0/conv_extra/Mul": "trunk_noise",
        "/head/head.0/Conv": "head",
        "/Resize": "head",
        "/Add": "head",
        "Orphan": GLUE,
    }


def _run(ts: int, dur: int) -> dict:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _kernel(node: str, ts: int, dur: int) -> dict:
    return {"cat": "Node", "name": f"{node}_kernel_time", "ts": ts, "dur": dur}


def test_node_times_keep_the_timed_runs_and_leave_out_subgraph_bodies():
    events = [
        _run(0, 100), _kernel("A", 1, 50), _kernel("B", 60, 30),  # warm-up run
        _run(200, 100), _kernel("A", 201, 12), _kernel("body", 202, 5), _kernel("B", 220, 30),
        {"cat": "Node", "name": "B_fence_before", "ts": 219, "dur": 0},
        _run(400, 100), _kernel("A", 401, 14), _kernel("B", 420, 10), _kernel("X", 440, 8),
    ]
    times = node_times(events, last_runs=2, nested={"body"})
    assert times.passes == 2
    assert times.node_ms == pytest.approx({"A": 0.013, "B": 0.020, "X": 0.004})  # X missing in a pass: 0 there
    assert times.pass_node_ms == pytest.approx((0.042, 0.032))
    assert times.pass_run_ms == pytest.approx((0.1, 0.1))
    split = attribute(times, {"A": "u1", "B": "u2"}, ["u1", "u2", "u3"])
    assert split.unit_ms == pytest.approx({"u1": 0.013, "u2": 0.020, "u3": 0.0})
    assert split.glue_ms == pytest.approx(0.004)  # a timed node the graph does not name
    assert split.graph_ms == pytest.approx(0.037) == sum(split.unit_ms.values()) + split.glue_ms
    with pytest.raises(ValueError, match="holds 3 runs, 4 wanted"):
        node_times(events, last_runs=4)


def test_a_whole_ehrsr_network_is_split_into_its_units_and_the_parts_add_up(tmp_path):
    config = EHRSRConfig.from_dict({
        "width": 8, "msg": {"levels": 1, "depths": [1], "skip_fusion": "concat", "attention_gate": True},
        "trunk_blocks": 1, "wab": {"enabled": True, "heads": 2, "window_size": 4},
        "repmix": {"enabled": True, "kernel_size": 5}, "noise": {"enabled": True},
    })
    hw = (15, 17)  # odd: the stem pads to the size multiple
    units = lm.units_of(config, hw)
    paths = [u.path for u in units]
    path = export_scoped(lm._deploy(config), [(1, 3, *hw)], tmp_path / "network.onnx")
    graph, times = profile_onnx(path, [(1, 3, *hw)], 1, warmup=1, repeats=5)
    assigned = assign_nodes(graph, paths)
    split = attribute(times, assigned, paths)

    assert set(assigned) == {n.name for n in graph.nodes}
    assert set(assigned.values()) <= set(paths)  # every node has a unit: nothing is glue here
    assert split.glue_ms == 0.0
    assert split.graph_ms == pytest.approx(sum(times.node_ms.values()))
    assert sum(split.unit_ms.values()) + split.glue_ms == pytest.approx(split.graph_ms, abs=1e-9)
    assert times.passes == split.passes == 5
    for node_sum, run in zip(times.pass_node_ms, times.pass_run_ms, strict=True):
        assert 0 < node_sum <= run + 1e-6  # one executor thread: the nodes run inside the run
    # EHRSR.forward's own operators (no module scope): the padding goes with the stem, the
    # bicubic base with the head, as when those units are timed alone
    forward_ops = {n.op_type: assigned[n.name] for n in graph.nodes if "." not in scope_path(n.name)}
    assert forward_ops["Pad"] == "stem" and forward_ops["Resize"] == "head"
    for path in ("stem", "down.0", "encoders.0.0", "trunk.0.conv", "trunk.0.wab", "trunk.0.repmix", "up.0",
                 "fusions.0", "head"):
        assert split.unit_ms[path] > 0, path


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Relu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


def test_a_fusion_across_a_unit_boundary_is_charged_once(tmp_path):
    """onnxruntime fuses unit 0's convolution with unit 1's ReLU into one node: that node is
    charged once, to the unit that wrote its output; unit 0 keeps no node; nothing is counted twice.
    (The last convolution writes the graph's output, which the exporter numbers: ``scope_values``
    names it after its node, or that node would take the name of no module.)"""
    net = nn.Sequential(_Conv(), _Relu(), _Conv())
    paths = ["0", "1", "2"]
    path = export_scoped(net, [(1, 16, 24, 24)], tmp_path / "net.onnx")
    graph, times = profile_onnx(path, [(1, 16, 24, 24)], 1, warmup=1, repeats=5)
    ops = [n.op_type for n in graph.nodes]
    assert "Relu" not in ops and ops.count("Conv") == 2  # the ReLU went into the first convolution
    assigned = assign_nodes(graph, paths)
    split = attribute(times, assigned, paths)
    convs = {assigned[n.name] for n in graph.nodes if n.op_type == "Conv"}
    assert convs == {"1", "2"}
    assert "0" not in assigned.values() and split.unit_ms["0"] == 0.0
    fused = sum(times.node_ms.get(n.name, 0.0) for n in graph.nodes if assigned[n.name] == "1")
    assert split.unit_ms["1"] == pytest.approx(fused) and fused > 0
    assert sum(split.unit_ms.values()) + split.glue_ms == pytest.approx(split.graph_ms, abs=1e-9)


def test_a_loop_body_is_counted_inside_its_parent_node(tmp_path):
    """onnxruntime also reports the nodes of a Loop's body; their time is inside the Loop node's,
    so they are left out and the Loop's unit is charged once."""
    import onnx
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("Mul", ["x_in", "two"], ["x_out"], name="body_mul")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "go", "input0"], ["looped"], name="/scan/Loop", body=body),
         helper.make_node("Sigmoid", ["looped"], ["out"], name="/after/Sigmoid")],
        "loop",
        [helper.make_tensor_value_info("input0", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor("trips", TensorProto.INT64, [], [6]), helper.make_tensor("go", TensorProto.BOOL, [], [True])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "loop.onnx"
    onnx.save(model, str(path))
    ran, times = profile_onnx(path, [(64, 64)], 1, warmup=1, repeats=5)
    assert {"body_mul", "body_cond"} <= ran.nested
    assert set(times.node_ms) == {"/scan/Loop", "/after/Sigmoid"}
    split = attribute(times, assign_nodes(ran, ["scan", "after"]), ["scan", "after"])
    assert split.unit_ms["scan"] == pytest.approx(times.node_ms["/scan/Loop"]) and split.unit_ms["scan"] > 0
    for node_sum, run in zip(times.pass_node_ms, times.pass_run_ms, strict=True):
        assert node_sum <= run + 1e-6
