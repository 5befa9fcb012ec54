"""Where QuantizeLinear/DequantizeLinear pairs go, per target runtime.

Pure graph analysis: it decides which nodes run in int8 and which tensors get a Q→DQ pair,
and returns a ``QuantPlan``; ``passes/quantize.py`` calibrates and rewrites.

Target ``cpu`` (onnxruntime's QDQ transformers, onnxruntime/core/optimizer/qdq_transformer):
a node runs as an integer kernel only when *all* its activation inputs come from a
DequantizeLinear and its output goes to a QuantizeLinear (DQ→Conv→Q becomes QLinearConv,
DQ→Add→Q QLinearAdd, DQ→Concat→Q QLinearConcat, …). Data-movement ops (MaxPool, Reshape,
Transpose, …) run on the int8 data when their input and output share scale and zero point.
A Relu/Clip right after an int node is left out of the pair (Conv→Relu→Q): with the Q's zero
point at the bottom of the range onnxruntime drops it (ReluQuantFusion / ClipQuantFusion), so
the chain still fuses. So the plan grows int *regions* around the compute nodes and keeps
conversions at the region borders only.

Target ``tensorrt`` (NVIDIA TensorRT developer guide, "Explicit Quantization", Q/DQ placement
recommendations): Q/DQ only on the inputs of Conv/Gemm/MatMul, none on their outputs; of a
residual Add only the skip input; one scale shared by a Concat's inputs and output; MaxPool,
BatchNorm and activations left for the builder to commute or fuse; symmetric int8.

Both targets: a tensor that reaches a graph output through non-compute nodes only (the *tail*:
YOLO's concatenated boxes and scores, a DB map after its Sigmoid) is never quantized — one
8-bit grid over box coordinates in pixels and scores in [0, 1] erases the scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G

# Compute nodes whose weights become int8 ("anchors" of int regions).
ANCHOR_OPS = ("Conv", "Gemm", "MatMul")

# cpu: ops onnxruntime runs on int8 data as they are, input and output sharing one scale.
CPU_PASSTHROUGH_OPS = frozenset({
    "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Slice",
    "Gather", "DepthToSpace", "SpaceToDepth", "Identity", "Split", "Expand", "Tile",
})
# cpu: ops with a QLinear kernel that requantizes to its own output scale.
CPU_REQUANTIZING_OPS = frozenset({
    "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu",
})
# Activations that the Q after them absorbs when its zero point sits at the range's bottom.
FOLDABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})


@dataclass
class QuantPlan:
    """What to quantize. Tensor names, not objects, so a plan applies to a graph copy."""

    target: str
    # Compute nodes (by name) whose weights become int8 and whose activation inputs get Q/DQ.
    anchors: list[str] = field(default_factory=list)
    # Every node (by name) that runs as an integer kernel on cpu (anchors included).
    int_nodes: set[str] = field(default_factory=set)
    # Activation tensors that get a Q→DQ pair.
    tensors: set[str] = field(default_factory=set)
    # Tensors that must share one scale/zero point (passthrough ops, TensorRT Concat).
    groups: list[set[str]] = field(default_factory=list)
    # Anchors whose output stays float (cpu Gemm/MatMul: QGemm / MatMulIntegerToFloat).
    float_output: set[str] = field(default_factory=set)
    # Nodes (by name) that must read the dequantized tensor; other consumers keep the float one.
    int_readers: dict[str, set[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def group_of(self, tensor: str) -> set[str]:
        for group in self.groups:
            if tensor in group:
                return group
        return {tensor}


def weight_input(node: gs.Node) -> int | None:
    """Index of the constant weight input of an anchor, None when it has none."""
    if node.op in ("Conv", "Gemm") and len(node.inputs) > 1 and G.is_constant(node.inputs[1]):
        return 1
    if node.op == "MatMul" and len(node.inputs) == 2 and G.is_constant(node.inputs[1]) \
            and not G.is_constant(node.inputs[0]):
        return 1
    return None


def weight_axis(node: gs.Node) -> int:
    """The output-channel axis of an anchor's weight (per-channel quantization axis)."""
    if node.op == "Gemm":
        return 0 if G.attr(node, "transB", 0) else 1
    if node.op == "MatMul":
        return 1
    return 0


