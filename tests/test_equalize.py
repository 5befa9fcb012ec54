"""equalize-cross-layer and absorb-bias: outputs before/after in onnxruntime, equal weight ranges,
the pairs that must be skipped, and the fixed-point contract (a second run changes nothing)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import graph as G
from onnxopt.calibration import CalibrationData
from onnxopt.context import PassContext
from onnxopt.errors import UserInputError
from onnxopt.metrics import compare
from onnxopt.registry import get_pass, parse_pass_spec
from onnxopt.runtime import run_model
from tests.util import assert_same_outputs, init, make_model, op_types, vi

RNG = np.random.default_rng(7)
CLE = "equalize-cross-layer"


@pytest.fixture(autouse=True)
def fresh_rng(request):
    """Each test draws its own weights, whatever ran before it (pytest-xdist splits the file)."""
    global RNG
    RNG = np.random.default_rng(sum(map(ord, request.node.name)))


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def uneven(*shape, axis=0):
    """Random weights whose slices along ``axis`` span four orders of magnitude of range."""
    w = rand(*shape)
    factors = 10.0 ** RNG.uniform(-2, 2, shape[axis])
    return (w * factors.reshape([-1 if i == axis else 1 for i in range(len(shape))])).astype(np.float32)


def build(nodes, inputs, outputs, initializers=(), opset=17):
    model = onnx.shape_inference.infer_shapes(make_model(nodes, inputs, outputs, initializers, opset=opset))
    del model.graph.value_info[:]
    return model


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_weight(model, index: int, input_index: int = 1) -> np.ndarray:
    return weights(model)[model.graph.node[index].input[input_index]]


def run_once(model, spec=CLE, ctx=None):
    """One run of the pass on an imported graph: (PassResult, graph)."""
    graph = G.import_model(model)
    result = parse_pass_spec(spec).run(graph, ctx or PassContext(template=model))
    return result, graph


def equalized(model, spec=CLE, tol=1e-5):
    """Run through the PassManager, check outputs against the original, return the result model."""
    result = onnxopt.optimize(model, passes=[spec])
    onnx.checker.check_model(result.model)
    assert_same_outputs(model, result.model, rel_l2=tol)
    return result.model


# ---------------------------------------------------------------- independent range computations
def conv_out_ranges(w):
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def conv_in_ranges(w, group=1):
    c_out, c_in_g = w.shape[:2]
    per_group = c_out // group
    return np.array([np.abs(w[(i // c_in_g) * per_group:(i // c_in_g + 1) * per_group, i % c_in_g]).max()
                     for i in range(c_in_g * group)])


def assert_ranges_equal(r1, r2, rtol=1e-5):
    assert np.all(np.isfinite(r1)) and np.all(np.isfinite(r2))
    np.testing.assert_allclose(r1, r2, rtol=rtol)


def conv_pair(activation="Relu", act_attrs=None, act_inputs=(), act_inits=(), *, group1=1, group2=1,
              c_in=4, mid=6, c_out=5, pads=1):
    w1 = uneven(mid, c_in // group1, 3, 3)
    w2 = uneven(c_out, mid // group2, 3, 3, axis=1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], group=group1, pads=[1] * 4)]
    mid_name = "h"
    if activation:
        nodes.append(helper.make_node(activation, ["h", *act_inputs], ["a"], **(act_attrs or {})))
        mid_name = "a"
    nodes.append(helper.make_node("Conv", [mid_name, "w2", "b2"], ["y"], group=group2, pads=[pads] * 4))
    inits = [init("w1", w1), init("b1", rand(mid)), init("w2", w2), init("b2", rand(c_out)), *act_inits]
    return build(nodes, [vi("x", [2, c_in, 7, 7])], [vi("y", None)], inits)


# =========================================================================== equalize-cross-layer
@pytest.mark.parametrize("activation,attrs,extra,extra_inits", [
    ("Relu", None, (), ()),
    ("LeakyRelu", {"alpha": 0.1}, (), ()),
    ("PRelu", None, ("slope",), (init("slope", np.array([0.25], np.float32)),)),
    (None, None, (), ()),
], ids=["relu", "leakyrelu", "prelu", "no-activation"])
def test_conv_pair_is_equalized(activation, attrs, extra, extra_inits):
    model = conv_pair(activation, attrs, extra, extra_inits)
    out = equalized(model)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    w = weights(out)
    w1, w2 = w[convs[0].input[1]], w[convs[1].input[1]]
    assert_ranges_equal(conv_out_ranges(w1), conv_in_ranges(w2))
    before = conv_out_ranges(weights(model)["w1"]) / conv_in_ranges(weights(model)["w2"])
    assert before.max() / before.min() > 10  # the ranges really were unequal before
    assert op_types(out) == op_types(model)


def test_second_run_changes_nothing():
    model = conv_pair()
    first, graph = run_once(model)
    assert first.changed and first.counters["pairs_equalized"] == 1
    again = get_pass(CLE)().run(graph, PassContext(template=model))
    assert not again.changed
    assert "pairs_equalized" not in again.counters


def test_manager_reaches_fixed_point_in_two_rounds():
    result = onnxopt.optimize(conv_pair(), passes=[CLE, "eliminate-dead"])
    rounds = [r.round for r in result.records if r.name == CLE]
    changed = [r.changed for r in result.records if r.name == CLE]
    assert rounds == [1, 2] and changed == [True, False]


def test_depthwise_chain_equalizes_every_pair():
    # conv → relu → depthwise → relu → conv: the depthwise's channel i is input and output channel i.
    c = 6
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], pads=[1] * 4),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("Conv", ["a1", "wd", "bd"], ["h2"], group=c, pads=[1] * 4),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("Conv", ["a2", "w3", "b3"], ["y"])]
    inits = [init("w1", uneven(c, 3, 3, 3)), init("b1", rand(c)), init("wd", uneven(c, 1, 3, 3)), init("bd", rand(c)),
             init("w3", uneven(4, c, 1, 1, axis=1)), init("b3", rand(4))]
    model = build(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", None)], inits)
    result, _ = run_once(model)
    assert result.counters["pairs_equalized"] == 2 and result.counters["sweeps"] > 1
    out = equalized(model)
    w = weights(out)
    w1, wd, w3 = (w[n.input[1]] for n in out.graph.node if n.op_type == "Conv")
    # Converged to 1e-3 in log scale per sweep: ranges agree to about that.
    assert_ranges_equal(conv_out_ranges(w1), conv_out_ranges(wd), rtol=5e-3)
    assert_ranges_equal(conv_out_ranges(wd), conv_in_ranges(w3), rtol=5e-3)


@pytest.mark.parametrize("group1,group2", [(1, 2), (2, 3), (2, 1)])
def test_grouped_convs(group1, group2):
    model = conv_pair(group1=group1, group2=group2, c_in=4, mid=6, c_out=6)
    out = equalized(model)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    w = weights(out)
    assert_ranges_equal(conv_out_ranges(w[convs[0].input[1]]), conv_in_ranges(w[convs[1].input[1]], group2))


def gemm_model(first_op, second_op, trans_b1=0, trans_b2=0, c_shape=(6,), k=5, mid=6, n=4):
    inits, nodes = [], []
    w1 = uneven(mid, k, axis=0) if trans_b1 else uneven(k, mid, axis=1)
    w2 = uneven(n, mid, axis=1) if trans_b2 else uneven(mid, n, axis=0)
    inits += [init("w1", w1), init("w2", w2)]
    if first_op == "Gemm":
        inits.append(init("c1", rand(*c_shape)))
        nodes.append(helper.make_node("Gemm", ["x", "w1", "c1"], ["h"], transB=trans_b1, alpha=0.5, beta=2.0))
    else:
        nodes.append(helper.make_node("MatMul", ["x", "w1"], ["h"]))
    nodes.append(helper.make_node("Relu", ["h"], ["a"]))
    if second_op == "Gemm":
        inits.append(init("c2", rand(n)))
        nodes.append(helper.make_node("Gemm", ["a", "w2", "c2"], ["y"], transB=trans_b2, alpha=1.5))
    else:
        nodes.append(helper.make_node("MatMul", ["a", "w2"], ["y"]))
    return build(nodes, [vi("x", [3, k])], [vi("y", None)], inits)


def gemm_columns(w, trans_b, alpha=1.0):
    b = w.T if trans_b else w  # (K, N)
    return abs(alpha) * np.abs(b).max(axis=0), abs(alpha) * np.abs(b).max(axis=1)


@pytest.mark.parametrize("trans_b1", [0, 1])
@pytest.mark.parametrize("trans_b2", [0, 1])
def test_gemm_pair(trans_b1, trans_b2):
    model = gemm_model("Gemm", "Gemm", trans_b1, trans_b2)
    out = equalized(model)
    w = weights(out)
    g1, g2 = out.graph.node[0], out.graph.node[2]
    r1, _ = gemm_columns(w[g1.input[1]], trans_b1, alpha=0.5)
    _, r2 = gemm_columns(w[g2.input[1]], trans_b2, alpha=1.5)
    assert_ranges_equal(r1, r2)


@pytest.mark.parametrize("c_shape", [(), (1,), (1, 6), (3, 1), (3, 6)], ids=["scalar", "one", "row", "column", "full"])
def test_gemm_bias_shapes(c_shape):
    equalized(gemm_model("Gemm", "MatMul", c_shape=c_shape))


@pytest.mark.parametrize("first,second", [("MatMul", "MatMul"), ("MatMul", "Gemm"), ("Gemm", "MatMul")])
def test_matmul_pairs(first, second):
    out = equalized(gemm_model(first, second))
    assert op_types(out) == [first, "Relu", second]  # MatMul stays MatMul: no bias is added


def test_batched_matmul_pair():
    # MatMul on 3-D activations: channels are the last axis of both.
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"])]
    model = build(nodes, [vi("x", [2, 3, 5])], [vi("y", None)], [init("w1", uneven(5, 6, axis=1)), init("w2", uneven(6, 4))])
    result, _ = run_once(model)
    assert result.counters["pairs_equalized"] == 1
    equalized(model)


def test_zero_channels_stay_finite():
    model = conv_pair()
    w = weights(model)
    w1, w2 = w["w1"].copy(), w["w2"].copy()
    w1[0] = 0.0       # a dead filter of layer1
    w2[:, 1] = 0.0    # an input channel layer2 ignores
    for t in model.graph.initializer:
        if t.name in ("w1", "w2"):
            t.CopyFrom(numpy_helper.from_array(w1 if t.name == "w1" else w2, t.name))
    out = equalized(model)
    new = weights(out)
    for name, value in new.items():
        assert np.all(np.isfinite(value)), name
    assert np.all(new[out.graph.node[0].input[1]][0] == 0)


def test_tied_weights_are_copied():
    # Both convs read the same weight tensor: equalizing must not rewrite it under the other reader.
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1] * 4), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Conv", ["a", "w"], ["y"], pads=[1] * 4)]
    model = build(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", None)], [init("w", uneven(4, 4, 3, 3))])
    out = equalized(model)
    first, second = out.graph.node[0].input[1], out.graph.node[2].input[1]
    assert first != second


def test_inside_if_branch():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["then_y"])]
    then_graph = helper.make_graph(nodes, "then", [], [vi("then_y", None)],
                                   [init("w1", uneven(4, 3, 1, 1)), init("w2", uneven(2, 4, 1, 1, axis=1))])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["else_y"])], "else", [], [vi("else_y", None)])
    model = build([helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
                  [vi("cond", [], TensorProto.BOOL), vi("x", [1, 3, 4, 4])], [vi("y", None)])
    result, _ = run_once(model)
    assert result.changed and result.counters["pairs_equalized"] == 1
    out = onnxopt.optimize(model, passes=[CLE]).model
    feeds = [{"cond": np.array(True), "x": rand(1, 3, 4, 4)}]
    assert_same_outputs(model, out, feeds=feeds)


def test_fp16_pair():
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["y"])]
    inits = [init("w1", uneven(4, 3, 1, 1).astype(np.float16)), init("b1", rand(4).astype(np.float16)),
             init("w2", uneven(2, 4, 1, 1, axis=1).astype(np.float16))]
    model = build(nodes, [vi("x", [1, 3, 4, 4], TensorProto.FLOAT16)], [vi("y", None, TensorProto.FLOAT16)], inits)
    out = equalized(model, tol=5e-3)  # fp16 rounding of the rescaled weights
    assert all(t.data_type == TensorProto.FLOAT16 for t in out.graph.initializer)


# ---------------------------------------------------------------- pairs that must be skipped
def assert_skipped(model, reason):
    result, _ = run_once(model)
    assert not result.changed
    assert result.counters.get("pairs_rejected", 0) >= 1
    assert any(reason in note for note in result.notes), result.notes
    out = onnxopt.optimize(model, passes=[CLE]).model
    before, after = weights(model), weights(out)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("op,inputs,extra_inits", [
    ("Clip", ("lo", "hi"), (init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32)))),
    ("HardSwish", (), ()),
    ("Sigmoid", (), ()),
], ids=["clip-relu6", "hardswish", "sigmoid"])
def test_non_homogeneous_activation_is_skipped(op, inputs, extra_inits):
    assert_skipped(conv_pair(op, None, inputs, extra_inits), f"{op} '' between the layers")


def test_shared_intermediate_is_skipped():
    model = conv_pair()
    model.graph.node.append(helper.make_node("Sigmoid", ["h"], ["side"]))
    model.graph.output.append(vi("side", None))
    assert_skipped(model, "2 consumers")


def test_shared_activation_output_is_skipped():
    model = conv_pair()
    model.graph.node.append(helper.make_node("Sigmoid", ["a"], ["side"]))
    model.graph.output.append(vi("side", None))
    assert_skipped(model, "2 consumers")


def test_graph_output_in_the_middle_is_skipped():
    model = conv_pair()
    model.graph.output.append(vi("a", None))
    assert_skipped(model, "graph output")


def test_runtime_weight_is_skipped():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["y"])]
    model = build(nodes, [vi("x", [1, 3, 4, 4]), vi("w2", [2, 4, 1, 1])], [vi("y", None)], [init("w1", uneven(4, 3, 1, 1))])
    assert_skipped(model, "not constant")


def test_gemm_trans_a_second_is_skipped():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "w2"], ["y"], transA=1)]
    model = build(nodes, [vi("x", [4, 5])], [vi("y", None)], [init("w1", uneven(5, 4, axis=1)), init("w2", uneven(4, 3))])
    assert_skipped(model, "transA=1")


def test_conv_into_matmul_is_skipped():
    # Conv channels are axis 1; MatMul reads the last (spatial) axis.
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"])]
    model = build(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], [init("w1", uneven(4, 3, 1, 1)), init("w2", uneven(4, 4))])
    assert_skipped(model, "another axis")


def test_conv_then_add_is_no_candidate():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "x"], ["y"])]
    model = build(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], [init("w1", uneven(3, 3, 1, 1))])
    result, _ = run_once(model)
    assert not result.changed and not result.notes and not result.counters


def test_bad_options():
    with pytest.raises(UserInputError):
        run_once(conv_pair(), f"{CLE}:iterations=0")
    with pytest.raises(UserInputError):
        run_once(conv_pair(), f"{CLE}:tolerance=0")


def test_iteration_cap_reports_non_convergence():
    c = 6
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("Conv", ["a1", "wd"], ["h2"], group=c), helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("Conv", ["a2", "w3"], ["y"])]
    inits = [init("w1", uneven(c, 3, 1, 1)), init("wd", uneven(c, 1, 1, 1)), init("w3", uneven(4, c, 1, 1, axis=1))]
    model = build(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    result, _ = run_once(model, f"{CLE}:iterations=1")
    assert result.changed and result.counters["sweeps"] == 1
    assert any("not converged" in n for n in result.notes)


# =========================================================================== absorb-bias
ABSORB = "absorb-bias"


def feeds_for(shape, n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def absorbed(model, calibration_feeds, spec=ABSORB):
    ctx = PassContext(calibration=CalibrationData.from_feeds(calibration_feeds))
    result = onnxopt.optimize(model, passes=[spec], ctx=ctx)
    onnx.checker.check_model(result.model)
    return result.model, result.records[0]


def with_output(model, name):
    """A copy of ``model`` that also outputs tensor ``name``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(vi(name, None))
    return copy


