"""fold-constants and simplify-shapes: equivalence in onnxruntime, what must be folded and what must not."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.context import PassContext
from onnxopt.errors import UserInputError
from onnxopt.registry import get_pass, make_pass
from tests.util import assert_same_outputs, init, make_model, op_types, random_feeds, run_passes, vi

RNG = np.random.default_rng(7)
I64 = TensorProto.INT64


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


def optimize(model, *specs, **ctx_fields):
    """Run passes with a PassContext (e.g. input_shapes); returns (model, records)."""
    ctx = PassContext(template=model, **ctx_fields)
    result = onnxopt.optimize(model, passes=list(specs), ctx=ctx)
    onnx.checker.check_model(result.model)
    return result.model, result.records


def counters(records, name):
    total = {}
    for r in records:
        if r.name == name:
            for k, v in r.counters.items():
                total[k] = total.get(k, 0) + v
    return total


def notes(records):
    return [n for r in records for n in r.notes]


def initializer(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


# =========================================================================== fold-constants
def test_constant_subgraph_folds_to_one_initializer():
    w = rand(4, 6)
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),           # 6x4
        helper.make_node("Mul", ["wt", "scale"], ["ws"]),
        helper.make_node("Add", ["ws", "shift"], ["wa"]),
        helper.make_node("Reshape", ["wa", "shape"], ["w2"]),                # 6x4 → 6x4 (via [-1, 4])
        helper.make_node("MatMul", ["x", "w2"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2, 6])], [vi("y", [2, 4])],
                       [init("w", w), init("scale", np.float32(0.5)), init("shift", rand(4)), init("shape", i64(-1, 4))])
    out, records = optimize(model, "fold-constants")
    assert op_types(out) == ["MatMul"]
    assert counters(records, "fold-constants")["nodes_folded"] == 4
    # The folded weight keeps the name of the tensor it replaces and the exact value.
    np.testing.assert_allclose(initializer(out, "w2"), (w.T * 0.5 + initializer(model, "shift")), rtol=1e-6)
    assert_same_outputs(model, out)


def test_all_foldable_nodes_are_evaluated_in_one_session(monkeypatch):
    import onnxopt.runtime as runtime

    sessions = []
    real = runtime.make_session
    monkeypatch.setattr(runtime, "make_session", lambda *a, **k: sessions.append(1) or real(*a, **k))
    nodes, prev = [], "c"
    for i in range(40):  # a 40-node constant chain plus 40 independent constant branches
        nodes.append(helper.make_node("Add", [prev, "one"], [f"a{i}"]))
        nodes.append(helper.make_node("Neg", [f"a{i}"], [f"n{i}"]))
        nodes.append(helper.make_node("Add", ["x", f"n{i}"], [f"y{i}"]))
        prev = f"a{i}"
    model = make_model(nodes, [vi("x", [3])], [vi(f"y{i}", [3]) for i in range(40)],
                       [init("c", rand(3)), init("one", np.ones(3, np.float32))])
    out, records = optimize(model, "fold-constants")
    assert counters(records, "fold-constants")["nodes_folded"] == 80
    assert len(sessions) == 1
    assert set(op_types(out)) == {"Add"} and len(out.graph.node) == 40
    assert_same_outputs(model, out)


def test_paddle_style_constant_node_weights_fold_like_initializers():
    w = rand(3, 5)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("Constant", [], ["perm_scale"], value_float=2.0),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("Mul", ["wt", "perm_scale"], ["ws"]),
        helper.make_node("MatMul", ["x", "ws"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2, 5])], [vi("y", [2, 3])])
    out, _ = optimize(model, "fold-constants")
    assert op_types(out) == ["MatMul"]
    np.testing.assert_allclose(initializer(out, "ws"), w.T * 2.0, rtol=1e-6)
    assert_same_outputs(model, out)


def test_folded_graph_output_keeps_its_name_and_reaches_a_fixed_point():
    nodes = [helper.make_node("Add", ["a", "b"], ["y"]), helper.make_node("Relu", ["x"], ["z"])]
    model = make_model(nodes, [vi("x", [2])], [vi("y", [2]), vi("z", [2])], [init("a", rand(2)), init("b", rand(2))])
    out, records = optimize(model, "fold-constants")
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert sorted(op_types(out)) == ["Identity", "Relu"]
    assert [r.changed for r in records] == [True, False]  # the Identity is not folded again
    assert_same_outputs(model, out)


def test_result_dtypes_follow_the_op_spec():
    nodes = [
        helper.make_node("Cast", ["c"], ["c16"], to=TensorProto.FLOAT16),
        helper.make_node("Shape", ["c"], ["s"]),
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("Add", ["x16", "c16"], ["y"]),
        helper.make_node("Reshape", ["x", "s"], ["z"]),
    ]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3], TensorProto.FLOAT16), vi("z", [2, 3])],
                       [init("c", rand(2, 3))])
    out, _ = optimize(model, "fold-constants")
    assert initializer(out, "c16").dtype == np.float16
    assert initializer(out, "s").dtype == np.int64
    assert_same_outputs(model, out, rel_l2=1e-3)  # onnxruntime's CPU float16 Add rounds by its own rules


def _file_size(model, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return path.stat().st_size


def test_size_threshold_keeps_bloating_folds_and_does_shrinking_ones(tmp_path):
    big = rand(512, 512)  # 1 MiB weight that a ReduceSum shrinks: must fold
    nodes = [
        helper.make_node("ConstantOfShape", ["mask_shape"], ["mask"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Tile", ["row", "repeats"], ["tiled"]),
        helper.make_node("Expand", ["col", "expand_shape"], ["expanded"]),
        helper.make_node("Range", ["start", "limit", "delta"], ["positions"]),
        helper.make_node("ReduceSum", ["big", "axes"], ["summed"], keepdims=0),
        helper.make_node("Mul", ["x", "mask"], ["m1"]),
        helper.make_node("Add", ["m1", "tiled"], ["m2"]),
        helper.make_node("Sub", ["m2", "expanded"], ["m3"]),
        helper.make_node("Add", ["m3", "positions"], ["m4"]),
        helper.make_node("Add", ["m4", "summed"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [512, 512])], [vi("y", [512, 512])], [
        init("mask_shape", i64(512, 512)), init("row", rand(1, 512)), init("repeats", i64(512, 1)),
        init("col", rand(512, 1)), init("expand_shape", i64(512, 512)),
        init("start", np.float32(0)), init("limit", np.float32(512)), init("delta", np.float32(1)),
        init("big", big), init("axes", i64(0))])
    before = _file_size(model, tmp_path)
    out, records = optimize(model, "fold-constants")
    ops = op_types(out)
    for op in ("ConstantOfShape", "Tile", "Expand"):
        assert op in ops
    assert "ReduceSum" not in ops and "Range" not in ops  # Range gives 2 KiB: under the threshold
    assert counters(records, "fold-constants")["skipped_size"] == 3
    assert any("size_threshold" in n for n in notes(records))
    assert _file_size(out, tmp_path) < before - 900_000  # the 1 MiB weight became 2 KiB, nothing grew
    assert_same_outputs(model, out, random_feeds(model, n=1))

    # With a bigger threshold the same model folds the expansions.
    out, _ = optimize(model, "fold-constants:size_threshold=4194304")
    assert not {"ConstantOfShape", "Tile", "Expand"} & set(op_types(out))
    assert_same_outputs(model, out, random_feeds(model, n=1))


def test_big_weight_preprocessing_chains_fold():
    # An LSTM-gate reorder of a 256 KiB weight: Slice x3 → Concat → Unsqueeze. Every step keeps
    # the size of what it reads, so all of it folds although each result exceeds the threshold;
    # declared intermediate shapes let the sizes be predicted before evaluation.
    w = rand(512, 128)
    nodes = [helper.make_node("Slice", ["w", f"s{i}", f"e{i}", "axis0"], [f"part{i}"]) for i in range(3)]
    nodes += [helper.make_node("Concat", ["part1", "part0", "part2"], ["reordered"], axis=0),
              helper.make_node("Unsqueeze", ["reordered", "axis0"], ["w3"]),
              helper.make_node("MatMul", ["x", "w3"], ["y"])]
    bounds = [(0, 128), (128, 256), (256, 512)]
    inits = [init("w", w), init("axis0", i64(0))]
    inits += [init(f"s{i}", i64(b[0])) for i, b in enumerate(bounds)] + [init(f"e{i}", i64(b[1])) for i, b in enumerate(bounds)]
    model = make_model(nodes, [vi("x", [2, 512])], [vi("y", [1, 2, 128])], inits)
    model.graph.value_info.extend([vi("part0", [128, 128]), vi("part1", [128, 128]), vi("part2", [256, 128]),
                                   vi("reordered", [512, 128]), vi("w3", [1, 512, 128])])
    out, records = optimize(model, "fold-constants")
    assert op_types(out) == ["MatMul"]
    assert "skipped_size" not in counters(records, "fold-constants")
    np.testing.assert_array_equal(initializer(out, "w3")[0], np.concatenate([w[128:256], w[:128], w[256:]]))
    assert_same_outputs(model, out)


def test_identity_of_a_weight_is_rewired_not_copied():
    w = rand(64, 64)
    nodes = [helper.make_node("Identity", ["w"], ["w_alias"]),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("MatMul", ["h", "w_alias"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 64])], [init("w", w)])
    out, _ = optimize(model, "fold-constants")
    assert op_types(out) == ["MatMul", "MatMul"]
    assert [t.name for t in out.graph.initializer] == ["w"]  # one copy of the weight
    assert_same_outputs(model, out)


def test_huge_expansions_are_sized_before_evaluation():
    # 2^34 floats = 64 GiB: evaluating this would exhaust memory, so it must be rejected from its inputs.
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
             helper.make_node("ReduceSum", ["zeros"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]
    model = make_model(nodes, [vi("x", [1])], [vi("y", [1])], [init("shape", i64(2**17, 2**17))])
    out, records = optimize(model, "fold-constants")
    assert "ConstantOfShape" in op_types(out)
    assert counters(records, "fold-constants")["skipped_size"] == 1


@pytest.mark.parametrize("op", ["RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial"])
def test_random_ops_are_never_folded(op):
    attrs = {"shape": [2, 3]} if op in ("RandomNormal", "RandomUniform") else {}
    inputs = [] if op in ("RandomNormal", "RandomUniform") else ["p"]
    value = np.full((2, 3), 0.5, np.float32)
    node = helper.make_node(op, inputs, ["r"], **attrs)
    cast = [helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT)] if op == "Multinomial" else []
    last = "rf" if op == "Multinomial" else "r"
    shape = [2, 1] if op == "Multinomial" else [2, 3]
    model = make_model([node, *cast, helper.make_node("Add", ["x", last], ["y"])], [vi("x", shape)], [vi("y", shape)],
                       [init("p", value)] if inputs else [])
    out, records = optimize(model, "fold-constants")
    assert op in op_types(out)
    assert counters(records, "fold-constants").get("skipped_nondeterministic") == 1


def test_quantized_dequantize_linear_is_kept():
    q = RNG.integers(-127, 127, (64, 32)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 32])],
                       [init("wq", q), init("scale", np.float32(0.02)), init("zp", np.int8(0))])
    out, records = optimize(model, "fold-constants")
    assert op_types(out) == ["DequantizeLinear", "MatMul"]
    assert counters(records, "fold-constants")["kept_dequantize"] == 1
    out, _ = optimize(model, "fold-constants:keep_dequantize=false")
    assert op_types(out) == ["MatMul"]
    assert_same_outputs(model, out)


def test_low_bit_codebook_is_not_expanded_into_floats():
    codes = RNG.integers(0, 255, (128, 64)).astype(np.uint8)
    nodes = [helper.make_node("Cast", ["codes"], ["cf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["cf", "step"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Cast", ["tiny_codes"], ["tf"], to=TensorProto.FLOAT),  # 4 values: fine to fold
             helper.make_node("Add", ["y", "tf"], ["z"])]
    model = make_model(nodes, [vi("x", [2, 128])], [vi("z", [2, 4, 64])],
                       [init("codes", codes), init("step", np.float32(0.1)),
                        init("tiny_codes", RNG.integers(0, 9, (4, 1, 1)).astype(np.uint8))])
    out, records = optimize(model, "fold-constants")
    assert op_types(out) == ["Cast", "Mul", "MatMul", "Add"]
    assert counters(records, "fold-constants")["kept_dequantize"] == 1
    assert_same_outputs(model, out)


def test_folding_inside_if_branches():
    then_graph = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Add", ["x", "ab"], ["t_out"])],
        "then", [], [vi("t_out", [3])], [init("b", rand(3))])
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["na"]), helper.make_node("Sub", ["x", "na"], ["e_out"])],
        "else", [], [vi("e_out", [3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    model = make_model(nodes, [vi("x", [3]), vi("cond", [], TensorProto.BOOL)], [vi("y", [3])], [init("a", rand(3))])
    out, records = optimize(model, "fold-constants")
    branches = {a.name: [n.op_type for n in a.g.node] for a in out.graph.node[0].attribute}
    assert branches == {"then_branch": ["Add"], "else_branch": ["Sub"]}
    assert counters(records, "fold-constants")["nodes_folded"] == 2
    for cond in (True, False):
        feeds = [{"x": rand(3), "cond": np.array(cond)}]
        assert_same_outputs(model, out, feeds)


def test_custom_domain_nodes_pass_through_untouched():
    nodes = [helper.make_node("Mystery", ["c"], ["m"], domain="my.vendor"),
             helper.make_node("Add", ["c", "c"], ["d"]),
             helper.make_node("Concat", ["m", "d", "x"], ["y"], axis=0)]
    model = make_model(nodes, [vi("x", [2])], [vi("y", [6])], [init("c", rand(2))], extra_opsets=[("my.vendor", 1)])
    result = onnxopt.optimize(model, passes=["fold-constants"])
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Mystery", "Concat"]
    assert any("custom domain 'my.vendor'" in n for r in result.records for n in r.notes)


def test_evaluation_failures_bisect_then_fall_back_to_the_reference_evaluator(monkeypatch):
    from onnxopt.passes import folding

    real_ort, real_reference = folding.ConstantFolder._run_onnxruntime, folding.ConstantFolder._run_reference
    ort_batches, reference_nodes = [], []

    def ort_without_erf(self, nodes, results):  # pretend onnxruntime cannot run Erf
        ort_batches.append([n.op for n in nodes])
        if any(n.op == "Erf" for n in nodes):
            raise RuntimeError("Erf is not implemented")
        return real_ort(self, nodes, results)

    def reference(self, node, results):
        reference_nodes.append(node.op)
        return real_reference(self, node, results)

    monkeypatch.setattr(folding.ConstantFolder, "_run_onnxruntime", ort_without_erf)
    monkeypatch.setattr(folding.ConstantFolder, "_run_reference", reference)
    nodes = [helper.make_node("Neg", ["c"], ["n"]), helper.make_node("Erf", ["n"], ["e"]),
             helper.make_node("Exp", ["e"], ["x2"]), helper.make_node("Add", ["x", "x2"], ["y"])]
    model = make_model(nodes, [vi("x", [4])], [vi("y", [4])], [init("c", rand(4))])
    out, records = optimize(model, "fold-constants")
    assert op_types(out) == ["Add"]
    assert ort_batches[0] == ["Neg", "Erf", "Exp"]  # one session first, then bisection
    assert reference_nodes == ["Erf"]  # only the node onnxruntime rejected
    assert initializer(out, "x2").dtype == np.float32
    assert_same_outputs(model, out)


def test_node_no_evaluator_can_run_is_left_alone_and_noted():
    nodes = [helper.make_node("NoSuchOp", ["c"], ["n"], domain="com.microsoft"),
             helper.make_node("Add", ["x", "n"], ["y"])]
    model = make_model(nodes, [vi("x", [4])], [vi("y", [4])], [init("c", rand(4))], extra_opsets=[("com.microsoft", 1)])
    result = onnxopt.optimize(model, passes=["fold-constants"])
    assert [n.op_type for n in result.model.graph.node] == ["NoSuchOp", "Add"]
    assert counters(result.records, "fold-constants")["eval_failed"] == 1
    assert any("NoSuchOp" in n and "reference" in n for n in notes(result.records))


def test_negative_size_threshold_is_a_user_error():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1])], [vi("y", [1])])
    with pytest.raises(UserInputError):
        onnxopt.optimize(model, passes=["fold-constants:size_threshold=-1"])


# =========================================================================== simplify-shapes
def _unsqueeze(inp, out, opset, axes=(0,)):
    if opset >= 13:
        return [helper.make_node("Unsqueeze", [inp, f"{out}_axes"], [out])], [init(f"{out}_axes", i64(*axes))]
    return [helper.make_node("Unsqueeze", [inp], [out], axes=list(axes))], []


def _flatten_chain(opset, x="x", batch_from_shape=True):
    """PyTorch's x.view(x.size(0), x.size(1) * x.size(2), -1): Shape→Gather→Unsqueeze→Concat→Reshape."""
    nodes = [helper.make_node("Shape", [x], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
             helper.make_node("Gather", ["s", "i2"], ["d2"], axis=0),
             helper.make_node("Mul", ["d1", "d2"], ["d12"])]
    inits = [init("i0", i64(0)[0]), init("i1", i64(1)[0]), init("i2", i64(2)[0]), init("minus1", i64(-1))]
    for src, dst in (("d0", "u0"), ("d12", "u12")):
        n, i = _unsqueeze(src, dst, opset)
        nodes += n
        inits += i
    nodes += [helper.make_node("Concat", ["u0", "u12", "minus1"], ["target"], axis=0),
              helper.make_node("Reshape", [x, "target"], ["flat"])]
    return nodes, inits


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_static_shape_chain_folds_to_a_constant_reshape_target(opset):
    nodes, inits = _flatten_chain(opset)
    nodes.append(helper.make_node("Relu", ["flat"], ["y"]))
    model = make_model(nodes, [vi("x", [2, 3, 4, 5])], [vi("y", [2, 12, 5])], inits, opset=opset)
    out, records = optimize(model, "simplify-shapes")
    assert op_types(out) == ["Reshape", "Relu"]
    target = out.graph.node[0].input[1]
    np.testing.assert_array_equal(initializer(out, target), [2, 12, -1])
    assert initializer(out, target).dtype == np.int64
    assert_same_outputs(model, out)
    # The manager's own check: onnx.checker and onnxruntime equivalence after every pass.
    assert op_types(run_passes(model, "fold-constants", "simplify-shapes", verify=True)) == ["Reshape", "Relu"]


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_dynamic_batch_stays_dynamic_while_the_rest_folds(opset):
    nodes, inits = _flatten_chain(opset)
    # The dynamic batch also sizes a zeros tensor: that Shape chain must stay.
    nodes += [helper.make_node("Slice", ["s", "zero1", "one1"], ["batch"]),
              helper.make_node("Concat", ["batch", "five"], ["zshape"], axis=0),
              helper.make_node("ConstantOfShape", ["zshape"], ["zeros"]),
              helper.make_node("Relu", ["flat"], ["y"])]
    inits += [init("zero1", i64(0)), init("one1", i64(1)), init("five", i64(5))]
    model = make_model(nodes, [vi("x", ["N", 3, 4, 5])], [vi("y", ["N", 12, 5]), vi("zeros", ["N", 5])], inits, opset=opset)
    out, records = optimize(model, "fold-constants", "simplify-shapes")
    ops = op_types(out)
    assert ops.count("Shape") == 1 and "Gather" not in ops and "Mul" not in ops
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    # Unknown batch → 0 ("copy dim 0 of the input"), the product of known dims folded.
    np.testing.assert_array_equal(initializer(out, reshape.input[1]), [0, 12, -1])
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for batch in (1, 3):
        assert_same_outputs(model, out, [{"x": rand(batch, 3, 4, 5)}])


def test_partial_gather_of_a_known_dim_becomes_constant_with_a_different_tensor():
    # Reshape(y, [Gather(Shape(x), 0), Gather(Shape(x), 1)]) where y is not x: the batch dim is not
    # provably y's own, so the target keeps being computed, but the known dim is folded.
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
             helper.make_node("Unsqueeze", ["d0", "ax"], ["u0"]),
             helper.make_node("Unsqueeze", ["d1", "ax"], ["u1"]),
             helper.make_node("Concat", ["u0", "u1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["y", "target"], ["out"])]
    model = make_model(nodes, [vi("x", ["N", 6]), vi("y", ["M", 12])], [vi("out", ["N", 6, 2])],
                       [init("i0", np.int64(0)), init("i1", np.int64(1)), init("ax", i64(0)), init("minus1", i64(-1))])
    out, _ = optimize(model, "simplify-shapes")
    ops = op_types(out)
    assert ops.count("Gather") == 1 and ops.count("Unsqueeze") == 1
    for batch in (1, 3):
        assert_same_outputs(model, out, [{"x": rand(batch, 6), "y": rand(batch, 12)}])


def test_reshape_copies_a_dynamic_dim_proven_equal_by_shape_inference():
    # Shape is taken of x, the Reshape reads Relu(x): shape inference carries x's batch symbol "N"
    # to the Relu output, and "N" names one input dim only, so the batch can be copied (0).
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             helper.make_node("Unsqueeze", ["d0", "ax"], ["u0"]),
             helper.make_node("Concat", ["u0", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["r", "target"], ["y"])]
    inits = [init("i0", np.int64(0)), init("ax", i64(0)), init("minus1", i64(-1))]
    model = make_model(nodes, [vi("x", ["N", 3, 4])], [vi("y", ["N", 12])], inits)
    out, _ = optimize(model, "simplify-shapes")
    assert op_types(out) == ["Relu", "Reshape"]
    np.testing.assert_array_equal(initializer(out, out.graph.node[1].input[1]), [0, -1])
    for batch in (1, 3):
        assert_same_outputs(model, out, [{"x": rand(batch, 3, 4)}])
    # Two inputs that both declare "N" may still be fed different batches: no proof there.
    nodes[1] = helper.make_node("Shape", ["x2"], ["s"])
    model = make_model(nodes, [vi("x", ["N", 3, 4]), vi("x2", ["N", 5])], [vi("y", ["N", 12])], inits)
    out, _ = optimize(model, "simplify-shapes")
    assert "Shape" in op_types(out)


def test_input_shape_override_makes_a_fully_dynamic_model_fold():
    nodes, inits = _flatten_chain(13)
    nodes.append(helper.make_node("Relu", ["flat"], ["y"]))
    model = make_model(nodes, [vi("x", ["N", "C", "H", "W"])], [vi("y", ["N", "CH", "W"])], inits, opset=13)
    out, _ = optimize(model, "simplify-shapes")
    assert "Shape" in op_types(out)  # nothing is known without the override
    out, records = optimize(model, "simplify-shapes", input_shapes={"x": (2, 3, 4, 5)})
    assert op_types(out) == ["Reshape", "Relu"]
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 4, 5]
    assert counters(records, "simplify-shapes")["input_shapes_set"] == 1
    assert_same_outputs(model, out, [{"x": rand(2, 3, 4, 5)}])


@pytest.mark.parametrize("shapes, message", [
    ({"nope": (1, 3)}, "not an input"),
    ({"x": (1, 3)}, "has 2 dims"),
    ({"x": (1, 4, 4, 5)}, "fixes it to 3"),
])
def test_bad_input_shape_overrides_are_user_errors(shapes, message):
    nodes, inits = _flatten_chain(13)
    model = make_model(nodes, [vi("x", ["N", 3, "H", "W"])], [vi("flat", ["N", "CH", "W"])], inits, opset=13)
    with pytest.raises(UserInputError, match=message):
        optimize(model, "simplify-shapes", input_shapes=shapes)


def test_shape_start_end_and_size_fold_at_opset_18():
    nodes = [helper.make_node("Shape", ["x"], ["hw"], start=-2),             # [4, 5]
             helper.make_node("Size", ["x"], ["n"]),                         # 60 * N? no: N dynamic
             helper.make_node("Shape", ["x"], ["ch"], start=1, end=2),       # [3]
             helper.make_node("ReduceProd", ["hw"], ["area"], keepdims=1),   # [20]
             helper.make_node("Concat", ["ch", "area"], ["target"], axis=0),
             helper.make_node("Reshape", ["w", "target"], ["wr"]),
             helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["wr", "nf"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 3, 4, 5])], [vi("y", [3, 20])], [init("w", rand(60))], opset=18)
    out, _ = optimize(model, "simplify-shapes")
    ops = op_types(out)
    assert ops == ["Size", "Cast", "Mul"]  # the weight reshape folded; Size depends on the dynamic batch
    for batch in (1, 3):
        assert_same_outputs(model, out, [{"x": rand(batch, 3, 4, 5)}])


def test_shape_of_an_inferred_intermediate_tensor():
    # No value_info anywhere: the Conv output's shape comes from ONNX shape inference.
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Slice", ["s", "one", "big"], ["chw"]),
             helper.make_node("ReduceProd", ["chw"], ["features"], keepdims=1),
             helper.make_node("Concat", ["minus1", "features"], ["target"], axis=0),
             helper.make_node("Reshape", ["c", "target"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 2, 5, 5])], [vi("y", ["N", 100])],
                       [init("w", rand(4, 2, 3, 3)), init("one", i64(1)), init("big", i64(2**62)), init("minus1", i64(-1))])
    out, _ = optimize(model, "simplify-shapes")
    assert op_types(out) == ["Conv", "Reshape"]
    np.testing.assert_array_equal(initializer(out, out.graph.node[1].input[1]), [-1, 100])
    for batch in (1, 3):
        assert_same_outputs(model, out, [{"x": rand(batch, 2, 5, 5)}])


def test_simplify_shapes_is_registered_and_lossless():
    for name in ("fold-constants", "simplify-shapes"):
        cls = get_pass(name)
        assert cls.lossless and cls.summary
        make_pass(cls, {"size_threshold": "1024"})
