"""qdq-int8: int8 quantization in QDQ form (QuantizeLinear/DequantizeLinear), calibrated.

Steps, in order:
1. opset ≥ 13 (per-channel DequantizeLinear needs the ``axis`` attribute, added in opset 13;
   onnxruntime's quantize_static writes it into opset-11 models, which then do not load);
2. cross-layer equalization and high-bias absorption (Nagel et al. 2019, passes/equalize.py);
3. placement per target (passes/qdq_placement.py);
4. one streaming calibration sweep: a bounded histogram per tensor, and per-channel input
   means for bias correction (onnxopt/activations.py, onnxopt/quant_math.py);
5. cpu: every int8 compute layer is timed against its float self in onnxruntime
   (onnxopt/layer_timing.py); a layer whose integer kernel is not faster stays float;
6. rewrite: int8 weights per output channel + DequantizeLinear (the file shrinks ~4×),
   bias corrected for the weights' rounding (Nagel et al. 2019 §4.2, empirical form:
   E[(W_q − W)·x] = (W_q − W)·E[x]) and stored as int32 where the target wants it, Q→DQ
   pairs on the planned activations;
7. with a tolerance: the most sensitive layers (each measured alone) go back to float until
   the whole model is within the tolerance on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.pass_base import Pass, PassResult
from onnxopt.registry import all_passes, register_pass
from onnxopt.tolerance import default_budget

from .qdq_placement import QuantPlan, plan_quantization, weight_axis, weight_input

Method = Literal["minmax", "percentile", "entropy", "mse"]

# DequantizeLinear's ``axis`` (per-channel) arrived in opset 13; QuantizeLinear exists from 10.
PER_CHANNEL_OPSET = 13
MIN_QDQ_OPSET = 10


@dataclass
class ActivationParams:
    scale: np.ndarray  # float32 scalar
    zero_point: np.ndarray  # uint8/int8 scalar


@dataclass
class CalibrationResult:
    histograms: dict = field(default_factory=dict)  # tensor → StreamingHistogram
    channel_means: dict[str, np.ndarray] = field(default_factory=dict)  # anchor input → mean per feature
    missing: list[str] = field(default_factory=list)


@register_pass
class QdqInt8(Pass):
    name = "qdq-int8"
    summary = ("Quantize to int8 in QDQ form with calibration: per-channel int8 weights, placement for "
               "onnxruntime (cpu) or TensorRT, bias correction, measured speed, tolerance-driven exclusion.")
    lossless = False
    run_once = True

    @dataclass
    class Options:
        method: Method = "percentile"  # activation ranges from the calibration histograms
        percentile: float = 99.99
        per_channel: bool = True
        # 7 keeps u8×s8 pair sums inside int16: AVX2 kernels without VNNI (vpmaddubsw) saturate
        # with full 8-bit weights (onnxruntime's reduce_range).
        weight_bits: int = 8
        weight_method: Literal["minmax", "mse"] = "mse"
        equalize: bool = True  # cross-layer equalization first (needs passes/equalize.py)
        absorb_bias: bool = False
        bias_correction: bool = True
        skip_slow: bool = True  # cpu: keep layers whose int8 kernel is not faster in float
        min_speedup: float = 1.03  # a layer kind goes back to float when that makes the model this much faster
        min_channels: int = 8  # tensorrt: smaller convs stay float
        exclude: list[str] = field(default_factory=list)  # node names or op types kept float
        samples: int = 64  # calibration feeds used at most
        # The accuracy budget when the user gives no --tolerance ("none": no check). Plain int8
        # can flip a classifier's answer; a quantizer should not do that silently.
        # Metrics joined by '+' (commas separate pass options), e.g. cosine=0.995+top1=0.999.
        # top1 is the agreement to expect beyond the calibration feeds (onnxopt/tolerance.py).
        accuracy: str = "cosine=0.99+top1=0.99"
        eval_samples: int = 16  # feeds used to check the tolerance and rank sensitivity

    # ------------------------------------------------------------------ run
    def run(self, graph: gs.Graph, ctx) -> PassResult:
        opt = self.options
        notes: list[str] = []
        counters: dict[str, float] = {}
        per_channel = opt.per_channel
        if opt.weight_bits not in (7, 8):
            from onnxopt.errors import UserInputError

            raise UserInputError(f"qdq-int8 weight_bits={opt.weight_bits} is not supported.", "use 8 or 7.")
        if graph.opset < PER_CHANNEL_OPSET:
            upgraded = _upgrade_opset(graph, ctx)
            if upgraded:
                notes.append(upgraded)
        if graph.opset < PER_CHANNEL_OPSET:
            if graph.opset < MIN_QDQ_OPSET:
                return PassResult(False, notes=notes + [f"opset {graph.opset}: QuantizeLinear needs opset ≥ "
                                                        f"{MIN_QDQ_OPSET} and the upgrade failed; nothing quantized"])
            per_channel = False
            notes.append(f"opset {graph.opset}: weights quantized per tensor (per-channel needs opset 13)")

        changed_before = False
        if opt.equalize:
            changed_before |= _run_helper_pass("equalize-cross-layer", graph, ctx, notes, counters)
        if opt.absorb_bias:
            changed_before |= _run_helper_pass("absorb-bias", graph, ctx, notes, counters)

        excluded = set(opt.exclude)
        plan = plan_quantization(graph, ctx.target, excluded=excluded, min_channels=opt.min_channels)
        notes.extend(plan.notes)
        if not plan.anchors:
            return PassResult(changed_before, counters, notes + ["no layer could be quantized"])

        calib = _calibrate(graph, ctx, plan, opt.samples)
        notes.extend(f"{name}: not calibrated (not observable)" for name in calib.missing)

        weights: dict = {}  # quantized weights by layer, shared by every trial rewrite
        if ctx.target == "cpu" and opt.skip_slow:
            slow = _slow_layers(graph, ctx, plan, calib, opt, per_channel, notes, weights)
            if slow:
                excluded |= slow
                plan = plan_quantization(graph, ctx.target, excluded=excluded, min_channels=opt.min_channels)
        counters["layers_slow_kept_float"] = float(len(excluded) - len(set(opt.exclude)))

        tolerance = dict(ctx.tolerance) or default_budget(opt.accuracy)
        if tolerance:
            sensitive = _sensitive_anchors(graph, ctx, plan, calib, opt, per_channel, excluded, notes, weights,
                                           tolerance)
            excluded |= sensitive
            counters["layers_sensitive_kept_float"] = float(len(sensitive))
            plan = plan_quantization(graph, ctx.target, excluded=excluded, min_channels=opt.min_channels)
        if not plan.anchors:
            return PassResult(changed_before, counters, notes + ["every layer stayed float"])
        if ctx.target == "cpu" and opt.skip_slow and len(excluded) > len(set(opt.exclude)):
            # Layers went back to float after the speed check: int8 islands pay conversions.
            speedup = _speedup(graph, ctx, plan, calib, opt, per_channel, weights)
            notes.append(f"speed: the final placement runs {speedup:.2f}× the float model")
            if speedup < 1.0:
                return PassResult(changed_before, counters,
                                  notes + ["int8 would be slower than float here: every layer kept float"])

        stats = apply_plan(graph, plan, calib, opt, per_channel, weights)
        counters.update(stats)
        return PassResult(True, counters, notes)


# ---------------------------------------------------------------------- preparation
def _upgrade_opset(graph: gs.Graph, ctx) -> str | None:
    upgrade = all_passes().get("upgrade-opset")
    if upgrade is None:
        return None
    before = graph.opset
    result = upgrade(upgrade.Options(min_opset=PER_CHANNEL_OPSET)).run(graph, ctx)
    if result.changed:
        graph.cleanup().toposort()
        return f"opset {before} upgraded to {graph.opset} for per-channel DequantizeLinear"
    return "; ".join(result.notes) or None


def _run_helper_pass(name: str, graph: gs.Graph, ctx, notes: list[str], counters: dict) -> bool:
    cls = all_passes().get(name)
    if cls is None:
        notes.append(f"{name} is not installed; skipped")
        return False
    result = cls().run(graph, ctx)
    if result.changed:
        graph.cleanup().toposort()
    for key, value in result.counters.items():
        counters[f"{name}.{key}"] = value
    notes.extend(f"{name}: {n}" for n in result.notes)
    return result.changed


def _feature_axis(node: gs.Node) -> int:
    return 1 if node.op == "Conv" else -1


def _calibrate(graph: gs.Graph, ctx, plan: QuantPlan, samples: int) -> CalibrationResult:
    """One sweep over the calibration data: histograms of every planned tensor (and of the
    candidates' neighbours), per-feature means of every anchor's input."""
    from onnxopt.activations import ChannelAccumulator, capture
    from onnxopt.quant_math import StreamingHistogram

    by_name = {n.name: n for n in graph.nodes}
    anchor_inputs = {by_name[a].inputs[0].name: _feature_axis(by_name[a]) for a in plan.anchors}
    wanted = set(plan.tensors) | set(anchor_inputs)
    for group in plan.groups:
        wanted |= group
    for a in plan.anchors:  # outputs too: their ranges are needed when exclusions change the plan
        wanted.update(t.name for t in by_name[a].outputs)
    result = CalibrationResult()
    means = {name: ChannelAccumulator(axis) for name, axis in anchor_inputs.items()}

    def consume(name: str, value: np.ndarray) -> None:
        hist = result.histograms.get(name)
        if hist is None:
            hist = result.histograms[name] = StreamingHistogram()
        hist.add(value)
        if name in means:
            means[name].add(value)

    model = G.export_model(graph, ctx.template)
    data = ctx.calibration_data()
    result.missing = list(capture(model, sorted(wanted), lambda: data.feeds(limit=samples), consume,
                                  progress=ctx.progress))
    result.missing = [m for m in result.missing if m in plan.tensors]
    for name, accumulator in means.items():
        stats = accumulator.result()
        if stats is not None:
            result.channel_means[name] = stats.mean
    return result


# ---------------------------------------------------------------------- parameters
def activation_params(plan: QuantPlan, calib: CalibrationResult, opt) -> dict[str, ActivationParams]:
    """Scale and zero point per planned tensor; a group shares the union of its ranges."""
    from onnxopt.quant_math import quant_range, scale_zero_point

    symmetric = plan.target == "tensorrt"
    qrange = quant_range("int8") if symmetric else quant_range("uint8")
    params: dict[str, ActivationParams] = {}
    done: set[str] = set()
    for name in sorted(plan.tensors):
        if name in done:
            continue
        group = plan.group_of(name)
        done |= group
        ranges = [calib.histograms[m].range(opt.method, qrange, symmetric=symmetric, percentile=opt.percentile)
                  for m in sorted(group) if m in calib.histograms]
        if not ranges:
            continue
        lo = min(r[0] for r in ranges)
        hi = max(r[1] for r in ranges)
        scale, zero_point = scale_zero_point(np.float32(lo), np.float32(hi), qrange, symmetric=symmetric)
        for member in group:
            params[member] = ActivationParams(np.asarray(scale, np.float32).reshape(()),
                                              np.asarray(zero_point, qrange.dtype).reshape(()))
    return params


# ---------------------------------------------------------------------- rewrite
def apply_plan(graph: gs.Graph, plan: QuantPlan, calib: CalibrationResult, opt, per_channel: bool,
               weight_cache: dict | None = None) -> dict[str, float]:
    """Rewrite ``graph`` per ``plan``: int8 weights + DQ, corrected/int32 biases, activation Q→DQ.
    ``weight_cache`` keeps quantized weights by layer name across trial rewrites of graph copies."""
    params = activation_params(plan, calib, opt)
    names = G.NameAllocator(graph)
    by_name = {n.name: n for n in graph.nodes}
    weight_bytes_before = weight_bytes_after = 0
    layers = 0
    for anchor_name in plan.anchors:
        node = by_name[anchor_name]
        activation = node.inputs[0].name
        if activation not in params:
            continue  # its input could not be calibrated: stays float
        before, after = _quantize_anchor(graph, node, plan.target, params[activation], calib.channel_means.get(activation),
                                         opt, per_channel, names, weight_cache)
        weight_bytes_before += before
        weight_bytes_after += after
        layers += 1
    inserted = _insert_activation_qdq(graph, plan, params, names)
    return {"layers_quantized": float(layers), "qdq_pairs": float(inserted),
            "weight_bytes_saved": float(weight_bytes_before - weight_bytes_after)}


def _bias_of(node: gs.Node, out_channels: int) -> np.ndarray | None:
    if len(node.inputs) < 3 or node.inputs[2] is None or not node.inputs[2].name:
        return None
    value = G.constant_value(node.inputs[2])
    if value is None:
        return None
    value = np.asarray(value, np.float64)
    if node.op == "Gemm":
        value = value * float(G.attr(node, "beta", 1.0))
    if value.size == 1:
        return np.full(out_channels, float(value.reshape(-1)[0]))
    if value.size == out_channels:
        return value.reshape(out_channels)
    return None  # a full (M, N) Gemm C: not a per-channel bias


def _weight_correction(node: gs.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """(W_q − W)·E[x] per output channel (Nagel et al. 2019, §4.2 bias correction)."""
    if node.op == "Conv":
        groups = int(G.attr(node, "group", 1))
        out_channels, in_per_group = delta.shape[0], delta.shape[1]
        if mean.shape[0] != in_per_group * groups:
            return None
        per_input = delta.reshape(out_channels, in_per_group, -1).sum(axis=2)  # sum over the kernel window
        group_of_row = np.arange(out_channels) // (out_channels // groups)
        inputs = mean.reshape(groups, in_per_group)[group_of_row]
        return (per_input * inputs).sum(axis=1)
    if node.op == "Gemm" and G.attr(node, "transB", 0):
        return delta @ mean if mean.shape[0] == delta.shape[1] else None
    return mean @ delta if mean.shape[0] == delta.shape[0] else None


def _quantize_anchor(graph: gs.Graph, node: gs.Node, target: str, input_params: ActivationParams, input_mean,
                     opt, per_channel: bool, names: G.NameAllocator, weight_cache: dict | None = None) -> tuple[int, int]:
    from onnxopt.quant_math import dequantize, quantize_bias, quantize_weight

    index = weight_input(node)
    weight = np.asarray(G.constant_value(node.inputs[index]), np.float32)
    if node.op == "Gemm" and float(G.attr(node, "alpha", 1.0)) != 1.0:
        weight = weight * np.float32(G.attr(node, "alpha", 1.0))
        node.attrs["alpha"] = 1.0
    axis = weight_axis(node)
    cached = weight_cache.get(node.name) if weight_cache is not None else None
    if cached is None:
        q_weight, w_scale = quantize_weight(weight, axis if per_channel else None, bits=opt.weight_bits,
                                            method=opt.weight_method)
        dequantized = dequantize(q_weight, w_scale, np.zeros(np.shape(w_scale), np.int8),
                                 axis if per_channel else None)
        cached = (q_weight, w_scale, dequantized)
        if weight_cache is not None:
            weight_cache[node.name] = cached
    q_weight, w_scale, dequantized = cached
    out_channels = weight.shape[axis]
    bias = _bias_of(node, out_channels)
    if opt.bias_correction and input_mean is not None:
        correction = _weight_correction(node, dequantized.astype(np.float64) - weight, input_mean)
        if correction is not None and np.all(np.isfinite(correction)):
            bias = (np.zeros(out_channels) if bias is None else bias) - correction

    w_zero = np.zeros(np.shape(w_scale), np.int8)
    axis_attr = {"axis": axis} if per_channel else {}
    node.inputs[index] = _dequantized(graph, names, f"{node.name}_weight", q_weight, w_scale, w_zero, axis_attr)
    if node.op == "MatMul" or bias is None:
        return weight.nbytes, q_weight.nbytes  # MatMul has no bias input to correct
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    if target == "cpu":
        # QLinearConv / QGemm take an int32 bias at scale input_scale × weight_scale, zero point 0.
        channel_scales = np.broadcast_to(np.asarray(w_scale, np.float32), (out_channels,))
        q_bias, bias_scale = quantize_bias(bias, float(input_params.scale), channel_scales)
        if per_channel:
            bias_input = _dequantized(graph, names, f"{node.name}_bias", q_bias, bias_scale,
                                      np.zeros(out_channels, np.int32), {"axis": 0})
        else:
            bias_input = _dequantized(graph, names, f"{node.name}_bias", q_bias, np.float32(bias_scale.reshape(-1)[0]),
                                      np.int32(0), {})
    else:  # TensorRT fuses a float bias into its int8 kernels itself
        bias_input = names.constant(f"{node.name}_bias", bias.astype(np.float32))
    if len(node.inputs) > 2:
        node.inputs[2] = bias_input
    else:
        node.inputs.append(bias_input)
    return weight.nbytes, q_weight.nbytes


def _dequantized(graph: gs.Graph, names: G.NameAllocator, hint: str, values: np.ndarray, scale, zero_point,
                 attrs: dict) -> gs.Variable:
    """A DequantizeLinear node over a new integer initializer; returns its float output."""
    out = gs.Variable(names(f"{hint}_dequantized"), dtype=np.float32, shape=list(values.shape))
    node = gs.Node("DequantizeLinear", names(f"{hint}_DequantizeLinear"), dict(attrs),
            inputs=[names.constant(f"{hint}_quantized", values),
                    names.constant(f"{hint}_scale", np.asarray(scale, np.float32)),
                    names.constant(f"{hint}_zero_point", zero_point)],
            outputs=[out])
    graph.nodes.append(node)
    return out


def _reads_dequantized_everywhere(plan: QuantPlan, tensor: gs.Tensor) -> bool:
    """cpu: a tensor written by an int node exists only in int8 (all its readers get a DQ)."""
    if plan.target != "cpu":
        return False
    node = G.producer(tensor)
    if node is None:
        return False
    if node.name in plan.int_nodes:
        return True
    # Relu/Clip after an int node: the Q after it absorbs it (Conv→Relu→Q fuses).
    if node.op in ("Relu", "Clip"):
        before = G.producer(node.inputs[0])
        return before is not None and before.name in plan.int_nodes
    return False


def _insert_activation_qdq(graph: gs.Graph, plan: QuantPlan, params: dict[str, ActivationParams],
                           names: G.NameAllocator) -> int:
    tensors = graph.tensors()
    pairs = 0
    new_nodes: list[gs.Node] = []
    for name in sorted(plan.tensors):
        tensor = tensors.get(name)
        if tensor is None or name not in params or isinstance(tensor, gs.Constant):
            continue
        if _reads_dequantized_everywhere(plan, tensor):
            readers = list(G.consumers(tensor))
        else:
            wanted = plan.int_readers.get(name, set())
            readers = [c for c in G.consumers(tensor) if c.name in wanted]
        if not readers:
            continue
        p = params[name]
        quantized = gs.Variable(names(f"{name}_quantized"), dtype=p.zero_point.dtype, shape=tensor.shape)
        scale = names.constant(f"{name}_scale", p.scale)
        zero_point = names.constant(f"{name}_zero_point", p.zero_point)
        new_nodes.append(gs.Node("QuantizeLinear", names(f"{name}_QuantizeLinear"), {},
                                 inputs=[tensor, scale, zero_point], outputs=[quantized]))
        unique_readers = list({id(r): r for r in readers}.values())
        for reader in unique_readers:  # one DQ per reader, as onnxruntime's QDQ selectors expect
            dequantized = gs.Variable(names(f"{name}_dequantized"), dtype=np.float32, shape=tensor.shape)
            new_nodes.append(gs.Node("DequantizeLinear", names(f"{name}_DequantizeLinear"), {},
                                     inputs=[quantized, scale, zero_point], outputs=[dequantized]))
            for i, t in enumerate(reader.inputs):
                if t is tensor:
                    reader.inputs[i] = dequantized
        pairs += 1
    graph.nodes.extend(new_nodes)
    return pairs


# ---------------------------------------------------------------------- measured speed (cpu)
# Layer kinds whose int8 kernels onnxruntime runs at different relative speeds (depthwise
# QLinearConv is often slower than the float NCHWc kernel on AVX2). A layer timed alone pays
# layout conversions at its borders that an int8 chain does not (measured: MobileNetV2's
# pointwise convs 0.9× alone, faster inside the chain), so kinds are toggled in the whole
# model and the model is timed.
LAYER_KINDS = ("depthwise", "grouped", "dense", "pointwise", "spatial")


def layer_kind(node: gs.Node) -> str:
    if node.op != "Conv":
        return "dense"
    weight_shape = node.inputs[1].shape
    groups = int(G.attr(node, "group", 1))
    if groups > 1:
        return "depthwise" if weight_shape[1] == 1 else "grouped"
    return "pointwise" if all(int(k) == 1 for k in weight_shape[2:]) else "spatial"


def _quantized_copy(graph: gs.Graph, ctx, plan: QuantPlan, calib: CalibrationResult, opt, per_channel: bool,
                    weights: dict):
    """The model ``graph`` would become under ``plan``, built on a copy (``graph`` is untouched);
    the trial rewrites of the speed check and the tolerance search."""
    trial = graph.copy()
    apply_plan(trial, plan, calib, opt, per_channel, weights)
    trial.cleanup().toposort()
    return G.export_model(trial, ctx.template)


def _speedup(graph: gs.Graph, ctx, plan: QuantPlan, calib: CalibrationResult, opt, per_channel: bool,
             weights: dict) -> float:
    """Measured speed of the model quantized per ``plan`` relative to float."""
    from onnxopt.layer_timing import LatencyProbe

    feed = next(iter(ctx.calibration_data().feeds(limit=1)), None)
    probe = LatencyProbe(optimization="all", threads=1, runs=15)
    quantized = _quantized_copy(graph, ctx, plan, calib, opt, per_channel, weights)
    return probe.compare(G.export_model(graph, ctx.template), [quantized], feed)[0]


def _slow_layers(graph: gs.Graph, ctx, plan: QuantPlan, calib: CalibrationResult, opt, per_channel: bool,
                 notes: list[str], weights: dict) -> set[str]:
    """Anchors to keep float because the whole model runs faster with their kind in float."""
    from onnxopt.layer_timing import LatencyProbe

    probe = LatencyProbe(optimization="all", threads=1, runs=15)
    by_name = {n.name: n for n in graph.nodes}
    kinds: dict[str, list[str]] = {}
    for name in plan.anchors:
        kinds.setdefault(layer_kind(by_name[name]), []).append(name)
    float_model = G.export_model(graph, ctx.template)
    feed = next(iter(ctx.calibration_data().feeds(limit=1)), None)

    def variant(keep_float: set[str]):
        trial_plan = plan_quantization(graph, ctx.target, excluded=keep_float, min_channels=opt.min_channels)
        return _quantized_copy(graph, ctx, trial_plan, calib, opt, per_channel, weights)

    kept_float: set[str] = set(opt.exclude)
    current = variant(kept_float)
    [speedup] = probe.compare(float_model, [current], feed)
    notes.append(f"speed: every layer in int8 runs {speedup:.2f}× the float model")
    for kind in [k for k in LAYER_KINDS if k in kinds]:
        trial_float = kept_float | set(kinds[kind])
        candidate = variant(trial_float)
        current_speedup, candidate_speedup = probe.compare(float_model, [current, candidate], feed)
        if candidate_speedup > current_speedup * opt.min_speedup:
            notes.append(f"speed: {len(kinds[kind])} {kind} layer(s) kept float "
                         f"({candidate_speedup:.2f}× instead of {current_speedup:.2f}×)")
            kept_float, current, speedup = trial_float, candidate, candidate_speedup
        else:
            speedup = max(current_speedup, speedup) if current_speedup else speedup
    if speedup < 1.0:
        notes.append(f"speed: the best int8 placement runs {speedup:.2f}× the float model; every layer kept float")
        return set(plan.anchors)
    return kept_float - set(opt.exclude)


# ---------------------------------------------------------------------- tolerance
def _sensitive_anchors(graph: gs.Graph, ctx, plan: QuantPlan, calib: CalibrationResult, opt, per_channel: bool,
                       excluded: set[str], notes: list[str], weights: dict, tolerance: dict[str, float]) -> set[str]:
    """The fewest most-sensitive layers to keep float so the model meets ``tolerance`` on the
    calibration data (top-1 as expected beyond it, onnxopt/tolerance.py)."""
    from onnxopt.tolerance import ToleranceCheck, describe

    feeds = list(ctx.calibration_data().feeds(limit=opt.eval_samples))
    check = ToleranceCheck(G.export_model(graph, ctx.template), feeds, tolerance)

    def evaluate(keep_float: set[str], limit: int | None = None) -> dict[str, float]:
        trial_plan = plan_quantization(graph, ctx.target, excluded=keep_float, min_channels=opt.min_channels)
        return check.evaluate(_quantized_copy(graph, ctx, trial_plan, calib, opt, per_channel, weights), limit)

    full = evaluate(excluded)
    if check.meets(full):
        notes.append("tolerance met with every layer in int8: " + describe(full))
        return set()
    anchors = list(plan.anchors)
    ranking_feeds = max(2, min(len(feeds), 8))
    scores: dict[str, tuple[float, float]] = {}
    for name in ctx.progress(anchors, "ranking layer sensitivity", len(anchors)):
        alone = evaluate(excluded | (set(anchors) - {name}), limit=ranking_feeds)
        scores[name] = (check.badness(alone), alone.get("rel_l2", 0.0))
    ranked = sorted(anchors, key=lambda n: scores[n], reverse=True)
    # Fewest layers kept float: binary search on the count, assuming error falls as it grows.
    low, high = 1, len(ranked)
    best = set(ranked)
    while low <= high:
        middle = (low + high) // 2
        candidate = set(ranked[:middle])
        result = evaluate(excluded | candidate)
        if check.meets(result):
            best, high = candidate, middle - 1
            notes.append(f"tolerance met with {middle} sensitive layer(s) in float: " + describe(result))
        else:
            low = middle + 1
    notes.append("kept float for the tolerance: " + ", ".join(sorted(best, key=ranked.index)))
    return best

