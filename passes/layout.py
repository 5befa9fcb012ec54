"""Lossless layout passes: fuse consecutive data-movement ops into one (or none), and push
Transposes through layout-agnostic ops until they cancel.

``fuse-consecutive`` rewrites pairs of consecutive ops that only move or regroup elements,
the fusions onnxoptimizer (and so onnx-simplifier) runs:

* Transpose ∘ Transpose → one Transpose with the composed permutation, none when it is the identity;
* Reshape/Flatten/Squeeze/Unsqueeze → Reshape → one Reshape of the original input, when the
  second shape is a constant without ``0`` entries (``0`` copies a dimension of the
  intermediate unless ``allowzero=1``) or its ``0`` entries resolve from static shapes;
* Squeeze(A) → Unsqueeze(A) and Unsqueeze(A) → Squeeze(A) → nothing; Squeeze ∘ Squeeze and
  Unsqueeze ∘ Unsqueeze → one node with the composed axes;
* Reduce*(keepdims=0, axes A) → Unsqueeze(A) → the Reduce with keepdims=1, and nothing at all
  when every reduced axis has static size 1 and the reduction returns a lone element unchanged;
* Slice → Slice with constant parameters → one Slice (disjoint axes merge their lists; an axis
  sliced twice merges when both steps are 1 and its size is static).

Every rewrite is exact. A pair that becomes one node needs the intermediate tensor to feed only
the second op and not be a graph output (otherwise the first op stays and nothing is saved).
A pair that is an identity needs neither: the second op's readers read the first op's input,
and the first op stays for its other readers.

Axes (Squeeze/Unsqueeze before opset 13, Reduce* before opset 18 (ReduceSum before 13), Slice
before opset 10) come as attributes, later as inputs; both forms are read whatever the opset,
and new nodes are written in the form of the model's opset. Negative axes are normalised with
the known rank and the pair is skipped when the rank is needed and unknown.

``fuse-transposes`` removes the Transpose pairs that NHWC exporters (tf2onnx, keras2onnx) put
around every NCHW op: a Transpose(P) moves down through elementwise ops (unary; binary/variadic
with constants, which are transposed after numpy-style rank alignment, or with other Transpose(P)
outputs), Concat/Split/ArgMax/Softmax (axis a → P[a]), Reduce* with keepdims, Pad, Slice and Tile
(per-axis parameters reordered) until it reaches a Transpose, which composes with P and vanishes
when it is P's inverse. It rewrites a region only when that removes nodes: every tensor that a
layout-dependent op (Conv, Resize, Reshape, ...) or a graph output still reads as it was gets a
Transpose(P) back, and those are counted against the ones removed.

The rules follow passes/fusion.py: ``match`` returns ``None`` (no candidate), a
:class:`~onnxopt.passes.fusion.NoMatch` with the reason, or a match that ``rewrite`` applies.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.pass_base import PassResult
from onnxopt.passes.cleanup import safe_to_bypass
from onnxopt.passes.fusion import FusionPass, FusionRule, FusionRun, FusionSite, NoMatch, apply_rules
from onnxopt.registry import register_pass

# Opset from which the axes of these ops are an input instead of an attribute (ONNX changelog).
AXES_INPUT_SINCE = {"Squeeze": 13, "Unsqueeze": 13, "ReduceSum": 13}
REDUCE_AXES_INPUT_SINCE = 18  # every other Reduce* op
SLICE_INPUTS_SINCE = 10

REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
# Reductions that return a single element unchanged (mean of one value = the value, ...).
# L1/L2/SumSquare/LogSum/LogSumExp apply abs, square, log or exp to it.
IDENTITY_ON_ONE_ELEMENT = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"})

# Ops that regroup elements without reordering them: one of them feeding a Reshape to a
# fully known shape is that Reshape of its input.
REGROUPING_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


# =========================================================================== run state
class LayoutRun(FusionRun):
    """:class:`FusionRun` that also knows per-dimension sizes (declared, else ONNX shape inference)."""

    def dims(self, tensor: gs.Tensor) -> list[int | None] | None:
        """The tensor's dims (an int where static, None where not), or None when its rank is unknown."""
        if isinstance(tensor, gs.Constant):
            return [int(d) for d in tensor.shape]
        declared = None
        if tensor.shape is not None:
            declared = [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in tensor.shape]
            if all(d is not None for d in declared):
                return declared
        inferred = self._inferred(tensor)
        if inferred is None or (declared is not None and len(inferred) != len(declared)):
            return declared
        if declared is None:
            return inferred
        return [d if d is not None else i for d, i in zip(declared, inferred)]

    def rank(self, tensor: gs.Tensor) -> int | None:
        rank = super().rank(tensor)
        if rank is None:
            dims = self.dims(tensor)
            rank = None if dims is None else len(dims)
        return rank

    def _inferred(self, tensor: gs.Tensor) -> list[int | None] | None:
        """Dims from ONNX shape inference, run once per run (the table FusionRun.rank fills too).

        Rewrites keep every surviving tensor's shape and name, so the table stays valid."""
        if not tensor.name:
            return None
        if self._inferred_shapes is None:
            self.flush_removed()  # export a graph without half-detached nodes
            self._inferred_shapes = G.inferred_shapes(self.root)
        dims = self._inferred_shapes.get(tensor.name)
        if dims is None:
            return None
        return [d if isinstance(d, int) and d >= 0 else None for d in dims]


# =========================================================================== matches
@dataclass
class Passthrough:
    """``second`` returns ``source`` unchanged: its readers read ``source``; ``first`` stays if still read."""

    first: gs.Node
    second: gs.Node
    source: gs.Tensor
    counter: str


@dataclass
class Replace:
    """``second`` becomes ``op(inputs, attrs)`` on the first op's input; ``first`` (now unread) goes."""

    first: gs.Node
    second: gs.Node
    op: str
    inputs: list
    attrs: dict = field(default_factory=dict)
    counter: str = "fused"


class LayoutRule(FusionRule):
    """A rule anchored on the second op of a pair; ``match`` returns a Passthrough/Replace match."""

    first_ops: ClassVar[tuple[str, ...]] = ()

    def first_of(self, site: FusionSite, second: gs.Node) -> gs.Node | None:
        """The producer of the second op's data input when it is one of ``first_ops`` of this graph."""
        if not second.inputs or second.inputs[0].is_empty():
            return None
        first = site.local_producer(second.inputs[0])
        if first is None or first.op not in self.first_ops or len(first.outputs) != 1 or not first.inputs:
            return None
        return first

    @staticmethod
    def merge_problem(site: FusionSite, first: gs.Node, second: gs.Node) -> NoMatch | None:
        """Why the pair cannot become one node (the intermediate must vanish), None when it can."""
        problem = site.sole_use_problem(first.outputs[0], second)
        return NoMatch(second, problem) if problem else None

    def rewrite(self, site: FusionSite, match) -> "int | NoMatch":
        removed = _apply(site, match)
        if removed is None:
            return NoMatch(match.second, "its output is a graph output that cannot take the input's place")
        return removed


# =========================================================================== small helpers
def _int_list(value) -> list[int] | None:
    if value is None:
        return None
    array = np.asarray(value)
    if array.dtype.kind not in "iu" or array.ndim > 1:
        return None
    return [int(v) for v in array.reshape(-1)]


