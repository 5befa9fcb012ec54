"""Layer extraction and timing in onnxruntime (onnxopt/layer_timing.py).

Speed is asserted only where the difference is ~10x (a 3x3 64->64 conv against a 1x1
64->8 conv), so a noisy machine cannot flip the answer; everything else checks structure.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from onnxopt import runtime
from onnxopt.graph import export_model, import_model
from onnxopt.layer_timing import LatencyBudgetExceeded, LatencyProbe, extract_subgraph, signature
from onnxopt.runtime import interleaved_run_times, run_model
from tests.util import init, make_model, vi

RNG = np.random.default_rng(0)


def weights(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def node(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def conv_model(cin: int, cout: int, k: int, hw: int, names=("x", "w", "y")) -> onnx.ModelProto:
    x, w, y = names
    return make_model([helper.make_node("Conv", [x, w], [y], name="conv", pads=[k // 2] * 4)],
                      [vi(x, [1, cin, hw, hw])], [vi(y, [1, cout, hw, hw])], [init(w, weights(cout, cin, k, k))])


def chain_model() -> onnx.ModelProto:
    """x -> conv1 -> relu -> conv2 -> add(relu) -> reshape -> y; relu output also read by add."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "r"], ["s"], name="add"),
        helper.make_node("Reshape", ["s", "shape"], ["y"], name="reshape"),
    ]
    inits = [init("w1", weights(8, 3, 3, 3)), init("b1", weights(8)), init("w2", weights(8, 8, 1, 1)),
             init("shape", np.array([1, -1], np.int64))]
    return make_model(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", [1, 288])], inits)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the named intermediate tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return out


# --------------------------------------------------------------------------- extraction
def test_extracted_nodes_compute_the_full_models_intermediate_values():
    model = chain_model()
    graph = import_model(model)
    part = extract_subgraph(graph, [node(graph, "relu"), node(graph, "conv2"), node(graph, "add")])
    onnx.checker.check_model(part, full_check=True)

    assert [i.name for i in part.graph.input] == ["c1"]
    assert [o.name for o in part.graph.output] == ["s"]  # r is only read inside; s is read by reshape
    assert sorted(t.name for t in part.graph.initializer) == ["w2"]

    feed = {"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    [full] = run_model(with_outputs(model, ["c1", "s"]), [feed], optimization="disable")
    [extracted] = run_model(part, [{"c1": full["c1"]}], optimization="disable")
    np.testing.assert_allclose(extracted["s"], full["s"], rtol=1e-5, atol=1e-5)


def test_given_types_spare_the_whole_graph_inference(monkeypatch):
    graph = import_model(chain_model())  # c1 carries no annotation in the model

    def no_inference(*args, **kwargs):
        raise AssertionError("whole-graph shape inference should not run")

    monkeypatch.setattr("onnxopt.layer_timing.inferred_types", no_inference)
    part = extract_subgraph(graph, [node(graph, "relu")], types={"c1": (TensorProto.FLOAT, [1, 8, 6, 6])})
    assert [d.dim_value for d in part.graph.input[0].type.tensor_type.shape.dim] == [1, 8, 6, 6]
    part = extract_subgraph(graph, [node(graph, "relu")], input_shapes={"c1": (1, 8, 3, 3)},
                            types={"c1": (TensorProto.FLOAT, None)})
    assert [d.dim_value for d in part.graph.input[0].type.tensor_type.shape.dim] == [1, 8, 3, 3]


def test_outputs_include_tensors_read_outside_and_graph_outputs():
    model = chain_model()
    graph = import_model(model)
    # conv1 + relu: r is read outside (by conv2 and add); c1 only inside.
    part = extract_subgraph(graph, [node(graph, "conv1"), node(graph, "relu")])
    assert [o.name for o in part.graph.output] == ["r"]
    assert [i.name for i in part.graph.input] == ["x"]
    # reshape produces the graph output y; its shape constant is copied by value.
    part = extract_subgraph(graph, [node(graph, "reshape")])
    assert [o.name for o in part.graph.output] == ["y"]
    shape = next(t for t in part.graph.initializer if t.name == "shape")
    assert onnx.numpy_helper.to_array(shape).tolist() == [1, -1]


def test_node_order_does_not_matter_and_constants_are_copied_exactly():
    model = chain_model()
    graph = import_model(model)
    part = extract_subgraph(graph, [node(graph, "add"), node(graph, "conv2"), node(graph, "relu"),
                                    node(graph, "conv1")])
    assert [n.name for n in part.graph.node] == ["conv1", "relu", "conv2", "add"]
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    copied = {t.name: onnx.numpy_helper.to_array(t) for t in part.graph.initializer}
    assert sorted(copied) == ["b1", "w1", "w2"]
    for name, value in copied.items():
        np.testing.assert_array_equal(value, originals[name])


def test_a_node_whose_outputs_nobody_reads_gives_its_own_outputs():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"),
             helper.make_node("Sigmoid", ["x"], ["dangling"], name="sigmoid")]
    graph = import_model(make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])]))
    part = extract_subgraph(graph, [node(graph, "sigmoid")])
    assert [o.name for o in part.graph.output] == ["dangling"]
    assert part.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_extraction_does_not_modify_the_graph_or_the_model():
    model = conv_model(64, 64, 3, 8)  # a 147 KB weight: import_model reads it lazily from `model`
    before_model = model.SerializeToString()
    graph = import_model(model)
    before_graph = export_model(graph).SerializeToString()
    part = extract_subgraph(graph, graph.nodes, input_shapes={"x": (1, 64, 4, 4)})
    part.graph.initializer[0].name = "renamed"  # the copy must not alias the model's tensor
    assert export_model(graph).SerializeToString() == before_graph
    assert model.SerializeToString() == before_model
    assert graph.nodes[0].inputs[0].shape == [1, 64, 8, 8]


