"""The job model: what a job is, independent of gRPC and of any store."""

from __future__ import annotations

import enum
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from jobwire.handlers.api import Progress as Progress  # re-exported: part of the job model
from jobwire.server.state_machine import JobState

PRIORITY_MIN = 0
PRIORITY_MAX = 9
PRIORITY_DEFAULT = 5


class ErrorCode(enum.IntEnum):
    """The google.rpc.Code values a job's error can carry (a domain copy, so the domain needs no gRPC)."""

    CANCELLED = 1
    UNKNOWN = 2
    DEADLINE_EXCEEDED = 4
    RESOURCE_EXHAUSTED = 8
    ABORTED = 10
    UNAVAILABLE = 14


# Caps on the payload of a job: params as submitted, and the result a handler returns. Measured once
# serialized (as a protobuf Struct where one arrives, as JSON for an in-process handler's result).
MAX_PARAMS_BYTES = 1 << 20
MAX_RESULT_BYTES = 1 << 20

# Caps on what one error holds. Errors come from handlers and remote workers, and every attempt keeps
# its own in the job's history, so each part is bounded where the error is made.
MAX_ERROR_MESSAGE = 4096
MAX_ERROR_REASON = 64
MAX_ERROR_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 256
# Attempts kept in a job's history (the most recent ones): RetryJob can add attempts without end.
MAX_ATTEMPT_HISTORY = 100


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(slots=True)
class JobError:
    """Why a job failed or was cancelled: a canonical code, a message and a machine-readable reason.

    ``code`` is a google.rpc.Code number: usually an ErrorCode, but a remote worker may report any.
    Message, reason and metadata are cut to their caps on construction, whoever supplied them.
    """

    code: int
    message: str
    reason: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.message) > MAX_ERROR_MESSAGE:
            self.message = clip(self.message, MAX_ERROR_MESSAGE)
        if len(self.reason) > MAX_ERROR_REASON:
            self.reason = clip(self.reason, MAX_ERROR_REASON)
        metadata = self.metadata
        if metadata and (
            len(metadata) > MAX_ERROR_METADATA
            or any(len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE for k, v in metadata.items())
        ):
            self.metadata = {
                clip(k, MAX_METADATA_KEY): clip(v, MAX_METADATA_VALUE)
                for k, v in list(metadata.items())[:MAX_ERROR_METADATA]
            }


