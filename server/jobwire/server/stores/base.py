"""The storage interface, in job terms. Every backend implements it and passes tests/stores/ (one suite).

Why this shape: the store is the truth (docs/architecture.md). Several server replicas may share it, so
every write is a compare-and-set that says what it expects of the stored job (its state, and for an
attempt's writes its lease epoch); the store assigns each change its sequence number, and tells every
replica about every committed change through the feed (``subscribe``). The domain decides what a
change should be (the state machine, the retry policy); the store only makes it atomic and durable.
"""

from __future__ import annotations

import abc
import builtins
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jobwire.handlers.api import Progress
from jobwire.server.audit import AuditEntry
from jobwire.server.changes import ChangeListener
from jobwire.server.job import Job
from jobwire.server.job_types import JobType
from jobwire.server.state_machine import JobState

if TYPE_CHECKING:
    from jobwire.server.cluster import Cluster


# The fields a compare-and-set may change: never the job's identity, what was submitted, whose it is,
# or the sequence (the store assigns it).
UNCHANGEABLE = frozenset(
    {
        "id",
        "type",
        "params",
        "create_time",
        "request_id",
        "request_fingerprint",
        "sequence",
        "tenant",
        "created_by",
    }
)


def check_changeable(changes: Mapping[str, Any]) -> None:
    """ValueError for a change to a field a compare-and-set may not change: a bug, never bad input."""
    fixed = UNCHANGEABLE.intersection(changes)
    if fixed:
        raise ValueError(f"fields {sorted(fixed)} cannot be changed by a compare-and-set")


class DuplicateRequestId(Exception):
    """``insert`` found jobs of the tenant with these request_ids, and stored nothing (the caller
    re-reads them)."""

    def __init__(self, request_ids: Sequence[str]) -> None:
        super().__init__(f"request_id already used: {', '.join(map(repr, request_ids[:5]))}")
        self.request_ids = list(request_ids)


class RateLimited(Exception):
    """``insert`` found too few tokens in the tenant's submit bucket: nothing was stored."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"submit rate exceeded; retry in {retry_after:.2f} s")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class SubmitRate:
    """A tenant's token bucket: ``per_minute`` jobs a minute, holding at most a minute's worth.

    Kept in the store, so that every replica draws from the same bucket.
    """

    per_minute: int
    jobs: int = 1  # the tokens one insert takes: one per job stored

    @property
    def per_second(self) -> float:
        return self.per_minute / 60.0

    @property
    def burst(self) -> float:
        return float(max(1, self.per_minute))


@dataclass(frozen=True, slots=True)
class Expect:
    """What a compare-and-set requires of the stored job before it changes it."""

    state: JobState
    lease_epoch: int | None = None  # an attempt's write: only under this lease
    lease_expired_by: float | None = None  # only if the lease expires at or before this time

    def holds(self, job: Job) -> bool:
        if job.state is not self.state:
            return False
        if self.lease_epoch is not None and job.lease_epoch != self.lease_epoch:
            return False
        return self.lease_expired_by is None or (
            job.lease_expire_time is not None and job.lease_expire_time <= self.lease_expired_by
        )


@dataclass(frozen=True, slots=True)
class Claim:
    """A queued job handed to an executor: QUEUED -> RUNNING under a new lease epoch."""

    job_id: str
    worker_id: str  # who runs it, as the job will show (a worker's id, or "local")
    executor: str  # "<replica>/local" or "<replica>/<session>"
    # When the lease expires unless renewed. None for in-process attempts: their replica is alive as
    # long as it holds its place in the cluster, and the dispatcher requeues them when it does not.
    lease_until: float | None
    # For the "attempt started" audit entry the store writes with the claim: the executor's principal
    # ("jobwire" for in-process handlers) and address.
    principal: str = "jobwire"
    peer: str = ""


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """What ordering a queued job needs, without the job: the queue view is rebuilt from these."""

    id: str
    type: str
    priority: int
    queue_time: float
    schedule_time: float | None
    sequence: int
    tenant: str


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Filters of ListJobs, ANDed; an empty field matches everything."""

    tenants: frozenset[str] = frozenset()
    states: frozenset[JobState] = frozenset()
    types: frozenset[str] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()
    create_time_start: float | None = None  # inclusive
    create_time_end: float | None = None  # exclusive
    priorities: frozenset[int] = frozenset()


