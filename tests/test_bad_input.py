"""Every user mistake: exit code 2, one line on stderr starting with 'error:' that names the cause,
no traceback, no output file, and the input file unchanged byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from onnxopt.cli import main
from tests.test_cli import INPUT_SHAPE, noise_pass, save, tiny_classifier  # noqa: F401  (noise_pass is a fixture)
from tests.util import make_model, vi


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def assert_bad_input(capsys, tmp_path, argv, *, cause: list[str], input_path: Path | None = None,
                     output_path: Path | None = None):
    """Run the CLI and check the bad-input contract; ``cause``: words the message must contain."""
    before = digest(input_path) if input_path else None
    listing_before = sorted(p.name for p in tmp_path.iterdir())
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err and "Traceback" not in out
    for word in cause:
        assert word.lower() in lines[0].lower(), f"'{word}' not in: {lines[0]}"
    if output_path is not None:
        assert not output_path.exists()
        assert not Path(str(output_path) + ".data").exists()
    if input_path is not None:
        assert digest(input_path) == before
    # nothing new in the folder: no output, no temp files
    assert sorted(p.name for p in tmp_path.iterdir()) == listing_before
    return lines[0]


@pytest.fixture
def model(tmp_path):
    return Path(save(tiny_classifier(), tmp_path / "model.onnx"))


def optimize(model_path, tmp_path, *extra):
    out = tmp_path / "out.onnx"
    return ["optimize", model_path, "-o", out, *extra], out


# ============================================================================ bad model files
def test_missing_file(capsys, tmp_path):
    argv, out = optimize(tmp_path / "missing.onnx", tmp_path)
    assert_bad_input(capsys, tmp_path, argv, cause=["missing.onnx", "does not exist"], output_path=out)


def test_directory(capsys, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    argv, out = optimize(folder, tmp_path)
    assert_bad_input(capsys, tmp_path, argv, cause=["directory"], output_path=out)


def test_empty_file(capsys, tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    argv, out = optimize(empty, tmp_path)
    assert_bad_input(capsys, tmp_path, argv, cause=["empty"], input_path=empty, output_path=out)


def test_random_bytes(capsys, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    argv, out = optimize(junk, tmp_path)
    assert_bad_input(capsys, tmp_path, argv, cause=["junk.onnx"], input_path=junk, output_path=out)


def test_truncated_model(capsys, tmp_path, model):
    data = model.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    argv, out = optimize(cut, tmp_path)
    assert_bad_input(capsys, tmp_path, argv, cause=["cut.onnx", "truncated"], input_path=cut, output_path=out)


def test_model_that_fails_the_checker(capsys, tmp_path):
    broken = make_model([helper.make_node("Relu", ["not_defined"], ["y"])], [vi("x", [1, 4])], [vi("y", [1, 4])])
    path = Path(save(broken, tmp_path / "broken.onnx"))
    argv, out = optimize(path, tmp_path)
    assert_bad_input(capsys, tmp_path, argv, cause=["onnx.checker", "not_defined"], input_path=path, output_path=out)


def test_inspect_and_validate_reject_bad_files_too(capsys, tmp_path, model):
    assert_bad_input(capsys, tmp_path, ["inspect", tmp_path / "nope.onnx"], cause=["nope.onnx"])
    assert_bad_input(capsys, tmp_path, ["validate", model, tmp_path / "nope.onnx"], cause=["candidate", "nope.onnx"],
                     input_path=model)


# ============================================================================ bad options
@pytest.mark.parametrize("extra, cause", [
    (["--pass", "no-such-pass"], ["unknown pass", "no-such-pass"]),
    (["--preset", "no-such-preset"], ["unknown preset", "no-such-preset"]),
    (["--target", "gpu"], ["--target", "gpu"]),
    (["--input-shape", "input:1xAx8x8"], ["input:1xAx8x8"]),
    (["--input-shape", "nope:1x3x8x8"], ["nope"]),
    (["--pass", "eliminate-identity", "--input-shape", "nope:1x3x8x8"], ["nope"]),
    (["--input-shape", "input:1x3x9x9"], ["axis 2"]),
    (["--tolerance", "cosine"], ["cosine"]),
    (["--tolerance", "accuracy=0.9"], ["accuracy"]),
    (["--calib", "no_such_calib.npz"], ["no_such_calib.npz"]),
    (["--calib-limit", "0"], ["--calib-limit"]),
    (["--image-preprocess", "imagenet"], ["--calib"]),
    (["--providers", "gpu0"], ["gpu0"]),
    (["--no-such-flag"], ["--no-such-flag"]),
])
def test_bad_options(capsys, tmp_path, model, extra, cause):
    argv, out = optimize(model, tmp_path, *extra)
    assert_bad_input(capsys, tmp_path, argv, cause=cause, input_path=model, output_path=out)


def test_unknown_pass_option(capsys, tmp_path, model, noise_pass):
    argv, out = optimize(model, tmp_path, "--pass", f"{noise_pass}:volume=3")
    assert_bad_input(capsys, tmp_path, argv, cause=["volume", noise_pass], input_path=model, output_path=out)


def test_bad_pass_option_value(capsys, tmp_path, model, noise_pass):
    argv, out = optimize(model, tmp_path, "--pass", f"{noise_pass}:scale=loud")
    assert_bad_input(capsys, tmp_path, argv, cause=["scale", "loud"], input_path=model, output_path=out)


# ============================================================================ bad calibration data
def _calib(tmp_path, **arrays) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays, cause", [
    ({"pixels": np.zeros((2, *INPUT_SHAPE[1:]), np.float32)}, ["input"]),     # wrong input name
    ({"input": np.zeros((2, 3, 5, 5), np.float32)}, ["input", "shape"]),      # wrong shape
    ({"input": np.zeros((2, *INPUT_SHAPE[1:]), np.int64)}, ["input", "int64"]),  # wrong dtype
])
def test_bad_calibration_data(capsys, tmp_path, model, arrays, cause):
    calib = _calib(tmp_path, **arrays)
    argv, out = optimize(model, tmp_path, "--calib", calib)
    assert_bad_input(capsys, tmp_path, argv, cause=cause, input_path=model, output_path=out)


# ============================================================================ bad output paths
def test_output_folder_missing(capsys, tmp_path, model):
    out = tmp_path / "no_such_folder" / "out.onnx"
    assert_bad_input(capsys, tmp_path, ["optimize", model, "-o", out], cause=["no_such_folder", "does not exist"],
                     input_path=model)


def test_output_is_the_input(capsys, tmp_path, model):
    line = assert_bad_input(capsys, tmp_path, ["optimize", model, "-o", model], cause=["overwrite the input"],
                            input_path=model)
    assert "model.onnx" in line


def test_output_is_the_input_by_another_spelling(capsys, tmp_path, model, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert_bad_input(capsys, tmp_path, ["optimize", model, "-o", "sub/../model.onnx"],
                     cause=["overwrite the input"], input_path=model)


def test_report_would_overwrite_a_model(capsys, tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, out = optimize(model, tmp_path, "--report", "model.onnx")
    assert_bad_input(capsys, tmp_path, argv, cause=["--report", "model.onnx"], input_path=model, output_path=out)
    argv, out = optimize(model, tmp_path, "--report", "out.onnx")
    assert_bad_input(capsys, tmp_path, argv, cause=["--report", "out.onnx"], input_path=model, output_path=out)


def test_report_folder_missing(capsys, tmp_path, model):
    argv, out = optimize(model, tmp_path, "--report", tmp_path / "nope" / "r.json")
    assert_bad_input(capsys, tmp_path, argv, cause=["nope", "does not exist"], input_path=model, output_path=out)


# ============================================================================ providers
def test_required_provider_not_available(capsys, tmp_path, model):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    argv, out = optimize(model, tmp_path, "--validate", "--providers", "cuda", "--require-providers")
    assert_bad_input(capsys, tmp_path, argv, cause=["cuda", "not available"], input_path=model, output_path=out)
    assert_bad_input(capsys, tmp_path, ["validate", model, model, "--providers", "cpu,cuda", "--require-providers"],
                     cause=["cuda"], input_path=model)
