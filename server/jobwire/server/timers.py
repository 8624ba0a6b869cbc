"""Everything the dispatcher must do to attempts at a given time, in one heap: expire leases, time out
remote attempts, force a cancellation the worker did not carry out.

Entries are never removed: when one comes due, its owner checks that it still applies (the lease still
has the same epoch and was not renewed, ...) and ignores or re-arms it.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from dataclasses import dataclass, field


class TimerKind(enum.Enum):
    LEASE_EXPIRY = "lease_expiry"  # an attempt's lease may have run out
    ATTEMPT_TIMEOUT = "attempt_timeout"  # a remote attempt may have run past its time-out
    CANCEL_FORCE = "cancel_force"  # a cancelled remote attempt may have outlived the cancel grace


@dataclass(order=True, frozen=True, slots=True)
class Timer:
    due: float
    order: int
    kind: TimerKind = field(compare=False)
    job_id: str = field(compare=False)
    epoch: int = field(compare=False, default=0)


class Timers:
    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._order = itertools.count()

    def add(self, due: float, kind: TimerKind, job_id: str, epoch: int = 0) -> None:
        heapq.heappush(self._heap, Timer(due, next(self._order), kind, job_id, epoch))

    def next_due(self) -> float | None:
        return self._heap[0].due if self._heap else None

    def pop_due(self, now: float) -> list[Timer]:
        due: list[Timer] = []
        while self._heap and self._heap[0].due <= now:
            due.append(heapq.heappop(self._heap))
        return due

    def __len__(self) -> int:
        return len(self._heap)
