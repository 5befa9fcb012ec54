"""activations: capture intermediate tensors through onnxruntime, bounded by a memory budget."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxopt.activations import capture, collect_channel_stats, collect_histograms
from onnxopt.calibration import CalibrationData
from onnxopt.errors import UserInputError
from onnxopt.quant_math import StreamingHistogram
from onnxopt.runtime import run_model
from tests.util import init, make_model, vi

RNG = np.random.default_rng(3)
BATCH = 2
WEIGHTS = {"w": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "b": RNG.standard_normal(4).astype(np.float32),
           "k": np.float32(0.5), "gw": RNG.standard_normal((256, 5)).astype(np.float32)}


def conv_model(outputs=("m", "g")):
    """x[N,3,8,8] → Conv → c → Relu → r → Mul → m;  r → Flatten → f → Gemm → g;  x → Shape → s (int64)."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Mul", ["r", "k"], ["m"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "gw"], ["g"]),
        helper.make_node("Shape", ["x"], ["s"]),
    ]
    inits = [init(name, value) for name, value in WEIGHTS.items()]
    types = {"s": TensorProto.INT64}
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi(o, None, types.get(o, TensorProto.FLOAT)) for o in outputs], inits)


MODEL = conv_model()
FEEDS = [{"x": RNG.standard_normal((BATCH, 3, 8, 8)).astype(np.float32)} for _ in range(3)]


def reference(names):
    """The tensors computed by a second model that outputs them directly."""
    return run_model(conv_model(outputs=names), FEEDS, optimization="disable")


def captured(model, names, feeds=FEEDS, **options):
    got = defaultdict(list)
    missing = capture(model, names, feeds, lambda name, array: got[name].append(array.copy()), **options)
    return got, missing


def test_capture_matches_a_model_that_outputs_the_tensors():
    before = MODEL.SerializeToString()
    names = ["c", "r", "f", "g", "x", "w", "s", "nope", "c"]
    got, missing = captured(MODEL, names)
    assert missing == ["w", "s", "nope"]  # initializer, int64 tensor, unknown name
    assert set(got) == {"c", "r", "f", "g", "x"}
    ref = reference(["c", "r", "f", "g"])
    for name in ("c", "r", "f", "g"):
        assert len(got[name]) == len(FEEDS)
        for array, expected in zip(got[name], ref):
            assert array.dtype == np.float32
            assert np.array_equal(array, expected[name])
    for array, feed in zip(got["x"], FEEDS):
        assert np.array_equal(array, feed["x"])
    assert MODEL.SerializeToString() == before  # the caller's model is untouched


def test_feed_sources_are_equivalent():
    a, _ = captured(MODEL, ["r"], CalibrationData.from_feeds(FEEDS))
    b, _ = captured(MODEL, ["r"], lambda: iter(FEEDS))
    c, _ = captured(MODEL, ["r"], FEEDS)
    for x, y, z in zip(a["r"], b["r"], c["r"]):
        assert np.array_equal(x, y) and np.array_equal(x, z)


def sweeps(budget, names):
    """Number of sweeps over the data (one per group) that capture makes for ``budget`` bytes."""
    descriptions = []

    def progress(items, description, total):
        descriptions.append(description)
        assert total == len(FEEDS)
        return items

    got, _ = captured(MODEL, names, memory_budget=budget, progress=progress)
    return len(descriptions), got


def test_memory_budget_groups_give_identical_results():
    names = ["c", "r", "g", "f"]
    count_big, big = sweeps(1 << 30, names)
    count_tiny, tiny = sweeps(1, names)
    assert count_big == 1 and count_tiny == len(names)
    for name in names:
        for a, b in zip(big[name], tiny[name]):
            assert np.array_equal(a, b)


def test_budget_estimate_uses_the_feed_batch():
    # c and r are N*4*8*8 float32 = 2048 bytes each with N = 2 (a symbolic dim in the model)
    assert sweeps(4096, ["c", "r"])[0] == 1
    assert sweeps(4095, ["c", "r"])[0] == 2


