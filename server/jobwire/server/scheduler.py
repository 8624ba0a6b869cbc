"""The priority-heap scheduler: which queued job runs next, within the concurrency limits.

Order. Higher priority first, FIFO within a priority, with aging so low priorities never starve: a job of
priority ``p`` that entered the queue at time ``t`` has the sort key ``t - p * aging_interval``, and the
smallest key runs first. Waiting one ``aging_interval`` is worth one priority level, and since the key
never changes after a push, the heap needs no re-sorting as jobs age. With ``aging_interval == 0`` the
order is strict priority (key ``-p``), FIFO within a priority. Ties break by push order.

Limits. A global limit on running jobs and an optional limit per job type. Each type has its own heap;
``pop_ready`` compares the heads of the types that have room (O(T) for T types with queued jobs, plus
O(log n) for the pop), so a type at its limit never blocks the others.

Removal (a queued job cancelled) is lazy: the entry is marked dead and skipped when it reaches the top.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(order=True, slots=True)
class _Entry:
    key: float
    order: int
    job_id: str = field(compare=False)
    job_type: str = field(compare=False)
    priority: int = field(compare=False)
    alive: bool = field(default=True, compare=False)


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
        self._heaps: dict[str, list[_Entry]] = {}
        self._entries: dict[str, _Entry] = {}
        self._order = itertools.count()
        self._running_by_type: Counter[str] = Counter()
        self._queued_by_type: Counter[str] = Counter()
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
        entry = _Entry(self.sort_key(priority, queue_time), next(self._order), job_id, job_type, priority)
        self._entries[job_id] = entry
        heapq.heappush(self._heaps.setdefault(job_type, []), entry)
        self._queued_by_type[job_type] += 1
        self._queued_by_priority[priority] += 1

    def remove(self, job_id: str) -> bool:
        """Take a queued job out of the run order; False if it was not queued."""
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return False
        entry.alive = False
        self._forget_queued(entry)
        return True

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _forget_queued(self, entry: _Entry) -> None:
        self._queued_by_type[entry.job_type] -= 1
        if not self._queued_by_type[entry.job_type]:
            del self._queued_by_type[entry.job_type]
        self._queued_by_priority[entry.priority] -= 1
        if not self._queued_by_priority[entry.priority]:
            del self._queued_by_priority[entry.priority]

    def _head(self, job_type: str) -> _Entry | None:
        heap = self._heaps.get(job_type)
        while heap and not heap[0].alive:
            heapq.heappop(heap)
        if not heap:
            self._heaps.pop(job_type, None)
            return None
        return heap[0]

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
        if self.max_running is not None and self.running >= self.max_running:
            return None
        best: _Entry | None = None
        candidates = list(self._heaps) if types is None else [t for t in types if t in self._heaps]
        for job_type in candidates:
            if not self.has_room(job_type):
                continue
            head = self._head(job_type)
            if head is not None and (best is None or head < best):
                best = head
        if best is None:
            return None
        heapq.heappop(self._heaps[best.job_type])
        del self._entries[best.job_id]
        self._forget_queued(best)
        self.mark_running(best.job_type)
        return best.job_id, best.job_type

    def mark_running(self, job_type: str) -> None:
        """Count a job as running without popping it (a job recovered or started elsewhere)."""
        self.running += 1
        self._running_by_type[job_type] += 1

    def release(self, job_type: str) -> None:
        """A running job stopped: its slot is free."""
        if self._running_by_type[job_type] <= 0 or self.running <= 0:
            raise ValueError(f"release of {job_type!r} with nothing running")
        self.running -= 1
        self._running_by_type[job_type] -= 1
        if not self._running_by_type[job_type]:
            del self._running_by_type[job_type]

    # -- introspection -------------------------------------------------------------------------------

    def positions(self, job_ids: Iterable[str]) -> dict[str, int]:
        """1-based run-order positions of the given queued jobs (others are left out).

        One pass over the queue: O(n log k) for k asked-for jobs, fine for a page of a listing.
        """
        wanted = sorted(self._entries[j] for j in set(job_ids) if j in self._entries)
        if not wanted:
            return {}
        ahead = [0] * len(wanted)
        for entry in self._entries.values():
            index = bisect.bisect_left(wanted, entry)
            if index < len(wanted):
                ahead[index] += 1
        positions: dict[str, int] = {}
        running_total = 0
        for i, entry in enumerate(wanted):
            running_total += ahead[i]
            positions[entry.job_id] = running_total
        return positions

    def running_by_type(self) -> dict[str, int]:
        return dict(self._running_by_type)

    def queued_by_type(self) -> dict[str, int]:
        return dict(self._queued_by_type)

    def queued_by_priority(self) -> dict[int, int]:
        return dict(self._queued_by_priority)
