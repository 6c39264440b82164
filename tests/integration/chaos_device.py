"""A light device for the chaos test: the edge daemon's publish path without the training.

It publishes real signed updates (tiny random deltas on the newest global version it has seen)
through the daemon's own outbox (`edge.outbox.Outbox`: fsynced before publishing, deleted on ack),
resends what is unacknowledged, and appends every ack it receives to an fsynced JSONL file, so
the test can audit the coordinator's store against what each device was told. Killed with
SIGKILL at any point, it resumes from its state folder.

    python -m tests.integration.chaos_device STATE_DIR BROKER_URL FEDERATION DEVICE_ID KEY_HEX N BUNDLE PERIOD_S
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

from alignfed import manifest as mf
from alignfed import protocol
from alignfed.errors import ProtocolError
from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Transport
from edge.outbox import Outbox
from tests.fuzz.payloads import real_update

RESEND_AFTER_S = 2.0


def append(path: Path, record: dict[str, object]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(
    state: Path, url: str, federation: str, device_id: str, key_hex: str, n: int, bundle: Path, period_s: float
) -> int:
    state.mkdir(parents=True, exist_ok=True)
    m = mf.load(bundle)
    digest, shapes, key = mf.bundle_digest(m), m.delta_shapes(), bytes.fromhex(key_hex)
    topics = Topics(federation)
    outbox = Outbox(state / "outbox")
    made = state / "made.jsonl"  # every update id this device produced (written after the outbox)
    acks = state / "acks.jsonl"
    produced = len(made.read_text().splitlines()) if made.exists() else 0
    version = 0
    t = Transport(BrokerConfig(url), f"chaos-{device_id}")
    t.subscribe(topics.global_adapter)
    t.subscribe(topics.ack(device_id))
    t.start(wait=None)
    sent: dict[str, float] = {}
    next_at = time.monotonic()
    while produced < n or len(outbox):
        msg = t.get(timeout=0.05)
        while msg is not None:
            try:
                if msg.topic == topics.global_adapter:
                    version = max(version, protocol.decode_global(msg.payload, 1 << 26).version)
                else:
                    ack = protocol.decode_ack(msg.payload)
                    if any(uid == ack.update_id for uid, _ in outbox.items()):  # recorded before forgotten
                        record = {"update_id": ack.update_id, "accepted": ack.accepted, "reason": ack.reason}
                        append(acks, {**record, "global_version": ack.global_version})
                        outbox.remove(ack.update_id)
            except ProtocolError as exc:
                print(f"{device_id}: ignoring a bad message: {exc}", flush=True)
            msg = t.get(timeout=0)
        now = time.monotonic()
        if produced < n and now >= next_at:
            # The id is a function of the count, so a kill between the outbox and the log re-makes
            # the same update (same outbox file) rather than a second one.
            update_id = uuid.uuid5(uuid.NAMESPACE_OID, f"{device_id}/{produced}").hex
            payload = real_update(device_id, key, digest, shapes, version, seed=produced, uid=update_id)
            outbox.put(produced, update_id, payload)
            append(made, {"update_id": update_id, "seq": produced})
            produced += 1
            next_at = now + period_s
        if t.connected.is_set():
            for uid, path in outbox.items():
                due = now - sent.get(uid, -1e9) > RESEND_AFTER_S
                if due and t.publish(topics.update(device_id), path.read_bytes(), timeout=2):
                    sent[uid] = now
    t.stop()
    print(f"{device_id}: produced {produced}, outbox empty", flush=True)
    return 0


if __name__ == "__main__":
    a = sys.argv[1:]
    sys.exit(main(Path(a[0]), a[1], a[2], a[3], a[4], int(a[5]), Path(a[6]), float(a[7])))
