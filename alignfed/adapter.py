"""The adapter as a set of tensors: the bundle's initial adapter and the delta a device sends.

One place for what every program needs of an adapter's layout, so the coordinator, the device and
the simulator read and difference adapters the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from alignfed import lora, lowrank
from alignfed import manifest as mf
from alignfed.errors import BundleError, TrainingError


def initial_adapter(bundle: Path, manifest: mf.Manifest) -> dict[str, np.ndarray]:
    """The bundle's version-0 adapter, checked against the manifest's LoRA layout."""
    path = Path(bundle) / mf.ADAPTER_INIT
    if not path.is_file():
        raise BundleError(f"{bundle}: missing {mf.ADAPTER_INIT}")
    tensors = load_file(str(path))
    shapes = manifest.lora_shapes()
    if {k: tuple(v.shape) for k, v in tensors.items()} != shapes:
        raise BundleError(f"{path}: tensors do not match the manifest's LoRA layout")
    return tensors


def truncate(tensors: Mapping[str, np.ndarray], m: mf.Manifest, rank: int) -> dict[str, np.ndarray]:
    """The adapter a device capped at LoRA rank `rank` trains from: every layer's B A replaced by its
    best rank-k approximation (`lowrank.truncate_lora`), shapes unchanged (components beyond k are
    zero). The adapter itself (a copy) when `rank` ≥ the bundle's rank r."""
    if rank >= m.lora.rank:
        return {name: np.array(t, dtype=np.float32) for name, t in tensors.items()}
    return _each_layer(tensors, m, lambda a, b: lowrank.truncate_lora(a, b, rank, m.lora.scale))


def training_start(tensors: Mapping[str, np.ndarray], m: mf.Manifest, rank: int) -> dict[str, np.ndarray]:
    """The factors a device of LoRA rank `rank` trains from, given a global adapter's tensors.

    Capped (`rank` < r): the best rank-k approximation (`truncate`). Otherwise the same product in
    its balanced SVD factors (`lowrank.canonical_lora`): the basis the server's re-factorization
    makes, whichever rotation of it the downlink carried — AdamW's steps depend on that basis."""
    if rank < m.lora.rank:
        return truncate(tensors, m, rank)
    return _each_layer(tensors, m, lambda a, b: lowrank.canonical_lora(a, b, m.lora.scale))


def _each_layer(
    tensors: Mapping[str, np.ndarray],
    m: mf.Manifest,
    refactor: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> dict[str, np.ndarray]:
    """A float32 copy of `tensors` with every adapted layer's (A, B) replaced by `refactor(A, B)`."""
    out = {name: np.array(t, dtype=np.float32) for name, t in tensors.items()}
    for lid in m.layer_ids:
        layer, module = lora.split_layer_id(lid)
        a, b = lora.key(layer, module, "A"), lora.key(layer, module, "B")
        out[a], out[b] = refactor(tensors[a], tensors[b])
    return out


def compute_deltas(
    trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], m: mf.Manifest, rank: int = 0
) -> dict[str, lowrank.Factors]:
    """Exact factors of s·(B_i A_i − B_v A_v) per adapted layer, rank ≤ 2r.

    `rank` k > 0: both adapters are of rank k (a capped device's start, `truncate`, and what it
    trained from it, whose components beyond k stay zero), so only their first k components are
    differenced: factors of rank ≤ 2k. `edge.uplink.Uplink` takes their SVD and decides what of it
    is sent."""
    k = min(rank or m.lora.rank, m.lora.rank)
    out: dict[str, lowrank.Factors] = {}
    for lid in m.layer_ids:
        layer, module = lora.split_layer_id(lid)
        a, b = lora.key(layer, module, "A"), lora.key(layer, module, "B")
        if k < m.lora.rank and (np.any(trained[a][k:]) or np.any(trained[b][:, k:])):
            raise TrainingError(
                f"layer {lid}: the trained adapter has non-zero components beyond its rank {k}; "
                "a capped device must train from `truncate`'s adapter, whose extra components stay zero"
            )
        out[lid] = lowrank.difference(trained[b][:, :k], trained[a][:k], base[b][:, :k], base[a][:k], m.lora.scale)
    return out