class ListOrder(enum.Enum):
    """The orders a listing comes in (values are ListJobsRequest.order_by's canonical spelling). Ids
    grow with creation time, so creation order is id order; within a priority, newest first."""

    NEWEST = "create_time desc"
    OLDEST = "create_time asc"
    PRIORITY_HIGH = "priority desc"
    PRIORITY_LOW = "priority asc"


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the previous page ended: its last job's id, and priority (read when ordered by it)."""

    id: str
    priority: int = 0


@dataclass(frozen=True, slots=True)
class JobQuery:
    """One page of a listing, in ``order``, from just after ``after`` (the previous page's last job).

    Without ``with_payload`` the jobs come back with empty params and no result: a listing that does
    not show them must not read up to 1 MiB of each from the store.
    """

    filter: JobFilter = field(default_factory=JobFilter)
    limit: int = 50
    after: Cursor | None = None
    with_payload: bool = True
    order: ListOrder = ListOrder.NEWEST


def is_after(job: Job, cursor: Cursor, order: ListOrder) -> bool:
    """Whether ``job`` comes after ``cursor`` in ``order`` (what a next page holds)."""
    if order is ListOrder.NEWEST:
        return job.id < cursor.id
    if order is ListOrder.OLDEST:
        return job.id > cursor.id
    if job.priority == cursor.priority:
        return job.id < cursor.id
    return (
        job.priority < cursor.priority if order is ListOrder.PRIORITY_HIGH else job.priority > cursor.priority
    )


@dataclass(frozen=True, slots=True)
class JobCount:
    """How many stored jobs share a state, a type and a priority."""

    state: JobState
    type: str
    priority: int
    count: int


