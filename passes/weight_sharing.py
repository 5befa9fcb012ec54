"""weight-share: k-means weight sharing with storage that really shrinks the file (lossy).

Deep Compression (Han et al. 2016, §3): the constant weight of every Conv, ConvTranspose,
Gemm and MatMul is clustered into 2^bits shared values (1-D k-means, linear initialisation)
and stored as b-bit indices + the codebook. The math lives in onnxopt/weight_share_math.py.

Granularity (``granularity=``), along the output channel axis (Conv 0, ConvTranspose 1,
Gemm/MatMul the output column or row):

* ``layer``: one codebook for the weight. Exact when 2^bits ≥ its distinct values; loses badly
  on folded BatchNorms (channel scales spread over decades: the small channels round to ~0).
* ``channel``: one codebook per output channel (2^bits values each). Exact like ``layer``.
* ``scaled``: each output channel divided by its max |w| (measured on PP-OCRv5 det and MTCNN
  O-Net after BN folding: 6-bit weight error 3× below root-mean-square scales), one codebook
  for all the normalised values, clustered with importance × scale² (the real weight error);
  stored as indices + one codebook + one scale per channel. Not exact even with few values.
* ``auto`` (default): ``channel`` where its codebooks add at most CHANNEL_CODEBOOK_SHARE to
  the indices' bytes, else ``scaled``; plain ``layer`` only when one codebook holds every
  distinct value (exact, and the smallest). The bits search offers the same layouts.

Storage (``storage=``):

* ``codebook`` (default), valid for any runtime: indices → ``Cast(int32)`` (Gather refuses
  uint8 indices) → [``Add`` per-channel offsets] → ``Gather`` over the flat codebook in the
  weight's dtype [→ ``Mul`` by the channel scales, ``scaled``]. onnxruntime constant-folds the
  chain when it loads the model, so inference runs on plain float weights (measured 1.0×
  latency; tests check that the optimized session holds no Gather, BitShift or Mul). Indices take ``bits`` bits each: at opset ≥ 11 a little-endian bit stream
  of uint8 bytes (weight_share_math.pack_bits) unpacked by Cast(uint32) → Gather → BitShift
  (opset 11) → Add → Reshape, so 6 bits really cost 6 bits; 4 bits at opset ≥ 21 are a real
  UINT4 initializer (same layout; Cast from uint4 arrived in opset 21); 8 bits, and every
  width below opset 11, one uint8 per index. All tensors are written raw (no varints).
* ``dequantize``: a *linear grid* (uniform levels, not k-means centroids), int8 or, for ≤ 4 bits
  at opset ≥ 21, int4 values with DequantizeLinear, per channel (opset ≥ 13) or per tensor
  (opset 10-12). For runtimes that want QDQ weights. onnxruntime keeps DequantizeLinear of
  weights as a node (it reserves DQ for its QDQ fusions), so the weights are dequantized on
  every run (measured 1.2× on a 256×256×3×3 Conv). A per-channel grid is already scaled per
  channel, so ``scaled`` and ``auto`` mean per channel here (per tensor below opset 13).

The model's opset is never raised: weight sharing leaves every other node as it is, and the
bit-packed stream needs only opset 11.

Bits: ``bits=N`` for every layer. Otherwise a search per layer within ``--tolerance`` (else
the ``accuracy`` budget): each weight is tried at every ``ladder`` bit width; its error is
the (importance-weighted) relative weight distortion, and its effect on the model is measured
once (the model with only that weight shared at a middle bit width, rel_l2 on the calibration
feeds; output error energy ≈ sensitivity × distortion for small errors). Bytes saved per unit
of predicted error orders the moves (passes/lowrank_search.greedy_moves), and the longest
prefix of moves whose whole model meets the tolerance wins (binary search). With
``accuracy=none`` and no tolerance: ``conv_bits`` for Conv/ConvTranspose, ``matrix_bits``
for Gemm/MatMul.

Data-aware centroids (``data_aware=true``): each weight's squared error counts by the mean
square activation of its input channel on the calibration data (Hessian-weighted k-means,
Choi et al. 2017), so the codebook is spent where the layer's output is sensitive.

Skipped with a note: weights also read by a node that is not one of these layers or as a
graph output, weights under ``min_size`` elements, non-float weights, weights that are not
constants (e.g. already quantized: produced by DequantizeLinear). A weight read by several
layers is shared once and expanded once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt import graph as G
from onnxopt import weight_share_math as M
from onnxopt.errors import UserInputError
from onnxopt.io import iter_proto_graphs
from onnxopt.pass_base import Pass, PassResult
from onnxopt.registry import register_pass
from onnxopt.tolerance import ToleranceCheck, default_budget, describe

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))

# Opsets of the ops each storage form writes (ONNX operator changelog).
CODEBOOK_OPSET = 7  # Cast-6 (integer `to`), Add-7 (broadcasting), Gather-1
PACKED_OPSET = 11  # BitShift-11 unpacks bit-packed indices
UINT4_OPSET = 21  # UINT4/INT4 tensors in Cast and DequantizeLinear
DQ_OPSET = 10  # DequantizeLinear, per tensor
DQ_AXIS_OPSET = 13  # DequantizeLinear's `axis` (per channel)
INT4_IR_VERSION = 10  # IR version that introduced INT4/UINT4

# Per-channel codebooks unless they add more than this share to the indices' bytes (auto).
CHANNEL_CODEBOOK_SHARE = 0.25
LAYOUTS = ("layer", "channel", "scaled")  # one codebook; one per output channel; one + channel scales
# Channel statistic of ``scaled``: max |w| clustered 2-3× closer than RMS on folded real models.
CHANNEL_SCALE = "max"
# An input channel's importance never falls below this share of the mean: a channel the
# calibration data leaves silent may not be silent on other inputs.
IMPORTANCE_FLOOR = 0.01


# ---------------------------------------------------------------------- weights and their readers
@dataclass
class Use:
    """A layer reading the weight: where its output and input channels are in the weight."""

    node: gs.Node
    out_axis: int
    in_axis: int
    groups: int  # Conv groups (the importance map needs them)
    input_axis: int  # channel axis of the layer's input activation

    @property
    def kind(self) -> str:
        return "conv" if self.node.op in ("Conv", "ConvTranspose") else "matrix"


def _use_of(node: gs.Node, weight: np.ndarray) -> tuple[Use | None, str]:
    rank = weight.ndim
    if node.op == "Conv":
        if rank < 3:
            return None, f"Conv weight of rank {rank}"
        return Use(node, 0, 1, int(G.attr(node, "group", 1)), 1), ""
    if node.op == "ConvTranspose":
        if rank < 3:
            return None, f"ConvTranspose weight of rank {rank}"
        # Weight (C_in, C_out/group, k...): axis 0 indexes every input channel directly.
        return Use(node, 1, 0, 1, 1), ""
    if node.op == "Gemm":
        if rank != 2:
            return None, f"Gemm weight of rank {rank}"
        trans_b = int(G.attr(node, "transB", 0))
        input_axis = 0 if int(G.attr(node, "transA", 0)) else 1
        return (Use(node, 0, 1, 1, input_axis) if trans_b else Use(node, 1, 0, 1, input_axis)), ""
    if rank < 2:
        return None, "MatMul weight of rank 1"
    return Use(node, rank - 1, rank - 2, 1, -1), ""  # (..., in, out)


@dataclass
class Candidate:
    """One constant weight to share, with every layer that reads it."""

    tensor: gs.Constant
    weight: np.ndarray
    uses: list[Use]
    importance: np.ndarray | None = None
    _distributions: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def kind(self) -> str:
        return "conv" if any(u.kind == "conv" for u in self.uses) else "matrix"

    @property
    def out_axis(self) -> int:
        return self.uses[0].out_axis

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes)

    def distribution(self, layout: str):
        """The prepared weight of ``layout`` (WeightDistribution or ScaledDistribution), cached."""
        if layout not in self._distributions:
            if layout == "scaled":
                prepared = M.ScaledDistribution(self.weight, self.out_axis, self.importance, CHANNEL_SCALE)
            else:
                prepared = M.WeightDistribution(self.weight, self.axis(layout), self.importance)
            self._distributions[layout] = prepared
        return self._distributions[layout]

    def axis(self, layout: str) -> int | None:
        """The weight axis with one codebook (or scale) per index; None: one for the tensor."""
        return None if layout == "layer" else self.out_axis

    def exact_in_one_codebook(self, bits: int) -> bool:
        """Whether the weight has at most 2^bits distinct values (a per-layer codebook is then
        exact). A sample rules most weights out before the full count."""
        if "distinct" not in self._distributions:
            sample = np.unique(self.weight.reshape(-1)[:4096])
            count = sample.size if sample.size > 1 << M.MAX_BITS else np.unique(self.weight).size
            self._distributions["distinct"] = count
        return self._distributions["distinct"] <= 1 << bits


@dataclass
class Storage:
    """How the chosen storage form is written at this model's opset."""

    form: str  # codebook | dequantize
    opset: int
    granularity: str
    symmetric: bool

    def index_bytes(self, count: int, bits: int) -> int:
        """Bytes of the stored integers: codebook indices packed at ``bits`` each (opset ≥ 11),
        grid values in int4 (≤ 4 bits, opset ≥ 21) or int8."""
        if self.form == "codebook":
            return M.index_bytes(count, bits, self.opset >= PACKED_OPSET)
        return M.index_bytes(count, 4, True) if bits <= 4 and self.opset >= UINT4_OPSET else count

    def layouts(self, cand: Candidate, bits: int) -> list[str]:
        """The layouts (LAYOUTS) allowed at ``bits``. ``auto``: channel and scaled, and layer
        when one codebook holds every distinct value (exact and the smallest)."""
        if self.form == "dequantize":  # a per-channel grid is scaled per channel already
            return ["layer" if self.granularity == "layer" or self.opset < DQ_AXIS_OPSET else "channel"]
        if self.granularity != "auto":
            return [self.granularity]
        return ["channel", "scaled"] + (["layer"] if cand.exact_in_one_codebook(bits) else [])

    def layout(self, cand: Candidate, bits: int) -> str:
        """The layout without a search (auto: exact layer, else per channel unless the channels'
        codebooks would add more than CHANNEL_CODEBOOK_SHARE to the indices' bytes, else scaled)."""
        allowed = self.layouts(cand, bits)
        if len(allowed) == 1:
            return allowed[0]
        if "layer" in allowed:
            return "layer"
        rows = cand.weight.shape[cand.out_axis]
        books = rows * (1 << bits) * cand.weight.dtype.itemsize
        indices = self.index_bytes(cand.weight.size, bits)
        return "channel" if books <= CHANNEL_CODEBOOK_SHARE * indices else "scaled"

    def nbytes(self, cand: Candidate, bits: int, layout: str) -> int:
        """Stored bytes of the shared weight (indices, codebooks or scales, offsets)."""
        rows = 1 if layout == "layer" else cand.weight.shape[cand.out_axis]
        itemsize = cand.weight.dtype.itemsize
        total = self.index_bytes(cand.weight.size, bits)
        if self.form == "dequantize":
            return total + rows * 5  # float32 scale + 8-bit zero point
        if layout == "channel":
            return total + rows * (1 << bits) * itemsize + 4 * rows  # codebooks + int32 offsets
        return total + (1 << bits) * itemsize + (rows * itemsize if layout == "scaled" else 0)

    def approximate(self, cand: Candidate, bits: int, layout: str):
        """(SharedWeight | ScaledWeight | GridWeight, the weight it encodes in the weight's dtype)."""
        if self.form == "codebook":
            shared = cand.distribution(layout).share(bits)
            return shared, shared.expand()
        grid = M.linear_grid(cand.weight, bits, cand.axis(layout), self.symmetric)
        return grid, grid.expand().astype(cand.weight.dtype)

    def error(self, cand: Candidate, bits: int, layout: str) -> float:
        """Importance-weighted relative distortion of the weight at ``bits``."""
        if self.form == "codebook":
            distribution = cand.distribution(layout)
            return distribution.distortion(distribution.centroids(bits))
        return M.weighted_error(cand.weight, self.approximate(cand, bits, layout)[1], cand.importance)


