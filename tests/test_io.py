"""Model I/O: atomic saves, external data, >2 GB switch, metadata and custom domains kept."""

import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt import io as oio
from onnxopt.errors import UserInputError
from tests.util import assert_same_outputs, init, make_model, vi


def _conv_model():
    w = np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32)
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        [vi("x", [1, 3, 8, 8])], [vi("y", [1, 16, 8, 8])], [init("w", w)])


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    m = _conv_model()
    out = tmp_path / "out.onnx"
    oio.save_model(m, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert_same_outputs(m, oio.load_model(out))


def test_failed_save_keeps_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(RuntimeError):
        oio.save_model(_conv_model(), out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_external_data_round_trip(tmp_path):
    m = _conv_model()
    src = tmp_path / "ext.onnx"
    oio.save_model(m, src, external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    # the in-memory model was not converted to external references
    assert m.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT
    loaded = oio.load_model(src)
    assert_same_outputs(m, loaded)
    assert oio.file_size(src) > src.stat().st_size


def test_big_models_switch_to_external_data(tmp_path, monkeypatch):
    # Pretend the protobuf limit is tiny so the >2 GB path is exercised on a small model.
    monkeypatch.setattr(oio, "PROTOBUF_LIMIT", 64 * 1024 * 1024 + 100)
    out = tmp_path / "big.onnx"
    oio.save_model(_conv_model(), out)
    assert (tmp_path / "big.onnx.data").exists()
    assert_same_outputs(_conv_model(), oio.load_model(out))


def test_missing_external_data_is_a_clear_error(tmp_path):
    src = tmp_path / "ext.onnx"
    oio.save_model(_conv_model(), src, external_data=True)
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(UserInputError, match="external data"):
        oio.load_model(src)


def test_optimize_keeps_metadata_opsets_and_custom_domains(tmp_path):
    m = make_model(
        [helper.make_node("Identity", ["x"], ["a"]),
         helper.make_node("MyOp", ["a"], ["b"], domain="com.example", alpha=0.5),
         helper.make_node("Relu", ["b"], ["y"])],
        [vi("x", [1, 4])], [vi("y", [1, 4])], extra_opsets=[("com.example", 3)])
    m.doc_string = "doc"
    m.producer_name = "unit-test"
    helper.set_model_props(m, {"author": "me", "license": "MIT"})
    src = tmp_path / "in.onnx"
    oio.save_model(m, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    loaded = oio.load_model(src)
    out = onnxopt.optimize(loaded).model
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me", "license": "MIT"}
    assert out.doc_string == "doc" and out.producer_name == "unit-test"
    assert {o.domain: o.version for o in out.opset_import} == {"": 17, "com.example": 3}
    custom = [n for n in out.graph.node if n.op_type == "MyOp"]
    assert len(custom) == 1 and custom[0].domain == "com.example"
    assert helper.get_attribute_value(custom[0].attribute[0]) == 0.5
    onnx.checker.check_model(out)


def test_constant_nodes_are_lifted_to_initializers():
    from onnxopt import graph as G

    w = np.arange(4, dtype=np.float32)
    m = make_model(
        [helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w)),
         helper.make_node("Constant", [], ["k"], value_ints=[1, 4]),
         helper.make_node("Reshape", ["x", "k"], ["r"]),
         helper.make_node("Add", ["r", "w"], ["y"])],
        [vi("x", [4])], [vi("y", [1, 4])])
    g = G.import_model(m)
    assert [n.op for n in g.nodes] == ["Reshape", "Add"]
    np.testing.assert_array_equal(G.constant_value(g.nodes[1].inputs[1]), w)
    np.testing.assert_array_equal(G.constant_value(g.nodes[0].inputs[1]), [1, 4])
    assert_same_outputs(m, G.export_model(g, m))


def test_subgraph_model_stays_valid():
    then_g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["t"])], "then", [], [vi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e0"]), helper.make_node("Neg", ["e0"], ["e"])],
                               "else", [], [vi("e", [2])])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("c", [], onnx.TensorProto.BOOL), vi("x", [2])], [vi("y", [2])])
    out = onnxopt.optimize(m).model
    onnx.checker.check_model(out)
    for cond in (True, False):
        feeds = [{"c": np.array(cond), "x": np.array([1.0, -2.0], np.float32)}]
        assert_same_outputs(m, out, feeds)


def test_overridable_initializers_stay_inputs_with_their_defaults():
    # IR >= 4: an initializer also listed as a graph input is a default the caller may override.
    b = np.array([1.0, 2.0], np.float32)
    m = make_model([helper.make_node("Identity", ["x"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
                   [vi("x", [2]), vi("b", [2])], [vi("y", [2])], [init("b", b)])
    out = onnxopt.optimize(m).model
    onnx.checker.check_model(out)
    assert [i.name for i in out.graph.input] == ["x", "b"]
    assert [t.name for t in out.graph.initializer] == ["b"]
    x = np.array([3.0, 4.0], np.float32)
    assert_same_outputs(m, out, [{"x": x}, {"x": x, "b": np.array([10.0, 20.0], np.float32)}])


def test_omitted_optional_outputs_do_not_trip_invariants():
    # Two nodes with an omitted ("") optional output: names "" are not tensors.
    nodes = [helper.make_node("Dropout", ["x"], ["a", ""]), helper.make_node("Dropout", ["a"], ["y", ""])]
    m = make_model(nodes, [vi("x", [2])], [vi("y", [2])])
    onnxopt.PassManager([]).run(m)


def test_ir3_subgraph_constants_move_to_the_main_graph():
    # IR 3 (opset 7) wants every initializer listed as a graph input; If branches may not have
    # inputs, so constants only a branch reads must live in the main graph.
    from models.zoo import build

    m = build("tiny_if", opset=7)
    out = onnxopt.optimize(m, verify_each=True).model
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == 3
    names = {t.name for t in out.graph.initializer}
    assert names <= {i.name for i in out.graph.input}


def test_big_weights_are_read_lazily_and_the_input_is_never_modified():
    # >= 64 KiB weights bypass gs's copy (and its in-place writes); one is read inside an If branch.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    v = rng.standard_normal((256,)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [vi("t", [1, 256])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e0"]), helper.make_node("MatMul", ["e0", "w"], ["e1"]),
                                helper.make_node("Add", ["e1", "v"], ["e"])], "else", [], [vi("e", [1, 256])])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("c", [], onnx.TensorProto.BOOL), vi("x", [1, 128])], [vi("y", [1, 256])],
                   [init("w", w), init("v", v)])
    before = m.SerializeToString()
    out = onnxopt.optimize(m).model
    assert m.SerializeToString() == before
    onnx.checker.check_model(out)
    x = rng.standard_normal((1, 128)).astype(np.float32)
    assert_same_outputs(m, out, [{"c": np.array(True), "x": x}, {"c": np.array(False), "x": x}])
