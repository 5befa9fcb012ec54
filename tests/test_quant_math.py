"""quant_math: QuantizeLinear/DequantizeLinear numerics against onnxruntime and numpy, weight and
bias quantization, the one-sweep streaming histogram and its calibration methods."""

from __future__ import annotations


import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.errors import UserInputError
from onnxopt.quant_math import (CALIBRATION_METHODS, StreamingHistogram, _kl_threshold, dequantize, quant_range,
                                quantize, quantize_bias, quantize_weight, scale_zero_point)
from tests.util import make_model, vi

RNG = np.random.default_rng(7)


# =========================================================================== grids, scale, zero point
def test_quant_range_grids():
    assert (quant_range("int8").qmin, quant_range("int8").qmax) == (-128, 127)
    assert (quant_range("int8", narrow=True).qmin, quant_range("int8", narrow=True).qmax) == (-127, 127)
    assert (quant_range("int8", bits=7).qmin, quant_range("int8", bits=7).qmax) == (-64, 63)
    assert (quant_range("int8", bits=7, narrow=True).qmin, quant_range("int8", bits=7, narrow=True).qmax) == (-63, 63)
    assert (quant_range("uint8").qmin, quant_range("uint8").qmax) == (0, 255)
    assert (quant_range("uint8", bits=7).qmin, quant_range("uint8", bits=7).qmax) == (0, 127)
    assert (quant_range("int32").qmin, quant_range("int32").qmax) == (-2**31, 2**31 - 1)
    assert quant_range("int8").onnx_type == TensorProto.INT8
    assert quant_range("uint8").onnx_type == TensorProto.UINT8
    assert quant_range("int32").onnx_type == TensorProto.INT32
    assert quant_range("int8").dtype is np.int8 and quant_range("uint8").dtype is np.uint8
    with pytest.raises(UserInputError):
        quant_range("int4")
    with pytest.raises(UserInputError):
        quant_range("int8", bits=9)


def test_symmetric_scale_and_zero_point():
    scale, zp = scale_zero_point(-2.0, 3.0, quant_range("int8"), symmetric=True)
    assert scale.dtype == np.float32 and zp.dtype == np.int8
    assert zp == 0 and scale == np.float32(3.0 / 127.5)
    scale, zp = scale_zero_point(-2.0, 3.0, quant_range("int8", narrow=True), symmetric=True)
    assert scale == np.float32(3.0 / 127)
    scale, zp = scale_zero_point(-1.0, 1.0, quant_range("uint8"), symmetric=True)
    assert zp == 128 and zp.dtype == np.uint8


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_asymmetric_range_keeps_zero_exact(dtype):
    qr = quant_range(dtype)
    lo = RNG.uniform(-3, 0, 50).astype(np.float32)
    hi = RNG.uniform(0, 5, 50).astype(np.float32)
    scale, zp = scale_zero_point(lo, hi, qr, symmetric=False)
    assert scale.shape == (50,) and zp.dtype == qr.dtype
    zeros = np.zeros((3, 50), np.float32)
    assert np.array_equal(dequantize(quantize(zeros, scale, zp, qr, axis=1), scale, zp, axis=1), zeros)
    # the range is covered up to half a step at both ends
    q_lo = quantize(lo[None], scale, zp, qr, axis=1)
    q_hi = quantize(hi[None], scale, zp, qr, axis=1)
    assert np.all(np.abs(dequantize(q_lo, scale, zp, axis=1) - lo) <= scale * 0.5 + 1e-6)
    assert np.all(np.abs(dequantize(q_hi, scale, zp, axis=1) - hi) <= scale * 0.5 + 1e-6)


def test_range_widened_to_zero_and_degenerate_ranges():
    qr = quant_range("uint8")
    scale, zp = scale_zero_point(2.0, 6.0, qr, symmetric=False)  # behaves as [0, 6]
    assert zp == 0 and scale == np.float32(6.0 / 255)
    scale, zp = scale_zero_point(0.0, 0.0, qr, symmetric=False)
    assert scale == 1.0 and zp == 0
    scale, zp = scale_zero_point(np.zeros(4), np.zeros(4), quant_range("int8"), symmetric=True)
    assert np.all(scale == 1.0) and np.all(zp == 0)
    scale, _ = scale_zero_point(-1e-42, 1e-42, quant_range("int8"), symmetric=True)
    assert scale >= np.finfo(np.float32).tiny  # never denormal
    with pytest.raises(ValueError):
        scale_zero_point(-np.inf, 1.0, qr, symmetric=False)