def result_too_large(size: int) -> JobError:
    """Why a job whose handler returned more than MAX_RESULT_BYTES failed (the result is not stored)."""
    return JobError(
        ErrorCode.RESOURCE_EXHAUSTED,
        f"the handler returned a result of {size} bytes; at most {MAX_RESULT_BYTES} are stored",
        "RESULT_TOO_LARGE",
    )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A job's resolved retry settings (see the proto's RetryPolicy for the rule)."""

    max_attempts: int = 1
    initial_backoff: float = 1.0  # seconds
    max_backoff: float = 300.0  # seconds
    backoff_multiplier: float = 2.0
    non_retryable_codes: frozenset[int] = frozenset()  # google.rpc.Code values that end the job

    def retries(self, code: int) -> bool:
        """Whether a failure with this code may be retried (attempts permitting)."""
        return code not in self.non_retryable_codes

    def backoff(self, failures: int, jitter: float) -> float:
        """Seconds to wait after the ``failures``-th failure; ``jitter`` in [0, 1) scales it to 50-100%."""
        exponent = max(0, failures - 1)
        base = min(self.max_backoff, self.initial_backoff * self.backoff_multiplier**exponent)
        return base * (0.5 + 0.5 * jitter)


class WaitReason(enum.IntEnum):
    """Why a queued job is not running; values equal the proto's ``WaitReason``."""

    NONE = 0
    QUEUED = 1
    SCHEDULED = 2
    RETRY_BACKOFF = 3
    NO_WORKER = 4
    TYPE_LIMIT = 5
    NO_CAPACITY = 6
    DRAINING = 7
    TENANT_LIMIT = 8


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One finished attempt: who ran it, when, and how it ended (``outcome`` None = succeeded)."""

    attempt: int
    start_time: float
    end_time: float
    outcome: JobError | None
    worker_id: str


@dataclass(slots=True)
class Job:
    """A unit of work. Mutated only by the JobManager, always through ``JobManager._apply``."""

    id: str
    type: str
    state: JobState
    priority: int
    params: dict[str, Any]
    labels: dict[str, str]
    create_time: float
    update_time: float
    # When the job last entered the queue: the aging rule orders by (queue_time - priority * interval).
    queue_time: float
    attempt: int = 0
    progress: Progress | None = None
    result: dict[str, Any] | None = None
    error: JobError | None = None
    start_time: float | None = None
    end_time: float | None = None
    expire_time: float | None = None
    request_id: str = ""
    # A digest of the submitted fields, to tell a retried request from a different one (AIP-155).
    request_fingerprint: str = ""
    timeout: float | None = None
    cancel_reason: str = ""
    # Per-job change counter seen by watchers; incremented by every state or progress change.
    sequence: int = 1
    retry_policy: RetryPolicy = RetryPolicy()
    # Earliest start: a requested schedule_time, or the end of a retry back-off. None = now.
    schedule_time: float | None = None
    attempts: tuple[AttemptRecord, ...] = ()
    # Who runs the current attempt: a worker's id, or "local" for a replica's in-process handlers.
    worker_id: str = ""
    # The executor the current attempt was claimed for: "<replica>/local" or "<replica>/<session>".
    # Internal (not in the API): it routes the claim to its replica, and tells whose in-process
    # attempts to requeue when a replica dies.
    executor: str = ""
    lease_expire_time: float | None = None
    # Fencing: grows with every lease granted on this job; a write with an older epoch is refused.
    lease_epoch: int = 0
    # Attempts before the last RetryJob; the retry budget counts attempts since then.
    attempt_base: int = 0
    # Whose job it is: set from the submitter's credential, never from the request (access.py).
    tenant: str = "default"
    # Who submitted it: the subject of the submitter's credential.
    created_by: str = ""
    # How long to keep the job once it ends (seconds); None: the server's retention for its outcome.
    retention: float | None = None
    # Computed on read (never stored): the run-order position and why a queued job waits.
    queue_position: int = 0
    wait_reason: WaitReason = WaitReason.NONE
    wait_message: str = ""

    def after_progress(self, progress: Progress, update_time: float, sequence: int) -> Job:
        """A snapshot of this job with a progress report applied, as the store's progress write does."""
        job = self.copy()
        job.progress, job.update_time, job.sequence = progress, update_time, sequence
        return job

    def copy(self) -> Job:
        """A snapshot that later changes to this job do not reach.

        Params, result, labels, errors, policies and attempt records are never mutated in place (they
        are replaced), so they are shared; progress is mutable and copied.
        """
        return Job(
            id=self.id,
            type=self.type,
            state=self.state,
            priority=self.priority,
            params=self.params,
            labels=self.labels,
            create_time=self.create_time,
            update_time=self.update_time,
            queue_time=self.queue_time,
            attempt=self.attempt,
            progress=None if self.progress is None else self.progress.copy(),
            result=self.result,
            error=self.error,
            start_time=self.start_time,
            end_time=self.end_time,
            expire_time=self.expire_time,
            request_id=self.request_id,
            request_fingerprint=self.request_fingerprint,
            timeout=self.timeout,
            cancel_reason=self.cancel_reason,
            sequence=self.sequence,
            retry_policy=self.retry_policy,
            schedule_time=self.schedule_time,
            attempts=self.attempts,
            worker_id=self.worker_id,
            executor=self.executor,
            lease_expire_time=self.lease_expire_time,
            lease_epoch=self.lease_epoch,
            attempt_base=self.attempt_base,
            tenant=self.tenant,
            created_by=self.created_by,
            retention=self.retention,
        )


_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_DIGIT_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_PAIR_SHIFTS = range(120, -1, -10)


class JobIdGenerator:
    """ULID-like ids in lowercase Crockford base32: 48 bits of milliseconds, 80 random bits.

    Within one process ids strictly increase, so "newest first" is "id descending" and a page cursor
    (the last id seen) stays valid while new jobs arrive.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._last_random = 0

    def new_id(self) -> str:
        with self._lock:
            ms = int(time.time() * 1000)
            if ms <= self._last_ms:
                ms = self._last_ms
                random_part = self._last_random + 1
                if random_part >= 1 << 80:
                    ms += 1
                    random_part = int.from_bytes(os.urandom(10), "big") >> 1
            else:
                random_part = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for increments
            self._last_ms, self._last_random = ms, random_part
        # 26 base32 digits of the 128 bits, left-aligned (two zero bits pad the end), two digits per
        # table lookup: the alphabet's ASCII order matches digit order, so strings sort like numbers.
        value = ((ms << 80) | random_part) << 2
        return "".join([_DIGIT_PAIRS[(value >> shift) & 1023] for shift in _PAIR_SHIFTS])
