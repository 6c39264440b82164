"""Device configuration (`device.toml`, written by `alignfed flash`), validated on load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignfed import protocol, tomlfile
from alignfed.errors import ConfigError
from alignfed.profiles import DeviceProfile, load_profile
from alignfed.tomlfile import Field, check_table, number_at_least, subtable
from alignfed.topics import check_id
from alignfed.transport import BrokerConfig


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    device_id: str
    federation: str
    bundle: Path
    data: Path
    state_dir: Path
    profile: DeviceProfile
    key: bytes  # HMAC-SHA256 key issued by `alignfed coordinator add-device`
    broker: BrokerConfig
    wire_quantization: str = "int8c"  # how deltas travel: "int8c" | "int8" | "fp32" (docs/protocol.md)
    wire_codec: str = "deflate"  # envelope of each update: "deflate" | "none" (lossless)
    delta_rank: int = 0  # rank of the sent delta factors; 0 = exact (2r)
    delta_feedback: bool = True  # carry what compression drops into the next update (edge.uplink)
    carry_rank: int = 0  # directions of that carry kept per layer; 0 = delta_rank's (or the delta's) rank
    # "delta": follow the coordinator's quantized version-to-version deltas, fetching the retained
    # snapshot only without a base or after a gap; "snapshot": receive the full adapter every version
    downlink: str = "delta"
    eval_examples: int = 4  # examples held out of training to measure each received global adapter; 0 = none
    max_rounds: int = 0  # stop after this many published updates; 0 = run forever
    max_outbox: int = 64  # pause training while this many updates await an ack
    resend_after_s: float = 30.0  # resend an unacknowledged update after this long
    seed: int = 0


# device.toml's fields: the DeviceConfig fields, with what the file holds in place of loaded objects
_FIELDS = {
    **tomlfile.fields_of(DeviceConfig, skip=("bundle", "data", "state_dir", "profile", "key", "broker")),
    **{name: Field(name, str) for name in ("bundle", "data", "profile", "key")},
    "state_dir": Field("state_dir", str, ""),
    "broker": Field("broker", Any, {}),
}
_BROKER = tomlfile.fields_of(BrokerConfig)
_AT_LEAST = {
    "delta_rank": 0,
    "carry_rank": 0,
    "eval_examples": 0,
    "max_rounds": 0,
    "max_outbox": 1,
    "resend_after_s": 0.1,
    "seed": 0,
}


def load(path: Path) -> DeviceConfig:
    raw = tomlfile.read(path)
    base = Path(path).resolve().parent
    values = check_table(raw, _FIELDS, source=path)
    broker_raw = subtable(raw, "broker", source=path)
    if "url" not in broker_raw:
        raise ConfigError(f"{path}: missing field [broker].url (e.g. mqtt://gateway:1883)")
    broker = check_table(broker_raw, _BROKER, source=path, table="broker")

    def rel(p: object) -> Path:
        q = Path(str(p))
        return q if q.is_absolute() else base / q

    try:
        key = bytes.fromhex(values["key"])
    except ValueError as exc:
        raise ConfigError(f"{path}: field 'key' must be hex (as issued by add-device)") from exc
    for name, lo in _AT_LEAST.items():
        if name in values:
            number_at_least(values[name], lo, source=path, name=name)
    quant = values.get("wire_quantization", "int8c")
    if quant not in protocol.QUANTIZATIONS:
        raise ConfigError(f"{path}: wire_quantization = {quant!r}; expected one of {', '.join(protocol.QUANTIZATIONS)}")
    codec = values.get("wire_codec", "deflate")
    if codec not in protocol.CODECS:
        raise ConfigError(f"{path}: wire_codec = {codec!r}; expected one of {', '.join(protocol.CODECS)}")
    if values.get("downlink", "delta") not in ("delta", "snapshot"):
        raise ConfigError(f"{path}: downlink = {values['downlink']!r}; expected 'delta' or 'snapshot'")
    loaded = {name: values.pop(name) for name in ("bundle", "data", "state_dir", "profile", "key", "broker")
              if name in values}  # fmt: skip
    device_id = check_id(values.pop("device_id"), "device id")
    return DeviceConfig(
        device_id=device_id,
        federation=check_id(values.pop("federation"), "federation id"),
        bundle=rel(loaded["bundle"]),
        data=rel(loaded["data"]),
        state_dir=rel(loaded.get("state_dir") or f"state-{device_id}"),
        profile=load_profile(loaded["profile"]),
        key=key,
        broker=BrokerConfig(**broker),
        **values,
    )