# =========================================================================== QuantizeLinear numerics
def numpy_quantize(x, scale, zp, qmin, qmax):
    """The ONNX formula written out: float32 division, round half to even, saturate."""
    with np.errstate(over="ignore"):
        y = np.round(x.astype(np.float32) / np.float32(scale)) + zp  # np.round rounds half to even
    return np.clip(y, qmin, qmax)


def ort_quantize_dequantize(x, scale, zp, axis):
    """Run a real QuantizeLinear → DequantizeLinear pair (opset 13) in onnxruntime."""
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    zp_tensor = numpy_helper.from_array(zp, "z")
    model = make_model(nodes, [vi("x", list(x.shape))], [vi("q", None, zp_tensor.data_type), vi("y", None)],
                       [numpy_helper.from_array(scale, "s"), zp_tensor], opset=13)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def tricky_values(shape, scale):
    """Gaussian values plus exact .5 ties (round half to even) and values far out of range."""
    x = (RNG.standard_normal(shape) * 2).astype(np.float32)
    flat = x.reshape(-1)
    k = np.arange(-6, 6)
    flat[:12] = (k + 0.5) * np.float32(np.max(scale))  # ties for the per-tensor scale
    flat[12:16] = [1e6, -1e6, 3e38, -3e38]  # saturation
    return x


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_matches_onnxruntime_and_numpy(dtype, symmetric):
    qr = quant_range(dtype)
    scale, zp = scale_zero_point(-1.7, 2.9, qr, symmetric=symmetric)
    x = tricky_values((3, 4, 5, 5), scale)
    q = quantize(x, scale, zp, qr)
    ort_q, ort_y = ort_quantize_dequantize(x, scale, zp, None)
    assert q.dtype == qr.dtype and ort_q.dtype == qr.dtype
    assert np.array_equal(q, ort_q)
    assert np.array_equal(dequantize(q, scale, zp), ort_y)
    assert np.array_equal(q, numpy_quantize(x, scale, zp, qr.qmin, qr.qmax))
    assert np.array_equal(dequantize(q, scale, zp), (q.astype(np.float32) - np.float32(zp)) * scale)


def test_round_half_to_even():
    qr = quant_range("int8")
    q = quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32), np.float32(1.0), np.int8(0), qr)
    assert q.tolist() == [0, 2, 2, 0, -2, -2]
    assert quantize(np.array([1e9, -1e9, np.nan], np.float32), np.float32(1.0), np.int8(3), qr).tolist() == [127, -128, 3]


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_axis_matches_onnxruntime(dtype, axis):
    qr = quant_range(dtype)
    x = (RNG.standard_normal((4, 6, 3, 5)) * 3).astype(np.float32)
    channels = x.shape[axis]
    lo = -RNG.uniform(0.1, 4, channels)
    hi = RNG.uniform(0.1, 4, channels)
    scale, zp = scale_zero_point(lo, hi, qr, symmetric=False)
    q = quantize(x, scale, zp, qr, axis=axis)
    ort_q, ort_y = ort_quantize_dequantize(x, scale, zp, axis)
    assert np.array_equal(q, ort_q)
    assert np.array_equal(dequantize(q, scale, zp, axis=axis), ort_y)
    shape = [1] * x.ndim
    shape[axis] = -1
    assert np.array_equal(q, numpy_quantize(x, scale.reshape(shape), zp.reshape(shape).astype(np.float32), qr.qmin, qr.qmax))


# =========================================================================== weights and biases
def test_quantize_weight_minmax_per_channel_and_tensor():
    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w[3] = 0.0  # a dead channel
    q, scale = quantize_weight(w, axis=0)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (8,)
    amax = np.abs(w).reshape(8, -1).max(axis=1)
    assert np.allclose(scale[amax > 0], amax[amax > 0] / 127, rtol=1e-6)
    assert scale[3] == 1.0 and not q[3].any()
    assert q.min() >= -127 and q.max() <= 127 and np.abs(q).reshape(8, -1).max(axis=1)[amax > 0].min() == 127
    assert np.array_equal(q, quantize(w, scale, np.zeros(8, np.int8), quant_range("int8", narrow=True), axis=0))
    q7, scale7 = quantize_weight(w, axis=0, bits=7)
    assert np.abs(q7).max() == 63 and np.allclose(scale7[amax > 0], amax[amax > 0] / 63, rtol=1e-6)
    qt, st = quantize_weight(w, axis=None)
    assert st.shape == () and np.isclose(st, np.abs(w).max() / 127)
    # Gemm weights (K, N) quantized along the output axis 1
    g = RNG.standard_normal((16, 5)).astype(np.float32)
    qg, sg = quantize_weight(g, axis=1)
    assert sg.shape == (5,) and np.allclose(sg, np.abs(g).max(axis=0) / 127, rtol=1e-6)


