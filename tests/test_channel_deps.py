"""Channel dependency analysis (onnxopt.channel_deps) and channel removal (onnxopt.channel_prune).

Every coupling kind gets a small graph. The end-to-end check (:func:`prune_exactly`) removes
channels from every prunable group after zeroing the removed channels' input weights in every
consumer, so the removed channels contribute nothing and the pruned model must compute the
same outputs as the zeroed one: a wrong index mapping anywhere (offset, stride, group, split
size) shows up as a numeric difference or a shape error. Each pruned model also passes
onnx.checker (full check) and strict shape inference, and runs in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from models.zoo import inception, mobilenetv2, resnet18
from onnxopt import graph as G
from onnxopt.channel_deps import Collapse, Shift, Spread, analyze_channels
from onnxopt.channel_prune import prune_channels, prune_groups
from onnxopt.stats import model_stats
from tests.util import assert_same_outputs, init, make_model, random_feeds, vi


# ---------------------------------------------------------------------------- graph builder
class Net:
    """A tiny onnx.helper graph builder with random weights (deterministic per seed)."""

    def __init__(self, opset: int = 17, seed: int = 0):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.inputs = [], [], []
        self.count = 0
        self.extra_opsets = []

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def input(self, name: str, shape, dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(vi(name, shape, dtype))
        return name

    def const(self, hint: str, array) -> str:
        name = self.name(hint)
        self.inits.append(init(name, array))
        return name

    def rand(self, *shape) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32)

    def node(self, op: str, inputs, n_out: int = 1, domain: str | None = None, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 1, group: int = 1, bias: bool = True,
             weight: str | None = None) -> str:
        w = weight or self.const("w", self.rand(cout, cin // group, k, k))
        inputs = [x, w] + ([self.const("b", self.rand(cout))] if bias else [])
        return self.node("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        scale, bias, mean = self.rand(c), self.rand(c), self.rand(c)
        var = self.rng.uniform(0.5, 2.0, c).astype(np.float32)
        return self.node("BatchNormalization", [x] + [self.const(n, v) for n, v in
                                                      (("scale", scale), ("B", bias), ("mean", mean), ("var", var))])

    def op_name(self, output: str) -> str:
        """The name of the node that writes ``output``."""
        return next(n.name for n in self.nodes if output in n.output)

    def model(self, outputs, shapes=None) -> onnx.ModelProto:
        """The model, with output shapes filled in by shape inference (no intermediate value_info)
        unless given in ``shapes``."""
        shapes = shapes or [None] * len(outputs)
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in zip(outputs, shapes)]
        model = make_model(self.nodes, self.inputs, outs, self.inits, opset=self.opset,
                           extra_opsets=self.extra_opsets)
        model = onnx.shape_inference.infer_shapes(model)
        del model.graph.value_info[:]
        return model


# ---------------------------------------------------------------------------- checks
def zero_removed_inputs(graph: gs.Graph, group, removed) -> None:
    """Zero what every consumer reads from the removed channels (on a private copy of the constant)."""
    for slot in group.consumers:
        value = np.array(G.constant_value(slot.tensor))
        index = [slice(None)] * value.ndim
        index[slot.axis] = slot.positions(removed)
        value[tuple(index)] = 0
        slot.node.inputs[slot.input_index] = G.add_constant(graph, slot.tensor.name + "_zeroed", value)


def odd_channels(group) -> np.ndarray:
    return np.arange(1, group.channels, 2)


def check_model(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def prune_exactly(model: onnx.ModelProto, choose=odd_channels, expect_prunable: int | None = None,
                  rel_l2: float = 1e-6):
    """Analyse, remove ``choose(group)`` from every prunable group (zeroed first), compare outputs.

    Returns (analysis, pruned model, reference model).
    """
    graph = G.import_model(model)
    analysis = analyze_channels(graph)
    if expect_prunable is not None:
        assert len(analysis.prunable) == expect_prunable, [g.describe() for g in analysis.groups]
    plan = []
    for group in analysis.prunable:
        removed = choose(group)
        zero_removed_inputs(graph, group, removed)
        plan.append((group, np.setdiff1d(np.arange(group.channels), removed)))
    reference = G.export_model(graph, model)
    prune_groups(graph, plan)
    graph.cleanup().toposort()
    pruned = G.export_model(graph, model)
    check_model(pruned)
    assert_same_outputs(reference, pruned, random_feeds(model, n=2), rel_l2=rel_l2)
    return analysis, pruned, reference


def weight_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Node name → shape of its input 1 (the weight), for nodes whose input 1 is an initializer."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if len(n.input) > 1 and n.input[1] in inits}


def group_of(analysis, node_name: str):
    return next(g for g in analysis.groups if node_name in g.root_names)


# ---------------------------------------------------------------------------- index maps
def test_index_maps_concat_split_flatten_depthwise():
    pos, chan = np.array([0, 2]), np.array([0, 1])
    assert Shift(5, 0, 4)(pos, chan)[0].tolist() == [5, 7]          # concat input at offset 5
    assert Shift(-2, 2, 6)(pos, chan)[0].tolist() == [0]            # split output [2, 6)
    spread_pos, spread_chan = Spread(1, 4, 3)(pos, chan)             # flatten C=4, H·W=3
    assert spread_pos.tolist() == [0, 1, 2, 6, 7, 8] and spread_chan.tolist() == [0, 0, 0, 1, 1, 1]
    assert Spread(2, 4, 1)(pos, chan)[0].tolist() == [0, 2, 4, 6]   # channel axis behind a leading axis of 2
    back_pos, back_chan = Collapse(4, 3)(spread_pos, spread_chan)
    assert back_pos.tolist() == [0, 2] and back_chan.tolist() == [0, 1]


# ---------------------------------------------------------------------------- coupling kinds
@pytest.mark.parametrize("opset", [7, 17])
def test_conv_bn_activation_chain(opset):
    net = Net(opset)
    x = net.input("x", [1, 3, 8, 8])
    first = net.conv(x, 3, 6, 3)
    h = net.node("Relu", [net.bn(first, 6)])
    h = net.node("LeakyRelu", [net.node("Dropout", [h])], alpha=0.1)
    y = net.conv(h, 6, 4, 3)
    analysis, pruned, _ = prune_exactly(net.model([y]), expect_prunable=1)
    group = analysis.prunable[0]
    assert group.channels == 6 and group.root_names == [net.op_name(first)]
    roles = sorted((s.node.op, s.role) for s in group.slots)
    assert roles == [("BatchNormalization", "param")] * 4 + [("Conv", "consumer"), ("Conv", "producer"),
                                                            ("Conv", "producer")]
    shapes = weight_shapes(pruned)
    assert shapes[net.op_name(first)] == (3, 3, 3, 3) and shapes[net.op_name(y)] == (4, 3, 3, 3)
    assert [t.dims for t in pruned.graph.initializer if t.name.startswith("var")] == [[3]]


def test_residual_add_couples_every_producer():
    net = Net()
    x = net.input("x", [1, 3, 8, 8])
    stem = net.conv(x, 3, 8)
    a = net.node("Relu", [net.bn(stem, 8)])
    branch = net.conv(a, 8, 8, 3)
    s = net.node("Relu", [net.node("Add", [a, net.bn(branch, 8)])])
    inner = net.conv(s, 8, 8)
    c = net.conv(net.node("Sub", [s, inner]), 8, 5)
    analysis, pruned, _ = prune_exactly(net.model([c]), expect_prunable=1)
    group = analysis.prunable[0]
    # the stem, the residual branch and the conv subtracted after the sum: one group
    assert sorted(group.root_names) == sorted(net.op_name(t) for t in (stem, branch, inner))
    # the conv that reads the sum and feeds the Sub both reads and writes the group's channels
    shapes = weight_shapes(pruned)
    assert shapes[net.op_name(branch)] == (4, 4, 3, 3) and shapes[net.op_name(inner)] == (4, 4, 1, 1)


def test_conv_transpose_producer_and_consumer():
    net = Net()
    x = net.input("x", [1, 3, 4, 4])
    h = net.node("Relu", [net.conv(x, 3, 6)])
    up = net.node("ConvTranspose", [h, net.const("wt", net.rand(6, 5, 2, 2)), net.const("bt", net.rand(5))],
                  kernel_shape=[2, 2], strides=[2, 2])
    y = net.conv(net.node("Relu", [up]), 5, 2)
    analysis, pruned, _ = prune_exactly(net.model([y]), expect_prunable=2)
    assert weight_shapes(pruned)[net.op_name(up)] == (3, 3, 2, 2)  # (C_in, C_out, k, k): 6 → 3, 5 → 3


def test_elementwise_constants_and_broadcast_variables():
    net = Net()
    x = net.input("x", [1, 3, 6, 6])
    first = h = net.conv(x, 3, 8)
    h = net.node("Mul", [h, net.const("scale", net.rand(1, 8, 1, 1))])       # per-channel constant
    h = net.node("Add", [h, net.const("shift", net.rand(8, 1, 1))])          # per-channel, rank 3
    h = net.node("Div", [h, net.const("two", np.array(2.0, np.float32))])    # scalar: not a slot
    h = net.node("PRelu", [h, net.const("slope", net.rand(8, 1, 1))])
    spatial = net.conv(x, 3, 1)
    attention = net.node("Sigmoid", [spatial])                               # N×1×H×W map
    h = net.node("Mul", [h, attention])                                     # broadcast: not coupled
    h = net.node("Clip", [h, net.const("lo", np.array(-1.0, np.float32)), net.const("hi", np.array(3.0, np.float32))])
    h = net.node("HardSwish", [net.node("Tanh", [h])])
    y = net.conv(h, 8, 2)
    analysis, pruned, _ = prune_exactly(net.model([y]))
    group = group_of(analysis, net.op_name(first))
    assert group.prunable
    params = sorted((s.node.op, s.axis) for s in group.members if s.role == "param")
    assert params == [("Add", 0), ("Mul", 1), ("PRelu", 0)]
    # the 1-channel attention conv feeds the Mul by broadcast only: its own group, untouched
    assert group_of(analysis, net.op_name(spatial)).channels == 1
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert shapes[net.nodes[1].input[1]] == (1, 4, 1, 1)


def test_se_block_couples_gate_and_features():
    """Squeeze-and-excitation: x · sigmoid(fc2(relu(fc1(gap(x))))) ties fc2's outputs to x's channels."""
    net = Net()
    x = net.input("x", [1, 3, 6, 6])
    first = net.conv(x, 3, 8, 3)
    f = net.node("Relu", [first])
    excite = net.conv(net.node("Relu", [net.conv(net.node("GlobalAveragePool", [f]), 8, 2)]), 2, 8)
    y = net.conv(net.node("Mul", [f, net.node("Sigmoid", [excite])]), 8, 4)
    analysis, _, _ = prune_exactly(net.model([y]), expect_prunable=2)
    features = group_of(analysis, net.op_name(first))
    assert sorted(features.root_names) == sorted([net.op_name(first), net.op_name(excite)])
    assert len(features.consumers) == 2  # the squeeze conv and the output conv


def test_concat_offsets():
    net = Net()
    x = net.input("x", [1, 3, 5, 5])
    a, b = net.conv(x, 3, 4), net.conv(x, 3, 6, 3)
    extra = net.const("extra", net.rand(1, 2, 5, 5))
    cat = net.node("Concat", [net.node("Relu", [a]), extra, net.node("Relu", [b])], axis=1)  # 4 + 2 + 6
    y = net.conv(cat, 12, 3)
    analysis, pruned, _ = prune_exactly(net.model([y]), expect_prunable=2)
    consumer = {g.name: g.consumers[0] for g in analysis.prunable}
    assert consumer[net.op_name(a)].positions(range(4)).tolist() == [0, 1, 2, 3]
    assert consumer[net.op_name(b)].positions(range(6)).tolist() == [6, 7, 8, 9, 10, 11]
    assert weight_shapes(pruned)[net.op_name(y)] == (3, 2 + 2 + 3, 1, 1)


def test_concat_summed_with_a_conv_spans_both_inputs():
    net = Net()
    x = net.input("x", [1, 3, 5, 5])
    c = net.conv(x, 3, 6)                      # first root: owns the 6 channels of the sum
    parts = [net.conv(x, 3, 2), net.conv(x, 3, 4)]
    y = net.conv(net.node("Add", [c, net.node("Concat", parts, axis=1)]), 6, 3)
    model = net.model([y])
    analysis, _, _ = prune_exactly(model, expect_prunable=1)
    assert sorted(analysis.prunable[0].root_names) == sorted(net.op_name(t) for t in [c] + parts)
    graph = G.import_model(model)
    group = analyze_channels(graph).prunable[0]
    with pytest.raises(ValueError, match="no channel"):  # channels 0 and 1 are all of Conv_4's
        prune_channels(graph, group, keep=[2, 3, 4, 5])


def split_sizes(model: onnx.ModelProto) -> tuple[str, list[int] | None]:
    """How the model's Split states its sizes: ("attribute"|"input", sizes) or ("implicit", None)."""
    split = next(n for n in model.graph.node if n.op_type == "Split")
    attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
    if "split" in attrs:
        return "attribute", list(attrs["split"])
    if len(split.input) > 1 and split.input[1]:
        value = next(t for t in model.graph.initializer if t.name == split.input[1])
        return "input", onnx.numpy_helper.to_array(value).tolist()
    return "implicit", None