def tensor_values(model, name, feeds):
    return np.concatenate([r[name].ravel() for r in run_model(with_output(model, name), feeds, optimization="disable")])


def rel_l2(before, after, feeds):
    ref = run_model(before, feeds, optimization="disable")
    out = run_model(after, feeds, optimization="disable")
    return max(compare(r[k], o[k])["rel_l2"] for r, o in zip(ref, out) for k in r)


# Channels 0, 1 and 3 sit far above 0 (bias 4 vs. a pre-activation spread of about 0.5);
# channel 2 straddles 0 and must keep its bias.
HIGH_BIAS = np.array([4.0, 3.0, 0.0, 5.0], np.float32)


def high_bias_convs(pads2=1, group2=1, c_out=3, size=6):
    w1 = (0.05 * rand(4, 3, 3, 3)).astype(np.float32)
    w2 = rand(c_out, 4 // group2, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1] * 4), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["y"], group=group2, pads=[pads2] * 4)]
    inits = [init("w1", w1), init("b1", HIGH_BIAS), init("w2", w2)]
    return build(nodes, [vi("x", [2, 3, size, size])], [vi("y", None)], inits)


def test_absorb_is_exact_without_padding_and_shrinks_ranges():
    model = high_bias_convs(pads2=0)
    calibration = feeds_for([2, 3, 6, 6], 8, seed=1)
    out, record = absorbed(model, calibration)
    assert record.changed and record.counters["pairs_absorbed"] == 1 and record.counters["channels_absorbed"] == 3
    assert op_types(out) == op_types(model)
    # Where the Relu stays active the rewrite is exact: an unpadded conv2 sees only such values.
    assert rel_l2(model, out, calibration) < 1e-5
    b1 = weights(out)[out.graph.node[0].input[2]]
    assert b1[2] == HIGH_BIAS[2], "a channel that is sometimes negative must not be absorbed"
    assert np.all(b1[[0, 1, 3]] < 0.5 * HIGH_BIAS[[0, 1, 3]])  # most of the bias moved on
    assert np.all(b1[[0, 1, 3]] >= 0)  # c_i never exceeds the observed minimum
    before = tensor_values(model, "a", calibration)
    after = tensor_values(out, "a", calibration)
    assert after.min() >= 0 and after.max() < before.max() - 1.5


def interior_rel_l2(before, after, feeds):
    """rel L2 of the outputs away from the border that conv2's zero padding reaches."""
    ys = [np.concatenate([r["y"][:, :, 1:-1, 1:-1] for r in run_model(m, feeds, optimization="disable")])
          for m in (before, after)]
    return compare(*ys)["rel_l2"]


def test_absorb_with_padding_is_exact_inside_and_close_on_fresh_data():
    model = high_bias_convs(pads2=1, size=16)
    calibration = feeds_for([2, 3, 16, 16], 8, seed=1)
    out, record = absorbed(model, calibration, spec=f"{ABSORB}:padded=true")
    assert record.changed
    # Border outputs miss the absorbed part of the zero padding: lossy there, exact inside.
    assert interior_rel_l2(model, out, calibration) < 1e-5
    held_out = feeds_for([2, 3, 16, 16], 4, seed=99)  # same distribution, unseen
    assert interior_rel_l2(model, out, held_out) < 1e-2
    border_error = rel_l2(model, out, held_out)
    # This toy's activations are mostly the absorbed constant, so the borders weigh a lot; the
    # error is the border's share, and falls as the image (and the interior) grows.
    assert 1e-3 < border_error < 0.5
    bigger = [{"x": np.tile(f["x"], (1, 1, 2, 2))} for f in held_out]
    as_big = [set_input_shape(m, [2, 3, 32, 32]) for m in (model, out)]
    assert rel_l2(*as_big, bigger) < 0.75 * border_error


def set_input_shape(model, shape):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    dims = copy.graph.input[0].type.tensor_type.shape.dim
    for d, size in zip(dims, shape):
        d.dim_value = size
    del copy.graph.output[:]
    copy.graph.output.append(vi("y", None))
    return copy


def test_absorb_skips_padded_convs_by_default():
    model = high_bias_convs(pads2=1)
    out, record = absorbed(model, feeds_for([2, 3, 6, 6], 4, seed=1))
    assert not record.changed
    assert any("pads its input" in n and "padded=true" in n for n in record.notes), record.notes


def test_absorb_needs_enough_values_per_channel():
    model = high_bias_convs(pads2=0)
    calibration = feeds_for([2, 3, 6, 6], 1, seed=1)  # 2 x 6 x 6 = 72 values per channel
    _, record = absorbed(model, calibration, spec=f"{ABSORB}:min_values=100")
    assert not record.changed
    assert any("only 72 calibration values" in n for n in record.notes), record.notes
    _, record = absorbed(model, calibration)
    assert record.changed


def test_absorb_on_random_data_says_so():
    # Without calibration data the context generates seeded random inputs: the note says so.
    result = onnxopt.optimize(high_bias_convs(pads2=0), passes=[ABSORB])
    assert any("random" in n for n in result.records[0].notes), result.records[0].notes


@pytest.mark.parametrize("group2,c_out", [(4, 4), (4, 8), (2, 4)], ids=["depthwise", "depth-multiplier", "grouped"])
def test_absorb_into_grouped_conv(group2, c_out):
    model = high_bias_convs(pads2=0, group2=group2, c_out=c_out)
    calibration = feeds_for([2, 3, 6, 6], 6, seed=2)
    out, record = absorbed(model, calibration)
    assert record.changed
    assert rel_l2(model, out, calibration) < 1e-5


@pytest.mark.parametrize("second", ["MatMul", "Gemm-transB"])
def test_absorb_gemm_into_gemm_or_matmul(second):
    w1 = (0.05 * rand(5, 4)).astype(np.float32)
    trans_b2 = second == "Gemm-transB"
    w2 = rand(3, 4) if trans_b2 else rand(4, 3)
    nodes = [helper.make_node("Gemm", ["x", "w1", "c1"], ["h"], beta=2.0),  # beta * C = HIGH_BIAS
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "w2"], ["y"], transB=1, alpha=0.5) if trans_b2
             else helper.make_node("MatMul", ["a", "w2"], ["y"])]
    inits = [init("w1", w1), init("w2", w2), init("c1", (HIGH_BIAS / 2).reshape(1, 4))]
    model = build(nodes, [vi("x", [8, 5])], [vi("y", None)], inits)
    calibration = feeds_for([8, 5], 8, seed=3)  # 64 samples per channel: min_values
    out, record = absorbed(model, calibration)
    assert record.changed and record.counters["channels_absorbed"] == 3
    assert rel_l2(model, out, calibration) < 1e-5
    assert op_types(out) == ["Gemm", "Relu", "Gemm"]  # a MatMul layer2 became a Gemm to carry the bias
    assert tensor_values(out, "a", calibration).max() < tensor_values(model, "a", calibration).max() - 1.5


