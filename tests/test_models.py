"""The model builders in models/: valid ONNX, runnable, deterministic, torchvision-faithful, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from models.layers import GraphBuilder
from models.zoo import BUILDERS, NOT_RUNNABLE, main

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "bundled" / "resnet_tiny.onnx"

# Small variants of the big models keep the whole file fast; the tiny nets take no options.
SMALL = {
    "resnet18": dict(image_size=32, width=0.25),
    "resnet50": dict(image_size=32, width=0.25),
    "mobilenetv2": dict(image_size=32, width=0.25),
    "vgg16": dict(image_size=32, width=0.125),
    "squeezenet11": dict(image_size=32, width=0.25),
    "inception": dict(image_size=32, width=0.25),
}


def small(name: str, **kw) -> onnx.ModelProto:
    return BUILDERS[name](**{**SMALL.get(name, {}), **kw})


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def feed_for(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
    return {inp.name: np.random.default_rng(seed).standard_normal(dims).astype(np.float32)}


def declared_shape(value_info: onnx.ValueInfoProto, batch: int) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else batch for d in value_info.type.tensor_type.shape.dim)


def param_count(model: onnx.ModelProto) -> int:
    """Learned parameters as torchvision counts them (no BN running statistics, no scalar constants)."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.dims and not t.name.endswith(("running_mean", "running_var")))


def ops(graph: onnx.GraphProto) -> Counter:
    return Counter(n.op_type for n in graph.node)


@pytest.fixture(scope="module")
def resnet50_full() -> onnx.ModelProto:
    return BUILDERS["resnet50"]()


# ---------------------------------------------------------------------------- every builder
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builder_is_valid_runnable_and_deterministic(name):
    model = small(name)
    onnx.checker.check_model(model, full_check=True)
    assert small(name).SerializeToString() == model.SerializeToString(), "same arguments, different bytes"
    assert small(name, seed=1).SerializeToString() != model.SerializeToString(), "the seed changes nothing"
    for t in model.graph.initializer:
        assert t.HasField("raw_data") or not t.dims, f"{t.name} is not stored as raw data"
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names)), "node names are not unique"
    if name in NOT_RUNNABLE:
        return
    feed = feed_for(model)
    batch = next(iter(feed.values())).shape[0]
    outputs = session(model).run(None, feed)
    for info, value in zip(model.graph.output, outputs):
        assert value.shape == declared_shape(info, batch), f"{info.name}: {value.shape}"
        assert np.isfinite(value).all()


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_mlp", "tiny_if", "tiny_constant_weights", "tiny_dynamic",
                                  "resnet_tiny", "mobilenetv2", "squeezenet11", "inception"])
def test_logits_are_order_one_and_follow_the_input(name):
    """Random deep nets tend to give every input the same logits; these must not."""
    model = small(name, batch=8)
    logits = session(model).run(None, feed_for(model, batch=8, seed=3))[0]
    assert logits.shape[0] == 8
    assert 0.05 < logits.std() < 20
    assert logits.std(axis=0).mean() > 0.1 * logits.std(), "logits hardly depend on the input"


def test_intermediate_activations_neither_explode_nor_vanish():
    model = small("inception")
    inner = [o for n in model.graph.node if n.op_type in ("Conv", "BatchNormalization", "Concat", "MaxPool")
             for o in n.output]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in inner)
    values = session(probe).run(inner, feed_for(model, seed=5))
    rms = {o: float(np.sqrt(np.mean(v.astype(np.float64) ** 2))) for o, v in zip(inner, values)}
    bad = {o: r for o, r in rms.items() if not 0.05 < r < 20}
    assert not bad, f"activations out of O(1): {bad}"


def test_bytes_do_not_depend_on_the_blas_thread_count():
    code = ("import hashlib, sys; from models.zoo import vgg16, squeezenet11; "
            "sys.stdout.write(hashlib.sha256(vgg16(image_size=32, width=0.125).SerializeToString()"
            " + squeezenet11(image_size=32, width=0.25).SerializeToString()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                              env={**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}).stdout
               for threads in ("1", "2")}
    assert len(digests) == 1


