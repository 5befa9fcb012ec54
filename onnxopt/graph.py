"""Graph plumbing shared by every pass.

Passes work on an ``onnx_graphsurgeon.Graph``. Everything they need to look up or
rewire lives here, so no pass re-implements producer/consumer look-ups, constant
access, use replacement or initializer creation.

Conventions
-----------
* ``Constant`` nodes (PaddlePaddle and some TF exports store weights that way) are
  lifted into ``gs.Constant`` tensors on import, so every pass sees them as
  initializers.  ``constant_value`` also understands a still-present Constant node.
* Graph output tensors keep their names: use :func:`bypass_node` or
  :func:`replace_tensor` and they take care of it.
* gs shares one Tensor object between a graph and the subgraphs that read it, so
  rewiring a tensor's consumers also reaches nodes inside If/Loop bodies.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .io import copy_without_initializers, iter_proto_graphs, tensor_nbytes

DEFAULT_DOMAINS = ("", "ai.onnx")

# gs warns on stdout about things passes handle on purpose; errors still show.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


# --------------------------------------------------------------------------- import / export
def import_model(model: onnx.ModelProto) -> gs.Graph:
    """ONNX model → gs.Graph with Constant nodes lifted to constants.

    Initializers that are also graph inputs in IR ≥ 4 are *overridable defaults*
    (ONNX IR spec): the caller may feed them. gs would treat them as constants and
    drop the input, so they stay graph inputs (Variables) and their default values
    are written back on export.

    The model is never modified, and its big weights are not copied: gs is given a copy
    without them and reads them lazily from ``model`` (gs's exporter writes into the
    TensorProtos it imported, so everything it does see is a private copy).
    """
    light, big = _without_big_initializers(model)
    graph = gs.import_onnx(light)
    _attach_lazy_constants(graph, big)
    _keep_overridable_initializers(graph, model)
    lift_constant_nodes(graph)
    return graph


def _without_big_initializers(model: onnx.ModelProto, min_bytes: int = 1 << 16
                              ) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of ``model`` minus its big main-graph initializers, and those initializers by name.

    Initializers listed as graph inputs (IR < 4, or overridable defaults) stay in the copy.
    """
    listed = {i.name for i in model.graph.input}
    big = {t.name: t for t in model.graph.initializer
           if t.name not in listed and t.data_location != onnx.TensorProto.EXTERNAL
           and t.data_type != onnx.TensorProto.STRING and tensor_nbytes(t) >= min_bytes}
    light = copy_without_initializers(model)
    light.graph.initializer.extend(t for t in model.graph.initializer if t.name not in big)
    return light, big


def _attach_lazy_constants(graph: gs.Graph, big: dict[str, onnx.TensorProto]) -> None:
    """Replace the placeholder Variables gs made for the withheld initializers by lazy Constants."""
    if not big:
        return
    lazy: dict[str, gs.Constant] = {}  # one Constant per withheld initializer, shared by all readers

    def constant_for(name: str) -> gs.Constant:
        if name not in lazy:
            lazy[name] = gs.Constant(name, gs.ir.tensor.LazyValues(big[name]))
        return lazy[name]

    for g in iter_graphs(graph):
        for node in g.nodes:
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Variable) and not t.inputs and t.name in big:
                    node.inputs[i] = constant_for(t.name)
    for g in iter_graphs(graph):
        for i, t in enumerate(g.outputs):
            if isinstance(t, gs.Variable) and t.name in big and not t.inputs:
                g.outputs[i] = constant_for(t.name)


OVERRIDABLE_ATTR = "onnxopt_overridable_defaults"


def _keep_overridable_initializers(graph: gs.Graph, model: onnx.ModelProto) -> None:
    if model.ir_version < 4:
        return  # before IR 4 every initializer had to be listed as an input: they are constants
    init_names = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name in init_names]
    if not names:
        return
    tensors = graph.tensors()
    defaults = {}
    for position, proto_input in enumerate(model.graph.input):
        name = proto_input.name
        if name not in names:
            continue
        const = tensors.get(name)
        values = const.values if isinstance(const, gs.Constant) else numpy_helper.to_array(
            next(t for t in model.graph.initializer if t.name == name))
        var = gs.Variable(name, dtype=values.dtype, shape=list(values.shape))
        if isinstance(const, gs.Constant):
            const.name = name + "__overridable_default"
            for node in list(const.outputs):
                for i, t in enumerate(node.inputs):
                    if t is const:
                        node.inputs[i] = var
        graph.inputs.insert(min(position, len(graph.inputs)), var)
        defaults[name] = values
    # gs.Graph.__getattr__ treats unknown attributes as function look-ups: use __dict__ directly.
    graph.__dict__[OVERRIDABLE_ATTR] = defaults


