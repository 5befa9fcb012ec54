"""weight-share: exact round trips, every storage form at every opset through onnx.checker and
onnxruntime (folded at load), the file really shrinking, per-channel, channel-scaled and
data-aware clustering measured on outputs, auto's layout choice, each layer layout, the
tolerance search, skip reasons and bad options."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxopt
from models import zoo
from onnxopt.calibration import CalibrationData
from onnxopt.context import PassContext
from onnxopt import weight_share_math as M
from onnxopt.activations import capture
from onnxopt.errors import UserInputError
from onnxopt.io import iter_proto_graphs
from onnxopt.metrics import compare
from onnxopt.registry import parse_pass_spec
from onnxopt.passes.weight_sharing import trial_model
from onnxopt.runtime import run_model
from tests.util import init, make_model, random_feeds, vi

FIXED = "data_aware=false,min_size=0,accuracy=none"


def _conv_model(weight, opset=17, group=1, transpose=False, hw=8):
    """x → Conv (or ConvTranspose) with ``weight`` → y."""
    op = "ConvTranspose" if transpose else "Conv"
    channels = weight.shape[0] if transpose else weight.shape[1] * group
    node = helper.make_node(op, ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=group, name="layer")
    return make_model([node], [vi("x", [1, channels, hw, hw])], [vi("y", ["n", "c", "h", "w"])], [init("w", weight)],
                      opset=opset)


def _matrix_model(weight, op="MatMul", trans_b=0, opset=17, rows=3):
    """x (rows, in) → MatMul(x, W) or Gemm(x, W, transB) → y."""
    inputs = weight.shape[1] if (op == "Gemm" and trans_b) else weight.shape[0]
    attrs = {"transB": trans_b} if op == "Gemm" else {}
    node = helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)
    return make_model([node], [vi("x", [rows, inputs])], [vi("y", ["m", "n"])], [init("w", weight)], opset=opset)


def _few_values(shape, count=11, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.normal(size=count).astype(dtype)[rng.integers(0, count, shape)]


def _optimize(model, spec, feeds=None, tolerance=None):
    ctx = PassContext(template=model, tolerance=tolerance or {},
                      calibration=CalibrationData.from_feeds(feeds) if feeds else None)
    result = onnxopt.optimize(model, passes=["weight-share:" + spec], ctx=ctx)
    onnx.checker.check_model(result.model, full_check=True)
    return result


def _notes(result):
    return [n for r in result.records for n in r.notes]


def _outputs(model, feeds, optimization="disable"):
    return [o["y"] for o in run_model(model, feeds, optimization=optimization)]


def _rel_l2(before, after, feeds):
    return max(compare(a, b)["rel_l2"] for a, b in zip(_outputs(before, feeds), _outputs(after, feeds)))


def _optimized_ops(model, tmp_path):
    """The ops of onnxruntime's optimized graph (what it runs after loading the model)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def _initializer_types(model):
    return {t.name: t.data_type for t in model.graph.initializer}


# ---------------------------------------------------------------------- exactness and storage forms
@pytest.mark.parametrize("opset", [9, 13, 21])
@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("granularity", ["layer", "channel", "scaled"])
def test_codebook_round_trips_exactly_at_every_opset_and_onnxruntime_folds_it(opset, bits, granularity, tmp_path):
    """layer / channel: bit-exact when 2^bits ≥ the distinct values; scaled is not exact (the
    channels' normalised values rarely coincide) but stays close."""
    model = _conv_model(_few_values((16, 128, 3, 3), count=1 << (bits - 1)), opset=opset)
    result = _optimize(model, f"bits={bits},granularity={granularity},{FIXED}")
    feeds = random_feeds(model, 2)
    for optimization in ("disable", "all"):
        before, after = _outputs(model, feeds, optimization), _outputs(result.model, feeds, optimization)
        if granularity == "scaled":
            assert max(compare(a, b)["rel_l2"] for a, b in zip(before, after)) < 0.1 / bits
        else:
            assert all(np.array_equal(a, b) for a, b in zip(before, after))
    ops = [n.op_type for n in result.model.graph.node]
    assert "Gather" in ops and "Cast" in ops and ("Mul" in ops) == (granularity == "scaled")
    assert ("BitShift" in ops) == (opset in (13, 21) and not (bits == 4 and opset == 21) and bits < 8)
    if bits == 4 and opset == 21:
        assert onnx.TensorProto.UINT4 in _initializer_types(result.model).values()
    optimized = _optimized_ops(result.model, tmp_path)
    assert not {"Gather", "BitShift", "Mul"} & set(optimized)  # folded at load: float weights again


