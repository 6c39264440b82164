"""Cross-version alignment (coordinator.alignment): identity without drift, recovery of known drift."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignfed.lowrank import Factors
from coordinator.alignment import ActivationCache, Aligner, TargetSolve, confidence, residual, transfer


def _drift(seed: int, n: int = 64, in_dim: int = 8, out_dim: int = 5, k: int = 3, mix: float = 0.4) -> Any:
    """X_t = X_v G for a known, well-conditioned mixing G (in, in), and a delta D = U V."""
    rng = np.random.default_rng(seed)
    x_v = rng.normal(size=(n, in_dim))  # (n, in)
    g = np.eye(in_dim) + mix * rng.normal(size=(in_dim, in_dim)) / np.sqrt(in_dim)  # (in, in)
    x_t = x_v @ g  # (n, in)
    u = rng.normal(size=(out_dim, k))  # (out, k)
    v = rng.normal(size=(k, in_dim))  # (k, in)
    return x_v, x_t, g, u, v


def test_known_drift_is_recovered() -> None:
    """X_t D′ᵀ should reproduce X_v Dᵀ: the exact answer is D′ = D G⁻ᵀ."""
    x_v, x_t, g, u, v = _drift(0)
    solve = TargetSolve.of(x_t, lam=1e-6)
    v_aligned = solve.align(v, x_v)  # (k, in)
    rho_aligned = residual(u, v, v_aligned, x_v, x_t)
    rho_none = residual(u, v, v, x_v, x_t)  # no alignment: D′ = D
    assert rho_aligned is not None and rho_none is not None
    assert rho_none > 0.2
    assert rho_aligned < 1e-4
    np.testing.assert_allclose(u @ v_aligned, u @ v @ np.linalg.inv(g).T, atol=1e-3)


def test_ridge_trades_fit_for_staying_near_d() -> None:
    x_v, x_t, _, u, v = _drift(1)
    rhos: list[float] = []
    moves: list[float] = []
    for lam in (1e-6, 1e-2, 1.0, 100.0):
        v_aligned = TargetSolve.of(x_t, lam).align(v, x_v)
        rhos.append(residual(u, v, v_aligned, x_v, x_t) or 0.0)
        moves.append(float(np.linalg.norm(v_aligned - v)))
    assert rhos == sorted(rhos)  # more regularisation: worse fit ...
    assert moves == sorted(moves, reverse=True)  # ... but closer to D
    assert rhos[-1] < (residual(u, v, v, x_v, x_t) or 0.0)  # (any λ still beats no alignment here)


def test_lambda_is_unit_free() -> None:
    """Scaling the activations (or the batch size) leaves P unchanged: λ is relative to tr(X_tᵀX_t)/in."""
    x_v, x_t, _, _, _ = _drift(2)
    p = transfer(x_v, x_t, 1e-2)
    np.testing.assert_allclose(transfer(30.0 * x_v, 30.0 * x_t, 1e-2), p, atol=1e-9)
    np.testing.assert_allclose(transfer(np.vstack([x_v, x_v]), np.vstack([x_t, x_t]), 1e-2), p, atol=1e-9)


def test_explicit_p_matches_the_formula() -> None:
    x_v, x_t, _, _, _ = _drift(3)
    in_dim = x_t.shape[1]
    lam = 0.05 * np.trace(x_t.T @ x_t) / in_dim
    expected = (x_v.T @ x_t + lam * np.eye(in_dim)) @ np.linalg.inv(x_t.T @ x_t + lam * np.eye(in_dim))
    np.testing.assert_allclose(transfer(x_v, x_t, 0.05), expected, atol=1e-10)


def test_undriven_directions_are_kept() -> None:
    """With fewer calibration tokens than inputs, D's part outside X_t's row space stays as it is."""
    rng = np.random.default_rng(4)
    x_v = rng.normal(size=(3, 8))
    x_t = x_v @ (np.eye(8) + 0.3 * rng.normal(size=(8, 8)))
    _, _, vt = np.linalg.svd(x_t)
    null = vt[3:]  # (5, 8): directions no calibration token excites on version t
    v = rng.normal(size=(2, 8))  # (k, in)
    v_aligned = TargetSolve.of(x_t, 1e-2).align(v, x_v)
    # V′ − V lies in X_t's row space: the components along null(X_t) are untouched
    np.testing.assert_allclose(v_aligned @ null.T, v @ null.T, atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 40), in_dim=st.integers(1, 12), k=st.integers(1, 4))
def test_identity_when_nothing_drifted(seed: int, n: int, in_dim: int, k: int, syn: Any) -> None:
    """X_v == X_t: P = I, so the deltas come back unchanged (bit for bit), ρ = 0 and c = 1."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, in_dim))

    class Same:
        def activations(self, state: Any) -> dict[str, np.ndarray]:
            return {"0.q": x.copy()}

    u = rng.normal(size=(5, k)).astype(np.float32)  # (out, k)
    d = {"0.q": Factors(u=u, v=rng.normal(size=(k, in_dim)).astype(np.float32))}
    aligner = Aligner(Same(), lam=1e-2)
    out = aligner.align_group([d], syn.state(version=1, shapes={"0.q": (5, in_dim)}), syn.state(version=4))
    assert out.identity == ["0.q"]
    assert out.deltas[0]["0.q"] is d["0.q"]
    assert out.rho == {"0.q": 0.0} and confidence(out.mean_rho(), 0.5) == 1.0
    # the solve itself gives P = (G + λI)(G + λI)⁻¹ = I too, for any batch size
    np.testing.assert_allclose(transfer(x, x, 1e-2), np.eye(in_dim), atol=1e-8)