def test_quantize_weight_mse_is_better_than_minmax():
    # (its speed on a 512x512x3x3 kernel is a benchmark's business, not a timed test's)
    w = RNG.laplace(size=(512, 512, 3, 3)).astype(np.float32)  # heavy tails, as trained weights have
    q, scale = quantize_weight(w, axis=0, method="mse")
    q_mm, scale_mm = quantize_weight(w, axis=0)

    def error(q, s):
        return ((dequantize(q, s, None, axis=0) - w) ** 2).reshape(512, -1).sum(axis=1)

    assert np.all(error(q, scale) <= error(q_mm, scale_mm) * (1 + 1e-6))
    assert error(q, scale).sum() < 0.99 * error(q_mm, scale_mm).sum()
    assert np.all(scale <= scale_mm * (1 + 1e-6))
    with pytest.raises(UserInputError):
        quantize_weight(w[:2], method="entropy")


def test_quantize_bias():
    bias = RNG.standard_normal(6).astype(np.float32)
    weight_scale = RNG.uniform(0.001, 0.01, 6).astype(np.float32)
    q, scale = quantize_bias(bias, 0.02, weight_scale)
    assert q.dtype == np.int32 and scale.dtype == np.float32
    assert np.array_equal(scale, np.float32(0.02) * weight_scale)
    assert np.array_equal(q, np.rint(bias.astype(np.float64) / scale.astype(np.float64)).astype(np.int32))
    assert np.all(np.abs(dequantize(q, scale) - bias) <= scale / 2 + 1e-9)
    q, _ = quantize_bias(np.array([1e30, -1e30], np.float32), 1e-6, np.float32(1e-6))
    assert q.tolist() == [2**31 - 1, -2**31]


# =========================================================================== streaming histogram
def test_one_sweep_histogram_is_exact_after_growth():
    parts = [RNG.standard_normal(1000).astype(np.float32) * s for s in (0.0, 1e-3, 0.5, 7.0, 300.0, 2.0)]
    parts.append(np.array([np.inf, -np.inf, np.nan, 5.0], np.float32))
    h = StreamingHistogram(2048)
    for p in parts:
        h.add(p)
    data = np.concatenate(parts)
    finite = data[np.isfinite(data)]
    expected, _ = np.histogram(finite, bins=2 * h.bins, range=(-h.half_range, h.half_range))
    assert np.array_equal(h.counts, expected)
    assert h.half_range > np.abs(finite).max() and h.counts.shape == (4096,)
    assert h.min == finite.min() and h.max == finite.max()
    assert h.count == finite.size and h.nonfinite == 3 and h.zeros == np.count_nonzero(finite == 0)
    assert np.isclose(h.mean, finite.astype(np.float64).mean(), rtol=1e-12)


def test_histogram_merge_equals_single_sweep():
    a, b = RNG.standard_normal(5000) * 0.01, RNG.laplace(size=5000) * 40
    one = StreamingHistogram(256)
    one.add(a)
    one.add(b)
    left, right = StreamingHistogram(256), StreamingHistogram(256)
    left.add(a)
    right.add(b)
    left.merge(right)
    assert left.half_range == one.half_range and np.array_equal(left.counts, one.counts)
    assert (left.min, left.max, left.count) == (one.min, one.max, one.count)


def samples(kind: str, n: int = 300_000) -> np.ndarray:
    """Bulk data with a few large outliers (0.01 %), as real activations have."""
    rng = np.random.default_rng({"gauss": 1, "laplace": 2, "relu": 3}[kind])
    x = {"gauss": rng.standard_normal(n), "laplace": rng.laplace(size=n), "relu": np.maximum(rng.standard_normal(n), 0)}[kind]
    idx = rng.choice(n, 30, replace=False)
    x[idx] = rng.uniform(15, 30, 30) * (1 if kind == "relu" else rng.choice([-1, 1], 30))
    return x.astype(np.float32)


def reconstruction_mse(x, lo, hi, qr, symmetric):
    scale, zp = scale_zero_point(lo, hi, qr, symmetric=symmetric)
    return float(((dequantize(quantize(x, scale, zp, qr), scale, zp) - x) ** 2).mean())


