"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, for any exception a request raised.

The HTTP status follows the one core-error -> gRPC status table (`status.status_for`) through the usual
google.rpc gRPC -> HTTP correspondence; the param is the field a `FieldError` names in this door's terms.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from deltaserve.server.errors import InvalidRequestError
from deltaserve.server.frontends.auth import HTTP_CHALLENGE
from deltaserve.server.frontends.status import public_message, status_for
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-request-timeout"  # seconds; the request is cancelled and answered 504 after that

# gRPC status -> HTTP status, as google.rpc.Code documents the correspondence; anything else is 500.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
# Codes OpenAI's own API uses where they differ from the gRPC status name.
_OPENAI_CODE = {grpc.StatusCode.UNAUTHENTICATED: "invalid_api_key"}


class OpenAIHttpError(Exception):
    """A refusal decided by this door (an HTTP status of its own, and the request field it is about)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


def _headers(status: int) -> dict[str, str] | None:
    return HTTP_CHALLENGE if status == 401 else None


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers={**(headers or {}), **(_headers(status) or {})})


def error_body(err: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error object for an exception raised while serving a request."""
    if isinstance(err, OpenAIHttpError):
        status, message, param, code = err.status, str(err), err.param, err.code
    else:
        grpc_code = status_for(err)
        status = _HTTP_STATUS.get(grpc_code, 500)
        message = public_message(err)
        param = getattr(err, "param", None) if isinstance(err, InvalidRequestError) else None
        code = _OPENAI_CODE.get(grpc_code, grpc_code.name.lower())
        if isinstance(err, TimeoutError):
            message = f"the request did not finish within its {TIMEOUT_HEADER}; it was cancelled"
    body = {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param, "code": code}
    return status, body


def error_json(err: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    """`error_body` as a response; a 401 carries `www-authenticate: Bearer`."""
    status, body = error_body(err)
    return JSONResponse({"error": body}, status_code=status, headers={**(headers or {}), **(_headers(status) or {})})