def _input_values(node: gs.Node, index: int) -> tuple[bool, list[int] | None]:
    """(present, constant int values) of optional input ``index``; values None when not constant."""
    if index >= len(node.inputs) or node.inputs[index].is_empty():
        return False, None
    return True, _int_list(G.constant_value(node.inputs[index]))


def _axes_operand(node: gs.Node) -> tuple[list[int] | None, str | None]:
    """The ``axes`` of Squeeze/Unsqueeze/Reduce* from the attribute or the second input.

    Returns (axes, None), (None, None) when absent, or (None, reason) when they are not constant.
    """
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]], None
    present, values = _input_values(node, 1)
    if not present:
        return None, None
    if values is None:
        return None, f"axes '{node.inputs[1].name}' are computed at run time"
    return values, None


def _normalized(axes: list[int], rank: int | None) -> list[int] | None:
    """Axes made non-negative with ``rank`` (None: only non-negative axes pass); None when a
    negative axis meets an unknown rank or an axis is out of range."""
    if rank is None:
        return list(axes) if all(a >= 0 for a in axes) else None
    out = [a + rank if a < 0 else a for a in axes]
    return out if all(0 <= a < rank for a in out) else None


def _nth_position_not_in(taken: set[int], n: int) -> int:
    """The ``n``-th (0-based) non-negative integer that is not in ``taken``."""
    position = -1
    for _ in range(n + 1):
        position += 1
        while position in taken:
            position += 1
    return position


def _with_axes(site: FusionSite, op: str, data: gs.Tensor, attrs: dict, axes: list[int], hint: str) -> tuple[list, dict]:
    """Inputs and attributes of a Squeeze/Unsqueeze on ``data`` with ``axes``, in the model opset's form."""
    attrs = {k: v for k, v in attrs.items() if k != "axes"}
    if site.root.opset is not None and site.root.opset >= AXES_INPUT_SINCE[op]:
        return [data, site.run.names.constant(hint, np.array(axes, dtype=np.int64))], attrs
    attrs["axes"] = list(axes)
    return [data], attrs


