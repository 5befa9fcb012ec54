"""Structured channel pruning across the whole graph: pass ``prune-channels`` (lossy).

Which channels must go together comes from onnxopt/channel_deps.py: dependency *groups* (a
Conv's output channels with the BatchNormalization after it, the residual sums that tie
several Convs, the depthwise Conv that follows, and the input channels of every layer that
reads them); onnxopt/channel_prune.py removes them. This pass decides how many and which
channels each group loses, and repairs the layers that read them:

* **Importance** per group channel, summed over the group's layers: ``l1`` / ``l2`` of the
  filters that compute it (Li et al. 2017, "Pruning Filters for Efficient ConvNets"), ``bn``:
  |γ| of its BatchNormalization scales (Liu et al. 2017, "network slimming"), ``activation``:
  mean |x| of the channel where the consumer layers read it, on calibration data.
* **How many**: ``ratio`` of each group's channels, or of all channels ranked across groups
  (``global=true``; each group's scores divided by their mean so groups compare); kept counts
  are rounded *up* to a multiple of ``round_to`` (TensorRT and int8 kernels want multiples of
  8 or 16) and never fall below ``min_channels``. ``ratio=0`` searches per-group ratios within
  ``--tolerance`` (else ``accuracy``): passes/channel_pruning_search.py.
* **Bias correction** (always): a removed channel c reaches a consumer as W[:, c]·x_c, on
  average W[:, c]·E[x_c] (not zero after a ReLU); that mean goes into the consumer's bias
  (created when missing), so a channel that is constant on the data is removed for free. For
  a k×k Conv with padding it is exact away from the border only.
* **Reconstruction** (``reconstruct=true``; He et al. 2017, "Channel Pruning for Accelerating
  Very Deep Neural Networks", §3.2 least squares): every consumer Conv / Gemm / MatMul is refit
  over its kept input channels so that, fed by the pruned model, it reproduces the original
  model's outputs on sampled positions of the calibration data (streamed Gram sums; ridge
  towards the pruned weights, so a layer deep in a network, with fewer sampled rows than
  weights, changes only where the data says; a refit that does not lower the residual on
  held-out feeds is dropped: :class:`RefitSums`). ``sequential`` (default) refits a layer once
  the layers before it are refit, as He et al.; ``joint`` fits every layer on the original
  model's activations in one run.

Groups the analysis cannot prove safe are left alone and the notes say why.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.activations import ChannelAccumulator, capture
from onnxopt.blas import one_blas_thread
from onnxopt.channel_deps import Adjustment, ChannelAnalysis, ChannelGroup, Slot, TensorSlot, analyze_channels
from onnxopt.channel_prune import PruneResult, prune_groups
from onnxopt.errors import UserInputError
from onnxopt.pass_base import Pass, PassResult
from onnxopt.registry import register_pass

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
IMPORTANCE = ("l1", "l2", "bn", "activation")


# ---------------------------------------------------------------------- the pass
@register_pass
class PruneChannels(Pass):
    name = "prune-channels"
    summary = "Remove whole channels (filters) across dependency groups; bias correction and least-squares refit."
    lossless = False
    run_once = True

    @dataclass
    class Options:
        # Option names that are not Python identifiers (registry.make_pass consults this).
        ALIASES = {"global": "global_ranking"}

        ratio: float = 0.0  # share of each group's channels removed; 0: search within the tolerance
        global_ranking: bool = False  # rank channels across groups and remove `ratio` of them all
        importance: Literal["l1", "l2", "bn", "activation"] = "l1"
        round_to: int = 8  # kept channel counts are multiples of this
        min_channels: int = 8  # never keep fewer; smaller groups are left alone
        exclude: list[str] = field(default_factory=list)  # node names (glob patterns) or op types
        reconstruct: bool = True  # least-squares refit of the consumer layers (He et al. 2017)
        reconstruct_order: Literal["sequential", "joint"] = "sequential"
        samples: int = 16  # calibration feeds used
        positions: int = 256  # sampled output positions per feed and layer for the refit
        accuracy: str = "cosine=0.99+top1=0.99"  # the search's budget without --tolerance
        ladder: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.375, 0.5])  # ratios the search tries
        # how the search scores one group's removal: the whole model, or its consumer layers (faster)
        search_error: Literal["model", "layers"] = "model"
        measure: bool = True  # cpu: time each group's layers before and after in onnxruntime (search)
        min_speedup: float = 1.03  # a search step must make the group's layers at least this much faster
        latency_budget_s: float = 300.0  # seconds of layer timing at most

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        self._check_options()
        with one_blas_thread():
            return self._run(graph, ctx)

    def _check_options(self) -> None:
        opt = self.options
        if not 0 <= opt.ratio < 1:
            raise UserInputError(f"{self.name}: ratio={opt.ratio} is out of range.",
                                 "give a share of channels to remove in [0, 1), e.g. ratio=0.25 (0 searches).")
        if opt.global_ranking and opt.ratio == 0:
            raise UserInputError(f"{self.name}: global=true needs a ratio.", "add e.g. ratio=0.25.")
        for key in ("round_to", "min_channels", "samples", "positions"):
            if getattr(opt, key) < 1:
                raise UserInputError(f"{self.name}: {key}={getattr(opt, key)} must be at least 1.",
                                     f"give {key} ≥ 1.")
        if not opt.ladder or any(not 0 < r < 1 for r in opt.ladder):
            raise UserInputError(f"{self.name}: ladder={'+'.join(map(str, opt.ladder))} needs ratios in (0, 1).",
                                 "give e.g. ladder=0.125+0.25+0.5.")
        if opt.min_speedup <= 0:
            raise UserInputError(f"{self.name}: min_speedup={opt.min_speedup} must be positive.",
                                 "give e.g. min_speedup=1.03.")

    def _run(self, graph: gs.Graph, ctx) -> PassResult:
        opt = self.options
        setup = Setup(graph, ctx, opt)
        notes = list(setup.notes)
        candidates = setup.candidates(notes)
        if not candidates:
            return PassResult(False, notes=notes + ["no channel group to prune"])
        if opt.ratio > 0:
            decisions = choose_by_ratio(setup, candidates, notes)
            refits = reconstruct(graph, ctx, decisions, setup, setup.feeds, notes) \
                if opt.reconstruct and decisions else {}
        else:
            from .channel_pruning_search import search

            decisions, refits = search(self, graph, ctx, setup, candidates, notes)
        if not decisions:
            return PassResult(False, notes=notes + ["no channel was removed"])
        applied = apply_plan(graph, decisions, setup.stats, refits, setup.shapes)
        notes.extend(applied.notes)
        for d in decisions:
            notes.append(f"{group_label(d.group)}: {d.group.channels}→{len(d.keep)} channels")
        counters = {"groups_pruned": float(len(decisions)),
                    "channels_removed": float(applied.prune.channels_removed),
                    "macs_saved": float(applied.macs_saved),
                    "params_saved": float(applied.prune.parameters_removed - applied.params_added),
                    "layers_reconstructed": float(len(refits))}
        return PassResult(True, counters, notes)


# ---------------------------------------------------------------------- analysis and data
class Setup:
    """What every way of pruning needs: calibration feeds, static shapes, the dependency
    analysis and (after :meth:`collect_means`) per-position means of the consumers' inputs."""

    def __init__(self, graph: gs.Graph, ctx, opt):
        self.graph, self.ctx, self.opt = graph, ctx, opt
        self.feeds = list(ctx.calibration_data().feeds(limit=max(1, opt.samples)))
        self.input_shapes = {name: tuple(v.shape) for name, v in self.feeds[0].items()} if self.feeds else {}
        self.types = G.inferred_types(graph, ctx.template, input_shapes=self.input_shapes)
        self.shapes = {name: dims for name, (_, dims) in self.types.items() if dims is not None}
        self.analysis: ChannelAnalysis = analyze_channels(graph, self.shapes)
        self.notes = self.analysis.notes()
        self.stats: dict[tuple[str, int], InputStats] = {}

    def candidates(self, notes: list[str]) -> list[ChannelGroup]:
        opt = self.opt
        matched: set[str] = set()
        chosen = []
        for group in self.analysis.prunable:
            hits = [(pattern, node) for node in group_nodes(group) for pattern in opt.exclude
                    if node.op == pattern or fnmatch.fnmatchcase(node.name, pattern)]
            matched.update(p for p, _ in hits)
            if hits:
                pattern, node = hits[0]
                notes.append(f"{group_label(group)}: excluded ({node.op} '{node.name}' matches '{pattern}')")
            elif kept_count(group.channels, 1.0, opt) >= group.channels:
                notes.append(f"{group_label(group)}: {group.channels} channels, too few to prune "
                             f"(min_channels={opt.min_channels}, round_to={opt.round_to})")
            else:
                chosen.append(group)
        for pattern in opt.exclude:
            if pattern not in matched and not any(n.op == pattern or fnmatch.fnmatchcase(n.name, pattern)
                                                  for n in self.graph.nodes):
                notes.append(f"exclude '{pattern}' matches no node")
        return chosen

    def collect_means(self, feeds: list, groups: list[ChannelGroup]) -> None:
        """Per-position mean and mean |x| of the inputs of the groups' consumers on ``feeds``
        (the original model)."""
        wanted: dict[tuple[str, int], InputStats] = {}
        for group in groups:
            for slot in group.consumers:
                key = input_key(slot.node)
                if key is not None:
                    wanted.setdefault(key, InputStats(key[1]))
        by_name: dict[str, list[InputStats]] = {}
        for (name, _), stats in wanted.items():
            by_name.setdefault(name, []).append(stats)

        def consume(name: str, value: np.ndarray) -> None:
            for stats in by_name[name]:
                stats.add(value)

        capture(G.export_model(self.graph, self.ctx.template), list(by_name), feeds, consume)
        self.stats = {key: s for key, s in wanted.items() if s.mean is not None}


