"""Truncating a LoRA adapter to a device's rank cap (alignfed.lowrank.truncate_lora, alignfed.adapter)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignfed import lora, lowrank
from alignfed.adapter import compute_deltas, truncate
from alignfed.errors import TrainingError
from alignfed.lowrank import Factors, to_adapter, truncate_lora
from alignfed.manifest import LoraLayout

dims = st.tuples(st.integers(2, 20), st.integers(2, 20))
S = 2.0  # LoRA scale alpha / r


def _pair(seed: int, out_dim: int, in_dim: int, r: int, true_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A (r, in), B (out, r) with rank(B A) ≤ true_rank: B's columns span only true_rank directions."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(r, in_dim)).astype(np.float32)
    b = (rng.normal(size=(out_dim, true_rank)) @ rng.normal(size=(true_rank, r))).astype(np.float32)
    return a, b


def _tail(m: np.ndarray, k: int) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2)))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), shape=dims, r=st.integers(2, 8), k=st.integers(1, 8), true_rank=st.integers(0, 8))
def test_exact_when_the_product_has_rank_at_most_k(
    seed: int, shape: tuple[int, int], r: int, k: int, true_rank: int
) -> None:
    k = min(k, r - 1)
    true_rank = min(true_rank, k)
    a, b = _pair(seed, *shape, r, true_rank)
    a_k, b_k = truncate_lora(a, b, k, S)
    assert a_k.shape == a.shape and b_k.shape == b.shape and a_k.dtype == b_k.dtype == np.float32
    assert not a_k[k:].any() and not b_k[:, k:].any()  # components beyond k are zero
    m = b.astype(np.float64) @ a
    np.testing.assert_allclose(b_k.astype(np.float64) @ a_k, m, atol=1e-5 * (1 + np.abs(m).max()))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), shape=dims, r=st.integers(2, 8), k=st.integers(1, 7))
def test_eckart_young_optimal_otherwise(seed: int, shape: tuple[int, int], r: int, k: int) -> None:
    """‖B A − B_k A_k‖_F is the singular-value tail: no rank-k pair does better (e.g. keeping
    A's first k rows and B's first k columns)."""
    k = min(k, r - 1)
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(r, shape[1])).astype(np.float32)
    b = rng.normal(size=(shape[0], r)).astype(np.float32)
    m = b.astype(np.float64) @ a
    a_k, b_k = truncate_lora(a, b, k, S)
    err = np.linalg.norm(m - b_k.astype(np.float64) @ a_k)
    tol = 1e-5 * np.linalg.norm(m)
    assert abs(err - _tail(m, k)) <= tol
    assert err <= np.linalg.norm(m - b[:, :k].astype(np.float64) @ a[:k]) + tol


def test_singular_values_are_split_as_the_server_splits_them() -> None:
    """Column j of s·B_k and row j of A_k both have norm √σ_j of s·B A, σ descending (to_adapter's split)."""
    a, b = _pair(3, 12, 9, 6, 6)
    a_k, b_k = truncate_lora(a, b, 3, S)
    sigma = np.linalg.svd(S * b.astype(np.float64) @ a, compute_uv=False)[:3]
    np.testing.assert_allclose(np.linalg.norm(S * b_k[:, :3], axis=0), np.sqrt(sigma), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a_k[:3], axis=1), np.sqrt(sigma), rtol=1e-5)


def test_a_fresh_adapter_keeps_trainable_rows() -> None:
    """B = 0 (LoRA's init): the product is 0 whatever A is, and the truncation keeps A's first k
    rows — not A = B = 0, where no gradient would ever move either factor."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 10)).astype(np.float32)
    b = np.zeros((7, 4), np.float32)
    a_k, b_k = truncate_lora(a, b, 2, S)
    np.testing.assert_array_equal(a_k[:2], a[:2])
    assert not a_k[2:].any() and not b_k.any()


def test_live_directions_first_then_seed_rows() -> None:
    """One live component (σ > 0) and a cap of 3: the live one, then A's rows whose B column is zero."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 6)).astype(np.float32)
    b = np.zeros((5, 4), np.float32)
    b[:, 2] = rng.normal(size=5)
    a_k, b_k = truncate_lora(a, b, 3, S)
    np.testing.assert_allclose(b_k.astype(np.float64) @ a_k, b.astype(np.float64) @ a, atol=1e-5)
    np.testing.assert_array_equal(a_k[1:3], a[[0, 1]])
    assert not b_k[:, 1:].any() and not a_k[3:].any()


def test_a_server_made_adapter_truncates_to_its_own_first_components() -> None:
    """The server's adapters are already SVD factors, σ split as √σ (lowrank.to_adapter): truncation
    keeps their first k components as they are (up to the sign of each)."""
    rng = np.random.default_rng(2)
    m = Factors(u=rng.normal(size=(9, 5)), v=rng.normal(size=(5, 7)))
    split = to_adapter(m, rank=4, scale=2.0)
    a_k, b_k = truncate_lora(split.a, split.b, 2, 2.0)
    np.testing.assert_allclose(np.abs(a_k[:2]), np.abs(split.a[:2]), atol=1e-5)
    np.testing.assert_allclose(np.abs(b_k[:, :2]), np.abs(split.b[:, :2]), atol=1e-5)


