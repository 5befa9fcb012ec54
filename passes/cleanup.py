"""Lossless cleanup: dead-code elimination and removal of no-op nodes.

* ``eliminate-dead`` removes what cannot reach a graph output: dead nodes, unused
  initializers, unused optional node outputs, opset imports of custom domains no node
  uses, and If nodes whose condition is a constant (the taken branch is inlined).
* ``eliminate-identity`` removes nodes that compute their input unchanged: Identity,
  inference Dropout, Cast to the same type, Reshape/Expand/Squeeze/... to the same
  shape, Transpose with the identity permutation, zero Pad, full Slice, one-input
  Concat, one-output Split, and x+0, x-0, x*1, x/1 when the constant does not
  broadcast the output to a bigger shape.

Both keep the model signature: real graph inputs stay even when unused, and graph
outputs keep their names (``graph.bypass_node`` / ``graph.replace_tensor``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import chain
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.pass_base import Pass, PassResult
from onnxopt.registry import register_pass

# Slice ends at or beyond this are "to the end" for any dimension exporters produce
# (PyTorch writes INT64_MAX, TF and Keras INT32_MAX).
SLICE_TO_END = 2**31 - 1


# =========================================================================== shared helpers
def dropout_is_inference(node: gs.Node, opset: int) -> bool:
    """Whether a Dropout node passes its input through unchanged (ONNX Dropout spec).

    Opset < 7: only with ``is_test=1``.  Opsets 7–11 have no training switch (inference
    only).  Opset >= 12: the optional ``training_mode`` input must be absent or a constant
    false; ``ratio`` is then irrelevant.
    """
    if opset < 7:
        return G.attr(node, "is_test", 0) == 1
    if opset >= 12 and len(node.inputs) >= 3 and not node.inputs[2].is_empty():
        mode = G.constant_value(node.inputs[2])
        return mode is not None and mode.size == 1 and not bool(np.asarray(mode).reshape(-1)[0])
    return True


def onnx_dtype(dtype) -> int | None:
    """A gs/numpy dtype as an ONNX TensorProto element type, None when unknown."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (TypeError, ValueError, KeyError):
        return None


class TensorTypes:
    """Element types and shapes of every tensor, from ONNX shape inference.

    Exported models rarely carry value_info for intermediates, so the pass exports the
    graph, runs ``onnx.shape_inference`` (with data propagation, so a Reshape whose shape
    comes from Shape/Gather still gets a static output shape) and maps the result back to
    the gs tensor objects scope by scope (If/Loop bodies included). Tensors created later
    fall back to what gs knows about them.
    """

    def __init__(self, graph: gs.Graph, template: onnx.ModelProto | None = None, infer: bool = True):
        # id(tensor) -> (tensor, elem_type, shape); the tensor is kept so its id stays unique.
        self._table: dict[int, tuple[gs.Tensor, int | None, tuple | None]] = {}
        if not infer:
            return
        try:
            # weights become typed inputs: inference needs their shapes, not their bytes
            model = G.export_skeleton(graph, template)
        except Exception:  # a graph gs cannot export yet: go without inferred types
            return
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # custom ops or an inconsistent model: keep declared types only
            pass
        self._collect(graph, model.graph, {})

    def _collect(self, g: gs.Graph, proto: onnx.GraphProto, outer: dict) -> None:
        scope = dict(outer)
        for info in chain(proto.input, proto.output, proto.value_info):
            scope[info.name] = _value_info_type(info)
        for t in proto.initializer:
            scope[t.name] = (t.data_type, tuple(t.dims))
        for t in _graph_tensors(g):
            if t.name in scope:
                self._table[id(t)] = (t, *scope[t.name])
        if len(proto.node) != len(g.nodes):
            return
        for node, pnode in zip(g.nodes, proto.node):
            pattrs = {a.name: a for a in pnode.attribute}
            for name, value in node.attrs.items():
                if name not in pattrs:
                    continue
                if isinstance(value, gs.Graph):
                    self._collect(value, pattrs[name].g, scope)
                elif isinstance(value, (list, tuple)) and value and all(isinstance(v, gs.Graph) for v in value):
                    for sub, psub in zip(value, pattrs[name].graphs):
                        self._collect(sub, psub, scope)

    def elem_type(self, t: gs.Tensor) -> int | None:
        if isinstance(t, gs.Constant):
            return onnx_dtype(t.dtype)
        entry = self._table.get(id(t))
        if entry is not None and entry[1]:
            return entry[1]
        return onnx_dtype(t.dtype)

    def shape(self, t: gs.Tensor) -> tuple | None:
        """The shape with ints for known dims and str/None for unknown ones; None if the rank is unknown."""
        if isinstance(t, gs.Constant):
            return tuple(t.shape)
        entry = self._table.get(id(t))
        if entry is not None and entry[2] is not None:
            return entry[2]
        if t.shape is None:
            return None
        return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else (d or None) for d in t.shape)

    def static_shape(self, t: gs.Tensor) -> tuple[int, ...] | None:
        shape = self.shape(t)
        if shape is None or any(not isinstance(d, int) for d in shape):
            return None
        return shape


