"""Model statistics and MAC counts against hand-computed values."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxopt.io import save_model
from onnxopt.stats import count_macs, model_stats
from tests.util import init, make_model, vi

RNG = np.random.default_rng(0)


def w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def conv_net():
    """Conv 3→8 k3 pad1 on 16x16, depthwise 8 k3 stride 2, BatchNorm, flatten, Gemm 512→10, MatMul 10→4."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], group=8),
        helper.make_node("BatchNormalization", ["c2", "s", "bb", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Flatten", ["bn"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3"], ["g"], name="fc", transB=1),
        helper.make_node("MatMul", ["g", "w4"], ["y"], name="mm"),
    ]
    inits = [init("w1", w(8, 3, 3, 3)), init("b1", w(8)), init("w2", w(8, 1, 3, 3)),
             init("s", w(8)), init("bb", w(8)), init("m", w(8)), init("v", np.abs(w(8)) + 1),
             init("w3", w(10, 512)), init("w4", w(10, 4))]
    return make_model(nodes, [vi("x", [2, 3, 16, 16])], [vi("y", [2, 4])], inits)


def test_macs_conv_depthwise_gemm_matmul():
    total, layers = count_macs(conv_net())
    by_node = {layer["node"]: layer["macs"] for layer in layers}
    conv1 = 2 * 8 * 16 * 16 * (3 * 3 * 3)  # N*M*H*W * C*kh*kw
    dw = 2 * 8 * 8 * 8 * (1 * 3 * 3)  # stride 2 → 8x8, one input channel per group
    bn = 2 * 8 * 8 * 8
    fc = 2 * 512 * 10
    mm = 2 * 10 * 4
    assert by_node == {"conv1": conv1, "dw": dw, "bn": bn, "fc": fc, "mm": mm}
    assert total == conv1 + dw + bn + fc + mm
    assert not any(layer.get("approximate") for layer in layers)


def test_macs_batched_broadcast_matmul_and_conv_transpose():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["ab"], name="bmm"),
             helper.make_node("MatMul", ["v", "b2"], ["vb"], name="vec"),
             helper.make_node("ConvTranspose", ["x", "wt"], ["up"], name="up", kernel_shape=[2, 2], strides=[2, 2], group=2)]
    m = make_model(nodes, [vi("a", [2, 3, 5, 7]), vi("b", [3, 7, 4]), vi("v", [7]), vi("x", [1, 4, 6, 6])],
                   [vi("ab", None), vi("vb", None), vi("up", None)],
                   [init("b2", w(7, 9)), init("wt", w(4, 3, 2, 2))])
    total, layers = count_macs(m)
    by_node = {layer["node"]: layer["macs"] for layer in layers}
    assert by_node["bmm"] == 2 * 3 * 5 * 4 * 7  # broadcast batch (2,3) x M x N x K
    assert by_node["vec"] == 7 * 9
    assert by_node["up"] == (1 * 4 * 6 * 6) * (3 * 2 * 2)  # every input element times M/group*k*k
    assert total == sum(by_node.values())


def test_dynamic_dims_count_as_one_and_are_marked():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y"], name="c", kernel_shape=[1, 1])]
    m = make_model(nodes, [vi("x", ["N", 3, 4, 4])], [vi("y", None)], [init("w1", w(5, 3, 1, 1))])
    total, [layer] = count_macs(m)
    assert total == 5 * 4 * 4 * 3 and layer["approximate"]
    assert any("counted as 1" in note for note in model_stats(m)["macs_notes"])


def test_macs_inside_if_subgraph():
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["o"], name="inner")], "then", [], [vi("o", [1, 3])],
                               [init("wt", w(4, 3))])
    else_g = helper.make_graph([helper.make_node("Identity", ["x3"], ["o2"])], "else", [], [vi("o2", [1, 3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [vi("cond", [], TensorProto.BOOL), vi("x", [1, 4]), vi("x3", [1, 3])], [vi("y", [1, 3])])
    total, layers = count_macs(m)
    assert total == 12 and layers[0]["node"] == "branch/then_branch/inner"


def test_model_stats_summary(tmp_path):
    m = conv_net()
    m.graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="custom", domain="my.ops"))
    m.graph.output.append(vi("r", [2, 4]))
    m.opset_import.append(helper.make_opsetid("my.ops", 1))
    path = save_model(m, tmp_path / "m.onnx")
    stats = model_stats(m, path=str(path))
    assert stats["opsets"] == {"ai.onnx": 17, "my.ops": 1}
    assert stats["inputs"] == [{"name": "x", "dtype": "float32", "shape": [2, 3, 16, 16]}]
    assert stats["outputs"][0] == {"name": "y", "dtype": "float32", "shape": [2, 4]}
    assert stats["ops"]["Conv"] == 2 and stats["ops"]["my.ops::Relu"] == 1 and stats["nodes"] == 7
    n_params = 8 * 27 + 8 + 8 * 9 + 4 * 8 + 10 * 512 + 10 * 4
    assert stats["parameters"] == n_params and stats["parameter_bytes"] == 4 * n_params
    assert stats["macs"] == count_macs(m)[0] > 0
    assert stats["file_size"] == (tmp_path / "m.onnx").stat().st_size


def test_large_tensors_are_stubbed_for_shape_inference():
    # A weight above the stub threshold still gives its dims to shape inference.
    nodes = [helper.make_node("MatMul", ["x", "big"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["y"])]
    big = w(256, 128)
    m = make_model(nodes, [vi("x", [1, 256])], [vi("y", None)], [init("big", big)])
    total, layers = count_macs(m)
    assert total == 256 * 128 and not layers[0].get("approximate")
    assert np.array_equal(onnx.numpy_helper.to_array(m.graph.initializer[0]), big)  # the caller's model is untouched


def test_input_shapes_make_dynamic_macs_exact():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y"], name="c", kernel_shape=[3, 3])]
    m = make_model(nodes, [vi("x", ["N", 3, "H", "W"])], [vi("y", None)], [init("w1", w(5, 3, 3, 3))])
    total, [layer] = count_macs(m, {"x": (2, 3, 10, 12)})
    assert total == 2 * 5 * 8 * 10 * 27 and "approximate" not in layer
    assert model_stats(m, input_shapes={"x": (2, 3, 10, 12)})["inputs"][0]["shape"] == ["N", 3, "H", "W"]


def test_macs_known_past_onnxruntime_fused_ops():
    """A FusedConv (com.microsoft, from fuse-conv-activation) feeding a Gemm: onnx's shape
    inference does not know FusedConv; counted as its standard twin, both layers keep their MACs."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("FusedConv", ["x", "w", "b"], ["c"], domain="com.microsoft", activation="Relu",
                         pads=[1, 1, 1, 1], name="fc0"),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("FusedGemm", ["f", "g"], ["y"], domain="com.microsoft", activation="Relu", transB=1,
                         name="head"),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", None)],
                       [init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
                        init("b", np.zeros(4, np.float32)),
                        init("g", rng.normal(size=(10, 256)).astype(np.float32))],
                       opset=13, extra_opsets=[("com.microsoft", 1)])
    stats = model_stats(model)
    assert stats["macs"] == 4 * 8 * 8 * 3 * 9 + 10 * 256 and not stats["macs_notes"]