def anchor_problem(node: gs.Node, target: str, min_channels: int = 1) -> str | None:
    """Why this compute node cannot be quantized, or None."""
    index = weight_input(node)
    if index is None:
        return "weight is not a constant"
    weight = G.constant_value(node.inputs[index])
    if weight is None or weight.dtype != np.float32:
        return "weight is not float32"
    if node.op in ("Gemm", "MatMul") and weight.ndim != 2:
        return f"weight has rank {weight.ndim}, not 2"
    if node.op == "Gemm" and G.attr(node, "transA", 0):
        return "Gemm with transA"
    if node.op == "Conv" and weight.ndim < 3:
        return "Conv weight rank < 3"
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name \
            and not G.is_constant(node.inputs[2]):
        return "bias is not a constant"
    activation = node.inputs[0]
    if activation.dtype is not None and np.dtype(activation.dtype) != np.float32:
        return "input is not float32"
    if target == "tensorrt" and node.op == "Conv":
        out_channels, in_per_group = weight.shape[0], weight.shape[1]
        receptive = in_per_group * int(np.prod(weight.shape[2:]))
        if out_channels < min_channels or receptive < min_channels:
            return (f"tiny conv ({out_channels} outputs, {receptive} inputs per output): "
                    "int8 gains nothing there, TensorRT keeps it in float")
    return None


def tail_tensors(graph: gs.Graph) -> set[str]:
    """Tensors that reach a graph output through non-compute nodes only."""
    tail: set[str] = set()
    stack = [t for t in graph.outputs]
    while stack:
        tensor = stack.pop()
        if tensor.name in tail:
            continue
        tail.add(tensor.name)
        node = G.producer(tensor)
        if node is None or node.op in ANCHOR_OPS:
            continue
        stack.extend(t for t in node.inputs if isinstance(t, gs.Variable))
    return tail


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)

    def groups(self, members: set[str]) -> list[set[str]]:
        by_root: dict[str, set[str]] = {}
        for m in self.parent:
            by_root.setdefault(self.find(m), set()).add(m)
        return [g for g in by_root.values() if len(g) > 1 and g & members]


def _float_inputs(node: gs.Node) -> list[gs.Variable]:
    """The activation (non-constant) inputs of a node."""
    return [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]


def plan_quantization(graph: gs.Graph, target: str, *, excluded: set[str] = frozenset(),
                      min_channels: int = 8) -> QuantPlan:
    """Decide the int8 placement on ``graph`` (main graph only) for ``target``.

    ``excluded``: node names or op types kept in float (user's list, slow or sensitive layers).
    """
    plan = QuantPlan(target)
    tail = tail_tensors(graph)
    anchors: list[gs.Node] = []
    for node in graph.nodes:
        if node.op not in ANCHOR_OPS or not G.is_default_domain(node):
            continue
        label = node.name or node.op
        if node.name in excluded or node.op in excluded:
            plan.notes.append(f"{label}: excluded")
            continue
        problem = anchor_problem(node, target, min_channels if target == "tensorrt" else 1)
        if problem is None and target == "cpu" and node.op == "Conv" and node.outputs[0].name in tail:
            # QLinearConv has no float output: a Conv feeding the graph outputs stays float.
            problem = "its output reaches a graph output without another compute node (kept float)"
        if problem:
            plan.notes.append(f"{label}: {problem}")
            continue
        anchors.append(node)
    plan.anchors = [n.name for n in anchors]
    if target == "tensorrt":
        _plan_tensorrt(graph, plan, anchors)
    else:
        _plan_cpu(graph, plan, anchors, tail, excluded)
    return plan


# ----------------------------------------------------------------------------- TensorRT
def _plan_tensorrt(graph: gs.Graph, plan: QuantPlan, anchors: list[gs.Node]) -> None:
    anchor_names = set(plan.anchors)
    for node in anchors:
        activation = node.inputs[0]
        plan.tensors.add(activation.name)
        plan.int_readers.setdefault(activation.name, set()).add(node.name)
        plan.int_nodes.add(node.name)
    # Residual Add: quantize only the skip input, so the builder fuses the Add into the conv
    # that produces the other input and reads the skip in int8.
    for node in graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2 or not all(isinstance(t, gs.Variable) for t in node.inputs):
            continue
        producers = [G.producer(t) for t in node.inputs]
        from_anchor = [p is not None and p.name in anchor_names for p in producers]
        if not any(from_anchor):
            continue
        skip = node.inputs[1] if from_anchor[0] and not from_anchor[1] else \
            node.inputs[0] if from_anchor[1] and not from_anchor[0] else node.inputs[1]
        if skip.name in plan.tensors:
            plan.int_readers.setdefault(skip.name, set()).add(node.name)
            continue
        plan.tensors.add(skip.name)
        plan.int_readers.setdefault(skip.name, set()).add(node.name)
    # Concat: one scale for its inputs and output whenever any of them is quantized.
    unions = _UnionFind()
    for node in graph.nodes:
        if node.op == "Concat":
            members = [t.name for t in _float_inputs(node)] + [node.outputs[0].name]
            if any(m in plan.tensors for m in members):
                for m in members[1:]:
                    unions.union(members[0], m)
    plan.groups = unions.groups(plan.tensors)