# ---------------------------------------------------------------------- the pass
@register_pass
class WeightShare(Pass):
    name = "weight-share"
    summary = ("Share each Conv/ConvTranspose/Gemm/MatMul weight's values: 2^bits k-means centroids per layer, "
               "per channel or over scaled channels (Deep Compression), stored as packed indices + codebook; bits "
               "searched within the tolerance.")
    lossless = False
    run_once = True

    @dataclass
    class Options:
        bits: int = 0  # 1-8 for every layer; 0: searched within the budget (or conv_bits / matrix_bits)
        conv_bits: int = 8  # Conv / ConvTranspose when nothing is searched (accuracy=none)
        matrix_bits: int = 4  # Gemm / MatMul when nothing is searched
        ladder: list[int] = field(default_factory=lambda: [8, 7, 6, 5, 4, 3])  # bit widths the search tries
        granularity: Literal["auto", "channel", "scaled", "layer"] = "auto"  # see the module docstring
        storage: Literal["codebook", "dequantize"] = "codebook"
        symmetric: bool = True  # storage=dequantize: symmetric grid (zero point 0) or min/max
        data_aware: bool = True  # weight the clustering by the input channels' activation energy
        min_size: int = 4096  # weights with fewer elements are left as they are
        exclude: list[str] = field(default_factory=list)  # node names, op types or weight names kept
        samples: int = 16  # calibration feeds for the energies and the search
        accuracy: str = "cosine=0.99+top1=0.99"  # the search's budget without --tolerance ("none": no search)

    # ------------------------------------------------------------------ run
    def run(self, graph: gs.Graph, ctx) -> PassResult:
        opt = self.options
        self._check_options()
        notes: list[str] = []
        opset = int(graph.opset)
        storage = Storage(opt.storage, opset, opt.granularity, opt.symmetric)
        low_opset = CODEBOOK_OPSET if opt.storage == "codebook" else DQ_OPSET
        if opset < low_opset:
            return PassResult(False, notes=[f"opset {opset}: storage={opt.storage} needs opset ≥ {low_opset}; "
                                            "nothing shared (run upgrade-opset first)"])
        notes.extend(_opset_notes(storage))
        candidates = find_candidates(graph, opt, notes)
        if not candidates:
            return PassResult(False, notes=notes + ["no weight to share"])

        tolerance = dict(ctx.tolerance) or default_budget(opt.accuracy)
        searching = not opt.bits and bool(tolerance)
        feeds = None
        if opt.data_aware or searching:
            data = ctx.calibration_data()
            feeds = list(data.feeds(limit=max(1, opt.samples)))
            if opt.data_aware and data.is_random:
                notes.append("data-aware: activation energies from random data (pass --calib for real data)")
        attach_importance(graph, ctx, candidates, feeds if opt.data_aware else None, notes)

        if searching:
            chosen = search_bits(graph, ctx, candidates, storage, feeds, tolerance, opt, notes)
        else:
            chosen = {}
            for c in candidates:
                bits = opt.bits or (opt.conv_bits if c.kind == "conv" else opt.matrix_bits)
                chosen[c.name] = (bits, storage.layout(c, bits))
        if not chosen:
            return PassResult(False, notes=notes + ["no weight was shared"])

        names = G.NameAllocator(graph)
        before = after = params = layers = shared = 0
        for cand in candidates:
            if cand.name not in chosen:
                continue
            bits, layout = chosen[cand.name]
            if storage.nbytes(cand, bits, layout) >= cand.nbytes:
                notes.append(f"{cand.name}: {bits}-bit storage would not be smaller than the weight; left as it is")
                continue
            encoded, approx = storage.approximate(cand, bits, layout)
            expanded = emit(graph, names, cand, encoded, storage)
            G.replace_uses(cand.tensor, expanded)
            stored = storage.nbytes(cand, bits, layout)
            before, after = before + cand.nbytes, after + stored
            params += cand.weight.size
            layers += len(cand.uses)
            shared += 1
            rows = cand.weight.shape[cand.out_axis]
            where = {"layer": "per layer", "channel": f"per channel ({rows} rows)",
                     "scaled": f"one codebook × {rows} channel scales"}[layout]
            notes.append(f"{cand.name}: {bits} bits {where}, {_kib(cand.nbytes)} → {_kib(stored)}, weighted error "
                         f"{M.weighted_error(cand.weight, approx, cand.importance):.3g}")
        if not layers:
            return PassResult(False, notes=notes)
        if opset >= UINT4_OPSET and graph.ir_version is not None and graph.ir_version < INT4_IR_VERSION:
            graph.ir_version = INT4_IR_VERSION  # INT4/UINT4 tensors need IR 10 (opset 21 does too)
        counters = {"weights_shared": float(shared), "layers_shared": float(layers),
                    "params_shared": float(params), "weight_bytes_before": float(before),
                    "weight_bytes_after": float(after), "weight_bytes_saved": float(before - after)}
        return PassResult(True, counters, notes)

    def _check_options(self) -> None:
        opt = self.options
        if opt.bits:
            M.check_bits(opt.bits, 2 if opt.storage == "dequantize" else 1, "weight-share bits")
        low = 2 if opt.storage == "dequantize" else 1
        M.check_bits(opt.conv_bits, low, "weight-share conv_bits")
        M.check_bits(opt.matrix_bits, low, "weight-share matrix_bits")
        if not opt.ladder:
            raise UserInputError("weight-share ladder is empty.", "give bit widths joined by '+', e.g. ladder=8+6+4.")
        for b in opt.ladder:
            M.check_bits(b, low, "weight-share ladder entry")
        if opt.min_size < 0:
            raise UserInputError(f"weight-share min_size={opt.min_size} is negative.", "give 0 or more elements.")
        if opt.samples < 1:
            raise UserInputError(f"weight-share samples={opt.samples} is not positive.", "give at least 1.")


