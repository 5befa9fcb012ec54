"""Lossless constant folding (``fold-constants``) and shape simplification (``simplify-shapes``).

fold-constants
    Every node whose inputs are all constants is evaluated and its outputs become
    initializers. All foldable nodes of a round (chains included, in every subgraph) are
    evaluated in ONE onnxruntime session: a model whose initializers are the constant
    inputs and whose outputs are every foldable node's outputs. A session that fails is
    bisected; a single node onnxruntime cannot run goes to
    ``onnx.reference.ReferenceEvaluator``; a node both reject is left alone (noted).

    What is never folded:
    * a result larger than ``size_threshold`` bytes AND larger than the constants it
      consumes (onnx-simplifier's best-known complaint: Tile/Expand/ConstantOfShape/Range
      of a few constants becoming a huge initializer). Folds that shrink or keep the size,
      such as transposing a weight, are always done. The four expanding ops are sized
      before they are evaluated, so a 10 GB Tile is never computed;
    * with ``keep_dequantize`` (default): DequantizeLinear (how QDQ models store
      quantized weights and int32 biases; folding undoes the compression and breaks
      onnxruntime's and TensorRT's QDQ fusions), and any node that expands a low-bit
      (≤ 8-bit) constant into a larger float tensor (e.g. Cast/Gather of a uint8
      codebook) when the result exceeds 1 KiB;
    * nondeterministic ops (Random*, Multinomial, Bernoulli, Dropout), sequence/optional
      ops, ops of custom domains other than ai.onnx.ml and com.microsoft, Loops without a
      trip count (they may never end), and nodes with subgraphs whose evaluation fails.

    Each result keeps the dtype the evaluator returns (onnxruntime implements the op
    spec; the reference evaluator's result is cast to the type ONNX shape inference
    gives), and a result whose dtype disagrees with the tensor's declared type is kept
    unfolded. A folded tensor keeps its name.

simplify-shapes
    Folds shape computations when shapes are static, either declared, inferred by ONNX
    shape inference (run once per pass on a payload-free copy), or given by the user:
    ``ctx.input_shapes`` (``--input-shape input:1x3x224x224``) first REWRITES the declared
    shape of those graph inputs, so the optimized model only accepts that shape; that is
    what the user asked for, and only dynamic dims may be set.

    Shape / Size and the Gather, Slice, Concat, Unsqueeze, Squeeze, Cast, Identity and
    Reshape nodes that pick their elements are tracked element by element, so a
    partially known shape still yields constants: with a dynamic batch,
    ``Gather(Shape(x), 1)`` becomes a constant while ``Gather(Shape(x), 0)`` stays
    computed. A Reshape whose target shape is known except for dims copied from its own
    input (PyTorch's ``x.view(x.size(0), -1)``) gets a constant target with 0 there
    ("copy this dim", ONNX Reshape with allowzero=0). Everything downstream of the new
    constants is then folded by the same evaluator as fold-constants.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt import graph as G
from onnxopt.errors import UserInputError
from onnxopt.pass_base import Pass, PassResult
from onnxopt.registry import register_pass

# A fold may grow the model by at most this many bytes per result: tensors this small
# (e.g. a 128x128 float mask or position ids) are cheaper stored than recomputed.
DEFAULT_SIZE_THRESHOLD = 64 * 1024

# Results not determined by their inputs. Dropout is random in training mode and a no-op
# otherwise (eliminate-identity removes it).
NONDETERMINISTIC_OPS = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "Dropout", "BiasDropout", "BitmaskDropout", "BitmaskBiasDropout",
})
# Ops that make or read sequences and optionals, which cannot be initializers.
SEQUENCE_OPS = frozenset({
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement",
})
# Domains onnxruntime implements; ops of any other domain pass through untouched.
EVALUABLE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
# Ops whose output can be far larger than their inputs; sized before evaluation.
EXPANDING_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range"})

# Compressed storage types: integers and floats of at most 8 bits.
LOW_BIT_TYPES = frozenset(getattr(onnx.TensorProto, name) for name in (
    "INT8", "UINT8", "INT4", "UINT4", "INT2", "UINT2", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
    "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name))
# Expanding a low-bit tensor into a float result at most this big is not "undoing storage".
LOW_BIT_EXPANSION_FREE_BYTES = 1024
# Shape-like constants (at most this many elements) are read by simplify-shapes.
SHAPE_VALUE_MAX_ELEMENTS = 64
# At most this many human-readable notes per pass run (the counters hold the totals).
MAX_NOTES = 25

_DEFER = object()  # "size this node next round, once its shape inputs are real constants"


# =========================================================================== small helpers
def _onnx_type(dtype) -> int | None:
    """A gs/numpy dtype as an ONNX element type (gs keeps the ONNX enum for numpy-less types)."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


