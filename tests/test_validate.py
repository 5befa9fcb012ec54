"""validate(): metrics on identical and perturbed models, providers, tolerance parsing."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt.calibration import CalibrationData, random_calibration
from onnxopt.errors import UserInputError
from onnxopt.io import save_model
from onnxopt.stats import count_macs
from onnxopt.validate import parse_tolerance, validate
from tests.util import init, make_model, vi


def classifier(weight: np.ndarray) -> onnx.ModelProto:
    """x (N, 8) → Gemm → logits (N, 5)."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["logits"], transB=1)]
    return make_model(nodes, [vi("x", ["N", 8])], [vi("logits", ["N", 5])], [init("w", weight)])


WEIGHT = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)


def data(n=6):
    return random_calibration(classifier(WEIGHT), seed=1, num_samples=n)


def test_identical_models_agree_exactly():
    ref = classifier(WEIGHT)
    report = validate(ref, classifier(WEIGHT.copy()), data(), tolerance={"cosine": 1.0, "rel_l2": 0.0, "top1": 1.0},
                      warmup=1, runs=3)
    assert report.passed and report.failures == []
    [cpu] = report.providers
    assert cpu.status == "ok" and cpu.feeds == 6
    metrics = cpu.outputs["logits"]
    assert metrics["rel_l2"] == 0 and metrics["max_abs"] == 0 and metrics["cosine"] == 1.0
    assert metrics["top1"] == 1.0
    assert cpu.latency_ms_reference > 0 and cpu.latency_ms_candidate > 0 and cpu.speedup > 0
    assert report.reference_macs == report.candidate_macs == count_macs(ref)[0] == 40
    assert report.reference_size == ref.ByteSize()
    json.dumps(report.as_dict())


def test_perturbed_candidate_fails_tight_tolerance():
    rng = np.random.default_rng(5)
    noisy = WEIGHT + 0.5 * rng.standard_normal(WEIGHT.shape).astype(np.float32)
    report = validate(classifier(WEIGHT), classifier(noisy), data(), tolerance={"rel_l2": 1e-4, "cosine": 0.99999},
                      latency=False)
    assert not report.passed
    metrics = report.providers[0].outputs["logits"]
    assert metrics["rel_l2"] > 1e-4 and metrics["cosine"] < 0.99999
    assert any(line.startswith("cpu: output 'logits': rel_l2 ") and "> 0.0001" in line for line in report.failures)
    assert any("cosine" in line and "< 0.99999" in line for line in report.failures)
    assert report.providers[0].latency_ms_reference is None
    # Without a tolerance the same run passes: it measured, nothing failed to run.
    assert validate(classifier(WEIGHT), classifier(noisy), data(), latency=False).passed


def test_metrics_match_hand_computation():
    x = np.array([[1, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]], np.float32)
    scaled = WEIGHT.copy()
    scaled[:, 1] *= -1  # the second sample's logits flip sign
    report = validate(classifier(WEIGHT), classifier(scaled), CalibrationData.from_feeds([{"x": x}]), latency=False)
    m = report.providers[0].outputs["logits"]
    ref, cand = x @ WEIGHT.T, x @ scaled.T
    assert m["max_abs"] == pytest.approx(np.abs(ref - cand).max())
    assert m["rel_l2"] == pytest.approx(np.linalg.norm(ref - cand) / np.linalg.norm(ref), rel=1e-6)
    assert m["cosine"] == pytest.approx(-1.0, abs=1e-6)  # min over the two samples (rows)
    assert m["top1"] == (0.5 if ref[1].argmax() != cand[1].argmax() else 1.0)


def test_gpu_providers_are_skipped_with_reason_on_cpu_machine():
    report = validate(classifier(WEIGHT), classifier(WEIGHT), data(2), providers=["cpu", "cuda", "tensorrt"], latency=False)
    status = {p.provider: p for p in report.providers}
    assert status["cpu"].status == "ok"
    for name in ("cuda", "tensorrt"):
        assert status[name].status == "skipped" and "onnxruntime" in status[name].reason
    assert report.passed
    only_gpu = validate(classifier(WEIGHT), classifier(WEIGHT), data(2), providers=["cuda"], latency=False)
    assert not only_gpu.passed and "no requested execution provider could run" in only_gpu.failures[0]


def test_require_providers_raises():
    with pytest.raises(UserInputError, match="'cuda' is required.*onnxruntime-gpu"):
        validate(classifier(WEIGHT), classifier(WEIGHT), data(2), providers=["cpu", "cuda"], require_providers=True)
    with pytest.raises(UserInputError, match="unknown execution provider"):
        validate(classifier(WEIGHT), classifier(WEIGHT), data(2), providers=["tpu"])


def test_output_name_and_shape_mismatch_fail_clearly(tmp_path):
    other = make_model([helper.make_node("Gemm", ["x", "w"], ["scores"], transB=1)], [vi("x", ["N", 8])],
                       [vi("scores", ["N", 5])], [init("w", WEIGHT)])
    report = validate(classifier(WEIGHT), other, data(2), latency=False)
    assert not report.passed and "missing logits" in report.failures[0] and "extra scores" in report.failures[0]
    narrow = make_model([helper.make_node("Gemm", ["x", "w"], ["logits"], transB=1)], [vi("x", ["N", 8])],
                        [vi("logits", ["N", 4])], [init("w", WEIGHT[:4])])
    report = validate(classifier(WEIGHT), narrow, data(2), latency=False)
    assert not report.passed
    assert any("declared Nx4" in f or "?x4" in f for f in report.failures)
    assert any("shape (1, 4) differs from the reference's (1, 5)" in f for f in report.failures)


def test_paths_and_progress(tmp_path):
    ref_path = save_model(classifier(WEIGHT), tmp_path / "ref.onnx")
    cand_path = save_model(classifier(WEIGHT), tmp_path / "cand.onnx")
    seen = []

    def progress(items, description, total):
        seen.append((description, total))
        return items

    report = validate(str(ref_path), str(cand_path), data(3), progress=progress, latency=False)
    assert report.passed and seen == [("validating on cpu", 3)]
    assert report.reference_size == ref_path.stat().st_size and report.reference_macs == 40


def test_candidate_that_cannot_run_is_a_failure():
    broken = classifier(WEIGHT)
    broken.graph.node[0].op_type = "NoSuchOp"
    report = validate(classifier(WEIGHT), broken, data(2), latency=False)
    assert not report.passed and report.providers[0].status == "failed"
    assert report.failures[0].startswith("cpu: onnxruntime cannot load the candidate model")


def test_parse_tolerance():
    assert parse_tolerance(["cosine=0.999", "rel_l2=1e-3", "top1=0.99,max_abs=0.5", "mean_abs=1e-2"]) == {
        "cosine": 0.999, "rel_l2": 1e-3, "top1": 0.99, "max_abs": 0.5, "mean_abs": 1e-2}
    for bad in (["cos=0.9"], ["cosine"], ["cosine=high"], ["cosine=1.5"], ["top1=2"], ["rel_l2=-1"]):
        with pytest.raises(UserInputError):
            parse_tolerance(bad)
