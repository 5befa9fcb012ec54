"""Runtime-specific fusions: Conv/Gemm + activation → onnxruntime's ``com.microsoft`` contrib ops.

onnxruntime's CPU execution provider runs ``com.microsoft::FusedConv`` and
``com.microsoft::FusedGemm`` (float32 kernels only), which apply an activation to the
output tile while it is still in cache. onnxruntime builds them itself at its *extended*
optimization level; this pass writes them into the model so that a session with graph
optimizations disabled (or a runtime that loads pre-optimized models) gets them too.
TensorRT cannot parse contrib ops, so the pass only runs for target ``cpu``.

The attribute layouts follow onnxruntime's own schemas (``contrib_defs.cc``) and kernels:

* ``FusedConv``: the Conv attributes plus ``activation`` (string) and ``activation_params``
  (floats), read by ``GetFusedActivationAttr`` (``contrib_ops/cpu/fused_activation.cc``):
  ``Relu``, ``Tanh``, ``Sigmoid`` take no parameters, ``LeakyRelu`` takes ``[alpha]``,
  ``HardSigmoid`` ``[alpha, beta]`` and ``Clip`` ``[min, max]``. An optional fourth input
  ``Z`` (the "sum") is added to the convolution before the activation; the CPU kernel
  requires it to have exactly the output's shape (``conv.cc``: "output and sum shape must match").
* ``FusedGemm``: the Gemm attributes plus ``activation`` and the activation's own attributes
  prefixed with ``activation_`` (``contrib_ops/cpu/fused_gemm.cc``), built by
  ``ElementWiseRangedTransform::Create``, which knows Relu, LeakyRelu, Sigmoid, Tanh and
  HardSigmoid but not Clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.pass_base import PassResult
from onnxopt.passes.fusion import FusionPass, FusionRule, FusionRun, FusionSite, NoMatch, absorb_output, apply_rules
from onnxopt.registry import register_pass

MS_DOMAIN = "com.microsoft"
MS_DOMAIN_VERSION = 1
ACTIVATION_OPS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "Clip")
# onnxruntime's CPU FusedConv and FusedGemm kernels are registered for float32 only.
FLOAT32 = np.dtype(np.float32)
# The attributes of the FusedConv / FusedGemm schemas that come from Conv / Gemm.
CONV_ATTRS = frozenset({"auto_pad", "kernel_shape", "dilations", "strides", "pads", "group"})
GEMM_ATTRS = frozenset({"alpha", "beta", "transA", "transB"})
# Clip before opset 11: absent min/max attributes default to the float range (ONNX Clip-6).
_FLOAT_MAX = float(np.finfo(np.float32).max)


# =========================================================================== activations
@dataclass(frozen=True)
class Activation:
    """An activation node in the form the fused kernels take: its op type and parameters."""

    node: gs.Node
    op: str
    # In FusedConv ``activation_params`` order: [alpha] / [alpha, beta] / [min, max].
    params: tuple[float, ...] = ()

    def fused_conv_attrs(self) -> dict:
        attrs: dict = {"activation": self.op}
        if self.params:
            attrs["activation_params"] = [float(p) for p in self.params]
        return attrs

    def fused_gemm_attrs(self) -> dict:
        # FusedGemm hands ``activation_<name>`` attributes to the activation functor as ``<name>``.
        names = {"LeakyRelu": ("alpha",), "HardSigmoid": ("alpha", "beta")}.get(self.op, ())
        attrs: dict = {"activation": self.op}
        for name, value in zip(names, self.params):
            attrs[f"activation_{name}"] = float(value)
        return attrs


def read_activation(graph: gs.Graph, node: gs.Node) -> "Activation | str":
    """The activation computed by ``node``, or why a fused kernel cannot compute it."""
    op = node.op
    if op in ("Relu", "Sigmoid", "Tanh"):
        return Activation(node, op)
    if op == "LeakyRelu":
        return Activation(node, op, (_as_float32(G.attr(node, "alpha", 0.01)),))
    if op == "HardSigmoid":
        return Activation(node, op, (_as_float32(G.attr(node, "alpha", 0.2)), _as_float32(G.attr(node, "beta", 0.5))))
    if op == "Clip":
        bounds = _clip_bounds(graph, node)
        if isinstance(bounds, str):
            return bounds
        return Activation(node, op, bounds)
    return f"{op} is not an activation onnxruntime fuses"


def _clip_bounds(graph: gs.Graph, node: gs.Node) -> "tuple[float, float] | str":
    """(min, max) of a Clip: attributes before opset 11, optional constant inputs from opset 11 on."""
    if graph.opset is not None and graph.opset < 11 or "min" in node.attrs or "max" in node.attrs:
        lo = _as_float32(G.attr(node, "min", -_FLOAT_MAX))
        hi = _as_float32(G.attr(node, "max", _FLOAT_MAX))
    else:
        bounds = []
        for index, absent in ((1, -np.inf), (2, np.inf)):
            tensor = _optional_input(node, index)
            if tensor is None:
                bounds.append(absent)  # no bound on that side (ONNX Clip-11)
                continue
            value = G.constant_value(tensor)
            if value is None:
                return f"Clip bound '{tensor.name}' is not constant"
            if value.size != 1:
                return f"Clip bound '{tensor.name}' is not a scalar"
            if value.dtype != FLOAT32:
                return f"Clip bound '{tensor.name}' is {value.dtype}, not float32"
            bounds.append(float(value.reshape(())))
        lo, hi = bounds
    if np.isnan(lo) or np.isnan(hi):
        return "Clip bound is NaN"
    if lo > hi:
        return f"Clip min {lo} > max {hi}"
    return lo, hi


def _as_float32(value) -> float:
    """An attribute as the float32 onnxruntime reads (FLOAT attributes are 32-bit)."""
    return float(np.float32(value))


def _optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` of ``node``, or None when it is missing or omitted (empty name)."""
    if index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    if isinstance(tensor, gs.Variable) and tensor.name == "" and not tensor.inputs:
        return None
    return tensor