def _describe(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'"


# =========================================================================== Transpose ∘ Transpose
class TransposePair(LayoutRule):
    """Transpose(p1) → Transpose(p2) = Transpose(p) with ``p[i] = p1[p2[i]]`` (ONNX Transpose:
    output axis i is input axis perm[i]); nothing when ``p`` is the identity."""

    anchor_ops = ("Transpose",)
    first_ops = ("Transpose",)

    def match(self, site: FusionSite, second: gs.Node):
        first = self.first_of(site, second)
        if first is None:
            return None
        x = first.inputs[0]
        p1, p2 = G.attr(first, "perm"), G.attr(second, "perm")
        if p1 is None or p2 is None:  # the default perm reverses the axes
            rank = site.run.rank(x)
            if rank is None:
                return NoMatch(second, "a Transpose without perm reverses the axes, and the rank is unknown")
            p1 = list(range(rank))[::-1] if p1 is None else p1
            p2 = list(range(rank))[::-1] if p2 is None else p2
        p1, p2 = [int(a) for a in p1], [int(a) for a in p2]
        if len(p1) != len(p2) or sorted(p2) != list(range(len(p1))):
            return NoMatch(second, f"perms {p1} and {p2} do not compose")
        composed = [p1[i] for i in p2]
        if composed == list(range(len(composed))):
            return Passthrough(first, second, x, "transposes_cancelled")
        return self.merge_problem(site, first, second) or Replace(
            first, second, "Transpose", [x], {"perm": composed}, "transposes_fused")


# =========================================================================== (regrouping) → Reshape
class ReshapeChain(LayoutRule):
    """Reshape/Flatten/Squeeze/Unsqueeze → Reshape(s) = Reshape(x, s): none of them reorders elements,
    so only ``s`` decides the result once its ``0`` entries (copies of the intermediate's dims,
    ONNX Reshape with allowzero=0) are resolved."""

    anchor_ops = ("Reshape",)
    first_ops = REGROUPING_OPS

    def match(self, site: FusionSite, second: gs.Node):
        first = self.first_of(site, second)
        if first is None or len(second.inputs) < 2:
            return None
        shape_tensor = second.inputs[1]
        shape = _int_list(G.constant_value(shape_tensor))
        if shape is None:
            return NoMatch(second, f"target shape '{shape_tensor.name}' is not a constant")
        problem = self.merge_problem(site, first, second)
        if problem:
            return problem
        allowzero = int(G.attr(second, "allowzero", 0))
        zeros = [i for i, d in enumerate(shape) if d == 0] if not allowzero else []
        if zeros:
            dims = site.run.dims(first.outputs[0])
            if dims is None or any(i >= len(dims) or dims[i] is None for i in zeros):
                return NoMatch(second, f"shape {shape} copies dims ('0' entries) of '{first.outputs[0].name}' "
                                       "that are not static")
            shape = [dims[i] if i in zeros else d for i, d in enumerate(shape)]
            shape_tensor = site.run.names.constant(f"{second.name or 'Reshape'}_shape", np.array(shape, dtype=np.int64))
        return Replace(first, second, "Reshape", [first.inputs[0], shape_tensor], dict(second.attrs),
                       "reshapes_fused")


# =========================================================================== Squeeze/Unsqueeze pairs
def _squeeze_axes(site: FusionSite, node: gs.Node) -> tuple[list[int] | None, str | None]:
    """Squeeze axes normalised against its input rank; without axes, the static unit dims."""
    axes, problem = _axes_operand(node)
    if problem:
        return None, problem
    x = node.inputs[0]
    if axes is None:  # squeeze every dim of size 1: needs the whole shape
        dims = site.run.dims(x)
        if dims is None or any(d is None for d in dims):
            return None, f"Squeeze '{node.name}' has no axes and the shape of '{x.name}' is not static"
        return [i for i, d in enumerate(dims) if d == 1], None
    normalized = _normalized(axes, site.run.rank(x) if any(a < 0 for a in axes) else None)
    if normalized is None:
        return None, f"negative axes {axes} of {_describe(node)} and the rank is unknown"
    return normalized, None


def _unsqueeze_axes(site: FusionSite, node: gs.Node) -> tuple[list[int] | None, str | None]:
    """Unsqueeze axes normalised against its output rank."""
    axes, problem = _axes_operand(node)
    if problem or axes is None:
        return None, problem or f"Unsqueeze '{node.name}' has no axes"
    rank = None
    if any(a < 0 for a in axes):
        in_rank = site.run.rank(node.inputs[0])
        rank = None if in_rank is None else in_rank + len(axes)
    normalized = _normalized(axes, rank)
    if normalized is None:
        return None, f"negative axes {axes} of {_describe(node)} and the rank is unknown"
    return normalized, None


def _same_axes(first: gs.Node, second: gs.Node) -> bool | None:
    """Whether both nodes name the same axes as written (None when either is not a constant list).

    The axes of Squeeze(A) → Unsqueeze(B), Unsqueeze(A) → Squeeze(B) and Reduce(A) → Unsqueeze(B)
    are in one coordinate system (the rank of the pair's outer tensors), so equal sets mean the
    same positions even when negative and the rank is unknown.
    """
    a, problem_a = _axes_operand(first)
    b, problem_b = _axes_operand(second)
    if a is None or b is None or problem_a or problem_b:
        return None
    return sorted(set(a)) == sorted(set(b)) and len(set(a)) == len(a)


class UnsqueezeAfter(LayoutRule):
    """Squeeze(A) → Unsqueeze(A) = x; Unsqueeze(A) → Unsqueeze(B) = Unsqueeze(B ∪ A mapped to the
    output); Reduce*(keepdims=0, A) → Unsqueeze(A) = Reduce*(keepdims=1, A)."""

    anchor_ops = ("Unsqueeze",)
    first_ops = ("Squeeze", "Unsqueeze") + REDUCE_OPS

    def match(self, site: FusionSite, second: gs.Node):
        first = self.first_of(site, second)
        if first is None:
            return None
        if first.op == "Squeeze":
            return _cancelling_pair(site, first, second, _squeeze_axes, _unsqueeze_axes, "squeeze_unsqueeze_cancelled")
        if first.op == "Unsqueeze":
            return _merged_pair(site, first, second, _unsqueeze_axes, "unsqueezes_fused")
        return ReduceKeepdims.match_pair(site, first, second)


class SqueezeAfter(LayoutRule):
    """Unsqueeze(A) → Squeeze(A) = x; Squeeze(A) → Squeeze(B) = Squeeze(A ∪ B mapped to the input)."""

    anchor_ops = ("Squeeze",)
    first_ops = ("Squeeze", "Unsqueeze")

    def match(self, site: FusionSite, second: gs.Node):
        first = self.first_of(site, second)
        if first is None:
            return None
        if first.op == "Unsqueeze":
            return _cancelling_pair(site, first, second, _unsqueeze_axes, _squeeze_axes, "unsqueeze_squeeze_cancelled")
        return _merged_pair(site, first, second, _squeeze_axes, "squeezes_fused")


def _cancelling_pair(site: FusionSite, first: gs.Node, second: gs.Node, first_axes, second_axes, counter: str):
    """Squeeze(A) → Unsqueeze(A) or Unsqueeze(A) → Squeeze(A): the pair is the identity."""
    x = first.inputs[0]
    if _same_axes(first, second):
        return Passthrough(first, second, x, counter)
    a, problem = first_axes(site, first)
    if problem:
        return NoMatch(second, problem)
    b, problem = second_axes(site, second)
    if problem:
        return NoMatch(second, problem)
    if sorted(a) != sorted(b):
        return NoMatch(second, f"{first.op.lower()}s axes {sorted(a)} but {second.op.lower()}s {sorted(b)}")
    return Passthrough(first, second, x, counter)


def _merged_pair(site: FusionSite, first: gs.Node, second: gs.Node, axes_of, counter: str):
    """Squeeze∘Squeeze or Unsqueeze∘Unsqueeze → one node with the combined axes."""
    problem = LayoutRule.merge_problem(site, first, second)
    if problem:
        return problem
    inner, reason = axes_of(site, first)
    outer, reason2 = axes_of(site, second) if not reason else (None, None)
    if reason or reason2:
        return NoMatch(second, reason or reason2)
    # Unsqueeze axes count in the output, Squeeze axes in the input: the node whose axes are
    # already in the combined node's coordinates keeps them; the other's positions skip past them
    # (intermediate position j is the j-th position not taken).
    kept, mapped = (outer, inner) if second.op == "Unsqueeze" else (inner, outer)
    taken = set(kept)
    combined = sorted(taken | {_nth_position_not_in(taken, i) for i in mapped})
    inputs, attrs = _with_axes(site, second.op, first.inputs[0], second.attrs, combined,
                               f"{second.name or second.op}_axes")
    return Replace(first, second, second.op, inputs, attrs, counter)


# =========================================================================== Reduce → Unsqueeze
class ReduceKeepdims:
    """Reduce*(keepdims=0, axes A) → Unsqueeze(A) = Reduce*(keepdims=1, axes A) (ONNX Reduce*:
    keepdims=1 keeps the reduced dims with size 1, exactly where Unsqueeze(A) puts them back).
    When every reduced dim has static size 1 and the reduction returns a lone element unchanged,
    the pair is the identity."""

    @staticmethod
    def match_pair(site: FusionSite, reduce: gs.Node, unsqueeze: gs.Node):
        if int(G.attr(reduce, "keepdims", 1)) != 0:
            return NoMatch(unsqueeze, f"{_describe(reduce)} keeps its dims already")
        x = reduce.inputs[0]
        axes, problem = _axes_operand(reduce)
        if problem:
            return NoMatch(unsqueeze, problem)
        same = bool(axes) and _same_axes(reduce, unsqueeze)
        if not axes:  # absent or empty: every axis, unless noop_with_empty_axes (then x passes through)
            if int(G.attr(reduce, "noop_with_empty_axes", 0)):
                return NoMatch(unsqueeze, f"{_describe(reduce)} has no axes and noop_with_empty_axes=1")
            rank = site.run.rank(x)
            if not rank:
                return NoMatch(unsqueeze, f"{_describe(reduce)} reduces every axis of a tensor of unknown rank or a scalar")
            reduced = list(range(rank))
        elif same:  # Reduce axes and Unsqueeze axes both count in rank(x)
            reduced = axes
        else:
            reduced = _normalized(axes, site.run.rank(x) if any(a < 0 for a in axes) else None)
            if reduced is None:
                return NoMatch(unsqueeze, f"negative axes {axes} of {_describe(reduce)} and the rank is unknown")
        if not same:
            unsqueezed, problem = _unsqueeze_axes(site, unsqueeze)
            if problem:
                return NoMatch(unsqueeze, problem)
            if sorted(set(reduced)) != sorted(unsqueezed) or len(set(reduced)) != len(reduced):
                return NoMatch(unsqueeze, f"reduces axes {sorted(reduced)} but unsqueezes {sorted(unsqueezed)}")
        if reduce.op in IDENTITY_ON_ONE_ELEMENT:
            dims = site.run.dims(x)
            positions = None if dims is None else _normalized(reduced, len(dims))
            if positions is not None and all(dims[a] == 1 for a in positions):
                return Passthrough(reduce, unsqueeze, x, "reduce_unsqueeze_cancelled")
        problem = LayoutRule.merge_problem(site, reduce, unsqueeze)
        if problem:
            return problem
        attrs = dict(reduce.attrs)
        attrs["keepdims"] = 1
        return Replace(reduce, unsqueeze, reduce.op, list(reduce.inputs), attrs, "reduces_keepdims")


# =========================================================================== Slice → Slice
@dataclass
class SliceParams:
    starts: list[int]
    ends: list[int]
    axes: list[int]
    steps: list[int]


def _slice_params(node: gs.Node) -> SliceParams | str:
    """Constant starts/ends/axes/steps of a Slice (attributes before opset 10, inputs after), or why not."""
    if "starts" in node.attrs:
        starts, ends = [int(v) for v in node.attrs["starts"]], [int(v) for v in node.attrs.get("ends", [])]
        axes = node.attrs.get("axes")
        axes = [int(v) for v in axes] if axes is not None else None
        steps = None
    else:
        values = [_input_values(node, i) for i in range(1, 5)]
        for (present, value), what in zip(values, ("starts", "ends", "axes", "steps")):
            if present and value is None:
                return f"{_describe(node)} {what} are not constant"
        (_, starts), (_, ends), (_, axes), (_, steps) = values
        if starts is None or ends is None:
            return f"{_describe(node)} has no starts/ends"
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not (len(starts) == len(ends) == len(axes) == len(steps)):
        return f"{_describe(node)} starts/ends/axes/steps differ in length"
    return SliceParams(starts, ends, axes, steps)


def _clamp(index: int, size: int) -> int:
    """A Slice start/end for step 1: negative counts from the end, then clamp to [0, size] (ONNX Slice)."""
    if index < 0:
        index += size
    return min(max(index, 0), size)


class SlicePair(LayoutRule):
    """Slice → Slice = one Slice: slices of different axes commute, so their lists merge; an axis
    sliced twice with step 1 takes ``[s1 + s2, s1 + max(s2, e2))`` of a static size (ranges clamped)."""

    anchor_ops = ("Slice",)
    first_ops = ("Slice",)

    def match(self, site: FusionSite, second: gs.Node):
        first = self.first_of(site, second)
        if first is None:
            return None
        problem = self.merge_problem(site, first, second)
        if problem:
            return problem
        p1, p2 = _slice_params(first), _slice_params(second)
        for params in (p1, p2):
            if isinstance(params, str):
                return NoMatch(second, params)
        x = first.inputs[0]
        all_axes = p1.axes + p2.axes
        rank = site.run.rank(x) if any(a < 0 for a in all_axes) else None
        a1, a2 = _normalized(p1.axes, rank), _normalized(p2.axes, rank)
        if a1 is None or a2 is None:
            return NoMatch(second, f"negative axes {p1.axes}, {p2.axes} and the rank is unknown")
        if len(set(a1)) != len(a1) or len(set(a2)) != len(a2):
            return NoMatch(second, "an axis repeats within one Slice")
        merged = {a: [s, e, st] for a, s, e, st in zip(a1, p1.starts, p1.ends, p1.steps)}
        for a, s2, e2, st2 in zip(a2, p2.starts, p2.ends, p2.steps):
            if a not in merged:
                merged[a] = [s2, e2, st2]
                continue
            s1, e1, st1 = merged[a]
            if st1 != 1 or st2 != 1:
                return NoMatch(second, f"axis {a} is sliced twice with steps {st1}, {st2}; only steps 1 compose")
            dims = site.run.dims(x)
            size = dims[a] if dims is not None and a < len(dims) else None
            if size is None:
                return NoMatch(second, f"axis {a} is sliced twice and its size is not static")
            start1, end1 = _clamp(s1, size), _clamp(e1, size)
            length = max(end1 - start1, 0)
            start2, end2 = _clamp(s2, length), _clamp(e2, length)
            merged[a] = [start1 + start2, start1 + max(end2, start2), 1]
        axes = list(merged)
        starts, ends, steps = ([merged[a][k] for a in axes] for k in range(3))
        hint = second.name or "Slice"
        attrs = {k: v for k, v in second.attrs.items() if k not in ("starts", "ends", "axes")}
        if "starts" in second.attrs or (site.root.opset is not None and site.root.opset < SLICE_INPUTS_SINCE):
            attrs.update(starts=starts, ends=ends, axes=axes)  # Slice-1 has no steps: both had steps 1
            inputs = [x]
        else:
            names = site.run.names
            inputs = [x] + [names.constant(f"{hint}_{what}", np.array(values, dtype=np.int64))
                            for what, values in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))]
        return Replace(first, second, "Slice", inputs, attrs, "slices_fused")