class InputStats:
    """Running per-position mean and mean |x| of a tensor along its channel axis."""

    def __init__(self, axis: int):
        self.values, self.magnitudes = ChannelAccumulator(axis), ChannelAccumulator(axis)

    def add(self, value: np.ndarray) -> None:
        self.values.add(value)
        self.magnitudes.add(np.abs(value))

    @property
    def mean(self) -> np.ndarray | None:
        result = self.values.result()
        return None if result is None else result.mean

    @property
    def mean_abs(self) -> np.ndarray | None:
        result = self.magnitudes.result()
        return None if result is None else result.mean


def input_key(node: gs.Node) -> tuple[str, int] | None:
    """(name, channel axis) of the data input of a consumer layer, whose positions on that axis
    are the positions on the weight's input-channel axis."""
    if node.op in ("Conv", "ConvTranspose"):
        return node.inputs[0].name, 1
    if node.op == "Gemm":
        return node.inputs[0].name, 0 if int(G.attr(node, "transA", 0)) else 1
    if node.op == "MatMul":
        return node.inputs[0].name, -1
    return None


def group_label(group: ChannelGroup) -> str:
    """The group's layers for notes: 'conv3', 'conv3+conv5' (residual), 'conv3+conv5+2 more'."""
    names = group.root_names or [group.name]
    return "+".join(names[:2]) + (f"+{len(names) - 2} more" if len(names) > 2 else "")


