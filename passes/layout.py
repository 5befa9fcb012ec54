"""Lossless layout passes: fuse consecutive data-movement ops into one (or none).

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

The rules follow passes/fusion.py: ``match`` returns ``None`` (no candidate), a
:class:`~onnxopt.passes.fusion.NoMatch` with the reason, or a match that ``rewrite`` applies.
"""

from __future__ import annotations

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
            return self._squeeze_unsqueeze(site, first, second)
        if first.op == "Unsqueeze":
            return self._unsqueeze_unsqueeze(site, first, second)
        return ReduceKeepdims.match_pair(site, first, second)

    @staticmethod
    def _squeeze_unsqueeze(site: FusionSite, first: gs.Node, second: gs.Node):
        x = first.inputs[0]
        if _same_axes(first, second):
            return Passthrough(first, second, x, "squeeze_unsqueeze_cancelled")
        squeezed, problem = _squeeze_axes(site, first)
        if problem:
            return NoMatch(second, problem)
        unsqueezed, problem = _unsqueeze_axes(site, second)
        if problem:
            return NoMatch(second, problem)
        if sorted(squeezed) != sorted(unsqueezed):
            return NoMatch(second, f"squeezes axes {sorted(squeezed)} but unsqueezes {sorted(unsqueezed)}")
        return Passthrough(first, second, x, "squeeze_unsqueeze_cancelled")

    @staticmethod
    def _unsqueeze_unsqueeze(site: FusionSite, first: gs.Node, second: gs.Node):
        problem = LayoutRule.merge_problem(site, first, second)
        if problem:
            return problem
        inner, reason = _unsqueeze_axes(site, first)
        outer, reason2 = _unsqueeze_axes(site, second) if not reason else (None, None)
        if reason or reason2:
            return NoMatch(second, reason or reason2)
        # Output positions not in ``outer`` hold the intermediate's dims in order.
        taken = set(outer)
        combined = sorted(taken | {_nth_position_not_in(taken, i) for i in inner})
        inputs, attrs = _with_axes(site, "Unsqueeze", first.inputs[0], second.attrs, combined,
                                   f"{second.name or 'Unsqueeze'}_axes")
        return Replace(first, second, "Unsqueeze", inputs, attrs, "unsqueezes_fused")


class SqueezeAfter(LayoutRule):
    """Unsqueeze(A) → Squeeze(A) = x; Squeeze(A) → Squeeze(B) = Squeeze(A ∪ B mapped to the input)."""

    anchor_ops = ("Squeeze",)
    first_ops = ("Squeeze", "Unsqueeze")

    def match(self, site: FusionSite, second: gs.Node):
        first = self.first_of(site, second)
        if first is None:
            return None
        if first.op == "Unsqueeze":
            return self._unsqueeze_squeeze(site, first, second)
        return self._squeeze_squeeze(site, first, second)

    @staticmethod
    def _unsqueeze_squeeze(site: FusionSite, first: gs.Node, second: gs.Node):
        x = first.inputs[0]
        if _same_axes(first, second):
            return Passthrough(first, second, x, "unsqueeze_squeeze_cancelled")
        inserted, problem = _unsqueeze_axes(site, first)
        if problem:
            return NoMatch(second, problem)
        removed, problem = _squeeze_axes(site, second)
        if problem:
            return NoMatch(second, problem)
        if sorted(inserted) != sorted(removed):
            return NoMatch(second, f"unsqueezes axes {sorted(inserted)} but squeezes {sorted(removed)}")
        return Passthrough(first, second, x, "unsqueeze_squeeze_cancelled")

    @staticmethod
    def _squeeze_squeeze(site: FusionSite, first: gs.Node, second: gs.Node):
        problem = LayoutRule.merge_problem(site, first, second)
        if problem:
            return problem
        inner, reason = _squeeze_axes(site, first)
        outer, reason2 = _squeeze_axes(site, second) if not reason else (None, None)
        if reason or reason2:
            return NoMatch(second, reason or reason2)
        # Intermediate position j is the j-th input position that the first Squeeze kept.
        taken = set(inner)
        combined = sorted(taken | {_nth_position_not_in(taken, j) for j in outer})
        inputs, attrs = _with_axes(site, "Squeeze", first.inputs[0], second.attrs, combined,
                                   f"{second.name or 'Squeeze'}_axes")
        return Replace(first, second, "Squeeze", inputs, attrs, "squeezes_fused")


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
        _drop(run, match.second)
        removed = 1
        intermediate = match.first.outputs[0]
        if not intermediate.outputs and id(intermediate) not in run.output_ids:
            _drop(run, match.first)
            removed += 1
        return removed
    second = match.second
    second.op = match.op
    second.attrs = dict(match.attrs)
    second.inputs.clear()
    second.inputs.extend(match.inputs)
    _drop(run, match.first)  # its output fed only ``second`` (checked by the match)
    return 1


def _drop(run: FusionRun, node: gs.Node) -> None:
    node.inputs.clear()
    node.outputs.clear()
    run.removed.append(node)


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
