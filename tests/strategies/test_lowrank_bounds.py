"""Error bounds of the three re-factorizations used by the server step (alignfed.lowrank)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignfed.lowrank import Factors, Method, Svd, cur, factorize, pca, qrcp, thin_qr, to_adapter

shapes = st.tuples(st.integers(2, 24), st.integers(2, 24))


def _matrix(seed: int, out_dim: int, in_dim: int, decay: float) -> np.ndarray:
    """A matrix with a geometrically decaying spectrum (like an adapter product plus noise)."""
    rng = np.random.default_rng(seed)
    p = min(out_dim, in_dim)
    u, _ = np.linalg.qr(rng.normal(size=(out_dim, p)))  # (out, p)
    v, _ = np.linalg.qr(rng.normal(size=(in_dim, p)))  # (in, p)
    s = np.exp(-decay * np.arange(p))
    m: np.ndarray = (u * s) @ v.T  # (out, in)
    return m


def _tail(m: np.ndarray, k: int) -> float:
    sv = np.linalg.svd(m, compute_uv=False)
    return float(np.sqrt(np.sum(sv[k:] ** 2)))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), shape=shapes, k=st.integers(1, 24), decay=st.floats(0.0, 1.5))
def test_pca_error_is_the_singular_value_tail(seed: int, shape: tuple[int, int], k: int, decay: float) -> None:
    """Eckart–Young: ‖M − M_k‖_F = sqrt(Σ_{i>k} σ_i²), exactly (up to the float32 output)."""
    m = _matrix(seed, *shape, decay)
    err = np.linalg.norm(m - pca(m, k).dense())
    assert abs(err - _tail(m, k)) <= 1e-5 * np.linalg.norm(m) + 1e-6


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31), shape=shapes, k=st.integers(1, 24), decay=st.floats(0.0, 1.5))
def test_qrcp_and_cur_stay_within_their_factors(seed: int, shape: tuple[int, int], k: int, decay: float) -> None:
    """QRCP ≤ sqrt(1 + k(p − k)) × optimal (the rank-revealing QR factor; Businger–Golub pivoting
    meets it on all but contrived inputs such as Kahan's matrix). CUR = C C⁺ M R⁺ R with the same
    column pivots, so ‖M − CUR‖ ≤ ‖M − C C⁺ M‖ + ‖M − M R⁺ R‖ = qrcp(M) + qrcp(Mᵀ) errors."""
    m = _matrix(seed, *shape, decay)
    p = min(shape)
    k = min(k, p)
    opt = _tail(m, k)
    tol = 1e-5 * np.linalg.norm(m) + 1e-6
    err_q = np.linalg.norm(m - qrcp(m, k).dense())
    err_qt = np.linalg.norm(m.T - qrcp(m.T, k).dense())
    err_c = np.linalg.norm(m - cur(m, k).dense())
    assert err_q <= np.sqrt(1 + k * (p - k)) * opt + tol
    assert err_c <= err_q + err_qt + tol
    assert err_q >= opt - tol and err_c >= opt - tol  # nothing beats Eckart–Young


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=shapes,
    true_rank=st.integers(0, 6),
    extra=st.integers(0, 3),
    method=st.sampled_from(["pca", "qrcp", "cur"]),
)
def test_exact_on_matrices_of_rank_at_most_k(
    seed: int, shape: tuple[int, int], true_rank: int, extra: int, method: Method
) -> None:
    rng = np.random.default_rng(seed)
    out_dim, in_dim = shape
    m = rng.normal(size=(out_dim, true_rank)) @ rng.normal(size=(true_rank, in_dim))  # rank ≤ true_rank
    k = true_rank + extra
    if k == 0:
        k = 1
    f = factorize(m, k, method)
    assert f.rank <= k
    np.testing.assert_allclose(f.dense(), m, atol=1e-4 * (1 + np.abs(m).max()))


def test_to_adapter_residual_closes_the_product() -> None:
    rng = np.random.default_rng(3)
    m = Factors(u=rng.normal(size=(9, 5)), v=rng.normal(size=(5, 7)))  # rank 5
    for method in ("pca", "qrcp", "cur"):
        split = to_adapter(m, 3, 0.5, method, residual_rank=5)  # A (3, 7), B (9, 3), R rank ≤ 5
        assert split.a.shape == (3, 7) and split.b.shape == (9, 3)
        np.testing.assert_allclose(
            0.5 * split.b.astype(np.float64) @ split.a + split.residual.dense(), m.dense(), atol=1e-5
        )
        assert split.dropped < 1e-5


def test_residual_cap_drops_the_smallest_directions() -> None:
    """With a cap q the residual is the best rank-q part of M − M_r; the rest is reported as dropped."""
    m = _matrix(5, 12, 10, 0.3)
    sv = np.linalg.svd(m, compute_uv=False)
    split = to_adapter(Factors(u=m, v=np.eye(10)), 2, 1.0, "pca", residual_rank=3)
    assert split.residual.rank == 3
    assert split.dropped == pytest.approx(float(np.sqrt(np.sum(sv[5:] ** 2))), rel=1e-5)
    np.testing.assert_allclose(np.linalg.norm(split.residual.dense()), np.sqrt(np.sum(sv[2:5] ** 2)), rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=shapes,
    inner=st.integers(1, 30),
    k=st.integers(1, 8),
    method=st.sampled_from(["pca", "qrcp", "cur"]),
)
def test_factored_refactorization_equals_the_dense_one(
    seed: int, shape: tuple[int, int], inner: int, k: int, method: Method
) -> None:
    """The server works on stacked factors; the product it keeps is the one the dense method gives."""
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(shape[0], inner)), rng.normal(size=(inner, shape[1]))
    m = u @ v
    split = to_adapter(Factors(u=u, v=v), k, 1.0, method, residual_rank=0)
    kept = split.b.astype(np.float64) @ split.a
    dense_kept = factorize(m, k, method).dense()
    # QRCP/CUR pivot on diag(s)·Vᵀ, which picks M's columns (no ties with Gaussian factors)
    np.testing.assert_allclose(kept, dense_kept, atol=1e-4 * (1.0 + np.abs(m).max()))


@pytest.mark.parametrize(
    "case", ["well-conditioned", "near-dependent", "rank-deficient", "zero-column", "ill-conditioned", "wide"]
)
def test_thin_qr_is_an_exact_qr_whichever_path_it_takes(case: str) -> None:
    """thin_qr takes CholeskyQR2 or falls back to Householder; either way x = q r with qᵀq = I.

    The cases are those the server and devices meet: a zero B at version 0 (zero columns), a delta's
    [B_new, −B_old] after a small step (near-dependent), stacks wider than a tiny layer (wide).
    """
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 24))  # (m, k)
    if case == "near-dependent":
        x[:, 1] = x[:, 0] + 1e-4 * rng.normal(size=300)
    elif case == "rank-deficient":
        x[:, 5] = x[:, 3] - 2.0 * x[:, 4]
    elif case == "zero-column":
        x[:, 10:] = 0.0
    elif case == "ill-conditioned":
        x = x * np.logspace(0, -12, 24)
    elif case == "wide":
        x = rng.normal(size=(16, 24))
    q, r = thin_qr(x)
    assert q.shape[0] == x.shape[0] and r.shape[1] == x.shape[1]
    np.testing.assert_allclose(q @ r, x, rtol=0, atol=1e-12 * np.abs(x).max())
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), rtol=0, atol=1e-12)


def test_svd_of_factors_matches_the_dense_svd() -> None:
    """`Svd.of_factors` (thin QRs of both factors, SVD of the core) = the SVD of the formed product."""
    rng = np.random.default_rng(8)
    b_new, b_old = rng.normal(size=(96, 8)), rng.normal(size=(96, 8))
    b_old[:, :3] = b_new[:, :3]  # shared columns: the stacked u is rank-deficient
    f = Factors(u=np.concatenate([b_new, -b_old], axis=1), v=rng.normal(size=(16, 40)))
    sv = Svd.of_factors(f)
    dense = np.linalg.svd(f.dense(), compute_uv=False)
    np.testing.assert_allclose(sv.s, dense[: sv.s.size], rtol=0, atol=1e-10 * dense[0])
    np.testing.assert_allclose((sv.u * sv.s) @ sv.vt, f.dense(), rtol=0, atol=1e-10 * np.abs(f.dense()).max())
