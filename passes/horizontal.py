"""Horizontal fusion: sibling Conv / Gemm / MatMul nodes that read one tensor become one wider node.

``fuse-horizontal`` finds nodes of one op type that read the *same* input tensor with
compatible settings and constant weights (the 1x1 "reduce" convolutions of an inception
block, the Q/K/V projections of an attention layer) and merges each group into one node whose
weights are the branches' weights concatenated along the output-channel axis:

* **Conv** (group 1, equal kernel shape, strides, pads, dilations and auto_pad, one dtype):
  weights ``(C_i, C_in, k...)`` concatenated on axis 0, biases concatenated (a branch without
  a bias contributes zeros). The output channels of the merged Conv are the branches' channels
  one after the other, so ``Split(axis=1, split=[C_1, C_2, ...])`` gives back every branch.
* **Gemm** (equal ``transA``): ``Y = alpha * op(A) @ op(B) + beta * C`` (ONNX spec); the columns
  of ``op(B)`` are the output columns, so the ``op(B)`` are concatenated on their column axis
  (the raw ``B`` on axis 0 when every branch has ``transB=1``). Equal alphas / betas stay as
  attributes; differing ones are folded into ``B`` / ``C`` (float64, cast back). ``C`` must be
  per column (``(N,)``, ``(1, N)`` or a scalar).
* **MatMul** with a constant 2-D right operand: ``x @ [W_1 | W_2 | ...]``, Split on the last axis.
  A following per-column bias ``Add`` (transformers' Q/K/V projections) is merged too: one
  ``Add`` of the concatenated biases.

A per-branch activation with equal settings (Relu, LeakyRelu with one alpha, Clip with the same
constant bounds, Sigmoid, ..., and the gated ``y * Sigmoid(y)`` SiLU/Swish pattern) is applied
once after the merged node, before the Split. Branches only merge with branches that have the
same activation (or none).

When branch outputs are a contiguous run of one ``Concat``'s inputs along the channel axis (the
branches' only reader), the run is ordered as in the Concat and replaced by one tensor: a group
that is one such run needs no Split at all (the merged node feeds the Concat, or becomes the
Concat's output when the run is all of its inputs). Graph outputs keep their names: the Split
writes the very tensors the branches wrote.

Why it depends on the target
----------------------------
What a merge saves is kernel launches, a GPU cost; on the CPU a "launch" is a function call.
Measured on the CPU (2-core AVX2 machine shared with other jobs, onnxruntime 1.32, CPU provider,
``intra_op_num_threads=1``, batch 1, 224x224). *Before* is the ``lossless`` preset without this
pass, *after* the preset with it in its place (both end with ``fuse-conv-activation``). 60
interleaved rounds; in each round the fastest of 5 runs of each model, timed by the calling
thread's CPU time (onnxruntime computes on that thread with one intra-op thread; wall-clock
ratios agreed to 0.001). The figure is the median of the per-round ratios after / before
(< 1 is faster). An A/A control (one model against itself) gave 0.996-1.002.

==========================================================  =====================  =====================
model, merges                                               onnxruntime "all"      optimizations off
==========================================================  =====================  =====================
inception: 9 groups of three 1x1 Conv+Relu, each + a Split  **1.028** (40.1 ms)   1.001 (53.0 ms)
"concat" inception: 9 groups of three 1x1, no Split         0.991, 0.985 (20 ms)   0.977, 0.986 (24 ms)
==========================================================  =====================  =====================

A first run with the preset before ``fuse-conv-activation`` existed (40 rounds) gave 1.034 / 0.986
for the first row and 0.997-1.000 / 0.990-0.993 for the second. In the inception net the sibling
1x1 convs feed a 3x3 conv, a 5x5 conv and the block's Concat, so merging them needs a Split: with
onnxruntime's optimizations on (what users run) that is about 3 % *slower*. onnxruntime's
session-optimized model shows why: the NCHWc layout transformer does not handle Split, so 35
ReorderOutput and 26 ReorderInput nodes appear around the 9 Splits (before: one). The "concat"
variant (the same stem, channel counts and pooling, but each block is only its three 1x1
Conv+BN+Relu branches and its pool branch, all feeding the Concat) merges with no Split and
gets no reorders: 0-2 % faster in every repeat, never slower. Hence ``mode="auto"`` merges
every group for ``cuda`` / ``tensorrt`` and, for ``cpu``, only Split-free groups
(``CPU_AUTO_PLAN``).

Options: ``mode`` (``auto``; ``always`` merges every group on any target; ``concat-only`` only
Split-free groups; ``never-on-cpu`` every group on GPU targets and nothing on ``cpu``),
``min_branches`` (2), ``ops`` (``Conv+Gemm+MatMul``), ``max_out_channels`` (0: no limit; else
no merged node gets more output channels, and a bigger group is packed first-fit into several
merges), ``explain`` / ``max_notes`` as in :mod:`onnxopt.passes.fusion`.

Every rewrite is exact up to float rounding: weights are copied, not recomputed (except folded
Gemm alphas/betas), and the merged kernel may sum in a different order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.errors import UserInputError
from onnxopt.pass_base import Pass, PassResult
from onnxopt.passes.fusion import FLOAT_DTYPES, FusionRun, FusionSite, NoMatch, per_channel_vector
from onnxopt.registry import register_pass

MERGEABLE_OPS = ("Conv", "Gemm", "MatMul")
GPU_TARGETS = ("cuda", "tensorrt")

# Element-wise activations that commute with concatenation along channels when every branch
# uses the same settings. Extra inputs (Clip's min/max, PRelu's slope) must be constants with
# at most one element, so that they apply to every channel alike.
ACTIVATION_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Gelu", "Mish",
})
# y * f(y) with f one of these (SiLU / Swish: y * Sigmoid(y), as PyTorch and TF export it).
GATE_OPS = frozenset({"Sigmoid", "HardSigmoid"})

# Split's sizes: an attribute before opset 13, an input from 13 (ONNX changelog). Negative
# axes for Split and Concat exist from opset 11.
SPLIT_SIZES_INPUT_SINCE = 13
NEGATIVE_AXIS_SINCE = 11

# What the measurement in the module docstring found worth doing on the CPU in "auto" mode:
# "split-free" (only merges that need no Split: 0-2 % faster) rather than "all" (a Split made
# the inception net ~3 % slower under onnxruntime's optimizations) or "none".
CPU_AUTO_PLAN = "split-free"

Mode = Literal["auto", "always", "concat-only", "never-on-cpu"]


# =========================================================================== branches
@dataclass
class Tail:
    """The nodes after a merge candidate that leave with it: a bias Add (MatMul only), an activation."""

    output: gs.Tensor                 # what the branch's readers read
    nodes: list[gs.Node] = field(default_factory=list)
    bias: np.ndarray | None = None    # MatMul: the per-column bias of the Add, in the weight dtype
    activation: list[gs.Node] = field(default_factory=list)  # [act] or [gate, Mul]
    key: tuple | None = None          # equal keys ⇔ the same activation


@dataclass
class Branch:
    """One merge candidate: its node, its normalised parameters and its tail."""

    node: gs.Node
    kind: "MergeKind"
    channels: int
    weight: np.ndarray
    bias: np.ndarray | None            # per output channel in the weight dtype (Conv bias, raw Gemm C)
    tail: Tail
    key: tuple                         # branches merge only with equal keys
    order: int                         # position in the graph's node list
    out_rank: int | None               # rank of the node's output
    params: dict = field(default_factory=dict)  # kind-specific (Gemm alpha/beta/transB)

    @property
    def output(self) -> gs.Tensor:
        return self.tail.output


@dataclass
class Unit:
    """Branches that stay adjacent in a merge: one branch, or a contiguous run of a Concat's inputs."""

    branches: list[Branch]
    concat: gs.Node | None = None      # set for a run of two or more branches

    @property
    def channels(self) -> int:
        return sum(b.channels for b in self.branches)