# ----------------------------------------------------------------------------- cpu
def _plan_cpu(graph: gs.Graph, plan: QuantPlan, anchors: list[gs.Node], tail: set[str],
              excluded: set[str]) -> None:
    int_nodes: set[str] = {n.name for n in anchors}
    by_name = {n.name: n for n in graph.nodes}

    def companion_ok(node: gs.Node) -> bool:
        if node.name in excluded or node.op in excluded or not G.is_default_domain(node):
            return False
        if any(t.name in tail for t in node.outputs):
            return False
        inputs = _float_inputs(node)
        if not inputs or any(t.dtype is not None and np.dtype(t.dtype) != np.float32 for t in inputs[:1]):
            return False
        if node.op in ("Add", "Mul"):
            # QLinearAdd/QLinearMul want two activations (a constant operand is a float op here).
            return len(node.inputs) == 2 and len(inputs) == 2
        if node.op == "Concat":
            return len(inputs) == len(node.inputs)
        if node.op in CPU_PASSTHROUGH_OPS:
            return True
        return node.op in CPU_REQUANTIZING_OPS

    def neighbours(node: gs.Node) -> list[gs.Node]:
        near = [G.producer(t) for t in _float_inputs(node)]
        near += [c for t in node.outputs for c in G.consumers(t)]
        return [n for n in near if n is not None]

    # Grow regions from the anchors through ops onnxruntime has integer kernels for.
    frontier = [by_name[n] for n in int_nodes]
    while frontier:
        node = frontier.pop()
        for other in neighbours(node):
            if other.name in int_nodes or other.name not in by_name:
                continue
            if other.op in CPU_PASSTHROUGH_OPS or other.op in CPU_REQUANTIZING_OPS:
                if companion_ok(other):
                    int_nodes.add(other.name)
                    frontier.append(other)
    # A data-movement op only pays off between int nodes: drop those that touch an int node on
    # one side only (they would be converted back right away), until nothing changes.
    changed = True
    while changed:
        changed = False
        for name in list(int_nodes):
            node = by_name[name]
            if node.op not in CPU_PASSTHROUGH_OPS:
                continue
            feeds_int = any(c.name in int_nodes for t in node.outputs for c in G.consumers(t))
            fed_by_int = any((p := G.producer(t)) is not None and p.name in int_nodes for t in _float_inputs(node)[:1])
            if not (feeds_int and fed_by_int):
                int_nodes.discard(name)
                changed = True
    # Requantizing companions (Add, Concat, pools) need an int producer or consumer too.
    for name in list(int_nodes):
        node = by_name[name]
        if node.op in CPU_REQUANTIZING_OPS:
            touching = [n for n in neighbours(node) if n.name in int_nodes]
            if not touching:
                int_nodes.discard(name)

    plan.int_nodes = int_nodes
    unions = _UnionFind()

    def folded_activation(node: gs.Node) -> gs.Node | None:
        """The Relu/Clip right after an int node that the output Q absorbs."""
        out = node.outputs[0]
        users = G.consumers(out)
        if len(users) != 1 or G.is_graph_output(graph, out):
            return None
        act = users[0]
        if act.op not in FOLDABLE_ACTIVATIONS or act.outputs[0].name in tail:
            return None
        if act.op == "Clip" and not _clip_lower_bound_is_zero(act):
            return None
        return act

    for name in int_nodes:
        node = by_name[name]
        inputs = _float_inputs(node)
        quantized_inputs = inputs[:1] if node.op in ANCHOR_OPS or node.op in CPU_PASSTHROUGH_OPS \
            or node.op in ("AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu") else inputs
        for t in quantized_inputs:
            plan.tensors.add(t.name)
            plan.int_readers.setdefault(t.name, set()).add(name)
        out = node.outputs[0]
        if node.op in ("Gemm", "MatMul") and not any(c.name in int_nodes for c in G.consumers(out)):
            plan.float_output.add(name)  # QGemm / MatMulIntegerToFloat give float directly
            continue
        act = folded_activation(node)
        quantized_out = act.outputs[0] if act is not None else out
        plan.tensors.add(quantized_out.name)
        if node.op in CPU_PASSTHROUGH_OPS and inputs:
            unions.union(inputs[0].name, quantized_out.name)
            for extra in node.outputs[1:]:  # Split
                plan.tensors.add(extra.name)
                unions.union(inputs[0].name, extra.name)
    plan.groups = unions.groups(plan.tensors)


def _clip_lower_bound_is_zero(node: gs.Node) -> bool:
    low = G.attr(node, "min")
    if low is None and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        value = G.constant_value(node.inputs[1])
        low = None if value is None else float(value)
    return low is not None and low == 0.0
