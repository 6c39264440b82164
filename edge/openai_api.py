"""`alignfed serve`: an OpenAI-compatible HTTP endpoint on the device, over llama.cpp.

Routes (the subset of the OpenAI API that chat clients and the `openai` package use, non-streaming):
`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`. Chat messages are rendered in
the model's own chat format (runtime.llama.Generator.complete).

The answer always comes from the newest global adapter the device holds. `AdapterSource` finds it:
the daemon writes `adapters/adapter-{version}.gguf` for every global it accepts and stores the
global itself as `global.adapter`; if the stored global is newer than any GGUF (the daemon could not
write one), the GGUF is written here. A watcher thread polls both every `poll_s` seconds and every
request checks once more, so a new version is attached through llama.cpp's adapter API (the base
stays loaded) before the next answer. Responses carry the version as `system_fingerprint`
("adapter-v{version}", "base" without one) so a client can see which adapter answered.

stdlib `http.server` only: one more dependency on a 4 GB board buys nothing for one user at a time
(the Generator serialises generations anyway).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from alignfed import manifest as mf
from alignfed import protocol
from alignfed.errors import AlignFedError, ConfigError
from edge.config import DeviceConfig

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # bytes of JSON a request may carry
MAX_GLOBAL_BYTES = 1 << 30
_GGUF = re.compile(r"^adapter-(\d+)\.gguf$")

_UNIT = """[Unit]
Description=AlignFed OpenAI-compatible endpoint ({device_id})
After=network-online.target alignfed-edge.service

[Service]
ExecStart={python} -m alignfed.cli serve --config {config} --host {host} --port {port}
Restart=always
RestartSec=10
Nice=5

[Install]
WantedBy=multi-user.target
"""


def write_serve_unit(target: Path, *, device_id: str, python: str, config: Path, host: str, port: int) -> Path:
    """`alignfed-serve.service` beside the daemon's unit in `target`."""
    path = Path(target) / "alignfed-serve.service"
    path.write_text(
        _UNIT.format(device_id=device_id, python=python, config=Path(config).resolve(), host=host, port=port)
    )
    return path


class Engine(Protocol):
    """What the server needs from runtime.llama.Generator."""

    def set_adapter(self, path: Path | None, scale: float = 1.0) -> None: ...
    def complete(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: list[str] | None = None,
    ) -> tuple[str, str, dict[str, int]]: ...


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    version: int
    path: Path


class AdapterSource:
    """The newest global adapter of a device's state dir, as a llama.cpp LoRA GGUF."""

    def __init__(self, state_dir: Path, bundle: Path) -> None:
        self.dir = Path(state_dir) / "adapters"
        self.stored = Path(state_dir) / "global.adapter"
        self.bundle = Path(bundle)
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the stored global last decoded
        self._stored_version = -1

    def _newest_gguf(self) -> AdapterVersion | None:
        if not self.dir.is_dir():
            return None
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _GGUF.match(p.name))]
        return AdapterVersion(*max(found)) if found else None

    def _stored(self) -> protocol.GlobalAdapter | None:
        """The stored global when it changed since the last look and is newer than what we know."""
        try:
            st = self.stored.stat()
        except FileNotFoundError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        if key == self._seen:
            return None
        g = protocol.decode_global(self.stored.read_bytes(), MAX_GLOBAL_BYTES)
        self._seen = key
        if g.version <= self._stored_version:
            return None
        self._stored_version = g.version
        return g

    def current(self) -> AdapterVersion | None:
        newest = self._newest_gguf()
        g = self._stored()
        if g is not None and (newest is None or g.version > newest.version):
            from alignfed.gguf_adapter import write_lora_gguf
            from runtime.llama import adapter_path

            m = mf.load(self.bundle)
            self.dir.mkdir(parents=True, exist_ok=True)
            path = write_lora_gguf(adapter_path(self.dir, g.version), g.tensors, m.architecture, m.lora)
            newest = AdapterVersion(g.version, path)
        return newest