def test_absorb_matmul_first_layer_without_bias_gets_one():
    # Pre-activations of MatMul without a bias: a channel whose inputs are always positive.
    w1 = np.abs(rand(5, 4)).astype(np.float32) + 0.5
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"])]
    model = build(nodes, [vi("x", [8, 5])], [vi("y", None)], [init("w1", w1), init("w2", rand(4, 3))])
    calibration = [{"x": (np.abs(f["x"]) + 1.0)} for f in feeds_for([8, 5], 8, seed=4)]
    out, record = absorbed(model, calibration)
    assert record.changed and op_types(out) == ["Gemm", "Relu", "Gemm"]
    assert rel_l2(model, out, calibration) < 1e-5


def test_absorb_skips_pairs_without_relu():
    model = conv_pair("LeakyRelu", {"alpha": 0.1})
    out, record = absorbed(model, feeds_for([2, 4, 7, 7], 2, seed=5))
    assert not record.changed
    assert any("needs a Relu" in n for n in record.notes), record.notes


def test_absorb_leaves_always_mixed_channels_alone():
    # No bias and zero-mean inputs: every pre-activation channel takes both signs.
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["y"])]
    model = build(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", None)], [init("w1", rand(4, 3, 3, 3)), init("w2", rand(2, 4, 1, 1))])
    ctx = PassContext(template=model, calibration=CalibrationData.from_feeds(feeds_for([2, 3, 6, 6], 2, seed=6)))
    result, _ = run_once(model, ABSORB, ctx)
    assert not result.changed
    assert result.counters.get("pairs_without_positive_channels") == 1


def test_absorb_bad_options():
    with pytest.raises(UserInputError):
        run_once(high_bias_convs(), f"{ABSORB}:sigmas=-1")
    with pytest.raises(UserInputError):
        run_once(high_bias_convs(), f"{ABSORB}:max_feeds=-2")


def test_absorb_max_feeds_limits_calibration():
    model = high_bias_convs(pads2=0)
    # The second feed holds an outlier that drives channel 0 below zero; with max_feeds=1 it is unseen.
    calm = feeds_for([2, 3, 6, 6], 1, seed=7)
    wild = [{"x": (calm[0]["x"] * 200).astype(np.float32)}]
    _, limited = absorbed(model, calm + wild, spec=f"{ABSORB}:max_feeds=1")
    _, full = absorbed(model, calm + wild)
    assert limited.counters["channels_absorbed"] > full.counters.get("channels_absorbed", 0)
