"""Domain <-> protobuf conversion, kept in one place and cheap on the hot paths (submit, watch)."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from jobwire.handlers.api import RetryDefaults
from jobwire.server.access import TENANT_PATTERN
from jobwire.server.audit import AuditEntry
from jobwire.server.errors import FieldViolation, InvalidArgument
from jobwire.server.job import PRIORITY_MAX, PRIORITY_MIN, AttemptRecord, Job, JobError, Progress, RetryPolicy
from jobwire.server.job_types import KnownType
from jobwire.server.state_machine import JobState
from jobwire.server.stores.base import Cursor, JobFilter, ListOrder
from jobwire.server.validation import filter_violations
from jobwire.v1 import job_pb2, job_service_pb2

ERROR_DOMAIN = "jobwire.dev"
MAX_PAGE_TOKEN = 512
MAX_FILTER_TENANTS = 100


def set_timestamp(target: timestamp_pb2.Timestamp, seconds: float) -> None:
    whole = int(seconds)
    target.seconds = whole
    target.nanos = round((seconds - whole) * 1e9) % 1_000_000_000


def timestamp_seconds(value: timestamp_pb2.Timestamp) -> float:
    return value.seconds + value.nanos / 1e9


def set_duration(target: duration_pb2.Duration, seconds: float) -> None:
    whole = int(seconds)
    target.seconds = whole
    target.nanos = round((seconds - whole) * 1e9)


def duration_seconds(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python (several times faster than json_format.MessageToDict)."""
    return {key: _plain(item) for key, item in value.fields.items()}


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    return None


