"""Remote worker sessions on this replica: who is connected, what they hold, and what they are told.

A session is the domain side of one ``WorkerService.Connect`` stream, and one executor for the
dispatcher (``<replica>/<session>``). ``WorkerSessions`` pushes messages into a session's outbox
(assignments, cancellations, revoked leases, write results); the gRPC layer drains the outbox onto the
stream. Capacity is credit-based: the worker grants credits, each assignment spends one, and the
dispatcher (wherever it runs) hears of both.

A worker's writes are checked against the store, not against this replica's memory: its lease may have
been granted through another replica, and a worker that reconnects here after its replica died carries
on with the leases it holds (the first heartbeat re-attaches them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from jobwire.handlers.api import Progress
from jobwire.server.access import ANONYMOUS, Principal
from jobwire.server.attempts import Ending, Outcome, end_attempt
from jobwire.server.audit import Actor
from jobwire.server.changes import ChangeKind, JobChange
from jobwire.server.clock import Clock
from jobwire.server.cluster import Cluster, Credits, ExecutorDown, ExecutorInfo, ExecutorUp
from jobwire.server.job import Job
from jobwire.server.state_machine import JobState
from jobwire.server.stores.base import JobStore

log = logging.getLogger("jobwire.workers")


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
    """One connected worker: its types, its credits, and the messages waiting to be sent to it.

    A worker with a tenant's credential runs only that tenant's jobs (``tenant``); an admin's runs
    every tenant's (``tenant`` None).
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        worker_id: str,
        job_types: frozenset[str],
        credits: int,
        replica_id: str = "",
        principal: Principal = ANONYMOUS,
        peer: str = "",
    ) -> None:
        self.session_id = f"s{next(self._ids)}"
        self.worker_id = worker_id
        self.job_types = job_types
        self.credits = credits  # granted by the worker, less the assignments delivered
        self.running: dict[str, Job] = {}  # job id -> the job as held under its current lease
        self.finishing: set[LeaseToken] = set()  # outcomes being written: their end is no revocation
        self.tenant = None if principal.all_tenants else principal.tenant
        self.actor = Actor(principal.label, peer)
        self.executor = ExecutorInfo(
            f"{replica_id}/{self.session_id}", worker_id, job_types, self.tenant, principal.label, peer
        )
        self._outbox: deque[OutboxMessage | None] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def may_run(self, job: Job) -> bool:
        """Whether this worker may hold ``job``: only of a type it declared, never another tenant's."""
        return job.type in self.job_types and (self.tenant is None or job.tenant == self.tenant)

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

    async def next_messages(self, limit: int) -> list[OutboxMessage] | None:
        """The messages waiting to be sent, in order (at least one, at most ``limit``), waiting for one;
        None once the session is closed and everything before the close was taken."""
        outbox = self._outbox
        while not outbox:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        taken: list[OutboxMessage] = []
        while outbox and len(taken) < limit and (message := outbox[0]) is not None:
            outbox.popleft()
            taken.append(message)
        return taken or None

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

    def by_executor(self, executor_id: str) -> WorkerSession | None:
        _, _, session_id = executor_id.partition("/")
        session = self._sessions.get(session_id)
        return session if session is not None and session.executor.id == executor_id else None

    def serving(self, job_type: str) -> list[WorkerSession]:
        return [s for s in self._sessions.values() if job_type in s.job_types and not s.closed]


@dataclass(frozen=True, slots=True)
class SessionSettings:
    lease_duration: float
    default_timeout: float | None


