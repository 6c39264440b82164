"""Federations on families the traced graph exports: a coordinator and two edge daemons, each its
own process, over a real Mosquitto broker, reach global version 3 with the AlignFed strategy (its
calibration runner runs the traced calib model). Qwen3 (q/k norms, decoupled head_dim) trains with
the ORT backend; Phi-3 (fused qkv and gate_up projections) with the PyTorch one, the backend of
aarch64 boards, so its family forward pass (edge/torch_families.py) is what makes the updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alignfed import protocol
from coordinator.store import Store
from demo.local import lay_out
from export.bundle import export_bundle
from export.synthetic import PHI3_CONFIG, QWEN3_CONFIG, TinyConfig, write_tiny_model
from tests.support.broker import Mosquitto
from tests.support.federation import domain_devices, fast_profile, read_logs, spawn, stop, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


CASES: dict[str, tuple[TinyConfig, str, tuple[str, ...]]] = {  # family config, trainer, LoRA targets
    "qwen3-ort": (QWEN3_CONFIG, "ort", ("q", "v")),
    "phi3-torch": (PHI3_CONFIG, "torch", ("q", "v", "up")),  # two of three qkv blocks, one of gate_up
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_federation_of_a_traced_family_reaches_version_3(tmp_path: Path, broker: Mosquitto, case: str) -> None:
    config, trainer, targets = CASES[case]
    model_dir = write_tiny_model(tmp_path / config.family, config)
    bundle = tmp_path / "bundle"
    export_bundle(model_dir, bundle, targets=targets, rank=4, alpha=8.0)  # traced graph + the family's GGUF
    profile = fast_profile(tmp_path / "fast.toml", name=f"test-{trainer}", trainer=trainer)
    specs = domain_devices(tmp_path, [profile, profile], 4)
    strategy = {"name": "alignfed", "k": 2, "max_wait_s": 5.0, "tau_max": 8}
    fed = lay_out(tmp_path / "fed", bundle=bundle, broker_url=broker.url, devices=specs, strategy=strategy)
    coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=tmp_path / "coordinator.log")
    edges = [spawn("edge", "--config", str(p), log=tmp_path / f"{d}.log") for d, p in fed.device_configs.items()]
    try:
        for e in edges:
            assert e.wait(timeout=240) == 0, read_logs(tmp_path)
        store = Store(tmp_path / "fed" / "coordinator" / "coordinator.sqlite")
        wait_for(lambda: (store.latest_version() or 0) >= 3, 60, "global version 3")
        latest = store.latest_version()
        assert latest is not None and latest >= 3
        stats = store.stats()
        assert all(stats[d]["rejected"] == 0 for d in fed.device_configs), stats
        g = protocol.decode_global(store.version(latest)[0], 1 << 30)
        assert g.version == latest and g.strategy == "alignfed"
        assert any(np.abs(t).max() > 0 for k, t in g.tensors.items() if k.endswith(".B"))  # B moved off zero
        store.close()
        # each device turned a global adapter into a llama.cpp LoRA for its base
        assert sorted((tmp_path / "fed" / "dev-0" / "state" / "adapters").glob("adapter-*.gguf"))
    finally:
        stop([*edges, coord])
    assert coord.returncode == 0, read_logs(tmp_path)
