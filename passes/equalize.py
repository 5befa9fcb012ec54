"""Pre-quantization rescaling of consecutive layers (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction", arXiv:1906.04721).

Both passes work on *pairs* ``layer1 → [activation] → layer2`` of Conv / Gemm / MatMul with
constant float weights, where the intermediate tensors flow only along that path:

* ``equalize-cross-layer`` (lossless, §4.1): for an activation ``f`` with ``f(s·x) = s·f(x)``
  for every ``s > 0`` (Relu, LeakyRelu, PRelu, or none), output channel ``i`` of layer1 is divided
  by ``s_i`` and input channel ``i`` of layer2 multiplied by it. With ``s_i = sqrt(r1_i / r2_i)``
  (``r1_i`` = largest |weight| of layer1's output channel i, ``r2_i`` = of layer2's input channel
  i) both channels end with the same range ``sqrt(r1_i · r2_i)``, which per-tensor weight
  quantization loses the least on. Chains share layers, so all pairs are swept until the scales
  stop moving.
* ``absorb-bias`` (lossy, §4.2 with data): where layer1's pre-activation output is ``>= c_i > 0``
  on the calibration data, ``relu(x - c) = relu(x) - c`` there, so ``c`` leaves layer1's bias
  and ``W2 · c`` joins layer2's bias. The activation range shrinks by ``c`` before it is quantized.
  Exact where the Relu stays active, so by default layer2 must not zero-pad (1x1 convs, Gemm,
  MatMul): a padded layer2 now pads ``relu(x) - c`` with 0, its border outputs move, and the
  error spreads inward through every later layer (option ``padded=true`` accepts that). Channels
  whose statistics rest on few values (``min_values``) are left alone: a 3σ margin estimated from
  a handful of samples is crossed by fresh data far too often.

Channel layouts (ONNX operator spec):

* Conv ``W (C_out, C_in/group, k...)``: output channel ``o`` is ``W[o]``; input channel ``i``
  lies in group ``i // (C_in/group)`` and is ``W[rows of that group, i % (C_in/group)]``.
* Gemm ``Y = alpha · A' B' + beta · C`` with ``B' = B^T`` when ``transB``: output channel ``n``
  is column ``B'[:, n]``, input channel ``k`` row ``B'[k, :]`` (``transA`` of layer2 would put
  its channels on axis 0: such pairs are skipped).
* MatMul ``X W`` with a constant 2-D ``W (K, N)``: as Gemm with alpha 1 and no bias; channels
  are the last axis, so a Conv never pairs with a Gemm/MatMul.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.errors import UserInputError
from onnxopt.pass_base import Pass, PassResult
from onnxopt.passes.fusion import FLOAT_DTYPES, FusionRun, NoMatch
from onnxopt.registry import register_pass

LAYER_OPS = ("Conv", "Gemm", "MatMul")
# Element-wise f with f(s·x) = s·f(x) for every s > 0 (Nagel et al. 2019, eq. 5): a positive
# per-channel scale passes through it. Whatever PRelu's slope shape, each element keeps its slope.
HOMOGENEOUS_ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu")


# =========================================================================== layers
class LinearLayer:
    """A Conv, Gemm or MatMul with a constant float weight, seen as a map between channels.

    Rescaling is bookkeeping until :meth:`commit`: ``out_scale`` / ``in_scale`` multiply the
    weights of each output / input channel, ``bias_shift`` is added to the bias. Ranges come
    from ``max |W|`` over kernel positions, so a sweep never touches the full weight.
    ``bias`` is the float64 effective bias (Conv ``B``; Gemm ``beta · C`` broadcast to
    ``(..., N)``), or None when the node has none. :meth:`commit` writes *new* constants, so a
    weight tied to another node is never modified behind its back.
    """

    def __init__(self, node: gs.Node, weight: np.ndarray, bias: np.ndarray | None):
        self.node = node
        self.op = node.op
        self.weight = weight  # as stored; never modified in place
        self.dtype = weight.dtype
        # fp16 weights are computed with in float32, float32/64 in their own precision.
        self.work_dtype = np.float64 if weight.dtype == np.float64 else np.float32
        self.bias = bias
        self.group = int(G.attr(node, "group", 1)) if self.op == "Conv" else 1
        self.trans_b = self.op == "Gemm" and bool(int(G.attr(node, "transB", 0)))
        self.alpha = float(G.attr(node, "alpha", 1.0)) if self.op == "Gemm" else 1.0
        self.out_scale = np.ones(self.out_channels)
        self.in_scale = np.ones(self.in_channels)
        self.bias_shift: np.ndarray | None = None
        self._abs_max: np.ndarray | None = None

    @property
    def name(self) -> str:
        return f"{self.op} '{self.node.name}'"

    # ------------------------------------------------------------------ layouts
    def _matrix(self) -> np.ndarray:
        """Gemm/MatMul weight as ``B' (K, N)``: rows are input channels, columns output channels."""
        return self.weight.T if self.trans_b else self.weight

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0] if self.op == "Conv" else self._matrix().shape[1]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.group if self.op == "Conv" else self._matrix().shape[0]

    def _grouped(self, weight: np.ndarray) -> np.ndarray:
        """A weight as ``(group, C_out/group, C_in/group, kernel elements)``; Gemm/MatMul as one group
        of ``(N, K, 1)``. Output channel o = group · C_out/group + row; input channel likewise."""
        if self.op == "Conv":
            return weight.reshape(self.group, weight.shape[0] // self.group, weight.shape[1], -1)
        matrix = weight.T if self.trans_b else weight
        return matrix.T[None, :, :, None]

    def _channel_map(self) -> np.ndarray:
        """``max |W|`` over kernel positions, (group, C_out/group, C_in/group), alpha included."""
        if self._abs_max is None:
            grouped = self._grouped(self.weight)
            self._abs_max = np.abs(grouped).max(axis=3).astype(self.work_dtype) * abs(self.alpha)
        return self._abs_max

    # ------------------------------------------------------------------ ranges and rescaling
    def output_ranges(self) -> np.ndarray:
        """max |weight| of each output channel after the scales so far (``r1`` of Nagel et al.)."""
        table = self._channel_map()
        if np.any(self.in_scale != 1):  # else skip a full-size temporary
            table = table * self.in_scale.reshape(self.group, 1, -1)
        return table.max(axis=2).reshape(-1) * self.out_scale

    def input_ranges(self) -> np.ndarray:
        """max |weight| reading each input channel after the scales so far (``r2`` of Nagel et al.)."""
        table = self._channel_map()
        if np.any(self.out_scale != 1):
            table = table * self.out_scale.reshape(self.group, -1, 1)
        return table.max(axis=1).reshape(-1) * self.in_scale

    def scale_outputs(self, factor: np.ndarray) -> None:
        """Multiply output channel i (weights and bias) by ``factor[i]``."""
        self.out_scale = self.out_scale * factor
        if self.bias_shift is not None:
            self.bias_shift = self.bias_shift * factor

    def scale_inputs(self, factor: np.ndarray) -> None:
        """Multiply the weights reading input channel i by ``factor[i]``."""
        self.in_scale = self.in_scale * factor

    def shift_outputs(self, delta: np.ndarray) -> None:
        """Add ``delta[i]`` to output channel i (a bias is created when the node has none)."""
        self.bias_shift = delta.copy() if self.bias_shift is None else self.bias_shift + delta

    def input_response(self, value: np.ndarray) -> np.ndarray:
        """What a constant ``value[i]`` on every position of input channel i adds to each output
        channel: ``sum_{i, kernel} W[o, i, kernel] · value[i]`` (over o's group for a grouped Conv)."""
        grouped = self._grouped(self._scaled_weight())
        per_group = value.astype(self.work_dtype).reshape(self.group, grouped.shape[2])
        return self.alpha * np.einsum("gojk,gj->go", grouped, per_group).reshape(-1).astype(np.float64)

    # ------------------------------------------------------------------ writing back
    @property
    def rescaled(self) -> bool:
        return bool(np.any(self.out_scale != 1) or np.any(self.in_scale != 1))

    def _scaled_weight(self) -> np.ndarray:
        """The weight with both scales applied, in ``work_dtype`` and the node's layout."""
        weight = self.weight.astype(self.work_dtype, copy=False)
        if not self.rescaled:
            return weight
        grouped = self._grouped(weight)
        in_scale = self.in_scale.reshape(self.group, 1, -1)
        factor = (self.out_scale.reshape(self.group, -1, 1) * in_scale).astype(self.work_dtype)
        scaled = grouped * factor[..., None]
        if self.op == "Conv":
            return scaled.reshape(self.weight.shape)
        matrix = scaled[0, :, :, 0].T  # (K, N)
        return np.ascontiguousarray(matrix.T if self.trans_b else matrix)

    def _new_bias(self) -> np.ndarray | None:
        """The effective bias after scaling and shifting (None when it does not change)."""
        if self.bias_shift is None and (self.bias is None or not np.any(self.out_scale != 1)):
            return None
        bias = self.bias if self.bias is not None else np.zeros(self.out_channels)
        bias = bias * self.out_scale  # channels are the bias's last axis (see inspect_layer)
        return bias if self.bias_shift is None else bias + self.bias_shift

    def prepared(self) -> "tuple[np.ndarray | None, np.ndarray | None] | str":
        """The new weight and bias in the node's dtype (None where unchanged), or why they do not fit it."""
        weight = self._scaled_weight().astype(self.dtype, copy=False) if self.rescaled else None
        bias = self._new_bias()
        bias = None if bias is None else bias.astype(self.dtype)
        for what, value in (("weight", weight), ("bias", bias)):
            if value is not None and not np.all(np.isfinite(value)):
                return f"{self.name}: the rescaled {what} overflows {self.dtype}"
        return weight, bias

    def commit(self, names: G.NameAllocator, weight: np.ndarray | None, bias: np.ndarray | None) -> None:
        node = self.node
        if weight is not None:
            node.inputs[1] = names.constant(_rescaled_name(node.inputs[1].name), weight)
        if bias is None:
            return
        old = node.inputs[2] if len(node.inputs) > 2 and _present(node.inputs[2]) else None
        hint = _rescaled_name(old.name if old is not None else f"{node.name or node.op}_bias")
        if node.op == "MatMul":
            # MatMul(X, W) + bias == Gemm(X, W, bias) for 2-D X (ONNX Gemm: Y = alpha A B + beta C).
            node.op = "Gemm"
            node.attrs = {}
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0  # ``bias`` is already beta * C
        constant = names.constant(hint, bias)
        if len(node.inputs) > 2:
            node.inputs[2] = constant
        else:
            node.inputs.append(constant)


def _present(tensor: gs.Tensor) -> bool:
    """False for an omitted optional input (empty name)."""
    return not (isinstance(tensor, gs.Variable) and tensor.name == "" and not tensor.inputs)


def _rescaled_name(name: str) -> str:
    """``w`` → ``w_rescaled``, and not ``w_rescaled_rescaled`` on the next run."""
    return name.removesuffix("_rescaled") + "_rescaled"


def inspect_layer(node: gs.Node) -> "LinearLayer | str":
    """``node`` as a :class:`LinearLayer`, or why its weights cannot be rescaled."""
    where = f"{node.op} '{node.name}'"
    if len(node.inputs) < 2 or len(node.outputs) != 1:
        return f"{where} has an unexpected signature"
    weight = G.constant_value(node.inputs[1])
    if weight is None:
        return f"{where} weight '{node.inputs[1].name}' is not constant"
    if weight.dtype not in FLOAT_DTYPES:
        return f"{where} weight dtype {weight.dtype} is not float16/32/64"
    if weight.size == 0:
        return f"{where} weight is empty"
    if node.op == "Conv":
        group = int(G.attr(node, "group", 1))
        if weight.ndim < 3 or group < 1 or weight.shape[0] % group:
            return f"{where} weight shape {weight.shape} does not fit group={group}"
        channels = weight.shape[0]
    else:
        if weight.ndim != 2:
            return f"{where} weight is not 2-D"
        trans_b = node.op == "Gemm" and int(G.attr(node, "transB", 0))
        channels = weight.shape[0] if trans_b else weight.shape[1]
    bias = None
    if node.op != "MatMul" and len(node.inputs) > 2 and _present(node.inputs[2]):
        value = G.constant_value(node.inputs[2])
        if value is None:
            return f"{where} bias '{node.inputs[2].name}' is not constant"
        bias = value.astype(np.float64)
        if node.op == "Gemm":
            bias = bias * float(G.attr(node, "beta", 1.0))
            # C broadcasts to (M, N) (ONNX Gemm): give it its own column axis so it scales per channel.
            if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, channels)):
                return f"{where} C of shape {bias.shape} does not broadcast to {channels} columns"
            bias = np.broadcast_to(bias, bias.shape[:-1] + (channels,) if bias.ndim else (channels,)).copy()
        elif bias.shape != (channels,):
            return f"{where} bias of shape {bias.shape} does not match {channels} output channels"
    return LinearLayer(node, weight, bias)


