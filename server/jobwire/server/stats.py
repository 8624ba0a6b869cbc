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


class _Window:
    """One tenant's series."""

    __slots__ = ("finishes", "run_times", "waits")

    def __init__(self) -> None:
        self.waits = _Series()
        self.run_times = _Series()
        self.finishes = _Series()  # value 1.0 for a success, 0.0 otherwise

    def trim(self, oldest: float) -> bool:
        """Trim every series; True when nothing is left."""
        for series in (self.waits, self.run_times, self.finishes):
            series.trim(oldest)
        return not (self.waits.items or self.run_times.items or self.finishes.items)


class StatsWindow:
    """What the last few minutes looked like, for GetQueueStats, per tenant and in all. Times come from
    the monotonic clock. The figures of all tenants are summed from each tenant's series (nothing is
    kept twice)."""

    def __init__(self, window: float = 300.0) -> None:
        self.window = window
        self._tenants: dict[str, _Window] = {}

    def _of(self, tenant: str) -> _Window:
        window = self._tenants.get(tenant)
        if window is None:
            window = self._tenants[tenant] = _Window()
        return window

    def record_start(self, at: float, queue_wait: float, tenant: str = "default") -> None:
        waits = self._of(tenant).waits
        waits.add(at, max(0.0, queue_wait))
        waits.trim(at - self.window)

    def record_finish(
        self, at: float, succeeded: bool, run_time: float | None, tenant: str = "default"
    ) -> None:
        window = self._of(tenant)
        window.finishes.add(at, 1.0 if succeeded else 0.0)
        window.finishes.trim(at - self.window)
        if run_time is not None:
            window.run_times.add(at, max(0.0, run_time))
            window.run_times.trim(at - self.window)

    def on_changes(self, changes: Sequence[JobChange], at: float, now: float) -> None:
        """Follow the feed (every replica sees every change, so every replica's figures agree).

        ``at`` is the monotonic time, ``now`` the wall clock the job times are in.
        """
        for change in changes:
            if change.kind is not ChangeKind.STATE:
                continue
            if change.state is JobState.RUNNING and change.start_time is not None:
                self.record_start(at, change.start_time - change.queue_time, change.tenant)
            elif change.state.is_terminal:
                ran = change.state is not JobState.CANCELLED and change.start_time is not None
                run_time = now - change.start_time if ran and change.start_time is not None else None
                self.record_finish(at, change.state is JobState.SUCCEEDED, run_time, change.tenant)

    def figures(self, now: float, tenant: str | None = None) -> WindowFigures:
        """Of one tenant, or (None) of all."""
        oldest = now - self.window
        for name in [t for t, w in self._tenants.items() if w.trim(oldest)]:
            del self._tenants[name]  # an idle tenant's empty series go
        windows = list(self._tenants.values()) if tenant is None else [self._tenants.get(tenant, _Window())]
        waits = sum(len(w.waits.items) for w in windows)
        run_times = sum(len(w.run_times.items) for w in windows)
        return WindowFigures(
            window=self.window,
            finished=sum(len(w.finishes.items) for w in windows),
            succeeded=round(sum(w.finishes.total for w in windows)),
            mean_queue_wait=sum(w.waits.total for w in windows) / waits if waits else 0.0,
            mean_run_time=sum(w.run_times.total for w in windows) / run_times if run_times else 0.0,
        )