def group_nodes(group: ChannelGroup) -> list[gs.Node]:
    """Every node whose constants or attributes the group's removal changes."""
    seen: dict[int, gs.Node] = {id(n): n for n in group.roots}
    for slot in group.slots:
        seen.setdefault(id(slot.node), slot.node)
    for adj in group.adjustments:
        seen.setdefault(id(adj.node), adj.node)
    return list(seen.values())


# ---------------------------------------------------------------------- importance
def channel_importance(group: ChannelGroup, mode: str, stats: dict, notes: list[str]) -> np.ndarray:
    """One score per group channel (higher: more important), summed over the group's layers."""
    if mode == "bn":
        parts = [p for s, p in group.weight_slices(("param",))
                 if s.node.op in ("BatchNormalization", "InstanceNormalization") and s.input_index == 1]
        if parts:
            return np.array([sum(float(np.abs(p[c]).sum()) for p in parts) for c in range(group.channels)])
        notes.append(f"{group_label(group)}: no BatchNormalization in the group, importance l1 instead of bn")
        mode = "l1"
    if mode == "activation":
        scores = _activation_scores(group, stats)
        if scores is not None:
            return scores
        notes.append(f"{group_label(group)}: consumer inputs not observed, importance l1 instead of activation")
        mode = "l1"
    total = np.zeros(group.channels)
    for slot, parts in group.weight_slices(("producer",)):
        if slot.input_index != 1:
            continue  # biases are not filters
        for c, part in enumerate(parts):
            a = np.abs(part.astype(np.float64))
            total[c] += a.sum() if mode == "l1" else (a * a).sum()
    return total if mode == "l1" else np.sqrt(total)


def _activation_scores(group: ChannelGroup, stats: dict) -> np.ndarray | None:
    """Mean |x| of each channel where the consumers read it, averaged over the consumers' inputs."""
    total, count = np.zeros(group.channels), 0
    seen: set[tuple] = set()
    for slot in group.consumers:
        key = input_key(slot.node)
        s = stats.get(key)
        if s is None or s.mean_abs is None or key in seen:
            continue
        seen.add(key)
        per_position = s.mean_abs[slot.pos]
        owned = np.bincount(slot.chan, minlength=group.channels)
        total += np.bincount(slot.chan, weights=per_position, minlength=group.channels) / np.maximum(owned, 1)
        count += 1
    return total / count if count else None


# ---------------------------------------------------------------------- how many, which
@dataclass
class Decision:
    group: ChannelGroup
    keep: np.ndarray  # sorted group channel ids that stay

    @property
    def removed(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.group.channels), self.keep)