def export_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """gs.Graph → ONNX model, keeping the template's model-level metadata.

    gs forgets doc_string, domain, model_version and metadata_props; opset imports of
    domains that the graph no longer uses are kept unless ``eliminate-dead`` dropped
    them from ``graph.import_domains``.
    """
    # gs copies every initializer twice (make_graph, then make_model); big weights are added
    # afterwards with one copy each (VGG-16: 2.2 s → 0.8 s), into the main graph: subgraphs
    # may read outer-scope names, so a constant read in an If/Loop body can live there too.
    signature = {id(t) for g in iter_graphs(graph) for t in list(g.inputs) + list(g.outputs)}

    def big_weight(t: gs.Constant) -> bool:
        return (id(t) not in signature and not isinstance(t._values, gs.ir.tensor.SparseValues)
                and constant_nbytes(t) >= 1 << 16)

    with _constants_swapped(graph, big_weight, typed=False) as swapped:
        model = gs.export_onnx(graph, do_type_check=False)
    _append_initializers(model.graph, [const for const, _ in swapped])
    defaults = graph.__dict__.get(OVERRIDABLE_ATTR, {})
    input_names = {i.name for i in model.graph.input}
    for name, value in defaults.items():
        if name in input_names:
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    if template is not None:
        model.doc_string = template.doc_string
        model.domain = template.domain
        model.model_version = template.model_version
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
        if template.ir_version:
            model.ir_version = max(model.ir_version, template.ir_version) if graph.ir_version is None else graph.ir_version
        _keep_declared_opsets(model, template, graph)
    if model.ir_version < 4:
        _list_initializers_as_inputs(model.graph)
    return model


@contextlib.contextmanager
def _constants_swapped(graph: gs.Graph, wanted: Callable[[gs.Constant], bool], *, typed: bool
                       ) -> Iterator[list[tuple[gs.Constant, gs.Variable]]]:
    """While inside, nodes read a stand-in Variable (same name) instead of each ``wanted`` constant.

    Untyped stand-ins get no value_info on export; typed ones carry dtype and shape (to be
    declared as graph inputs). Yields the (constant, stand-in) pairs; the graph is restored after.
    """
    stand_ins: dict[int, tuple[gs.Constant, gs.Variable]] = {}
    moved: list[tuple[gs.Node, int, gs.Constant]] = []
    for g in iter_graphs(graph):
        for node in g.nodes:
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant) and wanted(t):
                    if id(t) not in stand_ins:
                        var = gs.Variable(t.name, dtype=t.dtype, shape=list(t.shape)) if typed else gs.Variable(t.name)
                        stand_ins[id(t)] = (t, var)
                    moved.append((node, i, t))
                    node.inputs[i] = stand_ins[id(t)][1]
    try:
        yield list(stand_ins.values())
    finally:
        for node, i, t in moved:
            node.inputs[i] = t


def _append_initializers(graph_proto: onnx.GraphProto, constants: list[gs.Constant]) -> None:
    """Write each (distinct) constant as an initializer with one protobuf copy."""
    for const in constants:
        proto = graph_proto.initializer.add()
        values = const._values
        if isinstance(values, gs.ir.tensor.LazyValues):
            proto.CopyFrom(values.tensor)  # the imported TensorProto, never modified
        else:
            proto.CopyFrom(numpy_helper.from_array(np.asarray(values), const.name))
        proto.name = const.name


def _list_initializers_as_inputs(graph_proto: onnx.GraphProto) -> None:
    """IR < 4 requires every initializer to be a graph input too (gs drops them on import).

    gs writes a constant that only a subgraph reads into that subgraph; an If branch may not
    have inputs, so such initializers move up to the main graph (outer-scope reads are legal).
    """
    have = {t.name for t in graph_proto.initializer}

    def hoist(g: onnx.GraphProto) -> None:
        for node in g.node:
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    kept = []
                    for t in sub.initializer:
                        if t.name not in have:
                            have.add(t.name)
                            graph_proto.initializer.append(t)
                        else:
                            kept.append(t)  # a name clash: leave it where it is
                    del sub.initializer[:]
                    sub.initializer.extend(kept)
                    hoist(sub)

    hoist(graph_proto)
    listed = {i.name for i in graph_proto.input}
    for t in graph_proto.initializer:
        if t.name not in listed:
            graph_proto.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _keep_declared_opsets(model: onnx.ModelProto, template: onnx.ModelProto, graph: gs.Graph) -> None:
    """Keep the template's opset versions; add domains the graph imports or uses."""
    declared = {o.domain: o.version for o in template.opset_import}
    if graph.import_domains is not None:
        keep = {o.domain: o.version for o in graph.import_domains}
        declared = {d: v for d, v in declared.items() if d in keep or d in DEFAULT_DOMAINS}
        for d, v in keep.items():
            declared.setdefault(d, v)
    if "" in declared:
        declared[""] = graph.opset
    for o in model.opset_import:
        declared.setdefault(o.domain, o.version)
    del model.opset_import[:]
    for d, v in declared.items():
        model.opset_import.append(onnx.helper.make_opsetid(d, v))