def if_model():
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["inner_then"]),
                              helper.make_node("Mul", ["inner_then", "x"], ["then_out"])],
                             "then", [], [vi("then_out", None)])
    els = helper.make_graph([helper.make_node("Neg", ["x"], ["else_out"])], "else", [], [vi("else_out", None)])
    nodes = [helper.make_node("Abs", ["x"], ["a"]),
             helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=els),
             helper.make_node("Add", ["branch", "a"], ["y"])]
    return make_model(nodes, [vi("x", [2, 3]), vi("cond", [], TensorProto.BOOL)], [vi("y", [2, 3])])


def test_subgraph_tensors_are_not_captured():
    model = if_model()
    feeds = [{"x": RNG.standard_normal((2, 3)).astype(np.float32), "cond": np.array(flag)} for flag in (True, False)]
    got, missing = captured(model, ["inner_then", "branch", "a", "cond", "y"], feeds)
    assert missing == ["inner_then", "cond"]  # inside the then-branch; a bool input
    for feed, branch, a in zip(feeds, got["branch"], got["a"]):
        x = feed["x"]
        assert np.array_equal(a, np.abs(x))
        assert np.allclose(branch, np.maximum(x, 0) * x if feed["cond"] else -x)


def test_collect_histograms_match_the_reference_tensors():
    hists = collect_histograms(MODEL, ["c", "g", "w"], FEEDS, bins=256)
    assert set(hists) == {"c", "g"}
    for name in ("c", "g"):
        expected = StreamingHistogram(256)
        for out in reference([name]):
            expected.add(out[name])
        h = hists[name]
        assert h.count == expected.count == BATCH * len(FEEDS) * {"c": 256, "g": 5}[name]
        assert np.array_equal(h.counts, expected.counts) and (h.min, h.max) == (expected.min, expected.max)


def test_collect_channel_stats_nchw_and_features():
    stats = collect_channel_stats(MODEL, ["c", "g"], FEEDS, axis=1)
    ref = reference(["c", "g"])
    c = np.concatenate([o["c"] for o in ref]).astype(np.float64)  # [N, 4, 8, 8]
    s = stats["c"]
    assert s.channels == 4 and s.count == len(FEEDS) * BATCH * 64
    assert np.allclose(s.mean, c.mean(axis=(0, 2, 3)))
    assert np.allclose(s.mean_square, (c ** 2).mean(axis=(0, 2, 3)))
    assert np.array_equal(s.min, c.min(axis=(0, 2, 3))) and np.array_equal(s.max, c.max(axis=(0, 2, 3)))
    assert np.allclose(s.variance, c.var(axis=(0, 2, 3)))
    g = np.concatenate([o["g"] for o in ref]).astype(np.float64)  # [N, 5]: axis 1 is the feature axis
    assert stats["g"].channels == 5 and np.allclose(stats["g"].mean, g.mean(axis=0))
    last = collect_channel_stats(MODEL, ["c"], FEEDS, axis=-1)["c"]
    assert last.channels == 8 and np.allclose(last.mean, c.mean(axis=(0, 1, 2)))


def test_bad_feeds_and_budget():
    with pytest.raises(UserInputError, match="feed 0"):
        capture(MODEL, ["c"], [{"x": np.zeros((1, 5, 8, 8), np.float32)}], lambda n, a: None)
    with pytest.raises(UserInputError):
        capture(MODEL, ["c"], FEEDS, lambda n, a: None, memory_budget=0)
    assert capture(MODEL, ["c"], [], lambda n, a: None) == []


def test_capture_runs_only_the_nodes_the_tensors_depend_on():
    # The Reshape after the captured tensor fails at run time (6 elements into 4): capturing
    # "hidden" must not run it.
    nodes = [helper.make_node("Relu", ["x"], ["hidden"]),
             helper.make_node("Reshape", ["hidden", "bad_shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor("bad_shape", TensorProto.INT64, [2], [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    got = {}
    assert capture(model, ["hidden"], [{"x": x}], lambda name, value: got.setdefault(name, value)) == []
    np.testing.assert_array_equal(got["hidden"], np.maximum(x, 0))