# =========================================================================== pairs
@dataclass
class LayerPair:
    """``first → [activation] → second``; ``log_scale`` accumulates CLE's log s per channel."""

    first: LinearLayer
    activation: gs.Node | None
    second: LinearLayer
    log_scale: np.ndarray = field(init=False)

    def __post_init__(self):
        self.log_scale = np.zeros(self.first.out_channels)

    @property
    def intermediate(self) -> gs.Tensor:
        """layer1's output (pre-activation)."""
        return self.first.node.outputs[0]


class PairFinder:
    """Finds the pairs of one run, sharing one :class:`LinearLayer` per node across pairs."""

    def __init__(self, run: FusionRun, activations: tuple[str, ...], *, direct: bool, reason_without: str):
        self.run = run
        self.activations = activations
        self.direct = direct  # may layer2 read layer1's output with no activation between?
        self.reason_without = reason_without  # why another op between is not allowed
        self.layers: dict[int, LinearLayer | str] = {}
        self.rejected: list[NoMatch] = []

    def layer(self, node: gs.Node) -> "LinearLayer | str":
        if id(node) not in self.layers:
            self.layers[id(node)] = inspect_layer(node)
        return self.layers[id(node)]

    def find(self, graphs) -> list[LayerPair]:
        pairs = []
        for g in graphs:
            for node in list(g.nodes):
                if node.op not in LAYER_OPS or not G.is_default_domain(node) or len(node.outputs) != 1:
                    continue
                found = self._pair_from(node)
                if isinstance(found, NoMatch):
                    self.rejected.append(found)
                elif found is not None:
                    pairs.append(found)
        return pairs

    @staticmethod
    def _leads_to_layer(reader: gs.Node) -> bool:
        if reader.op in LAYER_OPS:
            return True
        return len(reader.outputs) == 1 and any(n.op in LAYER_OPS for n in G.consumers(reader.outputs[0]))

    def _path(self, node: gs.Node) -> "tuple[gs.Node | None, gs.Node] | NoMatch | None":
        """(activation, layer2) after ``node``; None when no layer follows at all."""
        y = node.outputs[0]
        readers = G.consumers(y)
        if not any(G.is_default_domain(r) and self._leads_to_layer(r) for r in readers):
            return None  # not a candidate (the output goes to an Add, a head, ...)
        if len(readers) != 1:
            return NoMatch(node, f"output '{y.name}' has {len(readers)} consumers; it must feed only the next layer")
        if id(y) in self.run.output_ids:
            return NoMatch(node, f"output '{y.name}' is a graph output")
        reader = readers[0]
        if reader.op in LAYER_OPS:
            if not self.direct:
                return NoMatch(node, f"{reader.op} '{reader.name}' reads the output directly; {self.reason_without}")
            return None, reader
        where = f"{reader.op} '{reader.name}'"
        if reader.op not in self.activations or not G.is_default_domain(reader):
            return NoMatch(node, f"{where} between the layers: {self.reason_without}")
        if reader.inputs[0] is not y or any(t is y for t in reader.inputs[1:]):
            return NoMatch(node, f"{where} reads '{y.name}' as other than its data input")
        z = reader.outputs[0]
        second_readers = G.consumers(z)
        if len(second_readers) != 1:
            return NoMatch(node, f"{where} output '{z.name}' has {len(second_readers)} consumers; "
                                 "it must feed only the next layer")
        if id(z) in self.run.output_ids:
            return NoMatch(node, f"{where} output '{z.name}' is a graph output")
        second = second_readers[0]
        if second.op not in LAYER_OPS:
            return NoMatch(node, f"{where} feeds {second.op} '{second.name}', not a Conv/Gemm/MatMul")
        return reader, second

    def _pair_from(self, node: gs.Node) -> "LayerPair | NoMatch | None":
        path = self._path(node)
        if path is None or isinstance(path, NoMatch):
            return path
        activation, second = path
        x = (activation or node).outputs[0]
        if not G.is_default_domain(second):
            return None
        if second.inputs[0] is not x or any(t is x for t in second.inputs[1:]):
            return NoMatch(node, f"{second.op} '{second.name}' reads '{x.name}' as other than its data input")
        first_layer, second_layer = self.layer(node), self.layer(second)
        for layer in (first_layer, second_layer):
            if isinstance(layer, str):
                return NoMatch(node, layer)
        if (first_layer.op == "Conv") != (second_layer.op == "Conv"):
            return NoMatch(node, f"{second_layer.name} reads channels on another axis than {first_layer.name} writes them")
        if second_layer.op == "Gemm" and int(G.attr(second, "transA", 0)):
            return NoMatch(node, f"{second_layer.name} has transA=1: its input channels are axis 0")
        if first_layer.out_channels != second_layer.in_channels:
            return NoMatch(node, f"{first_layer.out_channels} output channels vs {second_layer.in_channels} "
                                 f"input channels of {second_layer.name}")
        return LayerPair(first_layer, activation, second_layer)


