"""Attempts: how one ends (``decide``, ``end_attempt``), and the in-process executor that runs them.

Every attempt runs under a lease with an epoch, wherever it runs (docs/architecture.md). Whoever ends
it, the holder with an outcome or the dispatcher when the lease expired or the time ran out, writes the
end with ``end_attempt``: a compare-and-set on the lease epoch, so exactly one end is recorded. ``decide``
says what an outcome means for the job: success, another attempt (at once, or after a back-off), or
failure, and a CANCELLING job always ends CANCELLED.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from jobwire.handlers.api import HandlerSpec, JobCancelled, NonRetryableError, Progress
from jobwire.handlers.runner import HandlerRunner
from jobwire.server import audit
from jobwire.server.audit import SERVER, Actor, AuditEntry
from jobwire.server.changes import ChangeKind, JobChange
from jobwire.server.clock import Clock
from jobwire.server.cluster import Cluster, Credits, ExecutorDown, ExecutorInfo, ExecutorUp
from jobwire.server.executor import LOCAL_WORKER_ID, LocalJobContext
from jobwire.server.job import (
    MAX_ATTEMPT_HISTORY,
    MAX_RESULT_BYTES,
    AttemptRecord,
    ErrorCode,
    Job,
    JobError,
    result_too_large,
)
from jobwire.server.retention import RetentionPolicy
from jobwire.server.state_machine import JobState, check_transition
from jobwire.server.stores.base import Expect, JobStore

log = logging.getLogger("jobwire.attempts")

# How many ended attempts an executor remembers, so that a repeated claim change never runs one twice.
_ENDED_MEMORY = 10_000


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


def handler_error(error: BaseException) -> JobError:
    message = f"{type(error).__name__}: {error}"
    return JobError(ErrorCode.UNKNOWN, message, "HANDLER_ERROR", {"exception_type": type(error).__name__})


def cancelled_changes(cancel_reason: str) -> dict[str, Any]:
    """What a job that ends CANCELLED records."""
    message = "cancelled" + (f": {cancel_reason}" if cancel_reason else "")
    return {"error": JobError(ErrorCode.CANCELLED, message, "JOB_CANCELLED")}


def terminal_changes(now: float, retention: float) -> dict[str, Any]:
    """What every job reaching a terminal state records: when, and until when it is kept."""
    return {"end_time": now, "expire_time": now + retention}


@dataclass(frozen=True, slots=True)
class Ending:
    """What ending attempts needs from the server's settings."""

    retention: RetentionPolicy
    rng: random.Random


def decide(job: Job, outcome: Outcome, now: float, ending: Ending) -> tuple[JobState, dict[str, Any]]:
    """What an attempt's outcome means for the job: the target state and the changes."""
    if job.state is JobState.CANCELLING:
        changes = cancelled_changes(job.cancel_reason)
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
        policy = job.retry_policy
        if outcome.retryable and policy.retries(int(outcome.error.code)) and used < policy.max_attempts:
            delay = policy.backoff(used, ending.rng.random())
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
    if target.is_terminal:
        changes.update(terminal_changes(now, ending.retention.for_job(job.retention, target)))
    return target, changes


# Failures the audit trail names by what happened rather than "attempt failed".
_FAILURE_ACTIONS = {"LEASE_EXPIRED": audit.LEASE_EXPIRED, "ATTEMPT_TIMEOUT": audit.TIMED_OUT}


def audit_entry(
    job: Job, outcome: Outcome, target: JobState, changes: dict[str, Any], now: float, actor: Actor
) -> AuditEntry:
    """The audit trail's record of an attempt's end (``changes`` as decided): what it meant, in words."""
    attempt = f"attempt {job.attempt}"
    if target is JobState.CANCELLED:
        why = outcome.error.message if isinstance(outcome, Failed | Abandoned) else "it completed"
        return actor.entry(job.id, now, audit.CANCELLED, f"{attempt} stopped: {why}")
    if isinstance(outcome, Succeeded):
        return actor.entry(job.id, now, audit.ATTEMPT_SUCCEEDED, attempt)
    detail = f"{attempt}: {outcome.error.reason}: {outcome.error.message}"
    if isinstance(outcome, Abandoned):
        action = audit.ATTEMPT_RELEASED if actor is not SERVER else audit.ATTEMPT_ABANDONED
        return actor.entry(job.id, now, action, f"{detail}; queued again as attempt {job.attempt + 1}")
    if target is JobState.QUEUED:
        wait = max(0.0, (changes.get("schedule_time") or now) - now)
        detail += f"; attempt {job.attempt + 1} may start in {wait:.1f}s"
    else:
        detail += "; the job failed"
    return actor.entry(job.id, now, _FAILURE_ACTIONS.get(outcome.error.reason, audit.ATTEMPT_FAILED), detail)


