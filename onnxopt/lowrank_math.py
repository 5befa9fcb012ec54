"""Low-rank decompositions of Conv / Gemm weights, rank choice and data-driven refits.

Pure numpy/scipy math, no graph: the passes in ``passes/lowrank.py`` turn the factors into
chains of ONNX nodes. Conventions: a Conv kernel is ONNX's ``(T, C, kh, kw)`` (out channels,
in channels, height, width); a Gemm/MatMul weight is a matrix ``W`` of shape ``(out, in)``
with ``y = W @ x``. Every function computes in float64 and returns float32.

Decompositions, each given as the kernels of the convolutions that replace the layer:

* :func:`svd_factors` - truncated SVD of a matrix (a Gemm, or a 1x1 Conv as ``(T, C)``).
* :func:`spatial_svd` - Jaderberg, Vedaldi & Zisserman 2014, "Speeding up Convolutional
  Neural Networks with Low Rank Expansions", scheme 2: a ``kh x 1`` conv to ``r`` channels,
  then a ``1 x kw`` conv to ``T`` channels.
* :func:`tucker2` - Kim et al. 2016, "Compression of Deep Convolutional Neural Networks for
  Fast and Low Power Mobile Applications": 1x1 conv to ``r_in``, ``kh x kw`` core conv to
  ``r_out``, 1x1 conv to ``T``.
* :func:`cp` - Lebedev et al. 2015, "Speeding-up Convolutional Neural Networks Using
  Fine-tuned CP-Decomposition": 1x1 conv to ``r``, depthwise ``kh x 1``, depthwise ``1 x kw``,
  1x1 conv to ``T``.

Tucker-2 (HOOI) and CP (ALS) are written here in numpy rather than calling tensorly's
``partial_tucker`` / ``parafac``: on a 512x512x3x3 kernel ``parafac`` materializes the full
Khatri-Rao product of the other modes (512·512·3 x r, about 0.8 GB at r=128) for every
update and took about two minutes for 25 sweeps, and ``partial_tucker`` runs full SVDs of
the unfoldings on every sweep. Here the CP updates contract the kernel one mode at a time
and both methods get leading singular vectors from eigendecompositions of small Gram
matrices, which keeps such a kernel at a few seconds. The algorithms are the textbook ones
(Kolda & Bader 2009, "Tensor Decompositions and Applications", Fig. 3.3 CP-ALS and
Fig. 4.4 HOOI); the tests compare their errors against tensorly's.

Rank choice: :func:`singular_values` + :func:`energy_rank`, or :func:`vbmf_rank`
(empirical variational Bayesian matrix factorization, as Kim et al. 2016 use it).
Refits (Zhang et al. 2015, "Accelerating Very Deep Convolutional Networks for
Classification and Detection"): :func:`least_squares_refit` and its streamed twin
:func:`gram_refit` fit the last linear factor to the original layer's outputs.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import numpy as np
import scipy.linalg
import scipy.optimize

from .errors import UserInputError


# --------------------------------------------------------------------------- helpers
def _float64(array, ndim: int | tuple[int, ...], what: str) -> np.ndarray:
    """``array`` as float64 after checking its rank (internal misuse is a ValueError)."""
    result = np.asarray(array, dtype=np.float64)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if result.ndim not in allowed:
        raise ValueError(f"{what} must have {' or '.join(map(str, allowed))} dimensions, got shape {result.shape}")
    if not np.all(np.isfinite(result)):
        raise ValueError(f"{what} holds NaN or infinite values")
    return result


def _check_rank(rank, what: str = "rank") -> int:
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {rank!r}")
    return int(rank)


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def _fix_signs(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip each (left column, right row) pair so the largest |entry| of the column is positive.

    Singular vectors are defined up to a joint sign; fixing it makes factors reproducible
    across LAPACK builds (the same rule as scikit-learn's ``svd_flip``)."""
    signs = np.sign(left[np.argmax(np.abs(left), axis=0), np.arange(left.shape[1])])
    signs[signs == 0] = 1.0
    return left * signs, right * signs[:, None]