def choose_by_ratio(setup: Setup, groups: list[ChannelGroup], notes: list[str]) -> list[Decision]:
    """``ratio`` of each group's least important channels, or of all channels (global ranking)."""
    opt = setup.opt
    setup.collect_means(setup.feeds, groups)
    scores = {g.id: channel_importance(g, opt.importance, setup.stats, notes) for g in groups}
    if opt.global_ranking:
        decisions = global_decisions(groups, scores, opt)
    else:
        decisions = [Decision(g, keep_most_important(scores[g.id], kept_count(g.channels, opt.ratio, opt)))
                     for g in groups]
    for d in decisions:
        if len(d.keep) == d.group.channels:
            notes.append(f"{group_label(d.group)}: {d.group.channels} channels, nothing to remove at "
                         f"ratio {opt.ratio:g} after rounding to multiples of {opt.round_to}")
    return [d for d in decisions if len(d.keep) < d.group.channels]


def kept_count(channels: int, ratio: float, opt) -> int:
    """Channels kept when ``ratio`` of ``channels`` go: at least ``min_channels``, rounded up to
    a multiple of ``round_to`` (fewer removed rather than an odd count); all of them when the
    group is smaller than ``min_channels`` or no multiple fits below its size."""
    if channels < opt.min_channels:
        return channels
    keep = max(channels - int(math.floor(ratio * channels + 1e-9)), opt.min_channels, 1)
    keep = int(math.ceil(keep / opt.round_to)) * opt.round_to
    return min(keep, channels)