def _dtype_problem(node: gs.Node, tensors: list[gs.Tensor]) -> str | None:
    """Why the fused float32-only kernel cannot replace ``node`` reading ``tensors`` (None when it can)."""
    known = []
    for tensor in tensors:
        if tensor is None or tensor.dtype is None:
            continue
        try:
            known.append(np.dtype(tensor.dtype))
        except TypeError:  # an onnx-only type such as bfloat16
            return f"{node.op} '{node.name}' computes in a type numpy does not know; onnxruntime fuses float32 only"
    if not known:
        return f"{node.op} '{node.name}' element type is unknown; onnxruntime fuses float32 only"
    for dtype in known:
        if dtype != FLOAT32:
            return f"{node.op} '{node.name}' is {dtype}; onnxruntime's CPU kernel is float32 only"
    return None


# =========================================================================== Conv/Gemm + activation
@dataclass
class ActivationMatch:
    activation: Activation
    producer: gs.Node
    counter: str


class ActivationIntoConvOrGemm(FusionRule):
    """Conv → activation becomes FusedConv; Gemm → activation becomes FusedGemm (anchor: the activation)."""

    anchor_ops = ACTIVATION_OPS
    counter = "activations_fused"

    def match(self, site: FusionSite, act: gs.Node):
        if not act.inputs or len(act.outputs) != 1:
            return None
        x = act.inputs[0]
        producer = site.local_producer(x)
        if producer is None or producer.op not in ("Conv", "Gemm") or len(producer.outputs) != 1:
            return None  # e.g. a Relu after an Add: ResidualAddIntoConv's or nobody's
        problem = site.sole_use_problem(x, act)
        if problem:
            return NoMatch(act, problem)
        activation = read_activation(site.root, act)
        if isinstance(activation, str):
            return NoMatch(act, activation)
        problem = _dtype_problem(producer, producer.inputs[:3])
        if problem:
            return NoMatch(act, problem)
        if producer.op == "Conv":
            problem = _conv_problem(producer)
            if problem:
                return NoMatch(act, problem)
            return ActivationMatch(activation, producer, "conv_activation_fused")
        if site.root.opset is not None and site.root.opset < 7:
            return NoMatch(act, "Gemm before opset 7 has legacy broadcast semantics that FusedGemm lacks")
        if set(producer.attrs) - GEMM_ATTRS:
            return NoMatch(act, f"Gemm '{producer.name}' has attributes FusedGemm lacks: {sorted(set(producer.attrs) - GEMM_ATTRS)}")
        if activation.op == "Clip":
            return NoMatch(act, "onnxruntime's FusedGemm has no Clip activation")
        return ActivationMatch(activation, producer, "gemm_activation_fused")

    def rewrite(self, site: FusionSite, match: ActivationMatch) -> int:
        node = match.producer
        if node.op == "Conv":
            node.op = "FusedConv"
            node.attrs.update(match.activation.fused_conv_attrs())
        else:
            node.op = "FusedGemm"
            node.attrs.update(match.activation.fused_gemm_attrs())
        node.domain = MS_DOMAIN
        absorb_output(site, node, match.activation.node)
        return 1