# Above this many entries, SVDs go through the Gram matrix of the smaller side (one GEMM and one
# symmetric eigensolver) instead of LAPACK's bidiagonalization: VGG-16's 4096×25088 FC weight
# takes 46 s instead of 188 s on one core. Squaring loses singular values below ~1e-8·σ₁ to
# rounding, which no truncation keeps; the factors stay exact at full rank (an orthonormal basis).
GRAM_ROUTE_ENTRIES = 1 << 22


def _truncated_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading ``rank`` singular triplets (U (m,r), s (r,), Vt (r,n)) with fixed signs."""
    if matrix.size <= GRAM_ROUTE_ENTRIES:
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        u, vt = _fix_signs(u[:, :rank], vt[:rank])
        return u, s[:rank], vt
    wide = matrix.shape[0] <= matrix.shape[1]
    short_side = matrix if wide else matrix.T
    basis = _leading_left_vectors(short_side, rank)  # (short, r): U of a wide matrix, V of a tall one
    projected = basis.T @ short_side  # (r, long): row k is s_k times the other side's vector k
    s = np.linalg.norm(projected, axis=1)
    others = projected / np.where(s > 0, s, 1.0)[:, None]
    u, vt = (basis, others) if wide else (others.T, basis.T)
    u, vt = _fix_signs(u, vt)
    return u, s, vt


def _singular_values(matrix: np.ndarray) -> np.ndarray:
    """All singular values, descending (the Gram route above GRAM_ROUTE_ENTRIES, as _truncated_svd)."""
    if matrix.size <= GRAM_ROUTE_ENTRIES:
        return np.linalg.svd(matrix, compute_uv=False)
    short_side = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(short_side @ short_side.T), 0.0, None))[::-1]


def _leading_left_vectors(matrix: np.ndarray, count: int) -> np.ndarray:
    """Orthonormal leading ``count`` left singular vectors of a wide matrix (m, n), m <= count allowed.

    Eigenvectors of the m x m Gram matrix ``A Aᵀ``: for the (T, C·kh·kw) unfoldings of a conv
    kernel this is far cheaper than an SVD of the unfolding, and the leading subspace is what
    HOOI needs (Kolda & Bader 2009, Sec. 4.2). At count == m it is a full orthonormal basis."""
    gram = matrix @ matrix.T
    _, vectors = np.linalg.eigh(gram)  # ascending eigenvalues
    vectors = vectors[:, ::-1][:, :count]
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def leading_right_vectors(matrix: np.ndarray, count: int, *, seed: int = 0, power_iterations: int = 3,
                          oversampling: int = 10) -> np.ndarray:
    """Orthonormal (n, count) basis of the leading right singular subspace of ``matrix`` (m, n).

    Exact (a symmetric eigensolver on the n×n Gram matrix) while n is small; for wide outputs
    (a CTC head over 18k characters took minutes in an 18k×18k eigh) a randomized range finder
    with power iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4) costs a few products with
    the matrix. Signs fixed as in _fix_signs."""
    a = np.asarray(matrix, dtype=np.float64)
    n = a.shape[1]
    count = min(_check_rank(count, "count"), n)
    if n <= EXACT_SUBSPACE_SIDE or count + oversampling >= min(a.shape):
        return _leading_left_vectors(a.T, count)
    sketch = a.T @ (a @ np.random.default_rng(seed).standard_normal((n, count + oversampling)))
    basis, _ = np.linalg.qr(sketch)
    for _ in range(power_iterations):  # re-orthonormalized each step (Alg. 4.4) to keep small directions
        basis, _ = np.linalg.qr(a.T @ (a @ basis))
    projected = a @ basis
    small = projected.T @ projected  # basisᵀ·AᵀA·basis without forming AᵀA
    _, vectors = np.linalg.eigh(small)  # Rayleigh-Ritz in the sketched subspace
    leading = basis @ vectors[:, ::-1][:, :count]
    signs = np.sign(leading[np.argmax(np.abs(leading), axis=0), np.arange(count)])
    signs[signs == 0] = 1.0
    return leading * signs


EXACT_SUBSPACE_SIDE = 2048  # above this many columns, leading_right_vectors sketches


# --------------------------------------------------------------------------- decompositions
def svd_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """W (out,in) ≈ first_then_second: returns (second (out,r), first (r,in)) with W ≈ second @ first.

    Balanced split: ``second = U_r·sqrt(S_r)`` and ``first = sqrt(S_r)·V_rᵀ``, so both factors
    have the same scale (friendlier to int8 quantization later). ``rank`` is capped at
    ``min(out, in)``; by Eckart-Young the result is the best rank-r approximation."""
    w = _float64(matrix, 2, "matrix")
    rank = min(_check_rank(rank), min(w.shape))
    u, s, vt = _truncated_svd(w, rank)
    root = np.sqrt(s)
    return _f32(u * root), _f32(root[:, None] * vt)


def _spatial_matrix(kernel: np.ndarray) -> np.ndarray:
    """Jaderberg et al. 2014 scheme 2 unfolding: W[t,c,i,j] → M[(c,i), (t,j)], shape (C·kh, T·kw)."""
    t, c, kh, kw = kernel.shape
    return kernel.transpose(1, 2, 0, 3).reshape(c * kh, t * kw)


def spatial_svd(kernel: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Jaderberg et al. 2014 scheme 2 via SVD of kernel reshaped to (C*kh, T*kw):
    returns (vertical (r, C, kh, 1), horizontal (T, r, 1, kw)); Conv(vertical) then Conv(horizontal) == kernel at full rank.

    W[t,c,i,j] ≈ Σ_k V[k,c,i] H[t,k,j] is a rank-r factorization of the unfolding M above,
    and the SVD gives its optimal one (Jaderberg et al. Sec. 3.3 note this closed form for
    the reconstruction of the filters). ``rank`` is capped at min(C·kh, T·kw). Strides and
    pads split between the two convs: the vertical conv takes those of H, the horizontal
    those of W."""
    w = _float64(kernel, 4, "kernel")
    t, c, kh, kw = w.shape
    matrix = _spatial_matrix(w)
    rank = min(_check_rank(rank), min(matrix.shape))
    u, s, vt = _truncated_svd(matrix, rank)
    root = np.sqrt(s)
    vertical = (u * root).reshape(c, kh, rank).transpose(2, 0, 1)[..., None]  # (r, C, kh, 1)
    horizontal = (root[:, None] * vt).reshape(rank, t, kw).transpose(1, 0, 2)[:, :, None, :]  # (T, r, 1, kw)
    return _f32(vertical), _f32(horizontal)