def _opset_notes(storage: Storage) -> list[str]:
    if storage.form == "codebook" and storage.opset < PACKED_OPSET:
        return [f"opset {storage.opset}: indices take a byte each (unpacking bit-packed ones needs BitShift, "
                "opset 11)"]
    if storage.form == "dequantize" and storage.opset < UINT4_OPSET:
        notes = [f"opset {storage.opset}: ≤ 4-bit grids are stored in int8 (int4 DequantizeLinear needs opset 21)"]
        if storage.opset < DQ_AXIS_OPSET:
            notes.append(f"opset {storage.opset}: one scale per tensor (per-channel DequantizeLinear needs opset 13)")
        return notes
    return []


def _kib(nbytes: float) -> str:
    return f"{nbytes / 1024:.1f} KiB"


# ---------------------------------------------------------------------- candidates
def find_candidates(graph: gs.Graph, opt, notes: list[str]) -> list[Candidate]:
    """Constant weights of the layers (every graph), each once, with the reasons others stay."""
    excluded = set(opt.exclude)
    by_tensor: dict[int, Candidate] = {}
    refused: set[int] = set()
    small = 0
    for g in G.iter_graphs(graph):
        for node in g.nodes:
            if node.op not in LAYER_OPS or not G.is_default_domain(node) or len(node.inputs) < 2:
                continue
            tensor = node.inputs[1]
            if not isinstance(tensor, gs.Constant):
                source = G.producer(tensor)
                if source is not None and source.op == "DequantizeLinear":
                    notes.append(f"{node.name}: weight comes from DequantizeLinear (already quantized)")
                continue  # an activation, or computed: nothing to share
            if id(tensor) in refused:
                continue
            if node.name in excluded or node.op in excluded or tensor.name in excluded:
                refused.add(id(tensor))
                by_tensor.pop(id(tensor), None)
                notes.append(f"{tensor.name}: excluded")
                continue
            weight = G.constant_value(tensor)
            if weight is None:
                refused.add(id(tensor))
                continue
            if weight.dtype not in FLOAT_TYPES:
                refused.add(id(tensor))
                notes.append(f"{tensor.name}: {weight.dtype} weight (only float16/32/64 weights are shared)")
                continue
            if weight.size < opt.min_size:
                refused.add(id(tensor))
                small += 1
                continue
            if not np.all(np.isfinite(weight)):
                refused.add(id(tensor))
                notes.append(f"{tensor.name}: holds NaN or infinity")
                continue
            use, reason = _use_of(node, weight)
            if use is None:
                refused.add(id(tensor))
                notes.append(f"{tensor.name}: {reason}")
                continue
            cand = by_tensor.setdefault(id(tensor), Candidate(tensor, weight, []))
            cand.uses.append(use)
    if small:
        notes.append(f"{small} weight(s) under min_size={opt.min_size} elements left as they are")
    kept = []
    for cand in by_tensor.values():
        reason = _other_reader(graph, cand)
        if reason:
            notes.append(f"{cand.name}: {reason}; left as it is")
        else:
            kept.append(cand)
    return kept