def declare_opset(graph: gs.Graph, domain: str, version: int) -> None:
    """Make sure the exported model imports ``domain`` (at ``version`` unless already declared).

    For passes that emit custom-domain ops (e.g. ``com.microsoft``): the export keeps the
    domains of ``graph.import_domains``, so the import survives passes that prune unused ones.
    """
    if graph.import_domains is None:
        graph.import_domains = [onnx.helper.make_opsetid("", graph.opset)]
    if not any(o.domain == domain for o in graph.import_domains):
        graph.import_domains.append(onnx.helper.make_opsetid(domain, version))


# --------------------------------------------------------------------------- traversal
# Standard ops that carry graph attributes; custom-domain ops are inspected too.
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_PLAIN_DOMAINS = frozenset(DEFAULT_DOMAINS + (None,))


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and, recursively, every subgraph (If branches, Loop/Scan bodies), parents first.

    Iterative, with the per-node test inlined: passes call this for every rewrite.
    """
    pending = [graph]
    while pending:
        g = pending.pop()
        yield g
        found = [sub for node in g.nodes
                 if node.op in _SUBGRAPH_OPS or node.domain not in _PLAIN_DOMAINS
                 for sub in node_subgraphs(node)]
        pending.extend(reversed(found))


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    if node.op not in _SUBGRAPH_OPS and node.domain in _PLAIN_DOMAINS:
        return []  # fast path: this runs for every node of every traversal
    subs = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            subs.append(value)
        elif isinstance(value, (list, tuple)):
            subs.extend(v for v in value if isinstance(v, gs.Graph))
    return subs


def has_subgraph(node: gs.Node) -> bool:
    return bool(node_subgraphs(node))


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that produces ``tensor`` (None for graph inputs and constants)."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for g in iter_graphs(graph) for t in g.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for g in iter_graphs(graph) for t in g.inputs)


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in DEFAULT_DOMAINS or node.domain is None


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


# --------------------------------------------------------------------------- constants
def is_constant(tensor: gs.Tensor | None) -> bool:
    return constant_value(tensor) is not None


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The numpy value of a constant tensor (initializer or Constant-node output), else None."""
    if tensor is None or (isinstance(tensor, gs.Variable) and tensor.name == "" and not tensor.inputs):
        return None
    if isinstance(tensor, gs.Constant):
        try:
            return tensor.values
        except Exception:  # sparse or unloadable external data
            return None
    node = producer(tensor)
    if node is not None and node.op == "Constant" and is_default_domain(node):
        return _constant_node_value(node)
    return None


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    a = node.attrs
    if "value" in a:
        v = a["value"]
        if isinstance(v, gs.Constant):
            return v.values
        if isinstance(v, onnx.TensorProto):
            return numpy_helper.to_array(v)
        return np.asarray(v)
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    return None  # sparse_value / value_string(s): leave as a node


def lift_constant_nodes(graph: gs.Graph) -> int:
    """Turn every Constant node into a gs.Constant initializer, in every subgraph. Returns the count."""
    lifted = 0
    graphs = list(iter_graphs(graph))
    outputs = {id(t) for g in graphs for t in g.outputs}  # once: Paddle exports have thousands of Constants
    for g in graphs:
        kept = []
        for node in g.nodes:
            value = None
            if node.op == "Constant" and is_default_domain(node) and len(node.outputs) == 1 \
                    and id(node.outputs[0]) not in outputs:  # a graph output made by a Constant stays a node
                value = _constant_node_value(node)
            if value is None:
                kept.append(node)
                continue
            out = node.outputs[0]
            const = gs.Constant(out.name, np.asarray(value))
            out.name = out.name + "__lifted_constant_node"
            replace_uses(out, const)
            node.outputs.clear()
            lifted += 1
        if len(kept) != len(g.nodes):
            g.nodes = kept
    return lifted


