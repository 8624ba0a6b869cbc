"""An in-memory JobStore: for tests, demos and deployments that accept losing every job on restart.

It is a real store, not a mock: it keeps its own copies, enforces request_id uniqueness, the
compare-and-set of every write and the lease fencing exactly as the durable backends do, and publishes
every change on its feed, so the one conformance suite (tests/stores/) holds it to the same contract.
"""

from __future__ import annotations

import bisect
import builtins
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from jobwire.handlers.api import Progress
from jobwire.server.audit import MAX_AUDIT_ENTRIES, AuditEntry, attempt_started
from jobwire.server.changes import ChangeKind, ChangeListener, JobChange
from jobwire.server.job import AttemptRecord, Job, JobError
from jobwire.server.job_types import JobType
from jobwire.server.state_machine import ACTIVE_STATES, TERMINAL_STATES, JobState
from jobwire.server.stores.base import (
    Claim,
    DuplicateRequestId,
    Expect,
    JobCount,
    JobFilter,
    JobQuery,
    JobStore,
    ListOrder,
    QueuedJob,
    RateLimited,
    SubmitRate,
    check_changeable,
    is_after,
)

LOCAL_WORKER = "local"


def matches_filter(job: Job, job_filter: JobFilter) -> bool:
    """Whether ``job`` passes every part of ``job_filter`` (the parts are ANDed; empty parts match all)."""
    if job_filter.tenants and job.tenant not in job_filter.tenants:
        return False
    if job_filter.states and job.state not in job_filter.states:
        return False
    if job_filter.types and job.type not in job_filter.types:
        return False
    for key, value in job_filter.labels:
        if job.labels.get(key) != value:
            return False
    if job_filter.create_time_start is not None and job.create_time < job_filter.create_time_start:
        return False
    if job_filter.priorities and job.priority not in job_filter.priorities:
        return False
    return job_filter.create_time_end is None or job.create_time < job_filter.create_time_end


def _copy_error(error: JobError) -> JobError:
    # The code is stored as a plain int, as the durable backends load it (any google.rpc.Code number).
    return JobError(int(error.code), error.message, error.reason, dict(error.metadata))


def _count_key(job: Job) -> tuple[JobState, str, int, str]:
    return job.state, job.type, job.priority, job.tenant


def _snapshot(job: Job) -> Job:
    """A copy sharing nothing mutable with ``job`` except params/result, which are never mutated in place.

    ``Job.copy()`` shares ``labels``, ``error`` (a mutable dataclass with a metadata dict) and the
    attempt records (frozen, but each outcome is such a JobError); a store must not, or a caller editing
    a returned job's labels would edit the stored one. ``Job.copy()`` also leaves the computed fields
    (queue_position, wait_reason, wait_message) at their defaults, so they are never stored.
    """
    snapshot = job.copy()
    snapshot.labels = dict(job.labels)
    if job.error is not None:
        snapshot.error = _copy_error(job.error)
    if any(attempt.outcome is not None for attempt in job.attempts):
        snapshot.attempts = tuple(
            AttemptRecord(
                a.attempt,
                a.start_time,
                a.end_time,
                None if a.outcome is None else _copy_error(a.outcome),
                a.worker_id,
            )
            for a in job.attempts
        )
    return snapshot


def _basic(job: Job) -> Job:
    """A snapshot without the payload (params and result)."""
    snapshot = _snapshot(job)
    snapshot.params, snapshot.result = {}, None
    return snapshot


def _with_lease(job: Job, until: float) -> Job:
    """A copy whose lease lasts at least until ``until`` (stored jobs are replaced, not changed)."""
    renewed = job.copy()
    renewed.lease_expire_time = max(job.lease_expire_time or 0.0, until)
    return renewed


