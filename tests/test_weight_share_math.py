"""weight_share_math: 1-D k-means (against scikit-learn), exactness, per-channel and weighted
clustering, bit packing (against ONNX's UINT4 layout), importance maps and the linear grid."""

import ml_dtypes
import numpy as np
import pytest
from onnx import numpy_helper
from sklearn.cluster import KMeans

from onnxopt import weight_share_math as M
from onnxopt.errors import UserInputError


def _sklearn_centroids(values, k, weights=None):
    """scikit-learn's Lloyd from the same linear initialisation, run to convergence."""
    init = M.linear_init(values.min(), values.max(), k)[0][:, None]
    km = KMeans(k, init=init, n_init=1, max_iter=1000, tol=0, algorithm="lloyd")
    km.fit(values.astype(np.float64)[:, None], sample_weight=weights)
    return np.sort(km.cluster_centers_[:, 0])


@pytest.mark.parametrize("weighted", [False, True])
def test_lloyd_reaches_the_fixed_point_scikit_learn_reaches(weighted):
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, 3000).astype(np.float32)  # no empty clusters: sklearn relocates those
    weights = rng.uniform(0.1, 3.0, values.size) if weighted else None
    ours = M.WeightDistribution(values, None, weights).centroids(4, iterations=1000)[0]
    np.testing.assert_allclose(ours, _sklearn_centroids(values, 16, weights), atol=1e-9)


