"""Low-rank passes (svd, spatial-svd, tucker2, cp): exact at full rank, bounded when truncated,
refinement better than plain truncation, the tolerance search, and the reasons for skipping."""

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt.calibration import CalibrationData
from onnxopt.context import PassContext
from onnxopt.errors import UserInputError
from onnxopt.metrics import compare
from onnxopt.runtime import run_model
from onnxopt.passes.lowrank_search import Choice, greedy_moves
from tests.util import correlated_feeds, init, make_model, op_types, vi

# Full rank, no timing and no MACs limit: the decomposition must reproduce the layer.
EXACT = "measure=false,max_macs=100,refine=false,rank=100000"


def _conv_model(seed=0, t=24, c=20, k=3, stride=2, pads=(1, 0, 1, 2), dilation=1, hw=13, group=1, decay=0.0):
    """One Conv (+ Relu). ``decay`` > 0 gives the kernel's channel modes a spectrum falling as
    exp(-decay·i), as trained kernels have; 0 is plain Gaussian."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(t, c // group, k, k)) / np.sqrt(c * k * k)
    if decay:
        u, _ = np.linalg.qr(rng.normal(size=(t, t)))
        v, _ = np.linalg.qr(rng.normal(size=(c, c)))
        w = np.einsum("to,oiyx,ci->tcyx", u * np.exp(-decay * np.arange(t)), w, v * np.exp(-decay * np.arange(c)))
        w *= 3.0 / np.linalg.norm(w)
    w = w.astype(np.float32)
    b = rng.normal(size=t).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], strides=[stride, stride], pads=list(pads),
                              dilations=[dilation, dilation], group=group, name="conv0"),
             helper.make_node("Relu", ["conv"], ["y"])]
    return make_model(nodes, [vi("x", [1, c, hw, hw])], [vi("y", ["n", "t", "h", "w"])], [init("w", w), init("b", b)])


def _gemm_model(seed=0, trans_a=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(40, 32)).astype(np.float32)  # transB=1: (out, in)
    c = rng.normal(size=40).astype(np.float32)
    x_shape = [32, 3] if trans_a else [3, 32]
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transA=trans_a, transB=1, alpha=0.5, beta=2.0,
                              name="fc")]
    return make_model(nodes, [vi("x", x_shape)], [vi("y", ["m", "n"])], [init("w", w), init("c", c)])


def _matmul_model(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(32, 48)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")]
    return make_model(nodes, [vi("x", [2, 5, 32])], [vi("y", ["b", "s", "n"])], [init("w", w)])


def _feeds(model, n=4, seed=1, rank=None):
    return correlated_feeds(model, n, seed, rank)


def _run(model, spec, feeds=None, tolerance=None):
    ctx = PassContext(target="cpu", template=model, tolerance=tolerance or {},
                      calibration=CalibrationData.from_feeds(feeds, source="test") if feeds else None)
    return onnxopt.optimize(model, passes=[spec], target="cpu", ctx=ctx)


def _error(before, after, feeds):
    ref, out = run_model(before, feeds), run_model(after, feeds)
    return max(compare(r["y"], o["y"])["rel_l2"] for r, o in zip(ref, out))


@pytest.mark.parametrize("pass_name, ops", [
    ("tucker2", ["Conv", "Conv", "Conv"]),
    ("cp", ["Conv", "Conv", "Conv", "Conv"]),
    ("spatial-svd", ["Conv", "Conv"]),
])
@pytest.mark.parametrize("shape", [dict(), dict(stride=1, pads=(2, 2, 2, 2), dilation=2)])
def test_conv_decompositions_are_exact_at_full_rank(pass_name, ops, shape):
    model = _conv_model(**shape)
    feeds = _feeds(model, 2)
    result = _run(model, f"{pass_name}:{EXACT}", feeds)
    assert [o for o in op_types(result.model) if o == "Conv"] == ops
    onnx.checker.check_model(result.model)
    assert _error(model, result.model, feeds) < 2e-4


@pytest.mark.parametrize("build", [_gemm_model, lambda: _gemm_model(trans_a=1), _matmul_model,
                                   lambda: _conv_model(k=1, pads=(0, 0, 0, 0))])
def test_svd_is_exact_at_full_rank(build):
    model = build()
    feeds = _feeds(model, 2)
    result = _run(model, f"svd:{EXACT}", feeds)
    assert result.records[0].counters["layers_decomposed"] == 1
    onnx.checker.check_model(result.model)
    assert _error(model, result.model, feeds) < 2e-5


@pytest.mark.parametrize("pass_name", ["tucker2", "cp", "spatial-svd"])
def test_truncation_error_falls_with_rank_and_refinement_beats_it(pass_name):
    model = _conv_model(seed=3, t=32, c=32, stride=1, pads=(1, 1, 1, 1))
    calib = _feeds(model, 8, seed=1, rank=6)
    held_out = _feeds(model, 4, seed=2, rank=6)
    errors = {}
    for rank, refine in ((8, False), (16, False), (8, True)):
        spec = f"{pass_name}:rank={rank},measure=false,max_macs=100,refine={str(refine).lower()}"
        errors[(rank, refine)] = _error(model, _run(model, spec, calib).model, held_out)
    assert errors[(16, False)] < errors[(8, False)]
    # Inputs span 6 of 32 channels: the refit fits the outputs where the data is.
    assert errors[(8, True)] < 0.95 * errors[(8, False)]


def test_energy_and_vbmf_choose_ranks():
    model = _conv_model(t=32, c=32)
    feeds = _feeds(model, 2)
    low = _run(model, "tucker2:energy=0.5,measure=false,refine=false", feeds)
    high = _run(model, "tucker2:energy=0.99,measure=false,max_macs=100,refine=false", feeds)
    assert _error(model, high.model, feeds) < _error(model, low.model, feeds)
    vbmf = _run(model, "svd:method=vbmf,measure=false,max_macs=100,refine=false", _feeds(_gemm_model(), 2))
    assert vbmf.model is not None


def test_search_meets_the_tolerance_on_the_calibration_data():
    model = _conv_model(seed=5, t=32, c=32, stride=1, pads=(1, 1, 1, 1), hw=16, decay=0.3)
    calib = _feeds(model, 6, seed=1)
    result = _run(model, "tucker2:measure=false", calib, tolerance={"cosine": 0.999})
    counters = result.records[0].counters
    assert counters.get("layers_decomposed") == 1 and counters["macs_saved"] > 0
    ref, out = run_model(model, calib), run_model(result.model, calib)
    assert min(compare(r["y"], o["y"])["cosine"] for r, o in zip(ref, out)) >= 0.999


def test_search_checks_its_refits_on_feeds_they_did_not_see():
    # Calibration whose first feeds span 4 of 32 channels and whose last ones span them all: a
    # refit on the first ones alone fits a subspace, so only a check on held-out feeds is honest.
    model = _conv_model(seed=5, t=32, c=32, stride=1, pads=(1, 1, 1, 1), hw=16, decay=0.3)
    calib = _feeds(model, 6, seed=1, rank=4) + _feeds(model, 2, seed=2)
    result = _run(model, "tucker2:measure=false", calib, tolerance={"cosine": 0.999})
    notes = " ".join(result.records[0].notes)
    assert "held out" in notes or "held-out" in notes or "no decomposition" in notes
    ref, out = run_model(model, calib), run_model(result.model, calib)
    assert min(compare(r["y"], o["y"])["cosine"] for r, o in zip(ref, out)) >= 0.999


def test_layers_that_do_not_pay_or_cannot_be_split_are_left_with_a_reason():
    grouped = _conv_model(c=20, t=20, group=4)
    result = _run(grouped, "tucker2:measure=false,rank=0.5", _feeds(grouped, 1))
    assert op_types(result.model).count("Conv") == 1
    assert any("grouped Conv" in n for n in result.records[0].notes)
    pointwise = _conv_model(k=1, pads=(0, 0, 0, 0))
    result = _run(pointwise, "tucker2:measure=false,rank=0.5", _feeds(pointwise, 1))
    assert any("1×1 Conv: use svd" in n for n in result.records[0].notes)
    model = _conv_model()
    result = _run(model, "tucker2:measure=false,rank=0.9,max_macs=0.5", _feeds(model, 1))
    assert op_types(result.model).count("Conv") == 1
    assert any("cuts its MACs" in n for n in result.records[0].notes)


def test_bad_options_name_the_fix():
    model = _conv_model()
    with pytest.raises(UserInputError, match="rank"):
        _run(model, "tucker2:rank=-1", _feeds(model, 1))
    with pytest.raises(UserInputError, match="tolerance"):
        _run(model, "tucker2:accuracy=none,measure=false", _feeds(model, 1))


def test_greedy_moves_take_the_best_saving_per_error_first():
    a = [Choice(None, (8,), [], saving_s=1.0, error=0.1), Choice(None, (4,), [], saving_s=2.0, error=1.0)]
    b = [Choice(None, (8,), [], saving_s=1.0, error=0.01)]
    moves = greedy_moves({"a": a, "b": b})
    assert [sorted((k, v.ranks) for k, v in m.items()) for m in moves] == [
        [("b", (8,))], [("a", (8,)), ("b", (8,))], [("a", (4,)), ("b", (8,))]]


def test_streamed_refit_sums_match_numpy_and_refuse_a_worse_fit():
    from onnxopt.passes.lowrank_search import _GramSums

    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 6)) + 2
    weight, bias = rng.normal(size=(4, 6)), rng.normal(size=4)
    y = z @ weight.T + bias + 0.01 * rng.normal(size=(400, 4))
    sums = _GramSums()
    for rows in np.array_split(np.arange(400), 5):  # one calibration feed at a time
        sums.add(z[rows], y[rows])
    other_w, other_b = weight + 0.1, bias - 0.2
    assert sums.residual(other_w, other_b) == pytest.approx(((y - z @ other_w.T - other_b) ** 2).sum(), rel=1e-9)
    fitted_w, fitted_b = sums.refit(np.zeros((4, 6)), None)
    np.testing.assert_allclose(fitted_w, weight, atol=5e-3)
    np.testing.assert_allclose(fitted_b, bias, atol=2e-2)
    assert sums.refit(fitted_w, fitted_b) is None  # nothing fits better than the fit itself: kept as is


def test_greedy_moves_step_through_ranks_instead_of_jumping_to_the_most_aggressive():
    # From the start, rank 2 has the better saving/error ratio (3.0 vs 2.0), but the search needs
    # the milder rank 8 as a prefix of its own; an option with more error and no more saving is skipped.
    menu = [Choice(None, (2,), [], saving_s=3.0, error=1.0), Choice(None, (8,), [], saving_s=1.0, error=0.5),
            Choice(None, (6,), [], saving_s=0.9, error=0.7)]
    assert [m["a"].ranks for m in greedy_moves({"a": menu})] == [(8,), (2,)]


@pytest.mark.parametrize("pass_name", ["tucker2", "cp", "spatial-svd"])
def test_compose_gives_back_the_kernel_the_chain_computes(pass_name):
    # The search scores ranks by compose(factorize(...)); at full rank that must be the kernel.
    from onnxopt.graph import import_model
    from onnxopt.passes.lowrank import find_layers
    from onnxopt.registry import get_pass

    graph = import_model(_conv_model())
    [layer], _ = find_layers(graph, {})
    decomposition = get_pass(pass_name)()
    steps = decomposition.factorize(layer, decomposition.full_ranks(layer))
    np.testing.assert_allclose(decomposition.compose(layer, steps), layer.weight, atol=1e-5)
    responses = np.random.default_rng(0).normal(size=(200, layer.weight.shape[0]))
    steps = decomposition.factorize(layer, decomposition.full_ranks(layer), responses)
    np.testing.assert_allclose(decomposition.compose(layer, steps), layer.weight, atol=1e-5)
