"""PassManager: ordering, fixed point, invariants, timing, verify-each bisection, plugins."""

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import onnxopt
from onnxopt import graph as G
from onnxopt import registry
from onnxopt.context import PassContext
from onnxopt.errors import PassFailed, UserInputError, VerificationError
from onnxopt.manager import PassManager
from onnxopt.pass_base import Pass, PassResult
from tests.util import make_model, vi


def _chain(n=3):
    nodes = [helper.make_node("Relu", ["x"], ["t0"])]
    for i in range(1, n):
        nodes.append(helper.make_node("Relu", [f"t{i-1}"], [f"t{i}"]))
    nodes.append(helper.make_node("Neg", [f"t{n-1}"], ["y"]))
    return make_model(nodes, [vi("x", [1, 4])], [vi("y", [1, 4])])


class DropOneRelu(Pass):
    """Removes one redundant Relu(Relu(x)) per run, so a fixed point needs several rounds."""

    name = "test-drop-one-relu"
    summary = "test pass"
    lossless = True

    def run(self, graph, ctx):
        for node in graph.nodes:
            src = G.producer(node.inputs[0])
            if node.op == "Relu" and src is not None and src.op == "Relu":
                G.bypass_node(graph, node)
                return PassResult(True, {"removed": 1})
        return PassResult(False)


class BreakOutputs(Pass):
    name = "test-break-outputs"
    summary = "lossless pass that is wrong on purpose"
    lossless = True

    def run(self, graph, ctx):
        for node in graph.nodes:
            if node.op == "Neg":
                node.op = "Relu"
                return PassResult(True)
        return PassResult(False)


class Crash(Pass):
    name = "test-crash"
    summary = "raises"

    def run(self, graph, ctx):
        raise ZeroDivisionError("boom")


def test_fixed_point_repeats_lossless_group_until_stable():
    res = PassManager([DropOneRelu()]).run(_chain(4))
    assert [r.changed for r in res.records] == [True, True, True, False]
    assert [n.op_type for n in res.model.graph.node] == ["Relu", "Neg"]
    assert all(r.seconds >= 0 for r in res.records)
    assert res.records[0].nodes_before == 5 and res.records[0].nodes_after == 4


def test_without_fixed_point_runs_once():
    res = PassManager([DropOneRelu()], fixed_point=False).run(_chain(4))
    assert len(res.records) == 1


def test_verify_each_names_the_pass_that_changed_outputs():
    with pytest.raises(VerificationError, match="test-break-outputs"):
        PassManager([DropOneRelu(), BreakOutputs()], verify_each=True).run(_chain(3))


def test_verify_each_records_metrics_for_correct_passes():
    res = PassManager([DropOneRelu()], verify_each=True).run(_chain(3))
    assert res.records[0].verify["rel_l2"] == 0.0


def test_crashing_pass_is_reported_by_name():
    with pytest.raises(PassFailed, match="test-crash"):
        PassManager([Crash()]).run(_chain(2))


def test_invariant_violation_is_caught():
    class Dangling(Pass):
        name = "test-dangling"
        summary = "produces a tensor twice"

        def run(self, graph, ctx):
            a, b = graph.nodes[0], graph.nodes[1]
            b.outputs[0].name = a.outputs[0].name
            return PassResult(True)

    with pytest.raises(onnxopt.OnnxoptError, match="produced twice"):
        PassManager([Dangling()]).run(_chain(3))


def test_unknown_target_is_user_error():
    with pytest.raises(UserInputError, match="target"):
        PassContext(target="tpu")


def test_pass_spec_parsing_converts_types():
    @registry.register_pass
    class WithOptions(Pass):
        name = "test-with-options"
        summary = "options"

        @dataclass
        class Options:
            ratio: float = 0.5
            bits: int = 8
            per_channel: bool = False
            rank: int | float | None = None

    p = registry.parse_pass_spec("test-with-options:ratio=0.25,bits=4,per_channel=true,rank=0.5")
    assert (p.options.ratio, p.options.bits, p.options.per_channel, p.options.rank) == (0.25, 4, True, 0.5)
    assert registry.parse_pass_spec("test-with-options:rank=16").options.rank == 16
    with pytest.raises(UserInputError, match="no option 'nope'"):
        registry.parse_pass_spec("test-with-options:nope=1")
    with pytest.raises(UserInputError, match="not a valid int"):
        registry.parse_pass_spec("test-with-options:bits=four")
    with pytest.raises(UserInputError, match="unknown pass"):
        registry.parse_pass_spec("no-such-pass")


def test_third_party_passes_register_through_entry_points(monkeypatch):
    class PluginPass(Pass):
        name = "test-plugin-pass"
        summary = "from a plugin"

        def run(self, graph, ctx):
            return PassResult(False)

    class FakeEntryPoint:
        name = "plugin"
        value = "plugin_pkg:PluginPass"

        def load(self):
            return PluginPass

    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [FakeEntryPoint()] if group == registry.ENTRY_POINT_GROUP else [])
    assert registry.get_pass("test-plugin-pass") is PluginPass


def test_every_builtin_pass_is_well_formed():
    passes = onnxopt.all_passes()
    for name in ("eliminate-dead", "eliminate-identity", "fold-constants", "simplify-shapes", "cse"):
        assert name in passes, name
    for name, cls in passes.items():
        assert cls.name == name and cls.summary and isinstance(cls.lossless, bool)
        cls()  # default options construct


def test_lossless_preset_only_uses_lossless_passes():
    from onnxopt.presets import preset_passes

    for target in ("cpu", "cuda", "tensorrt"):
        ps = preset_passes("lossless", target)
        assert ps and all(p.lossless for p in ps)


def test_run_once_passes_leave_the_fixed_point_group():
    class OnceMarker(Pass):
        name = "test-once-marker"
        summary = "counts its runs"
        lossless = True
        run_once = True

        def run(self, graph, ctx):
            return PassResult(False)

    res = PassManager([DropOneRelu(), OnceMarker(), DropOneRelu()]).run(_chain(4))
    names = [r.name for r in res.records]
    assert names.count("test-once-marker") == 1
    # the first group repeats to its fixed point before the run-once pass, the last one after it
    first = names.index("test-once-marker")
    assert names[:first] == ["test-drop-one-relu"] * 4 and names[first + 1:] == ["test-drop-one-relu"]