def _conv_problem(conv: gs.Node) -> str | None:
    if len(conv.inputs) not in (2, 3):
        return f"Conv '{conv.name}' has {len(conv.inputs)} inputs"
    unknown = set(conv.attrs) - CONV_ATTRS
    if unknown:
        return f"Conv '{conv.name}' has attributes FusedConv lacks: {sorted(unknown)}"
    return None


# =========================================================================== Conv + Add (+ activation)
class ShapeRun(FusionRun):
    """A fusion run that also knows tensor shapes, inferred once before any rewrite.

    ONNX shape inference cannot see through the ``com.microsoft`` ops this pass emits, so
    the shapes are taken from the graph as it is when the run starts (the rewrites keep
    tensor names and shapes).
    """

    def __init__(self, root: gs.Graph):
        super().__init__(root)
        self._shapes = G.inferred_shapes(root) if _has_conv_add(root) else {}

    def dims(self, tensor: gs.Tensor) -> list | None:
        """The tensor's dims (ints, or dim_param names), or None when any dim is unknown."""
        declared = tensor.shape if isinstance(tensor, gs.Variable) else None
        if declared is not None and all(isinstance(d, (int, np.integer)) and d >= 0 or isinstance(d, str) and d
                                        for d in declared):
            return [int(d) if isinstance(d, (int, np.integer)) else d for d in declared]
        dims = self._shapes.get(tensor.name)
        if dims is None or any(d is None for d in dims):
            return None
        return dims


def _has_conv_add(root: gs.Graph) -> bool:
    """Whether any Add of two computed tensors reads a Conv (only then are shapes needed)."""
    for g in G.iter_graphs(root):
        for node in g.nodes:
            if node.op == "Add" and G.is_default_domain(node) and not any(map(G.is_constant, node.inputs)):
                if any(p is not None and p.op == "Conv" for p in map(G.producer, node.inputs)):
                    return True
    return False


@dataclass
class ResidualMatch:
    add: gs.Node
    conv: gs.Node
    residual: gs.Tensor
    activation: Activation | None
    counter: str = "conv_add_fused"


