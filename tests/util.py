"""Shared test helpers: build tiny models, run them in onnxruntime, compare before/after."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.metrics import compare
from onnxopt.runtime import run_model

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
              np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.bool_): TensorProto.BOOL, np.dtype(np.uint8): TensorProto.UINT8}


def vi(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, extra_opsets=(), ir_version=None) -> onnx.ModelProto:
    g = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(g, opset_imports=opsets)
    m.ir_version = ir_version or min(m.ir_version, 8 if opset <= 17 else m.ir_version)
    return m


def random_feeds(model: onnx.ModelProto, n: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    init_names = {i.name for i in model.graph.initializer}
    feeds = []
    for _ in range(n):
        feed = {}
        for inp in model.graph.input:
            if inp.name in init_names:
                continue
            tt = inp.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if dtype.kind == "f":
                feed[inp.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                feed[inp.name] = rng.integers(0, 2, shape).astype(dtype)
            else:
                feed[inp.name] = rng.integers(0, 4, shape).astype(dtype)
        feeds.append(feed)
    return feeds


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds=None, rel_l2: float = 1e-5) -> None:
    """Both models run in onnxruntime (optimizations off) and agree to ``rel_l2`` on every output."""
    feeds = feeds or random_feeds(before)
    ref = run_model(before, feeds, optimization="disable")
    out = run_model(after, feeds, optimization="disable")
    for r, o in zip(ref, out):
        assert set(r) == set(o), f"outputs differ: {sorted(r)} vs {sorted(o)}"
        for k in r:
            assert r[k].shape == o[k].shape, f"{k}: shape {r[k].shape} vs {o[k].shape}"
            m = compare(r[k], o[k])
            assert m["rel_l2"] <= rel_l2, f"{k}: rel_l2={m['rel_l2']:.3g} > {rel_l2}"


def run_passes(model: onnx.ModelProto, *specs: str, target: str = "cpu", verify: bool = False) -> onnx.ModelProto:
    """Run passes by spec through the PassManager and return the checked result."""
    result = onnxopt.optimize(model, passes=list(specs), target=target, verify_each=verify)
    onnx.checker.check_model(result.model)
    return result.model


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def correlated_feeds(model: onnx.ModelProto, n: int = 4, seed: int = 1, rank: int | None = None) -> list[dict]:
    """Random feeds for the model's first input; with ``rank``, its channels are mixtures of
    ``rank`` latent channels, as real activations are (what data-driven refits exploit)."""
    rng = np.random.default_rng(seed)
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    feeds = []
    for _ in range(n):
        if rank is None:
            x = rng.normal(size=shape)
        else:
            basis = np.random.default_rng(99).normal(size=(shape[1], rank))
            x = np.einsum("cr,nr...->nc...", basis, rng.normal(size=[shape[0], rank, *shape[2:]]))
        feeds.append({inp.name: x.astype(np.float32)})
    return feeds