def _notes(rejected: list[NoMatch], limit: int, what: str) -> list[str]:
    notes = [r.describe() for r in rejected[:limit]]
    if len(rejected) > limit:
        notes.append(f"... and {len(rejected) - limit} more pairs not {what}")
    return notes


def _chains(pairs: list[LayerPair]) -> list[list[LayerPair]]:
    """Pairs grouped into chains that share layers (conv → dw → conv is one chain of two pairs)."""
    parent: dict[int, int] = {}

    def root(key: int) -> int:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for p in pairs:
        parent[root(id(p.first))] = root(id(p.second))
    chains: dict[int, list[LayerPair]] = {}
    for p in pairs:
        chains.setdefault(root(id(p.first)), []).append(p)
    return list(chains.values())


def _commit_layers(layers: list[LinearLayer], names: G.NameAllocator) -> str | None:
    """Write every layer back, or none of them (returning why) when a value overflows its dtype."""
    prepared = [layer.prepared() for layer in layers]
    for problem in prepared:
        if isinstance(problem, str):
            return problem
    for layer, (weight, bias) in zip(layers, prepared):
        layer.commit(names, weight, bias)
    return None


def _unique_layers(pairs: list[LayerPair]) -> list[LinearLayer]:
    seen: dict[int, LinearLayer] = {}
    for p in pairs:
        for layer in (p.first, p.second):
            seen.setdefault(id(layer), layer)
    return list(seen.values())


