"""eliminate-dead and eliminate-identity on tiny graphs, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt.runtime import run_model
from tests.util import assert_same_outputs, init, make_model, op_types, run_passes, vi

FLOAT, BOOL, INT64 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64


def all_op_types(model: onnx.ModelProto) -> list[str]:
    """Op types of the main graph and every subgraph."""
    ops = []

    def visit(g):
        for n in g.node:
            ops.append(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)

    visit(model.graph)
    return ops


def signature(model: onnx.ModelProto):
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]


def check(model, *passes):
    """Run the passes, check the model signature is unchanged and outputs agree in onnxruntime."""
    out = run_passes(model, *passes)
    assert signature(out) == signature(model)
    assert_same_outputs(model, out)
    return out


# =========================================================================== eliminate-dead
def test_dead_nodes_and_unused_initializers_are_removed():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("MatMul", ["x", "w"], ["dead1"]),
             helper.make_node("Sigmoid", ["dead1"], ["dead2"])]
    m = make_model(nodes, [vi("x", [3, 2])], [vi("y", [3, 2])],
                   [init("w", w), init("unused", np.ones(4, np.float32))])
    out = check(m, "eliminate-dead")
    assert op_types(out) == ["Relu"]
    assert [i.name for i in out.graph.initializer] == []


def test_real_graph_inputs_stay_even_when_unused():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2]), vi("unused_input", [5])], [vi("y", [2])])
    out = run_passes(m, "eliminate-dead", "eliminate-identity", "cse")
    assert [i.name for i in out.graph.input] == ["x", "unused_input"]


def test_ir3_initializer_inputs_unused_are_dropped_used_are_kept():
    # IR < 4 lists every initializer as a graph input as well.
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    m = make_model(nodes, [vi("x", [2]), vi("w", [2]), vi("u", [2])], [vi("y", [2])],
                   [init("w", np.ones(2, np.float32)), init("u", np.ones(2, np.float32))], opset=8, ir_version=3)
    onnx.checker.check_model(m)
    out = check(m, "eliminate-dead")
    assert [i.name for i in out.graph.input] == ["x", "w"]
    assert [i.name for i in out.graph.initializer] == ["w"]


def test_constant_graph_inputs_unused_are_dropped_variables_stay():
    import onnx_graphsurgeon as gs

    from onnxopt.context import PassContext
    from onnxopt.passes.cleanup import EliminateDead

    x, unused_var = gs.Variable("x", np.float32, [2]), gs.Variable("unused_var", np.float32, [2])
    w, unused_const = gs.Constant("w", np.ones(2, np.float32)), gs.Constant("unused_const", np.ones(2, np.float32))
    y = gs.Variable("y", np.float32, [2])
    graph = gs.Graph(nodes=[gs.Node("Add", inputs=[x, w], outputs=[y])], inputs=[x, unused_var, w, unused_const],
                     outputs=[y], opset=17)
    result = EliminateDead().run(graph, PassContext())
    assert result.changed and result.counters["constant_inputs_removed"] == 1
    assert [t.name for t in graph.inputs] == ["x", "unused_var", "w"]


def test_unused_custom_domain_opset_import_is_dropped():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])],
                   extra_opsets=[("com.example", 1), ("ai.onnx.ml", 3)])
    out = run_passes(m, "eliminate-dead")
    assert {o.domain for o in out.opset_import} == {""}


def test_custom_domain_node_passes_through_with_its_opset():
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("MyOp", ["a"], ["b"], domain="com.example", alpha=0.5),
             helper.make_node("MyOp", ["a"], ["b2"], domain="com.example", alpha=0.5),
             helper.make_node("Add", ["b", "b2"], ["y"]),
             helper.make_node("MyOp", ["x"], ["unused"], domain="com.other")]
    m = make_model(nodes, [vi("x", [2])], [vi("y", [2])], extra_opsets=[("com.example", 1), ("com.other", 1)])
    out = run_passes(m, "eliminate-identity", "cse", "eliminate-dead")
    ops = [(n.domain, n.op_type) for n in out.graph.node]
    assert ops.count(("com.example", "MyOp")) == 2  # not merged: purity of custom ops is unknown
    assert ("", "Identity") not in ops
    domains = {o.domain: o.version for o in out.opset_import}
    assert domains.get("com.example") == 1 and "com.other" not in domains


def test_unused_optional_outputs_are_dropped():
    nodes = [helper.make_node("MaxPool", ["x"], ["p", "idx"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("LayerNormalization", ["p", "scale", "bias"], ["ln", "mean", "inv_std"], axis=-1),
             helper.make_node("Relu", ["ln"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 1, 4, 4])], [vi("y", [1, 1, 2, 2])],
                   [init("scale", np.ones(2, np.float32)), init("bias", np.zeros(2, np.float32))])
    out = check(m, "eliminate-dead")
    outputs = {n.op_type: list(n.output) for n in out.graph.node}
    assert outputs["MaxPool"] == ["p"]
    assert outputs["LayerNormalization"] == ["ln"]


def test_required_outputs_are_kept_even_when_unused():
    # TopK's Indices output is not optional in the schema: it stays.
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1)]
    m = make_model(nodes, [vi("x", [2, 5])], [vi("values", [2, 2])], [init("k", np.array([2], np.int64))])
    out = check(m, "eliminate-dead")
    assert list(out.graph.node[0].output) == ["values", "indices"]


def test_used_optional_output_is_kept():
    nodes = [helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2], strides=[2, 2])]
    m = make_model(nodes, [vi("x", [1, 1, 4, 4])], [vi("y", [1, 1, 2, 2]), vi("idx", [1, 1, 2, 2], INT64)])
    out = check(m, "eliminate-dead")
    assert list(out.graph.node[0].output) == ["y", "idx"]


def _branch(name, nodes, outputs):
    return helper.make_graph(nodes, name, [], outputs)


@pytest.mark.parametrize("cond", [True, False])
def test_if_with_constant_condition_is_inlined(cond):
    # Both branches read outer-scope tensors; the then branch passes one on through an Identity.
    then = _branch("then", [helper.make_node("Mul", ["a", "w"], ["t_mul"]),
                            helper.make_node("Relu", ["t_mul"], ["t_out"]),
                            helper.make_node("Identity", ["a"], ["t_a"])], [vi("t_out", [2]), vi("t_a", [2])])
    els = _branch("else", [helper.make_node("Sub", ["a", "w"], ["e_sub"]),
                           helper.make_node("Neg", ["a"], ["e_neg"])], [vi("e_sub", [2]), vi("e_neg", [2])])
    nodes = [helper.make_node("Abs", ["x"], ["a"]),
             helper.make_node("If", ["c"], ["r1", "r2"], then_branch=then, else_branch=els),
             helper.make_node("Add", ["r1", "r2"], ["y"])]
    m = make_model(nodes, [vi("x", [2])], [vi("y", [2]), vi("r1", [2])],
                   [init("w", np.array([2.0, -3.0], np.float32)), init("c", np.array(cond))])
    out = check(m, "eliminate-dead")
    assert "If" not in all_op_types(out)
    assert [o.name for o in out.graph.output] == ["y", "r1"]
    # The If output that was a graph output is now computed directly by the branch's node.
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    assert producers["r1"] == ("Relu" if cond else "Sub")


def test_inlined_branch_output_listed_twice_and_constant_output():
    then = _branch("then", [helper.make_node("Relu", ["x"], ["t"])], [vi("t", [2]), vi("t", [2]), vi("k", [2])])
    then.initializer.append(init("k", np.array([7.0, 8.0], np.float32)))
    els = _branch("else", [helper.make_node("Neg", ["x"], ["e1"]), helper.make_node("Abs", ["x"], ["e2"]),
                           helper.make_node("Exp", ["x"], ["e3"])], [vi("e1", [2]), vi("e2", [2]), vi("e3", [2])])
    nodes = [helper.make_node("If", ["c"], ["r1", "r2", "r3"], then_branch=then, else_branch=els),
             helper.make_node("Sum", ["r1", "r2", "r3"], ["y"])]
    m = make_model(nodes, [vi("x", [2])], [vi("y", [2]), vi("r2", [2]), vi("r3", [2])], [init("c", np.array(True))])
    out = run_passes(m, "eliminate-dead")
    assert "If" not in all_op_types(out)
    assert signature(out) == signature(m)
    # Compared with numpy: onnxruntime 1.32 mis-evaluates an If branch that lists one output twice.
    x = np.array([1.5, -2.0], np.float32)
    (got,) = run_model(out, [{"x": x}], optimization="disable")
    np.testing.assert_allclose(got["y"], 2 * np.maximum(x, 0) + [7.0, 8.0])
    np.testing.assert_allclose(got["r3"], [7.0, 8.0])


def test_inlined_branch_names_do_not_clash_with_other_scopes():
    # Two Ifs whose branches both define 'tmp'; inlining the first must not let the
    # second's 'tmp' shadow it.
    def branches(k):
        then = _branch(f"then{k}", [helper.make_node("Relu", ["x"], ["tmp"]),
                                    helper.make_node("Mul", ["tmp", "tmp"], [f"t{k}"])], [vi(f"t{k}", [2])])
        els = _branch(f"else{k}", [helper.make_node("Neg", ["x"], [f"e{k}"])], [vi(f"e{k}", [2])])
        return then, els

    t1, e1 = branches(1)
    t2, e2 = branches(2)
    nodes = [helper.make_node("If", ["c_const"], ["r1"], then_branch=t1, else_branch=e1),
             helper.make_node("If", ["c_input"], ["r2"], then_branch=t2, else_branch=e2),
             helper.make_node("Add", ["r1", "r2"], ["y"])]
    m = make_model(nodes, [vi("x", [2]), vi("c_input", [], BOOL)], [vi("y", [2])],
                   [init("c_const", np.array(True))])
    out = run_passes(m, "eliminate-dead")
    assert [n.op_type for n in out.graph.node].count("If") == 1
    main_names = {o for n in out.graph.node for o in n.output}
    assert "tmp" not in main_names  # renamed on the way up
    for c in (True, False):
        feeds = [{"x": np.array([1.5, -2.0], np.float32), "c_input": np.array(c)}]
        assert_same_outputs(m, out, feeds)


def test_nested_constant_ifs_are_inlined():
    inner = helper.make_node("If", ["c"], ["inner_out"],
                             then_branch=_branch("it", [helper.make_node("Exp", ["x"], ["ie"])], [vi("ie", [2])]),
                             else_branch=_branch("ie_", [helper.make_node("Neg", ["x"], ["in_"])], [vi("in_", [2])]))
    outer = helper.make_node("If", ["c"], ["y"],
                             then_branch=_branch("ot", [inner], [vi("inner_out", [2])]),
                             else_branch=_branch("oe", [helper.make_node("Abs", ["x"], ["oa"])], [vi("oa", [2])]))
    m = make_model([outer], [vi("x", [2])], [vi("y", [2])], [init("c", np.array([True]))])
    out = check(m, "eliminate-dead")
    assert all_op_types(out) == ["Exp"]


def test_dead_code_inside_subgraphs_is_removed():
    then = _branch("then", [helper.make_node("Relu", ["x"], ["t"]),
                            helper.make_node("Sigmoid", ["x"], ["dead"])], [vi("t", [2])])
    els = _branch("else", [helper.make_node("Neg", ["x"], ["e"])], [vi("e", [2])])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els)],
                   [vi("x", [2]), vi("c", [], BOOL)], [vi("y", [2])])
    out = run_passes(m, "eliminate-dead")
    assert "Sigmoid" not in all_op_types(out)
    for c in (True, False):
        assert_same_outputs(m, out, [{"x": np.array([1.0, -1.0], np.float32), "c": np.array(c)}])


# =========================================================================== eliminate-identity
def test_identity_chain_removed_and_output_names_kept():
    nodes = [helper.make_node("Identity", ["x"], ["i1"]),
             helper.make_node("Relu", ["i1"], ["r"]),
             helper.make_node("Identity", ["r"], ["i2"]),
             helper.make_node("Identity", ["i2"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])])
    out = check(m, "eliminate-identity")
    assert op_types(out) == ["Relu"]
    assert out.graph.node[0].output[0] == "y"


def test_identity_from_graph_input_to_graph_output_is_kept():
    m = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    out = check(m, "eliminate-identity")
    assert op_types(out) == ["Identity"]


def test_two_graph_outputs_from_one_identity_source_both_stay():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    m = make_model(nodes, [vi("x", [2])], [vi("y", [2]), vi("r", [2])])
    out = check(m, "eliminate-identity")
    assert [o.name for o in out.graph.output] == ["y", "r"]


def test_identity_returning_outer_value_from_subgraph_is_kept():
    # onnxruntime rejects a subgraph output that is an outer-scope value: the Identity must stay,
    # and the outer tensor must keep its name.
    then = _branch("then", [helper.make_node("Identity", ["a"], ["t"])], [vi("t", [2])])
    els = _branch("else", [helper.make_node("Neg", ["a"], ["e"])], [vi("e", [2])])
    nodes = [helper.make_node("Abs", ["x"], ["a"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els)]
    m = make_model(nodes, [vi("x", [2]), vi("c", [], BOOL)], [vi("y", [2])])
    out = run_passes(m, "eliminate-identity")
    assert all_op_types(out).count("Identity") == 1
    assert out.graph.node[0].output[0] == "a"
    for c in (True, False):
        assert_same_outputs(m, out, [{"x": np.array([1.0, -1.0], np.float32), "c": np.array(c)}])


def test_passes_reach_a_fixed_point():
    # A kept Identity (input → output) or an op turned into one must not count as a change again.
    nodes = [helper.make_node("Identity", ["x"], ["y1"]),
             helper.make_node("Mul", ["x", "one"], ["y2"]),
             helper.make_node("Relu", ["x"], ["r1"]), helper.make_node("Relu", ["x"], ["r2"]),
             helper.make_node("Add", ["r1", "r2"], ["y3"])]
    m = make_model(nodes, [vi("x", [3])], [vi("y1", [3]), vi("y2", [3]), vi("y3", [3])],
                   [init("one", np.float32(1))], extra_opsets=[("com.unused", 1)])
    result = onnxopt.optimize(m, passes=["eliminate-identity", "cse", "eliminate-dead"])
    rounds = max(r.round for r in result.records)
    assert rounds == 2  # round 1 changes, round 2 confirms nothing is left
    assert not any(r.changed for r in result.records if r.round == rounds)
    assert sorted(op_types(result.model)) == ["Add", "Identity", "Identity", "Relu"]
    assert_same_outputs(m, result.model)


def test_inference_dropout_removed_training_dropout_kept():
    nodes = [helper.make_node("Dropout", ["x", "ratio"], ["d"]),
             helper.make_node("Dropout", ["d", "ratio", "train"], ["y"])]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4])],
                   [init("ratio", np.array(0.5, np.float32)), init("train", np.array(True))], opset=13)
    out = run_passes(m, "eliminate-identity")
    assert op_types(out) == ["Dropout"]
    assert len(out.graph.node[0].input) == 3  # the training one stays


def test_dropout_false_training_mode_and_used_mask_become_constant():
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["d", "mask"]),
             helper.make_node("Cast", ["mask"], ["mask_f"], to=FLOAT),
             helper.make_node("Mul", ["d", "mask_f"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])],
                   [init("ratio", np.array(0.3, np.float32)), init("train", np.array(False))], opset=13)
    out = check(m, "eliminate-identity")
    assert "Dropout" not in op_types(out)


def test_dropout_with_dynamic_mask_shape_is_kept():
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"])]
    m = make_model(nodes, [vi("x", ["n", 3])], [vi("y", ["n", 3]), vi("mask", ["n", 3], BOOL)], opset=13)
    out = check(m, "eliminate-identity")
    assert op_types(out) == ["Dropout"]


def test_old_opset_dropout_removed():
    m = make_model([helper.make_node("Dropout", ["x"], ["d"], ratio=0.2), helper.make_node("Relu", ["d"], ["y"])],
                   [vi("x", [3])], [vi("y", [3])], opset=10)
    assert op_types(check(m, "eliminate-identity")) == ["Relu"]


def test_cast_to_same_type_removed_cast_to_other_type_kept():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Cast", ["r"], ["c1"], to=FLOAT),
             helper.make_node("Cast", ["c1"], ["c2"], to=INT64),
             helper.make_node("Cast", ["c2"], ["y"], to=FLOAT)]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4])])
    out = check(m, "eliminate-identity")
    assert op_types(out) == ["Relu", "Cast", "Cast"]


def _shape_const(name, values):
    return init(name, np.array(values, np.int64))


def test_reshape_same_shape_removed_other_shape_kept():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "same"], ["s"]),
             helper.make_node("Reshape", ["s", "flat"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [6])], [_shape_const("same", [2, -1]), _shape_const("flat", [6])])
    out = check(m, "eliminate-identity")
    assert op_types(out) == ["Relu", "Reshape"]
    assert out.graph.node[1].input[1] == "flat"


def test_identity_transpose_removed_real_transpose_kept():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 2]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[0, 2, 1])]
    m = make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [2, 4, 3])])
    out = check(m, "eliminate-identity")
    assert [list(n.attribute[0].ints) for n in out.graph.node] == [[0, 2, 1]]


def test_zero_pad_removed():
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"), helper.make_node("Relu", ["p"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], [_shape_const("pads", [0, 0, 0, 0])])
    assert op_types(check(m, "eliminate-identity")) == ["Relu"]


def test_full_slices_removed_partial_and_reversed_kept():
    big = np.iinfo(np.int64).max
    nodes = [helper.make_node("Slice", ["x", "zero", "three", "ax1"], ["s1"]),       # static full slice
             helper.make_node("Slice", ["s1", "zero", "big", "ax0"], ["s2"]),        # to INT64_MAX on dynamic dim
             helper.make_node("Slice", ["s2", "zero", "two", "ax1"], ["s3"]),        # partial: stays
             helper.make_node("Slice", ["s3", "m1", "neg_big", "ax0", "m1"], ["s4"]),  # reversed: stays
             helper.make_node("Slice", ["s4", "zero", "big", "ax0", "two"], ["y"])]  # every 2nd row: stays
    inits = [_shape_const("zero", [0]), _shape_const("three", [3]), _shape_const("two", [2]),
             _shape_const("big", [big]), _shape_const("ax0", [0]), _shape_const("ax1", [1]),
             _shape_const("m1", [-1]), _shape_const("neg_big", [-big])]
    m = make_model(nodes, [vi("x", ["n", 3])], [vi("y", ["n", 2])], inits)
    out = check(m, "eliminate-identity")
    assert op_types(out) == ["Slice", "Slice", "Slice"]


def test_same_shape_expand_flatten_squeeze_removed():
    nodes = [helper.make_node("Expand", ["x", "shape1"], ["e"]),
             helper.make_node("Flatten", ["e"], ["f"], axis=1),
             helper.make_node("Squeeze", ["f"], ["s"]),
             helper.make_node("Expand", ["s", "bigger"], ["y"])]   # grows: stays
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [4, 2, 3])],
                   [_shape_const("shape1", [1, 3]), _shape_const("bigger", [4, 2, 3])])
    out = check(m, "eliminate-identity")
    assert op_types(out) == ["Expand"]
    assert out.graph.node[0].input[1] == "bigger"


def test_one_input_concat_and_one_output_split_removed():
    nodes = [helper.make_node("Concat", ["x"], ["c"], axis=0),
             helper.make_node("Split", ["c"], ["s"], axis=1),
             helper.make_node("Relu", ["s"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])])
    assert op_types(check(m, "eliminate-identity")) == ["Relu"]


def test_neutral_arithmetic_removed():
    nodes = [helper.make_node("Add", ["x", "zero"], ["a"]),
             helper.make_node("Mul", ["one", "a"], ["b"]),        # 1 * x: constant first
             helper.make_node("Sub", ["b", "zero_s"], ["c"]),
             helper.make_node("Div", ["c", "one_row"], ["y"])]
    m = make_model(nodes, [vi("x", ["n", 3])], [vi("y", ["n", 3])],
                   [init("zero", np.zeros(3, np.float32)), init("one", np.ones((1, 1), np.float32)),
                    init("zero_s", np.float32(0)), init("one_row", np.ones((1, 3), np.float32))])
    out = check(m, "eliminate-identity")
    assert op_types(out) == ["Identity"]  # x → y needs a node between input and output


def test_arithmetic_that_changes_shape_or_value_is_kept():
    nodes = [helper.make_node("Add", ["x", "zeros_big"], ["a"]),   # broadcasts (3,) to (2, 3)
             helper.make_node("Sub", ["zero", "a"], ["b"]),        # 0 - x is not x
             helper.make_node("Mul", ["b", "two"], ["c"]),
             helper.make_node("Div", ["one", "c"], ["d"]),         # 1 / x is not x
             helper.make_node("Mul", ["col", "ones_row"], ["e"]),  # (2, 1) * (1, 3) → (2, 3)
             helper.make_node("Concat", ["d", "e"], ["y"], axis=0)]
    m = make_model(nodes, [vi("x", [3]), vi("col", [2, 1])], [vi("y", [4, 3])],
                   [init("zeros_big", np.zeros((2, 3), np.float32)), init("zero", np.float32(0)),
                    init("two", np.float32(2)), init("one", np.float32(1)), init("ones_row", np.ones((1, 3), np.float32))])
    out = check(m, "eliminate-identity")
    assert sorted(op_types(out)) == ["Add", "Concat", "Div", "Mul", "Mul", "Sub"]


def test_arithmetic_on_unknown_rank_is_kept():
    # The Reshape's output rank is unknown, so the (1, 1) zero may broadcast it to 2-D: keep the Add.
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Add", ["r", "zero"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3]), vi("shape", ["k"], INT64)], [vi("y", ["d0", "d1"])],
                   [init("zero", np.zeros((1, 1), np.float32))])
    out = run_passes(m, "eliminate-identity")
    assert op_types(out) == ["Reshape", "Add"]
    feeds = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3), "shape": np.array([6], np.int64)}]
    assert_same_outputs(m, out, feeds)  # y is (1, 6), not (6,)


def test_identity_inside_subgraph_removed():
    then = _branch("then", [helper.make_node("Identity", ["x"], ["t_id"]),
                            helper.make_node("Relu", ["t_id"], ["t_relu"]),
                            helper.make_node("Identity", ["t_relu"], ["t"])], [vi("t", [2])])
    els = _branch("else", [helper.make_node("Identity", ["x"], ["e"])], [vi("e", [2])])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els)],
                   [vi("x", [2]), vi("c", [], BOOL)], [vi("y", [2])])
    out = run_passes(m, "eliminate-identity")
    then_out = out.graph.node[0].attribute[0].g if out.graph.node[0].attribute[0].name == "then_branch" \
        else out.graph.node[0].attribute[1].g
    assert [n.op_type for n in then_out.node] == ["Relu"]
    assert [o.name for o in then_out.output] == ["t"]
    assert all_op_types(out).count("Identity") == 1  # the else branch returns an outer tensor: kept
    for c in (True, False):
        assert_same_outputs(m, out, [{"x": np.array([1.0, -1.0], np.float32), "c": np.array(c)}])


def test_lossless_preset_style_pipeline_reaches_fixed_point():
    w = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["x"], ["i"]),
             helper.make_node("MatMul", ["i", "w"], ["m1"]),
             helper.make_node("MatMul", ["i", "w_copy"], ["m2"]),
             helper.make_node("Add", ["m1", "m2"], ["s"]),
             helper.make_node("Mul", ["s", "one"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])],
                   [init("w", w), init("w_copy", w.copy()), init("one", np.float32(1))])
    out = check(m, "eliminate-identity", "cse", "eliminate-dead")
    assert op_types(out) == ["MatMul", "Add"]
    assert len(out.graph.initializer) == 1
