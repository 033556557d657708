"""The guarded admin surface: where adapters may be loaded from, and who may call the Adapters service."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence

import grpc
from deltaserve.adapters.directory import within
from deltaserve.server.errors import PermissionDeniedError

ADMIN_METHOD_PREFIX = "/deltaserve.v1.Adapters/"


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


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request, context):
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer TOKEN` on the Adapters service; Generation stays open."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not handler_call_details.method.startswith(ADMIN_METHOD_PREFIX):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        if isinstance(given, str):
            given = given.encode()
        if not hmac.compare_digest(given, self._expected):
            reason = "missing" if not given else "wrong"
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the Adapters service needs 'authorization: Bearer <admin token>' metadata ({reason} token)",
            )
        return await continuation(handler_call_details)