@pytest.mark.parametrize("opset, int4", [(11, False), (13, False), (21, True)])
def test_dequantize_storage_loads_runs_and_stays_near(opset, int4):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(24, 16, 3, 3)).astype(np.float32)
    model = _conv_model(weight, opset=opset)
    result = _optimize(model, f"bits=4,storage=dequantize,{FIXED}")
    dq = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1
    per_channel = any(a.name == "axis" for a in dq[0].attribute)
    assert per_channel == (opset >= 13)
    assert (onnx.TensorProto.INT4 in _initializer_types(result.model).values()) == int4
    assert _rel_l2(model, result.model, random_feeds(model, 2)) < 0.25  # a 15-level grid
    if opset < 13:
        assert any("one scale per tensor" in n for n in _notes(result))


def test_dequantize_grid_with_few_levels_round_trips_exactly():
    """Weights already on a symmetric per-channel 4-bit grid come back exactly."""
    rng = np.random.default_rng(1)
    q = rng.integers(-7, 8, (8, 4, 3, 3))
    q[:, 0, 0, 0] = 7  # every channel reaches the grid's end, so the scale is recovered exactly
    weight = (q * (2.0 ** -np.arange(8))[:, None, None, None]).astype(np.float32)
    model = _conv_model(weight, opset=21)
    result = _optimize(model, f"bits=4,storage=dequantize,{FIXED}")
    feeds = random_feeds(model, 2)
    assert all(np.array_equal(a, b) for a, b in zip(_outputs(model, feeds), _outputs(result.model, feeds)))


@pytest.mark.parametrize("storage", ["codebook", "dequantize"])
def test_float16_weights_keep_their_dtype(storage):
    weight = _few_values((16, 8, 3, 3), count=9, dtype=np.float16)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="layer")
    model = make_model([node], [vi("x", [1, 8, 6, 6], onnx.TensorProto.FLOAT16)],
                       [vi("y", ["n", "c", "h", "w"], onnx.TensorProto.FLOAT16)], [init("w", weight)], opset=13)
    result = _optimize(model, f"bits=4,storage={storage},{FIXED}")
    feeds = random_feeds(model, 1)
    out = _outputs(result.model, feeds)[0]
    assert out.dtype == np.float16
    if storage == "codebook":  # 9 values in a 16-entry float16 codebook: exact
        assert np.array_equal(out, _outputs(model, feeds)[0])


def test_the_file_shrinks_to_about_bits_over_32():
    rng = np.random.default_rng(2)
    model = _conv_model(rng.normal(size=(128, 128, 3, 3)).astype(np.float32), opset=13)
    before = len(model.SerializeToString())
    for bits in (3, 4, 6):
        result = _optimize(model, f"bits={bits},granularity=layer,{FIXED}")
        ratio = len(result.model.SerializeToString()) / before
        assert bits / 32 < ratio < bits / 32 + 0.01, (bits, ratio)
        counters = result.records[-1].counters
        assert counters["weight_bytes_before"] - counters["weight_bytes_after"] == counters["weight_bytes_saved"]
        assert counters["weight_bytes_saved"] > 0.8 * (1 - bits / 32) * 128 * 128 * 9 * 4