def tucker2(kernel: np.ndarray, rank_in: int, rank_out: int, *, iterations: int = 10,
            tol: float = 1e-7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kim et al. 2016: Tucker-2 on modes T and C (HOOI started from HOSVD, iterations capped).
    returns (first (r_in, C, 1, 1), core (r_out, r_in, kh, kw), last (T, r_out, 1, 1)).

    W[t,c,i,j] ≈ Σ_{a,b} U_out[t,a] · core[a,b,i,j] · U_in[c,b] with orthonormal U_out (T, r_out)
    and U_in (C, r_in). HOSVD start (leading singular vectors of the mode-0 and mode-1
    unfoldings), then at most ``iterations`` HOOI sweeps (Kolda & Bader 2009, Fig. 4.4), each
    re-fitting one factor to the kernel projected on the other, stopping early when the
    relative error changes by less than ``tol``. The ranks are capped at T and C."""
    w = _float64(kernel, 4, "kernel")
    t, c, kh, kw = w.shape
    rank_in = min(_check_rank(rank_in, "rank_in"), c)
    rank_out = min(_check_rank(rank_out, "rank_out"), t)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    norm2 = float(np.sum(w * w))

    def project_in(u_in):  # W ×_C U_inᵀ: (T, r_in, kh, kw)
        return np.einsum("tcij,cb->tbij", w, u_in, optimize=True)

    def project_out(u_out):  # W ×_T U_outᵀ: (r_out, C, kh, kw)
        return np.einsum("tcij,ta->acij", w, u_out, optimize=True)

    u_out = _leading_left_vectors(w.reshape(t, -1), rank_out)
    u_in = _leading_left_vectors(w.transpose(1, 0, 2, 3).reshape(c, -1), rank_in)
    exact = rank_in == c and rank_out == t  # any orthonormal bases are then exact
    previous_error = None
    for _ in range(0 if exact else iterations):
        u_out = _leading_left_vectors(project_in(u_in).reshape(t, -1), rank_out)
        by_out = project_out(u_out)
        u_in = _leading_left_vectors(by_out.transpose(1, 0, 2, 3).reshape(c, -1), rank_in)
        core = np.einsum("acij,cb->abij", by_out, u_in, optimize=True)
        # the factors are orthonormal, so ||W - Ŵ||² = ||W||² - ||core||²
        error = math.sqrt(max(norm2 - float(np.sum(core * core)), 0.0) / norm2) if norm2 else 0.0
        if previous_error is not None and abs(previous_error - error) < tol:
            break
        previous_error = error
    core = np.einsum("acij,cb->abij", project_out(u_out), u_in, optimize=True)
    first = u_in.T[:, :, None, None]  # (r_in, C, 1, 1)
    last = u_out[:, :, None, None]  # (T, r_out, 1, 1)
    return _f32(first), _f32(core), _f32(last)


def _cp_initial_factor(unfolding: np.ndarray, rank: int, rng: np.random.Generator) -> np.ndarray:
    """'svd' initialization of one CP factor: the leading left singular vectors of the mode's
    unfolding; columns beyond the mode's size are standard normal from ``rng`` (as tensorly's
    ``initialize_cp(init='svd')`` does)."""
    size = unfolding.shape[0]
    vectors = _leading_left_vectors(unfolding, min(rank, size))
    if rank > size:
        vectors = np.concatenate([vectors, rng.standard_normal((size, rank - size))], axis=1)
    return vectors


def _solve_psd(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """X with X @ gram = rhs for a symmetric positive semi-definite gram (Cholesky, lstsq fallback)."""
    try:
        factor = scipy.linalg.cho_factor(gram, check_finite=False)
        solution = scipy.linalg.cho_solve(factor, rhs.T, check_finite=False).T
        if np.all(np.isfinite(solution)):
            return solution
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(gram, rhs.T, rcond=None)[0].T


def cp(kernel: np.ndarray, rank: int, *, iterations: int = 25, seed: int = 0,
       tol: float = 1e-7) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lebedev et al. 2015: CP of the (T, C, kh, kw) tensor (ALS, 'svd' init, capped iterations, tolerance stop).
    returns (first (r, C, 1, 1), vertical depthwise (r, 1, kh, 1), horizontal depthwise (r, 1, 1, kw), last (T, r, 1, 1)),
    CP weights/scales balanced across factors. Deterministic for a given seed.

    W[t,c,i,j] ≈ Σ_k A[t,k] B[c,k] D[i,k] E[j,k]. CP-ALS (Kolda & Bader 2009, Fig. 3.3): each
    factor in turn solves its least-squares problem F · (∘_{m≠n} F_mᵀF_m) = MTTKRP_n. The
    MTTKRPs contract the kernel one mode at a time (two GEMMs of the kernel with an r-column
    factor per sweep) instead of forming Khatri-Rao products. ``seed`` fills the initial
    columns of modes smaller than ``rank``; ALS stops after ``iterations`` sweeps or when the
    relative error changes by less than ``tol``. Components come sorted by their weight λ_k,
    and λ_k^(1/4) is put on each of the four factors."""
    w = _float64(kernel, 4, "kernel")
    t, c, kh, kw = w.shape
    rank = _check_rank(rank)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    rng = np.random.default_rng(seed)
    a = _cp_initial_factor(w.reshape(t, -1), rank, rng)
    b = _cp_initial_factor(w.transpose(1, 0, 2, 3).reshape(c, -1), rank, rng)
    d = _cp_initial_factor(w.transpose(2, 0, 1, 3).reshape(kh, -1), rank, rng)
    e = _cp_initial_factor(w.transpose(3, 0, 1, 2).reshape(kw, -1), rank, rng)

    taps = kh * kw
    by_tap = np.ascontiguousarray(w.reshape(t, c, taps).transpose(0, 2, 1)).reshape(t * taps, c)  # rows (t, tap)
    flat = w.reshape(t, c * taps)
    norm2 = float(np.sum(w * w))
    previous_error = None
    for _ in range(iterations):
        spatial = (d[:, None, :] * e[None, :, :]).reshape(taps, rank)  # Khatri-Rao of D and E: (kh·kw, r)
        # mode T: M[t,k] = Σ_{c,s} W[t,c,s] B[c,k] S[s,k]
        mttkrp = np.einsum("tsk,sk->tk", (by_tap @ b).reshape(t, taps, rank), spatial)
        a = _solve_psd((b.T @ b) * (spatial.T @ spatial), mttkrp)
        # mode C: M[c,k] = Σ_{t,s} W[t,c,s] A[t,k] S[s,k]
        by_a = (a.T @ flat).reshape(rank, c, taps)  # Σ_t A[t,k] W[t,c,s], reused for the spatial modes
        mttkrp = np.einsum("kcs,sk->ck", by_a, spatial)
        b = _solve_psd((a.T @ a) * (spatial.T @ spatial), mttkrp)
        # spatial modes: P[k,i,j] = Σ_{t,c} W[t,c,i,j] A[t,k] B[c,k]
        projected = np.einsum("kcs,ck->ks", by_a, b).reshape(rank, kh, kw)
        ab_gram = (a.T @ a) * (b.T @ b)
        d = _solve_psd(ab_gram * (e.T @ e), np.einsum("kij,jk->ik", projected, e))
        mttkrp = np.einsum("kij,ik->jk", projected, d)
        e = _solve_psd(ab_gram * (d.T @ d), mttkrp)
        # ||W - Ŵ||² = ||W||² - 2<W, Ŵ> + ||Ŵ||², with <W, Ŵ> = Σ E ∘ MTTKRP_E (Kolda & Bader Sec. 3.4)
        inner = float(np.sum(e * mttkrp))
        model2 = float(np.sum(ab_gram * (d.T @ d) * (e.T @ e)))
        error = math.sqrt(max(norm2 - 2 * inner + model2, 0.0) / norm2) if norm2 else 0.0
        if previous_error is not None and abs(previous_error - error) < tol:
            break
        previous_error = error

    # balance: unit columns, the product of the norms λ_k shared equally by the four factors
    factors = [a, b, d, e]
    norms = [np.linalg.norm(f, axis=0) for f in factors]
    weights = np.prod(norms, axis=0)
    order = np.argsort(-weights, kind="stable")
    share = weights[order] ** 0.25
    balanced = []
    for f, n in zip(factors, norms):
        safe = np.where(n[order] > 0, n[order], 1.0)
        balanced.append(f[:, order] / safe * share)
    a, b, d, e = balanced
    first = b.T[:, :, None, None]  # (r, C, 1, 1)
    vertical = d.T[:, None, :, None]  # (r, 1, kh, 1)
    horizontal = e.T[:, None, None, :]  # (r, 1, 1, kw)
    last = a[:, :, None, None]  # (T, r, 1, 1)
    return _f32(first), _f32(vertical), _f32(horizontal), _f32(last)


