"""The guarded admin surface: where adapters may be loaded from, and the one bearer-token check that every door
(native gRPC, OpenAI HTTP, and the Ray Serve HTTP and gRPC ingress) runs before an admin call."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence

import grpc
from deltaserve.server.errors import PermissionDeniedError, UnauthenticatedError

ADMIN_METHOD_PREFIX = "/deltaserve.v1.Adapters/"
HTTP_CHALLENGE = {"www-authenticate": "Bearer"}  # sent with every HTTP 401 (RFC 6750)


class AdapterPathPolicy:
    """Confines adapter paths to the configured roots. Paths are resolved first (symlinks and `..`), so a
    link inside a root pointing outside it is refused too. No roots: any path (a local, trusted setup)."""

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = [os.path.realpath(root) for root in roots]

    def resolve(self, path: str) -> str:
        resolved = os.path.realpath(path)
        if self.roots and not any(os.path.commonpath([resolved, root]) == root for root in self.roots):
            raise PermissionDeniedError(
                f"adapter path {path!r} resolves to {resolved!r}, outside the allowed --adapter-root "
                f"directories ({', '.join(self.roots)})"
            )
        return resolved


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
