"""Lossless vertical fusion passes: fold a linear op next to Conv/ConvTranspose/Gemm/MatMul into its
weights, and a zero Pad into the ``pads`` of the Conv or pool that reads it.

Every fusion here is one *rule*: a small class with

* ``anchor_ops``: the op types where matching starts (the node that disappears),
* ``match(site, node)``: ``None`` when the node is no candidate at all (say an ``Add`` of two
  activations), a :class:`NoMatch` carrying the reason when it is a candidate that cannot fuse
  ("why did this not fuse?"), or a match object that ``rewrite`` consumes,
* ``rewrite(site, match)``: the graph edit.

:func:`apply_rules` drives a tuple of rules over the graph and every subgraph; a registered
pass (:class:`FusionPass` subclass) is just a name, a summary and its rules. The reasons of
rejected candidates go to ``PassResult.notes`` (at most ``max_notes`` of them) when the pass
option ``explain`` is set or the context carries a truthy ``explain`` attribute.

Most rules here fold a per-output-channel affine map ``y' = y * scale + shift`` into the
producer of ``y``; :class:`AffineTarget` knows how each producer (Conv, ConvTranspose, Gemm,
MatMul) absorbs one. ``fold-batchnorm`` also folds a BN that *precedes* an unpadded Conv or a
Gemm/MatMul into that reader's weights (:class:`BatchNormIntoConsumer`). New weights are computed
in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.pass_base import Pass, PassResult
from onnxopt.registry import register_pass

# Weight dtypes the folds compute with (float64 math, cast back). Integer Gemm/MatMul are left
# alone: scaling integer weights is not exact and Div would change integer semantics.
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# =========================================================================== match plumbing
@dataclass(frozen=True)
class NoMatch:
    """A candidate that did not fuse, and why."""

    node: gs.Node
    reason: str

    def describe(self) -> str:
        return f"{self.node.op} '{self.node.name}': {self.reason}"


class FusionRun:
    """State shared by every rule during one run over a graph: built once, so a run stays O(graph).

    * ``names`` hands out unique names for new weights,
    * ``output_ids`` are the graph output tensors (every subgraph's included); rewrites keep
      the same output tensor objects, so the set stays valid,
    * ranks come from declarations, the producer, or (lazily, once) ONNX shape inference;
      rewrites never change a tensor's rank,
    * ``removed`` collects the anchors that rewrites detached; they leave the node lists at the end.
    """

    def __init__(self, root: gs.Graph):
        self.root = root
        self.names = G.NameAllocator(root)
        self.output_ids = {id(t) for g in G.iter_graphs(root) for t in g.outputs}
        self.removed: list[gs.Node] = []
        self._inferred_shapes: dict[str, list] | None = None

    def rank(self, tensor: gs.Tensor) -> int | None:
        rank = _static_rank(tensor)
        if rank is not None or not tensor.name:
            return rank
        if self._inferred_shapes is None:
            self.flush_removed()  # export a graph without half-detached nodes
            self._inferred_shapes = G.inferred_shapes(self.root)
        dims = self._inferred_shapes.get(tensor.name)
        return None if dims is None else len(dims)

    def detach(self, node: gs.Node) -> None:
        """Disconnect ``node`` now; it leaves its graph's node list at the end of the run."""
        node.inputs.clear()
        node.outputs.clear()
        self.removed.append(node)

    def flush_removed(self) -> None:
        G.remove_nodes(self.root, self.removed)
        self.removed.clear()


@dataclass
class FusionSite:
    """Where a rule is matching: the run, the (sub)graph holding the anchor and that graph's nodes."""

    run: FusionRun
    graph: gs.Graph
    node_ids: set[int]

    @property
    def root(self) -> gs.Graph:
        return self.run.root

    def local_producer(self, tensor: gs.Tensor) -> gs.Node | None:
        """The producer of ``tensor`` when it lives in this (sub)graph and the default domain."""
        node = G.producer(tensor)
        if node is None or id(node) not in self.node_ids or not G.is_default_domain(node):
            return None
        return node

    def sole_use_problem(self, tensor: gs.Tensor, reader: gs.Node) -> str | None:
        """Why ``tensor`` cannot disappear into a fusion with ``reader`` (None when it can)."""
        readers = G.consumers(tensor)
        if len(readers) != 1 or readers[0] is not reader:
            return f"'{tensor.name}' has {len(readers)} consumers; it must feed only this node"
        if id(tensor) in self.run.output_ids:
            return f"'{tensor.name}' is a graph output"
        return None


class FusionRule:
    """One fusion pattern. Subclasses set ``anchor_ops`` and ``counter`` and implement match/rewrite."""

    anchor_ops: ClassVar[tuple[str, ...]] = ()
    # PassResult counter incremented per rewrite.
    counter: ClassVar[str] = "fused"

    def match(self, site: FusionSite, node: gs.Node):  # -> match object | NoMatch | None
        raise NotImplementedError

    def rewrite(self, site: FusionSite, match) -> "int | NoMatch":
        """Apply ``match``; return the number of nodes removed, or a NoMatch when it cannot apply."""
        raise NotImplementedError


def apply_rules(graph: gs.Graph, rules: tuple[FusionRule, ...], *, explain: bool = False,
                max_notes: int = 20, run_factory: type[FusionRun] | None = None) -> PassResult:
    """Match and rewrite every node of ``graph`` and its subgraphs, in graph order.

    Graph order means a chain (Conv → Mul → Add) collapses in one run: once Mul is folded
    the Add reads the Conv directly. A match object may carry its own ``counter`` name.
    Rules sharing an anchor op are tried in order until one rewrites; a node that no rule
    rewrites counts as one rejected candidate whose reason joins every rule's reason.
    """
    by_op: dict[str, list[FusionRule]] = {}
    for rule in rules:
        for op in rule.anchor_ops:
            by_op.setdefault(op, []).append(rule)
    counters: Counter = Counter()
    rejected: list[NoMatch] = []
    run = (run_factory or FusionRun)(graph)
    for sub in list(G.iter_graphs(graph)):
        site = FusionSite(run, sub, {id(n) for n in sub.nodes})
        for node in list(sub.nodes):
            if not node.outputs or not G.is_default_domain(node):
                continue  # removed by an earlier rewrite, or a custom-domain op
            reasons: list[NoMatch] = []  # of the rules that rejected this node so far
            for rule in by_op.get(node.op, ()):
                found = rule.match(site, node)
                if found is None:
                    continue
                if isinstance(found, NoMatch):
                    reasons.append(found)
                    continue
                removed = rule.rewrite(site, found)
                if isinstance(removed, NoMatch):
                    reasons.append(removed)
                    continue
                counters[getattr(found, "counter", None) or rule.counter] += 1
                counters["nodes_removed"] += removed
                reasons.clear()  # a later rule fused it: the earlier rejections do not matter
                break
            if reasons:  # one rejection per node, with every rule's reason
                rejected.append(reasons[0] if len(reasons) == 1 else
                                NoMatch(reasons[0].node, " | ".join(r.reason for r in reasons)))
    run.flush_removed()
    if rejected:
        counters["candidates_rejected"] = len(rejected)
    notes: list[str] = []
    if explain:
        notes = [r.describe() for r in rejected[:max_notes]]
        if len(rejected) > max_notes:
            notes.append(f"... and {len(rejected) - max_notes} more candidates not fused")
    return PassResult(changed=counters["nodes_removed"] > 0, counters=dict(counters), notes=notes)


def absorb_output(site: FusionSite, producer: gs.Node, anchor: gs.Node) -> None:
    """Remove ``anchor`` and let ``producer`` write the anchor's output (its name survives)."""
    out = anchor.outputs[0]
    site.run.detach(anchor)  # frees ``out`` for its new producer
    producer.outputs[0] = out


# =========================================================================== small helpers
def _present(tensor: gs.Tensor | None) -> bool:
    """False for an omitted optional input (empty name)."""
    return tensor is not None and not (isinstance(tensor, gs.Variable) and tensor.name == "" and not tensor.inputs)


def _optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    if index < len(node.inputs) and _present(node.inputs[index]):
        return node.inputs[index]
    return None


def _set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """Set input ``index``, appending it when the node has exactly ``index`` inputs."""
    if index < len(node.inputs):
        node.inputs[index] = tensor
    else:
        node.inputs.append(tensor)


def _string_attr(node: gs.Node, name: str, default: str) -> str:
    value = G.attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _before_opset_7(site: FusionSite) -> bool:
    return site.root.opset is not None and site.root.opset < 7


def _folded_name(name: str) -> str:
    """Name hint for a rewritten weight: ``w`` → ``w_folded`` (not ``w_folded_folded`` on a second fold)."""
    return name.removesuffix("_folded") + "_folded"


def _tensor_dtype(tensor: gs.Tensor) -> np.dtype | None:
    if isinstance(tensor, gs.Constant):
        return tensor.values.dtype
    try:
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:  # an onnx-only dtype such as bfloat16
        return None


def _static_rank(tensor: gs.Tensor) -> int | None:
    """The rank of ``tensor`` when declared, or evident from its producer (Flatten, Reshape to a constant shape)."""
    if isinstance(tensor, gs.Constant):
        return tensor.values.ndim
    if tensor.shape is not None:
        return len(tensor.shape)
    node = G.producer(tensor)
    if node is not None and G.is_default_domain(node):
        if node.op == "Flatten":
            return 2
        if node.op == "Gemm":
            return 2
        if node.op == "Reshape" and len(node.inputs) > 1:
            target = G.constant_value(node.inputs[1])
            if target is not None and target.ndim == 1:
                return int(target.shape[0])
    return None


def per_channel_vector(const: np.ndarray, out_rank: int | None, channel_axis: int, channels: int,
                       legacy_axis: int | None = None) -> np.ndarray | str:
    """``const`` as a length-``channels`` float64 vector, or the reason it is not per channel.

    Broadcasting (numpy rules, ONNX "multidirectional broadcasting") ``const`` against the
    producer's output must neither enlarge the output nor vary along any axis other than
    ``channel_axis`` (a negative axis counts from the end). ``legacy_axis`` is the ``axis``
    attribute of opset < 7 ``broadcast=1`` binary ops, which aligns ``const`` at that axis.
    """
    if out_rank is None:
        if const.ndim > 1 or channel_axis != -1:
            return f"output rank unknown; cannot check the broadcast of constant shape {const.shape}"
        out_rank = max(const.ndim, 1)
    if const.ndim > out_rank:
        return f"constant of shape {const.shape} would broadcast the rank-{out_rank} output to a higher rank"
    if legacy_axis is not None:
        start = legacy_axis + out_rank if legacy_axis < 0 else legacy_axis
        if start < 0 or start + const.ndim > out_rank:
            return f"legacy broadcast axis {legacy_axis} does not fit constant shape {const.shape}"
        aligned = (1,) * start + const.shape + (1,) * (out_rank - start - const.ndim)
    else:
        aligned = (1,) * (out_rank - const.ndim) + const.shape
    axis = channel_axis % out_rank
    for i, size in enumerate(aligned):
        if i == axis:
            if size not in (1, channels):
                return f"constant of shape {const.shape} has {size} entries on the channel axis, expected 1 or {channels}"
        elif size != 1:
            return f"constant of shape {const.shape} varies along axis {i} of the output, not per channel"
    vector = const.astype(np.float64).reshape(aligned[axis])
    return np.broadcast_to(vector, (channels,)).copy()


# =========================================================================== affine targets
FOLD_TARGET_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class AffineTarget:
    """A Conv/ConvTranspose/Gemm/MatMul that can absorb ``y * scale + shift`` per output channel.

    Output channels are axis 1 for Conv/ConvTranspose/Gemm and the last axis for MatMul.
    """

    node: gs.Node
    channels: int
    channel_axis: int          # axis of the output that holds the channels (-1 for MatMul)
    out_rank: int | None
    dtype: np.dtype
    weight: np.ndarray | None  # None when the weight is not constant
    bias: np.ndarray | None    # Conv bias or beta * Gemm C, in float64; None when absent

    @classmethod
    def inspect(cls, site: FusionSite, node: gs.Node, *, scales: bool, shifts: bool) -> "AffineTarget | str":
        """The target for ``node``, or why it cannot absorb a scale (``scales``) / shift (``shifts``)."""
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            return f"{node.op} '{node.name}' has an unexpected signature"
        weight_tensor = node.inputs[1]
        dtype = _tensor_dtype(weight_tensor)
        if dtype not in FLOAT_DTYPES:
            return f"{node.op} '{node.name}' weight dtype {dtype} is not float16/32/64"
        weight = G.constant_value(weight_tensor)
        if scales and weight is None:
            return f"{node.op} '{node.name}' weight '{weight_tensor.name}' is not constant"
        shape = tuple(weight.shape) if weight is not None else G.static_shape(weight_tensor)
        if shape is None:
            return f"{node.op} '{node.name}' weight shape is unknown"
        channel_axis, out_rank = 1, len(shape)
        if node.op == "Conv":
            channels = shape[0]
        elif node.op == "ConvTranspose":
            group = int(G.attr(node, "group", 1))
            channels = shape[1] * group
            if shape[0] % group:
                return f"ConvTranspose '{node.name}' weight shape {shape} does not split into {group} groups"
        elif node.op == "Gemm":
            if len(shape) != 2:
                return f"Gemm '{node.name}' weight is not 2-D"
            channels = shape[0] if int(G.attr(node, "transB", 0)) else shape[1]
            out_rank = 2
            if _before_opset_7(site):
                return "Gemm before opset 7 broadcasts C only with its legacy broadcast attribute"
        elif node.op == "MatMul":
            if len(shape) != 2:
                return f"MatMul '{node.name}' weight is not 2-D (batched MatMul has no per-column weight)"
            channels, channel_axis = shape[1], -1
            x_rank = site.run.rank(node.inputs[0])
            out_rank = None if x_rank is None else max(x_rank, 1)
            if x_rank == 1:
                return f"MatMul '{node.name}' input is 1-D"
            if shifts and x_rank != 2:
                # The shift needs a bias, i.e. a Gemm, and Gemm is 2-D only.
                why = "unknown" if x_rank is None else f"{x_rank}-D"
                return f"MatMul '{node.name}' input rank is {why}; a bias needs Gemm, which takes 2-D input"
            if shifts and _before_opset_7(site):
                return "Gemm before opset 7 broadcasts C only with its legacy broadcast attribute"
        else:  # pragma: no cover - callers only pass FOLD_TARGET_OPS
            return f"{node.op} is not a fold target"
        bias = None
        bias_tensor = _optional_input(node, 2) if node.op != "MatMul" else None
        if bias_tensor is not None:
            value = G.constant_value(bias_tensor)
            if value is None:
                return f"{node.op} '{node.name}' bias '{bias_tensor.name}' is not constant"
            bias = value.astype(np.float64)
            if node.op == "Gemm":
                bias = bias * float(G.attr(node, "beta", 1.0))
        return cls(node, int(channels), channel_axis, out_rank, dtype, weight, bias)

    # -------------------------------------------------------------------- rewriting
    def apply(self, site: FusionSite, scale: np.ndarray | None, shift: np.ndarray | None) -> None:
        """Rewrite the node so that it computes ``output * scale + shift`` (per output channel)."""
        node = self.node
        if scale is not None:
            weight = self._scaled_weight(scale).astype(self.dtype)
            node.inputs[1] = site.run.names.constant(_folded_name(node.inputs[1].name), weight)
        bias = self.bias
        if bias is not None and scale is not None:
            bias = bias * scale  # per column; a Gemm C of shape (N, 1) broadcasts to (N, M)
        if shift is not None:
            bias = shift if bias is None else bias + shift
        if bias is None:
            return
        if node.op == "MatMul":
            # MatMul(X, W) + bias == Gemm(X, W, bias) for 2-D X (ONNX Gemm: Y = alpha*A*B + beta*C).
            node.op = "Gemm"
            node.attrs = {}
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0  # the old beta is already inside ``bias``
        node_bias = site.run.names.constant(_folded_name(f"{node.name or node.op}_bias"), bias.astype(self.dtype))
        _set_input(node, 2, node_bias)

    def _scaled_weight(self, scale: np.ndarray) -> np.ndarray:
        # One rounding per element either way: float32 products of float32 weights with the
        # (float64-computed) scale are within 1 ulp of a float64 product, at half the cost on
        # 100 MB of weights. fp16 weights are scaled in float32, float64 ones in float64.
        work = np.float64 if self.weight.dtype == np.float64 else np.float32
        w = self.weight.astype(work, copy=False)
        scale = np.asarray(scale).astype(work)
        op = self.node.op
        if op == "Conv":  # W: (C_out, C_in/group, k...)
            return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        if op == "ConvTranspose":  # W: (C_in, C_out/group, k...); output channel = g * C_out/group + j
            group = int(G.attr(self.node, "group", 1))
            grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
            per_group = scale.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
            return (grouped * per_group).reshape(w.shape)
        if op == "Gemm" and int(G.attr(self.node, "transB", 0)):  # B: (M, K)
            return w * scale[:, None]
        return w * scale[None, :]  # Gemm B or MatMul W: (K, M)


@dataclass
class AffineFoldMatch:
    """``anchor`` (BN, Add, Mul, …) applies ``y * scale + shift`` to the output of ``target``."""

    anchor: gs.Node
    target: AffineTarget
    scale: np.ndarray | None
    shift: np.ndarray | None


class AffineFoldRule(FusionRule):
    """Shared rewrite of the rules that fold a per-channel affine map into the producer."""

    def rewrite(self, site: FusionSite, match: AffineFoldMatch) -> int:
        match.target.apply(site, match.scale, match.shift)
        absorb_output(site, match.target.node, match.anchor)
        return 1


# =========================================================================== fold-batchnorm
def batchnorm_affine(bn: gs.Node) -> "tuple[np.ndarray, np.ndarray] | NoMatch":
    """Inference BN as ``y = x * s + t`` per channel of axis 1 (float64), or why it is not one.

    ONNX spec: ``y = (x - mean) / sqrt(var + epsilon) * scale + B``, i.e.
    ``s = scale / sqrt(var + epsilon)`` and ``t = B - mean * s``.
    """
    if int(G.attr(bn, "training_mode", 0)):
        return NoMatch(bn, "training_mode=1 normalises with batch statistics")
    if any(_present(t) for t in bn.outputs[1:]):
        # Opsets 7-13: the mean/var outputs exist only in training mode (spec "Output case #1"),
        # and onnxruntime then normalises with batch statistics.
        return NoMatch(bn, "has running mean/var outputs, i.e. runs in training mode")
    if len(bn.inputs) != 5:
        return NoMatch(bn, f"has {len(bn.inputs)} inputs, expected 5")
    params = [G.constant_value(t) for t in bn.inputs[1:]]
    if any(p is None for p in params):
        return NoMatch(bn, "scale, bias, mean and var are not all constant")
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    if not all(p.ndim == 1 and p.shape == gamma.shape for p in (beta, mean, var)) or gamma.ndim != 1:
        return NoMatch(bn, "parameters are not 1-D vectors of one length (spatial=0 form)")
    var_eps = var + float(G.attr(bn, "epsilon", 1e-5))
    if np.any(var_eps <= 0) or not np.all(np.isfinite(var_eps)):
        return NoMatch(bn, "var + epsilon is not positive and finite")
    scale = gamma / np.sqrt(var_eps)
    return scale, beta - mean * scale


class BatchNormIntoProducer(AffineFoldRule):
    """BatchNormalization (inference) after Conv/ConvTranspose/Gemm/MatMul → scaled weights and bias.

    ``y = x * s + t`` per output channel of the producer (see :func:`batchnorm_affine`).
    """

    anchor_ops = ("BatchNormalization",)
    counter = "batchnorms_folded"

    def match(self, site: FusionSite, bn: gs.Node):
        affine = batchnorm_affine(bn)
        if isinstance(affine, NoMatch):
            return affine
        scale, shift = affine
        x = bn.inputs[0]
        prod = site.local_producer(x)
        if prod is None or prod.op not in FOLD_TARGET_OPS:
            what = f"{prod.op} '{prod.name}'" if prod is not None else "no node of this graph"
            return NoMatch(bn, f"input is produced by {what}; only Conv/ConvTranspose/Gemm/MatMul fold")
        problem = site.sole_use_problem(x, bn)
        if problem:
            return NoMatch(bn, problem)
        target = AffineTarget.inspect(site, prod, scales=True, shifts=True)
        if isinstance(target, str):
            return NoMatch(bn, target)
        if scale.shape[0] != target.channels:
            return NoMatch(bn, f"{scale.shape[0]} BN channels vs {target.channels} output channels of {prod.op}")
        return AffineFoldMatch(bn, target, scale, shift)


@dataclass
class InputFoldMatch:
    """``reader`` (Conv/Gemm/MatMul) gets ``weight`` and ``bias`` and reads the BN's input."""

    bn: gs.Node
    reader: gs.Node
    weight: np.ndarray
    bias: np.ndarray


class BatchNormIntoConsumer(FusionRule):
    """BatchNormalization (inference) *before* a Conv with zero pads, or a Gemm/MatMul → new weights and bias.

    With ``x' = x * s + t`` per input channel c (axis 1) and a Conv whose every window lies inside
    the input (no padding: a padded Conv would read 0 where the BN output holds ``t``)::

        Conv(W, b)(x') = Conv(W', b')(x),  W'[o, i, k] = W[o, i, k] * s[c(o, i)],
                                            b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[c(o, i)]

    where ``c(o, i) = (o // (C_out / group)) * (C_in / group) + i`` is the input channel that
    in-group index i of output channel o reads (ONNX Conv ``group``). For a 2-D input A (BN over
    its feature axis) Gemm is ``alpha * (A s + t) B + beta C = alpha * A (diag(s) B) + (beta C + alpha t B)``.
    """

    anchor_ops = ("BatchNormalization",)
    counter = "batchnorms_folded"
    reader_ops = ("Conv", "Gemm", "MatMul")

    def match(self, site: FusionSite, bn: gs.Node):
        affine = batchnorm_affine(bn)
        if isinstance(affine, NoMatch):
            return affine
        scale, shift = affine
        y = bn.outputs[0]
        readers = G.consumers(y)
        reader = readers[0] if readers else None
        if reader is None or reader.op not in self.reader_ops or id(reader) not in site.node_ids \
                or not G.is_default_domain(reader):
            what = f"{reader.op} '{reader.name}'" if reader is not None else "no node"
            return NoMatch(bn, f"output is read by {what}; only a following Conv/Gemm/MatMul folds")
        problem = site.sole_use_problem(y, reader)
        if problem:
            return NoMatch(bn, problem)
        if reader.inputs[0] is not y or any(t is y for t in reader.inputs[1:]):
            return NoMatch(bn, f"output is not only the data input of {reader.op} '{reader.name}'")
        weight = G.constant_value(reader.inputs[1]) if len(reader.inputs) > 1 else None
        if weight is None:
            return NoMatch(bn, f"{reader.op} '{reader.name}' weight is not constant")
        if weight.dtype not in FLOAT_DTYPES:
            return NoMatch(bn, f"{reader.op} '{reader.name}' weight dtype {weight.dtype} is not float16/32/64")
        bias = None
        bias_tensor = _optional_input(reader, 2) if reader.op != "MatMul" else None
        if bias_tensor is not None:
            bias = G.constant_value(bias_tensor)
            if bias is None:
                return NoMatch(bn, f"{reader.op} '{reader.name}' bias '{bias_tensor.name}' is not constant")
            bias = bias.astype(np.float64)
        if reader.op == "Conv":
            folded = self._into_conv(reader, weight, bias, scale, shift)
        else:
            folded = self._into_gemm(site, bn, reader, weight, bias, scale, shift)
        if isinstance(folded, str):
            return NoMatch(bn, folded)
        new_weight, new_bias = folded
        return InputFoldMatch(bn, reader, new_weight.astype(weight.dtype), new_bias.astype(weight.dtype))

    @staticmethod
    def _into_conv(conv: gs.Node, weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray,
                   shift: np.ndarray) -> "tuple[np.ndarray, np.ndarray] | str":
        where = f"Conv '{conv.name}'"
        auto_pad = _string_attr(conv, "auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            return f"{where} has auto_pad={auto_pad}: it pads with 0 where the BN output would hold its shift"
        if any(int(p) for p in G.attr(conv, "pads", ())):
            return f"{where} has pads {list(G.attr(conv, 'pads'))}: it pads with 0 where the BN output would hold its shift"
        if weight.ndim < 3:
            return f"{where} weight is {weight.ndim}-D"
        group = int(G.attr(conv, "group", 1))
        c_out, in_per_group = weight.shape[:2]
        if group < 1 or c_out % group:
            return f"{where} has {c_out} output channels, not divisible into {group} groups"
        if in_per_group * group != scale.shape[0]:
            return f"{scale.shape[0]} BN channels vs {in_per_group * group} input channels of {where}"
        # channel[o, i]: the input channel read by in-group index i of output channel o.
        out_group = np.arange(c_out) // (c_out // group)
        channel = out_group[:, None] * in_per_group + np.arange(in_per_group)[None, :]
        spatial = (1,) * (weight.ndim - 2)
        w = weight.astype(np.float64)
        new_weight = w * scale[channel].reshape(channel.shape + spatial)
        new_bias = (w * shift[channel].reshape(channel.shape + spatial)).sum(axis=tuple(range(1, w.ndim)))
        if bias is not None:
            new_bias = new_bias + bias
        return new_weight, new_bias

    @staticmethod
    def _into_gemm(site: FusionSite, bn: gs.Node, node: gs.Node, weight: np.ndarray, bias: np.ndarray | None,
                   scale: np.ndarray, shift: np.ndarray) -> "tuple[np.ndarray, np.ndarray] | str":
        where = f"{node.op} '{node.name}'"
        if weight.ndim != 2:
            return f"{where} weight is {weight.ndim}-D, not 2-D"
        if _before_opset_7(site):
            return "Gemm before opset 7 broadcasts C only with its legacy broadcast attribute"
        if node.op == "MatMul":
            rank = site.run.rank(bn.inputs[0])
            if rank != 2:
                # BN normalises axis 1; MatMul contracts the last axis: the same axis only for 2-D input.
                why = "unknown" if rank is None else f"{rank}-D"
                return f"BN input is {why}; only a 2-D input has its channels on the axis {where} contracts"
            trans_b, alpha, beta = 0, 1.0, 1.0
        else:
            if int(G.attr(node, "transA", 0)):
                return f"{where} has transA=1: BN's axis 1 is not the contracted axis"
            trans_b = int(G.attr(node, "transB", 0))
            alpha, beta = float(G.attr(node, "alpha", 1.0)), float(G.attr(node, "beta", 1.0))
        b = weight.astype(np.float64)
        b_km = b.T if trans_b else b  # (K, M)
        if b_km.shape[0] != scale.shape[0]:
            return f"{scale.shape[0]} BN channels vs {b_km.shape[0]} input features of {where}"
        new_weight = b * scale[None, :] if trans_b else b * scale[:, None]
        new_bias = alpha * (shift @ b_km)
        if bias is not None:
            new_bias = beta * bias + new_bias  # C of shape (M,), (1, M), (N, M), (N, 1) or scalar
        return new_weight, new_bias

    def rewrite(self, site: FusionSite, match: InputFoldMatch) -> int:
        reader, bn = match.reader, match.bn
        reader.inputs[1] = site.run.names.constant(_folded_name(reader.inputs[1].name), match.weight)
        bias = site.run.names.constant(_folded_name(f"{reader.name or reader.op}_bias"), match.bias)
        if reader.op == "MatMul":
            reader.op = "Gemm"  # MatMul(A, B) + C == Gemm(A, B, C) for 2-D A
            reader.attrs = {}
        if reader.op == "Gemm":
            reader.attrs["beta"] = 1.0  # the old beta is inside the new C
        _set_input(reader, 2, bias)
        reader.inputs[0] = bn.inputs[0]
        site.run.detach(bn)
        return 1


@dataclass
class _PassOptions:
    # Put the reasons of candidates that did not fuse into the pass notes.
    explain: bool = False
    # At most this many notes per run.
    max_notes: int = 20


class FusionPass(Pass):
    """A pass that applies a fixed tuple of fusion rules."""

    lossless = True
    rules: ClassVar[tuple[FusionRule, ...]] = ()
    Options = _PassOptions

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        explain = bool(self.options.explain or getattr(ctx, "explain", False))
        return apply_rules(graph, self.rules, explain=explain, max_notes=max(0, int(self.options.max_notes)))


@register_pass
class FoldBatchNorm(FusionPass):
    name = "fold-batchnorm"
    summary = ("Fold inference BatchNormalization into the preceding Conv, ConvTranspose, Gemm or MatMul, "
               "or into a following unpadded Conv, Gemm or MatMul.")
    # Into the producer first: it has no padding condition.
    rules = (BatchNormIntoProducer(), BatchNormIntoConsumer())


# =========================================================================== fuse-conv-add
class ConstantIntoProducer(AffineFoldRule):
    """Add/Sub/Mul/Div by a per-channel constant after Conv/ConvTranspose/Gemm → weights and bias.

    Add/Sub change only the bias; Mul/Div scale weights and bias. ``c - y`` folds as a
    negation (scale -1) plus shift; ``c / y`` is not affine and is left alone. MatMul takes
    Mul/Div only (a shift needs a bias: that is ``fuse-matmul-add``'s job).
    """

    anchor_ops = ("Add", "Sub", "Mul", "Div")
    counter = "constants_folded"

    def match(self, site: FusionSite, node: gs.Node):
        if len(node.inputs) != 2:
            return None
        for y_index in (0, 1):
            y, other = node.inputs[y_index], node.inputs[1 - y_index]
            prod = site.local_producer(y)
            const = G.constant_value(other)
            if prod is not None and prod.op in FOLD_TARGET_OPS and const is not None:
                break
        else:
            return None  # not (fold target, constant): e.g. a residual Add
        const_first = y_index == 1
        if node.op == "Div" and const_first:
            return NoMatch(node, "constant / output is not affine in the output")
        scales = node.op in ("Mul", "Div") or (node.op == "Sub" and const_first)
        shifts = node.op in ("Add", "Sub")
        if prod.op == "MatMul" and shifts:
            return None  # MatMul + Add is fuse-matmul-add's pattern
        problem = site.sole_use_problem(y, node)
        if problem:
            return NoMatch(node, problem)
        target = AffineTarget.inspect(site, prod, scales=scales, shifts=shifts)
        if isinstance(target, str):
            return NoMatch(node, target)
        if const.dtype != target.dtype:
            return NoMatch(node, f"constant dtype {const.dtype} differs from {prod.op} dtype {target.dtype}")
        legacy_axis = None
        if int(G.attr(node, "broadcast", 0)) and "axis" in node.attrs:  # opset < 7 broadcasting
            legacy_axis = int(node.attrs["axis"])
        vector = per_channel_vector(const, target.out_rank, target.channel_axis, target.channels, legacy_axis)
        if isinstance(vector, str):
            return NoMatch(node, vector)
        if not np.all(np.isfinite(vector)):
            return NoMatch(node, "constant is not finite")
        if node.op == "Add":
            return AffineFoldMatch(node, target, None, vector)
        if node.op == "Sub":
            if const_first:  # c - y = y * (-1) + c
                return AffineFoldMatch(node, target, -np.ones_like(vector), vector)
            return AffineFoldMatch(node, target, None, -vector)
        if node.op == "Mul":
            return AffineFoldMatch(node, target, vector, None)
        if np.any(vector == 0):
            return NoMatch(node, "divides by zero")
        return AffineFoldMatch(node, target, 1.0 / vector, None)


@register_pass
class FuseConvAdd(FusionPass):
    name = "fuse-conv-add"
    summary = "Fold a per-channel constant Add/Sub/Mul/Div after Conv, ConvTranspose or Gemm into its weights and bias."
    rules = (ConstantIntoProducer(),)


# =========================================================================== fuse-matmul-add
@dataclass
class MatMulAddMatch:
    add: gs.Node
    matmul: gs.Node
    bias: gs.Tensor


class MatMulAddToGemm(FusionRule):
    """MatMul(X, W) + b → Gemm(X, W, b) for 2-D X, constant 2-D W and b of shape (M,), (1, M) or scalar.

    Gemm is 2-D only (ONNX spec), so a batched/3-D MatMul stays as it is.
    """

    anchor_ops = ("Add",)
    counter = "matmul_add_to_gemm"

    def match(self, site: FusionSite, add: gs.Node):
        if len(add.inputs) != 2 or add.attrs.get("broadcast") is not None:
            return None
        for y_index in (0, 1):
            y, bias = add.inputs[y_index], add.inputs[1 - y_index]
            matmul = site.local_producer(y)
            bias_value = G.constant_value(bias)
            if matmul is not None and matmul.op == "MatMul" and bias_value is not None:
                break
        else:
            return None
        weight = G.constant_value(matmul.inputs[1])
        if weight is None:
            return NoMatch(add, f"MatMul '{matmul.name}' weight is not constant")
        if weight.ndim != 2:
            return NoMatch(add, f"MatMul '{matmul.name}' weight is {weight.ndim}-D; Gemm needs 2-D")
        if weight.dtype not in FLOAT_DTYPES or bias_value.dtype != weight.dtype:
            return NoMatch(add, f"dtypes {weight.dtype}/{bias_value.dtype} are not one float type")
        rank = site.run.rank(matmul.inputs[0])
        if rank != 2:
            why = "unknown" if rank is None else f"{rank}-D"
            return NoMatch(add, f"MatMul '{matmul.name}' input is {why}; Gemm takes 2-D input")
        if _before_opset_7(site):
            return NoMatch(add, "Gemm before opset 7 broadcasts C only with its legacy broadcast attribute")
        vector = per_channel_vector(bias_value, 2, 1, weight.shape[1])
        if isinstance(vector, str):
            return NoMatch(add, vector)
        problem = site.sole_use_problem(y, add)
        if problem:
            return NoMatch(add, problem)
        return MatMulAddMatch(add, matmul, bias)

    def rewrite(self, site: FusionSite, match: MatMulAddMatch) -> int:
        # Gemm's C broadcasts unidirectionally to (N, M): (M,), (1, M) and scalars all do.
        gemm = match.matmul
        gemm.op = "Gemm"
        gemm.attrs = {}
        gemm.inputs.append(match.bias)
        absorb_output(site, gemm, match.add)
        return 1


@register_pass
class FuseMatMulAdd(FusionPass):
    name = "fuse-matmul-add"
    summary = "Turn a 2-D MatMul with a constant weight followed by a bias Add into one Gemm."
    rules = (MatMulAddToGemm(),)


# =========================================================================== fuse-pad
# Producers whose output is never negative: a zero Pad before MaxPool then never wins a window
# that holds a real element, so MaxPool's own padding (ignored positions) gives the same maxima.
NON_NEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Exp", "Abs"})
PAD_READER_OPS = ("Conv", "ConvTranspose", "AveragePool", "MaxPool")


@dataclass
class ZeroPadding:
    """A Pad that writes zeros: ``begins[a]``/``ends[a]`` elements before/after axis a."""

    begins: list[int]
    ends: list[int]


def zero_padding(pad: gs.Node, rank: int | None) -> "ZeroPadding | str":
    """The padding of a constant-mode, zero-valued Pad with constant pads, or why it is not one.

    Pad-1 has a ``paddings`` attribute, Pad-2 ``pads`` and ``value``; from Pad-11 they are inputs
    (``pads``, optional ``constant_value``), and Pad-18 adds an optional ``axes`` input. ``pads``
    lists the begins of every (listed) axis, then the ends. Both forms are read whatever the opset.
    """
    mode = _string_attr(pad, "mode", "constant")
    if mode != "constant":
        return f"mode '{mode}' pads with copies of the input, not zeros"
    axes = None
    if "pads" in pad.attrs or "paddings" in pad.attrs:
        pads = G.attr(pad, "pads", G.attr(pad, "paddings"))
        value = np.array(float(G.attr(pad, "value", 0.0)))
    else:
        pads_tensor = _optional_input(pad, 1)
        pads = G.constant_value(pads_tensor) if pads_tensor is not None else None
        if pads is None:
            return "pads are computed at run time" if pads_tensor is not None else "has no pads"
        value_tensor = _optional_input(pad, 2)
        value = np.array(0.0) if value_tensor is None else G.constant_value(value_tensor)
        if value is None:
            return f"pad value '{value_tensor.name}' is computed at run time"
        axes_tensor = _optional_input(pad, 3)
        if axes_tensor is not None:
            axes = G.constant_value(axes_tensor)
            if axes is None:
                return f"axes '{axes_tensor.name}' are computed at run time"
            axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    if np.asarray(value).size != 1 or np.asarray(value).reshape(-1)[0] != 0:
        return f"pad value {np.asarray(value).reshape(-1).tolist()} is not 0"
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if len(pads) % 2:
        return f"has an odd number of pads ({len(pads)})"
    if any(p < 0 for p in pads):
        return f"pads {pads} crop (negative pads)"
    half = len(pads) // 2
    if axes is None:
        if rank is not None and half != rank:
            return f"{half} padded axes for a rank-{rank} input"
        return ZeroPadding(pads[:half], pads[half:])
    if rank is None:
        return "input rank is unknown; cannot place the padded axes"
    if len(axes) != half:
        return f"{len(axes)} axes but {half} pad pairs"
    normalized = [a + rank if a < 0 else a for a in axes]
    if any(not 0 <= a < rank for a in normalized) or len(set(normalized)) != len(normalized):
        return f"axes {axes} are out of range or repeated for rank {rank}"
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(normalized):
        begins[a], ends[a] = pads[i], pads[half + i]
    return ZeroPadding(begins, ends)


def _non_negative_problem(site: FusionSite, tensor: gs.Tensor) -> str | None:
    """None when ``tensor`` is evidently >= 0 (its producer's definition), else why we cannot tell."""
    prod = site.local_producer(tensor)
    if prod is None:
        return "its input is not produced by a node of this graph, so it may be negative"
    if prod.op in NON_NEGATIVE_OPS:
        return None
    if prod.op == "Clip":
        # Clip-6 has a ``min`` attribute (default: lowest float); Clip-11 an optional ``min`` input.
        low = G.attr(prod, "min")
        if low is None:
            low_tensor = _optional_input(prod, 1)
            low = G.constant_value(low_tensor) if low_tensor is not None else None
        if low is not None and np.asarray(low).size == 1 and float(np.asarray(low).reshape(-1)[0]) >= 0:
            return None
        return f"its input comes from Clip '{prod.name}' without a constant min >= 0, so it may be negative"
    return f"its input comes from {prod.op} '{prod.name}', which may be negative"


def _reader_rank(site: FusionSite, reader: gs.Node, x: gs.Tensor) -> int | None:
    """The rank of the data the Conv/pool reads: 2 + its number of spatial axes."""
    kernel = G.attr(reader, "kernel_shape")
    if kernel is not None:
        return len(kernel) + 2
    if reader.op in ("Conv", "ConvTranspose") and len(reader.inputs) > 1:
        shape = G.static_shape(reader.inputs[1])
        if shape is not None:
            return len(shape)
    return site.run.rank(x)


@dataclass
class PadMatch:
    pad: gs.Node
    reader: gs.Node
    pads: list[int]  # the reader's new ``pads`` attribute


class PadIntoReader(FusionRule):
    """A zero constant Pad of the spatial axes before Conv, AveragePool or MaxPool → the reader's ``pads``.

    The readers pad spatial axes themselves (ONNX ``pads``: begins then ends of each spatial
    axis). Conv pads with zeros, so any zero Pad folds. AveragePool with count_include_pad=1
    averages pad positions as zeros; with 0 it would shrink the divisor. MaxPool ignores pad
    positions: the same as a zero Pad when the input is never negative and every window still
    holds a real element (dilation 1, no ceil_mode, each side's pad below the kernel, which
    onnxruntime also demands of pools). ConvTranspose ``pads`` crop its output instead.
    """

    anchor_ops = ("Pad",)
    counter = "pads_fused"

    def match(self, site: FusionSite, pad: gs.Node):
        if not pad.inputs or len(pad.outputs) != 1:
            return None
        out = pad.outputs[0]
        readers = G.consumers(out)
        if not any(r.op in PAD_READER_OPS for r in readers):
            return None  # no candidate: the Pad feeds no Conv/pool
        reader = readers[0]
        problem = site.sole_use_problem(out, reader)
        if problem:
            return NoMatch(pad, problem)
        if id(reader) not in site.node_ids or not G.is_default_domain(reader):
            return None
        where = f"{reader.op} '{reader.name}'"
        if reader.inputs[0] is not out or any(t is out for t in reader.inputs[1:]):
            return NoMatch(pad, f"output is not only the data input of {where}")
        if reader.op == "ConvTranspose":
            return NoMatch(pad, f"{where}: ConvTranspose pads crop its output; they cannot pad its input")
        rank = _reader_rank(site, reader, pad.inputs[0])
        padding = zero_padding(pad, rank)
        if isinstance(padding, str):
            return NoMatch(pad, padding)
        if any(padding.begins[:2]) or any(padding.ends[:2]):
            return NoMatch(pad, f"pads the batch or channel axis (begins {padding.begins}, ends {padding.ends})")
        spatial = len(padding.begins) - 2
        if spatial < 1:
            return NoMatch(pad, f"pads a rank-{spatial + 2} tensor; {where} needs spatial axes")
        auto_pad = _string_attr(reader, "auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):  # VALID: no padding, like NOTSET with zero pads
            return NoMatch(pad, f"{where} has auto_pad={auto_pad}; its padding depends on the input size")
        old = [int(p) for p in G.attr(reader, "pads", [0] * (2 * spatial))]
        if len(old) != 2 * spatial:
            return NoMatch(pad, f"{where} has {len(old)} pads for {spatial} spatial axes")
        new = [old[i] + padding.begins[2 + i] for i in range(spatial)] + \
              [old[spatial + i] + padding.ends[2 + i] for i in range(spatial)]
        if reader.op != "Conv":
            problem = self._pool_problem(site, pad, reader, new, spatial)
            if problem:
                return NoMatch(pad, f"{where}: {problem}")
        return PadMatch(pad, reader, new)

    @staticmethod
    def _pool_problem(site: FusionSite, pad: gs.Node, pool: gs.Node, pads: list[int], spatial: int) -> str | None:
        if pool.op == "AveragePool" and not int(G.attr(pool, "count_include_pad", 0)):
            return "count_include_pad=0 would leave the padded zeros out of the divisor"
        if pool.op == "MaxPool":
            if any(_present(t) for t in pool.outputs[1:]):
                return "its Indices output counts positions of the padded tensor"
            problem = _non_negative_problem(site, pad.inputs[0])
            if problem:
                return f"a padded 0 could be a window's maximum: {problem}"
        if int(G.attr(pool, "ceil_mode", 0)):
            return "ceil_mode=1 adds end windows that may hold only padding (and runtimes clip them differently)"
        if any(int(d) != 1 for d in G.attr(pool, "dilations", ())):
            return "dilated windows may hold only padding"
        kernel = G.attr(pool, "kernel_shape")
        if kernel is None or len(kernel) != spatial:
            return "kernel_shape is missing or does not fit the padded rank"
        if any(pads[i] >= kernel[i] or pads[spatial + i] >= kernel[i] for i in range(spatial)):
            return f"pads {pads} would not all be smaller than kernel {list(kernel)}"
        return None

    def rewrite(self, site: FusionSite, match: PadMatch) -> int:
        reader, pad = match.reader, match.pad
        reader.attrs["pads"] = match.pads
        reader.attrs.pop("auto_pad", None)  # NOTSET (default) or VALID: explicit pads now
        reader.inputs[0] = pad.inputs[0]
        site.run.detach(pad)
        return 1


@register_pass
class FusePad(FusionPass):
    name = "fuse-pad"
    summary = "Fold a zero constant Pad of spatial axes into the pads of the following Conv, AveragePool or MaxPool."
    rules = (PadIntoReader(),)