# =========================================================================== equalize-cross-layer
def equalizing_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """``s_i = sqrt(r1_i / r2_i)`` (Nagel et al. 2019, eq. 10); 1 where a channel is all zero or not finite."""
    ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
    scales = np.ones_like(r1)
    scales[ok] = np.sqrt(r1[ok] / r2[ok])
    return scales


@dataclass
class EqualizeOptions:
    # At most this many sweeps over all pairs (each sweep equalizes every pair once, in graph order).
    iterations: int = 20
    # Converged when a sweep moves no channel by more than this in |log s| (1e-3: 0.1 %); a run
    # whose accumulated scales all stay below it leaves the graph untouched (changed=False).
    tolerance: float = 1e-3
    # At most this many notes on pairs that were skipped.
    max_notes: int = 20


@register_pass
class EqualizeCrossLayer(Pass):
    name = "equalize-cross-layer"
    summary = ("Cross-layer equalization (Nagel et al. 2019): rescale channels of consecutive Conv/Gemm/MatMul "
               "through Relu/LeakyRelu/PRelu so both weight ranges match, before per-tensor quantization.")
    lossless = True
    Options = EqualizeOptions

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        opts = self.options
        if int(opts.iterations) < 1:
            raise UserInputError(f"equalize-cross-layer: iterations={opts.iterations} is below 1.", "use iterations=1 or more.")
        if not float(opts.tolerance) > 0:
            raise UserInputError(f"equalize-cross-layer: tolerance={opts.tolerance} is not positive.", "use e.g. tolerance=0.001.")
        run = FusionRun(graph)
        finder = PairFinder(run, HOMOGENEOUS_ACTIVATIONS, direct=True,
                            reason_without="only Relu, LeakyRelu or PRelu (f(s·x) = s·f(x)) let channel scales through")
        pairs = finder.find(G.iter_graphs(graph))
        counters: Counter = Counter()
        notes = _notes(finder.rejected, max(0, int(opts.max_notes)), "equalized")
        if finder.rejected:
            counters["pairs_rejected"] = len(finder.rejected)
        if not pairs:
            return PassResult(changed=False, counters=dict(counters), notes=notes)
        tolerance = float(opts.tolerance)
        sweeps, worst = 0, math.inf
        while sweeps < int(opts.iterations) and worst >= tolerance:
            sweeps += 1
            worst = 0.0
            for pair in pairs:
                scales = equalizing_scales(pair.first.output_ranges(), pair.second.input_ranges())
                pair.first.scale_outputs(1.0 / scales)
                pair.second.scale_inputs(scales)
                log_scales = np.log(scales)
                pair.log_scale += log_scales
                worst = max(worst, float(np.abs(log_scales).max(initial=0.0)))
        counters["sweeps"] = sweeps
        if worst >= tolerance:
            notes.append(f"not converged after {sweeps} sweeps (last max |log s| = {worst:.3g}); "
                         "raise 'iterations' or 'tolerance'")
        changed = False
        for chain in _chains(pairs):
            if max(float(np.abs(p.log_scale).max(initial=0.0)) for p in chain) < tolerance:
                continue  # already equalized: leave the weights as they are
            problem = _commit_layers(_unique_layers(chain), run.names)
            if problem:
                notes.append(f"chain left as it was: {problem}")
                continue
            changed = True
            counters["pairs_equalized"] += len(chain)
        return PassResult(changed=changed, counters=dict(counters), notes=notes)


