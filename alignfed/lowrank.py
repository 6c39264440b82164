"""Low-rank factorization of adapter products, and int8 row quantization of factors.

Everything here works on a dense matrix M (out, in) or on factors U (out, k), V (k, in) with
M = U @ V. Pure numpy, float64 inside for stability, float32 out.

PCA is the truncated SVD (Eckart–Young: the best rank-k approximation in Frobenius norm); QRCP and
CUR pick actual columns/rows of M and trade a little accuracy for interpretability and cost
("Fully asynchronous FL for LLMs", ICLR 2026 workshop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Method = Literal["pca", "qrcp", "cur"]


@dataclass(frozen=True, slots=True)
class Factors:
    """M ≈ u @ v with u: (out, k), v: (k, in)."""

    u: np.ndarray
    v: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.u.shape[0]), int(self.v.shape[1])

    def dense(self) -> np.ndarray:
        return self.u.astype(np.float64) @ self.v.astype(np.float64)

    def squared_norm(self) -> float:
        """‖u @ v‖_F² = tr((uᵀu)(v vᵀ)), O((out + in)·k²) without forming the product."""
        u, v = self.u.astype(np.float64), self.v.astype(np.float64)
        return float(np.sum((u.T @ u) * (v @ v.T)))


# CholeskyQR2 is accepted when the first pass left Q₁ this close to orthonormal: ‖Q₁ᵀQ₁ − I‖_F ≤ 0.1
# means cond(Q₁) ≤ 1.1, and the second pass then reaches orthogonality at float64 rounding
# (Yamamoto et al., "Roundoff error analysis of the CholeskyQR2 algorithm", 2015).
_CHOLQR_TOLERANCE = 0.1


def thin_qr(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (m, k) = q (m, k) @ r (k, k), q with orthonormal columns, for tall x (m ≫ k), float64.

    CholeskyQR2 — R₁ = chol(xᵀx), Q₁ = x R₁⁻¹, then the same on Q₁ — is matrix products on (m, k)
    and factorizations of (k, k) only: 2–3× faster than Householder QR (LAPACK's unblocked
    level-2 path at k ≤ 32) on the adapter shapes, which is most of a device's uplink compression
    and of the server's re-factorization. When x is rank-deficient or too ill-conditioned for it
    (a zero B at version 0; cond(x) ≳ 1e7), Householder QR runs instead; both give q spanning x's
    columns with qᵀq = I to rounding.
    """
    m, k = x.shape
    if k == 0 or m < k:
        return _householder(x)
    try:
        l1 = np.linalg.cholesky(x.T @ x)  # (k, k) lower, xᵀx = L₁L₁ᵀ
        q1 = x @ _lower_inverse(l1).T  # (m, k) = x R₁⁻¹ with R₁ = L₁ᵀ
        g2 = q1.T @ q1  # (k, k)
        if np.linalg.norm(g2 - np.eye(k)) > _CHOLQR_TOLERANCE:
            raise np.linalg.LinAlgError("first CholeskyQR pass too far from orthonormal")
        l2 = np.linalg.cholesky(g2)
    except np.linalg.LinAlgError:
        return _householder(x)
    return q1 @ _lower_inverse(l2).T, (l1 @ l2).T  # Q = Q₁R₂⁻¹, R = R₂R₁


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """L⁻¹ of a lower-triangular (k, k) L by LAPACK's triangular inverse (4× cheaper than a general inverse)."""
    import scipy.linalg.lapack

    inverse, info = scipy.linalg.lapack.dtrtri(lower, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"triangular inverse failed (dtrtri info {info})")
    return np.asarray(inverse)


