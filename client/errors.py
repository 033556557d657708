"""The one exception type the client raises for server-side and transport failures.

gRPC raises different classes for sync and asyncio calls (and keeps code/details behind methods);
callers of deltaserve should catch a single type and read plain attributes instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc


class DeltaserveError(Exception):
    """A failed call: `code` is the gRPC status code, `message` the server's explanation.

    str(err) reads like "NOT_FOUND: adapter 'x' is not loaded".
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name


def from_rpc_error(err: grpc.RpcError) -> DeltaserveError:
    """Convert a grpc.RpcError or grpc.aio.AioRpcError into a DeltaserveError.

    A bare RpcError that is not also a Call carries no status, so it maps to UNKNOWN with its text.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        return DeltaserveError(grpc.StatusCode.UNKNOWN, str(err))
    return DeltaserveError(code, details or "")


@contextlib.contextmanager
def translate_rpc_errors() -> Iterator[None]:
    """Re-raise any gRPC error inside the block as DeltaserveError, chained to the original."""
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err