def _value_info_type(info: onnx.ValueInfoProto) -> tuple[int | None, tuple | None]:
    if not info.type.HasField("tensor_type"):
        return None, None
    tt = info.type.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type or None, None
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return tt.elem_type or None, dims


def _graph_tensors(g: gs.Graph) -> Iterator[gs.Tensor]:
    """Every tensor a graph's nodes and signature touch (outer-scope ones included)."""
    yield from g.inputs
    yield from g.outputs
    for node in g.nodes:
        yield from node.inputs
        yield from node.outputs


def safe_to_bypass(root: gs.Graph, owner: gs.Graph, src: gs.Tensor, dst: gs.Tensor) -> bool:
    """Whether readers of ``dst`` may read ``src`` instead without changing the signature.

    When ``dst`` is a graph output, bypassing renames ``src`` to the public name; that is
    only clean when ``src`` is a plain intermediate of the same graph. Otherwise
    ``replace_tensor`` would have to add an Identity back (or rename an outer-scope
    tensor), so the node is left alone.
    """
    if not G.is_graph_output(root, dst):
        return True
    if not any(t is dst for t in owner.outputs):
        return False
    if isinstance(src, gs.Constant) or src.is_empty():
        return False
    if G.is_graph_input(root, src) or G.is_graph_output(root, src):
        return False
    prod = G.producer(src)
    return prod is not None and any(n is prod for n in owner.nodes)


def _remove_by_identity(nodes: list, node: gs.Node) -> None:
    for i, n in enumerate(nodes):
        if n is node:
            del nodes[i]
            return


# =========================================================================== eliminate-dead
@register_pass
class EliminateDead(Pass):
    name = "eliminate-dead"
    summary = "Remove dead nodes, unused initializers, optional outputs and opset imports; inline If with a constant condition."
    lossless = True

    @dataclass
    class Options:
        # Replace an If whose condition is a constant by the nodes of the taken branch.
        inline_constant_if: bool = True
        # Drop trailing optional outputs nobody reads (Dropout mask, MaxPool indices, ...).
        drop_optional_outputs: bool = True
        # Drop opset imports of non-default domains that no node uses.
        drop_unused_domains: bool = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        counters: Counter = Counter()
        notes: list[str] = []
        opts = self.options
        constants_before = _used_constants(graph)

        if opts.inline_constant_if:
            counters["if_inlined"] = inline_constant_ifs(graph, notes)

        before = G.node_count(graph)
        graph.cleanup(remove_unused_graph_inputs=False)
        counters["nodes_removed"] = before - G.node_count(graph)

        counters["constant_inputs_removed"] = _remove_unused_constant_inputs(graph)
        if opts.drop_optional_outputs:
            counters["outputs_dropped"] = _drop_unused_optional_outputs(graph)
        if opts.drop_unused_domains:
            dropped = _drop_unused_domains(graph, ctx.template if ctx is not None else None)
            counters["domains_removed"] = len(dropped)
            notes.extend(f"dropped unused opset import '{d}'" for d in dropped)

        # Initializers are gs.Constant objects reachable from nodes; count the ones that went away.
        counters["initializers_removed"] = len(constants_before - _used_constants(graph))
        return PassResult(any(counters.values()), {k: v for k, v in counters.items() if v}, notes)


def _used_constants(graph: gs.Graph) -> set[int]:
    return {id(t) for g in G.iter_graphs(graph) for n in g.nodes for t in n.inputs if isinstance(t, gs.Constant)}


