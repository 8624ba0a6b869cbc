"""Job operations: submit, get, list, cancel, retry, watch and stats, on any replica.

Every operation talks to the store, the truth: a change is a compare-and-set there, and a read reads it.
What this replica derives from the change feed adds what the store does not hold: where a queued job
stands in the run order (the queue view), why it waits (the dispatcher's status), and the live watch
streams (the event hub). Changes callers start run to completion even if the caller gives up
(``completes``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from jobwire.server import audit
from jobwire.server.access import LOCAL_CALLER, Action, Caller, Principal
from jobwire.server.attempts import cancelled_changes, terminal_changes
from jobwire.server.audit import AuditEntry
from jobwire.server.clock import Clock
from jobwire.server.cluster import ClusterStatus
from jobwire.server.completion import InFlight, completes
from jobwire.server.errors import (
    Draining,
    FieldViolation,
    InvalidArgument,
    JobAlreadyFinished,
    JobNotFound,
    JobNotQueued,
    JobwireError,
    QueueFull,
    QuotaExceeded,
    RequestIdReused,
    UnknownJobType,
    WatchPositionLost,
)
from jobwire.server.events import EventHub, EventKind, JobEvent
from jobwire.server.job import PRIORITY_DEFAULT, Job, JobIdGenerator, RetryPolicy, WaitReason
from jobwire.server.job_types import JobType, KnownType, TypeRegistry, resolve_retry_policy
from jobwire.server.queue_view import QueueView
from jobwire.server.retention import RetentionPolicy
from jobwire.server.state_machine import JobState, check_transition
from jobwire.server.stats import StatsWindow, WindowFigures
from jobwire.server.stores.base import (
    DuplicateRequestId,
    Expect,
    JobCount,
    JobFilter,
    JobQuery,
    JobStore,
    RateLimited,
    SubmitRate,
)
from jobwire.server.tenants import TenantPolicies, TenantQuota
from jobwire.server.validation import (
    JobUpdate,
    SubmitRequest,
    batch_violations,
    check,
    fingerprint,
    submit_violations,
    update_violations,
)

log = logging.getLogger("jobwire.jobs")

# How many times a compare-and-set is tried again after the job changed under it.
_CAS_TRIES = 5


@dataclass(frozen=True, slots=True)
class OperationSettings:
    max_queued: int
    retention: RetentionPolicy
    max_running: int
    retry_policy: RetryPolicy
    tenants: TenantPolicies


@dataclass(frozen=True, slots=True)
class TenantFigures:
    """One tenant's share of the queue, and its settings."""

    tenant: str
    queued: int
    running: int
    quota: TenantQuota


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot for GetQueueStats: of one tenant's jobs (``tenant``), or of all (``tenant`` None)."""

    counts: list[JobCount]
    queued_by_type: dict[str, int]
    running_by_type: dict[str, int]
    type_limits: dict[str, int]
    queued_by_priority: dict[int, int]
    running: int
    max_running: int
    max_queued: int
    window: WindowFigures
    read_time: float
    draining: bool
    known_types: list[str]
    workers_by_type: dict[str, int]
    connected_workers: int
    delayed: int
    tenant: str | None
    tenants: list[TenantFigures]


