"""`alignfed serve`: an OpenAI client sees the adapter change when a new global arrives, no restart."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from alignfed import manifest as mf
from alignfed import protocol
from edge.config import DeviceConfig

pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")


def _global(bundle: Path, version: int, seed: int) -> protocol.GlobalAdapter:
    m = mf.load(bundle)
    rng = np.random.default_rng(seed)
    # Large random factors: a greedy answer of the tiny model visibly changes with the adapter.
    tensors = {n: rng.normal(0, 0.5, s).astype(np.float32) for n, s in m.lora_shapes().items()}
    return protocol.GlobalAdapter(
        version=version,
        parent_version=version - 1,
        bundle=mf.bundle_digest(m),
        strategy="alignfed",
        created_at=time.time(),
        rank=m.lora.rank,
        alpha=m.lora.alpha,
        tensors=tensors,
    )


def _store(cfg: DeviceConfig, g: protocol.GlobalAdapter) -> None:
    """What the daemon does when it accepts a global: write global.adapter atomically."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg.state_dir / "global.tmp"
    tmp.write_bytes(protocol.encode_global(g))
    tmp.replace(cfg.state_dir / "global.adapter")


@pytest.fixture
def device(tiny_bundle: Path, tmp_path: Path) -> DeviceConfig:
    from edge import config as ecfg
    from edge.flash import flash

    data = tmp_path / "notes.jsonl"
    data.write_text(json.dumps({"text": "a note"}) + "\n")
    config = flash(
        profile="x86-laptop",
        device_id="dev-1",
        federation="fed",
        broker="mqtt://127.0.0.1:1883",
        bundle=tiny_bundle,
        data=data,
        target=tmp_path / "etc",
        key="00" * 32,
    )
    unit = (tmp_path / "etc" / "alignfed-serve.service").read_text()
    assert f"serve --config {config.resolve()}" in unit  # flash wrote the endpoint's unit beside the daemon's
    return ecfg.load(config)


@pytest.fixture
def server(device: DeviceConfig) -> Iterator[object]:
    from edge.openai_api import open_server

    srv = open_server(device, "127.0.0.1", 0, n_ctx=128)
    srv.poll_s = 0.1
    srv.start()
    yield srv
    srv.stop()


def _wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_client_sees_new_global_without_restart(server: object, device: DeviceConfig) -> None:
    from edge.openai_api import ApiServer
    from runtime.llama import Generator

    assert isinstance(server, ApiServer)
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    engine = server.service.engine
    assert isinstance(engine, Generator)
    llm = engine._llm

    def ask() -> tuple[str, str]:
        r = client.completions.create(model=model, prompt="The device trains", max_tokens=8, temperature=0)
        return str(r.system_fingerprint), r.choices[0].text

    fp0, base_text = ask()
    assert fp0 == "base"

    _store(device, _global(device.bundle, 1, seed=1))  # a new global arrives while serving
    _wait_for(lambda: server.service.version == 1)
    fp1, text1 = ask()
    assert fp1 == "adapter-v1" and text1 != base_text
    assert (device.state_dir / "adapters" / "adapter-00000001.gguf").is_file()

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0
    )
    assert chat.system_fingerprint == "adapter-v1" and chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens >= 1

    # The daemon's converted GGUF of a newer version is picked up as well.
    from alignfed.gguf_adapter import write_lora_gguf
    from runtime.llama import adapter_path

    m = mf.load(device.bundle)
    g2 = _global(device.bundle, 2, seed=2)
    write_lora_gguf(adapter_path(device.state_dir / "adapters", 2), g2.tensors, m.architecture, m.lora)
    fp2, text2 = ask()  # no waiting: each request checks for a newer adapter first
    assert fp2 == "adapter-v2" and text2 != text1
    assert server.service.engine is engine and engine._llm is llm  # base not reloaded
    assert server.service.swaps == 2


def test_bad_requests_get_openai_shaped_errors(server: object) -> None:
    from edge.openai_api import ApiServer

    assert isinstance(server, ApiServer)
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="m", prompt="x", max_tokens=100000)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="m", messages=[])
    req = urllib.request.Request(server.url + "/nothing", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 404 and "no route" in json.loads(err.value.read())["error"]["message"]
