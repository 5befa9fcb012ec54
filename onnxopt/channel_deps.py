"""Channel dependency analysis for structured channel pruning on ONNX graphs.

Removing output channels of one Conv changes every tensor those channels flow into: the
BatchNormalization after it, the residual Add that sums it with other convolutions (whose
channels must then go too), the Concat that places it at an offset, the depthwise Conv that
filters each channel on its own, the Flatten that turns each channel into H·W columns of a
Gemm. :func:`analyze_channels` finds these couplings and returns **groups**: sets of places
that must lose the same channel indices. :mod:`onnxopt.channel_prune` applies a removal.

Model (after Torch-Pruning's dependency graph, Fang et al. 2023, "DepGraph"; written for
ONNX graphs instead of autograd traces):

* A group owns ``channels`` channel ids ``0..C-1``: the output channels of its first root
  (a Conv, ConvTranspose, Gemm or MatMul with a constant weight).
* The walk records, for every tensor the channels reach, which position on its channel axis
  each group channel occupies (:class:`TensorSlot`), and for every constant the channels
  index (weights, biases, BN statistics, per-channel constants) which positions on which axis
  belong to which channel (:class:`Slot`). A channel may own several positions: after a
  Flatten, channel ``c`` of a ``C×H×W`` tensor owns columns ``c·HW .. c·HW+HW-1``.
* How positions move through an op is one of three small index maps, kept apart from the
  walk: :class:`Shift` (Concat offsets, Split ranges), :class:`Spread` (Flatten/Reshape
  strides, depthwise channel multipliers) and :class:`Collapse` (the inverse of Spread).
* The walk goes both ways: forward to every reader of a tensor, backward to its producer. A
  residual Add reached from one input pulls the other input in, and through it the other
  convolution (it becomes a second root). Each tensor position is claimed by one group at
  most; positions two groups both reach mean they are coupled, and both are refused.

Anything the analysis cannot prove safe makes the group *refused*, with a reason: channels
reaching a graph output or coming from a graph input, read inside a subgraph, by an unknown
or custom-domain op, by Shape/Size, a Slice or Pad on the channel axis, a Reshape with a
computed target shape, a grouped Conv (1 < group < C), a non-constant weight, ...

For importance scores (later work) :meth:`ChannelGroup.weight_slices` yields, per slot, the
values every channel owns; for least-squares reconstruction (He et al. 2017)
:attr:`ChannelGroup.consumers` are the layers whose input channels are removed, with the
input positions each channel occupies.

Groups of one analysis are disjoint, so several can be pruned at once
(:func:`onnxopt.channel_prune.prune_groups`); after a prune, analyse again.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as G

Dims = list  # dims of a tensor: ints, or str / None for unknown sizes


# ============================================================================ index maps
# Each maps (positions, channel ids) on one tensor's channel axis to those on another tensor's.
class IndexMap:
    def __call__(self, pos: np.ndarray, chan: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class Identity(IndexMap):
    def __call__(self, pos, chan):
        return pos, chan

    def __repr__(self) -> str:
        return "Identity()"


IDENTITY = Identity()


@dataclass(frozen=True)
class Shift(IndexMap):
    """Keep positions in ``[start, stop)`` and add ``offset``.

    Concat input j → output: ``Shift(off_j, 0, w_j)``; output → input j:
    ``Shift(-off_j, off_j, off_j + w_j)``; Split input → output o: ``Shift(-s_o, s_o, s_o + w_o)``.
    """

    offset: int
    start: int
    stop: int

    def __call__(self, pos, chan):
        inside = (pos >= self.start) & (pos < self.stop)
        return pos[inside] + self.offset, chan[inside]


@dataclass(frozen=True)
class Spread(IndexMap):
    """Position ``p`` of a ``width``-wide axis becomes positions ``(o·width + p)·inner + r``
    (``o < outer``, ``r < inner``) of one merged axis: Flatten/Reshape merging the channel axis
    with ``outer`` leading and ``inner`` trailing elements, or a depthwise Conv with channel
    multiplier ``inner`` (output channel ``p·m + r`` filters input channel ``p``)."""

    outer: int
    width: int
    inner: int

    def __call__(self, pos, chan):
        o = np.arange(self.outer)[:, None, None]
        r = np.arange(self.inner)[None, None, :]
        merged = (o * self.width + pos[None, :, None]) * self.inner + r
        return merged.ravel(), np.broadcast_to(chan[None, :, None], merged.shape).ravel()


@dataclass(frozen=True)
class Collapse(IndexMap):
    """The inverse of :class:`Spread`: merged position ``q`` → ``(q // inner) % width``."""

    width: int
    inner: int

    def __call__(self, pos, chan):
        return _unique_pairs((pos // self.inner) % self.width, chan)


def _unique_pairs(pos: np.ndarray, chan: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(pos) == 0:
        return pos, chan
    pairs = np.unique(np.stack([pos, chan], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


# ============================================================================ results
@dataclass
class TensorSlot:
    """A tensor the group's channels flow through: ``positions`` on ``axis`` (width ``width``)."""

    tensor: gs.Tensor
    axis: int
    width: int
    pos: np.ndarray
    chan: np.ndarray

    def positions(self, channels) -> np.ndarray:
        """The positions on ``axis`` owned by the given group channel ids."""
        return np.sort(self.pos[np.isin(self.chan, channels)])


@dataclass
class Slot:
    """A constant input of a node whose positions on ``axis`` belong to the group's channels.

    ``role`` is ``"producer"`` (weights and bias that compute the channels: a root's output
    axis, a depthwise Conv), ``"param"`` (per-channel parameters on the way: BatchNorm
    scale/bias/mean/var, PRelu slopes, per-channel Add/Mul constants, Q/DQ scales) or
    ``"consumer"`` (the input-channel axis of a layer that reads the channels).
    """

    node: gs.Node
    input_index: int
    axis: int
    width: int
    role: str
    pos: np.ndarray
    chan: np.ndarray

    @property
    def tensor(self) -> gs.Tensor:
        return self.node.inputs[self.input_index]

    def positions(self, channels) -> np.ndarray:
        return np.sort(self.pos[np.isin(self.chan, channels)])

    def per_channel(self, channels: int) -> list[np.ndarray]:
        """For each group channel id ``0..channels-1``, the values it owns in this constant:
        an array whose first axis runs over the channel's positions (empty when it owns none)."""
        value = np.moveaxis(np.asarray(G.constant_value(self.tensor)), self.axis, 0)
        order = np.argsort(self.chan, kind="stable")
        bounds = np.searchsorted(self.chan[order], np.arange(channels + 1))
        return [value[np.sort(self.pos[order[bounds[c]:bounds[c + 1]]])] for c in range(channels)]

    def describe(self) -> str:
        return f"{self.node.op} '{self.node.name}' input {self.input_index} axis {self.axis} ({self.role})"


@dataclass
class Adjustment:
    """A node whose attribute or shape input counts channels and must be rewritten after a
    removal: ``kind`` is ``"split"``, ``"conv_group"``, ``"reshape"`` or ``"resize_sizes"``."""

    node: gs.Node
    kind: str
    info: dict


@dataclass
class ChannelGroup:
    """Channel ids ``0..channels-1`` that must be removed together from every slot.

    ``reason`` is None for a prunable group, else why it is refused.
    """

    id: int
    channels: int
    roots: list[gs.Node] = field(default_factory=list)
    members: list[Slot] = field(default_factory=list)     # producer and param slots
    consumers: list[Slot] = field(default_factory=list)   # input-channel weights of readers
    tensors: list[TensorSlot] = field(default_factory=list)
    adjustments: list[Adjustment] = field(default_factory=list)
    reason: str | None = None

    @property
    def prunable(self) -> bool:
        return self.reason is None

    @property
    def root_names(self) -> list[str]:
        return [n.name for n in self.roots]

    @property
    def name(self) -> str:
        return self.roots[0].name if self.roots else f"group{self.id}"

    @property
    def slots(self) -> list[Slot]:
        return self.members + self.consumers

    @property
    def consumer_nodes(self) -> list[gs.Node]:
        seen: dict[int, gs.Node] = {}
        for s in self.consumers:
            seen.setdefault(id(s.node), s.node)
        return list(seen.values())

    def weight_slices(self, roles: tuple[str, ...] = ("producer", "param", "consumer")
                      ) -> Iterator[tuple[Slot, list[np.ndarray]]]:
        """Per slot of the given roles, the values each group channel owns (see
        :meth:`Slot.per_channel`): the raw material of L1/L2/BN-scale importance."""
        for s in self.slots:
            if s.role in roles:
                yield s, s.per_channel(self.channels)

    def norms(self, ord: int = 1, roles: tuple[str, ...] = ("producer",)) -> np.ndarray:
        """Per group channel, the sum over slots of the given roles of the ``ord``-norm
        (``ord`` 1: sum of |w|; 2: sum of squares) of the values it owns."""
        total = np.zeros(self.channels)
        for _, parts in self.weight_slices(roles):
            for c, part in enumerate(parts):
                a = np.abs(part.astype(np.float64))
                total[c] += a.sum() if ord == 1 else (a * a).sum()
        return total

    def describe(self) -> str:
        state = "prunable" if self.prunable else f"refused: {self.reason}"
        return (f"group {self.id} [{', '.join(self.root_names)}] {self.channels} channels, "
                f"{len(self.members)} member / {len(self.consumers)} consumer slots, {state}")


@dataclass
class ChannelAnalysis:
    groups: list[ChannelGroup]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    @property
    def refused(self) -> list[ChannelGroup]:
        return [g for g in self.groups if not g.prunable]

    def reasons(self) -> Counter:
        """Refusal reasons with node names removed, counted (for reports)."""
        return Counter(_generic_reason(g.reason) for g in self.refused)

    def notes(self) -> list[str]:
        return [f"{g.name}: {g.reason}" for g in self.refused]


def _generic_reason(reason: str) -> str:
    # "Add 'add_3': the rank of 'x' is unknown" → "Add: the rank of '…' is unknown"
    return re.sub(r"'[^']*'", "'…'", re.sub(r"^(\w+) '[^']*':", r"\1:", reason))


# ============================================================================ analysis
class _Refuse(Exception):
    pass


@dataclass
class _Couple:
    """The node's tensor at (side, index) carries the channels on ``axis`` through ``map``."""
    side: str
    index: int
    axis: int
    map: IndexMap = IDENTITY


@dataclass
class _SlotEffect:
    index: int
    axis: int
    role: str
    map: IndexMap = IDENTITY


@dataclass
class _Claims:
    """Which group (and group channel) owns each position of one axis; -1 = nobody."""
    axis: int
    width: int
    group: np.ndarray
    chan: np.ndarray

    @classmethod
    def empty(cls, axis: int, width: int) -> "_Claims":
        return cls(axis, width, np.full(width, -1, np.int64), np.full(width, -1, np.int64))


class _GroupState:
    def __init__(self, gid: int, channels: int):
        self.id = gid
        self.channels = channels
        # union-find over channel ids: channels that meet at one position must go together
        # (a depthwise Conv with multiplier m reached from its output ties m channels)
        self.parent = np.arange(channels)
        self.reason: str | None = None
        self.roots: dict[int, gs.Node] = {}
        self.tensors: dict[int, tuple[gs.Tensor, _Claims]] = {}
        self.slots: dict[tuple[int, int, int], tuple[gs.Node, int, str, _Claims]] = {}
        self.adjust: dict[tuple[int, str], Adjustment] = {}

    def refuse(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def find(self, chan: np.ndarray) -> np.ndarray:
        chan = np.asarray(chan, np.int64)
        while True:
            up = self.parent[chan]
            if np.array_equal(up, chan):
                return chan
            chan = up

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(self.find(a).tolist(), self.find(b).tolist()):
            x, y = int(self.find(x)), int(self.find(y))
            if x != y:
                self.parent[max(x, y)] = min(x, y)


UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil",
    "Round", "Sign", "Erf", "Gelu", "Mish", "ThresholdedRelu", "Identity", "Cast", "CastLike",
    "Clip", "Not", "IsNaN", "IsInf", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh",
    "Cosh", "Asinh", "Acosh", "Atanh", "Shrink", "Dropout"})
BROADCAST_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", "PRelu", "Equal",
    "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Where", "BitShift",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                      "GlobalLpPool"})
REDUCE_OPS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd",
                        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                        "ReduceSumSquare"})


def analyze_channels(graph: gs.Graph, shapes: dict[str, Dims] | None = None,
                     input_shapes: dict[str, tuple[int, ...]] | None = None) -> ChannelAnalysis:
    """Dependency groups of every channel producer in ``graph``'s main graph.

    ``shapes`` (tensor name → dims) defaults to ONNX shape inference on the graph, with the
    graph inputs named in ``input_shapes`` fixed to those shapes (a model with dynamic height
    and width needs them for a Flatten into a Gemm). Groups are returned in the order of their
    first root; refused groups carry their reason.
    """
    if shapes is None:
        shapes = {name: dims for name, (_, dims) in G.inferred_types(graph, input_shapes=input_shapes).items()
                  if dims is not None}
    return _Analyzer(graph, shapes).run()


class _Analyzer:
    def __init__(self, graph: gs.Graph, shapes: dict[str, Dims]):
        self.graph = graph
        self.shapes = shapes
        self.opset = int(graph.opset or 1)
        self.main_nodes = {id(n) for n in graph.nodes}
        self.outputs = {id(t) for g in G.iter_graphs(graph) for t in g.outputs}
        self.claims: dict[int, _Claims] = {}          # tensor id → claims (all groups)
        self.groups: list[_GroupState] = []

    # ------------------------------------------------------------------ driver
    def run(self) -> ChannelAnalysis:
        for node in self.graph.nodes:
            root = self._root_output(node)
            if root is None:
                continue
            out, axis, width = root
            claims = self.claims.get(id(out))
            free = np.arange(width) if claims is None else np.flatnonzero(claims.group < 0)
            if claims is not None and claims.axis != axis:
                continue  # reached on another axis by an earlier (refused) group
            if len(free) == 0:
                continue
            state = _GroupState(len(self.groups), len(free))
            self.groups.append(state)
            state.roots[id(node)] = node
            self._walk(state, out, axis, free, np.arange(len(free)))
        return ChannelAnalysis([self._result(s) for s in self.groups])

    def _root_output(self, node: gs.Node) -> tuple[gs.Tensor, int, int] | None:
        """(output tensor, channel axis, width) when ``node`` creates channels from a constant weight."""
        if not G.is_default_domain(node) or not node.outputs:
            return None
        op = node.op
        if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
            return None
        weight = node.inputs[1]
        if not _is_const(weight):
            return None
        wshape = _const_shape(weight)
        out = node.outputs[0]
        if op == "Conv":
            if len(wshape) < 3:
                return None
            group = int(G.attr(node, "group", 1))
            if group > 1 and wshape[1] == 1:
                return None  # depthwise: its channels are its input's
            return out, 1, int(wshape[0])
        if op == "ConvTranspose":
            if len(wshape) < 3:
                return None
            return out, 1, int(wshape[1]) * int(G.attr(node, "group", 1))
        if len(wshape) != 2:
            return None
        if op == "Gemm":
            return out, 1, int(wshape[0] if G.attr(node, "transB", 0) else wshape[1])
        dims = self.dims(out)
        if dims is None or len(dims) < 1:
            return None
        return out, len(dims) - 1, int(wshape[1])

    # ------------------------------------------------------------------ walk
    def _walk(self, g: _GroupState, tensor: gs.Tensor, axis: int, pos: np.ndarray, chan: np.ndarray) -> None:
        queue: deque = deque()
        self._visit(g, tensor, axis, pos, chan, queue, None)
        while queue:
            self._propagate(g, *queue.popleft(), queue)

    def _visit(self, g: _GroupState, tensor: gs.Tensor, axis: int, pos: np.ndarray, chan: np.ndarray,
               queue: deque, source: tuple[int, str, int] | None, width_hint: int | None = None) -> None:
        """Claim (pos, chan) of ``tensor`` for ``g``; queue the newly claimed part for propagation.

        ``source`` (node id, side, index) is the node entry the positions came through: the
        propagation does not go back through it (Identity, Shift and Spread map the claimed
        positions back onto the positions they came from).
        ``width_hint`` is the channel count when an op passes the channels through unchanged,
        for tensors shape inference left without a shape (e.g. after Slice-1).
        """
        if len(pos) == 0:
            return
        claims = self.claims.get(id(tensor))
        if claims is None:
            dims = self.dims(tensor)
            if dims is not None and 0 <= axis < len(dims) and _static(dims[axis]):
                width = int(dims[axis])
            elif width_hint is not None and dims is None:
                width = width_hint
            else:
                g.refuse(f"the channel count of tensor '{tensor.name}' is unknown (no static shape)")
                return
            claims = self.claims[id(tensor)] = _Claims.empty(axis, width)
        new = self._claim(g, claims, pos, chan, f"tensor '{tensor.name}'")
        if new is None:
            return
        if id(tensor) not in g.tensors:
            g.tensors[id(tensor)] = (tensor, claims)
        if len(new[0]):
            queue.append((tensor, axis, new[0], new[1], source))

    def _claim(self, g: _GroupState, claims: _Claims, pos: np.ndarray, chan: np.ndarray, what: str
               ) -> tuple[np.ndarray, np.ndarray] | None:
        """Mark positions as ``g``'s; returns the newly claimed (pos, chan), None on a conflict."""
        pos, chan = _unique_pairs(np.asarray(pos, np.int64), g.find(chan))
        if len(pos) and (pos.min() < 0 or pos.max() >= claims.width):
            g.refuse(f"channel positions out of range in {what}")
            return None
        if len(np.unique(pos)) != len(pos):  # several channels at one position: they go together
            first = np.unique(pos, return_index=True)[1]
            leader = chan[first][np.searchsorted(pos[first], pos)]
            g.union(leader, chan)
            pos, chan = _unique_pairs(pos, g.find(chan))
        owner, owned = claims.group[pos], claims.chan[pos]
        mine = owner == g.id
        clash = mine & (g.find(owned) != chan)
        if np.any(clash):
            g.union(owned[clash], chan[clash])
        others = np.unique(owner[(owner >= 0) & ~mine])
        if len(others):
            for h in others:
                other = self.groups[int(h)]
                other.refuse(f"coupled with group {g.id} through {what}")
                g.refuse(f"coupled with group {other.id} through {what}")
            return None
        fresh = owner < 0
        claims.group[pos[fresh]] = g.id
        claims.chan[pos[fresh]] = chan[fresh]
        return pos[fresh], chan[fresh]

    def _propagate(self, g: _GroupState, tensor: gs.Tensor, axis: int, pos: np.ndarray, chan: np.ndarray,
                   source: tuple[int, str, int] | None, queue: deque) -> None:
        if id(tensor) in self.outputs:
            g.refuse(f"channels reach graph output '{tensor.name}'")
        node = G.producer(tensor)
        if node is None:
            g.refuse(f"channels come from graph input '{tensor.name}'")
        else:
            index = next(i for i, t in enumerate(node.outputs) if t is tensor)
            if source != (id(node), "out", index):
                self._through(g, node, "out", index, axis, pos, chan, queue)
        for reader in G.consumers(tensor):
            if id(reader) not in self.main_nodes:
                g.refuse(f"tensor '{tensor.name}' is read inside a subgraph by {reader.op} '{reader.name}'")
                continue
            for i, t in enumerate(reader.inputs):
                if t is tensor and source != (id(reader), "in", i):
                    self._through(g, reader, "in", i, axis, pos, chan, queue)

    def _through(self, g: _GroupState, node: gs.Node, side: str, index: int, axis: int, pos: np.ndarray,
                 chan: np.ndarray, queue: deque) -> None:
        """Apply the couplings of ``node`` entered at (side, index) on ``axis``."""
        try:
            effects = self._couplings(g, node, side, index, axis)
        except _Refuse as refusal:
            g.refuse(f"{node.op} '{node.name}': {refusal}")
            return
        entry = (node.inputs if side == "in" else node.outputs)[index]
        entry_width = self.claims[id(entry)].width if id(entry) in self.claims else None
        for effect in effects:
            if isinstance(effect, Adjustment):
                g.adjust.setdefault((id(effect.node), effect.kind), effect)
            elif isinstance(effect, _SlotEffect):
                self._record_slot(g, node, effect.index, effect.axis, effect.role, *effect.map(pos, chan))
            else:
                tensors = node.inputs if effect.side == "in" else node.outputs
                t = tensors[effect.index]
                if _is_empty(t):
                    continue
                new_pos, new_chan = effect.map(pos, chan)
                if effect.side == "in" and _is_const(t):
                    self._record_slot(g, node, effect.index, effect.axis, "param", new_pos, new_chan)
                else:
                    hint = entry_width if effect.map is IDENTITY else None  # passed through unchanged
                    # a Collapse may claim only part of what maps back: go through the node again
                    source = None if isinstance(effect.map, Collapse) else (id(node), effect.side, effect.index)
                    self._visit(g, t, effect.axis, new_pos, new_chan, queue, source, hint)

    def _record_slot(self, g: _GroupState, node: gs.Node, index: int, axis: int, role: str,
                     pos: np.ndarray, chan: np.ndarray) -> None:
        if len(pos) == 0:
            return
        t = node.inputs[index]
        if _is_empty(t) or not _is_const(t):
            g.refuse(f"{node.op} '{node.name}': input {index} is not a constant")
            return
        shape = _const_shape(t)
        if not (0 <= axis < len(shape)):
            g.refuse(f"{node.op} '{node.name}': input {index} has no axis {axis}")
            return
        key = (id(node), index, axis)
        if key not in g.slots:
            g.slots[key] = (node, index, role, _Claims.empty(axis, int(shape[axis])))
        self._claim(g, g.slots[key][3], pos, chan, f"{node.op} '{node.name}' input {index}")

    # ------------------------------------------------------------------ shapes
    def dims(self, tensor: gs.Tensor) -> Dims | None:
        if _is_const(tensor):
            return list(_const_shape(tensor))
        dims = self.shapes.get(tensor.name)
        if dims is None and tensor.shape is not None:
            dims = list(tensor.shape)
        return dims

    def _rank(self, tensor: gs.Tensor) -> int:
        dims = self.dims(tensor)
        if dims is None:
            raise _Refuse(f"the rank of '{tensor.name}' is unknown")
        return len(dims)

    def _width(self, tensor: gs.Tensor, axis: int) -> int:
        dims = self.dims(tensor)
        if dims is None or not (0 <= axis < len(dims)) or not _static(dims[axis]):
            raise _Refuse(f"the size of axis {axis} of '{tensor.name}' is unknown")
        return int(dims[axis])

    def _static_dims(self, tensor: gs.Tensor, start: int, stop: int | None = None) -> list[int]:
        dims = self.dims(tensor)
        if dims is None:
            raise _Refuse(f"the shape of '{tensor.name}' is unknown")
        part = dims[start:stop]
        if not all(_static(d) for d in part):
            raise _Refuse(f"the shape of '{tensor.name}' is not static on the axes that matter")
        return [int(d) for d in part]

    def _const_ints(self, node: gs.Node, index: int, what: str) -> list[int] | None:
        """A constant integer input as a list (None when the optional input is absent)."""
        if index >= len(node.inputs) or _is_empty(node.inputs[index]):
            return None
        value = G.constant_value(node.inputs[index])
        if value is None:
            raise _Refuse(f"{what} is not a constant")
        return [int(v) for v in np.asarray(value).ravel()]

    # ------------------------------------------------------------------ per-op couplings
    def _couplings(self, g: _GroupState, node: gs.Node, side: str, index: int, axis: int) -> list:
        op = node.op
        if not G.is_default_domain(node):
            raise _Refuse(f"custom op of domain '{node.domain}' reads the channels")
        if G.has_subgraph(node):
            raise _Refuse("op with subgraphs")
        if op in ("Conv", "ConvTranspose"):
            return self._conv(g, node, side, index, axis)
        if op == "Gemm":
            return self._gemm(g, node, side, index, axis)
        if op == "MatMul":
            return self._matmul(g, node, side, index, axis)
        if op in ("BatchNormalization", "InstanceNormalization"):
            return self._norm(node, side, index, axis)
        if op in UNARY_OPS:
            return self._unary(node, side, index, axis)
        if op in BROADCAST_OPS:
            return self._broadcast(node, side, index, axis)
        if op == "Concat":
            return self._concat(node, side, index, axis)
        if op == "Split":
            return self._split(node, side, index, axis)
        if op == "Slice":
            return self._slice(node, side, index, axis)
        if op == "Pad":
            return self._pad(node, side, index, axis)
        if op in POOL_OPS:
            return self._pool(node, side, index, axis)
        if op in ("Resize", "Upsample"):
            return self._resize(node, side, index, axis)
        if op == "Flatten":
            return self._flatten(node, side, index, axis)
        if op == "Reshape":
            return self._reshape(node, side, index, axis)
        if op == "Transpose":
            return self._transpose(node, side, index, axis)
        if op in ("Unsqueeze", "Squeeze"):
            return self._squeeze(node, side, index, axis)
        if op in REDUCE_OPS or op in ("ArgMax", "ArgMin"):
            return self._reduce(node, side, index, axis)
        if op in ("Softmax", "LogSoftmax", "Hardmax"):
            return self._softmax(node, side, index, axis)
        if op == "LayerNormalization":
            return self._layernorm(node, side, index, axis)
        if op in ("QuantizeLinear", "DequantizeLinear"):
            return self._qdq(node, side, index, axis)
        if op in ("Shape", "Size"):
            raise _Refuse("reads the tensor's shape, which includes the channel count")
        raise _Refuse(f"op {op} is not understood by the channel analysis")

    @staticmethod
    def _data_only(side: str, index: int) -> None:
        if index != 0:
            raise _Refuse(f"channels reach {'input' if side == 'in' else 'output'} {index}, not the data tensor")

    def _pass_through(self, node: gs.Node, side: str, index: int, in_axis: int, out_axis: int) -> list:
        """Data input 0 ↔ output 0, channel axis ``in_axis`` ↔ ``out_axis``."""
        self._data_only(side, index)
        if side == "in":
            return [_Couple("out", 0, out_axis)]
        return [_Couple("in", 0, in_axis)]

    def _used(self, t: gs.Tensor) -> bool:
        return not _is_empty(t) and (bool(t.outputs) or id(t) in self.outputs)

    def _extra_outputs_unused(self, node: gs.Node, first: int = 1) -> None:
        for t in node.outputs[first:]:
            if self._used(t):
                raise _Refuse(f"its output '{t.name}' is used")

    # --- layers with weights
    def _conv(self, g: _GroupState, node: gs.Node, side: str, index: int, axis: int) -> list:
        weight = G.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None:
            raise _Refuse("weight is not constant")
        has_bias = len(node.inputs) > 2 and not _is_empty(node.inputs[2])
        if has_bias and not _is_const(node.inputs[2]):
            raise _Refuse("bias is not constant")
        if index != 0:
            raise _Refuse(f"channels reach {'input' if side == 'in' else 'output'} {index}")
        if axis != 1:
            raise _Refuse(f"channels on axis {axis}, not the Conv channel axis 1")
        group = int(G.attr(node, "group", 1))
        transpose = node.op == "ConvTranspose"
        bias = [_SlotEffect(2, 0, "producer")] if has_bias else []
        if group == 1:
            if side == "out":
                g.roots.setdefault(id(node), node)
                return [_SlotEffect(1, 1 if transpose else 0, "producer")] + bias
            return [_SlotEffect(1, 0 if transpose else 1, "consumer")]
        in_channels = self._width(node.inputs[0], 1)
        if transpose or not (group == in_channels and weight.shape[1] == 1):
            raise _Refuse(f"grouped {node.op} (group={group}, {in_channels} input channels): "
                          "only whole groups could be removed, which is not supported")
        # depthwise (Howard et al. 2017): output channel c·m + r filters input channel c alone
        mult = int(weight.shape[0]) // group
        adjust = Adjustment(node, "conv_group", {})
        if side == "in":
            spread = Spread(1, in_channels, mult)
            return [_Couple("out", 0, 1, spread), _SlotEffect(1, 0, "producer", spread),
                    adjust] + ([_SlotEffect(2, 0, "producer", spread)] if has_bias else [])
        # from the output: back to the input channels; the forward step then claims whole blocks
        return [_Couple("in", 0, 1, Collapse(in_channels, mult)), adjust]

    def _gemm(self, g: _GroupState, node: gs.Node, side: str, index: int, axis: int) -> list:
        b = node.inputs[1]
        if not _is_const(b):
            raise _Refuse("B is not constant")
        trans_a, trans_b = int(G.attr(node, "transA", 0)), int(G.attr(node, "transB", 0))
        if side == "in":
            if index != 0:
                raise _Refuse(f"channels reach input {index}")
            if axis != (0 if trans_a else 1):
                raise _Refuse("channels on A's row axis")
            return [_SlotEffect(1, 1 if trans_b else 0, "consumer")]
        if axis != 1:
            raise _Refuse("channels on the output's row axis")
        effects = [_SlotEffect(1, 0 if trans_b else 1, "producer")]
        if len(node.inputs) > 2 and not _is_empty(node.inputs[2]):
            c = node.inputs[2]
            if not _is_const(c):
                raise _Refuse("C is not constant")
            shape = _const_shape(c)
            if len(shape) >= 1 and shape[-1] != 1:
                effects.append(_SlotEffect(2, len(shape) - 1, "producer"))
        g.roots.setdefault(id(node), node)
        return effects

    def _matmul(self, g: _GroupState, node: gs.Node, side: str, index: int, axis: int) -> list:
        b = node.inputs[1]
        if not _is_const(b) or len(_const_shape(b)) != 2:
            raise _Refuse("only x @ W with a constant 2-D W is understood")
        if index != 0:
            raise _Refuse("channels reach W")
        rank = self._rank(node.inputs[0] if side == "in" else node.outputs[0])
        if rank < 2:
            raise _Refuse("rank-1 operand")
        if axis == rank - 1:  # the contracted axis (input) / the columns of W (output)
            if side == "in":
                return [_SlotEffect(1, 0, "consumer")]
            g.roots.setdefault(id(node), node)
            return [_SlotEffect(1, 1, "producer")]
        # a row/batch axis: x[..., m, :] @ W gives out[..., m, :], channel for channel
        return [_Couple("out" if side == "in" else "in", 0, axis)]

    def _norm(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        self._data_only(side, index)
        if axis != 1:
            raise _Refuse(f"channels on axis {axis}, not 1")
        if node.op == "BatchNormalization":
            if int(G.attr(node, "spatial", 1)) == 0:
                raise _Refuse("spatial=0 (per-activation statistics)")
            self._extra_outputs_unused(node)
            params = range(1, 5)
        else:
            params = range(1, 3)
        for i in params:
            if not _is_const(node.inputs[i]):
                raise _Refuse(f"input {i} is not constant")
        other = _Couple("out", 0, 1) if side == "in" else _Couple("in", 0, 1)
        return [other] + [_Couple("in", i, 0) for i in params]

    # --- channel-preserving ops
    def _unary(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        if side == "in":
            self._data_only(side, index)
        outputs = [0]
        if node.op == "Dropout" and len(node.outputs) > 1 and self._used(node.outputs[1]):
            outputs.append(1)  # the mask has the data's shape
        effects = [_Couple("out", o, axis) for o in outputs if not (side == "out" and o == index)]
        return effects + ([_Couple("in", 0, axis)] if side == "out" else [])

    def _broadcast(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        """Numpy-style broadcasting (ONNX Broadcasting.md): axes align from the end, so an
        input couples when its dim at the same distance from the end equals the channel count."""
        entry = (node.inputs if side == "in" else node.outputs)[index]
        if side == "out" and index != 0:
            raise _Refuse(f"channels reach output {index}")
        from_end = axis - self._rank(entry)
        width = self._width(entry, axis)
        out = node.outputs[0]
        out_axis = self._rank(out) + from_end
        if out_axis < 0 or self._width(out, out_axis) != width:
            raise _Refuse(f"the channel axis broadcasts from {width} to another size")
        effects = []
        for j, t in enumerate(node.inputs):
            if (side == "in" and j == index) or _is_empty(t):
                continue
            dims = self.dims(t)
            if dims is None:
                raise _Refuse(f"the shape of input '{t.name}' is unknown")
            p = len(dims) + from_end
            if p < 0 or dims[p] == 1:
                continue  # broadcast along the channel axis: not per channel
            if not _static(dims[p]) or int(dims[p]) != width:
                raise _Refuse(f"input '{t.name}' has size {dims[p]} on the channel axis, not {width}")
            effects.append(_Couple("in", j, p))
        if side == "in":
            effects.append(_Couple("out", 0, out_axis))
        return effects

    def _concat(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        rank = self._rank((node.inputs if side == "in" else node.outputs)[index])
        cat_axis = _norm_axis(int(G.attr(node, "axis", 0)), rank)
        if cat_axis != axis:  # concatenated along another axis: every input shares the channels
            effects = [_Couple("in", j, axis) for j in range(len(node.inputs)) if not (side == "in" and j == index)]
            return effects + ([_Couple("out", 0, axis)] if side == "in" else [])
        widths = [self._width(t, axis) for t in node.inputs]
        offsets = np.concatenate([[0], np.cumsum(widths)]).astype(int)
        if side == "in":
            return [_Couple("out", 0, axis, Shift(int(offsets[index]), 0, widths[index]))]
        return [_Couple("in", j, axis, Shift(-int(offsets[j]), int(offsets[j]), int(offsets[j + 1])))
                for j in range(len(node.inputs))]

    def _split(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        if side == "in":
            self._data_only(side, index)
        rank = self._rank(node.inputs[0])
        split_axis = _norm_axis(int(G.attr(node, "axis", 0)), rank)
        if split_axis != axis:
            effects = [_Couple("out", o, axis) for o in range(len(node.outputs)) if not (side == "out" and o == index)]
            return effects + ([_Couple("in", 0, axis)] if side == "out" else [])
        if self.opset >= 13:
            self._const_ints(node, 1, "the split sizes input")
        widths = [self._width(t, axis) for t in node.outputs]
        starts = np.concatenate([[0], np.cumsum(widths)]).astype(int)
        adjust = Adjustment(node, "split", {"axis": axis, "sizes": widths})
        if side == "in":
            return [_Couple("out", o, axis, Shift(-int(starts[o]), int(starts[o]), int(starts[o + 1])))
                    for o in range(len(node.outputs))] + [adjust]
        return [_Couple("in", 0, axis, Shift(int(starts[index]), 0, widths[index])), adjust]

    def _slice(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        self._data_only(side, index)
        data = node.inputs[0]
        rank = self._rank(data)
        if self.opset < 10:
            starts, ends = list(G.attr(node, "starts", [])), list(G.attr(node, "ends", []))
            axes, steps = G.attr(node, "axes", None), None
        else:
            starts = self._const_ints(node, 1, "starts")
            ends = self._const_ints(node, 2, "ends")
            axes = self._const_ints(node, 3, "axes")
            steps = self._const_ints(node, 4, "steps")
        axes = list(range(len(starts))) if axes is None else [_norm_axis(int(a), rank) for a in axes]
        steps = steps or [1] * len(starts)
        width = self._width(data, axis)
        for k, a in enumerate(axes):
            if a == axis:
                s, e, step = starts[k], ends[k], steps[k]
                # a full-range slice stays full when the axis shrinks (ends clamp to the size)
                if not (step == 1 and (s == 0 or s <= -width) and e >= width):
                    raise _Refuse("slices the channel axis")
        return self._pass_through(node, side, index, axis, axis)

    def _pad(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        self._data_only(side, index)
        rank = self._rank(node.inputs[0])
        if self.opset < 11:
            pads = list(G.attr(node, "pads", G.attr(node, "paddings", [])))
            axes = None
        else:
            pads = self._const_ints(node, 1, "pads")
            axes = self._const_ints(node, 3, "axes") if self.opset >= 18 else None
        axes = list(range(rank)) if axes is None else [_norm_axis(a, rank) for a in axes]
        if pads is None or len(pads) != 2 * len(axes):
            raise _Refuse("pads not understood")
        for k, a in enumerate(axes):
            if a == axis and (pads[k] != 0 or pads[k + len(axes)] != 0):
                raise _Refuse("pads the channel axis")
        return self._pass_through(node, side, index, axis, axis)

    def _pool(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        self._data_only(side, index)
        if axis != 1:
            raise _Refuse(f"pools over axis {axis}")
        if node.op == "MaxPool":
            self._extra_outputs_unused(node)  # Indices count positions over C·H·W
        return self._pass_through(node, side, index, 1, 1)

    def _resize(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        self._data_only(side, index)
        rank = self._rank(node.inputs[0])
        axes = G.attr(node, "axes", None)
        axes = list(range(rank)) if axes is None else [_norm_axis(int(a), rank) for a in axes]
        effects = []
        if axis in axes:
            k = axes.index(axis)
            if node.op == "Upsample" and self.opset < 9:
                scales = list(G.attr(node, "scales", []))
            else:
                scales_index = 1 if (node.op == "Upsample" or self.opset < 11) else 2
                scales = None
                if scales_index < len(node.inputs) and not _is_empty(node.inputs[scales_index]):
                    value = G.constant_value(node.inputs[scales_index])
                    if value is None:
                        raise _Refuse("scales are not constant")
                    scales = [float(v) for v in np.asarray(value).ravel()]
            if scales and scales[k] != 1.0:
                raise _Refuse("resizes the channel axis")
            if node.op == "Resize" and self.opset >= 11 and self._const_ints(node, 3, "sizes") is not None:
                effects.append(Adjustment(node, "resize_sizes", {"entry": k, "input": node.inputs[0]}))
        return self._pass_through(node, side, index, axis, axis) + effects

    def _flatten(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        if side == "out":
            raise _Refuse("channels reach a Flatten from its output")
        data = node.inputs[0]
        rank = self._rank(data)
        first = _norm_axis(int(G.attr(node, "axis", 1)), rank)
        if axis < first:
            raise _Refuse("Flatten folds the channel axis into the leading (batch) axis")
        dims = self._static_dims(data, first)
        width = dims[axis - first]
        outer, inner = int(np.prod(dims[:axis - first])), int(np.prod(dims[axis - first + 1:]))
        # row-major: element (..., c, rest) lands at column (o·C + c)·inner + r (ONNX Flatten)
        return [_Couple("out", 0, 1, Spread(outer, width, inner))]

    def _reshape(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        if side == "out":
            raise _Refuse("channels reach a Reshape from its output")
        self._data_only(side, index)
        target = self._const_ints(node, 1, "the target shape")
        if target is None:
            raise _Refuse("the target shape is not a constant")
        data, out = node.inputs[0], node.outputs[0]
        in_dims, out_dims = self.dims(data), self.dims(out)
        if in_dims is None or out_dims is None:
            raise _Refuse("input or output shape unknown")
        width = self._width(data, axis)
        inner = self._static_dims(data, axis + 1)
        inner = int(np.prod(inner))
        for q in range(len(out_dims)):
            if not _same_extent(in_dims[:axis], out_dims[:q]):
                continue
            tail = out_dims[q + 1:]
            if not all(_static(d) for d in tail) or not _static(out_dims[q]):
                continue
            tail_size = int(np.prod([int(d) for d in tail]))
            if inner % tail_size or int(out_dims[q]) != width * (inner // tail_size):
                continue
            k = inner // tail_size
            entry = target[q] if q < len(target) else None
            if entry == 0 and not int(G.attr(node, "allowzero", 0)) and (q != axis or k != 1):
                raise _Refuse("target shape copies a dimension the channels change")
            return [_Couple("out", 0, q, Spread(1, width, k)),
                    Adjustment(node, "reshape", {"entry": q, "output": out})]
        raise _Refuse("splits or scatters the channel axis")

    def _transpose(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        self._data_only(side, index)
        rank = self._rank(node.inputs[0])
        perm = list(G.attr(node, "perm", list(range(rank))[::-1]))
        # output axis i is input axis perm[i] (ONNX Transpose)
        return self._pass_through(node, side, index, perm[axis] if side == "out" else axis,
                                  perm.index(axis) if side == "in" else axis)

    def _squeeze(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        self._data_only(side, index)
        in_rank = self._rank(node.inputs[0])
        axes = G.attr(node, "axes", None) if self.opset < 13 else self._const_ints(node, 1, "axes")
        if node.op == "Unsqueeze":
            out_rank = in_rank + len(axes or [])
            inserted = {_norm_axis(int(a), out_rank) for a in axes or []}
            kept = [i for i in range(out_rank) if i not in inserted]  # output axis of each input axis
        else:
            if axes is None:
                dims = self.dims(node.inputs[0])
                if any(not _static(d) for d in dims):
                    raise _Refuse("Squeeze without axes on a tensor of unknown shape")
                removed = {i for i, d in enumerate(dims) if int(d) == 1}
            else:
                removed = {_norm_axis(int(a), in_rank) for a in axes}
            if side == "in" and axis in removed:
                raise _Refuse("squeezes the channel axis")
            kept_in = [i for i in range(in_rank) if i not in removed]
            kept = [kept_in.index(i) if i in kept_in else -1 for i in range(in_rank)]
        if side == "in":
            return [_Couple("out", 0, kept[axis])]
        if axis not in kept:
            raise _Refuse("the channel axis is an inserted axis")
        return [_Couple("in", 0, kept.index(axis))]

    def _reduce(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        self._data_only(side, index)
        rank = self._rank(node.inputs[0])
        keepdims = int(G.attr(node, "keepdims", 1))
        if node.op in ("ArgMax", "ArgMin"):
            axes = [int(G.attr(node, "axis", 0))]
        elif self.opset >= 18 or (node.op == "ReduceSum" and self.opset >= 13):
            axes = self._const_ints(node, 1, "axes")
        else:
            axes = G.attr(node, "axes", None)
        if not axes:
            if int(G.attr(node, "noop_with_empty_axes", 0)):
                return self._pass_through(node, side, index, axis, axis)
            raise _Refuse("reduces over every axis")
        axes = {_norm_axis(int(a), rank) for a in axes}
        kept = [i if keepdims else i - sum(a < i for a in axes) for i in range(rank)]
        if side == "in":
            if axis in axes:
                raise _Refuse("reduces over the channel axis")
            return [_Couple("out", 0, kept[axis])]
        candidates = [i for i in range(rank) if i not in axes and kept[i] == axis]
        if not candidates:
            raise _Refuse("the channel axis is a reduced axis")
        return [_Couple("in", 0, candidates[0])]

    def _softmax(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        self._data_only(side, index)
        rank = self._rank(node.inputs[0])
        along = _norm_axis(int(G.attr(node, "axis", 1 if self.opset < 13 else -1)), rank)
        # before opset 13 the input is coerced to 2-D at ``axis``: every axis from it on is normalized together
        if (axis >= along) if self.opset < 13 else (axis == along):
            raise _Refuse("normalizes over the channel axis")
        return self._pass_through(node, side, index, axis, axis)

    def _layernorm(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        self._data_only(side, index)
        rank = self._rank(node.inputs[0])
        if axis >= _norm_axis(int(G.attr(node, "axis", -1)), rank):
            raise _Refuse("normalizes over the channel axis")
        self._extra_outputs_unused(node)
        return self._pass_through(node, side, index, axis, axis)

    def _qdq(self, node: gs.Node, side: str, index: int, axis: int) -> list:
        self._data_only(side, index)
        if int(G.attr(node, "block_size", 0)):
            raise _Refuse("blocked quantization")
        effects = self._pass_through(node, side, index, axis, axis)
        scale = node.inputs[1]
        if not _is_const(scale):
            raise _Refuse("scale is not constant")
        if int(np.prod(_const_shape(scale))) > 1:
            rank = self._rank(node.inputs[0])
            if _norm_axis(int(G.attr(node, "axis", 1)), rank) == axis:  # per-channel on this axis
                effects += [_Couple("in", i, 0) for i in (1, 2)
                            if i < len(node.inputs) and not _is_empty(node.inputs[i])]
        return effects

    # ------------------------------------------------------------------ results
    def _result(self, s: _GroupState) -> ChannelGroup:
        # number the union-find classes 0..K-1 in order of their smallest channel id
        classes, renumber = np.unique(s.find(np.arange(s.channels)), return_inverse=True)
        group = ChannelGroup(s.id, len(classes), roots=list(s.roots.values()), reason=s.reason)
        for tensor, claims in s.tensors.values():
            pos = np.flatnonzero(claims.group == s.id)
            group.tensors.append(TensorSlot(tensor, claims.axis, claims.width, pos, renumber[claims.chan[pos]]))
        for node, index, role, claims in s.slots.values():
            pos = np.flatnonzero(claims.group == s.id)
            slot = Slot(node, index, claims.axis, claims.width, role, pos, renumber[claims.chan[pos]])
            (group.consumers if role == "consumer" else group.members).append(slot)
        group.adjustments = list(s.adjust.values())
        if group.prunable and not group.roots:
            group.reason = "no layer computes these channels from constant weights"
        return group


# ============================================================================ helpers
def _static(d) -> bool:
    return isinstance(d, (int, np.integer)) and d >= 0


def _norm_axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _is_empty(t: gs.Tensor | None) -> bool:
    return t is None or (isinstance(t, gs.Variable) and t.name == "" and not t.inputs)


def _is_const(t: gs.Tensor) -> bool:
    if isinstance(t, gs.Constant):
        return True
    node = G.producer(t)
    return node is not None and node.op == "Constant" and G.is_default_domain(node) and G.constant_value(t) is not None


def _const_shape(t: gs.Tensor) -> tuple[int, ...]:
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    return tuple(np.asarray(G.constant_value(t)).shape)


def _same_extent(a: Dims, b: Dims) -> bool:
    """Two runs of leading dims hold the same number of elements (equal lists, or equal static products)."""
    if list(a) == list(b):
        return True
    if all(_static(d) for d in a) and all(_static(d) for d in b):
        return int(np.prod([int(d) for d in a])) == int(np.prod([int(d) for d in b]))
    return False