class JobStore(abc.ABC):
    """Durable home of jobs. All methods are coroutines (or plain calls that never block the loop).

    The store keeps its own copies: a Job passed in may be changed by the caller afterwards, and a Job
    returned may be changed by the caller without affecting the store.
    """

    # Several replicas share this store: changes from other replicas arrive without the job, and the
    # history of changes (to resume a watch) is kept in the store (``read_changes``).
    shared: bool = False

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema and get ready. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Write everything pending (progress included) and release resources. Idempotent."""

    @abc.abstractmethod
    def subscribe(self, listener: ChangeListener) -> None:
        """Call ``listener`` with every batch of committed changes, in commit order, on the event loop.

        A replica's own changes reach it before the writer that made them is answered.
        """

    def cluster(self) -> Cluster:
        """Who dispatches, who is alive, and messages between replicas. One process by default."""
        from jobwire.server.cluster import LocalCluster

        return LocalCluster()

    # --- writes: each one durable on return, and a change on the feed -----------------------------

    @abc.abstractmethod
    async def insert(self, job: Job, audit: AuditEntry | None = None, rate: SubmitRate | None = None) -> None:
        """Store a new job (sequence 1) and its ``audit`` entry. Raises DuplicateRequestId if its tenant
        has a job with its request_id; with ``rate``, first takes a token from the tenant's bucket, and
        raises RateLimited (storing nothing) when there is none."""

    @abc.abstractmethod
    async def insert_many(
        self, jobs: Sequence[Job], audits: Sequence[AuditEntry], rate: SubmitRate | None = None
    ) -> None:
        """Store new jobs of one tenant and their audit entries (one each, or none at all) in one
        transaction: all or none. Raises DuplicateRequestId naming every request_id among them that the
        tenant has already used (or that repeats); with ``rate`` (``rate.jobs`` == len(jobs)) takes that
        many tokens from the tenant's bucket, and raises RateLimited when there are fewer. Either way
        nothing is stored."""

    @abc.abstractmethod
    async def transition(
        self,
        job_id: str,
        expect: Expect,
        target: JobState,
        changes: Mapping[str, Any],
        now: float,
        audit: AuditEntry | None = None,
    ) -> Job | None:
        """If the stored job matches ``expect``: set its state to ``target`` and the given fields (Job
        attribute names), ``update_time`` to ``now``, the next sequence, and record ``audit``. Returns
        the job after the change, or None when ``expect`` did not hold (or the job is gone).

        A job going back to QUEUED keeps only its most recent MAX_AUDIT_ENTRIES audit entries."""

    @abc.abstractmethod
    async def claim(
        self, claims: Sequence[Claim], now: float, leader_epoch: int
    ) -> builtins.list[Job | None]:
        """QUEUED -> RUNNING for each job still QUEUED: ``attempt`` at least 1, ``start_time`` now,
        error and result cleared, ``lease_epoch`` + 1, the claim's worker, executor and lease, and an
        "attempt started" audit entry. A shared store refuses every claim when ``leader_epoch`` is no
        longer the dispatcher's. Returns, per claim, the job after the change or None."""

    @abc.abstractmethod
    def record_progress(self, job_id: str, lease_epoch: int, progress: Progress, now: float) -> None:
        """Note an attempt's progress, to be written soon (coalesced per job) as a PROGRESS change with
        the next sequence. Never blocks. Dropped if the job is not active under this lease any more."""

    @abc.abstractmethod
    async def renew_leases(self, leases: Sequence[tuple[str, int]], until: float) -> builtins.list[bool]:
        """Extend each ``(job_id, lease_epoch)`` lease to at least ``until``; per lease, whether the job
        is still active under it. Not a change: no sequence, nothing on the feed."""

    @abc.abstractmethod
    async def refresh_remote_leases(self, until: float) -> int:
        """Extend every remote attempt's lease to at least ``until`` (a new dispatcher gives workers
        time to reconnect and renew). Returns how many."""

    @abc.abstractmethod
    async def purge_expired(self, now: float) -> int:
        """Delete finished jobs whose expire_time is at or before ``now``, and their audit entries;
        return how many jobs."""

    # --- reads ------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """The stored job, or None."""

    @abc.abstractmethod
    async def get_by_request_id(self, tenant: str, request_id: str) -> Job | None:
        """The tenant's job created with this request_id, or None."""

    @abc.abstractmethod
    async def list(self, query: JobQuery) -> builtins.list[Job]:
        """Up to ``query.limit`` matching jobs, newest (highest id) first."""

    @abc.abstractmethod
    async def count(self, tenants: frozenset[str] = frozenset()) -> builtins.list[JobCount]:
        """Stored jobs (of these tenants; empty: all) grouped by state, type and priority."""

    @abc.abstractmethod
    async def count_matching(self, job_filter: JobFilter) -> int:
        """How many stored jobs pass ``job_filter`` (a listing's total_size: a count, not kept)."""

    @abc.abstractmethod
    async def list_audit(self, job_id: str, after_id: int, limit: int) -> builtins.list[AuditEntry]:
        """Up to ``limit`` audit entries of the job with ``entry_id`` above ``after_id``, oldest first."""

    @abc.abstractmethod
    async def load_queue(self) -> builtins.list[QueuedJob]:
        """The ordering information of every QUEUED job (not the jobs): what the queue view needs."""

    @abc.abstractmethod
    async def load_active(self) -> builtins.list[Job]:
        """Every RUNNING or CANCELLING job, without params and result: what a new dispatcher needs."""

    async def read_changes(self, job_id: str, after_sequence: int) -> builtins.list[Job] | None:
        """The job as it was after each state change with a sequence above ``after_sequence``, oldest
        first; None when this store keeps no history (a single process keeps it in memory) or when
        part of it is no longer kept."""
        return None

    async def read_change(self, job_id: str, sequence: int) -> Job | None:
        """The job as it was right after its change ``sequence``, if the store can still tell."""
        job = await self.get(job_id)
        return job if job is not None and job.sequence == sequence else None

    # --- job types --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def save_job_types(self, job_types: builtins.list[JobType]) -> builtins.list[str]:
        """Durably insert or replace these job types (by name), each only if the stored one (if any)
        belongs to the same tenant; returns the names refused because another tenant's type has it."""

    @abc.abstractmethod
    async def load_job_types(self) -> builtins.list[JobType]:
        """Every stored job type, by name."""

    @abc.abstractmethod
    async def delete_job_types(self, names: builtins.list[str]) -> None:
        """Durably forget these job types (names not stored are ignored)."""