def test_no_cap_is_the_identity_and_bad_ranks_are_refused() -> None:
    a, b = _pair(4, 5, 6, 3, 3)
    a_k, b_k = truncate_lora(a, b, 3, S)
    np.testing.assert_array_equal(a_k, a)
    np.testing.assert_array_equal(b_k, b)
    with pytest.raises(ValueError, match="rank must be ≥ 1"):
        truncate_lora(a, b, 0, S)
    with pytest.raises(ValueError, match="expected A \\(r, in\\), B \\(out, r\\)"):
        truncate_lora(a, b.T, 2, S)


class _Manifest:
    """What `truncate` and `compute_deltas` read of a manifest: the LoRA layout and layer ids."""

    def __init__(self, rank: int) -> None:
        self.lora = LoraLayout(targets=("q", "v"), rank=rank, alpha=2.0 * rank)
        self.layer_ids = ["0.q", "0.v"]


def _adapter(rank: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for lid, (o, i) in {"0.q": (8, 6), "0.v": (4, 6)}.items():
        layer, module = lora.split_layer_id(lid)
        out[lora.key(layer, module, "A")] = rng.normal(size=(rank, i)).astype(np.float32)
        out[lora.key(layer, module, "B")] = rng.normal(size=(o, rank)).astype(np.float32)
    return out


def test_a_capped_device_sends_the_change_from_its_truncated_start() -> None:
    """delta = s·(B_i A_i − T_k(B_v A_v)) as factors of rank ≤ 2k, not relative to the full global
    (that would also send −(B_v A_v − T_k), the tail the device never had)."""
    m = _Manifest(rank=4)
    start = truncate(_adapter(4, 0), m, 2)  # type: ignore[arg-type]
    trained = {n: t.copy() for n, t in start.items()}
    for n, t in trained.items():  # training moves only the first k = 2 components
        if n.endswith(".A"):
            t[:2] += 0.1
        else:
            t[:, :2] -= 0.2
    deltas = compute_deltas(trained, start, m, rank=2)  # type: ignore[arg-type]
    for lid, f in deltas.items():
        assert f.rank == 4  # 2k
        want = lora.product(trained, lid, m.lora.scale) - lora.product(start, lid, m.lora.scale)
        np.testing.assert_allclose(f.dense(), want, atol=1e-5)
    trained["lora.0.q.B"][:, 3] = 1.0  # a component beyond the cap moved: a bug, not an update
    trained["lora.0.q.A"][3] = 1.0
    with pytest.raises(TrainingError, match="non-zero components beyond its rank 2"):
        compute_deltas(trained, start, m, rank=2)  # type: ignore[arg-type]


def test_truncate_leaves_an_uncapped_adapter_alone() -> None:
    m = _Manifest(rank=4)
    tensors = _adapter(4, 1)
    out = truncate(tensors, m, 4)  # type: ignore[arg-type]
    assert all(np.array_equal(out[n], tensors[n]) for n in tensors)


def test_canonical_factors_undo_a_rotation_and_keep_the_product() -> None:
    """A rotated pair (R A, B Rᵀ) comes back as the balanced SVD pair the server makes, up to signs:
    same product, same |factors|; a fresh adapter (B = 0) stays as it is, its A rows trainable."""
    rng = np.random.default_rng(11)
    a, b, scale = rng.normal(size=(4, 12)), rng.normal(size=(9, 4)), 2.0  # A (r, in), B (out, r)
    split = lowrank.to_adapter(lowrank.Factors(u=scale * b, v=a), 4, scale)  # the server's factors
    r, _ = np.linalg.qr(rng.normal(size=(4, 4)))  # an orthogonal rotation of the rank space
    rotated_a, rotated_b = (r @ split.a).astype(np.float32), (split.b @ r.T).astype(np.float32)
    assert np.abs(rotated_a - split.a).max() > 0.1  # the rotation moved the factors ...
    got_a, got_b = lowrank.canonical_lora(rotated_a, rotated_b, scale)
    np.testing.assert_allclose(got_b @ got_a, split.b @ split.a, atol=1e-5)  # ... not the product
    np.testing.assert_allclose(np.abs(got_a), np.abs(split.a), atol=1e-5)  # back to the server's basis
    np.testing.assert_allclose(np.abs(got_b), np.abs(split.b), atol=1e-5)
    fresh_a = rng.normal(size=(4, 12)).astype(np.float32)
    same_a, same_b = lowrank.canonical_lora(fresh_a, np.zeros((9, 4), np.float32), scale)
    assert np.array_equal(same_a, fresh_a) and not np.any(same_b)
