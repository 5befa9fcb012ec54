"""tools/bench_qdq.py: the int8 benchmark against onnxruntime's quantize_static.

A smoke run on a tiny builder model (no download), and the application-level checks
(CTC decoding, DB box counting, decisions) on hand-made outputs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tools.bench_qdq as bench
from onnxopt.registry import all_passes


def test_smoke_run_on_a_tiny_builder(tmp_path, capsys):
    """resnet_tiny: float, lossless, quantize_static and onnxopt rows, in a few seconds."""
    out_json = tmp_path / "rows.json"
    code = bench.main(["--models", "resnet_tiny", "--quick", "--runs", "3",
                       "--variants", "lossless,quantize_static,onnxopt", "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "resnet_tiny  calibration 16 feeds, evaluation 16 feeds" in printed
    assert "4 scene photos" in printed and "7 other scene photos" in printed
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert list(rows) == ["float", "lossless", "quantize_static", "onnxopt"]

    ref = rows["float"]
    assert ref["speed"] == pytest.approx(1.0) and ref["cosine"] == pytest.approx(1.0) and ref["top1"] == 1.0
    qs = rows["quantize_static"]
    assert not qs["error"], qs["error"]
    assert qs["speed"] > 0 and 0.9 < qs["cosine"] < 1.0 and 0.0 <= qs["top1"] <= 1.0
    assert qs["app"] == qs["top1"] and qs["app_text"].startswith("top-1")
    assert qs["file_mb"] < 0.5 * ref["file_mb"] and qs["quant_s"] > 0  # int8 weights: about 4x smaller
    assert rows["lossless"]["cosine"] > 0.99999

    ours = rows["onnxopt"]
    if "qdq-int8" not in all_passes():
        assert ours["error"] == "qdq-int8 not registered" and ours["speed"] is None
        assert "onnxopt              FAILED: qdq-int8 not registered" in printed
    elif not ours["error"]:
        assert ours["speed"] > 0 and ours["cosine"] > 0.5 and ours["app"] is not None
    assert "resnet_tiny" in printed.split("vs quantize_static;")[-1]  # the summary line


def test_summary_judges_the_goal():
    qs = bench.Row("m", "quantize_static", speed=1.5, app=0.97)
    fast = bench.Row("m", "onnxopt", speed=1.6, app=0.995)
    holds, text = bench.goal_check([qs, fast])
    assert holds and "speed onnxopt/qs = 1.07" in text and "+2.5 pp" in text
    slow = bench.Row("m", "onnxopt", speed=1.4, app=0.98)
    holds, text = bench.goal_check([qs, slow])
    assert not holds and "slower than quantize_static" in text and "agreement below 99%" in text
    invalid = bench.Row("m", "quantize_static", error="invalid model: axis")
    holds, text = bench.goal_check([invalid, bench.Row("m", "onnxopt", speed=0.9, app=1.0)])
    assert not holds and "not faster than float" in text
    assert bench.goal_check([qs, bench.Row("m", "onnxopt", error="qdq-int8 not registered")])[0] is None
    unchanged = [bench.Row("m", "float", file_mb=10.0), invalid, bench.Row("m", "onnxopt", speed=1.1, app=1.0, file_mb=9.8)]
    holds, text = bench.goal_check(unchanged)
    assert holds and "little was quantized" in text


def test_a_model_onnxruntime_refuses_is_reported_as_invalid(tmp_path):
    """What quantize_static gives old opsets: a DequantizeLinear with an axis attribute at opset 10."""
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("q", TensorProto.INT8, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]), helper.make_tensor("z", TensorProto.INT8, [], [0])])
    path = tmp_path / "old.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)]), str(path))
    with pytest.raises(Exception) as info:
        bench._session(path, "all")
    message = bench._model_error(info.value, tmp_path)
    assert message.startswith("invalid model: ") and "axis" in message and str(tmp_path) not in message


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    steps = [0, 3, 3, 0, 3, 5, 5, 0, 0]
    probs = np.eye(6, dtype=np.float32)[steps][None]  # (1, T, classes)
    assert bench.ctc_greedy(probs) == [(3, 3, 5)]
    check = bench.CtcSequence("out")
    other = np.eye(6, dtype=np.float32)[[0, 3, 0, 3, 5, 5, 5, 0, 0]][None]  # same text, other alignment
    assert check.measure([{"out": probs}], [{"out": other}]).value == 1.0
    wrong = np.eye(6, dtype=np.float32)[[0, 3, 3, 3, 3, 5, 5, 0, 0]][None]  # one '3' lost
    assert check.measure([{"out": probs}], [{"out": wrong}]).value == 0.0


def test_db_boxes_count_text_regions_like_paddleocr():
    prob = np.zeros((32, 64), np.float32)
    prob[4:10, 4:40] = 0.9  # a text line
    prob[20:26, 10:30] = 0.8  # another
    prob[14:16, 50:60] = 0.9  # 2 px high: below min_size 3
    prob[28:31, 40:60] = 0.45  # above the bitmap threshold, but its mean score is under box_thresh 0.6
    assert bench.db_boxes(prob) == 2
    check = bench.DbDetection("map")
    merged = prob.copy()
    merged[10:20, 20:25] = 0.9  # a bridge joins the two lines into one box
    result = check.measure([{"map": prob[None, None]}], [{"map": merged[None, None]}])
    assert result.value == 0.0 and "IoU 0.8" in result.text and "(avg 0.8" in result.text


def test_face_decision_reports_agreement_and_face_iou():
    face, other = [0.1, 0.9], [0.8, 0.2]
    ref = {"softmax": np.array([face, face, other, other], np.float32)}
    cand = {"softmax": np.array([face, other, other, other], np.float32)}
    result = bench.ArgmaxDecision("softmax", label="face", positive=1).measure([ref], [cand])
    assert result.value == 0.75 and result.text == "face 75.0% IoU 0.50"


def test_calibration_and_evaluation_photos_differ(tmp_path):
    calibration, evaluation = bench.split_photos(list(range(11)))
    assert not set(calibration) & set(evaluation) and len(calibration) + len(evaluation) == 11
    case = bench.make_case("tiny_cnn", tmp_path, quick=True)
    calib = {f["input"].tobytes() for f in case.calibration}
    assert len(case.calibration) == 16 and len(case.evaluation) == 16
    assert not any(f["input"].tobytes() in calib for f in case.evaluation)