@pytest.mark.parametrize("opset, form, removed, expected", [
    (11, "attribute", [0, 5], ("attribute", [2, 4])),
    (13, "input", [0, 5], ("input", [2, 4])),
    (13, "equal", [0, 5], ("implicit", None)),         # 4+4 → 3+3: still an equal split
    (13, "equal", [0, 3], ("input", [2, 4])),          # 4+4 → 2+4: sizes become explicit
    (18, "num_outputs", [1, 6], ("implicit", None)),
    (18, "num_outputs", [1, 2], ("input", [2, 4])),    # num_outputs dropped for the sizes input
])
def test_split_sizes(opset, form, removed, expected):
    net = Net(opset)
    x = net.input("x", [1, 3, 4, 4])
    h = net.node("Relu", [net.conv(x, 3, 8)])
    if form == "attribute":
        parts = net.node("Split", [h], n_out=2, axis=1, split=[3, 5])
    elif form == "input":
        parts = net.node("Split", [h, net.const("sizes", np.array([3, 5], np.int64))], n_out=2, axis=1)
    elif form == "equal":
        parts = net.node("Split", [h], n_out=2, axis=1)
    else:
        parts = net.node("Split", [h], n_out=2, axis=1, num_outputs=2)
    sizes = [3, 5] if form in ("attribute", "input") else [4, 4]
    y = net.node("Concat", [net.conv(parts[0], sizes[0], 2), net.conv(parts[1], sizes[1], 2)], axis=1)
    _, pruned, _ = prune_exactly(net.model([y]), choose=lambda g: np.array(removed))
    assert split_sizes(pruned) == expected


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_follows_its_input(multiplier):
    net = Net()
    x = net.input("x", [1, 3, 6, 6])
    h = net.node("Clip", [net.bn(net.conv(x, 3, 6), 6), net.const("lo", np.array(0.0, np.float32)),
                          net.const("hi", np.array(6.0, np.float32))])
    depthwise = net.conv(h, 6, 6 * multiplier, 3, group=6)
    y = net.conv(net.node("Relu", [net.bn(depthwise, 6 * multiplier)]), 6 * multiplier, 4)
    analysis, pruned, _ = prune_exactly(net.model([y]), expect_prunable=1)
    group = analysis.prunable[0]
    slot = next(s for s in group.members if s.node.name == net.op_name(depthwise) and s.input_index == 1)
    assert slot.positions([1]).tolist() == list(range(multiplier, 2 * multiplier))
    conv = next(n for n in pruned.graph.node if n.name == net.op_name(depthwise))
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == 3
    assert weight_shapes(pruned)[conv.name] == (3 * multiplier, 1, 3, 3)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_output_in_a_residual_is_followed_backwards(multiplier):
    """The other summand's conv comes first, so the group reaches the depthwise Conv from its output."""
    net = Net()
    x = net.input("x", [1, 2, 6, 6])
    b = net.conv(x, 2, 4)
    a = net.conv(x, 2, 4 // multiplier)
    d = net.conv(a, 4 // multiplier, 4, 3, group=4 // multiplier)
    y = net.conv(net.node("Add", [d, b]), 4, 3)
    # with multiplier 2, the sum's channels 2c and 2c+1 both come from the depthwise input channel
    # c: they become one group channel, so the group has 2 channels, not the 4 of its first root
    analysis, pruned, _ = prune_exactly(net.model([y]), expect_prunable=1,
                                        choose=lambda g: np.array([1]))
    group = analysis.prunable[0]
    assert sorted(group.root_names) == sorted([net.op_name(a), net.op_name(b)])
    assert group.channels == 4 // multiplier
    slot = next(s for s in group.members if s.node.name == net.op_name(d) and s.input_index == 1)
    assert slot.positions([1]).tolist() == list(range(multiplier, 2 * multiplier))
    assert weight_shapes(pruned)[net.op_name(d)] == (4 - multiplier, 1, 3, 3)


def test_grouped_conv_is_refused():
    net = Net()
    x = net.input("x", [1, 3, 6, 6])
    h = net.conv(x, 3, 8)
    grouped = net.conv(h, 8, 8, 3, group=2)
    y = net.conv(grouped, 8, 2)
    analysis = analyze_channels(G.import_model(net.model([y])))
    assert "grouped Conv (group=2, 8 input channels)" in group_of(analysis, net.op_name(h)).reason
    assert "grouped Conv" in group_of(analysis, net.op_name(grouped)).reason


@pytest.mark.parametrize("opset", [8, 11, 13, 18])
def test_spatial_ops_keep_channels(opset):
    """Pool, Resize/Upsample, Pad and Slice on the spatial axes; their attribute/input forms per opset."""
    net = Net(opset)
    x = net.input("x", [1, 3, 8, 8])
    first = net.conv(x, 3, 6, 3)
    h = net.node("MaxPool", [net.node("Relu", [first])], kernel_shape=[2, 2], strides=[2, 2])
    if opset == 8:  # attribute forms: Upsample scales (before 9), Pad pads (before 11), Slice (before 10)
        h = net.node("Upsample", [h], mode="nearest", scales=[1.0, 1.0, 2.0, 2.0])
        h = net.node("Pad", [h], pads=[0, 0, 1, 1, 0, 0, 1, 1])
        h = net.node("Slice", [h], starts=[1, 0], ends=[9, 1000], axes=[2, 1])
    else:
        roi = net.const("roi", np.zeros(0, np.float32))
        h = net.node("Resize", [h, roi, net.const("scales", np.array([1, 1, 2, 2], np.float32))], mode="nearest")
        pads = net.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
        h = net.node("Pad", [h, pads], mode="reflect")
        ints = lambda *v: net.const("ints", np.array(v, np.int64))  # noqa: E731
        h = net.node("Slice", [h, ints(1, 0), ints(9, 2**62), ints(2, 1)])
    h = net.node("AveragePool", [h], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = net.node("Flatten", [net.node("GlobalMaxPool", [net.conv(h, 6, 4)])])
    # Slice-1 has no shape inference: the Slice output's channel count comes from its input
    analysis, pruned, _ = prune_exactly(net.model([y], shapes=[[1, 4]]))
    assert group_of(analysis, net.op_name(first)).prunable
    assert weight_shapes(pruned)[net.op_name(first)] == (3, 3, 3, 3)


def test_resize_sizes_and_pad_axes_are_updated():
    net = Net(18)
    x = net.input("x", [1, 3, 4, 4])
    h = net.conv(x, 3, 6)
    h = net.node("Resize", [h, "", "", net.const("sizes", np.array([1, 6, 8, 8], np.int64))], mode="nearest")
    h = net.node("Pad", [h, net.const("pads", np.array([1, 2], np.int64)), "",
                         net.const("axes", np.array([3], np.int64))])
    y = net.conv(h, 6, 2)
    _, pruned, _ = prune_exactly(net.model([y]))
    resize = next(n for n in pruned.graph.node if n.op_type == "Resize")
    sizes = next(t for t in pruned.graph.initializer if t.name == resize.input[3])
    assert onnx.numpy_helper.to_array(sizes).tolist() == [1, 3, 8, 8]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_flatten_into_gemm_maps_each_channel_to_hw_columns(trans_b):
    net = Net()
    x = net.input("x", [1, 3, 4, 4])
    h = net.node("MaxPool", [net.node("Relu", [net.conv(x, 3, 5, 3)])], kernel_shape=[2, 2], strides=[2, 2])
    weight = net.rand(5 * 2 * 2, 7)
    y = net.node("Gemm", [net.node("Flatten", [h]), net.const("fc", weight.T.copy() if trans_b else weight),
                          net.const("fc_b", net.rand(7))], transB=trans_b)
    analysis, pruned, _ = prune_exactly(net.model([y]), expect_prunable=1)
    consumer = analysis.prunable[0].consumers[0]
    assert consumer.axis == trans_b and consumer.positions([1]).tolist() == [4, 5, 6, 7]
    assert weight_shapes(pruned)[net.op_name(y)] == ((7, 12) if trans_b else (12, 7))


@pytest.mark.parametrize("target", [[1, -1], [1, 40], [0, 40], [-1, 40]])
def test_reshape_into_matmul(target):
    """A constant Reshape merging C with H·W (explicit sizes are rewritten, -1 and 0 follow)."""
    net = Net()
    x = net.input("x", [1, 3, 2, 4])
    h = net.conv(x, 3, 5)
    flat = net.node("Reshape", [h, net.const("shape", np.array(target, np.int64))])
    y = net.node("MatMul", [flat, net.const("w", net.rand(40, 3))])
    analysis, pruned, _ = prune_exactly(net.model([y]), expect_prunable=1)
    reshape = next(n for n in pruned.graph.node if n.op_type == "Reshape")
    new_target = onnx.numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == reshape.input[1]))
    expected = {(1, -1): [1, -1], (1, 40): [1, 24], (0, 40): [0, 24], (-1, 40): [-1, 24]}[tuple(target)]
    assert new_target.tolist() == expected


def test_transpose_to_nhwc_then_matmul():
    net = Net()
    x = net.input("x", [1, 3, 4, 4])
    h = net.node("Transpose", [net.node("Relu", [net.conv(x, 3, 6)])], perm=[0, 2, 3, 1])  # N H W C
    dense = net.node("MatMul", [h, net.const("w", net.rand(6, 5))])
    h = net.node("Add", [dense, net.const("b", net.rand(5))])
    h = net.node("Transpose", [net.node("Relu", [h])], perm=[0, 3, 1, 2])                  # back to NCHW
    y = net.conv(h, 5, 2)
    analysis, pruned, _ = prune_exactly(net.model([y]), expect_prunable=2)
    matmul_group = group_of(analysis, net.op_name(dense))
    assert sorted((s.node.op, s.role) for s in matmul_group.slots) == [
        ("Add", "param"), ("Conv", "consumer"), ("MatMul", "producer")]
    assert weight_shapes(pruned)[net.op_name(dense)] == (3, 3)  # 6 → 3 rows (conv group), 5 → 3 columns


def test_mlp_gemm_and_matmul_layers():
    net = Net()
    x = net.input("x", [2, 6])
    gemm = net.node("Gemm", [x, net.const("w1", net.rand(8, 6)), net.const("b1", net.rand(8))], transB=1)
    dense = net.node("MatMul", [net.node("Relu", [gemm]), net.const("w2", net.rand(8, 10))])
    h = net.node("Sigmoid", [net.node("Add", [dense, net.const("b2", net.rand(10))])])
    h = net.node("Unsqueeze", [h, net.const("axes", np.array([1], np.int64))])  # 2×1×10
    h = net.node("Squeeze", [net.node("ReduceMean", [h], axes=[1]),
                             net.const("axes", np.array([1], np.int64))])
    y = net.node("Gemm", [h, net.const("w3", net.rand(10, 3))])
    analysis, pruned, _ = prune_exactly(net.model([y]), expect_prunable=2)
    assert weight_shapes(pruned)[net.op_name(gemm)] == (4, 6) and weight_shapes(pruned)[net.op_name(dense)] == (4, 5)


def test_quantize_dequantize_per_channel_scales():
    net = Net(13)
    x = net.input("x", [1, 3, 4, 4])
    h = net.conv(x, 3, 4)
    scale = net.const("scale", np.full(4, 0.05, np.float32))
    zero = net.const("zero", np.zeros(4, np.int8))
    h = net.node("DequantizeLinear", [net.node("QuantizeLinear", [h, scale, zero], axis=1), scale, zero], axis=1)
    y = net.conv(h, 4, 2)
    analysis, pruned, _ = prune_exactly(net.model([y]), expect_prunable=1, rel_l2=1e-5)
    assert sorted((s.node.op, s.input_index) for s in analysis.prunable[0].members if s.role == "param") == [
        ("DequantizeLinear", 1), ("DequantizeLinear", 2), ("QuantizeLinear", 1), ("QuantizeLinear", 2)]


def test_shared_weight_is_copied_before_slicing():
    net = Net()
    x = net.input("x", [1, 4, 4, 4])
    shared = net.const("shared", net.rand(4, 4, 1, 1))
    kept = net.conv(x, 4, 4, weight=shared)                  # a graph output: its group is refused
    branch = net.conv(x, 4, 4, weight=shared)
    model = net.model([kept, net.conv(net.node("Relu", [branch]), 4, 2)])
    analysis, pruned, _ = prune_exactly(model, expect_prunable=1)
    assert "graph output" in group_of(analysis, net.op_name(kept)).reason
    shapes = weight_shapes(pruned)
    assert shapes[net.op_name(kept)] == (4, 4, 1, 1) and shapes[net.op_name(branch)] == (2, 4, 1, 1)


# ---------------------------------------------------------------------------- refusals
def _refusal(build) -> str:
    net = Net()
    x = net.input("x", [1, 3, 4, 4])
    first = net.conv(x, 3, 6)
    y = build(net, net.node("Relu", [first]))
    graph = G.import_model(net.model([y]))
    return group_of(analyze_channels(graph), net.op_name(first)).reason or ""


def _subgraph_reader(net, h):
    branch = helper.make_graph([helper.make_node("Relu", [h], ["inner"])], "then", [],
                               [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Sigmoid", [h], ["inner2"])], "else", [],
                              [helper.make_tensor_value_info("inner2", TensorProto.FLOAT, None)])
    cond = net.const("cond", np.array(True))
    return net.node("If", [cond], then_branch=branch, else_branch=other)


def _custom(net, h):
    net.extra_opsets.append(("com.example", 1))
    return net.node("MyOp", [h], domain="com.example")


REFUSALS = {
    "graph output": (lambda net, h: h, "channels reach graph output"),
    "unknown op": (lambda net, h: net.node("LRN", [h], size=3), "op LRN is not understood"),
    "channel-axis Slice": (lambda net, h: net.conv(net.node("Slice", [h] + [net.const("i", np.array([v], np.int64))
                                                                         for v in (0, 4, 1)]), 4, 2),
                           "slices the channel axis"),
    "computed Reshape shape": (lambda net, h: net.node("Reshape", [h, net.input("shape", [2], TensorProto.INT64)]),
                               "target shape is not a constant"),
    "custom domain": (_custom, "custom op of domain 'com.example'"),
    "subgraph reader": (_subgraph_reader, "read inside a subgraph"),
    "Shape reader": (lambda net, h: net.node("Add", [net.conv(h, 6, 2),
                                                     net.node("Cast", [net.node("Shape", [h])], to=1)]),
                     "reads the tensor's shape"),
    "graph input in a residual": (lambda net, h: net.conv(net.node("Add", [h, net.input("z", [1, 6, 4, 4])]), 6, 2),
                                  "channels come from graph input 'z'"),
    "channel shuffle": (lambda net, h: net.conv(net.node("Reshape", [net.node("Transpose", [
        net.node("Reshape", [h, net.const("s", np.array([1, 2, 3, 4, 4], np.int64))])], perm=[0, 2, 1, 3, 4]),
        net.const("s", np.array([1, 6, 4, 4], np.int64))]), 6, 2), "splits or scatters the channel axis"),
    "channel-axis Softmax": (lambda net, h: net.node("Softmax", [h], axis=1), "normalizes over the channel axis"),
    "channel-axis reduction": (lambda net, h: net.node("ReduceMean", [h], axes=[1]),
                               "reduces over the channel axis"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_refusal_reasons(kind):
    build, expected = REFUSALS[kind]
    assert expected in _refusal(build)


def test_refused_groups_and_bad_keeps_are_rejected():
    net = Net()
    x = net.input("x", [1, 3, 4, 4])
    h = net.conv(x, 3, 4)
    y = net.conv(h, 4, 2)
    graph = G.import_model(net.model([y]))
    analysis = analyze_channels(graph)
    good, refused = group_of(analysis, net.op_name(h)), group_of(analysis, net.op_name(y))
    with pytest.raises(ValueError, match="not prunable"):
        prune_channels(graph, refused, [0])
    for keep in ([], [0, 0], [4], [0.5]):
        with pytest.raises(ValueError):
            prune_channels(graph, good, keep)
    result = prune_channels(graph, good, np.array([True, False, True, False]))
    assert result.channels_removed == 2 and result.parameters_removed == 2 * 3 + 2 + 2 * 2


# ---------------------------------------------------------------------------- importance API
def test_weight_slices_give_every_channels_values():
    net = Net()
    x = net.input("x", [1, 3, 4, 4])
    a, b = net.conv(x, 3, 4, 3), net.conv(x, 3, 4)
    y = net.conv(net.node("Add", [net.bn(a, 4), b]), 4, 2)
    model = net.model([y])
    group = group_of(analyze_channels(G.import_model(model)), net.op_name(a))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    inputs = {n.name: n.input for n in model.graph.node}
    # producer L1 per channel: both convs' filters and biases
    expected = sum(np.abs(values[inputs[net.op_name(t)][1]]).sum(axis=(1, 2, 3))
                   + np.abs(values[inputs[net.op_name(t)][2]]) for t in (a, b))
    np.testing.assert_allclose(group.norms(1), expected, rtol=1e-6)
    bn_scale = next(parts for slot, parts in group.weight_slices(("param",))
                    if slot.node.op == "BatchNormalization" and slot.input_index == 1)
    assert [p.shape for p in bn_scale] == [(1,)] * 4
    (slot, consumer), = group.weight_slices(("consumer",))
    assert slot.node.name == net.op_name(y) and group.consumer_nodes == [slot.node]
    np.testing.assert_array_equal(consumer[2], np.moveaxis(values[inputs[net.op_name(y)][1]], 1, 0)[2:3])


# ---------------------------------------------------------------------------- standard architectures
def test_builders_group_counts():
    """ResNet-18: the stem joins stage 1's residual chain, one chain per later stage, one group per
    block's inner conv (4 + 8). MobileNetV2: the residual chains plus each expansion conv. Only
    the classifier's own channels (the logits) are refused."""
    for builder, prunable in ((resnet18, 12), (mobilenetv2, 24)):
        analysis = analyze_channels(G.import_model(builder(image_size=32, width=0.25, num_classes=10)))
        assert len(analysis.prunable) == prunable, builder.__name__
        assert [g.reason for g in analysis.refused] == ["channels reach graph output 'logits'"]


@pytest.mark.parametrize("builder", [mobilenetv2, inception])
def test_builders_prune_a_quarter_by_l1(builder):
    model = builder(image_size=32 if builder is mobilenetv2 else 64, width=0.25, num_classes=10)

    def smallest_quarter(group):
        return np.sort(np.argsort(group.norms(1), kind="stable")[:group.channels // 4])

    _, pruned, _ = prune_exactly(model, choose=smallest_quarter, rel_l2=1e-5)
    before, after = model_stats(model), model_stats(pruned)
    assert after["macs"] < 0.8 * before["macs"] and after["parameters"] < before["parameters"]
