"""Byzantine devices in the simulator, and the robust options measured against the clean run.

CI-sized: the tiny model, 5 devices of one class of which 1 (20 % of devices and of updates) is
hostile, 20 versions. The meaningful-size figures are in docs/results.md section 6.

The simulator's coordinator runs ingest validation like the live one, whose per-layer norm bound
(`IngestLimits.max_delta_norm`) refuses some scaled updates on its own; the robust options are
measured with that bound off, so what they hold is theirs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from alignfed import protocol
from alignfed.errors import ConfigError
from alignfed.lowrank import Factors
from coordinator.ingest import IngestLimits
from simulator import attacks
from simulator.engine import Simulation
from simulator.experiment import make_strategy, run_variant
from simulator.fleet import FleetConfig
from simulator.metrics import RunResult, late_mean
from simulator.rounds import Round
from simulator.testbed import Testbed
from simulator.variants import standard_variant
from simulator.versions import VersionHistory
from tests.simulator.conftest import OVERRIDES, make_sim_config, make_testbed_config


@pytest.fixture(scope="module")
def five(tiny_bundle: Path) -> Testbed:
    fleet = FleetConfig(devices=5, classes=1, overrides={**OVERRIDES, "lr": 0.05})
    return Testbed.build(make_testbed_config(tiny_bundle, fleet=fleet))


def test_assignment_is_seeded_and_mixed_cycles_the_attacks() -> None:
    ids = [f"d{i}" for i in range(10)]
    seconds = [1.0, 10.0] * 5  # two speed classes, 10× apart
    first = attacks.assign(ids, seconds, 0.2, "scale", seed=0)
    assert len(first) == 2 and set(first.values()) == {"scale"}
    assert sorted(seconds[ids.index(d)] for d in first) == [1.0, 10.0]  # one of each class
    assert attacks.assign(ids, seconds, 0.2, "scale", seed=0) == first
    mixed = attacks.assign(ids, seconds, 0.3, "mixed", seed=1)
    assert sorted(mixed.values()) == ["random", "scale", "signflip"]
    assert attacks.assign(ids, seconds, 0.0, "mixed", seed=0) == {}
    with pytest.raises(ConfigError, match="attack must be one of scale, signflip, random, mixed"):
        attacks.assign(ids, seconds, 0.2, "lie", seed=0)
    with pytest.raises(ConfigError, match=r"byzantine must be a fraction in \[0, 1\)"):
        make_sim_config(byzantine=1.0)


def test_corrupted_deltas_keep_shapes_and_the_promised_norms() -> None:
    rng = np.random.default_rng(0)
    honest = {"0.q": Factors(u=rng.normal(size=(8, 4)), v=rng.normal(size=(4, 6)))}
    d = honest["0.q"].dense()
    np.testing.assert_allclose(attacks.corrupt(honest, "scale", rng)["0.q"].dense(), 10 * d)
    np.testing.assert_allclose(attacks.corrupt(honest, "signflip", rng)["0.q"].dense(), -d)
    noise = attacks.corrupt(honest, "random", rng)["0.q"]
    assert noise.shape == (8, 6)
    assert np.linalg.norm(noise.dense()) == pytest.approx(np.linalg.norm(d))
    assert abs(np.sum(noise.dense() * d)) < 0.9 * np.linalg.norm(d) ** 2  # not the honest direction


def test_a_byzantine_update_is_signed_with_the_devices_own_key(five: Testbed) -> None:
    cfg = make_sim_config(byzantine=0.2, attack="scale", wire_quantization="fp32")
    clean_cfg = make_sim_config(wire_quantization="fp32")
    variant = standard_variant("fedbuff", devices=5, k=2)
    sims = []
    for c in (cfg, clean_cfg):
        history = VersionHistory(five.initial)
        sims.append(Simulation("fedbuff", make_strategy(variant, five, history), five, c, history=history))
    hostile, clean = sims
    (device,) = hostile.byzantine
    rng = np.random.default_rng(0)
    trained = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in five.initial.tensors.items()}
    got = []
    for sim in (hostile, clean):
        dev = sim.devices[device]
        started = Round(device, five.initial, 0.0, 1.0, [], 0, 0, 1.0)
        _, payload = sim.rounds.encode(dev, started, trained, 0.0)
        decoded = protocol.decode_update(payload, 1 << 24)
        assert decoded.verify(dev.key)  # the coordinator's signature check passes
        got.append(decoded.update.deltas)
    for lid in got[0]:
        np.testing.assert_allclose(got[0][lid].dense(), 10 * got[1][lid].dense(), rtol=1e-4, atol=1e-7)


def _run(testbed: Testbed, name: str, **changes: object) -> RunResult:
    variant = standard_variant(name, devices=len(testbed.devices), k=3)
    return run_variant(variant, testbed, make_sim_config(horizon_s=600.0, max_versions=20, **changes))


UNBOUNDED = IngestLimits(max_delta_norm=math.inf)  # the coordinator's norm bound off


def test_robust_options_hold_eval_loss_near_the_clean_run(five: Testbed) -> None:
    clean = late_mean(_run(five, "fedbuff").curve)
    attacked = late_mean(_run(five, "fedbuff", byzantine=0.2, attack="scale", limits=UNBOUNDED).curve)
    robust = {
        name: late_mean(_run(five, name, byzantine=0.2, attack="scale", limits=UNBOUNDED).curve)
        for name in ("fedbuff+median", "fedbuff+clip", "fedbuff+outlier")
    }
    gaps = {name: loss / clean - 1 for name, loss in robust.items()}
    print(
        f"\nbyzantine 20 % scale×10, late mean eval loss: clean {clean:.4f}, fedbuff {attacked:.4f} "
        f"({attacked / clean - 1:+.1%}), " + ", ".join(f"{n} {robust[n]:.4f} ({g:+.1%})" for n, g in gaps.items())
    )
    # the attack does damage without a robust option (+4.5 % to +5.5 % as message sizes, and so the
    # virtual arrival order, changed with the protocol's fields); each option undoes most of it
    damage = attacked / clean - 1
    assert damage > 0.03
    for name, gap in gaps.items():
        assert gap < min(0.05, damage), f"{name}: {gap:+.1%} off the clean run (attack: {damage:+.1%})"


def test_the_ingest_norm_bound_refuses_only_the_hostile_devices_scaled_updates(five: Testbed) -> None:
    cfg = make_sim_config(byzantine=0.2, attack="scale")
    (hostile,) = attacks.assign(
        [d.device_id for d in five.devices], [cfg.timing.train_s(d.profile) for d in five.devices], 0.2, "scale", 0
    )
    clean = late_mean(_run(five, "fedbuff").curve)
    bounded = _run(five, "fedbuff", byzantine=0.2, attack="scale")
    unbounded = _run(five, "fedbuff", byzantine=0.2, attack="scale", limits=UNBOUNDED)
    rejects = [e for e in bounded.events if e.kind == "reject"]
    print(
        f"\nbyzantine 20 % scale×10 under the default norm bound: {len(rejects)} of "
        f"{bounded.accepted[hostile] + len(rejects)} hostile updates refused; late mean eval loss "
        f"{late_mean(bounded.curve):.4f} ({late_mean(bounded.curve) / clean - 1:+.1%}) vs "
        f"{late_mean(unbounded.curve):.4f} ({late_mean(unbounded.curve) / clean - 1:+.1%}) without the bound"
    )
    assert rejects and {e.device for e in rejects} == {hostile}
    bound = IngestLimits().max_delta_norm
    assert all(e.detail.startswith("norm of layer") and e.detail.endswith(f"bound is {bound:.3g}") for e in rejects)
    assert dict(bounded.rejected) == {hostile: len(rejects)} and not unbounded.rejected
    assert late_mean(bounded.curve) < late_mean(unbounded.curve)  # what the bound refused did not do its damage
