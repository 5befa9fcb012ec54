"""Time a piece of a graph in onnxruntime, so a lossy pass can decide from a measurement.

A pass that decomposes, prunes or quantizes a layer should only keep the rewrite if it
runs faster on the target. This module cuts the layer out as a standalone model
(:func:`extract_subgraph`) and times it the way users run it (:class:`LatencyProbe`):
onnxruntime at the chosen graph-optimization level ("all" by default: QDQ → QLinearConv
fusion and the NCHWc layout only happen at the extended/all levels), with a fixed number
of intra-op threads.

Typical use in a pass::

    probe = LatencyProbe(budget_s=30)
    shapes = random_shapes(ctx.template, ctx.input_shapes)       # every model input made static
    types = inferred_types(graph, ctx.template, input_shapes=shapes)  # once per graph
    before = extract_subgraph(graph, [conv], input_shapes=shapes, types=types, template=ctx.template)
    after = extract_subgraph(candidate_graph, new_nodes, input_shapes=shapes, template=ctx.template)
    try:
        [speedup] = probe.compare(before, [after])
    except LatencyBudgetExceeded:
        speedup = None   # out of time: keep the layer as it is
    if speedup is not None and speedup > 1.1:
        ...apply the rewrite...

Equal layers (same ops, attributes, shapes and dtypes; weights may differ) share one
measurement: results are cached by :func:`signature`.
"""

from __future__ import annotations

import hashlib
import statistics
import time
import zlib
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx

from .errors import UserInputError
from .graph import DEFAULT_DOMAINS, constant_value, inferred_types, is_graph_output, iter_graphs, node_subgraphs
from .io import tensor_nbytes
from .runtime import PROVIDER_NAMES, interleaved_run_times, make_session, provider_status

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

# Constants up to this many bytes keep their values in shape inference (Reshape targets,
# Slice starts, Pad amounts); bigger ones (weights) are replaced by typed inputs.
_INFERENCE_PAYLOAD_LIMIT = 1024
# Integer constants with at most this many elements are part of a layer's signature: ONNX
# passes shapes, axes and pads as int64/int32 tensors, and those change what a layer does.
_SIGNATURE_VALUE_LIMIT = 64


class LatencyBudgetExceeded(RuntimeError):
    """The probe's ``budget_s`` is spent; no new measurement is started (cached ones still answer)."""


