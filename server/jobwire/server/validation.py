"""Checks on what clients send, in domain terms; each problem becomes a FieldViolation."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jobwire.handlers.api import JOB_TYPE_PATTERN, RetryDefaults
from jobwire.server.errors import FieldViolation, InvalidArgument
from jobwire.server.job import PRIORITY_MAX, PRIORITY_MIN
from jobwire.server.job_types import JobType
from jobwire.server.retention import MAX_RETENTION, MIN_RETENTION

LABEL_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_LABELS = 64
MAX_FILTER_TYPES = 100
MAX_TYPES_PER_WORKER = 200
MAX_LABEL_VALUE = 256
MAX_REQUEST_ID = 128
MAX_BATCH_JOBS = 1000  # jobs in one BatchSubmitJobs call (AIP-233)
MAX_REASON = 1024
MIN_TIMEOUT = 0.001
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_SCHEDULE_AHEAD = 365 * 24 * 3600.0


@dataclass(slots=True)
class SubmitRequest:
    """What a client asks SubmitJob for, after transport decoding."""

    type: str
    params: dict[str, Any]
    priority: int | None = None
    labels: dict[str, str] | None = None
    request_id: str = ""
    timeout: float | None = None
    retry: RetryDefaults | None = None
    schedule_time: float | None = None  # seconds since the epoch
    retention: float | None = None  # seconds to keep it once it ends; None: the server's


# What UpdateJob may change (its update_mask paths): only what orders or describes a job not yet started.
UPDATABLE_FIELDS = ("priority", "labels", "schedule_time")


@dataclass(slots=True)
class JobUpdate:
    """What a client asks UpdateJob for: the new values of the fields named in ``paths``."""

    paths: list[str]
    priority: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    schedule_time: float | None = None  # None (or a past time): run as soon as possible

    def changes(self) -> dict[str, Any]:
        """The Job fields to set."""
        return {name: getattr(self, name) for name in dict.fromkeys(self.paths)}


def update_violations(update: JobUpdate, request_id: str) -> list[FieldViolation]:
    """Every problem of an update; fields are named as in UpdateJobRequest (``job.priority``...)."""
    violations: list[FieldViolation] = []
    if not update.paths:
        violations.append(
            FieldViolation("update_mask", f"required: name some of {', '.join(UPDATABLE_FIELDS)}")
        )
    for index, path in enumerate(update.paths):
        if path not in UPDATABLE_FIELDS:
            violations.append(
                FieldViolation(
                    f"update_mask.paths[{index}]",
                    f"{path[:64]!r} cannot be changed; only {', '.join(UPDATABLE_FIELDS)} can",
                )
            )
    if "priority" in update.paths and not PRIORITY_MIN <= update.priority <= PRIORITY_MAX:
        violations.append(
            FieldViolation(
                "job.priority", f"must be from {PRIORITY_MIN} to {PRIORITY_MAX}, got {update.priority}"
            )
        )
    if "labels" in update.paths:
        violations.extend(label_violations(update.labels, "job.labels"))
    if (
        "schedule_time" in update.paths
        and update.schedule_time is not None
        and update.schedule_time > time.time() + MAX_SCHEDULE_AHEAD
    ):
        violations.append(FieldViolation("job.schedule_time", "at most 365 days ahead"))
    if len(request_id) > MAX_REQUEST_ID:
        violations.append(FieldViolation("request_id", f"at most {MAX_REQUEST_ID} characters"))
    return violations


def submit_violations(request: SubmitRequest) -> list[FieldViolation]:
    """Every problem of a submit request except an unknown type (which needs the registry)."""
    violations: list[FieldViolation] = []
    if not request.type:
        violations.append(FieldViolation("type", "required"))
    elif not JOB_TYPE_PATTERN.match(request.type):
        violations.append(FieldViolation("type", "1-128 characters of letters, digits and ._:/-"))
    if request.priority is not None and not PRIORITY_MIN <= request.priority <= PRIORITY_MAX:
        violations.append(
            FieldViolation(
                "priority", f"must be from {PRIORITY_MIN} to {PRIORITY_MAX}, got {request.priority}"
            )
        )
    violations.extend(label_violations(request.labels or {}, "labels"))
    if len(request.request_id) > MAX_REQUEST_ID:
        violations.append(FieldViolation("request_id", f"at most {MAX_REQUEST_ID} characters"))
    if request.timeout is not None and not MIN_TIMEOUT <= request.timeout <= MAX_TIMEOUT:
        violations.append(FieldViolation("timeout", "must be from 1 millisecond to 7 days"))
    if request.retry is not None:
        violations.extend(retry_violations(request.retry, "retry_policy"))
    if request.schedule_time is not None and request.schedule_time > time.time() + MAX_SCHEDULE_AHEAD:
        violations.append(FieldViolation("schedule_time", "at most 365 days ahead"))
    if request.retention is not None and not MIN_RETENTION <= request.retention <= MAX_RETENTION:
        violations.append(FieldViolation("retention", "must be from 1 second to 3650 days"))
    return violations


def batch_violations(requests: Sequence[SubmitRequest]) -> list[FieldViolation]:
    """Every problem of a batch of submit requests, each field named ``requests[i].field``."""
    if not requests:
        return [FieldViolation("requests", "at least one job")]
    if len(requests) > MAX_BATCH_JOBS:
        return [
            FieldViolation("requests", f"at most {MAX_BATCH_JOBS} jobs in one batch, got {len(requests)}")
        ]
    violations: list[FieldViolation] = []
    first_use: dict[str, int] = {}
    for index, request in enumerate(requests):
        violations.extend(
            FieldViolation(f"requests[{index}].{v.field}", v.description) for v in submit_violations(request)
        )
        if request.request_id:
            first = first_use.setdefault(request.request_id, index)
            if first != index:
                violations.append(
                    FieldViolation(f"requests[{index}].request_id", f"repeats requests[{first}].request_id")
                )
    return violations


def retry_violations(retry: RetryDefaults, field: str) -> list[FieldViolation]:
    """Bounds of each retry setting that is given (None fields take defaults and are not checked)."""
    violations: list[FieldViolation] = []
    if retry.max_attempts is not None and not 1 <= retry.max_attempts <= 100:
        violations.append(FieldViolation(f"{field}.max_attempts", "must be from 1 to 100"))
    if retry.initial_backoff is not None and not 0.001 <= retry.initial_backoff <= 86400:
        violations.append(FieldViolation(f"{field}.initial_backoff", "must be from 1 millisecond to 1 day"))
    if retry.max_backoff is not None and not 0.001 <= retry.max_backoff <= 7 * 86400:
        violations.append(FieldViolation(f"{field}.max_backoff", "must be from 1 millisecond to 7 days"))
    if retry.backoff_multiplier is not None and not 1.0 <= retry.backoff_multiplier <= 10.0:
        violations.append(FieldViolation(f"{field}.backoff_multiplier", "must be from 1.0 to 10.0"))
    codes = retry.non_retryable_codes or ()
    if len(codes) > 16 or not all(1 <= code <= 16 for code in codes):
        violations.append(
            FieldViolation(f"{field}.non_retryable_codes", "at most 16 google.rpc.Code values, none OK")
        )
    return violations


def job_type_violations(worker_id: str, job_types: list[JobType], credits: int) -> list[FieldViolation]:
    """Problems of a worker's registration."""
    violations: list[FieldViolation] = []
    if len(worker_id) > 128:
        violations.append(FieldViolation("register.worker_id", "at most 128 characters"))
    if not 1 <= len(job_types) <= MAX_TYPES_PER_WORKER:
        violations.append(
            FieldViolation("register.job_types", f"declare from 1 to {MAX_TYPES_PER_WORKER} job types")
        )
        return violations
    if not 0 <= credits <= 10_000:
        violations.append(FieldViolation("register.credits", "must be from 0 to 10000"))
    seen: set[str] = set()
    for i, job_type in enumerate(job_types):
        field = f"register.job_types[{i}]"
        if not JOB_TYPE_PATTERN.match(job_type.name):
            violations.append(
                FieldViolation(f"{field}.type", "1-128 characters of letters, digits and ._:/-")
            )
        if job_type.name in seen:
            violations.append(FieldViolation(f"{field}.type", f"{job_type.name!r} is declared twice"))
        seen.add(job_type.name)
        if job_type.timeout is not None and not MIN_TIMEOUT <= job_type.timeout <= MAX_TIMEOUT:
            violations.append(FieldViolation(f"{field}.timeout", "must be from 1 millisecond to 7 days"))
        if job_type.max_running is not None and job_type.max_running < 1:
            violations.append(FieldViolation(f"{field}.max_running", "must not be negative"))
        violations.extend(retry_violations(job_type.retry, f"{field}.retry_policy"))
    return violations


