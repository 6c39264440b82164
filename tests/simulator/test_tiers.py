"""The two-tier simulation: sites buffer and combine, the root folds every update per device."""

from __future__ import annotations

from coordinator.strategies.fedbuff import FedBuff
from simulator.engine import Simulation
from simulator.testbed import Testbed
from simulator.tiers import SiteTier
from simulator.versions import VersionHistory
from tests.simulator.conftest import make_sim_config


def test_sites_forward_and_the_root_folds_per_device(testbed: Testbed) -> None:
    site_of = {d.device_id: f"site-{i % 2}" for i, d in enumerate(testbed.devices)}
    tier = SiteTier(
        FedBuff(k=2), site_of, k=2, max_wait_s=5.0, weighting="uniform", max_rank=2 * testbed.manifest.lora.rank
    )
    history = VersionHistory(testbed.initial)
    run = Simulation("fedbuff-2tier", tier, testbed, make_sim_config(), history=history).run()
    assert tier.site_updates >= 2 and tier.dropped == 0
    assert run.final is not None and run.final.version >= 2
    # the root saw devices, not sites: folds are counted per device, and only what the devices sent
    assert set(run.folded) <= set(site_of) and len(run.folded) >= 2
    assert sum(run.folded.values()) + len(tier.pending()) == sum(run.accepted.values())
