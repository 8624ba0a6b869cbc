"""Remote worker sessions: who is connected, which types they take, how much capacity they offered.

A session is the domain side of one ``WorkerService.Connect`` stream. The JobManager pushes messages
into its outbox (assignments, cancellations, revoked leases, write results); the gRPC layer drains the
outbox onto the stream. Capacity is credit-based: each assignment spends one credit, and the worker
grants more when it can take more.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from jobwire.server.job import Job


@dataclass(frozen=True, slots=True)
class LeaseToken:
    """Names one attempt's lease: every worker write carries it, and a stale one is refused."""

    job_id: str
    attempt: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Assignment:
    job: Job
    lease: LeaseToken
    lease_expire_time: float
    timeout: float | None


@dataclass(frozen=True, slots=True)
class CancelRequest:
    lease: LeaseToken
    reason: str


@dataclass(frozen=True, slots=True)
class LeaseRevoked:
    lease: LeaseToken
    reason: str


@dataclass(frozen=True, slots=True)
class WriteResult:
    lease: LeaseToken
    accepted: bool
    reason: str = ""


OutboxMessage = Assignment | CancelRequest | LeaseRevoked | WriteResult


class WorkerSession:
    """One connected worker: its types, its credits, and the messages waiting to be sent to it."""

    _ids = itertools.count(1)

    def __init__(self, worker_id: str, job_types: frozenset[str], credits: int) -> None:
        self.session_id = f"s{next(self._ids)}"
        self.worker_id = worker_id
        self.job_types = job_types
        self.credits = credits
        self.running: set[str] = set()  # job ids whose current lease this session holds
        self._outbox: deque[OutboxMessage | None] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def send(self, message: OutboxMessage) -> None:
        if not self.closed:
            self._outbox.append(message)
            self._wake()

    def close(self) -> None:
        """End the session: the transport finishes sending what is queued, then ends the stream."""
        if not self.closed:
            self.closed = True
            self._outbox.append(None)
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_message(self) -> OutboxMessage | None:
        """The next message to send, waiting for one; None once the session is closed."""
        while not self._outbox:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._outbox.popleft()

    def __repr__(self) -> str:
        return f"WorkerSession({self.session_id}, {self.worker_id!r}, credits={self.credits})"


class WorkerRegistry:
    """Connected sessions, with the order in which they are offered work (round robin)."""

    def __init__(self) -> None:
        self._sessions: dict[str, WorkerSession] = {}

    def add(self, session: WorkerSession) -> None:
        self._sessions[session.session_id] = session

    def remove(self, session: WorkerSession) -> None:
        self._sessions.pop(session.session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[WorkerSession]:
        return iter(list(self._sessions.values()))

    def with_credits(self) -> list[WorkerSession]:
        return [s for s in self._sessions.values() if s.credits > 0 and not s.closed]

    def rotate(self, session: WorkerSession) -> None:
        """Move a session to the back of the line after it was given a job."""
        if self._sessions.pop(session.session_id, None) is not None:
            self._sessions[session.session_id] = session

    def serving(self, job_type: str) -> list[WorkerSession]:
        return [s for s in self._sessions.values() if job_type in s.job_types and not s.closed]
