"""tools/bench_lowrank.py: the low-rank benchmark.

An end-to-end run on a tiny builder model (no download), then the table, the summary and the
bookkeeping on hand-made rows and models.
"""

from __future__ import annotations

import json

import pytest
from onnx import TensorProto, helper

import tools.bench_lowrank as bench

PLAIN = "tucker2:rank=0.5,refine=false,measure=false"
REFINED = "tucker2:rank=0.5,refine=true,measure=false"


def test_end_to_end_on_resnet_tiny(tmp_path, capsys):
    """resnet_tiny's six 3x3 convs at half rank, with and without refinement. measure=false so
    that every layer is decomposed whatever the machine's timing, and the two rows compare."""
    out_json = tmp_path / "rows.json"
    code = bench.main(["--models", "resnet_tiny", "--quick", "--runs", "3", "--spec", PLAIN, "--spec", REFINED,
                       "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert list(rows) == ["float", "lossless", PLAIN, REFINED]

    ref, lossless = rows["float"], rows["lossless"]
    assert ref["speed"] == 1.0 and ref["cosine"] == pytest.approx(1.0) and ref["top1"] == 1.0 and ref["ms"] > 0
    assert ref["macs"] > 4e7 and ref["params"] > 5e4
    assert lossless["cosine"] > 0.99999 and lossless["layers"] == 0 and lossless["macs_ratio"] == 1.0
    assert ref["macs_ratio"] > 1.0  # float still counts its BatchNorms; the lossless row folded them

    plain, refined = rows[PLAIN], rows[REFINED]
    for row in (plain, refined):
        assert not row["error"], row["error"]
        assert row["layers"] == 6 and row["refine"] == (row is refined)
        assert 0.3 < row["macs_ratio"] < 0.6 and 0.3 < row["params_ratio"] < 0.6
        assert row["speed"] > 0 and row["seconds"] > 0 and 0.0 <= row["top1"] <= 1.0
    assert plain["macs"] == refined["macs"]  # equal ranks: only the last factors' values differ
    assert plain["cosine"] < refined["cosine"] < 1.0  # least-squares refit on calibration photos

    assert f"{PLAIN:26s} tucker2:rank=0.5,refine=false,measure=false" in printed  # the variants legend
    summary = printed.split("and refinement against plain truncation:")[-1]
    assert "resnet_tiny:" in summary and "refinement raised cosine at equal rank in 1 of 1" in summary


def _row(variant, **kw):
    return bench.Row("m", variant, **kw)


def test_best_variant_is_the_fastest_that_keeps_agreement():
    rows = [
        # float's MACs may be uncountable before the lossless passes (ppocr5_rec): still not a decomposition
        _row("float", speed=1.0, app=1.0, top1=1.0, cosine=1.0, layers=0, macs_ratio=0.01),
        _row("lossless", speed=1.3, app=1.0, top1=1.0, cosine=1.0, layers=0, macs_ratio=1.0),  # nothing decomposed
        _row("a", speed=1.5, app=0.995, top1=0.995, cosine=0.99, layers=4, macs_ratio=0.6),
        _row("b", speed=2.5, app=0.95, top1=0.95, cosine=0.9, layers=9, macs_ratio=0.3),  # too inaccurate
        _row("c", speed=1.2, app=1.0, top1=1.0, cosine=0.999, layers=2, macs_ratio=0.8),
        _row("d", error="timed out after 60 s"),
    ]
    assert bench.best_within(rows).variant == "a"
    assert bench.best_within(rows, goal=0.9).variant == "b"
    assert bench.best_within(rows[:2]) is None
    summary = bench.format_summary(rows, bench.VARIANTS)
    assert "m: best a 1.50x float (MACs 0.60, top-1 99.5%, cosine 0.9900)" in summary
    assert "no pair of plain and refined variants" in summary
    # a model without class scores is judged on the application's answer
    det = [bench.Row("det", "x", speed=1.4, app=0.995, cosine=0.99, layers=3, macs_ratio=0.7)]
    assert "best x 1.40x float (MACs 0.70, app 99.5%" in bench.format_summary(det, bench.VARIANTS)
    nothing = [bench.Row("n", "float", speed=1.0, app=1.0),
               bench.Row("n", "t", speed=1.0, app=1.0, layers=0, macs_ratio=1.0)]
    assert "n: no variant decomposed any layer" in bench.format_summary(nothing, bench.VARIANTS)


def test_refinement_verdict_compares_cosine_at_equal_rank_and_speed_for_searches():
    rows = [
        _row("tucker2@r0.5", cosine=0.80, speed=1.6, layers=10),
        _row("tucker2@r0.5+refine", cosine=0.97, speed=1.6, layers=10),
        _row("cp@r0.25", cosine=0.60, speed=2.0, layers=8),
        _row("cp@r0.25+refine", cosine=0.55, speed=2.1, layers=7),
        _row("svd@r0.5", cosine=1.0, layers=0, macs_ratio=1.0),  # nothing decomposed: no comparison
        _row("svd@r0.5+refine", cosine=1.0, layers=0, macs_ratio=1.0),
        _row("search@cos0.999", cosine=0.9991, speed=1.1, layers=3),
        _row("search@cos0.999+refine", cosine=0.9993, speed=1.4, layers=9),
    ]
    verdict = bench.refinement_verdict(rows, bench.VARIANTS)
    assert "refinement raised cosine at equal rank in 1 of 2" in verdict
    assert "tucker2@r0.5 0.8000→0.9700" in verdict and "cp@r0.25 0.6000→0.5500 (layers 8 vs 7)" in verdict
    assert "svd@r0.5" not in verdict
    assert "search@cos0.999: refined 1.40x vs plain 1.10x, cosine 0.9993 vs 0.9991, layers 9 vs 3" in verdict


def test_table_shows_ratios_and_failures():
    rows = [
        bench.Row("vgg16", "float", layers=0, macs=15_470_000_000, params=138_357_544, macs_ratio=1.0,
                  params_ratio=1.0, speed=1.0, ms=400.0, cosine=1.0, top1=1.0, app=1.0, app_text="top-1 100.0%"),
        bench.Row("vgg16", "tucker2@e0.98", refine=False, layers=7, macs=9_000_000_000, params=130_000_000,
                  macs_ratio=0.58, params_ratio=0.94, speed=1.34, ms=300.0, cosine=0.44, top1=0.92, app=0.92,
                  app_text="top-1 92.0%", seconds=12.5, peak_mb=900),
        bench.Row("vgg16", "cp@r0.25", error="cp not registered"),
        bench.Row("other", "(all)", error="model unavailable: no network"),
    ]
    lines = bench.format_table(rows).splitlines()
    assert lines[0].split()[:7] == ["model", "variant", "layers", "GMACs", "×", "Mparams", "×"]
    assert lines[3].split() == ["vgg16", "tucker2@e0.98", "7", "9.000", "0.58", "130.00", "0.94", "1.34", "300.00",
                                "0.4400", "92.0%", "top-1", "92.0%", "12.5", "900"]
    assert lines[4].endswith("cp@r0.25               FAILED: cp not registered")
    assert lines[5] == "" and "FAILED: model unavailable: no network" in lines[6]
    summary = bench.format_summary(rows, bench.VARIANTS)
    assert ("MEASUREMENTS.md data-free Tucker-2 energy 0.98: 1.34x, 92%, cosine 0.44; here 1.34x, 92.0%, cosine 0.44, 7 layers"
            in summary)
    assert "energy 0.95: 1.91x, 88%, cosine 0.23; not run" in summary


def test_decomposed_layers_are_named_by_their_chains():
    """passes/lowrank.py names the chain replacing node N 'N_lr0', 'N_lr1', ...; a factor decomposed
    again ('N_lr0_lr0') still belongs to N; unnamed nodes give '_lr0', '_lr0_1' (made unique)."""
    names = ["conv1_lr0", "conv1_lr1", "conv1_lr0_lr0", "conv1_lr0_lr1", "fc_lr0_1", "fc_lr1", "relu", "blr0",
             "_lr0", "_lr1", "_lr0_1", "_lr1_1", "conv1_lr0_lr0_1"]
    nodes = [helper.make_node("Identity", ["x"], [f"y{i}"], name=n) for i, n in enumerate(names)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [1])])
    assert bench.decomposed_layers(helper.make_model(graph)) == 4  # conv1, fc and two unnamed layers