@dataclass
class MergeGroup:
    kind: "MergeKind"
    x: gs.Tensor
    units: list[Unit]

    @property
    def branches(self) -> list[Branch]:
        return [b for u in self.units for b in u.branches]

    @property
    def split_free(self) -> bool:
        """The merged output goes to a Concat as it is: no Split (copy) is added."""
        return len(self.units) == 1 and self.units[0].concat is not None

    def describe(self) -> str:
        names = ", ".join(f"'{b.node.name}'" for b in self.branches)
        return f"{len(self.branches)} sibling {self.kind.op} ({names}) reading '{self.x.name}'"


# =========================================================================== per-op kinds
class MergeKind:
    """How one op type is inspected and merged. Subclasses: Conv, Gemm, MatMul."""

    op: ClassVar[str] = ""
    has_bias_add: ClassVar[bool] = False  # a following bias Add may join the tail

    def inspect(self, site: FusionSite, node: gs.Node, order: int) -> Branch | str:
        raise NotImplementedError

    def channel_axis(self, rank: int | None) -> int | None:
        """The output's channel axis, non-negative, or None when the rank is unknown."""
        return 1

    def merge(self, site: FusionSite, x: gs.Tensor, branches: list[Branch], name: str) -> gs.Tensor:
        """Create the merged node(s) reading ``x``; return the merged output before the activation."""
        raise NotImplementedError


