"""The adapter as a set of tensors: the bundle's initial adapter and the delta a device sends.

One place for what every program needs of an adapter's layout, so the coordinator, the device and
the simulator read and difference adapters the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from alignfed import lora, lowrank
from alignfed import manifest as mf
from alignfed.errors import BundleError


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


def compute_deltas(
    trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], m: mf.Manifest
) -> dict[str, lowrank.Factors]:
    """Exact factors of s·(B_i A_i − B_v A_v) per adapted layer, rank ≤ 2r.

    `edge.uplink.Uplink` takes their SVD and decides what of it is sent."""
    out: dict[str, lowrank.Factors] = {}
    for lid in m.layer_ids:
        layer, module = lora.split_layer_id(lid)
        a, b = lora.key(layer, module, "A"), lora.key(layer, module, "B")
        out[lid] = lowrank.difference(trained[b], trained[a], base[b], base[a], m.lora.scale)
    return out