class ChatService:
    """OpenAI-shaped answers from an Engine that always carries the newest adapter."""

    def __init__(self, engine: Engine, source: AdapterSource, model_id: str, *, max_tokens_limit: int = 1024) -> None:
        self.engine, self.source, self.model_id = engine, source, model_id
        self.max_tokens_limit = max_tokens_limit
        self.version: int | None = None
        self.swaps = 0
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        return "base" if self.version is None else f"adapter-v{self.version}"

    def sync(self) -> None:
        """Attach the newest adapter if it is not the one attached (no base reload)."""
        with self._lock:
            try:
                newest = self.source.current()
            except (AlignFedError, OSError) as exc:  # a half-written or foreign file: keep serving
                log.error("keeping adapter %s: %s", self.fingerprint, exc)
                return
            if newest is None or newest.version == self.version:
                return
            self.engine.set_adapter(newest.path)
            self.version = newest.version
            self.swaps += 1
            log.info("serving with global adapter v%d", newest.version)

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model_id, "object": "model", "created": 0, "owned_by": self.fingerprint}],
        }

    def answer(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 128
        temperature = body.get("temperature", 0.0)
        stop = body.get("stop")
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.max_tokens_limit:
            raise ConfigError(f"max_tokens = {max_tokens!r}; expected an integer in 1..{self.max_tokens_limit}")
        if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
            raise ConfigError(f"temperature = {temperature!r}; expected a number in [0, 2]")
        if body.get("stream"):
            raise ConfigError("stream = true is not supported; ask without streaming")
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
            raise ConfigError(f"stop = {stop!r}; expected a string or a list of strings")
        self.sync()
        created = int(time.time())
        if route == "chat":
            messages = body.get("messages")
            ok = isinstance(messages, list) and messages
            if not ok or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):  # type: ignore[union-attr]
                raise ConfigError("messages: expected a non-empty list of {role, content} objects with string content")
            msgs = [{"role": str(m.get("role", "user")), "content": m["content"]} for m in messages]  # type: ignore[union-attr]
            text, finish, usage = self.engine.complete(
                messages=msgs, max_tokens=max_tokens, temperature=float(temperature), stop=stops
            )
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
            kind = "chat.completion"
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ConfigError("prompt: expected a string")
            text, finish, usage = self.engine.complete(
                prompt, max_tokens=max_tokens, temperature=float(temperature), stop=stops
            )
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            kind = "text_completion"
        return {
            "id": f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
            "object": kind,
            "created": created,
            "model": self.model_id,
            "system_fingerprint": self.fingerprint,
            "choices": [choice],
            "usage": usage,
        }


def _handler(service: ChatService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: HTTPStatus, doc: dict[str, Any]) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: HTTPStatus, message: str) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(HTTPStatus.OK, service.models())
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}; expected /v1/models")

        def do_POST(self) -> None:
            route = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}.get(self.path.rstrip("/"))
            if route is None:
                self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}; expected /v1/chat/completions")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                self._error(HTTPStatus.BAD_REQUEST, f"request body of {length} bytes; expected 1..{MAX_BODY}")
                return
            try:
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object")
                self._send(HTTPStatus.OK, service.answer(route, body))
            except (ValueError, ConfigError) as exc:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
            except Exception as exc:  # one bad generation must not take the endpoint down
                log.exception("request failed")
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {exc}")

    return Handler


class ApiServer:
    """The HTTP server and its adapter watcher; `start()` serves in background threads."""

    def __init__(self, service: ChatService, host: str, port: int, *, poll_s: float = 1.0) -> None:
        self.service = service
        self.httpd = ThreadingHTTPServer((host, port), _handler(service))
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.service.sync()

    def start(self) -> ApiServer:
        self.service.sync()
        for target in (self.httpd.serve_forever, self._watch):
            t = threading.Thread(target=target, daemon=True, name=f"serve-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self._threads:
            t.join(timeout=5)


def open_server(
    cfg: DeviceConfig, host: str = "127.0.0.1", port: int = 8080, *, n_ctx: int = 2048, threads: int | None = None
) -> ApiServer:
    """Load the bundle's GGUF base once and serve it with the device's newest global adapter
    (llama.cpp on `threads` threads, the profile's by default)."""
    from runtime.llama import Generator

    base = cfg.bundle / mf.BASE_GGUF
    if not base.exists():
        raise ConfigError(f"{cfg.bundle}: no {mf.BASE_GGUF}; re-export the bundle with a GGUF base")
    m = mf.load(cfg.bundle)
    gen = Generator(base, n_ctx=n_ctx, n_threads=threads or cfg.profile.threads, seed=cfg.seed)
    service = ChatService(gen, AdapterSource(cfg.state_dir, cfg.bundle), m.base_id or cfg.bundle.name)
    return ApiServer(service, host, port)