def keep_most_important(scores: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` channels of highest score (ties: the lower channel id stays), sorted."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:count])


def global_decisions(groups: list[ChannelGroup], scores: dict[int, np.ndarray], opt) -> list[Decision]:
    """Remove ``ratio`` of all channels, least important first across groups. Each group's
    scores are divided by their mean so that groups of different scale compare; a group stops
    giving channels at its minimum (min_channels, round_to), and its count is rounded as
    :func:`kept_count` does."""
    pool = []
    for group in groups:
        s = scores[group.id]
        mean = float(np.mean(s))
        normalized = s / mean if mean > 0 else np.ones_like(s)
        pool.extend((float(v), group.id, c) for c, v in enumerate(normalized))
    pool.sort()
    target = int(math.floor(opt.ratio * sum(g.channels for g in groups) + 1e-9))
    room = {g.id: g.channels - kept_count(g.channels, 1.0, opt) for g in groups}
    taken = {g.id: 0 for g in groups}
    removed = 0
    for _, gid, _ in pool:
        if removed >= target:
            break
        if taken[gid] < room[gid]:
            taken[gid] += 1
            removed += 1
    decisions = []
    for group in groups:
        keep = group.channels - taken[group.id]
        keep = min(group.channels, int(math.ceil(keep / opt.round_to)) * opt.round_to)
        decisions.append(Decision(group, keep_most_important(scores[group.id], keep)))
    return decisions


# ---------------------------------------------------------------------- consumer layers
@dataclass
class ConsumerCut:
    """A layer that reads pruned channels: positions removed on its weight's input-channel
    axis and (when its own output channels are pruned too) on its output axis."""

    node: gs.Node
    removed_in: np.ndarray
    removed_out: np.ndarray


def consumer_cuts(decisions: list[Decision]) -> dict[int, ConsumerCut]:
    """Consumer layers of the decisions' groups by node id (a layer reading several groups once)."""
    cuts: dict[int, ConsumerCut] = {}
    for d in decisions:
        removed = d.removed
        for slot in d.group.consumers:
            cut = cuts.setdefault(id(slot.node), ConsumerCut(slot.node, np.zeros(0, np.int64), np.zeros(0, np.int64)))
            cut.removed_in = np.union1d(cut.removed_in, slot.positions(removed))
    for d in decisions:
        removed = d.removed
        for slot in d.group.members:
            cut = cuts.get(id(slot.node))
            if cut is not None and slot.role == "producer" and slot.input_index == 1:
                cut.removed_out = np.union1d(cut.removed_out, slot.positions(removed))
    return cuts


def taps(node: gs.Node) -> int:
    """Weight columns per input channel: kh·kw for a Conv, 1 for a matrix."""
    if node.op == "Conv":
        shape = G.constant_value(node.inputs[1]).shape
        return int(np.prod(shape[2:]))
    return 1


def columns(node: gs.Node, positions: np.ndarray) -> np.ndarray:
    """Columns of :func:`layer_matrix` that belong to input-channel ``positions``."""
    k = taps(node)
    return (np.asarray(positions, np.int64)[:, None] * k + np.arange(k)[None, :]).ravel()


def layer_matrix(node: gs.Node) -> np.ndarray | None:
    """The layer's weight as a (outputs, inputs·taps) matrix W with y = W·x (+ bias), Gemm's
    alpha folded in; None for a layer this pass does not correct (ConvTranspose, grouped Conv)."""
    w = G.constant_value(node.inputs[1])
    if w is None:
        return None
    if node.op == "Conv" and int(G.attr(node, "group", 1)) == 1:
        return w.reshape(w.shape[0], -1)
    if node.op == "Gemm" and w.ndim == 2:
        matrix = w if int(G.attr(node, "transB", 0)) else w.T
        return float(G.attr(node, "alpha", 1.0)) * matrix
    if node.op == "MatMul" and w.ndim == 2:
        return w.T
    return None


def _bias_index(node: gs.Node) -> int | None:
    index = 2 if node.op in ("Conv", "Gemm") else None
    if index is not None and len(node.inputs) > index and node.inputs[index].name:
        return index
    return None


def layer_bias(node: gs.Node, outputs: int, extra: np.ndarray | None = None) -> np.ndarray | None:
    """The layer's bias per output (Gemm: beta·C; MatMul: ``extra``, what this pass added after
    it); None when it is not one value per output (a Gemm C that varies by row)."""
    if node.op == "MatMul":
        return np.zeros(outputs) if extra is None else extra.astype(np.float64)
    index = _bias_index(node)
    if index is None:
        return np.zeros(outputs)
    value = np.asarray(G.constant_value(node.inputs[index]), np.float64)
    if node.op == "Gemm":
        if value.size not in (1, outputs) or (value.ndim > 0 and value.shape[-1] not in (1, outputs)):
            return None
        value = float(G.attr(node, "beta", 1.0)) * value
    return np.broadcast_to(value.reshape(-1), (outputs,)).copy()


def add_to_bias(graph: gs.Graph, node: gs.Node, delta: np.ndarray, names: G.NameAllocator) -> int:
    """Add ``delta`` (one value per output) to the layer's bias, creating it when missing.
    Returns the number of parameters added."""
    if node.op == "MatMul":
        return _add_after_matmul(graph, node, delta, names)
    index = _bias_index(node)
    scale = 1.0
    if node.op == "Gemm":  # Y = alpha·A·B + beta·C
        scale = float(G.attr(node, "beta", 1.0))
        if index is not None and scale == 0:
            index = None  # C is ignored: replace it
        if index is None:
            node.attrs["beta"] = scale = 1.0
    if index is None:
        dtype = G.constant_value(node.inputs[1]).dtype
        bias = names.constant(node.name + "_bias", delta.astype(dtype))
        if len(node.inputs) > 2:
            node.inputs[2] = bias  # an omitted optional input ('')
        else:
            node.inputs.append(bias)
        return delta.size
    value = np.asarray(G.constant_value(node.inputs[index]))
    new = (value + delta / scale).astype(value.dtype)  # a Gemm C of one value becomes a vector
    node.inputs[index] = names.constant(node.name + "_bias", new)
    return new.size - value.size


def _add_after_matmul(graph: gs.Graph, node: gs.Node, delta: np.ndarray, names: G.NameAllocator) -> int:
    """A MatMul has no bias: add ``delta`` to the constant of the Add that already follows it
    (PyTorch's Linear), else insert one."""
    found = matmul_bias(graph, node)
    if found is not None:
        add, j = found
        value = np.asarray(G.constant_value(add.inputs[j]))
        add.inputs[j] = names.constant(add.name + "_bias", (value + delta.reshape(value.shape)).astype(value.dtype))
        return 0
    out = node.outputs[0]
    dtype = G.constant_value(node.inputs[1]).dtype
    product = gs.Variable(names(out.name + "_product"), dtype=out.dtype, shape=out.shape)
    node.outputs[0] = product
    graph.nodes.append(gs.Node("Add", names(node.name + "_bias"), {},
                               [product, names.constant(node.name + "_bias", delta.astype(dtype))], [out]))
    return delta.size


def matmul_bias(graph: gs.Graph, node: gs.Node) -> tuple[gs.Node, int] | None:
    """(Add, input index of its constant) when the MatMul's only reader adds one constant per output column."""
    out = node.outputs[0]
    readers = G.consumers(out)
    if len(readers) != 1 or G.is_graph_output(graph, out):
        return None
    add = readers[0]
    if add.op != "Add" or not G.is_default_domain(add) or len(add.inputs) != 2:
        return None
    j = 1 if add.inputs[0] is out else 0
    if add.inputs[1 - j] is not out:
        return None
    value = G.constant_value(add.inputs[j])
    columns_count = G.constant_value(node.inputs[1]).shape[1]
    if value is None or value.dtype.kind != "f" or value.ndim == 0 or value.size != columns_count \
            or value.shape[-1] != columns_count:
        return None
    return add, j


def write_matrix(node: gs.Node, matrix: np.ndarray, names: G.NameAllocator) -> None:
    """Store a (outputs, inputs·taps) matrix back in the layer's own weight layout."""
    w = G.constant_value(node.inputs[1])
    if node.op == "Conv":
        value = matrix.reshape(w.shape)
    elif node.op == "Gemm":
        value = matrix if int(G.attr(node, "transB", 0)) else matrix.T
        node.attrs["alpha"] = 1.0
    else:
        value = matrix.T
    node.inputs[1] = names.constant(node.name + "_weight", np.ascontiguousarray(value, dtype=w.dtype))


# ---------------------------------------------------------------------- applying a plan
@dataclass
class Applied:
    prune: PruneResult
    params_added: int = 0
    macs_saved: float = 0.0
    corrections: dict[int, np.ndarray] = field(default_factory=dict)  # node id → bias added (pruned outputs)
    notes: list[str] = field(default_factory=list)


def apply_plan(graph: gs.Graph, decisions: list[Decision], stats: dict, refits: dict | None = None,
               shapes: dict | None = None) -> Applied:
    """Remove the decisions' channels from ``graph`` (whose analysis they come from), correct
    the consumers' biases for the removed channels' means, and write ``refits`` (node index in
    ``graph.nodes`` → (matrix, bias) in :func:`layer_matrix` terms) over the corrected layers."""
    names = G.NameAllocator(graph)
    index_of = {id(n): i for i, n in enumerate(graph.nodes)}
    cuts = consumer_cuts(decisions)
    deltas: dict[int, np.ndarray] = {}
    uncorrected = []
    for key, cut in cuts.items():
        delta = _mean_contribution(cut, stats)
        if delta is None:
            uncorrected.append(cut.node.name)
        elif np.any(delta):
            deltas[key] = delta
    layers = _weighted_layers(decisions, shapes or {})
    sizes = {key: _weight_size(node) for key, (node, _) in layers.items()}
    result = Applied(prune_groups(graph, [(d.group, d.keep) for d in decisions]))
    result.macs_saved = sum((sizes[key] - _weight_size(node)) * per_element
                            for key, (node, per_element) in layers.items())
    for key, delta in deltas.items():
        node = cuts[key].node
        pruned = np.delete(delta, cuts[key].removed_out)
        result.params_added += add_to_bias(graph, node, pruned, names)
        result.corrections[key] = pruned
    for key, cut in cuts.items():
        refit = (refits or {}).get(index_of[key])
        if refit is None:
            continue
        matrix, bias = refit
        current = layer_bias(cut.node, matrix.shape[0], result.corrections.get(key))
        write_matrix(cut.node, matrix, names)
        result.params_added += add_to_bias(graph, cut.node, bias - current, names)
    if uncorrected:
        result.notes.append(f"bias not corrected for the removed channels at {', '.join(uncorrected[:5])}"
                            f"{' …' if len(uncorrected) > 5 else ''} (input not observed, or not a Conv/Gemm/MatMul)")
    return result


def _mean_contribution(cut: ConsumerCut, stats: dict) -> np.ndarray | None:
    """W[:, removed]·E[x_removed] per output of the layer (before pruning): what the removed
    channels added on average; None when it cannot be computed."""
    matrix = layer_matrix(cut.node)
    s = stats.get(input_key(cut.node))
    if matrix is None or s is None or s.mean is None or len(s.mean) * taps(cut.node) != matrix.shape[1]:
        return None
    means = np.repeat(s.mean[cut.removed_in], taps(cut.node))
    return matrix[:, columns(cut.node, cut.removed_in)].astype(np.float64) @ means


def _weight_size(node: gs.Node) -> int:
    return int(np.asarray(G.constant_value(node.inputs[1])).size)


def _weighted_layers(decisions: list[Decision], shapes: dict) -> dict[int, tuple[gs.Node, float]]:
    """Weighted layers whose weights the decisions cut: node id → (node, MACs per weight element).
    A Conv / Gemm / MatMul does one multiply-accumulate per weight element and output position
    (ConvTranspose: per input position), so its MACs scale with its weight's size."""
    found: dict[int, tuple[gs.Node, float]] = {}
    for d in decisions:
        for slot in d.group.slots:
            node = slot.node
            if slot.input_index == 1 and node.op in WEIGHTED_OPS and id(node) not in found:
                per_element = _positions_per_weight(node, shapes)
                if per_element is not None:
                    found[id(node)] = (node, per_element)
    return found


def _positions_per_weight(node: gs.Node, shapes: dict) -> float | None:
    transpose = node.op == "ConvTranspose"
    tensor = node.inputs[0] if transpose else node.outputs[0]
    dims = shapes.get(tensor.name) or (list(tensor.shape) if tensor.shape is not None else None)
    if not dims or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
        return None
    axis = -1 if node.op == "MatMul" else 1
    return float(np.prod(dims)) / float(dims[axis])


# ---------------------------------------------------------------------- working on copies
def on_copy(graph: gs.Graph, decisions: list[Decision]) -> tuple[gs.Graph, list[Decision]]:
    """A copy of ``graph`` and the decisions re-pointed at its nodes and tensors (by position
    and name), so a plan can be tried without touching ``graph``."""
    copy = graph.copy()
    index_of = {id(n): i for i, n in enumerate(graph.nodes)}
    tensors = copy.tensors()

    def node(n: gs.Node) -> gs.Node:
        return copy.nodes[index_of[id(n)]]

    def moved(group: ChannelGroup) -> ChannelGroup:
        def slot(s: Slot) -> Slot:
            return Slot(node(s.node), s.input_index, s.axis, s.width, s.role, s.pos, s.chan)

        def info(a: Adjustment) -> dict:
            return {k: tensors[v.name] if isinstance(v, gs.Tensor) else v for k, v in a.info.items()}

        return ChannelGroup(group.id, group.channels, [node(r) for r in group.roots],
                            [slot(s) for s in group.members], [slot(s) for s in group.consumers],
                            [TensorSlot(tensors[t.tensor.name], t.axis, t.width, t.pos, t.chan) for t in group.tensors],
                            [Adjustment(node(a.node), a.kind, info(a)) for a in group.adjustments], group.reason)

    return copy, [Decision(moved(d.group), d.keep) for d in decisions]


# ---------------------------------------------------------------------- reconstruction
def reconstruct(graph: gs.Graph, ctx, decisions: list[Decision], setup: Setup, feeds: list,
                notes: list[str]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Least-squares refits (He et al. 2017, §3.2) of the consumer layers of ``decisions``:
    node index → (matrix, bias) over the kept input channels and outputs, fit so that the
    layer reproduces the original model's outputs on sampled positions of ``feeds``.
    ``graph`` is not changed (the plan is applied to copies)."""
    from .lowrank import find_layers
    from .lowrank_search import Targets, _input_rows, _output_shape

    opt = setup.opt
    cuts = consumer_cuts(decisions)
    index_of = {id(n): i for i, n in enumerate(graph.nodes)}
    layers = []
    names_seen: dict[str, int] = {}
    for layer in find_layers(graph, {})[0]:
        if id(layer.node) in cuts and layer_bias(layer.node, layer.weight.shape[0]) is not None:
            names_seen[layer.name] = names_seen.get(layer.name, 0) + 1
            layers.append(layer)
    layers = [layer for layer in layers if names_seen[layer.name] == 1 and layer.name]  # Targets keys by name
    skipped = len(cuts) - len(layers)
    if not layers:
        return {}
    targets = Targets(graph, ctx, layers, feeds, opt)
    layers = [layer for layer in layers if targets.outputs.get(layer.name)]
    if opt.reconstruct_order == "joint":
        waves = [layers]
    else:
        waves = _waves(layers)
    refits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    original = G.export_model(graph, ctx.template) if opt.reconstruct_order == "joint" else None
    for wave in waves:
        trial, moved = on_copy(graph, decisions)
        in_trial = {id(layer.node): trial.nodes[index_of[id(layer.node)]] for layer in wave}
        applied = apply_plan(trial, moved, setup.stats, refits)
        trial.cleanup().toposort()
        model = original if original is not None else G.export_model(trial, ctx.template)
        sums = {layer.name: RefitSums() for layer in wave}
        readers: dict[str, list] = {}
        for layer in wave:
            readers.setdefault(layer.x.name, []).append(layer)
        seen: dict[str, int] = {}

        def consume(name: str, value: np.ndarray) -> None:
            feed = seen.get(name, 0)
            seen[name] = feed + 1
            for layer in readers[name]:
                target = targets.outputs[layer.name].get(feed)
                if target is None:
                    continue
                cut = cuts[id(layer.node)]
                positions = targets.positions(layer, feed, _output_shape(layer, value.shape))
                rows = _input_rows(layer, value, positions)
                if original is not None:  # the original input: keep the kept channels' columns
                    rows = np.delete(rows, columns(layer.node, cut.removed_in), axis=1)
                sums[layer.name].add(rows, np.delete(target, cut.removed_out, axis=1), feed)

        capture(model, list(readers), feeds, consume)
        for layer in wave:
            node = in_trial[id(layer.node)]
            current = layer_matrix(node).astype(np.float64)
            bias = layer_bias(node, current.shape[0], applied.corrections.get(id(node)))
            solved = sums[layer.name].solve(current, bias)
            if solved is not None:
                refits[index_of[id(layer.node)]] = (solved[0].astype(np.float32), solved[1].astype(np.float32))
    notes.append(f"reconstructed {len(refits)} of {len(cuts)} consumer layer(s) ({opt.reconstruct_order}) on "
                 f"{len(feeds)} calibration feed(s)" + (f"; {skipped} not refittable" if skipped else "")
                 + ("; validate on data the refit did not see" if refits else ""))
    return refits


def _waves(layers: list) -> list[list]:
    """Layers in rounds: a layer is refit once every listed layer it depends on has been."""
    pending = {id(layer.node): layer for layer in layers}
    upstream: dict[int, set[int]] = {}
    for layer in layers:
        found, stack, visited = set(), [layer.node], set()
        while stack:
            node = stack.pop()
            for t in node.inputs:
                producer = G.producer(t)
                if producer is not None and id(producer) not in visited:
                    visited.add(id(producer))
                    if id(producer) in pending:
                        found.add(id(producer))
                    stack.append(producer)
        upstream[id(layer.node)] = found
    waves = []
    left = [id(layer.node) for layer in layers]
    while left:
        wave = [key for key in left if not (upstream[key] & set(left))]
        waves.append([pending[key] for key in wave])
        left = [key for key in left if key not in wave]
    return waves


class RefitSums:
    """The least-squares sums of one layer (lowrank_search._GramSums), one feed in
    ``HOLD_OUT`` kept apart: a refit is kept only if it also lowers the residual on the rows
    of feeds it was not fit on (few positions per image deep in a network leave fewer rows
    than unknowns, and an interpolating fit would not carry over to other images).

    The refit is a ridge regression *towards the current weights* (min ‖Y − Z·Wᵀ − b‖² +
    λ‖W − W₀‖²): where the samples do not determine the weights they stay as pruned, so it is
    defined for any number of rows; solved from the same sums as lowrank_math.gram_refit on
    the residual targets Y − Z·W₀ᵀ."""

    HOLD_OUT = 4
    # Ridge strengths tried (relative to the mean diagonal of the Gram matrix); the held-out
    # rows choose. Few rows per weight want a strong pull towards the pruned weights.
    RIDGES = (1e-3, 1e-2, 1e-1, 1.0)

    def __init__(self):
        from .lowrank_search import _GramSums

        self.fit, self.check = _GramSums(), _GramSums()

    def add(self, rows: np.ndarray, target: np.ndarray, feed: int) -> None:
        (self.check if feed % self.HOLD_OUT == self.HOLD_OUT - 1 else self.fit).add(rows, target)

    def solve(self, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(matrix, bias) refit on every row with the ridge that does best on the held-out
        rows, or None when no refit of the fit rows lowers the residual there. With one feed
        nothing is held out: the smallest ridge, kept when it lowers the residual on rows
        that outnumber the unknowns."""
        if self.fit.gram is None:
            return None
        if not self.check.count:
            trial = _towards(self.fit, weight, bias, self.RIDGES[0])
            if trial is None or self.fit.count <= weight.shape[1] + 1 or \
                    self.fit.residual(*trial) >= self.fit.residual(weight, bias):
                return None
            return trial
        scored = []
        for ridge in self.RIDGES:
            trial = _towards(self.fit, weight, bias, ridge)
            if trial is not None:
                scored.append((self.check.residual(*trial), ridge))
        if not scored or min(scored)[0] >= self.check.residual(weight, bias):
            return None
        return _towards(_merged(self.fit, self.check), weight, bias, min(scored)[1])


def _towards(sums, weight: np.ndarray, bias: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Ridge least squares shrunk towards ``weight``: W = W₀ + Δ, (Δ, b) = gram_refit on Y − Z·W₀ᵀ."""
    from onnxopt import lowrank_math as M

    n = sums.count
    mean_z, mean_y = sums.sum_z / n, sums.sum_y / n
    delta, new_bias = M.gram_refit(sums.gram, sums.cross - sums.gram @ weight.T, mean_z, mean_y - weight @ mean_z, n,
                                   ridge=ridge)
    new_weight = weight + delta.astype(np.float64)
    new_bias = new_bias.astype(np.float64)
    if not (np.isfinite(new_weight).all() and np.isfinite(new_bias).all()):
        return None
    return new_weight, new_bias


def _merged(a, b):
    """The sums of both row sets (the sums are additive)."""
    from .lowrank_search import _GramSums

    out = _GramSums()
    out.count = a.count + b.count
    out.gram, out.cross = a.gram + b.gram, a.cross + b.cross
    out.sum_z, out.sum_y = a.sum_z + b.sum_z, a.sum_y + b.sum_y
    out.y_energy = a.y_energy + b.y_energy
    return out