class ConvKind(MergeKind):
    op = "Conv"

    def inspect(self, site, node, order):
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            return "unexpected signature"
        if int(G.attr(node, "group", 1)) != 1:
            return f"group={G.attr(node, 'group')}; only group=1 convolutions concatenate along output channels"
        weight = G.constant_value(node.inputs[1])
        if weight is None:
            return f"weight '{node.inputs[1].name}' is not constant"
        if weight.ndim < 3:
            return f"weight has rank {weight.ndim}"
        spatial = weight.ndim - 2
        kernel = tuple(int(k) for k in G.attr(node, "kernel_shape", weight.shape[2:]))
        if kernel != tuple(weight.shape[2:]):
            return f"kernel_shape {list(kernel)} differs from the weight shape {list(weight.shape)}"
        bias = None
        bias_tensor = _optional_input(node, 2)
        if bias_tensor is not None:
            bias = G.constant_value(bias_tensor)
            if bias is None:
                return f"bias '{bias_tensor.name}' is not constant"
            if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
                return f"bias of shape {bias.shape} / dtype {bias.dtype} does not match the weight"
        auto_pad = G.attr(node, "auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        pads = None if auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID") else _ints(G.attr(node, "pads", [0] * 2 * spatial))
        strides = _ints(G.attr(node, "strides", [1] * spatial))
        dilations = _ints(G.attr(node, "dilations", [1] * spatial))
        tail = inspect_tail(site, node, self, weight.shape[0], weight.ndim, weight.dtype)
        key = (self.op, weight.dtype.str, weight.shape[1:], strides, dilations, auto_pad, pads, tail.key)
        return Branch(node, self, int(weight.shape[0]), weight, bias, tail, key, order, weight.ndim)

    def merge(self, site, x, branches, name):
        leader = branches[0]
        dtype = leader.weight.dtype
        names = site.run.names
        inputs = [x, names.constant(f"{name}.weight", np.concatenate([b.weight for b in branches], axis=0))]
        bias = stacked([b.bias for b in branches], branches, dtype)
        if bias is not None:
            inputs.append(names.constant(f"{name}.bias", bias))
        out = gs.Variable(names(f"{name}_output"), dtype=dtype)
        attrs = {k: v for k, v in leader.node.attrs.items()}  # equal across the group (the key)
        site.graph.nodes.append(gs.Node("Conv", name=names(name), attrs=attrs, inputs=inputs, outputs=[out]))
        return out


class GemmKind(MergeKind):
    op = "Gemm"

    def inspect(self, site, node, order):
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            return "unexpected signature"
        if _opset(site) < 7:
            return "Gemm before opset 7 broadcasts C only with its legacy broadcast attribute"
        weight = G.constant_value(node.inputs[1])
        if weight is None:
            return f"weight '{node.inputs[1].name}' is not constant"
        if weight.ndim != 2:
            return f"weight has rank {weight.ndim}"
        trans_a, trans_b = int(G.attr(node, "transA", 0)), int(G.attr(node, "transB", 0))
        alpha, beta = float(G.attr(node, "alpha", 1.0)), float(G.attr(node, "beta", 1.0))
        channels, depth = (weight.shape[0], weight.shape[1]) if trans_b else (weight.shape[1], weight.shape[0])
        bias = None
        c_tensor = _optional_input(node, 2)
        if c_tensor is not None:
            c = G.constant_value(c_tensor)
            if c is None:
                return f"C '{c_tensor.name}' is not constant"
            if c.dtype != weight.dtype or weight.dtype not in FLOAT_DTYPES:
                return f"C dtype {c.dtype} / weight dtype {weight.dtype} are not one float type"
            vector = per_channel_vector(c, 2, 1, channels)
            if isinstance(vector, str):
                return f"C is not per output column: {vector}"
            bias = vector.astype(weight.dtype)  # float64 round trip of a float16/32 value is exact
        tail = inspect_tail(site, node, self, channels, 2, weight.dtype)
        key = (self.op, weight.dtype.str, trans_a, depth, tail.key)
        return Branch(node, self, int(channels), weight, bias, tail, key, order, 2,
                      params={"alpha": alpha, "beta": beta, "transB": trans_b, "transA": trans_a})

    def merge(self, site, x, branches, name):
        dtype = branches[0].weight.dtype
        names = site.run.names
        # Equal alphas stay an attribute; different ones are folded into B (float only: _group_problem).
        alphas = {b.params["alpha"] for b in branches}
        fold_alpha = len(alphas) > 1
        alpha = 1.0 if fold_alpha else alphas.pop()

        def b_matrix(b: Branch) -> np.ndarray:
            if not fold_alpha or b.params["alpha"] == 1.0:
                return b.weight
            return (b.weight.astype(np.float64) * b.params["alpha"]).astype(dtype)

        all_trans_b = all(b.params["transB"] for b in branches)
        if all_trans_b:  # B_i: (N_i, K) → stack rows, keep transB=1
            weight = np.concatenate([b_matrix(b) for b in branches], axis=0)
        else:  # op(B_i): (K, N_i) → stack columns, transB=0
            weight = np.concatenate([b_matrix(b).T if b.params["transB"] else b_matrix(b) for b in branches], axis=1)
        # beta * C likewise (a branch without C adds zeros whatever the beta).
        betas = {b.params["beta"] for b in branches if b.bias is not None}
        fold_beta = len(betas) > 1
        beta = 1.0 if fold_beta or not betas else betas.pop()
        biases = [b.bias if b.bias is None or not fold_beta or b.params["beta"] == 1.0
                  else (b.bias.astype(np.float64) * b.params["beta"]).astype(dtype) for b in branches]
        inputs = [x, names.constant(f"{name}.weight", np.ascontiguousarray(weight))]
        bias = stacked(biases, branches, dtype)
        if bias is None and _opset(site) < 11:
            bias = np.zeros(sum(b.channels for b in branches), dtype)  # C is required before opset 11
        if bias is not None:
            inputs.append(names.constant(f"{name}.bias", bias))
        attrs = {"alpha": alpha, "beta": beta, "transA": branches[0].params["transA"], "transB": int(all_trans_b)}
        out = gs.Variable(names(f"{name}_output"), dtype=dtype)
        site.graph.nodes.append(gs.Node("Gemm", name=names(name), attrs=attrs, inputs=inputs, outputs=[out]))
        return out