class WorkerSessions:
    """The worker sessions connected to this replica, and what their workers' messages do."""

    def __init__(
        self,
        replica_id: str,
        store: JobStore,
        cluster: Cluster,
        settings: SessionSettings,
        ending: Ending,
        clock: Clock,
        timeout_for: Callable[[str, float | None, float | None], float | None],
    ) -> None:
        self.replica_id = replica_id
        self.registry = WorkerRegistry()
        self._store = store
        self._cluster = cluster
        self._settings = settings
        self._ending = ending
        self._clock = clock
        self._timeout_for = timeout_for
        self._holders: dict[str, WorkerSession] = {}  # job id -> the session holding its lease here
        self._renewed_until: dict[tuple[str, int], float] = {}  # what the store was last told
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self.registry)

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker session task failed", exc_info=task.exception())

    # -- sessions ---------------------------------------------------------------------------------

    def add(
        self,
        worker_id: str,
        job_types: frozenset[str],
        credits: int,
        principal: Principal = ANONYMOUS,
        peer: str = "",
    ) -> WorkerSession:
        session = WorkerSession(worker_id, job_types, credits, self.replica_id, principal, peer)
        self.registry.add(session)
        self._cluster.send(ExecutorUp(session.executor, credits))
        return session

    def remove(self, session: WorkerSession) -> None:
        """The session ended. Its leases stand until they expire or a new session renews them."""
        if session.session_id not in {s.session_id for s in self.registry}:
            return
        self.registry.remove(session)
        session.close()
        self._cluster.send(ExecutorDown(session.executor.id))
        for job_id in session.running:
            if self._holders.get(job_id) is session:
                del self._holders[job_id]
        session.running.clear()

    def announce(self) -> None:
        """Tell a new dispatcher about every session and its free credits."""
        for session in self.registry:
            if not session.closed:
                self._cluster.send(ExecutorUp(session.executor, session.credits))

    def add_credits(self, session: WorkerSession, credits: int) -> None:
        session.credits = min(session.credits + credits, 1_000_000)
        self._cluster.send(Credits(session.executor.id, credits))

    # -- the feed ---------------------------------------------------------------------------------

    def on_changes(self, changes: list[JobChange]) -> None:
        for change in changes:
            holder = self._holders.get(change.job_id)
            if holder is not None:
                self._follow(holder, change)
            elif (
                change.kind is ChangeKind.STATE  # a claim; never a late progress note
                and change.state is JobState.RUNNING
                and change.executor.startswith(self.replica_id + "/")
            ):
                session = self.registry.by_executor(change.executor)
                if session is not None:
                    self._assign(session, change)

    def _follow(self, session: WorkerSession, change: JobChange) -> None:
        """A job a session here holds changed: cancelled, or its lease moved on."""
        held = session.running.get(change.job_id)
        if held is None or change.sequence <= held.sequence:
            return
        if change.lease_epoch != held.lease_epoch or not change.state.is_active:
            self._drop(change.job_id)
            token = LeaseToken(held.id, held.attempt, held.lease_epoch)
            if token not in session.finishing:  # the worker's own outcome is answered by its WriteResult
                session.send(
                    LeaseRevoked(token, f"the job is {change.state.name} (its lease is no longer current)")
                )
            return
        was_cancelling = held.state is JobState.CANCELLING
        session.running[change.job_id] = (
            change.job.copy() if change.job is not None else _with_state(held, change)
        )
        if change.state is JobState.CANCELLING and not was_cancelling:
            reason = change.job.cancel_reason if change.job is not None else ""
            session.send(
                CancelRequest(LeaseToken(held.id, held.attempt, held.lease_epoch), reason or "cancelled")
            )

    def _assign(self, session: WorkerSession, change: JobChange) -> None:
        if change.job is not None:
            self._deliver(session, change.job.copy())
        else:
            self._spawn(self._fetch_and_deliver(session, change.job_id, change.lease_epoch))

    async def _fetch_and_deliver(self, session: WorkerSession, job_id: str, epoch: int) -> None:
        job = await self._store.get(job_id)
        if job is not None and job.lease_epoch == epoch and job.state.is_active:
            self._deliver(session, job)

    def _deliver(self, session: WorkerSession, job: Job) -> None:
        if session.closed or job.id in session.running:
            return  # a session that ended keeps nothing: the lease expires and the job runs again
        if not session.may_run(job):  # the dispatcher never claims so; a second lock on the door
            log.error("job %s of another tenant was claimed for session %s", job.id, session.session_id)
            return
        session.credits = max(0, session.credits - 1)
        self._hold(session, job)
        timeout = self._timeout_for(job.type, job.timeout, self._settings.default_timeout)
        token = LeaseToken(job.id, job.attempt, job.lease_epoch)
        session.send(Assignment(job, token, job.lease_expire_time or self._clock.now(), timeout))

    def _hold(self, session: WorkerSession, job: Job) -> None:
        previous = self._holders.get(job.id)
        if previous is not None and previous is not session:
            previous.running.pop(job.id, None)
        self._holders[job.id] = session
        session.running[job.id] = job
        if job.lease_expire_time is not None:
            self._renewed_until[(job.id, job.lease_epoch)] = job.lease_expire_time

    def _drop(self, job_id: str) -> Job | None:
        session = self._holders.pop(job_id, None)
        held = session.running.pop(job_id, None) if session is not None else None
        if held is not None:
            self._renewed_until.pop((job_id, held.lease_epoch), None)
        return held

    # -- what workers say -------------------------------------------------------------------------

    def _held(self, session: WorkerSession, token: LeaseToken) -> Job | None:
        held = session.running.get(token.job_id)
        if held is None or held.lease_epoch != token.epoch or held.attempt != token.attempt:
            return None
        return held

    def progress(self, session: WorkerSession, token: LeaseToken, progress: Progress) -> None:
        """ReportProgress: written (fenced by the lease) and published; it also renews the lease."""
        if self._held(session, token) is None:
            self._spawn(self._attach([token], session, progress))
            return
        self._store.record_progress(token.job_id, token.epoch, progress, self._clock.now())
        self._renew_soon(session, [token])

    def heartbeat(self, session: WorkerSession, tokens: list[LeaseToken]) -> None:
        """Heartbeat: renew the leases; ones this session does not hold yet (a reconnection) attach."""
        unknown = [t for t in tokens if self._held(session, t) is None]
        if unknown:
            self._spawn(self._attach(unknown, session, None))
        known = [t for t in tokens if self._held(session, t) is not None]
        self._renew_soon(session, known)
        for token in known:
            held = session.running[token.job_id]
            if held.state is JobState.CANCELLING:  # e.g. the cancellation went to an older session
                session.send(CancelRequest(token, held.cancel_reason or "cancelled"))

    async def _attach(
        self, tokens: list[LeaseToken], session: WorkerSession, progress: Progress | None
    ) -> None:
        """Leases this session does not hold yet: valid if the store says the lease is current, and the
        job is one this worker may hold (never another tenant's: its lease is not even renewed)."""
        until = self._clock.now() + self._settings.lease_duration
        jobs: list[Job | None] = []
        for token in tokens:
            job = await self._store.get(token.job_id)
            mine = job is not None and session.may_run(job)
            jobs.append(job if mine else None)  # another tenant's job is, to this worker, no job at all
        candidates = [
            (token, job)
            for token, job in zip(tokens, jobs, strict=True)
            if job is not None and job.lease_epoch == token.epoch and job.attempt == token.attempt
        ]
        current = await self._store.renew_leases([(t.job_id, t.epoch) for t, _ in candidates], until)
        renewed = {token for (token, _), valid in zip(candidates, current, strict=True) if valid}
        for token, job in zip(tokens, jobs, strict=True):
            if job is None or token not in renewed or session.closed:
                session.send(LeaseRevoked(token, self.stale_reason(token, job)))
                continue
            self._hold(session, job)
            self._renewed_until[(job.id, job.lease_epoch)] = until
            if progress is not None:
                self._store.record_progress(token.job_id, token.epoch, progress, self._clock.now())
            if job.state is JobState.CANCELLING:
                session.send(CancelRequest(token, job.cancel_reason or "cancelled"))

    def _renew_soon(self, session: WorkerSession, tokens: list[LeaseToken]) -> None:
        """Write renewals only when a lease would otherwise come within two thirds of expiring."""
        now = self._clock.now()
        lease = self._settings.lease_duration
        due = [t for t in tokens if self._renewed_until.get((t.job_id, t.epoch), 0.0) - now < lease * 2 / 3]
        if due:
            until = now + lease
            for token in due:
                self._renewed_until[(token.job_id, token.epoch)] = until
            self._spawn(self._renew(session, due, until))

    async def _renew(self, session: WorkerSession, tokens: list[LeaseToken], until: float) -> None:
        current = await self._store.renew_leases([(t.job_id, t.epoch) for t in tokens], until)
        for token, valid in zip(tokens, current, strict=True):
            if not valid and self._held(session, token) is not None:
                self._drop(token.job_id)
                session.send(LeaseRevoked(token, self.stale_reason(token, None)))

    async def finish(self, session: WorkerSession, token: LeaseToken, outcome: Outcome) -> None:
        """CompleteJob, FailJob or ReleaseJob; answered with a WriteResult on the session."""
        held = self._held(session, token)
        job = held if held is not None else await self._store.get(token.job_id)
        if job is not None and not session.may_run(job):
            job = None  # another tenant's job is, to this worker, no job at all
        if job is None or job.lease_epoch != token.epoch or job.attempt != token.attempt:
            session.send(WriteResult(token, False, self.stale_reason(token, job)))
            return
        session.finishing.add(token)
        try:
            ended = await end_attempt(
                self._store, job, outcome, self._clock.now(), self._ending, actor=session.actor
            )
        finally:
            session.finishing.discard(token)
        if ended is not None:
            if self._holders.get(token.job_id) is session:
                self._drop(token.job_id)
            session.send(WriteResult(token, True))
        else:
            current = await self._store.get(token.job_id)
            session.send(WriteResult(token, False, self.stale_reason(token, current)))

    @staticmethod
    def stale_reason(token: LeaseToken, job: Job | None) -> str:
        if job is None:
            return f"job {token.job_id} is finished or unknown, or its lease moved on"
        if job.lease_epoch != token.epoch:
            return f"lease epoch {token.epoch} is stale: job {token.job_id} is at epoch {job.lease_epoch}"
        return f"job {token.job_id} is {job.state.name}, not running under this lease"

    async def close(self) -> None:
        for session in list(self.registry):
            self.remove(session)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait(set(self._tasks), timeout=5.0)


def _with_state(held: Job, change: JobChange) -> Job:
    """The held job with what a change without a snapshot says (state, sequence)."""
    updated = held.copy()
    updated.state, updated.sequence = change.state, change.sequence
    return updated