def _name_some(names: list[str], limit: int = 20) -> str:
    """The first ``limit`` names and how many more: an error message must stay small."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class JobOperations:
    """The JobService calls, in domain terms."""

    def __init__(
        self,
        store: JobStore,
        queue: QueueView,
        hub: EventHub,
        types: TypeRegistry,
        stats_window: StatsWindow,
        settings: OperationSettings,
        clock: Clock,
        status: Callable[[], ClusterStatus],
        reload_types: Callable[[], Any],
    ) -> None:
        self.store = store
        self.queue = queue
        self.hub = hub
        self.types = types
        self.stats_window = stats_window
        self.settings = settings
        self.clock = clock
        self._status = status
        self._reload_types = reload_types
        self._ids = JobIdGenerator()
        self._inserting = 0
        self._inserting_by_tenant: dict[str, int] = {}  # only for tenants with a queued limit
        self.draining = False
        # State changes asked for by callers, each running to its end even if its caller gives up.
        self.in_flight = InFlight()

    # -- submit ---------------------------------------------------------------------------------------

    @completes
    async def submit(self, request: SubmitRequest, caller: Caller = LOCAL_CALLER) -> Job:
        """Store a new job of the caller's tenant durably (the dispatcher hears of it through the feed);
        returns it QUEUED, or for a request_id already used, the job it made."""
        caller.principal.require(Action.SUBMIT)
        if self.draining:
            raise Draining()
        check(submit_violations(request))
        (job,) = await self._submit_all([request], caller, batch=False)
        return job

    @completes
    async def submit_many(
        self, requests: Sequence[SubmitRequest], caller: Caller = LOCAL_CALLER
    ) -> list[Job]:
        """Store new jobs in one transaction, all or none (AIP-233); returns them in order, each QUEUED
        or, for a request_id already used, the job it made. Errors name ``requests[i].field``."""
        caller.principal.require(Action.SUBMIT)
        if self.draining:
            raise Draining()
        check(batch_violations(requests))
        submit_rate = self.settings.tenants.quota(caller.principal.tenant).submit_rate
        if submit_rate and len(requests) > submit_rate:
            raise InvalidArgument(
                violations=[
                    FieldViolation(
                        "requests",
                        f"at most {submit_rate} jobs in one batch: the submit rate of tenant "
                        f"{caller.principal.tenant} per minute",
                    )
                ]
            )
        return await self._submit_all(requests, caller, batch=True)

    async def _submit_all(self, requests: Sequence[SubmitRequest], caller: Caller, batch: bool) -> list[Job]:
        """Submit validated requests: one store insert for all of them, retried without the requests
        whose request_id turns out to be taken (those get the job that has it)."""
        principal = caller.principal
        tenant = principal.tenant
        for name in dict.fromkeys(request.type for request in requests):
            principal.require_type(name)
        job_types = await self._job_types_for(requests, tenant, batch)
        now = self.clock.now()
        jobs = [self._new_job(r, t, caller, now) for r, t in zip(requests, job_types, strict=True)]
        entries = [
            AuditEntry(
                job.id,
                now,
                audit.SUBMITTED,
                principal.label,
                job.request_id,
                caller.peer,
                f"type {job.type}, priority {job.priority}",
            )
            for job in jobs
        ]
        answers: list[Job | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        for _ in range(_CAS_TRIES):
            try:
                await self._insert(tenant, [jobs[i] for i in pending], [entries[i] for i in pending])
            except DuplicateRequestId as duplicate:
                taken = set(duplicate.request_ids)
            except (QueueFull, QuotaExceeded):
                # A retry of requests already accepted is answered with their jobs, full queue or not.
                for i in pending:
                    if await self._accepted(tenant, jobs[i].request_id) is None:
                        raise
                taken = {jobs[i].request_id for i in pending}
            else:
                for i in pending:
                    answers[i] = jobs[i]  # the store keeps copies of its own: these are the caller's
                return [answer for answer in answers if answer is not None]
            still = []
            for i in pending:
                if jobs[i].request_id in taken:
                    answers[i] = await self._existing_for_request(
                        tenant, jobs[i], f"requests[{i}]" if batch else ""
                    )
                else:
                    still.append(i)
            pending = still
            if not pending:
                return [answer for answer in answers if answer is not None]
        raise JobwireError("request_ids of this batch kept being taken while it was stored; retry it")

    async def _job_types_for(
        self, requests: Sequence[SubmitRequest], tenant: str, batch: bool
    ) -> list[JobType]:
        """The job type of each request; UnknownJobType naming every request of a type the tenant may
        not use (re-read from a shared store first: it may have been declared through another replica)."""
        names = list(dict.fromkeys(request.type for request in requests))
        found = {name: self._type_for(name, tenant) for name in names}
        if None in found.values() and self.store.shared:
            await self._reload_types()
            found = {name: self._type_for(name, tenant) for name in names}
        unknown = [name for name, job_type in found.items() if job_type is None]
        if unknown:
            known = f"known types: {_name_some(self.types.visible(tenant)) or '(none registered)'}"
            raise UnknownJobType(
                f"unknown job type {unknown[0]!r}; {known}",
                [
                    FieldViolation(
                        f"requests[{i}].type" if batch else "type",
                        f"no handler or worker has declared {r.type!r}; {known}",
                    )
                    for i, r in enumerate(requests)
                    if found[r.type] is None
                ],
            )
        resolved = {name: job_type for name, job_type in found.items() if job_type is not None}
        return [resolved[request.type] for request in requests]

    def _new_job(self, request: SubmitRequest, job_type: JobType, caller: Caller, now: float) -> Job:
        priority = PRIORITY_DEFAULT if request.priority is None else request.priority
        schedule_time = (
            request.schedule_time if request.schedule_time and request.schedule_time > now else None
        )
        return Job(
            id=self._ids.new_id(),
            type=request.type,
            state=JobState.QUEUED,
            priority=priority,
            params=request.params,
            labels=dict(request.labels or {}),
            create_time=now,
            update_time=now,
            queue_time=schedule_time or now,
            request_id=request.request_id,
            request_fingerprint=fingerprint(request, priority) if request.request_id else "",
            timeout=request.timeout,
            retry_policy=resolve_retry_policy(request.retry, job_type.retry, self.settings.retry_policy),
            schedule_time=schedule_time,
            tenant=caller.principal.tenant,
            created_by=caller.principal.subject,
            retention=request.retention,
        )

    async def _insert(self, tenant: str, jobs: list[Job], entries: list[AuditEntry]) -> None:
        """Store new jobs if the queue and the tenant's quotas have room for them: QueueFull or
        QuotaExceeded if not. Jobs being stored count against the room until they are."""
        count = len(jobs)
        quota = self.settings.tenants.quota(tenant)
        room = self.settings.max_queued - len(self.queue) - self._inserting
        if count > room:
            raise QueueFull(
                f"the queue is full ({self.settings.max_queued} jobs waiting); retry later"
                if count == 1 or room <= 0
                else f"the queue has room for {room} more jobs, not {count}; retry later"
            )
        counted = quota.max_queued is not None  # inserts in flight count against the tenant's queue
        if counted:
            self._check_queued_quota(tenant, quota, self._inserting_by_tenant.get(tenant, 0) + count - 1)
        rate = SubmitRate(quota.submit_rate, count) if quota.submit_rate else None
        self._inserting += count
        if counted:
            self._inserting_by_tenant[tenant] = self._inserting_by_tenant.get(tenant, 0) + count
        try:
            if count == 1:
                await self.store.insert(jobs[0], entries[0], rate)
            else:
                await self.store.insert_many(jobs, entries, rate)
        except RateLimited as limited:
            raise QuotaExceeded(
                f"tenant {tenant} may submit {quota.submit_rate} jobs per minute; retry in "
                f"{limited.retry_after:.1f}s",
                subject=f"tenant:{tenant}",
                description=f"submit rate: at most {quota.submit_rate} jobs per minute",
                retry_after=limited.retry_after,
            ) from None
        finally:
            self._inserting -= count
            if counted:
                left = self._inserting_by_tenant[tenant] - count
                if left:
                    self._inserting_by_tenant[tenant] = left
                else:
                    del self._inserting_by_tenant[tenant]

    async def _accepted(self, tenant: str, request_id: str) -> Job | None:
        """The tenant's job made by an earlier call with this request_id, if any."""
        return await self.store.get_by_request_id(tenant, request_id) if request_id else None

    def _type_for(self, name: str, tenant: str) -> JobType | None:
        """The job type ``name`` if jobs of ``tenant`` may use it (another tenant's type is unknown)."""
        job_type = self.types.get(name)
        return job_type if job_type is not None and job_type.visible_to(tenant) else None

    def _check_queued_quota(self, tenant: str, quota: TenantQuota, extra: int) -> None:
        if quota.max_queued is not None and self.queue.queued_in(tenant) + extra >= quota.max_queued:
            raise QuotaExceeded(
                f"tenant {tenant} has {quota.max_queued} jobs queued, its limit; retry later",
                subject=f"tenant:{tenant}",
                description=f"queued jobs: at most {quota.max_queued}",
                retry_after=1.0,
            )

    async def _existing_for_request(self, tenant: str, job: Job, field_prefix: str = "") -> Job:
        """The job an earlier call with ``job``'s request_id made, if this call asks for the same job
        (RequestIdReused if not, naming ``field_prefix``.request_id when given)."""
        existing = await self.store.get_by_request_id(tenant, job.request_id)
        if existing is None:
            raise JobwireError("the job of this request_id vanished while it was being read; retry")
        if existing.request_fingerprint != job.request_fingerprint:
            message = f"request_id {job.request_id!r} was already used by job {existing.id}, another request"
            field = f"{field_prefix}.request_id" if field_prefix else ""
            if field:  # the message says which request: "requests[3].request_id: ..."
                raise RequestIdReused(violations=[FieldViolation(field, message)])
            raise RequestIdReused(message)
        return self._annotated(existing)

    # -- reads ----------------------------------------------------------------------------------------

    async def _read(self, job_id: str, principal: Principal) -> Job:
        """The stored job, if the principal may see it: another tenant's job does not exist for it."""
        job = await self.store.get(job_id)
        if job is None or not principal.sees(job.tenant):
            raise JobNotFound(f"job {job_id!r} not found")
        return job

    async def get(self, job_id: str, caller: Caller = LOCAL_CALLER) -> Job:
        """The job as it is now, with why it waits and where it stands if queued."""
        caller.principal.require(Action.READ)
        return self._annotated(await self._read(job_id, caller.principal))

    def listing_filter(self, job_filter: JobFilter, caller: Caller) -> JobFilter:
        """``job_filter`` as it applies to the caller: only the tenants it may see (PermissionDenied for a
        caller that may not read, or names another tenant)."""
        caller.principal.require(Action.READ)
        return replace(job_filter, tenants=caller.principal.scope_tenants(job_filter.tenants))

    def list_job_types(self, caller: Caller = LOCAL_CALLER) -> list[KnownType]:
        """The types the caller may submit, by name, with their defaults and the capacity for them."""
        principal = caller.principal
        principal.require(Action.READ)
        status = self._status().types
        known = []
        for name in self.types.visible(None if principal.all_tenants else principal.tenant):
            job_type = self.types.get(name)
            if job_type is None:
                continue
            now = status.get(name)
            known.append(
                KnownType(
                    job_type,
                    name in self.types.local,
                    self.types.limit(name),
                    now.executors if now else 0,
                    now.free if now else 0,
                    now.running if now else 0,
                )
            )
        return known

    async def count_jobs(self, job_filter: JobFilter, caller: Caller = LOCAL_CALLER) -> int:
        """How many jobs a listing with this filter holds in all its pages (only tenants the caller
        may see)."""
        return await self.store.count_matching(self.listing_filter(job_filter, caller))

    async def list_jobs(self, query: JobQuery, caller: Caller = LOCAL_CALLER) -> tuple[list[Job], bool]:
        """One page, newest first, and whether more pages follow (only tenants the caller may see)."""
        job_filter = self.listing_filter(query.filter, caller)
        rows = await self.store.list(
            JobQuery(job_filter, query.limit + 1, query.after, query.with_payload, query.order)
        )
        more = len(rows) > query.limit
        return [self._annotated(job) for job in rows[: query.limit]], more

    async def audit(
        self, job_id: str, after_id: int, limit: int, caller: Caller = LOCAL_CALLER
    ) -> list[AuditEntry]:
        """The job's audit entries after ``after_id``, oldest first, for whoever may read the job."""
        caller.principal.require(Action.READ)
        await self._read(job_id, caller.principal)
        return await self.store.list_audit(job_id, after_id, limit)

    def _annotated(self, job: Job) -> Job:
        """Fill in the queue position and wait reason of a queued job (computed, never stored)."""
        if job.state is JobState.QUEUED:
            job.queue_position = self.queue.position(job.id)
            job.wait_reason, job.wait_message = self.wait_reason(job, self.clock.now())
        return job

    def wait_reason(self, job: Job, now: float) -> tuple[WaitReason, str]:
        if self.draining:
            return WaitReason.DRAINING, "the server is draining and starts no new work"
        if job.schedule_time is not None and job.schedule_time > now:
            when = f"{max(0.0, job.schedule_time - now):.1f}s"
            if job.attempts:
                return WaitReason.RETRY_BACKOFF, f"attempt {job.attempt} starts in {when} (retry back-off)"
            return WaitReason.SCHEDULED, f"scheduled to start in {when}"
        cluster = self._status()
        status = cluster.types.get(job.type)
        if status is None or not status.executors:
            return WaitReason.NO_WORKER, f"no connected worker takes type {job.type}"
        if status.limit is not None and status.running >= status.limit:
            return WaitReason.TYPE_LIMIT, f"type {job.type} is at its limit of {status.limit} running jobs"
        tenant_limit = self.settings.tenants.max_running(job.tenant)
        if tenant_limit is not None and cluster.tenant_running(job.tenant) >= tenant_limit:
            return (
                WaitReason.TENANT_LIMIT,
                f"tenant {job.tenant} is at its limit of {tenant_limit} running jobs",
            )
        if status.free <= 0:
            return WaitReason.NO_CAPACITY, f"every executor of type {job.type} is busy"
        return WaitReason.QUEUED, f"position {job.queue_position} in the run order"

    # -- update, cancel and retry ----------------------------------------------------------------------

    @completes
    async def update(
        self, job_id: str, update: JobUpdate, caller: Caller = LOCAL_CALLER, request_id: str = ""
    ) -> Job:
        """Change the priority, labels or schedule time of a job that has not started (UpdateJob).

        The queue view follows the change from the feed like any other, so the run order moves at once;
        a change that sets nothing new writes nothing.
        """
        caller.principal.require(Action.UPDATE)
        check(update_violations(update, request_id))
        wanted = update.changes()
        for _ in range(_CAS_TRIES):
            job = await self._read(job_id, caller.principal)
            if job.state is not JobState.QUEUED:
                raise JobNotQueued(f"job {job.id} cannot be updated: it is {job.state.name}, not QUEUED")
            changes = {name: value for name, value in wanted.items() if getattr(job, name) != value}
            if not changes:
                return self._annotated(job)
            now = self.clock.now()
            detail = "; ".join(
                _describe_update(name, getattr(job, name), value) for name, value in changes.items()
            )
            entry = caller.actor(request_id).entry(job.id, now, audit.UPDATED, detail)
            check_transition(job.state, JobState.QUEUED)
            updated = await self.store.transition(
                job.id, Expect(JobState.QUEUED), JobState.QUEUED, changes, now, entry
            )
            if updated is not None:
                return self._annotated(updated)
        raise JobwireError(f"job {job_id} kept changing while it was being updated; retry")

    @completes
    async def cancel(
        self, job_id: str, reason: str = "", caller: Caller = LOCAL_CALLER, request_id: str = ""
    ) -> Job:
        """Cancel a queued job at once, or ask a running one to stop (its holder hears it on the feed)."""
        caller.principal.require(Action.CANCEL)
        actor = caller.actor(request_id)
        for _ in range(_CAS_TRIES):
            job = await self._read(job_id, caller.principal)
            now = self.clock.now()
            if job.state is JobState.QUEUED:
                changes = {"cancel_reason": reason, **cancelled_changes(reason)}
                kept = self.settings.retention.for_job(job.retention, JobState.CANCELLED)
                changes.update(terminal_changes(now, kept))
                target, action = JobState.CANCELLED, audit.CANCELLED
            elif job.state is JobState.RUNNING:
                changes, target, action = (
                    {"cancel_reason": reason},
                    JobState.CANCELLING,
                    audit.CANCEL_REQUESTED,
                )
            elif job.state in (JobState.CANCELLING, JobState.CANCELLED):
                return self._annotated(job)
            else:
                raise JobAlreadyFinished(f"job {job.id} cannot be cancelled: it is already {job.state.name}")
            check_transition(job.state, target)
            entry = actor.entry(job.id, now, action, reason and f"reason: {reason}")
            updated = await self.store.transition(job.id, Expect(job.state), target, changes, now, entry)
            if updated is not None:
                return self._annotated(updated)
        raise JobwireError(f"job {job_id} kept changing while it was being cancelled; retry")

    @completes
    async def retry(self, job_id: str, caller: Caller = LOCAL_CALLER, request_id: str = "") -> Job:
        """Queue a FAILED or CANCELLED job again with a fresh attempt budget."""
        caller.principal.require(Action.RETRY)
        if self.draining:
            raise Draining()
        for _ in range(_CAS_TRIES):
            job = await self._read(job_id, caller.principal)
            if job.state is JobState.SUCCEEDED:
                raise JobAlreadyFinished(f"job {job_id} cannot be retried: it already SUCCEEDED")
            if not job.state.is_terminal:  # not finished: nothing to do
                return self._annotated(job)
            if len(self.queue) >= self.settings.max_queued:
                raise QueueFull(f"the queue is full ({self.settings.max_queued} jobs waiting); retry later")
            self._check_queued_quota(job.tenant, self.settings.tenants.quota(job.tenant), 0)
            now = self.clock.now()
            changes = {
                "attempt": job.attempt + 1,
                "attempt_base": job.attempt,
                "error": None,
                "result": None,
                "end_time": None,
                "expire_time": None,
                "cancel_reason": "",
                "progress": None,
                "queue_time": now,
                "schedule_time": None,
                "worker_id": "",
                "executor": "",
            }
            entry = caller.actor(request_id).entry(
                job.id, now, audit.RETRIED, f"from {job.state.name}; attempt {job.attempt + 1} queued"
            )
            updated = await self.store.transition(
                job.id, Expect(job.state), JobState.QUEUED, changes, now, entry
            )
            if updated is not None:
                return self._annotated(updated)
        raise JobwireError(f"job {job_id} kept changing while it was being retried; retry")

    # -- watch ----------------------------------------------------------------------------------------

    async def watch(
        self, job_id: str, after_sequence: int = 0, caller: Caller = LOCAL_CALLER
    ) -> AsyncIterator[JobEvent]:
        """The job's snapshot (or the changes after ``after_sequence``), then each change until it ends.

        Raises Draining when the server shuts down first: the client reconnects with the last sequence.
        """
        caller.principal.require(Action.READ)
        subscription = self.hub.subscribe(job_id)  # before the snapshot, so nothing falls between
        try:
            job = await self.get(job_id, caller)
            self.hub.seen(job)
            if after_sequence < 0 or after_sequence > job.sequence:
                raise WatchPositionLost(
                    f"after_sequence {after_sequence} is outside 0..{job.sequence} for job {job_id}"
                )
            if after_sequence == 0:
                last = job.sequence
                yield JobEvent(job.sequence, EventKind.SNAPSHOT, job)
            else:
                last = after_sequence
                if after_sequence < job.sequence:
                    missed = await self._missed(job, after_sequence)
                    if missed is None:
                        raise WatchPositionLost(
                            f"changes after sequence {after_sequence} of job {job_id} are no longer "
                            "retained; watch again with after_sequence 0"
                        )
                    for event in missed:
                        last = event.sequence
                        yield self._event_for(event)
            if job.state.is_terminal and last >= job.sequence:
                return
            while True:
                change = await subscription.next()
                if change is None:
                    raise Draining(
                        f"the server is shutting down; watch again with after_sequence={last}",
                        metadata={"job_id": job_id, "after_sequence": str(last)},
                    )
                if change.sequence <= last:
                    continue
                last = change.sequence
                yield self._event_for(change)
                if change.job.state.is_terminal:
                    return
        finally:
            self.hub.unsubscribe(subscription)

    async def _missed(self, job: Job, after_sequence: int) -> list[JobEvent] | None:
        """The changes after ``after_sequence`` up to ``job`` (as it is now), from wherever they are kept."""
        if self.hub.keep_history:
            return self.hub.replay(job.id, after_sequence, job.sequence)
        snapshots = await self.store.read_changes(job.id, after_sequence)
        if snapshots is None:
            return None
        events = [
            JobEvent(s.sequence, EventKind.STATE_CHANGED, s) for s in snapshots if s.sequence <= job.sequence
        ]
        if not events or events[-1].sequence < job.sequence:  # progress since: the job as it is now
            events.append(JobEvent(job.sequence, EventKind.PROGRESS_UPDATED, job))
        return events

    def _event_for(self, event: JobEvent) -> JobEvent:
        """A queued job's event says where it stands and why it waits (on a copy: events are shared)."""
        if event.job.state is not JobState.QUEUED:
            return event
        return JobEvent(event.sequence, event.kind, self._annotated(event.job.copy()))

    # -- stats ----------------------------------------------------------------------------------------

    async def stats(self, caller: Caller = LOCAL_CALLER) -> QueueStats:
        """The queue's figures: of the caller's tenant, or of every tenant for an admin."""
        principal = caller.principal
        principal.require(Action.READ)
        tenant = None if principal.all_tenants else principal.tenant
        counts = await self.store.count(frozenset() if tenant is None else frozenset({tenant}))
        status = self._status()
        if tenant is None:
            running_by_type = {t: s.running for t, s in status.types.items() if s.running}
            running = status.running
        else:
            running_by_type = dict(status.tenants.get(tenant, {}))
            running = status.tenant_running(tenant)
        known = sorted(set(self.types.visible(tenant)) | {c.type for c in counts})
        return QueueStats(
            counts=counts,
            queued_by_type=self.queue.queued_by_type(tenant),
            running_by_type=running_by_type,
            type_limits={t: s.limit for t, s in status.types.items() if s.limit is not None},
            queued_by_priority=self.queue.queued_by_priority(tenant),
            running=running,
            max_running=self.settings.max_running,
            max_queued=self.settings.max_queued,
            window=self.stats_window.figures(self.clock.monotonic(), tenant),
            read_time=self.clock.now(),
            draining=self.draining,
            known_types=known,
            workers_by_type={t: status.types[t].executors if t in status.types else 0 for t in known},
            connected_workers=status.workers,
            delayed=self.queue.delayed if tenant is None else self.queue.delayed_in(tenant),
            tenant=tenant,
            tenants=self._tenant_figures(tenant, status),
        )

    def _tenant_figures(self, tenant: str | None, status: ClusterStatus) -> list[TenantFigures]:
        """Per tenant: just the caller's own, or (admins) every tenant with jobs or settings of its own."""
        queued = self.queue.queued_by_tenant()
        policies = self.settings.tenants
        if tenant is not None:
            names = [tenant]
        else:
            names = sorted(set(queued) | set(status.tenants) | set(policies.overrides))
        return [
            TenantFigures(name, queued.get(name, 0), status.tenant_running(name), policies.quota(name))
            for name in names
        ]


def _describe_update(name: str, before: Any, after: Any) -> str:
    """One changed field, for the audit trail (labels and times summed up, not dumped)."""
    if name == "labels":
        return f"labels: {len(before)} -> {len(after)} entries"
    if name == "schedule_time":
        return "schedule_time: " + " -> ".join(
            "none" if value is None else _utc(value) for value in (before, after)
        )
    return f"{name}: {before} -> {after}"


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
