"""Run a model on calibration data and hand its intermediate tensors to a callback.

:func:`capture` is the one place that turns "these tensor names" into numpy arrays: it adds
the tensors as outputs of a copy of the model, runs onnxruntime on CPU with graph
optimizations disabled (so the values are the model's own float values and no tensor is
fused away), and calls ``consume(name, array)`` for each tensor of each feed, dropping the
array right after. Memory stays bounded: when the requested tensors of one run would exceed
``memory_budget`` bytes, the names are split into groups and each group gets its own session
and sweep over the data.

:func:`collect_histograms` and :func:`collect_channel_stats` build on it for calibration
(streaming histograms) and for bias correction / absorption (per-channel statistics).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

from .calibration import CalibrationData
from .errors import UserInputError
from .io import copy_without_initializers, tensor_nbytes
from .quant_math import StreamingHistogram

Feed = dict[str, np.ndarray]
FeedSource = Callable[[], Iterable[Feed]] | CalibrationData | Sequence[Feed]

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_ORT_FLOAT_TYPES = {"tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"}
# Calibration runs next to other work: one or two intra-op threads are enough and keep the machine usable.
_THREADS = max(1, min(2, os.cpu_count() or 1))
# Initializers up to this size stay in the shape-inference copy (shape tensors for data propagation).
_SMALL_INITIALIZER = 1024


def capture(model: onnx.ModelProto, tensor_names: Iterable[str], feeds: FeedSource,
            consume: Callable[[str, np.ndarray], None], *, memory_budget: int = 1 << 30,
            progress: Callable | None = None) -> list[str]:
    """Call ``consume(name, array)`` for every requested tensor and every feed.

    ``feeds`` is a :class:`CalibrationData`, a callable returning a fresh iterable of feed dicts,
    or a list of feed dicts; it is iterated once per group of tensors. Graph inputs are handed
    over from the feed itself. ``progress`` has the signature of
    ``PassContext.progress_factory``: ``progress(iterable, description, total) -> iterable``.

    Returns the names that could not be captured (in the order given), with no error: names not in the main graph
    (unknown, or only inside If/Loop/Scan bodies), initializers (graph inputs that also have an
    initializer are treated as initializers), and tensors that are not float tensors.
    The caller's model is not modified.
    """
    if memory_budget <= 0:
        raise UserInputError(f"memory budget {memory_budget} bytes is not positive.", "give a budget in bytes, e.g. 1073741824.")
    names = list(dict.fromkeys(tensor_names))
    make_feeds, total = _feed_source(feeds)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    input_types = {i.name: i.type for i in graph.input if i.name not in initializers}
    produced = {out for node in graph.node for out in node.output if out}

    not_captured: list[str] = []
    from_feed: list[str] = []  # graph inputs: the feed holds them
    from_session: list[str] = []
    for name in names:
        if name in input_types:
            tt = input_types[name]
            if tt.HasField("tensor_type") and tt.tensor_type.elem_type in _FLOAT_TYPES:
                from_feed.append(name)
            else:
                not_captured.append(name)
        elif name in produced:
            from_session.append(name)
        else:
            not_captured.append(name)  # initializer, unknown, or only inside a subgraph
    if not from_feed and not from_session:
        return not_captured

    first = next(iter(make_feeds()), None)
    if first is None:
        return not_captured  # no data: nothing to hand over, nothing failed
    info = _tensor_info(model, first)
    sizes: dict[str, int | None] = {}
    for name in list(from_session):
        elem_type, nbytes = info.get(name, (None, None))
        if elem_type is not None and elem_type not in _FLOAT_TYPES:
            from_session.remove(name)
            not_captured.append(name)
        else:
            sizes[name] = nbytes
    groups = _split_by_budget(from_session, sizes, memory_budget, fallback=max((a.nbytes for a in first.values()), default=0))
    del first

    work = _runnable_copy(model) if from_session else None
    sweeps = max(1, len(groups))
    for index in range(sweeps):
        group = groups[index] if groups else []
        session = None
        fetch: list[str] = []
        if group:
            session = _session_for(work, group)
            declared = {o.name: o.type for o in session.get_outputs()}
            fetch = [n for n in group if declared.get(n) in _ORT_FLOAT_TYPES]
            not_captured.extend(n for n in group if n not in fetch)
        from_inputs = from_feed if index == 0 else []
        if not fetch and not from_inputs:
            continue
        session_inputs = {i.name for i in session.get_inputs()} if session is not None else set()
        description = "capturing activations" + (f" ({index + 1}/{sweeps})" if sweeps > 1 else "")
        feed_iter: Iterable[Feed] = make_feeds()
        if progress is not None:
            feed_iter = progress(feed_iter, description, total)
        for feed_number, feed in enumerate(feed_iter):
            for name in from_inputs:
                if name in feed:
                    consume(name, np.asarray(feed[name]))
            if fetch:
                arrays = _run(session, fetch, {k: v for k, v in feed.items() if k in session_inputs}, feed_number)
                for i, name in enumerate(fetch):
                    consume(name, arrays[i])
                    arrays[i] = None  # let the array go before the next one is handed over
                del arrays
        del session
    position = {name: i for i, name in enumerate(names)}
    return sorted(not_captured, key=position.__getitem__)  # in the order asked for


# --------------------------------------------------------------------------- collectors
def collect_histograms(model: onnx.ModelProto, tensor_names: Iterable[str], calibration: FeedSource, *,
                       bins: int = 2048, memory_budget: int = 1 << 30, progress: Callable | None = None
                       ) -> dict[str, StreamingHistogram]:
    """A :class:`StreamingHistogram` per captured tensor (names that cannot be captured are absent)."""
    names = list(dict.fromkeys(tensor_names))
    histograms = {name: StreamingHistogram(bins) for name in names}
    missing = capture(model, names, calibration, lambda name, array: histograms[name].add(array),
                      memory_budget=memory_budget, progress=progress)
    for name in missing:
        del histograms[name]
    return histograms


@dataclass
class ChannelStats:
    """Per-channel statistics of a tensor along one axis, over all calibration feeds."""

    count: int  # values per channel
    mean: np.ndarray  # float64 [C]
    min: np.ndarray
    max: np.ndarray
    mean_square: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.mean_square - self.mean * self.mean, 0.0)


class ChannelAccumulator:
    """Running per-channel sums along ``axis``, one array at a time (ChannelStats when done)."""

    def __init__(self, axis: int):
        self.axis = axis
        self.count = 0
        self.sum = self.sum_sq = self.min = self.max = None
        self.inconsistent = False

    def add(self, array: np.ndarray) -> None:
        if self.inconsistent:
            return
        x = np.asarray(array)
        if x.ndim == 0:
            x = x.reshape(1)
        # The channel axis; a tensor of lower rank than `axis` (e.g. a bare feature vector) uses its last axis.
        axis = self.axis % x.ndim if -x.ndim <= self.axis < x.ndim else x.ndim - 1
        others = tuple(a for a in range(x.ndim) if a != axis)
        channels = x.shape[axis]
        if self.sum is not None and channels != self.sum.shape[0]:
            self.inconsistent = True  # the axis is not a channel axis (e.g. a sequence length)
            return
        s = np.sum(x, axis=others, dtype=np.float64)
        sq = np.sum(np.square(x, dtype=np.float64), axis=others)
        lo = np.min(x, axis=others).astype(np.float64) if x.size else np.full(channels, np.inf)
        hi = np.max(x, axis=others).astype(np.float64) if x.size else np.full(channels, -np.inf)
        if self.sum is None:
            self.sum, self.sum_sq, self.min, self.max = s, sq, lo, hi
        else:
            self.sum += s
            self.sum_sq += sq
            np.minimum(self.min, lo, out=self.min)
            np.maximum(self.max, hi, out=self.max)
        self.count += x.size // max(channels, 1)

    def result(self) -> ChannelStats | None:
        if self.inconsistent or self.sum is None or self.count == 0:
            return None
        return ChannelStats(self.count, self.sum / self.count, self.min, self.max, self.sum_sq / self.count)


def collect_channel_stats(model: onnx.ModelProto, tensor_names: Iterable[str], calibration: FeedSource, *,
                          axis: int = 1, memory_budget: int = 1 << 30, progress: Callable | None = None
                          ) -> dict[str, ChannelStats]:
    """Per-channel count / mean / min / max / mean of squares along ``axis`` (1: NCHW channels,
    and the feature axis of a rank-2 [N, F] tensor; -1 for channels-last). Tensors that cannot
    be captured, or whose size along ``axis`` changes between feeds, are absent."""
    names = list(dict.fromkeys(tensor_names))
    accumulators = {name: ChannelAccumulator(axis) for name in names}
    capture(model, names, calibration, lambda name, array: accumulators[name].add(array),
            memory_budget=memory_budget, progress=progress)
    stats = {name: acc.result() for name, acc in accumulators.items()}
    return {name: s for name, s in stats.items() if s is not None}


# --------------------------------------------------------------------------- sampled rows
def sample_positions(shape: Sequence[int], count: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``count`` random (batch, y, x) output positions of a (N, C, H, W) tensor, or random rows
    (indices into the flattened leading axes) of a (..., F) tensor; all positions when there are
    fewer. Data-driven layer reconstruction samples a few positions per image, as Zhang et al.
    2015 (§3: "10 random locations per image")."""
    if len(shape) == 4:
        n, _, h, w = shape
        total = n * h * w
        picked = np.sort(rng.choice(total, size=min(count, total), replace=False))
        return np.unravel_index(picked, (n, h, w))
    total = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return (np.sort(rng.choice(total, size=min(count, total), replace=False)),)


