"""onnxruntime latency of units measured inside the whole network, from onnxruntime's own profiler.

A network exported as one graph lets onnxruntime fuse across module boundaries: a convolution
absorbs the activation or the residual add that follows it, layout reorders vanish between two
NCHWc convolutions, a matmul takes the next add. Timing each unit exported on its own misses
all of this. ``export_scoped`` exports a whole network once, with each node named after its
module scope (the TorchScript exporter's ``/encoders.0/encoders.0.0/conv1/Conv``; dynamo exports
are renamed the same way by ``export_for_timing``); ``profile_units`` runs it with onnxruntime's
profiler and charges each node of the graph onnxruntime actually ran (after its fusions;
onnxruntime saves that graph beside the profile) to exactly one bucket:

1. the unit whose module path contains the node's scope (its name). onnxruntime keeps the name
   of one of the nodes it fuses, or names the result after the tensor it writes (its NCHWc
   convolutions: ``/stem/stem.1/expand/Conv_output_0_nchwc``), so before the session is built
   every tensor is named after the node that writes it (``scope_values``; the TorchScript
   exporter does this itself except for the graph's outputs);
2. else (onnxruntime's layout reorders and transposes, nodes its fusions name themselves,
   ``EHRSR.forward``'s own padding, crop and bicubic base) the unit of the nearest node along
   the data flow that has one, producers first: a reorder belongs to the convolution whose
   output it converts, the padding to the stem, the bicubic base and the crop to the head (as
   when a unit is timed alone, ``docs/latency_models.md``);
3. a node with no unit anywhere in its part of the graph is charged to ``GLUE``.

A node fused from several modules' operators is one node, charged once: to the unit of the name
onnxruntime kept, which for a convolution fused with the activation or add that follows it is
the module that wrote the fused output. The other unit simply has fewer nodes (possibly none, and
then costs 0 in that network). Nodes inside a subgraph (the body of a ``Loop`` or ``Scan``) are
not counted on their own: their time is inside their parent node's. The mapping reads node names
and edges only, so a unit may export to any number of nodes (one custom scan node or a thousand
traced ones) without changing it.

A node's time is the median of its kernel times over the timed passes (after the protocol's
warm-up, ``ehrsr.profiling.latency``); a unit's time is the sum of its nodes' times, so units
and glue add up exactly to the graph's time (the sum over all nodes). onnxruntime's own time per
run (``run_ms``) is larger by its per-run overhead (inputs, outputs, the executor).
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ehrsr.profiling.latency import PerfCounterClock, run_timed
from ehrsr.profiling.onnx_runtime import (
    as_shapes,
    example_inputs,
    export_for_timing,
    onnx_session,
    require_runtime,
    session_feeds,
)

__all__ = [
    "GLUE",
    "Graph",
    "GraphAttribution",
    "GraphNode",
    "NodeTimes",
    "assign_nodes",
    "attribute",
    "export_scoped",
    "node_times",
    "profile_onnx",
    "profile_units",
    "read_graph",
    "scope_path",
    "scope_values",
]

GLUE = "glue"
"""The bucket of nodes that belong to no unit (none of their connected nodes names one)."""

_KERNEL = "_kernel_time"  # suffix of onnxruntime's per-node kernel events


@dataclass(frozen=True)
class GraphNode:
    """One node of the graph onnxruntime runs: its name and the tensors it reads and writes."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Graph:
    """What the attribution needs of an ONNX graph (``read_graph``)."""

    nodes: tuple[GraphNode, ...]  # the main graph's nodes
    nested: frozenset[str]  # names of the nodes inside its subgraphs (Loop / Scan / If bodies)


@dataclass(frozen=True)
class NodeTimes:
    """Per-node kernel times of the timed passes of one profiled session (milliseconds)."""

    node_ms: Mapping[str, float]  # node -> median kernel time over the passes
    pass_node_ms: tuple[float, ...]  # per pass: the sum of its nodes' kernel times
    pass_run_ms: tuple[float, ...]  # per pass: onnxruntime's own duration of the run
    passes: int


@dataclass(frozen=True)
class GraphAttribution:
    """A network's onnxruntime time split into its units (and the glue bucket)."""

    unit_ms: Mapping[str, float]  # unit path -> sum of its nodes' times (0 when all fused away)
    glue_ms: float
    graph_ms: float  # sum of every node's time: sum(unit_ms) + glue_ms
    run_ms: float  # median of onnxruntime's own duration per run (graph_ms plus per-run overhead)
    passes: int
    nodes: Mapping[str, str]  # node name -> unit path or GLUE