def _other_reader(graph: gs.Graph, cand: Candidate) -> str | None:
    """Why the weight has a reader other than its layers' weight inputs (None when it has not)."""
    if G.is_graph_output(graph, cand.tensor):
        return "also a graph output"
    layers = {id(u.node) for u in cand.uses}
    for node in cand.tensor.outputs:
        for index, t in enumerate(node.inputs):
            if t is cand.tensor and not (id(node) in layers and index == 1):
                return f"also read by {node.op} '{node.name}' (input {index}), not as a layer weight"
    return None


# ---------------------------------------------------------------------- importance
def attach_importance(graph: gs.Graph, ctx, candidates: list[Candidate], feeds: list | None,
                      notes: list[str]) -> None:
    """Per-element importance of every candidate's squared error, from its readers:

    * input side (with ``feeds``): the mean square activation E[x_c²] of each input channel c
      on the calibration data (for y = W·x the error ΔW[t, c] moves y_t by ΔW[t, c]·x_c);
    * output side: the gain γ_t / √(σ²_t + ε) of a BatchNormalization that alone reads the
      layer's output scales that output's error (folded models carry it in the weights).

    Each factor is scaled to mean 1 (input energies floored at IMPORTANCE_FLOOR), the factors
    of one reader multiply, and readers of a shared weight add up. No factor: None (uniform).
    """
    energies = _input_energies(graph, ctx, candidates, feeds) if feeds is not None else {}
    blind = 0
    for cand in candidates:
        total = None
        for use in cand.uses:
            part = None
            energy = energies.get((use.node.inputs[0].name, use.input_axis))
            if energy is not None and energy.size == cand.weight.shape[use.in_axis] * use.groups:
                part = M.importance_from_input_energy(cand.weight.shape, energy, use.in_axis, use.out_axis, use.groups)
            elif feeds is not None:
                blind += 1
            gain = _output_gain(use, cand.weight.shape[use.out_axis])
            if gain is not None:
                shape = [1] * cand.weight.ndim
                shape[use.out_axis] = -1
                part = gain.reshape(shape) if part is None else part * gain.reshape(shape)
            if part is not None:
                total = part if total is None else total + part
        cand.importance = total
    if blind:
        notes.append(f"data-aware: {blind} layer(s) without input energies (input not observable in the main "
                     "graph); their weights clustered data-free")