# =========================================================================== rewriting
def _apply(site: FusionSite, match: Passthrough | Replace) -> int | None:
    """Apply a match; returns the number of nodes removed (None when a Passthrough cannot be applied)."""
    run = site.run
    if isinstance(match, Passthrough):
        out = match.second.outputs[0]
        if id(out) in run.output_ids:
            if not safe_to_bypass(run.root, site.graph, match.source, out):
                return None
            G.replace_tensor(run.root, out, match.source)  # the source takes the output's name
            run.output_ids.add(id(match.source))
        else:
            G.replace_uses(out, match.source)
        run.detach(match.second)
        removed = 1
        intermediate = match.first.outputs[0]
        if not intermediate.outputs and id(intermediate) not in run.output_ids:
            run.detach(match.first)
            removed += 1
        return removed
    second = match.second
    second.op = match.op
    second.attrs = dict(match.attrs)
    second.inputs.clear()
    second.inputs.extend(match.inputs)
    run.detach(match.first)  # its output fed only ``second`` (checked by the match)
    return 1


@register_pass
class FuseConsecutive(FusionPass):
    name = "fuse-consecutive"
    summary = ("Fuse consecutive Transpose, Reshape, Squeeze/Unsqueeze, Reduce→Unsqueeze and Slice pairs "
               "into one node, or none when they cancel.")
    rules = (TransposePair(), ReshapeChain(), UnsqueezeAfter(), SqueezeAfter(), SlicePair())

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        explain = bool(self.options.explain or getattr(ctx, "explain", False))
        return apply_rules(graph, self.rules, explain=explain, max_notes=max(0, int(self.options.max_notes)),
                           run_factory=LayoutRun)


# =========================================================================== fuse-transposes
# Exporters from NHWC frameworks (tf2onnx, keras2onnx) wrap every NCHW op in Transpose pairs:
# Conv → Transpose(NCHW→NHWC) → Relu → Add(bias) → Transpose(NHWC→NCHW) → Conv. The ops in between
# do not care about the layout, so the first Transpose can move down past them until it meets its
# inverse and both vanish. Notation: a *region tensor* r is one that the rewrite recomputes in the
# layout before the Transpose: its *twin* r' satisfies r = Transpose(r', P). An op of the region
# runs on the twins with its axis parameters mapped by P: axis i of r is axis P[i] of r'.


@dataclass(frozen=True)
class PushFrame:
    """The permutation being pushed down and the model opset; maps axis parameters through it."""

    perm: tuple[int, ...]
    opset: int

    @property
    def rank(self) -> int:
        return len(self.perm)

    @property
    def inverse(self) -> list[int]:
        inverse = [0] * self.rank
        for i, p in enumerate(self.perm):
            inverse[p] = i
        return inverse

    def axis(self, axis: int) -> int | None:
        """Axis ``axis`` of a region tensor (negative counts from the end) as an axis of its twin."""
        axis = axis + self.rank if axis < 0 else axis
        return self.perm[axis] if 0 <= axis < self.rank else None

    def axes(self, axes: list[int]) -> list[int] | None:
        mapped = [self.axis(a) for a in axes]
        return None if any(a is None for a in mapped) else mapped

    def per_axis(self, values: list) -> list | None:
        """A list with one entry per axis of a region tensor, reordered for its twin (w[P[i]] = v[i])."""
        if len(values) != self.rank:
            return None
        out = list(values)
        for i, v in enumerate(values):
            out[self.perm[i]] = v
        return out