# ---------------------------------------------------------------------------- big models
def test_resnet50_full_size(resnet50_full):
    m = resnet50_full
    onnx.checker.check_model(m)
    assert [i.name for i in m.graph.input] == ["input"]
    assert declared_shape(m.graph.input[0], 1) == (1, 3, 224, 224)
    assert [o.name for o in m.graph.output] == ["logits"]
    count = ops(m.graph)
    assert count["Conv"] == 53 and count["BatchNormalization"] == 53 and count["Add"] == 16
    assert count["Flatten"] == 1 and count["Gemm"] == 1 and count["MaxPool"] == 1
    assert param_count(m) == 25_557_032  # torchvision.models.resnet50
    sess = session(m)
    x = np.random.default_rng(0).standard_normal((2, 1, 3, 224, 224)).astype(np.float32)
    a, b = (sess.run(None, {"input": xi})[0] for xi in x)
    assert a.shape == (1, 1000) and np.isfinite(a).all()
    assert 0.2 < a.std() < 10, f"logit std {a.std()}"
    assert np.abs(a - b).std() > 0.1 * a.std(), "logits do not depend on the input"


@pytest.mark.parametrize("name, expected", [("resnet18", 11_689_512), ("mobilenetv2", 3_504_872),
                                            ("squeezenet11", 1_235_496)])
def test_parameter_counts_match_torchvision(name, expected):
    # parameter counts do not depend on the image size, so a small input keeps this fast
    assert param_count(BUILDERS[name](image_size=32)) == expected


def test_vgg16_features_match_torchvision_and_classifier_has_dropout():
    m = BUILDERS["vgg16"](image_size=32, width=0.125)
    count = ops(m.graph)
    assert count["Dropout"] == 2 and count["Conv"] == 13 and count["Gemm"] == 3 and count["MaxPool"] == 5
    # torchvision's vgg16.features has 14,714,688 parameters; the width-1/8 variant has the
    # same layers with every channel count divided by 8 (3 input channels stay)
    cfg = [c // 8 for c in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)]
    expected = sum(c_in * c_out * 9 + c_out for c_in, c_out in zip([3] + cfg[:-1], cfg))
    assert sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.name.startswith("features")) == expected
    names = {t.name for t in m.graph.initializer}
    assert {"features.0.weight", "features.28.bias", "classifier.0.weight", "classifier.6.bias"} <= names


def test_mobilenetv2_structure():
    m = small("mobilenetv2", width=1.0)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    groups = [helper.get_attribute_value(a) for n in convs for a in n.attribute if a.name == "group"]
    assert sum(g > 1 for g in groups) == 17, "one depthwise conv per inverted residual"
    clips = [n for n in m.graph.node if n.op_type == "Clip"]
    assert len(clips) == 35 and all(len(n.input) == 3 for n in clips)  # min/max as inputs at opset 17
    assert ops(m.graph)["Add"] == 10  # residual connections


def test_squeezenet_and_inception_have_concats_and_sibling_convs():
    sq = small("squeezenet11")
    assert ops(sq.graph)["Concat"] == 8
    inc = small("inception")
    assert ops(inc.graph)["Concat"] == 9
    readers = Counter(n.input[0] for n in inc.graph.node if n.op_type == "Conv"
                      and [a.ints for a in n.attribute if a.name == "kernel_shape"][0] == [1, 1])
    assert sum(c >= 3 for c in readers.values()) == 9, "each inception block has three sibling 1x1 convs"


