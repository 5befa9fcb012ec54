"""fuse-conv-activation: Conv/Gemm (+ residual Add) + activation → com.microsoft FusedConv/FusedGemm.

Every fused model is run in onnxruntime's CPU provider (optimizations off) against the original.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
import onnxopt.passes.runtime_fusion  # noqa: F401  (registers fuse-conv-activation)
from tests.util import assert_same_outputs, init, make_model, op_types, random_feeds, vi

PASS = "fuse-conv-activation"
RNG = np.random.default_rng(7)
TOL = 1e-6


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def build(nodes, inputs, outputs, initializers=(), opset=17):
    """make_model with graph output shapes from ONNX shape inference; intermediate value_info dropped."""
    model = onnx.shape_inference.infer_shapes(make_model(nodes, inputs, outputs, initializers, opset=opset))
    del model.graph.value_info[:]
    return model


def optimize(model, target="cpu"):
    """Run the pass (with notes) and return (model, record of the first round)."""
    result = onnxopt.optimize(model, passes=[f"{PASS}:explain=true"], target=target)
    return result.model, result.records[0]


def fused(model, tol=TOL):
    """Run the pass, check the model and its opset imports, compare with the original; return it."""
    out, _ = optimize(model)
    onnx.checker.check_model(out)
    assert_same_outputs(model, out, rel_l2=tol)
    return out


def ms_opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain == "com.microsoft"), None)


def attrs_of(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def conv_act_model(act_nodes, act_inits=(), *, bias=True, opset=17, c_in=4, c_out=6, group=1, conv_attrs=None,
                   x_shape=(2, 4, 9, 9), dtype=np.float32):
    """x → Conv(w[, b]) → ``act_nodes`` (reading "c", writing "y")."""
    elem = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}[dtype]
    inits = [init("w", rand(c_out, c_in // group, 3, 3, dtype=dtype))]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(init("b", rand(c_out, dtype=dtype)))
        conv_inputs.append("b")
    attrs = {"pads": [1, 1, 1, 1]} if conv_attrs is None else conv_attrs
    conv = helper.make_node("Conv", conv_inputs, ["c"], name="conv", group=group, **attrs)
    return build([conv, *act_nodes], [vi("x", list(x_shape), elem)], [vi("y", None, elem)], inits + list(act_inits),
                 opset=opset)


def clip_inputs(lo, hi):
    """Clip-11+ inputs: "" for an omitted bound; initializers for the given ones."""
    names, inits = ["c"], []
    for name, value in (("lo", lo), ("hi", hi)):
        if value is None:
            names.append("")
        else:
            names.append(name)
            inits.append(init(name, np.array(value, dtype=np.float32)))
    while names[-1] == "":
        names.pop()
    return names, inits


# (case id, activation nodes builder → (nodes, inits, opset), expected activation, expected params)
def _act(op, **attrs):
    return lambda: ([helper.make_node(op, ["c"], ["y"], **attrs)], [], 17)


def _clip_attrs(**attrs):
    return lambda: ([helper.make_node("Clip", ["c"], ["y"], **attrs)], [], 6)


def _clip_inputs(lo, hi, opset):
    def make():
        names, inits = clip_inputs(lo, hi)
        return [helper.make_node("Clip", names, ["y"])], inits, opset
    return make


F32_MAX = float(np.finfo(np.float32).max)
ACTIVATION_CASES = [
    ("relu", _act("Relu"), "Relu", None),
    ("leakyrelu", _act("LeakyRelu", alpha=0.3), "LeakyRelu", [0.3]),
    ("leakyrelu-default", _act("LeakyRelu"), "LeakyRelu", [0.01]),
    ("sigmoid", _act("Sigmoid"), "Sigmoid", None),
    ("tanh", _act("Tanh"), "Tanh", None),
    ("hardsigmoid", _act("HardSigmoid", alpha=0.3, beta=0.4), "HardSigmoid", [0.3, 0.4]),
    ("hardsigmoid-default", _act("HardSigmoid"), "HardSigmoid", [0.2, 0.5]),
    ("clip6", _clip_attrs(min=-0.5, max=0.7), "Clip", [-0.5, 0.7]),
    ("clip6-no-max", _clip_attrs(min=0.0), "Clip", [0.0, F32_MAX]),
    ("clip11", _clip_inputs(0.0, 6.0, 11), "Clip", [0.0, 6.0]),
    ("clip13", _clip_inputs(-1.0, 1.0, 13), "Clip", [-1.0, 1.0]),
    ("clip13-min-only", _clip_inputs(0.0, None, 13), "Clip", [0.0, np.inf]),
    ("clip13-max-only", _clip_inputs(None, 0.5, 13), "Clip", [-np.inf, 0.5]),
]


# =========================================================================== Conv + activation
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("make_act,activation,params", [c[1:] for c in ACTIVATION_CASES],
                         ids=[c[0] for c in ACTIVATION_CASES])
def test_conv_activation_becomes_fused_conv(make_act, activation, params, bias):
    nodes, inits, opset = make_act()
    model = conv_act_model(nodes, inits, bias=bias, opset=opset)
    out = fused(model)
    assert op_types(out) == ["FusedConv"]
    node = out.graph.node[0]
    assert node.domain == "com.microsoft"
    assert list(node.input) == (["x", "w", "b"] if bias else ["x", "w"])
    assert [o.name for o in out.graph.output] == ["y"]
    got = attrs_of(node)
    assert got["activation"].decode() == activation
    if params is None:
        assert "activation_params" not in got
    else:
        np.testing.assert_allclose(got["activation_params"], np.float32(params), rtol=0)
    assert got["pads"] == [1, 1, 1, 1]
    assert ms_opset(out) == 1


@pytest.mark.parametrize("group,c_in,c_out,conv_attrs", [
    (2, 4, 6, {"pads": [1, 0, 1, 2], "strides": [2, 1]}),
    (4, 4, 4, {"pads": [2, 2, 2, 2], "dilations": [2, 2]}),  # depthwise
    (4, 4, 8, {"auto_pad": "SAME_UPPER", "strides": [2, 2], "kernel_shape": [3, 3]}),  # depthwise, multiplier 2
], ids=["grouped-strided", "depthwise-dilated", "depthwise-same-upper"])
def test_grouped_and_depthwise_conv_keep_their_attributes(group, c_in, c_out, conv_attrs):
    act = helper.make_node("LeakyRelu", ["c"], ["y"], alpha=0.2)
    model = conv_act_model([act], group=group, c_in=c_in, c_out=c_out, conv_attrs=conv_attrs)
    out = fused(model)
    assert op_types(out) == ["FusedConv"]
    got = attrs_of(out.graph.node[0])
    assert got["group"] == group
    for key, value in conv_attrs.items():
        assert (got[key].decode() if isinstance(got[key], bytes) else got[key]) == value


def test_conv1d_and_conv3d_fuse():
    conv1 = helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1])
    m1 = build([conv1, helper.make_node("Relu", ["c"], ["y"])], [vi("x", [1, 3, 10])], [vi("y", None)],
               [init("w", rand(5, 3, 3))])
    assert op_types(fused(m1)) == ["FusedConv"]
    conv3 = helper.make_node("Conv", ["x", "w", "b"], ["c"])
    m3 = build([conv3, helper.make_node("Tanh", ["c"], ["y"])], [vi("x", [1, 2, 4, 5, 6])], [vi("y", None)],
               [init("w", rand(3, 2, 2, 2, 2)), init("b", rand(3))])
    assert op_types(fused(m3)) == ["FusedConv"]


def test_chain_of_conv_relu_all_fuse_and_keep_names():
    nodes, inits = [], []
    x = "x"
    for i in range(3):
        inits += [init(f"w{i}", rand(4, 4, 3, 3)), init(f"b{i}", rand(4))]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}" if i < 2 else "y"])]
        x = f"r{i}"
    model = build(nodes, [vi("x", [1, 4, 8, 8])], [vi("y", None)], inits)
    out = fused(model)
    assert op_types(out) == ["FusedConv"] * 3
    assert [n.output[0] for n in out.graph.node] == ["r0", "r1", "y"]


# =========================================================================== what must not fuse
def notes_of(record) -> str:
    return "\n".join(record.notes)


def test_float16_conv_is_skipped_with_a_reason():
    model = conv_act_model([helper.make_node("Relu", ["c"], ["y"])], dtype=np.float16)
    out, record = optimize(model)
    assert op_types(out) == ["Conv", "Relu"]
    assert "float16" in notes_of(record) and "float32 only" in notes_of(record)
    assert ms_opset(out) is None


def test_float64_gemm_is_skipped():
    gemm = helper.make_node("Gemm", ["a", "w"], ["g"])
    model = build([gemm, helper.make_node("Relu", ["g"], ["y"])], [vi("a", [2, 3], TensorProto.DOUBLE)],
                  [vi("y", None, TensorProto.DOUBLE)], [init("w", rand(3, 4, dtype=np.float64))])
    out, record = optimize(model)
    assert op_types(out) == ["Gemm", "Relu"]
    assert "float64" in notes_of(record)


def test_conv_with_two_consumers_is_skipped():
    relu = helper.make_node("Relu", ["c"], ["y"])
    other = helper.make_node("Sigmoid", ["c"], ["z"])
    inits = [init("w", rand(6, 4, 3, 3))]
    model = build([helper.make_node("Conv", ["x", "w"], ["c"]), relu, other], [vi("x", [1, 4, 5, 5])],
                  [vi("y", None), vi("z", None)], inits)
    out, record = optimize(model)
    assert op_types(out) == ["Conv", "Relu", "Sigmoid"]
    assert "2 consumers" in notes_of(record)


def test_conv_output_that_is_a_graph_output_is_skipped():
    inits = [init("w", rand(6, 4, 3, 3))]
    model = build([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
                  [vi("x", [1, 4, 5, 5])], [vi("c", None), vi("y", None)], inits)
    out, record = optimize(model)
    assert op_types(out) == ["Conv", "Relu"]
    assert "graph output" in notes_of(record)


def test_clip_with_runtime_bound_is_skipped():
    clip = helper.make_node("Clip", ["c", "lo"], ["y"])
    model = build([helper.make_node("Conv", ["x", "w"], ["c"]), clip],
                  [vi("x", [1, 4, 5, 5]), vi("lo", [])], [vi("y", None)], [init("w", rand(6, 4, 3, 3))])
    out, record = optimize(model)
    assert op_types(out) == ["Conv", "Clip"]
    assert "not constant" in notes_of(record)


def test_unsupported_activation_and_other_producers_are_left_alone():
    # Elu is not a FusedConv activation; a Relu after MatMul has no fused kernel: no candidates, no notes.
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Elu", ["c"], ["y"])]
    model = build(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", None)], [init("w", rand(6, 4, 3, 3))])
    out, record = optimize(model)
    assert op_types(out) == ["Conv", "Elu"] and not record.changed
    mm = build([helper.make_node("MatMul", ["a", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
               [vi("a", [2, 3])], [vi("y", None)], [init("w", rand(3, 4))])
    out, record = optimize(mm)
    assert op_types(out) == ["MatMul", "Relu"] and not record.notes


@pytest.mark.parametrize("target", ["tensorrt", "cuda"])
def test_non_cpu_targets_leave_the_graph_unchanged(target):
    model = conv_act_model([helper.make_node("Relu", ["c"], ["y"])])
    out, record = optimize(model, target=target)
    assert op_types(out) == ["Conv", "Relu"]
    assert not record.changed
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
    assert ms_opset(out) is None
    assert f"target '{target}'" in notes_of(record)


def test_pass_is_registered_for_cpu_only():
    cls = onnxopt.get_pass(PASS)
    assert cls.targets == ("cpu",) and cls.lossless


def test_custom_domain_ops_pass_through():
    custom = helper.make_node("MyOp", ["c"], ["m"], domain="com.example")
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), custom, helper.make_node("Relu", ["m"], ["y"])],
                       [vi("x", [1, 4, 5, 5])], [vi("y", [1, 6, 3, 3])], [init("w", rand(6, 4, 3, 3))],
                       extra_opsets=[("com.example", 1)])
    out, record = optimize(model)
    assert op_types(out) == ["Conv", "MyOp", "Relu"] and not record.changed


# =========================================================================== Gemm + activation
GEMM_CASES = [
    ("relu", helper.make_node("Relu", ["g"], ["y"]), "Relu", {}),
    ("leakyrelu", helper.make_node("LeakyRelu", ["g"], ["y"], alpha=0.25), "LeakyRelu", {"activation_alpha": 0.25}),
    ("sigmoid", helper.make_node("Sigmoid", ["g"], ["y"]), "Sigmoid", {}),
    ("tanh", helper.make_node("Tanh", ["g"], ["y"]), "Tanh", {}),
    ("hardsigmoid", helper.make_node("HardSigmoid", ["g"], ["y"], alpha=0.3, beta=0.6), "HardSigmoid",
     {"activation_alpha": 0.3, "activation_beta": 0.6}),
]


@pytest.mark.parametrize("with_c", [True, False], ids=["with-C", "no-C"])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("act,activation,expected", [c[1:] for c in GEMM_CASES], ids=[c[0] for c in GEMM_CASES])
def test_gemm_activation_becomes_fused_gemm(act, activation, expected, trans_b, with_c):
    k, n = 5, 7
    inits = [init("w", rand(n, k) if trans_b else rand(k, n))]
    inputs = ["a", "w"]
    if with_c:
        inits.append(init("cb", rand(n)))
        inputs.append("cb")
    gemm = helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.7, beta=1.3)
    model = build([gemm, act], [vi("a", [3, k])], [vi("y", None)], inits)
    out = fused(model)
    assert op_types(out) == ["FusedGemm"]
    got = attrs_of(out.graph.node[0])
    assert got["activation"].decode() == activation
    assert got["transB"] == trans_b
    assert got["alpha"] == pytest.approx(0.7) and got["beta"] == pytest.approx(1.3)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value)
    assert ms_opset(out) == 1


def test_gemm_clip_is_skipped_with_a_reason():
    gemm = helper.make_node("Gemm", ["a", "w"], ["g"])
    names, inits = clip_inputs(0.0, 6.0)
    clip = helper.make_node("Clip", ["g"] + names[1:], ["y"])
    model = build([gemm, clip], [vi("a", [2, 3])], [vi("y", None)], [init("w", rand(3, 4))] + inits)
    out, record = optimize(model)
    assert op_types(out) == ["Gemm", "Clip"]
    assert "no Clip" in notes_of(record)


# =========================================================================== Conv + Add (+ activation)
def residual_model(act_op="Relu", *, bias=True, residual_shape=(2, 6, 9, 9), batch=2, add_order=("c", "r")):
    """x → Conv → Add(r) [→ act]; r is computed from a second input (so it is not constant)."""
    inits = [init("w", rand(6, 4, 3, 3))] + ([init("b", rand(6))] if bias else [])
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["z"], ["r"]),
             helper.make_node("Add", list(add_order), ["a" if act_op else "y"])]
    if act_op:
        nodes.append(helper.make_node(act_op, ["a"], ["y"]))
    return build(nodes, [vi("x", [batch, 4, 9, 9]), vi("z", [batch if d == 2 else d for d in residual_shape])],
                 [vi("y", None)], inits)


@pytest.mark.parametrize("act_op", ["Relu", "Sigmoid", None])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv_add_activation_becomes_fused_conv_with_z(act_op, bias):
    model = residual_model(act_op, bias=bias)
    out = fused(model)
    assert op_types(out) == ["Sigmoid", "FusedConv"]
    conv = out.graph.node[1]
    assert list(conv.input) == (["x", "w", "b", "r"] if bias else ["x", "w", "", "r"])
    got = attrs_of(conv)
    assert got.get("activation", b"").decode() == (act_op or "")
    assert list(conv.output) == ["y"]


def test_conv_add_with_residual_first_and_dynamic_batch():
    model = residual_model("Relu", batch="N", add_order=("r", "c"))
    out = fused(model)
    assert op_types(out) == ["Sigmoid", "FusedConv"]


def test_add_of_two_convs_fuses_one_as_z():
    inits = [init("w1", rand(6, 4, 3, 3)), init("w2", rand(6, 4, 1, 1)), init("b1", rand(6))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2"], ["c2"]),
             helper.make_node("Add", ["c1", "c2"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    model = build(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", None)], inits)
    out = fused(model)
    assert sorted(op_types(out)) == ["Conv", "FusedConv"]


def test_broadcasting_residual_is_skipped():
    # (1, 6, 1, 1) broadcasts over the output; FusedConv's Z must match it exactly.
    model = residual_model("Relu", residual_shape=(1, 6, 1, 1))
    out, record = optimize(model)
    assert op_types(out) == ["Conv", "Sigmoid", "Add", "Relu"]
    assert "does not broadcast" in notes_of(record)


def test_residual_add_before_graph_output_keeps_the_activation_separate():
    model = residual_model("Relu")
    model.graph.output.insert(0, helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 6, 9, 9]))
    out = fused(model)
    assert op_types(out) == ["Sigmoid", "FusedConv", "Relu"]
    assert "activation" not in attrs_of(out.graph.node[1])


# =========================================================================== models and subgraphs
def test_if_branch_conv_relu_fuses_and_model_runs():
    then_conv = helper.make_node("Conv", ["x", "w"], ["tc"], pads=[1, 1, 1, 1])
    then_relu = helper.make_node("Relu", ["tc"], ["t_out"])
    then_graph = helper.make_graph([then_conv, then_relu], "then", [], [vi("t_out", None)])
    else_graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["e_out"], pads=[1, 1, 1, 1])], "else", [],
                                   [vi("e_out", None)])
    if_node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    model = make_model([if_node], [vi("x", [1, 4, 5, 5]), vi("cond", [], TensorProto.BOOL)],
                       [vi("y", [1, 6, 5, 5])], [init("w", rand(6, 4, 3, 3))])
    out, record = optimize(model)
    onnx.checker.check_model(out)
    assert record.counters.get("conv_activation_fused") == 1
    then_out = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_out.node] == ["FusedConv"]
    assert ms_opset(out) == 1
    feeds = [{"x": rand(1, 4, 5, 5), "cond": np.array(c)} for c in (True, False)]
    assert_same_outputs(model, out, feeds=feeds, rel_l2=TOL)


def test_tiny_resnet_after_the_lossless_passes():
    from models.zoo import build as build_model

    model = build_model("resnet_tiny")
    base = onnxopt.optimize(model, passes=["fold-batchnorm", "eliminate-dead"]).model
    out, record = optimize(base)
    onnx.checker.check_model(out)
    assert "Relu" not in op_types(out) and "Add" not in op_types(out)
    assert record.counters["conv_add_fused"] > 0 and record.counters["conv_activation_fused"] > 0
    # FusedConv adds Z inside the GEMM accumulation (MLAS Beta = 1), i.e. in another order than
    # Conv-then-Add: over a whole network that is float noise of a few 1e-6, less than onnxruntime's
    # own ORT_ENABLE_ALL rewrite of the same model moves it (about 5e-6).
    assert_same_outputs(base, out, feeds=random_feeds(base, n=1), rel_l2=1e-5)
