"""The queued jobs' ordering, kept from the change feed on every replica.

Every replica needs it: for ``queue_position`` (a rank in the scheduler's sorted lists, O(Q log n)), for
``max_queued`` and the queue counts (per tenant too), and for wait reasons. On the dispatcher it is also
the run queue (``pop_entry``). It holds only what ordering needs (id, type, tenant, priority, sort key;
schedule time for delayed jobs), never the jobs: a queued job costs a few hundred bytes here, its params
stay in the store.

Jobs waiting for a ``schedule_time`` (a scheduled start or a retry back-off) wait in ``_delayed`` and
enter the run order when their time comes (``promote_due``, driven by the replica's timer loop).

Changes are applied idempotently by sequence (docs/architecture.md): a change older than what the view
already holds for that job is ignored.
"""

from __future__ import annotations

import heapq
import sys
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from jobwire.server.changes import JobChange
from jobwire.server.scheduler import Entry, Scheduler, Turn
from jobwire.server.state_machine import JobState
from jobwire.server.stores.base import QueuedJob


class Taken(NamedTuple):
    """A job taken out of the view for a claim: its entry, the sequence of its QUEUED change, and the
    fair-sharing turn it used (all that ``restore`` needs if the claim cannot be written)."""

    entry: Entry
    sequence: int
    turn: Turn


# How many departed jobs' last sequences are remembered, so that a late duplicate of a QUEUED change
# cannot bring back a job that has left the queue.
_GONE_MEMORY = 10_000


