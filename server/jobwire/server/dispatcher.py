"""The dispatcher: what runs next, and where, for the whole cluster. Active on one replica at a time.

It keeps the executors' free credits (announced by every replica), pops the next job each executor may
run from the queue view (the rule is ``scheduler.py``'s: priority, aging, FIFO, type limits), and claims
it for that executor in the store. Claims are batched: every job dispatchable right now is claimed in
one transaction. The claim reaches the executor's replica through the change feed.

Running counts per type (for the limits) follow the feed: a job counts from its claim until a change
shows it is no longer active. A new dispatcher counts the active attempts it finds in the store.

It publishes a ``ClusterStatus`` (executors, free credits, running counts, limits per type) when they
change, at most every STATUS_INTERVAL, so that every replica can tell why a job waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from jobwire.server.changes import JobChange
from jobwire.server.clock import Clock
from jobwire.server.cluster import (
    Cluster,
    ClusterStatus,
    Credits,
    ExecutorDown,
    ExecutorInfo,
    ExecutorUp,
    Message,
    StatusUpdate,
    TypeStatus,
)
from jobwire.server.executor import LOCAL_WORKER_ID
from jobwire.server.job import Job
from jobwire.server.job_types import TypeRegistry
from jobwire.server.queue_view import QueueView, Taken
from jobwire.server.scheduler import Entry
from jobwire.server.stores.base import Claim, JobStore

log = logging.getLogger("jobwire.dispatcher")

STATUS_INTERVAL = 0.2  # seconds between two status messages at most
MAX_CLAIMS = 256  # claims written in one transaction at most


class _Executor:
    __slots__ = ("credits", "info", "local")

    def __init__(self, info: ExecutorInfo, credits: int) -> None:
        self.info = info
        self.credits = credits
        self.local = info.worker_id == LOCAL_WORKER_ID


@dataclass(slots=True)
class _Claiming:
    taken: Taken
    executor: _Executor

    @property
    def entry(self) -> Entry:
        return self.taken.entry


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        cluster: Cluster,
        queue: QueueView,
        types: TypeRegistry,
        clock: Clock,
        lease_duration: float,
        on_claimed: Callable[[Job], None],
    ) -> None:
        self._store = store
        self._cluster = cluster
        self._queue = queue
        self._types = types
        self._clock = clock
        self._lease_duration = lease_duration
        self._on_claimed = on_claimed  # the lease keeper arms the new attempt's timers
        self.epoch: int | None = None  # set while this replica is the dispatcher
        self._executors: dict[str, _Executor] = {}
        self._active: dict[str, tuple[str, str]] = {}  # job id -> (type, tenant), of attempts running
        self._claiming: dict[str, _Claiming] = {}  # popped, claim not written yet
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._claims: set[asyncio.Task[None]] = set()  # batches being written
        self._backoff = 0.025  # seconds to wait after a failed claim, doubling up to 2 s
        self._backoff_until = 0.0
        self._status_due = False
        self._status_dirty = True
        self._status_task: asyncio.Task[None] | None = None
        self.status = ClusterStatus()

    @property
    def active(self) -> bool:
        return self.epoch is not None

    # -- becoming and ceasing to be the dispatcher ---------------------------------------------------

    def start(self, epoch: int, active_jobs: list[Job]) -> None:
        """Dispatch from now on, counting the attempts the store holds as running."""
        self.epoch = epoch
        self._active = {job.id: (job.type, job.tenant) for job in active_jobs}
        self._executors.clear()
        self._queue.scheduler.set_running(Counter((tenant, t) for t, tenant in self._active.values()))
        self._apply_limits()
        self._task = asyncio.create_task(self._dispatch_forever(), name="jobwire-dispatcher")
        self.wake()

    async def stop(self) -> None:
        """Stop dispatching (this replica is no longer the dispatcher, or it is shutting down)."""
        self.epoch = None
        for task in (self._task, self._status_task, *self._claims):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._status_task = None
        for claiming in self._claiming.values():
            self._queue.restore(claiming.taken)
        self._claiming.clear()
        self._executors.clear()
        self._active.clear()
        self._queue.scheduler.set_running({})

    def _apply_limits(self) -> None:
        scheduler = self._queue.scheduler
        scheduler.type_limits = self._types.limits()

    def types_changed(self) -> None:
        self._apply_limits()
        self._status_changed()
        self.wake()

    # -- what the replicas say ----------------------------------------------------------------------

    def on_message(self, message: Message) -> None:
        if not self.active:
            return
        if isinstance(message, ExecutorUp):
            self._executors[message.executor.id] = _Executor(message.executor, message.credits)
        elif isinstance(message, Credits):
            executor = self._executors.get(message.executor_id)
            if executor is None:
                return
            executor.credits += message.delta
        elif isinstance(message, ExecutorDown):
            self._executors.pop(message.executor_id, None)
        else:
            return
        self._status_changed()
        self.wake()

    def forget_replicas(self, dead: set[str]) -> None:
        """Executors of replicas that are gone take no more work."""
        for executor_id in [e for e, x in self._executors.items() if x.info.replica in dead]:
            del self._executors[executor_id]
        self._status_changed()

    def on_changes(self, changes: list[JobChange]) -> None:
        """Follow the running counts; a job that stopped running frees room for another."""
        if not self.active:
            return
        freed = False
        scheduler = self._queue.scheduler
        for change in changes:
            counted = change.job_id in self._active
            if change.state.is_active:
                if not counted and change.job_id not in self._claiming:
                    # claimed by an earlier dispatcher
                    self._active[change.job_id] = (change.type, change.tenant)
                    scheduler.mark_running(change.type, change.tenant)
                    self._status_dirty = True
            elif counted:
                job_type, tenant = self._active.pop(change.job_id)
                with contextlib.suppress(ValueError):
                    scheduler.release(job_type, tenant)
                freed = True
        if freed:
            self._status_changed()
            self.wake()

    def wake(self) -> None:
        self._wake.set()

    # -- dispatching ----------------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        """Pick and claim whenever something may have changed. A batch's claim is written in a task of
        its own, so that the next batch need not wait for the previous one's commit: claims made while
        the store is busy join its next group commit together."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._backoff_until > asyncio.get_running_loop().time():
                await asyncio.sleep(self._backoff_until - asyncio.get_running_loop().time())
            while self.epoch is not None and (picked := self._pick()):
                task = asyncio.create_task(self._claim_batch(self.epoch, picked))
                self._claims.add(task)
                task.add_done_callback(self._claims.discard)
                await asyncio.sleep(0)  # let the batch reach the store before picking the next one

    def _pick(self) -> list[_Claiming]:
        """Pop what may start now: one job per executor with credits per round, so work spreads out."""
        picked: list[_Claiming] = []
        offered = True
        now = self._clock.now()
        while offered and len(picked) < MAX_CLAIMS:
            offered = False
            for executor in list(self._executors.values()):
                if executor.credits <= 0 or len(picked) >= MAX_CLAIMS:
                    continue
                info = executor.info
                taken = self._queue.take(info.types, info.tenant, now)
                if taken is None:
                    continue
                executor.credits -= 1
                claiming = _Claiming(taken, executor)
                self._claiming[taken.entry[2]] = claiming
                picked.append(claiming)
                offered = True
        if picked:
            self._status_dirty = True
        return picked

    async def _claim_batch(self, epoch: int, picked: list[_Claiming]) -> None:
        """Write the claims of one batch, and count what was claimed."""
        now = self._clock.now()
        until = now + self._lease_duration
        claims = [
            Claim(
                c.entry[2],
                c.executor.info.worker_id,
                c.executor.info.id,
                None if c.executor.local else until,
                c.executor.info.principal,
                c.executor.info.peer,
            )
            for c in picked
        ]
        try:
            claimed = await self._store.claim(claims, now, epoch)
        except BaseException as error:
            for claiming in picked:
                self._unclaim(claiming, restore=True)
            if not isinstance(error, Exception):
                raise
            self._backoff = min(self._backoff * 2, 2.0)
            self._backoff_until = asyncio.get_running_loop().time() + self._backoff
            log.exception("claiming %d jobs failed; dispatching again in %.2f s", len(picked), self._backoff)
            self.wake()
            return
        self._backoff = 0.025
        scheduler = self._queue.scheduler
        for claiming, job in zip(picked, claimed, strict=True):
            job_id = claiming.entry[2]
            self._claiming.pop(job_id, None)
            if job is None:  # no longer queued (cancelled meanwhile): nothing to run
                self._unclaim(claiming, restore=False)
                continue
            if job_id in self._active:
                continue  # the feed already counted it
            self._active[job_id] = (job.type, job.tenant)
            if job.state.is_active:
                self._on_claimed(job)
            else:  # it already ended (its end reached the feed before the claim returned)
                del self._active[job_id]
                with contextlib.suppress(ValueError):
                    scheduler.release(job.type, job.tenant)
        self._status_changed()

    def _unclaim(self, claiming: _Claiming, restore: bool) -> None:
        job_id = claiming.entry[2]
        self._claiming.pop(job_id, None)
        claiming.executor.credits += 1
        if restore:
            self._queue.restore(claiming.taken)
        else:
            with contextlib.suppress(ValueError):
                self._queue.scheduler.release(claiming.entry[3], claiming.entry[5])

    # -- status ---------------------------------------------------------------------------------------

    def current_status(self) -> ClusterStatus:
        """The status as it is now (recomputed only after something changed)."""
        if self._status_dirty:
            self._status_dirty = False
            self.status = self.compute_status()
        return self.status

    def _status_changed(self) -> None:
        self._status_dirty = True
        if self._status_due or not self.active:
            return
        self._status_due = True
        if self._status_task is None or self._status_task.done():
            self._status_task = asyncio.create_task(self._publish_status(), name="jobwire-status")

    async def _publish_status(self) -> None:
        await asyncio.sleep(STATUS_INTERVAL)
        self._status_due = False
        self._cluster.send(StatusUpdate(self.current_status()))

    def compute_status(self) -> ClusterStatus:
        scheduler = self._queue.scheduler
        running = scheduler.running_by_type()
        limits = scheduler.type_limits
        per_type: dict[str, list[int]] = {}
        for executor in self._executors.values():
            for job_type in executor.info.types:
                counts = per_type.setdefault(job_type, [0, 0])
                counts[0] += 1
                counts[1] += max(0, executor.credits)
        names = set(per_type) | set(running) | set(limits)
        return ClusterStatus(
            types={
                name: TypeStatus(
                    executors=per_type.get(name, [0, 0])[0],
                    free=per_type.get(name, [0, 0])[1],
                    running=running.get(name, 0),
                    limit=limits.get(name),
                )
                for name in names
            },
            executors=len(self._executors),
            workers=sum(1 for e in self._executors.values() if not e.local),
            running=scheduler.running,
            tenants=scheduler.running_by_tenant(),
        )
