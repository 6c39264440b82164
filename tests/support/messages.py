"""An AdapterUpdate with plain defaults, for tests that care about a few of its fields."""

from __future__ import annotations

import dataclasses
from typing import Any

from alignfed import protocol


def adapter_update(**changes: Any) -> protocol.AdapterUpdate:  # any field; the dataclass checks it
    """dev-1's update u1 on version 2 of bundle "B", no deltas; `changes` replace any field."""
    base = protocol.AdapterUpdate(
        device_id="dev-1",
        update_id="u1",
        seq=1,
        base_version=2,
        bundle="B",
        samples=8,
        local_steps=2,
        train_loss=1.0,
        wall_time=0.1,
        profile="x86-laptop",
        created_at=0.0,
        deltas={},
    )
    return dataclasses.replace(base, **changes)
