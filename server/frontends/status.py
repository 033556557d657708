"""The one table from the core's failure classes to gRPC status codes. Every door answers with it: the gRPC doors
directly, the HTTP doors through the usual google.rpc gRPC -> HTTP correspondence."""

from __future__ import annotations

import grpc
from deltaserve.adapters import (
    AdapterAccessError,
    AdapterFormatError,
    AdapterLimitError,
    AdapterMismatchError,
    UnsupportedAdapterError,
)
from deltaserve.server.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterUnreadableError,
    CapacityError,
    EngineFailedError,
    EngineStoppedError,
    InvalidRequestError,
    MergeError,
    NonFiniteOutputError,
    PermissionDeniedError,
    UnauthenticatedError,
)

_STATUS_FOR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterFormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (AdapterExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (UnsupportedAdapterError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (MergeError, grpc.StatusCode.FAILED_PRECONDITION),
    (NonFiniteOutputError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterUnreadableError, grpc.StatusCode.FAILED_PRECONDITION),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AdapterLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (AdapterAccessError, grpc.StatusCode.PERMISSION_DENIED),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (EngineFailedError, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),  # a request's own deadline passed
)


def status_for(err: BaseException) -> grpc.StatusCode:
    """The gRPC status of an exception raised while serving a call; INTERNAL for anything unexpected (a bug)."""
    for error_type, code in _STATUS_FOR:
        if isinstance(err, error_type):
            return code
    return grpc.StatusCode.INTERNAL
