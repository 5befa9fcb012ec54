"""fold-batchnorm, fuse-conv-add, fuse-matmul-add: numeric equivalence and the cases that must not fuse."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt import graph as G
from onnxopt.context import PassContext
from onnxopt.registry import get_pass, make_pass
from tests.util import assert_same_outputs, init, make_model, op_types, random_feeds, run_passes, vi

RNG = np.random.default_rng(1234)
F16 = TensorProto.FLOAT16


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def bn_node(x, y, channels, name="bn", dtype=np.float32, epsilon=1e-3, opset_outputs=None):
    """A BatchNormalization node with non-trivial constant parameters and their initializers."""
    inits = [
        init(f"{name}_scale", (RNG.random(channels) + 0.5).astype(dtype)),
        init(f"{name}_bias", rand(channels, dtype=dtype)),
        init(f"{name}_mean", rand(channels, dtype=dtype)),
        init(f"{name}_var", (RNG.random(channels) + 0.2).astype(dtype)),
    ]
    node = helper.make_node("BatchNormalization", [x, f"{name}_scale", f"{name}_bias", f"{name}_mean", f"{name}_var"],
                            opset_outputs or [y], name=name, epsilon=epsilon)
    return node, inits


def build(nodes, inputs, outputs, initializers=(), opset=17):
    """make_model, with the graph outputs' shapes filled in by ONNX shape inference (onnx.checker
    wants them); intermediate value_info is dropped so passes see only what exporters declare."""
    model = onnx.shape_inference.infer_shapes(make_model(nodes, inputs, outputs, initializers, opset=opset))
    del model.graph.value_info[:]
    return model


def fused(model, *passes, tol=1e-5):
    """Run the passes, check the result against the original and return it."""
    out = run_passes(model, *passes)
    assert_same_outputs(model, out, rel_l2=tol)
    return out


# =========================================================================== fold-batchnorm
@pytest.mark.parametrize("bias,group,dilation", [(True, 1, 1), (False, 1, 1), (True, 2, 1), (False, 4, 1), (True, 1, 2)],
                         ids=["bias", "no-bias", "grouped", "depthwise", "dilated"])
def test_conv_bn_folds(bias, group, dilation):
    c_in, c_out = 4, 4 if group == 4 else 6
    inits = [init("w", rand(c_out, c_in // group, 3, 3))]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(init("b", rand(c_out)))
        conv_inputs.append("b")
    conv = helper.make_node("Conv", conv_inputs, ["c"], group=group, dilations=[dilation, dilation], pads=[1, 1, 1, 1])
    bn, bn_inits = bn_node("c", "y", c_out)
    model = build([conv, bn], [vi("x", [2, c_in, 9, 9])], [vi("y", None)], inits + bn_inits)
    out = fused(model, "fold-batchnorm")
    assert op_types(out) == ["Conv"]
    assert [o.name for o in out.graph.output] == ["y"]


def test_conv1d_bn_folds():
    conv = helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3])
    bn, bn_inits = bn_node("c", "y", 5)
    model = build([conv, bn], [vi("x", [1, 3, 10])], [vi("y", None)], [init("w", rand(5, 3, 3))] + bn_inits)
    assert op_types(fused(model, "fold-batchnorm")) == ["Conv"]


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn_folds(group):
    c_in, c_out = 4, 6
    # ConvTranspose weight layout: (C_in, C_out / group, kH, kW).
    conv = helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=group, strides=[2, 2])
    bn, bn_inits = bn_node("c", "y", c_out)
    model = build([conv, bn], [vi("x", [1, c_in, 5, 5])], [vi("y", None)],
                       [init("w", rand(c_in, c_out // group, 3, 3)), init("b", rand(c_out))] + bn_inits)
    assert op_types(fused(model, "fold-batchnorm")) == ["ConvTranspose"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_bn_folds(trans_b, with_c):
    k, m = 5, 7
    inits = [init("w", rand(m, k) if trans_b else rand(k, m))]
    inputs = ["x", "w"]
    if with_c:
        inits.append(init("cb", rand(1, m)))
        inputs.append("cb")
    gemm = helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.7, beta=1.3)
    bn, bn_inits = bn_node("g", "y", m)
    model = build([gemm, bn], [vi("x", [3, k])], [vi("y", None)], inits + bn_inits)
    assert op_types(fused(model, "fold-batchnorm")) == ["Gemm"]


def test_matmul_bn_becomes_gemm():
    mm = helper.make_node("MatMul", ["x", "w"], ["m"])
    bn, bn_inits = bn_node("m", "y", 6)
    model = build([mm, bn], [vi("x", ["N", 4])], [vi("y", None)], [init("w", rand(4, 6))] + bn_inits)
    assert op_types(fused(model, "fold-batchnorm")) == ["Gemm"]


def test_matmul_bn_with_3d_input_is_left_alone():
    # BN normalises axis 1; for a 3-D MatMul output that is not the weight's column axis.
    mm = helper.make_node("MatMul", ["x", "w"], ["m"])
    bn, bn_inits = bn_node("m", "y", 3)
    model = build([mm, bn], [vi("x", [2, 3, 4])], [vi("y", None)], [init("w", rand(4, 3))] + bn_inits)
    out = fused(model, "fold-batchnorm")
    assert op_types(out) == ["MatMul", "BatchNormalization"]


def test_bn_after_conv_graph_output_not_fused():
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    bn, bn_inits = bn_node("c", "y", 3)
    model = build([conv, bn], [vi("x", [1, 2, 4, 4])], [vi("c", None), vi("y", None)], [init("w", rand(3, 2, 1, 1))] + bn_inits)
    out = fused(model, "fold-batchnorm")
    assert op_types(out) == ["Conv", "BatchNormalization"]
    assert [o.name for o in out.graph.output] == ["c", "y"]


def test_bn_after_conv_with_two_consumers_not_fused():
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    bn, bn_inits = bn_node("c", "y", 3)
    relu = helper.make_node("Relu", ["c"], ["r"])
    model = build([conv, bn, relu], [vi("x", [1, 2, 4, 4])], [vi("y", None), vi("r", None)],
                       [init("w", rand(3, 2, 1, 1))] + bn_inits)
    out = fused(model, "fold-batchnorm")
    assert sorted(op_types(out)) == ["BatchNormalization", "Conv", "Relu"]


def test_bn_after_conv_with_runtime_weight_not_fused():
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    bn, bn_inits = bn_node("c", "y", 3)
    model = build([conv, bn], [vi("x", [1, 2, 4, 4]), vi("w", [3, 2, 1, 1])], [vi("y", None)], bn_inits)
    out = fused(model, "fold-batchnorm")
    assert op_types(out) == ["Conv", "BatchNormalization"]


def test_bn_after_relu_is_left_alone():
    relu = helper.make_node("Relu", ["x"], ["r"])
    bn, bn_inits = bn_node("r", "y", 2)
    model = build([relu, bn], [vi("x", [1, 2, 4, 4])], [vi("y", None)], bn_inits)
    assert op_types(fused(model, "fold-batchnorm")) == ["Relu", "BatchNormalization"]


def test_bn_with_training_outputs_not_fused():
    # Opset 9-13: a BN with running mean/var outputs is in training mode (batch statistics).
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    bn, bn_inits = bn_node("c", "y", 3, opset_outputs=["y", "rm", "rv", "sm", "sv"])
    model = build([conv, bn], [vi("x", [2, 2, 4, 4])], [vi("y", None)], [init("w", rand(3, 2, 1, 1))] + bn_inits, opset=12)
    out = run_passes(model, "fold-batchnorm")
    assert op_types(out) == ["Conv", "BatchNormalization"]


def test_bn_opset9_single_output_folds():
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    bn, bn_inits = bn_node("c", "y", 3)
    model = build([conv, bn], [vi("x", [2, 2, 4, 4])], [vi("y", None)], [init("w", rand(3, 2, 1, 1))] + bn_inits, opset=9)
    assert op_types(fused(model, "fold-batchnorm")) == ["Conv"]


def test_fp16_conv_bn_folds():
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1])
    bn, bn_inits = bn_node("c", "y", 4, dtype=np.float16)
    model = build([conv, bn], [vi("x", [1, 3, 6, 6], F16)], [vi("y", None, F16)],
                       [init("w", rand(4, 3, 3, 3, dtype=np.float16)), init("b", rand(4, dtype=np.float16))] + bn_inits)
    # The reference itself rounds to fp16 after Conv and again after BN, so the bound is fp16 precision.
    out = fused(model, "fold-batchnorm", tol=3e-3)
    assert op_types(out) == ["Conv"]
    weight = next(i for i in out.graph.initializer if i.name == out.graph.node[0].input[1])
    assert weight.data_type == F16


def test_conv_bn_inside_if_branch_folds():
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    bn, bn_inits = bn_node("c", "then_y", 3)
    then_graph = helper.make_graph([conv, bn], "then", [], [vi("then_y", None)], [init("w", rand(3, 3, 1, 1))] + bn_inits)
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["else_y"])], "else", [], [vi("else_y", None)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    model = build([node], [vi("cond", [], TensorProto.BOOL), vi("x", [1, 3, 3, 3])], [vi("y", None)])
    out = run_passes(model, "fold-batchnorm")
    feeds = [{"cond": np.array(True), "x": rand(1, 3, 3, 3)}]
    assert_same_outputs(model, out, feeds=feeds)
    then_branch = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node] == ["Conv"]


# =========================================================================== fuse-conv-add
def conv_then(op, const, *, const_first=False, bias=False, c_out=4, x_shape=(1, 3, 5, 5)):
    """Conv → op(conv, const) (or op(const, conv)) as a model; the output is 'y'."""
    inits = [init("w", rand(c_out, x_shape[1], *([3] * (len(x_shape) - 2)))), init("k", const)]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(init("b", rand(c_out)))
        conv_inputs.append("b")
    conv = helper.make_node("Conv", conv_inputs, ["c"])
    node = helper.make_node(op, ["k", "c"] if const_first else ["c", "k"], ["y"])
    return build([conv, node], [vi("x", list(x_shape))], [vi("y", None)], inits)


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (), (1,), (1, 1, 1, 1)])
def test_conv_add_per_channel_folds(shape):
    out = fused(conv_then("Add", rand(*shape)), "fuse-conv-add")
    assert op_types(out) == ["Conv"]


@pytest.mark.parametrize("shape", [(1, 1, 3, 3), (4, 3, 3), (3,), (2, 4, 1, 1), (1, 1, 4, 1, 1)],
                         ids=["spatial", "channel-and-spatial", "along-width", "bigger-batch", "higher-rank"])
def test_conv_add_not_per_channel_not_fused(shape):
    out = fused(conv_then("Add", rand(*shape)), "fuse-conv-add")
    assert op_types(out) == ["Conv", "Add"]


def test_conv1d_add_folds():
    out = fused(conv_then("Add", rand(1, 4, 1), x_shape=(2, 3, 8)), "fuse-conv-add")
    assert op_types(out) == ["Conv"]


def test_conv_with_bias_add_folds():
    out = fused(conv_then("Add", rand(4, 1, 1), bias=True, const_first=True), "fuse-conv-add")
    assert op_types(out) == ["Conv"]


@pytest.mark.parametrize("op,const_first", [("Sub", False), ("Sub", True), ("Mul", False), ("Mul", True), ("Div", False)])
@pytest.mark.parametrize("scalar", [False, True])
def test_conv_arithmetic_folds(op, const_first, scalar):
    const = rand() if scalar else rand(4, 1, 1)
    if op == "Div":
        const = np.where(np.abs(const) < 0.3, 0.5, const).astype(np.float32)
    out = fused(conv_then(op, const, const_first=const_first, bias=True), "fuse-conv-add")
    assert op_types(out) == ["Conv"]


def test_constant_divided_by_conv_not_fused():
    out = fused(conv_then("Div", (RNG.random((4, 1, 1)) + 1).astype(np.float32), const_first=True), "fuse-conv-add", tol=1e-4)
    assert op_types(out) == ["Conv", "Div"]


def test_conv_transpose_mul_add_chain_folds():
    conv = helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=2)
    mul = helper.make_node("Mul", ["c", "s"], ["m"])
    add = helper.make_node("Add", ["m", "t"], ["y"])
    model = build([conv, mul, add], [vi("x", [1, 4, 3, 3])], [vi("y", None)],
                       [init("w", rand(4, 3, 2, 2)), init("s", rand(1, 6, 1, 1)), init("t", rand(6, 1, 1))])
    assert op_types(fused(model, "fuse-conv-add")) == ["ConvTranspose"]


def test_conv_add_with_shared_conv_output_not_fused():
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    add = helper.make_node("Add", ["c", "k"], ["y"])
    relu = helper.make_node("Relu", ["c"], ["r"])
    model = build([conv, add, relu], [vi("x", [1, 2, 3, 3])], [vi("y", None), vi("r", None)],
                       [init("w", rand(3, 2, 1, 1)), init("k", rand(3, 1, 1))])
    assert sorted(op_types(fused(model, "fuse-conv-add"))) == ["Add", "Conv", "Relu"]


def test_conv_mul_with_runtime_weight_not_fused():
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    mul = helper.make_node("Mul", ["c", "k"], ["y"])
    model = build([conv, mul], [vi("x", [1, 2, 3, 3]), vi("w", [3, 2, 1, 1])], [vi("y", None)], [init("k", rand(3, 1, 1))])
    assert op_types(fused(model, "fuse-conv-add")) == ["Conv", "Mul"]


def test_residual_add_is_not_a_candidate():
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    add = helper.make_node("Add", ["c", "x"], ["y"])
    model = build([conv, add], [vi("x", [1, 3, 3, 3])], [vi("y", None)], [init("w", rand(3, 3, 1, 1))])
    result = onnxopt.optimize(model, passes=[make_pass(get_pass("fuse-conv-add"), {"explain": True})])
    assert op_types(result.model) == ["Conv", "Add"]
    assert result.records[0].notes == []


@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_add_folds_into_c(with_c):
    inputs = ["x", "w"] + (["cb"] if with_c else [])
    gemm = helper.make_node("Gemm", inputs, ["g"], transB=1, beta=0.5)
    add = helper.make_node("Add", ["g", "k"], ["y"])
    inits = [init("w", rand(6, 4)), init("k", rand(6))] + ([init("cb", rand(6))] if with_c else [])
    model = build([gemm, add], [vi("x", [3, 4])], [vi("y", None)], inits)
    assert op_types(fused(model, "fuse-conv-add")) == ["Gemm"]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_mul_scales_columns(trans_b):
    gemm = helper.make_node("Gemm", ["x", "w", "cb"], ["g"], transB=trans_b, beta=2.0)
    mul = helper.make_node("Mul", ["k", "g"], ["y"])
    model = build([gemm, mul], [vi("x", [3, 4])], [vi("y", None)],
                       [init("w", rand(6, 4) if trans_b else rand(4, 6)), init("cb", rand(3, 1)), init("k", rand(1, 6))])
    assert op_types(fused(model, "fuse-conv-add")) == ["Gemm"]


def test_gemm_add_per_row_not_fused():
    gemm = helper.make_node("Gemm", ["x", "w"], ["g"])
    add = helper.make_node("Add", ["g", "k"], ["y"])
    model = build([gemm, add], [vi("x", [3, 4])], [vi("y", None)], [init("w", rand(4, 6)), init("k", rand(3, 1))])
    assert op_types(fused(model, "fuse-conv-add")) == ["Gemm", "Add"]


def test_gemm_add_with_runtime_c_not_fused():
    gemm = helper.make_node("Gemm", ["x", "w", "cb"], ["g"])
    add = helper.make_node("Add", ["g", "k"], ["y"])
    model = build([gemm, add], [vi("x", [3, 4]), vi("cb", [6])], [vi("y", None)], [init("w", rand(4, 6)), init("k", rand(6))])
    assert op_types(fused(model, "fuse-conv-add")) == ["Gemm", "Add"]


def test_matmul_mul_scales_columns_for_3d_input():
    mm = helper.make_node("MatMul", ["x", "w"], ["m"])
    mul = helper.make_node("Mul", ["m", "k"], ["y"])
    model = build([mm, mul], [vi("x", [2, 3, 4])], [vi("y", None)], [init("w", rand(4, 5)), init("k", rand(5))])
    assert op_types(fused(model, "fuse-conv-add")) == ["MatMul"]


def test_fp16_conv_add_folds():
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    add = helper.make_node("Add", ["c", "k"], ["y"])
    model = build([conv, add], [vi("x", [1, 3, 4, 4], F16)], [vi("y", None, F16)],
                       [init("w", rand(4, 3, 1, 1, dtype=np.float16)), init("k", rand(4, 1, 1, dtype=np.float16))])
    # One fp16 rounding of the bias instead of one of the sum: fp16 precision bound.
    assert op_types(fused(model, "fuse-conv-add", tol=3e-3)) == ["Conv"]


# =========================================================================== fuse-matmul-add
@pytest.mark.parametrize("bias_shape,const_first", [((6,), False), ((1, 6), True), ((), False)])
def test_matmul_add_becomes_gemm(bias_shape, const_first):
    mm = helper.make_node("MatMul", ["x", "w"], ["m"])
    add = helper.make_node("Add", ["k", "m"] if const_first else ["m", "k"], ["y"])
    model = build([mm, add], [vi("x", ["N", 4])], [vi("y", None)], [init("w", rand(4, 6)), init("k", rand(*bias_shape))])
    out = fused(model, "fuse-matmul-add")
    assert op_types(out) == ["Gemm"]
    assert [o.name for o in out.graph.output] == ["y"]


def test_matmul_add_after_flatten_becomes_gemm():
    flat = helper.make_node("Flatten", ["x"], ["f"])
    mm = helper.make_node("MatMul", ["f", "w"], ["m"])
    add = helper.make_node("Add", ["m", "k"], ["y"])
    model = build([flat, mm, add], [vi("x", [2, 2, 3])], [vi("y", None)], [init("w", rand(6, 5)), init("k", rand(5))])
    assert op_types(fused(model, "fuse-matmul-add")) == ["Flatten", "Gemm"]


def test_matmul_add_rank_from_shape_inference():
    # 'r' has no declared shape; its rank comes from ONNX shape inference.
    relu = helper.make_node("Relu", ["x"], ["r"])
    mm = helper.make_node("MatMul", ["r", "w"], ["m"])
    add = helper.make_node("Add", ["m", "k"], ["y"])
    model = build([relu, mm, add], [vi("x", [3, 4])], [vi("y", None)], [init("w", rand(4, 5)), init("k", rand(5))])
    assert op_types(fused(model, "fuse-matmul-add")) == ["Relu", "Gemm"]


def test_3d_matmul_add_left_alone():
    mm = helper.make_node("MatMul", ["x", "w"], ["m"])
    add = helper.make_node("Add", ["m", "k"], ["y"])
    model = build([mm, add], [vi("x", [2, 3, 4])], [vi("y", None)], [init("w", rand(4, 6)), init("k", rand(6))])
    assert op_types(fused(model, "fuse-matmul-add")) == ["MatMul", "Add"]


@pytest.mark.parametrize("case", ["runtime-weight", "per-row-bias", "graph-output", "shared"])
def test_matmul_add_not_fused(case):
    inputs, inits, outputs = [vi("x", [3, 4])], [init("k", rand(6))], [vi("y", None)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "k"], ["y"])]
    if case == "runtime-weight":
        inputs.append(vi("w", [4, 6]))
    else:
        inits.append(init("w", rand(4, 6)))
    if case == "per-row-bias":
        inits[0] = init("k", rand(3, 6))
    if case == "graph-output":
        outputs.append(vi("m", None))
    if case == "shared":
        nodes.append(helper.make_node("Relu", ["m"], ["r"]))
        outputs.append(vi("r", None))
    model = build(nodes, inputs, outputs, inits)
    out = fused(model, "fuse-matmul-add")
    assert "Gemm" not in op_types(out)


def test_fp16_matmul_add_becomes_gemm():
    mm = helper.make_node("MatMul", ["x", "w"], ["m"])
    add = helper.make_node("Add", ["m", "k"], ["y"])
    model = build([mm, add], [vi("x", [3, 4], F16)], [vi("y", None, F16)],
                       [init("w", rand(4, 6, dtype=np.float16)), init("k", rand(6, dtype=np.float16))])
    assert op_types(fused(model, "fuse-matmul-add", tol=3e-3)) == ["Gemm"]


# =========================================================================== together
def test_all_fusions_keep_names_and_pass_checker():
    bn, bn_inits = bn_node("c", "b", 4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             bn,
             helper.make_node("Mul", ["b", "s"], ["m"]),
             helper.make_node("Add", ["m", "t"], ["conv_out"]),
             helper.make_node("Flatten", ["conv_out"], ["f"]),
             helper.make_node("MatMul", ["f", "fc_w"], ["fc"]),
             helper.make_node("Add", ["fc", "fc_b"], ["logits"])]
    inits = [init("w", rand(4, 3, 3, 3)), init("s", rand(4, 1, 1)), init("t", rand(1, 4, 1, 1)),
             init("fc_w", rand(4 * 5 * 5, 10)), init("fc_b", rand(10))] + bn_inits
    model = build(nodes, [vi("x", [2, 3, 5, 5])], [vi("conv_out", None), vi("logits", None)], inits)
    out = run_passes(model, "fold-batchnorm", "fuse-conv-add", "fuse-matmul-add")
    onnx.checker.check_model(out, full_check=True)
    assert op_types(out) == ["Conv", "Flatten", "Gemm"]
    assert [o.name for o in out.graph.output] == ["conv_out", "logits"]
    assert_same_outputs(model, out, feeds=random_feeds(model, n=3))


def test_explain_notes_are_bounded_and_give_reasons():
    nodes, inits, outputs = [], [], []
    for i in range(5):  # five BNs whose Conv output is also a graph output
        nodes.append(helper.make_node("Conv", ["x", f"w{i}"], [f"c{i}"]))
        bn, bn_inits = bn_node(f"c{i}", f"y{i}", 3, name=f"bn{i}")
        nodes.append(bn)
        inits += [init(f"w{i}", rand(3, 2, 1, 1))] + bn_inits
        outputs += [vi(f"c{i}", None), vi(f"y{i}", None)]
    model = build(nodes, [vi("x", [1, 2, 3, 3])], outputs, inits)
    pass_ = make_pass(get_pass("fold-batchnorm"), {"explain": "true", "max_notes": "2"})
    result = onnxopt.optimize(model, passes=[pass_])
    notes = result.records[0].notes
    assert len(notes) == 3
    assert "graph output" in notes[0] and "bn0" in notes[0]
    assert notes[-1].startswith("... and 3 more")
    assert result.records[0].counters["candidates_rejected"] == 5

    quiet = get_pass("fold-batchnorm")().run(G.import_model(model), PassContext())
    assert quiet.notes == [] and not quiet.changed


def test_passes_are_registered_lossless():
    for name in ("fold-batchnorm", "fuse-conv-add", "fuse-matmul-add"):
        cls = get_pass(name)
        assert cls.lossless and cls.summary


def test_rank_inference_after_an_earlier_rewrite_in_the_same_run():
    # The Add folds first; the Mul then needs the rank of 'r' (not declared), which shape
    # inference must find although the run has already detached a node.
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Add", ["c", "k"], ["a"]),
             helper.make_node("ReduceMean", ["a"], ["r"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["r", "fc"], ["m"]),
             helper.make_node("Mul", ["m", "s"], ["y"])]
    inits = [init("w", rand(4, 3, 1, 1)), init("k", rand(4, 1, 1)), init("fc", rand(4, 5)), init("s", rand(1, 5))]
    model = build(nodes, [vi("x", [2, 3, 4, 4])], [vi("y", None)], inits, opset=13)
    assert op_types(fused(model, "fuse-conv-add")) == ["Conv", "ReduceMean", "MatMul"]


def notes_of(model, pass_name):
    """The explain notes (reasons of candidates that did not fuse) of one pass on ``model``."""
    result = onnxopt.optimize(model, passes=[make_pass(get_pass(pass_name), {"explain": True})])
    return result.records[0].notes


# =========================================================================== fold-batchnorm: BN before the reader
def bn_then_conv(group=1, c_in=4, c_out=6, bias=True, x_shape=None, **conv_attrs):
    """x → BatchNormalization → Conv(w[, b]) as a model; the output is 'y'."""
    bn, bn_inits = bn_node("x", "n", c_in)
    inits = [init("w", rand(c_out, c_in // group, 3, 3))] + ([init("b", rand(c_out))] if bias else [])
    conv = helper.make_node("Conv", ["n", "w"] + (["b"] if bias else []), ["y"], group=group, **conv_attrs)
    return build([bn, conv], [vi("x", list(x_shape or [2, c_in, 7, 7]))], [vi("y", None)], inits + bn_inits)


@pytest.mark.parametrize("group,c_out,bias,attrs", [
    (1, 6, True, {}),
    (1, 6, False, {"strides": [2, 2], "dilations": [2, 1]}),
    (2, 6, True, {"pads": [0, 0, 0, 0]}),
    (4, 4, False, {"auto_pad": "VALID"}),   # depthwise
    (4, 8, True, {}),                       # depthwise, channel multiplier 2
], ids=["group1", "strided-dilated-no-bias", "grouped-zero-pads", "depthwise-valid", "depthwise-x2"])
def test_bn_before_unpadded_conv_folds(group, c_out, bias, attrs):
    model = bn_then_conv(group=group, c_out=c_out, bias=bias, **attrs)
    out = fused(model, "fold-batchnorm")
    assert op_types(out) == ["Conv"]
    assert out.graph.node[0].input[0] == "x"


def test_bn_before_conv1d_folds():
    bn, bn_inits = bn_node("x", "n", 3)
    conv = helper.make_node("Conv", ["n", "w"], ["y"])
    model = build([bn, conv], [vi("x", [2, 3, 9])], [vi("y", None)], [init("w", rand(5, 3, 4))] + bn_inits)
    assert op_types(fused(model, "fold-batchnorm")) == ["Conv"]


@pytest.mark.parametrize("attrs,reason", [({"pads": [1, 1, 1, 1]}, "pads"), ({"pads": [0, 1, 0, 0]}, "pads"),
                                          ({"auto_pad": "SAME_UPPER"}, "auto_pad=SAME_UPPER")])
def test_bn_before_padded_conv_not_fused(attrs, reason):
    # A padded Conv reads 0 at the border where the BN output would hold its shift.
    model = bn_then_conv(**attrs)
    out = fused(model, "fold-batchnorm")
    assert op_types(out) == ["BatchNormalization", "Conv"]
    assert reason in notes_of(model, "fold-batchnorm")[0]


def test_bn_before_conv_with_shared_output_not_fused():
    bn, bn_inits = bn_node("x", "n", 3)
    nodes = [bn, helper.make_node("Conv", ["n", "w"], ["y"]), helper.make_node("Relu", ["n"], ["r"])]
    model = build(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None), vi("r", None)], [init("w", rand(2, 3, 1, 1))] + bn_inits)
    assert sorted(op_types(fused(model, "fold-batchnorm"))) == ["BatchNormalization", "Conv", "Relu"]


def test_bn_between_two_convs_folds_into_the_producer():
    bn, bn_inits = bn_node("c", "n", 4)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]), bn,
             helper.make_node("Conv", ["n", "w2"], ["y"], pads=[1, 1, 1, 1])]
    model = build(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", None)],
                  [init("w1", rand(4, 3, 3, 3)), init("w2", rand(2, 4, 3, 3))] + bn_inits)
    assert op_types(fused(model, "fold-batchnorm")) == ["Conv", "Conv"]


def test_bn_folding_nowhere_gives_one_note_with_both_reasons():
    bn, bn_inits = bn_node("r", "n", 3)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn, helper.make_node("Conv", ["n", "w"], ["y"], pads=[1, 1, 1, 1])]
    model = build(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], [init("w", rand(2, 3, 3, 3))] + bn_inits)
    result = onnxopt.optimize(model, passes=[make_pass(get_pass("fold-batchnorm"), {"explain": True})])
    assert result.records[0].counters["candidates_rejected"] == 1
    (note,) = result.records[0].notes
    assert "Relu" in note and "pads" in note


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (6,), (3, 1)], ids=["no-c", "row-c", "column-c"])
def test_bn_before_gemm_folds(trans_b, c_shape):
    k, m = 5, 6
    bn, bn_inits = bn_node("x", "n", k)
    inputs = ["n", "w"] + (["cb"] if c_shape else [])
    gemm = helper.make_node("Gemm", inputs, ["y"], transB=trans_b, alpha=0.7, beta=1.3)
    inits = [init("w", rand(m, k) if trans_b else rand(k, m))] + ([init("cb", rand(*c_shape))] if c_shape else [])
    model = build([bn, gemm], [vi("x", [3, k])], [vi("y", None)], inits + bn_inits)
    assert op_types(fused(model, "fold-batchnorm")) == ["Gemm"]


def test_bn_before_gemm_with_trans_a_not_fused():
    bn, bn_inits = bn_node("x", "n", 4)
    gemm = helper.make_node("Gemm", ["n", "w"], ["y"], transA=1)
    model = build([bn, gemm], [vi("x", [3, 4])], [vi("y", None)], [init("w", rand(3, 5))] + bn_inits)
    assert op_types(fused(model, "fold-batchnorm")) == ["BatchNormalization", "Gemm"]
    assert "transA=1" in notes_of(model, "fold-batchnorm")[0]


def test_bn_before_matmul_becomes_gemm():
    bn, bn_inits = bn_node("x", "n", 4)
    model = build([bn, helper.make_node("MatMul", ["n", "w"], ["y"])], [vi("x", ["N", 4])], [vi("y", None)],
                  [init("w", rand(4, 6))] + bn_inits)
    assert op_types(fused(model, "fold-batchnorm")) == ["Gemm"]


def test_bn_before_3d_matmul_not_fused():
    # BN normalises axis 1 (size 4), MatMul contracts the last axis (size 5).
    bn, bn_inits = bn_node("x", "n", 4)
    model = build([bn, helper.make_node("MatMul", ["n", "w"], ["y"])], [vi("x", [2, 4, 5])], [vi("y", None)],
                  [init("w", rand(5, 3))] + bn_inits)
    assert op_types(fused(model, "fold-batchnorm")) == ["BatchNormalization", "MatMul"]


# =========================================================================== Gemm + per-column constant
@pytest.mark.parametrize("op,const_first", [("Sub", False), ("Sub", True), ("Div", False), ("Add", True)])
def test_gemm_per_column_arithmetic_folds(op, const_first):
    # transA=1 and a per-row C (3, 1): the folded C becomes (3, 6).
    gemm = helper.make_node("Gemm", ["x", "w", "cb"], ["g"], transA=1, alpha=1.5, beta=0.5)
    node = helper.make_node(op, ["k", "g"] if const_first else ["g", "k"], ["y"])
    k = (RNG.random((1, 6)) + 0.5).astype(np.float32)
    model = build([gemm, node], [vi("x", [4, 3])], [vi("y", None)], [init("w", rand(4, 6)), init("cb", rand(3, 1)), init("k", k)])
    assert op_types(fused(model, "fuse-conv-add")) == ["Gemm"]


# =========================================================================== fuse-pad
def pad_node(opset, pads, *, value=None, axes=None, mode=None, x="x", y="p", name="pad"):
    """A Pad node in the form of ``opset`` (attributes before 11, inputs after) and its initializers."""
    attrs = {"mode": mode} if mode else {}
    if opset < 11:
        if value is not None:
            attrs["value"] = float(value)
        return helper.make_node("Pad", [x], [y], name=name, pads=list(pads), **attrs), []
    inputs, inits = [x, f"{name}_pads"], [init(f"{name}_pads", np.array(pads, dtype=np.int64))]
    if value is not None or axes is not None:
        inputs.append(f"{name}_value" if value is not None else "")
        if value is not None:
            inits.append(init(f"{name}_value", np.array(value, dtype=np.float32)))
    if axes is not None:
        inputs.append(f"{name}_axes")
        inits.append(init(f"{name}_axes", np.array(axes, dtype=np.int64)))
    return helper.make_node("Pad", inputs, [y], name=name, **attrs), inits


def pad_then(op, opset=13, padding=(0, 0, 1, 2, 0, 0, 2, 1), *, x_shape=(2, 4, 7, 7), before=None, pad_kwargs=None,
             extra_inits=(), extra_outputs=(), **attrs):
    """[before →] Pad(padding) → op(**attrs) as a model: op is Conv/ConvTranspose (weight 'w') or a pool; output 'y'."""
    nodes, inits = [], list(extra_inits)
    pad_input = "x"
    if before is not None:
        nodes.append(before)
        pad_input = before.output[0]
    pad, pad_inits = pad_node(opset, padding, x=pad_input, **(pad_kwargs or {}))
    nodes.append(pad)
    inits += pad_inits
    if op in ("Conv", "ConvTranspose"):
        group = attrs.get("group", 1)
        c = x_shape[1]
        if len(padding) == 2 * len(x_shape):  # channels after a (rejected) channel pad
            c += padding[1] + padding[len(x_shape) + 1]
        shape = (6, c // group, 3, 3) if op == "Conv" else (c, 6 // group, 3, 3)
        inits.append(init("w", rand(*shape)))
        nodes.append(helper.make_node(op, ["p", "w"], ["y"], **attrs))
    else:
        nodes.append(helper.make_node(op, ["p"], ["y"] + [o.name for o in extra_outputs], **attrs))
    return build(nodes, [vi("x", list(x_shape))], [vi("y", None)] + list(extra_outputs), inits, opset=opset)


@pytest.mark.parametrize("opset,pad_kwargs,attrs", [
    (9, {}, {}),
    (9, {"value": 0.0}, {"group": 2, "dilations": [2, 1], "pads": [1, 0, 0, 1]}),
    (11, {}, {"strides": [2, 2]}),
    (13, {"value": 0.0}, {"auto_pad": "VALID"}),
    (18, {"axes": [2, 3]}, {"group": 2}),
    (18, {"axes": [-1, -2], "value": 0.0}, {"pads": [1, 1, 1, 1]}),
], ids=["opset9-attrs", "opset9-value-grouped-dilated", "opset11-inputs", "opset13-value-valid",
        "opset18-axes", "opset18-negative-axes"])
def test_pad_into_conv(opset, pad_kwargs, attrs):
    padding = (0, 1, 0, 2) if "axes" in pad_kwargs else (0, 0, 1, 2, 0, 0, 2, 1)
    model = pad_then("Conv", opset, padding, pad_kwargs=pad_kwargs, **attrs)
    out = fused(model, "fuse-pad")
    assert op_types(out) == ["Conv"]
    conv = out.graph.node[0]
    assert conv.input[0] == "x"
    assert "auto_pad" not in [a.name for a in conv.attribute]


def test_pad_into_conv1d():
    pad, pad_inits = pad_node(13, (0, 0, 3, 0, 0, 1))
    conv = helper.make_node("Conv", ["p", "w"], ["y"])
    model = build([pad, conv], [vi("x", [1, 2, 9])], [vi("y", None)], [init("w", rand(3, 2, 3))] + pad_inits, opset=13)
    assert op_types(fused(model, "fuse-pad")) == ["Conv"]


@pytest.mark.parametrize("opset,padding,pad_kwargs,attrs,reason", [
    (9, (0, 0, 1, 1, 0, 0, 1, 1), {"value": 1.0}, {}, "not 0"),
    (13, (0, 0, 1, 1, 0, 0, 1, 1), {"value": -0.5}, {}, "not 0"),
    (13, (0, 1, 1, 1, 0, 0, 1, 1), {}, {}, "channel"),
    (13, (1, 0, 0, 0, 0, 0, 0, 0), {}, {}, "batch"),
    (13, (0, 0, 1, 1, 0, 0, 1, 1), {"mode": "reflect"}, {}, "reflect"),
    (13, (0, 0, 1, 1, 0, 0, 1, 1), {"mode": "edge"}, {}, "edge"),
    (13, (0, 0, -1, 1, 0, 0, 1, 1), {}, {}, "negative"),
    (13, (0, 0, 1, 1, 0, 0, 1, 1), {}, {"auto_pad": "SAME_UPPER"}, "SAME_UPPER"),
], ids=["value-attr", "value-input", "channel-axis", "batch-axis", "reflect", "edge", "cropping", "same-upper"])
def test_pad_into_conv_not_fused(opset, padding, pad_kwargs, attrs, reason):
    model = pad_then("Conv", opset, padding, pad_kwargs=pad_kwargs, **attrs)
    out = fused(model, "fuse-pad")
    assert op_types(out) == ["Pad", "Conv"]
    assert reason in notes_of(model, "fuse-pad")[0]


def test_pad_with_runtime_pads_not_fused():
    pad = helper.make_node("Pad", ["x", "pads"], ["p"])
    conv = helper.make_node("Conv", ["p", "w"], ["y"])
    model = build([pad, conv], [vi("x", [1, 2, 5, 5]), vi("pads", [8], TensorProto.INT64)], [vi("y", None)],
                  [init("w", rand(3, 2, 3, 3))], opset=13)
    feeds = [{"x": rand(1, 2, 5, 5), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)}]
    out = run_passes(model, "fuse-pad")
    assert_same_outputs(model, out, feeds=feeds)
    assert op_types(out) == ["Pad", "Conv"]


def test_pad_into_conv_transpose_not_fused():
    model = pad_then("ConvTranspose", 13, (0, 0, 1, 1, 0, 0, 1, 1))
    assert op_types(fused(model, "fuse-pad")) == ["Pad", "ConvTranspose"]
    assert "crop" in notes_of(model, "fuse-pad")[0]


@pytest.mark.parametrize("case", ["two-convs", "graph-output"])
def test_shared_pad_not_fused(case):
    pad, pad_inits = pad_node(13, (0, 0, 1, 1, 0, 0, 1, 1))
    nodes = [pad, helper.make_node("Conv", ["p", "w"], ["y"])]
    outputs = [vi("y", None)]
    if case == "two-convs":
        nodes.append(helper.make_node("Conv", ["p", "w"], ["z"], strides=[2, 2]))
        outputs.append(vi("z", None))
    else:
        outputs.append(vi("p", None))
    model = build(nodes, [vi("x", [1, 2, 5, 5])], outputs, [init("w", rand(3, 2, 3, 3))] + pad_inits, opset=13)
    out = fused(model, "fuse-pad")
    assert op_types(out).count("Pad") == 1
    assert notes_of(model, "fuse-pad")


@pytest.mark.parametrize("opset", [9, 13])
def test_pad_into_average_pool_counting_pads(opset):
    model = pad_then("AveragePool", opset, (0, 0, 1, 0, 0, 0, 1, 2), kernel_shape=[3, 3], strides=[2, 2],
                     count_include_pad=1, pads=[1, 1, 0, 0])
    out = fused(model, "fuse-pad")
    assert op_types(out) == ["AveragePool"]
    pads = next(list(a.ints) for a in out.graph.node[0].attribute if a.name == "pads")
    assert pads == [2, 1, 1, 2]


@pytest.mark.parametrize("attrs,reason", [
    ({"count_include_pad": 0}, "count_include_pad=0"),
    ({"count_include_pad": 1, "ceil_mode": 1}, "ceil_mode"),
    ({"count_include_pad": 1, "pads": [2, 0, 0, 0]}, "smaller than kernel"),
])
def test_pad_into_average_pool_not_fused(attrs, reason):
    model = pad_then("AveragePool", 13, (0, 0, 1, 1, 0, 0, 1, 1), kernel_shape=[3, 3], **attrs)
    assert op_types(fused(model, "fuse-pad")) == ["Pad", "AveragePool"]
    assert reason in notes_of(model, "fuse-pad")[0]


@pytest.mark.parametrize("opset", [9, 13])
@pytest.mark.parametrize("producer", ["Relu", "Sigmoid", "Clip-0", "Softmax", "Abs"])
def test_pad_into_max_pool_after_non_negative_producer(producer, opset):
    if producer == "Clip-0":
        clip_min = {"min": 0.0, "max": 6.0} if opset < 11 else {}
        before = helper.make_node("Clip", ["x", "zero"] if opset >= 11 else ["x"], ["a"], **clip_min)
    else:
        before = helper.make_node(producer, ["x"], ["a"])
    inits = [init("zero", np.array(0.0, dtype=np.float32))] if producer == "Clip-0" and opset >= 11 else []
    model = pad_then("MaxPool", opset, (0, 0, 1, 2, 0, 0, 2, 1), before=before, extra_inits=inits,
                     kernel_shape=[3, 3], strides=[2, 2])
    out = fused(model, "fuse-pad")
    assert op_types(out) == [before.op_type, "MaxPool"]


@pytest.mark.parametrize("case,reason", [
    ("graph-input", "not produced by a node"),
    ("conv", "may be negative"),
    ("clip-negative-min", "Clip"),
    ("indices", "Indices"),
    ("dilated", "dilated"),
], ids=["graph-input", "conv", "clip-negative-min", "indices", "dilated"])
def test_pad_into_max_pool_not_fused(case, reason):
    before, inits, outputs = None, [], []
    attrs = {"kernel_shape": [3, 3]}
    if case == "conv":
        before = helper.make_node("Conv", ["x", "cw"], ["a"], pads=[1, 1, 1, 1])
        inits.append(init("cw", rand(4, 4, 3, 3)))
    elif case == "clip-negative-min":
        before = helper.make_node("Clip", ["x", "low"], ["a"])
        inits.append(init("low", np.array(-1.0, dtype=np.float32)))
    elif case in ("indices", "dilated"):
        before = helper.make_node("Relu", ["x"], ["a"])
        if case == "dilated":
            attrs["dilations"] = [2, 2]
        else:
            outputs.append(vi("idx", None, TensorProto.INT64))
    model = pad_then("MaxPool", 13, (0, 0, 1, 1, 0, 0, 1, 1), before=before, extra_inits=inits, extra_outputs=outputs,
                     **attrs)
    out = fused(model, "fuse-pad")
    assert op_types(out)[-2:] == ["Pad", "MaxPool"]
    assert reason in notes_of(model, "fuse-pad")[0]


def test_fuse_pad_is_registered_lossless():
    cls = get_pass("fuse-pad")
    assert cls.lossless and cls.summary


def test_fp16_bn_before_conv_folds():
    bn, bn_inits = bn_node("x", "n", 3, dtype=np.float16)
    conv = helper.make_node("Conv", ["n", "w", "b"], ["y"])
    model = build([bn, conv], [vi("x", [1, 3, 6, 6], F16)], [vi("y", None, F16)],
                  [init("w", rand(4, 3, 3, 3, dtype=np.float16)), init("b", rand(4, dtype=np.float16))] + bn_inits)
    # The reference rounds to fp16 after BN and after Conv: fp16 precision bound.
    out = fused(model, "fold-batchnorm", tol=3e-3)
    assert op_types(out) == ["Conv"]
    assert {i.data_type for i in out.graph.initializer} == {F16}


def test_keras_style_resnet_stem_collapses():
    # keras.applications ResNet50 stem: ZeroPadding2D(3) → Conv 7x7/2 → BN → ReLU → ZeroPadding2D(1) → MaxPool 3x3/2.
    pad1, inits1 = pad_node(13, (0, 0, 3, 3, 0, 0, 3, 3), name="pad1")
    pad2, inits2 = pad_node(13, (0, 0, 1, 1, 0, 0, 1, 1), x="r", y="p2", name="pad2")
    bn, bn_inits = bn_node("c", "n", 8)
    nodes = [pad1, helper.make_node("Conv", ["p", "w", "b"], ["c"], strides=[2, 2]), bn,
             helper.make_node("Relu", ["n"], ["r"]), pad2,
             helper.make_node("MaxPool", ["p2"], ["y"], kernel_shape=[3, 3], strides=[2, 2])]
    model = build(nodes, [vi("x", [1, 3, 32, 32])], [vi("y", None)],
                  [init("w", rand(8, 3, 7, 7)), init("b", rand(8))] + inits1 + inits2 + bn_inits)
    out = run_passes(model, "fold-batchnorm", "fuse-pad")
    assert_same_outputs(model, out, feeds=random_feeds(model, n=3))
    assert op_types(out) == ["Conv", "Relu", "MaxPool"]