async def end_attempt(
    store: JobStore,
    job: Job,
    outcome: Outcome,
    now: float,
    ending: Ending,
    *,
    actor: Actor = SERVER,
    lease_expired_by: float | None = None,
) -> Job | None:
    """Write the end of the attempt ``job`` holds (its lease epoch); the job after it, or None if refused.

    ``job`` may be stale (cancelled or renewed since it was read): when the compare-and-set fails, the
    job is read again and, while the same lease still holds it, decided again.
    With ``lease_expired_by``, only an attempt whose lease has expired by then is ended.
    ``actor`` ended it (a worker, or the server itself), for the audit trail.
    """
    epoch = job.lease_epoch
    current: Job | None = job
    for _ in range(4):
        if current is None or not current.state.is_active or current.lease_epoch != epoch:
            return None
        if lease_expired_by is not None and (
            current.lease_expire_time is None or current.lease_expire_time > lease_expired_by
        ):
            return None  # renewed meanwhile
        target, changes = decide(current, outcome, now, ending)
        check_transition(current.state, target)
        expect = Expect(current.state, epoch, lease_expired_by)
        entry = audit_entry(current, outcome, target, changes, now, actor)
        updated = await store.transition(job.id, expect, target, changes, now, entry)
        if updated is not None:
            return updated
        current = await store.get(job.id)
    log.warning("job %s: could not end attempt %d (the job kept changing)", job.id, job.attempt)
    return None


# -- the in-process executor ---------------------------------------------------------------------------


class _LocalAttempt:
    """One run of an in-process handler."""

    __slots__ = ("abandon", "cancelling", "ctx", "force_timer", "handler_task", "job", "lost", "spec", "task")

    def __init__(self, job: Job, spec: HandlerSpec, ctx: LocalJobContext) -> None:
        self.job = job  # as claimed, then as the feed shows it (state, cancel reason)
        self.spec = spec
        self.ctx = ctx
        self.task: asyncio.Task[None] | None = None
        self.handler_task: asyncio.Future[Any] | None = None
        self.force_timer: asyncio.TimerHandle | None = None
        self.abandon = False  # the replica is draining: queue the job again instead of finishing it
        self.cancelling = False
        self.lost = False  # the lease moved on (expired, forced): the outcome is not written

    def force_stop(self) -> None:
        if self.handler_task is not None and not self.handler_task.done():
            self.handler_task.cancel()


@dataclass(frozen=True, slots=True)
class LocalSettings:
    max_running: int
    cancel_grace: float
    default_timeout: float | None