def add_constant(graph: gs.Graph, name_hint: str, value: np.ndarray) -> gs.Constant:
    """A new initializer tensor with a unique name (attach it by using it as a node input)."""
    # np.asarray(order="C"), not np.ascontiguousarray: the latter turns a 0-d scalar into shape (1,).
    return gs.Constant(unique_name(graph, name_hint), np.asarray(value, order="C"))


# --------------------------------------------------------------------------- names
def unique_name(graph: gs.Graph, hint: str) -> str:
    taken = _taken_names(graph)
    if hint not in taken:
        return hint
    for i in itertools.count(1):
        cand = f"{hint}_{i}"
        if cand not in taken:
            return cand
    raise AssertionError


def _taken_names(graph: gs.Graph) -> set[str]:
    names: set[str] = set()
    for g in iter_graphs(graph):
        names.update(g.tensors().keys())
        names.update(n.name for n in g.nodes if n.name)
    return names


class NameAllocator:
    """Unique names for a pass that creates many tensors or nodes: scans the graph once.

    :func:`unique_name` rescans every graph per call (O(graph)); a pass adding hundreds of
    constants makes one allocator per run and creates all its new names through it.
    """

    def __init__(self, graph: gs.Graph):
        self._taken = _taken_names(graph)

    def __call__(self, hint: str) -> str:
        name = hint
        for i in itertools.count(1):
            if name not in self._taken:
                break
            name = f"{hint}_{i}"
        self._taken.add(name)
        return name

    def constant(self, hint: str, value: np.ndarray) -> gs.Constant:
        """Like :func:`add_constant`, named by this allocator."""
        return gs.Constant(self(hint), np.asarray(value, order="C"))  # keeps 0-d scalars 0-d


def make_node(graph: gs.Graph, op: str, inputs: list, outputs: list, attrs: dict | None = None,
              name_hint: str | None = None, domain: str | None = None) -> gs.Node:
    """Create a node, give it a unique name and append it to ``graph.nodes`` (toposort fixes order)."""
    node = gs.Node(op=op, name=unique_name(graph, name_hint or op), attrs=attrs or {},
                   inputs=list(inputs), outputs=list(outputs), domain=domain)
    graph.nodes.append(node)
    return node


