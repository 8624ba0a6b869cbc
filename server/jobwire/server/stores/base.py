"""The storage interface, in job terms. Every backend implements it and passes tests/stores/ (one suite).

Why this shape: the JobManager owns the live state of unfinished jobs in memory and asks the store only
to make changes durable, to answer queries, and to refuse a change whose expected state no longer holds
(compare-and-set). That last part is what lets several server replicas share one PostgreSQL store: a
replica claims a queued job with ``update(job, expected_state=QUEUED)`` and learns it lost the race when
it returns False.
"""

from __future__ import annotations

import abc
import builtins
from dataclasses import dataclass, field

from jobwire.server.job import Job
from jobwire.server.job_types import JobType
from jobwire.server.state_machine import JobState


class DuplicateRequestId(Exception):
    """``insert`` found another job with the same request_id (the caller re-reads and compares)."""


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Filters of ListJobs, ANDed; an empty field matches everything."""

    states: frozenset[JobState] = frozenset()
    types: frozenset[str] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()
    create_time_start: float | None = None  # inclusive
    create_time_end: float | None = None  # exclusive


@dataclass(frozen=True, slots=True)
class JobQuery:
    """One page of a listing: newest first (id descending), ids strictly below ``before_id`` if set.

    Without ``with_payload`` the jobs come back with empty params and no result: a listing that does
    not show them must not read up to 1 MiB of each from the store.
    """

    filter: JobFilter = field(default_factory=JobFilter)
    limit: int = 50
    before_id: str | None = None
    with_payload: bool = True


@dataclass(frozen=True, slots=True)
class JobCount:
    """How many stored jobs share a state, a type and a priority."""

    state: JobState
    type: str
    priority: int
    count: int


class JobStore(abc.ABC):
    """Durable home of jobs. All methods are coroutines and never block the event loop.

    The store keeps its own copies: a Job passed in may be changed by the caller afterwards, and a Job
    returned may be changed by the caller without affecting the store.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema and get ready. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Write everything pending (progress included) and release resources. Idempotent."""

    @abc.abstractmethod
    async def insert(self, job: Job) -> None:
        """Store a new job durably before returning. Raises DuplicateRequestId if its request_id is taken."""

    @abc.abstractmethod
    async def update(self, job: Job, expected_state: JobState | None = None) -> bool:
        """Durably replace the stored job with ``job``.

        With ``expected_state``, only if the stored job is in that state (compare-and-set); returns
        whether the write happened. A missing job returns False.
        """

    @abc.abstractmethod
    def record_progress(self, job: Job) -> None:
        """Note the job's progress and sequence, to be persisted soon and possibly coalesced.

        Not awaited and never durable on return: progress is advisory, states are not.
        """

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """The stored job, or None."""

    @abc.abstractmethod
    async def get_by_request_id(self, request_id: str) -> Job | None:
        """The job created with this request_id, or None."""

    @abc.abstractmethod
    async def list(self, query: JobQuery) -> list[Job]:
        """Up to ``query.limit`` matching jobs, newest (highest id) first."""

    # builtins.list from here on: in this class body, ``list`` names the method above.
    @abc.abstractmethod
    async def load_unfinished(self) -> builtins.list[Job]:
        """Every job not in a terminal state, oldest first: what the scheduler is rebuilt from at start-up."""

    @abc.abstractmethod
    async def purge_expired(self, now: float) -> int:
        """Delete finished jobs whose expire_time is at or before ``now``; return how many."""

    @abc.abstractmethod
    async def count(self) -> builtins.list[JobCount]:
        """Stored jobs grouped by state, type and priority."""

    @abc.abstractmethod
    async def save_job_types(self, job_types: builtins.list[JobType]) -> None:
        """Durably insert or replace these job types (by name)."""

    @abc.abstractmethod
    async def load_job_types(self) -> builtins.list[JobType]:
        """Every stored job type, by name."""

    @abc.abstractmethod
    async def delete_job_types(self, names: builtins.list[str]) -> None:
        """Durably forget these job types (names not stored are ignored)."""