# --------------------------------------------------------------------------- rank choice
def singular_values(kernel_or_matrix, mode: str) -> np.ndarray:
    """Singular values used for rank choice: mode 'matrix' (2-D, or conv (T,C,1,1) as (T,C)), 'spatial' (the (C*kh, T*kw) unfolding),
    'out' (mode-0 unfolding, T x C*kh*kw), 'in' (mode-1 unfolding, C x T*kh*kw). Descending, float32.

    A 2-D matrix (out, in) is accepted by 'out' (itself) and 'in' (its transpose) too."""
    w = _float64(kernel_or_matrix, (2, 4), "weight")
    if mode == "matrix":
        if w.ndim == 4:
            if w.shape[2:] != (1, 1):
                raise ValueError(f"mode 'matrix' needs a 2-D weight or a 1x1 kernel, got shape {w.shape}")
            w = w[:, :, 0, 0]
        matrix = w
    elif mode == "spatial":
        if w.ndim != 4:
            raise ValueError(f"mode 'spatial' needs a 4-D kernel, got shape {w.shape}")
        matrix = _spatial_matrix(w)
    elif mode == "out":
        matrix = w.reshape(w.shape[0], -1)
    elif mode == "in":
        matrix = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    else:
        raise ValueError(f"unknown mode {mode!r}: expected 'matrix', 'spatial', 'out' or 'in'")
    return _f32(_singular_values(matrix))


