"""The JobManager: the one owner of job state. Every API call and every handler outcome comes through here.

It holds unfinished jobs in memory (the live truth, progress included), makes every state change
durable in the store before anyone is told of it, feeds the scheduler, runs attempts through the
executor, and publishes changes to watchers.

Every state change goes through ``_apply``: under the job's lock it checks the transition against the
state machine, writes the new job to the store (compare-and-set on the old state), and only then
updates the live job and publishes the event. So watchers never see a state that is not durable, and
the order of sequences is the order of publication.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from jobwire.handlers.api import HandlerSpec, JobCancelled
from jobwire.server.clock import Clock, SystemClock
from jobwire.server.errors import (
    Draining,
    FieldViolation,
    JobAlreadyFinished,
    JobNotFound,
    JobwireError,
    QueueFull,
    RequestIdReused,
    UnknownJobType,
    WatchPositionLost,
)
from jobwire.server.events import EventHub, EventKind, JobEvent
from jobwire.server.executor import LocalExecutor, LocalJobContext
from jobwire.server.job import PRIORITY_DEFAULT, ErrorCode, Job, JobError, JobIdGenerator, Progress
from jobwire.server.scheduler import Scheduler
from jobwire.server.state_machine import JobState, check_transition
from jobwire.server.stats import StatsWindow, WindowFigures
from jobwire.server.stores.base import DuplicateRequestId, JobCount, JobQuery, JobStore
from jobwire.server.validation import SubmitRequest, check, fingerprint, submit_violations

log = logging.getLogger("jobwire.manager")


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    """Limits and timings of the manager; see ``config.ServerConfig`` for the user-facing names."""

    max_running: int = 8
    max_queued: int = 100_000
    type_limits: dict[str, int] = field(default_factory=dict)
    aging_interval: float = 60.0
    default_timeout: float | None = None
    cancel_grace: float = 10.0
    retention: float = 7 * 24 * 3600.0
    sweep_interval: float = 60.0
    stats_window: float = 300.0
    handler_threads: int | None = None


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


class _Attempt:
    """One run of a job's handler."""

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


