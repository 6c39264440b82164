"""Device configuration (`device.toml`, written by `alignfed flash`), validated on load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignfed import protocol, tomlfile
from alignfed.errors import ConfigError
from alignfed.profiles import DeviceProfile, load_profile
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
    eval_examples: int = 4  # examples held out of training to measure each received global adapter; 0 = none
    max_rounds: int = 0  # stop after this many published updates; 0 = run forever
    max_outbox: int = 64  # pause training while this many updates await an ack
    resend_after_s: float = 30.0  # resend an unacknowledged update after this long
    seed: int = 0


def load(path: Path) -> DeviceConfig:
    raw = tomlfile.read(path)
    base = Path(path).resolve().parent

    def need(name: str) -> object:
        if name not in raw:
            raise ConfigError(f"{path}: missing field {name!r}")
        return raw[name]

    def rel(p: object) -> Path:
        q = Path(str(p))
        return q if q.is_absolute() else base / q

    broker = raw.get("broker", {})
    if "url" not in broker:
        raise ConfigError(f"{path}: missing field [broker].url (e.g. mqtt://gateway:1883)")
    try:
        key = bytes.fromhex(str(need("key")))
    except ValueError as exc:
        raise ConfigError(f"{path}: field 'key' must be hex (as issued by add-device)") from exc

    def number(name: str, default: float, cast: type, lo: float) -> Any:
        value = raw.get(name, default)
        try:
            out = cast(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {name} = {value!r}; expected a {cast.__name__}") from exc
        if out < lo:
            raise ConfigError(f"{path}: {name} = {value!r}; expected a value ≥ {lo}")
        return out

    quant = str(raw.get("wire_quantization", "int8c"))
    if quant not in protocol.QUANTIZATIONS:
        raise ConfigError(f"{path}: wire_quantization = {quant!r}; expected one of {', '.join(protocol.QUANTIZATIONS)}")
    codec = str(raw.get("wire_codec", "deflate"))
    if codec not in protocol.CODECS:
        raise ConfigError(f"{path}: wire_codec = {codec!r}; expected one of {', '.join(protocol.CODECS)}")
    feedback = raw.get("delta_feedback", True)
    if not isinstance(feedback, bool):
        raise ConfigError(f"{path}: delta_feedback = {feedback!r}; expected true or false")
    return DeviceConfig(
        device_id=check_id(str(need("device_id")), "device id"),
        federation=check_id(str(need("federation")), "federation id"),
        bundle=rel(need("bundle")),
        data=rel(need("data")),
        state_dir=rel(raw.get("state_dir", f"state-{raw.get('device_id', 'device')}")),
        profile=load_profile(str(need("profile"))),
        key=key,
        broker=BrokerConfig(
            url=str(broker["url"]),
            username=str(broker.get("username", "")),
            password=str(broker.get("password", "")),
            ca_file=str(broker.get("ca_file", "")),
        ),
        wire_quantization=quant,
        wire_codec=codec,
        delta_rank=number("delta_rank", 0, int, 0),
        delta_feedback=feedback,
        eval_examples=number("eval_examples", 4, int, 0),
        max_rounds=number("max_rounds", 0, int, 0),
        max_outbox=number("max_outbox", 64, int, 1),
        resend_after_s=number("resend_after_s", 30.0, float, 0.1),
        seed=number("seed", 0, int, 0),
    )