def _remove_unused_constant_inputs(graph: gs.Graph) -> int:
    """Drop initializers listed as inputs of the main graph (IR < 4 style) that nothing reads.

    Real inputs (gs.Variable) always stay: the model signature must not change. Subgraph
    inputs are formal parameters (Loop/Scan bodies) and are never touched.
    """
    keep = [t for t in graph.inputs if not (isinstance(t, gs.Constant) and not t.outputs and not G.is_graph_output(graph, t))]
    removed = len(graph.inputs) - len(keep)
    if removed:
        graph.inputs = keep
    return removed


def _drop_unused_optional_outputs(graph: gs.Graph) -> int:
    """Drop trailing node outputs that nobody reads where the op's schema marks them optional.

    Only trailing outputs are dropped: an omitted middle output would need an empty name,
    and the ONNX schema (not a hand-kept list) decides what is optional for the model's
    opset, e.g. Dropout's mask, MaxPool's Indices, BatchNormalization's running statistics,
    LayerNormalization's Mean/InvStdDev.
    """
    dropped = 0
    for g in G.iter_graphs(graph):
        for node in g.nodes:
            if not G.is_default_domain(node) or len(node.outputs) < 2:
                continue
            optional = _optional_output_indices(node.op, graph.opset)
            while len(node.outputs) > 1:
                idx = len(node.outputs) - 1
                out = node.outputs[idx]
                unused = out.is_empty() or (not out.outputs and not G.is_graph_output(graph, out))
                if idx not in optional or not unused:
                    break
                node.outputs.pop()
                dropped += 0 if out.is_empty() else 1
    return dropped


_OPTIONAL_OUTPUTS_CACHE: dict[tuple[str, int], frozenset[int]] = {}


def _optional_output_indices(op: str, opset: int) -> frozenset[int]:
    key = (op, opset)
    if key not in _OPTIONAL_OUTPUTS_CACHE:
        try:
            schema = onnx.defs.get_schema(op, opset, "")
        except Exception:  # op unknown to this onnx version
            schema = None
        optional = onnx.defs.OpSchema.FormalParameterOption.Optional
        _OPTIONAL_OUTPUTS_CACHE[key] = frozenset(
            i for i, p in enumerate(schema.outputs) if p.option == optional) if schema else frozenset()
    return _OPTIONAL_OUTPUTS_CACHE[key]


def _drop_unused_domains(graph: gs.Graph, template: onnx.ModelProto | None) -> list[str]:
    """Remove opset imports of non-default domains that no node (or local function) uses."""
    current = graph.import_domains
    if current is None:
        if template is None:
            return []
        current = list(template.opset_import)
    used = set()
    functions = list(getattr(graph, "functions", []) or [])
    for root in [graph, *functions]:
        for g in G.iter_graphs(root):
            used.update(n.domain or "" for n in g.nodes)
    used.update(f.domain for f in functions)
    keep = [o for o in current if o.domain in G.DEFAULT_DOMAINS or o.domain in used]
    dropped = [o.domain for o in current if not (o.domain in G.DEFAULT_DOMAINS or o.domain in used)]
    if dropped or graph.import_domains is None:
        graph.import_domains = keep
    return dropped


# --------------------------------------------------------------------------- constant If
def inline_constant_ifs(graph: gs.Graph, notes: list[str]) -> int:
    """Replace every If whose condition is a constant by the taken branch; returns the count.

    Runs until no such If is left, so an If nested in an inlined branch is inlined too.
    """
    inlined = 0
    while True:
        found = _find_constant_if(graph)
        if found is None:
            return inlined
        owner, node, branch = found
        _inline_branch(graph, owner, node, branch)
        notes.append(f"If '{node.name}': condition is constant, inlined its {branch.name or 'taken'} branch")
        inlined += 1


def _find_constant_if(graph: gs.Graph):
    for g in G.iter_graphs(graph):
        for node in g.nodes:
            if node.op != "If" or not G.is_default_domain(node) or not node.inputs:
                continue
            cond = G.constant_value(node.inputs[0])
            if cond is None or np.asarray(cond).size != 1:
                continue
            taken = bool(np.asarray(cond).reshape(-1)[0])
            branch = node.attrs.get("then_branch" if taken else "else_branch")
            if isinstance(branch, gs.Graph) and len(branch.outputs) == len(node.outputs):
                return g, node, branch
    return None