def rows_at(tensor: np.ndarray, positions: tuple[np.ndarray, ...]) -> np.ndarray:
    """The feature vectors at ``positions`` (from :func:`sample_positions`): (P, C) of an NCHW
    tensor, or (P, F) of a (..., F) tensor."""
    if tensor.ndim == 4:
        n, y, x = positions
        return tensor[n, :, y, x]
    return tensor.reshape(-1, tensor.shape[-1])[positions[0]]


def conv_patches(tensor: np.ndarray, positions: tuple[np.ndarray, ...], kernel: tuple[int, int],
                 strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0),
                 dilations: Sequence[int] = (1, 1)) -> np.ndarray:
    """The input patches a 2-D Conv (group 1) reads to produce the output ``positions``
    (batch, out_y, out_x): (P, C·kh·kw), flattened in the kernel's (C, kh, kw) order, so
    ``patches @ W.reshape(T, -1).T`` is the Conv's output there (ONNX pads: begin_h, begin_w,
    end_h, end_w; zeros outside the input)."""
    kh, kw = kernel
    n, oy, ox = positions
    padded = np.pad(tensor, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    taps_y = oy[:, None] * strides[0] + np.arange(kh)[None, :] * dilations[0]  # (P, kh)
    taps_x = ox[:, None] * strides[1] + np.arange(kw)[None, :] * dilations[1]  # (P, kw)
    patches = padded[n[:, None, None], :, taps_y[:, :, None], taps_x[:, None, :]]  # (P, kh, kw, C)
    return np.ascontiguousarray(patches.transpose(0, 3, 1, 2)).reshape(len(n), -1)


# --------------------------------------------------------------------------- helpers
def _feed_source(feeds: FeedSource) -> tuple[Callable[[], Iterable[Feed]], int | None]:
    """A callable giving a fresh iterable of feeds, and their number when known."""
    if isinstance(feeds, CalibrationData):
        return feeds.feeds, len(feeds)
    if isinstance(feeds, (list, tuple)):
        return (lambda: iter(feeds)), len(feeds)
    if callable(feeds):
        return feeds, None
    raise TypeError("feeds must be a CalibrationData, a list of feed dicts, or a callable returning an iterable of them")


def _tensor_info(model: onnx.ModelProto, feed: Feed) -> dict[str, tuple[int | None, int | None]]:
    """Name → (element type, bytes) of the main graph's tensors, from ONNX shape inference on a
    weight-free copy whose inputs take the shapes of ``feed`` (bytes None when a dim stays
    unknown; element type None for non-tensor types such as sequences)."""
    light = copy_without_initializers(model)
    listed = {i.name for i in light.graph.input}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and tensor_nbytes(t) <= _SMALL_INITIALIZER:
            light.graph.initializer.append(t)  # small (shape) tensors feed data propagation
        elif t.name not in listed:
            light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for inp in light.graph.input:
        value = feed.get(inp.name)
        if value is not None and inp.type.HasField("tensor_type"):
            shape = inp.type.tensor_type.shape
            shape.Clear()
            for d in np.shape(value):
                shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # custom ops with strict checks, inconsistent declared shapes: use what is declared
        inferred = light
    info: dict[str, tuple[int | None, int | None]] = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        if not vi.type.HasField("tensor_type"):
            info.setdefault(vi.name, (-1, None))  # sequence / optional / map: not a tensor
            continue
        tt = vi.type.tensor_type
        nbytes = None
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
            except Exception:
                itemsize = 4
            nbytes = int(np.prod([d.dim_value for d in tt.shape.dim], dtype=np.int64)) * itemsize
        info.setdefault(vi.name, (tt.elem_type or None, nbytes))
    return info


def _split_by_budget(names: list[str], sizes: dict[str, int | None], budget: int, fallback: int) -> list[list[str]]:
    """Greedy groups whose estimated bytes stay within ``budget`` (a tensor over budget goes alone).

    A tensor of unknown size is assumed as large as the largest known one (or ``fallback``,
    the largest feed array, when none is known).
    """
    known = [s for s in sizes.values() if s is not None]
    unknown_size = max(known + [fallback])
    groups: list[list[str]] = []
    used = 0
    for name in names:
        size = sizes.get(name)
        size = unknown_size if size is None else size
        if groups and used + size <= budget:
            groups[-1].append(name)
            used += size
        else:
            groups.append([name])
            used = size
    return groups


def _runnable_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A private copy of ``model`` for adding outputs: one copy of the weights, shared by every group."""
    work = copy_without_initializers(model)
    work.graph.initializer.extend(model.graph.initializer)
    return work


def _session_for(work: onnx.ModelProto, outputs: list[str]):
    """A CPU session, optimizations off, whose outputs are exactly ``outputs`` (types left to onnxruntime)."""
    from .runtime import make_session

    del work.graph.output[:]
    for name in outputs:
        work.graph.output.add().name = name
    all_nodes = list(work.graph.node)
    needed = _ancestors(all_nodes, outputs)
    if needed is not None and len(needed) < len(all_nodes):
        # onnxruntime runs every node of the graph, whatever is fetched: drop the nodes the outputs
        # do not depend on (an early layer's input then costs a few layers, not the whole model).
        del work.graph.node[:]
        work.graph.node.extend(needed)
    try:
        return make_session(work, "cpu", optimization="disable", threads=_THREADS)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"onnxruntime cannot load the model to collect activations: {first}",
                             "calibration needs a model that onnxruntime's CPU provider can run.") from None
    finally:
        if needed is not None and len(needed) < len(all_nodes):
            del work.graph.node[:]
            work.graph.node.extend(all_nodes)


def _ancestors(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto] | None:
    """The nodes ``outputs`` depend on, in their original order; None when a node holds a subgraph
    (its body may read outer tensors its inputs do not name) or a node has no outputs listed."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
        return None
    producer = {out: index for index, node in enumerate(nodes) for out in node.output if out}
    keep: set[int] = set()
    stack = [producer[name] for name in outputs if name in producer]
    while stack:
        index = stack.pop()
        if index in keep:
            continue
        keep.add(index)
        stack.extend(producer[name] for name in nodes[index].input if name in producer)
    return [node for index, node in enumerate(nodes) if index in keep]


def _run(session, fetch: list[str], feed: Feed, feed_number: int) -> list:
    try:
        return session.run(fetch, feed)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"onnxruntime failed on calibration feed {feed_number}: {first}",
                             "check that the calibration data matches the model's inputs (names, shapes, dtypes).") from None

