"""What happens to remote attempts because time passes, decided by the dispatcher for the whole cluster.

A remote attempt whose lease was not renewed in time fails (``LEASE_EXPIRED``: retried or failed by its
retry policy); one that ran past its time-out fails with DEADLINE_EXCEEDED; a cancelled one whose worker
did not stop within ``--cancel-grace`` ends CANCELLED. In-process attempts have no lease to expire: their
own replica times them out and stops them, and when the replica itself is gone the dispatcher requeues
them (``maintenance.py``).

Timers are armed from what the dispatcher knows (the claim, the change feed); when one comes due the
end is written with a compare-and-set (``end_attempt``), so a lease renewed meanwhile, or an attempt that
ended meanwhile, is left alone and the timer re-armed or dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from jobwire.server.attempts import Ending, Failed, end_attempt
from jobwire.server.changes import JobChange
from jobwire.server.clock import Clock
from jobwire.server.executor import LOCAL_WORKER_ID
from jobwire.server.job import ErrorCode, Job, JobError
from jobwire.server.state_machine import JobState
from jobwire.server.stores.base import JobStore
from jobwire.server.timers import TimerKind, Timers

log = logging.getLogger("jobwire.leases")


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    cancel_grace: float
    default_timeout: float | None


class LeaseKeeper:
    def __init__(
        self,
        store: JobStore,
        clock: Clock,
        ending: Ending,
        settings: LeaseSettings,
        timeout_for: Callable[[str, float | None, float | None], float | None],
        wake: Callable[[], None],
    ) -> None:
        self._store = store
        self._clock = clock
        self._ending = ending
        self._settings = settings
        self._timeout_for = timeout_for
        self._wake = wake  # the timer loop looks at next_due() again
        self._timers = Timers()
        self._attempts: dict[str, Job] = {}  # active attempts, as last known (no payload needed)
        self.active = False

    def start(self, active_jobs: list[Job]) -> None:
        self.active = True
        for job in active_jobs:
            self.on_claimed(job)
            if job.state is JobState.CANCELLING and job.worker_id != LOCAL_WORKER_ID:
                self._timers.add(
                    self._clock.now() + self._settings.cancel_grace,
                    TimerKind.CANCEL_FORCE,
                    job.id,
                    job.lease_epoch,
                )

    def stop(self) -> None:
        self.active = False
        self._timers = Timers()
        self._attempts.clear()

    def on_claimed(self, job: Job) -> None:
        """A new remote attempt: its lease expiry and its time-out."""
        if not self.active or job.worker_id == LOCAL_WORKER_ID:
            return
        self._attempts[job.id] = job
        if job.lease_expire_time is not None:
            self._timers.add(job.lease_expire_time, TimerKind.LEASE_EXPIRY, job.id, job.lease_epoch)
        timeout = self._timeout_for(job.type, job.timeout, self._settings.default_timeout)
        if timeout is not None and job.start_time is not None:
            self._timers.add(job.start_time + timeout, TimerKind.ATTEMPT_TIMEOUT, job.id, job.lease_epoch)
        self._wake()

    def on_changes(self, changes: list[JobChange]) -> None:
        if not self.active:
            return
        for change in changes:
            known = self._attempts.get(change.job_id)
            if known is None:
                continue
            if not change.state.is_active or change.lease_epoch != known.lease_epoch:
                del self._attempts[change.job_id]
                continue
            if change.job is not None:
                self._attempts[change.job_id] = change.job
            if change.state is JobState.CANCELLING and known.state is not JobState.CANCELLING:
                if change.job is None:
                    known.state = JobState.CANCELLING
                if known.worker_id != LOCAL_WORKER_ID:
                    due = self._clock.now() + self._settings.cancel_grace
                    self._timers.add(due, TimerKind.CANCEL_FORCE, change.job_id, change.lease_epoch)
                    self._wake()

    def next_due(self) -> float | None:
        return self._timers.next_due() if self.active else None

    async def tick(self) -> None:
        """End every attempt whose time has come by the clock's now."""
        if not self.active:
            return
        now = self._clock.now()
        for timer in self._timers.pop_due(now):
            job = self._attempts.get(timer.job_id)
            if job is None or job.lease_epoch != timer.epoch:
                continue
            try:
                if timer.kind is TimerKind.LEASE_EXPIRY:
                    await self._expire(job, now)
                elif timer.kind is TimerKind.ATTEMPT_TIMEOUT:
                    error = JobError(
                        ErrorCode.DEADLINE_EXCEEDED,
                        "the attempt ran longer than its time-out",
                        "ATTEMPT_TIMEOUT",
                    )
                    await end_attempt(self._store, job, Failed(error), now, self._ending)
                elif timer.kind is TimerKind.CANCEL_FORCE:
                    error = JobError(ErrorCode.CANCELLED, "the worker did not stop in time", "CANCEL_FORCED")
                    await end_attempt(self._store, job, Failed(error, retryable=False), now, self._ending)
            except Exception:
                log.exception("job %s: acting on its %s timer failed", job.id, timer.kind.value)

    async def _expire(self, job: Job, now: float) -> None:
        error = JobError(ErrorCode.ABORTED, "the worker's lease expired", "LEASE_EXPIRED")
        ended = await end_attempt(self._store, job, Failed(error), now, self._ending, lease_expired_by=now)
        if ended is not None:
            log.warning("job %s attempt %d: lease expired", job.id, job.attempt)
            return
        current = await self._store.get(job.id)
        if current is not None and current.state.is_active and current.lease_epoch == job.lease_epoch:
            # Renewed since: look again when the new lease would run out.
            self._attempts[job.id] = current
            if current.lease_expire_time is not None:
                self._timers.add(current.lease_expire_time, TimerKind.LEASE_EXPIRY, job.id, job.lease_epoch)