def _inline_branch(root: gs.Graph, owner: gs.Graph, node: gs.Node, branch: gs.Graph) -> None:
    """Move ``branch``'s nodes into ``owner`` in place of the If ``node``.

    The branch's own tensors and nodes are renamed when their names are taken elsewhere
    in the model (branch names live in their own scope until now). Each If output keeps
    its tensor object, and so its name: the branch node that computed the branch output
    now writes the If output directly; a branch output that is an outer-scope tensor or
    a constant is passed on through an Identity (``eliminate-identity`` removes it where
    it can).
    """
    outside_graphs = list(_graphs_outside(root, node))
    outside_ids = {id(t) for g in outside_graphs for t in _graph_tensors(g)}
    outside_names = {t.name for g in outside_graphs for t in _graph_tensors(g)}
    outside_node_names = {n.name for g in outside_graphs for n in g.nodes if n.name}

    branch_graphs = list(G.iter_graphs(branch))
    for sub in branch_graphs:
        for t in _graph_tensors(sub):
            if id(t) not in outside_ids and not t.is_empty() and t.name in outside_names:
                t.name = G.unique_name(root, t.name)
        for n in sub.nodes:
            if n.name and n.name in outside_node_names:
                n.name = G.unique_name(root, n.name)

    pairs = list(zip(list(node.outputs), list(branch.outputs)))
    moved = list(branch.nodes)
    moved_ids = {id(n) for n in moved}
    node.inputs.clear()
    node.outputs.clear()
    _remove_by_identity(owner.nodes, node)
    branch.nodes.clear()
    branch.outputs.clear()
    owner.nodes.extend(moved)

    taken_over: dict[int, gs.Tensor] = {}  # id(branch output) -> the If output that replaced it
    for if_out, br_out in pairs:
        prod = G.producer(br_out)
        if prod is not None and id(prod) in moved_ids and id(br_out) not in taken_over:
            taken_over[id(br_out)] = if_out
            # The branch's readers of br_out read the If output instead; its producer writes it.
            G.replace_tensor(root, br_out, if_out, keep_output_name=False)
            idx = next(i for i, t in enumerate(prod.outputs) if t is br_out)
            prod.outputs[idx] = if_out
            if if_out.dtype is None:
                if_out.dtype = br_out.dtype
        else:
            # Outer-scope value, constant, or a branch output listed twice.
            src = taken_over.get(id(br_out), br_out)
            owner.nodes.append(gs.Node("Identity", name=G.unique_name(root, (node.name or "If") + "_out"),
                                       inputs=[src], outputs=[if_out]))


def _graphs_outside(root: gs.Graph, skip: gs.Node) -> Iterator[gs.Graph]:
    """Every graph of the model except the subgraphs of ``skip``."""
    yield root
    for node in root.nodes:
        if node is skip:
            continue
        for sub in G.node_subgraphs(node):
            yield from _graphs_outside(sub, skip)


# =========================================================================== eliminate-identity
# Ops whose output equals their input whenever the static output shape equals the static
# input shape: they only regroup dimensions (or broadcast) and never reorder elements.
_SHAPE_ONLY_OPS = {"Reshape", "Expand", "Squeeze", "Unsqueeze", "Flatten", "Tile"}
# Variadic ops that return their single input unchanged.
_ONE_INPUT_OPS = {"Concat", "Sum", "Mean", "Max", "Min"}
# Binary ops with a neutral right operand; Add and Mul are commutative.
_NEUTRAL = {"Add": 0, "Sub": 0, "Mul": 1, "Div": 1}
_COMMUTATIVE = {"Add", "Mul"}