def energy_rank(values: np.ndarray, energy: float) -> int:
    """Smallest r whose leading squared singular values hold >= `energy` of the total (0<energy<=1). At least 1."""
    if isinstance(energy, bool) or not isinstance(energy, Real) or not 0 < energy <= 1:
        raise UserInputError(f"energy={energy!r} is not a share of the singular-value energy.",
                             "give energy in (0, 1], e.g. energy=0.9 to keep 90% of the squared singular values.")
    squares = np.sort(np.abs(np.asarray(values, dtype=np.float64).ravel()))[::-1] ** 2
    if squares.size == 0:
        return 1
    cumulative = np.cumsum(squares)
    total = cumulative[-1]  # the last partial sum, so energy=1 is reached exactly at the last non-zero value
    if total <= 0:
        return 1
    rank = int(np.searchsorted(cumulative, energy * total, side="left")) + 1
    return max(1, min(rank, squares.size))


def _vbmf_tau_bar(alpha: float) -> float:
    """τ̄ of Nakajima et al. 2013: the zero of Φ(τ) + Φ(τ/α), Φ(z) = log(z+1)/z − 1/2.

    Often approximated by 2.5129·√α (exact for α = 1); solved here with brentq. The sum
    decreases from 1 (τ → 0) to −1 (τ → ∞), and is already negative at τ = 10 for α <= 1."""
    def xi(tau):
        return math.log1p(tau) / tau + math.log1p(tau / alpha) / (tau / alpha) - 1.0

    return scipy.optimize.brentq(xi, 1e-9, 10.0 + 10.0 * math.sqrt(alpha), xtol=1e-12)


