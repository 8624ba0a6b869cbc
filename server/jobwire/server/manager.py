"""The JobManager: one replica's parts, built, started, drained and stopped together.

The parts and how they fit are in docs/architecture.md. In short: ``JobOperations`` answers the job
calls on any replica by talking to the store (the truth); every committed change comes back through
the store's change feed to the queue view, the watch streams, the executors and the dispatcher; one
replica of the cluster is the dispatcher (``Dispatcher``, ``LeaseKeeper``, ``Maintenance``), and every
replica runs executors: its in-process handlers (``LocalExecutor``) and the worker sessions connected to
it (``WorkerSessions``). A single process on SQLite or memory is a cluster of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from jobwire.handlers.api import HandlerSpec, Progress
from jobwire.handlers.runner import HandlerRunner
from jobwire.server.access import LOCAL_CALLER, Action, Caller, Principal
from jobwire.server.attempts import (
    Abandoned,
    Ending,
    Failed,
    LocalExecutor,
    LocalSettings,
    Outcome,
    Succeeded,
)
from jobwire.server.audit import AuditEntry
from jobwire.server.changes import JobChange
from jobwire.server.clock import Clock, SystemClock
from jobwire.server.cluster import ClusterStatus, DispatcherUp, Message, StatusUpdate, TypesChanged
from jobwire.server.completion import InFlight, completes
from jobwire.server.dispatcher import Dispatcher
from jobwire.server.errors import Draining, FieldViolation, InvalidArgument, PermissionDenied, TooManyJobTypes
from jobwire.server.events import EventHub, JobEvent
from jobwire.server.job import Job, RetryPolicy
from jobwire.server.job_types import MAX_KNOWN_TYPES, JobType, KnownType, TypeRegistry
from jobwire.server.jobs import JobOperations, OperationSettings, QueueStats
from jobwire.server.leases import LeaseKeeper, LeaseSettings
from jobwire.server.maintenance import Maintenance
from jobwire.server.queue_view import QueueView
from jobwire.server.retention import RetentionPolicy
from jobwire.server.scheduler import Scheduler
from jobwire.server.state_machine import JobState
from jobwire.server.stats import StatsWindow
from jobwire.server.stores.base import JobFilter, JobQuery, JobStore
from jobwire.server.tenants import TenantPolicies
from jobwire.server.validation import JobUpdate, SubmitRequest, job_type_violations
from jobwire.server.workers import LeaseToken, SessionSettings, WorkerSession, WorkerSessions

log = logging.getLogger("jobwire.manager")

# How often the dispatcher looks for replicas that died (their in-process attempts are requeued).
REPLICA_CHECK_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    """Limits and timings of the manager; see ``config.ServerConfig`` for the user-facing names."""

    max_running: int = 8  # jobs running at once in this process (in-process handlers)
    max_queued: int = 100_000
    type_limits: dict[str, int] = field(default_factory=dict)
    aging_interval: float = 60.0
    default_timeout: float | None = None
    cancel_grace: float = 10.0
    retention: float = 7 * 24 * 3600.0
    # Per outcome (SUCCEEDED, FAILED, CANCELLED): overrides ``retention`` for the jobs that end so.
    outcome_retention: dict[JobState, float] = field(default_factory=dict)
    sweep_interval: float = 60.0
    stats_window: float = 300.0
    handler_threads: int | None = None
    lease_duration: float = 30.0
    retry_policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(max_attempts=3))
    tenants: TenantPolicies = field(default_factory=TenantPolicies)


class JobManager:
    """Submit, get, list, cancel, retry, watch and stats; worker sessions; in domain terms."""

    def __init__(
        self,
        store: JobStore,
        handlers: dict[str, HandlerSpec],
        settings: ManagerSettings | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.handlers = dict(handlers)
        self.settings = settings = settings or ManagerSettings()
        self.clock = clock = clock or SystemClock()
        self.cluster = store.cluster()
        replica = self.cluster.replica_id
        retention = RetentionPolicy(settings.retention, dict(settings.outcome_retention))
        ending = Ending(retention, rng or random.Random())
        self.types = TypeRegistry(
            {name: JobType.from_handler(spec) for name, spec in self.handlers.items()}, settings.type_limits
        )
        self.queue = QueueView(Scheduler(aging_interval=settings.aging_interval, tenants=settings.tenants))
        self.events = EventHub(
            store.read_change,
            keep_history=not store.shared,
            retain_after_finish=max(60.0, settings.sweep_interval),
        )
        self.stats_window = StatsWindow(settings.stats_window)
        self._runner = HandlerRunner(settings.handler_threads or settings.max_running + 4)
        self.local = LocalExecutor(
            replica,
            store,
            self.cluster,
            self.handlers,
            LocalSettings(settings.max_running, settings.cancel_grace, settings.default_timeout),
            ending,
            clock,
            self.types.timeout,
            self._runner,
        )
        self.sessions = WorkerSessions(
            replica,
            store,
            self.cluster,
            SessionSettings(settings.lease_duration, settings.default_timeout),
            ending,
            clock,
            self.types.timeout,
        )
        self._timer_wake = asyncio.Event()
        self.leases = LeaseKeeper(
            store,
            clock,
            ending,
            LeaseSettings(settings.cancel_grace, settings.default_timeout),
            self.types.timeout,
            self._timer_wake.set,
        )
        self.dispatcher = Dispatcher(
            store,
            self.cluster,
            self.queue,
            self.types,
            clock,
            settings.lease_duration,
            self.leases.on_claimed,
        )
        self._status = ClusterStatus()  # the dispatcher's, as last heard (when it is another replica)
        self.maintenance = Maintenance(
            store, clock, ending, self.types, self.queue, self.status, settings.retention
        )
        self.jobs = JobOperations(
            store,
            self.queue,
            self.events,
            self.types,
            self.stats_window,
            OperationSettings(
                settings.max_queued,
                retention,
                settings.max_running,
                settings.retry_policy,
                settings.tenants,
            ),
            clock,
            self.status,
            self.reload_types,
        )
        # State changes asked for by callers, each running to its end even if its caller gives up.
        self.in_flight = InFlight()
        self._opened = False
        self._started = False
        self.ready = False  # started: calls may be served
        self._background: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._live: set[str] = set()
        store.subscribe(self._on_changes)
        self.cluster.on_reset(self._reset)

    # -- lifecycle -------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store (connect, migrate): quick, and where a bad store fails. Idempotent."""
        if self._opened:
            return
        await self.store.open()
        self._opened = True

    async def start(self) -> None:
        """Open the store, recover the queue from it, join the cluster and start taking work (``ready``
        from then on). Idempotent."""
        if self._started:
            return
        self._started = True
        await self.open()
        await self.reload_types()
        self.queue.load(await self.store.load_queue(), self.clock.now())
        await self.cluster.join(self._on_message, self._on_leadership)
        self.local.start()
        self._background = [
            asyncio.create_task(self._timers_forever(), name="jobwire-timers"),
            asyncio.create_task(self._sweep_forever(), name="jobwire-sweeper"),
        ]
        log.info(
            "replica %s started: %d queued jobs (%d delayed), %s",
            self.cluster.replica_id,
            len(self.queue),
            self.queue.delayed,
            "dispatching" if self.dispatcher.active else "another replica dispatches",
            extra={"replica": self.cluster.replica_id, "queued": len(self.queue)},
        )
        self.ready = True

    async def _on_leadership(self, epoch: int | None) -> None:
        """This replica becomes the dispatcher (``epoch``), or stops being it (None)."""
        if epoch is None:
            await self.dispatcher.stop()
            self.leases.stop()
            log.info("replica %s stopped dispatching", self.cluster.replica_id)
            return
        now = self.clock.now()
        # Workers whose replica (or the previous dispatcher) died get a whole lease to reconnect and renew.
        await self.store.refresh_remote_leases(now + self.settings.lease_duration)
        self._live = await self.cluster.live_replicas()
        await self.maintenance.requeue_orphans(self._live)
        active = await self.store.load_active()
        self.dispatcher.start(epoch, active)
        self.leases.start(active)
        log.info(
            "replica %s dispatches (epoch %d): %d attempts running, %d jobs queued",
            self.cluster.replica_id,
            epoch,
            len(active),
            len(self.queue),
            extra={"replica": self.cluster.replica_id, "epoch": epoch, "running": len(active)},
        )
        self.cluster.send(DispatcherUp(epoch))

    async def _reset(self) -> None:
        """This replica lost touch with the others for a while: rebuild what it derived from the feed
        and announce its executors again (the dispatcher may have taken it for dead)."""
        self.queue.clear()
        self.queue.load(await self.store.load_queue(), self.clock.now())
        self.events.end_subscriptions()
        await self.reload_types()
        self.local.announce()
        self.sessions.announce()

    def begin_drain(self) -> None:
        """Stop taking and starting work, at once: new submits, retries and worker sessions are refused,
        watch streams end with their resume point and worker sessions end, so that watchers and workers
        move to another server (or come back after a restart) while local jobs finish. Idempotent.

        Remote workers keep their leases: they renew them when they reconnect.
        """
        if self.jobs.draining:
            return
        self.jobs.draining = True
        self.events.close_all()
        for session in list(self.sessions.registry):
            self.sessions.remove(session)

    async def drain(self, grace: float) -> None:
        """``begin_drain``, then give local jobs ``grace`` seconds to finish, then queue them again."""
        self.begin_drain()
        await self.local.drain(grace)

    async def close(self) -> None:
        """Leave the cluster, stop background work and close the store (after ``drain``). Idempotent."""
        await self.in_flight.wait(10.0)  # state changes callers started complete before the store closes
        await self.jobs.in_flight.wait(10.0)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        await self.local.close()
        await self.sessions.close()
        await self.cluster.leave()
        for task in list(self._tasks):
            task.cancel()
        self._runner.shutdown()
        await self.store.close()

    @property
    def draining(self) -> bool:
        return self.jobs.draining

    def status(self) -> ClusterStatus:
        """What the dispatcher knows of executors, credits, running counts and limits."""
        return self.dispatcher.current_status() if self.dispatcher.active else self._status

    @property
    def job_types(self) -> dict[str, JobType]:
        return self.types.known

    # -- the feed and the messages ---------------------------------------------------------------------

    def _on_changes(self, changes: Sequence[JobChange]) -> None:
        """Every committed change, in order: each part follows what concerns it."""
        batch = list(changes)
        now = self.clock.now()
        ready = False
        delayed = self.queue.delayed
        for change in batch:
            ready |= self.queue.apply(change, now)
        if self.queue.delayed != delayed:
            self._timer_wake.set()
        self.stats_window.on_changes(batch, self.clock.monotonic(), now)
        self.events.on_changes(batch, now)
        self.dispatcher.on_changes(batch)
        self.leases.on_changes(batch)
        self.local.on_changes(batch)
        self.sessions.on_changes(batch)
        if ready:
            self.dispatcher.wake()

    def _on_message(self, message: Message) -> None:
        self.dispatcher.on_message(message)
        if isinstance(message, DispatcherUp):
            self.local.announce()
            self.sessions.announce()
        elif isinstance(message, StatusUpdate):
            self._status = message.status
        elif isinstance(message, TypesChanged):
            self._spawn(self.reload_types())

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload_types(self) -> None:
        """Read the declared job types from the store (another replica may have changed them)."""
        self.types.replace_declared(await self.store.load_job_types())
        self.dispatcher.types_changed()

    # -- time ------------------------------------------------------------------------------------------

    async def _timers_forever(self) -> None:
        """Wake when the next timer is due (or a new one is added), and act on what is due."""
        while True:
            dues = [d for d in (self.queue.next_due(), self.leases.next_due()) if d is not None]
            self._timer_wake.clear()
            delay = None if not dues else max(0.0, min(dues) - self.clock.now())
            if self.dispatcher.active and self.store.shared:
                delay = REPLICA_CHECK_INTERVAL if delay is None else min(delay, REPLICA_CHECK_INTERVAL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), delay)
            try:
                await self.tick()
            except Exception:
                log.exception("timer processing failed; will retry")

    async def tick(self) -> None:
        """Act on everything due by the clock's now: delayed jobs enter the run order, leases expire,
        attempts time out, dead replicas' in-process attempts are requeued.

        Runs by itself as time passes; tests with a fake clock call it after moving the clock.
        """
        if self.queue.promote_due(self.clock.now()):
            self.dispatcher.wake()
        await self.leases.tick()
        if self.dispatcher.active and self.store.shared:
            live = await self.cluster.live_replicas()
            gone = self._live - live
            self._live = live
            if gone:
                log.warning("replicas gone: %s", ", ".join(sorted(gone)), extra={"replicas": sorted(gone)})
                self.dispatcher.forget_replicas(gone)
                await self.maintenance.requeue_orphans(live)

    async def _sweep_forever(self) -> None:
        """Purge finished jobs past their retention, and watch logs nobody needs."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("retention sweep failed; will retry")

    async def sweep(self) -> int:
        self.events.sweep(self.clock.now())
        if not self.dispatcher.active:
            return 0
        purged, forgotten = await self.maintenance.sweep()
        if forgotten:
            self.types.forget(forgotten)
            self.dispatcher.types_changed()
            self.cluster.send(TypesChanged())
        return purged

    # -- the job API (JobOperations) ------------------------------------------------------------------

    async def submit(self, request: SubmitRequest, caller: Caller = LOCAL_CALLER) -> Job:
        return await self.jobs.submit(request, caller)

    async def submit_many(
        self, requests: Sequence[SubmitRequest], caller: Caller = LOCAL_CALLER
    ) -> list[Job]:
        return await self.jobs.submit_many(requests, caller)

    async def get(self, job_id: str, caller: Caller = LOCAL_CALLER) -> Job:
        return await self.jobs.get(job_id, caller)

    def list_job_types(self, caller: Caller = LOCAL_CALLER) -> list[KnownType]:
        return self.jobs.list_job_types(caller)

    async def count_jobs(self, job_filter: JobFilter, caller: Caller = LOCAL_CALLER) -> int:
        return await self.jobs.count_jobs(job_filter, caller)

    async def list_jobs(self, query: JobQuery, caller: Caller = LOCAL_CALLER) -> tuple[list[Job], bool]:
        return await self.jobs.list_jobs(query, caller)

    async def cancel(
        self, job_id: str, reason: str = "", caller: Caller = LOCAL_CALLER, request_id: str = ""
    ) -> Job:
        return await self.jobs.cancel(job_id, reason, caller, request_id)

    async def update(
        self, job_id: str, update: JobUpdate, caller: Caller = LOCAL_CALLER, request_id: str = ""
    ) -> Job:
        return await self.jobs.update(job_id, update, caller, request_id)

    async def retry(self, job_id: str, caller: Caller = LOCAL_CALLER, request_id: str = "") -> Job:
        return await self.jobs.retry(job_id, caller, request_id)

    def watch(
        self, job_id: str, after_sequence: int = 0, caller: Caller = LOCAL_CALLER
    ) -> AsyncIterator[JobEvent]:
        return self.jobs.watch(job_id, after_sequence, caller)

    async def stats(self, caller: Caller = LOCAL_CALLER) -> QueueStats:
        return await self.jobs.stats(caller)

    async def audit(
        self, job_id: str, after_id: int = 0, limit: int = 1000, caller: Caller = LOCAL_CALLER
    ) -> list[AuditEntry]:
        return await self.jobs.audit(job_id, after_id, limit, caller)

    # -- worker sessions ------------------------------------------------------------------------------

    async def connect_worker(
        self, worker_id: str, job_types: list[JobType], credits: int, caller: Caller = LOCAL_CALLER
    ) -> WorkerSession:
        """Register a worker session; its types become known (and stored) and it is offered work.

        A tenant's worker runs only its tenant's jobs, and declares only the types its credential
        allows, never one that is another tenant's or the server's own (``_declare_types``).
        """
        principal = caller.principal
        principal.require(Action.WORK)
        if self.draining:
            raise Draining()
        violations = job_type_violations(worker_id, job_types, credits)
        if violations:
            raise InvalidArgument(violations=violations)
        declared = await self._declare_types(job_types, principal)
        session = self.sessions.add(
            worker_id, frozenset(t.name for t in declared), credits, principal, caller.peer
        )
        log.info(
            "worker connected",
            extra={
                "session": session.session_id,
                "worker_id": worker_id,
                "types": sorted(session.job_types),
                "principal": principal.label,
            },
        )
        return session

    def _check_declarable(self, job_types: list[JobType], owner: str, principal: Principal) -> None:
        for job_type in job_types:
            principal.require_type(job_type.name)
            if job_type.name in self.types.local:
                raise PermissionDenied(
                    f"job type {job_type.name!r} is run by the server's own handlers; a worker cannot "
                    "declare it",
                    metadata={"type": job_type.name},
                )
            known = self.types.get(job_type.name)
            if known is not None and known.tenant != owner:
                raise PermissionDenied(
                    _owned_elsewhere(job_type.name, known.tenant), metadata={"type": job_type.name}
                )

    @completes
    async def _declare_types(self, job_types: list[JobType], principal: Principal) -> list[JobType]:
        """Store the types a worker declares, then make them known (here, and to the other replicas).

        A type belongs to the tenant whose worker first declared it ("" for an admin's worker: shared).
        """
        owner = "" if principal.all_tenants else principal.tenant
        self._check_declarable(job_types, owner, principal)
        new = {t.name for t in job_types} - self.types.known.keys()
        if len(self.types) + len(new) > MAX_KNOWN_TYPES:
            raise TooManyJobTypes(
                f"declaring {len(new)} new job types would pass the limit of {MAX_KNOWN_TYPES} known "
                f"types ({len(self.types)} known); types no worker declared for the retention period "
                "are forgotten"
            )
        now = self.clock.now()
        declared = [JobType(t.name, t.timeout, t.max_running, t.retry, now, owner) for t in job_types]
        refused = await self.store.save_job_types(declared)
        if refused:  # declared by another tenant's worker through another replica a moment ago
            await self.reload_types()
            known = self.types.get(refused[0])
            raise PermissionDenied(
                _owned_elsewhere(refused[0], known.tenant if known is not None else "?"),
                metadata={"type": refused[0]},
            )
        self.types.declare(declared)
        self.dispatcher.types_changed()
        if new and self.store.shared:
            self.cluster.send(TypesChanged())
        return declared

    def disconnect_worker(self, session: WorkerSession) -> None:
        """The session ended. Its leases stand until they expire or a new session renews them."""
        self.sessions.remove(session)
        log.info("worker disconnected", extra={"session": session.session_id, "worker_id": session.worker_id})

    def add_credits(self, session: WorkerSession, credits: int) -> None:
        if credits < 1 or credits > 10_000:
            raise InvalidArgument(
                violations=[FieldViolation("add_credits.credits", "must be from 1 to 10000")]
            )
        self.sessions.add_credits(session, credits)

    def worker_progress(self, session: WorkerSession, token: LeaseToken, progress: Progress) -> None:
        self.sessions.progress(session, token, progress)

    def worker_heartbeat(self, session: WorkerSession, tokens: list[LeaseToken]) -> None:
        self.sessions.heartbeat(session, tokens)

    async def worker_finish(self, session: WorkerSession, token: LeaseToken, outcome: Outcome) -> None:
        """A worker's CompleteJob, FailJob or ReleaseJob; answered with a WriteResult on the session."""
        await self.sessions.finish(session, token, outcome)


def _owned_elsewhere(name: str, owner: str) -> str:
    if owner:
        return f"job type {name!r} belongs to another tenant; choose another name"
    return f"job type {name!r} is shared by every tenant (an admin's worker declared it); choose another name"


__all__ = [
    "Abandoned",
    "Failed",
    "JobManager",
    "ManagerSettings",
    "Outcome",
    "QueueStats",
    "Succeeded",
]