def _householder(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q, r = np.linalg.qr(x)  # (m, min(m, k)), (min(m, k), k)
    return q, r


@dataclass(frozen=True, slots=True)
class Svd:
    """Thin SVD M = u @ diag(s) @ vt, float64: u (out, p) and vt (p, in) orthonormal, s (p,) descending."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray

    @classmethod
    def of_dense(cls, m: np.ndarray) -> Svd:
        u, s, vt = np.linalg.svd(np.asarray(m, dtype=np.float64), full_matrices=False)
        return cls(u=u, s=s, vt=vt)

    @classmethod
    def of_factors(cls, f: Factors) -> Svd:
        """Exact SVD of u @ v without forming it: QR both sides, SVD the (k, k) core.

        Cost O((out + in) k^2) instead of O(out * in * min(out, in)) for the dense product (`thin_qr`).
        """
        qu, ru = thin_qr(f.u.astype(np.float64))  # qu (out, k), ru (k, k)
        qv, rv = thin_qr(f.v.astype(np.float64).T)  # qv (in, k), rv (k, k)
        cu, s, cvt = np.linalg.svd(ru @ rv.T)  # core (k', k''): u @ v = qu @ core @ qv.T
        return cls(u=qu @ cu[:, : s.size], s=s, vt=cvt[: s.size] @ qv.T)

    def head(self, k: int) -> Factors:
        """The best rank-k approximation, singular values split evenly between the two factors."""
        root = np.sqrt(self.s[:k])
        return Factors(u=(self.u[:, :k] * root).astype(np.float32), v=(root[:, None] * self.vt[:k]).astype(np.float32))

    def tail_norm(self, k: int) -> float:
        """‖M − M_k‖_F = sqrt(Σ_{i>k} σ_i²) (Eckart–Young)."""
        return float(np.sqrt(np.sum(np.square(self.s[k:]))))


def stack(parts: list[Factors]) -> Factors:
    """Σ_j u_j @ v_j as one pair: [u_1 … u_n] (out, Σk) @ [v_1; …; v_n] (Σk, in)."""
    if not parts:
        raise ValueError("stack: no factors")
    return Factors(u=np.concatenate([p.u for p in parts], axis=1), v=np.concatenate([p.v for p in parts], axis=0))


def pca(m: np.ndarray, rank: int) -> Factors:
    """Best rank-`rank` approximation of m (out, in) by truncated SVD, singular values split evenly."""
    sv = Svd.of_dense(m)
    return sv.head(min(rank, sv.s.size))


def reduce(f: Factors, rank: int) -> Factors:
    """Best rank-`rank` approximation of u @ v without forming it (see `Svd.of_factors`).

    This is what an edge device runs on its delta, and the server on the stacked aggregate.
    """
    sv = Svd.of_factors(f)
    return sv.head(min(rank, sv.s.size))


def difference(b_new: np.ndarray, a_new: np.ndarray, b_old: np.ndarray, a_old: np.ndarray, scale: float) -> Factors:
    """Exact factors of s·(B_new A_new − B_old A_old), rank ≤ 2r: [sB_new, −sB_old] @ [A_new; A_old]."""
    u = np.concatenate([scale * b_new, -scale * b_old], axis=1)  # (out, 2r)
    v = np.concatenate([a_new, a_old], axis=0)  # (2r, in)
    return Factors(u=u.astype(np.float32), v=v.astype(np.float32))


def truncate_lora(a: np.ndarray, b: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The LoRA pair of rank ≤ `rank` whose product is closest to s·B @ A, in the same shapes.

    A: (r, in), B: (out, r) → A_k: (r, in), B_k: (out, r) with only the first k = min(rank, r)
    components non-zero. s·B_k A_k is the best rank-k approximation of M = s·B A (Eckart–Young: the
    top k singular triplets; exact when rank(M) ≤ k). Each σ is split as the server splits its
    adapters (`to_adapter`: A = √σ·Vᵀ, s·B = U·√σ), so a global the server made truncates to its
    own first k components, untouched, and a capped device trains exactly those; any other split
    has the same product, only other training dynamics.

    Components M does not use (σ = 0) cannot be found by an SVD; they are filled with A's own
    rows whose B column is zero, in order, with B's column left zero: the product does not change,
    and a fresh adapter (B = 0, A = LoRA's random init) truncates to its first k rows, trainable,
    instead of to A = B = 0, where every gradient is zero. Zero rows and columns stay exactly zero
    in training (their gradients are products with the other factor's zero), so the rank-r graph
    trains a rank-k adapter. The scale s = alpha/r is unchanged: the product keeps its meaning.
    """
    r = a.shape[0]
    if b.shape[1] != r:
        raise ValueError(f"truncate_lora: A is {a.shape}, B is {b.shape}; expected A (r, in), B (out, r)")
    if rank < 1:
        raise ValueError(f"truncate_lora: rank must be ≥ 1, got {rank}")
    if rank >= r:
        return np.array(a, dtype=np.float32), np.array(b, dtype=np.float32)
    return _balanced(a, b, rank, scale)


def canonical_lora(a: np.ndarray, b: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The same product s·B A in its balanced SVD factors (`truncate_lora` at the full rank r).

    A = √σ·Vᵀ, s·B = U·√σ, components in descending σ: the factors the server's re-factorization
    makes (`to_adapter`), whatever rotation R (A → R A, B → B Rᵀ) carried them. The product is
    unchanged, but training is not: AdamW normalizes each coordinate separately, so its steps —
    with one local step, nearly sign descent — depend on the basis of the rank-r space. A device
    therefore trains from these factors, not from the rotated ones a delta downlink's gauge
    (`alignfed.downlink.gauge`) chose to keep version-to-version changes small (decisions §30).
    Signs and the order of equal σ stay arbitrary; per-coordinate AdamW does not see either.
    """
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"canonical_lora: A is {a.shape}, B is {b.shape}; expected A (r, in), B (out, r)")
    return _balanced(a, b, a.shape[0], scale)


def _balanced(a: np.ndarray, b: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The rank-`rank` part of s·B A as balanced SVD factors in A's and B's shapes (`truncate_lora`)."""
    r = a.shape[0]
    sv = Svd.of_factors(Factors(u=scale * b.astype(np.float64), v=a))
    # numerical rank (numpy.linalg.matrix_rank's tolerance): what lies below is rounding, not direction
    tol = sv.s[0] * max(b.shape[0], a.shape[1]) * np.finfo(np.float64).eps if sv.s.size else 0.0
    used = min(rank, int(np.count_nonzero(sv.s > tol)))
    top = sv.head(used)
    a_k = np.zeros(a.shape, dtype=np.float32)
    b_k = np.zeros(b.shape, dtype=np.float32)
    a_k[:used], b_k[:, :used] = top.v, top.u / scale
    seeds = [j for j in range(r) if not np.any(b[:, j]) and np.any(a[j])][: rank - used]
    a_k[used : used + len(seeds)] = a[seeds]
    return a_k, b_k


@dataclass(frozen=True, slots=True)
class AdapterSplit:
    """M = s·B@A + residual + (what the residual's rank cap dropped, of norm `dropped`)."""

    a: np.ndarray  # (r, in)
    b: np.ndarray  # (out, r)
    residual: Factors  # (out, q) @ (q, in), q ≤ residual_rank; the server's error feedback
    dropped: float  # ‖M − s·B@A − residual‖_F


def to_adapter(m: Factors, rank: int, scale: float, method: Method = "pca", residual_rank: int = 0) -> AdapterSplit:
    """Factor a product given as factors, m ≈ s·B@A, into LoRA factors of rank `rank`.

    Works in the factors' span only (`Svd.of_factors`): the server never forms an (out, in)
    matrix. The residual m − s·B@A is returned as factors truncated to its best rank
    `residual_rank` (0 keeps none); `dropped` says how much that cap lost. Ranks below `rank`
    (tiny layers) are zero-padded so shapes stay fixed.
    """
    sv = Svd.of_factors(m)
    k = min(rank, sv.s.size)
    f = _from_svd(sv, k, method)
    if method != "pca":
        # QRCP/CUR factors are lopsided (QRCP: orthonormal u, all magnitude in v), which would give
        # devices a badly scaled LoRA start; an exact SVD of the rank-k product splits it evenly.
        f = reduce(f, f.rank)
    out_dim, in_dim = m.shape
    a = np.zeros((rank, in_dim), dtype=np.float32)
    b = np.zeros((out_dim, rank), dtype=np.float32)
    a[: f.rank] = f.v
    b[:, : f.rank] = f.u / scale
    if method == "pca":
        rest = Svd(u=sv.u[:, k:], s=sv.s[k:], vt=sv.vt[k:])  # M − M_k exactly: the spectrum's tail
    else:
        rest = Svd.of_factors(stack([sv.head(sv.s.size), Factors(u=-f.u, v=f.v)]))
    q = min(residual_rank, rest.s.size)
    return AdapterSplit(a=a, b=b, residual=rest.head(q), dropped=rest.tail_norm(q))


def factorize(m: np.ndarray, rank: int, method: Method = "pca") -> Factors:
    if method == "pca":
        return pca(m, rank)
    if method == "qrcp":
        return qrcp(m, rank)
    if method == "cur":
        return cur(m, rank)
    raise ValueError(f"unknown factorization {method!r}; expected one of pca, qrcp, cur")


def _from_svd(sv: Svd, k: int, method: Method) -> Factors:
    if method == "pca":
        return sv.head(k)
    if method == "qrcp":
        return _qrcp(sv, k)
    if method == "cur":
        return _cur(sv, k)
    raise ValueError(f"unknown factorization {method!r}; expected one of pca, qrcp, cur")


def qrcp(m: np.ndarray, rank: int) -> Factors:
    """Rank-k approximation from QR with column pivoting: M ≈ Q_k (Q_kᵀ M); float64 factors."""
    sv = Svd.of_dense(m)
    return _qrcp(sv, min(rank, sv.s.size))


def cur(m: np.ndarray, rank: int) -> Factors:
    """CUR decomposition M ≈ C U R with k columns and k rows chosen by pivoted QR (deterministic).

    C (out, k) are actual columns of M, R (k, in) actual rows; U = C⁺ M R⁺ is the optimal core.
    Factors are float64 (see `_cur`).
    """
    sv = Svd.of_dense(m)
    return _cur(sv, min(rank, sv.s.size))


def _qrcp(sv: Svd, k: int) -> Factors:
    """QRCP of M = U·(diag(s)·Vᵀ): U has orthonormal columns, so pivoted QR of the (p, in) matrix
    C = diag(s)·Vᵀ picks the same columns as pivoted QR of M, and Q_M = U·Q_C."""
    import scipy.linalg

    c = sv.s[:, None] * sv.vt  # (p, in)
    q, _, _ = scipy.linalg.qr(c, mode="economic", pivoting=True)  # q (p, p')
    qk = q[:, :k]
    return Factors(u=sv.u @ qk, v=qk.T @ c)  # float64: see `_cur`


def _cur(sv: Svd, k: int) -> Factors:
    """CUR with columns pivoted on diag(s)·Vᵀ and rows on (U·diag(s))ᵀ (same pivots as on M, Mᵀ)."""
    import scipy.linalg

    us = sv.u * sv.s  # (out, p)
    sv_t = sv.s[:, None] * sv.vt  # (p, in)
    _, _, cols = scipy.linalg.qr(sv_t, mode="economic", pivoting=True)
    _, _, rows = scipy.linalg.qr(us.T, mode="economic", pivoting=True)
    c = us @ sv.vt[:, cols[:k]]  # (out, k): actual columns of M
    r = us[rows[:k]] @ sv.vt  # (k, in): actual rows of M
    # C⁺ M R⁺ (k, k), pseudo-inverses cut at 1e-10 relative: C and R inherit M's conditioning, and
    # directions below that are rounding noise that an exact inverse would amplify by up to 1/σ_min
    core = (np.linalg.pinv(c, rcond=1e-10) @ us) @ (sv.vt @ np.linalg.pinv(r, rcond=1e-10))
    # float64 on purpose: for ill-conditioned M the core is huge (∝ 1/σ_min) and C·(core R) cancels;
    # rounded to float32 that product would be off by eps32·‖C‖‖core R‖. `to_adapter` rounds only
    # the balanced A, B it makes from these.
    return Factors(u=c, v=core @ r)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization per row: x ≈ q * scale[:, None]; q (n, m) int8, scale (n,) f32."""
    x32 = np.asarray(x, dtype=np.float32)
    peak = np.max(np.abs(x32), axis=1) if x32.size else np.zeros(x32.shape[0], np.float32)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(x32 / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


# 4-bit codes are symmetric in [−7, 7]; −8 never encodes a value and pads the last byte of a row of
# odd length, so a receiver learns a row's length from the data alone (it holds no manifest).
INT4_PAD = -8


def quantize_rows4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit quantization per row, two codes a byte: x ≈ codes * scale[:, None].

    x (n, m) → packed int8 (n, ⌈m/2⌉) (low nibble: even column, high nibble: odd column), scale (n,)
    f32. A row of odd length ends in the code INT4_PAD.
    """
    x32 = np.asarray(x, dtype=np.float32)
    n, m = x32.shape
    peak = np.max(np.abs(x32), axis=1) if x32.size else np.zeros(n, np.float32)
    scale = np.where(peak > 0, peak / 7.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x32 / scale[:, None]), -7, 7).astype(np.int8)
    if m % 2:
        codes = np.concatenate([codes, np.full((n, 1), INT4_PAD, np.int8)], axis=1)
    nibbles = codes.view(np.uint8) & 0x0F  # two's complement nibbles
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed.view(np.int8), scale


def unpack_rows4(packed: np.ndarray) -> np.ndarray:
    """The int8 codes (n, m) of `quantize_rows4`'s packed rows; m is odd when every row ends in INT4_PAD.

    Raises ValueError when the padding code appears anywhere else, or in some rows' last place only.
    """
    p = np.asarray(packed).view(np.uint8)
    n, w = p.shape
    codes = np.empty((n, 2 * w), dtype=np.uint8)
    codes[:, 0::2] = p & 0x0F
    codes[:, 1::2] = p >> 4
    signed = ((codes.astype(np.int16) ^ 8) - 8).astype(np.int8)  # nibble → [−8, 7]
    pad = signed == INT4_PAD
    if n and w and pad[:, -1].all() and not pad[:, :-1].any():
        return signed[:, :-1]
    if pad.any():
        raise ValueError("4-bit codes hold the padding code −8 in a place other than every row's last")
    return signed


def dequantize_rows4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return unpack_rows4(packed).astype(np.float32) * scale.astype(np.float32)[:, None]