@pytest.mark.parametrize("shape, axis", [((16, 8, 3, 3), 0), ((16, 8, 3, 3), None), ((700, 600), None),
                                         ((40, 3000), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_few_distinct_values_round_trip_exactly(shape, axis, dtype):
    """2^bits ≥ distinct values: the codebook holds them and every weight comes back bit-exact,
    on small rows (sorted values) and on rows big enough for the histogram path."""
    rng = np.random.default_rng(1)
    levels = rng.normal(size=13).astype(dtype)
    weight = levels[rng.integers(0, levels.size, shape)]
    distribution = M.WeightDistribution(weight, axis)
    if shape == (700, 600):
        assert distribution.row_size > distribution.bins  # the histogram path
    shared = distribution.share(4)
    assert shared.indices.dtype == np.uint8 and shared.codebooks.dtype == dtype
    assert np.array_equal(shared.expand(), weight)
    assert distribution.distortion(distribution.centroids(4)) < 1e-12  # prefix-sum roundoff only


def test_error_falls_as_bits_rise_and_the_estimate_matches_the_assignment():
    rng = np.random.default_rng(2)
    weight = (rng.standard_t(4, size=(32, 16, 3, 3)) * 0.05).astype(np.float32)
    for axis in (None, 0):
        distribution = M.WeightDistribution(weight, axis)
        errors = []
        for bits in range(1, 9):
            shared = distribution.share(bits)
            true = M.weighted_error(weight, shared.expand())
            assert true == pytest.approx(distribution.distortion(distribution.centroids(bits)), rel=1e-3, abs=1e-9)
            errors.append(true)
        assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_per_channel_codebooks_beat_one_per_layer_when_channel_scales_differ():
    rng = np.random.default_rng(3)
    scales = np.geomspace(0.01, 1.0, 24).astype(np.float32)[:, None, None, None]  # as folded BatchNorm leaves them
    weight = (rng.normal(size=(24, 8, 3, 3)) * scales).astype(np.float32)

    def per_channel_error(shared):  # each output channel's relative error, averaged
        delta, w = shared.expand() - weight, weight
        return float(np.mean(np.sum(delta ** 2, axis=(1, 2, 3)) / np.sum(w ** 2, axis=(1, 2, 3))))

    assert per_channel_error(M.share_weight(weight, 4, axis=0)) < 0.2 * per_channel_error(M.share_weight(weight, 4))


def test_weighted_clustering_lowers_the_weighted_error():
    """Data-aware: the small weights reading inputs with 100× the energy (as after a layer that
    normalises its outputs) get the codebook's care; data-free k-means spends it on the big ones."""
    rng = np.random.default_rng(4)
    loud = np.arange(32) < 4
    weight = (rng.normal(size=(64, 32)) * np.where(loud, 0.1, 1.0)).astype(np.float32)  # (out, in)
    energy = np.where(loud, 100.0, 1.0)
    importance = M.importance_from_input_energy(weight.shape, energy, in_axis=1)
    plain = M.share_weight(weight, 3).expand()
    aware = M.share_weight(weight, 3, importance=importance).expand()
    assert M.weighted_error(weight, aware, importance) < 0.8 * M.weighted_error(weight, plain, importance)


def test_assign_is_exact_at_midpoints_and_in_float16():
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float16):
        codebook = np.sort(rng.normal(size=16)).astype(dtype)
        midpoints = (codebook[1:].astype(np.float64) + codebook[:-1]) / 2
        values = np.concatenate([rng.normal(size=5000), midpoints, codebook.astype(np.float64)]).astype(dtype)
        expected = np.searchsorted(midpoints, values.astype(np.float64), side="left")
        assert np.array_equal(M.assign(values, codebook[None]), expected)


def test_histogram_rows_cluster_about_as_well_as_sorted_rows():
    rng = np.random.default_rng(6)
    weight = rng.normal(size=(3, 200_000)).astype(np.float32)
    histogram = M.WeightDistribution(weight, 0)
    assert histogram.row_size > histogram.bins
    sorted_rows = M.WeightDistribution(weight[:, :histogram.bins], 0)  # a sample small enough to sort
    assert sorted_rows.row_size <= sorted_rows.bins
    error = M.weighted_error(weight, histogram.share(6).expand())
    assert error < 1.1 * M.weighted_error(weight[:, :histogram.bins], sorted_rows.share(6).expand())


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 1001])
def test_bit_packing_round_trips_in_whole_groups(bits, count):
    values = np.random.default_rng(bits).integers(0, 1 << bits, count).astype(np.uint8)
    packed = M.pack_bits(values, bits)
    group_bytes, per_group = M.bit_groups(bits)
    assert packed.shape == (-(-count // per_group), group_bytes)
    assert packed.size == M.index_bytes(count, bits) <= count * bits / 8 + group_bytes
    assert np.array_equal(M.unpack_bits(packed, bits, count), values)


def test_four_bit_packing_is_the_onnx_uint4_layout():
    values = np.random.default_rng(7).integers(0, 16, 1001).astype(np.uint8)
    onnx_bytes = numpy_helper.from_array(values.astype(ml_dtypes.uint4), "x").raw_data
    assert M.pack_uint4(values).tobytes() == onnx_bytes
    assert M.index_bytes(1001, 4) == len(onnx_bytes) == 501
    assert M.index_bytes(1001, 4, packed=False) == 1001


def test_importance_maps_follow_each_layer_layout():
    energy = np.arange(1.0, 7.0)  # six input channels
    conv = np.broadcast_to(M.importance_from_input_energy((4, 6, 3, 3), energy, 1), (4, 6, 3, 3))
    assert np.array_equal(conv[2, :, 1, 1], energy)
    # group 2: output channels 0-1 read inputs 0-2, outputs 2-3 read inputs 3-5
    grouped = np.broadcast_to(M.importance_from_input_energy((4, 3, 3, 3), energy, 1, 0, groups=2), (4, 3, 3, 3))
    assert np.array_equal(grouped[1, :, 0, 0], energy[:3]) and np.array_equal(grouped[3, :, 0, 0], energy[3:])
    transposed = np.broadcast_to(M.importance_from_input_energy((6, 5, 3, 3), energy, 0), (6, 5, 3, 3))
    assert np.array_equal(transposed[:, 4, 2, 2], energy)  # ConvTranspose (C_in, C_out, k, k)
    matrix = np.broadcast_to(M.importance_from_input_energy((6, 7), energy, 0), (6, 7))
    assert np.array_equal(matrix[:, 3], energy)  # MatMul (in, out)
    with pytest.raises(ValueError):
        M.importance_from_input_energy((4, 5, 3, 3), energy, 1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_linear_grid_is_uniform_and_within_half_a_step(symmetric):
    rng = np.random.default_rng(8)
    weight = (rng.normal(size=(8, 4, 3, 3)) * np.arange(1, 9)[:, None, None, None]).astype(np.float32)
    grid = M.linear_grid(weight, 4, axis=0, symmetric=symmetric)
    assert grid.q.dtype == (np.int8 if symmetric else np.uint8)
    assert grid.q.min() >= (-7 if symmetric else 0) and grid.q.max() <= (7 if symmetric else 15)
    step = grid.scale.reshape(-1, 1, 1, 1)
    assert np.all(np.abs(grid.expand() - weight) <= step / 2 + 1e-6)
    assert len(np.unique(M.linear_grid(weight, 3, None, symmetric).q)) <= 8


def test_bad_bits_name_the_fix():
    weight = np.ones((4, 4), np.float32)
    for bits in (0, 9):
        with pytest.raises(UserInputError, match="from 1 to 8"):
            M.share_weight(weight, bits)
    with pytest.raises(UserInputError, match="from 2 to 8"):
        M.linear_grid(weight, 1)
    with pytest.raises(ValueError):
        M.WeightDistribution(np.array([1.0, np.nan], np.float32))
    with pytest.raises(ValueError):
        M.WeightDistribution(np.ones((4, 4), np.float32), importance=-np.ones(4))


# ---------------------------------------------------------------------- one codebook over scaled channels
def _spread_weight(shape=(24, 8, 3, 3), axis=0, seed=9, decades=2):
    """Channels along ``axis`` whose scales span ``decades`` decades (as a folded BatchNorm leaves them)."""
    rng = np.random.default_rng(seed)
    scale_shape = [1] * len(shape)
    scale_shape[axis] = -1
    scales = np.geomspace(10.0 ** -decades, 1.0, shape[axis]).reshape(scale_shape)
    return (rng.standard_t(5, size=shape) * scales).astype(np.float32)


def test_channel_scales_max_and_rms_and_zero_channels():
    weight = np.array([[3.0, -4.0], [0.0, 0.0], [1e-3, -2e-3]], np.float32)  # channels on axis 0
    assert np.array_equal(M.channel_scales(weight, 0), np.array([4.0, 1.0, 2e-3], np.float32))
    np.testing.assert_allclose(M.channel_scales(weight, 0, "rms"), [np.sqrt(12.5), 1.0, np.sqrt(2.5e-6)], rtol=1e-6)
    assert np.array_equal(M.channel_scales(weight.T, 1), M.channel_scales(weight, 0))
    assert M.channel_scales(weight.astype(np.float16), 0).dtype == np.float16
    with pytest.raises(ValueError):
        M.channel_scales(weight, 0, "median")


@pytest.mark.parametrize("shape, axis", [((24, 8, 3, 3), 0), ((8, 24, 3, 3), 1), ((40, 30), 1), ((30, 40), 0)])
@pytest.mark.parametrize("weighted", [False, True])
def test_scaled_distortion_is_the_real_weight_error(shape, axis, weighted):
    """The k-means runs on w / s with importance × s², so its distortion must equal the error of
    codebook × scale against the real weight, weighted by the importance alone."""
    weight = _spread_weight(shape, axis)
    importance = np.random.default_rng(10).uniform(0.1, 5.0, shape) if weighted else None
    scaled = M.ScaledDistribution(weight, axis, importance)
    errors = []
    for bits in (2, 4, 6):
        shared = scaled.share(bits)
        assert shared.codebook.shape == (1, 1 << bits) and shared.scales.shape == (shape[axis],)
        true = M.weighted_error(weight, shared.expand(), importance)
        assert true == pytest.approx(scaled.distortion(scaled.centroids(bits)), rel=1e-3, abs=1e-9)
        errors.append(true)
    assert errors[0] > errors[1] > errors[2]


def test_scaled_codebook_keeps_small_channels_where_one_codebook_loses_them():
    weight = _spread_weight()
    others = (1, 2, 3)

    def worst_channel_error(approx):
        return float(np.max(np.sum((approx - weight) ** 2, axis=others) / np.sum(weight ** 2, axis=others)))

    layer = worst_channel_error(M.share_weight(weight, 4).expand())
    scaled = worst_channel_error(M.ScaledDistribution(weight, 0).share(4).expand())
    assert layer > 0.5  # the smallest channels round to (nearly) zero
    assert scaled < 0.05 * layer


def test_scaled_float16_weights_keep_their_dtype_and_stay_close():
    weight = _spread_weight().astype(np.float16)
    shared = M.ScaledDistribution(weight, 0).share(6)
    assert shared.codebook.dtype == shared.scales.dtype == shared.expand().dtype == np.float16
    assert M.weighted_error(weight, shared.expand()) < 0.01