# --------------------------------------------------------------------------- extraction
def extract_subgraph(graph: gs.Graph, nodes: Sequence[gs.Node], *,
                     input_shapes: dict[str, tuple[int, ...]] | None = None,
                     opset: int | None = None, template: onnx.ModelProto | None = None,
                     types: dict[str, tuple[int, list | None]] | None = None) -> onnx.ModelProto:
    """A standalone model computing just ``nodes`` (of ``graph`` or one of its subgraphs).

    * Inputs: tensors the nodes read (nodes inside their If/Loop bodies included) that are
      neither produced by one of them nor constant. Their shapes come from ``input_shapes``
      (name → shape), else from the tensors' static annotations, else from ``types`` (what
      :func:`onnxopt.graph.inferred_types` returns). When ``types`` is needed and not given
      it is computed here, with the graph inputs fixed to ``input_shapes``: so the shapes of
      the *model's* inputs (e.g. ``calibration.random_shapes(template, ctx.input_shapes)``)
      are enough to give every intermediate tensor a static shape. Extracting many layers of
      one graph, compute ``types`` once and pass it. An unknown or dynamic dimension still
      left raises ValueError naming the tensor.
    * Outputs: tensors the nodes produce that a node outside the selection reads or that
      are graph outputs; if there are none, the outputs of the last node.
    * Constants (initializers and Constant-node outputs) are copied as initializers.
    * Opsets: the template's (or the graph's) imports, the default domain at ``opset`` when
      given, plus every custom domain a node uses (``com.microsoft`` etc.).

    ``graph`` is not modified.
    """
    if not nodes:
        raise ValueError("extract_subgraph needs at least one node")
    nodes = _topological_order(list(nodes))
    input_shapes = input_shapes or {}

    inside = {id(n) for n in nodes}  # the selection and every node nested in its subgraphs
    produced: set[int] = set()
    for node in nodes:
        produced.update(id(t) for t in node.outputs)
        for sub in node_subgraphs(node):
            for g in iter_graphs(sub):
                inside.update(id(n) for n in g.nodes)

    inputs: list[gs.Tensor] = []
    constants: dict[str, onnx.TensorProto] = {}
    seen: set[int] = set()
    for tensor in _tensors_read(nodes):
        if id(tensor) in produced or id(tensor) in seen or tensor.name == "":
            continue
        seen.add(id(tensor))
        proto = _constant_proto(tensor)
        if proto is not None:
            constants[tensor.name] = proto
        else:
            inputs.append(tensor)

    outputs = [t for n in nodes for t in n.outputs
               if t.name and (any(id(c) not in inside for c in t.outputs) or is_graph_output(graph, t))]
    if not outputs:
        outputs = [t for t in nodes[-1].outputs if t.name]

    if types is None and any(t.dtype is None or (t.name not in input_shapes and _static_dims(t.shape) is None)
                             for t in inputs):
        types = inferred_types(graph, template, input_shapes=input_shapes)  # intermediates of exported models rarely carry types
    input_infos = [_input_value_info(t, input_shapes, types or {}) for t in inputs]
    node_protos = [OnnxExporter.export_node(n) for n in nodes]
    opsets = _opset_imports(graph, nodes, opset, template)
    inferred = _inferred_outputs(node_protos, input_infos, constants, outputs, opsets)
    output_infos = []
    for t in outputs:
        if t.name in inferred:
            output_infos.append(inferred[t.name])
        elif t.dtype is not None and t.shape is not None:
            output_infos.append(helper.make_tensor_value_info(t.name, dtype_to_onnx(t.dtype), list(t.shape)))
        else:
            # Neither inference nor the graph knows this output's type (a custom op): it stays
            # untyped; onnxruntime infers it, only onnx.checker would object.
            output_infos.append(helper.make_empty_tensor_value_info(t.name))

    model = helper.make_model(
        helper.make_graph(node_protos, "extracted", input_infos, output_infos, initializer=list(constants.values())),
        opset_imports=opsets, producer_name="onnxopt.layer_timing")
    model.functions.extend(_functions_used(graph, nodes, template))
    # IR 7 is the oldest that lets initializers stay out of the input list; newer opsets need newer IRs.
    model.ir_version = max(7, helper.find_min_ir_version_for(list(opsets), ignore_unknown=True))
    return model


def _topological_order(nodes: list[gs.Node]) -> list[gs.Node]:
    """The nodes ordered so producers come first (stable for nodes already in order)."""
    index = {id(n): i for i, n in enumerate(nodes)}
    waiting_on = {id(n): {id(t.inputs[0]) for t in _node_reads(n) if t.inputs and id(t.inputs[0]) in index}
                  for n in nodes}
    ordered: list[gs.Node] = []
    done: set[int] = set()
    while len(ordered) < len(nodes):
        ready = [n for n in nodes if id(n) not in done and waiting_on[id(n)] <= done]
        if not ready:
            raise ValueError("the nodes to extract form a cycle")
        for n in ready:
            ordered.append(n)
            done.add(id(n))
    return ordered


def _node_reads(node: gs.Node) -> list[gs.Tensor]:
    """Tensors a node reads: its inputs and the outer-scope tensors its subgraphs read."""
    reads = list(node.inputs)
    for sub in node_subgraphs(node):
        local = set()
        for g in iter_graphs(sub):
            local.update(id(t) for t in g.inputs)
            local.update(id(t) for n in g.nodes for t in n.outputs)
        for g in iter_graphs(sub):
            reads.extend(t for n in g.nodes for t in n.inputs if id(t) not in local)
            reads.extend(t for t in g.outputs if id(t) not in local)
    return reads


