"""The coordinator's step without I/O: validate an update → hand it to the strategy → make a version.

Every program that coordinates calls this module instead of writing the step again:

| caller | uses |
|---|---|
| the MQTT service (`service`) | `Intake` then `Core.offer` (the store commits in between), `Core.next_version` |
| an ingest worker (`worker`) | `Intake` only: workers hold no strategy |
| the site coordinator (`site`) | `Intake` only: a site never makes versions |
| the elected aggregator (`aggregator`) | `Core.offer` for updates a worker validated, `Core.next_version` |
| the simulator (`simulator/coordination.py`) | `Core.admit` (validate → strategy), `Core.next_version` |

Nothing here touches MQTT or a database or reads the time of day: the caller passes `now` (wall
seconds live, virtual seconds in the simulator), gives the intake the device keys and the stored
versions as functions, and stores a `NewVersion` wherever it keeps versions before calling
`Core.advance`. The one host measure, `NewVersion.took_s`, is for the operator's dashboard.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignfed import manifest as mf
from alignfed import protocol
from alignfed.downlink import Broadcaster, Step
from alignfed.manifest import Manifest
from coordinator import ingest
from coordinator.ingest import IngestLimits
from coordinator.strategies import server_update
from coordinator.strategies.base import AdapterState, Aggregation, ClientUpdate, Strategy
from coordinator.tier import client_updates


class Intake:
    """Checks device updates against one bundle: each payload decoded once, then `ingest.validate`."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        limits: IngestLimits,
        key_of: Callable[[str], bytes | None],
        has_version: Callable[[int], bool],
    ) -> None:
        """`key_of`: device id -> its HMAC key (None: unknown); `has_version`: whether a global
        version is stored (an update's base must be)."""
        self.manifest = manifest
        self.bundle = mf.bundle_digest(manifest)
        self.limits = limits
        self.payload_limit = ingest.payload_limit(limits, manifest)
        self.key_of = key_of
        self.has_version = has_version

    def decode(self, payload: bytes) -> protocol.Decoded:
        """The one decode of a payload; `RejectedUpdate` ("malformed: …") if it does not decode."""
        return ingest.decode(payload, self.payload_limit)

    def validate(
        self, device_id: str, payload: bytes | protocol.Decoded, current_version: int
    ) -> protocol.AdapterUpdate:
        """The update, or `RejectedUpdate` with the reason for the ack (see `ingest.validate`)."""
        return ingest.validate(
            device_id,
            payload,
            manifest=self.manifest,
            bundle=self.bundle,
            key_of=self.key_of,
            has_version=self.has_version,
            current_version=current_version,
            limits=self.limits,
        )

    def signed_by(self, device_id: str, decoded: protocol.Decoded) -> bool:
        """Whether a decoded update is `device_id`'s own and correctly signed (a resend may be
        answered from the store only then: anyone else could replay its id)."""
        key = self.key_of(device_id)
        return key is not None and decoded.update.device_id == device_id and decoded.verify(key)

    def update_id_of(self, payload: bytes) -> str:
        """Best-effort update id of a payload that failed to decode, for the reject ack."""
        return ingest.update_id_of(payload, self.payload_limit)


@dataclass(frozen=True, slots=True)
class Folded:
    """One update a new version folded in, with the normalised weight the strategy gave it."""

    update: ClientUpdate
    weight: float


@dataclass(frozen=True, slots=True)
class NewVersion:
    """A version made but not yet committed: the caller stores `encoded`, then calls `Core.advance`."""

    adapter: protocol.GlobalAdapter  # its metrics: the strategy's, plus what the caller added
    encoded: bytes  # the retained message
    state: AdapterState  # what `Core.current` becomes, error-feedback residual included
    parent: AdapterState
    folded: tuple[Folded, ...]  # in the strategy's `used` order
    took_s: float  # host seconds `aggregate` took (the operator's dashboard; never in the adapter)
    timings: Mapping[str, float] = field(default_factory=dict)  # the strategy's stages ("alignment")

    def staleness(self, f: Folded) -> int:
        """τ of a folded update: versions between its base and the version it was folded into."""
        return self.parent.version - f.update.base_version


