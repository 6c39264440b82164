"""Byzantine devices for robustness experiments: which devices lie, and how.

A Byzantine device trains honestly, then replaces its delta before it is compressed, encoded and
signed with its own key, so the coordinator sees a well-formed, correctly signed update (the
threat the robust aggregation options are for; signatures only keep out devices without a key).

| attack     | what the device sends instead of its delta Δ (per layer, (out, in) as factors)    |
|------------|-------------------------------------------------------------------------------------|
| `scale`    | 10 Δ                                                                                |
| `signflip` | −Δ                                                                                  |
| `random`   | Gaussian factors of Δ's shapes, rescaled to ‖Δ‖_F per layer (noise, honest size)   |
| `mixed`    | the three above, in turn over the Byzantine devices                                 |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from alignfed.errors import ConfigError
from alignfed.lowrank import Factors

ATTACKS: tuple[str, ...] = ("scale", "signflip", "random", "mixed")
PURE: tuple[str, ...] = ("scale", "signflip", "random")
SCALE = 10.0


def check(fraction: float, attack: str) -> None:
    if not (0.0 <= fraction < 1.0):
        raise ConfigError(f"simulation: byzantine must be a fraction in [0, 1), got {fraction}")
    if attack not in ATTACKS:
        raise ConfigError(f"simulation: attack must be one of {', '.join(ATTACKS)}, got {attack!r}")


def assign(
    devices: Sequence[str], round_seconds: Sequence[float], fraction: float, attack: str, seed: int
) -> dict[str, str]:
    """device id -> its attack, for round(fraction · N) devices spread evenly over the fleet ordered
    by round time (a seeded offset picks where in each stride).

    Spread, not drawn at random: in a fleet whose speeds differ 10×, a random pick of slow devices
    sends 2 % of the updates and a pick of fast ones half of them; evenly spread, the hostile share
    of updates stays close to the hostile share of devices, which is what `fraction` promises.
    """
    check(fraction, attack)
    if len(round_seconds) != len(devices):
        raise ValueError(f"attacks: {len(devices)} devices but {len(round_seconds)} round times")
    count = round(fraction * len(devices))
    if count == 0:
        return {}
    order = sorted(range(len(devices)), key=lambda i: (round_seconds[i], devices[i]))  # fastest first
    stride = len(devices) / count
    offset = float(np.random.default_rng([seed, 0xB7]).random())
    chosen = [order[min(int((j + offset) * stride), len(devices) - 1)] for j in range(count)]
    kinds = PURE if attack == "mixed" else (attack,)
    return {devices[i]: kinds[j % len(kinds)] for j, i in enumerate(sorted(chosen))}


def corrupt(deltas: Mapping[str, Factors], attack: str, rng: np.random.Generator) -> dict[str, Factors]:
    """The delta a Byzantine device sends instead of `deltas`."""
    if attack == "scale":
        return {lid: Factors(u=(SCALE * f.u).astype(f.u.dtype), v=f.v) for lid, f in deltas.items()}
    if attack == "signflip":
        return {lid: Factors(u=-f.u, v=f.v) for lid, f in deltas.items()}
    if attack == "random":
        out = {}
        for lid, f in deltas.items():
            u = rng.normal(size=f.u.shape)  # (out, k)
            v = rng.normal(size=f.v.shape)  # (k, in)
            noise = Factors(u=u, v=v)
            norm = float(np.sqrt(noise.squared_norm()))
            scale = np.sqrt(f.squared_norm()) / norm if norm > 0 else 0.0
            out[lid] = Factors(u=(scale * u).astype(f.u.dtype), v=v.astype(f.v.dtype))
        return out
    raise ConfigError(f"attack {attack!r}: expected one of {', '.join(PURE)} per device")
