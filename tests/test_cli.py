"""The onnxopt command line, run in-process through ``main([...])`` (plus one subprocess run)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt import graph as G
from onnxopt import registry
from onnxopt.cli import main
from onnxopt.pass_base import Pass, PassResult
from tests.util import assert_same_outputs, init, make_model, op_types, random_feeds, vi

INPUT_SHAPE = (1, 3, 8, 8)


# ============================================================================ helpers (also used by test_bad_input)
def tiny_classifier(seed: int = 0, channels: int = 8) -> onnx.ModelProto:
    """Conv(+bias) → Identity → BatchNormalization → Relu → GlobalAveragePool → Flatten → Gemm → 10 logits.

    The Identity gives the lossless preset something to remove; the logits make top-1 meaningful.
    """
    rng = np.random.default_rng(seed)
    f32 = np.float32
    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Identity", ["c"], ["c_id"], name="identity"),
        helper.make_node("BatchNormalization", ["c_id", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1, name="fc"),
    ]
    inits = [
        init("conv.w", rng.standard_normal((channels, 3, 3, 3)).astype(f32) * 0.3),
        init("conv.b", rng.standard_normal(channels).astype(f32) * 0.1),
        init("bn.scale", rng.uniform(0.5, 1.5, channels).astype(f32)),
        init("bn.bias", rng.standard_normal(channels).astype(f32) * 0.1),
        init("bn.mean", rng.standard_normal(channels).astype(f32) * 0.1),
        init("bn.var", rng.uniform(0.5, 1.5, channels).astype(f32)),
        init("fc.w", rng.standard_normal((10, channels)).astype(f32) * 0.3),
        init("fc.b", np.zeros(10, f32)),
    ]
    return make_model(nodes, [vi("input", list(INPUT_SHAPE))], [vi("logits", [1, 10])], inits, opset=17)


def save(model: onnx.ModelProto, path) -> str:
    onnx.save_model(model, str(path))
    return str(path)


class AddWeightNoise(Pass):
    """A deliberately lossy pass for the CLI tests: adds seeded noise to every float weight."""

    name = "test-add-weight-noise"
    summary = "Add seeded Gaussian noise to float weights (CLI tests only)."
    lossless = False

    @dataclass
    class Options:
        scale: float = 0.5
        skip_bias: bool = False

    def run(self, graph, ctx):
        rng = np.random.default_rng(ctx.seed)
        changed = 0
        for tensor in graph.tensors().values():
            value = G.constant_value(tensor)
            if value is None or value.dtype != np.float32 or (self.options.skip_bias and value.ndim == 1):
                continue
            tensor.values = (value + self.options.scale * rng.standard_normal(value.shape)).astype(np.float32)
            changed += 1
        return PassResult(changed=changed > 0, counters={"weights_changed": changed})


@pytest.fixture
def noise_pass():
    """Register the test pass only for the tests that ask for it."""
    registry.all_passes()  # load the built-in library first so it cannot overwrite anything later
    registry.register_pass(AddWeightNoise)
    yield AddWeightNoise.name
    registry._REGISTRY.pop(AddWeightNoise.name, None)


@pytest.fixture
def model_file(tmp_path):
    return save(tiny_classifier(), tmp_path / "model.onnx")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ============================================================================ optimize
def test_optimize_default_preset_writes_a_smaller_equivalent_model(tmp_path, model_file, capsys):
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run_cli(capsys, "optimize", model_file, "-o", out)
    assert code == 0, stderr
    before, after = onnx.load(model_file), onnx.load(str(out))
    onnx.checker.check_model(after)
    assert "Identity" not in op_types(after)
    assert len(after.graph.node) < len(before.graph.node)
    assert_same_outputs(before, after, random_feeds(before, n=3))
    # the summary names the passes that ran and the before → after totals
    assert "eliminate-identity" in stdout
    assert "nodes" in stdout and "file size" in stdout
    assert f"wrote {out}" in stdout
    # no temp files left next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]


def test_optimize_quiet_prints_nothing(tmp_path, model_file, capsys):
    code, stdout, stderr = run_cli(capsys, "optimize", model_file, "-o", tmp_path / "o.onnx", "--quiet")
    assert code == 0
    assert stdout == "" and stderr == ""


def test_pass_with_options_runs_only_that_pass(tmp_path, model_file, capsys, noise_pass):
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run_cli(capsys, "optimize", model_file, "-o", out,
                                   "--pass", f"{noise_pass}:scale=0.25,skip_bias=true", "--seed", "3")
    assert code == 0, stderr
    before, after = onnx.load(model_file), onnx.load(str(out))
    assert op_types(after) == op_types(before)  # the preset did not run
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in after.graph.initializer}
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in before.graph.initializer}
    assert np.array_equal(weights["conv.b"], originals["conv.b"])  # skip_bias=true
    noise = weights["conv.w"] - originals["conv.w"]
    assert 0.15 < noise.std() < 0.35  # scale=0.25
    assert "weights_changed" in stdout


def test_report_json_content(tmp_path, model_file, capsys):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    code, _, stderr = run_cli(capsys, "optimize", model_file, "-o", out, "--report", report_path, "--quiet")
    assert code == 0, stderr
    report = json.loads(report_path.read_text())
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert report_path.stat().st_mode == plain.stat().st_mode  # usual permissions, not a temp file's 0600
    assert report["onnxopt_version"] == onnxopt.__version__
    assert report["input"]["path"] == model_file and report["output"]["path"] == str(out)
    assert report["written"] is True
    assert report["input"]["size"] == (tmp_path / "model.onnx").stat().st_size
    assert report["output"]["size"] == out.stat().st_size
    assert report["input"]["nodes"] == 7 and report["output"]["nodes"] < 7
    assert report["preset"] == "lossless" and report["target"] == "cpu"
    names = {p["name"] for p in report["passes"]}
    assert "eliminate-identity" in names
    for rec in report["passes"]:
        assert rec["seconds"] >= 0 and isinstance(rec["counters"], dict) and isinstance(rec["notes"], list)
    summary = {row["name"]: row for row in report["pass_summary"]}
    assert summary["eliminate-identity"]["nodes_delta"] <= -1
    assert report["calibration"] is None  # nothing needed data: none was made up
    assert report["validation"] is None


def test_report_to_stdout_is_pure_json(tmp_path, model_file, capsys):
    code, stdout, stderr = run_cli(capsys, "optimize", model_file, "-o", tmp_path / "o.onnx", "--report", "-")
    assert code == 0, stderr
    report = json.loads(stdout)  # the tables went to stderr
    assert report["command"] == "optimize"
    assert "Passes" in stderr


def test_validate_prints_tables_and_records_random_data(tmp_path, model_file, capsys):
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, stderr = run_cli(capsys, "optimize", model_file, "-o", out, "--validate", "--runs", "2",
                                   "--tolerance", "cosine=0.9999", "--report", report_path)
    assert code == 0, stderr
    for word in ("Validation", "max_abs", "rel_l2", "cosine", "top1", "speedup", "cpu", "logits", "PASS"):
        assert word in stdout, word
    assert "random data" in stderr
    report = json.loads(report_path.read_text())
    assert report["calibration"]["random"] is True
    assert report["validation"]["passed"] is True
    cpu = next(p for p in report["validation"]["providers"] if p["provider"] == "cpu")
    assert cpu["status"] == "ok"
    assert cpu["outputs"]["logits"]["cosine"] > 0.9999


def test_tolerance_failure_exits_3_and_writes_no_model(tmp_path, model_file, capsys, noise_pass):
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, stderr = run_cli(capsys, "optimize", model_file, "-o", out, "--pass", noise_pass,
                                   "--tolerance", "cosine=0.9999", "--runs", "1", "--report", report_path)
    assert code == 3
    assert not out.exists()
    assert stderr.strip().splitlines()[-1].startswith("error:")
    assert "tolerance" in stderr and "not written" in stderr
    assert "FAIL" in stdout
    report = json.loads(report_path.read_text())  # the report explains the failure
    assert report["written"] is False and report["output"] is None
    assert report["validation"]["passed"] is False and report["validation"]["failures"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "r.json"]


def test_calibration_file_is_used_for_validation(tmp_path, model_file, capsys):
    data = np.random.default_rng(1).standard_normal((4, *INPUT_SHAPE[1:])).astype(np.float32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=data)
    report_path = tmp_path / "r.json"
    code, _, stderr = run_cli(capsys, "optimize", model_file, "-o", tmp_path / "o.onnx", "--calib", calib,
                              "--validate", "--runs", "1", "--report", report_path, "--quiet")
    assert code == 0, stderr
    report = json.loads(report_path.read_text())
    assert report["calibration"]["random"] is False
    assert "calib.npz" in report["calibration"]["source"]


def test_verify_each_records_per_pass_checks(tmp_path, model_file, capsys):
    report_path = tmp_path / "r.json"
    code, _, stderr = run_cli(capsys, "optimize", model_file, "-o", tmp_path / "o.onnx", "--verify-each",
                              "--report", report_path, "--quiet")
    assert code == 0, stderr
    report = json.loads(report_path.read_text())
    verified = [p for p in report["passes"] if p["changed"]]
    assert verified and all(p["verify"] is not None for p in verified)


def test_external_data_flag(tmp_path, capsys):
    model_file = save(tiny_classifier(channels=32), tmp_path / "model.onnx")  # conv.w is 3.4 kB: stored outside
    out = tmp_path / "o.onnx"
    code, _, stderr = run_cli(capsys, "optimize", model_file, "-o", out, "--external-data", "--quiet")
    assert code == 0, stderr
    assert (tmp_path / "o.onnx.data").exists()
    assert_same_outputs(onnx.load(model_file), onnx.load(str(out)))


def test_interrupt_exits_130_without_output(tmp_path, model_file, capsys, monkeypatch):
    def interrupted(self, model, ctx=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnxopt.manager.PassManager, "run", interrupted)
    out = tmp_path / "o.onnx"
    code, _, stderr = run_cli(capsys, "optimize", model_file, "-o", out)
    assert code == 130 and not out.exists()
    assert "interrupted" in stderr


def test_internal_error_is_one_line_and_traceback_on_demand(tmp_path, model_file, capsys, monkeypatch):
    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(onnxopt.cli, "_choose_passes", broken)
    code, _, stderr = run_cli(capsys, "optimize", model_file, "-o", tmp_path / "o.onnx")
    assert code == 1
    assert stderr.strip().splitlines() == [
        "internal error: ZeroDivisionError: boom (please report; rerun with ONNXOPT_DEBUG=1 for a traceback)"]
    monkeypatch.setenv("ONNXOPT_DEBUG", "1")
    code, _, stderr = run_cli(capsys, "optimize", model_file, "-o", tmp_path / "o.onnx")
    assert code == 1 and "Traceback" in stderr


def test_crashing_pass_is_named(tmp_path, model_file, capsys, noise_pass, monkeypatch):
    def crash(self, graph, ctx):
        raise RuntimeError("kaput")

    monkeypatch.setattr(AddWeightNoise, "run", crash)
    out = tmp_path / "o.onnx"
    code, _, stderr = run_cli(capsys, "optimize", model_file, "-o", out, "--pass", noise_pass)
    assert code == 1 and not out.exists()
    line, = stderr.strip().splitlines()
    assert line.startswith("internal error in pass")
    assert noise_pass in line and "kaput" in line and "please report" in line


# ============================================================================ inspect
def test_inspect_tables(model_file, capsys):
    code, stdout, stderr = run_cli(capsys, "inspect", model_file)
    assert code == 0, stderr
    for word in ("input", "logits", "Conv", "Gemm", "MACs", "parameters"):
        assert word in stdout, word


def test_inspect_json(model_file, capsys):
    code, stdout, _ = run_cli(capsys, "inspect", model_file, "--json")
    assert code == 0
    stats = json.loads(stdout)
    assert stats["ops"]["Conv"] == 1 and stats["ops"]["Identity"] == 1
    assert stats["parameters"] == 8 * 3 * 3 * 3 + 8 + 4 * 8 + 10 * 8 + 10
    assert stats["macs"] > 8 * 3 * 3 * 3 * 8 * 8  # the convolution alone


# ============================================================================ validate
def test_validate_subcommand(tmp_path, model_file, capsys, noise_pass):
    noisy = tmp_path / "noisy.onnx"
    assert main(["optimize", model_file, "-o", str(noisy), "--pass", f"{noise_pass}:scale=0.3", "--quiet"]) == 0
    capsys.readouterr()

    code, stdout, _ = run_cli(capsys, "validate", model_file, model_file, "--runs", "1", "--json",
                              "--tolerance", "cosine=0.99999")
    assert code == 0
    same = json.loads(stdout)
    assert same["passed"] is True

    code, stdout, stderr = run_cli(capsys, "validate", model_file, noisy, "--runs", "1",
                                   "--tolerance", "cosine=0.99999")
    assert code == 3
    assert "FAIL" in stdout and stderr.strip().splitlines()[-1].startswith("error:")

    # without a tolerance a difference is reported, not a failure
    code, stdout, _ = run_cli(capsys, "validate", model_file, noisy, "--runs", "1")
    assert code == 0 and "cosine" in stdout


# ============================================================================ passes
def test_passes_lists_every_registered_pass_and_presets(capsys):
    code, stdout, _ = run_cli(capsys, "passes", "--json")
    assert code == 0
    listing = json.loads(stdout)
    listed = {p["name"]: p for p in listing["passes"]}
    assert set(listed) == set(onnxopt.all_passes())
    assert listed, "the built-in pass library registered nothing"
    for name, cls in onnxopt.all_passes().items():
        assert listed[name]["summary"] == cls.summary
        assert listed[name]["lossless"] == cls.lossless
        assert {o["name"] for o in listed[name]["options"]} == {f.name for f in cls.option_fields()}
    assert "eliminate-identity" in listing["presets"]["lossless"]["passes"]

    code, stdout, _ = run_cli(capsys, "passes")
    assert code == 0
    for name in onnxopt.all_passes():
        assert name in stdout


def test_passes_shows_option_types_and_defaults(capsys, noise_pass):
    code, stdout, _ = run_cli(capsys, "passes", "--json")
    listed = {p["name"]: p for p in json.loads(stdout)["passes"]}
    assert listed[noise_pass]["options"] == [{"name": "scale", "type": "float", "default": 0.5},
                                             {"name": "skip_bias", "type": "bool", "default": False}]
    assert listed[noise_pass]["lossless"] is False


def test_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert onnxopt.__version__ in capsys.readouterr().out
    assert main(["optimize", "--help"]) == 0
    assert "--preset" in capsys.readouterr().out


# ============================================================================ installed entry points
def test_console_script_is_declared():
    scripts = {ep.name: ep for ep in metadata.entry_points(group="console_scripts")}
    assert scripts["onnxopt"].value == "onnxopt.cli:main"
    assert scripts["onnxopt"].load() is main


def test_python_dash_m_end_to_end(tmp_path, model_file):
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxopt", "optimize", model_file, "-o", str(out), "--report", "-"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] is True
    assert_same_outputs(onnx.load(model_file), onnx.load(str(out)))

    proc = subprocess.run([sys.executable, "-m", "onnxopt", "optimize", str(tmp_path / "nope.onnx"), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_names_with_brackets_are_printed_literally(tmp_path, capsys):
    """Tensor names are data, not rich markup ('[/out]' would be a closing tag)."""
    m = make_model([helper.make_node("Relu", ["x[in]"], ["y[/out]"], name="[bold]relu")],
                   [vi("x[in]", [1, 4])], [vi("y[/out]", [1, 4])])
    path = save(m, tmp_path / "m.onnx")
    code, stdout, stderr = run_cli(capsys, "inspect", path)
    assert code == 0, stderr
    assert "x[in]" in stdout and "y[/out]" in stdout
    code, stdout, stderr = run_cli(capsys, "validate", path, path, "--runs", "1")
    assert code == 0, stderr
    assert "y[/out]" in stdout


# ============================================================================ data shapes
def _dynamic_model_file(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
                   [vi("x", ["N", 4])], [vi("y", ["N", 4])])
    path = tmp_path / "dyn.onnx"
    onnx.save(m, path)
    return path


def _input_dims(path):
    m = onnx.load(path)
    return [d.dim_value or d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]


def test_data_shape_sizes_the_data_but_keeps_the_model_dynamic(tmp_path, capsys):
    src, out = _dynamic_model_file(tmp_path), tmp_path / "out.onnx"
    code, _, _ = run_cli(capsys, "optimize", str(src), "-o", str(out), "--validate", "--runs", "1",
                         "--data-shape", "x:3x4", "--quiet")
    assert code == 0 and _input_dims(out) == ["N", 4]


def test_input_shape_fixes_the_output_model(tmp_path, capsys):
    src, out = _dynamic_model_file(tmp_path), tmp_path / "out.onnx"
    code, _, _ = run_cli(capsys, "optimize", str(src), "-o", str(out), "--input-shape", "x:2x4", "--quiet")
    assert code == 0 and _input_dims(out) == [2, 4]