def make_adapter(
    manifest: Manifest,
    bundle: str,
    *,
    version: int,
    parent_version: int,
    strategy: str,
    tensors: Mapping[str, np.ndarray],
    created_at: float,
    metrics: Mapping[str, Any] | None = None,
) -> protocol.GlobalAdapter:
    """The published form of a global adapter of this bundle (version 0 has parent -1)."""
    return protocol.GlobalAdapter(
        version=version,
        parent_version=parent_version,
        bundle=bundle,
        strategy=strategy,
        created_at=created_at,
        rank=manifest.lora.rank,
        alpha=manifest.lora.alpha,
        tensors=tensors,
        metrics=metrics if metrics is not None else {},
    )


class Core:
    """The strategy and the current global adapter of one federation, behind its intake."""

    def __init__(self, intake: Intake, strategy: Strategy, current: AdapterState) -> None:
        self.intake = intake
        self.strategy = strategy  # replaceable: the service rebuilds it after a quarantine
        self.current = current

    def admit(self, device_id: str, payload: bytes | protocol.Decoded, received_at: float) -> protocol.AdapterUpdate:
        """Validate an update and hand it to the strategy; `RejectedUpdate` if either refuses it."""
        update = self.intake.validate(device_id, payload, self.current.version)
        self.offer(update, received_at)
        return update

    def offer(self, update: protocol.AdapterUpdate, received_at: float) -> None:
        """Hand a validated update to the strategy (a site update as its member devices,
        `tier.client_updates`); the strategy may still refuse it with `RejectedUpdate`."""
        for client in client_updates(update, received_at):
            self.strategy.add(client, self.current.version)

    def next_version(
        self, now: float, extra_metrics: Callable[[], Mapping[str, Any]] | None = None
    ) -> NewVersion | None:
        """The next version if the strategy is ready at `now`, else None. `extra_metrics` (called
        only when a version is made) adds to the strategy's metrics in the published adapter."""
        if not self.strategy.ready(now):
            return None
        pending = {u.update_id: u for u in self.strategy.pending()}
        parent = self.current
        started = time.perf_counter()
        result: Aggregation = self.strategy.aggregate(parent, now)
        took = time.perf_counter() - started
        if result.state.version != parent.version + 1:
            raise RuntimeError(
                f"strategy {self.strategy.name} made version {result.state.version} from {parent.version}; "
                f"expected {parent.version + 1}"
            )
        metrics = {**result.metrics, **(extra_metrics() if extra_metrics is not None else {})}
        adapter = make_adapter(
            self.intake.manifest,
            self.intake.bundle,
            version=result.state.version,
            parent_version=parent.version,
            strategy=self.strategy.name,
            tensors=result.state.tensors,
            created_at=now,
            metrics=metrics,
        )
        folded = tuple(Folded(pending[uid], float(result.weights.get(uid, 0.0))) for uid in result.used)
        return NewVersion(
            adapter=adapter,
            encoded=protocol.encode_global(adapter),
            state=result.state,
            parent=parent,
            folded=folded,
            took_s=took,
            timings=result.timings,
        )

    def advance(self, version: NewVersion) -> None:
        """Make a committed version the current one."""
        if version.parent.version != self.current.version:
            raise RuntimeError(
                f"version {version.state.version} was made from {version.parent.version}, "
                f"but the current version is {self.current.version}"
            )
        self.current = version.state


def broadcast(
    new: NewVersion, broadcaster: Broadcaster, now: float, codec: str = "deflate", *, fold: bool = False
) -> tuple[NewVersion, bytes, Step]:
    """`new` as devices rebuild it from the delta chain (`alignfed.downlink`: the previous version plus
    the quantized change, digest-checked), its delta message, and the step the broadcaster must
    `accept` once the version is stored. The rebuilt adapter is what is stored, published and
    aggregated onto next, so every device following the chain holds the coordinator's exact bits.

    `fold`: what the quantization changed goes into the state's residual, in product space
    (`server_update.fold_published`), for a broadcaster without its own factor-space carry."""
    step = broadcaster.step(new.parent.tensors, new.state.tensors)
    a = new.adapter
    delta = protocol.GlobalDelta(
        version=a.version,
        parent_version=a.parent_version,
        bundle=a.bundle,
        strategy=a.strategy,
        created_at=now,
        rank=a.rank,
        alpha=a.alpha,
        quantization=broadcaster.quantization,
        digest=step.digest,
        wire=step.wire,
    )
    adapter = dataclasses.replace(a, tensors=step.published)
    published = dataclasses.replace(
        new,
        adapter=adapter,
        encoded=protocol.encode_global(adapter),
        state=(
            server_update.fold_published(new.state, step.published)
            if fold
            else dataclasses.replace(new.state, tensors=step.published)
        ),
    )
    return published, protocol.encode_global_delta(delta, codec), step