@dataclass
class NodeEdit:
    """How a pushed op changes: attributes to set, and parameter inputs to replace by new constants."""

    attrs: dict = field(default_factory=dict)
    constants: dict[int, tuple[str, np.ndarray]] = field(default_factory=dict)  # input position → (name, value)


class LayoutAgnostic:
    """An op that commutes with Transpose: ``op(Transpose(x, P)) == Transpose(op'(x), P)``.

    ``data_positions`` are the inputs that live in the layout (the others, such as Clip bounds or
    Reduce axes, are parameters); ``prepare`` returns the :class:`NodeEdit` that turns ``op`` into
    ``op'`` or the reason it cannot. With ``broadcast``, constant data inputs may have a lower rank
    and broadcast (numpy rules); otherwise they have the full rank.
    """

    broadcast: ClassVar[bool] = False

    def data_positions(self, node: gs.Node) -> range:
        return range(min(1, len(node.inputs)))

    def prepare(self, frame: PushFrame, site: FusionSite, node: gs.Node) -> NodeEdit | str:
        return NodeEdit()


class Elementwise(LayoutAgnostic):
    """Unary elementwise ops: each output element depends on the same input element only."""


class PerTensorQuantization(LayoutAgnostic):
    """QuantizeLinear/DequantizeLinear with a scalar scale and zero point are elementwise."""

    def prepare(self, frame, site, node):
        if int(G.attr(node, "block_size", 0)):
            return f"{_describe(node)} quantizes per block"
        for index in (1, 2):
            if index < len(node.inputs) and not node.inputs[index].is_empty():
                if site.run.rank(node.inputs[index]) != 0:
                    return f"{_describe(node)} quantizes per axis (its scale or zero point is not a scalar)"
        return NodeEdit()


class Broadcasting(LayoutAgnostic):
    """Binary/variadic elementwise ops with multidirectional broadcasting (ONNX opset ≥ 7)."""

    broadcast = True

    def data_positions(self, node):
        return range(len(node.inputs))

    def prepare(self, frame, site, node):
        if frame.opset < 7 and int(G.attr(node, "broadcast", 0)):
            return f"{_describe(node)} uses the legacy (opset < 7) broadcast attribute"
        if node.op == "PRelu" and frame.opset < 7:
            return "PRelu before opset 7 does not broadcast its slope"
        return NodeEdit()


class OneAxis(LayoutAgnostic):
    """Ops with one ``axis`` attribute (Concat, Split, ArgMax, LpNormalization, ...): axis a → P[a]."""

    def __init__(self, default_axis: int | None = 0, every_input: bool = False, needs_keepdims: bool = False):
        self.default_axis = default_axis
        self.every_input = every_input
        self.needs_keepdims = needs_keepdims

    def data_positions(self, node):
        return range(len(node.inputs)) if self.every_input else super().data_positions(node)

    def prepare(self, frame, site, node):
        if self.needs_keepdims and not int(G.attr(node, "keepdims", 1)):
            return f"{_describe(node)} drops the reduced axis (keepdims=0)"
        axis = G.attr(node, "axis", self.default_axis)
        mapped = None if axis is None else frame.axis(int(axis))
        if mapped is None:
            return f"{_describe(node)} axis {axis} is not an axis of a rank-{frame.rank} tensor"
        return NodeEdit(attrs={"axis": mapped})


class SoftmaxAxis(LayoutAgnostic):
    """Softmax/LogSoftmax/Hardmax. From opset 13 they normalise along one axis (a → P[a]); before,
    over the axes ``axis..rank-1`` flattened together, which maps onto a suffix of the twin's axes
    only when P sends that suffix onto a suffix."""

    single_axis = OneAxis(-1)

    def prepare(self, frame, site, node):
        if frame.opset >= 13:
            return self.single_axis.prepare(frame, site, node)
        axis = int(G.attr(node, "axis", 1))
        axis = axis + frame.rank if axis < 0 else axis
        if not 0 <= axis < frame.rank:
            return f"{_describe(node)} axis {axis} is not an axis of a rank-{frame.rank} tensor"
        normalised = {frame.perm[i] for i in range(axis, frame.rank)}
        new_axis = frame.rank - len(normalised)
        if normalised != set(range(new_axis, frame.rank)):
            return (f"{_describe(node)} (opset < 13) normalises over axes {axis}.. flattened, which the "
                    f"permutation {list(frame.perm)} does not keep together at the end")
        return NodeEdit(attrs={"axis": new_axis})


class ReduceAxes(LayoutAgnostic):
    """Reduce* with keepdims=1: the reduced axes map through P (no axes: every axis, unchanged)."""

    def prepare(self, frame, site, node):
        if not int(G.attr(node, "keepdims", 1)):
            return f"{_describe(node)} drops the reduced axes (keepdims=0)"
        axes, problem = _axes_operand(node)
        if problem:
            return problem
        if axes is None:
            return NodeEdit()
        mapped = frame.axes(axes)
        if mapped is None:
            return f"{_describe(node)} axes {axes} are not axes of a rank-{frame.rank} tensor"
        if "axes" in node.attrs:
            return NodeEdit(attrs={"axes": sorted(mapped)})
        return NodeEdit(constants={1: ("axes", np.array(sorted(mapped), dtype=np.int64))})


class PadAxes(LayoutAgnostic):
    """Pad: ``pads`` (all begins, then all ends, one per axis) reorder through P; with the opset-18
    ``axes`` input the axes map instead."""

    def prepare(self, frame, site, node):
        if "paddings" in node.attrs:
            return "Pad-1 (paddings attribute) is not supported"
        if "pads" in node.attrs:
            pads = [int(p) for p in node.attrs["pads"]]
            mapped = self._pads(frame, pads)
            return f"{_describe(node)} pads {pads} do not fit rank {frame.rank}" if mapped is None else \
                NodeEdit(attrs={"pads": mapped})
        present, axes = _input_values(node, 3)
        if present:
            mapped = None if axes is None else frame.axes(axes)
            if mapped is None:
                return f"{_describe(node)} axes are not constant or out of range"
            return NodeEdit(constants={3: ("axes", np.array(mapped, dtype=G.constant_value(node.inputs[3]).dtype))})
        present, pads = _input_values(node, 1)
        mapped = self._pads(frame, pads) if pads is not None else None
        if mapped is None:
            return f"{_describe(node)} pads are not constant or do not fit rank {frame.rank}"
        return NodeEdit(constants={1: ("pads", np.array(mapped, dtype=np.int64))})

    @staticmethod
    def _pads(frame: PushFrame, pads: list[int]) -> list[int] | None:
        n = frame.rank
        if len(pads) != 2 * n:
            return None
        return frame.per_axis(pads[:n]) + frame.per_axis(pads[n:])


class TileRepeats(LayoutAgnostic):
    """Tile (opset ≥ 6): one repeat count per axis, reordered through P."""

    def prepare(self, frame, site, node):
        if frame.opset < 6:
            return "Tile before opset 6 has a different signature"
        present, repeats = _input_values(node, 1)
        mapped = frame.per_axis(repeats) if repeats is not None else None
        if mapped is None:
            return f"{_describe(node)} repeats are not a constant with one entry per axis"
        return NodeEdit(constants={1: ("repeats", np.array(mapped, dtype=np.int64))})