# --------------------------------------------------------------------------- rewiring
def replace_tensor(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor, *, keep_output_name: bool = True) -> None:
    """Make every consumer of ``old`` read ``new`` instead (subgraphs included).

    If ``old`` is a graph output, ``new`` takes its place in the output list; with
    ``keep_output_name`` the output keeps its public name (``new`` is renamed, and a
    constant output is emitted through an Identity so the graph stays valid).
    """
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
    for g in iter_graphs(graph):
        for i, t in enumerate(g.outputs):
            if t is old:
                if keep_output_name:
                    name, dtype, shape = old.name, old.dtype, old.shape
                    if isinstance(new, gs.Constant) or is_graph_input(graph, new) or is_graph_output(graph, new):
                        out = gs.Variable(name, dtype=dtype, shape=shape)
                        old.name = unique_name(graph, name + "_replaced")
                        g.nodes.append(gs.Node("Identity", name=unique_name(graph, name + "_Identity"), inputs=[new], outputs=[out]))
                        g.outputs[i] = out
                        continue
                    old.name = unique_name(graph, name + "_replaced")
                    new.name = name
                    if new.dtype is None:
                        new.dtype = dtype
                    if new.shape is None:
                        new.shape = shape
                g.outputs[i] = new


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` instead (subgraphs included).

    The O(uses) half of :func:`replace_tensor`, without the graph-output handling, for
    passes that rewire many tensors they know are not graph outputs (``replace_tensor``
    scans every graph's output list, which is O(graph) per call).
    """
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new


def bypass_node(graph: gs.Graph, node: gs.Node, input_index: int = 0, output_index: int = 0) -> None:
    """Remove a pass-through node: its output's readers read ``node.inputs[input_index]`` instead."""
    src = node.inputs[input_index]
    dst = node.outputs[output_index]
    replace_tensor(graph, dst, src)
    node.inputs.clear()
    node.outputs.clear()
    _detach_from_owner(graph, node)


def owning_graph(graph: gs.Graph, node: gs.Node) -> gs.Graph | None:
    if any(n is node for n in graph.nodes):  # the common case, without walking subgraphs
        return graph
    for g in iter_graphs(graph):
        if any(n is node for n in g.nodes):
            return g
    return None


def _detach_from_owner(graph: gs.Graph, node: gs.Node) -> None:
    # By identity: list.remove would call gs.Node.__eq__, which compares whole nodes.
    owner = owning_graph(graph, node)
    if owner is not None:
        for i, n in enumerate(owner.nodes):
            if n is node:
                del owner.nodes[i]
                break


def remove_nodes(graph: gs.Graph, nodes: Iterable[gs.Node]) -> None:
    """Detach and drop many nodes at once: one sweep over the graph, not one per node."""
    doomed = {id(n): n for n in nodes}
    for node in doomed.values():
        node.inputs.clear()
        node.outputs.clear()
    if doomed:
        for g in iter_graphs(graph):
            g.nodes = [n for n in g.nodes if id(n) not in doomed]


# --------------------------------------------------------------------------- shapes
def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The tensor's shape if every dimension is a known int, else None."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    shape = tensor.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def constant_nbytes(tensor: gs.Constant) -> int:
    """Payload size of a constant from its shape and dtype, without loading lazy values."""
    try:
        itemsize = np.dtype(tensor.dtype).itemsize
    except TypeError:
        itemsize = 4
    return int(np.prod(tensor.shape, dtype=np.int64)) * itemsize if tensor.shape is not None else 0


def export_skeleton(graph: gs.Graph, template: onnx.ModelProto | None = None,
                    payload_limit: int = 1024) -> onnx.ModelProto:
    """Export for analysis (shape inference): constants over ``payload_limit`` bytes become
    typed main-graph inputs, so no weight bytes are copied (exporting a 500 MB VGG-16 with
    its weights costs seconds in protobuf copies). Only small integer tensors matter to
    data propagation. The graph is restored before returning.
    """
    with _constants_swapped(graph, lambda t: constant_nbytes(t) > payload_limit, typed=True) as swapped:
        original_inputs = list(graph.inputs)
        graph.inputs.extend(var for _, var in swapped)
        try:
            return export_model(graph, template)
        finally:
            graph.inputs[:] = original_inputs


def inferred_shapes(graph: gs.Graph, template: onnx.ModelProto | None = None,
                    payload_limit: int = 1024) -> dict[str, list[int | str | None]]:
    """Tensor name → dims (int, dim_param string or None) found by ONNX shape inference
    (tensors of known rank only; see :func:`inferred_types`)."""
    return {name: dims for name, (_, dims) in inferred_types(graph, template, payload_limit).items()
            if dims is not None}


def inferred_types(graph: gs.Graph, template: onnx.ModelProto | None = None, payload_limit: int = 1024,
                   input_shapes: dict[str, tuple[int, ...]] | None = None
                   ) -> dict[str, tuple[int, list[int | str | None] | None]]:
    """Tensor name → (ONNX elem type, 0 if unknown; dims, None if the rank is unknown) found
    by ONNX shape inference, with the graph inputs named in ``input_shapes`` fixed to those
    shapes (so a dynamic batch becomes a number in every tensor it flows into).

    Inference runs on a payload-free copy (:func:`export_skeleton`): constants over
    ``payload_limit`` bytes become typed graph inputs (only small integer tensors matter
    to data propagation), so a 100 MB
    model costs one export instead of serialising every weight into the C++ checker.
    Returns an empty dict when inference fails (custom ops with strict checks, >2 GB).
    """
    model = export_skeleton(graph, template, payload_limit)
    for vi in model.graph.input:
        if input_shapes and vi.name in input_shapes and vi.type.HasField("tensor_type"):
            shape = vi.type.tensor_type.shape
            shape.Clear()
            for size in input_shapes[vi.name]:
                shape.dim.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return {}
    types: dict[str, tuple[int, list[int | str | None] | None]] = {}
    ambiguous: set[str] = set()  # one name, different types (sibling subgraphs may reuse names)

    for g in iter_proto_graphs(inferred.graph):
        for vi in itertools.chain(g.input, g.output, g.value_info):
            tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
            if tt is not None and (tt.elem_type or tt.HasField("shape")):
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim] \
                    if tt.HasField("shape") else None
                if types.setdefault(vi.name, (tt.elem_type, dims)) != (tt.elem_type, dims):
                    ambiguous.add(vi.name)
    for name in ambiguous:
        del types[name]
    return types


def node_count(graph: gs.Graph, recurse: bool = True) -> int:
    graphs: Iterable[gs.Graph] = iter_graphs(graph) if recurse else [graph]
    return sum(len(g.nodes) for g in graphs)
