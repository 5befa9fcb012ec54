"""Apply a channel removal found by :mod:`onnxopt.channel_deps`.

Given a prunable :class:`~onnxopt.channel_deps.ChannelGroup` and the group channel ids to
keep, every place the group reaches is rewritten: constant slots lose the positions of the
removed channels on their axis (weights, biases, BatchNorm statistics, per-channel constants,
consumer input-channel weights), and the nodes that count channels are updated — Split sizes
(attribute before opset 13, input from 13), a depthwise Conv's ``group``, a Reshape's target
shape entry, a Resize's ``sizes`` entry. The static shapes of the tensors the channels flow
through are updated on their channel axis, so exported models carry no stale value_info.

A constant read by several nodes (or twice by one node) is copied before it is sliced
(copy-on-write); a constant read by one node only is sliced in place.

Several groups of **one** analysis are disjoint and are applied together by
:func:`prune_groups` (positions refer to the graph as analysed); after a prune, analyse again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as G
from .channel_deps import Adjustment, ChannelGroup


@dataclass
class PruneResult:
    channels_removed: int = 0     # group channels removed, summed over groups
    parameters_removed: int = 0   # elements removed from constants
    constants_changed: int = 0


def prune_channels(graph: gs.Graph, group: ChannelGroup, keep) -> PruneResult:
    """Remove from ``group`` every channel not in ``keep`` (group channel ids, 0..channels-1)."""
    return prune_groups(graph, [(group, keep)])


def prune_groups(graph: gs.Graph, plan: Iterable[tuple[ChannelGroup, object]]) -> PruneResult:
    """Apply several removals (``(group, keep)`` pairs of groups from one analysis) at once.

    Raises ``ValueError`` for a refused group, an invalid ``keep`` or a removal that would
    leave a tensor or constant without any channel, before changing anything.
    """
    result = PruneResult()
    tensor_cuts: dict[int, tuple[gs.Tensor, int, int, list[np.ndarray]]] = {}
    slot_cuts: dict[tuple[int, int], tuple[gs.Node, int, dict[int, tuple[int, list[np.ndarray]]]]] = {}
    adjustments: dict[tuple[int, str], Adjustment] = {}
    for group, keep in plan:
        if not group.prunable:
            raise ValueError(f"group {group.name} is not prunable: {group.reason}")
        removed = np.setdiff1d(np.arange(group.channels), _checked_keep(group, keep))
        if len(removed) == 0:
            continue
        result.channels_removed += len(removed)
        for ts in group.tensors:
            entry = tensor_cuts.setdefault(id(ts.tensor), (ts.tensor, ts.axis, ts.width, []))
            entry[3].append(ts.positions(removed))
        for slot in group.slots:
            key = (id(slot.node), slot.input_index)
            axes = slot_cuts.setdefault(key, (slot.node, slot.input_index, {}))[2]
            axes.setdefault(slot.axis, (slot.width, []))[1].append(slot.positions(removed))
        for adj in group.adjustments:
            adjustments.setdefault((id(adj.node), adj.kind), adj)

    deleted: dict[int, int] = {}   # tensor id → positions removed on its channel axis
    widths: dict[int, int] = {}
    for key, (tensor, axis, width, parts) in tensor_cuts.items():
        count = len(np.unique(np.concatenate(parts)))
        if count >= width:
            raise ValueError(f"removing these channels would leave tensor '{tensor.name}' with no channel")
        deleted[key], widths[key] = count, width

    edits = []
    for node, index, axes in slot_cuts.values():
        value = G.constant_value(node.inputs[index])
        if value is None:
            raise ValueError(f"{node.op} '{node.name}' input {index} is no longer a constant: analyse again")
        new = np.asarray(value)
        for axis, (width, parts) in sorted(axes.items(), reverse=True):
            if new.shape[axis] != width:
                raise ValueError(f"{node.op} '{node.name}' input {index} changed since the analysis: analyse again")
            doomed = np.unique(np.concatenate(parts))
            if len(doomed) >= width:
                raise ValueError(f"removing these channels would empty {node.op} '{node.name}' input {index}")
            new = np.delete(new, doomed, axis=axis)
        edits.append((node, index, new, value.size - new.size))

    names = G.NameAllocator(graph)
    outputs = {id(t) for g in G.iter_graphs(graph) for t in g.outputs}
    for node, index, new, saved in edits:
        _set_constant_input(node, index, new, names, outputs)
        result.parameters_removed += int(saved)
        result.constants_changed += 1
    opset = int(graph.opset or 1)
    for adj in adjustments.values():
        _adjust(adj, deleted, names, outputs, opset)
    for key, (tensor, axis, width, _) in tensor_cuts.items():
        _set_channel_dim(tensor, axis, width - deleted[key])
    return result


def _checked_keep(group: ChannelGroup, keep) -> np.ndarray:
    keep = np.asarray(keep)
    if keep.dtype == bool:
        if keep.shape != (group.channels,):
            raise ValueError(f"a boolean keep mask needs {group.channels} entries, got {keep.shape}")
        keep = np.flatnonzero(keep)
    if keep.ndim != 1 or (keep.size and keep.dtype.kind not in "iu"):
        raise ValueError("keep must be a 1-D array of channel ids")
    keep = keep.astype(np.int64)
    if keep.size == 0:
        raise ValueError(f"group {group.name}: keep at least one channel")
    if keep.min() < 0 or keep.max() >= group.channels or len(np.unique(keep)) != len(keep):
        raise ValueError(f"group {group.name}: keep must hold distinct ids in 0..{group.channels - 1}")
    return keep


def _set_constant_input(node: gs.Node, index: int, value: np.ndarray, names: G.NameAllocator,
                        outputs: set[int]) -> None:
    """Give ``node`` input ``index`` the new value: in place when this node is the constant's
    only reader, else on a fresh copy (so other readers keep the original)."""
    old = node.inputs[index]
    sole_reader = (isinstance(old, gs.Constant) and all(n is node for n in old.outputs)
                   and sum(t is old for t in node.inputs) == 1 and id(old) not in outputs)
    if sole_reader:
        old.values = value
        return
    new = names.constant(old.name + "_pruned", value)
    if isinstance(old, gs.Constant) and old._export_dtype is not None:
        new._export_dtype = old._export_dtype
    node.inputs[index] = new


def _adjust(adj: Adjustment, deleted: dict[int, int], names: G.NameAllocator, outputs: set[int],
            opset: int) -> None:
    node = adj.node
    if adj.kind == "conv_group":
        node.attrs["group"] = int(G.attr(node, "group", 1)) - deleted.get(id(node.inputs[0]), 0)
    elif adj.kind == "split":
        sizes = [w - deleted.get(id(t), 0) for w, t in zip(adj.info["sizes"], node.outputs)]
        _set_split_sizes(node, sizes, names, outputs, opset)
    elif adj.kind == "reshape":
        q, out = adj.info["entry"], adj.info["output"]
        target = np.array(G.constant_value(node.inputs[1]), dtype=np.int64)
        if target[q] > 0:  # -1 (inferred) and 0 (copied from the input) follow by themselves
            target[q] -= deleted.get(id(out), 0)
            _set_constant_input(node, 1, target, names, outputs)
    elif adj.kind == "resize_sizes":
        sizes = np.array(G.constant_value(node.inputs[3]), dtype=np.int64)
        sizes[adj.info["entry"]] -= deleted.get(id(adj.info["input"]), 0)
        _set_constant_input(node, 3, sizes, names, outputs)
    else:  # pragma: no cover - the analysis only makes the kinds above
        raise AssertionError(adj.kind)


def _set_split_sizes(node: gs.Node, sizes: list[int], names: G.NameAllocator, outputs: set[int], opset: int) -> None:
    explicit_input = len(node.inputs) > 1 and node.inputs[1].name != ""
    equal = len(set(sizes)) == 1
    if opset < 13:  # sizes are the 'split' attribute
        if "split" in node.attrs or not equal:
            node.attrs["split"] = [int(s) for s in sizes]
        return
    if explicit_input:
        _set_constant_input(node, 1, np.array(sizes, dtype=np.int64), names, outputs)
    elif not equal:
        # equal split implied (or num_outputs, opset 18): state the sizes; the spec allows
        # either the 'split' input or 'num_outputs', not both
        node.attrs.pop("num_outputs", None)
        node.inputs.append(names.constant(node.name + "_split", np.array(sizes, dtype=np.int64)))


def _set_channel_dim(tensor: gs.Tensor, axis: int, width: int) -> None:
    if isinstance(tensor, gs.Variable) and tensor.shape is not None and axis < len(tensor.shape):
        shape = list(tensor.shape)
        shape[axis] = int(width)
        tensor.shape = shape
