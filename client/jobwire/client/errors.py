"""Typed exceptions of the Jobwire SDK.

Every failed RPC surfaces as a :class:`JobwireError` subclass chosen by its gRPC status code, with the
AIP-193 details the server puts in the ``grpc-status-details-bin`` trailer already decoded: the
``google.rpc.ErrorInfo`` reason and metadata, the ``google.rpc.BadRequest`` field violations, the
``google.rpc.QuotaFailure`` violations and the ``google.rpc.RetryInfo`` delay.
Callers branch on the class or on ``reason``, never on raw grpc errors or message text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import grpc.aio
from google.rpc.error_details_pb2 import BadRequest, ErrorInfo, QuotaFailure, RetryInfo
from google.rpc.status_pb2 import Status
from grpc_status import rpc_status

from jobwire.v1 import job_pb2

__all__ = [
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "JobFailedError",
    "JobwireError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
    "from_status",
    "status_code_from_int",
]

_DETAILS_KEY = "grpc-status-details-bin"
_CODE_BY_NUMBER: dict[int, Any] = {code.value[0]: code for code in grpc.StatusCode}


def status_code_from_int(number: int) -> Any:
    """The grpc.StatusCode for a google.rpc.Code number (UNKNOWN for numbers gRPC does not know)."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


class JobwireError(Exception):
    """A Jobwire call failed; the root of every exception the SDK raises.

    ``code`` is a ``grpc.StatusCode``; ``reason``, ``domain`` and ``metadata`` come from the
    ``google.rpc.ErrorInfo`` detail ("" / {} when the server sent none); ``field_violations`` lists
    ``(field, description)`` pairs from ``google.rpc.BadRequest``; ``quota_violations`` lists
    ``(subject, description)`` pairs from ``google.rpc.QuotaFailure`` (e.g. ``("tenant:acme", "at
    most 100 jobs queued")``, mostly on ResourceExhaustedError); ``retry_delay`` is the seconds
    a ``google.rpc.RetryInfo`` asks to wait before retrying (None without one); ``status`` is the
    decoded rich status, if any.
    """

    default_code: Any = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: Any = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        retry_delay: float | None = None,
        status: Status | None = None,
        quota_violations: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.code: Any = code if code is not None else self.default_code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.quota_violations: list[tuple[str, str]] = list(quota_violations)
        self.retry_delay = retry_delay
        self.status = status

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(code={self.code.name}, message={self.message!r}, reason={self.reason!r})"


