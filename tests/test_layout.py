"""fuse-consecutive: each pair rewrite is exact (onnxruntime agrees), in the attribute and the
input form of axes, with negative axes; and the cases that must not fuse stay as they are."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt.context import PassContext
from onnxopt.registry import parse_pass_spec
from tests.util import assert_same_outputs, init, make_model, op_types, run_passes, vi

RNG = np.random.default_rng(7)
PASS = "fuse-consecutive"


def build(nodes, inputs, outputs, initializers=(), opset=17):
    """make_model with output shapes from ONNX shape inference; intermediate value_info dropped
    (exporters rarely write it), so the pass has to infer what it needs."""
    model = onnx.shape_inference.infer_shapes(make_model(nodes, inputs, outputs, initializers, opset=opset))
    del model.graph.value_info[:]
    return model


def fused(model, feeds=None):
    """Run fuse-consecutive, check the result against the original and return it."""
    out = run_passes(model, PASS)
    assert_same_outputs(model, out, feeds=feeds, rel_l2=0.0)
    return out


def axes_form(op, axes, opset, name):
    """(inputs beyond the data, attrs, initializers) for Squeeze/Unsqueeze/Reduce* axes at ``opset``."""
    since = {"Squeeze": 13, "Unsqueeze": 13, "ReduceSum": 13}.get(op, 18)
    if axes is None:
        return [], {}, []
    if opset >= since:
        return [name], {}, [init(name, np.array(axes, dtype=np.int64))]
    return [], {"axes": list(axes)}, []


def axes_node(op, x, y, axes, opset, name, **attrs):
    extra, axes_attrs, inits = axes_form(op, axes, opset, f"{name}_axes")
    return helper.make_node(op, [x] + extra, [y], name=name, **axes_attrs, **attrs), inits


def feeds_for(shape, n=2):
    return [{"x": RNG.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def unknown_rank_model(nodes, out_rank, initializers=(), opset=17):
    """x (2, 3, 4) → Reshape to a shape fed at run time → ``r`` of unknown rank → ``nodes`` → y.

    (onnx.checker wants a shape on every graph input and output, so the rank is hidden this way.)
    """
    head = helper.make_node("Reshape", ["x", "target"], ["r"])
    return make_model([head, *nodes], [vi("x", [2, 3, 4]), vi("target", ["K"], TensorProto.INT64)],
                      [vi("y", [None] * out_rank)], initializers, opset=opset)


def unknown_rank_feeds(target):
    return [{"x": RNG.standard_normal((2, 3, 4)).astype(np.float32), "target": np.array(target, dtype=np.int64)}]


# =========================================================================== Transpose
def test_transposes_compose():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[2, 0, 1, 3])]
    out = fused(build(nodes, [vi("x", [2, 3, 4, 5])], [vi("y", None)]))
    assert op_types(out) == ["Relu", "Transpose"]
    perm = list(out.graph.node[1].attribute[0].ints)
    assert perm == [3, 0, 2, 1]  # y.shape = (5, 2, 4, 3)


def test_transposes_cancel_and_default_perm_uses_rank():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"]),  # default perm: reversed axes
             helper.make_node("Transpose", ["t"], ["u"], perm=[2, 1, 0]),
             helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 3, 4])], [vi("y", [2, 3, 4])]))
    assert op_types(out) == ["Relu", "Relu"]


def test_transposes_cancel_into_graph_output_keeps_the_name():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0])]
    out = fused(build(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])]))
    assert op_types(out) == ["Relu"] and out.graph.output[0].name == "y"


def test_transpose_pair_with_shared_intermediate_does_not_fuse_unless_it_cancels():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[1, 2, 0]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[0, 2, 1]),   # composes to [1, 0, 2]
             helper.make_node("Transpose", ["t"], ["z0"], perm=[2, 0, 1]),  # cancels the first
             helper.make_node("Relu", ["z0"], ["z"]),
             helper.make_node("Relu", ["t"], ["w"])]
    out = fused(build(nodes, [vi("x", [2, 3, 4])], [vi("y", None), vi("z", None), vi("w", None)]))
    # The cancelling pair loses its second Transpose; the other keeps both (fusing would not save a node).
    assert sorted(op_types(out)) == ["Relu", "Relu", "Relu", "Transpose", "Transpose"]


def test_transpose_without_perm_and_unknown_rank_does_not_fuse():
    nodes = [helper.make_node("Transpose", ["r"], ["t"]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0, 2])]
    model = unknown_rank_model(nodes, 3)
    out = fused(model, feeds=unknown_rank_feeds([4, 3, 2]))
    assert op_types(out).count("Transpose") == 2


# =========================================================================== Reshape
@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("first", ["Reshape", "Flatten", "Unsqueeze"])
def test_regrouping_then_reshape_becomes_one_reshape(first, opset):
    inits = [init("s2", np.array([3, -1, 2], dtype=np.int64))]
    if first == "Reshape":
        inits.append(init("s1", np.array([6, 4], dtype=np.int64)))
        head = helper.make_node("Reshape", ["r", "s1"], ["t"])
    elif first == "Flatten":
        head = helper.make_node("Flatten", ["r"], ["t"], axis=2)
    else:
        head, axes_inits = axes_node("Unsqueeze", "r", "t", [0], opset, "un")
        inits += axes_inits
    nodes = [helper.make_node("Relu", ["x"], ["r"]), head, helper.make_node("Reshape", ["t", "s2"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 3, 4])], [vi("y", None)], inits, opset=opset))
    assert op_types(out) == ["Relu", "Reshape"]
    assert out.graph.output[0].name == "y"


def test_reshape_zero_entries_resolve_from_static_shapes():
    inits = [init("s1", np.array([6, 4], dtype=np.int64)), init("s2", np.array([0, 2, -1], dtype=np.int64))]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "s1"], ["t"]),
             helper.make_node("Reshape", ["t", "s2"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 3, 4])], [vi("y", None)], inits))
    assert op_types(out) == ["Relu", "Reshape"]
    shape = onnx.numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == out.graph.node[1].input[1]))
    assert shape.tolist() == [6, 2, -1]  # the 0 copied the intermediate's first dim


def test_reshape_allowzero_keeps_literal_zero():
    inits = [init("s1", np.array([0, 4], dtype=np.int64)), init("s2", np.array([2, 0], dtype=np.int64))]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "s1"], ["t"], allowzero=1),
             helper.make_node("Reshape", ["t", "s2"], ["y"], allowzero=1)]
    model = build(nodes, [vi("x", [0, 2, 4])], [vi("y", None)], inits)
    out = fused(model, feeds=feeds_for((0, 2, 4)))
    assert op_types(out) == ["Relu", "Reshape"]


def test_reshape_zero_with_dynamic_intermediate_does_not_fuse():
    inits = [init("s1", np.array([-1, 3], dtype=np.int64)), init("s2", np.array([0, 3, 1], dtype=np.int64))]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "s1"], ["t"]),
             helper.make_node("Reshape", ["t", "s2"], ["y"])]
    out = fused(build(nodes, [vi("x", ["N", 6])], [vi("y", None)], inits), feeds=feeds_for((4, 6)))
    assert op_types(out).count("Reshape") == 2


def test_reshape_with_graph_output_in_the_middle_does_not_fuse():
    inits = [init("s1", np.array([6, 4], dtype=np.int64)), init("s2", np.array([24], dtype=np.int64))]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "s1"], ["t"]),
             helper.make_node("Reshape", ["t", "s2"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 3, 4])], [vi("t", None), vi("y", None)], inits))
    assert op_types(out).count("Reshape") == 2


def test_reshape_with_dynamic_target_does_not_fuse():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Flatten", ["r"], ["t"]),
             helper.make_node("Reshape", ["t", "s"], ["y"])]
    model = build(nodes, [vi("x", [2, 3, 4]), vi("s", [2], TensorProto.INT64)], [vi("y", None)])
    feeds = [{"x": RNG.standard_normal((2, 3, 4)).astype(np.float32), "s": np.array([4, 6], dtype=np.int64)}]
    out = fused(model, feeds=feeds)
    assert op_types(out) == ["Relu", "Flatten", "Reshape"]


# =========================================================================== Squeeze / Unsqueeze
@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("squeeze_axes,unsqueeze_axes", [([1], [1]), ([-1], [-1]), ([1, 3], [3, 1]), ([-1], [3]), ([0, -1], [3, 0])])
def test_squeeze_then_unsqueeze_on_the_same_axes_cancels(opset, squeeze_axes, unsqueeze_axes):
    sq, sq_inits = axes_node("Squeeze", "r", "s", squeeze_axes, opset, "sq")
    un, un_inits = axes_node("Unsqueeze", "s", "u", unsqueeze_axes, opset, "un")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), sq, un, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [1, 1, 3, 1])], [vi("y", None)], sq_inits + un_inits, opset=opset))
    assert op_types(out) == ["Relu", "Relu"]


@pytest.mark.parametrize("opset", [11, 13])
def test_unsqueeze_then_squeeze_on_the_same_axes_cancels(opset):
    un, un_inits = axes_node("Unsqueeze", "r", "u", [0, -1], opset, "un")
    sq, sq_inits = axes_node("Squeeze", "u", "s", [3, 0], opset, "sq")  # -1 of the rank-4 intermediate is 3
    nodes = [helper.make_node("Relu", ["x"], ["r"]), un, sq, helper.make_node("Relu", ["s"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 3])], [vi("y", None)], un_inits + sq_inits, opset=opset))
    assert op_types(out) == ["Relu", "Relu"]


def test_squeeze_unsqueeze_with_shared_intermediate_drops_only_the_unsqueeze():
    # silero-vad: one Squeeze(0) feeds Unsqueeze(0) → Concat and Unsqueeze(-1) → Relu.
    sq, i1 = axes_node("Squeeze", "r", "s", [0], 13, "sq")
    un0, i2 = axes_node("Unsqueeze", "s", "u0", [0], 13, "un0")
    un1, i3 = axes_node("Unsqueeze", "s", "u1", [-1], 13, "un1")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), sq, un0, un1,
             helper.make_node("Concat", ["u0", "r"], ["y"], axis=0), helper.make_node("Relu", ["u1"], ["z"])]
    out = fused(build(nodes, [vi("x", [1, 2, 3])], [vi("y", None), vi("z", None)], i1 + i2 + i3, opset=13))
    assert sorted(op_types(out)) == ["Concat", "Relu", "Relu", "Squeeze", "Unsqueeze"]


def test_squeeze_unsqueeze_with_the_squeeze_output_public_drops_only_the_unsqueeze():
    sq, i1 = axes_node("Squeeze", "r", "s", [1], 13, "sq")
    un, i2 = axes_node("Unsqueeze", "s", "u", [1], 13, "un")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), sq, un, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 1, 3])], [vi("s", None), vi("y", None)], i1 + i2, opset=13))
    assert op_types(out) == ["Relu", "Squeeze", "Relu"]


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_on_different_axes_does_not_fuse(opset):
    sq, i1 = axes_node("Squeeze", "r", "s", [-1], opset, "sq")
    un, i2 = axes_node("Unsqueeze", "s", "u", [0], opset, "un")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), sq, un, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [1, 4, 1])], [vi("y", None)], i1 + i2, opset=opset))
    assert op_types(out) == ["Relu", "Squeeze", "Unsqueeze", "Relu"]


def test_squeeze_unsqueeze_with_mixed_sign_axes_and_unknown_rank_does_not_fuse():
    sq, i1 = axes_node("Squeeze", "r", "s", [-1], 13, "sq")
    un, i2 = axes_node("Unsqueeze", "s", "u", [2], 13, "un")
    model = unknown_rank_model([sq, un, helper.make_node("Relu", ["u"], ["y"])], 3, i1 + i2, opset=13)
    result = onnxopt.optimize(model, passes=[parse_pass_spec(f"{PASS}:explain=true")])
    assert op_types(result.model).count("Squeeze") == 1
    notes = [n for r in result.records for n in r.notes]
    assert any("rank is unknown" in n for n in notes)
    assert_same_outputs(model, result.model, feeds=unknown_rank_feeds([4, 6, 1]), rel_l2=0.0)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("first_axes,second_axes", [([0], [0]), ([1], [0, 3]), ([-1], [1]), ([0, 2], [-1, 1]), ([2], [-4])])
def test_unsqueezes_compose(opset, first_axes, second_axes):
    a, i1 = axes_node("Unsqueeze", "r", "t", first_axes, opset, "a")
    b, i2 = axes_node("Unsqueeze", "t", "y", second_axes, opset, "b")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), a, b]
    out = fused(build(nodes, [vi("x", [2, 3])], [vi("y", None)], i1 + i2, opset=opset))
    assert op_types(out) == ["Relu", "Unsqueeze"]


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("first_axes,second_axes", [([0], [1]), ([2], [0]), ([-1], [2]), ([0, 2], [-1]), ([3], [-3]),
                                                    ([0], None)])
def test_squeezes_compose(opset, first_axes, second_axes):
    # x: (1, 2, 1, 1, 3, 1). No axes squeezes every unit dim, which needs the static shape.
    a, i1 = axes_node("Squeeze", "r", "t", first_axes, opset, "a")
    b, i2 = axes_node("Squeeze", "t", "y", second_axes, opset, "b")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), a, b]
    out = fused(build(nodes, [vi("x", [1, 2, 1, 1, 3, 1])], [vi("y", None)], i1 + i2, opset=opset))
    assert op_types(out) == ["Relu", "Squeeze"]


def test_unsqueeze_pair_with_graph_output_in_the_middle_does_not_fuse():
    a, i1 = axes_node("Unsqueeze", "r", "t", [0], 13, "a")
    b, i2 = axes_node("Unsqueeze", "t", "y", [0], 13, "b")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), a, b]
    out = fused(build(nodes, [vi("x", [2, 3])], [vi("t", None), vi("y", None)], i1 + i2, opset=13))
    assert op_types(out) == ["Relu", "Unsqueeze", "Unsqueeze"]


# =========================================================================== Reduce → Unsqueeze
@pytest.mark.parametrize("op,opset", [("ReduceMean", 11), ("ReduceMean", 13), ("ReduceMean", 18), ("ReduceSum", 11),
                                      ("ReduceSum", 13), ("ReduceL2", 13), ("ReduceLogSumExp", 18), ("ReduceMax", 18)])
@pytest.mark.parametrize("axes", [[1], [-1, 0]])
def test_reduce_then_unsqueeze_becomes_keepdims(op, opset, axes):
    red, i1 = axes_node(op, "r", "m", axes, opset, "red", keepdims=0)
    un, i2 = axes_node("Unsqueeze", "m", "u", sorted(a % 3 for a in axes), opset, "un")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), red, un, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 3, 4])], [vi("y", None)], i1 + i2, opset=opset))
    assert op_types(out) == ["Relu", op, "Relu"]
    keepdims = [a.i for a in out.graph.node[1].attribute if a.name == "keepdims"]
    assert keepdims == [1]


@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_over_every_axis_then_unsqueeze(opset):
    red = helper.make_node("ReduceSum", ["r"], ["m"], keepdims=0)
    un, i2 = axes_node("Unsqueeze", "m", "u", [0, 1], opset, "un")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), red, un, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 3])], [vi("y", None)], i2, opset=opset))
    assert op_types(out) == ["Relu", "ReduceSum", "Relu"]


def test_reduce_noop_with_empty_axes_does_not_fuse():
    red = helper.make_node("ReduceSum", ["r"], ["m"], keepdims=0, noop_with_empty_axes=1)
    un, i2 = axes_node("Unsqueeze", "m", "u", [0], 13, "un")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), red, un, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 3])], [vi("y", None)], i2, opset=13))
    assert op_types(out) == ["Relu", "ReduceSum", "Unsqueeze", "Relu"]


def test_reduce_unsqueeze_on_different_axes_does_not_fuse():
    red, i1 = axes_node("ReduceMean", "r", "m", [1], 13, "red", keepdims=0)
    un, i2 = axes_node("Unsqueeze", "m", "u", [2], 13, "un")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), red, un, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 3, 4])], [vi("y", None)], i1 + i2, opset=13))
    assert op_types(out) == ["Relu", "ReduceMean", "Unsqueeze", "Relu"]


@pytest.mark.parametrize("op,removed", [("ReduceMean", True), ("ReduceMax", True), ("ReduceL2", False), ("ReduceSumSquare", False)])
def test_reduce_over_unit_axes_then_unsqueeze_is_the_identity_when_the_reduction_is(op, removed):
    # silero-vad: ReduceMean(keepdims=0) over a static size-1 axis, then Unsqueeze back.
    red, i1 = axes_node(op, "r", "m", [1], 13, "red", keepdims=0)
    un, i2 = axes_node("Unsqueeze", "m", "u", [1], 13, "un")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), red, un, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 1, 4])], [vi("y", None)], i1 + i2, opset=13))
    assert op_types(out) == (["Relu", "Relu"] if removed else ["Relu", op, "Relu"])


# =========================================================================== Slice → Slice
def slice_node(x, y, starts, ends, axes, steps, opset, name):
    if opset < 10:
        return helper.make_node("Slice", [x], [y], name=name, starts=starts, ends=ends, axes=axes), []
    names = [f"{name}_{k}" for k in ("starts", "ends", "axes", "steps")]
    values = [starts, ends, axes, steps if steps is not None else [1] * len(starts)]
    return (helper.make_node("Slice", [x] + names, [y], name=name),
            [init(n, np.array(v, dtype=np.int64)) for n, v in zip(names, values)])


@pytest.mark.parametrize("opset", [9, 13])
def test_slices_on_disjoint_axes_merge(opset):
    big = 2**63 - 1
    s1, i1 = slice_node("r", "t", [0], [129], [1], None, opset, "s1")
    s2, i2 = slice_node("t", "u", [1], [big], [-1], None, opset, "s2")
    s3, i3 = slice_node("u", "v", [1], [-1], [0], None, opset, "s3")  # a chain of three collapses in one run
    nodes = [helper.make_node("Relu", ["x"], ["r"]), s1, s2, s3, helper.make_node("Relu", ["v"], ["y"])]
    out = fused(build(nodes, [vi("x", [4, 258, 5])], [vi("y", None)], i1 + i2 + i3, opset=opset))
    assert op_types(out) == ["Relu", "Slice", "Relu"]


def test_slices_with_steps_on_disjoint_axes_merge():
    s1, i1 = slice_node("r", "t", [5], [-10], [1], [-2], 13, "s1")
    s2, i2 = slice_node("t", "u", [0], [3], [2], [2], 13, "s2")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), s1, s2, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 9, 6])], [vi("y", None)], i1 + i2, opset=13))
    assert op_types(out) == ["Relu", "Slice", "Relu"]


@pytest.mark.parametrize("ranges", [((2, 8), (1, 4)), ((-6, 100), (-3, -1)), ((3, 5), (4, 9)), ((7, 2), (0, 1)), ((1, 9), (-100, 100))])
def test_slices_on_the_same_axis_compose_when_static(ranges):
    (a, b), (c, d) = ranges
    s1, i1 = slice_node("r", "t", [a], [b], [1], None, 13, "s1")
    s2, i2 = slice_node("t", "u", [c], [d], [1], None, 13, "s2")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), s1, s2, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 9])], [vi("y", None)], i1 + i2, opset=13))
    assert op_types(out) == ["Relu", "Slice", "Relu"]


def test_slices_on_the_same_axis_with_steps_do_not_fuse():
    s1, i1 = slice_node("r", "t", [0], [8], [1], [2], 13, "s1")
    s2, i2 = slice_node("t", "u", [1], [3], [1], None, 13, "s2")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), s1, s2, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, 9])], [vi("y", None)], i1 + i2, opset=13))
    assert op_types(out).count("Slice") == 2


def test_slices_on_the_same_dynamic_axis_do_not_fuse():
    s1, i1 = slice_node("r", "t", [1], [8], [1], None, 13, "s1")
    s2, i2 = slice_node("t", "u", [1], [3], [1], None, 13, "s2")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), s1, s2, helper.make_node("Relu", ["u"], ["y"])]
    out = fused(build(nodes, [vi("x", [2, "T"])], [vi("y", None)], i1 + i2, opset=13), feeds=feeds_for((2, 9)))
    assert op_types(out).count("Slice") == 2


def test_slices_with_shared_intermediate_do_not_fuse():
    s1, i1 = slice_node("r", "t", [0], [2], [0], None, 13, "s1")
    s2, i2 = slice_node("t", "u", [1], [3], [1], None, 13, "s2")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), s1, s2,
             helper.make_node("Relu", ["u"], ["y"]), helper.make_node("Relu", ["t"], ["z"])]
    out = fused(build(nodes, [vi("x", [4, 9])], [vi("y", None), vi("z", None)], i1 + i2, opset=13))
    assert op_types(out).count("Slice") == 2


def test_slices_with_dynamic_parameters_do_not_fuse():
    s1, i1 = slice_node("r", "t", [0], [2], [0], None, 13, "s1")
    s2 = helper.make_node("Slice", ["t", "start", "s2_end"], ["u"])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), s1, s2, helper.make_node("Relu", ["u"], ["y"])]
    model = build(nodes, [vi("x", [4, 9]), vi("start", [2], TensorProto.INT64)], [vi("y", None)],
                  i1 + [init("s2_end", np.array([3, 5], dtype=np.int64))], opset=13)
    feeds = [{"x": RNG.standard_normal((4, 9)).astype(np.float32), "start": np.array([1, 2], dtype=np.int64)}]
    out = fused(model, feeds=feeds)
    assert op_types(out).count("Slice") == 2


# =========================================================================== scope
def test_pairs_inside_an_if_branch_fuse_and_custom_ops_pass_through():
    then_nodes = [helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
                  helper.make_node("Transpose", ["t"], ["u"], perm=[1, 0]),
                  helper.make_node("Neg", ["u"], ["then_out"])]
    then_branch = helper.make_graph(then_nodes, "then", [], [vi("then_out", [2, 3])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["r"], ["else_out"])], "else", [], [vi("else_out", [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, [vi("x", [2, 3]), vi("c", [], TensorProto.BOOL)], [vi("y", [2, 3])])
    out = run_passes(model, PASS)
    branches = {a.name: a.g for a in out.graph.node[1].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Neg"]
    for cond in (True, False):
        feeds = [{"x": RNG.standard_normal((2, 3)).astype(np.float32), "c": np.array(cond)}]
        assert_same_outputs(model, out, feeds=feeds, rel_l2=0.0)


def test_custom_domain_pairs_are_left_alone():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0], domain="custom"),
             helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0])]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], extra_opsets=[("custom", 1)])
    graph = onnxopt.graph.import_model(model)
    result = parse_pass_spec(PASS).run(graph, PassContext())
    assert not result.changed and len(graph.nodes) == 3


def test_in_the_lossless_and_cleanup_presets():
    from onnxopt.presets import PRESETS

    for preset in ("lossless", "cleanup"):
        names = PRESETS[preset]
        assert names.index(PASS) == names.index("simplify-shapes") + 1


# =========================================================================== real models
@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["silero_vad_ov", "silero_vad_seq"])
def test_real_model_has_no_more_nodes_than_onnxsim(name, real_model_path):
    onnxsim = pytest.importorskip("onnxsim")
    from tools.realmodels import count_nodes

    model = onnx.load(str(real_model_path(name)))
    ours = onnxopt.optimize(model).model
    theirs = onnxsim.simplify(model)[0]
    assert count_nodes(ours) <= count_nodes(theirs)


# =========================================================================== fuse-transposes
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def transposes_pushed(model, feeds=None, rel_l2=1e-6, explain=False):
    """Run fuse-transposes, check the model and its outputs, and return (model, counters, notes)."""
    spec = "fuse-transposes:explain=true" if explain else "fuse-transposes"
    result = onnxopt.optimize(model, passes=[spec])
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model, feeds=feeds, rel_l2=rel_l2)
    assert len(result.model.graph.node) <= len(model.graph.node)
    record = result.records[0]
    return result.model, record.counters, record.notes


def conv(x, y, w_name, c_in, c_out, rng=RNG):
    return (helper.make_node("Conv", [x, w_name], [y], name=f"conv_{y}"),
            init(w_name, rng.standard_normal((c_out, c_in, 1, 1)).astype(np.float32)))


def tf_style(middle, middle_inits=(), outputs=("y",), channels=4, opset=13, extra_outputs=(), m_channels=None):
    """x (1, 3, 5, 6) → Conv → Transpose to NHWC ("t") → ``middle`` (ends in "m") → Transpose to NCHW → Conv → y,
    the shape of a tf2onnx export."""
    c1, w1 = conv("x", "c", "w1", 3, channels)
    c2, w2 = conv("back", "y", "w2", m_channels or channels, 2)
    nodes = [c1, helper.make_node("Transpose", ["c"], ["t"], perm=TO_NHWC), *middle,
             helper.make_node("Transpose", ["m"], ["back"], perm=TO_NCHW), c2]
    return build(nodes, [vi("x", [1, 3, 5, 6])], [vi(o, None) for o in (*outputs, *extra_outputs)],
                 [w1, w2, *middle_inits], opset=opset)


def initializer(model, name):
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_nhwc_pair_around_relu_and_bias_add_cancels_and_the_bias_becomes_c11():
    bias = RNG.standard_normal(4).astype(np.float32)
    model = tf_style([helper.make_node("Relu", ["t"], ["r"]), helper.make_node("Add", ["r", "bias"], ["m"])],
                     [init("bias", bias)])
    out, counters, _ = transposes_pushed(model, rel_l2=0.0)
    assert op_types(out) == ["Conv", "Relu", "Add", "Conv"]
    assert counters["transposes_removed"] == 2 and counters["nodes_removed"] == 2
    new_bias = initializer(out, out.graph.node[2].input[1])
    assert new_bias.shape == (4, 1, 1) and np.array_equal(new_bias.reshape(-1), bias)


def test_full_rank_constant_and_scalar_constant_operands():
    full = RNG.standard_normal((1, 5, 6, 4)).astype(np.float32)  # NHWC, varies along every axis but N
    middle = [helper.make_node("Mul", ["t", "full"], ["p"]), helper.make_node("Sub", ["half", "p"], ["q"]),
              helper.make_node("Clip", ["q", "lo", "hi"], ["m"])]
    inits = [init("full", full), init("half", np.array(0.5, dtype=np.float32)),
             init("lo", np.array(-1, dtype=np.float32)), init("hi", np.array(1, dtype=np.float32))]
    out, _, _ = transposes_pushed(tf_style(middle, inits), rel_l2=0.0)
    assert "Transpose" not in op_types(out)
    assert initializer(out, out.graph.node[1].input[1]).shape == (1, 4, 5, 6)
    assert initializer(out, out.graph.node[2].input[0]).shape == ()  # the scalar is reused as it is


def test_concat_of_two_transposed_branches():
    c1, w1 = conv("x", "a", "w1", 3, 4)
    c2, w2 = conv("x", "b", "w2", 3, 2)
    c3, w3 = conv("back", "y", "w3", 6, 2)
    nodes = [c1, c2, helper.make_node("Transpose", ["a"], ["ta"], perm=TO_NHWC),
             helper.make_node("Transpose", ["b"], ["tb"], perm=TO_NHWC),
             helper.make_node("Relu", ["tb"], ["rb"]),
             helper.make_node("Concat", ["ta", "rb"], ["cat"], axis=-1),  # channels in NHWC
             helper.make_node("Transpose", ["cat"], ["back"], perm=TO_NCHW), c3]
    model = build(nodes, [vi("x", [1, 3, 5, 6])], [vi("y", None)], [w1, w2, w3], opset=13)
    out, counters, _ = transposes_pushed(model, rel_l2=0.0)
    assert "Transpose" not in op_types(out) and counters["transposes_removed"] == 3
    concat = next(n for n in out.graph.node if n.op_type == "Concat")
    assert helper.get_attribute_value(concat.attribute[0]) == 1  # NHWC axis 3 is NCHW axis 1


def test_concat_with_a_constant_and_an_add_of_two_transposed_tensors():
    c1, w1 = conv("x", "a", "w1", 3, 4)
    c2, w2 = conv("x", "b", "w2", 3, 4)
    pad = RNG.standard_normal((1, 5, 6, 2)).astype(np.float32)
    nodes = [c1, c2, helper.make_node("Transpose", ["a"], ["ta"], perm=TO_NHWC),
             helper.make_node("Transpose", ["b"], ["tb"], perm=TO_NHWC),
             helper.make_node("Add", ["ta", "tb"], ["s"]),
             helper.make_node("Concat", ["s", "extra"], ["y0"], axis=3),
             helper.make_node("Transpose", ["y0"], ["y"], perm=TO_NCHW)]
    model = build(nodes, [vi("x", [1, 3, 5, 6])], [vi("y", None)], [w1, w2, init("extra", pad)], opset=13)
    out, _, _ = transposes_pushed(model, rel_l2=0.0)
    assert "Transpose" not in op_types(out) and out.graph.output[0].name == "y"


def test_graph_output_in_the_middle_keeps_its_value_and_one_transpose():
    middle = [helper.make_node("Relu", ["t"], ["r"]), helper.make_node("Sigmoid", ["r"], ["m"])]
    model = tf_style(middle, extra_outputs=("r",))
    out, counters, _ = transposes_pushed(model, rel_l2=0.0)
    assert op_types(out).count("Transpose") == 1 and counters["transposes_removed"] == 1
    assert [o.name for o in out.graph.output] == ["y", "r"]
    producer = next(n for n in out.graph.node if "r" in n.output)
    assert producer.op_type == "Transpose" and list(producer.attribute[0].ints) == TO_NHWC


def test_chain_ending_in_a_graph_output_is_left_alone():
    c1, w1 = conv("x", "c", "w1", 3, 4)
    nodes = [c1, helper.make_node("Transpose", ["c"], ["t"], perm=TO_NHWC), helper.make_node("Relu", ["t"], ["y"])]
    model = build(nodes, [vi("x", [1, 3, 5, 6])], [vi("y", None)], [w1], opset=13)
    out, counters, notes = transposes_pushed(model, explain=True)
    assert op_types(out) == ["Conv", "Transpose", "Relu"] and "transposes_removed" not in counters
    assert any("save 0 node" in n for n in notes)


def test_multiple_consumers_each_cancel_their_transpose():
    c2b, w2b = conv("back2", "z", "w3", 4, 2)
    middle = [helper.make_node("LeakyRelu", ["t"], ["m"], alpha=0.1),
              helper.make_node("Transpose", ["m"], ["back2"], perm=TO_NCHW), c2b]
    model = tf_style(middle, [w2b], extra_outputs=("z",))
    out, counters, _ = transposes_pushed(model, rel_l2=0.0)
    assert "Transpose" not in op_types(out) and counters["transposes_removed"] == 3


def test_shared_entry_stays_for_a_layout_dependent_reader():
    # t feeds a MaxPool (layout-dependent: it must keep reading t) and a Relu → Transpose back.
    middle = [helper.make_node("Relu", ["t"], ["m"]),
              helper.make_node("MaxPool", ["t"], ["side"], kernel_shape=[2, 2])]
    model = tf_style(middle, extra_outputs=("side",))
    out, counters, _ = transposes_pushed(model, rel_l2=0.0)
    assert op_types(out).count("Transpose") == 1 and counters["transposes_removed"] == 1
    assert next(n for n in out.graph.node if n.op_type == "MaxPool").input[0] == "t"


def test_chain_hitting_a_conv_is_left_alone():
    c1, w1 = conv("x", "c", "w1", 3, 4)
    c2, w2 = conv("r", "y", "w2", 6, 2)  # reads the NHWC tensor as if it were NCHW: no inverse Transpose
    nodes = [c1, helper.make_node("Transpose", ["c"], ["t"], perm=TO_NHWC), helper.make_node("Relu", ["t"], ["r"]), c2]
    model = build(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", None)], [w1, w2], opset=13)
    out, counters, notes = transposes_pushed(model, explain=True)
    assert op_types(out) == op_types(model) and not counters.get("nodes_removed")
    assert any("Conv 'conv_y' is not layout-agnostic" in n for n in notes)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_axis_is_remapped(op):
    model = tf_style([helper.make_node(op, ["t"], ["m"], axis=-1)], opset=13)
    out, _, _ = transposes_pushed(model)
    node = next(n for n in out.graph.node if n.op_type == op)
    assert "Transpose" not in op_types(out) and helper.get_attribute_value(node.attribute[0]) == 1


@pytest.mark.parametrize("perm,axis,new_axis", [([0, 1, 3, 2], 2, 2), ([0, 1, 3, 2], 3, None),
                                                (TO_NHWC, 1, 1), (TO_NHWC, 3, None)])
def test_softmax_before_opset_13_moves_only_when_its_flattened_axes_stay_a_suffix(perm, axis, new_axis):
    # Opset 11 Softmax normalises over axes axis..3 flattened together. Axis i of the transposed tensor
    # is axis perm[i] before it: with perm [0, 1, 3, 2], axes {2, 3} stay {3, 2} (a suffix) but axis {3}
    # is {2}; with NHWC, axes {1, 2, 3} are {2, 3, 1} (a suffix) but {3} is the channel axis 1.
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=perm),
             helper.make_node("Softmax", ["t"], ["m"], axis=axis),
             helper.make_node("Transpose", ["m"], ["y"], perm=[perm.index(i) for i in range(4)])]
    model = build(nodes, [vi("x", [1, 3, 5, 6])], [vi("y", None)], opset=11)
    out, _, _ = transposes_pushed(model)
    if new_axis is None:
        assert op_types(out) == op_types(model)
    else:
        assert op_types(out) == ["Relu", "Softmax"]
        assert helper.get_attribute_value(out.graph.node[1].attribute[0]) == new_axis


@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_mean_keepdims_axes_are_remapped(opset):
    red, inits = axes_node("ReduceMean", "t", "mean", [1, 2], opset, "red", keepdims=1)  # NHWC spatial axes
    middle = [red, helper.make_node("Mul", ["t", "mean"], ["m"])]  # squeeze-excite style rescale
    out, _, _ = transposes_pushed(tf_style(middle, inits, opset=opset))
    assert "Transpose" not in op_types(out)
    reduce = next(n for n in out.graph.node if n.op_type == "ReduceMean")
    axes = (list(reduce.attribute[[a.name for a in reduce.attribute].index("axes")].ints) if opset < 18
            else initializer(out, reduce.input[1]).tolist())
    assert sorted(axes) == [2, 3]


def test_reduce_without_keepdims_stops_the_push():
    red, inits = axes_node("ReduceMean", "t", "m", [1], 13, "red", keepdims=0)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=TO_NHWC), red,
             helper.make_node("Transpose", ["m"], ["y"], perm=[0, 2, 1])]
    model = build(nodes, [vi("x", [1, 3, 5, 6])], [vi("y", None)], inits, opset=13)
    out, _, notes = transposes_pushed(model, explain=True)
    assert op_types(out).count("Transpose") == 2
    assert any("keepdims=0" in n for n in notes)


def test_rank3_pair_around_elementwise_ops_cancels():
    # (N, C, T) ↔ (N, T, C), as in speech models; the (C,) scale broadcasts along the last axis.
    scale = RNG.standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Mul", ["t", "scale"], ["s"]), helper.make_node("Tanh", ["s"], ["m"]),
             helper.make_node("Transpose", ["m"], ["y"], perm=[0, 2, 1])]
    model = build(nodes, [vi("x", [2, 4, 7])], [vi("y", None)], [init("scale", scale)], opset=13)
    out, _, _ = transposes_pushed(model, rel_l2=0.0)
    assert op_types(out) == ["Relu", "Mul", "Tanh"] and out.graph.output[0].name == "y"
    assert initializer(out, out.graph.node[1].input[1]).shape == (4, 1)


def test_non_inverse_exit_keeps_one_composed_transpose():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[1, 2, 0]),
             helper.make_node("Neg", ["t"], ["m"]), helper.make_node("Transpose", ["m"], ["y"], perm=[0, 2, 1])]
    model = build(nodes, [vi("x", [2, 3, 4])], [vi("y", None)], opset=13)
    out, _, _ = transposes_pushed(model, rel_l2=0.0)
    assert op_types(out) == ["Relu", "Neg", "Transpose"]
    assert list(out.graph.node[2].attribute[0].ints) == [1, 0, 2]


def test_pad_slice_split_tile_and_argmax_parameters_are_remapped():
    # NHWC (1, 5, 6, 4) → Pad H by (1, 0), W by (0, 3), C by (0, 2) → (1, 6, 9, 6) → Slice W [1:5] → Split C →
    # Tile W x2 | Mul by ArgMax over W → Concat W → (1, 6, 12, 3).
    inits = [init("pads", np.array([0, 1, 0, 0, 0, 0, 3, 2], dtype=np.int64)),
             init("starts", np.array([1], dtype=np.int64)), init("ends", np.array([5], dtype=np.int64)),
             init("sl_axes", np.array([2], dtype=np.int64)), init("repeats", np.array([1, 1, 2, 1], dtype=np.int64))]
    middle = [helper.make_node("Pad", ["t", "pads"], ["p"]),
              helper.make_node("Slice", ["p", "starts", "ends", "sl_axes"], ["s"]),
              helper.make_node("Split", ["s"], ["s1", "s2"], axis=3),
              helper.make_node("Tile", ["s1", "repeats"], ["s1t"]),
              helper.make_node("ArgMax", ["s2"], ["am"], axis=2, keepdims=1),
              helper.make_node("Cast", ["am"], ["amf"], to=TensorProto.FLOAT),
              helper.make_node("Mul", ["s2", "amf"], ["s2m"]),
              helper.make_node("Concat", ["s1t", "s2m"], ["m"], axis=2)]
    model = tf_style(middle, inits, opset=13, m_channels=3)
    out, _, _ = transposes_pushed(model, rel_l2=0.0)
    assert "Transpose" not in op_types(out)
    pad = next(n for n in out.graph.node if n.op_type == "Pad")
    assert initializer(out, pad.input[1]).tolist() == [0, 0, 1, 0, 0, 2, 0, 3]  # NCHW begins, ends
    slice_ = next(n for n in out.graph.node if n.op_type == "Slice")
    assert initializer(out, slice_.input[3]).tolist() == [3]


def test_foreign_operand_is_imported_when_that_saves_nodes():
    # t + x_nhwc, where x_nhwc is a graph input already in NHWC: one Transpose(NCHW) on it cancels two.
    c1, w1 = conv("x", "c", "w1", 3, 4)
    nodes = [c1, helper.make_node("Transpose", ["c"], ["t"], perm=TO_NHWC), helper.make_node("Add", ["t", "z"], ["m"]),
             helper.make_node("Transpose", ["m"], ["y"], perm=TO_NCHW)]
    model = build(nodes, [vi("x", [1, 3, 5, 6]), vi("z", [1, 5, 6, 4])], [vi("y", None)], [w1], opset=13)
    out, counters, _ = transposes_pushed(model, rel_l2=0.0)
    assert op_types(out).count("Transpose") == 1 and counters["transposes_removed"] == 1
    importer = next(n for n in out.graph.node if n.op_type == "Transpose")
    assert importer.input[0] == "z" and list(importer.attribute[0].ints) == TO_NCHW


def test_foreign_operand_that_does_not_pay_stays_outside():
    # Importing z would cost one Transpose and the graph output another: the pair alone cancels, so the Add stays out.
    c1, w1 = conv("x", "c", "w1", 3, 4)
    c2, w2 = conv("back", "y", "w2", 4, 2)
    nodes = [c1, helper.make_node("Transpose", ["c"], ["t"], perm=TO_NHWC), helper.make_node("Relu", ["t"], ["m"]),
             helper.make_node("Transpose", ["m"], ["back"], perm=TO_NCHW), c2,
             helper.make_node("Add", ["m", "z"], ["side"])]
    model = build(nodes, [vi("x", [1, 3, 5, 6]), vi("z", [1, 5, 6, 4])], [vi("y", None), vi("side", None)],
                       [w1, w2], opset=13)
    out, counters, _ = transposes_pushed(model, rel_l2=0.0)
    assert op_types(out).count("Transpose") == 1 and counters["nodes_removed"] == 1


def test_transposed_tensor_read_as_a_parameter_is_kept():
    # Clip reads t as data (it joins the region) and as its bound (a parameter: it must keep t's value).
    # onnxruntime wants a scalar-sized bound, hence rank 1.
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[0]),
             helper.make_node("Clip", ["t", "t"], ["m"]), helper.make_node("Neg", ["m"], ["n"]),
             helper.make_node("Transpose", ["n"], ["y"], perm=[0])]
    model = build(nodes, [vi("x", [1])], [vi("y", None)], opset=13)
    out, _, _ = transposes_pushed(model, rel_l2=0.0)
    assert op_types(out) == ["Relu", "Transpose", "Clip", "Neg"]
    clip = out.graph.node[2]
    assert clip.input[0] == "r" and clip.input[1] == out.graph.node[1].output[0]


def test_graph_output_exit_takes_the_twin_name_and_a_second_one_goes_through_identity():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
             helper.make_node("Neg", ["t"], ["m"]),
             helper.make_node("Transpose", ["m"], ["y"], perm=[1, 0]),
             helper.make_node("Transpose", ["m"], ["z"], perm=[1, 0])]
    model = build(nodes, [vi("x", [3, 4])], [vi("y", None), vi("z", None)], opset=13)
    out, counters, _ = transposes_pushed(model, rel_l2=0.0)
    assert sorted(op_types(out)) == ["Identity", "Neg", "Relu"] and counters["transposes_removed"] == 3
    assert [o.name for o in out.graph.output] == ["y", "z"]


def test_default_perm_needs_the_rank_and_custom_ops_stop_the_push():
    nodes = [helper.make_node("Transpose", ["r"], ["t"]), helper.make_node("Relu", ["t"], ["m"]),
             helper.make_node("Transpose", ["m"], ["y"], perm=[2, 1, 0])]
    model = unknown_rank_model(nodes, 3)
    result = onnxopt.optimize(model, passes=["fuse-transposes:explain=true"])
    assert op_types(result.model).count("Transpose") == 2
    assert any("rank is unknown" in n for r in result.records for n in r.notes)

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
             helper.make_node("MyOp", ["t"], ["m"], domain="custom"),
             helper.make_node("Transpose", ["m"], ["y"], perm=[1, 0])]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], extra_opsets=[("custom", 1)])
    graph = onnxopt.graph.import_model(model)
    result = parse_pass_spec("fuse-transposes").run(graph, PassContext())
    assert not result.changed and len(graph.nodes) == 4


def test_pairs_inside_an_if_branch_cancel():
    then_nodes = [helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]), helper.make_node("Sigmoid", ["t"], ["s"]),
                  helper.make_node("Transpose", ["s"], ["then_out"], perm=[1, 0])]
    then_branch = helper.make_graph(then_nodes, "then", [], [vi("then_out", [2, 3])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["r"], ["else_out"])], "else", [], [vi("else_out", [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, [vi("x", [2, 3]), vi("c", [], TensorProto.BOOL)], [vi("y", [2, 3])])
    out = run_passes(model, "fuse-transposes")
    branches = {a.name: a.g for a in out.graph.node[1].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Sigmoid"]
    for cond in (True, False):
        feeds = [{"x": RNG.standard_normal((2, 3)).astype(np.float32), "c": np.array(cond)}]
        assert_same_outputs(model, out, feeds=feeds, rel_l2=0.0)


@pytest.mark.parametrize("name", ["resnet_tiny", "tiny_cnn", "tiny_mlp", "tiny_if", "tiny_constant_weights", "tiny_dynamic",
                                  "tiny_custom_op"])
def test_fuse_transposes_never_adds_nodes_to_zoo_models(name):
    from models.zoo import BUILDERS, NOT_RUNNABLE

    model = BUILDERS[name]()
    out = onnxopt.optimize(model, passes=["fuse-transposes"]).model
    assert len(out.graph.node) <= len(model.graph.node)
    if name not in NOT_RUNNABLE:
        assert_same_outputs(model, out, rel_l2=0.0)


@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["ppocr5_rec", "mtcnn_p", "mtcnn_r", "silero_vad_seq", "silero_vad_ov"])
def test_fuse_transposes_on_real_models_never_adds_nodes(name, real_model_path, real_feeds):
    from onnxopt.presets import preset_passes
    from tools.realmodels import count_nodes

    model = onnx.load(str(real_model_path(name)))
    alone = onnxopt.optimize(model, passes=["fuse-transposes"]).model
    assert count_nodes(alone) <= count_nodes(model)
    preset = onnxopt.optimize(model, passes=preset_passes("lossless") + [parse_pass_spec("fuse-transposes")]).model
    assert count_nodes(preset) <= count_nodes(onnxopt.optimize(model, preset="lossless").model)
    assert_same_outputs(model, preset, feeds=real_feeds(name, 2), rel_l2=1e-5)
