"""Low-rank decomposition math: factors reproduce the layer (checked by convolving), rank choice, refits."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly
from tensorly.decomposition import parafac, partial_tucker

from models.layers import np_conv2d
from onnxopt import lowrank_math as M
from onnxopt.errors import UserInputError

T, C = 16, 12  # out / in channels of the test kernels


def _kernel(kh=3, kw=3, seed=0):
    return np.random.default_rng(seed).standard_normal((T, C, kh, kw)).astype(np.float32)


def _input(seed=1, size=9):
    return np.random.default_rng(seed).standard_normal((2, C, size, size)).astype(np.float32)


def _conv(x, w, pads=(0, 0, 0, 0), group=1):
    return np_conv2d(x, w, None, 1, pads, 1, group)


def _same_pads(kh, kw):
    return (kh // 2, kw // 2, kh // 2, kw // 2)


def _relative_error(reference, approximation):
    return float(np.linalg.norm(approximation - reference) / np.linalg.norm(reference))


def _tucker_weight(first, core, last):
    return np.einsum("ta,abij,bc->tcij", last[:, :, 0, 0], core, first[:, :, 0, 0])


def _cp_weight(first, vertical, horizontal, last):
    return np.einsum("tk,kc,ki,kj->tcij", last[:, :, 0, 0], first[:, :, 0, 0], vertical[:, 0, :, 0],
                     horizontal[:, 0, 0, :])


def _planted_cp(rank, kh=3, kw=3, seed=3):
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((n, rank)) for n in (T, C, kh, kw)]
    return np.einsum("tk,ck,ik,jk->tcij", *factors).astype(np.float32)


# ------------------------------------------------------------------ full rank: the chain of convs is the layer
@pytest.mark.parametrize("kh, kw", [(3, 3), (3, 5), (1, 1)])
def test_spatial_svd_full_rank_convs_reproduce_layer(kh, kw):
    kernel, x = _kernel(kh, kw), _input()
    vertical, horizontal = M.spatial_svd(kernel, min(C * kh, T * kw))
    assert vertical.dtype == horizontal.dtype == np.float32
    assert vertical.shape == (min(C * kh, T * kw), C, kh, 1) and horizontal.shape == (T, vertical.shape[0], 1, kw)
    reference = _conv(x, kernel, _same_pads(kh, kw))
    # the vertical conv pads H only, the horizontal one W only
    chained = _conv(_conv(x, vertical, (kh // 2, 0, kh // 2, 0)), horizontal, (0, kw // 2, 0, kw // 2))
    np.testing.assert_allclose(chained, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("kh, kw", [(3, 3), (3, 5)])
def test_tucker2_full_rank_convs_reproduce_layer(kh, kw):
    kernel, x = _kernel(kh, kw), _input()
    first, core, last = M.tucker2(kernel, C, T)
    assert (first.shape, core.shape, last.shape) == ((C, C, 1, 1), (T, C, kh, kw), (T, T, 1, 1))
    reference = _conv(x, kernel, _same_pads(kh, kw))
    chained = _conv(_conv(_conv(x, first), core, _same_pads(kh, kw)), last)
    np.testing.assert_allclose(chained, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("kh, kw", [(3, 3), (3, 5)])
def test_cp_of_planted_rank_convs_reproduce_layer(kh, kw):
    rank = 6
    kernel, x = _planted_cp(rank, kh, kw), _input()
    first, vertical, horizontal, last = M.cp(kernel, rank, iterations=200, tol=1e-12)
    assert (first.shape, vertical.shape, horizontal.shape, last.shape) == (
        (rank, C, 1, 1), (rank, 1, kh, 1), (rank, 1, 1, kw), (T, rank, 1, 1))
    reference = _conv(x, kernel, _same_pads(kh, kw))
    z = _conv(x, first)
    z = _conv(z, vertical, (kh // 2, 0, kh // 2, 0), group=rank)  # depthwise
    z = _conv(z, horizontal, (0, kw // 2, 0, kw // 2), group=rank)  # depthwise
    chained = _conv(z, last)
    np.testing.assert_allclose(chained, reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())


def test_svd_factors_full_rank_and_balanced():
    matrix = np.random.default_rng(0).standard_normal((20, 8))
    second, first = M.svd_factors(matrix, 8)
    assert second.shape == (20, 8) and first.shape == (8, 8) and second.dtype == np.float32
    np.testing.assert_allclose(second @ first, matrix, atol=1e-5)
    # balanced: column k of `second` and row k of `first` both carry sqrt(s_k)
    np.testing.assert_allclose(np.linalg.norm(second, axis=0), np.linalg.norm(first, axis=1), rtol=1e-5)
    assert M.svd_factors(matrix, 50)[0].shape == (20, 8)  # capped at min(out, in)


def test_svd_factors_truncation_is_eckart_young_optimal():
    matrix = np.random.default_rng(1).standard_normal((24, 16))
    values = np.linalg.svd(matrix, compute_uv=False)
    for rank in (1, 4, 9):
        second, first = M.svd_factors(matrix, rank)
        error = np.linalg.norm(matrix - second @ first)
        assert error == pytest.approx(np.sqrt(np.sum(values[rank:] ** 2)), rel=1e-5)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_gram_route_for_big_matrices_matches_lapack_svd(monkeypatch, shape):
    """Big weights (VGG-16's FC) take the Gram-matrix route; it must give LAPACK's answer."""
    rng = np.random.default_rng(2)
    matrix = rng.standard_normal(shape) * np.linspace(3, 0.1, shape[1])  # distinct singular values
    lapack = [M.svd_factors(matrix, r) for r in (5, 24)]
    lapack_values = M.singular_values(matrix, "matrix")
    lapack_spatial = M.spatial_svd(_kernel(3, 3), 4)
    monkeypatch.setattr(M, "GRAM_ROUTE_ENTRIES", 0)
    for rank, (second, first) in zip((5, 24), lapack):
        gram_second, gram_first = M.svd_factors(matrix, rank)
        np.testing.assert_allclose(gram_second @ gram_first, second @ first, atol=1e-4)
        np.testing.assert_allclose(gram_second, second, atol=1e-4)  # same signs, same balance
    np.testing.assert_allclose(M.svd_factors(matrix, 24)[0] @ M.svd_factors(matrix, 24)[1], matrix, atol=1e-5)
    np.testing.assert_allclose(M.singular_values(matrix, "matrix"), lapack_values, rtol=1e-5)
    for gram, reference in zip(M.spatial_svd(_kernel(3, 3), 4), lapack_spatial):
        np.testing.assert_allclose(gram, reference, atol=1e-4)


def test_leading_right_vectors_sketch_matches_the_exact_subspace(monkeypatch):
    rng = np.random.default_rng(3)
    # 300 samples of 400 outputs with a decaying spectrum, as layer responses have
    responses = rng.standard_normal((300, 60)) @ (rng.standard_normal((60, 400)) * np.exp(-np.arange(60) / 8)[:, None])
    exact = M.leading_right_vectors(responses, 8)
    monkeypatch.setattr(M, "EXACT_SUBSPACE_SIDE", 100)
    sketched = M.leading_right_vectors(responses, 8)
    assert sketched.shape == (400, 8)
    np.testing.assert_allclose(sketched.T @ sketched, np.eye(8), atol=1e-10)
    # same subspace: the projector difference is tiny, and the vectors agree up to their fixed signs
    assert np.linalg.norm(sketched @ sketched.T - exact @ exact.T) < 1e-3
    np.testing.assert_allclose(sketched, exact, atol=1e-3)


def test_one_by_one_kernel_as_matrix():
    kernel = _kernel(1, 1)
    second, first = M.svd_factors(kernel[:, :, 0, 0], 5)
    values = M.singular_values(kernel, "matrix")
    np.testing.assert_allclose(values, np.linalg.svd(kernel[:, :, 0, 0], compute_uv=False), rtol=1e-5)
    error = np.linalg.norm(kernel[:, :, 0, 0] - second @ first)
    assert error == pytest.approx(np.sqrt(np.sum(values[5:].astype(np.float64) ** 2)), rel=1e-4)


# ------------------------------------------------------------------ truncation
def test_truncation_error_decreases_with_rank():
    kernel = _kernel()
    spatial = [_relative_error(kernel, np.einsum("tkj,kci->tcij", h[:, :, 0, :], v[..., 0]))
               for v, h in (M.spatial_svd(kernel, r) for r in (2, 8, 20, 36))]
    tucker = [_relative_error(kernel, _tucker_weight(*M.tucker2(kernel, r_in, r_out)))
              for r_in, r_out in ((2, 3), (5, 7), (9, 12), (12, 16))]
    cp_errors = [_relative_error(kernel, _cp_weight(*M.cp(kernel, r))) for r in (2, 8, 32, 96)]
    for errors in (spatial, tucker, cp_errors):
        assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert spatial[-1] < 1e-5 and tucker[-1] < 1e-5


@pytest.mark.filterwarnings("ignore:Trying to compute SVD")  # tensorly's svd init at rank > kh
def test_tucker2_and_cp_match_tensorly():
    """Same algorithms as tensorly's partial_tucker / parafac: errors at least as good."""
    kernel = _kernel().astype(np.float64)
    (core, factors), _ = partial_tucker(kernel, [6, 5], modes=[0, 1], n_iter_max=10, init="svd")
    theirs = _relative_error(kernel, tensorly.tenalg.multi_mode_dot(core, factors, modes=[0, 1]))
    ours = _relative_error(kernel, _tucker_weight(*M.tucker2(kernel, 5, 6)))
    assert ours <= theirs + 1e-5

    cp_tensor = parafac(kernel, 10, n_iter_max=25, init="svd", random_state=0)
    theirs = _relative_error(kernel, tensorly.cp_to_tensor(cp_tensor))
    ours = _relative_error(kernel, _cp_weight(*M.cp(kernel, 10)))
    assert ours <= theirs * 1.05


def test_cp_deterministic_for_a_seed_and_balanced():
    kernel = _kernel()
    one, two = M.cp(kernel, 8, seed=7), M.cp(kernel, 8, seed=7)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    other = M.cp(kernel, 8, seed=8)  # rank 8 > kh = kw = 3: the seed fills spatial columns
    assert any(not np.array_equal(a, b) for a, b in zip(one, other))
    # balanced: every factor's column k has the same norm λ_k^(1/4), components sorted by λ
    norms = [np.linalg.norm(f.reshape(f.shape[0], -1), axis=1) for f in one[:3]]
    norms.append(np.linalg.norm(one[3][:, :, 0, 0], axis=0))
    for n in norms[1:]:
        np.testing.assert_allclose(n, norms[0], rtol=1e-4)
    assert np.all(np.diff(norms[0]) <= 1e-6)


# ------------------------------------------------------------------ rank choice
def test_singular_values_modes():
    kernel = _kernel(3, 5)
    assert M.singular_values(kernel, "out").shape == (T,)
    assert M.singular_values(kernel, "in").shape == (C,)
    assert M.singular_values(kernel, "spatial").shape == (min(C * 3, T * 5),)
    np.testing.assert_allclose(M.singular_values(kernel, "out"),
                               np.linalg.svd(kernel.reshape(T, -1), compute_uv=False), rtol=1e-5)
    np.testing.assert_allclose(M.singular_values(kernel, "in"),
                               np.linalg.svd(kernel.transpose(1, 0, 2, 3).reshape(C, -1), compute_uv=False), rtol=1e-5)
    values = M.singular_values(kernel, "spatial")
    assert values.dtype == np.float32 and np.all(np.diff(values) <= 0)
    with pytest.raises(ValueError):
        M.singular_values(kernel, "matrix")  # a 3x5 kernel is not a matrix
    with pytest.raises(ValueError):
        M.singular_values(kernel, "rows")


def test_energy_rank():
    values = np.array([4.0, 3.0, 0.0])  # squares 16, 9, 0 of 25
    assert M.energy_rank(values, 0.6) == 1
    assert M.energy_rank(values, 0.65) == 2
    assert M.energy_rank(values, 1.0) == 2  # all the energy is in the two non-zero values
    assert M.energy_rank(values[::-1], 0.6) == 1  # order does not matter
    assert M.energy_rank(values, 1e-9) == 1
    assert M.energy_rank(np.zeros(5), 0.9) == 1
    assert M.energy_rank(np.ones(10), 0.95) == 10
    assert M.energy_rank(np.ones(10), 0.5) == 5
    for bad in (0, 0.0, -0.2, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(UserInputError):
            M.energy_rank(values, bad)


def test_vbmf_rank_recovers_planted_rank():
    rng = np.random.default_rng(0)
    low_rank = rng.standard_normal((64, 5)) @ rng.standard_normal((5, 48))
    noisy = low_rank + 0.1 * rng.standard_normal((64, 48))
    assert M.vbmf_rank(noisy) == 5
    assert M.vbmf_rank(noisy.T) == 5
    assert M.vbmf_rank(0.1 * rng.standard_normal((64, 48))) == 1  # pure noise: nothing to keep, at least 1
    assert M.vbmf_rank(np.zeros((8, 6))) == 1
    clean_full = np.linalg.qr(rng.standard_normal((10, 10)))[0] * 100
    assert M.vbmf_rank(clean_full) <= 10


def test_resolve_rank():
    assert M.resolve_rank(0.25, 64) == 16
    assert M.resolve_rank(0.001, 64) == 1
    assert M.resolve_rank(0.5, 3) == 2  # rounded
    assert M.resolve_rank(100, 64) == 64
    assert M.resolve_rank(64.0, 128) == 64
    assert M.resolve_rank(np.int64(7), 128) == 7
    for bad in (0, -3, 1.5, float("nan"), float("inf"), "8", None, True):
        with pytest.raises(UserInputError) as info:
            M.resolve_rank(bad, 64)
        assert info.value.fix


# ------------------------------------------------------------------ refits
def _planted_linear(n=400, r=6, t=5, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    weight, bias = rng.standard_normal((t, r)), rng.standard_normal(t)
    z = rng.standard_normal((n, r)) * 2 + 3  # non-zero mean, so the bias must be separated
    y = z @ weight.T + bias + noise * rng.standard_normal((n, t))
    return z, y, weight, bias


def test_least_squares_refit_recovers_planted_map():
    z, y, weight, bias = _planted_linear()
    fitted, fitted_bias = M.least_squares_refit(z, y)
    assert fitted.dtype == np.float32 and fitted.shape == (5, 6)
    np.testing.assert_allclose(fitted, weight, atol=1e-4)
    np.testing.assert_allclose(fitted_bias, bias, atol=1e-4)
    no_bias_weight, none = M.least_squares_refit(z, z @ weight.T, bias=False)
    assert none is None
    np.testing.assert_allclose(no_bias_weight, weight, atol=1e-4)


def test_gram_refit_agrees_with_least_squares_from_streamed_sums():
    z, y, _, _ = _planted_linear(noise=0.3, seed=1)
    expected = M.least_squares_refit(z, y, ridge=1e-3)
    gram, cross = np.zeros((6, 6)), np.zeros((6, 5))
    for chunk in np.array_split(np.arange(len(z)), 7):  # as a pass would, one calibration feed at a time
        gram += z[chunk].T @ z[chunk]
        cross += z[chunk].T @ y[chunk]
    got = M.gram_refit(gram, cross, z.mean(axis=0), y.mean(axis=0), len(z), ridge=1e-3)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_refit_with_degenerate_inputs_stays_finite():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((3, 8))  # fewer samples than unknowns
    z[:, 2] = 0.0
    weight, bias = M.least_squares_refit(z, rng.standard_normal((3, 4)))
    assert np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))
    weight, bias = M.least_squares_refit(np.zeros((5, 3)), np.ones((5, 2)))  # nothing to fit: bias is the mean
    np.testing.assert_allclose(weight, 0.0)
    np.testing.assert_allclose(bias, 1.0)


def test_conv_flops():
    assert M.conv_flops((64, 32, 3, 3), (10, 10)) == 64 * 32 * 9 * 100
    assert M.conv_flops((32, 1, 3, 3), (10, 10), groups=32) == 32 * 9 * 100  # depthwise
    assert M.conv_flops((8, 4, 1, 1), (7, 5)) == 8 * 4 * 35
    with pytest.raises(ValueError):
        M.conv_flops((30, 1, 3, 3), (10, 10), groups=4)