def _tensors_read(nodes: list[gs.Node]) -> list[gs.Tensor]:
    return [t for n in nodes for t in _node_reads(n)]


def _constant_proto(tensor: gs.Tensor) -> onnx.TensorProto | None:
    """The initializer for a constant tensor (never aliasing the graph's own protos), else None."""
    if isinstance(tensor, gs.Constant):
        values = tensor._values
        if isinstance(values, gs.ir.tensor.LazyValues):
            proto = onnx.TensorProto()
            proto.CopyFrom(values.tensor)
            if proto.data_location != onnx.TensorProto.EXTERNAL:
                proto.name = tensor.name
                return proto
        return numpy_helper.from_array(np.asarray(tensor.values), tensor.name)
    value = constant_value(tensor)  # output of a Constant node outside the selection
    return None if value is None else numpy_helper.from_array(np.asarray(value), tensor.name)


def _static_dims(shape) -> tuple[int, ...] | None:
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _input_value_info(tensor: gs.Tensor, input_shapes: dict[str, tuple[int, ...]],
                      types: dict[str, tuple[int, list | None]]) -> onnx.ValueInfoProto:
    inferred_type, inferred_dims = types.get(tensor.name, (0, None))
    elem_type = dtype_to_onnx(tensor.dtype) if tensor.dtype is not None else inferred_type
    if not elem_type:
        raise ValueError(f"input '{tensor.name}' of the extracted nodes has no known dtype (shape inference "
                         "could not tell, e.g. after a custom op); annotate the tensor's dtype and shape")
    if tensor.name in input_shapes:
        shape = tuple(int(d) for d in input_shapes[tensor.name])
    else:
        shape = _static_dims(tensor.shape) or _static_dims(inferred_dims)
        if shape is None:
            known = tensor.shape if tensor.shape is not None else inferred_dims
            if known is None:
                raise ValueError(f"input '{tensor.name}' of the extracted nodes has an unknown shape; "
                                 f"give it in input_shapes={{'{tensor.name}': (...)}}")
            dynamic = next(d for d in known if not isinstance(d, (int, np.integer)) or d < 0)
            raise ValueError(f"input '{tensor.name}' of the extracted nodes has dynamic dimension "
                             f"{dynamic!r} (shape {list(known)}); give it in input_shapes")
    return helper.make_tensor_value_info(tensor.name, elem_type, list(shape))


def _opset_imports(graph: gs.Graph, nodes: list[gs.Node], opset: int | None,
                   template: onnx.ModelProto | None) -> list[onnx.OperatorSetIdProto]:
    declared: dict[str, int] = {}
    if template is not None:
        declared.update((o.domain, o.version) for o in template.opset_import)
    for o in graph.import_domains or []:
        declared.setdefault(o.domain, o.version)
    declared[""] = opset if opset is not None else graph.opset  # the graph's, after any opset upgrade
    used = {n.domain for n in nodes}
    for node in nodes:
        for sub in node_subgraphs(node):
            used.update(n.domain for g in iter_graphs(sub) for n in g.nodes)
    custom = {d for d in used if d is not None and d not in DEFAULT_DOMAINS}
    for domain in custom:
        declared.setdefault(domain, 1)  # a domain used but never declared: its first version
    declared = {d: v for d, v in declared.items() if d == "" or d in custom}
    return [helper.make_opsetid(d, v) for d, v in declared.items()]


def _functions_used(graph: gs.Graph, nodes: list[gs.Node], template: onnx.ModelProto | None
                    ) -> list[onnx.FunctionProto]:
    """Model-local functions the nodes call (ONNX IR: a node whose (domain, op) names a function)."""
    called = {(n.domain or "", n.op) for n in nodes}
    found: dict[tuple[str, str], onnx.FunctionProto] = {}
    for func in graph.functions:
        key = (func.domain or "", func.name)
        if key in called:
            found[key] = OnnxExporter.export_function(func)
    for func in template.functions if template is not None else []:
        if (func.domain, func.name) in called:
            found.setdefault((func.domain, func.name), func)
    return list(found.values())


