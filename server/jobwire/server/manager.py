"""The JobManager: the one owner of job state. Every API call and every attempt's outcome comes here.

It holds unfinished jobs in memory (the live truth, progress included), makes every state change
durable in the store before anyone is told of it, feeds the scheduler, hands jobs to executors (the
in-process handlers, and remote workers under leases), decides retries, and publishes changes to
watchers.

Every state change goes through ``_apply``: under the job's lock it checks the transition against the
state machine, writes the new job to the store (compare-and-set on the old state), and only then
updates the live job and publishes the event. So watchers never see a state that is not durable, and
the order of sequences is the order of publication. Every attempt ends in ``_end_attempt``, which is
where success, failure, retry with back-off, abandonment and cancellation are told apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from jobwire.handlers.api import HandlerSpec, JobCancelled, NonRetryableError
from jobwire.handlers.runner import HandlerRunner
from jobwire.server.clock import Clock, SystemClock
from jobwire.server.completion import InFlight, completes
from jobwire.server.errors import (
    Draining,
    FieldViolation,
    InvalidArgument,
    JobAlreadyFinished,
    JobNotFound,
    JobwireError,
    QueueFull,
    RequestIdReused,
    TooManyJobTypes,
    UnknownJobType,
    WatchPositionLost,
)
from jobwire.server.events import EventHub, EventKind, JobEvent
from jobwire.server.executor import LOCAL_WORKER_ID, LocalJobContext
from jobwire.server.job import (
    MAX_ATTEMPT_HISTORY,
    MAX_RESULT_BYTES,
    PRIORITY_DEFAULT,
    AttemptRecord,
    ErrorCode,
    Job,
    JobError,
    JobIdGenerator,
    Progress,
    RetryPolicy,
    WaitReason,
    result_too_large,
)
from jobwire.server.job_types import MAX_KNOWN_TYPES, JobType, resolve_retry_policy
from jobwire.server.scheduler import Scheduler
from jobwire.server.state_machine import JobState, check_transition
from jobwire.server.stats import StatsWindow, WindowFigures
from jobwire.server.stores.base import DuplicateRequestId, JobCount, JobQuery, JobStore
from jobwire.server.timers import TimerKind, Timers
from jobwire.server.validation import (
    SubmitRequest,
    check,
    fingerprint,
    job_type_violations,
    submit_violations,
)
from jobwire.server.workers import (
    Assignment,
    CancelRequest,
    LeaseRevoked,
    LeaseToken,
    WorkerRegistry,
    WorkerSession,
    WriteResult,
)

log = logging.getLogger("jobwire.manager")


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    """Limits and timings of the manager; see ``config.ServerConfig`` for the user-facing names."""

    max_running: int = 8  # jobs running at once in this process (in-process handlers)
    max_queued: int = 100_000
    type_limits: dict[str, int] = field(default_factory=dict)
    aging_interval: float = 60.0
    default_timeout: float | None = None
    cancel_grace: float = 10.0
    retention: float = 7 * 24 * 3600.0
    sweep_interval: float = 60.0
    stats_window: float = 300.0
    handler_threads: int | None = None
    lease_duration: float = 30.0
    retry_policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(max_attempts=3))


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot for GetQueueStats."""

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


# -- how an attempt ended ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Succeeded:
    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Failed:
    """The attempt failed; ``retryable`` lets the retry policy decide whether another one follows."""

    error: JobError
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class Abandoned:
    """The attempt ended without an outcome (handed back, drained, crashed): run it again at once."""

    error: JobError


Outcome = Succeeded | Failed | Abandoned


class _LocalAttempt:
    """One run of an in-process handler."""

    __slots__ = ("abandon", "ctx", "force_timer", "handler_task", "job", "spec", "task")

    def __init__(self, job: Job, spec: HandlerSpec, ctx: LocalJobContext) -> None:
        self.job = job
        self.spec = spec
        self.ctx = ctx
        self.task: asyncio.Task[None] | None = None
        self.handler_task: asyncio.Future[Any] | None = None
        self.force_timer: asyncio.TimerHandle | None = None
        self.abandon = False  # the server is draining: queue the job again instead of finishing it

    def force_stop(self) -> None:
        if self.handler_task is not None and not self.handler_task.done():
            self.handler_task.cancel()


class _RemoteLease:
    """The current lease of a job running on a remote worker, and the session that holds it (if any)."""

    __slots__ = ("session", "token")

    def __init__(self, token: LeaseToken, session: WorkerSession | None) -> None:
        self.token = token
        self.session = session


