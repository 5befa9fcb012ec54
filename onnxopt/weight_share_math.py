"""Weight sharing math (numpy; no graph code): 1-D k-means codebooks, index packing, linear grids.

Deep Compression (Han et al. 2016, §3) replaces a layer's weights by 2^b shared values: a
1-D k-means over the weights, centroids initialised *linearly* (evenly spaced between the
smallest and the largest weight, §3.1: it keeps the rare large weights, which matter most),
and every weight stored as the b-bit index of its centroid.

* :class:`WeightDistribution` prepares a weight once (sorted values, or a fine histogram for
  huge rows, as prefix sums) so that clustering it at any number of bits costs
  O(iterations · 2^b · log n) and the error of a clustering is known without touching the
  weights again. One codebook per layer, or one per output channel (``axis``).
* :class:`ScaledDistribution`: one codebook shared by channels that are each divided by their
  own scale (max |w| by default), stored as indices + 2^b values + one scale per channel. A
  folded BatchNorm leaves output channels that differ in scale by orders of magnitude: one
  plain codebook spends its centroids on the large channels and rounds the small ones to ~0,
  per-channel codebooks cost 2^b values per channel. Dividing by the scale before the k-means
  and weighting each element by scale² keeps the objective the real weight error
  (Σ m·s²·(w/s − c)² = Σ m·(w − s·c)²). Not exact even when 2^b ≥ the distinct values:
  normalised values of different channels rarely coincide.
* Data-aware clustering (``importance``): for y = W·x, a weight error ΔW[t, c] moves output t
  by ΔW[t, c]·x_c, so its expected squared effect is ΔW[t, c]²·E[x_c²] (the diagonal of the
  input Gram matrix). Weighting each weight's squared error by its input channel's mean
  square activation in the k-means is the Hessian-weighted k-means of Choi et al. 2017
  ("Towards the limit of network quantization", §4) with the layer-wise Hessian of the
  output error.
* :func:`pack_uint4` packs 4-bit indices two per byte, first element in the low nibble (the
  ONNX IR spec's layout for INT4/UINT4 tensors).
* :func:`linear_grid` is the uniform grid of ``storage=dequantize`` (not k-means centroids).

Why not scikit-learn's KMeans: it gives the same Lloyd fixed point from the same
initialisation (tests/test_weight_share_math.py checks that), but per call it costs ~7-12 ms
for one channel of 4608 weights; per-channel codebooks of a ResNet-50 are 26 000 fits per
bit width. In 1-D the clusters of sorted points are contiguous runs, so one Lloyd step is a
binary search of the 2^b - 1 midpoints in the sorted points plus prefix-sum differences, for
every channel at once (Wu 1991, "Optimal quantization by matrix searching", uses the same
prefix sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserInputError

MAX_BITS = 8  # indices are stored as (packed) uint8
# Points (sorted values or histogram bins) kept over all rows of one weight: bounds the memory
# of a prepared weight (four float64 arrays of this many entries) whatever its size.
POINT_BUDGET = 1 << 21
MIN_BINS = 256  # a histogram row has at least this many bins ...
MAX_BINS = 1 << 16  # ... and at most this many
_PIECE = 1 << 22  # elements handled at once when streaming over a huge row


def check_bits(bits: int, low: int = 1, what: str = "bits") -> int:
    if not isinstance(bits, (int, np.integer)) or not low <= int(bits) <= MAX_BITS:
        raise UserInputError(f"{what}={bits} is out of range.", f"give an integer from {low} to {MAX_BITS}.")
    return int(bits)


# --------------------------------------------------------------------------- results
@dataclass
class SharedWeight:
    """A weight as codebooks + indices: ``codebooks[row][indices]`` reproduces it.

    ``axis`` is the weight axis with one codebook per index (None: one codebook for the whole
    tensor, ``codebooks`` of shape (1, K)).
    """

    codebooks: np.ndarray  # (rows, 2**bits), the weight's dtype, ascending per row
    indices: np.ndarray  # uint8, the weight's shape
    axis: int | None

    @property
    def bits(self) -> int:
        return int(self.codebooks.shape[1]).bit_length() - 1

    def expand(self) -> np.ndarray:
        """The weight the codebooks and indices encode (what Cast → Gather computes)."""
        if self.axis is None:
            return self.codebooks[0][self.indices]
        shape = [1] * self.indices.ndim
        shape[self.axis] = -1
        offsets = (np.arange(self.codebooks.shape[0]) * self.codebooks.shape[1]).reshape(shape)
        return self.codebooks.reshape(-1)[self.indices.astype(np.int64) + offsets]


@dataclass
class ScaledWeight:
    """A weight as one codebook, indices and a scale per channel:
    ``codebook[0][indices] * scales`` (scales broadcast along ``axis``) reproduces it."""

    codebook: np.ndarray  # (1, 2**bits), the weight's dtype, ascending
    indices: np.ndarray  # uint8, the weight's shape
    scales: np.ndarray  # (channels,), the weight's dtype, positive
    axis: int

    @property
    def bits(self) -> int:
        return int(self.codebook.shape[1]).bit_length() - 1

    def expand(self) -> np.ndarray:
        """The weight the stored form encodes (what Cast → Gather → Mul computes)."""
        return self.codebook[0][self.indices] * _along(self.scales, self.axis, self.indices.ndim)


@dataclass
class GridWeight:
    """A weight on a uniform grid: ``(q - zero_point) * scale`` (ONNX DequantizeLinear)."""

    q: np.ndarray  # int8 (symmetric) or uint8 (asymmetric), values within ``bits`` bits
    scale: np.ndarray  # float32, (rows,) per channel or 0-d
    zero_point: np.ndarray  # q's dtype, like scale
    axis: int | None
    bits: int

    def expand(self) -> np.ndarray:
        from .quant_math import dequantize

        return dequantize(self.q, self.scale, self.zero_point, self.axis)


# --------------------------------------------------------------------------- clustering
class WeightDistribution:
    """A weight prepared for 1-D k-means at any bit width, per tensor or per channel.

    ``axis``: one codebook per index along this axis (None: one for the tensor).
    ``importance``: a non-negative weight per element (broadcastable to the weight's shape;
    None: all 1): each element's squared error counts that much (data-aware clustering).

    Each codebook row is summarised by sorted *points* with a mass, a mass-weighted sum and
    sum of squares, as prefix sums: the row's own values when the row is small, else a
    histogram of ``bins`` bins (each bin's point is the weighted mean of its values, so the
    histogram loses only the assignment of values near a cluster boundary).
    """

    def __init__(self, weight: np.ndarray, axis: int | None = None, importance: np.ndarray | None = None):
        weight = np.asarray(weight)
        if weight.dtype.kind != "f":
            raise ValueError(f"weight sharing needs a float weight, got {weight.dtype}")
        if weight.size == 0:
            raise ValueError("weight sharing needs a non-empty weight")
        if not np.all(np.isfinite(weight)):
            raise ValueError("weight holds NaN or infinity")
        if axis is not None:
            axis = int(axis) % weight.ndim
        self.weight, self.axis = weight, axis
        self.importance = None if importance is None else np.asarray(importance, np.float64)
        if self.importance is not None:
            np.broadcast_shapes(self.importance.shape, weight.shape)  # raises when it does not fit
            if np.any(self.importance < 0) or not np.all(np.isfinite(self.importance)):
                raise ValueError("importance must be finite and non-negative")
        self.rows = 1 if axis is None else weight.shape[axis]
        self.row_size = weight.size // self.rows
        self.bins = int(np.clip(POINT_BUDGET // self.rows, MIN_BINS, MAX_BINS))
        if self.row_size <= self.bins:
            self._prepare_sorted()
        else:
            self._prepare_histograms()

    # ------------------------------------------------------------------ preparation
    def _matrix(self, array: np.ndarray) -> np.ndarray:
        """``array`` (the weight's shape) as (rows, row_size), codebook rows first."""
        if self.axis is None:
            return array.reshape(1, -1)
        return np.moveaxis(array, self.axis, 0).reshape(self.rows, -1)

    def _row(self, array: np.ndarray, r: int) -> np.ndarray:
        # A view (np.take would copy, and copies a whole broadcast importance array first).
        return array if self.axis is None else np.moveaxis(array, self.axis, 0)[r]

    def _row_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        if self.axis is None:
            return np.array([self.weight.min()], np.float64), np.array([self.weight.max()], np.float64)
        others = tuple(a for a in range(self.weight.ndim) if a != self.axis)
        return self.weight.min(axis=others).astype(np.float64), self.weight.max(axis=others).astype(np.float64)

    def _importance_full(self) -> np.ndarray | None:
        return None if self.importance is None else np.broadcast_to(self.importance, self.weight.shape)

    def _prepare_sorted(self) -> None:
        values = self._matrix(self.weight).astype(np.float64)
        if self.importance is None:
            points = np.sort(values, axis=1)
            mass = np.ones_like(points)
        else:
            order = np.argsort(values, axis=1, kind="stable")
            points = np.take_along_axis(values, order, axis=1)
            mass = np.take_along_axis(self._matrix(self._importance_full()).astype(np.float64), order, axis=1)
        self._set_points(points, mass, mass * points, mass * points * points)
        self.low, self.high = points[:, 0].copy(), points[:, -1].copy()
        # Rows with at most 2^MAX_BITS distinct values: their codebook can hold them exactly.
        new_value = np.ones(points.shape, bool)
        new_value[:, 1:] = points[:, 1:] != points[:, :-1]
        counts = new_value.sum(axis=1)
        self.distinct = {int(r): points[r][new_value[r]] for r in np.flatnonzero(counts <= 1 << MAX_BITS)}

    def _prepare_histograms(self) -> None:
        bins, rows = self.bins, self.rows
        low, high = self._row_ranges()
        mass, sums, squares = (np.zeros((rows, bins)) for _ in range(3))
        counts = np.zeros((rows, bins), np.int64)
        importance = self._importance_full()
        for r in range(rows):
            span = high[r] - low[r]
            scale = bins / span if span > 0 else 0.0
            for values, weights in self._pieces(r, importance):
                values = values.astype(np.float64)
                index = np.minimum(((values - low[r]) * scale).astype(np.int64), bins - 1)
                w = np.ones_like(values) if weights is None else weights.astype(np.float64)
                counts[r] += np.bincount(index, minlength=bins)
                mass[r] += np.bincount(index, weights=w, minlength=bins)
                sums[r] += np.bincount(index, weights=w * values, minlength=bins)
                squares[r] += np.bincount(index, weights=w * values * values, minlength=bins)
        # A bin's point: the weighted mean of its values; bins without mass keep their centre
        # (it lies inside the bin, so the points stay sorted).
        width = (high - low)[:, None] / bins
        centres = low[:, None] + (np.arange(bins)[None, :] + 0.5) * width
        points = np.where(mass > 0, sums / np.where(mass > 0, mass, 1.0), centres)
        self._set_points(points, mass, sums, squares)
        self.low, self.high = low, high
        self.distinct = {}
        for r in np.flatnonzero((counts > 0).sum(axis=1) <= 1 << MAX_BITS):
            values = np.unique(self._row(self.weight, int(r)))  # few values: exact codebooks possible
            if values.size <= 1 << MAX_BITS:
                self.distinct[int(r)] = values.astype(np.float64)

    def _pieces(self, r: int, importance: np.ndarray | None):
        """Row ``r`` (values, importance) in flat pieces of about _PIECE elements."""
        values = self._row(self.weight, r)
        weights = None if importance is None else self._row(importance, r)
        if values.ndim == 0:
            values = values.reshape(1)
            weights = None if weights is None else weights.reshape(1)
        step = max(1, _PIECE // max(1, values[0].size if values.ndim > 1 else 1))
        for start in range(0, values.shape[0], step):
            yield (values[start:start + step].reshape(-1),
                   None if weights is None else np.asarray(weights[start:start + step]).reshape(-1))

    def _set_points(self, points, mass, sums, squares) -> None:
        zero = np.zeros((points.shape[0], 1))
        self.points = points
        # One binary search serves every row at once: each row's points (and later its
        # midpoints) are mapped to [0, 1] and shifted by 2·row, so all rows live in disjoint
        # ranges of one sorted array.
        rows, length = points.shape
        self._low = points[:, :1]
        span = points[:, -1:] - self._low
        self._span = np.where(span > 0, span, 1.0)
        self._offset = 2.0 * np.arange(rows)[:, None]
        self._keys = ((points - self._low) / self._span + self._offset).reshape(-1)
        self._row_start = np.arange(rows)[:, None] * length
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self.cum_mass = np.concatenate([zero, np.cumsum(mass, axis=1)], axis=1)
        self.cum_sum = np.concatenate([zero, np.cumsum(sums, axis=1)], axis=1)
        self.cum_square = np.concatenate([zero, np.cumsum(squares, axis=1)], axis=1)

    # ------------------------------------------------------------------ k-means
    def centroids(self, bits: int, iterations: int = 50) -> np.ndarray:
        """(rows, 2^bits) ascending float64 centroids: weighted 1-D Lloyd from the linear
        initialisation; a row with at most 2^bits distinct values gets exactly those values."""
        key = (check_bits(bits), iterations)
        if key not in self._cache:
            k = 1 << bits
            centroids = self._lloyd(linear_init(self.low, self.high, k), iterations)
            for r, values in self.distinct.items():
                if values.size <= k:
                    centroids[r] = np.concatenate([values, np.full(k - values.size, values[-1])])
            self._cache[key] = centroids
        return self._cache[key].copy()

    def _edges(self, centroids: np.ndarray) -> np.ndarray:
        """(rows, K+1) point positions where each cluster starts: a point goes to the nearest
        centroid, ties to the lower one (the same rule as :func:`assign`)."""
        rows, length = self.points.shape
        midpoints = (centroids[:, 1:] + centroids[:, :-1]) / 2.0
        probes = np.clip((midpoints - self._low) / self._span, -0.5, 1.5) + self._offset
        inner = np.searchsorted(self._keys, probes.reshape(-1), side="right").reshape(rows, -1)
        inner = np.clip(inner - self._row_start, 0, length)
        return np.concatenate([np.zeros((rows, 1), np.int64), inner, np.full((rows, 1), length)], axis=1)

    def _cluster_sums(self, edges: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        return np.take_along_axis(prefix, edges[:, 1:], axis=1) - np.take_along_axis(prefix, edges[:, :-1], axis=1)

    def _lloyd(self, centroids: np.ndarray, iterations: int) -> np.ndarray:
        previous = None
        for _ in range(max(0, iterations)):
            edges = self._edges(centroids)
            if previous is not None and np.array_equal(edges, previous):
                break  # assignments unchanged: a Lloyd fixed point
            mass = self._cluster_sums(edges, self.cum_mass)
            sums = self._cluster_sums(edges, self.cum_sum)
            # An empty cluster keeps its centroid (it stays between its neighbours' new means).
            centroids = np.where(mass > 0, sums / np.where(mass > 0, mass, 1.0), centroids)
            previous = edges
        return centroids

    def distortion(self, centroids: np.ndarray) -> float:
        """Weighted squared error of ``centroids`` relative to the weighted energy, Σ m·(w − c)² /
        Σ m·w², from the prefix sums (histogram rows: values near a boundary count for the
        cluster of their bin)."""
        edges = self._edges(centroids)
        mass = self._cluster_sums(edges, self.cum_mass)
        sums = self._cluster_sums(edges, self.cum_sum)
        squares = self._cluster_sums(edges, self.cum_square)
        error = float(np.maximum(squares - 2 * centroids * sums + centroids * centroids * mass, 0.0).sum())
        energy = float(self.cum_square[:, -1].sum())
        return error / energy if energy > 0 else 0.0

    def share(self, bits: int, iterations: int = 50) -> SharedWeight:
        """Cluster at ``bits`` and assign every weight to its nearest centroid."""
        codebooks = self.centroids(bits, iterations).astype(self.weight.dtype)
        return SharedWeight(codebooks, assign(self.weight, codebooks, self.axis), self.axis)


CHANNEL_SCALES = ("max", "rms")


def channel_scales(weight: np.ndarray, axis: int, statistic: str = "max") -> np.ndarray:
    """(channels,) positive scales in the weight's dtype, one per index along ``axis``: the
    largest |w| of the channel (``max``) or its root mean square (``rms``). An all-zero channel
    (or one whose scale rounds to 0 in the dtype) gets 1."""
    weight = np.asarray(weight)
    axis %= weight.ndim
    others = tuple(a for a in range(weight.ndim) if a != axis)
    if statistic == "max":
        scales = np.abs(weight).max(axis=others).astype(np.float64)
    elif statistic == "rms":
        scales = np.sqrt(np.square(weight, dtype=np.float64).mean(axis=others))
    else:
        raise ValueError(f"channel scale statistic {statistic!r}: give one of {', '.join(CHANNEL_SCALES)}")
    scales = scales.astype(weight.dtype)
    return np.where(np.isfinite(scales) & (scales > 0), scales, np.ones((), weight.dtype))


def _along(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """``vector`` reshaped to broadcast along ``axis`` of a rank-``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


class ScaledDistribution:
    """A weight prepared for one k-means codebook over its channel-normalised values.

    Each channel along ``axis`` is divided by its :func:`channel_scales` entry; the normalised
    weight is clustered as one :class:`WeightDistribution` whose importance is
    ``importance × scale²``, so its distortion is the real weight's weighted relative error.
    The same ``centroids`` / ``distortion`` / ``share`` interface as WeightDistribution.
    """

    def __init__(self, weight: np.ndarray, axis: int, importance: np.ndarray | None = None,
                 statistic: str = "max"):
        weight = np.asarray(weight)
        if weight.dtype.kind != "f":
            raise ValueError(f"weight sharing needs a float weight, got {weight.dtype}")
        self.weight, self.axis = weight, int(axis) % weight.ndim
        self.scales = channel_scales(weight, self.axis, statistic)
        # Normalised in at least float32: a float16 weight's quotients would round twice.
        work = np.result_type(weight.dtype, np.float32)
        scales = _along(self.scales.astype(work), self.axis, weight.ndim)
        self.normalized = (weight.astype(work, copy=False) / scales).astype(work, copy=False)
        mass = np.square(scales.astype(np.float64))
        if importance is not None:
            mass = np.asarray(importance, np.float64) * mass
        self.distribution = WeightDistribution(self.normalized, None, mass)

    def centroids(self, bits: int, iterations: int = 50) -> np.ndarray:
        """(1, 2^bits) ascending float64 centroids of the normalised values."""
        return self.distribution.centroids(bits, iterations)

    def distortion(self, centroids: np.ndarray) -> float:
        """Σ m·(w − s·c)² / Σ m·w² of ``centroids`` (m = importance; the prefix sums carry s²)."""
        return self.distribution.distortion(centroids)

    def share(self, bits: int, iterations: int = 50) -> ScaledWeight:
        """Cluster at ``bits``; each weight gets the nearest centroid of its normalised value
        (within a channel the scale is one positive factor, so it is the nearest in real terms)."""
        codebook = self.centroids(bits, iterations).astype(self.weight.dtype)
        return ScaledWeight(codebook, assign(self.normalized, codebook), self.scales, self.axis)


def linear_init(low, high, k: int) -> np.ndarray:
    """(rows, k) centroids evenly spaced from ``low`` to ``high`` (Han et al. 2016, §3.1)."""
    low = np.atleast_1d(np.asarray(low, np.float64))
    high = np.atleast_1d(np.asarray(high, np.float64))
    return low[:, None] + (high - low)[:, None] * np.linspace(0.0, 1.0, k)[None, :]


def assign(weight: np.ndarray, codebooks: np.ndarray, axis: int | None = None) -> np.ndarray:
    """uint8 index of the nearest codebook entry for every weight (ties to the lower index).

    Exact: a weight equal to a codebook entry gets that entry. The comparisons run in the
    weight's own dtype against :func:`_thresholds` (no float64 copy of a 100M-weight layer).
    """
    weight = np.asarray(weight)
    codebooks = np.asarray(codebooks)
    indices = np.empty(weight.shape, np.uint8)
    for r in range(codebooks.shape[0]):
        thresholds = _thresholds(codebooks[r], weight.dtype)
        if axis is None:
            flat_in, flat_out = weight.reshape(-1), indices.reshape(-1)
            for start in range(0, flat_in.size, _PIECE):
                piece = flat_in[start:start + _PIECE]
                flat_out[start:start + _PIECE] = np.searchsorted(thresholds, piece, side="right")
        else:
            row = np.moveaxis(weight, axis, 0)[r]
            np.moveaxis(indices, axis, 0)[r] = np.searchsorted(thresholds, row, side="right")
    return indices


def _thresholds(entries: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """For ascending codebook ``entries``: the smallest value of ``dtype`` that belongs to entry
    j + 1, for each j. A value v goes above midpoint m_j = (e_j + e_{j+1}) / 2 (float64) iff
    v > m_j, iff v ≥ the smallest ``dtype`` value above m_j; so searchsorted(side="right") on
    these thresholds is the nearest-entry index, exactly, compared in ``dtype``."""
    entries = np.asarray(entries, np.float64)
    midpoints = (entries[1:] + entries[:-1]) / 2.0
    rounded = midpoints.astype(dtype)
    above = rounded.astype(np.float64) > midpoints
    return np.where(above, rounded, np.nextafter(rounded, np.array(np.inf, dtype)))


def share_weight(weight: np.ndarray, bits: int, axis: int | None = None, importance: np.ndarray | None = None,
                 iterations: int = 50) -> SharedWeight:
    """One-shot :meth:`WeightDistribution.share` (prepare once instead when trying several bits)."""
    return WeightDistribution(weight, axis, importance).share(bits, iterations)


def weighted_error(weight: np.ndarray, approx: np.ndarray, importance: np.ndarray | None = None) -> float:
    """Σ m·(w − ŵ)² / Σ m·w² (m = importance, broadcast; 1 when None)."""
    w = np.asarray(weight, np.float64)
    d = w - np.asarray(approx, np.float64)
    m = 1.0 if importance is None else np.broadcast_to(np.asarray(importance, np.float64), w.shape)
    energy = float(np.sum(m * w * w))
    return float(np.sum(m * d * d)) / energy if energy > 0 else 0.0


def importance_from_input_energy(weight_shape: tuple[int, ...], energy: np.ndarray, in_axis: int,
                                 out_axis: int | None = None, groups: int = 1) -> np.ndarray:
    """Per-element importance, broadcastable to ``weight_shape``, from the mean square
    activation E[x_c²] of each input channel c of the layer (``energy``).

    ``in_axis`` indexes the input channels within the weight (Conv: 1; ConvTranspose: 0; a
    (in, out) matrix: 0). A grouped Conv (``groups`` > 1) holds C/groups input channels per
    output channel along ``in_axis``: output channel t (along ``out_axis``) of group
    t // (T/groups) reads input channels group·C/groups + c.
    """
    energy = np.asarray(energy, np.float64).reshape(-1)
    ndim = len(weight_shape)
    in_axis %= ndim
    per_group = weight_shape[in_axis]
    if energy.size != per_group * groups:
        raise ValueError(f"{energy.size} input channel energies for a weight with {per_group}×{groups} input channels")
    shape = [1] * ndim
    if groups == 1:
        shape[in_axis] = per_group
        return energy.reshape(shape)
    if out_axis is None:
        raise ValueError("a grouped layer needs out_axis")
    out_axis %= ndim
    outputs = weight_shape[out_axis]
    group_of_output = np.arange(outputs) // max(1, outputs // groups)
    table = energy.reshape(groups, per_group)[group_of_output]  # (outputs, per_group)
    if out_axis > in_axis:
        table = table.T
    shape[out_axis], shape[in_axis] = outputs, per_group
    return table.reshape(shape)


# --------------------------------------------------------------------------- storage
def bit_groups(bits: int) -> tuple[int, int]:
    """(bytes, indices) of the smallest whole-byte group of ``bits``-bit indices: 8/gcd(b, 8)
    indices fill b/gcd(b, 8) bytes (6 bits: 4 indices in 3 bytes; 5 bits: 8 in 5)."""
    common = int(np.gcd(int(bits), 8))
    return bits // common, 8 // common


def pack_bits(indices: np.ndarray, bits: int) -> np.ndarray:
    """(groups, group bytes) uint8: the indices as one little-endian bit stream, index i in
    stream bits [i·b, (i+1)·b), stream bit k in bit k % 8 of byte k // 8. For 4 bits this is
    the ONNX UINT4 layout (element 2i in the low nibble). The last group is padded with 0."""
    bits = check_bits(bits)
    group_bytes, per_group = bit_groups(bits)
    flat = np.asarray(indices, np.uint8).reshape(-1)
    if flat.size and int(flat.max()) >> bits:
        raise ValueError(f"pack_bits takes values below 2^{bits}")
    groups = -(-flat.size // per_group)
    out = np.empty((groups, group_bytes), np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    step = max(1, _PIECE // per_group)  # groups per piece: bounds the bit array's memory
    for first in range(0, groups, step):
        chunk = flat[first * per_group:(first + step) * per_group]
        padded = np.zeros(min(step, groups - first) * per_group, np.uint8)
        padded[:chunk.size] = chunk
        stream = ((padded[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
        out[first:first + step] = np.packbits(stream.reshape(-1), bitorder="little").reshape(-1, group_bytes)
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` indices (uint8)."""
    stream = np.unpackbits(np.asarray(packed, np.uint8).reshape(-1), bitorder="little")
    usable = stream[:stream.size - stream.size % bits].reshape(-1, bits)
    values = (usable.astype(np.uint16) << np.arange(bits, dtype=np.uint16)[None, :]).sum(axis=1)
    return values[:count].astype(np.uint8)


def pack_uint4(indices: np.ndarray) -> np.ndarray:
    """Values 0..15 packed two per byte, element 2i in the low nibble (ONNX IR spec, 4-bit
    integer types; an odd count leaves the last high nibble 0)."""
    return pack_bits(indices, 4).reshape(-1)


def index_bytes(count: int, bits: int, packed: bool = True) -> int:
    """Bytes of ``count`` stored indices: ``bits`` per index in whole groups when ``packed``,
    else one byte each."""
    if not packed or bits >= 8:
        return count
    group_bytes, per_group = bit_groups(bits)
    return -(-count // per_group) * group_bytes


def linear_grid(weight: np.ndarray, bits: int, axis: int | None = None, symmetric: bool = True) -> GridWeight:
    """A uniform grid of 2^bits levels per tensor or per channel (``storage=dequantize``):
    symmetric int grid [-(2^(b-1) - 1), 2^(b-1) - 1] with zero point 0, or asymmetric uint
    [0, 2^b - 1] over [min, max] (0 always representable). Not k-means: equal spacing."""
    from .quant_math import quant_range, quantize, scale_zero_point

    bits = check_bits(bits, 2)
    w = np.asarray(weight, np.float32)
    qrange = quant_range("int8", bits=bits, narrow=True) if symmetric else quant_range("uint8", bits=bits)
    if axis is None:
        low, high = np.float64(w.min()), np.float64(w.max())
    else:
        axis %= w.ndim
        others = tuple(a for a in range(w.ndim) if a != axis)
        low, high = w.min(axis=others).astype(np.float64), w.max(axis=others).astype(np.float64)
    scale, zero_point = scale_zero_point(low, high, qrange, symmetric=symmetric)
    q = quantize(w, scale, zero_point, qrange, axis)
    return GridWeight(q, scale, zero_point, axis, bits)