# ---------------------------------------------------------------------------- opsets
@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_if", "tiny_dynamic", "mobilenetv2", "squeezenet11", "vgg16"])
@pytest.mark.parametrize("opset", [7, 9, 11, 13, 21])
def test_other_opsets_compute_the_same_function(name, opset):
    """Opset-specific spellings (Clip, Dropout, Unsqueeze, ceil_mode, IR-3 inputs) leave the weights and outputs alone."""
    ref = small(name)
    model = small(name, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    feed = feed_for(ref)
    np.testing.assert_allclose(session(model).run(None, feed)[0], session(ref).run(None, feed)[0], rtol=1e-5, atol=1e-5)
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert all(len(n.input) == (1 if opset < 11 else 3) for n in clips)
    if opset < 10:
        assert not any(a.name == "ceil_mode" for n in model.graph.node for a in n.attribute)
    if opset <= 8:  # IR 3: initializers are listed as graph inputs
        assert {t.name for t in model.graph.initializer} <= {i.name for i in model.graph.input}


def test_hardswish_below_and_from_opset_14():
    def build(opset):
        b = GraphBuilder("hs", seed=0, opset=opset)
        return b.build({"y": b.hardswish(b.conv(b.input("x", [1, 2, 5, 5]), 3))}), b

    old, b_old = build(13)
    new, b_new = build(14)
    assert "HardSwish" not in ops(old.graph) and "HardSwish" in ops(new.graph)
    feed = {"x": b_old.values["x"][:1]}
    np.testing.assert_allclose(session(old).run(None, feed)[0], session(new).run(None, feed)[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- tiny nets
def test_tiny_if_branches_read_outer_scope():
    m = small("tiny_if")
    (if_node,) = [n for n in m.graph.node if n.op_type == "If"]
    branches = {a.name: a.g for a in if_node.attribute}
    outer = {t.name for t in m.graph.initializer} | {o for n in m.graph.node for o in n.output}
    for key, required in (("then_branch", {"Conv", "BatchNormalization", "Add"}), ("else_branch", {"Conv", "Add"})):
        g = branches[key]
        assert required <= set(ops(g))
        local = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
        read_from_outside = {i for n in g.node for i in n.input if i and i not in local}
        assert read_from_outside and read_from_outside <= outer
    assert not branches["then_branch"].initializer and branches["else_branch"].initializer


def test_tiny_if_both_branches_run():
    m = small("tiny_if")
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    cond = [n for n in m.graph.node if n.op_type == "Greater"][0].output[0]
    probe.graph.output.append(helper.make_tensor_value_info(cond, onnx.TensorProto.BOOL, []))
    sess = session(probe)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    taken = {bool(sess.run([cond], {"input": x * sign + shift})[0]) for sign in (1, -1) for shift in (-3, 0, 3)}
    assert taken == {True, False}


def test_tiny_constant_weights_has_no_initializers():
    m = small("tiny_constant_weights")
    assert not m.graph.initializer
    assert ops(m.graph)["Constant"] == 9  # 2 conv weights + 1 bias, 4 BN tensors, Gemm weight + bias
    consts = {n.output[0] for n in m.graph.node if n.op_type == "Constant"}
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    assert conv.input[1] in consts


def test_tiny_dynamic_batch_and_flatten_chain():
    m = small("tiny_dynamic")
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert m.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    sequence = [n.op_type for n in m.graph.node]
    chain = ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape"]
    positions = [sequence.index(op) for op in chain]
    assert positions == sorted(positions)
    out = session(m).run(None, feed_for(m, batch=3))[0]
    assert out.shape == (3, 10)


def test_tiny_custom_op_passes_checker_but_cannot_run():
    m = small("tiny_custom_op")
    onnx.checker.check_model(m)
    custom = [n for n in m.graph.node if n.domain == "com.example"]
    assert [n.op_type for n in custom] == ["MyOp"]
    assert any(o.domain == "com.example" for o in m.opset_import)
    with pytest.raises(Exception):
        session(m)


# ---------------------------------------------------------------------------- the builder
def test_probe_reference_ops_match_onnxruntime():
    """The numpy probe that calibrates weights runs every layer helper as onnxruntime does."""
    b = GraphBuilder("probe", seed=3, opset=17, probe_batch=3)
    x = b.input("input", ["N", 4, 13, 11])
    a = b.conv(x, 6, 3, stride=2, pad=1, group=2, dilation=2)
    d = b.conv(a, 6, 3, group=6)
    m = b.maxpool(d, 3, 2, 1, ceil_mode=True)
    p = b.avgpool(b.relu6(m), 3, 2, 1, ceil_mode=True)
    q = b.hardswish(b.batchnorm(p))
    c = b.concat([b.sigmoid(q), q])
    g = b.softmax(b.gemm(b.flatten(b.global_avgpool(c)), 5, center=True))
    r = b.bias_add(b.matmul(b.reshape(c, [0, -1]), 7))
    outputs = {"a": a, "d": d, "m": m, "p": p, "q": q, "c": c, "g": g, "r": r}
    model = b.build(outputs)
    onnx.checker.check_model(model)
    got = session(model).run(list(outputs), {"input": b.values["input"]})
    for key, value in zip(outputs, got):
        np.testing.assert_allclose(value, b.values[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_batchnorm_parameters_are_not_trivial():
    m = small("resnet_tiny")
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for bn in (n for n in m.graph.node if n.op_type == "BatchNormalization"):
        scale, bias, mean, var = (inits[i] for i in bn.input[1:])
        assert not np.allclose(scale, 1) and not np.allclose(bias, 0)
        assert not np.allclose(mean, 0) and not np.allclose(var, 1) and (var > 0).all()


def test_builder_names_follow_torchvision():
    m = small("resnet18")
    names = {t.name for t in m.graph.initializer}
    assert {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight", "layer4.1.bn2.bias",
            "fc.weight", "fc.bias"} <= names


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="opset"):
        BUILDERS["tiny_cnn"](opset=5)
    with pytest.raises(ValueError, match="too small"):
        BUILDERS["squeezenet11"](image_size=16)
    with pytest.raises(ValueError, match="width"):
        BUILDERS["resnet18"](width=0)


# ---------------------------------------------------------------------------- bundled model
def test_bundled_model_is_small_valid_and_reproducible():
    assert BUNDLED.stat().st_size < 1_000_000
    bundled = onnx.load(str(BUNDLED))
    onnx.checker.check_model(bundled)
    assert declared_shape(bundled.graph.input[0], 1) == (1, 3, 64, 64)
    assert declared_shape(bundled.graph.output[0], 1) == (1, 10)
    count = ops(bundled.graph)
    assert count["BatchNormalization"] >= 3 and count["Dropout"] >= 1 and count["Identity"] >= 1
    rebuilt = BUILDERS["resnet_tiny"]()
    assert [(n.op_type, list(n.input), list(n.output)) for n in rebuilt.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in bundled.graph.node]
    for a, b in zip(rebuilt.graph.initializer, bundled.graph.initializer):
        assert a.name == b.name
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-5, atol=1e-6)
    out = session(bundled).run(None, feed_for(bundled))[0]
    assert out.shape == (1, 10) and np.isfinite(out).all()


# ---------------------------------------------------------------------------- command line
def test_cli_writes_the_model(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    assert main(["tiny_cnn", "-o", str(path), "--seed", "3", "--opset", "13"]) == 0
    assert path.read_bytes() == BUILDERS["tiny_cnn"](seed=3, opset=13).SerializeToString()
    assert main(["resnet18", "-o", str(path), "--image-size", "32", "--width", "0.25"]) == 0
    assert declared_shape(onnx.load(str(path)).graph.input[0], 1) == (1, 3, 32, 32)
    assert list(tmp_path.iterdir()) == [path], "a temporary file was left behind"


def test_cli_lists_models(capsys):
    assert main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(BUILDERS)


@pytest.mark.parametrize("argv", [["nosuch", "-o", "x.onnx"], ["tiny_mlp", "-o", "x.onnx", "--image-size", "32"],
                                  ["tiny_cnn", "-o", "x.onnx", "--batch", "-1"], ["tiny_cnn"],
                                  ["squeezenet11", "-o", "x.onnx", "--image-size", "16"]])
def test_cli_rejects_bad_input_with_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_cli_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny_cnn", "-o", "x.onnx", "--seed", "abc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_cli_as_a_module(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "models.zoo", "nosuch", "-o", str(tmp_path / "x.onnx")],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "unknown model 'nosuch'" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "models.zoo", "tiny_mlp", "-o", str(tmp_path / "m.onnx")],
                          cwd=REPO, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
