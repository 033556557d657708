"""The guarded admin surface: where adapters may be loaded from, and who may call the Adapters service."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence

import grpc
from deltaserve.server.errors import PermissionDeniedError

ADMIN_METHOD_PREFIX = "/deltaserve.v1.Adapters/"


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