def test_dynamic_dimension_needs_input_shapes():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                       [vi("x", ["batch", 4])], [vi("y", ["batch", 4])])
    graph = import_model(model)
    with pytest.raises(ValueError, match=r"'x'.*'batch'"):
        extract_subgraph(graph, graph.nodes)
    part = extract_subgraph(graph, graph.nodes, input_shapes={"x": (3, 4), "unrelated": (1,)})
    dims = [d.dim_value for d in part.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, 4]
    assert LatencyProbe(runs=2, warmup=1).latency(part) > 0


def test_model_input_shapes_fix_dynamic_intermediates():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 4, 6, 6])], [init("w", weights(4, 3, 3, 3))])
    graph = import_model(model)
    with pytest.raises(ValueError, match=r"'c'.*'N'"):  # inference gives c the shape ['N', 4, 6, 6]
        extract_subgraph(graph, [node(graph, "relu")])
    # The model input's shape is enough: inference runs with it and c becomes [2, 4, 6, 6].
    part = extract_subgraph(graph, [node(graph, "relu")], input_shapes={"x": (2, 3, 6, 6)})
    assert [d.dim_value for d in part.graph.input[0].type.tensor_type.shape.dim] == [2, 4, 6, 6]
    assert graph.inputs[0].shape == ["N", 3, 6, 6]


def test_unknown_shape_needs_input_shapes():
    graph = gs.Graph(nodes=[], opset=17)
    x = gs.Variable("x", dtype=np.float32)  # no shape at all
    y = gs.Variable("y", dtype=np.float32)
    graph.nodes.append(gs.Node("Relu", inputs=[x], outputs=[y]))
    graph.inputs, graph.outputs = [x], [y]
    with pytest.raises(ValueError, match="'x'.*unknown shape"):
        extract_subgraph(graph, graph.nodes)


def test_constant_node_outside_the_selection_becomes_an_initializer():
    graph = gs.Graph(opset=17)
    x = gs.Variable("x", dtype=np.float32, shape=[2, 2])
    c = gs.Variable("c", dtype=np.float32, shape=[2, 2])
    y = gs.Variable("y", dtype=np.float32, shape=[2, 2])
    graph.nodes = [gs.Node("Constant", inputs=[], outputs=[c], attrs={"value": gs.Constant("cv", np.eye(2, dtype=np.float32))}),
                   gs.Node("Mul", name="mul", inputs=[x, c], outputs=[y])]
    graph.inputs, graph.outputs = [x], [y]
    part = extract_subgraph(graph, [graph.nodes[1]])
    assert [i.name for i in part.graph.input] == ["x"]
    assert [t.name for t in part.graph.initializer] == ["c"]
    [out] = run_model(part, [{"x": np.full((2, 2), 3, np.float32)}], optimization="disable")
    np.testing.assert_array_equal(out["y"], 3 * np.eye(2, dtype=np.float32))