class MatMulKind(MergeKind):
    op = "MatMul"
    has_bias_add = True

    def inspect(self, site, node, order):
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return "unexpected signature"
        weight = G.constant_value(node.inputs[1])
        if weight is None:
            return f"weight '{node.inputs[1].name}' is not constant"
        if weight.ndim != 2:
            return f"weight has rank {weight.ndim}; only a 2-D weight has output columns to concatenate"
        x_rank = site.run.rank(node.inputs[0])
        out_rank = None if x_rank is None else max(x_rank, 1)
        tail = inspect_tail(site, node, self, weight.shape[1], out_rank, weight.dtype)
        key = (self.op, weight.dtype.str, weight.shape[0], tail.key)
        return Branch(node, self, int(weight.shape[1]), weight, None, tail, key, order, out_rank)

    def channel_axis(self, rank):
        return None if rank is None else rank - 1

    def merge(self, site, x, branches, name):
        dtype = branches[0].weight.dtype
        names = site.run.names
        weight = names.constant(f"{name}.weight", np.concatenate([b.weight for b in branches], axis=1))
        out = gs.Variable(names(f"{name}_output"), dtype=dtype)
        site.graph.nodes.append(gs.Node("MatMul", name=names(name), inputs=[x, weight], outputs=[out]))
        bias = stacked([b.tail.bias for b in branches], branches, dtype)
        if bias is not None:
            summed = gs.Variable(names(f"{name}_bias_output"), dtype=dtype)
            site.graph.nodes.append(gs.Node("Add", name=names(f"{name}_bias"),
                                            inputs=[out, names.constant(f"{name}.bias", bias)], outputs=[summed]))
            out = summed
        return out


def stacked(vectors: list[np.ndarray | None], branches: list[Branch], dtype) -> np.ndarray | None:
    """The branches' per-channel vectors one after the other, zeros for a branch without one
    (a missing bias adds nothing); None when no branch has one."""
    if all(v is None for v in vectors):
        return None
    return np.concatenate([v if v is not None else np.zeros(b.channels, dtype) for v, b in zip(vectors, branches)]).astype(dtype)


KINDS: dict[str, MergeKind] = {k.op: k for k in (ConvKind(), GemmKind(), MatMulKind())}


# =========================================================================== tails
def inspect_tail(site: FusionSite, node: gs.Node, kind: MergeKind, channels: int, out_rank: int | None,
                 dtype: np.dtype) -> Tail:
    """The bias Add (MatMul) and activation that follow ``node`` and can move behind the merge."""
    tail = Tail(node.outputs[0])
    if kind.has_bias_add:
        add = _sole_local_reader(site, tail.output)
        if add is not None and add.op == "Add" and len(add.inputs) == 2 and "broadcast" not in add.attrs \
                and _opset(site) >= 7 and dtype in FLOAT_DTYPES:
            other = add.inputs[1] if add.inputs[0] is tail.output else add.inputs[0]
            const = G.constant_value(other)
            if const is not None and other is not tail.output and const.dtype == dtype:
                vector = per_channel_vector(const, out_rank, -1, channels)
                if not isinstance(vector, str):
                    tail.bias = vector.astype(dtype)
                    tail.nodes.append(add)
                    tail.output = add.outputs[0]
    activation = _activation_after(site, tail.output)
    if activation is not None:
        nodes, key = activation
        tail.activation = nodes
        tail.key = key
        tail.nodes.extend(nodes)
        tail.output = nodes[-1].outputs[0]
    return tail