def _constant_nbytes(tensor: gs.Constant) -> int:
    """Payload size of a constant without loading lazily-held values."""
    try:
        elem = _onnx_type(tensor.dtype)
        itemsize = helper.tensor_dtype_to_np_dtype(elem).itemsize if elem is not None else 4
        return int(math.prod(int(d) for d in tensor.shape)) * itemsize
    except Exception:
        return 0


def _declared_bytes(tensor: gs.Tensor) -> int | None:
    """Size of a tensor from its declared static shape and dtype, None when either is unknown."""
    shape = G.static_shape(tensor)
    elem = _onnx_type(tensor.dtype)
    if shape is None or elem is None:
        return None
    return math.prod(shape) * helper.tensor_dtype_to_np_dtype(elem).itemsize


def _is_omitted(tensor: gs.Tensor) -> bool:
    """An optional input left out (empty name)."""
    return isinstance(tensor, gs.Variable) and tensor.name == "" and not tensor.inputs


def _outer_reads(node: gs.Node) -> list[gs.Tensor]:
    """Tensors of enclosing graphs that ``node``'s subgraphs read (their free variables)."""
    subs = G.node_subgraphs(node)
    if not subs:
        return []
    local: set[int] = set()
    reads: list[gs.Tensor] = []
    for sub in subs:
        for g in G.iter_graphs(sub):
            local.update(id(t) for t in g.inputs)
            for n in g.nodes:
                local.update(id(t) for t in n.outputs)
                reads.extend(n.inputs)
            reads.extend(g.outputs)
    seen: set[int] = set()
    out = []
    for t in reads:
        if id(t) not in local and id(t) not in seen and not _is_omitted(t):
            seen.add(id(t))
            out.append(t)
    return out


def _node_reads(node: gs.Node) -> list[gs.Tensor]:
    """Everything the node's result depends on: its inputs and its subgraphs' free variables."""
    return [t for t in itertools.chain(node.inputs, _outer_reads(node)) if not _is_omitted(t)]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def _small_int_values(tensor: gs.Tensor, max_elements: int = 4096) -> list[int] | None:
    """The values of a small integer constant (shape inputs, axes, repeats), else None."""
    if not isinstance(tensor, gs.Constant):
        return None
    try:
        if math.prod(int(d) for d in tensor.shape) > max_elements:
            return None
        values = np.asarray(tensor.values)
    except Exception:
        return None
    if values.dtype.kind not in "iu":
        return None
    return [int(v) for v in values.reshape(-1)]


def replace_with_constant(graph: gs.Graph, old: gs.Tensor, value: np.ndarray, names: G.NameAllocator,
                          graph_outputs: set[int]) -> gs.Constant:
    """Make every reader of ``old`` read a new constant holding ``value``.

    The constant takes over the tensor's name (the dead producer's output is renamed);
    a graph output keeps its public name through replace_tensor's Identity.
    """
    if id(old) in graph_outputs:
        new = names.constant(old.name + "_folded", value)
        G.replace_tensor(graph, old, new)
    else:
        name = old.name
        old.name = names(name + "_unfolded")
        new = gs.Constant(name, np.asarray(value, order="C"))
        G.replace_uses(old, new)
    return new


# =========================================================================== the evaluator
@dataclass
class FoldRules:
    """What a fold may do to the model (see the module docstring)."""

    size_threshold: int = DEFAULT_SIZE_THRESHOLD
    keep_dequantize: bool = True