# =========================================================================== absorb-bias
def absorbable_shift(mean: np.ndarray, std: np.ndarray, minimum: np.ndarray, sigmas: float) -> np.ndarray:
    """``c_i = max(0, min(mean_i - sigmas·std_i, min_i))``: a value channel i stays at or above on
    all the calibration data (Nagel et al. 2019 §4.2 use mean − 3σ of a Gaussian model; the observed
    minimum caps it so the shift is exact on the data seen). 0 for channels that reach 0 or below."""
    shift = np.minimum(np.asarray(mean, np.float64) - sigmas * np.asarray(std, np.float64),
                       np.asarray(minimum, np.float64))
    shift = np.where(np.isfinite(shift), shift, 0.0)
    return np.maximum(shift, 0.0)


@dataclass
class AbsorbOptions:
    # c_i = mean_i - sigmas * std_i of layer1's pre-activation output, capped at its observed minimum.
    sigmas: float = 3.0
    # Skip a pair whose statistics rest on fewer values per channel (batch x spatial positions x
    # feeds): a mean and std from a handful of samples put c where fresh data often falls below it.
    min_values: int = 64
    # Collect statistics on at most this many calibration feeds (0: all of them).
    max_feeds: int = 0
    # Also absorb into a layer2 Conv that zero-pads its input. Exact away from the borders only
    # (the padding now stands for relu(x) - c instead of relu(x)), and the border error spreads
    # inward through every later layer: off by default.
    padded: bool = False
    # At most this many notes on pairs that were skipped.
    max_notes: int = 20