class LocalExecutor:
    """This replica's in-process handlers, as one executor (``<replica>/local``).

    It announces its free slots to the dispatcher, runs the attempts claimed for it (they reach it
    through the change feed), reports their progress, and writes their ends. Its attempts have no lease
    to renew: they live as long as this replica does (the dispatcher requeues them when it is gone).
    """

    def __init__(
        self,
        replica_id: str,
        store: JobStore,
        cluster: Cluster,
        handlers: dict[str, HandlerSpec],
        settings: LocalSettings,
        ending: Ending,
        clock: Clock,
        timeout_for: Any,
        runner: HandlerRunner,
    ) -> None:
        self.info = ExecutorInfo(f"{replica_id}/local", LOCAL_WORKER_ID, frozenset(handlers))
        self._store = store
        self._cluster = cluster
        self._handlers = handlers
        self._settings = settings
        self._ending = ending
        self._clock = clock
        self._timeout_for = timeout_for
        self._runner = runner
        self._running: dict[str, _LocalAttempt] = {}  # job id -> attempt whose handler runs
        # (job id, lease epoch) of attempts whose handler has returned: a change heard twice (the feed
        # may repeat one) must not run them again.
        self._ended: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()  # attempts not ended yet (handler, then the write)
        self._accepting = False

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        """Take work: announce the free slots, and keep the running attempts' leases renewed."""
        if not self._handlers or self._accepting:
            return
        self._accepting = True
        self.announce()

    def announce(self) -> None:
        """Tell the dispatcher about the free slots (again: a new dispatcher knows nothing)."""
        if self._accepting:
            free = max(0, self._settings.max_running - len(self._running))
            self._cluster.send(ExecutorUp(self.info, free))

    # -- the feed ---------------------------------------------------------------------------------

    def on_changes(self, changes: list[JobChange]) -> None:
        for change in changes:
            attempt = self._running.get(change.job_id)
            if attempt is not None:
                self._follow(attempt, change)
            elif (
                change.kind
                is ChangeKind.STATE  # a claim; never a late progress note of an attempt that ended
                and change.executor == self.info.id
                and change.state is JobState.RUNNING
                and (change.job_id, change.lease_epoch) not in self._ended
            ):
                self._start(change)

    def _follow(self, attempt: _LocalAttempt, change: JobChange) -> None:
        """A running attempt's job changed elsewhere: cancelled, or its lease gone."""
        if change.lease_epoch != attempt.job.lease_epoch or not change.state.is_active:
            if not attempt.lost and change.sequence > attempt.job.sequence:
                attempt.lost = True
                attempt.ctx.cancel("the attempt's lease was lost")
            return
        if change.job is not None and change.sequence > attempt.job.sequence:
            attempt.job = change.job.copy()  # the feed's snapshot is shared with every listener
        if change.state is JobState.CANCELLING and not attempt.cancelling:
            attempt.cancelling = True
            attempt.job.state = JobState.CANCELLING
            reason = change.job.cancel_reason if change.job is not None else ""
            attempt.ctx.cancel(reason or "cancelled")
            loop = asyncio.get_running_loop()
            attempt.force_timer = loop.call_later(self._settings.cancel_grace, attempt.force_stop)

    def _start(self, change: JobChange) -> None:
        if not self._accepting:
            return  # draining: the claim's lease expires and the job is retried elsewhere
        if change.job is not None:
            self._launch(change.job.copy())
        else:
            task = asyncio.create_task(self._fetch_and_launch(change.job_id, change.lease_epoch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fetch_and_launch(self, job_id: str, epoch: int) -> None:
        job = await self._store.get(job_id)
        if (
            job is not None
            and job.lease_epoch == epoch
            and job.state.is_active
            and job_id not in self._running
        ):
            self._launch(job)

    def _launch(self, job: Job) -> None:
        spec = self._handlers.get(job.type)
        if spec is None or job.id in self._running:
            return
        epoch = job.lease_epoch

        def on_progress(job_id: str, progress: Progress) -> None:
            self._store.record_progress(job_id, epoch, progress, self._clock.now())

        loop = asyncio.get_running_loop()
        ctx = LocalJobContext(job.id, job.type, job.attempt, epoch, job.progress, loop, on_progress)
        attempt = _LocalAttempt(job, spec, ctx)
        self._running[job.id] = attempt
        attempt.task = asyncio.create_task(self._run(attempt), name=f"jobwire-job-{job.id}")
        self._tasks.add(attempt.task)
        attempt.task.add_done_callback(self._tasks.discard)

    # -- running ----------------------------------------------------------------------------------

    async def _run(self, attempt: _LocalAttempt) -> None:
        job = attempt.job
        try:
            outcome = await self._execute(attempt)
        except Exception:
            log.exception("job %s: attempt failed inside Jobwire", job.id)
            outcome = Abandoned(JobError(ErrorCode.ABORTED, "the attempt failed inside Jobwire", "INTERNAL"))
        finally:
            if attempt.force_timer is not None:
                attempt.force_timer.cancel()
            self._running.pop(job.id, None)
            self._ended[(job.id, job.lease_epoch)] = None
            if len(self._ended) > _ENDED_MEMORY:
                self._ended.popitem(last=False)
            # The slot is free as soon as the handler returns: the next job need not wait for this
            # one's end to commit.
            if self._accepting:
                self._cluster.send(Credits(self.info.id, 1))
        if attempt.lost:
            return
        try:
            await end_attempt(self._store, attempt.job, outcome, self._clock.now(), self._ending)
        except Exception:
            log.exception("job %s: writing the end of attempt %d failed", job.id, job.attempt)

    async def _execute(self, attempt: _LocalAttempt) -> Outcome:
        """Run the handler in-process and say how the attempt ended."""
        job, spec, ctx = attempt.job, attempt.spec, attempt.ctx
        timeout = self._timeout_for(job.type, job.timeout, self._settings.default_timeout)
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
            return Failed(handler_error(error), retryable=False)
        if error is not None:
            return Failed(handler_error(error))
        return handler_result(handler_task.result())

    # -- stopping ---------------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Take no more work; give the running attempts ``grace`` seconds, then queue their jobs again."""
        if self._accepting:
            self._accepting = False
            self._cluster.send(ExecutorDown(self.info.id))
        attempts = list(self._running.values())
        tasks = [a.task for a in attempts if a.task is not None]
        log.info("draining: %d in-process jobs running, grace %.1fs", len(tasks), grace)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for attempt in attempts:
            if attempt.task in pending:
                attempt.abandon = True
                attempt.ctx.cancel("the server is shutting down")
                attempt.force_stop()
        if pending:
            await asyncio.wait(pending, timeout=5.0)

    async def close(self) -> None:
        for attempt in list(self._running.values()):
            if attempt.force_timer is not None:
                attempt.force_timer.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