def vbmf_rank(matrix: np.ndarray) -> int:
    """Empirical VBMF rank (Nakajima et al. 2013, analytic global solution, noise variance estimated) as Kim et al. 2016 use
    on the mode-0/mode-1 unfoldings. At least 1, at most min(matrix.shape).

    Nakajima, Sugiyama, Babacan & Tomioka 2013, "Global Analytic Solution of Fully-observed
    Variational Bayesian Matrix Factorization", JMLR 14:1-37. For Y (L x M) with L <= M,
    α = L/M and singular values γ_1 >= ... >= γ_L:

    * the empirical-VB (EVB) estimate keeps component h iff γ_h > γ_EVB = sqrt(M σ² x̄), with
      x̄ = (1 + τ̄)(1 + α/τ̄) and τ̄ the zero of Φ(τ) + Φ(τ/α), Φ(z) = log(z+1)/z − 1/2;
    * the noise variance σ² minimizes the free energy, which up to constants is
      Ω(σ²) = Σ_h ψ(γ_h² / (M σ²)), ψ(x) = ψ0(x) + [x > x̄]·ψ1(x), ψ0(x) = x − log x,
      ψ1(x) = log(τ(x)+1) + α·log(τ(x)/α + 1) − τ(x),
      τ(x) = ½(x − (1+α) + sqrt((x − (1+α))² − 4α)) (the EVB shrinkage of a kept component);
    * σ² lies between σ²_low = max(γ²_{ȟ+1} / (M x̄), Σ_{h>ȟ} γ_h² / (M (L−ȟ))) with
      ȟ = min(⌈L/(1+α)⌉ − 1, L), and σ²_high = Σ_h γ_h² / (L M).

    Ω is piecewise smooth with possibly several local minima, so it is scanned on a log grid
    between the bounds and refined with bounded Brent around the best grid point.
    """
    y = _float64(matrix, 2, "matrix")
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape  # L <= M
    gammas = _singular_values(y)
    if rows == 0 or gammas[0] <= 0:
        return 1
    alpha = rows / cols
    tau_bar = _vbmf_tau_bar(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    squares = gammas ** 2

    h_check = min(math.ceil(rows / (1 + alpha)) - 1, rows)  # < rows since α > 0 (0-based: γ_{ȟ+1} = squares[ȟ])
    lower = max(squares[h_check] / (cols * x_bar), float(np.mean(squares[h_check:])) / cols)
    upper = float(np.sum(squares)) / (rows * cols)
    lower = max(lower, upper * 1e-12)  # a tail of exact zeros would give log(0)
    if lower >= upper:
        lower, upper = upper * 1e-6, upper  # degenerate bounds: search a wide bracket below the total power

    def free_energy(log_sigma2: float) -> float:
        x = squares / (cols * math.exp(log_sigma2))
        x = np.maximum(x, 1e-300)
        value = float(np.sum(x - np.log(x)))  # Σ ψ0
        kept = x[x > x_bar]
        if kept.size:
            shifted = kept - (1 + alpha)
            tau = 0.5 * (shifted + np.sqrt(np.maximum(shifted * shifted - 4 * alpha, 0.0)))
            value += float(np.sum(np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau))  # Σ ψ1
        return value

    grid = np.linspace(math.log(lower), math.log(upper), 200)
    energies = [free_energy(g) for g in grid]
    best = int(np.argmin(energies))
    left, right = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    if right > left:
        refined = scipy.optimize.minimize_scalar(free_energy, bounds=(left, right), method="bounded",
                                                 options={"xatol": 1e-10})
        log_sigma2 = refined.x if refined.fun <= energies[best] else grid[best]
    else:
        log_sigma2 = grid[best]
    threshold = math.sqrt(cols * math.exp(log_sigma2) * x_bar)
    rank = int(np.sum(gammas > threshold))
    return max(1, min(rank, rows))


def resolve_rank(rank: float | int, full: int) -> int:
    """rank >= 1 is an absolute rank (capped to full); 0 < rank < 1 is a fraction of full (rounded, at least 1). Anything else
    -> UserInputError (onnxopt.errors) with cause and fix."""
    full = _check_rank(full, "full rank")
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, Real) or not math.isfinite(rank) or rank <= 0:
        raise UserInputError(f"rank={rank!r} is not a rank.",
                             "give rank >= 1 (an absolute rank, e.g. rank=64) or in (0, 1) (a fraction of the full "
                             "rank, e.g. rank=0.25).")
    if rank >= 1:
        if float(rank) != int(rank):
            raise UserInputError(f"rank={rank!r} is neither a whole rank nor a fraction below 1.",
                                 f"give a whole number such as rank={int(rank)}, or a fraction in (0, 1).")
        return min(int(rank), full)
    return max(1, min(full, int(round(rank * full))))


