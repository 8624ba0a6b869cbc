"""Watch streams: every change of a job, from the change feed, to the watchers on this replica.

Every change (state transition or progress update) has the job's next ``sequence`` and reaches every
replica through the feed. ``EventHub.on_changes`` hands each one to the subscriptions of its job. A
change that comes without the job (another replica's change, on PostgreSQL) is read from the store by
the watcher's own task when it is its turn, so one slow read never holds up other watchers.

A progress change may come without the job (see ``changes``). For a watched job the hub keeps the
latest snapshot it knows (``_JobLog.latest``, seeded by the watcher's own read) and, when the change is
the very next one after it, makes the new snapshot by setting the progress on a copy: far cheaper than
building each job from its stored row. Otherwise the watcher reads it, as for another replica's change.

A subscriber's buffer is bounded without ever dropping a state transition: a progress event that
arrives while the previous undelivered event is also progress replaces it (latest wins). A job has at
most a handful of transitions, so a stalled reader holds at most a few events, and publishing never
waits on a reader.

Resuming with ``after_sequence`` needs the changes the watcher missed. A single process keeps, for each
job that has been watched here, its last ``retain_per_job`` events in memory (for ``retain_after_finish``
after the job ends): a job nobody watched costs nothing here. A shared store keeps the snapshots of
state transitions itself (``JobStore.read_changes``), so a watcher whose replica died resumes on any
other.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobwire.server.changes import ChangeKind, JobChange
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


# Reads the job as it was right after one change (None: it is no longer known as such).
SnapshotReader = Callable[[str, int], Awaitable[Job | None]]


def _event(change: JobChange, job: Job) -> JobEvent:
    return JobEvent(change.sequence, EventKind(int(change.kind)), job)


def _with_progress(latest: Job | None, change: JobChange) -> Job | None:
    """The job after a progress change that came without it, from the snapshot just before it; None
    when that snapshot is not the one right before (a change in between was not seen here)."""
    if change.progress is None or latest is None or latest.sequence != change.sequence - 1:
        return None
    return latest.after_progress(change.progress, change.update_time, change.sequence)


class Subscription:
    """One watcher's queue of undelivered changes."""

    __slots__ = ("_closed", "_pending", "_read", "_waiter", "job_id")

    def __init__(self, job_id: str, read: SnapshotReader) -> None:
        self.job_id = job_id
        self._pending: deque[JobEvent | JobChange] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._read = read

    def deliver(self, item: JobEvent | JobChange) -> None:
        pending = self._pending
        if pending and _is_progress(item) and _is_progress(pending[-1]):
            pending[-1] = item
        else:
            pending.append(item)
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
        while True:
            while not self._pending:
                if self._closed:
                    return None
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            item = self._pending.popleft()
            if isinstance(item, JobEvent):
                return item
            job = await self._read(item.job_id, item.sequence)
            if job is not None:
                return _event(item, job)
            # Not readable as of that change any more (progress overtaken by a newer change, which is
            # on its way): skip it.


def _is_progress(item: JobEvent | JobChange) -> bool:
    if isinstance(item, JobEvent):
        return item.kind is EventKind.PROGRESS_UPDATED
    return item.kind is ChangeKind.PROGRESS


class _JobLog:
    __slots__ = ("events", "finished_at", "latest", "subscribers")

    def __init__(self, retain: int) -> None:
        self.events: deque[JobEvent] = deque(maxlen=retain)
        self.subscribers: set[Subscription] = set()
        self.finished_at: float | None = None
        self.latest: Job | None = None  # the newest snapshot seen here (never changed in place)


class EventHub:
    """Routes each job's changes to its subscribers, and (in a single process) keeps recent ones."""

    def __init__(
        self,
        read: SnapshotReader,
        *,
        keep_history: bool = True,
        retain_per_job: int = 256,
        retain_after_finish: float = 300.0,
    ) -> None:
        self.read = read
        self.keep_history = keep_history
        self.retain_per_job = retain_per_job
        self.retain_after_finish = retain_after_finish
        self._logs: dict[str, _JobLog] = {}
        self._closed = False

    def _log(self, job_id: str) -> _JobLog:
        log = self._logs.get(job_id)
        if log is None:
            log = self._logs[job_id] = _JobLog(self.retain_per_job)
        return log

    def on_changes(self, changes: Sequence[JobChange], now: float) -> None:
        """Hand committed changes to the watchers (and keep them, when this process keeps history)."""
        for change in changes:
            log = self._logs.get(change.job_id)
            if log is None:
                continue  # never watched here: nobody to tell, and no resume point to keep
            job = change.job if change.job is not None else _with_progress(log.latest, change)
            if job is None:
                log.latest = None  # a change went by unseen: the next progress cannot be patched
                for subscription in log.subscribers:
                    subscription.deliver(change)  # read by the watcher's own task
                continue
            log.latest = job  # the feed's snapshot is never changed again
            event = _event(change, job)
            if self.keep_history:
                log.events.append(event)
                if change.state.is_terminal:
                    log.finished_at = now
            for subscription in log.subscribers:
                subscription.deliver(event)

    def subscribe(self, job_id: str) -> Subscription:
        subscription = Subscription(job_id, self._read_and_see)
        if self._closed:
            subscription.close()
        else:
            self._log(job_id).subscribers.add(subscription)
        return subscription

    async def _read_and_see(self, job_id: str, sequence: int) -> Job | None:
        """A watcher's read of a change that came without its job: the snapshot also serves the next
        progress changes (see ``seen``)."""
        job = await self.read(job_id, sequence)
        if job is not None:
            self.seen(job)
        return job

    def seen(self, job: Job) -> None:
        """A watcher read ``job`` from the store: the latest snapshot, unless a newer one went by."""
        log = self._logs.get(job.id)
        if log is not None and (log.latest is None or log.latest.sequence < job.sequence):
            log.latest = job.copy()

    def unsubscribe(self, subscription: Subscription) -> None:
        """The watcher left; its job's log stays (while kept), for the watcher to resume from."""
        log = self._logs.get(subscription.job_id)
        if log is not None:
            log.subscribers.discard(subscription)
            if not log.subscribers and (not log.events or not self.keep_history):
                del self._logs[subscription.job_id]

    def replay(self, job_id: str, after_sequence: int, up_to: int) -> list[JobEvent] | None:
        """Kept events with after_sequence < sequence <= up_to, or None if some were not kept.

        Merged progress updates leave gaps in sequences; what matters is that the oldest kept event
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

    def end_subscriptions(self) -> None:
        """End the current watch streams (changes may have been missed): their clients resume."""
        for log in self._logs.values():
            for subscription in log.subscribers:
                subscription.close()

    def close_all(self) -> None:
        """Close every subscription (the server is draining); new ones start closed."""
        self._closed = True
        for log in self._logs.values():
            for subscription in log.subscribers:
                subscription.close()