def _input_energies(graph: gs.Graph, ctx, candidates: list[Candidate], feeds: list
                    ) -> dict[tuple[str, int], np.ndarray]:
    """(input tensor, channel axis) → E[x_c²] scaled to mean 1 and floored, for main-graph layers."""
    from onnxopt.activations import ChannelAccumulator, capture

    main = {id(n) for n in graph.nodes}
    wanted: dict[str, dict[int, ChannelAccumulator]] = {}
    for cand in candidates:
        for use in cand.uses:
            if id(use.node) in main:
                by_axis = wanted.setdefault(use.node.inputs[0].name, {})
                by_axis.setdefault(use.input_axis, ChannelAccumulator(use.input_axis))

    def consume(name: str, value: np.ndarray) -> None:
        for accumulator in wanted[name].values():
            accumulator.add(value)

    if wanted:
        capture(G.export_model(graph, ctx.template), list(wanted), feeds, consume, progress=ctx.progress)
    energies = {}
    for name, by_axis in wanted.items():
        for axis, accumulator in by_axis.items():
            stats = accumulator.result()
            mean = float(stats.mean_square.mean()) if stats is not None else 0.0
            if stats is not None and np.isfinite(mean) and mean > 0:
                energies[(name, axis)] = np.maximum(stats.mean_square / mean, IMPORTANCE_FLOOR)
    return energies


