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