def label_violations(labels: dict[str, str], field: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if len(labels) > MAX_LABELS:
        return [FieldViolation(field, f"at most {MAX_LABELS} labels, got {len(labels)}")]
    for key, value in labels.items():
        if not LABEL_KEY_PATTERN.match(key):
            violations.append(
                FieldViolation(
                    f"{field}[{key[:64]!r}]",
                    "key must be 1-63 lowercase letters, digits, '_' or '-', starting with a letter",
                )
            )
        if len(value) > MAX_LABEL_VALUE:
            violations.append(
                FieldViolation(f"{field}[{key[:64]!r}]", f"value longer than {MAX_LABEL_VALUE}")
            )
    return violations


def filter_violations(types: list[str], labels: dict[str, str]) -> list[FieldViolation]:
    """Problems of ListJobs filters: as many and as long as what a job can carry, no more."""
    violations: list[FieldViolation] = []
    if len(types) > MAX_FILTER_TYPES:
        violations.append(FieldViolation("types", f"at most {MAX_FILTER_TYPES} types"))
    else:
        for i, job_type in enumerate(types):
            if not JOB_TYPE_PATTERN.match(job_type):
                violations.append(
                    FieldViolation(f"types[{i}]", "1-128 characters of letters, digits and ._:/-")
                )
    violations.extend(label_violations(labels, "labels"))
    return violations


def check(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations=violations)


def fingerprint(request: SubmitRequest, priority: int) -> str:
    """A digest of everything that makes two submits 'the same request' (AIP-155)."""
    canonical = json.dumps(
        [
            request.type,
            request.params,
            priority,
            request.labels or {},
            request.timeout,
            request.retry,
            request.schedule_time,
            *([request.retention] if request.retention is not None else []),
        ],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