def test_if_branch_reading_an_outer_tensor_makes_it_an_input():
    then_graph = helper.make_graph([helper.make_node("Add", ["a", "one"], ["t"])], "then", [], [vi("t", [2])],
                                   [init("one", np.ones(2, np.float32))])
    else_graph = helper.make_graph([helper.make_node("Neg", ["a"], ["e"])], "else", [], [vi("e", [2])])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)]
    model = make_model(nodes, [vi("x", [2]), vi("cond", [], TensorProto.BOOL)], [vi("y", [2])])
    graph = import_model(model)
    part = extract_subgraph(graph, [node(graph, "if")])
    assert sorted(i.name for i in part.graph.input) == ["a", "cond"]
    onnx.checker.check_model(part)
    a = np.array([1.0, 2.0], np.float32)
    [out] = run_model(part, [{"a": a, "cond": np.array(True)}], optimization="disable")
    np.testing.assert_array_equal(out["y"], a + 1)


def test_custom_domain_opset_is_declared_and_opset_can_be_overridden():
    nodes = [helper.make_node("Gelu", ["x"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("Relu", ["g"], ["y"], name="relu")]
    model = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])], opset=13, extra_opsets=[("com.microsoft", 1)])
    graph = import_model(model)
    part = extract_subgraph(graph, [node(graph, "gelu")], template=model)
    assert {(o.domain, o.version) for o in part.opset_import} == {("", 13), ("com.microsoft", 1)}
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    [full] = run_model(with_outputs(model, ["g"]), [{"x": x}], optimization="disable")
    [out] = run_model(part, [{"x": x}], optimization="disable")
    np.testing.assert_allclose(out["g"], full["g"], rtol=1e-6)

    # ONNX shape inference knows no com.microsoft op: the type of Gelu's output stays unknown
    # until someone annotates it.
    with pytest.raises(ValueError, match="'g'.*no known dtype"):
        extract_subgraph(graph, [node(graph, "relu")], template=model)
    g = node(graph, "relu").inputs[0]
    g.dtype, g.shape = np.float32, [2, 4]
    part = extract_subgraph(graph, [node(graph, "relu")], opset=17, template=model)
    assert {(o.domain, o.version) for o in part.opset_import} == {("", 17)}  # com.microsoft unused here


# --------------------------------------------------------------------------- signature
def test_signature_ignores_names_and_weight_values_but_not_structure():
    a = conv_model(8, 8, 3, 10)
    b = conv_model(8, 8, 3, 10, names=("input", "kernel", "output"))  # other names, other weights
    assert signature(a) == signature(b)
    assert signature(a) != signature(conv_model(8, 8, 3, 12))  # shape
    assert signature(a) != signature(conv_model(8, 8, 1, 10))  # kernel size and pads

    def reshape(target):
        return make_model([helper.make_node("Reshape", ["x", "s"], ["y"])], [vi("x", [2, 6])], [vi("y", None)],
                          [init("s", np.array(target, np.int64))])

    assert signature(reshape([3, 4])) != signature(reshape([4, 3]))  # shape-like constants count by value


# --------------------------------------------------------------------------- timing
@pytest.fixture
def session_count(monkeypatch):
    made = []
    real = runtime.make_session

    def counting(*args, **kwargs):
        made.append(kwargs.get("optimization"))
        return real(*args, **kwargs)

    monkeypatch.setattr("onnxopt.layer_timing.make_session", counting)
    return made


def test_equal_layers_are_timed_once(session_count):
    probe = LatencyProbe(runs=3, warmup=1)
    first = probe.latency(conv_model(8, 8, 3, 10))
    again = probe.latency(conv_model(8, 8, 3, 10, names=("input", "kernel", "output")))
    assert first == again and first > 0
    assert session_count == ["all"]  # users' optimization level by default
    probe.latency(conv_model(8, 8, 3, 12))
    assert len(session_count) == 2

    base, cand = conv_model(8, 8, 3, 10), conv_model(8, 4, 1, 10)
    ratios = probe.compare(base, [cand, conv_model(8, 4, 1, 10, names=("a", "b", "c"))])
    assert len(session_count) == 4  # baseline + one candidate: the two candidates are equal
    assert ratios[0] == ratios[1] > 0
    assert probe.compare(base, [cand]) == ratios[:1]
    assert len(session_count) == 4
    assert probe.latency(cand) > 0 and len(session_count) == 4  # compare filled the latency cache