def _inferred_outputs(node_protos, input_infos, constants: dict[str, onnx.TensorProto],
                      outputs: list[gs.Tensor], opsets) -> dict[str, onnx.ValueInfoProto]:
    """Output name → value info from ONNX shape inference on a weightless copy ({} if it fails).

    Inference types the outputs from the ops themselves, which stays right when a pass has
    changed a tensor without updating the graph's annotations. Outputs of unknown rank are
    left out (onnx.checker wants a shape on graph outputs).
    """
    small = [p for p in constants.values() if tensor_nbytes(p) <= _INFERENCE_PAYLOAD_LIMIT]
    big_as_inputs = [helper.make_tensor_value_info(p.name, p.data_type, list(p.dims))
                     for p in constants.values() if tensor_nbytes(p) > _INFERENCE_PAYLOAD_LIMIT]
    skeleton = helper.make_model(
        helper.make_graph(node_protos, "skeleton", list(input_infos) + big_as_inputs,
                          [helper.make_empty_tensor_value_info(t.name) for t in outputs], initializer=small),
        opset_imports=opsets)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:
        return {}
    found = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.elem_type and tt.HasField("shape"):
            found[vi.name] = vi
    return found


# --------------------------------------------------------------------------- signature
def signature(model: onnx.ModelProto) -> str:
    """A key equal for models that do the same work: ops, domains, attributes, opsets, input
    and output types and shapes, constant dtypes and shapes — not tensor names, node names
    or weight values. Small integer constants (shapes, axes, pads) count by value.
    """
    parts: list = [sorted((o.domain, o.version) for o in model.opset_import)]
    _describe_graph(model.graph, {}, parts)
    for func in model.functions:  # rare; their full text keeps the key exact
        parts.append(func.SerializeToString(deterministic=True))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _describe_graph(g: onnx.GraphProto, names: dict[str, str], out: list) -> None:
    """Append a name-free description of ``g`` to ``out``; ``names`` maps seen names → canonical ids."""
    names = dict(names)  # a subgraph sees the outer names; its own stay local
    constants = {t.name: t for t in g.initializer}

    def ref(name: str) -> str:
        if name == "":
            return "-"
        if name not in names:
            names[name] = f"t{len(names)}"
            if name in constants:
                out.append(("const", names[name], _describe_tensor(constants[name])))
            else:
                out.append(("outer", names[name]))  # read from an enclosing graph
        return names[name]

    for vi in g.input:
        if vi.name not in constants:
            names[vi.name] = f"t{len(names)}"
            out.append(("input", names[vi.name], _describe_type(vi.type)))
    for node in g.node:
        attrs = []
        for a in sorted(node.attribute, key=lambda a: a.name):
            if a.type == onnx.AttributeProto.GRAPH:
                sub: list = []
                _describe_graph(a.g, names, sub)
                attrs.append((a.name, sub))
            elif a.type == onnx.AttributeProto.GRAPHS:
                subs = []
                for graph in a.graphs:
                    sub = []
                    _describe_graph(graph, names, sub)
                    subs.append(sub)
                attrs.append((a.name, subs))
            elif a.type == onnx.AttributeProto.TENSOR:
                attrs.append((a.name, _describe_tensor(a.t)))
            elif a.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS,
                            onnx.AttributeProto.TENSORS, onnx.AttributeProto.TYPE_PROTOS):
                attrs.append((a.name, a.SerializeToString(deterministic=True)))
            else:
                attrs.append((a.name, a.ref_attr_name or helper.get_attribute_value(a)))
        out.append((node.domain, node.op_type, [ref(i) for i in node.input], attrs))
        for o in node.output:
            names[o] = f"t{len(names)}" if o else "-"
    for vi in g.output:
        out.append(("output", ref(vi.name), _describe_type(vi.type)))


