"""Domain errors -> gRPC statuses with google.rpc details (AIP-193), in exactly one place."""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from jobwire.server import errors
from jobwire.server.api.convert import ERROR_DOMAIN
from jobwire.server.job import clip

log = logging.getLogger("jobwire.api")

# (exception class, status code, ErrorInfo.reason): the first class that matches wins.
_MAPPING: list[tuple[type[errors.JobwireError], grpc.StatusCode, str]] = [
    (errors.UnknownJobType, grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_JOB_TYPE"),
    (errors.RequestIdReused, grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED"),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (errors.JobNotFound, grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND"),
    (errors.JobAlreadyFinished, grpc.StatusCode.FAILED_PRECONDITION, "JOB_ALREADY_FINISHED"),
    (errors.JobNotQueued, grpc.StatusCode.FAILED_PRECONDITION, "JOB_NOT_QUEUED"),
    (errors.QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL"),
    (errors.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_QUOTA_EXCEEDED"),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (errors.TooManyJobTypes, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_JOB_TYPES"),
    (errors.Draining, grpc.StatusCode.UNAVAILABLE, "SERVER_DRAINING"),
    (errors.Starting, grpc.StatusCode.UNAVAILABLE, "SERVER_STARTING"),
    (errors.WatchPositionLost, grpc.StatusCode.OUT_OF_RANGE, "WATCH_POSITION_LOST"),
]


# Bounds on what one error carries. Python and C-core clients refuse response metadata past 16 KiB, so
# an unbounded google.rpc.Status trailer would turn INVALID_ARGUMENT into RESOURCE_EXHAUSTED on the
# client. At most 20 violations of at most ~400 bytes each, and a message of 1 KiB, keep it under 10 KiB.
MAX_VIOLATIONS = 20
MAX_FIELD = 128
MAX_DESCRIPTION = 256
MAX_MESSAGE = 1024


def to_status(error: errors.JobwireError) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The status code and rich status for a domain error, bounded in size whatever the error holds."""
    code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
    for cls, mapped_code, mapped_reason in _MAPPING:
        if isinstance(error, cls):
            code, reason = mapped_code, mapped_reason
            break
    if isinstance(error, errors.Unauthenticated):
        reason = error.reason  # which check failed
    status = status_pb2.Status(code=code.value[0], message=clip(error.message, MAX_MESSAGE))
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    status.details.add().Pack(info)
    if isinstance(error, errors.InvalidArgument) and error.violations:
        bad_request = error_details_pb2.BadRequest()
        for violation in error.violations[:MAX_VIOLATIONS]:
            bad_request.field_violations.add(
                field=clip(violation.field, MAX_FIELD),
                description=clip(violation.description, MAX_DESCRIPTION),
            )
        left_out = len(error.violations) - MAX_VIOLATIONS
        if left_out > 0:
            bad_request.field_violations.add(
                field="request", description=f"{left_out} more field violations left out"
            )
        status.details.add().Pack(bad_request)
    if isinstance(error, errors.QuotaExceeded):
        quota = error_details_pb2.QuotaFailure()
        quota.violations.add(subject=clip(error.subject, MAX_FIELD), description=clip(error.description, 256))
        status.details.add().Pack(quota)
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1_000_000, round(error.retry_after * 1e9)))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    if isinstance(error, errors.QueueFull | errors.Draining | errors.Starting):
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1)))
    return code, status


async def abort(context: grpc.aio.ServicerContext, error: errors.JobwireError) -> NoReturn:
    code, status = to_status(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error: %s", error.message)
    await context.abort(
        code, status.message, trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),)
    )
    raise AssertionError("unreachable: context.abort raises")


def invalid(field: str, description: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(violations=[errors.FieldViolation(field, description)])


__all__ = ["abort", "invalid", "to_status"]
