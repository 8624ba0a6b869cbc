"""The priority-heap scheduler: which queued job runs next, within the concurrency limits.

Order. Higher priority first, FIFO within a priority, with aging so low priorities never starve: a job of
priority ``p`` that entered the queue at time ``t`` has the sort key ``t - p * aging_interval``, and the
smallest key runs first. Waiting one ``aging_interval`` is worth one priority level, and since the key
never changes after a push, the queue needs no re-sorting as jobs age. With ``aging_interval == 0`` the
order is strict priority (key ``-p``), FIFO within a priority. Ties break by push order.

Limits. A global limit on running jobs and an optional limit per job type. Each type has its own queue;
``pop_ready`` compares the heads of the types that have room (O(T) for T types with queued jobs, plus
O(log n) for the pop), so a type at its limit never blocks the others.

Data structure. Each type's queue is a sorted list (``sortedcontainers.SortedList``, a B-tree-like list
of sorted sublists) rather than a binary heap: it pops the smallest key in O(log n) like a heap, and also
removes any job and tells any job's rank in O(log n). So a cancelled job leaves at once, and a queued
job's position in the run order costs O(T log n) (its rank in every type's queue, summed), never a pass
over the queue: GetJob on a queued job stays as cheap with 100,000 queued as with 10.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable

from sortedcontainers import SortedList

# One queued job: (sort key, push order, job id, job type, priority). Tuples compare in C, and since the
# push order is unique, comparisons never reach the id, type or priority.
Entry = tuple[float, int, str, str, int]


class Scheduler:
    """Queued jobs in run order, and the counts of running ones. Single-threaded (the event loop's)."""

    def __init__(
        self,
        *,
        max_running: int | None = None,
        type_limits: dict[str, int] | None = None,
        aging_interval: float = 60.0,
    ) -> None:
        if max_running is not None and max_running < 1:
            raise ValueError("max_running must be at least 1")
        if aging_interval < 0:
            raise ValueError("aging_interval must be >= 0")
        self.max_running = max_running
        self.type_limits = dict(type_limits or {})
        self.aging_interval = aging_interval
        self._queues: dict[str, SortedList] = {}
        self._entries: dict[str, Entry] = {}
        self._order = itertools.count()
        self._running_by_type: Counter[str] = Counter()
        self._queued_by_priority: Counter[int] = Counter()
        self.running = 0

    # -- queue ---------------------------------------------------------------------------------------

    def sort_key(self, priority: int, queue_time: float) -> float:
        """The aging rule in one line (see the module docstring)."""
        if self.aging_interval == 0:
            return -float(priority)
        return queue_time - priority * self.aging_interval

    def push(self, job_id: str, job_type: str, priority: int, queue_time: float) -> None:
        """Queue a job. Pushing a job that is already queued is a bug."""
        if job_id in self._entries:
            raise ValueError(f"job {job_id} is already queued")
        entry = (self.sort_key(priority, queue_time), next(self._order), job_id, job_type, priority)
        self._entries[job_id] = entry
        queue = self._queues.get(job_type)
        if queue is None:
            queue = self._queues[job_type] = SortedList()
        queue.add(entry)
        self._queued_by_priority[priority] += 1

    def remove(self, job_id: str) -> bool:
        """Take a queued job out of the run order; False if it was not queued."""
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return False
        queue = self._queues[entry[3]]
        queue.remove(entry)
        if not queue:
            del self._queues[entry[3]]
        self._forget_priority(entry[4])
        return True

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _forget_priority(self, priority: int) -> None:
        self._queued_by_priority[priority] -= 1
        if not self._queued_by_priority[priority]:
            del self._queued_by_priority[priority]

    # -- running -------------------------------------------------------------------------------------

    def has_room(self, job_type: str) -> bool:
        limit = self.type_limits.get(job_type)
        return (self.max_running is None or self.running < self.max_running) and (
            limit is None or self._running_by_type[job_type] < limit
        )

    def set_type_limit(self, job_type: str, limit: int | None) -> None:
        if limit is None:
            self.type_limits.pop(job_type, None)
        else:
            self.type_limits[job_type] = limit

    def pop_ready(self, types: Iterable[str] | None = None) -> tuple[str, str] | None:
        """Take the next job that may start now and count it as running: (job_id, job_type), or None.

        With ``types``, only jobs of those types are considered (what one executor can run).
        """
        entry = self.pop_entry(types)
        return None if entry is None else (entry[2], entry[3])

    def restore(self, entry: Entry) -> None:
        """Undo ``pop_entry``: the job goes back exactly where it was, and no longer counts as running."""
        self._entries[entry[2]] = entry
        queue = self._queues.get(entry[3])
        if queue is None:
            queue = self._queues[entry[3]] = SortedList()
        queue.add(entry)
        self._queued_by_priority[entry[4]] += 1
        self.release(entry[3])

    def pop_entry(self, types: Iterable[str] | None = None) -> Entry | None:
        """``pop_ready``, returning the whole entry (for ``restore``)."""
        if self.max_running is not None and self.running >= self.max_running:
            return None
        best: Entry | None = None
        candidates = self._queues if types is None else [t for t in types if t in self._queues]
        for job_type in candidates:
            if not self.has_room(job_type):
                continue
            head: Entry = self._queues[job_type][0]
            if best is None or head < best:
                best = head
        if best is None:
            return None
        job_id, job_type = best[2], best[3]
        queue = self._queues[job_type]
        queue.pop(0)
        if not queue:
            del self._queues[job_type]
        del self._entries[job_id]
        self._forget_priority(best[4])
        self.mark_running(job_type)
        return best

    def mark_running(self, job_type: str) -> None:
        """Count a job as running without popping it (a job recovered or started elsewhere)."""
        self.running += 1
        self._running_by_type[job_type] += 1

    def set_running(self, by_type: dict[str, int]) -> None:
        """Replace the running counts (a new dispatcher counts the attempts it finds in the store)."""
        self._running_by_type = Counter({t: n for t, n in by_type.items() if n > 0})
        self.running = sum(self._running_by_type.values())

    def release(self, job_type: str) -> None:
        """A running job stopped: its slot is free."""
        if self._running_by_type[job_type] <= 0 or self.running <= 0:
            raise ValueError(f"release of {job_type!r} with nothing running")
        self.running -= 1
        self._running_by_type[job_type] -= 1
        if not self._running_by_type[job_type]:
            del self._running_by_type[job_type]

    # -- introspection -------------------------------------------------------------------------------

    def position(self, job_id: str) -> int:
        """The job's 1-based run-order position (0 if it is not queued): O(T log n) for T types."""
        entry = self._entries.get(job_id)
        if entry is None:
            return 0
        ahead: int = sum(queue.bisect_left(entry) for queue in self._queues.values())
        return 1 + ahead

    def positions(self, job_ids: Iterable[str]) -> dict[str, int]:
        """1-based run-order positions of the given queued jobs (others are left out)."""
        return {job_id: self.position(job_id) for job_id in job_ids if job_id in self._entries}

    def running_by_type(self) -> dict[str, int]:
        return dict(self._running_by_type)

    def queued_by_type(self) -> dict[str, int]:
        return {job_type: len(queue) for job_type, queue in self._queues.items()}

    def queued_by_priority(self) -> dict[int, int]:
        return dict(self._queued_by_priority)