@register_pass
class EliminateIdentity(Pass):
    name = "eliminate-identity"
    summary = "Remove no-op nodes: Identity, inference Dropout, same-type Cast, same-shape Reshape, x+0, x*1, ..."
    lossless = True

    @dataclass
    class Options:
        # Run ONNX shape inference to learn dtypes and shapes (needed for Cast, Reshape, x+0, ...).
        infer_shapes: bool = True
        # Remove x+0, x-0, x*1, x/1 when the constant does not broadcast the result.
        arithmetic: bool = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        template = ctx.template if ctx is not None else None
        types = TensorTypes(graph, template, infer=self.options.infer_shapes)
        removed: Counter = Counter()
        identities = 0
        for g in list(G.iter_graphs(graph)):
            for node in list(g.nodes):
                if not node.outputs or not G.is_default_domain(node):
                    continue  # already removed, or a custom op that must pass through
                found = self._passthrough_input(graph, node, types)
                if found is None:
                    continue
                bypass = safe_to_bypass(graph, g, node.inputs[found], node.outputs[0])
                if not bypass and node.op == "Identity":
                    continue  # already the cheapest way to pass a tensor on
                if node.op == "Dropout" and not _settle_dropout_mask(graph, node, types):
                    continue
                removed[node.op] += 1
                if bypass:
                    G.bypass_node(graph, node, input_index=found, output_index=0)
                else:
                    # The output must stay a distinct tensor (a graph output fed by a graph
                    # input, a constant or an outer-scope value): pass it on with an Identity.
                    _turn_into_identity(node, found)
                    identities += 1
        counters = {f"removed_{op}": n for op, n in sorted(removed.items())}
        if removed:
            counters["nodes_removed"] = sum(removed.values()) - identities
        if identities:
            counters["identities_added"] = identities
        return PassResult(bool(removed), counters)

    def _passthrough_input(self, graph: gs.Graph, node: gs.Node, types: TensorTypes) -> int | None:
        """The index of the input that ``node`` passes through unchanged, or None."""
        op, ins, outs = node.op, node.inputs, node.outputs
        if not ins or ins[0].is_empty() or len(outs) < 1:
            return None
        if op == "Identity":
            return 0
        if op == "Dropout":
            return 0 if dropout_is_inference(node, graph.opset) else None
        if op in _ONE_INPUT_OPS:
            return 0 if len(ins) == 1 and len(outs) == 1 else None
        if op == "Split":
            return 0 if len(outs) == 1 else None
        if len(outs) != 1:
            return None
        if op == "Cast":
            src = types.elem_type(ins[0])
            return 0 if src is not None and src == G.attr(node, "to") else None
        if op == "CastLike":
            src, like = types.elem_type(ins[0]), types.elem_type(ins[1]) if len(ins) > 1 else None
            return 0 if src is not None and src == like else None
        if op == "Transpose":
            return 0 if _identity_transpose(node, types) else None
        if op == "Pad":
            return 0 if _zero_pad(node, graph.opset) else None
        if op == "Slice":
            return 0 if _full_slice(node, graph.opset, types) else None
        if op in _SHAPE_ONLY_OPS:
            return 0 if _same_static_shape(node, types) else None
        if op in _NEUTRAL and self.options.arithmetic:
            return _neutral_operand_bypass(node, types)
        return None


def _turn_into_identity(node: gs.Node, input_index: int) -> None:
    """Rewrite a pass-through node in place as Identity(input) → its first output."""
    src = node.inputs[input_index]
    node.inputs.clear()
    node.inputs.append(src)
    while len(node.outputs) > 1:
        node.outputs.pop()
    node.op = "Identity"
    node.attrs.clear()


def _settle_dropout_mask(graph: gs.Graph, node: gs.Node, types: TensorTypes) -> bool:
    """Make a Dropout's mask output removable; False when it must stay.

    In inference the mask is all true (ONNX Dropout-10+: ``mask`` is bool). A read mask is
    replaced by a constant when its shape is static; otherwise the node stays.
    """
    if len(node.outputs) < 2:
        return True
    mask = node.outputs[1]
    if mask.is_empty() or (not mask.outputs and not G.is_graph_output(graph, mask)):
        return True
    if graph.opset < 10:
        return False  # before opset 10 the mask had the data's float type; rare, keep it
    shape = types.static_shape(mask) or types.static_shape(node.inputs[0])
    if shape is None:
        return False
    const = G.add_constant(graph, mask.name + "_inference", np.ones(shape, dtype=np.bool_))
    G.replace_tensor(graph, mask, const)
    return True


def _identity_transpose(node: gs.Node, types: TensorTypes) -> bool:
    perm = G.attr(node, "perm")
    if perm is None:  # default perm reverses the axes: identity only for rank <= 1
        shape = types.shape(node.inputs[0])
        return shape is not None and len(shape) <= 1
    return list(perm) == list(range(len(perm)))