def _output_gain(use: Use, channels: int) -> np.ndarray | None:
    """(γ / √(σ² + ε))² per output channel, mean 1, of a BatchNormalization that is the only
    reader of a Conv/ConvTranspose/Gemm output (its channel axis 1 is then the output channel)."""
    if use.node.op == "MatMul" or not use.node.outputs:
        return None
    readers = use.node.outputs[0].outputs
    if len(readers) != 1 or readers[0].op != "BatchNormalization" or len(readers[0].inputs) < 5:
        return None
    bn = readers[0]
    scale, variance = G.constant_value(bn.inputs[1]), G.constant_value(bn.inputs[4])
    if scale is None or variance is None or scale.size != channels or variance.size != channels:
        return None
    gain = np.square(scale.astype(np.float64).reshape(-1)) / (variance.astype(np.float64).reshape(-1)
                                                             + float(G.attr(bn, "epsilon", 1e-5)))
    mean = float(gain.mean())
    return gain / mean if np.isfinite(mean) and mean > 0 else None


# ---------------------------------------------------------------------- the search
def search_bits(graph: gs.Graph, ctx, candidates: list[Candidate], storage: Storage, feeds: list,
                tolerance: dict, opt, notes: list[str]) -> dict[str, tuple[int, str]]:
    """(bits, layout) per weight: the longest greedy prefix of moves (float → ladder[0] → …, each
    layout Storage.layouts allows, most bytes saved per unit of predicted error first) within
    ``tolerance``."""
    from .lowrank_search import Choice, greedy_moves, longest_prefix_within

    ladder = sorted(set(opt.ladder), reverse=True)
    reference = G.export_model(graph, ctx.template)
    check = ToleranceCheck(reference, feeds, tolerance)
    ranking_feeds = max(2, min(len(feeds), 8))
    options: dict[str, list[tuple[int, str, float, int]]] = {}  # (bits, layout, error, bytes)
    sensitivity: dict[str, float] = {}
    for cand in ctx.progress(candidates, "weight-share: error per bit width and sensitivity", len(candidates)):
        options[cand.name] = [(b, layout, storage.error(cand, b, layout), storage.nbytes(cand, b, layout))
                              for b in ladder for layout in storage.layouts(cand, b)]
        # The model's error from this weight alone, measured once at a middle bit width: for
        # small errors the output error energy (rel_l2²) is proportional to the weight's
        # distortion, so sensitivity × distortion predicts every other option.
        layout = storage.layout(cand, ladder[len(ladder) // 2])
        probes = [b for b in ladder if storage.error(cand, b, layout) > 0]
        if probes:
            probe = probes[min(len(probes) - 1, len(ladder) // 2)]
            approx = storage.approximate(cand, probe, layout)[1]
            metrics = check.evaluate(trial_model(reference, {cand.name: approx}), limit=ranking_feeds)
            sensitivity[cand.name] = metrics.get("rel_l2", 0.0) ** 2 / storage.error(cand, probe, layout)
        else:
            sensitivity[cand.name] = 0.0  # exact at every bit width tried
    scale = max((sensitivity[name] * error for name, menu in options.items() for _, _, error, _ in menu),
                default=0.0) or 1.0
    by_name = {c.name: c for c in candidates}
    menus = {}
    for name, menu in options.items():
        # greedy_moves is unit-free: saving_s holds bytes saved here, error the predicted rel_l2²
        # (scaled to at most 1, so its 1e-9 floor only merges negligible differences).
        menus[name] = [Choice(by_name[name], (bits, layout), [], float(by_name[name].nbytes - nbytes),
                              sensitivity[name] * error / scale)
                       for bits, layout, error, nbytes in menu if nbytes < by_name[name].nbytes]
    moves = greedy_moves({name: menu for name, menu in menus.items() if menu})
    if not moves:
        return {}

    def evaluate(prefix: int) -> tuple[bool, dict]:
        weights = {name: storage.approximate(by_name[name], *choice.ranks)[1]
                   for name, choice in moves[prefix - 1].items()}
        metrics = check.evaluate(trial_model(reference, weights))
        return check.meets(metrics), metrics

    best, outcome, _ = longest_prefix_within(len(moves), lambda k, _refit: evaluate(k), False, check.badness)
    if not best:
        notes.append("no weight can be shared within the tolerance")
        return {}
    chosen = {name: choice.ranks for name, choice in moves[best - 1].items()}
    notes.append(f"{best} of {len(moves)} greedy moves within the tolerance ({describe(outcome[1])})")
    return chosen


def trial_model(reference: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``reference`` whose initializers named in ``weights`` hold those values (the
    numbers the shared storage computes; the search scores them without building the storage)."""
    model = onnx.ModelProto()
    model.CopyFrom(reference)
    left = dict(weights)
    for g in iter_proto_graphs(model.graph):
        for init in g.initializer:
            if init.name in left:
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(left.pop(init.name)), init.name))
    if left:
        raise KeyError(f"initializers not found: {sorted(left)}")
    return model


# ---------------------------------------------------------------------- storage nodes
def emit(graph: gs.Graph, names: G.NameAllocator, cand: Candidate, encoded, storage: Storage) -> gs.Variable:
    """Add the nodes that compute the weight from its stored form (main graph, so every reader,
    subgraphs included, sees it); returns the tensor that replaces the weight."""
    hint = cand.name
    weight_shape = list(cand.weight.shape)
    dtype = cand.weight.dtype
    nodes: list[gs.Node] = []

    def node(op: str, inputs: list, out_dtype, out_shape, attrs: dict | None = None) -> gs.Variable:
        out = gs.Variable(names(f"{hint}_{op.lower()}"), dtype=out_dtype, shape=out_shape)
        nodes.append(gs.Node(op, names(f"{hint}_{op}"), attrs or {}, list(inputs), [out]))
        return out

    if storage.form == "codebook":
        shared: M.SharedWeight | M.ScaledWeight = encoded
        indices = _stored_indices(names, hint, shared.indices, shared.bits, storage, node)
        positions = node("Cast", [indices], np.int32, weight_shape, {"to": onnx.TensorProto.INT32})
        scaled = isinstance(shared, M.ScaledWeight)
        if not scaled and shared.axis is not None:  # row r of the flat codebooks starts at r·2^bits
            offset_shape = [1] * len(weight_shape)
            offset_shape[shared.axis] = -1
            offsets = (np.arange(shared.codebooks.shape[0], dtype=np.int32) * shared.codebooks.shape[1])
            positions = node("Add", [positions, names.constant(f"{hint}_codebook_offsets",
                                                                offsets.reshape(offset_shape))],
                             np.int32, weight_shape)
        codebook = names.constant(f"{hint}_codebook", (shared.codebook if scaled else shared.codebooks).reshape(-1))
        expanded = node("Gather", [codebook, positions], dtype, weight_shape, {"axis": 0})
        if scaled:  # each output channel times its scale (Mul-7 broadcasts numpy-style)
            scale_shape = [1] * len(weight_shape)
            scale_shape[shared.axis] = -1
            scales = names.constant(f"{hint}_channel_scales", shared.scales.reshape(scale_shape))
            expanded = node("Mul", [expanded, scales], dtype, weight_shape)
    else:
        grid: M.GridWeight = encoded
        four_bit = grid.bits <= 4 and storage.opset >= UINT4_OPSET
        q = _int4_constant(names, f"{hint}_quantized", grid.q) if four_bit else \
            names.constant(f"{hint}_quantized", grid.q)
        zero_point = _int4_constant(names, f"{hint}_zero_point", grid.zero_point) if four_bit else \
            names.constant(f"{hint}_zero_point", grid.zero_point)
        attrs = {"axis": grid.axis} if grid.axis is not None else {}
        expanded = node("DequantizeLinear", [q, names.constant(f"{hint}_scale", grid.scale), zero_point],
                        np.float32, weight_shape, attrs)
        if dtype != np.float32:  # DequantizeLinear yields float32 before opset 19; one rule for all opsets
            expanded = node("Cast", [expanded], dtype, weight_shape,
                            {"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)})
    graph.nodes.extend(nodes)
    return expanded


def _stored_indices(names: G.NameAllocator, hint: str, indices: np.ndarray, bits: int, storage: Storage, node):
    """The index tensor as stored: uint8 for 8 bits (or below opset 11), a UINT4 initializer
    for 4 bits at opset ≥ 21, else a bit stream of ``bits`` per index (weight_share_math.pack_bits)
    unpacked by integer ops."""
    shape = list(indices.shape)
    if bits == 8 or storage.opset < PACKED_OPSET:
        return names.constant(f"{hint}_indices", indices)
    if bits == 4 and storage.opset >= UINT4_OPSET:
        return _int4_constant(names, f"{hint}_indices", indices, unsigned=True)
    # The stream as (groups, group bytes): index j of a group starts at bit s = j·b, in byte
    # s // 8 (low) and ends in byte (s + b - 1) // 8 (high). In uint32 (Add-7 and BitShift-11
    # take it): (low + (high << 8)) >> (s % 8), then keep the b low bits by shifting left
    # and right by 32 - b. An index within one byte reads it twice; the copy shifted by 8
    # lands above bit b and is dropped.
    count = indices.size
    packed = M.pack_bits(indices, bits)
    groups = packed.shape[0]
    _, per_group = M.bit_groups(bits)
    starts = np.arange(per_group) * bits
    words = node("Cast", [names.constant(f"{hint}_indices_packed", packed)], np.uint32, list(packed.shape),
                 {"to": onnx.TensorProto.UINT32})
    low = node("Gather", [words, names.constant(f"{hint}_low_byte", (starts // 8).astype(np.int64))], np.uint32,
               [groups, per_group], {"axis": 1})
    high = node("Gather", [words, names.constant(f"{hint}_high_byte", ((starts + bits - 1) // 8).astype(np.int64))],
                np.uint32, [groups, per_group], {"axis": 1})

    def shift(x, amount, direction: str) -> gs.Variable:
        amount = names.constant(f"{hint}_shift", np.asarray(amount, np.uint32).reshape(1, -1))
        return node("BitShift", [x, amount], np.uint32, [groups, per_group], {"direction": direction})

    pair = node("Add", [low, shift(high, [8], "LEFT")], np.uint32, [groups, per_group])
    aligned = shift(pair, starts % 8, "RIGHT")
    values = shift(shift(aligned, [32 - bits], "LEFT"), [32 - bits], "RIGHT")
    if groups * per_group != count:
        flat = node("Reshape", [values, names.constant(f"{hint}_flat", np.array([-1], np.int64))], np.uint32,
                    [groups * per_group])
        values = node("Slice", [flat, names.constant(f"{hint}_start", np.array([0], np.int64)),
                                names.constant(f"{hint}_end", np.array([count], np.int64))], np.uint32, [count])
    return node("Reshape", [values, names.constant(f"{hint}_shape", np.array(shape, np.int64))], np.uint32, shape)


def _int4_constant(names: G.NameAllocator, hint: str, values: np.ndarray, unsigned: bool | None = None) -> gs.Constant:
    """A real INT4/UINT4 initializer (two values per byte). gs would write numpy's one-byte
    ml_dtypes values unpacked, so the constant holds the packed TensorProto itself."""
    import ml_dtypes

    values = np.asarray(values)
    if unsigned is None:
        unsigned = values.dtype.kind == "u"
    typed = values.astype(ml_dtypes.uint4 if unsigned else ml_dtypes.int4)
    proto = numpy_helper.from_array(typed, names(hint))  # raw_data, packed low nibble first
    return gs.Constant(proto.name, LazyValues(proto))
