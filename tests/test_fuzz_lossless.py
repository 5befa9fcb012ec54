"""A small seeded run of the differential fuzzer (tools/fuzz_lossless.py) over the lossless presets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest

from onnxopt.pass_base import Pass, PassResult
from onnxopt.presets import preset_passes
from tools.fuzz_lossless import draw_valid_model, run_fuzz


def _report(summary: dict, preset: str, target: str) -> str:
    lines = [f.line() + f"  (re-run: python -m tools.fuzz_lossless --preset {preset} --target {target} "
                        f"--seed {f.seed} --index {f.index})" for f in summary["failure_list"]]
    return "\n".join(lines)


@pytest.mark.parametrize("preset,target,graphs,seed", [
    ("lossless", "cpu", 25, 20240601),
    ("lossless", "tensorrt", 10, 20240602),
])
def test_fuzz_lossless_preset(preset, target, graphs, seed):
    summary = run_fuzz(graphs, seed, preset, target, log=lambda line: None)
    assert summary["graphs"] == graphs
    assert summary["failures"] == 0, _report(summary, preset, target)
    # The run must exercise the optimizer, not only pass graphs through.
    assert summary["nodes_out"] < summary["nodes_in"]
    assert {"fuse-conv-add", "cse", "fuse-consecutive"} <= set(summary["coverage"])


def test_generated_graphs_are_valid_and_deterministic():
    for index in range(6):
        model, feeds, _ = draw_valid_model(7, index)
        onnx.checker.check_model(model, full_check=True)
        assert 5 <= len(model.graph.node) <= 30
        assert len(feeds) == 2
        again, feeds_again, _ = draw_valid_model(7, index)
        assert again.SerializeToString() == model.SerializeToString()
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(feeds, feeds_again) for k in a)


@dataclass
class _NoOptions:
    pass


class _ScaleFirstConvWeight(Pass):
    """A deliberately wrong 'lossless' pass: scales the first Conv's weight by 1.01."""

    name = "test-broken-conv-scale"
    summary = "broken on purpose"
    lossless = True
    Options = _NoOptions

    def run(self, graph, ctx):
        import onnx_graphsurgeon as gs

        for node in graph.nodes:
            if node.op == "Conv" and isinstance(node.inputs[1], gs.Constant):
                w = node.inputs[1]
                node.inputs[1] = gs.Constant(w.name + "_scaled", (w.values * np.float32(1.01)).astype(w.values.dtype))
                return PassResult(changed=True)
        return PassResult(changed=False)


def _with_broken_pass(preset, target):
    passes = preset_passes(preset, target)
    return passes[:3] + [_ScaleFirstConvWeight()] + passes[3:]


def test_fuzzer_catches_and_names_a_broken_pass():
    lines = []
    summary = run_fuzz(4, 3, "lossless", "cpu", log=lines.append, pass_factory=_with_broken_pass)
    numerics = [f for f in summary["failure_list"] if f.check == "numerics"]
    assert numerics, "a pass that scales a Conv weight by 1.01 must be caught"
    assert all(f.pass_name == "test-broken-conv-scale" for f in numerics)
    assert any(line.startswith("FAIL seed=3 index=") and "test-broken-conv-scale" in line for line in lines)