def test_jobs_run_the_lossless_passes_first():
    from onnxopt.presets import PRESETS

    first = bench.lossless_first()
    assert "fuse-conv-activation" not in first and "fold-batchnorm" in first
    assert set(first) <= set(PRESETS["lossless"])
    variant = bench.VARIANTS["search@cos0.999+refine"]
    job = bench.job_for(variant, "in.onnx", "out.onnx", "calib.pkl")
    assert job["tool"] == "onnxopt" and job["specs"] == first + ["tucker2:refine=true", "svd:refine=true"]
    assert job["tolerance"] == {"cosine": 0.999}
    with pytest.raises(ValueError, match="no-such-pass not registered"):
        bench.job_for(bench.Variant("x", ("no-such-pass:rank=2",)), "in.onnx", "out.onnx", "calib.pkl")


def test_variant_lists_and_custom_rows():
    assert bench.VARIANTS["tucker2@e0.98"].specs == ("tucker2:energy=0.98,refine=false",)
    assert bench.VARIANTS["cp@r0.25+refine"].plain == "cp@r0.25"
    assert bench.VARIANT_ALIASES["svd@*"] == ("svd@r0.5", "svd@r0.5+refine", "svd@r0.25", "svd@r0.25+refine")
    assert set(bench.QUICK_VARIANTS) <= set(bench.VARIANTS)
    plain, refined, searched = bench.custom_variants([PLAIN, REFINED, "tucker2  svd"], {"cosine": 0.999})
    assert not plain.refine and plain.plain is None and not plain.searched
    assert refined.refine and refined.plain == PLAIN
    assert searched.key == "tucker2 svd" and searched.searched and searched.tolerance == (("cosine", 0.999),)
    assert searched.description == "tucker2 then svd with tolerance cosine=0.999"


@pytest.mark.parametrize("argv, message", [
    (["--models", "nope"], "unknown model(s) nope"),
    (["--variants", "tucker2@r0.9"], "unknown variant(s) tucker2@r0.9"),
    (["--spec", "tucker2", "--tolerance", "cosine"], "tolerance 'cosine' is not METRIC=VALUE"),
])
def test_bad_command_lines_exit_2_with_one_line(argv, message, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
