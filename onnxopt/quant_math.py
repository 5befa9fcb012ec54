"""Quantization numerics and streaming calibration histograms.

* :func:`quantize` / :func:`dequantize` compute exactly what ONNX ``QuantizeLinear`` /
  ``DequantizeLinear`` compute (per tensor or per axis): ``y = saturate(round(x / scale) + zp)``
  with ``x / scale`` in float32 and round half to even, and ``x = (q - zp) * scale``.
* :func:`scale_zero_point` turns a float range into (scale, zero point) with 0.0 exactly
  representable; :func:`quantize_weight` and :func:`quantize_bias` make symmetric per-channel
  int8 weights and int32 biases (scale = input scale x weight scale).
* :class:`StreamingHistogram` collects one tensor's distribution in a single sweep over the
  calibration data with bounded memory, and picks a quantization range from it by one of
  :data:`CALIBRATION_METHODS`: ``minmax``, ``percentile``, ``entropy`` (TensorRT's KL
  calibration, Migacz, "8-bit Inference with TensorRT", GTC 2017) or ``mse``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import UserInputError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")

_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: scales never go below it


# --------------------------------------------------------------------------- integer grids
@dataclass(frozen=True)
class QuantRange:
    """The integer grid of a quantized type: values ``qmin..qmax`` stored as ``dtype``."""

    dtype: type  # np.int8 / np.uint8 / np.int16 / np.uint16 / np.int32
    qmin: int
    qmax: int

    @property
    def onnx_type(self) -> int:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))

    @property
    def signed(self) -> bool:
        return np.dtype(self.dtype).kind == "i"

    @property
    def levels(self) -> int:
        """Number of representable integers."""
        return self.qmax - self.qmin + 1


_QUANT_TYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32}


def quant_range(dtype: str, *, bits: int = 8, narrow: bool = False) -> QuantRange:
    """The integer grid of ``dtype`` ("int8", "uint8", "int16", "uint16", "int32"; or a numpy dtype).

    ``bits`` narrows int8/uint8 (and int16/uint16) to fewer bits: int8 with bits=7 is [-64, 63].
    int32 (bias) always uses its full width. ``narrow`` drops the lowest value so the grid is
    symmetric: int8 [-127, 127] (TensorRT's weight grid), uint8 [1, 255] (as TensorFlow's
    ``narrow_range``).
    """
    key = np.dtype(dtype).name if not isinstance(dtype, str) else dtype.lower()
    if key not in _QUANT_TYPES:
        raise UserInputError(f"unknown quantized type '{dtype}'.", f"use one of: {', '.join(_QUANT_TYPES)}.")
    np_type = _QUANT_TYPES[key]
    width = np.dtype(np_type).itemsize * 8
    if key != "int32":
        if not 2 <= bits <= width:
            raise UserInputError(f"{bits} bits do not fit the quantized type {key}.", f"use 2 to {width} bits.")
        width = bits
    if np.dtype(np_type).kind == "i":
        qmin, qmax = -(1 << (width - 1)), (1 << (width - 1)) - 1
    else:
        qmin, qmax = 0, (1 << width) - 1
    if narrow:
        qmin += 1
    return QuantRange(np_type, qmin, qmax)


# --------------------------------------------------------------------------- scale / zero point
def scale_zero_point(lo, hi, qrange: QuantRange, *, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) that map the float range [lo, hi] onto ``qrange``.

    ``lo``/``hi`` are scalars or per-channel arrays. The range is first widened to include 0,
    so that 0.0 is exactly representable (zero padding and ReLU zeros stay exact, as ONNX
    QuantizeLinear's zero point assumes). Symmetric: zero point 0 (signed) or the grid's middle
    (unsigned: 128 for uint8) and ``scale = max(|lo|, |hi|) / ((qmax - qmin) / 2)``.
    Asymmetric: ``scale = (hi - lo) / (qmax - qmin)``, ``zp = round(qmin - lo / scale)``.
    The scale is float32, > 0 and never denormal (an all-zero range gets scale 1.0); the zero
    point has ``qrange.dtype``.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(f"quantization range must be finite, got lo={lo}, hi={hi}")
    lo, hi = np.broadcast_arrays(lo, hi)
    if symmetric:
        scale = np.maximum(-lo, hi) / ((qrange.qmax - qrange.qmin) / 2.0)
        zero_point = np.full(scale.shape, 0 if qrange.signed else (qrange.qmin + qrange.qmax + 1) // 2, dtype=np.int64)
    else:
        scale = (hi - lo) / float(qrange.qmax - qrange.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.rint(qrange.qmin - lo / safe), qrange.qmin, qrange.qmax).astype(np.int64)
        # lo = hi = 0: any zero point works; the lowest grid value keeps uint8 data at its natural 0.
        zero_point = np.where(scale > 0, zero_point, 0 if qrange.qmin <= 0 <= qrange.qmax else qrange.qmin)
    scale = np.where(scale > 0, np.maximum(scale, _F32_TINY), 1.0).astype(np.float32)
    return scale, zero_point.astype(qrange.dtype)


# --------------------------------------------------------------------------- QuantizeLinear / DequantizeLinear
def _per_axis(value, ndim: int, axis: int | None) -> np.ndarray:
    """``value`` shaped to broadcast along ``axis`` of an ``ndim``-d tensor (ONNX per-axis layout)."""
    value = np.asarray(value)
    if axis is None or value.ndim == 0:
        return value  # per tensor: a scalar (or 1-element) scale broadcasts as is
    axis = _normalize_axis(axis, ndim)
    shape = [1] * ndim
    shape[axis] = -1
    return value.reshape(shape)


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim


def quantize(x, scale, zero_point, qrange: QuantRange, axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_to_even(x / scale) + zero_point)``.

    ``x / scale`` is computed in float32 as the spec and onnxruntime's kernel do; ``axis`` is
    the per-channel axis of 1-D ``scale``/``zero_point`` (None: per tensor). NaN maps to the zero
    point (the spec leaves it undefined).
    """
    x = np.asarray(x, dtype=np.float32)
    scale = _per_axis(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    zp = _per_axis(np.asarray(0 if zero_point is None else zero_point), x.ndim, axis).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # huge values saturate below
        y = np.divide(x, scale, dtype=np.float32)
    np.rint(y, out=y)  # numpy rounds half to even, as the spec requires
    # Clamp before adding the zero point (as onnxruntime's MLAS kernel does; equivalent because
    # the bounds are integers), then shift.
    y = np.clip(y, qrange.qmin - zp, qrange.qmax - zp)
    y += zp
    if np.isnan(y).any():
        y = np.where(np.isnan(y), zp, y)
    return y.astype(qrange.dtype)


def dequantize(q, scale, zero_point=None, axis: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32 (int32 for the difference)."""
    q = np.asarray(q)
    scale = _per_axis(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    zp = _per_axis(np.asarray(0 if zero_point is None else zero_point), q.ndim, axis)
    diff = q.astype(np.int64) - zp.astype(np.int64)
    return diff.astype(np.float32) * scale


# --------------------------------------------------------------------------- weights and biases
# Candidate clipping ratios (threshold / max|w|) of the "mse" weight search: a coarse grid, then
# a fine grid around each channel's best coarse ratio.
_WEIGHT_COARSE_RATIOS = np.linspace(0.2, 1.0, 33)
_WEIGHT_FINE_STEPS = 16


def quantize_weight(w: np.ndarray, axis: int | None = 0, *, bits: int = 8, method: str = "minmax"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric narrow-range int8 weights (zero point 0): ``(q int8, scale float32[C] or 0-d)``.

    The grid is [-127, 127] for 8 bits ([-63, 63] for 7). Scales are per channel along ``axis``
    (None = one per tensor). ``method``: ``minmax`` uses max|w| per channel; ``mse`` searches per
    channel the clipping threshold that minimises ``sum((dequantize(quantize(w)) - w)^2)``
    (vectorised over channels: a coarse grid of clip ratios, then a finer one around the best).
    """
    if method not in ("minmax", "mse"):
        raise UserInputError(f"unknown weight quantization method '{method}'.", "use minmax or mse.")
    qrange = quant_range("int8", bits=bits, narrow=True)
    w = np.asarray(w, dtype=np.float32)
    if axis is None or w.ndim == 0:
        axis_n, rows = None, w.reshape(1, -1)
    else:
        axis_n = _normalize_axis(axis, w.ndim)
        rows = np.moveaxis(w, axis_n, 0).reshape(w.shape[axis_n], -1)
    magnitude = np.abs(rows)
    amax = magnitude.max(axis=1) if magnitude.size else np.zeros(rows.shape[0], np.float32)
    threshold = amax.astype(np.float64)
    if method == "mse" and magnitude.size:
        threshold = amax * _best_clip_ratio(magnitude, amax, qrange.qmax)
    scale, _ = scale_zero_point(-threshold, threshold, qrange, symmetric=True)
    if axis_n is None:
        scale = scale.reshape(())
        return quantize(w, scale, None, qrange), scale
    return quantize(w, scale, None, qrange, axis_n), scale


def _best_clip_ratio(magnitude: np.ndarray, amax: np.ndarray, qmax: int) -> np.ndarray:
    """Per row of ``magnitude`` (|w|, channels x values), the ratio threshold/max that minimises the
    squared quantize→dequantize error on the symmetric grid [-qmax, qmax]."""
    amax = amax.astype(np.float32)
    coarse = _WEIGHT_COARSE_RATIOS.astype(np.float32)
    errors = np.stack([_clip_errors(magnitude, amax * r, qmax) for r in coarse], axis=1)
    best = coarse[np.argmin(errors, axis=1)]
    half_step = float(coarse[1] - coarse[0])
    offsets = np.linspace(-half_step, half_step, _WEIGHT_FINE_STEPS + 1).astype(np.float32)
    candidates = np.clip(best[:, None] + offsets[None, :], coarse[0], 1.0)  # per channel
    fine = np.stack([_clip_errors(magnitude, amax * candidates[:, k], qmax) for k in range(candidates.shape[1])], axis=1)
    fine = np.concatenate([fine, errors.min(axis=1, keepdims=True)], axis=1)
    candidates = np.concatenate([candidates, best[:, None]], axis=1)
    return candidates[np.arange(len(amax)), np.argmin(fine, axis=1)].astype(np.float64)


def _clip_errors(magnitude: np.ndarray, threshold: np.ndarray, qmax: int, chunk: int = 1 << 18) -> np.ndarray:
    """Per row: squared error of quantizing |w| with step threshold/qmax, saturating at qmax."""
    step = np.where(threshold > 1e-30, threshold / qmax, 1.0).astype(np.float32)[:, None]  # no 1/denormal
    inverse = (1.0 / step).astype(np.float32)
    out = np.empty(magnitude.shape[0], np.float64)
    rows_per_chunk = max(1, chunk // max(1, magnitude.shape[1]))  # stay in cache
    for start in range(0, magnitude.shape[0], rows_per_chunk):
        part = magnitude[start:start + rows_per_chunk]
        t = part * inverse[start:start + rows_per_chunk]
        np.rint(t, out=t)
        np.minimum(t, qmax, out=t)
        t *= step[start:start + rows_per_chunk]
        t -= part
        out[start:start + rows_per_chunk] = np.einsum("ij,ij->i", t, t, dtype=np.float64)
    return out


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale ``input_scale * weight_scale`` (per channel) and zero point 0.

    This is the bias layout onnxruntime's QLinearConv and TensorRT expect: the integer
    accumulator of a quantized Conv/Gemm is in exactly that scale. Values saturate to int32.
    Returns ``(q int32, scale float32)``.
    """
    weight_scale = np.asarray(weight_scale, dtype=np.float32)
    scale = (np.float32(input_scale) * weight_scale).astype(np.float32)
    scale = np.where(scale > 0, np.maximum(scale, _F32_TINY), 1.0).astype(np.float32)
    bias = np.asarray(bias, dtype=np.float64)
    info = np.iinfo(np.int32)
    q = np.clip(np.rint(bias / scale.astype(np.float64)), info.min, info.max).astype(np.int32)
    return q, scale


# --------------------------------------------------------------------------- streaming histogram
class StreamingHistogram:
    """One tensor's value distribution, collected in one sweep with bounded memory.

    Counts live in ``2 * bins`` equal bins over [-R, R] (``bins`` per sign, so post-ReLU data
    keeps full resolution). R is a power of two larger than every value seen; when new values
    exceed it, R doubles and adjacent bin pairs merge, so the counts stay exactly those of
    ``np.histogram(all_values, 2 * bins, range=(-R, R))`` (for power-of-two ``bins`` the bin
    edges are exact binary fractions). Exact ``min``, ``max``, ``mean``, ``count`` and the
    number of exact zeros are kept too. Non-finite values (inf/nan, e.g. attention masks) are
    counted in ``nonfinite`` and left out of everything else.
    """

    _CHUNK = 1 << 20  # values per pass: bounds the temporaries of add()

    def __init__(self, bins: int = 2048):
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even number >= 2, got {bins}")
        self.bins = int(bins)
        self.counts = np.zeros(2 * self.bins, dtype=np.int64)
        self.half_range = 0.0  # R; 0 until a value is seen
        self.count = 0
        self.zeros = 0
        self.nonfinite = 0
        self.min = float("inf")
        self.max = float("-inf")
        self._sum = 0.0

    # ----------------------------------------------------------------- collecting
    @property
    def mean(self) -> float:
        return self._sum / self.count if self.count else 0.0

    @property
    def bin_width(self) -> float:
        return self.half_range / self.bins

    @property
    def edges(self) -> np.ndarray:
        """The ``2 * bins + 1`` bin edges over [-R, R]."""
        return np.linspace(-self.half_range, self.half_range, 2 * self.bins + 1)

    def add(self, values: np.ndarray) -> None:
        flat = np.asarray(values).reshape(-1)
        if flat.dtype.kind != "f" or flat.dtype.itemsize < 4:
            flat = flat.astype(np.float32)
        for start in range(0, flat.size, self._CHUNK):
            self._add_chunk(flat[start:start + self._CHUNK])

    def _add_chunk(self, chunk: np.ndarray) -> None:
        if chunk.size == 0:
            return
        low, high = chunk.min(), chunk.max()
        if not (np.isfinite(low) and np.isfinite(high)):  # nan propagates through min/max
            finite = chunk[np.isfinite(chunk)]
            self.nonfinite += chunk.size - finite.size
            chunk = finite
            if chunk.size == 0:
                return
            low, high = chunk.min(), chunk.max()
        self.min = min(self.min, float(low))
        self.max = max(self.max, float(high))
        self.count += chunk.size
        self._sum += float(np.sum(chunk, dtype=np.float64))
        self.zeros += chunk.size - int(np.count_nonzero(chunk))
        self._cover(max(-float(low), float(high)))
        # Bin i of [-R, R] holds [-R + i*w, -R + (i+1)*w): index = floor(x / w) + bins, with
        # x / w an exact float64 product (w is a power of two for power-of-two bins).
        index = np.multiply(chunk, self.bins / self.half_range, dtype=np.float64)
        np.floor(index, out=index)
        index = index.astype(np.int64)
        index += self.bins
        np.clip(index, 0, 2 * self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=2 * self.bins)

    def _cover(self, magnitude: float) -> None:
        """Grow R (doubling, merging bin pairs) until |x| < R for every |x| <= magnitude."""
        if self.half_range == 0.0:
            # Smallest power of two above the magnitude; all-zero data starts at float32's tiny.
            self.half_range = float(np.ldexp(1.0, np.frexp(magnitude)[1])) if magnitude > 0 else _F32_TINY
            return
        doublings = 0
        while self.half_range * 2.0 ** doublings <= magnitude:
            doublings += 1
        self._double(doublings)

    def _double(self, times: int) -> None:
        # Doubling R turns old bin pair (2m, 2m+1) into new bin bins/2 + m: the old edges are a
        # subset of the new ones, so no count moves across a bin edge. After log2(2*bins)
        # doublings everything sits in the two central bins and further merges change nothing.
        n = 2 * self.bins
        for _ in range(min(times, n.bit_length())):
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros(n, dtype=np.int64)
            self.counts[n // 4:n // 4 + n // 2] = merged
        self.half_range *= 2.0 ** times

    def merge(self, other: "StreamingHistogram") -> None:
        """Add another histogram's data (e.g. from a worker process); counts stay exact."""
        if other.bins != self.bins:
            raise ValueError("histograms with different bin counts cannot be merged")
        if other.count == 0:
            self.nonfinite += other.nonfinite
            return
        other_counts, other_range = other.counts, other.half_range
        if self.count == 0:
            self.counts, self.half_range = other_counts.copy(), other_range
        else:
            if other_range > self.half_range:
                self._double(int(round(np.log2(other_range / self.half_range))))
            elif other_range < self.half_range:
                copy = StreamingHistogram(self.bins)
                copy.counts, copy.half_range = other_counts.copy(), other_range
                copy._double(int(round(np.log2(self.half_range / other_range))))
                other_counts = copy.counts
            self.counts = self.counts + other_counts
        self.count += other.count
        self.zeros += other.zeros
        self.nonfinite += other.nonfinite
        self._sum += other._sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    # ----------------------------------------------------------------- choosing a range
    def range(self, method: str, qrange: QuantRange, *, symmetric: bool, percentile: float = 99.99
              ) -> tuple[float, float]:
        """The (lo, hi) to quantize this tensor with, chosen by ``method``.

        * ``minmax``: the exact min and max.
        * ``percentile``: asymmetric lo/hi at the (100-p)th / p-th percentiles; symmetric:
          the p-th percentile of |x|.
        * ``entropy``: TensorRT's KL calibration: the threshold whose clipped and re-quantized
          distribution (``qrange``'s levels over [0, t]) is closest in KL divergence to the
          observed one. On |x| when symmetric or when the data has both signs; on [0, t] for
          asymmetric non-negative (post-ReLU) data.
        * ``mse``: the clipping range minimising the expected squared quantize→dequantize error
          under the histogram (rounding ≈ step²/12 per in-range value, values closer to 0 than
          half a step round to the exact 0; plus the clipping error beyond the range).

        Symmetric results are (-t, t) clipped to the data, so they keep the data's sign
        (scale_zero_point gives the same symmetric scale either way).
        """
        if method not in CALIBRATION_METHODS:
            raise UserInputError(f"unknown calibration method '{method}'.", f"use one of: {', '.join(CALIBRATION_METHODS)}.")
        if not 0.0 < percentile <= 100.0:
            raise UserInputError(f"percentile {percentile} is outside (0, 100].", "use e.g. 99.99.")
        if self.count == 0:
            return 0.0, 0.0
        if method == "minmax":
            return self.min, self.max
        nonnegative = self.min >= 0.0
        if method == "percentile":
            if symmetric:
                return self._symmetric(_histogram_quantile(self._magnitude_counts(), self.bin_width, percentile / 100.0))
            lo = _histogram_quantile(self.counts, self.bin_width, 1.0 - percentile / 100.0) - self.half_range
            hi = _histogram_quantile(self.counts, self.bin_width, percentile / 100.0) - self.half_range
            return max(self.min, min(lo, self.max)), min(self.max, max(hi, self.min))
        if method == "entropy":
            if not symmetric and nonnegative:
                levels = qrange.levels  # the whole grid covers [0, t]
                t = _kl_threshold(self.counts[self.bins:], self.bin_width, levels)
                return self.min, min(self.max, t)
            levels = qrange.levels // 2  # one sign's half of the grid covers [0, t]
            return self._symmetric(_kl_threshold(self._magnitude_counts(), self.bin_width, levels))
        # mse
        if symmetric:
            t = _mse_threshold(self._magnitude_counts(), self.zeros, self.bin_width, (qrange.qmax - qrange.qmin) / 2.0)
            return self._symmetric(t)
        if nonnegative:
            t = _mse_threshold(self.counts[self.bins:], self.zeros, self.bin_width, float(qrange.qmax - qrange.qmin))
            return self.min, min(self.max, t)
        lo, hi = _mse_asymmetric(self.counts, self.zeros, self.bin_width, float(qrange.qmax - qrange.qmin))
        return max(self.min, lo), min(self.max, hi)

    def _magnitude_counts(self) -> np.ndarray:
        """Counts of |x| over [0, R] (``bins`` bins): the positive half plus the mirrored negative half."""
        return self.counts[self.bins:] + self.counts[:self.bins][::-1]

    def _symmetric(self, t: float) -> tuple[float, float]:
        t = min(t, max(-self.min, self.max))
        return max(self.min, -t), min(self.max, t)


def _histogram_quantile(counts: np.ndarray, width: float, q: float) -> float:
    """The q-quantile of a histogram whose bins start at 0 with ``width``, interpolating linearly
    inside the bin where the cumulative count crosses ``q * total``."""
    cumulative = np.cumsum(counts)
    target = q * cumulative[-1]
    i = int(np.searchsorted(cumulative, target, side="left"))
    i = min(i, len(counts) - 1)
    before = cumulative[i - 1] if i > 0 else 0
    inside = counts[i]
    fraction = (target - before) / inside if inside > 0 else 1.0
    return (i + min(max(fraction, 0.0), 1.0)) * width


def _kl_threshold(counts: np.ndarray, width: float, levels: int) -> float:
    """TensorRT's entropy calibration (Migacz, GTC 2017) on a one-sided histogram over [0, R].

    For each candidate i (bins kept, i >= levels), the reference P is counts[:i] with every
    count beyond (the outliers) added to its last bin; the candidate Q quantizes counts[:i]
    into ``levels`` groups of i // levels bins (the last group takes the remainder) and spreads
    each group's count evenly over the group's bins where P is non-zero. The threshold is the
    upper edge of the i that minimises KL(P || Q). Vectorised over all candidates with prefix
    sums: KL = (Σ P log P − Σ_groups P_g log(Q_g / n_g)) / |P| − log |P| + log |Q|, where every
    group but the last depends only on i // levels, so those sums are shared between candidates.
    """
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return 0.0
    used = int(nonzero[-1]) + 1
    if used <= levels:
        return used * width  # every bin fits the grid: nothing worth clipping
    h = counts[:used].astype(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(h)])
    cum_hlogh = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    cum_nonzero = np.concatenate([[0], np.cumsum(h > 0)]).astype(np.float64)
    total = cum[used]

    kept = np.arange(levels, used + 1)  # candidate bin counts i
    tail = total - cum[kept]
    sum_plogp = cum_hlogh[kept - 1] + _xlogx(h[kept - 1] + tail)

    # Groups 0 .. levels-2 hold `width_bins` bins each; P equals the histogram there.
    width_bins = np.arange(1, used // levels + 1)
    start = np.arange(levels - 1)[None, :] * width_bins[:, None]
    stop = start + width_bins[:, None]
    mass = cum[stop] - cum[start]
    with np.errstate(divide="ignore", invalid="ignore"):
        body = np.where(mass > 0, mass * np.log(mass / (cum_nonzero[stop] - cum_nonzero[start])), 0.0).sum(axis=1)
    per_group = kept // levels
    # The last group runs to i; P's last bin also holds the outliers.
    last_start = (levels - 1) * per_group
    last_mass = cum[kept] - cum[last_start]
    last_nonzero = cum_nonzero[kept] - cum_nonzero[last_start] + ((h[kept - 1] == 0) & (tail > 0))
    last_p = last_mass + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        last = np.where(last_p > 0, last_p * np.log(last_mass / last_nonzero), 0.0)  # -inf: Q empty where P is not
        divergence = (sum_plogp - body[per_group - 1] - last) / total - np.log(total) + np.log(cum[kept])
    divergence = np.where(np.isfinite(divergence), divergence, np.inf)
    return int(kept[np.argmin(divergence)]) * width


def _xlogx(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def _mse_threshold(counts: np.ndarray, zeros: int, width: float, steps: float) -> float:
    """The threshold t (a bin edge) minimising the expected squared error of quantizing the
    one-sided histogram over [0, R] with step ``t / steps`` and saturation at t.

    Error model per value x (bin centre c, values spread evenly in the bin, ``w²/12``):
    beyond t: (c - t)² + w²/12 (clipping); below half a step: c² + w²/12 (rounds to the exact 0;
    exact zeros cost nothing); otherwise step²/12 (uniform rounding error).
    """
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return 0.0
    used = int(nonzero[-1]) + 1
    h = counts[:used].astype(np.float64)
    centre = (np.arange(used) + 0.5) * width
    spread = width * width / 12.0
    rounding = h.copy()
    rounding[0] -= zeros  # exact zeros: no rounding error
    cum0 = np.concatenate([[0.0], np.cumsum(h)])
    cum1 = np.concatenate([[0.0], np.cumsum(h * centre)])
    cum2 = np.concatenate([[0.0], np.cumsum(h * (centre * centre + spread))])
    cum_round = np.concatenate([[0.0], np.cumsum(rounding)])
    cum_round_sq = np.concatenate([[0.0], np.cumsum(rounding * (centre * centre + spread))])

    kept = np.arange(1, used + 1)
    t = kept * width
    step = t / steps
    # beyond t: sum h((c - t)² + w²/12) = S2 - 2 t S1 + t² S0 over bins >= kept
    n_out = cum0[used] - cum0[kept]
    clip = (cum2[used] - cum2[kept]) - 2 * t * (cum1[used] - cum1[kept]) + t * t * n_out
    # bins whose centre is within half a step of 0 round to 0
    near = np.clip(np.ceil(step / 2 / width - 0.5), 0, kept).astype(np.int64)
    rounding_error = cum_round_sq[near] + (cum_round[kept] - cum_round[near]) * step * step / 12.0
    return float(t[np.argmin(clip + rounding_error)])


def _mse_asymmetric(counts: np.ndarray, zeros: int, width: float, steps: float, grid: int = 160
                    ) -> tuple[float, float]:
    """(lo, hi) minimising the expected squared error (model of :func:`_mse_threshold`) on the
    signed histogram over [-R, R], searching each end on a grid of bin edges (dense near 0 and
    evenly spaced) between 0 and the data's extent on that side."""
    nonzero = np.flatnonzero(counts)
    n = len(counts)
    half = n // 2
    h = counts.astype(np.float64)
    centre = (np.arange(n) - half + 0.5) * width
    spread = width * width / 12.0
    rounding = h.copy()
    rounding[half] -= zeros
    cum0 = np.concatenate([[0.0], np.cumsum(h)])
    cum1 = np.concatenate([[0.0], np.cumsum(h * centre)])
    cum2 = np.concatenate([[0.0], np.cumsum(h * (centre * centre + spread))])
    cum_round = np.concatenate([[0.0], np.cumsum(rounding)])
    cum_round_sq = np.concatenate([[0.0], np.cumsum(rounding * (centre * centre + spread))])

    def candidates(extent: int) -> np.ndarray:  # bins kept on one side, 1..extent
        if extent <= 0:
            return np.array([0])
        kept = np.sort(np.concatenate([np.rint(np.geomspace(1, extent, grid // 2)),
                                       np.rint(np.linspace(1, extent, grid // 2))]).astype(np.int64))
        return kept[np.concatenate([[True], kept[1:] != kept[:-1]])]  # (np.unique costs 15 ms on first use)

    neg = candidates(half - int(nonzero[0]))  # bins kept below 0
    pos = candidates(int(nonzero[-1]) + 1 - half)  # bins kept above 0
    a = neg[:, None]  # lo = -a * width
    b = pos[None, :]  # hi = b * width
    low_edge, high_edge = half - a, half + b  # first kept bin, first bin beyond
    lo, hi = -a * width, b * width
    step = (hi - lo) / steps
    clip_low = cum2[low_edge] - 2 * lo * cum1[low_edge] + lo * lo * cum0[low_edge]
    n_high = cum0[n] - cum0[high_edge]
    clip_high = (cum2[n] - cum2[high_edge]) - 2 * hi * (cum1[n] - cum1[high_edge]) + hi * hi * n_high
    reach = np.ceil(step / 2 / width - 0.5).astype(np.int64)  # bins each side of 0 that round to 0
    near_lo = np.maximum(half - reach, low_edge)
    near_hi = np.minimum(half + reach, high_edge)
    near_lo = np.minimum(near_lo, near_hi)
    near_sq = cum_round_sq[near_hi] - cum_round_sq[near_lo]
    in_range = cum_round[high_edge] - cum_round[low_edge]
    near_count = cum_round[near_hi] - cum_round[near_lo]
    error = clip_low + clip_high + near_sq + (in_range - near_count) * step * step / 12.0
    i, j = np.unravel_index(int(np.argmin(error)), error.shape)
    return float(lo[i, 0]), float(hi[0, j])
