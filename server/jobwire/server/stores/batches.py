"""What the SQL stores' writers share: group commit's bookkeeping (both commit every waiting write in
one transaction, then publish the changes and answer the callers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from jobwire.handlers.api import Progress
from jobwire.server.changes import JobChange

Op = TypeVar("Op")


@dataclass(slots=True)
class ProgressNote:
    """The latest progress an attempt reported, waiting for the next transaction (latest wins)."""

    lease_epoch: int
    progress: Progress
    time: float

    @classmethod
    def of(cls, lease_epoch: int, progress: Progress, time: float) -> ProgressNote:
        """A note owning its copy of ``progress`` (the reporter may change its own afterwards)."""
        return cls(lease_epoch, progress.copy(), time)


@dataclass(slots=True)
class Outcomes(Generic[Op]):
    """What one transaction did: each op's result or error, and the changes to publish."""

    results: list[tuple[Op, Any, BaseException | None]] = field(default_factory=list)
    changes: list[JobChange] = field(default_factory=list)
