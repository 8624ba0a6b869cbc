"""The job model: what a job is, independent of gRPC and of any store."""

from __future__ import annotations

import base64
import enum
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from jobwire.server.state_machine import JobState

PRIORITY_MIN = 0
PRIORITY_MAX = 9
PRIORITY_DEFAULT = 5


class ErrorCode(enum.IntEnum):
    """The google.rpc.Code values a job's error can carry (a domain copy, so the domain needs no gRPC)."""

    CANCELLED = 1
    UNKNOWN = 2
    DEADLINE_EXCEEDED = 4
    ABORTED = 10
    UNAVAILABLE = 14


@dataclass(slots=True)
class Progress:
    """How far a running job has got."""

    percent: float = 0.0
    message: str = ""
    current_step: int = 0
    total_steps: int = 0


@dataclass(slots=True)
class JobError:
    """Why a job failed or was cancelled: a canonical code, a message and a machine-readable reason."""

    code: ErrorCode
    message: str
    reason: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Job:
    """A unit of work. Mutated only by the JobManager, always through ``JobManager._transition``."""

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
    # Computed on read from the scheduler (1 = next to run); never stored.
    queue_position: int = 0

    def copy(self) -> Job:
        """A snapshot that later changes to this job do not reach (params and result are never mutated)."""
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
            progress=None
            if self.progress is None
            else Progress(
                self.progress.percent,
                self.progress.message,
                self.progress.current_step,
                self.progress.total_steps,
            ),
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
        )


_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD.encode())


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
        # base32 of the 16 bytes, left-aligned: byte order and the alphabet's ASCII order agree, so
        # the strings sort like the numbers.
        encoded = base64.b32encode(((ms << 80) | random_part).to_bytes(16, "big"))[:26]
        return encoded.translate(_TO_CROCKFORD).decode()
