"""fuse-horizontal: sibling Conv/Gemm/MatMul merges, the cases that must not merge, and the target rule."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
import onnxopt.passes.horizontal  # noqa: F401  (registers fuse-horizontal)
from onnxopt.errors import UserInputError
from onnxopt.registry import parse_pass_spec
from tests.util import assert_same_outputs, init, make_model, op_types, run_passes, vi

RNG = np.random.default_rng(7)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def build(nodes, inputs, outputs, initializers=(), opset=17):
    """make_model with output shapes filled in by shape inference and intermediate value_info dropped."""
    model = onnx.shape_inference.infer_shapes(make_model(nodes, inputs, outputs, initializers, opset=opset))
    del model.graph.value_info[:]
    return model


def merged(model, spec="fuse-horizontal", target="tensorrt", tol=1e-5):
    """Run the pass, check the result against the original and return it."""
    out = run_passes(model, spec, target=target)
    assert_same_outputs(model, out, rel_l2=tol)
    return out


def counters(model, spec="fuse-horizontal", target="tensorrt"):
    result = onnxopt.optimize(model, passes=[spec], target=target)
    return result.records[0].counters, result.records[0].notes


def conv(i, x="x", c_in=4, c_out=3, k=1, bias=True, out=None, **attrs):
    """Conv node ``conv{i}`` reading ``x`` and its initializers."""
    inits = [init(f"w{i}", rand(c_out, c_in, k, k))]
    inputs = [x, f"w{i}"]
    if bias:
        inits.append(init(f"b{i}", rand(c_out)))
        inputs.append(f"b{i}")
    if k > 1 and "pads" not in attrs and "auto_pad" not in attrs:
        attrs["pads"] = [k // 2] * 4
    return helper.make_node("Conv", inputs, [out or f"c{i}"], name=f"conv{i}", **attrs), inits


def sibling_convs(n, biases=None, channels=(3, 5, 2, 4), readers=True, opset=17, **conv_attrs):
    """``n`` sibling convs on x; each output goes through its own Abs (not an activation, so it stays
    per branch) to the graph outputs ``y{i}``, or is a graph output itself when ``readers`` is False."""
    biases = biases if biases is not None else [True] * n
    nodes, inits, outputs = [], [], []
    for i in range(n):
        node, w = conv(i, c_out=channels[i], bias=biases[i], **conv_attrs)
        nodes.append(node)
        inits += w
        if readers:
            nodes.append(helper.make_node("Abs", [f"c{i}"], [f"y{i}"]))
            outputs.append(vi(f"y{i}", None))
        else:
            outputs.append(vi(f"c{i}", None))
    return build(nodes, [vi("x", [2, 4, 6, 6])], outputs, inits, opset=opset)


# =========================================================================== Conv + Split
@pytest.mark.parametrize("n,biases", [(2, [True, True]), (2, [False, False]), (3, [True, True, True]),
                                      (3, [False, True, False]), (3, [True, False, False])],
                         ids=["2-bias", "2-no-bias", "3-bias", "3-mixed", "3-mixed-first"])
def test_sibling_1x1_convs_become_one_conv_and_split(n, biases):
    model = sibling_convs(n, biases)
    out = merged(model)
    assert sorted(op_types(out)) == ["Abs"] * n + ["Conv", "Split"]
    conv_node = next(node for node in out.graph.node if node.op_type == "Conv")
    assert len(conv_node.input) == (3 if any(biases) else 2)
    split = next(node for node in out.graph.node if node.op_type == "Split")
    sizes = next(i for i in out.graph.initializer if i.name == split.input[1])
    assert onnx.numpy_helper.to_array(sizes).tolist() == [3, 5, 2][:n]


def test_branch_outputs_that_are_graph_outputs_keep_their_names():
    model = sibling_convs(3, readers=False)
    out = merged(model)
    assert op_types(out) == ["Conv", "Split"]
    assert [o.name for o in out.graph.output] == ["c0", "c1", "c2"]
    assert list(out.graph.node[1].output) == ["c0", "c1", "c2"]


@pytest.mark.parametrize("opset,sizes_as_input", [(11, False), (12, False), (13, True), (18, True)])
def test_split_form_follows_the_opset(opset, sizes_as_input):
    model = sibling_convs(2, opset=opset)
    out = merged(model)
    split = next(node for node in out.graph.node if node.op_type == "Split")
    attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
    assert attrs["axis"] == 1
    if sizes_as_input:
        assert len(split.input) == 2 and "split" not in attrs and "num_outputs" not in attrs
    else:
        assert len(split.input) == 1 and list(attrs["split"]) == [3, 5]


def test_fp16_convs_merge():
    nodes = [helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"y{i}"], name=f"conv{i}") for i in range(2)]
    inits = [init(f"w{i}", rand(3, 4, 1, 1, dtype=np.float16)) for i in range(2)]
    inits += [init(f"b{i}", rand(3, dtype=np.float16)) for i in range(2)]
    model = build(nodes, [vi("x", [1, 4, 5, 5], TensorProto.FLOAT16)],
                  [vi(f"y{i}", None, TensorProto.FLOAT16) for i in range(2)], inits)
    out = merged(model, tol=1e-3)
    assert op_types(out) == ["Conv", "Split"]


# =========================================================================== Concat: no Split
def concat_block(order=(0, 1, 2), extra_input=True, axis=1, activation=None, channels=(3, 5, 2)):
    """Three sibling convs (optionally + activation) feeding one Concat in ``order``, plus a pool branch."""
    nodes, inits = [], []
    for i in range(3):
        node, w = conv(i, c_out=channels[i])
        nodes.append(node)
        inits += w
        if activation:
            nodes.append(helper.make_node(activation, [f"c{i}"], [f"a{i}"], name=f"act{i}"))
    pieces = [f"a{i}" if activation else f"c{i}" for i in order]
    if extra_input:
        nodes.append(helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]))
        pieces.append("p")
    nodes.append(helper.make_node("Concat", pieces, ["y"], axis=axis))
    return build(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", None)], inits)


@pytest.mark.parametrize("order,axis", [((0, 1, 2), 1), ((2, 0, 1), 1), ((1, 2, 0), -3)],
                         ids=["graph-order", "other-order", "negative-axis"])
def test_siblings_into_a_concat_need_no_split(order, axis):
    out = merged(concat_block(order, axis=axis), target="cpu")  # Split-free merges apply on cpu too
    assert sorted(op_types(out)) == ["Concat", "Conv", "MaxPool"]
    concat = next(node for node in out.graph.node if node.op_type == "Concat")
    assert len(concat.input) == 2


def test_siblings_that_are_the_whole_concat_replace_it():
    out = merged(concat_block(extra_input=False, activation="Relu"), target="cpu")
    assert op_types(out) == ["Conv", "Relu"]
    assert out.graph.node[1].output[0] == "y" and out.graph.output[0].name == "y"


def test_concat_on_another_axis_needs_a_split():
    model = concat_block(axis=2, extra_input=False, channels=(3, 3, 3))
    assert sorted(op_types(merged(model, target="tensorrt"))) == ["Concat", "Conv", "Split"]
    assert op_types(run_passes(model, "fuse-horizontal", target="cpu")) == ["Conv", "Conv", "Conv", "Concat"]


def test_non_contiguous_concat_run_needs_a_split():
    # c0, p, c1: the siblings are not adjacent in the Concat
    nodes, inits = [], []
    for i in range(2):
        node, w = conv(i)
        nodes.append(node)
        inits += w
    nodes.append(helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[1, 1]))
    nodes.append(helper.make_node("Concat", ["c0", "p", "c1"], ["y"], axis=1))
    model = build(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", None)], inits)
    assert sorted(op_types(merged(model))) == ["Concat", "Conv", "MaxPool", "Split"]
    assert "Split" not in op_types(run_passes(model, "fuse-horizontal", target="cpu"))


# =========================================================================== activations
@pytest.mark.parametrize("op,attrs", [("Relu", {}), ("LeakyRelu", {"alpha": 0.2}), ("Sigmoid", {}),
                                      ("HardSigmoid", {"alpha": 0.3})])
def test_per_branch_activation_is_applied_once(op, attrs):
    nodes, inits = [], []
    for i in range(3):
        node, w = conv(i)
        nodes += [node, helper.make_node(op, [f"c{i}"], [f"y{i}"], **attrs)]
        inits += w
    model = build(nodes, [vi("x", [1, 4, 5, 5])], [vi(f"y{i}", None) for i in range(3)], inits)
    out = merged(model)
    assert op_types(out) == ["Conv", op, "Split"]
    assert [o.name for o in out.graph.output] == ["y0", "y1", "y2"]


def test_clip_with_equal_constant_bounds_is_applied_once():
    nodes, inits = [], [init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32)),
                        init("hi2", np.array(6, np.float32))]
    for i, hi in enumerate(["hi", "hi2"]):  # different tensors, equal values
        node, w = conv(i)
        nodes += [node, helper.make_node("Clip", [f"c{i}", "lo", hi], [f"y{i}"])]
        inits += w
    model = build(nodes, [vi("x", [1, 4, 5, 5])], [vi(f"y{i}", None) for i in range(2)], inits)
    assert op_types(merged(model)) == ["Conv", "Clip", "Split"]


def test_silu_gate_is_applied_once():
    nodes, inits = [], []
    for i in range(2):
        node, w = conv(i)
        nodes += [node, helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"]), helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"y{i}"])]
        inits += w
    model = build(nodes, [vi("x", [1, 4, 5, 5])], [vi(f"y{i}", None) for i in range(2)], inits)
    assert op_types(merged(model)) == ["Conv", "Sigmoid", "Mul", "Split"]


def test_different_activations_do_not_merge():
    nodes, inits = [], []
    for i, alpha in enumerate([0.1, 0.2]):
        node, w = conv(i)
        nodes += [node, helper.make_node("LeakyRelu", [f"c{i}"], [f"y{i}"], alpha=alpha)]
        inits += w
    model = build(nodes, [vi("x", [1, 4, 5, 5])], [vi(f"y{i}", None) for i in range(2)], inits)
    assert sorted(op_types(merged(model))) == ["Conv", "Conv", "LeakyRelu", "LeakyRelu"]
    _, notes = counters(model, "fuse-horizontal:explain=true")
    assert any("differ in kernel" in n for n in notes)


def test_activation_whose_input_is_also_read_elsewhere_stays_per_branch():
    nodes, inits = [], []
    for i in range(2):
        node, w = conv(i)
        nodes += [node, helper.make_node("Relu", [f"c{i}"], [f"y{i}"])]
        inits += w
    model = build(nodes, [vi("x", [1, 4, 5, 5])], [vi("y0", None), vi("y1", None), vi("c1", None)], inits)
    # c1 is a graph output: conv1 has no movable activation, conv0 has one: different settings
    assert sorted(op_types(merged(model))) == ["Conv", "Conv", "Relu", "Relu"]


# =========================================================================== what does not merge
def test_incompatible_siblings_merge_per_compatible_subgroup():
    specs = [dict(k=1), dict(k=3), dict(k=1), dict(k=3), dict(k=1, strides=[2, 2]), dict(k=3, pads=[0, 0, 0, 0])]
    nodes, inits, outputs = [], [], []
    for i, spec in enumerate(specs):
        node, w = conv(i, **spec)
        nodes.append(node)
        inits += w
        outputs.append(vi(f"c{i}", None))
    model = build(nodes, [vi("x", [1, 4, 7, 7])], outputs, inits)
    out = merged(model)
    assert sorted(op_types(out)) == ["Conv"] * 4 + ["Split"] * 2
    assert [o.name for o in out.graph.output] == [f"c{i}" for i in range(6)]
    c, _ = counters(model)
    assert c["groups_merged"] == 2 and c["branches_merged"] == 4


def test_grouped_convs_are_left_alone():
    nodes = [helper.make_node("Conv", ["x", f"w{i}"], [f"y{i}"], name=f"conv{i}", group=2) for i in range(2)]
    model = build(nodes, [vi("x", [1, 4, 5, 5])], [vi(f"y{i}", None) for i in range(2)],
                  [init(f"w{i}", rand(4, 2, 1, 1)) for i in range(2)])
    assert op_types(merged(model)) == ["Conv", "Conv"]
    c, notes = counters(model, "fuse-horizontal:explain=true")
    assert c.get("groups_merged", 0) == 0 and any("group=2" in n for n in notes)


def test_runtime_weight_is_left_alone():
    node0, w0 = conv(0)
    node1 = helper.make_node("Conv", ["x", "w_runtime"], ["c1"], name="conv1")
    node2, w2 = conv(2)
    model = build([node0, node1, node2], [vi("x", [1, 4, 5, 5]), vi("w_runtime", [3, 4, 1, 1])],
                  [vi(f"c{i}", None) for i in range(3)], w0 + w2)
    out = merged(model)
    assert sorted(op_types(out)) == ["Conv", "Conv", "Split"]  # conv0 and conv2 merge; conv1 stays
    _, notes = counters(model, "fuse-horizontal:explain=true")
    assert any("'w_runtime' is not constant" in n for n in notes)


def test_custom_domain_sibling_passes_through():
    node0, w0 = conv(0)
    node1, w1 = conv(1)
    custom = helper.make_node("Conv", ["x", "w0"], ["z"], domain="com.example")
    model = make_model([node0, node1, custom], [vi("x", [1, 4, 5, 5])], [vi("c0", None), vi("c1", None), vi("z", None)],
                       w0 + w1, extra_opsets=[("com.example", 1)])
    out = onnxopt.optimize(model, passes=["fuse-horizontal"], target="tensorrt").model
    assert sorted((n.domain, n.op_type) for n in out.graph.node) == [("", "Conv"), ("", "Split"), ("com.example", "Conv")]


def test_min_branches_and_max_out_channels():
    model = sibling_convs(3, readers=False)  # 3 + 5 + 2 channels
    assert op_types(merged(model, "fuse-horizontal:min_branches=4")) == ["Conv"] * 3
    out = merged(model, "fuse-horizontal:max_out_channels=6")  # first fit: [3, 2] and [5]
    assert sorted(op_types(out)) == ["Conv", "Conv", "Split"]
    assert max(onnx.numpy_helper.to_array(i).shape[0] for i in out.graph.initializer if i.name.endswith(".weight")) == 5


def test_concat_run_longer_than_max_out_channels_is_cut():
    out = merged(concat_block(extra_input=False), "fuse-horizontal:max_out_channels=8", target="cpu")
    assert sorted(op_types(out)) == ["Concat", "Conv", "Conv"]  # [3 + 5] and [2], no Split


def test_ops_option_limits_the_op_types():
    model = sibling_convs(2, readers=False)
    assert op_types(merged(model, "fuse-horizontal:ops=Gemm+MatMul")) == ["Conv", "Conv"]


@pytest.mark.parametrize("target", ["tensorrt", "cpu"])
def test_second_run_changes_nothing(target):
    for model in (sibling_convs(3, readers=False), concat_block(), inception_like()):
        result = onnxopt.optimize(model, passes=["fuse-horizontal:max_out_channels=8"], target=target)
        assert [r.changed for r in result.records][-1:] == [False]
        assert len(result.records) <= 2


@pytest.mark.parametrize("spec", ["fuse-horizontal:mode=sometimes", "fuse-horizontal:ops=Conv+Relu",
                                  "fuse-horizontal:min_branches=1"])
def test_bad_options_are_user_errors(spec):
    with pytest.raises(UserInputError):
        onnxopt.optimize(sibling_convs(2), passes=[parse_pass_spec(spec)])


# =========================================================================== Gemm and MatMul
@pytest.mark.parametrize("trans_b", [(0, 0), (1, 1), (0, 1)], ids=["transB0", "transB1", "mixed"])
def test_gemm_siblings_merge(trans_b):
    k, ns = 6, (4, 3)
    nodes, inits = [], []
    c_shapes = [(ns[0],), None]
    for i, (t, n, c_shape) in enumerate(zip(trans_b, ns, c_shapes)):
        inits.append(init(f"w{i}", rand(n, k) if t else rand(k, n)))
        inputs = ["x", f"w{i}"]
        if c_shape:
            inits.append(init(f"c{i}", rand(*c_shape)))
            inputs.append(f"c{i}")
        nodes.append(helper.make_node("Gemm", inputs, [f"y{i}"], transB=t, alpha=0.5 + i, beta=1.5))
    model = build(nodes, [vi("x", [3, k])], [vi(f"y{i}", None) for i in range(2)], inits)
    out = merged(model)
    assert op_types(out) == ["Gemm", "Split"]
    gemm = out.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in gemm.attribute}["transB"] == int(all(trans_b))


def test_gemm_with_transposed_input_and_row_bias_merges():
    nodes = [helper.make_node("Gemm", ["x", f"w{i}", f"c{i}"], [f"y{i}"], transA=1, alpha=2.0, beta=0.5) for i in range(2)]
    inits = [init(f"w{i}", rand(5, 3)) for i in range(2)] + [init(f"c{i}", rand(1, 3)) for i in range(2)]
    model = build(nodes, [vi("x", [5, 2])], [vi(f"y{i}", None) for i in range(2)], inits)
    assert op_types(merged(model)) == ["Gemm", "Split"]


def test_gemm_with_different_betas_folds_them_into_c():
    nodes = [helper.make_node("Gemm", ["x", f"w{i}", f"c{i}"], [f"y{i}"], transB=1, beta=beta)
             for i, beta in enumerate([0.5, 2.0])]
    inits = [init(f"w{i}", rand(3, 5)) for i in range(2)] + [init(f"c{i}", rand(3)) for i in range(2)]
    model = build(nodes, [vi("x", [2, 5])], [vi(f"y{i}", None) for i in range(2)], inits)
    out = merged(model)
    assert op_types(out) == ["Gemm", "Split"]
    attrs = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs["beta"] == 1.0 and attrs["transB"] == 1


def test_gemm_with_a_full_bias_matrix_is_left_alone():
    nodes = [helper.make_node("Gemm", ["x", f"w{i}", f"c{i}"], [f"y{i}"]) for i in range(2)]
    inits = [init(f"w{i}", rand(5, 3)) for i in range(2)] + [init(f"c{i}", rand(2, 3)) for i in range(2)]
    model = build(nodes, [vi("x", [2, 5])], [vi(f"y{i}", None) for i in range(2)], inits)
    assert op_types(merged(model)) == ["Gemm", "Gemm"]


@pytest.mark.parametrize("x_shape,opset", [([2, 6], 17), ([2, 7, 6], 17), ([2, 7, 6], 10), (["N", "T", 6], 13)])
def test_matmul_siblings_with_bias_adds_merge(x_shape, opset):
    """Q/K/V-style projections: MatMul + per-column bias Add, one branch without a bias."""
    nodes, inits = [], []
    for i, n in enumerate((4, 4, 3)):
        inits.append(init(f"w{i}", rand(6, n)))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}" if i < 2 else "y2"]))
        if i < 2:
            inits.append(init(f"b{i}", rand(n)))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"] if i == 0 else [f"b{i}", f"m{i}"], [f"y{i}"]))
    model = build(nodes, [vi("x", x_shape)], [vi(f"y{i}", None) for i in range(3)], inits, opset=opset)
    out = merged(model)
    assert op_types(out) == ["MatMul", "Add", "Split"]
    split = out.graph.node[-1]
    axis = {a.name: helper.get_attribute_value(a) for a in split.attribute}["axis"]
    assert axis == (len(x_shape) - 1 if opset < 11 else -1)


def test_matmul_of_unknown_rank_before_opset_11_is_left_alone():
    # Split before opset 11 needs a non-negative axis, i.e. the rank of x
    def model(opset):
        nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(2)]
        return make_model(nodes, [vi("x", None)], [vi(f"y{i}", None) for i in range(2)],
                          [init(f"w{i}", rand(4, 5)) for i in range(2)], opset=opset)

    result = onnxopt.optimize(model(10), passes=["fuse-horizontal:explain=true"], target="tensorrt")
    assert op_types(result.model) == ["MatMul", "MatMul"]
    assert any("non-negative axis" in n for n in result.records[0].notes)
    assert op_types(onnxopt.optimize(model(11), passes=["fuse-horizontal"], target="tensorrt").model) == ["MatMul", "Split"]


def test_matmul_with_batched_weight_is_left_alone():
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(2)]
    model = build(nodes, [vi("x", [2, 3, 4])], [vi(f"y{i}", None) for i in range(2)],
                  [init(f"w{i}", rand(2, 4, 5)) for i in range(2)])
    assert op_types(merged(model)) == ["MatMul", "MatMul"]


# =========================================================================== subgraphs
def test_siblings_inside_an_if_branch_merge():
    n0, w0 = conv(0, out="t0")
    n1, w1 = conv(1, out="t1")
    concat = helper.make_node("Concat", ["t0", "t1"], ["then_y"], axis=1)
    then_graph = helper.make_graph([n0, n1, concat], "then", [], [vi("then_y", None)], w0 + w1)
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["else_y"])], "else", [], [vi("else_y", None)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    model = build([node], [vi("cond", [], TensorProto.BOOL), vi("x", [1, 4, 3, 3])], [vi("y", None)])
    out = run_passes(model, "fuse-horizontal", target="tensorrt")
    feeds = [{"cond": np.array(True), "x": rand(1, 4, 3, 3)}]
    assert_same_outputs(model, out, feeds=feeds)
    then_branch = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node] == ["Conv"]


# =========================================================================== target rule
def inception_like():
    """x → three 1x1 convs + Relu; one goes to the Concat, two feed 3x3 convs (the inception pattern)."""
    nodes, inits = [], []
    for i in range(3):
        node, w = conv(i, c_out=4)
        nodes += [node, helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        inits += w
    for i in (1, 2):
        node, w = conv(10 + i, x=f"r{i}", c_in=4, k=3, out=f"d{i}")
        nodes.append(node)
        inits += w
    nodes.append(helper.make_node("Concat", ["r0", "d1", "d2"], ["y"], axis=1))
    return build(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", None)], inits)


@pytest.mark.parametrize("target,mode,merges", [
    ("tensorrt", "auto", True), ("cuda", "auto", True), ("cpu", "auto", False),
    ("cpu", "always", True), ("cpu", "never-on-cpu", False), ("tensorrt", "never-on-cpu", True),
    ("tensorrt", "concat-only", False),
])
def test_target_decides_merges_that_need_a_split(target, mode, merges):
    model = inception_like()
    out = merged(model, f"fuse-horizontal:mode={mode}", target=target)
    assert ("Split" in op_types(out)) == merges
    assert op_types(out).count("Conv") == (3 if merges else 5)


@pytest.mark.parametrize("target,mode,merges", [
    ("cpu", "auto", True), ("cpu", "never-on-cpu", False), ("tensorrt", "concat-only", True)])
def test_target_decides_split_free_merges(target, mode, merges):
    out = merged(concat_block(activation="Relu"), f"fuse-horizontal:mode={mode}", target=target)
    assert op_types(out).count("Conv") == (1 if merges else 3)
    assert "Split" not in op_types(out)


def test_cpu_skip_is_explained():
    c, notes = counters(inception_like(), "fuse-horizontal:explain=true", target="cpu")
    assert c["groups_skipped_for_target"] == 1
    assert any("needs a Split" in n and "mode=always" in n for n in notes)