# ---------------------------------------------------------------------- accuracy
def test_output_error_falls_as_bits_rise():
    rng = np.random.default_rng(3)
    model = _conv_model((rng.standard_t(4, size=(32, 16, 3, 3)) * 0.1).astype(np.float32))
    feeds = random_feeds(model, 2)
    errors = [_rel_l2(model, _optimize(model, f"bits={b},{FIXED}").model, feeds) for b in (2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.03


@pytest.mark.parametrize("granularity, seed", [("channel", 4), ("scaled", 11)])
def test_per_channel_and_scaled_codebooks_beat_one_per_layer_on_the_outputs(granularity, seed):
    """Channel scales spread over two decades (a folded BatchNorm leaves them so): one codebook
    for the layer leaves the small channels a handful of values; per channel each gets 2^bits,
    and one codebook over channels divided by their max |w| (scaled) keeps their shape too.
    The outputs go through a per-channel normalisation (as the next BatchNorm would)."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.01, 1.0, 32)[:, None, None, None]  # channels 100× apart
    weight = (rng.normal(size=(32, 16, 3, 3)) * scales).astype(np.float32)
    model = _conv_model(weight)
    feeds = random_feeds(model, 2)
    reference = _outputs(model, feeds)

    def channel_error(spec):
        out = _outputs(_optimize(model, spec).model, feeds)
        return max(float(np.mean(np.linalg.norm((o - r)[0].reshape(32, -1), axis=1)
                                 / np.linalg.norm(r[0].reshape(32, -1), axis=1))) for r, o in zip(reference, out))

    per_layer = channel_error(f"bits=4,granularity=layer,{FIXED}")
    shared = channel_error(f"bits=4,granularity={granularity},{FIXED}")
    assert shared < 0.3 * per_layer, (shared, per_layer)


def test_data_aware_centroids_beat_data_free_on_unequal_input_energies():
    """Four input features carry 100× the energy and meet small weights (a normalised input):
    data-free k-means spends the codebook on the big weights, data-aware on the ones that matter."""
    rng = np.random.default_rng(5)
    loud = np.arange(64) < 8
    weight = (rng.normal(size=(64, 48)) * np.where(loud, 0.1, 1.0)[:, None]).astype(np.float32)  # (in, out)
    model = _matrix_model(weight, rows=16)
    feeds = [{"x": (rng.normal(size=(16, 64)) * np.where(loud, 10.0, 1.0)).astype(np.float32)} for _ in range(4)]
    spec = "bits=4,granularity=layer,min_size=0,accuracy=none"
    free = _rel_l2(model, _optimize(model, spec + ",data_aware=false", feeds).model, feeds)
    aware = _rel_l2(model, _optimize(model, spec + ",data_aware=true", feeds).model, feeds)
    assert aware < 0.75 * free, (aware, free)  # measured 0.58


def test_tolerance_search_meets_its_budget_and_mixes_bits():
    model = zoo.resnet_tiny()
    feeds = random_feeds(model, 8, seed=1)
    result = _optimize(model, "min_size=2048", feeds, tolerance={"cosine": 0.999})
    reference, out = run_model(model, feeds), run_model(result.model, feeds)
    assert min(compare(r["logits"], o["logits"])["cosine"] for r, o in zip(reference, out)) >= 0.999
    notes = _notes(result)
    assert any("greedy moves within the tolerance" in n for n in notes)
    assert result.records[-1].counters["weight_bytes_saved"] > 0
    tighter = _optimize(model, "min_size=2048", feeds, tolerance={"cosine": 0.99999})
    assert tighter.records[-1].counters.get("weight_bytes_saved", 0) < result.records[-1].counters["weight_bytes_saved"]


def test_scaled_storage_counts_the_scale_vector():
    rng = np.random.default_rng(12)
    weight = rng.normal(size=(48, 32, 3, 3)).astype(np.float32)
    model = _conv_model(weight, opset=13)
    result = _optimize(model, f"bits=4,granularity=scaled,{FIXED}")
    counters = result.records[-1].counters
    stored = M.index_bytes(weight.size, 4) + 16 * 4 + 48 * 4  # packed indices + codebook + one scale per channel
    assert counters["weight_bytes_after"] == stored
    assert counters["weight_bytes_before"] - stored == counters["weight_bytes_saved"]
    scales = [t for t in result.model.graph.initializer if t.name.endswith("_channel_scales")]
    assert len(scales) == 1 and list(scales[0].dims) == [48, 1, 1, 1]
    assert any("one codebook × 48 channel scales" in n for n in _notes(result))
    # The file: the float weight replaced by what was counted, plus the expansion nodes' protobuf.
    overhead = len(result.model.SerializeToString()) - (len(model.SerializeToString()) - counters["weight_bytes_saved"])
    assert 0 < overhead < 2048


@pytest.mark.parametrize("shape, bits, exact_values, expected", [
    ((8, 512, 3, 3), 4, None, "per channel (8 rows)"),  # 8 codebooks of 16: tiny beside 36 864 indices
    ((64, 16, 3, 3), 6, None, "one codebook × 64 channel scales"),  # 64 codebooks of 64 would outweigh 6912 bytes
    ((64, 16, 3, 3), 6, 40, "per layer"),  # 40 distinct values fit one codebook: exact and smallest
])
def test_auto_picks_channel_or_scaled_and_layer_only_when_exact(shape, bits, exact_values, expected):
    rng = np.random.default_rng(13)
    weight = (_few_values(shape, count=exact_values) if exact_values
              else (rng.normal(size=shape) * np.geomspace(0.01, 1, shape[0])[:, None, None, None]).astype(np.float32))
    model = _conv_model(weight)
    result = _optimize(model, f"bits={bits},{FIXED}")
    assert any(f"{bits} bits {expected}" in n for n in _notes(result)), _notes(result)
    if exact_values:
        feeds = random_feeds(model, 1)
        assert np.array_equal(_outputs(model, feeds)[0], _outputs(result.model, feeds)[0])


def test_the_search_offers_channel_and_scaled_under_auto():
    from onnxopt.passes.weight_sharing import Candidate, Storage

    weight = np.random.default_rng(14).normal(size=(16, 8, 3, 3)).astype(np.float32)
    cand = Candidate(None, weight, [])  # the layouts offered depend on the values alone
    few = Candidate(None, _few_values((16, 8, 3, 3), count=10), [])
    auto = Storage("codebook", 17, "auto", True)
    assert auto.layouts(cand, 6) == ["channel", "scaled"]
    assert auto.layouts(few, 4) == ["channel", "scaled", "layer"] and auto.layouts(few, 3) == ["channel", "scaled"]
    for granularity in ("layer", "channel", "scaled"):
        assert Storage("codebook", 17, granularity, True).layouts(cand, 6) == [granularity]
    assert Storage("dequantize", 17, "scaled", True).layouts(cand, 6) == ["channel"]


# ---------------------------------------------------------------------- layouts
def test_conv_transpose_shares_per_output_channel_on_axis_1():
    weight = np.concatenate([_few_values((16, 1, 3, 3), count=3, seed=c) for c in range(6)], axis=1)  # (C_in, C_out)
    model = _conv_model(weight, transpose=True)
    result = _optimize(model, f"bits=2,granularity=channel,{FIXED}")  # 3 values per output channel: exact
    feeds = random_feeds(model, 2)
    assert all(np.array_equal(a, b) for a, b in zip(_outputs(model, feeds), _outputs(result.model, feeds)))
    assert any("per channel (6 rows)" in n for n in _notes(result))


@pytest.mark.parametrize("op, trans_b, shape, rows", [("MatMul", 0, (40, 30), 30), ("Gemm", 1, (30, 40), 30),
                                                      ("Gemm", 0, (40, 30), 30)])
def test_matrix_layers_share_per_output_column_or_row(op, trans_b, shape, rows):
    out_axis = 0 if trans_b else 1
    weight = np.concatenate([_few_values(shape[:out_axis] + (1,) + shape[out_axis + 1:], count=4, seed=c)
                             for c in range(shape[out_axis])], axis=out_axis)
    model = _matrix_model(weight, op, trans_b)
    result = _optimize(model, f"bits=2,granularity=channel,{FIXED}")
    feeds = random_feeds(model, 2)
    assert all(np.array_equal(a, b) for a, b in zip(_outputs(model, feeds), _outputs(result.model, feeds)))
    assert any(f"per channel ({rows} rows)" in n for n in _notes(result))


@pytest.mark.parametrize("op, trans_b, shape, out_axis", [("Conv", 0, (24, 8, 3, 3), 0), ("ConvTranspose", 0, (8, 24, 3, 3), 1),
                                                          ("Gemm", 1, (40, 64), 0), ("Gemm", 0, (64, 40), 1),
                                                          ("MatMul", 0, (64, 40), 1)])
def test_scaled_storage_on_every_layout_checks_runs_and_folds(op, trans_b, shape, out_axis, tmp_path):
    rng = np.random.default_rng(15)
    scale_shape = [1] * len(shape)
    scale_shape[out_axis] = -1
    weight = (rng.normal(size=shape) * np.geomspace(0.01, 1.0, shape[out_axis]).reshape(scale_shape)).astype(np.float32)
    if op in ("Conv", "ConvTranspose"):
        model = _conv_model(weight, transpose=op == "ConvTranspose")
    else:
        model = _matrix_model(weight, op, trans_b, rows=8)
    result = _optimize(model, f"bits=5,granularity=scaled,{FIXED}")  # onnx.checker inside
    assert any(f"one codebook × {shape[out_axis]} channel scales" in n for n in _notes(result))
    mul = [n for n in result.model.graph.node if n.op_type == "Mul"]
    scales = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}[mul[0].input[1]]
    assert scales.shape == tuple(shape[out_axis] if a == out_axis else 1 for a in range(len(shape)))
    feeds = random_feeds(model, 2)
    for optimization in ("disable", "all"):
        before, after = _outputs(model, feeds, optimization), _outputs(result.model, feeds, optimization)
        assert max(compare(a, b)["rel_l2"] for a, b in zip(before, after)) < 0.05
    assert not {"Gather", "BitShift", "Mul"} & set(_optimized_ops(result.model, tmp_path))


def test_grouped_conv_with_data_aware_importance():
    rng = np.random.default_rng(6)
    model = _conv_model(rng.normal(size=(16, 4, 3, 3)).astype(np.float32), group=4)
    feeds = random_feeds(model, 2)
    result = _optimize(model, "bits=5,min_size=0,accuracy=none", feeds)
    assert _rel_l2(model, result.model, feeds) < 0.1


def test_a_weight_read_by_two_layers_is_shared_once():
    weight = _few_values((32, 32), count=5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="second")]
    model = make_model(nodes, [vi("x", [2, 32])], [vi("y", ["m", "n"])], [init("w", weight)])
    result = _optimize(model, f"bits=3,{FIXED}", random_feeds(model, 2))
    ops = [n.op_type for n in result.model.graph.node]
    codebooks = [n for n in result.model.graph.node if n.op_type == "Gather" and "codebook" in n.input[0]]
    assert len(codebooks) == 1 and ops.count("MatMul") == 2
    counters = result.records[-1].counters
    assert counters["weights_shared"] == 1 and counters["layers_shared"] == 2
    feeds = random_feeds(model, 2)
    assert all(np.array_equal(a, b) for a, b in zip(_outputs(model, feeds), _outputs(result.model, feeds)))


def test_weights_inside_if_branches_are_shared():
    """The expansion lives in the main graph; Conv nodes inside both If branches read it."""
    model = zoo.tiny_if()
    result = onnxopt.optimize(model, passes=[f"weight-share:bits=3,granularity=layer,{FIXED}"])
    onnx.checker.check_model(result.model, full_check=True)
    notes = " | ".join(_notes(result))
    assert "then.conv.weight: 3 bits" in notes and "else.conv.weight: 3 bits" in notes
    # The expanded weights (main-graph tensors) put back as plain initializers give the same
    # outputs: the Conv nodes inside the branches read the expansions.
    names = {n.output[0]: n.input[0] for n in result.model.graph.node if n.op_type == "Gather"
             and "codebook" in n.input[0]}
    expanded = {}
    capture(result.model, list(names), random_feeds(model, 1), lambda name, value: expanded.setdefault(name, value))
    weights = {t.name: numpy_helper.to_array(t) for g in iter_proto_graphs(model.graph) for t in g.initializer}
    replaced = {names[out][:-len("_codebook")]: value for out, value in expanded.items()}
    assert set(replaced) == {"stem.weight", "then.conv.weight", "else.conv.weight", "fc.weight"}
    for name in ("stem.weight", "else.conv.weight", "fc.weight"):  # no BatchNorm after them: data-free
        assert np.array_equal(replaced[name], M.share_weight(weights[name], 3).expand())
    feeds = random_feeds(model, 6)
    for a, b in zip(run_model(trial_model(model, replaced), feeds), run_model(result.model, feeds)):
        assert compare(a["logits"], b["logits"])["rel_l2"] < 1e-5


def test_sharing_that_would_grow_a_weight_is_not_applied():
    model = _matrix_model(_few_values((16, 16)), rows=2)  # 1 KiB of floats; an 8-bit codebook alone is 1 KiB
    result = _optimize(model, f"bits=8,{FIXED}")
    assert not result.records[-1].changed
    assert any("would not be smaller" in n for n in _notes(result))


# ---------------------------------------------------------------------- skips and bad options
def test_weights_it_cannot_share_are_left_with_a_reason():
    rng = np.random.default_rng(7)
    big = rng.normal(size=(64, 64)).astype(np.float32)
    small = rng.normal(size=(8, 8)).astype(np.float32)
    quantized = rng.integers(-127, 128, (64, 64)).astype(np.int8)
    nodes = [helper.make_node("MatMul", ["x", "shared_w"], ["a"], name="uses_shared"),
             helper.make_node("Add", ["a", "shared_w"], ["b"], name="also_reads_it"),
             helper.make_node("DequantizeLinear", ["q", "scale"], ["dq_w"], name="dq"),
             helper.make_node("MatMul", ["b", "dq_w"], ["c"], name="reads_dq"),
             helper.make_node("MatMul", ["c", "exclude_me"], ["d"], name="excluded_layer"),
             helper.make_node("Slice", ["d", "starts", "ends"], ["e"], name="cut"),
             helper.make_node("MatMul", ["e", "small_w"], ["y"], name="small_layer")]
    model = make_model(nodes, [vi("x", [64, 64])], [vi("y", ["m", "n"])],
                       [init("shared_w", big), init("q", quantized), init("scale", np.float32(0.01)),
                        init("exclude_me", big), init("starts", np.array([0], np.int64)),
                        init("ends", np.array([8], np.int64)), init("small_w", small)], opset=13)
    result = onnxopt.optimize(model, passes=["weight-share:bits=4,accuracy=none,data_aware=false,"
                                             "exclude=excluded_layer,min_size=100"])
    notes = " | ".join(_notes(result))
    assert "shared_w: also read by Add 'also_reads_it'" in notes
    assert "reads_dq: weight comes from DequantizeLinear (already quantized)" in notes
    assert "exclude_me: excluded" in notes
    assert "1 weight(s) under min_size=100" in notes
    assert not result.records[-1].changed


def test_bad_options_name_the_fix():
    model = _conv_model(np.ones((8, 8, 3, 3), np.float32))
    for spec in ("bits=9", "bits=-1", "ladder=8+12", "min_size=-5", "storage=dequantize,bits=1", "samples=0"):
        with pytest.raises(UserInputError):
            onnxopt.optimize(model, passes=["weight-share:" + spec])
    for spec in ("storage=zip", "granularity=row", "bits=four"):
        with pytest.raises(UserInputError):
            parse_pass_spec("weight-share:" + spec)


def test_old_opsets_get_a_note_and_nothing_is_written_below_opset_7():
    weight = np.random.default_rng(8).normal(size=(16, 16, 3, 3)).astype(np.float32)
    result = _optimize(_conv_model(weight, opset=9), f"bits=4,{FIXED}")
    assert any("indices take a byte each" in n for n in _notes(result))
    old = _conv_model(weight, opset=6)
    result = onnxopt.optimize(old, passes=[f"weight-share:bits=4,{FIXED}"])
    assert not result.records[-1].changed
    assert any("needs opset ≥ 7" in n for n in _notes(result))
