"""The guarded admin surface: where adapters may be loaded from, and the one bearer-token check that every door
(native gRPC, OpenAI HTTP, and the Ray Serve HTTP and gRPC ingress) runs before an admin call."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence

import grpc
from deltaserve.adapters.directory import within
from deltaserve.server.errors import PermissionDeniedError, UnauthenticatedError

ADMIN_METHOD_PREFIX = "/deltaserve.v1.Adapters/"
HTTP_CHALLENGE = {"www-authenticate": "Bearer"}  # sent with every HTTP 401 (RFC 6750)


class AdapterPathPolicy:
    """Confines adapter paths to the configured roots, lexically here (`..` folded, nothing on disk touched, so
    no path outside a root is ever opened, not even to resolve it); the loader then reaches the directory from
    the root's descriptor without following any link (deltaserve.adapters.directory). No roots: any path (a
    local, trusted setup). Messages name the caller's path and the flag, never the roots."""

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = tuple(os.path.realpath(root) for root in roots)

    def resolve(self, path: str) -> str:
        """The absolute, normalised path, or PermissionDeniedError when it lies outside every root."""
        if not self.roots:
            return path
        if within(path, self.roots) is None:
            raise PermissionDeniedError(f"adapter path {path!r} is outside the allowed --adapter-root directories")
        return os.path.normpath(os.path.abspath(path))


class BearerToken:
    """The admin token check. `check(authorization)` passes when no token is configured or the value is exactly
    `Bearer <token>` (compared in constant time), and raises UnauthenticatedError naming what is needed and
    whether the token was missing or wrong otherwise. Each door maps that error to its own status: gRPC
    UNAUTHENTICATED, HTTP 401 with `www-authenticate: Bearer`."""

    def __init__(self, token: str | None) -> None:
        self._expected = f"Bearer {token}".encode() if token else None

    @property
    def required(self) -> bool:
        return self._expected is not None

    def check(self, authorization: str | bytes | None, needed_by: str) -> None:
        """`authorization`: the caller's header or metadata value; `needed_by` starts the refusal's message,
        e.g. "the Adapters service needs 'authorization: Bearer <admin token>' metadata"."""
        if self._expected is None:
            return
        given = authorization or b""
        if isinstance(given, str):
            given = given.encode()
        if not hmac.compare_digest(given, self._expected):
            raise UnauthenticatedError(f"{needed_by} ({'wrong' if given else 'missing'} token)")


GRPC_ADMIN_NEEDS = "the Adapters service needs 'authorization: Bearer <admin token>' metadata"
HTTP_ADMIN_NEEDS = "adapter loading and unloading need 'Authorization: Bearer <admin token>'"


def grpc_authorization(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | bytes | None:
    """The `authorization` value of a call's invocation metadata (None without one)."""
    return dict(metadata or ()).get("authorization")


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request, context):
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Runs the bearer check on the Adapters service; Generation (and TGIS) stay open."""

    def __init__(self, token: BearerToken) -> None:
        self.token = token

    async def intercept_service(
        self,
        continuation: Callable,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(ADMIN_METHOD_PREFIX):
            try:
                self.token.check(grpc_authorization(handler_call_details.invocation_metadata), GRPC_ADMIN_NEEDS)
            except UnauthenticatedError as err:
                return _deny(grpc.StatusCode.UNAUTHENTICATED, str(err))
        return await continuation(handler_call_details)
