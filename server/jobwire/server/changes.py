"""What the change feed carries: one committed change of one job.

Every replica hears every change, in commit order (see docs/architecture.md, "The change feed"). The
fields are what the consumers need without reading the store: the queue view (state, type, priority,
times, tenant), the dispatcher (lease epoch, executor, tenant), the executors (which one a claim names).
``job`` is the whole job after the change when the store has it at hand (state changes on SQLite and
memory, and a replica's own writes on PostgreSQL); otherwise a consumer that needs more reads it from
the store. A progress change may come without the job but with what it changed (``progress`` and
``update_time``, the sequence being the next): building a whole job for every progress report costs
more than the report, and only a watched job needs one (``events.EventHub`` patches the watched job's
last snapshot).

Consumers must be idempotent by ``(job_id, sequence)``: a replica may hear a change twice.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jobwire.handlers.api import Progress
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
    # A progress change without the job: the progress it set, and the job's new update_time.
    progress: Progress | None = None
    update_time: float = 0.0

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
