"""cse: duplicate nodes and initializers are merged, outputs and signature unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import onnxopt
from onnxopt.passes.cse import attr_key, node_key
from tests.util import assert_same_outputs, init, make_model, op_types, run_passes, vi

FLOAT, BOOL = TensorProto.FLOAT, TensorProto.BOOL


def check(model, *passes):
    out = run_passes(model, *passes)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, out)
    return out


def test_duplicate_chains_collapse_in_one_run():
    nodes = [helper.make_node("Relu", ["x"], ["r1"]), helper.make_node("Exp", ["r1"], ["e1"]),
             helper.make_node("Transpose", ["e1"], ["t1"], perm=[1, 0]),
             helper.make_node("Relu", ["x"], ["r2"]), helper.make_node("Exp", ["r2"], ["e2"]),
             helper.make_node("Transpose", ["e2"], ["t2"], perm=[1, 0]),
             helper.make_node("Sub", ["t1", "t2"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [3, 2])])
    result = onnxopt.optimize(m, passes=["cse"])
    first = result.records[0]
    assert first.counters["nodes_merged"] == 3  # the whole chain in the first round
    out = result.model
    assert op_types(out) == ["Relu", "Exp", "Transpose", "Sub"]
    assert_same_outputs(m, out)


def test_different_attributes_or_inputs_are_not_merged():
    nodes = [helper.make_node("Softmax", ["x"], ["s0"], axis=0), helper.make_node("Softmax", ["x"], ["s1"], axis=1),
             helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Relu", ["s0"], ["r0"]),
             helper.make_node("Sum", ["s0", "s1", "r", "r0"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])])
    out = check(m, "cse")
    assert len(out.graph.node) == 5


def test_commutative_operands_are_merged():
    nodes = [helper.make_node("Add", ["x", "z"], ["a"]), helper.make_node("Add", ["z", "x"], ["b"]),
             helper.make_node("Sub", ["x", "z"], ["c"]), helper.make_node("Sub", ["z", "x"], ["d"]),
             helper.make_node("Concat", ["a", "b", "c", "d"], ["y"], axis=0)]
    m = make_model(nodes, [vi("x", [2]), vi("z", [2])], [vi("y", [8])])
    out = check(m, "cse")
    assert op_types(out) == ["Add", "Sub", "Sub", "Concat"]


def test_duplicate_initializers_are_shared_and_their_users_merged():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w_other", "b1"], ["c3"], pads=[1, 1, 1, 1]),
             helper.make_node("Sum", ["c1", "c2", "c3"], ["y"])]
    w_other = w.copy()
    w_other[0, 0, 0, 0] += 1.0  # one element differs: must stay separate
    m = make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 5, 5])],
                   [init("w1", w), init("w2", w.copy()), init("w_other", w_other), init("b1", b), init("b2", b.copy())])
    out = check(m, "cse")
    assert op_types(out) == ["Conv", "Conv", "Sum"]
    assert sorted(i.name for i in out.graph.initializer) == ["b1", "w1", "w_other"]


def test_constants_with_same_bytes_but_other_dtype_or_shape_stay_apart():
    nodes = [helper.make_node("Add", ["x", "c_f"], ["a"]),
             helper.make_node("Add", ["x", "c_row"], ["b"]),
             helper.make_node("Add", ["xi", "c_i"], ["ci"]),
             helper.make_node("Cast", ["ci"], ["cf"], to=FLOAT),
             helper.make_node("Sum", ["a", "b", "cf"], ["y"])]
    ones = np.ones(2, np.float32)
    m = make_model(nodes, [vi("x", [2, 2]), vi("xi", [2, 2], TensorProto.INT32)], [vi("y", [2, 2])],
                   [init("c_f", ones), init("c_row", ones.reshape(1, 2)),
                    init("c_i", ones.view(np.int32))])  # same bytes as c_f, other dtype
    out = check(m, "cse")
    assert len(out.graph.initializer) == 3
    assert op_types(out).count("Add") == 3


def test_random_ops_are_never_merged():
    nodes = [helper.make_node("RandomNormalLike", ["x"], ["n1"], seed=1.0),
             helper.make_node("RandomNormalLike", ["x"], ["n2"], seed=1.0),
             helper.make_node("RandomUniform", [], ["u1"], shape=[2]),
             helper.make_node("RandomUniform", [], ["u2"], shape=[2]),
             helper.make_node("Sum", ["n1", "n2", "u1", "u2"], ["y"])]
    m = make_model(nodes, [vi("x", [2])], [vi("y", [2])])
    out = run_passes(m, "cse")
    assert op_types(out).count("RandomNormalLike") == 2
    assert op_types(out).count("RandomUniform") == 2


def test_training_dropout_is_never_merged_inference_dropout_is():
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["d1"]),
             helper.make_node("Dropout", ["x", "ratio", "train"], ["d2"]),
             helper.make_node("Dropout", ["x", "ratio"], ["i1"]),
             helper.make_node("Dropout", ["x", "ratio"], ["i2"]),
             helper.make_node("Sum", ["d1", "d2", "i1", "i2"], ["y"])]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4])],
                   [init("ratio", np.array(0.5, np.float32)), init("train", np.array(True))], opset=13)
    out = run_passes(m, "cse")
    assert op_types(out).count("Dropout") == 3


def test_two_graph_outputs_both_remain():
    nodes = [helper.make_node("Relu", ["x"], ["y1"]), helper.make_node("Relu", ["x"], ["y2"]),
             helper.make_node("Relu", ["x"], ["hidden"]), helper.make_node("Neg", ["hidden"], ["y3"])]
    m = make_model(nodes, [vi("x", [3])], [vi("y1", [3]), vi("y2", [3]), vi("y3", [3])])
    out = check(m, "cse")
    assert op_types(out).count("Relu") == 1
    produced = {o for n in out.graph.node for o in n.output}
    assert {"y1", "y2", "y3"} <= produced


def test_custom_ops_merged_only_when_allowed():
    nodes = [helper.make_node("MyOp", ["x"], ["a"], domain="com.example", k=2),
             helper.make_node("MyOp", ["x"], ["b"], domain="com.example", k=2),
             helper.make_node("Add", ["a", "b"], ["y"])]
    m = make_model(nodes, [vi("x", [2])], [vi("y", [2])], extra_opsets=[("com.example", 1)])
    default = run_passes(m, "cse")
    assert op_types(default).count("MyOp") == 2
    allowed = run_passes(m, "cse:custom_ops=true")
    assert op_types(allowed).count("MyOp") == 1
    assert any(o.domain == "com.example" for o in allowed.opset_import)


def test_nodes_with_subgraphs_are_not_merged_but_their_bodies_are_cleaned():
    def branch(name):
        return helper.make_graph([helper.make_node("Relu", ["x"], [f"{name}_a"]),
                                  helper.make_node("Relu", ["x"], [f"{name}_b"]),
                                  helper.make_node("Add", [f"{name}_a", f"{name}_b"], [f"{name}_o"])],
                                 name, [], [vi(f"{name}_o", [2])])

    nodes = [helper.make_node("If", ["c"], ["r1"], then_branch=branch("t1"), else_branch=branch("e1")),
             helper.make_node("If", ["c"], ["r2"], then_branch=branch("t2"), else_branch=branch("e2")),
             helper.make_node("Add", ["r1", "r2"], ["y"])]
    m = make_model(nodes, [vi("x", [2]), vi("c", [], BOOL)], [vi("y", [2])])
    out = run_passes(m, "cse")
    ifs = [n for n in out.graph.node if n.op_type == "If"]
    assert len(ifs) == 2
    for a in ifs[0].attribute:
        assert [n.op_type for n in a.g.node] == ["Relu", "Add"]
    for c in (True, False):
        assert_same_outputs(m, out, [{"x": np.array([1.0, -2.0], np.float32), "c": np.array(c)}])


def test_initializer_shared_between_graph_and_subgraph():
    w = np.array([0.5, -2.0], np.float32)
    then = helper.make_graph([helper.make_node("Mul", ["x", "w_local"], ["t"])], "then", [], [vi("t", [2])],
                             initializer=[init("w_local", w.copy())])
    els = helper.make_graph([helper.make_node("Add", ["x", "w_local2"], ["e"])], "else", [], [vi("e", [2])],
                            initializer=[init("w_local2", w.copy())])
    nodes = [helper.make_node("Mul", ["x", "w"], ["a"]),
             helper.make_node("If", ["c"], ["r"], then_branch=then, else_branch=els),
             helper.make_node("Add", ["a", "r"], ["y"])]
    m = make_model(nodes, [vi("x", [2]), vi("c", [], BOOL)], [vi("y", [2])], [init("w", w)])
    result = onnxopt.optimize(m, passes=["cse"])
    assert result.records[0].counters["initializers_merged"] == 2
    onnx.checker.check_model(result.model)
    if_node = next(n for n in result.model.graph.node if n.op_type == "If")
    for a in if_node.attribute:
        assert [i for n in a.g.node for i in n.input][1] == "w"
    for c in (True, False):
        assert_same_outputs(m, result.model, [{"x": np.array([1.0, 3.0], np.float32), "c": np.array(c)}])


def test_attribute_keys_are_exact():
    assert attr_key(0.0) != attr_key(-0.0)
    assert attr_key(float("nan")) == attr_key(float("nan"))
    assert attr_key([1, 2]) != attr_key([2, 1])
    assert attr_key(np.array([1, 2], np.int64)) != attr_key(np.array([1, 2], np.int32))
    assert attr_key(np.zeros((2, 1), np.float32)) != attr_key(np.zeros((1, 2), np.float32))


def test_node_key_refuses_subgraph_attributes():
    import onnx_graphsurgeon as gs

    body = gs.Graph(nodes=[], inputs=[], outputs=[])
    node = gs.Node("If", inputs=[gs.Variable("c")], outputs=[gs.Variable("o")],
                   attrs={"then_branch": body, "else_branch": body})
    assert node_key(node, 17) is None
    relu = gs.Node("Relu", inputs=[gs.Variable("x")], outputs=[gs.Variable("r")])
    assert node_key(relu, 17) is not None