class JobManager:
    """Submit, get, list, cancel, retry, watch and stats; worker sessions; in domain terms."""

    def __init__(
        self,
        store: JobStore,
        handlers: dict[str, HandlerSpec],
        settings: ManagerSettings | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.handlers = dict(handlers)
        self.settings = settings or ManagerSettings()
        self.clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self.job_types: dict[str, JobType] = {
            name: JobType.from_handler(s) for name, s in self.handlers.items()
        }
        self.scheduler = Scheduler(aging_interval=self.settings.aging_interval)
        for job_type in self.job_types.values():
            self._apply_type_limit(job_type)
        self.events = EventHub(retain_after_finish=max(60.0, self.settings.sweep_interval))
        self.stats_window = StatsWindow(self.settings.stats_window)
        self.workers = WorkerRegistry()
        self.timers = Timers()
        self._runner = HandlerRunner(self.settings.handler_threads or self.settings.max_running + 4)
        self._ids = JobIdGenerator()
        self._jobs: dict[str, Job] = {}  # every unfinished job: the live state
        self._locks: dict[str, asyncio.Lock] = {}
        self._local: dict[str, _LocalAttempt] = {}  # in-process attempts whose handler is running
        self._local_tasks: set[asyncio.Task[None]] = set()  # ... and those still writing their outcome
        self._leases: dict[str, _RemoteLease] = {}
        self._delayed: set[str] = set()  # queued jobs waiting for their schedule_time
        self._inserting = 0
        self._started = False
        self._draining = False
        self._dispatching = False
        self._background: list[asyncio.Task[None]] = []
        self._timer_wake = asyncio.Event()
        # State changes asked for by callers, each running to its end even if its caller gives up.
        self.in_flight = InFlight()

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, recover unfinished jobs, rebuild the queue and start dispatching. Idempotent."""
        if self._started:
            return
        self._started = True
        await self.store.open()
        for stored_type in await self.store.load_job_types():
            if stored_type.name not in self.handlers:
                self.job_types[stored_type.name] = stored_type
                self._apply_type_limit(stored_type)
        await self._recover()
        self._dispatching = True
        self._dispatch()
        self._background = [
            asyncio.create_task(self._sweep_forever(), name="jobwire-sweeper"),
            asyncio.create_task(self._timers_forever(), name="jobwire-timers"),
        ]

    async def _recover(self) -> None:
        now = self.clock.now()
        counts = {"queued": 0, "requeued": 0, "leased": 0}
        for job in await self.store.load_unfinished():
            self._jobs[job.id] = job
            if job.state.is_active and job.worker_id not in ("", LOCAL_WORKER_ID):
                # A remote attempt: its worker may still be running it, so the lease stands; every lease
                # gets one full duration from now for its worker to reconnect and renew it.
                job.lease_expire_time = now + self.settings.lease_duration
                self._leases[job.id] = _RemoteLease(LeaseToken(job.id, job.attempt, job.lease_epoch), None)
                self.scheduler.mark_running(job.type)
                self.timers.add(job.lease_expire_time, TimerKind.LEASE_EXPIRY, job.id, job.lease_epoch)
                counts["leased"] += 1
                continue
            if job.state.is_active:
                # An in-process attempt died with the previous process.
                error = JobError(
                    ErrorCode.ABORTED, "the server stopped while the job ran", "SERVER_RESTARTED"
                )
                target, changes = self._decide(job, Abandoned(error), now)
                await self._apply(job, target, changes)
                if target.is_terminal:
                    self._forget(job)
                    continue
                counts["requeued"] += 1
            self._enqueue(job, now)
            counts["queued"] += 1
        log.info(
            "recovered %(queued)d queued jobs (%(requeued)d had been running in-process) and "
            "%(leased)d remote leases",
            counts,
            extra=counts,
        )

    def begin_drain(self) -> None:
        """Stop taking and starting work, at once: new submits, retries and worker sessions are refused,
        watch streams end with their resume point and worker sessions end, so that watchers and workers
        move to another server (or come back after a restart) while local jobs finish. Idempotent.

        Remote workers keep their leases: they renew them when they reconnect.
        """
        if self._draining:
            return
        self._draining = True
        self._dispatching = False
        self.events.close_all()
        for session in self.workers:
            self.disconnect_worker(session)

    async def drain(self, grace: float) -> None:
        """``begin_drain``, then give local jobs ``grace`` seconds to finish, then queue them again."""
        if self._draining and not self._local_tasks:
            return
        self.begin_drain()
        attempts = list(self._local.values())
        log.info("draining: %d in-process jobs running, grace %.1fs", len(attempts), grace)
        tasks = list(self._local_tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for attempt in attempts:
                if attempt.task in pending:
                    attempt.abandon = True
                    attempt.ctx.cancel("the server is shutting down")
                    attempt.force_stop()
            if pending:
                await asyncio.wait(pending, timeout=5.0)

    async def close(self) -> None:
        """Stop background work and close the store (after ``drain``). Idempotent."""
        await self.in_flight.wait(10.0)  # state changes callers started complete before the store closes
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        for attempt in list(self._local.values()):
            if attempt.force_timer is not None:
                attempt.force_timer.cancel()
        self._runner.shutdown()
        await self.store.close()

    @property
    def draining(self) -> bool:
        return self._draining

    # -- the job API ---------------------------------------------------------------------------------

    @completes
    async def submit(self, request: SubmitRequest) -> Job:
        """Store a new job durably and queue it; returns it in state QUEUED."""
        if self._draining:
            raise Draining()
        check(submit_violations(request))
        job_type = self.job_types.get(request.type)
        if job_type is None:
            known = f"known types: {_name_some(sorted(self.job_types)) or '(none registered)'}"
            raise UnknownJobType(
                f"unknown job type {request.type!r}; {known}",
                [FieldViolation("type", f"no handler or worker has declared {request.type!r}; {known}")],
            )
        if len(self.scheduler) + len(self._delayed) + self._inserting >= self.settings.max_queued:
            raise QueueFull(f"the queue is full ({self.settings.max_queued} jobs waiting); retry later")
        priority = PRIORITY_DEFAULT if request.priority is None else request.priority
        now = self.clock.now()
        schedule_time = (
            request.schedule_time if request.schedule_time and request.schedule_time > now else None
        )
        job = Job(
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
        )
        self._inserting += 1
        try:
            await self.store.insert(job)
        except DuplicateRequestId:
            return await self._existing_for_request(job)
        finally:
            self._inserting -= 1
        acknowledged = job.copy()
        self._jobs[job.id] = job
        self._enqueue(job, now)
        self._dispatch()
        return acknowledged

    async def _existing_for_request(self, job: Job) -> Job:
        existing = await self.store.get_by_request_id(job.request_id)
        if existing is None:
            raise JobwireError("the job of this request_id vanished while it was being read; retry")
        if existing.request_fingerprint != job.request_fingerprint:
            raise RequestIdReused(
                f"request_id {job.request_id!r} was already used by job {existing.id} "
                "with a different request"
            )
        return await self.get(existing.id)

    async def get(self, job_id: str) -> Job:
        """The job as it is now, with why it waits and where it stands if queued."""
        live = self._jobs.get(job_id)
        if live is not None:
            job = live.copy()
        else:
            stored = await self.store.get(job_id)
            if stored is None:
                raise JobNotFound(f"job {job_id!r} not found")
            job = stored
        if job.state is JobState.QUEUED:
            self._annotate([job])
        return job

    async def list_jobs(self, query: JobQuery) -> tuple[list[Job], bool]:
        """One page, newest first, and whether more pages follow."""
        rows = await self.store.list(
            JobQuery(query.filter, query.limit + 1, query.before_id, query.with_payload)
        )
        more = len(rows) > query.limit
        jobs = [self._jobs[j.id].copy() if j.id in self._jobs else j for j in rows[: query.limit]]
        self._annotate([j for j in jobs if j.state is JobState.QUEUED])
        return jobs, more

    def _annotate(self, queued: list[Job]) -> None:
        """Fill in queue positions and wait reasons of queued jobs (computed, never stored)."""
        if not queued:
            return
        positions = self.scheduler.positions(j.id for j in queued)
        now = self.clock.now()
        for job in queued:
            job.queue_position = positions.get(job.id, 0)
            job.wait_reason, job.wait_message = self._wait_reason(job, now)

    def _wait_reason(self, job: Job, now: float) -> tuple[WaitReason, str]:
        if self._draining:
            return WaitReason.DRAINING, "the server is draining and starts no new work"
        if job.schedule_time is not None and job.schedule_time > now:
            when = f"{max(0.0, job.schedule_time - now):.1f}s"
            if job.attempts:
                return WaitReason.RETRY_BACKOFF, f"attempt {job.attempt} starts in {when} (retry back-off)"
            return WaitReason.SCHEDULED, f"scheduled to start in {when}"
        local = job.type in self.handlers
        sessions = self.workers.serving(job.type)
        if not local and not sessions:
            return WaitReason.NO_WORKER, f"no connected worker takes type {job.type}"
        if not self.scheduler.has_room(job.type):
            limit = self.scheduler.type_limits.get(job.type)
            return WaitReason.TYPE_LIMIT, f"type {job.type} is at its limit of {limit} running jobs"
        local_full = not local or len(self._local) >= self.settings.max_running
        if local_full and all(s.credits <= 0 for s in sessions):
            return WaitReason.NO_CAPACITY, f"every executor of type {job.type} is busy"
        return WaitReason.QUEUED, f"position {job.queue_position} in the run order"

    @completes
    async def cancel(self, job_id: str, reason: str = "") -> Job:
        """Cancel a queued job at once, or ask a running one to stop."""
        job = self._jobs.get(job_id)
        if job is None:
            stored = await self.store.get(job_id)
            if stored is None:
                raise JobNotFound(f"job {job_id!r} not found")
            return self._check_cancellable(stored)
        async with self._lock(job_id):
            self._check_cancellable(job)
            if job.state is JobState.QUEUED:
                self.scheduler.remove(job_id)
                self._delayed.discard(job_id)
                job.cancel_reason = reason
                await self._apply(job, JobState.CANCELLED, self._cancelled_changes(job))
                self._forget(job)
            elif job.state is JobState.RUNNING:
                job.cancel_reason = reason
                await self._apply(job, JobState.CANCELLING, {"cancel_reason": reason})
                self._ask_to_stop(job, reason or "cancelled")
        return await self.get(job_id)

    def _ask_to_stop(self, job: Job, reason: str) -> None:
        """Tell whoever runs the job to stop, and force the end after the cancel grace period."""
        loop = asyncio.get_running_loop()
        local = self._local.get(job.id)
        if local is not None:
            local.ctx.cancel(reason)
            local.force_timer = loop.call_later(self.settings.cancel_grace, local.force_stop)
            return
        lease = self._leases.get(job.id)
        if lease is not None:
            if lease.session is not None:
                lease.session.send(CancelRequest(lease.token, reason))
            token = lease.token
            loop.call_later(self.settings.cancel_grace, lambda: self._spawn(self._force_remote_cancel(token)))

    async def _force_remote_cancel(self, token: LeaseToken) -> None:
        job = self._current(token)
        if job is not None and job.state is JobState.CANCELLING:
            error = JobError(ErrorCode.CANCELLED, "the worker did not stop in time", "CANCEL_FORCED")
            await self._end_remote(job, token, Failed(error, retryable=False), "cancelled; stop the job")

    @staticmethod
    def _check_cancellable(job: Job) -> Job:
        if job.state in (JobState.SUCCEEDED, JobState.FAILED):
            raise JobAlreadyFinished(f"job {job.id} cannot be cancelled: it is already {job.state.name}")
        return job

    @completes
    async def retry(self, job_id: str) -> Job:
        """Queue a FAILED or CANCELLED job again with a fresh attempt budget."""
        if self._draining:
            raise Draining()
        if job_id in self._jobs:  # not finished: nothing to do
            return await self.get(job_id)
        stored = await self.store.get(job_id)
        if stored is None:
            raise JobNotFound(f"job {job_id!r} not found")
        if stored.state is JobState.SUCCEEDED:
            raise JobAlreadyFinished(f"job {job_id} cannot be retried: it already SUCCEEDED")
        if len(self.scheduler) + len(self._delayed) >= self.settings.max_queued:
            raise QueueFull(f"the queue is full ({self.settings.max_queued} jobs waiting); retry later")
        if job_id in self._jobs:  # another RetryJob got here first
            return await self.get(job_id)
        job = stored
        self._jobs[job.id] = job
        async with self._lock(job.id):
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
            }
            if not await self._apply(job, JobState.QUEUED, changes):
                self._jobs.pop(job.id, None)
                return await self.get(job_id)
        self._enqueue(job, now)
        self._dispatch()
        return await self.get(job_id)

    async def watch(self, job_id: str, after_sequence: int = 0) -> AsyncIterator[JobEvent]:
        """The job's snapshot (or the changes after ``after_sequence``), then each change until it ends.

        Raises Draining when the server shuts down first: the client reconnects with the last sequence.
        """
        subscription = self.events.subscribe(job_id)  # before the snapshot, so nothing falls between
        try:
            job = await self.get(job_id)
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
                    missed = self.events.replay(job_id, after_sequence, job.sequence)
                    if missed is None:
                        raise WatchPositionLost(
                            f"changes after sequence {after_sequence} of job {job_id} are no longer "
                            "retained; watch again with after_sequence 0"
                        )
                    for event in missed:
                        last = event.sequence
                        yield event
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
                yield change
                if change.job.state.is_terminal:
                    return
        finally:
            self.events.unsubscribe(subscription)

    async def stats(self) -> QueueStats:
        counts = await self.store.count()
        known = sorted(set(self.job_types) | {c.type for c in counts})
        workers_by_type = {t: len(self.workers.serving(t)) + (t in self.handlers) for t in known}
        return QueueStats(
            counts=counts,
            queued_by_type=self.scheduler.queued_by_type(),
            running_by_type=self.scheduler.running_by_type(),
            type_limits=dict(self.scheduler.type_limits),
            queued_by_priority=self.scheduler.queued_by_priority(),
            running=self.scheduler.running,
            max_running=self.settings.max_running,
            max_queued=self.settings.max_queued,
            window=self.stats_window.figures(self.clock.monotonic()),
            read_time=self.clock.now(),
            draining=self._draining,
            known_types=known,
            workers_by_type=workers_by_type,
            connected_workers=len(self.workers),
            delayed=len(self._delayed),
        )

    # -- worker sessions -----------------------------------------------------------------------------

    async def connect_worker(self, worker_id: str, job_types: list[JobType], credits: int) -> WorkerSession:
        """Register a worker session; its types become known (and stored) and it is offered work."""
        if self._draining:
            raise Draining()
        violations = job_type_violations(worker_id, job_types, credits)
        if violations:
            raise InvalidArgument(violations=violations)
        declared = await self._declare_types(job_types)
        session = WorkerSession(worker_id, frozenset(t.name for t in declared), credits)
        self.workers.add(session)
        log.info(
            "worker connected",
            extra={"session": session.session_id, "worker_id": worker_id, "types": sorted(session.job_types)},
        )
        self._dispatch()
        return session

    @completes
    async def _declare_types(self, job_types: list[JobType]) -> list[JobType]:
        """Store the types a worker declares, then make them known here (both, even if it disconnects)."""
        new = {t.name for t in job_types} - self.job_types.keys()
        if len(self.job_types) + len(new) > MAX_KNOWN_TYPES:
            raise TooManyJobTypes(
                f"declaring {len(new)} new job types would pass the limit of {MAX_KNOWN_TYPES} known "
                f"types ({len(self.job_types)} known); types no worker declared for the retention period "
                "are forgotten"
            )
        now = self.clock.now()
        declared = [JobType(t.name, t.timeout, t.max_running, t.retry, now) for t in job_types]
        await self.store.save_job_types(declared)
        for job_type in declared:
            if job_type.name not in self.handlers:  # in-process handlers keep their own settings
                self.job_types[job_type.name] = job_type
                self._apply_type_limit(job_type)
        return declared

    def disconnect_worker(self, session: WorkerSession) -> None:
        """The session ended. Its leases stand until they expire or a new session renews them."""
        self.workers.remove(session)
        session.close()
        for job_id in session.running:
            lease = self._leases.get(job_id)
            if lease is not None and lease.session is session:
                lease.session = None
        session.running.clear()
        log.info("worker disconnected", extra={"session": session.session_id, "worker_id": session.worker_id})

    def add_credits(self, session: WorkerSession, credits: int) -> None:
        if credits < 1 or credits > 10_000:
            raise InvalidArgument(
                violations=[FieldViolation("add_credits.credits", "must be from 1 to 10000")]
            )
        session.credits = min(session.credits + credits, 1_000_000)
        self._dispatch()

    def worker_progress(self, session: WorkerSession, token: LeaseToken, progress: Progress) -> None:
        job = self._current(token)
        if job is None:
            session.send(LeaseRevoked(token, self._stale_reason(token)))
            return
        self._renew(job, token, session)
        self._on_progress(job.id, progress)

    def worker_heartbeat(self, session: WorkerSession, tokens: list[LeaseToken]) -> None:
        for token in tokens:
            job = self._current(token)
            if job is None:
                session.send(LeaseRevoked(token, self._stale_reason(token)))
                continue
            self._renew(job, token, session)
            if job.state is JobState.CANCELLING:  # e.g. the cancellation was sent to an older session
                session.send(CancelRequest(token, job.cancel_reason or "cancelled"))

    async def worker_finish(self, session: WorkerSession, token: LeaseToken, outcome: Outcome) -> None:
        """A worker's CompleteJob, FailJob or ReleaseJob; answered with a WriteResult on the session."""
        job = self._current(token)
        if job is None:
            session.send(WriteResult(token, False, self._stale_reason(token)))
            return
        accepted = await self._end_remote(job, token, outcome, None)
        session.send(WriteResult(token, accepted, "" if accepted else self._stale_reason(token)))

    def _current(self, token: LeaseToken) -> Job | None:
        """The job if ``token`` is its current remote lease; None if the write must be refused."""
        job = self._jobs.get(token.job_id)
        lease = self._leases.get(token.job_id)
        if job is None or lease is None or lease.token != token or not job.state.is_active:
            return None
        return job

    def _stale_reason(self, token: LeaseToken) -> str:
        job = self._jobs.get(token.job_id)
        if job is None:
            return f"job {token.job_id} is finished or unknown"
        if job.lease_epoch != token.epoch:
            return f"lease epoch {token.epoch} is stale: job {token.job_id} is at epoch {job.lease_epoch}"
        return f"job {token.job_id} is {job.state.name}, not running under this lease"

    def _renew(self, job: Job, token: LeaseToken, session: WorkerSession) -> None:
        """Extend the lease (in memory: after a restart every lease gets a fresh duration anyway)."""
        job.lease_expire_time = self.clock.now() + self.settings.lease_duration
        lease = self._leases[job.id]
        if lease.session is not session:
            if lease.session is not None:
                lease.session.running.discard(job.id)
            lease.session = session
            session.running.add(job.id)

    # -- state changes -------------------------------------------------------------------------------

    def _lock(self, job_id: str) -> asyncio.Lock:
        lock = self._locks.get(job_id)
        if lock is None:
            lock = self._locks[job_id] = asyncio.Lock()
        return lock

    async def _apply(self, job: Job, target: JobState, changes: dict[str, Any]) -> bool:
        """Move ``job`` to ``target``: durable first, then live, then published. False if the store refused.

        The caller holds the job's lock, or is the only one that can touch the job (start-up).
        """
        check_transition(job.state, target)
        now = self.clock.now()
        updated = job.copy()
        updated.state = target
        updated.update_time = now
        updated.sequence = job.sequence + 1
        for name, value in changes.items():
            setattr(updated, name, value)
        if target.is_terminal:
            updated.end_time = now
            updated.expire_time = now + self.settings.retention
        if not await self.store.update(updated, expected_state=job.state):
            log.warning(
                "job %s: store refused %s -> %s (changed elsewhere)", job.id, job.state.name, target.name
            )
            return False
        if "progress" not in changes:
            updated.progress = job.progress  # reports may have come in while we waited for the store
        updated.sequence = job.sequence + 1  # ... and moved the sequence on
        # Only what this change set differs between `updated` and the live job.
        job.state, job.update_time, job.sequence = target, now, updated.sequence
        if target.is_terminal:
            job.end_time, job.expire_time = updated.end_time, updated.expire_time
        for name, value in changes.items():
            setattr(job, name, value)
        if target is JobState.QUEUED:  # watchers learn at once why it waits (e.g. a retry back-off)
            updated.wait_reason, updated.wait_message = self._wait_reason(updated, now)
        # `updated` is now a private snapshot of the live job: the event can own it without a copy.
        self.events.publish_snapshot(updated, EventKind.STATE_CHANGED, now)
        return True

    def _cancelled_changes(self, job: Job) -> dict[str, Any]:
        message = "cancelled" + (f": {job.cancel_reason}" if job.cancel_reason else "")
        return {"error": JobError(ErrorCode.CANCELLED, message, "JOB_CANCELLED")}

    def _decide(self, job: Job, outcome: Outcome, now: float) -> tuple[JobState, dict[str, Any]]:
        """What an attempt's outcome means for the job: the target state and the changes."""
        if job.state is JobState.CANCELLING:
            changes = self._cancelled_changes(job)
            attempt_error: JobError | None = changes["error"]
            target = JobState.CANCELLED
        elif isinstance(outcome, Succeeded):
            changes, attempt_error, target = {"result": outcome.result}, None, JobState.SUCCEEDED
        elif isinstance(outcome, Abandoned):
            attempt_error, target = outcome.error, JobState.QUEUED
            changes = {"attempt": job.attempt + 1, "progress": None, "schedule_time": None}
        else:
            attempt_error = outcome.error
            used = job.attempt - job.attempt_base
            if outcome.retryable and used < job.retry_policy.max_attempts:
                delay = job.retry_policy.backoff(used, self._rng.random())
                target = JobState.QUEUED
                changes = {
                    "attempt": job.attempt + 1,
                    "progress": None,
                    "schedule_time": now + delay,
                    "queue_time": now + delay,
                }
            else:
                target, changes = JobState.FAILED, {"error": outcome.error}
        record = AttemptRecord(job.attempt, job.start_time or now, now, attempt_error, job.worker_id)
        changes["attempts"] = (*job.attempts[-(MAX_ATTEMPT_HISTORY - 1) :], record)
        changes["lease_expire_time"] = None
        return target, changes

    def _enqueue(self, job: Job, now: float) -> None:
        """Put a QUEUED job where it waits: the run order, or the delayed set until its time comes."""
        if job.schedule_time is not None and job.schedule_time > now:
            self._delayed.add(job.id)
            self.timers.add(job.schedule_time, TimerKind.SCHEDULED_START, job.id)
            self._timer_wake.set()
        else:
            self.scheduler.push(job.id, job.type, job.priority, job.queue_time)

    def _forget(self, job: Job) -> None:
        """A job reached a terminal state: it now lives only in the store."""
        self._jobs.pop(job.id, None)
        self._locks.pop(job.id, None)

    def _on_progress(self, job_id: str, progress: Progress) -> None:
        """Progress was reported: publish at once, persist lazily (coalesced by the store)."""
        job = self._jobs.get(job_id)
        if job is None or not job.state.is_active:
            return
        job.progress = progress
        job.update_time = self.clock.now()
        job.sequence += 1
        self.events.publish(job, EventKind.PROGRESS_UPDATED, job.update_time)
        self.store.record_progress(job)

    async def _end_attempt(self, job: Job, outcome: Outcome) -> JobState | None:
        """End the current attempt (caller holds the job's lock); returns the new state, None if refused."""
        now = self.clock.now()
        run_time = now - (job.start_time or now)
        target, changes = self._decide(job, outcome, now)
        if not await self._apply(job, target, changes):
            return None
        self.scheduler.release(job.type)
        if target is JobState.QUEUED:
            self._enqueue(job, now)
        else:
            self.stats_window.record_finish(self.clock.monotonic(), target is JobState.SUCCEEDED, run_time)
            self._forget(job)
        self._dispatch()
        return target

    # -- dispatch ------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start every job the limits and capacities allow. Called whenever any of them may have changed."""
        if not self._dispatching:
            return
        while len(self._local) < self.settings.max_running:
            picked = self.scheduler.pop_ready(self.handlers)
            if picked is None:
                break
            self._start_local(picked[0])
        offered = True
        while offered:  # one job per session per round, so work spreads across workers
            offered = False
            for session in self.workers.with_credits():
                picked = self.scheduler.pop_ready(session.job_types)
                if picked is not None:
                    session.credits -= 1
                    self.workers.rotate(session)
                    self._spawn(self._run_remote(self._jobs[picked[0]], session))
                    offered = True

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)
        task.add_done_callback(_log_task_failure)

    async def _claim(self, job: Job, worker_id: str, remote: bool) -> bool:
        """QUEUED -> RUNNING for a new attempt under a new lease epoch; False if it is no longer queued."""
        async with self._lock(job.id):
            if job.state is not JobState.QUEUED:  # cancelled between pop and start
                return False
            now = self.clock.now()
            claimed = await self._apply(
                job,
                JobState.RUNNING,
                {
                    "attempt": max(job.attempt, 1),
                    "start_time": now,
                    "error": None,
                    "result": None,
                    "worker_id": worker_id,
                    "lease_epoch": job.lease_epoch + 1,
                    "lease_expire_time": now + self.settings.lease_duration if remote else None,
                    "schedule_time": None,
                },
            )
        if claimed:
            self.stats_window.record_start(self.clock.monotonic(), now - job.queue_time)
        return claimed

    def _attempt_timeout(self, job: Job) -> float | None:
        declared = self.job_types.get(job.type)
        return job.timeout or (declared.timeout if declared else None) or self.settings.default_timeout

    async def _run_remote(self, job: Job, session: WorkerSession) -> None:
        if not await self._claim(job, session.worker_id, remote=True):
            self.scheduler.release(job.type)
            session.credits += 1
            self._dispatch()
            return
        token = LeaseToken(job.id, job.attempt, job.lease_epoch)
        self._leases[job.id] = _RemoteLease(token, session)
        session.running.add(job.id)
        assert job.lease_expire_time is not None
        self.timers.add(job.lease_expire_time, TimerKind.LEASE_EXPIRY, job.id, token.epoch)
        timeout = self._attempt_timeout(job)
        if timeout is not None and job.start_time is not None:
            self.timers.add(job.start_time + timeout, TimerKind.ATTEMPT_TIMEOUT, job.id, token.epoch)
        self._timer_wake.set()
        session.send(Assignment(job.copy(), token, job.lease_expire_time, timeout))

    async def _end_remote(
        self, job: Job, token: LeaseToken, outcome: Outcome, revoke_reason: str | None
    ) -> bool:
        """End a remote attempt if ``token`` is still its lease; tell the holder to stop if asked."""
        async with self._lock(job.id):
            if self._current(token) is not job:
                return False
            lease = self._leases.pop(job.id)
            if lease.session is not None:
                lease.session.running.discard(job.id)
                if revoke_reason is not None:
                    lease.session.send(LeaseRevoked(token, revoke_reason))
            if await self._end_attempt(job, outcome) is None:
                return False
        return True

    def _start_local(self, job_id: str) -> None:
        job = self._jobs[job_id]
        spec = self.handlers[job.type]
        loop = asyncio.get_running_loop()
        ctx = LocalJobContext(
            job.id, job.type, max(job.attempt, 1), job.lease_epoch + 1, job.progress, loop, self._on_progress
        )
        attempt = _LocalAttempt(job, spec, ctx)
        self._local[job_id] = attempt
        attempt.task = asyncio.create_task(self._run_local(attempt), name=f"jobwire-job-{job_id}")
        self._local_tasks.add(attempt.task)
        attempt.task.add_done_callback(self._local_tasks.discard)

    async def _run_local(self, attempt: _LocalAttempt) -> None:
        job = attempt.job
        ended = False
        try:
            if await self._claim(job, LOCAL_WORKER_ID, remote=False):
                outcome = await self._execute(attempt)
                # The handler is done, so its slot is free: the next job need not wait for this one's
                # final write to commit (with group commit that wait is a whole batch).
                self._local.pop(job.id, None)
                self._dispatch()
                async with self._lock(job.id):
                    ended = await self._end_attempt(job, outcome) is not None
        except Exception:
            log.exception("job %s: attempt failed inside Jobwire", job.id)
        finally:
            if attempt.force_timer is not None:
                attempt.force_timer.cancel()
            self._local.pop(job.id, None)
            if not ended:
                self.scheduler.release(job.type)
            if job.state.is_terminal:
                self._forget(job)
            self._dispatch()

    async def _execute(self, attempt: _LocalAttempt) -> Outcome:
        """Run the handler in-process and say how the attempt ended."""
        job, spec, ctx = attempt.job, attempt.spec, attempt.ctx
        timeout = self._attempt_timeout(job)
        handler_task = asyncio.ensure_future(self._runner.run(spec, job.params, ctx))
        attempt.handler_task = handler_task
        done, _ = await asyncio.wait({handler_task}, timeout=timeout)
        if not done:
            ctx.cancel("timed out")
            handler_task.cancel()
        # Retrieve the exception now, whatever is decided, so that none goes unobserved.
        error = handler_task.exception() if done and not handler_task.cancelled() else None
        if attempt.abandon and (not done or handler_task.cancelled() or isinstance(error, JobCancelled)):
            return Abandoned(
                JobError(ErrorCode.ABORTED, "the server drained while the job ran", "SERVER_DRAINED")
            )
        if not done:
            message = f"the attempt ran longer than its time-out of {timeout:g}s"
            return Failed(JobError(ErrorCode.DEADLINE_EXCEEDED, message, "ATTEMPT_TIMEOUT"))
        if handler_task.cancelled():  # forced after the cancel grace period
            return Failed(JobError(ErrorCode.CANCELLED, "the handler was stopped", "HANDLER_STOPPED"), False)
        if isinstance(error, JobCancelled):
            message = f"the handler cancelled itself: {error}"
            return Failed(JobError(ErrorCode.CANCELLED, message, "HANDLER_CANCELLED"), retryable=False)
        if isinstance(error, NonRetryableError):
            return Failed(_handler_error(error), retryable=False)
        if error is not None:
            return Failed(_handler_error(error))
        return handler_result(handler_task.result())

    # -- time ----------------------------------------------------------------------------------------

    async def _timers_forever(self) -> None:
        """Wake when the next timer is due (or a new one is added), and act on what is due."""
        while True:
            due = self.timers.next_due()
            self._timer_wake.clear()
            delay = None if due is None else max(0.0, due - self.clock.now())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), delay)
            try:
                await self.tick()
            except Exception:
                log.exception("timer processing failed; will retry")

    async def tick(self) -> None:
        """Act on every timer due by the clock's now: start delayed jobs, expire leases, time out attempts.

        Runs by itself as time passes; tests with a fake clock call it after moving the clock.
        """
        now = self.clock.now()
        for timer in self.timers.pop_due(now):
            job = self._jobs.get(timer.job_id)
            if job is None:
                continue
            if timer.kind is TimerKind.SCHEDULED_START:
                if job.id in self._delayed and job.state is JobState.QUEUED:
                    self._delayed.discard(job.id)
                    self.scheduler.push(job.id, job.type, job.priority, job.queue_time)
                continue
            lease = self._leases.get(job.id)
            if lease is None or lease.token.epoch != timer.epoch:
                continue
            if timer.kind is TimerKind.LEASE_EXPIRY:
                expires = job.lease_expire_time or now
                if expires > now:  # renewed since: look again then
                    self.timers.add(expires, TimerKind.LEASE_EXPIRY, job.id, timer.epoch)
                    continue
                error = JobError(ErrorCode.ABORTED, "the worker's lease expired", "LEASE_EXPIRED")
                log.warning("job %s attempt %d: lease expired", job.id, job.attempt)
                await self._end_remote(job, lease.token, Failed(error), "the lease expired")
            elif timer.kind is TimerKind.ATTEMPT_TIMEOUT:
                message = "the attempt ran longer than its time-out"
                error = JobError(ErrorCode.DEADLINE_EXCEEDED, message, "ATTEMPT_TIMEOUT")
                await self._end_remote(job, lease.token, Failed(error), "the attempt timed out")
        self._dispatch()

    # -- background ----------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        """Purge finished jobs past their retention, and watch logs nobody needs."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("retention sweep failed; will retry")

    async def sweep(self) -> int:
        purged = await self.store.purge_expired(self.clock.now())
        self.events.sweep(self.clock.now())
        if purged:
            log.info("purged %d finished jobs past their retention", purged)
        await self._forget_stale_types()
        return purged

    async def _forget_stale_types(self) -> None:
        """Forget declared types that no worker declared for the retention period and no job needs."""
        horizon = self.clock.now() - self.settings.retention
        in_use = {job.type for job in self._jobs.values()}
        stale = [
            t.name
            for t in self.job_types.values()
            if t.name not in self.handlers
            and t.last_seen < horizon
            and t.name not in in_use
            and not self.workers.serving(t.name)
        ]
        if stale:
            await self.store.delete_job_types(stale)
            for name in stale:
                self.job_types.pop(name, None)
                self.scheduler.set_type_limit(name, None)
            log.info("forgot %d job types no worker declared for the retention period", len(stale))

    def _apply_type_limit(self, job_type: JobType) -> None:
        limit = self.settings.type_limits.get(job_type.name, job_type.max_running)
        self.scheduler.set_type_limit(job_type.name, limit)


def handler_result(value: Any) -> Outcome:
    """A handler's return value as a job result: JSON-compatible, an object, and within its cap."""
    try:
        encoded = json.dumps(value if value is not None else {})
    except (TypeError, ValueError, RecursionError) as error:
        message = f"the handler returned a value that is not JSON-compatible: {error}"
        return Failed(JobError(ErrorCode.UNKNOWN, message, "RESULT_NOT_JSON"), retryable=False)
    if len(encoded) > MAX_RESULT_BYTES:
        return Failed(result_too_large(len(encoded)), retryable=False)
    result = json.loads(encoded)
    if not isinstance(result, dict):
        result = {"value": result}
    return Succeeded(result)


def _name_some(names: list[str], limit: int = 20) -> str:
    """The first ``limit`` names and how many more: an error message must stay small."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _handler_error(error: BaseException) -> JobError:
    message = f"{type(error).__name__}: {error}"[:4096]
    return JobError(ErrorCode.UNKNOWN, message, "HANDLER_ERROR", {"exception_type": type(error).__name__})


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background job task failed", exc_info=task.exception())


__all__ = [
    "Abandoned",
    "Failed",
    "JobManager",
    "ManagerSettings",
    "Outcome",
    "QueueStats",
    "Succeeded",
]