class SliceAxes(LayoutAgnostic):
    """Slice: its axes map through P (starts, ends and steps stay with their axis)."""

    def prepare(self, frame, site, node):
        params = _slice_params(node)
        if isinstance(params, str):
            return params
        mapped = frame.axes(params.axes)
        if mapped is None:
            return f"{_describe(node)} axes {params.axes} are not axes of a rank-{frame.rank} tensor"
        if "starts" in node.attrs:
            return NodeEdit(attrs={"axes": mapped})
        index_dtype = G.constant_value(node.inputs[1]).dtype  # starts/ends/axes/steps share one type
        return NodeEdit(constants={3: ("axes", np.array(mapped, dtype=index_dtype))})


_UNARY_OPS = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
              "Softplus", "Softsign", "ThresholdedRelu", "Shrink", "Gelu", "Mish", "Clip", "Abs", "Neg", "Exp",
              "Log", "Sqrt", "Reciprocal", "Erf", "Sign", "Floor", "Ceil", "Round", "Sin", "Cos", "Tan", "Asin",
              "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN", "IsInf", "BitwiseNot",
              "Cast", "Identity")
_BROADCASTING_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", "PRelu", "Where",
                     "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitShift",
                     "BitwiseAnd", "BitwiseOr", "BitwiseXor")

# Op type → how it commutes with a Transpose. Anything else (Conv, Resize, Reshape, Shape, Squeeze,
# MatMul, LayerNormalization, ...) depends on the layout: the region stops in front of it.
LAYOUT_AGNOSTIC: dict[str, LayoutAgnostic] = {
    **{op: Elementwise() for op in _UNARY_OPS},
    **{op: Broadcasting() for op in _BROADCASTING_OPS},
    "QuantizeLinear": PerTensorQuantization(),
    "DequantizeLinear": PerTensorQuantization(),
    "Concat": OneAxis(None, every_input=True),
    "Split": OneAxis(0),
    "LpNormalization": OneAxis(-1),
    "ArgMax": OneAxis(0, needs_keepdims=True),
    "ArgMin": OneAxis(0, needs_keepdims=True),
    "Softmax": SoftmaxAxis(),
    "LogSoftmax": SoftmaxAxis(),
    "Hardmax": SoftmaxAxis(),
    **{op: ReduceAxes() for op in REDUCE_OPS},
    "Pad": PadAxes(),
    "Tile": TileRepeats(),
    "Slice": SliceAxes(),
}


def transpose_perm(site: FusionSite, node: gs.Node) -> list[int] | None:
    """The permutation of a Transpose (the default reverses the axes and needs the rank), or None."""
    perm = G.attr(node, "perm")
    if perm is None:
        rank = site.run.rank(node.inputs[0]) if node.inputs else None
        return None if rank is None else list(range(rank))[::-1]
    perm = [int(p) for p in perm]
    return perm if sorted(perm) == list(range(len(perm))) else None


def _permuted_shape(shape, inverse: list[int]):
    """Shape of the twin r' of r (r = Transpose(r', P)): r'.shape[j] = r.shape[Q[j]], Q = P⁻¹."""
    if shape is None or len(shape) != len(inverse):
        return None
    return [shape[q] for q in inverse]


def transposed_constant(value: np.ndarray, inverse: list[int], broadcast: bool, strip: bool) -> np.ndarray:
    """The constant c' with op(r', c') = Transpose(op(r, c), P⁻¹) for a region tensor r: c aligned to
    the full rank (numpy broadcasting pads leading 1s), then transposed by P⁻¹. With ``strip``, leading
    unit dims are dropped again down to c's own rank (an NHWC bias (C,) becomes (C, 1, 1), not (1, C, 1, 1))."""
    n = len(inverse)
    aligned = value.reshape((1,) * (n - value.ndim) + value.shape) if broadcast else value
    out = np.ascontiguousarray(np.transpose(aligned, inverse))
    if strip:
        while out.ndim > value.ndim and out.shape[0] == 1:
            out = out.reshape(out.shape[1:])
    return out


class TransposeRun(LayoutRun):
    """:class:`LayoutRun` that also tallies removed Transposes and shares transposed constants."""

    def __init__(self, root: gs.Graph):
        super().__init__(root)
        self.transposes_removed = 0
        self.settled: set[int] = set()  # entry Transposes of regions found not worth rewriting
        self._constants: dict[tuple, gs.Tensor] = {}

    def transposed(self, const: gs.Tensor, inverse: list[int], broadcast: bool, strip: bool) -> gs.Tensor:
        key = (id(const), tuple(inverse), broadcast, strip)
        if key not in self._constants:
            value = G.constant_value(const)
            new = transposed_constant(value, inverse, broadcast, strip)
            if new.shape == value.shape and np.array_equal(new, value):
                self._constants[key] = const  # a scalar, or symmetric in the permuted axes
            else:
                self._constants[key] = self.names.constant(f"{const.name}_transposed", new)
        return self._constants[key]