def test_budget_spent_raises_but_cached_answers_still_come(session_count):
    probe = LatencyProbe(runs=2, warmup=1, budget_s=1e-9)
    model = conv_model(4, 4, 3, 6)
    t = probe.latency(model)  # the first measurement starts with budget left
    assert probe.spent_s > 0 and probe.remaining_s == 0
    assert probe.latency(model) == t
    with pytest.raises(LatencyBudgetExceeded, match="budget"):
        probe.latency(conv_model(4, 4, 3, 8))
    with pytest.raises(LatencyBudgetExceeded):
        probe.compare(model, [conv_model(4, 2, 1, 6)])
    assert len(session_count) == 1


def qdq_conv_model() -> onnx.ModelProto:
    """QuantizeLinear -> DequantizeLinear -> Conv (int8 per-channel weight via DequantizeLinear) -> Q -> DQ."""
    w = RNG.integers(-127, 128, (16, 16, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dq_w", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "cs", "cz"], ["cq"], name="q_out"),
        helper.make_node("DequantizeLinear", ["cq", "cs", "cz"], ["y"], name="dq_out"),
    ]
    inits = [init("xs", np.float32(0.02)), init("xz", np.uint8(128)), init("wq", w),
             init("ws", np.full(16, 0.01, np.float32)), init("wz", np.zeros(16, np.int8)),
             init("cs", np.float32(0.1)), init("cz", np.uint8(128))]
    return make_model(nodes, [vi("x", [1, 16, 14, 14])], [vi("y", [1, 16, 14, 14])], inits, opset=13)


def test_int8_qdq_conv_can_be_extracted_and_timed():
    model = qdq_conv_model()
    graph = import_model(model)
    part = extract_subgraph(graph, graph.nodes[:5], template=model)  # up to the uint8 QuantizeLinear
    assert [o.name for o in part.graph.output] == ["cq"]
    assert part.graph.output[0].type.tensor_type.elem_type == TensorProto.UINT8
    onnx.checker.check_model(part)
    probe = LatencyProbe(runs=3, warmup=1)
    assert probe.latency(part) > 0
    assert probe.compare(model, [part])[0] > 0

    # The middle of a quantized chain reads uint8: random feeds cover the whole uint8 range.
    middle = extract_subgraph(graph, graph.nodes[1:5], template=model)
    assert [i.name for i in middle.graph.input] == ["xq"]
    feed = probe.random_feeds(middle)["xq"]
    assert feed.dtype == np.uint8 and feed.min() < 30 and feed.max() > 225
    assert probe.latency(middle) > 0


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="needs an onnxruntime build without CUDA")
def test_missing_provider_is_a_user_error():
    from onnxopt.errors import UserInputError

    with pytest.raises(UserInputError, match="cuda"):
        LatencyProbe(provider="cuda")
    with pytest.raises(ValueError, match="optimization"):
        LatencyProbe(optimization="max")


def test_random_feeds_are_seeded_by_input_name():
    model = conv_model(4, 4, 3, 6)
    a = LatencyProbe(seed=1).random_feeds(model)["x"]
    np.testing.assert_array_equal(a, LatencyProbe(seed=1).random_feeds(model)["x"])
    assert not np.array_equal(a, LatencyProbe(seed=2).random_feeds(model)["x"])


def test_clearly_cheaper_layer_measures_faster():
    probe = LatencyProbe(runs=10)
    [ratio] = probe.compare(conv_model(64, 64, 3, 56), [conv_model(64, 8, 1, 56)])
    assert ratio > 1.5  # about 72x fewer MACs; measured ~14x on a 2-core machine
    assert probe.spent_s < 5


def test_interleaved_rounds_rotate_the_starting_session():
    calls = []

    class FakeSession:
        def __init__(self, name):
            self.name = name

        def get_outputs(self):
            return []

        def run(self, outputs, feed):
            calls.append(self.name)

    times = interleaved_run_times([FakeSession("a"), FakeSession("b"), FakeSession("c")], [{}] * 3,
                                  warmup=1, runs=3)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [len(t) for t in times] == [3, 3, 3]
