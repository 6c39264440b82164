"""The dashboard's web server: the page, its live feed (server-sent events) and `/metrics`.

Starlette on uvicorn in a daemon thread, so the coordinator's MQTT loop and the simulator stay
synchronous. Read-only: every route is a GET. The socket is bound here, before uvicorn starts, so
a port in use is an error the caller sees (uvicorn itself would `sys.exit` in its thread).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from alignfed.errors import ConfigError
from dashboard.board import Board
from dashboard.config import DashboardConfig
from dashboard.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PUSH_EVERY_S = 0.5  # how often the event stream looks for a new snapshot
KEEPALIVE_S = 15.0
# Only this origin's files run; uPlot sizes its canvases through inline styles.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _BasicAuth:
    """HTTP basic auth on every route (pure ASGI, so the event stream is not buffered)."""

    def __init__(self, app: ASGIApp, username: str, password: str) -> None:
        self.app = app
        self.expected = f"{username}:{password}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(dict(scope["headers"]).get(b"authorization", b"")):
            response = Response(
                "authentication required", status_code=401, headers={"WWW-Authenticate": 'Basic realm="alignfed"'}
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, header: bytes) -> bool:
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self.expected)


def build_app(board: Board, metrics: Metrics, cfg: DashboardConfig, stopping: threading.Event) -> ASGIApp:
    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=HEADERS)

    async def state(request: Request) -> Response:
        return JSONResponse(board.snapshot(), headers=HEADERS)

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            last, quiet = -1, 0.0
            while not stopping.is_set():
                if board.seq != last:
                    last, quiet = board.seq, 0.0
                    yield f"data: {json.dumps(board.snapshot())}\n\n"
                elif quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(PUSH_EVERY_S)
                quiet += PUSH_EVERY_S

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={**HEADERS, "Cache-Control": "no-cache"}
        )

    app: ASGIApp = Starlette(
        routes=[
            Route("/", page),
            Route("/api/state", state),
            Route("/events", events),
            Route("/metrics", metrics_route),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )
    if cfg.username:
        app = _BasicAuth(app, cfg.username, cfg.password)
    return app


class DashboardServer:
    """`start()` binds and serves in a thread and returns the URL; `stop()` ends it."""

    def __init__(self, board: Board, metrics: Metrics, cfg: DashboardConfig) -> None:
        self.board, self.metrics, self.cfg = board, metrics, cfg
        self._stopping = threading.Event()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> str:
        import uvicorn

        if not self.cfg.loopback and not self.cfg.username:
            log.warning("dashboard bound to %s without basic auth: anyone who reaches it can read it", self.cfg.host)
        family = socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.cfg.host, self.cfg.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"dashboard cannot listen on {self.cfg.host}:{self.cfg.port}: {exc.strerror}") from exc
        port = sock.getsockname()[1]
        app = build_app(self.board, self.metrics, self.cfg, self._stopping)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",  # no websocket routes: the live feed is server-sent events
            timeout_graceful_shutdown=2,
            log_level="warning",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="dashboard", daemon=True
        )
        self._thread.start()
        waited = 0.0
        while not self._server.started and self._thread.is_alive() and waited < timeout:
            self._stopping.wait(0.05)
            waited += 0.05
        if not self._server.started:
            self.stop()
            raise ConfigError(f"dashboard did not start on {self.cfg.host}:{port} within {timeout:.0f} s")
        host = f"[{self.cfg.host}]" if family == socket.AF_INET6 else self.cfg.host
        self.url = f"http://{host}:{port}/"
        return self.url

    def stop(self) -> None:
        self._stopping.set()  # ends open event streams, so shutdown does not wait on them
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
