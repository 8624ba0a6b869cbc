"""Per-job change events for WatchJob: a retained log for resuming, and bounded subscriptions.

Every change to a job (state transition or progress update) gets the job's next ``sequence`` and is
published here. Each job keeps its last ``retain_per_job`` events so a client that reconnects with
``after_sequence`` can be replayed what it missed.

A subscriber's buffer is bounded without ever dropping a state transition: a progress event that
arrives while the previous undelivered event is also progress replaces it (latest wins). A job has at
most a handful of transitions, so a stalled reader holds at most a few events, and publishing never
waits on a reader.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from jobwire.server.job import Job


class EventKind(enum.IntEnum):
    """Values equal the proto's ``WatchEventType``."""

    SNAPSHOT = 1
    STATE_CHANGED = 2
    PROGRESS_UPDATED = 3


@dataclass(slots=True)
class JobEvent:
    """One change: the job as it was right after it, with its sequence."""

    sequence: int
    kind: EventKind
    job: Job
    # Filled once per view by the transport layer (the encoded message), shared by every watcher.
    encoded_full: Any = field(default=None, compare=False)
    encoded_basic: Any = field(default=None, compare=False)


class Subscription:
    """One watcher's queue of undelivered events."""

    __slots__ = ("_closed", "_pending", "_waiter", "job_id")

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._pending: deque[JobEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def deliver(self, event: JobEvent) -> None:
        pending = self._pending
        if (
            pending
            and event.kind is EventKind.PROGRESS_UPDATED
            and pending[-1].kind is EventKind.PROGRESS_UPDATED
        ):
            pending[-1] = event
        else:
            pending.append(event)
        self._wake()

    def close(self) -> None:
        """End the subscription: ``next`` returns None once the pending events are read."""
        self._closed = True
        self._wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> JobEvent | None:
        """The next event, waiting for it; None when the subscription was closed."""
        while not self._pending:
            if self._closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._pending.popleft()


class _JobLog:
    __slots__ = ("events", "finished_at", "subscribers")

    def __init__(self, retain: int) -> None:
        self.events: deque[JobEvent] = deque(maxlen=retain)
        self.subscribers: set[Subscription] = set()
        self.finished_at: float | None = None


class EventHub:
    """Routes each job's events to its subscribers and keeps the recent ones for replay."""

    def __init__(self, *, retain_per_job: int = 256, retain_after_finish: float = 300.0) -> None:
        self.retain_per_job = retain_per_job
        self.retain_after_finish = retain_after_finish
        self._logs: dict[str, _JobLog] = {}
        self._closed = False

    def _log(self, job_id: str) -> _JobLog:
        log = self._logs.get(job_id)
        if log is None:
            log = self._logs[job_id] = _JobLog(self.retain_per_job)
        return log

    def publish(self, job: Job, kind: EventKind, now: float) -> JobEvent:
        """Record a change of ``job`` (already carrying its new sequence) and hand it to every watcher."""
        return self.publish_snapshot(job.copy(), kind, now)

    def publish_snapshot(self, job: Job, kind: EventKind, now: float) -> JobEvent:
        """Like ``publish``, for a snapshot that nobody will change again (saves a copy)."""
        event = JobEvent(job.sequence, kind, job)
        log = self._log(job.id)
        log.events.append(event)
        if job.state.is_terminal:
            log.finished_at = now
        for subscription in log.subscribers:
            subscription.deliver(event)
        return event

    def subscribe(self, job_id: str) -> Subscription:
        subscription = Subscription(job_id)
        if self._closed:
            subscription.close()
        else:
            self._log(job_id).subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        log = self._logs.get(subscription.job_id)
        if log is not None:
            log.subscribers.discard(subscription)
            if not log.subscribers and not log.events:
                del self._logs[subscription.job_id]

    def replay(self, job_id: str, after_sequence: int, up_to: int) -> list[JobEvent] | None:
        """Retained events with after_sequence < sequence <= up_to, or None if some were not retained.

        Merged progress updates leave gaps in sequences; what matters is that the oldest retained event
        is not newer than the first one the client lacks.
        """
        log = self._logs.get(job_id)
        if log is None or not log.events or log.events[0].sequence > after_sequence + 1:
            return None
        return [e for e in log.events if after_sequence < e.sequence <= up_to]

    def sweep(self, now: float) -> int:
        """Drop the logs of jobs finished longer than ``retain_after_finish`` ago that nobody watches."""
        expired = [
            job_id
            for job_id, log in self._logs.items()
            if log.finished_at is not None
            and now - log.finished_at >= self.retain_after_finish
            and not log.subscribers
        ]
        for job_id in expired:
            del self._logs[job_id]
        return len(expired)

    def close_all(self) -> None:
        """Close every subscription (the server is draining); new ones start closed."""
        self._closed = True
        for log in self._logs.values():
            for subscription in log.subscribers:
                subscription.close()
