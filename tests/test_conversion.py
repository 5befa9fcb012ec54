"""upgrade-opset, infer-shapes and the trt preset."""

import onnx
import pytest
from onnx import helper

import onnxopt
from models.zoo import build
from onnxopt.errors import UserInputError
from onnxopt.presets import preset_passes, resolve_target
from tests.util import assert_same_outputs, make_model, run_passes, vi


def test_upgrade_opset_from_9_keeps_outputs():
    m = build("resnet18", opset=9, image_size=32)
    out = run_passes(m, "upgrade-opset:min_opset=13")
    assert {o.domain: o.version for o in out.opset_import}[""] == 13
    assert out.ir_version >= 7
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(m, out)


def test_upgrade_opset_leaves_newer_models_alone():
    m = build("tiny_cnn", opset=17)
    res = onnxopt.optimize(m, passes=["upgrade-opset:min_opset=13"])
    assert not res.records[0].changed
    assert {o.domain: o.version for o in res.model.opset_import}[""] == 17


def test_upgrade_opset_keeps_custom_ops_and_explains_failures(monkeypatch):
    m = make_model([helper.make_node("MyOp", ["x"], ["y"], domain="com.example")],
                   [vi("x", [1, 4])], [vi("y", [1, 4])], opset=9, extra_opsets=[("com.example", 1)])
    out = onnxopt.optimize(m, passes=["upgrade-opset:min_opset=13"]).model
    assert {o.domain: o.version for o in out.opset_import} == {"": 13, "com.example": 1}
    assert [(n.op_type, n.domain) for n in out.graph.node] == [("MyOp", "com.example")]

    from onnxopt.passes import conversion

    def refuse(model, version):
        raise RuntimeError("No adapter for op Foo")

    monkeypatch.setattr(conversion.version_converter, "convert_version", refuse)
    rec = onnxopt.optimize(m, passes=["upgrade-opset:min_opset=13"]).records[0]
    assert not rec.changed and "opset 9 kept" in rec.notes[0] and "No adapter" in rec.notes[0]


def test_infer_shapes_declares_intermediate_tensors():
    m = make_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Transpose", ["a"], ["b"], perm=[1, 0]),
                    helper.make_node("Neg", ["b"], ["y"])], [vi("x", [2, 3])], [vi("y", [3, 2])])
    out = run_passes(m, "infer-shapes")
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info}
    assert shapes == {"a": [2, 3], "b": [3, 2]}
    assert_same_outputs(m, out)


def test_trt_preset_gives_standard_ops_opset_13_and_declared_shapes():
    m = build("resnet18", opset=11, image_size=32)
    res = onnxopt.optimize(m, preset="trt", target="tensorrt")
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    assert {o.domain for o in out.opset_import} == {""}
    assert {o.domain: o.version for o in out.opset_import}[""] >= 13
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
    declared = {v.name for v in out.graph.value_info} | {o.name for o in out.graph.output}
    produced = {t for n in out.graph.node for t in n.output}
    assert produced <= declared
    assert_same_outputs(m, out)


def test_trt_preset_fixes_its_target():
    assert resolve_target("trt", None) == "tensorrt"
    assert resolve_target("lossless", None) == "cpu"
    with pytest.raises(UserInputError, match="tensorrt"):
        resolve_target("trt", "cpu")
    names = [p.name for p in preset_passes("trt")]
    assert names[0] == "upgrade-opset" and names[-1] == "infer-shapes"