class InvalidArgumentError(JobwireError):
    """The request was refused as bad input (see ``field_violations``)."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(JobwireError):
    """No such job (never existed, or purged after its retention period)."""

    default_code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(JobwireError):
    """The job is in a state that forbids the operation (e.g. cancelling a finished job)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(JobwireError):
    """The server's queue is full, or the caller's tenant is over a quota (its queued jobs or its submit
    rate: see ``quota_violations``); retry later, after ``retry_delay`` when the server gave one."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OutOfRangeError(JobwireError):
    """A watch position that the server no longer retains, or that never existed."""

    default_code = grpc.StatusCode.OUT_OF_RANGE


class UnavailableError(JobwireError):
    """The server could not be reached, or is draining."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(JobwireError):
    """A call, or a client-side wait, ran out of time."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDeniedError(JobwireError):
    """The caller may not do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(JobwireError):
    """The call carried no valid credentials."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class JobFailedError(JobwireError):
    """A waited-for job ended FAILED or CANCELLED; ``job`` is its final state.

    ``code``, ``message`` and ``reason`` are taken from the job's ``error`` status, so a handler
    exception shows as UNKNOWN and a job time-out as DEADLINE_EXCEEDED.
    """

    def __init__(self, job: job_pb2.Job) -> None:
        state = job_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
        error = job.error
        text = error.message or "no error message"
        parsed = _parse_details(error.details)
        super().__init__(
            f"job {job.id} {state}: {text}",
            code=status_code_from_int(error.code) if job.HasField("error") else grpc.StatusCode.UNKNOWN,
            reason=parsed.reason,
            domain=parsed.domain,
            metadata=parsed.metadata,
            field_violations=parsed.field_violations,
            retry_delay=parsed.retry_delay,
            status=error if job.HasField("error") else None,
            quota_violations=parsed.quota_violations,
        )
        self.job = job


_CLASS_BY_CODE: dict[Any, type[JobwireError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


class _Details:
    """The decoded ``details`` of a google.rpc.Status."""

    __slots__ = ("domain", "field_violations", "metadata", "quota_violations", "reason", "retry_delay")

    def __init__(self) -> None:
        self.retry_delay: float | None = None
        self.reason = ""
        self.domain = ""
        self.metadata: dict[str, str] = {}
        self.field_violations: list[tuple[str, str]] = []
        self.quota_violations: list[tuple[str, str]] = []


def _parse_details(details: Iterable[Any]) -> _Details:
    """Pick ErrorInfo, BadRequest, QuotaFailure and RetryInfo out of a Status's ``Any`` details, ignoring
    the rest."""
    parsed = _Details()
    for detail in details:
        if detail.Is(ErrorInfo.DESCRIPTOR):
            info = ErrorInfo()
            detail.Unpack(info)
            if not parsed.reason:
                parsed.reason = info.reason
                parsed.domain = info.domain
                parsed.metadata = dict(info.metadata)
        elif detail.Is(BadRequest.DESCRIPTOR):
            bad = BadRequest()
            detail.Unpack(bad)
            parsed.field_violations.extend((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(QuotaFailure.DESCRIPTOR):
            quota = QuotaFailure()
            detail.Unpack(quota)
            parsed.quota_violations.extend((v.subject, v.description) for v in quota.violations)
        elif detail.Is(RetryInfo.DESCRIPTOR):
            retry = RetryInfo()
            detail.Unpack(retry)
            parsed.retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
    return parsed


def _status_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> Status | None:
    """Decode the rich status from trailing metadata (sync tuples or a grpc.aio.Metadata)."""
    for key, value in metadata or ():
        if key == _DETAILS_KEY:
            return Status.FromString(value if isinstance(value, bytes) else value.encode())
    return None


def _rich_status(err: Any) -> Status | None:
    """The google.rpc.Status carried by a failed call, or None if it carried none."""
    trailing = getattr(err, "trailing_metadata", None)
    if not callable(trailing):
        return None  # an RpcError that is not a Call: nothing to decode
    try:
        if not isinstance(err, grpc.aio.AioRpcError):  # from_call wants a sync grpc.Call
            try:
                status: Status | None = rpc_status.from_call(err)
                return status
            except ValueError:
                pass  # the status disagrees with the call's code or message: decode its details anyway
        return _status_from_metadata(trailing())
    except Exception:  # a malformed trailer must not hide the original error
        return None


def from_status(status: Status) -> JobwireError:
    """The typed exception for a google.rpc.Status (e.g. one read from a job's ``error``)."""
    code = status_code_from_int(status.code)
    parsed = _parse_details(status.details)
    cls = _CLASS_BY_CODE.get(code, JobwireError)
    return cls(
        status.message or code.name,
        code=code,
        reason=parsed.reason,
        domain=parsed.domain,
        metadata=parsed.metadata,
        field_violations=parsed.field_violations,
        retry_delay=parsed.retry_delay,
        status=status,
        quota_violations=parsed.quota_violations,
    )


def from_rpc_error(err: grpc.RpcError) -> JobwireError:
    """Convert a failed gRPC call (sync or grpc.aio) into the matching typed JobwireError."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    message = (details_fn() if callable(details_fn) else None) or code.name
    status = _rich_status(err)
    parsed = _parse_details(status.details) if status is not None else _Details()
    cls = _CLASS_BY_CODE.get(code, JobwireError)
    return cls(
        str(message),
        code=code,
        reason=parsed.reason,
        domain=parsed.domain,
        metadata=parsed.metadata,
        field_violations=parsed.field_violations,
        retry_delay=parsed.retry_delay,
        status=status,
        quota_violations=parsed.quota_violations,
    )
