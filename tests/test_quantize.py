"""qdq-int8: placement per target, numerics, validity, accuracy bound, tolerance-driven exclusion.

cpu placement is checked where it matters: in the graph onnxruntime itself makes of the
result (its QDQ transformers must turn the pairs into QLinearConv / QLinearAdd / ...).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxopt
from models.layers import GraphBuilder
from models.zoo import resnet_tiny
from onnxopt.calibration import CalibrationData
from onnxopt.context import PassContext
from onnxopt.metrics import OutputAccumulator
from onnxopt.runtime import run_model
from tests.util import random_feeds

FAST = "qdq-int8:skip_slow=false,accuracy=none"


def feeds_for(model, n=8, seed=0):
    return random_feeds(model, n=n, seed=seed)


def quantize(model, spec=FAST, target="cpu", feeds=None, tolerance=None, preset_fusions=True):
    feeds = feeds if feeds is not None else feeds_for(model)
    ctx = PassContext(target=target, calibration=CalibrationData.from_feeds(feeds), tolerance=tolerance or {},
                      template=model)
    passes = ["fold-batchnorm", "eliminate-identity", "eliminate-dead", spec] if preset_fusions else [spec]
    result = onnxopt.optimize(model, passes=passes, target=target, ctx=ctx)
    onnx.checker.check_model(result.model)
    return result


def fidelity(reference, candidate, feeds) -> dict[str, float]:
    ref = run_model(reference, feeds)
    out = run_model(candidate, feeds)
    worst: dict[str, float] = {}
    for r, o in zip(ref, out):
        for key in r:
            acc = OutputAccumulator(key)
            acc.add(r[key], o[key])
            for metric, value in acc.result().items():
                worst[metric] = min(worst.get(metric, value), value) if metric in ("cosine", "top1") \
                    else max(worst.get(metric, value), value)
    return worst


def ort_optimized_ops(model, tmp_path) -> list[str]:
    """The op types onnxruntime runs after its own (all-level) optimizations."""
    path = tmp_path / "ort_optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def residual_net(opset=17, center=False):
    """conv-bn-relu → basic residual block → concat of two branches → depthwise → GAP → Gemm head.

    ``center``: a classifier whose logits are small differences of large features (centred
    rows, as trained classifiers have), so the logits amplify feature errors ~100×."""
    b = GraphBuilder("qdq_net", seed=3, opset=opset)
    x = b.input("x", [1, 3, 32, 32])
    x = b.relu(b.batchnorm(b.conv(x, 16, 3, 1, 1, bias=False, name="stem")))
    y = b.relu(b.conv(x, 16, 3, name="block_a"))
    y = b.conv(y, 16, 3, name="block_b")
    x = b.relu(b.add(y, x, name="residual"))
    left = b.relu(b.conv(x, 16, 1, name="left"))
    right = b.relu(b.conv(x, 16, 3, name="right"))
    x = b.concat([left, right], name="concat")
    x = b.maxpool(x, 2, 2, name="pool")
    x = b.relu(b.conv(x, 32, 3, group=32, name="depthwise"))
    x = b.relu(b.conv(x, 32, 1, name="pointwise"))
    x = b.flatten(b.global_avgpool(x))
    logits = b.gemm(x, 10, name="fc", center=center)
    return b.build({"logits": logits})


# ----------------------------------------------------------------------------- cpu
def test_cpu_result_is_valid_and_close_and_smaller():
    model = residual_net()
    feeds = feeds_for(model, 8)
    result = quantize(model, feeds=feeds)
    out = result.model
    assert "QuantizeLinear" in ops(out) and "DequantizeLinear" in ops(out)
    weights = [numpy_helper.to_array(t) for t in out.graph.initializer]
    assert any(w.dtype == np.int8 and w.ndim == 4 for w in weights), "conv weights stored as int8"
    assert any(w.dtype == np.int32 for w in weights), "cpu biases stored as int32"
    assert not any(w.dtype == np.float32 and w.ndim == 4 for w in weights), "no float conv weight left"
    held_out = feeds_for(model, 4, seed=1)
    metrics = fidelity(model, out, held_out)
    assert metrics["cosine"] > 0.99, metrics
    def weight_bytes(m):
        return sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in m.graph.initializer)

    assert weight_bytes(out) < 0.35 * weight_bytes(model)


def test_cpu_placement_fuses_integer_chains_in_onnxruntime(tmp_path):
    out = quantize(residual_net()).model
    fused = ort_optimized_ops(out, tmp_path)
    assert fused.count("QLinearConv") >= 6, fused  # stem, block, branches, depthwise, pointwise
    assert "QLinearAdd" in fused, fused  # the residual Add runs on int8
    assert "QLinearConcat" in fused, fused
    assert "Conv" not in fused and "FusedConv" not in fused, fused
    # Relu after an int conv is absorbed by the Q (zero point at the range's bottom)
    assert "Relu" not in fused, fused


def test_cpu_head_output_stays_float_and_unquantized():
    out = quantize(residual_net()).model
    producers = {o: n for n in out.graph.node for o in n.output}
    head = producers["logits"]
    assert head.op_type == "Gemm"  # the classifier writes the graph output itself (QGemm, float out)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "logits" for n in out.graph.node)


def test_cpu_conv_writing_a_graph_output_stays_float():
    b = GraphBuilder("tail", seed=1)
    x = b.input("x", [1, 8, 16, 16])
    x = b.relu(b.conv(x, 16, 3, name="body"))
    heat = b.sigmoid(b.conv(x, 1, 1, name="head"))
    model = b.build({"heat": heat})
    result = quantize(model, preset_fusions=False)
    notes = " ".join(result.records[0].notes)
    assert "head" in notes and "graph output" in notes
    producers = {o: n for n in result.model.graph.node for o in n.output}
    head = producers[producers["heat"].input[0]]
    assert head.op_type == "Conv"
    weight = next(i for i in result.model.graph.initializer if i.name == head.input[1])
    assert weight.data_type == onnx.TensorProto.FLOAT


def test_opset9_model_comes_out_valid_with_per_channel_weights(tmp_path):
    model = resnet_tiny(opset=9)
    result = quantize(model)
    out = result.model
    opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 13
    axes = [a.i for n in out.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes, "per-channel weights"
    ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    # as close as the same network written at opset 17 gets
    native = quantize(resnet_tiny(opset=17)).model
    held_out = feeds_for(model, 4, seed=2)
    assert fidelity(model, out, held_out)["cosine"] > fidelity(model, native, held_out)["cosine"] - 0.005


def test_weight_bits_7_keeps_weights_in_reduced_range():
    out = quantize(residual_net(), spec=FAST + ",weight_bits=7").model
    int8 = [numpy_helper.to_array(t) for t in out.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8 and max(int(np.abs(w).max()) for w in int8) <= 63


def test_bias_correction_lowers_the_error():
    model = residual_net(center=True)
    feeds = feeds_for(model, 8)
    held_out = feeds_for(model, 8, seed=5)
    common = FAST + ",weight_method=minmax,equalize=false"
    plain = quantize(model, spec=common + ",bias_correction=false", feeds=feeds).model
    corrected = quantize(model, spec=common + ",bias_correction=true", feeds=feeds).model
    assert fidelity(model, corrected, held_out)["rel_l2"] < fidelity(model, plain, held_out)["rel_l2"]


def test_every_calibration_method_gives_a_valid_close_model():
    model = residual_net()
    feeds = feeds_for(model, 6)
    for method in ("minmax", "percentile", "entropy", "mse"):
        out = quantize(model, spec=f"{FAST},method={method}", feeds=feeds).model
        assert fidelity(model, out, feeds)["cosine"] > 0.98, method


def test_exclude_keeps_named_layers_float():
    out = quantize(residual_net(), spec=FAST + ",exclude=/depthwise/Conv+Gemm").model
    by_name = {n.name: n for n in out.graph.node}
    inits = {t.name: t for t in out.graph.initializer}
    assert inits[by_name["/depthwise/Conv"].input[1]].data_type == onnx.TensorProto.FLOAT
    fc = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert inits[fc.input[1]].data_type == onnx.TensorProto.FLOAT


def _fake_speed(speed_of):
    """A LatencyProbe.compare that answers from the candidate models' structure (timing is not
    deterministic enough for a test; the decision logic is)."""
    def compare(self, baseline, candidates, feeds=None):
        return [speed_of(c) for c in candidates]
    return compare


def _int8_depthwise_weights(model) -> int:
    return sum(1 for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 and t.dims[1] == 1)


def test_layer_kinds_that_slow_the_model_stay_float(monkeypatch):
    from onnxopt.layer_timing import LatencyProbe

    # int8 helps, but int8 depthwise convs cost more than they save
    monkeypatch.setattr(LatencyProbe, "compare",
                        _fake_speed(lambda m: 1.5 - 0.3 * _int8_depthwise_weights(m)))
    result = quantize(residual_net(), spec="qdq-int8")
    out = result.model
    assert _int8_depthwise_weights(out) == 0
    assert any(t.data_type == onnx.TensorProto.INT8 for t in out.graph.initializer)
    assert any("depthwise layer(s) kept float" in n for n in result.records[-1].notes)


def test_nothing_is_quantized_when_int8_is_slower_than_float(monkeypatch):
    from onnxopt.layer_timing import LatencyProbe

    monkeypatch.setattr(LatencyProbe, "compare", _fake_speed(lambda m: 0.8))
    result = quantize(residual_net(), spec="qdq-int8")
    assert "QuantizeLinear" not in ops(result.model)
    assert any("every layer kept float" in n for n in result.records[-1].notes)


def test_layer_kind_names_the_conv_shapes():
    from onnxopt.passes.quantize import layer_kind
    from onnxopt.graph import import_model

    graph = import_model(residual_net())
    kinds = {n.name: layer_kind(n) for n in graph.nodes if n.op in ("Conv", "Gemm")}
    assert kinds["/depthwise/Conv"] == "depthwise"
    assert kinds["/left/Conv"] == "pointwise"
    assert kinds["/right/Conv"] == "spatial"
    assert kinds["/fc/Gemm"] == "dense"


def test_tolerance_keeps_sensitive_layers_float_until_it_holds():
    model = residual_net(center=True)
    feeds = feeds_for(model, 8)
    loose = quantize(model, feeds=feeds).model
    loose_cos = fidelity(model, loose, feeds)["cosine"]
    bound = 1 - (1 - loose_cos) / 4  # a quarter of the plain int8 error
    result = quantize(model, feeds=feeds, tolerance={"cosine": bound})
    record = result.records[-1]
    assert record.counters.get("layers_sensitive_kept_float", 0) >= 1
    assert fidelity(model, result.model, feeds)["cosine"] >= bound
    assert "QuantizeLinear" in ops(result.model)  # not everything went back to float


# ----------------------------------------------------------------------------- TensorRT
def test_tensorrt_placement_follows_explicit_quantization_rules():
    model = residual_net()
    out = quantize(model, target="tensorrt").model
    nodes = list(out.graph.node)
    producers = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # symmetric int8, zero point 0 everywhere
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for n in nodes:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
    # no Q on compute outputs: a Conv/Gemm output never feeds a QuantizeLinear directly
    for n in nodes:
        if n.op_type in ("Conv", "Gemm"):
            assert all(c.op_type != "QuantizeLinear" for c in consumers.get(n.output[0], []))
            data = producers.get(n.input[0])
            assert data is not None and data.op_type == "DequantizeLinear", n.name  # input quantized
            assert inits.get(n.input[2]) is None or inits[n.input[2]].dtype == np.float32  # float bias
    # residual Add: exactly one input is quantized (the skip)
    add = next(n for n in nodes if n.op_type == "Add")
    kinds = [producers[i].op_type for i in add.input]
    assert kinds.count("DequantizeLinear") == 1, kinds
    # MaxPool and Relu are not wrapped in Q/DQ
    pool = next(n for n in nodes if n.op_type == "MaxPool")
    assert producers[pool.input[0]].op_type != "DequantizeLinear"
    # Concat: its quantized tensors share one scale (its output feeds a Q after the pool)
    assert fidelity(model, out, feeds_for(model, 4, seed=3))["cosine"] > 0.98


def test_tensorrt_concat_inputs_and_output_share_one_scale():
    b = GraphBuilder("cat", seed=2)
    x = b.input("x", [1, 8, 16, 16])
    left = b.relu(b.conv(x, 8, 1, name="left"))
    right = b.relu(b.conv(x, 8, 3, name="right"))
    cat = b.concat([left, right], name="cat")
    y = b.conv(cat, 8, 1, name="after")
    z = b.conv(left, 8, 1, name="reads_left")  # makes one concat input quantized too
    model = b.build({"y": y, "z": z})
    out = quantize(model, target="tensorrt", preset_fusions=False).model
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    scale_of = {n.input[0]: float(inits[n.input[1]]) for n in out.graph.node if n.op_type == "QuantizeLinear"}
    cat_node = next(n for n in out.graph.node if n.op_type == "Concat")
    shared = {scale_of[t] for t in list(cat_node.input) + list(cat_node.output) if t in scale_of}
    assert len(shared) == 1 and len([t for t in cat_node.input if t in scale_of]) >= 1


def test_tensorrt_tiny_convs_stay_float():
    b = GraphBuilder("tiny", seed=2)
    x = b.input("x", [1, 2, 16, 16])
    x = b.relu(b.conv(x, 4, 1, name="tiny"))
    x = b.relu(b.conv(x, 32, 3, name="big"))
    y = b.conv(x, 16, 3, name="big2")
    model = b.build({"y": y})
    result = quantize(model, target="tensorrt", preset_fusions=False)
    assert any("tiny" in n and "TensorRT keeps it in float" in n for n in result.records[0].notes)


def test_no_quantizable_layer_leaves_the_graph_untouched():
    b = GraphBuilder("nothing", seed=2)
    x = b.input("x", [1, 4])
    y = b.sigmoid(x)
    model = b.build({"y": y})
    result = quantize(model, preset_fusions=False)
    assert ops(result.model) == ops(model)
    assert "no layer could be quantized" in " ".join(result.records[0].notes)