def _activation_after(site: FusionSite, y: gs.Tensor) -> tuple[list[gs.Node], tuple] | None:
    """``([act], key)`` for a single element-wise activation reading ``y``, ``([gate, Mul], key)``
    for ``y * gate(y)``, else None."""
    if id(y) in site.run.output_ids:
        return None
    readers = _unique(G.consumers(y))
    if any(id(r) not in site.node_ids or not G.is_default_domain(r) for r in readers):
        return None
    if len(readers) == 1:
        act = readers[0]
        key = _activation_key(act, y)
        return None if key is None else ([act], key)
    if len(readers) == 2:
        gate, mul = readers if readers[1].op == "Mul" else readers[::-1]
        if mul.op != "Mul" or gate.op not in GATE_OPS or len(mul.inputs) != 2 or len(gate.outputs) != 1:
            return None
        gated = gate.outputs[0]
        key = _activation_key(gate, y)
        if key is None or {id(t) for t in mul.inputs} != {id(y), id(gated)}:
            return None
        gated_readers = _unique(G.consumers(gated))
        if len(gated_readers) != 1 or gated_readers[0] is not mul or id(gated) in site.run.output_ids \
                or len(mul.outputs) != 1:
            return None
        return [gate, mul], ("gate",) + key
    return None


def _activation_key(act: gs.Node, y: gs.Tensor) -> tuple | None:
    if act.op not in ACTIVATION_OPS or len(act.outputs) != 1 or not act.inputs or act.inputs[0] is not y:
        return None
    extras = []
    for t in act.inputs[1:]:
        if not _present(t):
            extras.append(None)
            continue
        value = G.constant_value(t)
        if value is None or value.size > 1 or t is y:
            return None
        extras.append((value.dtype.str, tuple(value.shape), tuple(value.ravel().tolist())))
    attrs = tuple(sorted((k, repr(v)) for k, v in act.attrs.items()))
    return (act.op, attrs, tuple(extras))


# =========================================================================== planning
def _candidates(site: FusionSite, x: gs.Tensor, ops: set[str]) -> list[gs.Node]:
    """Nodes of this graph that read ``x`` as their first (and only that) input and may merge."""
    found = []
    for node in _unique(G.consumers(x)):
        if node.op in ops and id(node) in site.node_ids and G.is_default_domain(node) \
                and node.inputs and node.inputs[0] is x and sum(t is x for t in node.inputs) == 1:
            found.append(node)
    return found


def _concat_runs(site: FusionSite, kind: MergeKind, branches: list[Branch], min_run: int) -> list[Unit]:
    """Units: contiguous runs (≥ ``min_run`` branches) of one Concat's inputs on the channel axis, in
    Concat order, and every other branch on its own; ordered by graph position."""
    by_concat: dict[int, list[tuple[int, Branch]]] = {}
    concat_of: dict[int, gs.Node] = {}
    alone: list[Branch] = []
    for b in branches:
        reader = _sole_local_reader(site, b.output)
        if reader is None or reader.op != "Concat" or not _concat_on_channels(kind, reader, b.out_rank):
            alone.append(b)
            continue
        positions = [i for i, t in enumerate(reader.inputs) if t is b.output]
        if len(positions) != 1:
            alone.append(b)
            continue
        by_concat.setdefault(id(reader), []).append((positions[0], b))
        concat_of[id(reader)] = reader
    units = [Unit([b]) for b in alone]
    for cid, members in by_concat.items():
        members.sort(key=lambda pb: pb[0])
        run: list[tuple[int, Branch]] = []
        for pos, b in members + [(None, None)]:
            if run and (pos is None or pos != run[-1][0] + 1):
                if len(run) >= min_run:
                    units.append(Unit([rb for _, rb in run], concat_of[cid]))
                else:
                    units.extend(Unit([rb]) for _, rb in run)
                run = []
            if pos is not None:
                run.append((pos, b))
    units.sort(key=lambda u: min(b.order for b in u.branches))
    return units


def _concat_on_channels(kind: MergeKind, concat: gs.Node, rank: int | None) -> bool:
    axis = int(G.attr(concat, "axis", 1))
    channel = kind.channel_axis(rank)
    if channel is None:  # MatMul with unknown rank: only "the last axis" is recognisable
        return axis == -1
    return rank is not None and -rank <= axis < rank and axis % rank == channel