def job_error_to_status(error: JobError) -> status_pb2.Status:
    status = status_pb2.Status(code=int(error.code), message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    status.details.add().Pack(info)
    return status


def job_to_proto(job: Job, with_payload: bool = True) -> job_pb2.Job:
    """The wire form of a job; without ``with_payload``, params and result are left out (BASIC view)."""
    message = job_pb2.Job(
        id=job.id,
        type=job.type,
        state=int(job.state),  # type: ignore[arg-type]
        priority=job.priority,
        labels=job.labels,
        attempt=job.attempt,
        queue_position=job.queue_position,
        request_id=job.request_id,
        cancel_reason=job.cancel_reason,
        tenant=job.tenant,
        created_by=job.created_by,
    )
    if job.params and with_payload:
        message.params.update(job.params)
    set_timestamp(message.create_time, job.create_time)
    set_timestamp(message.update_time, job.update_time)
    if job.progress is not None:
        _set_progress(message.progress, job.progress)
    if job.result is not None and with_payload:
        message.result.update(job.result)
    if job.error is not None:
        message.error.CopyFrom(job_error_to_status(job.error))
    if job.start_time is not None:
        set_timestamp(message.start_time, job.start_time)
    if job.end_time is not None:
        set_timestamp(message.end_time, job.end_time)
    if job.expire_time is not None:
        set_timestamp(message.expire_time, job.expire_time)
    if job.timeout is not None:
        set_duration(message.timeout, job.timeout)
    if job.retention is not None:
        set_duration(message.retention, job.retention)
    message.retry_policy.CopyFrom(_retry_policy_proto(job.retry_policy))
    if job.schedule_time is not None:
        set_timestamp(message.schedule_time, job.schedule_time)
    for record in job.attempts:
        _set_attempt(message.attempts.add(), record)
    if job.wait_reason:
        message.wait_reason = int(job.wait_reason)  # type: ignore[assignment]
        message.wait_message = job.wait_message
    message.worker_id = job.worker_id
    if job.lease_expire_time is not None:
        set_timestamp(message.lease_expire_time, job.lease_expire_time)
    message.lease_epoch = job.lease_epoch
    if job.attempt:
        message.attempts_in_budget = job.attempt - job.attempt_base
    return message


@functools.lru_cache(maxsize=256)  # few distinct policies; callers only copy from the cached message
def _retry_policy_proto(policy: RetryPolicy) -> job_pb2.RetryPolicy:
    message = job_pb2.RetryPolicy(
        max_attempts=policy.max_attempts,
        backoff_multiplier=policy.backoff_multiplier,
        non_retryable_codes=sorted(policy.non_retryable_codes),
    )
    set_duration(message.initial_backoff, policy.initial_backoff)
    set_duration(message.max_backoff, policy.max_backoff)
    return message


def _set_attempt(target: job_pb2.Attempt, record: AttemptRecord) -> None:
    target.attempt = record.attempt
    set_timestamp(target.start_time, record.start_time)
    set_timestamp(target.end_time, record.end_time)
    if record.outcome is None:
        target.outcome.code = 0
        target.outcome.message = "succeeded"
    else:
        target.outcome.CopyFrom(job_error_to_status(record.outcome))
    target.worker_id = record.worker_id


def with_payload(view: int, default: int) -> bool:
    """Whether a read in ``view`` (JOB_VIEW_UNSPECIFIED: the RPC's ``default``) carries params and result."""
    if view == job_pb2.JOB_VIEW_UNSPECIFIED:
        view = default
    if view not in (job_pb2.JOB_VIEW_BASIC, job_pb2.JOB_VIEW_FULL):
        raise InvalidArgument(violations=[FieldViolation("view", f"not a valid job view: {view}")])
    return view == job_pb2.JOB_VIEW_FULL


def retry_from_proto(policy: job_pb2.RetryPolicy) -> RetryDefaults:
    """A RetryPolicy message as partial settings: zero fields are left to the defaults."""
    return RetryDefaults(
        max_attempts=policy.max_attempts or None,
        initial_backoff=duration_seconds(policy.initial_backoff)
        if policy.HasField("initial_backoff")
        else None,
        max_backoff=duration_seconds(policy.max_backoff) if policy.HasField("max_backoff") else None,
        backoff_multiplier=policy.backoff_multiplier or None,
        non_retryable_codes=tuple(sorted(set(policy.non_retryable_codes))) or None,
    )


def status_to_job_error(status: status_pb2.Status, default_reason: str) -> JobError:
    """A worker-reported google.rpc.Status as a JobError (ErrorInfo reason kept when given)."""
    reason, metadata = default_reason, {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            try:
                detail.Unpack(info)
            except DecodeError:  # a broken detail must not lose the failure it decorates
                continue
            reason, metadata = info.reason or default_reason, dict(info.metadata)
    code = status.code if 0 < status.code <= 16 else 2  # not a google.rpc.Code: UNKNOWN
    return JobError(code, status.message, reason, metadata)


def _set_progress(target: job_pb2.Progress, progress: Progress) -> None:
    target.percent = progress.percent
    target.message = progress.message
    target.current_step = progress.current_step
    target.total_steps = progress.total_steps
    if progress.details:
        target.details.update(progress.details)


# -- ListJobs filters and page tokens ------------------------------------------------------------------


def job_filter_from_request(
    states: list[int],
    types: list[str],
    labels: dict[str, str],
    create_time_start: timestamp_pb2.Timestamp | None,
    create_time_end: timestamp_pb2.Timestamp | None,
    tenants: list[str] | None = None,
    priorities: list[int] | None = None,
) -> JobFilter:
    violations: list[FieldViolation] = []
    tenants = tenants or []
    if len(tenants) > MAX_FILTER_TENANTS:
        violations.append(FieldViolation("tenants", f"at most {MAX_FILTER_TENANTS}"))
    else:
        violations.extend(
            FieldViolation(f"tenants[{i}]", "not a tenant name")
            for i, name in enumerate(tenants)
            if not TENANT_PATTERN.match(name)
        )
    domain_states: set[JobState] = set()
    for i, state in enumerate(states):
        try:
            domain_states.add(JobState(state))
        except ValueError:
            violations.append(FieldViolation(f"states[{i}]", f"not a valid job state: {state}"))
    start = timestamp_seconds(create_time_start) if create_time_start is not None else None
    end = timestamp_seconds(create_time_end) if create_time_end is not None else None
    if start is not None and end is not None and end < start:
        violations.append(FieldViolation("create_time_end", "is before create_time_start"))
    violations.extend(filter_violations(types, labels))
    priorities = priorities or []
    violations.extend(
        FieldViolation(f"priorities[{i}]", f"must be from {PRIORITY_MIN} to {PRIORITY_MAX}, got {p}")
        for i, p in enumerate(priorities)
        if not PRIORITY_MIN <= p <= PRIORITY_MAX
    )
    if violations:
        raise InvalidArgument(violations=violations)
    return JobFilter(
        tenants=frozenset(tenants),
        states=frozenset(domain_states),
        types=frozenset(types),
        labels=tuple(sorted(labels.items())),
        create_time_start=start,
        create_time_end=end,
        priorities=frozenset(priorities),
    )


# What ListJobsRequest.order_by accepts (AIP-132), each spelling of each order.
_ORDERS = {
    "": ListOrder.NEWEST,
    "create_time desc": ListOrder.NEWEST,
    "create_time": ListOrder.OLDEST,
    "create_time asc": ListOrder.OLDEST,
    "priority desc": ListOrder.PRIORITY_HIGH,
    "priority": ListOrder.PRIORITY_LOW,
    "priority asc": ListOrder.PRIORITY_LOW,
}


def list_order(order_by: str) -> ListOrder:
    """ListJobsRequest.order_by as an order (spaces and case aside); INVALID_ARGUMENT for any other."""
    order = _ORDERS.get(" ".join(order_by.lower().split()))
    if order is None:
        accepted = '"create_time desc", "create_time", "priority desc" or "priority"'
        raise InvalidArgument(violations=[FieldViolation("order_by", f"must be {accepted}")])
    return order


def _filter_digest(job_filter: JobFilter, order: ListOrder) -> str:
    canonical = json.dumps(
        [
            sorted(job_filter.tenants),
            sorted(int(s) for s in job_filter.states),
            sorted(job_filter.types),
            list(job_filter.labels),
            job_filter.create_time_start,
            job_filter.create_time_end,
            *([sorted(job_filter.priorities)] if job_filter.priorities else []),
            *([order.value] if order is not ListOrder.NEWEST else []),
        ]
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_page_token(last: Job, job_filter: JobFilter, order: ListOrder = ListOrder.NEWEST) -> str:
    """Opaque to clients (AIP-158): where the page ended (the last job's id, and its priority when the
    order is by priority), bound to the filters and the order it was made with."""
    data: dict[str, Any] = {"after": last.id, "filter": _filter_digest(job_filter, order)}
    if order in (ListOrder.PRIORITY_HIGH, ListOrder.PRIORITY_LOW):
        data["priority"] = last.priority
    raw = json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, method: str) -> dict[str, Any]:
    """The JSON object inside one of our page tokens; INVALID_ARGUMENT for anything else."""
    try:
        if len(token) > MAX_PAGE_TOKEN:  # ours are ~100 characters; never parse an arbitrary blob
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return data
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as error:
        raise InvalidArgument(
            violations=[FieldViolation("page_token", f"not a token returned by {method}")]
        ) from error


def decode_page_token(token: str, job_filter: JobFilter, order: ListOrder = ListOrder.NEWEST) -> Cursor:
    """The cursor in ``token``; INVALID_ARGUMENT if it is malformed or was made for other filters or
    another order (the filter includes the tenants the caller may see: a token never crosses tenants)."""
    data = _decode_token(token, "ListJobs")
    last_id, digest, priority = data.get("after"), data.get("filter"), data.get("priority", 0)
    if (
        not isinstance(last_id, str)
        or not isinstance(digest, str)
        or not isinstance(priority, int)
        or isinstance(priority, bool)
    ):
        raise InvalidArgument(violations=[FieldViolation("page_token", "not a token returned by ListJobs")])
    if digest != _filter_digest(job_filter, order):
        raise InvalidArgument(
            violations=[
                FieldViolation(
                    "page_token", "was made for different filters or another order; start again without it"
                )
            ]
        )
    return Cursor(last_id, priority)


# -- the audit trail -----------------------------------------------------------------------------------


def audit_entry_to_proto(entry: AuditEntry) -> job_pb2.AuditEntry:
    message = job_pb2.AuditEntry(
        action=entry.action,
        principal=entry.principal,
        request_id=entry.request_id,
        peer=entry.peer,
        detail=entry.detail,
    )
    set_timestamp(message.time, entry.time)
    return message


def encode_audit_token(job_id: str, after_id: int) -> str:
    """A ListJobAuditEntries cursor, bound to its job."""
    raw = json.dumps({"job": job_id, "after": after_id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_audit_token(token: str, job_id: str) -> int:
    data = _decode_token(token, "ListJobAuditEntries")
    after = data.get("after")
    if data.get("job") != job_id or not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise InvalidArgument(
            violations=[FieldViolation("page_token", "not a token ListJobAuditEntries returned for this job")]
        )
    return after


# -- job types -----------------------------------------------------------------------------------------


def known_type_to_proto(known: KnownType) -> job_service_pb2.JobTypeInfo:
    job_type = known.job_type
    message = job_service_pb2.JobTypeInfo(
        name=job_type.name,
        in_process=known.in_process,
        max_running=known.limit or 0,
        executors=known.executors,
        free_slots=known.free,
        running=known.running,
        tenant=job_type.tenant,
    )
    if job_type.timeout is not None:
        set_duration(message.timeout, job_type.timeout)
    retry, policy = job_type.retry, message.retry_policy
    if retry.max_attempts is not None:
        policy.max_attempts = retry.max_attempts
    if retry.initial_backoff is not None:
        set_duration(policy.initial_backoff, retry.initial_backoff)
    if retry.max_backoff is not None:
        set_duration(policy.max_backoff, retry.max_backoff)
    if retry.backoff_multiplier is not None:
        policy.backoff_multiplier = retry.backoff_multiplier
    policy.non_retryable_codes.extend(retry.non_retryable_codes or ())
    if job_type.last_seen:
        set_timestamp(message.last_declare_time, job_type.last_seen)
    return message


def encode_types_token(last_name: str) -> str:
    """A ListJobTypes cursor: the last name returned."""
    raw = json.dumps({"after_type": last_name}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_types_token(token: str) -> str:
    after = _decode_token(token, "ListJobTypes").get("after_type")
    if not isinstance(after, str):
        raise InvalidArgument(
            violations=[FieldViolation("page_token", "not a token returned by ListJobTypes")]
        )
    return after