class JobManager:
    """Submit, get, list, cancel, watch and stats, in domain terms."""

    def __init__(
        self,
        store: JobStore,
        handlers: dict[str, HandlerSpec],
        settings: ManagerSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.handlers = dict(handlers)
        self.settings = settings or ManagerSettings()
        self.clock = clock or SystemClock()
        limits = {name: spec.max_running for name, spec in self.handlers.items() if spec.max_running}
        limits.update(self.settings.type_limits)
        self.scheduler = Scheduler(
            max_running=self.settings.max_running,
            type_limits=limits,
            aging_interval=self.settings.aging_interval,
        )
        self.events = EventHub(retain_after_finish=max(60.0, self.settings.sweep_interval))
        self.stats_window = StatsWindow(self.settings.stats_window)
        self._executor = LocalExecutor(self.settings.handler_threads or self.settings.max_running + 4)
        self._ids = JobIdGenerator()
        self._jobs: dict[str, Job] = {}  # every unfinished job: the live state
        self._locks: dict[str, asyncio.Lock] = {}
        self._attempts: dict[str, _Attempt] = {}
        self._inserting = 0
        self._started = False
        self._draining = False
        self._dispatching = False
        self._sweeper: asyncio.Task[None] | None = None
        self._known_types_message = ""
        self._refresh_known_types()

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, recover unfinished jobs, rebuild the queue and start dispatching. Idempotent."""
        if self._started:
            return
        self._started = True
        await self.store.open()
        recovered = requeued = 0
        for job in await self.store.load_unfinished():
            self._jobs[job.id] = job
            if job.state is JobState.RUNNING:
                await self._apply(job, JobState.QUEUED, self._requeue_changes(job, "the server restarted"))
                requeued += 1
            elif job.state is JobState.CANCELLING:
                await self._apply(job, JobState.CANCELLED, self._cancelled_changes(job))
                continue
            if job.type in self.handlers:
                self.scheduler.push(job.id, job.type, job.priority, job.queue_time)
            else:
                log.warning(
                    "job %s of unknown type %r stays queued until a handler declares it", job.id, job.type
                )
            recovered += 1
        log.info("recovered %d unfinished jobs (%d were running and were queued again)", recovered, requeued)
        self._dispatching = True
        self._dispatch()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="jobwire-sweeper")

    async def drain(self, grace: float) -> None:
        """Stop taking and starting work; give running jobs ``grace`` seconds, then queue them again."""
        if self._draining:
            return
        self._draining = True
        self._dispatching = False
        attempts = list(self._attempts.values())
        log.info("draining: %d jobs running, grace %.1fs", len(attempts), grace)
        tasks = [a.task for a in attempts if a.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for attempt in attempts:
                if attempt.task in pending:
                    attempt.abandon = True
                    attempt.ctx.cancel("the server is shutting down")
                    attempt.force_stop()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        self.events.close_all()

    async def close(self) -> None:
        """Stop background work and close the store (after ``drain``). Idempotent."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for attempt in list(self._attempts.values()):
            if attempt.force_timer is not None:
                attempt.force_timer.cancel()
        self._executor.shutdown()
        await self.store.close()

    @property
    def draining(self) -> bool:
        return self._draining

    # -- the API -------------------------------------------------------------------------------------

    async def submit(self, request: SubmitRequest) -> Job:
        """Store a new job durably and queue it; returns it in state QUEUED."""
        if self._draining:
            raise Draining()
        violations = submit_violations(request)
        check(violations)
        if request.type not in self.handlers:
            known = f"known types: {self._known_types_message}"
            raise UnknownJobType(
                f"unknown job type {request.type!r}; {known}",
                [FieldViolation("type", f"no handler is registered for {request.type!r}; {known}")],
            )
        if len(self.scheduler) + self._inserting >= self.settings.max_queued:
            raise QueueFull(f"the queue is full ({self.settings.max_queued} jobs waiting); retry later")
        priority = PRIORITY_DEFAULT if request.priority is None else request.priority
        now = self.clock.now()
        job = Job(
            id=self._ids.new_id(),
            type=request.type,
            state=JobState.QUEUED,
            priority=priority,
            params=request.params,
            labels=dict(request.labels or {}),
            create_time=now,
            update_time=now,
            queue_time=now,
            request_id=request.request_id,
            request_fingerprint=fingerprint(request, priority) if request.request_id else "",
            timeout=request.timeout,
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
        self.scheduler.push(job.id, job.type, job.priority, job.queue_time)
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
        """The job as it is now, with its queue position if queued."""
        live = self._jobs.get(job_id)
        if live is not None:
            job = live.copy()
        else:
            stored = await self.store.get(job_id)
            if stored is None:
                raise JobNotFound(f"job {job_id!r} not found")
            job = stored
        if job.state is JobState.QUEUED:
            job.queue_position = self.scheduler.positions([job.id]).get(job.id, 0)
        return job

    async def list_jobs(self, query: JobQuery) -> tuple[list[Job], bool]:
        """One page, newest first, and whether more pages follow."""
        rows = await self.store.list(JobQuery(query.filter, query.limit + 1, query.before_id))
        more = len(rows) > query.limit
        jobs = [self._jobs[j.id].copy() if j.id in self._jobs else j for j in rows[: query.limit]]
        queued = [j.id for j in jobs if j.state is JobState.QUEUED]
        if queued:
            positions = self.scheduler.positions(queued)
            for job in jobs:
                job.queue_position = positions.get(job.id, 0)
        return jobs, more

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
                job.cancel_reason = reason
                await self._apply(job, JobState.CANCELLED, self._cancelled_changes(job))
                self._forget(job)
            elif job.state is JobState.RUNNING:
                job.cancel_reason = reason
                await self._apply(job, JobState.CANCELLING, {"cancel_reason": reason})
                attempt = self._attempts.get(job_id)
                if attempt is not None:
                    attempt.ctx.cancel(reason or "cancelled")
                    attempt.force_timer = asyncio.get_running_loop().call_later(
                        self.settings.cancel_grace, attempt.force_stop
                    )
        return await self.get(job_id)

    @staticmethod
    def _check_cancellable(job: Job) -> Job:
        if job.state in (JobState.SUCCEEDED, JobState.FAILED):
            raise JobAlreadyFinished(f"job {job.id} cannot be cancelled: it is already {job.state.name}")
        return job

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
                    raise Draining(f"the server is shutting down; watch again with after_sequence={last}")
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
        known = sorted(set(self.handlers) | {c.type for c in counts})
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
        )

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
        for name in Job.__slots__:
            if name != "queue_position":
                setattr(job, name, getattr(updated, name))
        # `updated` is now a private snapshot of the live job: the event can own it without a copy.
        self.events.publish_snapshot(updated, EventKind.STATE_CHANGED, now)
        return True

    def _requeue_changes(self, job: Job, why: str) -> dict[str, Any]:
        """A running attempt was abandoned: the job runs again as the next attempt."""
        log.info("job %s attempt %d abandoned (%s); queued again", job.id, job.attempt, why)
        return {"attempt": job.attempt + 1, "progress": None}

    def _cancelled_changes(self, job: Job) -> dict[str, Any]:
        message = "cancelled" + (f": {job.cancel_reason}" if job.cancel_reason else "")
        return {"error": JobError(ErrorCode.CANCELLED, message, "JOB_CANCELLED")}

    def _forget(self, job: Job) -> None:
        """A job reached a terminal state: it now lives only in the store."""
        self._jobs.pop(job.id, None)
        self._locks.pop(job.id, None)

    def _on_progress(self, job_id: str, progress: Progress) -> None:
        """A handler reported progress: publish at once, persist lazily (coalesced by the store)."""
        job = self._jobs.get(job_id)
        if job is None or not job.state.is_active:
            return
        job.progress = progress
        job.update_time = self.clock.now()
        job.sequence += 1
        self.events.publish(job, EventKind.PROGRESS_UPDATED, job.update_time)
        self.store.record_progress(job)

    # -- execution -----------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start every job the limits allow. Called whenever a job is queued or a slot frees up."""
        if not self._dispatching:
            return
        while (picked := self.scheduler.pop_ready()) is not None:
            job_id, job_type = picked
            job = self._jobs.get(job_id)
            if job is None:
                self.scheduler.release(job_type)
                continue
            spec = self.handlers[job_type]
            ctx = LocalJobContext(
                job.id,
                job.type,
                max(job.attempt, 1),
                job.progress,
                asyncio.get_running_loop(),
                self._on_progress,
            )
            attempt = _Attempt(job, spec, ctx)
            self._attempts[job_id] = attempt
            attempt.task = asyncio.create_task(self._run_attempt(attempt), name=f"jobwire-job-{job_id}")

    async def _run_attempt(self, attempt: _Attempt) -> None:
        job = attempt.job
        slot_held = True
        try:
            if await self._begin(attempt):
                outcome = await self._execute(attempt)
                # The handler is done, so its slot is free: the next job need not wait for this one's
                # final write to commit (with group commit that wait is a whole batch).
                self.scheduler.release(job.type)
                slot_held = False
                self._dispatch()
                await self._finish(attempt, outcome)
        except Exception:
            log.exception("job %s: attempt failed inside Jobwire", job.id)
        finally:
            if attempt.force_timer is not None:
                attempt.force_timer.cancel()
            self._attempts.pop(job.id, None)
            if slot_held:
                self.scheduler.release(job.type)
            if job.state.is_terminal:
                self._forget(job)
            self._dispatch()

    async def _begin(self, attempt: _Attempt) -> bool:
        job = attempt.job
        async with self._lock(job.id):
            if job.state is not JobState.QUEUED:  # cancelled between pop and start
                return False
            now = self.clock.now()
            started = await self._apply(
                job,
                JobState.RUNNING,
                {"attempt": max(job.attempt, 1), "start_time": now, "error": None, "result": None},
            )
        if started:
            self.stats_window.record_start(self.clock.monotonic(), now - job.queue_time)
        return started

    async def _execute(self, attempt: _Attempt) -> Callable[[], tuple[JobState, dict[str, Any]]]:
        """Run the handler; return a function that decides the outcome once the job's lock is held."""
        job, spec, ctx = attempt.job, attempt.spec, attempt.ctx
        timeout = job.timeout or spec.timeout or self.settings.default_timeout
        handler_task = asyncio.ensure_future(self._executor.run(spec, job.params, ctx))
        attempt.handler_task = handler_task
        done, _ = await asyncio.wait({handler_task}, timeout=timeout)
        if not done:
            ctx.cancel("timed out")
            handler_task.cancel()
        # Retrieve the outcome now, whatever decide() later looks at, so no exception goes unobserved.
        error = handler_task.exception() if done and not handler_task.cancelled() else None

        def decide() -> tuple[JobState, dict[str, Any]]:
            if attempt.abandon and job.state is JobState.RUNNING:
                return JobState.QUEUED, self._requeue_changes(job, "the server is draining")
            if job.state is JobState.CANCELLING:
                return JobState.CANCELLED, self._cancelled_changes(job)
            if not done:
                message = f"the job ran longer than its time-out of {timeout:g}s"
                return JobState.FAILED, {
                    "error": JobError(ErrorCode.DEADLINE_EXCEEDED, message, "JOB_TIMEOUT")
                }
            if handler_task.cancelled():
                return JobState.FAILED, {
                    "error": JobError(ErrorCode.ABORTED, "the handler was stopped", "HANDLER_STOPPED")
                }
            if isinstance(error, JobCancelled):
                return JobState.FAILED, {
                    "error": JobError(
                        ErrorCode.CANCELLED, f"the handler cancelled itself: {error}", "HANDLER_CANCELLED"
                    )
                }
            if error is not None:
                return JobState.FAILED, {"error": _handler_error(error)}
            return _success(handler_task.result())

        return decide

    async def _finish(self, attempt: _Attempt, decide: Callable[[], tuple[JobState, dict[str, Any]]]) -> None:
        job = attempt.job
        async with self._lock(job.id):
            target, changes = decide()
            run_time = self.clock.now() - (job.start_time or self.clock.now())
            if await self._apply(job, target, changes):
                if target is JobState.QUEUED:
                    # queue_time is kept, so the job keeps its place: it had already waited its turn.
                    self.scheduler.push(job.id, job.type, job.priority, job.queue_time)
                else:
                    self.stats_window.record_finish(
                        self.clock.monotonic(), target is JobState.SUCCEEDED, run_time
                    )

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
        return purged

    def _refresh_known_types(self) -> None:
        self._known_types_message = ", ".join(sorted(self.handlers)) or "(none registered)"


def _success(value: Any) -> tuple[JobState, dict[str, Any]]:
    """A handler's return value as a job result: JSON-compatible, and an object."""
    try:
        result = json.loads(json.dumps(value if value is not None else {}))
    except (TypeError, ValueError) as error:
        message = f"the handler returned a value that is not JSON-compatible: {error}"
        return JobState.FAILED, {"error": JobError(ErrorCode.UNKNOWN, message, "RESULT_NOT_JSON")}
    if not isinstance(result, dict):
        result = {"value": result}
    return JobState.SUCCEEDED, {"result": result}


def _handler_error(error: BaseException) -> JobError:
    message = f"{type(error).__name__}: {error}"[:4096]
    return JobError(ErrorCode.UNKNOWN, message, "HANDLER_ERROR", {"exception_type": type(error).__name__})