def _padding_problem(layer: LinearLayer) -> str | None:
    """Why ``layer`` reads zero padding (None when it does not)."""
    if layer.op != "Conv":
        return None
    auto_pad = G.attr(layer.node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID"):
        return f"{layer.name} pads its input (auto_pad={auto_pad}); absorb into padded convs with padded=true"
    pads = [int(p) for p in G.attr(layer.node, "pads", ())]
    if any(pads):
        return f"{layer.name} pads its input (pads {pads}); absorb into padded convs with padded=true"
    return None


def _bias_problem(run: FusionRun, layer: LinearLayer) -> str | None:
    """Why ``layer`` cannot take a per-channel bias (a MatMul becomes a Gemm for it)."""
    if layer.op == "Conv":
        return None
    if run.root.opset is not None and run.root.opset < 7:
        return f"{layer.name}: Gemm before opset 7 broadcasts C only with its legacy broadcast attribute"
    if layer.op == "MatMul":
        rank = run.rank(layer.node.inputs[0])
        if rank != 2:
            why = "unknown" if rank is None else f"{rank}-D"
            return f"{layer.name}: input rank is {why}; a bias needs Gemm, which takes 2-D input"
    return None


@register_pass
class AbsorbBias(Pass):
    name = "absorb-bias"
    summary = ("High-bias absorption (Nagel et al. 2019): move the part of a Relu input that is always positive "
               "on the calibration data into the next Conv/Gemm/MatMul's bias, shrinking activation ranges.")
    lossless = False
    Options = AbsorbOptions

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        opts = self._checked_options()
        run = FusionRun(graph)
        finder = PairFinder(run, ("Relu",), direct=False,
                            reason_without="bias absorption needs a Relu between (relu(x - c) = relu(x) - c for x >= c)")
        pairs = []
        # Statistics come from running the main graph; subgraph tensors cannot be captured.
        for pair in finder.find([graph]):
            problem = (_bias_problem(run, pair.first) or _bias_problem(run, pair.second)
                       or (None if opts.padded else _padding_problem(pair.second)))
            if problem:
                finder.rejected.append(NoMatch(pair.first.node, problem))
            else:
                pairs.append(pair)
        counters: Counter = Counter()
        notes: list[str] = []
        absorbed: list[LayerPair] = []
        if pairs:
            calibration = ctx.calibration_data()
            if calibration.is_random:
                notes.append(f"statistics come from {calibration.source}; real calibration data (--calib) "
                             "decides what is always positive")
            stats = self._statistics(graph, ctx, calibration, [p.intermediate.name for p in pairs])
            for pair in pairs:
                shift = self._shift(pair, stats.get(pair.intermediate.name), finder.rejected)
                if shift is None:
                    continue
                if not np.any(shift > 0):
                    counters["pairs_without_positive_channels"] += 1
                    continue
                pair.first.shift_outputs(-shift)
                pair.second.shift_outputs(pair.second.input_response(shift))
                counters["channels_absorbed"] += int(np.count_nonzero(shift))
                absorbed.append(pair)
        if absorbed:
            problem = _commit_layers([layer for layer in _unique_layers(absorbed)], run.names)
            if problem:
                notes.append(f"nothing absorbed: {problem}")
                absorbed = []
                del counters["channels_absorbed"]
            else:
                counters["pairs_absorbed"] = len(absorbed)
        if finder.rejected:
            counters["pairs_rejected"] = len(finder.rejected)
        notes = _notes(finder.rejected, max(0, int(opts.max_notes)), "absorbed") + notes
        return PassResult(changed=bool(absorbed), counters=dict(counters), notes=notes)

    def _checked_options(self) -> AbsorbOptions:
        opts = self.options
        if not float(opts.sigmas) >= 0:
            raise UserInputError(f"absorb-bias: sigmas={opts.sigmas} is negative.", "use e.g. sigmas=3.")
        if int(opts.max_feeds) < 0:
            raise UserInputError(f"absorb-bias: max_feeds={opts.max_feeds} is negative.", "use 0 (all feeds) or more.")
        if int(opts.min_values) < 1:
            raise UserInputError(f"absorb-bias: min_values={opts.min_values} is below 1.", "use e.g. min_values=64.")
        return opts

    def _shift(self, pair: LayerPair, stats, rejected: list[NoMatch]) -> np.ndarray | None:
        """The per-channel shift c to absorb, or None (with the reason in ``rejected``)."""
        name, node = pair.intermediate.name, pair.first.node
        if stats is None:
            rejected.append(NoMatch(node, f"no calibration statistics for '{name}'"))
            return None
        if stats.channels != pair.first.out_channels:
            rejected.append(NoMatch(node, f"statistics of '{name}' have {stats.channels} channels, "
                                          f"expected {pair.first.out_channels}"))
            return None
        if stats.count < int(self.options.min_values):
            rejected.append(NoMatch(node, f"only {stats.count} calibration values per channel of '{name}' "
                                          f"(min_values={self.options.min_values}); give more calibration data"))
            return None
        return absorbable_shift(stats.mean, np.sqrt(stats.variance), stats.min, float(self.options.sigmas))

    def _statistics(self, graph: gs.Graph, ctx, calibration, names: list[str]) -> dict:
        """Per-channel ChannelStats (axis 1) of each named tensor over the calibration data."""
        from onnxopt.activations import collect_channel_stats

        limit = int(self.options.max_feeds) or None
        feeds = (lambda: calibration.feeds(limit)) if limit else calibration
        model = G.export_model(graph, ctx.template)
        return collect_channel_stats(model, names, feeds, axis=1, progress=ctx.progress)