class ConstantFolder:
    """Finds nodes computable from constants, evaluates them together, replaces their outputs.

    Shared by ``fold-constants`` (whole graph) and ``simplify-shapes`` (only what is
    downstream of the constants it created: ``fold(seeds=...)``).

    ``memory`` remembers nodes that were rejected (too big, not evaluable) together with
    their inputs, so the PassManager's fixed-point rounds do not evaluate them again.
    """

    def __init__(self, graph: gs.Graph, rules: FoldRules, memory: dict | None = None):
        self.graph = graph
        self.rules = rules
        self.memory = memory if memory is not None else {}
        self.counters: Counter = Counter()
        self.notes: list[str] = []

    # ------------------------------------------------------------------ public
    def fold(self, seeds: list[gs.Tensor] | None = None, max_rounds: int = 8) -> list[gs.Constant]:
        """Fold until nothing changes; returns the constants created.

        With ``seeds``, only nodes that (transitively) read one of those tensors are folded.
        A round evaluates everything foldable at once; a further round picks up expanding
        ops that had to wait for their shape inputs to become constants.
        """
        seed_ids = None if seeds is None else {id(t) for t in seeds}
        created: list[gs.Constant] = []
        for _ in range(max_rounds):
            new = self._fold_round(seed_ids)
            if not new:
                break
            created.extend(new)
            if seed_ids is not None:
                seed_ids.update(id(t) for t in new)
        return created

    # ------------------------------------------------------------------ one round
    def _fold_round(self, seed_ids: set[int] | None) -> list[gs.Constant]:
        graph_outputs = {id(t) for g in G.iter_graphs(self.graph) for t in g.outputs}
        plan = self._collect(seed_ids, graph_outputs)
        if not plan:
            return []
        results: dict[int, np.ndarray] = {}
        self._evaluate(plan, results)
        return self._apply(plan, results, graph_outputs)

    def _collect(self, seed_ids: set[int] | None, graph_outputs: set[int]) -> list[gs.Node]:
        """Foldable nodes in topological order (outer graphs before the subgraphs they hold)."""
        # Tensors that nodes already in the plan will produce → their predicted bytes (None: unknown).
        pending: dict[int, int | None] = {}
        names: dict[str, int] = {}  # tensor name → tensor in the evaluation model
        plan: list[gs.Node] = []
        for g in G.iter_graphs(self.graph):
            for node in g.nodes:
                if not all(isinstance(t, gs.Constant) or id(t) in pending or _is_omitted(t) for t in node.inputs):
                    continue  # (cheap test first: most nodes read a run-time tensor)
                reads = _node_reads(node)
                if not all(isinstance(t, gs.Constant) or id(t) in pending for t in reads):
                    continue
                if seed_ids is not None and not any(id(t) in seed_ids or id(t) in pending for t in reads):
                    continue
                used = [o for o in node.outputs if o.outputs or id(o) in graph_outputs]
                if not used:
                    continue  # dead: eliminate-dead / cleanup removes it
                if node.op in ("Identity", "Constant") and any(id(o) in graph_outputs for o in used):
                    continue  # Identity(constant) is how a constant graph output is written
                if node.op == "Identity" and G.is_default_domain(node) and isinstance(reads[0], gs.Constant):
                    G.replace_uses(node.outputs[0], reads[0])  # nothing to evaluate, no weight copy
                    self.counters["nodes_folded"] += 1
                    continue
                if self._remembered(node, reads):
                    continue
                reason = self._policy_reason(node, reads)
                if reason is not None:
                    self._reject(node, reads, *reason)
                    continue
                predicted = self._predicted_bytes(node, reads, pending)
                if predicted is _DEFER:
                    continue
                if predicted is not None and predicted > self.rules.size_threshold:
                    # Inputs still being computed count with their predicted size; if one is
                    # unknown the rule is applied after evaluation instead.
                    in_sizes = [pending[id(t)] if id(t) in pending else _constant_nbytes(t) for t in reads]
                    if None not in in_sizes and predicted > sum(in_sizes):
                        self._reject(node, reads, "skipped_size", self._size_note(predicted, sum(in_sizes)))
                        continue
                outs = [o for o in node.outputs if o.name]
                clash = any(names.get(t.name, id(t)) != id(t) for t in itertools.chain(reads, outs))
                if clash:
                    continue  # two tensors of one name (sibling subgraphs): leave it
                names.update((t.name, id(t)) for t in itertools.chain(reads, outs))
                single = predicted if len(outs) == 1 and predicted is not None else None
                pending.update((id(o), single if single is not None else _declared_bytes(o)) for o in outs)
                plan.append(node)
        return plan

    def _policy_reason(self, node: gs.Node, reads: list[gs.Tensor]) -> tuple[str, str] | None:
        """Why a node must never be folded, as (counter, note), or None."""
        domain = node.domain or ""
        if domain not in EVALUABLE_DOMAINS:
            return "skipped_custom_domain", f"custom domain '{domain}' is not evaluated"
        if node.op in NONDETERMINISTIC_OPS or node.op.startswith("Random"):
            return "skipped_nondeterministic", "nondeterministic op"
        if node.op in SEQUENCE_OPS or any(getattr(t, "type", "tensor_type") != "tensor_type" for t in reads):
            return "skipped_sequence", "sequence/optional values cannot be initializers"
        if node.op == "Loop" and (not node.inputs or _is_omitted(node.inputs[0])):
            return "skipped_unbounded_loop", "Loop without a trip count may not terminate"
        if self.rules.keep_dequantize and node.op == "DequantizeLinear":
            return "kept_dequantize", "DequantizeLinear of a constant keeps quantized storage (keep_dequantize)"
        return None

    def _predicted_bytes(self, node: gs.Node, reads: list[gs.Tensor], pending: dict[int, int | None]):
        """Result size before evaluation: exact for the expanding ops, declared shapes otherwise.

        Returns bytes, None when unknown, or _DEFER when an expanding op's shape inputs are
        still being computed in this round.
        """
        op, inputs = node.op, node.inputs
        if op in EXPANDING_OPS and G.is_default_domain(node):
            if any(id(t) in pending for t in reads):
                return _DEFER
            try:
                if op == "ConstantOfShape":
                    shape = _small_int_values(inputs[0])
                    value = node.attrs.get("value")
                    itemsize = np.dtype(value.dtype).itemsize if isinstance(value, gs.Constant) else 4
                    return None if shape is None else math.prod(shape) * itemsize
                if op == "Expand":
                    shape = _small_int_values(inputs[1])
                    if shape is None:
                        return None
                    out = np.broadcast_shapes(tuple(int(d) for d in inputs[0].shape), tuple(shape))
                    return math.prod(out) * np.dtype(inputs[0].dtype).itemsize
                if op == "Tile":
                    repeats = _small_int_values(inputs[1])
                    if repeats is None:
                        return None
                    return math.prod(int(d) * r for d, r in zip(inputs[0].shape, repeats)) * np.dtype(inputs[0].dtype).itemsize
                if op == "Range":
                    start, limit, delta = (np.asarray(t.values).reshape(-1)[0] for t in inputs[:3])
                    count = max(math.ceil((float(limit) - float(start)) / float(delta)), 0)
                    return count * np.dtype(inputs[0].dtype).itemsize
            except Exception:
                return None  # malformed node: evaluation will say so
        sizes = [_declared_bytes(o) for o in node.outputs if o.name]
        return None if None in sizes else sum(sizes)

    @staticmethod
    def _input_bytes(reads: list[gs.Tensor]) -> int:
        return sum(_constant_nbytes(t) for t in reads if isinstance(t, gs.Constant))

    def _size_note(self, out_bytes: int, in_bytes: int) -> str:
        return (f"result of {_fmt_bytes(out_bytes)} exceeds size_threshold={self.rules.size_threshold} "
                f"and its constant inputs ({_fmt_bytes(in_bytes)}); kept as computed")

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, nodes: list[gs.Node], results: dict[int, np.ndarray]) -> None:
        """Evaluate ``nodes`` into ``results`` (tensor id → value): one onnxruntime session,
        bisected on failure, the reference evaluator for a single node onnxruntime rejects."""
        available = set(results)
        runnable = []
        for n in nodes:  # drop nodes whose inputs failed upstream
            if all(isinstance(t, gs.Constant) or id(t) in available for t in _node_reads(n)):
                runnable.append(n)
                available.update(id(o) for o in n.outputs)
        if not runnable:
            return
        try:
            results.update(self._run_onnxruntime(runnable, results))
            return
        except Exception as exc:
            ort_error = exc
        if len(runnable) > 1:
            half = len(runnable) // 2
            self._evaluate(runnable[:half], results)
            self._evaluate(runnable[half:], results)
            return
        node = runnable[0]
        try:
            results.update(self._run_reference(node, results))
        except Exception as exc:
            self._reject(node, _node_reads(node), "eval_failed",
                         f"not evaluable by onnxruntime ({_short(ort_error)}) nor the ONNX reference "
                         f"evaluator ({_short(exc)}); left as is")

    def _evaluation_model(self, nodes: list[gs.Node], results: dict[int, np.ndarray]) -> onnx.ModelProto:
        """A model computing ``nodes``: constant inputs as initializers, every output as a graph output."""
        produced = {id(o) for n in nodes for o in n.outputs}
        initializers: dict[str, onnx.TensorProto] = {}
        for n in nodes:
            # Constants read inside subgraphs are exported by gs as those subgraphs' initializers.
            for t in itertools.chain(n.inputs, (t for t in _outer_reads(n) if not isinstance(t, gs.Constant))):
                if _is_omitted(t) or id(t) in produced or t.name in initializers:
                    continue
                if isinstance(t, gs.Constant):
                    initializers[t.name] = OnnxExporter.export_tensor_proto(t)
                else:
                    initializers[t.name] = numpy_helper.from_array(results[id(t)], t.name)
        outputs = [onnx.ValueInfoProto(name=o.name) for n in nodes for o in n.outputs if o.name]
        graph = helper.make_graph([OnnxExporter.export_node(n) for n in nodes], "fold", [], outputs,
                                  initializer=list(initializers.values()))
        opsets = {"": self.graph.opset}
        for imp in self.graph.import_domains or []:
            opsets.setdefault(imp.domain or "", imp.version)
        for n in nodes:
            opsets.setdefault(n.domain or "", 1)
        opsets.pop("ai.onnx", None)
        opset_ids = [helper.make_opsetid(d, v) for d, v in opsets.items()]
        model = helper.make_model(graph, opset_imports=opset_ids)
        # IR >= 4 so initializers need not be listed as inputs.
        model.ir_version = max(self.graph.ir_version or 0, helper.find_min_ir_version_for(opset_ids, True), 4)
        return model

    def _run_onnxruntime(self, nodes: list[gs.Node], results: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        from onnxopt.runtime import make_session

        model = self._evaluation_model(nodes, results)
        session = make_session(model, optimization="disable")
        by_name = {o.name: id(o) for n in nodes for o in n.outputs if o.name}
        names = list(by_name)
        values = session.run(names, {})
        return {by_name[name]: value for name, value in zip(names, values)}

    def _run_reference(self, node: gs.Node, results: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        from onnx.reference import ReferenceEvaluator

        model = self._evaluation_model([node], results)
        values = ReferenceEvaluator(model).run(None, {})
        # The reference evaluator sometimes computes in a wider type; the spec's type is what
        # shape inference says.
        try:
            declared = {vi.name: vi.type.tensor_type.elem_type
                        for vi in onnx.shape_inference.infer_shapes(model).graph.output}
        except Exception:
            declared = {}
        out = {}
        for o, value in zip([o for o in node.outputs if o.name], values):
            elem = declared.get(o.name, 0)
            if isinstance(value, np.ndarray) and elem:
                value = value.astype(helper.tensor_dtype_to_np_dtype(elem), copy=False)
            out[id(o)] = value
        return out

    # ------------------------------------------------------------------ rewriting
    def _apply(self, plan: list[gs.Node], results: dict[int, np.ndarray], graph_outputs: set[int]) -> list[gs.Constant]:
        names: G.NameAllocator | None = None
        created: list[gs.Constant] = []
        for node in plan:
            reads = _node_reads(node)
            if not all(isinstance(t, gs.Constant) for t in reads):
                continue  # a node it reads was not folded
            used = [o for o in node.outputs if o.outputs or id(o) in graph_outputs]
            if node.op == "Identity" and G.is_default_domain(node) and not any(id(o) in graph_outputs for o in used):
                # Readers read the constant itself: no copy of the weight.
                G.replace_uses(node.outputs[0], reads[0])
                created.append(reads[0])
                self.counters["nodes_folded"] += 1
                continue
            values = [results.get(id(o)) for o in used]
            if any(v is None for v in values):
                continue  # evaluation failed (noted there)
            reason = self._result_reason(used, values, reads)
            if reason is not None:
                self._reject(node, reads, *reason)
                continue
            if names is None:
                names = G.NameAllocator(self.graph)
            for old, value in zip(used, values):
                created.append(replace_with_constant(self.graph, old, value, names, graph_outputs))
            self.counters["nodes_folded"] += 1
        return created

    def _result_reason(self, outputs: list[gs.Tensor], values: list, reads: list[gs.Tensor]) -> tuple[str, str] | None:
        for o, v in zip(outputs, values):
            if not isinstance(v, np.ndarray) or v.dtype == object:
                return "eval_failed", f"output '{o.name}' is not a numeric tensor"
            declared = _onnx_type(o.dtype)
            if declared is not None and declared != _onnx_type(v.dtype):
                return "eval_failed", (f"evaluated '{o.name}' as {v.dtype} but the model declares "
                                       f"{helper.tensor_dtype_to_string(declared)}")
        out_bytes = sum(v.nbytes for v in values)
        in_bytes = self._input_bytes(reads)
        if out_bytes > self.rules.size_threshold and out_bytes > in_bytes:
            return "skipped_size", self._size_note(out_bytes, in_bytes)
        if self.rules.keep_dequantize and any(v.dtype.kind == "f" for v in values):
            for t in reads:
                if isinstance(t, gs.Constant) and _onnx_type(t.dtype) in LOW_BIT_TYPES:
                    if out_bytes > max(_constant_nbytes(t), LOW_BIT_EXPANSION_FREE_BYTES):
                        return "kept_dequantize", (f"would expand the low-bit constant '{t.name}' into "
                                                   f"{_fmt_bytes(out_bytes)} of floats (keep_dequantize)")
        return None

    # ------------------------------------------------------------------ bookkeeping
    def _reject(self, node: gs.Node, reads: list[gs.Tensor], counter: str, note: str) -> None:
        self.counters[counter] += 1
        self.memory[id(node)] = (weakref.ref(node), tuple(id(t) for t in reads))
        if len(self.notes) < MAX_NOTES:
            self.notes.append(f"{node.op} '{node.name}': {note}")
        elif len(self.notes) == MAX_NOTES:
            self.notes.append("(more nodes were left unfolded; see the counters)")

    def _remembered(self, node: gs.Node, reads: list[gs.Tensor]) -> bool:
        entry = self.memory.get(id(node))
        return entry is not None and entry[0]() is node and entry[1] == tuple(id(t) for t in reads)


# =========================================================================== fold-constants
@register_pass
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "Evaluate nodes whose inputs are all constants and store their results as initializers."
    lossless = True

    @dataclass
    class Options:
        # Bytes a single fold may add: a larger result is folded only if it is no larger
        # than the constants it consumes (so Tile/Expand/ConstantOfShape/Range never bloat).
        size_threshold: int = DEFAULT_SIZE_THRESHOLD
        # Never fold DequantizeLinear, nor expand low-bit constants into float tensors.
        keep_dequantize: bool = True

    def __init__(self, options=None):
        super().__init__(options)
        self._memory: dict = {}  # rejected nodes, across the PassManager's rounds

    def run(self, graph, ctx) -> PassResult:
        if self.options.size_threshold < 0:
            raise UserInputError(f"option size_threshold={self.options.size_threshold} of pass '{self.name}' is negative.",
                                 "give a size in bytes, e.g. fold-constants:size_threshold=65536.")
        lifted = G.lift_constant_nodes(graph)
        folder = ConstantFolder(graph, FoldRules(self.options.size_threshold, self.options.keep_dequantize), self._memory)
        folder.fold()
        counters = dict(folder.counters)
        if lifted:
            counters["constant_nodes_lifted"] = lifted
        return PassResult(changed=bool(lifted or folder.counters["nodes_folded"]), counters=counters, notes=folder.notes)


# =========================================================================== simplify-shapes
class _DimOf:
    """An element of a shape value that is unknown until run time: dim ``index`` of ``tensor``."""

    __slots__ = ("tensor", "index", "param")

    def __init__(self, tensor: gs.Tensor, index: int, param: str | None):
        self.tensor, self.index, self.param = tensor, index, param


class _ShapeValue:
    """A 0-D or 1-D integer tensor known element by element (ints and _DimOf placeholders)."""

    __slots__ = ("elements", "scalar", "dtype")

    def __init__(self, elements: list, scalar: bool = False, dtype=np.int64):
        self.elements, self.scalar, self.dtype = list(elements), scalar, np.dtype(dtype)

    @property
    def known(self) -> bool:
        return all(isinstance(e, int) for e in self.elements)

    def array(self) -> np.ndarray:
        values = np.array(self.elements, dtype=self.dtype)
        return values.reshape(()) if self.scalar else values


def _onnx_slice_indices(n: int, start: int, end: int, step: int) -> list[int]:
    """Indices ONNX Slice selects on an axis of length n (negative values count from the end, then clamp)."""
    if step == 0:
        raise ValueError("Slice step 0")
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return list(range(start, end, step))


class ShapeSimplifier:
    """Turns shape computations into constants (see the module docstring)."""

    def __init__(self, graph: gs.Graph, folder: ConstantFolder, template: onnx.ModelProto | None = None):
        self.graph = graph
        self.folder = folder
        self.template = template
        self._inferred: dict | None = None
        self.counters: Counter = Counter()

    # ------------------------------------------------------------------ public
    def apply_input_shapes(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Declare user-given input shapes on the graph inputs; returns how many changed."""
        inputs = {t.name: t for t in self.graph.inputs}
        changed = 0
        for name, shape in shapes.items():
            t = inputs.get(name)
            if t is None:
                raise UserInputError(f"--input-shape names '{name}', which is not an input of the model.",
                                     f"use one of the model's inputs: {', '.join(inputs) or '(none)'}.")
            shape = [int(d) for d in shape]
            old = list(t.shape) if t.shape is not None else None
            text = "x".join(map(str, shape))
            if old is not None and len(old) != len(shape):
                raise UserInputError(
                    f"--input-shape {name}:{text} has {len(shape)} dims but the model input has {len(old)} "
                    f"({'x'.join(str(d) if isinstance(d, int) else '?' for d in old)}).",
                    "give one size per dimension of the input.")
            for axis, (d, s) in enumerate(zip(old or [], shape)):
                if isinstance(d, int) and d > 0 and d != s:
                    raise UserInputError(f"--input-shape {name}:{text} sets axis {axis} to {s} but the model fixes it to {d}.",
                                         "only dynamic dimensions can be overridden; keep the static ones.")
            if old != shape:
                t.shape = shape
                changed += 1
        self._inferred = None
        return changed

    def simplify(self, max_rounds: int = 4) -> bool:
        changed = False
        for _ in range(max_rounds):
            if not any(n.op in ("Shape", "Size") for g in G.iter_graphs(self.graph) for n in g.nodes):
                break
            values = self._propagate()
            names = G.NameAllocator(self.graph)
            seeds = self._materialize(values, names)
            reshapes = self._static_reshape_targets(values, names)
            if not seeds and not reshapes:
                break
            changed = True
            self.counters["shape_values_folded"] += len(seeds)
            self.counters["reshape_targets_made_static"] += reshapes
            if seeds:
                self.folder.fold(seeds=seeds)
        return changed

    # ------------------------------------------------------------------ dims
    def _dims(self, tensor: gs.Tensor) -> list[int | str | None] | None:
        """The tensor's dims: declared where static, else from shape inference; None if rank unknown.

        Dims <= 0 count as unknown (some exporters write 0 or -1 for "dynamic").
        """
        if isinstance(tensor, gs.Constant):
            return [int(d) for d in tensor.shape]
        declared = list(tensor.shape) if tensor.shape is not None else None
        if declared is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in declared):
            return [int(d) for d in declared]
        inferred = self._inferred_shapes().get(tensor.name)
        if declared is None and inferred is None:
            return None
        if declared is not None and inferred is not None and len(declared) != len(inferred):
            inferred = None
        rank = len(declared) if declared is not None else len(inferred)
        dims: list[int | str | None] = []
        for i in range(rank):
            options = [d[i] for d in (declared, inferred) if d is not None]
            known = [int(d) for d in options if isinstance(d, (int, np.integer)) and d > 0]
            params = [d for d in options if isinstance(d, str) and d]
            dims.append(known[0] if known else (params[0] if params else None))
        return dims

    def _inferred_shapes(self) -> dict:
        if self._inferred is None:
            self._inferred = G.inferred_shapes(self.graph, self.template)
        return self._inferred

    def _params_shared_by_inputs(self) -> set[str]:
        """Dim params that name several dims of the declared graph inputs. Two dims with any
        other param (one input dim, or a symbol made by shape inference) are equal at run
        time; these may be fed different sizes, so they prove nothing."""
        counts = Counter(d for t in self.graph.inputs for d in (t.shape or []) if isinstance(d, str))
        return {p for p, c in counts.items() if c > 1}

    # ------------------------------------------------------------------ element-wise tracking
    def _propagate(self) -> dict[int, tuple[gs.Tensor, _ShapeValue]]:
        values: dict[int, tuple[gs.Tensor, _ShapeValue]] = {}

        def value_of(t: gs.Tensor) -> _ShapeValue | None:
            if id(t) in values:
                return values[id(t)][1]
            if isinstance(t, gs.Constant) and len(t.shape) <= 1:
                ints = _small_int_values(t, SHAPE_VALUE_MAX_ELEMENTS)
                if ints is not None:
                    return _ShapeValue(ints, scalar=len(t.shape) == 0, dtype=t.dtype)
            return None

        for g in G.iter_graphs(self.graph):
            for node in g.nodes:
                if not G.is_default_domain(node) or not node.outputs or not node.inputs:
                    continue
                try:
                    out = self._transfer(node, g, value_of)
                except (ValueError, TypeError, IndexError, OverflowError):
                    out = None  # malformed shape arithmetic: leave it to run time
                if out is not None:
                    values[id(node.outputs[0])] = (node.outputs[0], out)
        return values

    def _transfer(self, node: gs.Node, g: gs.Graph, value_of) -> _ShapeValue | None:
        """The shape value of ``node``'s first output, or None when it is not tracked."""
        op, ins = node.op, node.inputs
        opset = self.graph.opset
        if op == "Shape":
            dims = self._dims(ins[0])
            if dims is None:
                return None
            rank = len(dims)
            start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))  # opset 15
            start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
            return _ShapeValue([d if isinstance(d, int) else _DimOf(ins[0], i, d) for i, d in
                                zip(range(start, end), dims[start:end])])
        if op == "Size":
            dims = self._dims(ins[0])
            if dims is None or not all(isinstance(d, int) for d in dims):
                return None
            return _ShapeValue([math.prod(dims)], scalar=True)

        data = value_of(ins[0])
        if data is None:
            return None
        if op == "Identity":
            return data
        if op == "Cast":
            to = int(node.attrs["to"])
            if to not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                return None
            return _ShapeValue(data.elements, data.scalar, helper.tensor_dtype_to_np_dtype(to))
        if op == "Gather":
            indices = value_of(ins[1]) if len(ins) > 1 else None
            if data.scalar or indices is None or not indices.known or int(node.attrs.get("axis", 0)) not in (0, -1):
                return None
            n = len(data.elements)
            picked = [data.elements[i + n if i < 0 else i] for i in indices.elements if -n <= i < n]
            if len(picked) != len(indices.elements):
                return None
            return _ShapeValue(picked, indices.scalar, data.dtype)
        if op == "Slice":
            if data.scalar:
                return None
            if opset < 10:
                starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
                axes, steps = node.attrs.get("axes"), None
            else:
                present = [i < len(ins) and not _is_omitted(ins[i]) for i in range(1, 5)]
                parts = [value_of(ins[i]) if present[i - 1] else None for i in range(1, 5)]
                if any(p and v is None for p, v in zip(present, parts)) or any(v is not None and not v.known for v in parts):
                    return None  # starts/ends/axes/steps computed at run time
                if parts[0] is None or parts[1] is None:
                    return None
                starts, ends = parts[0].elements, parts[1].elements
                axes = parts[2].elements if parts[2] is not None else None
                steps = parts[3].elements if parts[3] is not None else None
            if starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
                return None
            if axes is not None and list(axes) not in ([0], [-1]):
                return None
            step = steps[0] if steps else 1
            picks = _onnx_slice_indices(len(data.elements), int(starts[0]), int(ends[0]), int(step))
            return _ShapeValue([data.elements[i] for i in picks], False, data.dtype)
        if op == "Concat":
            if int(node.attrs.get("axis", 0)) not in (0, -1):
                return None
            parts = [value_of(t) for t in ins]
            if any(p is None or p.scalar for p in parts):
                return None
            return _ShapeValue([e for p in parts for e in p.elements], False, data.dtype)
        if op in ("Unsqueeze", "Squeeze"):
            if opset < 13:
                axes = node.attrs.get("axes")
            else:
                axes_value = value_of(ins[1]) if len(ins) > 1 and not _is_omitted(ins[1]) else None
                if len(ins) > 1 and not _is_omitted(ins[1]) and (axes_value is None or not axes_value.known):
                    return None
                axes = axes_value.elements if axes_value is not None else None
            if op == "Unsqueeze":
                if not data.scalar or axes is None or list(axes) not in ([0], [-1]):
                    return None
                return _ShapeValue(data.elements, False, data.dtype)
            if data.scalar or len(data.elements) != 1 or (axes is not None and list(axes) not in ([0], [-1])):
                return None
            return _ShapeValue(data.elements, True, data.dtype)
        if op == "Reshape" and len(ins) > 1:
            target = value_of(ins[1])
            if target is None or not target.known:
                return None
            n = len(data.elements)
            if not target.elements and n == 1:
                return _ShapeValue(data.elements, True, data.dtype)
            if len(target.elements) == 1 and target.elements[0] in (-1, n):
                return _ShapeValue(data.elements, False, data.dtype)
        return None

    # ------------------------------------------------------------------ rewriting
    def _materialize(self, values: dict, names: G.NameAllocator) -> list[gs.Constant]:
        """Replace every used, fully known shape value by a constant; returns the new constants."""
        graph_outputs = {id(t) for g in G.iter_graphs(self.graph) for t in g.outputs}
        created = []
        for tensor, value in values.values():
            if isinstance(tensor, gs.Constant) or not value.known:
                continue
            if not tensor.outputs and id(tensor) not in graph_outputs:
                continue
            if id(tensor) in graph_outputs and tensor.inputs and tensor.inputs[0].op == "Identity":
                continue  # Identity(constant) is how a constant graph output is written
            created.append(replace_with_constant(self.graph, tensor, value.array(), names, graph_outputs))
        return created

    def _static_reshape_targets(self, values: dict, names: G.NameAllocator) -> int:
        """Reshape(x, target) whose unknown target elements all copy x's own dims → constant target
        with 0 there (ONNX Reshape: 0 copies the input dim at that index unless allowzero=1)."""
        shared_params = self._params_shared_by_inputs()
        count = 0
        for g in G.iter_graphs(self.graph):
            for node in g.nodes:
                if node.op != "Reshape" or not G.is_default_domain(node) or len(node.inputs) < 2:
                    continue
                if int(node.attrs.get("allowzero", 0)) != 0 or id(node.inputs[1]) not in values:
                    continue
                data, (_, target) = node.inputs[0], values[id(node.inputs[1])]
                if target.scalar or target.known:
                    continue
                data_dims = None
                elements = []
                for i, e in enumerate(target.elements):
                    if isinstance(e, int):
                        elements.append(e)
                        continue
                    same = e.tensor is data and e.index == i
                    if not same and e.param is not None and e.param not in shared_params:
                        data_dims = data_dims if data_dims is not None else (self._dims(data) or [])
                        same = i < len(data_dims) and data_dims[i] == e.param
                    if not same:
                        break
                    elements.append(0)
                else:
                    hint = node.inputs[1].name or "reshape_shape"
                    node.inputs[1] = names.constant(hint + "_static", np.array(elements, dtype=np.int64))
                    count += 1
        return count


@register_pass
class SimplifyShapes(Pass):
    name = "simplify-shapes"
    summary = "Fold Shape/Size chains and Reshape targets to constants where shapes are known (also with --input-shape)."
    lossless = True

    @dataclass
    class Options:
        # Same rule as fold-constants for folding what the shape constants feed.
        size_threshold: int = DEFAULT_SIZE_THRESHOLD

    def __init__(self, options=None):
        super().__init__(options)
        self._memory: dict = {}

    def run(self, graph, ctx) -> PassResult:
        folder = ConstantFolder(graph, FoldRules(self.options.size_threshold, keep_dequantize=True), self._memory)
        simplifier = ShapeSimplifier(graph, folder, ctx.template)
        inputs_set = simplifier.apply_input_shapes(ctx.input_shapes or {})
        changed = simplifier.simplify()
        counters = {**simplifier.counters, **folder.counters}
        if inputs_set:
            counters["input_shapes_set"] = inputs_set
        return PassResult(changed=bool(changed or inputs_set), counters=counters, notes=folder.notes)