def _zero_pad(node: gs.Node, opset: int) -> bool:
    """All pads zero: the output equals the input whatever the mode (ONNX Pad)."""
    if opset < 11:
        pads = G.attr(node, "pads")
    else:
        pads = G.constant_value(node.inputs[1]) if len(node.inputs) > 1 and not node.inputs[1].is_empty() else None
    return pads is not None and not np.any(np.asarray(pads))


def _full_slice(node: gs.Node, opset: int, types: TensorTypes) -> bool:
    """Slice that keeps every element in order: steps 1, starts at 0, ends at or past the end."""
    ins = node.inputs
    if opset < 10:
        starts, ends, axes, steps = G.attr(node, "starts"), G.attr(node, "ends"), G.attr(node, "axes"), None
    else:
        def opt(i):
            return G.constant_value(ins[i]) if len(ins) > i and not ins[i].is_empty() else None

        if len(ins) < 3:
            return False
        starts, ends = G.constant_value(ins[1]), G.constant_value(ins[2])
        axes, steps = opt(3), opt(4)
        if (len(ins) > 3 and not ins[3].is_empty() and axes is None) or (len(ins) > 4 and not ins[4].is_empty() and steps is None):
            return False  # axes or steps computed at run time
    if starts is None or ends is None:
        return False
    starts, ends = np.asarray(starts).reshape(-1).tolist(), np.asarray(ends).reshape(-1).tolist()
    axes = list(range(len(starts))) if axes is None else np.asarray(axes).reshape(-1).tolist()
    steps = [1] * len(starts) if steps is None else np.asarray(steps).reshape(-1).tolist()
    if not (len(starts) == len(ends) == len(axes) == len(steps)):
        return False
    shape = types.shape(ins[0])
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step != 1:
            return False
        dim = None
        if shape is not None and -len(shape) <= axis < len(shape):
            dim = shape[axis]
        if isinstance(dim, int):
            # ONNX Slice: negative indices count from the end, then clamp to [0, dim].
            start = min(max(start + dim if start < 0 else start, 0), dim)
            end = min(max(end + dim if end < 0 else end, 0), dim)
            if start != 0 or end != dim:
                return False
        elif not (start == 0 or start <= -SLICE_TO_END) or end < SLICE_TO_END:
            return False  # unknown dim: only 'from the start to the end' is certain
    return True


def _same_static_shape(node: gs.Node, types: TensorTypes) -> bool:
    op, ins = node.op, node.inputs
    if op == "Tile" and len(ins) > 1:
        repeats = G.constant_value(ins[1])
        if repeats is not None and np.all(np.asarray(repeats) == 1):
            return True
    if op == "Flatten":
        shape = types.shape(ins[0])
        if shape is not None and len(shape) == 2 and G.attr(node, "axis", 1) in (1, -1):
            return True
    src, dst = types.static_shape(ins[0]), types.static_shape(node.outputs[0])
    return src is not None and src == dst


def _neutral_operand_bypass(node: gs.Node, types: TensorTypes) -> int | None:
    """For x+0, 0+x, x-0, x*1, 1*x, x/1: the index of x, if the result has x's shape and dtype."""
    if len(node.inputs) != 2:
        return None
    neutral = _NEUTRAL[node.op]
    positions = (1, 0) if node.op in _COMMUTATIVE else (1,)
    for const_index in positions:
        x, c = node.inputs[1 - const_index], node.inputs[const_index]
        value = G.constant_value(c)
        if value is None or G.is_constant(x) or value.dtype.kind not in "fiu":
            continue
        if not np.all(value == neutral):
            continue
        x_shape = types.shape(x)
        if x_shape is None or not _broadcast_keeps_shape(x_shape, value.shape):
            continue
        x_type = types.elem_type(x)
        if x_type is not None and x_type != onnx_dtype(value.dtype):
            continue
        return 1 - const_index
    return None


def _broadcast_keeps_shape(x_shape: tuple, c_shape: tuple) -> bool:
    """Numpy-style broadcasting of x with c gives exactly x's shape (ONNX Broadcasting.md)."""
    if len(c_shape) > len(x_shape):
        return False
    for c_dim, x_dim in zip(reversed(c_shape), reversed(x_shape)):
        if c_dim != 1 and c_dim != x_dim:
            return False
    return True
