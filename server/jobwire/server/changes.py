"""What the change feed carries: one committed change of one job.

Every replica hears every change, in commit order (see docs/architecture.md, "The change feed"). The
fields are what the consumers need without reading the store: the queue view (state, type, priority,
times, tenant), the dispatcher (lease epoch, executor, tenant), the executors (which one a claim names).
``job`` is the whole job after the change when the store has it at hand (always for SQLite and memory,
and for a replica's own writes on PostgreSQL); otherwise a consumer that needs more reads it from the
store.

Consumers must be idempotent by ``(job_id, sequence)``: a replica may hear a change twice.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jobwire.server.job import Job
from jobwire.server.state_machine import JobState


class ChangeKind(enum.IntEnum):
    """Values equal the proto's ``WatchEventType`` for the two kinds of change."""

    STATE = 2  # a state transition (submission included: a new job is a change to QUEUED)
    PROGRESS = 3  # progress reported by the attempt's holder; the state is unchanged


@dataclass(frozen=True, slots=True)
class JobChange:
    job_id: str
    sequence: int
    kind: ChangeKind
    state: JobState
    type: str
    priority: int
    queue_time: float
    schedule_time: float | None
    lease_epoch: int
    executor: str
    start_time: float | None
    tenant: str
    job: Job | None = None

    @classmethod
    def of(cls, job: Job, kind: ChangeKind, with_job: bool = True) -> JobChange:
        return cls(
            job.id,
            job.sequence,
            kind,
            job.state,
            job.type,
            job.priority,
            job.queue_time,
            job.schedule_time,
            job.lease_epoch,
            job.executor,
            job.start_time,
            job.tenant,
            job if with_job else None,
        )


ChangeListener = Callable[[Sequence[JobChange]], None]