def _split_units(units: list[Unit], limit: int) -> list[Unit]:
    """Cut runs longer than ``limit`` output channels into consecutive sub-runs."""
    if limit <= 0:
        return units
    out = []
    for u in units:
        if u.concat is None or u.channels <= limit:
            out.append(u)
            continue
        piece: list[Branch] = []
        for b in u.branches:
            if piece and sum(p.channels for p in piece) + b.channels > limit:
                out.append(Unit(piece, u.concat if len(piece) > 1 else None))
                piece = []
            piece.append(b)
        out.append(Unit(piece, u.concat if len(piece) > 1 else None))
    return out


def _pack(units: list[Unit], limit: int) -> list[list[Unit]]:
    """First-fit packing of units into merges of at most ``limit`` channels (0: one merge).

    First fit keeps the pass idempotent: the first unit of a later merge did not fit an earlier
    one, so no two merges made here can merge on a second run.
    """
    if limit <= 0:
        return [units]
    bins: list[list[Unit]] = []
    for u in units:
        for b in bins:
            if sum(v.channels for v in b) + u.channels <= limit:
                b.append(u)
                break
        else:
            bins.append([u])
    return bins


# =========================================================================== the pass
@dataclass
class HorizontalOptions:
    # "auto": every merge for cuda/tensorrt; for cpu only Split-free ones (see the module doc).
    # "always": every merge on any target; "concat-only": only Split-free merges on any target;
    # "never-on-cpu": every merge for cuda/tensorrt, none for cpu.
    mode: Mode = "auto"
    # Merge groups of at least this many siblings.
    min_branches: int = 2
    # Op types that merge: any of Conv, Gemm, MatMul (on the command line: ops=Conv+MatMul).
    ops: list[str] = field(default_factory=lambda: list(MERGEABLE_OPS))
    # A merged node gets at most this many output channels (0: no limit).
    max_out_channels: int = 0
    # Put the reasons of siblings that did not merge into the pass notes.
    explain: bool = False
    # At most this many notes per run.
    max_notes: int = 20


