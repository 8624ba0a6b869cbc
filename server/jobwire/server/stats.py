"""Queue wait, run time and success rate over a sliding window, in O(1) per recorded event."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from jobwire.server.changes import ChangeKind, JobChange
from jobwire.server.state_machine import JobState


@dataclass(frozen=True, slots=True)
class WindowFigures:
    """Figures over the last ``window`` seconds."""

    window: float
    finished: int
    succeeded: int
    mean_queue_wait: float
    mean_run_time: float

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.finished if self.finished else 0.0


class _Series:
    """Timestamped values with a running sum, trimmed to the window on every read and write."""

    __slots__ = ("items", "total")

    def __init__(self) -> None:
        self.items: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def add(self, at: float, value: float) -> None:
        self.items.append((at, value))
        self.total += value

    def trim(self, oldest: float) -> None:
        items = self.items
        while items and items[0][0] < oldest:
            self.total -= items.popleft()[1]
        if not items:
            self.total = 0.0  # no float drift accumulates across idle periods

    def mean(self) -> float:
        return self.total / len(self.items) if self.items else 0.0


class StatsWindow:
    """What the last few minutes looked like, for GetQueueStats. Times come from the monotonic clock."""

    def __init__(self, window: float = 300.0) -> None:
        self.window = window
        self._waits = _Series()
        self._run_times = _Series()
        self._finishes = _Series()  # value 1.0 for a success, 0.0 otherwise

    def record_start(self, at: float, queue_wait: float) -> None:
        self._waits.add(at, max(0.0, queue_wait))
        self._waits.trim(at - self.window)

    def record_finish(self, at: float, succeeded: bool, run_time: float | None) -> None:
        self._finishes.add(at, 1.0 if succeeded else 0.0)
        self._finishes.trim(at - self.window)
        if run_time is not None:
            self._run_times.add(at, max(0.0, run_time))
            self._run_times.trim(at - self.window)

    def on_changes(self, changes: Sequence[JobChange], at: float, now: float) -> None:
        """Follow the feed (every replica sees every change, so every replica's figures agree).

        ``at`` is the monotonic time, ``now`` the wall clock the job times are in.
        """
        for change in changes:
            if change.kind is not ChangeKind.STATE:
                continue
            if change.state is JobState.RUNNING and change.start_time is not None:
                self.record_start(at, change.start_time - change.queue_time)
            elif change.state.is_terminal:
                ran = change.state is not JobState.CANCELLED and change.start_time is not None
                run_time = now - change.start_time if ran and change.start_time is not None else None
                self.record_finish(at, change.state is JobState.SUCCEEDED, run_time)

    def figures(self, now: float) -> WindowFigures:
        oldest = now - self.window
        for series in (self._waits, self._run_times, self._finishes):
            series.trim(oldest)
        return WindowFigures(
            window=self.window,
            finished=len(self._finishes.items),
            succeeded=round(self._finishes.total),
            mean_queue_wait=self._waits.mean(),
            mean_run_time=self._run_times.mean(),
        )