# --------------------------------------------------------------------------- data-driven refits
def _ridge_solve(gram: np.ndarray, cross: np.ndarray, ridge: float) -> np.ndarray:
    """L (T, r) minimizing ||Y - Z Lᵀ||² + λ||L||² from gram = ZᵀZ (r, r) and cross = ZᵀY (r, T).

    Normal equations (ZᵀZ + λI) Lᵀ = ZᵀY with a relative ridge λ = ridge · trace(ZᵀZ)/r, so
    ``ridge`` does not depend on the activations' scale; Cholesky, lstsq if that fails."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    r = gram.shape[0]
    scale = float(np.trace(gram)) / r if r else 0.0
    lam = ridge * (scale if scale > 0 else 1.0)
    system = gram + lam * np.eye(r)
    try:
        factor = scipy.linalg.cho_factor(system, check_finite=False)
        solution = scipy.linalg.cho_solve(factor, cross, check_finite=False)
        if np.all(np.isfinite(solution)):
            return solution.T
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(system, cross, rcond=None)[0].T


def least_squares_refit(inputs: np.ndarray, targets: np.ndarray, *, ridge: float = 1e-6,
                        bias: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """The data-driven reconstruction of Zhang et al. 2015 for the last linear factor: rows are samples.
    inputs Z (N, r), targets Y (N, T). Solve min ||Y - Z Lᵀ - b||² + ridge·scale·||L||² (normal equations in float64 with a
    relative ridge, via cholesky/solve with lstsq fallback). Returns (L (T, r), b (T,) or None).

    With a bias the problem is centred first: L fits the centred data and b = mean(Y) - L·mean(Z)
    (the bias is not shrunk by the ridge)."""
    z = _float64(inputs, 2, "inputs")
    y = _float64(targets, 2, "targets")
    if z.shape[0] != y.shape[0] or z.shape[0] == 0:
        raise ValueError(f"inputs {z.shape} and targets {y.shape} need the same, non-zero number of rows")
    if not bias:
        return _f32(_ridge_solve(z.T @ z, z.T @ y, ridge)), None
    mean_z, mean_y = z.mean(axis=0), y.mean(axis=0)
    zc, yc = z - mean_z, y - mean_y
    weight = _ridge_solve(zc.T @ zc, zc.T @ yc, ridge)
    return _f32(weight), _f32(mean_y - weight @ mean_z)


def gram_refit(gram_zz: np.ndarray, cross_zy: np.ndarray, mean_z: np.ndarray, mean_y: np.ndarray, count: int, *,
               ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Same solution as least_squares_refit(bias=True) but from streamed statistics (so a pass can accumulate over many
    calibration feeds without holding them): gram_zz = Σ z zᵀ (r,r), cross_zy = Σ z yᵀ (r,T), means, N. Returns (L (T,r), b (T,)).

    Centring from the sums: Σ (z-z̄)(z-z̄)ᵀ = Σ z zᵀ - N z̄ z̄ᵀ and Σ (z-z̄)(y-ȳ)ᵀ = Σ z yᵀ - N z̄ ȳᵀ.
    Accumulate the sums in float64: in float32 the subtraction loses the digits of small spreads."""
    gram = _float64(gram_zz, 2, "gram_zz")
    cross = _float64(cross_zy, 2, "cross_zy")
    mz = _float64(mean_z, 1, "mean_z")
    my = _float64(mean_y, 1, "mean_y")
    r, t = cross.shape
    if gram.shape != (r, r) or mz.shape != (r,) or my.shape != (t,):
        raise ValueError(f"inconsistent shapes: gram {gram.shape}, cross {cross.shape}, means {mz.shape}, {my.shape}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    centred_gram = gram - count * np.outer(mz, mz)
    centred_gram = 0.5 * (centred_gram + centred_gram.T)
    centred_cross = cross - count * np.outer(mz, my)
    weight = _ridge_solve(centred_gram, centred_cross, ridge)
    return _f32(weight), _f32(my - weight @ mz)


# --------------------------------------------------------------------------- cost
def conv_flops(kernel_shape: Sequence[int], output_hw: Sequence[int], groups: int = 1) -> int:
    """Multiply-accumulates of a Conv with this kernel producing output_hw (per batch item).

    ``kernel_shape`` is ONNX's weight shape (T, C/groups, kh, kw, ...): each of the T·H_out·W_out
    outputs takes C/groups·kh·kw MACs, so the count is the product of the weight shape and the
    output size; ``groups`` only has to divide T."""
    shape = [int(s) for s in kernel_shape]
    if len(shape) < 2 or any(s < 0 for s in shape):
        raise ValueError(f"kernel_shape must be (T, C/groups, k...), got {tuple(kernel_shape)}")
    if groups < 1 or shape[0] % groups:
        raise ValueError(f"groups={groups} does not divide the {shape[0]} output channels")
    return int(math.prod(shape)) * int(math.prod(int(s) for s in output_hw))