@register_pass
class FuseHorizontal(Pass):
    name = "fuse-horizontal"
    summary = ("Merge sibling Conv/Gemm/MatMul with constant weights that read one tensor into one wider node "
               "(+ Split); by default every merge for GPU targets, only Split-free ones (into a Concat) for cpu.")
    lossless = True
    Options = HorizontalOptions

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        opts = self.options
        ops = self._checked_ops()
        if int(opts.min_branches) < 2:
            raise UserInputError(f"fuse-horizontal: min_branches={opts.min_branches} is below 2.",
                                 "use min_branches=2 or more (a merge needs two branches).")
        plan = self._plan_kind(getattr(ctx, "target", "cpu"))
        explain = bool(opts.explain or getattr(ctx, "explain", False))
        run = FusionRun(graph)
        counters: Counter = Counter()
        rejected: list[NoMatch] = []
        groups: list[tuple[FusionSite, MergeGroup]] = []
        if plan != "none":
            for sub in list(G.iter_graphs(graph)):
                site = FusionSite(run, sub, {id(n) for n in sub.nodes})
                for group in self._plan_graph(site, ops, plan, rejected, counters):
                    groups.append((site, group))
        for site, group in groups:
            counters["nodes_removed"] += rewrite_group(site, group)
            counters["groups_merged"] += 1
            counters["branches_merged"] += len(group.branches)
            counters["splits_added"] += 0 if group.split_free else 1
            counters["activations_merged"] += bool(group.branches[0].tail.activation)
        run.flush_removed()
        if rejected:
            counters["candidates_rejected"] = len(rejected)
        notes: list[str] = []
        if explain:
            limit = max(0, int(opts.max_notes))
            if plan == "none":
                notes.append(f"mode={opts.mode} merges nothing on target '{getattr(ctx, 'target', 'cpu')}'")
            notes += [r.describe() for r in rejected[:limit]]
            if len(rejected) > limit:
                notes.append(f"... and {len(rejected) - limit} more candidates not merged")
        return PassResult(changed=bool(groups), counters=dict(counters), notes=notes)

    # ------------------------------------------------------------------ options
    def _checked_ops(self) -> set[str]:
        ops = self.options.ops
        ops = [o.strip() for o in (ops.split("+") if isinstance(ops, str) else ops)]
        unknown = [o for o in ops if o not in KINDS]
        if unknown:
            raise UserInputError(f"fuse-horizontal: ops={'+'.join(ops)} names op types it cannot merge ({', '.join(unknown)}).",
                                 f"use a '+'-separated subset of {'+'.join(MERGEABLE_OPS)}.")
        return set(ops)

    def _plan_kind(self, target: str) -> str:
        """"all" (every merge), "split-free" or "none" for this mode and target."""
        mode = self.options.mode
        if mode not in ("auto", "always", "concat-only", "never-on-cpu"):
            raise UserInputError(f"fuse-horizontal: unknown mode '{mode}'.", "use auto, always, concat-only or never-on-cpu.")
        gpu = target in GPU_TARGETS
        if mode == "always":
            return "all"
        if mode == "concat-only":
            return "split-free"
        if mode == "never-on-cpu":
            return "all" if gpu else "none"
        return "all" if gpu else CPU_AUTO_PLAN

    # ------------------------------------------------------------------ planning
    def _plan_graph(self, site: FusionSite, ops: set[str], plan: str, rejected: list[NoMatch],
                    counters: Counter) -> list[MergeGroup]:
        min_branches = int(self.options.min_branches)
        limit = max(0, int(self.options.max_out_channels))
        order = {id(n): i for i, n in enumerate(site.graph.nodes)}
        seen: set[int] = set()
        groups: list[MergeGroup] = []
        for node in list(site.graph.nodes):
            if node.op not in ops or not node.inputs or not G.is_default_domain(node):
                continue
            x = node.inputs[0]
            if id(x) in seen:
                continue
            seen.add(id(x))
            siblings = _candidates(site, x, ops)
            if len(siblings) < min_branches or isinstance(x, gs.Constant):
                continue
            partitions: dict[tuple, list[Branch]] = {}
            for sib in siblings:
                branch = KINDS[sib.op].inspect(site, sib, order[id(sib)])
                if isinstance(branch, str):
                    rejected.append(NoMatch(sib, branch))
                else:
                    partitions.setdefault(branch.key, []).append(branch)
            for branches in partitions.values():
                if len(branches) >= min_branches:
                    kind = branches[0].kind
                    groups.extend(self._plan_partition(site, kind, x, branches, plan, min_branches, limit,
                                                       rejected, counters))
            # one note per op type for the siblings left without enough compatible partners
            unpaired = [b for bs in partitions.values() if len(bs) < min_branches for b in bs]
            for op in sorted({b.node.op for b in unpaired}):
                same_op = [b for b in unpaired if b.node.op == op]
                if len(same_op) >= 2:
                    names = ", ".join(f"'{b.node.name}'" for b in same_op)
                    rejected.append(NoMatch(same_op[0].node, f"{len(same_op)} sibling {op} reading '{x.name}' ({names}) "
                                            f"differ in kernel, strides, pads, dilations, dtype or activation "
                                            f"(fewer than min_branches={min_branches} agree)"))
        return groups

    def _plan_partition(self, site, kind, x, branches, plan, min_branches, limit, rejected, counters):
        units = _split_units(_concat_runs(site, kind, branches, 2), limit)
        if plan == "split-free":
            packs = [[u] for u in units if u.concat is not None and len(u.branches) >= min_branches]
            chosen = {id(p[0]) for p in packs}
            left = MergeGroup(kind, x, [u for u in units if id(u) not in chosen])
            if len(left.branches) >= min_branches:
                counters["groups_skipped_for_target"] += 1
                rejected.append(NoMatch(left.branches[0].node,
                                        f"{left.describe()}: merging needs a Split, which did not pay on the CPU "
                                        "(see the module doc); mode=always merges them anyway"))
        else:
            packs = _pack(units, limit)
        groups = []
        for pack in packs:
            group = MergeGroup(kind, x, pack)
            if len(group.branches) < min_branches:
                if len(group.branches) > 1 or len(packs) > 1:
                    rejected.append(NoMatch(group.branches[0].node, f"{group.describe()}: fewer than "
                                            f"min_branches={min_branches} fit max_out_channels={limit}"))
                continue
            problem = _group_problem(site, group)
            if problem:
                rejected.append(NoMatch(group.branches[0].node, f"{group.describe()}: {problem}"))
                continue
            groups.append(group)
        return groups


def _group_problem(site: FusionSite, group: MergeGroup) -> str | None:
    """Why a planned group cannot be written in this model's opset (None when it can)."""
    branches = group.branches
    if group.kind.op == "Gemm" and len({b.params["alpha"] for b in branches}) > 1 \
            and branches[0].weight.dtype not in FLOAT_DTYPES:
        return "different alphas on a non-float weight cannot be folded exactly"
    if not group.split_free and group.kind.channel_axis(branches[0].out_rank) is None \
            and _opset(site) < NEGATIVE_AXIS_SINCE:
        return f"the output rank is unknown and Split before opset {NEGATIVE_AXIS_SINCE} needs a non-negative axis"
    return None