def test_linear_chain_alignment_beats_none(syn: Any) -> None:
    """End to end on a linear network: upstream adapters moved between v and t."""
    chain = syn.chain()
    old = syn.state(version=2, seed=1, shapes=syn.chain_shapes)
    new = syn.state(version=5, seed=2, shapes=syn.chain_shapes)
    deltas = [syn.update(f"u{i}", 2, seed=10 + i, shapes=syn.chain_shapes).deltas for i in range(3)]
    aligner = Aligner(chain, lam=1e-4, cache_dtype=np.float32)
    out = aligner.align_group(deltas, old, new)
    assert out.identity == ["0.q"]  # layer 0's inputs never drift
    acts_v, acts_t = chain.activations(old), chain.activations(new)
    for lid in ("1.q", "2.v"):
        u = np.concatenate([d[lid].u for d in deltas], axis=1)
        v = np.concatenate([d[lid].v for d in deltas], axis=0)
        unaligned = residual(u, v, v, acts_v[lid], acts_t[lid])
        assert unaligned is not None and unaligned > 0.05
        assert out.rho[lid] < 0.05 * unaligned
    # the activations of both versions are cached: a second group costs no forward pass
    calls = chain.calls
    aligner.align_group(deltas[:1], old, new)
    assert chain.calls == calls
    assert aligner.cache.forward_passes == 2


def test_cache_is_bounded_and_keyed_by_version(syn: Any) -> None:
    chain = syn.chain()
    cache = ActivationCache(chain, capacity=2)
    states = [syn.state(version=v, seed=v, shapes=syn.chain_shapes) for v in range(3)]
    for s in states:
        cache.get(s)
    assert cache.versions() == [1, 2]
    assert cache.get(states[2])["1.q"].dtype == np.float16
    assert chain.calls == 3
    cache.get(states[0])
    assert chain.calls == 4 and cache.versions() == [2, 0]
    with pytest.raises(ValueError, match="≥ 2 versions"):
        ActivationCache(chain, capacity=1)


def test_fp16_overflow_falls_back_to_fp32(syn: Any) -> None:
    class Huge:
        def activations(self, state: Any) -> dict[str, np.ndarray]:
            return {"0.q": np.full((2, 3), 1e6)}

    cache = ActivationCache(Huge())
    assert cache.get(syn.state())["0.q"].dtype == np.float32


def test_prefetch_computes_a_version_once_in_the_background(syn: Any) -> None:
    chain = syn.chain()
    cache = ActivationCache(chain, capacity=4, dtype=np.float32)
    state = syn.state(version=3, seed=3, shapes=syn.chain_shapes)
    cache.prefetch(state)
    cache.prefetch(state)  # already under way: not submitted twice
    got = cache.get(state)
    assert chain.calls == 1 and cache.forward_passes == 1
    expected = syn.chain().activations(state)
    for lid, x in expected.items():
        np.testing.assert_array_equal(got[lid], x.astype(np.float32))
    cache.prefetch(state)  # cached: nothing to do
    assert chain.calls == 1
    cache.close()


def test_alignfed_calibrates_each_new_version_off_the_aggregation_path(syn: Any) -> None:
    from coordinator.strategies.alignfed import AlignFed, AlignFedConfig

    chain = syn.chain()
    af = AlignFed(AlignFedConfig(k=2), activations=chain, cache_dtype=np.float32)
    current = syn.state(version=4, seed=4, shapes=syn.chain_shapes)
    for i, base in enumerate((4, 4)):
        af.add(syn.update(f"u{i}", base, seed=i, shapes=syn.chain_shapes), 4)
    new = af.aggregate(current, 0.0).state
    assert af._aligner is not None
    af._aligner.cache.get(new)  # collected from the prefetch, not computed again
    assert chain.calls == 1 and af._aligner.cache.versions() == [5]
    af.close()


@pytest.mark.parametrize("outlier", [1.0, 1e3])
def test_woodbury_solve_equals_the_primal_solve(outlier: float) -> None:
    """n < in takes the (n, n) factor and Woodbury's identity; it must give the (in, in) solve's V′.

    `outlier` scales a few input features as LLM activations' massive dimensions do (top eigenvalue
    ~1e6 × the mean): the two routes share the condition number (μ_max + λ)/λ, so they agree to
    float64 rounding times that, far below the float16 of the cached activations.
    """
    rng = np.random.default_rng(5)
    n, in_dim, k = 48, 160, 6
    scale = np.ones(in_dim)
    scale[:3] = outlier
    x_v = rng.normal(size=(n, in_dim)) * scale  # (n, in)
    x_t = x_v @ (np.eye(in_dim) + 0.2 * rng.normal(size=(in_dim, in_dim)) / np.sqrt(in_dim))
    v = rng.normal(size=(k, in_dim))  # (k, in)
    dual = TargetSolve.of(x_t, 1e-2)
    assert dual.dual
    gram = x_t.T @ x_t
    lam = 1e-2 * np.trace(gram) / in_dim
    expected = np.linalg.solve(gram + lam * np.eye(in_dim), x_t.T @ (x_v @ v.T) + lam * v.T).T  # (k, in)
    got = dual.align(v, x_v)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 * np.abs(expected).max())
    # n ≥ in keeps the (in, in) factor
    assert not TargetSolve.of(np.vstack([x_t] * 4), 1e-2).dual
