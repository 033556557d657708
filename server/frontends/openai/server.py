"""The OpenAI-compatible door's ASGI and uvicorn plumbing: the request body limit, and serving the app on the
running event loop (the gRPC server's) without uvicorn's own signal handling."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import uvicorn
from deltaserve.server.frontends.auth import BearerToken
from deltaserve.server.frontends.core import FrontDoorCore
from deltaserve.server.frontends.grpc_api import AdaptersService
from deltaserve.server.frontends.openai.errors import error_response
from deltaserve.server.frontends.openai.routes import build_app
from deltaserve.server.frontends.openai.serving import OpenAIServing
from starlette.exceptions import HTTPException as StarletteHTTPException


class OpenAIFrontDoor:
    """The OpenAI-compatible app over one server's front-door core and AdaptersService, and its uvicorn server."""

    def __init__(
        self,
        core: FrontDoorCore,
        adapters: AdaptersService,
        *,
        model_name: str,
        token: BearerToken | None = None,
        max_request_bytes: int = 4 * 1024 * 1024,
        shutdown_grace_seconds: float = 30.0,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.serving = OpenAIServing(core, adapters, model_name)
        self.tls = (tls_cert, tls_key) if tls_cert else None  # HTTPS with the gRPC server's certificate
        self.max_request_bytes = max_request_bytes
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.port: int | None = None
        self._uvicorn: _Uvicorn | None = None
        self._serving: asyncio.Task | None = None
        self.app = build_app(self.serving, token or BearerToken(None))
        self.app.add_middleware(_BodyLimit, limit=max_request_bytes)

    async def start(self, host: str, port: int) -> int:
        """Bind host:port (0 picks a free port) and serve on the running event loop; returns the port."""
        sock = _listen(host, port)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(self.shutdown_grace_seconds) + 1,
            ssl_certfile=self.tls[0] if self.tls else None,
            ssl_keyfile=self.tls[1] if self.tls else None,
        )
        self._uvicorn = _Uvicorn(config)
        self._serving = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._serving.done():
                self._serving.result()  # raises what stopped it
                raise OSError(f"the HTTP server on {host}:{port} stopped while starting")
            await asyncio.sleep(0.01)
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let open responses finish (the engine ends them within its grace), close."""
        if self._uvicorn is None or self._serving is None:
            return
        self._uvicorn.should_exit = True
        await self._serving


class _BodyLimit:
    """Refuses request bodies over `limit` bytes with 413: by Content-Length up front, or while a chunked
    body is read (a plain ASGI middleware, so that streaming responses and disconnects pass untouched)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = error_response(413, f"the request body has {int(length)} bytes; the server takes {self.limit}")
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise StarletteHTTPException(413, f"the request body exceeds the server's {self.limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the deltaserve process handles SIGTERM/SIGINT itself."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot bind the HTTP port {host}:{port}: {err}") from err
    return sock