def _describe_type(t: onnx.TypeProto) -> tuple:
    if not t.HasField("tensor_type"):
        return (t.WhichOneof("value"),)
    tt = t.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim) \
        if tt.HasField("shape") else None
    return (tt.elem_type, dims)


def _describe_tensor(t: onnx.TensorProto) -> tuple:
    desc: tuple = (t.data_type, tuple(t.dims))
    small_int = t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) \
        and int(np.prod(t.dims, dtype=np.int64)) <= _SIGNATURE_VALUE_LIMIT
    if small_int and t.data_location != onnx.TensorProto.EXTERNAL:
        desc += (tuple(numpy_helper.to_array(t).reshape(-1).tolist()),)
    return desc


# --------------------------------------------------------------------------- timing
class LatencyProbe:
    """Times standalone models in onnxruntime the way users run them.

    ``provider``: ``cpu``, ``cuda`` or ``tensorrt`` (or a full onnxruntime provider name).
    ``optimization``: onnxruntime graph-optimization level (``disable``, ``basic``,
    ``extended``, ``all``). ``threads``: intra-op threads (1 is reproducible on a small
    machine). ``runs`` timed runs after ``warmup`` untimed ones; a layer slow enough that
    they would exceed ``max_measure_s`` gets fewer runs (at least 5).

    ``budget_s`` bounds the total seconds spent building sessions and running them. Once it
    is spent, answers already cached are still returned, and any call that needs a new
    measurement raises :class:`LatencyBudgetExceeded` (a pass catches it and keeps the
    layers it has not decided on as they are). The measurement running when the budget runs
    out is finished, so the budget can be overshot by one measurement.

    Results are cached by :func:`signature`, so equal layers are timed once. Feeds (given
    or random, seeded by ``seed`` and the input's name) are part of the key only by their
    names, dtypes and shapes. The time includes onnxruntime's per-call overhead (tens of
    microseconds from Python), which pulls ratios of tiny layers towards 1.
    """

    def __init__(self, *, provider: str = "cpu", optimization: str = "all", threads: int = 1, runs: int = 20,
                 warmup: int = 3, seed: int = 0, budget_s: float | None = None, max_measure_s: float = 2.0):
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, not {optimization!r}")
        if provider in PROVIDER_NAMES:
            status = provider_status(provider)
            if not status.available:
                raise UserInputError(f"cannot time layers on '{provider}': {status.reason}.",
                                     "use --target cpu or install the provider.")
        self.provider = provider
        self.optimization = optimization
        self.threads = threads
        self.runs = max(1, runs)
        self.warmup = max(0, warmup)
        self.seed = seed
        self.budget_s = budget_s
        self.max_measure_s = max_measure_s
        self.spent_s = 0.0
        self.sessions_created = 0
        self._latency: dict[str, float] = {}
        self._ratio: dict[tuple[str, str], float] = {}

    # ----------------------------------------------------------------- public
    @property
    def remaining_s(self) -> float | None:
        return None if self.budget_s is None else max(0.0, self.budget_s - self.spent_s)

    def latency(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None) -> float:
        """Median seconds of one run of ``model`` (cached by signature)."""
        key = self._key(model, feeds)
        if key not in self._latency:
            [times] = self._measure([model], [feeds])
            self._latency[key] = statistics.median(times)
        return self._latency[key]

    def compare(self, baseline: onnx.ModelProto, candidates: list[onnx.ModelProto],
                feeds: dict[str, np.ndarray] | None = None) -> list[float]:
        """Speed ratio ``time(baseline) / time(candidate)`` for each candidate (> 1: candidate faster).

        Baseline and candidates run interleaved, round-robin, on ``feeds`` (one feed for all:
        real data for dynamic shapes and data-dependent branches) or on the same random data
        for inputs of the same name; each ratio is the median over rounds of the per-round
        ratio, so machine drift hits both sides of every ratio alike.
        """
        base_key = self._key(baseline, feeds)
        keys = [self._key(c, feeds) for c in candidates]
        todo = [i for i, k in enumerate(keys) if (base_key, k) not in self._ratio]
        unique = list(dict.fromkeys(keys[i] for i in todo))  # equal candidates are timed once
        if unique:
            models = [baseline] + [candidates[keys.index(k)] for k in unique]
            times = self._measure(models, [feeds] * len(models))
            self._latency.setdefault(base_key, statistics.median(times[0]))
            for k, t in zip(unique, times[1:]):
                self._latency.setdefault(k, statistics.median(t))
                self._ratio[(base_key, k)] = statistics.median(b / c for b, c in zip(times[0], t))
        return [self._ratio[(base_key, k)] for k in keys]

    def random_feeds(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        """Seeded random data for every input: floats ~ N(0, 1), int8/uint8 over their whole
        range, bool 0/1, other integers in [0, 4) (safe as indices)."""
        init_names = {t.name for t in model.graph.initializer}
        feeds = {}
        for vi in model.graph.input:
            if vi.name in init_names:
                continue
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
                raise ValueError(f"input '{vi.name}' is not a tensor of known rank; pass feeds")
            shape = []
            for d in tt.shape.dim:
                if not d.HasField("dim_value"):
                    raise ValueError(f"input '{vi.name}' has dynamic dimension {d.dim_param or '?'!r}; pass feeds "
                                     "or extract the layer with input_shapes")
                shape.append(d.dim_value)
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            rng = np.random.default_rng([self.seed, zlib.crc32(vi.name.encode())])
            if dtype.kind == "f":
                feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                feeds[vi.name] = rng.integers(0, 2, shape).astype(dtype)
            elif dtype in (np.dtype(np.int8), np.dtype(np.uint8)):
                info = np.iinfo(dtype)
                feeds[vi.name] = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
            elif dtype.kind in "iu":
                feeds[vi.name] = rng.integers(0, 4, shape).astype(dtype)
            else:
                raise ValueError(f"input '{vi.name}' has type {dtype}, which the probe cannot make up; pass feeds")
        return feeds

    # ----------------------------------------------------------------- internals
    def _key(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None) -> str:
        key = signature(model)
        if feeds is not None:
            key += repr(sorted((k, str(np.asarray(v).dtype), np.shape(v)) for k, v in feeds.items()))
        return key

    def _measure(self, models: list[onnx.ModelProto], feeds: list[dict | None]) -> list[list[float]]:
        """Per-round run times (seconds) of each model, interleaved, charged to the budget."""
        if self.budget_s is not None and self.spent_s >= self.budget_s:
            raise LatencyBudgetExceeded(
                f"layer-timing budget of {self.budget_s:g} s is spent ({self.spent_s:.2f} s used)")
        start = time.perf_counter()
        try:
            sessions = [self._session(m) for m in models]
            data = [f if f is not None else self.random_feeds(m) for m, f in zip(models, feeds)]
            data = [{i.name: f[i.name] for i in s.get_inputs()} for s, f in zip(sessions, data)]
            # The warm-up rounds are timed too: they tell how many runs fit in max_measure_s.
            warm = interleaved_run_times(sessions, data, warmup=0, runs=max(1, self.warmup))
            round_s = sum(statistics.median(t) for t in warm)
            runs = self.runs
            if round_s * runs > self.max_measure_s:
                runs = max(5, int(self.max_measure_s / max(round_s, 1e-9)))
            return interleaved_run_times(sessions, data, warmup=0, runs=runs)
        finally:
            self.spent_s += time.perf_counter() - start

    def _session(self, model: onnx.ModelProto):
        self.sessions_created += 1
        return make_session(model, self.provider, optimization=self.optimization, threads=self.threads)