class QueueView:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._sequences: dict[str, int] = {}  # every job in the view (ready or delayed)
        self._delayed: dict[str, QueuedJob] = {}
        self._delayed_by_tenant: Counter[str] = Counter()
        self._due: list[tuple[float, str]] = []  # (schedule_time, job_id), stale entries skipped
        self._gone: OrderedDict[str, int] = OrderedDict()

    # --- filling it ------------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget everything (the feed broke: the view is rebuilt from the store)."""
        for job_id in list(self._sequences):
            self._remove(job_id)
        self._sequences.clear()
        self._delayed.clear()
        self._delayed_by_tenant.clear()
        self._due.clear()
        self._gone.clear()

    def load(self, jobs: Iterable[QueuedJob], now: float) -> None:
        """Add the store's queued jobs (oldest first, so FIFO ties keep submission order), skipping any
        the feed has already told about (the feed may run ahead of the snapshot)."""
        self.scheduler.push_many(self._ready_to_load(jobs, now))

    def _ready_to_load(
        self, jobs: Iterable[QueuedJob], now: float
    ) -> Iterator[tuple[str, str, int, float, str]]:
        """The jobs of ``load`` to put in the run order, one at a time (a list of a million would stay
        in the process's memory after it is freed); delayed ones and those already known are dealt
        with on the way."""
        for job in jobs:
            known = self._sequences.get(job.id, self._gone.get(job.id))
            if known is not None and job.sequence <= known:
                continue
            if known is not None:
                self._remove(job.id)
            if job.schedule_time is not None and job.schedule_time > now:
                self._add(job, now)
                continue
            self._sequences[job.id] = job.sequence
            self._gone.pop(job.id, None)
            yield job.id, sys.intern(job.type), job.priority, job.queue_time, sys.intern(job.tenant)

    def apply(self, change: JobChange, now: float) -> bool:
        """Follow one change; True when a job became ready to run (the dispatcher may have work)."""
        job_id = change.job_id
        known = self._sequences.get(job_id)
        if known is None:
            known = self._gone.get(job_id)
        elif change.sequence > known:
            self._remove(job_id)  # it leaves the queue, or is queued again with a new order
        if known is not None and change.sequence <= known:
            return False
        if change.state is JobState.QUEUED:
            info = QueuedJob(
                job_id,
                change.type,
                change.priority,
                change.queue_time,
                change.schedule_time,
                change.sequence,
                change.tenant,
            )
            return self._add(info, now)
        self._forget(job_id, change.sequence)
        return False

    def _add(self, job: QueuedJob, now: float) -> bool:
        self._sequences[job.id] = job.sequence
        self._gone.pop(job.id, None)
        # One string per tenant and per type, however many of their jobs are queued.
        tenant, job_type = sys.intern(job.tenant), sys.intern(job.type)
        if job.schedule_time is not None and job.schedule_time > now:
            self._delayed[job.id] = job
            self._delayed_by_tenant[tenant] += 1
            heapq.heappush(self._due, (job.schedule_time, job.id))
            return False
        self.scheduler.push(job.id, job_type, job.priority, job.queue_time, tenant)
        return True

    def _remove(self, job_id: str) -> None:
        delayed = self._delayed.pop(job_id, None)
        if delayed is None:
            self.scheduler.remove(job_id)
        else:
            self._undelay(delayed.tenant)

    def _undelay(self, tenant: str) -> None:
        self._delayed_by_tenant[tenant] -= 1
        if not self._delayed_by_tenant[tenant]:
            del self._delayed_by_tenant[tenant]

    def _forget(self, job_id: str, sequence: int) -> None:
        self._sequences.pop(job_id, None)
        self._gone[job_id] = sequence
        self._gone.move_to_end(job_id)
        if len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)

    # --- time ------------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When the next delayed job may enter the run order."""
        while self._due and self._delayed.get(self._due[0][1]) is None:
            heapq.heappop(self._due)  # it left the queue (or was re-queued) meanwhile
        return self._due[0][0] if self._due else None

    def promote_due(self, now: float) -> int:
        """Move every delayed job whose time has come into the run order; how many moved."""
        moved = 0
        while self._due and self._due[0][0] <= now:
            due, job_id = heapq.heappop(self._due)
            job = self._delayed.get(job_id)
            if job is None or job.schedule_time != due:
                continue
            del self._delayed[job_id]
            self._undelay(job.tenant)
            self.scheduler.push(job.id, job.type, job.priority, job.queue_time, sys.intern(job.tenant))
            moved += 1
        return moved

    # --- the dispatcher's side -------------------------------------------------------------------

    def take(self, types: Iterable[str], tenant: str | None, now: float) -> Taken | None:
        """The next job an executor of ``types`` and ``tenant`` (None: any) may start (counted as
        running), taken out of the view, with what ``restore`` needs to put it back."""
        taken = self.scheduler.take(types, tenant, now)
        if taken is None:
            return None
        entry, turn = taken
        sequence = self._sequences.get(entry[2], 0)
        self._forget(entry[2], sequence)
        return Taken(entry, sequence, turn)

    def restore(self, taken: Taken) -> None:
        """Undo ``take`` (its claim could not be written)."""
        entry = taken.entry
        self._gone.pop(entry[2], None)
        self._sequences[entry[2]] = taken.sequence
        self.scheduler.restore(entry, taken.turn)

    # --- reading it ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sequences)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._sequences

    @property
    def delayed(self) -> int:
        return len(self._delayed)

    def delayed_in(self, tenant: str) -> int:
        return self._delayed_by_tenant.get(tenant, 0)

    def is_delayed(self, job_id: str) -> bool:
        return job_id in self._delayed

    def position(self, job_id: str) -> int:
        """1-based place in the run order; 0 for a job not in it (delayed, or not queued)."""
        return self.scheduler.position(job_id)

    def queued_in(self, tenant: str) -> int:
        """The tenant's queued jobs, delayed ones included (its ``max_queued`` counts these)."""
        return self.scheduler.queued_in(tenant) + self._delayed_by_tenant.get(tenant, 0)

    def queued_by_tenant(self) -> dict[str, int]:
        counts = self.scheduler.queued_by_tenant()
        for tenant, n in self._delayed_by_tenant.items():
            counts[tenant] = counts.get(tenant, 0) + n
        return counts

    def queued_by_type(self, tenant: str | None = None) -> dict[str, int]:
        counts = self.scheduler.queued_by_type(tenant)
        for job in self._delayed.values():
            if tenant is None or job.tenant == tenant:
                counts[job.type] = counts.get(job.type, 0) + 1
        return counts

    def queued_by_priority(self, tenant: str | None = None) -> dict[int, int]:
        counts = self.scheduler.queued_by_priority(tenant)
        for job in self._delayed.values():
            if tenant is None or job.tenant == tenant:
                counts[job.priority] = counts.get(job.priority, 0) + 1
        return counts

    def sequence_of(self, job_id: str) -> int:
        return self._sequences.get(job_id, 0)
