from __future__ import annotations

from pathlib import Path

import pytest

from alignfed import tomlfile
from alignfed.errors import ConfigError
from edge import config


def write(tmp_path: Path, **extra: object) -> Path:
    doc: dict[str, object] = {
        "device_id": "dev-1",
        "federation": "f",
        "bundle": "b",
        "data": "d.jsonl",
        "profile": "rpi5-8gb",
        "key": "00" * 32,
        **extra,
        "broker": {"url": "mqtt://h:1"},
    }
    return tomlfile.write(tmp_path / "device.toml", doc)


def test_loads_with_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path))
    assert (
        cfg.profile.name == "rpi5-8gb"
        and cfg.max_outbox == 64
        and cfg.wire_quantization == "int8c"
        and cfg.wire_codec == "deflate"
        and cfg.delta_feedback
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_outbox", 0, "max_outbox = 0; expected a value ≥ 1"),
        ("resend_after_s", "soon", "resend_after_s = 'soon'; expected a number"),
        ("wire_quantization", "int4", "expected one of fp32, int8, int8c"),
        ("wire_codec", "zstd", "wire_codec = 'zstd'; expected one of none, deflate"),
        ("key", "xyz", "must be hex"),
        ("device_id", "a/b", "device id 'a/b' is not valid"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(write(tmp_path, **{field: value}))
