"""Everything the sync and async clients share that involves no I/O.

Request building, call metadata, the retry/back-off policy and the watch-resume state machine live
here once; ``sync_client`` and ``async_client`` only add the blocking or awaiting around them.
"""

from __future__ import annotations

import datetime
import enum
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from jobwire.client.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    JobwireError,
    UnavailableError,
    from_rpc_error,
)
from jobwire.client.jobs import TERMINAL_STATES, parse_state
from jobwire.v1 import job_pb2, job_service_pb2

DEFAULT_TARGET = "localhost:50051"
DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_PAGE_SIZE = 100

Metadata = tuple[tuple[str, str], ...]
Timeout = float | datetime.timedelta
StateFilter = Iterable[int | str] | int | str | None
NameFilter = Iterable[str] | str | None


def call_metadata(token: str | None) -> Metadata:
    """Metadata sent on every call: the bearer token when one is configured."""
    if token:
        return (("authorization", f"Bearer {token}"),)
    return ()


def to_struct(params: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    """A JSON-like mapping as a Struct; refuses values JSON cannot carry before any call is made."""
    if params is None:
        return None
    struct = struct_pb2.Struct()
    try:
        struct.update(dict(params))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"params is not a JSON object: {exc}", field_violations=[("params", str(exc))]
        ) from exc
    return struct


def to_duration(timeout: Timeout | None) -> duration_pb2.Duration | None:
    """Seconds (float) or a timedelta as a Duration; None stays unset (server default)."""
    if timeout is None:
        return None
    duration = duration_pb2.Duration()
    if isinstance(timeout, datetime.timedelta):
        duration.FromTimedelta(timeout)
    else:
        duration.FromNanoseconds(round(float(timeout) * 1_000_000_000))
    return duration


def to_timestamp(value: datetime.datetime) -> timestamp_pb2.Timestamp:
    """A datetime as a Timestamp; naive datetimes are taken as UTC (the protobuf convention)."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def new_request_id() -> str:
    """A fresh idempotency key, so that the SDK's own SubmitJob retries cannot create duplicates."""
    return str(uuid.uuid4())


def build_submit_request(
    type: str,
    params: Mapping[str, Any] | None = None,
    *,
    priority: int | None = None,
    labels: Mapping[str, str] | None = None,
    request_id: str | None = None,
    timeout: Timeout | None = None,
    max_attempts: int | None = None,
    schedule_time: datetime.datetime | None = None,
    non_retryable_codes: Iterable[grpc.StatusCode | int] | None = None,
    retention: Timeout | None = None,
) -> job_service_pb2.SubmitJobRequest:
    """The SubmitJobRequest for ``submit``; always carries a request_id (generated when None)."""
    request = job_service_pb2.SubmitJobRequest(
        type=type,
        labels=dict(labels or {}),
        request_id=request_id if request_id is not None else new_request_id(),
    )
    struct = to_struct(params)
    if struct is not None:
        request.params.CopyFrom(struct)
    if priority is not None:
        request.priority = priority
    duration = to_duration(timeout)
    if duration is not None:
        request.timeout.CopyFrom(duration)
    if max_attempts is not None:
        request.retry_policy.max_attempts = max_attempts
    kept = to_duration(retention)
    if kept is not None:
        request.retention.CopyFrom(kept)
    for code in non_retryable_codes or ():
        value = code.value[0] if isinstance(code, grpc.StatusCode) else int(code)
        request.retry_policy.non_retryable_codes.append(value)
    if schedule_time is not None:
        request.schedule_time.CopyFrom(to_timestamp(schedule_time))
    return request


MAX_BATCH_JOBS = 1000  # the server's limit for one BatchSubmitJobs call


def build_batch_request(jobs: Iterable[Mapping[str, Any]]) -> job_service_pb2.BatchSubmitJobsRequest:
    """The BatchSubmitJobsRequest for ``submit_many``: each mapping holds ``submit``'s arguments
    (``type`` required); each request carries a request_id (generated when missing)."""
    requests = []
    for index, job in enumerate(jobs):
        if not isinstance(job, Mapping) or "type" not in job:
            raise TypeError(f"jobs[{index}] must be a mapping with a 'type', got {job!r:.80}")
        arguments = dict(job)
        try:
            requests.append(build_submit_request(arguments.pop("type"), **arguments))
        except TypeError as error:
            raise TypeError(f"jobs[{index}]: {error}") from None
    return job_service_pb2.BatchSubmitJobsRequest(requests=requests)


