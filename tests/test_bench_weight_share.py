"""tools/bench_weight_share.py: an end-to-end run on a tiny builder, then the verdicts on hand-made rows."""

from __future__ import annotations

import json

import tools.bench_weight_share as bench


def test_end_to_end_on_resnet_tiny(tmp_path, capsys):
    out_json = tmp_path / "rows.json"
    spec = "weight-share:bits=4,granularity=layer,accuracy=none,min_size=1024,data_aware=false"
    code = bench.main(["--models", "resnet_tiny", "--quick", "--runs", "3", "--variants", "layer@8",
                       "--spec", spec, "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert list(rows) == ["float", "lossless", "layer@8", spec]
    ref = rows["float"]
    assert ref["size_ratio"] == 1.0 and ref["speed"] == 1.0 and ref["load_ms"] > 0 and ref["top1"] == 1.0
    eight, four = rows["layer@8"], rows[spec]
    for row in (eight, four):
        assert not row["error"], row["error"]
        assert row["size_ratio"] < 0.9 and row["load_ratio"] > 0 and row["speed"] > 0 and row["seconds"] > 0
    assert four["size_ratio"] < eight["size_ratio"]  # 4-bit indices on more weights (min_size=1024)
    assert eight["cosine"] > 0.99 and four["cosine"] < eight["cosine"]
    assert "resnet_tiny: goal: c6g4 not run" in printed


def _row(variant, **kw):
    return bench.Row("m", variant, **kw)


def test_goal_verdict_takes_the_better_goal_row():
    rows = [_row("c6g4", size_ratio=0.15, app=0.97, cosine=0.99), _row("c6g4+data", size_ratio=0.16, app=1.0,
                                                                          cosine=0.995)]
    assert bench.goal_verdict(rows).startswith("goal met by c6g4+data: file 0.160x")
    assert bench.goal_verdict([_row("c6g4", size_ratio=0.3, app=1.0, cosine=0.999)]).startswith("goal NOT met")


def test_data_aware_verdict_pairs_rows_with_their_data_free_twin():
    rows = [_row("channel@6", cosine=0.98, app=0.95), _row("channel@6+data", cosine=0.99, app=1.0),
            _row("channel@4+data", cosine=0.9, app=0.9)]  # its twin did not run: no pair
    text = bench.data_aware_verdict(rows, bench.VARIANTS)
    assert text.startswith("data-aware centroids raised cosine in 1 of 1: channel@6 0.9800→0.9900")


def test_unknown_variant_is_one_line_and_exit_2(capsys):
    assert bench.main(["--models", "resnet_tiny", "--variants", "nope"]) == 2
    assert "unknown variant(s) nope" in capsys.readouterr().err