class ResidualAddIntoConv(FusionRule):
    """Conv → Add(residual) [→ activation] becomes FusedConv(X, W, B, Z=residual) [activation].

    onnxruntime's CPU Conv kernel adds ``Z`` to the convolution output before the bias and
    activation epilogue (MLAS ``Beta = 1``), so ``act(conv(X) + B + Z)`` is one kernel.
    ``Z`` must be a computed tensor of exactly the output's shape; constant addends are
    ``fuse-conv-add``'s job.
    """

    anchor_ops = ("Add",)
    counter = "conv_add_fused"

    def match(self, site: FusionSite, add: gs.Node):
        if len(add.inputs) != 2 or len(add.outputs) != 1 or "broadcast" in add.attrs:
            return None
        convs = [(i, p) for i, p in enumerate(site.local_producer(t) for t in add.inputs)
                 if p is not None and p.op == "Conv" and len(p.outputs) == 1]
        if not convs or any(G.is_constant(t) for t in add.inputs):
            return None
        reasons = []
        for index, conv in convs:
            y, residual = add.inputs[index], add.inputs[1 - index]
            problem = (site.sole_use_problem(y, add) or _conv_problem(conv)
                       or _dtype_problem(conv, conv.inputs[:3] + [residual]))
            if problem is None:
                problem = _same_shape_problem(site.run, y, residual)
            if problem:
                reasons.append(problem)
                continue
            return ResidualMatch(add, conv, residual, _following_activation(site, add))
        return NoMatch(add, "; ".join(reasons))

    def rewrite(self, site: FusionSite, match: ResidualMatch) -> int:
        conv = match.conv
        if len(conv.inputs) == 2:
            conv.inputs.append(gs.Variable.empty())  # no bias: an omitted optional input
        conv.inputs.append(match.residual)
        conv.op = "FusedConv"
        conv.domain = MS_DOMAIN
        absorb_output(site, conv, match.add)
        if match.activation is None:
            return 1
        conv.attrs.update(match.activation.fused_conv_attrs())
        absorb_output(site, conv, match.activation.node)
        return 2


def _same_shape_problem(run: ShapeRun, y: gs.Tensor, residual: gs.Tensor) -> str | None:
    y_dims, r_dims = run.dims(y), run.dims(residual)
    if y_dims is None or r_dims is None:
        return f"shape of '{y.name if y_dims is None else residual.name}' is unknown; Z must match the output exactly"
    if y_dims != r_dims:
        return f"residual shape {r_dims} differs from the Conv output shape {y_dims} (FusedConv's Z does not broadcast)"
    return None


def _following_activation(site: FusionSite, add: gs.Node) -> Activation | None:
    """The activation that alone reads ``add``'s output and can join the fusion, else None."""
    out = add.outputs[0]
    readers = G.consumers(out)
    if len(readers) != 1:
        return None
    act = readers[0]
    if act.op not in ACTIVATION_OPS or not G.is_default_domain(act) or id(act) not in site.node_ids:
        return None
    if site.sole_use_problem(out, act) or act.inputs[0] is not out or len(act.outputs) != 1:
        return None
    activation = read_activation(site.root, act)
    return None if isinstance(activation, str) else activation


# =========================================================================== the pass
@register_pass
class FuseConvActivation(FusionPass):
    name = "fuse-conv-activation"
    summary = ("Fuse Conv/Gemm with a following activation (and Conv with a residual Add) into "
               "onnxruntime's com.microsoft FusedConv/FusedGemm (CPU target only).")
    targets: ClassVar[tuple[str, ...]] = ("cpu",)
    run_once = True  # after the fixed point: FusedConv hides its Conv from every other fusion
    rules = (ResidualAddIntoConv(), ActivationIntoConvOrGemm())

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        target = getattr(ctx, "target", "cpu")
        if target != "cpu":
            return PassResult(False, notes=[
                f"skipped for target '{target}': FusedConv/FusedGemm are onnxruntime CPU contrib ops "
                "(com.microsoft); TensorRT cannot parse them"])
        explain = bool(self.options.explain or getattr(ctx, "explain", False))
        result = apply_rules(graph, self.rules, explain=explain, max_notes=max(0, int(self.options.max_notes)),
                             run_factory=ShapeRun)
        if result.changed:
            G.declare_opset(graph, MS_DOMAIN, MS_DOMAIN_VERSION)
        return result