class MemoryStore(JobStore):
    """Jobs in dicts plus a sorted id list, so listing newest-first from a cursor is a bisect away."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        # Ascending; ULIDs are generated in increasing order, so inserting is almost always an append.
        self._ids: list[str] = []
        self._by_request_id: dict[tuple[str, str], str] = {}  # (tenant, request_id) -> job id
        # Jobs per (state, type, priority, tenant), kept as jobs change: count() never walks every job.
        self._counts: Counter[tuple[JobState, str, int, str]] = Counter()
        self._job_types: dict[str, JobType] = {}  # JobType and its RetryDefaults are frozen: no copies
        self._listeners: list[ChangeListener] = []
        # A job's trail is a tuple of tuples of strings and numbers, which the garbage collector stops
        # tracking: a store that keeps a million entries costs no collection time.
        self._audit: dict[str, tuple[AuditEntry, ...]] = {}
        self._audit_ids = 0
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when counted)

    async def open(self) -> None:
        """Nothing to prepare."""

    async def close(self) -> None:
        """Nothing to flush: every write is already applied."""

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _publish(self, job: Job, kind: ChangeKind) -> None:
        """The stored object itself goes on the feed: stored jobs are replaced, never changed in place,
        and listeners never change what the feed hands them."""
        if self._listeners:
            changes = [JobChange.of(job, kind)]
            for listener in self._listeners:
                listener(changes)

    # --- writes ----------------------------------------------------------------------------------

    def _record(self, entry: AuditEntry | None) -> None:
        if entry is None:
            return
        self._audit_ids += 1
        numbered = tuple.__new__(AuditEntry, (*entry[:7], self._audit_ids))
        self._audit[entry.job_id] = (*self._audit.get(entry.job_id, ()), numbered)

    def _take_tokens(self, tenant: str, rate: SubmitRate, now: float) -> None:
        tokens, counted = self._buckets.get(tenant, (rate.burst, now))
        tokens = min(rate.burst, tokens + max(0.0, now - counted) * rate.per_second)
        if tokens < rate.jobs:
            raise RateLimited((rate.jobs - tokens) / rate.per_second)
        self._buckets[tenant] = (tokens - rate.jobs, max(counted, now))  # a clock behind never refills twice

    async def insert(self, job: Job, audit: AuditEntry | None = None, rate: SubmitRate | None = None) -> None:
        self._insert([job], [audit], rate)

    async def insert_many(
        self, jobs: Sequence[Job], audits: Sequence[AuditEntry], rate: SubmitRate | None = None
    ) -> None:
        self._insert(jobs, audits, rate)

    def _insert(
        self, jobs: Sequence[Job], audits: Sequence[AuditEntry | None], rate: SubmitRate | None
    ) -> None:
        """Checks everything first, then stores every job: all or nothing."""
        for job in jobs:
            if job.id in self._jobs:
                raise ValueError(f"job {job.id} already exists")
        seen: set[tuple[str, str]] = set()
        used = []
        for job in jobs:
            key = (job.tenant, job.request_id)
            if job.request_id and (key in self._by_request_id or key in seen):
                used.append(job.request_id)
            seen.add(key)
        if used:
            raise DuplicateRequestId(used)
        if rate is not None and jobs:
            self._take_tokens(jobs[0].tenant, rate, jobs[0].create_time)
        stored_jobs = []
        for job, audit in zip(jobs, audits or [None] * len(jobs), strict=True):
            stored = _snapshot(job)
            stored_jobs.append(stored)
            self._jobs[job.id] = stored
            self._counts[_count_key(stored)] += 1
            if not self._ids or job.id > self._ids[-1]:
                self._ids.append(job.id)
            else:
                bisect.insort(self._ids, job.id)
            if job.request_id:
                self._by_request_id[(job.tenant, job.request_id)] = job.id
            self._record(audit)
        if self._listeners:
            changes = [JobChange.of(stored, ChangeKind.STATE) for stored in stored_jobs]
            for listener in self._listeners:
                listener(changes)

    async def transition(
        self,
        job_id: str,
        expect: Expect,
        target: JobState,
        changes: Mapping[str, Any],
        now: float,
        audit: AuditEntry | None = None,
    ) -> Job | None:
        check_changeable(changes)
        stored = self._jobs.get(job_id)
        if stored is None or not expect.holds(stored):
            return None
        self._record(audit)
        if target is JobState.QUEUED:
            trail = self._audit.get(job_id)
            if trail is not None and len(trail) > MAX_AUDIT_ENTRIES:
                self._audit[job_id] = trail[-MAX_AUDIT_ENTRIES:]
        updated = stored.copy()
        for name, value in changes.items():
            setattr(updated, name, value)
        updated.state, updated.update_time, updated.sequence = target, now, stored.sequence + 1
        updated = _snapshot(updated)  # owns its parts: the values given may be changed by the caller
        self._jobs[job_id] = updated
        self._counts[_count_key(stored)] -= 1
        self._counts[_count_key(updated)] += 1
        self._publish(updated, ChangeKind.STATE)
        return _snapshot(updated)

    async def claim(
        self, claims: Sequence[Claim], now: float, leader_epoch: int
    ) -> builtins.list[Job | None]:
        claimed: list[Job | None] = []
        for claim in claims:
            stored = self._jobs.get(claim.job_id)
            if stored is None or stored.state is not JobState.QUEUED:
                claimed.append(None)
                continue
            attempt = max(stored.attempt, 1)
            changes = {
                "attempt": attempt,
                "start_time": now,
                "error": None,
                "result": None,
                "worker_id": claim.worker_id,
                "executor": claim.executor,
                "lease_epoch": stored.lease_epoch + 1,
                "lease_expire_time": claim.lease_until,
                "schedule_time": None,
            }
            audit = attempt_started(claim.job_id, attempt, claim.worker_id, now, claim.principal, claim.peer)
            claimed.append(
                await self.transition(
                    claim.job_id, Expect(JobState.QUEUED), JobState.RUNNING, changes, now, audit
                )
            )
        return claimed

    def record_progress(self, job_id: str, lease_epoch: int, progress: Progress, now: float) -> None:
        """Applied at once (a memory store has nothing to coalesce for)."""
        stored = self._jobs.get(job_id)
        if stored is None or stored.state not in ACTIVE_STATES or stored.lease_epoch != lease_epoch:
            return
        updated = stored.copy()
        updated.progress = progress.copy()
        updated.update_time, updated.sequence = now, stored.sequence + 1
        self._jobs[job_id] = updated
        self._publish(updated, ChangeKind.PROGRESS)

    async def renew_leases(self, leases: Sequence[tuple[str, int]], until: float) -> builtins.list[bool]:
        renewed = []
        for job_id, epoch in leases:
            stored = self._jobs.get(job_id)
            current = stored is not None and stored.state in ACTIVE_STATES and stored.lease_epoch == epoch
            if current and stored is not None:
                self._jobs[job_id] = _with_lease(stored, until)
            renewed.append(current)
        return renewed

    async def refresh_remote_leases(self, until: float) -> int:
        remote = [
            job for job in self._jobs.values() if job.state in ACTIVE_STATES and job.worker_id != LOCAL_WORKER
        ]
        for stored in remote:
            self._jobs[stored.id] = _with_lease(stored, until)
        return len(remote)

    async def purge_expired(self, now: float) -> int:
        expired = [
            job
            for job in self._jobs.values()
            if job.state in TERMINAL_STATES and job.expire_time is not None and job.expire_time <= now
        ]
        if not expired:
            return 0
        for job in expired:
            del self._jobs[job.id]
            self._counts[_count_key(job)] -= 1
            self._audit.pop(job.id, None)
            if job.request_id:
                del self._by_request_id[(job.tenant, job.request_id)]
        self._ids = [job_id for job_id in self._ids if job_id in self._jobs]
        return len(expired)

    # --- reads -----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        stored = self._jobs.get(job_id)
        return None if stored is None else _snapshot(stored)

    async def get_by_request_id(self, tenant: str, request_id: str) -> Job | None:
        if not request_id:
            return None
        job_id = self._by_request_id.get((tenant, request_id))
        return None if job_id is None else _snapshot(self._jobs[job_id])

    async def list(self, query: JobQuery) -> builtins.list[Job]:
        if query.limit <= 0:
            return []
        return [_snapshot(job) if query.with_payload else _basic(job) for job in self._page(query)]

    def _page(self, query: JobQuery) -> builtins.list[Job]:
        after, order = query.after, query.order
        if order is ListOrder.NEWEST:  # the common case, without sorting: walk the ids backwards
            end = len(self._ids) if after is None else bisect.bisect_left(self._ids, after.id)
            page: list[Job] = []
            for index in range(end - 1, -1, -1):
                job = self._jobs[self._ids[index]]
                if matches_filter(job, query.filter):
                    page.append(job)
                    if len(page) == query.limit:
                        break
            return page
        matching = [job for job in self._jobs.values() if matches_filter(job, query.filter)]
        matching.sort(key=lambda job: job.id, reverse=order is not ListOrder.OLDEST)
        if order is not ListOrder.OLDEST:  # stable: newest first within a priority
            matching.sort(key=lambda job: job.priority, reverse=order is ListOrder.PRIORITY_HIGH)
        if after is not None:
            matching = [job for job in matching if is_after(job, after, order)]
        return matching[: query.limit]

    async def count_matching(self, job_filter: JobFilter) -> int:
        return sum(1 for job in self._jobs.values() if matches_filter(job, job_filter))

    async def count(self, tenants: frozenset[str] = frozenset()) -> builtins.list[JobCount]:
        counts: Counter[tuple[JobState, str, int]] = Counter()
        for (state, job_type, priority, tenant), n in self._counts.items():
            if n and (not tenants or tenant in tenants):
                counts[(state, job_type, priority)] += n
        return [JobCount(*key, n) for key, n in sorted(counts.items())]

    async def list_audit(self, job_id: str, after_id: int, limit: int) -> builtins.list[AuditEntry]:
        trail = self._audit.get(job_id, ())
        start = bisect.bisect_right([entry.entry_id for entry in trail], after_id)
        return list(trail[start : start + max(0, limit)])

    async def load_queue(self) -> builtins.list[QueuedJob]:
        return [
            QueuedJob(
                job.id, job.type, job.priority, job.queue_time, job.schedule_time, job.sequence, job.tenant
            )
            for job in (self._jobs[job_id] for job_id in self._ids)
            if job.state is JobState.QUEUED
        ]

    async def load_active(self) -> builtins.list[Job]:
        return [
            _basic(job) for job in (self._jobs[job_id] for job_id in self._ids) if job.state in ACTIVE_STATES
        ]

    # --- job types -------------------------------------------------------------------------------

    async def save_job_types(self, job_types: builtins.list[JobType]) -> builtins.list[str]:
        refused = []
        for job_type in job_types:
            stored = self._job_types.get(job_type.name)
            if stored is not None and stored.tenant != job_type.tenant:
                refused.append(job_type.name)
            else:
                self._job_types[job_type.name] = job_type
        return refused

    async def load_job_types(self) -> builtins.list[JobType]:
        return [self._job_types[name] for name in sorted(self._job_types)]

    async def delete_job_types(self, names: builtins.list[str]) -> None:
        for name in names:
            self._job_types.pop(name, None)