def scope_path(node_name: str) -> str:
    """The module path a scoped node name points into, with the operator name last, or ``""``.

    The TorchScript exporter writes each module scope as the module's name within its parent,
    except that children of a container carry the container's path:
    ``/encoders.0/encoders.0.0/norm1/LayerNormalization`` -> ``encoders.0.0.norm1.LayerNormalization``,
    ``/trunk/trunk.1/wab/attn/MatMul`` -> ``trunk.1.wab.attn.MatMul``. A name without a leading
    ``/`` (onnxruntime's own nodes, ``ReorderOutput_token_12``) has no scope.
    """
    if not node_name.startswith("/"):
        return ""
    path = ""
    for part in (p for p in node_name.split("/") if p):
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path


def _unit_of_scope(scope: str, unit_paths: Sequence[str]) -> str | None:
    """The longest unit path that ``scope`` lies inside, comparing whole path components only
    (``trunk_noise`` is not inside ``trunk``)."""
    for path in unit_paths:  # longest first
        if scope == path or scope.startswith(path + "."):
            return path
    return None


def assign_nodes(graph: Graph, unit_paths: Iterable[str]) -> dict[str, str]:
    """Each node's unit path, or ``GLUE`` (rules in the module docstring)."""
    paths = sorted(set(unit_paths), key=len, reverse=True)
    nodes = graph.nodes
    producer = {out: node for node in nodes for out in node.outputs if out}
    consumers: dict[str, list[GraphNode]] = defaultdict(list)
    for node in nodes:
        for name in node.inputs:
            if name:
                consumers[name].append(node)
    direct = {node.name: _unit_of_scope(scope_path(node.name), paths) for node in nodes}

    def neighbours(node: GraphNode) -> list[GraphNode]:
        upstream = [producer[name] for name in node.inputs if name in producer]
        return upstream + [c for name in node.outputs for c in consumers.get(name, ())]

    assigned: dict[str, str] = {}
    for node in nodes:
        unit = direct[node.name]
        if unit is None:  # breadth-first along the data flow, producers first at each step
            seen, frontier = {node.name}, [node]
            while frontier and unit is None:
                following = []
                for current in frontier:
                    for near in neighbours(current):
                        if near.name in seen:
                            continue
                        seen.add(near.name)
                        if direct[near.name] is not None:
                            unit = direct[near.name]
                            break
                        following.append(near)
                    if unit is not None:
                        break
                frontier = following
        assigned[node.name] = unit if unit is not None else GLUE
    return assigned