# =========================================================================== rewriting
def rewrite_group(site: FusionSite, group: MergeGroup) -> int:
    """Merge ``group``; return the net number of nodes removed."""
    branches = group.branches
    kind = group.kind
    names = site.run.names
    leader = branches[0]
    base = f"{leader.node.name or kind.op}_horizontal"
    # Each unit's output segment: a branch output, the Concat's output, or a new tensor that
    # replaces a run of Concat inputs. The old tensors are reused, so their names survive.
    segments: list[gs.Tensor] = []
    removed = 0
    for unit in group.units:
        if unit.concat is None:
            segments.append(unit.branches[0].output)
            continue
        concat = unit.concat
        run_ids = [id(b.output) for b in unit.branches]
        if len(concat.inputs) == len(run_ids):  # the run is the whole Concat: the merge replaces it
            out = concat.outputs[0]
            site.run.detach(concat)
            removed += 1
            segments.append(out)
            continue
        start = next(i for i, t in enumerate(concat.inputs) if id(t) == run_ids[0])
        if [id(t) for t in concat.inputs[start:start + len(run_ids)]] != run_ids:  # pragma: no cover - planned so
            raise AssertionError(f"Concat '{concat.name}' inputs changed while merging")
        piece = gs.Variable(names(f"{base}_segment"), dtype=leader.weight.dtype)
        new_inputs = list(concat.inputs[:start]) + [piece] + list(concat.inputs[start + len(run_ids):])
        concat.inputs.clear()
        concat.inputs.extend(new_inputs)
        segments.append(piece)
    activation = leader.tail.activation  # the leader's copy serves every branch (equal keys)
    activation_extras = list(activation[0].inputs[1:]) if activation else []  # read before detaching
    for b in branches:
        for n in [b.node] + b.tail.nodes:
            site.run.detach(n)
            removed += 1
    merged = kind.merge(site, group.x, branches, base)
    added = 1 + (kind.op == "MatMul" and any(b.tail.bias is not None for b in branches))
    if activation:
        merged = _apply_activation(site, activation, activation_extras, merged, base)
        added += len(activation)
    if len(segments) == 1:
        merged.inputs[0].outputs[0] = segments[0]  # the last new node writes the segment itself
    else:
        axis = kind.channel_axis(leader.out_rank)
        if kind.op == "MatMul" and (axis is None or _opset(site) >= NEGATIVE_AXIS_SINCE):
            axis = -1  # the last axis, whatever the rank
        sizes = [u.channels for u in group.units]
        attrs = {"axis": int(axis)}
        inputs = [merged]
        if _opset(site) >= SPLIT_SIZES_INPUT_SINCE:
            inputs.append(names.constant(f"{base}.split", np.array(sizes, dtype=np.int64)))
        else:
            attrs["split"] = sizes
        site.graph.nodes.append(gs.Node("Split", name=names(f"{base}_split"), attrs=attrs, inputs=inputs,
                                        outputs=list(segments)))
        added += 1
    return removed - added


def _apply_activation(site: FusionSite, activation: list[gs.Node], extra_inputs: list[gs.Tensor],
                      y: gs.Tensor, base: str) -> gs.Tensor:
    """Apply a branch's activation once to ``y``: ``[act]`` → ``act(y)``, ``[gate, Mul]`` → ``y * gate(y)``."""
    names = site.run.names
    first = activation[0]
    out = gs.Variable(names(f"{base}_{first.op.lower()}"), dtype=y.dtype)
    site.graph.nodes.append(gs.Node(first.op, name=names(f"{base}_{first.op}"), attrs=dict(first.attrs),
                                    inputs=[y] + extra_inputs, outputs=[out]))
    if len(activation) == 1:
        return out
    gated = gs.Variable(names(f"{base}_gated"), dtype=y.dtype)
    site.graph.nodes.append(gs.Node("Mul", name=names(f"{base}_Mul"), inputs=[y, out], outputs=[gated]))
    return gated


# =========================================================================== small helpers
def _unique(nodes: list[gs.Node]) -> list[gs.Node]:
    """Nodes without repeats (a node reading a tensor twice is listed twice by gs)."""
    seen: set[int] = set()
    unique = []
    for n in nodes:
        if id(n) not in seen:
            seen.add(id(n))
            unique.append(n)
    return unique


def _sole_local_reader(site: FusionSite, tensor: gs.Tensor) -> gs.Node | None:
    """The only node reading ``tensor`` when it is in this graph, in the default domain, and
    ``tensor`` is not a graph output; else None."""
    if id(tensor) in site.run.output_ids:
        return None
    readers = _unique(G.consumers(tensor))
    if len(readers) != 1 or id(readers[0]) not in site.node_ids or not G.is_default_domain(readers[0]):
        return None
    return readers[0]


def _present(tensor: gs.Tensor | None) -> bool:
    return tensor is not None and not (isinstance(tensor, gs.Variable) and tensor.name == "" and not tensor.inputs)


def _optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if index < len(node.inputs) and _present(node.inputs[index]) else None


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _opset(site: FusionSite) -> int:
    return int(site.root.opset) if site.root.opset is not None else 1