# =========================================================================== the region of one Transpose
@dataclass
class TransposeRegion:
    """Everything a push of Transpose(``perm``) down from ``seed`` touches, and what it costs.

    * ``entries``: Transposes with the same perm whose outputs are region tensors (the seed first);
    * ``nodes``: layout-agnostic ops recomputed on twins, with their ``edits``;
    * ``exits``: Transposes reading a region tensor; they compose with P (cancel when inverse);
    * ``imports``: non-constant operands of region ops that come from elsewhere and need Transpose(P⁻¹);
    * ``boundaries``: region tensors that someone still reads as they are (a graph output, a Conv,
      a parameter input): they are recomputed from the twin by a new Transpose(P) (an entry's output
      keeps its own Transpose instead).
    """

    seed: gs.Node
    frame: PushFrame
    allow_imports: bool
    entries: dict[int, gs.Node] = field(default_factory=dict)
    tensors: dict[int, gs.Tensor] = field(default_factory=dict)
    producers: dict[int, gs.Node] = field(default_factory=dict)  # region tensor → region op writing it
    nodes: dict[int, gs.Node] = field(default_factory=dict)
    edits: dict[int, NodeEdit] = field(default_factory=dict)
    exits: dict[int, gs.Node] = field(default_factory=dict)
    imports: dict[int, gs.Tensor] = field(default_factory=dict)
    stops: list[str] = field(default_factory=list)  # why readers stayed outside
    agnostic_readers: int = 0  # readers that were layout-agnostic ops or Transposes, joined or not
    imports_would_help: bool = False  # an op waited only for operands from outside
    # Filled by ``price``.
    boundaries: list[gs.Tensor] = field(default_factory=list)
    exit_modes: dict[int, str] = field(default_factory=dict)  # "retarget" | "bypass" | "identity"
    nodes_saved: int = 0
    transposes_saved: int = 0

    counter = "transpose_regions_rewritten"

    # ------------------------------------------------------------------ growth
    def grow(self, site: FusionSite) -> str | None:
        """Collect the region reachable from the seed; returns why it is unusable, else None."""
        queue: list[gs.Tensor] = []
        self._waiting: dict[int, tuple[str, bool]] = {}  # reader → (why it waits, whether imports help)
        self._add_entry(self.seed, queue)
        waiting: list[gs.Node] = []  # ops with an operand from outside, retried as the region grows
        seen: set[int] = set()
        while True:
            while queue:
                tensor = queue.pop()
                for reader in list(tensor.outputs):
                    if id(reader) in seen:
                        continue
                    seen.add(id(reader))
                    verdict = self._visit(site, reader, queue)
                    if verdict == "wait":
                        waiting.append(reader)
            grown = False
            for reader in list(waiting):
                if self._visit(site, reader, queue) != "wait":
                    waiting.remove(reader)
                    grown = True
            if not grown:
                break
        for reader in waiting:
            reason, importable = self._waiting[id(reader)]
            self.stops.append(reason)
            self.imports_would_help |= importable
        for entry in self.entries.values():
            if id(entry.inputs[0]) in self.tensors:
                return f"Transpose '{entry.name}' both reads and feeds the region"
        self.imports = {k: t for k, t in self.imports.items() if k not in self.tensors}
        return None

    def _add_entry(self, entry: gs.Node, queue: list) -> None:
        self.entries[id(entry)] = entry
        self._add_tensor(entry.outputs[0], None, queue)

    def _add_tensor(self, tensor: gs.Tensor, producer: gs.Node | None, queue: list) -> None:
        if tensor.is_empty() or id(tensor) in self.tensors:
            return
        self.tensors[id(tensor)] = tensor
        if producer is not None:
            self.producers[id(tensor)] = producer
        queue.append(tensor)

    def _entry_of(self, site: FusionSite, tensor: gs.Tensor) -> gs.Node | None:
        node = site.local_producer(tensor)
        if node is None or node.op != "Transpose" or len(node.outputs) != 1 or not node.inputs:
            return None
        return node if transpose_perm(site, node) == list(self.frame.perm) else None

    def _visit(self, site: FusionSite, reader: gs.Node, queue: list) -> str:
        """Classify one reader of a region tensor: "exit", "node", "stop" or "wait" (foreign operand)."""
        if id(reader) in self.nodes or id(reader) in self.exits:
            return "node"
        if id(reader) not in site.node_ids or not G.is_default_domain(reader):
            self.stops.append(f"{_describe(reader)} is in another graph or domain")
            return "stop"
        if reader.op == "Transpose" or reader.op in LAYOUT_AGNOSTIC:
            self.agnostic_readers += 1
        if reader.op == "Transpose":
            perm = transpose_perm(site, reader)
            if perm is None or len(perm) != self.frame.rank:
                self.stops.append(f"{_describe(reader)} has no usable perm")
                return "stop"
            self.exits[id(reader)] = reader
            return "exit"
        handler = LAYOUT_AGNOSTIC.get(reader.op)
        if handler is None:
            self.stops.append(f"{_describe(reader)} is not layout-agnostic")
            return "stop"
        n = self.frame.rank
        new_entries, foreign, unknown_rank = [], [], None
        for index in handler.data_positions(reader):
            operand = reader.inputs[index]
            if operand.is_empty() or id(operand) in self.tensors:
                continue
            value = G.constant_value(operand)
            if value is not None:
                if value.ndim > n or (value.ndim != n and not handler.broadcast):
                    self.stops.append(f"{_describe(reader)} has a rank-{value.ndim} constant operand; "
                                      f"the region has rank {n}")
                    return "stop"
                continue
            if isinstance(operand, gs.Constant):
                self.stops.append(f"{_describe(reader)} constant '{operand.name}' cannot be read")
                return "stop"
            entry = self._entry_of(site, operand)
            if entry is not None:
                new_entries.append(entry)
                continue
            rank = site.run.rank(operand)
            if rank is not None and rank != n:  # region tensors have rank n: it never joins
                self.stops.append(f"{_describe(reader)} operand '{operand.name}' has rank {rank}, not {n}")
                return "stop"
            if rank is None:
                unknown_rank = f"{_describe(reader)} operand '{operand.name}' has an unknown rank"
            foreign.append(operand)
        edit = handler.prepare(self.frame, site, reader)
        if isinstance(edit, str):
            self.stops.append(edit)
            return "stop"
        if unknown_rank or (foreign and not self.allow_imports):
            # Wait: the operand may still join the region (an output of a region op found later).
            self._waiting[id(reader)] = (unknown_rank or f"{_describe(reader)} has an operand from outside the region",
                                         not unknown_rank)
            return "wait"
        self.nodes[id(reader)] = reader
        self.edits[id(reader)] = edit
        for operand in foreign:
            self.imports[id(operand)] = operand
        for entry in new_entries:
            if id(entry) not in self.entries:
                self._add_entry(entry, queue)
        for out in reader.outputs:
            self._add_tensor(out, reader, queue)
        return "node"

    # ------------------------------------------------------------------ cost
    def price(self, site: FusionSite) -> None:
        """Decide what each boundary and exit becomes and count the nodes and Transposes saved."""
        run = site.run
        entry_outputs = {id(e.outputs[0]): e for e in self.entries.values()}
        self.boundaries = [t for t in self.tensors.values() if self._read_as_is(run, t)]
        kept_entries = {id(t) for t in self.boundaries if id(t) in entry_outputs}
        added = len(self.boundaries) - len(kept_entries) + len(self.imports)
        removed_nodes = len(self.entries) - len(kept_entries)
        removed_transposes = removed_nodes
        renamed: set[int] = set()  # twins that already took a graph output's name
        for key, exit_node in self.exits.items():
            source = exit_node.inputs[0]
            if self.composed(site, exit_node) != list(range(self.frame.rank)):
                self.exit_modes[key] = "retarget"
                continue
            removed_transposes += 1
            out = exit_node.outputs[0]
            if id(out) not in run.output_ids:
                self.exit_modes[key] = "bypass"
            else:  # the twin takes the output's name, if it may (see cleanup.safe_to_bypass)
                entry = entry_outputs.get(id(source))
                if entry is not None:
                    may = safe_to_bypass(run.root, site.graph, entry.inputs[0], out)
                else:
                    may = any(t is out for t in site.graph.outputs)
                may = may and id(source) not in renamed
                renamed.add(id(source))
                self.exit_modes[key] = "bypass" if may else "identity"
            removed_nodes += self.exit_modes[key] == "bypass"
        self.nodes_saved = removed_nodes - added
        self.transposes_saved = removed_transposes - added

    def _read_as_is(self, run: FusionRun, tensor: gs.Tensor) -> bool:
        if id(tensor) in run.output_ids:
            return True
        for reader in tensor.outputs:
            if id(reader) in self.exits:
                continue
            if id(reader) not in self.nodes:
                return True
            positions = LAYOUT_AGNOSTIC[reader.op].data_positions(reader)
            if any(t is tensor and i not in positions for i, t in enumerate(reader.inputs)):
                return True  # read as a parameter (a Clip bound, ...), not as data
        return False

    def composed(self, site: FusionSite, exit_node: gs.Node) -> list[int]:
        """Transpose(Transpose(r', P), Q2) = Transpose(r', [P[q] for q in Q2])."""
        return [self.frame.perm[q] for q in transpose_perm(site, exit_node)]

    def describe(self) -> str:
        stops = "; ".join(dict.fromkeys(self.stops))
        what = (f"pushing it through {len(self.nodes)} op(s) to {len(self.exits)} Transpose(s) would save "
                f"{self.nodes_saved} node(s)")
        return f"{what} ({stops})" if stops else what


