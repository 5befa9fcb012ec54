"""The shared accuracy-budget check of lossy searches, and the expected top-1 agreement."""

import numpy as np
import pytest
from onnx import helper

from onnxopt.metrics import OutputAccumulator, expected_top1, margin_changes
from onnxopt.tolerance import ToleranceCheck, badness, default_budget
from onnxopt.errors import UserInputError
from tests.util import init, make_model, vi


def test_margin_changes_follow_the_reference_winner():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 0.5, 2.0]])
    cand = np.array([[2.5, 1.5, 0.0], [0.0, 0.5, 2.0]])
    margin, change = margin_changes(ref, cand)
    np.testing.assert_allclose(margin, [2.0, 1.5])
    np.testing.assert_allclose(change, [-1.0, 0.0])


def test_expected_top1_pairs_every_error_with_every_margin():
    # Margins 0.1 and 5; errors 0 and 1: the error of size 1 could flip the 0.1 margin (one
    # pairing of four), with probability ½.
    assert expected_top1(np.array([0.1, 5.0]), np.array([0.0, 1.0])) == pytest.approx(1 - 0.5 / 4)
    assert expected_top1(np.array([2.0, 3.0]), np.array([0.5, -0.5])) == 1.0
    assert expected_top1(np.array([]), np.array([])) == 1.0


def test_expected_top1_is_below_observed_when_margins_are_thin():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(16, 10))
    noisy = ref + rng.normal(scale=0.3, size=ref.shape)
    acc = OutputAccumulator("logits")
    acc.add(ref, noisy)
    observed = acc.result()["top1"]
    assert acc.expected_top1() <= observed
    clean = OutputAccumulator("logits")
    clean.add(ref, ref)
    assert clean.expected_top1() == 1.0
    boxes = OutputAccumulator("boxes")
    boxes.add(ref, noisy)
    assert boxes.expected_top1() is None


def _linear_model(weight):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"])]
    return make_model(nodes, [vi("x", [1, 4])], [vi("logits", [1, 3])], [init("w", weight)])


def test_tolerance_check_scores_the_worst_output_and_budget():
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    feeds = [{"x": rng.normal(size=(1, 4)).astype(np.float32)} for _ in range(8)]
    check = ToleranceCheck(_linear_model(weight), feeds, {"cosine": 0.999, "top1": 0.99})
    same = check.evaluate(_linear_model(weight))
    assert same["cosine"] == pytest.approx(1.0) and same["top1"] == 1.0 and check.meets(same)
    assert check.badness(same) == pytest.approx(0.0, abs=1e-6)
    worse = check.evaluate(_linear_model(weight + rng.normal(scale=0.5, size=weight.shape).astype(np.float32)))
    assert not check.meets(worse)
    assert check.badness(worse) > 1.0
    assert badness({"rel_l2": 0.02}, {"rel_l2": 0.01}) == pytest.approx(2.0)


def test_default_budget_parses_plus_joined_metrics():
    assert default_budget("cosine=0.99+top1=0.99") == {"cosine": 0.99, "top1": 0.99}
    assert default_budget("none") == {}
    with pytest.raises(UserInputError):
        default_budget("cosine=high")