def build_list_request(
    *,
    states: StateFilter = None,
    types: Iterable[str] | None = None,
    labels: Mapping[str, str] | None = None,
    create_time_start: datetime.datetime | None = None,
    create_time_end: datetime.datetime | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    page_token: str = "",
    with_payload: bool = False,
    tenants: NameFilter = None,
    priorities: Iterable[int] | int | None = None,
    order_by: str = "",
    include_total_size: bool = False,
) -> job_service_pb2.ListJobsRequest:
    """The ListJobsRequest for one page; states may be numbers or names such as "queued".

    A single state, type, tenant or priority may be given bare instead of in a list. ``tenants`` is
    for admins (who see every tenant's jobs); other callers may name only their own tenant.
    ``order_by``: "create_time desc" (default), "create_time", "priority desc" or "priority".
    """
    if isinstance(priorities, int):
        priorities = [priorities]
    if isinstance(states, int | str):
        states = [states]
    if isinstance(types, str):
        types = [types]
    if isinstance(tenants, str):
        tenants = [tenants]
    try:
        state_numbers = [parse_state(s) for s in states or ()]
    except ValueError as exc:
        raise InvalidArgumentError(str(exc), field_violations=[("states", str(exc))]) from exc
    request = job_service_pb2.ListJobsRequest(
        page_size=page_size,
        page_token=page_token,
        states=state_numbers,
        types=list(types or ()),
        labels=dict(labels or {}),
        view=job_pb2.JOB_VIEW_FULL if with_payload else job_pb2.JOB_VIEW_BASIC,
        tenants=list(tenants or ()),
        priorities=list(priorities or ()),
        order_by=order_by,
        include_total_size=include_total_size,
    )
    if create_time_start is not None:
        request.create_time_start.CopyFrom(to_timestamp(create_time_start))
    if create_time_end is not None:
        request.create_time_end.CopyFrom(to_timestamp(create_time_end))
    return request


def build_cancel_request(
    job_id: str, reason: str = "", request_id: str | None = None
) -> job_service_pb2.CancelJobRequest:
    """The CancelJobRequest; ``request_id`` (optional) is recorded in the job's audit trail."""
    return job_service_pb2.CancelJobRequest(job_id=job_id, reason=reason, request_id=request_id or "")


class Unchanged(enum.Enum):
    """The default of ``update``'s fields: leave the field as it is."""

    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED


def build_update_request(
    job_id: str,
    *,
    priority: int | Unchanged = UNCHANGED,
    labels: Mapping[str, str] | Unchanged = UNCHANGED,
    schedule_time: datetime.datetime | Unchanged | None = UNCHANGED,
    request_id: str | None = None,
) -> job_service_pb2.UpdateJobRequest:
    """The UpdateJobRequest naming in its update_mask each field given; ``schedule_time=None`` clears
    the schedule (run as soon as possible), ``labels`` replaces them all."""
    request = job_service_pb2.UpdateJobRequest(job=job_pb2.Job(id=job_id), request_id=request_id or "")
    paths = request.update_mask.paths
    if not isinstance(priority, Unchanged):
        request.job.priority = priority
        paths.append("priority")
    if not isinstance(labels, Unchanged):
        request.job.labels.update(labels)
        paths.append("labels")
    if not isinstance(schedule_time, Unchanged):
        if schedule_time is not None:
            request.job.schedule_time.CopyFrom(to_timestamp(schedule_time))
        paths.append("schedule_time")
    return request


def build_retry_request(job_id: str, request_id: str | None = None) -> job_service_pb2.RetryJobRequest:
    """The RetryJobRequest; ``request_id`` (optional) is recorded in the job's audit trail."""
    return job_service_pb2.RetryJobRequest(job_id=job_id, request_id=request_id or "")


def build_audit_request(
    job_id: str, *, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
) -> job_service_pb2.ListJobAuditEntriesRequest:
    """The ListJobAuditEntriesRequest for one page of a job's audit trail.

    A negative page size is refused here, before any call (the server would say INVALID_ARGUMENT).
    """
    if page_size < 0:
        problem = f"must be 0 (the server's default) or more, got {page_size}"
        raise InvalidArgumentError(f"page_size: {problem}", field_violations=[("page_size", problem)])
    return job_service_pb2.ListJobAuditEntriesRequest(
        job_id=job_id, page_size=page_size, page_token=page_token
    )


def timeout_seconds(timeout: Timeout | None) -> float | None:
    """A wait time in seconds, from seconds or a timedelta."""
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return None if timeout is None else float(timeout)


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with jitter: initial * multiplier**n, capped at maximum."""

    initial: float = 0.1
    multiplier: float = 2.0
    maximum: float = 5.0
    jitter: float = 0.2

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (0-based)."""
        base = min(self.maximum, self.initial * self.multiplier ** max(0, failures))
        return max(0.0, base * (1.0 + random.uniform(-self.jitter, self.jitter)))


