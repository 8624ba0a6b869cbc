"""Jobs as table rows, for the SQL stores (SQLite and PostgreSQL share one column layout).

Each job is one row; the structured fields (params, labels, progress, result, error, retry policy,
attempts) are JSON text. Serializing happens in the caller's thread, so later changes to a Job cannot
race with a writer; ``changed_columns`` serializes just the fields a compare-and-set changes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jobwire.handlers.api import Progress, RetryDefaults
from jobwire.server.audit import AuditEntry
from jobwire.server.changes import ChangeKind, JobChange
from jobwire.server.job import AttemptRecord, Job, JobError, RetryPolicy
from jobwire.server.job_types import JobType
from jobwire.server.state_machine import JobState
from jobwire.server.stores.base import JobQuery, ListOrder, check_changeable

COLUMNS = (
    "id",
    "type",
    "state",
    "priority",
    "params",
    "labels",
    "create_time",
    "update_time",
    "queue_time",
    "attempt",
    "progress",
    "result",
    "error",
    "start_time",
    "end_time",
    "expire_time",
    "request_id",
    "request_fingerprint",
    "timeout",
    "cancel_reason",
    "sequence",
    "retry_policy",
    "schedule_time",
    "attempts",
    "worker_id",
    "lease_expire_time",
    "lease_epoch",
    "attempt_base",
    "executor",
    "tenant",
    "created_by",
    "retention",
)
# The same columns with the payload left out (an empty params object, no result).
BASIC_COLUMNS = tuple({"params": "'{}'", "result": "NULL"}.get(column, column) for column in COLUMNS)
# The ordering information of a queued job (stores.base.QueuedJob), in its field order.
QUEUE_COLUMNS = ("id", "type", "priority", "queue_time", "schedule_time", "sequence", "tenant")
# What a change says without the job (changes.JobChange, its kind left out), in its field order.
CHANGE_COLUMNS = (
    "id",
    "sequence",
    "state",
    "type",
    "priority",
    "queue_time",
    "schedule_time",
    "lease_epoch",
    "executor",
    "start_time",
    "tenant",
)
# An audit entry (audit.AuditEntry), in its field order.
AUDIT_COLUMNS = ("job_id", "time", "action", "principal", "request_id", "peer", "detail", "id")
# The values of the columns added after the first layout, for rows written before them (PostgreSQL's
# change snapshots keep the columns of the day they were written).
_LATER_COLUMNS_DEFAULTS: tuple[Any, ...] = ("default", "", None)

Row = tuple[Any, ...]


# One encoder for every row: json.dumps with options builds a new encoder on each call (a third slower).
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def progress_json(progress: Progress | None) -> str | None:
    if progress is None:
        return None
    fields = {
        "percent": progress.percent,
        "message": progress.message,
        "current_step": progress.current_step,
        "total_steps": progress.total_steps,
    }
    if progress.details:
        fields["details"] = progress.details
    return _dumps(fields)


def _error_obj(error: JobError) -> dict[str, Any]:
    # The code is any google.rpc.Code number, stored and loaded as a plain int.
    return {
        "code": int(error.code),
        "message": error.message,
        "reason": error.reason,
        "metadata": error.metadata,
    }


def _error_from(e: dict[str, Any]) -> JobError:
    return JobError(int(e["code"]), e["message"], e["reason"], dict(e["metadata"]))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@functools.lru_cache(maxsize=256)  # a few distinct policies serve millions of jobs
@functools.lru_cache(maxsize=256)  # few distinct policies, and a policy is immutable
def _retry_fields(policy: RetryPolicy | RetryDefaults) -> dict[str, Any]:
    """A job's policy or a type's defaults as stored JSON (the codes only when there are some: rows
    written before they existed read the same)."""
    fields: dict[str, Any] = {
        "max_attempts": policy.max_attempts,
        "initial_backoff": policy.initial_backoff,
        "max_backoff": policy.max_backoff,
        "backoff_multiplier": policy.backoff_multiplier,
    }
    if policy.non_retryable_codes:
        fields["non_retryable_codes"] = sorted(policy.non_retryable_codes)
    return fields


def _retry_policy_json(policy: RetryPolicy) -> str:
    return _dumps(_retry_fields(policy))


def _retry_policy_from(text: str) -> RetryPolicy:
    r = json.loads(text)
    return RetryPolicy(
        int(r["max_attempts"]),
        float(r["initial_backoff"]),
        float(r["max_backoff"]),
        float(r["backoff_multiplier"]),
        frozenset(r.get("non_retryable_codes", ())),
    )


def _attempts_json(attempts: Sequence[AttemptRecord]) -> str:
    if not attempts:
        return "[]"
    return _dumps(
        [
            {
                "attempt": a.attempt,
                "start_time": a.start_time,
                "end_time": a.end_time,
                "outcome": None if a.outcome is None else _error_obj(a.outcome),
                "worker_id": a.worker_id,
            }
            for a in attempts
        ]
    )


def _attempts_from(text: str) -> tuple[AttemptRecord, ...]:
    return tuple(
        AttemptRecord(
            int(a["attempt"]),
            float(a["start_time"]),
            float(a["end_time"]),
            None if a["outcome"] is None else _error_from(a["outcome"]),
            a["worker_id"],
        )
        for a in json.loads(text)
    )


def job_to_row(job: Job) -> Row:
    """Serialize in the caller's thread, so later changes to ``job`` cannot race with the writer.

    The computed fields (queue_position, wait_reason, wait_message) are not stored.
    """
    error = None if job.error is None else _dumps(_error_obj(job.error))
    return (
        job.id,
        job.type,
        int(job.state),
        job.priority,
        _dumps(job.params) if job.params else "{}",
        _labels_json(job.labels),
        job.create_time,
        job.update_time,
        job.queue_time,
        job.attempt,
        progress_json(job.progress),
        None if job.result is None else _dumps(job.result),
        error,
        job.start_time,
        job.end_time,
        job.expire_time,
        job.request_id,
        job.request_fingerprint,
        job.timeout,
        job.cancel_reason,
        job.sequence,
        _retry_policy_json(job.retry_policy),
        job.schedule_time,
        _attempts_json(job.attempts),
        job.worker_id,
        job.lease_expire_time,
        job.lease_epoch,
        job.attempt_base,
        job.executor,
        job.tenant,
        job.created_by,
        job.retention,
    )


def row_to_job(row: Sequence[Any]) -> Job:
    """The inverse of ``job_to_row`` (a row of an older, shorter layout gets the later columns' defaults)."""
    if len(row) < len(COLUMNS):
        row = (*row, *_LATER_COLUMNS_DEFAULTS[len(row) - len(COLUMNS) :])
    (
        job_id,
        job_type,
        state,
        priority,
        params,
        labels,
        create_time,
        update_time,
        queue_time,
        attempt,
        progress,
        result,
        error,
        start_time,
        end_time,
        expire_time,
        request_id,
        request_fingerprint,
        timeout,
        cancel_reason,
        sequence,
        retry_policy,
        schedule_time,
        attempts,
        worker_id,
        lease_expire_time,
        lease_epoch,
        attempt_base,
        executor,
        tenant,
        created_by,
        retention,
    ) = row
    job_progress = None
    if progress is not None:
        p = json.loads(progress)
        job_progress = Progress(
            p["percent"], p["message"], p["current_step"], p["total_steps"], p.get("details")
        )
    job_error = None if error is None else _error_from(json.loads(error))
    return Job(
        id=job_id,
        type=job_type,
        state=JobState(state),
        priority=priority,
        params=json.loads(params),
        labels=json.loads(labels),
        create_time=create_time,
        update_time=update_time,
        queue_time=queue_time,
        attempt=attempt,
        progress=job_progress,
        result=None if result is None else json.loads(result),
        error=job_error,
        start_time=start_time,
        end_time=end_time,
        expire_time=expire_time,
        request_id=request_id,
        request_fingerprint=request_fingerprint,
        timeout=timeout,
        cancel_reason=cancel_reason,
        sequence=sequence,
        retry_policy=_retry_policy_from(retry_policy),
        schedule_time=schedule_time,
        attempts=_attempts_from(attempts),
        worker_id=worker_id,
        lease_expire_time=lease_expire_time,
        lease_epoch=lease_epoch,
        attempt_base=attempt_base,
        executor=executor,
        tenant=tenant,
        created_by=created_by,
        retention=retention,
    )


def job_type_to_row(job_type: JobType) -> Row:
    retry = job_type.retry
    return (
        job_type.name,
        job_type.timeout,
        job_type.max_running,
        _dumps(_retry_fields(retry)),
        job_type.last_seen,
        job_type.tenant,
    )


def row_to_job_type(row: Sequence[Any]) -> JobType:
    name, timeout, max_running, retry, last_seen, tenant = row
    r = json.loads(retry)
    return JobType(
        name=name,
        timeout=timeout,
        max_running=max_running,
        retry=RetryDefaults(
            _optional_int(r["max_attempts"]),
            _optional_float(r["initial_backoff"]),
            _optional_float(r["max_backoff"]),
            _optional_float(r["backoff_multiplier"]),
            tuple(r["non_retryable_codes"]) if r.get("non_retryable_codes") else None,
        ),
        last_seen=last_seen,
        tenant=tenant,
    )


def audit_to_row(entry: AuditEntry) -> Row:
    """An entry's columns, without its id (the store assigns it)."""
    return (
        entry.job_id,
        entry.time,
        entry.action,
        entry.principal,
        entry.request_id,
        entry.peer,
        entry.detail,
    )


def row_to_audit(row: Sequence[Any]) -> AuditEntry:
    job_id, time, action, principal, request_id, peer, detail, entry_id = row
    return AuditEntry(job_id, time, action, principal, request_id, peer, detail, entry_id)


def _json_object(value: dict[str, Any] | None) -> str | None:
    return None if value is None else _dumps(value)


def _error_json(error: JobError | None) -> str | None:
    return None if error is None else _dumps(_error_obj(error))


# How each field a compare-and-set may change becomes its column's value.
def _labels_json(labels: Mapping[str, str]) -> str:
    return _dumps(labels) if labels else "{}"


_FIELD_ENCODERS: dict[str, Callable[[Any], Any]] = {
    "labels": _labels_json,
    "progress": progress_json,
    "result": _json_object,
    "error": _error_json,
    "attempts": _attempts_json,
    "retry_policy": _retry_policy_json,
    "state": int,
}


def changed_columns(changes: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The (column, value) pairs for the changed Job fields; a field that may not change is a bug."""
    check_changeable(changes)
    pairs = []
    for name, value in changes.items():
        encode = _FIELD_ENCODERS.get(name)
        pairs.append((name, encode(value) if encode is not None and value is not None else value))
    return pairs


def row_to_progress_change(row: Sequence[Any], progress: Progress, update_time: float) -> JobChange:
    """A progress change from the CHANGE_COLUMNS of the row it updated, without the whole job."""
    job_id, sequence, state, job_type, priority, queued, scheduled, epoch, executor, started, tenant = row
    return JobChange(
        job_id,
        sequence,
        ChangeKind.PROGRESS,
        JobState(state),
        job_type,
        priority,
        queued,
        scheduled,
        epoch,
        executor,
        started,
        tenant,
        progress=progress,
        update_time=update_time,
    )


def order_sql(query: JobQuery, arg: Callable[[Any], str]) -> tuple[str | None, str]:
    """The SQL condition that continues after the query's cursor (None on a first page) and the ORDER
    BY clause of its order (as ``stores.base.is_after`` says); ``arg`` adds a parameter and returns its
    placeholder."""
    order, after = query.order, query.after
    if order is ListOrder.NEWEST:
        return (None if after is None else f"id < {arg(after.id)}"), "id DESC"
    if order is ListOrder.OLDEST:
        return (None if after is None else f"id > {arg(after.id)}"), "id ASC"
    high = order is ListOrder.PRIORITY_HIGH
    order_by = f"priority {'DESC' if high else 'ASC'}, id DESC"
    if after is None:
        return None, order_by
    ahead = "<" if high else ">"
    condition = (
        f"(priority {ahead} {arg(after.priority)} "
        f"OR (priority = {arg(after.priority)} AND id < {arg(after.id)}))"
    )
    return condition, order_by