def read_graph(path: str | Path) -> Graph:
    """The main graph of an ONNX file: its nodes and the names of the nodes in its subgraphs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = tuple(GraphNode(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node)
    nested: set[str] = set()

    def visit(graph: Any) -> None:
        for node in graph.node:
            for sub in _subgraphs(node):
                nested.update(n.name for n in sub.node)
                visit(sub)

    visit(model.graph)
    return Graph(nodes, frozenset(nested))


def _subgraphs(node: Any) -> list[Any]:
    return [sub for a in node.attribute for sub in ([a.g] if a.HasField("g") else list(a.graphs))]


def scope_values(path: str | Path) -> None:
    """Name every tensor a scoped node writes after that node (``/2/conv/Conv_output_0``), in
    place: onnxruntime names some rewritten nodes after the tensor they write, and an unscoped
    tensor name (the TorchScript exporter numbers the graph's outputs, the dynamo exporter names
    tensors after its own operators) would then hide the module the node came from."""
    import onnx

    model = onnx.load(str(path))
    renamed: dict[str, str] = {}
    for node in model.graph.node:
        if not node.name.startswith("/"):
            continue
        for index, value in enumerate(node.output):
            if value and not value.startswith("/"):
                renamed[value] = f"{node.name}_output_{index}"
    if not renamed:
        return

    def rename(graph: Any) -> None:
        for node in graph.node:
            node.input[:] = [renamed.get(v, v) for v in node.input]
            node.output[:] = [renamed.get(v, v) for v in node.output]
            for sub in _subgraphs(node):
                rename(sub)  # a body may read the outer graph's tensors by name
        for info in [*graph.output, *graph.value_info]:
            info.name = renamed.get(info.name, info.name)

    rename(model.graph)
    onnx.save(model, str(path))


def node_times(events: Sequence[Mapping[str, Any]], *, last_runs: int, nested: Iterable[str] = ()) -> NodeTimes:
    """Per-node median kernel times over the last ``last_runs`` runs of an onnxruntime profile.

    ``events``: the profile's JSON events. Node events are grouped into the run (``model_run``)
    whose interval holds them; earlier runs (warm-up) are left out, and so are the nodes named in
    ``nested`` (subgraph bodies, ``read_graph``): their time is inside their parent node's. A
    node missing from a pass counts 0 there.
    """
    skip = set(nested)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) < last_runs or last_runs < 1:
        raise ValueError(f"the profile holds {len(runs)} runs, {last_runs} wanted")
    runs = runs[-last_runs:]
    starts = np.array([r["ts"] for r in runs])
    per_node: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(runs))
    pass_totals = [0.0] * len(runs)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith(_KERNEL):
            continue
        node = name[: -len(_KERNEL)]
        index = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if index < 0 or event["ts"] > runs[index]["ts"] + runs[index]["dur"] or node in skip:
            continue  # a warm-up pass, or a node inside a subgraph
        ms = event["dur"] / 1000.0
        per_node[node][index] += ms
        pass_totals[index] += ms
    return NodeTimes(
        node_ms={node: float(np.median(values)) for node, values in per_node.items()},
        pass_node_ms=tuple(pass_totals),
        pass_run_ms=tuple(r["dur"] / 1000.0 for r in runs),
        passes=len(runs),
    )


def attribute(times: NodeTimes, nodes: Mapping[str, str], unit_paths: Iterable[str]) -> GraphAttribution:
    """Sum the node times into units and ``GLUE`` (``nodes``: ``assign_nodes``'s answer). A timed
    node the graph does not name goes to ``GLUE``; every unit path gets an entry, 0 when none
    of its nodes ran (fused into another unit's node, or exported to nothing)."""
    unit_ms = {path: 0.0 for path in unit_paths}
    glue = 0.0
    for node, ms in times.node_ms.items():
        unit = nodes.get(node, GLUE)
        if unit == GLUE:
            glue += ms
        else:
            unit_ms[unit] += ms
    graph_ms = sum(times.node_ms.values())
    return GraphAttribution(
        unit_ms=unit_ms,
        glue_ms=glue,
        graph_ms=graph_ms,
        run_ms=float(np.median(times.pass_run_ms)),
        passes=times.passes,
        nodes=dict(nodes),
    )


def export_scoped(model: nn.Module, input_shapes: Sequence[int] | Sequence[Sequence[int]], path: str | Path) -> Path:
    """Export ``model`` whole for profiling: ``export_for_timing`` (float32, fixed shapes, inputs
    ``input0``, ``input1``...), then every tensor named after its node (``scope_values``)."""
    exported = export_for_timing(model.to("cpu").eval(), as_shapes(input_shapes), path)
    scope_values(exported)
    return exported


def profile_onnx(
    path: str | Path,
    input_shapes: Sequence[int] | Sequence[Sequence[int]],
    threads: int | None = None,
    *,
    warmup: int | None = None,
    repeats: int | None = None,
    budget_s: float | None = None,
) -> tuple[Graph, NodeTimes]:
    """Run the ONNX file at ``path`` (inputs ``input0``, ``input1``... of ``input_shapes``, seeded
    random values) through onnxruntime's CPU execution provider with its profiler on; returns the
    graph onnxruntime ran (after its optimisations) and its nodes' times over the timed passes.
    Warm-up and timed passes follow the latency protocol (``warmup`` / ``repeats`` /
    ``budget_s`` as in ``time_model``)."""
    require_runtime("onnxruntime")
    inputs = example_inputs(as_shapes(input_shapes))
    with tempfile.TemporaryDirectory(prefix="ehrsr-onnx-profile-") as folder:
        optimized = Path(folder) / "optimized.onnx"
        session = onnx_session(Path(path), threads, profile_prefix=Path(folder) / "profile", optimized_path=optimized)
        feeds = session_feeds(session, {f"input{i}": x.numpy() for i, x in enumerate(inputs)})
        _, _, timed = run_timed(lambda: session.run(None, feeds), PerfCounterClock(), "cpu", warmup, repeats,
                                 budget_s)
        events = json.loads(Path(session.end_profiling()).read_text())
        graph = read_graph(optimized)
    return graph, node_times(events, last_runs=timed, nested=graph.nested - {n.name for n in graph.nodes})


def profile_units(
    path: str | Path,
    input_shapes: Sequence[int] | Sequence[Sequence[int]],
    unit_paths: Iterable[str],
    threads: int | None = None,
    *,
    warmup: int | None = None,
    repeats: int | None = None,
    budget_s: float | None = None,
) -> GraphAttribution:
    """The onnxruntime time of the network ``export_scoped`` wrote to ``path``, split into
    ``unit_paths`` (its submodule paths, as ``units_of`` lists them) and ``GLUE``:
    ``profile_onnx``, ``assign_nodes``, ``attribute``."""
    paths = list(unit_paths)
    graph, times = profile_onnx(path, input_shapes, threads, warmup=warmup, repeats=repeats, budget_s=budget_s)
    return attribute(times, assign_nodes(graph, paths), paths)