@dataclass(frozen=True)
class RetryPolicy:
    """When a unary call is retried: only codes that are safe for it, a bounded number of times."""

    max_attempts: int = 5
    backoff: Backoff = field(default_factory=Backoff)
    retryable_codes: frozenset[Any] = frozenset({grpc.StatusCode.UNAVAILABLE})

    def delay_after(self, attempts: int, err: grpc.RpcError) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise ``err``."""
        code_fn = getattr(err, "code", None)
        code = code_fn() if callable(code_fn) else None
        if code not in self.retryable_codes or attempts >= self.max_attempts:
            return None
        return self.backoff.delay(attempts - 1)


SUBMIT_RETRY = RetryPolicy()
"""SubmitJob is retried on UNAVAILABLE: safe because every request carries a request_id."""

NO_RETRY = RetryPolicy(max_attempts=1)

WATCH_BACKOFF = Backoff(initial=0.2, multiplier=2.0, maximum=5.0)
WATCH_RETRY_WINDOW = 30.0
# Before the first message: a server that cannot be reached at all is reported after this long, not
# after the whole retry window (that is for streams that broke after working).
WATCH_FIRST_CONTACT_WINDOW = 5.0

# Messages grpc gives a stream torn down under it (connection reset, server stopped) with a code
# other than UNAVAILABLE. A resume is always safe: it replays from the last sequence seen.
_BROKEN_STREAM_HINTS = ("rst_stream", "stream removed", "socket closed", "connection reset", "goaway")


def is_broken_stream(err: grpc.RpcError) -> bool:
    """True when a watch stream failed because the connection dropped, not because of the request."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
        details = (err.details() if callable(getattr(err, "details", None)) else "") or ""
        return any(hint in details.lower() for hint in _BROKEN_STREAM_HINTS)
    return False


class WatchTracker:
    """The state machine behind ``watch``: where to resume, and what to do when a stream breaks.

    The I/O loop asks ``request()`` for each WatchJob call, feeds every message to ``accept()`` and
    every failure to ``on_error()`` / ``on_stream_end()``, which return how long to sleep before
    calling again or raise the JobwireError to surface.
    """

    def __init__(
        self,
        job_id: str,
        after_sequence: int = 0,
        *,
        timeout: Timeout | None = None,
        retry_window: float = WATCH_RETRY_WINDOW,
        backoff: Backoff = WATCH_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id = job_id
        self.last_sequence = after_sequence
        self.finished = False
        self.last_job: job_pb2.Job | None = None
        self._clock = clock
        self._timeout = timeout_seconds(timeout)
        self._deadline = None if self._timeout is None else clock() + self._timeout
        self._retry_window = retry_window
        self._backoff = backoff
        self._failing_since: float | None = None
        self._failures = 0
        self._request_after = after_sequence
        self._first_on_stream = True

    def request(self) -> job_service_pb2.WatchJobRequest:
        """The request for the next WatchJob call, resuming after the last sequence seen."""
        self.check_deadline()
        self._request_after = self.last_sequence
        self._first_on_stream = True
        return job_service_pb2.WatchJobRequest(job_id=self.job_id, after_sequence=self.last_sequence)

    def call_timeout(self) -> float | None:
        """The gRPC deadline for the next stream: what is left of the caller's timeout, if any."""
        if self._deadline is None:
            return None
        return max(0.001, self._deadline - self._clock())

    def check_deadline(self) -> None:
        """Raise the client-side DeadlineExceededError once the caller's timeout has passed."""
        if self._deadline is not None and self._clock() >= self._deadline:
            raise self._deadline_error()

    def accept(self, response: job_service_pb2.WatchJobResponse) -> bool:
        """Record a message; False for a replayed one the caller has already seen (skip it)."""
        first = self._first_on_stream
        self._first_on_stream = False
        if response.sequence <= self.last_sequence and not (first and self._request_after == 0):
            return False
        self.last_sequence = max(self.last_sequence, response.sequence)
        self._failing_since = None
        self._failures = 0
        self.last_job = response.job
        self.finished = response.job.state in TERMINAL_STATES
        return True

    def on_error(self, err: grpc.RpcError) -> float:
        """How long to wait before calling WatchJob again after ``err``; raises when not to retry."""
        code = err.code() if callable(getattr(err, "code", None)) else None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self._deadline is not None:
            raise self._deadline_error() from err
        if code == grpc.StatusCode.OUT_OF_RANGE and self._request_after != 0:
            # The resume point is no longer retained: start over from a fresh snapshot.
            self.last_sequence = 0
            return 0.0
        if is_broken_stream(err):
            return self._failure_delay(lambda: from_rpc_error(err))
        raise from_rpc_error(err) from err

    def on_stream_end(self) -> float:
        """The stream ended OK before a terminal state: resume like after a dropped connection."""
        return self._failure_delay(
            lambda: UnavailableError(f"watch of job {self.job_id} kept ending before the job finished")
        )

    def _failure_delay(self, give_up: Callable[[], JobwireError]) -> float:
        now = self._clock()
        window = (
            self._retry_window
            if self.last_job is not None
            else min(self._retry_window, WATCH_FIRST_CONTACT_WINDOW)
        )
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= window:
            raise give_up()
        delay = self._backoff.delay(self._failures)
        self._failures += 1
        delay = min(delay, max(0.0, self._failing_since + window - now))  # the last try at the window's end
        if self._deadline is not None:
            delay = min(delay, max(0.0, self._deadline - now))
        return delay

    def _deadline_error(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"job {self.job_id} did not finish within {self._timeout:g} s",
            metadata={"job_id": self.job_id},
        )


def unary_timeout(call_timeout: float | None) -> dict[str, Any]:
    """Keyword arguments for the per-call deadline (omitted entirely when there is none)."""
    return {} if call_timeout is None else {"timeout": call_timeout}