@pytest.mark.parametrize("kind", ["gauss", "laplace", "relu"])
@pytest.mark.parametrize("dtype,symmetric", [("int8", True), ("uint8", False)])
def test_calibration_methods_beat_minmax_on_the_bulk(kind, dtype, symmetric):
    x = samples(kind)
    qr = quant_range(dtype)
    h = StreamingHistogram()
    for part in np.array_split(x, 7):
        h.add(part)
    mm_lo, mm_hi = h.range("minmax", qr, symmetric=symmetric)
    assert (mm_lo, mm_hi) == (float(x.min()), float(x.max()))
    bulk = x[np.abs(x) < 5]
    mm_width = mm_hi - mm_lo
    for method in ("percentile", "entropy", "mse"):
        lo, hi = h.range(method, qr, symmetric=symmetric)
        assert x.min() <= lo <= hi <= x.max()
        assert hi - lo < 0.95 * mm_width, f"{method}: ({lo}, {hi}) is not tighter than minmax ({mm_lo}, {mm_hi})"
        assert reconstruction_mse(bulk, lo, hi, qr, symmetric) < reconstruction_mse(bulk, mm_lo, mm_hi, qr, symmetric)
    # mse minimises the error over all the data, outliers included
    lo, hi = h.range("mse", qr, symmetric=symmetric)
    assert reconstruction_mse(x, lo, hi, qr, symmetric) <= reconstruction_mse(x, mm_lo, mm_hi, qr, symmetric)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_range_is_near_the_true_optimum(symmetric):
    x = samples("laplace")
    qr = quant_range("int8" if symmetric else "uint8")
    h = StreamingHistogram()
    h.add(x)
    lo, hi = h.range("mse", qr, symmetric=symmetric)
    chosen = reconstruction_mse(x, lo, hi, qr, symmetric)
    brute = min(reconstruction_mse(x, -t, t, qr, symmetric) for t in np.linspace(1, 30, 120))
    assert chosen <= brute * 1.02


def test_percentile_matches_numpy():
    x = samples("laplace")
    h = StreamingHistogram()
    h.add(x)
    width = h.bin_width
    lo, hi = h.range("percentile", quant_range("uint8"), symmetric=False, percentile=99.9)
    assert abs(lo - np.percentile(x, 0.1)) <= width and abs(hi - np.percentile(x, 99.9)) <= width
    lo, hi = h.range("percentile", quant_range("int8"), symmetric=True, percentile=99.0)
    t = np.percentile(np.abs(x), 99.0)
    assert abs(hi - t) <= width and abs(lo + t) <= width
    lo, hi = h.range("percentile", quant_range("int8"), symmetric=True, percentile=100.0)
    assert max(-lo, hi) == np.abs(x).max()


def reference_kl_threshold(counts, levels):
    """Migacz's slide pseudo-code, one candidate at a time (returns the kept bin count)."""
    used = int(np.flatnonzero(counts)[-1]) + 1
    h = counts[:used].astype(np.float64)
    best_kl, best_i = np.inf, used
    for i in range(levels, used + 1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()  # outliers into the last bin
        merged, q = i // levels, np.zeros(i)
        for g in range(levels):
            s, e = g * merged, (g + 1) * merged if g < levels - 1 else i
            nonzero = np.count_nonzero(p[s:e])
            if nonzero:
                q[s:e] = np.where(p[s:e] > 0, h[s:e].sum() / nonzero, 0.0)
        if np.any((p > 0) & (q == 0)):
            continue
        pn, qn = p / p.sum(), q / q.sum()
        m = pn > 0
        kl = float(np.sum(pn[m] * np.log(pn[m] / qn[m])))
        if kl < best_kl - 1e-12:
            best_kl, best_i = kl, i
    return best_i


@pytest.mark.parametrize("levels", [32, 64])
def test_entropy_matches_tensorrt_algorithm(levels):
    rng = np.random.default_rng(levels)
    x = np.abs(rng.standard_normal(20000))
    x[:4] *= 6
    counts, _ = np.histogram(x, bins=300, range=(0, x.max() * 1.2))
    counts[rng.integers(0, 300, 60)] = 0  # empty bins exercise the zero handling
    assert _kl_threshold(counts, 1.0, levels) == reference_kl_threshold(counts, levels)


def test_range_edge_cases():
    qr = quant_range("int8")
    h = StreamingHistogram()
    assert h.range("entropy", qr, symmetric=True) == (0.0, 0.0)
    h.add(np.zeros(100, np.float32))
    for method in CALIBRATION_METHODS:
        assert h.range(method, qr, symmetric=True) == (0.0, 0.0)
    h.add(np.full(10, 3.0, np.float32))  # grows from an all-zero start
    assert h.range("minmax", qr, symmetric=False) == (0.0, 3.0)
    assert h.counts.sum() == 110 and h.half_range == 4.0
    with pytest.raises(UserInputError):
        h.range("kl", qr, symmetric=True)
    with pytest.raises(UserInputError):
        h.range("percentile", qr, symmetric=True, percentile=120)
