"""The core's failure classes. Each maps to one gRPC status in the front doors (server/frontends/status.py)
and nowhere else."""

from __future__ import annotations


class DeltaserveServerError(Exception):
    """Base of the server core's own errors."""


class InvalidRequestError(DeltaserveServerError):
    """The request itself is malformed (INVALID_ARGUMENT)."""


class AdapterNotFoundError(DeltaserveServerError):
    """The request names an adapter that is not loaded (NOT_FOUND)."""


class AdapterExistsError(DeltaserveServerError):
    """LoadAdapter with an id already in use (ALREADY_EXISTS)."""


class UnauthenticatedError(DeltaserveServerError):
    """A guarded call without the right bearer token (UNAUTHENTICATED; HTTP 401)."""


class PermissionDeniedError(DeltaserveServerError):
    """An adapter path outside every --adapter-root (PERMISSION_DENIED)."""


class MergeError(DeltaserveServerError):
    """A merge or unmerge that cannot be done in the current state (FAILED_PRECONDITION)."""


class CapacityError(DeltaserveServerError):
    """A bounded resource is full: adapter slots, the request queue (RESOURCE_EXHAUSTED). `retry_after`, when
    known, is a hint in seconds (gRPC trailing metadata `retry-after`, HTTP header `Retry-After`)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TenantLimitError(CapacityError):
    """A tenant is over one of its own limits, e.g. --tenant-max-queued (RESOURCE_EXHAUSTED, with a retry hint)."""


class AdapterUnreadableError(DeltaserveServerError):
    """A loaded adapter whose files could not be read back onto the device (they changed or vanished since
    it was validated); requests for it fail until it reads again (FAILED_PRECONDITION)."""


class AdapterSourceUnavailableError(DeltaserveServerError):
    """An --adapter-source could not be reached or failed while resolving or downloading an adapter; only the
    requests for that adapter fail (UNAVAILABLE)."""


class AdapterSourceTimeoutError(DeltaserveServerError):
    """An --adapter-source took longer than --adapter-download-timeout-s for one adapter (DEADLINE_EXCEEDED)."""


class NonFiniteOutputError(DeltaserveServerError):
    """A request's logits or sampling distribution were not finite, e.g. an overflowing adapter; only that
    request fails (FAILED_PRECONDITION)."""


class EngineStoppedError(DeltaserveServerError):
    """The engine is shutting down and admits no new work (UNAVAILABLE)."""


class EngineFailedError(DeltaserveServerError):
    """The engine thread died; the server reports NOT_SERVING and exits so that it is restarted (UNAVAILABLE)."""


class EngineStepError(DeltaserveServerError):
    """An engine step failed on a bug or a device error; the requests in it fail, the engine keeps serving
    (INTERNAL: the detail is in the server log under the request id)."""


class ModelLoadError(DeltaserveServerError):
    """The base model cannot be loaded or is of an architecture the runner does not serve."""


class ConfigError(DeltaserveServerError, ValueError):
    """A configuration value is refused; the message names the flag (server/config.py). The CLI exits 2 on it."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting  # the config field at fault, so the Ray builder can name its own argument
