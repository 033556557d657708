"""The one table from the core's failure classes to gRPC status codes. Every door answers with it: the gRPC doors
directly, the HTTP doors through the usual google.rpc gRPC -> HTTP correspondence."""

from __future__ import annotations

import logging

import grpc
import torch
from deltaserve.adapters import (
    AdapterAccessError,
    AdapterError,
    AdapterFormatError,
    AdapterLimitError,
    AdapterMismatchError,
    UnsupportedAdapterError,
)
from deltaserve.server.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterSourceTimeoutError,
    AdapterSourceUnavailableError,
    AdapterUnreadableError,
    CapacityError,
    DeltaserveServerError,
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
    (AdapterSourceUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (AdapterSourceTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (EngineFailedError, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),  # a request's own deadline passed
    (torch.OutOfMemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # device memory for an adapter or a batch
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_for(err: BaseException) -> grpc.StatusCode:
    """The gRPC status of an exception raised while serving a call; INTERNAL for anything unexpected (a bug)."""
    for error_type, code in _STATUS_FOR:
        if isinstance(err, error_type):
            return code
    return grpc.StatusCode.INTERNAL


log = logging.getLogger(__name__)

# Errors whose messages are written for the client: they name the problem in its terms, never a server path.
_OWN_ERRORS = (DeltaserveServerError, AdapterError)
_GENERIC_MESSAGES = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the server ran out of memory for this request; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the request's deadline passed; it was cancelled",
}


def public_message(err: BaseException, request_id: str = "") -> str:
    """What a client reads about `err`. The core's own errors speak for themselves; anything else (a library's
    error, a bug) gets a generic line, and its detail goes to the log under the request id."""
    if isinstance(err, _OWN_ERRORS):
        return str(err) or type(err).__name__
    code = status_for(err)
    log.error("request %s failed: %s", request_id or "-", code.name, exc_info=err)
    where = f" (request {request_id})" if request_id else ""
    return _GENERIC_MESSAGES.get(code, "internal error; the server log has the detail") + where