# =========================================================================== the rule
class TransposePushdown(FusionRule):
    """Move a Transpose down through layout-agnostic ops until it meets and cancels its inverse.

    The region of a Transpose(P) grows through its readers: layout-agnostic ops join (their other
    operands must be constants, which are transposed, region tensors, outputs of other Transpose(P)s,
    which join as entries, or, when that pays, any rank-n tensor behind a new Transpose(P⁻¹)); a
    Transpose reader is an exit; any other reader stops the growth. The region is rewritten only when
    it saves nodes: every entry and cancelled exit removed, minus the Transposes that boundaries and
    imports add. So the number of Transposes never grows and the pass reaches a fixed point.
    """

    anchor_ops = ("Transpose",)

    def match(self, site: FusionSite, seed: gs.Node):
        run: TransposeRun = site.run
        if id(seed) in run.settled or len(seed.outputs) != 1 or not seed.inputs:
            return None
        perm = transpose_perm(site, seed)
        if perm is None:
            return NoMatch(seed, "a Transpose without perm reverses the axes, and the rank is unknown")
        frame = PushFrame(tuple(perm), site.root.opset if site.root.opset is not None else 1)
        best = None
        for allow_imports in (False, True):
            region = TransposeRegion(seed, frame, allow_imports)
            problem = region.grow(site)
            if problem:
                run.settled.update(region.entries)
                return NoMatch(seed, problem)
            if not region.agnostic_readers:
                return None  # every reader depends on the layout (a Conv, ...): not a candidate
            region.price(site)
            if best is None or region.nodes_saved > best.nodes_saved:
                best = region
            if not region.imports_would_help:
                break
        if best.nodes_saved <= 0:
            run.settled.update(best.entries)
            return NoMatch(seed, best.describe())
        return best

    def rewrite(self, site: FusionSite, region: TransposeRegion) -> int:
        _rewrite_region(site, region)
        site.run.transposes_removed += region.transposes_saved
        return region.nodes_saved


def _rewrite_region(site: FusionSite, region: TransposeRegion) -> None:
    run: TransposeRun = site.run
    frame = region.frame
    perm, inverse = list(frame.perm), frame.inverse
    names = run.names
    before: dict[int, list[gs.Node]] = {}  # new nodes to place in front of / behind existing ones
    after: dict[int, list[gs.Node]] = {}

    # Twins: an entry's output is its input; every other region tensor gets a new tensor.
    twin: dict[int, gs.Tensor] = {id(e.outputs[0]): e.inputs[0] for e in region.entries.values()}
    for tensor in region.tensors.values():
        if id(tensor) not in twin:
            twin[id(tensor)] = gs.Variable(names(f"{tensor.name}_untransposed"), dtype=tensor.dtype,
                                           shape=_permuted_shape(tensor.shape, inverse))

    # Imports: Transpose(y, P⁻¹) in front of the first region op reading y.
    order = {id(n): i for i, n in enumerate(site.graph.nodes)}
    for key, operand in region.imports.items():
        imported = gs.Variable(names(f"{operand.name}_untransposed"), dtype=operand.dtype,
                               shape=_permuted_shape(operand.shape, inverse))
        readers = [r for r in operand.outputs if id(r) in region.nodes]
        node = gs.Node("Transpose", name=names(f"{operand.name}_Transpose"), attrs={"perm": inverse},
                       inputs=[operand], outputs=[imported])
        before.setdefault(id(min(readers, key=lambda r: order[id(r)])), []).append(node)
        twin[key] = imported

    # Region ops run on the twins.
    for key, node in region.nodes.items():
        handler = LAYOUT_AGNOSTIC[node.op]
        for index in handler.data_positions(node):
            operand = node.inputs[index]
            if id(operand) in twin:
                node.inputs[index] = twin[id(operand)]
            elif not operand.is_empty():  # a constant
                strip = handler.broadcast and frame.opset >= 8  # Max/Min/Sum/Mean broadcast from opset 8
                node.inputs[index] = run.transposed(operand, inverse, handler.broadcast, strip)
        edit = region.edits[key]
        node.attrs.update(edit.attrs)
        for index, (what, value) in edit.constants.items():
            const = names.constant(f"{node.name or node.op}_{what}", value)
            if index < len(node.inputs):
                node.inputs[index] = const
            else:
                node.inputs.append(const)  # Slice without axes: its axes are input 3
        for index, out in enumerate(node.outputs):
            if id(out) in twin:
                node.outputs[index] = twin[id(out)]

    # Boundaries: recompute the tensor from its twin (an entry's output keeps its Transpose).
    for tensor in region.boundaries:
        producer = region.producers.get(id(tensor))
        if producer is None:
            continue
        node = gs.Node("Transpose", name=names(f"{tensor.name}_Transpose"), attrs={"perm": perm},
                       inputs=[twin[id(tensor)]], outputs=[tensor])
        after.setdefault(id(producer), []).append(node)

    # Exits read the twin: cancelled ones disappear, the others compose their perm with P.
    for key, exit_node in region.exits.items():
        source = twin[id(exit_node.inputs[0])]
        mode = region.exit_modes[key]
        if mode == "retarget":
            exit_node.attrs["perm"] = region.composed(site, exit_node)
            exit_node.inputs[0] = source
        elif mode == "identity":  # a graph output that the twin cannot become: keep the name through Identity
            exit_node.op, exit_node.attrs = "Identity", {}
            exit_node.inputs[0] = source
        else:
            out = exit_node.outputs[0]
            if id(out) in run.output_ids:
                G.replace_tensor(run.root, out, source)  # the twin takes the output's name
                run.output_ids.add(id(source))
            else:
                G.replace_uses(out, source)
            run.detach(exit_node)

    boundary_ids = {id(t) for t in region.boundaries}
    for entry in region.entries.values():
        if id(entry.outputs[0]) not in boundary_ids:
            run.detach(entry)

    # Keep the node list topologically sorted (the lazy shape inference of this run exports it).
    if before or after:
        nodes = []
        for node in site.graph.nodes:
            nodes.extend(before.get(id(node), ()))
            nodes.append(node)
            nodes.extend(after.get(id(node), ()))
        site.graph.nodes = nodes
        for new in itertools.chain(*before.values(), *after.values()):
            site.node_ids.add(id(new))


@register_pass
class FuseTransposes(FusionPass):
    name = "fuse-transposes"
    summary = ("Push Transposes down through elementwise and other layout-agnostic ops so that "
               "NHWC/NCHW pairs (TensorFlow exports) meet and cancel.")
    rules = (TransposePushdown(),)

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        explain = bool(self.options.explain or getattr(ctx, "explain", False))
        runs: list[TransposeRun] = []

        def new_run(root: gs.Graph) -> TransposeRun:
            runs.append(TransposeRun(root))
            return runs[-1]

        result = apply_rules(graph, self.rules, explain=explain, max_notes=max(0, int(self.options.max_notes)),
                             run_factory=new_run)
        removed = sum(r.transposes_removed for r in runs)
        if removed:
            result.counters["transposes_removed"] = removed
        return result
