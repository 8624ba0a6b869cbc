"""The remote worker's I/O: the Connect stream, reconnection, heartbeats, running handlers, draining.

What to send and when is decided by ``session.WorkerSession``; this module only moves messages between
it, the stream and the handlers. Handlers are the same ``@handler`` functions the server runs
in-process, run by the same ``HandlerRunner``: they cannot tell where they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio
from google.protobuf import json_format

from jobwire.client._core import Backoff, call_metadata
from jobwire.client.channels import open_aio_channel, select_credentials
from jobwire.client.errors import JobwireError, from_rpc_error
from jobwire.handlers.api import HandlerSpec, Progress
from jobwire.handlers.runner import CancellableContext, HandlerRunner
from jobwire.v1 import worker_service_pb2, worker_service_pb2_grpc
from jobwire.worker.batches import BATCH_MESSAGES, batched
from jobwire.worker.session import (
    ActiveJob,
    Lease,
    WorkerSession,
    complete_request,
    describe,
    duration_seconds,
    exception_request,
    progress_from_proto,
)

if TYPE_CHECKING:
    from jobwire.v1.worker_service_pb2_grpc import WorkerServiceAsyncStub

__all__ = ["RemoteJobContext", "Worker", "default_worker_id"]

log = logging.getLogger("jobwire.worker")

W = worker_service_pb2

# Codes after which reconnecting cannot help: the server refuses this worker or does not speak the
# protocol. Everything else (UNAVAILABLE, a reset connection, ...) is retried with back-off.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
REGISTER_TIMEOUT = 30.0  # seconds to wait for WorkerRegistered before trying another connection
SETTLE_TIMEOUT = 5.0  # at most this long, on stop, for the WriteResults of the last outcomes
CLOSE_TIMEOUT = 2.0  # for the server to end the stream after we stop writing
DEFAULT_HEARTBEAT = 10.0  # used if the server sends no heartbeat_interval

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Detect a dead connection while idle; the server allows pings every 10 s without data.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def default_worker_id() -> str:
    """host/pid: unique enough for humans reading the attempt history."""
    return f"{socket.gethostname()}/pid-{os.getpid()}"


class RemoteJobContext(CancellableContext):
    """The context of a handler running in a worker process: progress goes to the session's outbox."""

    def __init__(
        self,
        lease: Lease,
        job_type: str,
        progress: Progress | None,
        loop: asyncio.AbstractEventLoop,
        on_progress: Callable[[Lease, Progress], None],
    ) -> None:
        super().__init__(lease.job_id, job_type, lease.attempt, lease.epoch, progress, loop)
        self.lease = lease
        self._on_progress = on_progress

    def _emit(self, progress: Progress) -> None:
        self._on_progress(self.lease, progress)


def _request_batch(requests: list[worker_service_pb2.ConnectRequest]) -> worker_service_pb2.ConnectRequest:
    return W.ConnectRequest(batch=W.ConnectRequestBatch(messages=requests))


class _Connection:
    """One Connect stream: the call, its outbox's wake-up, and whether registration succeeded."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.wake = asyncio.Event()
        self.registered: asyncio.Future[worker_service_pb2.WorkerRegistered] = (
            asyncio.get_running_loop().create_future()
        )
        self.closing = False
        self.heartbeat: asyncio.Task[None] | None = None


class _StreamBroken(Exception):
    """The stream cannot be used any more (a write failed, or registration timed out)."""


class Worker:
    """Runs ``@handler`` functions for a Jobwire server over ``WorkerService.Connect``.

    ``await worker.run()`` until ``await worker.stop()``; or ``worker.run_forever()`` from a script,
    which stops gracefully on SIGTERM/SIGINT (a second signal skips the drain's wait).

    The connection is plaintext unless TLS is asked for: ``tls=True`` (the system's trusted roots), or
    any of ``tls_ca`` (PEM file of the CA that signs the server's certificate), ``tls_cert`` and
    ``tls_key`` (a client certificate and its key, together, for mutual TLS: the server may take the
    worker's identity from it). ``channel_credentials``, when given, wins over all of them. Unreadable
    PEM files raise InvalidArgumentError here, before anything connects.
    """

    def __init__(
        self,
        target: str,
        handlers: Mapping[str, HandlerSpec],
        *,
        concurrency: int = 4,
        worker_id: str | None = None,
        token: str | None = None,
        drain_grace: float = 30.0,
        channel_credentials: grpc.ChannelCredentials | None = None,
        reconnect_backoff: tuple[float, float] = (0.1, 5.0),
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        if not handlers:
            raise ValueError("a worker needs at least one handler")
        if not 1 <= concurrency <= 10_000:
            raise ValueError("concurrency must be from 1 to 10,000")
        if drain_grace < 0:
            raise ValueError("drain_grace must be 0 or more")
        initial, maximum = reconnect_backoff
        if not 0 < initial <= maximum:
            raise ValueError("reconnect_backoff must be (initial, maximum) with 0 < initial <= maximum")
        self.target = target
        self.handlers = dict(handlers)
        self.concurrency = concurrency
        self.worker_id = worker_id or default_worker_id()
        self.drain_grace = drain_grace
        self._metadata = call_metadata(token)
        self._credentials = select_credentials(
            channel_credentials, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        self._backoff = Backoff(initial=initial, multiplier=2.0, maximum=maximum, jitter=0.2)
        self._session = WorkerSession(self.worker_id, self.handlers, concurrency)
        self._tasks: dict[Lease, asyncio.Task[None]] = {}
        self._runner: HandlerRunner | None = None
        self._stub: WorkerServiceAsyncStub | None = None
        self._connection: _Connection | None = None
        self._waiters: list[asyncio.Future[None]] = []  # woken when a handler ends or a write is acked
        self._connections: asyncio.Task[None] | None = None
        self._closing = False  # no more connections
        self._started = False
        self._stop_early = False  # stop() before run()
        self._stop_task: asyncio.Task[None] | None = None
        self._force: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self.connected = False  # registered on a live stream (for tests and health checks)

    # --- public API ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, take jobs and run them until ``stop()``; reconnects by itself when the stream breaks.

        Raises a JobwireError when the server refuses the worker for good (bad declaration, bad
        credentials, no WorkerService).
        """
        if self._started:
            raise RuntimeError("Worker.run() can only be called once")
        self._started = True
        if self._stop_early:
            return
        self._force = asyncio.Event()
        self._done = asyncio.Event()
        self._runner = HandlerRunner(self.concurrency)
        options = [
            *CHANNEL_OPTIONS,
            ("grpc.initial_reconnect_backoff_ms", max(100, int(self._backoff.initial * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(100, int(self._backoff.initial * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(100, int(self._backoff.maximum * 1000))),
        ]
        channel = open_aio_channel(self.target, self._credentials, options)
        # The generated stub is the same class for both channel kinds; only its typing differs.
        self._stub = cast("WorkerServiceAsyncStub", worker_service_pb2_grpc.WorkerServiceStub(channel))
        log.info(
            "worker starting",
            extra={
                "worker_id": self.worker_id,
                "server": self.target,
                "job_types": sorted(self.handlers),
                "concurrency": self.concurrency,
            },
        )
        connections = asyncio.create_task(self._connection_loop(), name="jobwire-worker-connection")
        self._connections = connections
        done_wait = asyncio.create_task(self._done.wait())
        try:
            await asyncio.wait({connections, done_wait}, return_when=asyncio.FIRST_COMPLETED)
            if connections.done() and not self._done.is_set():
                connections.result()  # a fatal error: raise it (after the clean-up below)
        finally:
            self._closing = True
            self._done.set()  # a later stop() has nothing left to do
            done_wait.cancel()
            connections.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connections
            await self._cancel_handlers()
            self._runner.shutdown()
            await channel.close()
            log.info("worker stopped", extra={"worker_id": self.worker_id})

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: take no more jobs, give running handlers up to ``grace`` seconds (default
        ``drain_grace``) to finish, then cancel the rest and hand their jobs back with ReleaseJob.

        Calling it again while a drain is under way with ``grace=0`` cuts the wait short.
        """
        if not self._started:
            self._stop_early = True
            return
        if self._done is None or self._done.is_set():
            return
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(
                self._drain(self.drain_grace if grace is None else grace), name="jobwire-worker-drain"
            )
        elif grace is not None and grace <= 0 and self._force is not None:
            self._force.set()
            self._notify()
        await asyncio.shield(self._stop_task)

    def run_forever(self) -> int:
        """Run until SIGTERM or SIGINT, then drain; returns the process exit code (0 after a clean stop,
        1 when the server refused the worker)."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            received = 0
            stopping: set[asyncio.Task[None]] = set()  # keeps the stop tasks referenced

            def on_signal(name: str) -> None:
                nonlocal received
                received += 1
                if received == 1:
                    log.info("%s received: draining (again to stop at once)", name, extra={"signal": name})
                    task = loop.create_task(self.stop())
                else:
                    log.warning("%s received again: stopping now", name, extra={"signal": name})
                    task = loop.create_task(self.stop(grace=0))
                stopping.add(task)
                task.add_done_callback(stopping.discard)

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal, sig.name)
            try:
                await self.run()
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

        try:
            asyncio.run(main())
        except JobwireError as err:
            log.error("the server refused this worker: %s", err, extra={"code": err.code.name})
            return 1
        return 0

    @property
    def running_jobs(self) -> int:
        """Handlers alive right now."""
        return self._session.running

    @property
    def handler_threads_busy(self) -> int:
        """Plain handlers still executing in a thread; after ``run`` ends, ones that ignored the stop."""
        return self._runner.threads_busy if self._runner is not None else 0

    # --- connections --------------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        """Connect, and connect again with back-off whenever the stream breaks, until closing."""
        failures = 0
        while not self._closing:
            registered = False
            try:
                registered = await self._connect_once()
                problem = "the server ended the stream"
            except grpc.RpcError as rpc_error:
                err = from_rpc_error(rpc_error)
                if err.code in FATAL_CODES and not self._closing:
                    raise err from rpc_error
                problem = str(err)
            except _StreamBroken as broken:
                problem = str(broken)
            except Exception as exc:  # a bug must not take the running handlers down: reconnect
                log.exception("worker stream failed unexpectedly")
                problem = repr(exc)
            finally:
                self.connected = False
                self._session.disconnect()
                self._connection = None
            if self._closing:
                return
            if registered:
                failures = 0
            delay = self._backoff.delay(failures)
            failures += 1
            log.warning(
                "worker stream lost (%s); reconnecting in %.2f s",
                problem,
                delay,
                extra={"running_jobs": self._session.running, "pending_outcomes": len(self._session.pending)},
            )
            await asyncio.sleep(delay)

    async def _connect_once(self) -> bool:
        """One Connect stream, from registration to its end. True if it got registered.

        Raises the stream's RpcError when it failed, _StreamBroken when writing failed.
        """
        assert self._stub is not None
        call: Any = self._stub.Connect(metadata=self._metadata)
        conn = _Connection(call)
        self._connection = conn
        self._session.connect(on_push=conn.wake.set)
        reader = asyncio.create_task(self._read_loop(conn), name="jobwire-worker-reader")
        writer = asyncio.create_task(self._write_loop(conn), name="jobwire-worker-writer")
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                error = writer.exception()
                if error is not None:
                    if isinstance(error, grpc.RpcError):
                        raise error
                    if isinstance(error, TimeoutError):
                        raise _StreamBroken(f"no WorkerRegistered within {REGISTER_TIMEOUT:g} s")
                    raise _StreamBroken(f"writing failed: {error!r}")
                await reader  # we stopped writing (closing): the server ends the stream
            reader.result()
            return conn.registered.done()
        finally:
            for task in (reader, writer, conn.heartbeat):
                if task is not None:
                    task.cancel()
            for task in (reader, writer, conn.heartbeat):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            call.cancel()

    async def _read_loop(self, conn: _Connection) -> None:
        """Handle the server's messages until it ends the stream (an RpcError if it failed)."""
        while True:
            response = await conn.call.read()
            if response is grpc.aio.EOF:
                return
            kind = response.WhichOneof("message")
            if kind == "registered":
                self._on_registered(conn, response.registered)
            elif kind == "batch":
                for message in response.batch.messages:
                    self._dispatch(message)
            else:
                self._dispatch(response)

    def _on_registered(self, conn: _Connection, registered: worker_service_pb2.WorkerRegistered) -> None:
        if conn.registered.done():
            return
        conn.registered.set_result(registered)
        conn.heartbeat = asyncio.create_task(
            self._heartbeat_loop(registered), name="jobwire-worker-heartbeat"
        )
        self.connected = True
        log.info(
            "worker registered",
            extra={
                "session_id": registered.session_id,
                "lease_duration": registered.lease_duration.ToNanoseconds() / 1e9,
                "running_jobs": self._session.running,
                "resent_outcomes": len(self._session.pending),
            },
        )

    async def _write_loop(self, conn: _Connection) -> None:
        """Write the outbox in order; after RegisterWorker, nothing else until WorkerRegistered. Then, if
        the server accepts batches, whatever is queued goes as one ConnectRequestBatch."""
        outbox = self._session.outbox
        assert outbox is not None
        first = outbox.pop()
        assert first is not None  # RegisterWorker
        await conn.call.write(first)
        registered = await asyncio.wait_for(asyncio.shield(conn.registered), REGISTER_TIMEOUT)
        limit = BATCH_MESSAGES if registered.accepts_batches else 1
        while True:
            messages = outbox.pop_many(limit)
            if not messages:
                if conn.closing:
                    await conn.call.done_writing()
                    return
                conn.wake.clear()
                await conn.wake.wait()
                continue
            for message in batched(messages, _request_batch):
                await conn.call.write(message)

    async def _heartbeat_loop(self, registered: worker_service_pb2.WorkerRegistered) -> None:
        """Renew every running job's lease each heartbeat_interval."""
        interval = duration_seconds(registered.heartbeat_interval)
        if interval is None:
            lease = duration_seconds(registered.lease_duration)
            interval = lease / 3 if lease else DEFAULT_HEARTBEAT
        interval = max(0.05, interval)
        while True:
            await asyncio.sleep(interval)
            self._session.heartbeat()

    # --- messages from the server -------------------------------------------------------------------

    def _dispatch(self, response: worker_service_pb2.ConnectResponse) -> None:
        kind = response.WhichOneof("message")
        if kind == "assignment":
            self._on_assignment(response.assignment)
        elif kind == "cancel_requested":
            lease = Lease.from_proto(response.cancel_requested.lease)
            found = self._session.cancel_requested(lease, response.cancel_requested.reason)
            log.info(
                "cancellation requested",
                extra={"job_id": lease.job_id, "attempt": lease.attempt, "running": found},
            )
        elif kind == "lease_revoked":
            lease = Lease.from_proto(response.lease_revoked.lease)
            if self._session.lease_revoked(lease, response.lease_revoked.reason):
                log.warning(
                    "lease revoked: job %s attempt %d forgotten (%s)",
                    lease.job_id,
                    lease.attempt,
                    response.lease_revoked.reason,
                    extra={"job_id": lease.job_id, "attempt": lease.attempt, "epoch": lease.epoch},
                )
            self._notify()
        elif kind == "write_result":
            result = response.write_result
            ack = self._session.write_result(Lease.from_proto(result.lease), result.accepted, result.reason)
            fields = {"job_id": ack.lease.job_id, "attempt": ack.lease.attempt, "epoch": ack.lease.epoch}
            outcome = describe(ack.outcome) if ack.outcome is not None else "unknown write"
            if ack.accepted:
                log.debug("%s recorded", outcome, extra=fields)
            else:
                log.warning(
                    "%s refused by the server: %s%s",
                    outcome,
                    ack.reason or "no reason given",
                    " (re-sent after a reconnection: it may have been recorded before)" if ack.resent else "",
                    extra=fields,
                )
            self._notify()
        else:
            log.warning("ignoring an unexpected message from the server: %s", kind)

    def _on_assignment(self, assignment: worker_service_pb2.JobAssignment) -> None:
        lease = Lease.from_proto(assignment.lease)
        job = assignment.job
        fields = {"job_id": lease.job_id, "job_type": job.type, "attempt": lease.attempt}
        fields["epoch"] = lease.epoch
        if lease in self._session.active:
            log.warning("duplicate assignment ignored", extra=fields)
            return
        refusal = self._session.can_accept(job.type)
        if refusal is not None:
            self._session.refuse(lease, refusal)
            log.info("assignment handed back: %s", refusal, extra=fields)
            return
        loop = asyncio.get_running_loop()
        ctx = RemoteJobContext(lease, job.type, progress_from_proto(job), loop, self._session.progress)
        active = self._session.start(lease, job.type, ctx.cancel)
        params: dict[str, Any] = json_format.MessageToDict(job.params) if job.HasField("params") else {}
        timeout = duration_seconds(assignment.timeout) if assignment.HasField("timeout") else None
        log.info("job started", extra=fields)
        self._tasks[lease] = loop.create_task(
            self._run_job(self.handlers[job.type], params, ctx, active, timeout), name=f"job-{lease}"
        )

    # --- running handlers ---------------------------------------------------------------------------

    async def _run_job(
        self,
        spec: HandlerSpec,
        params: dict[str, Any],
        ctx: RemoteJobContext,
        active: ActiveJob,
        run_limit: float | None,
    ) -> None:
        """Run one handler and turn how it ended into the job's outcome."""
        assert self._runner is not None
        lease = active.lease
        timer = None
        if run_limit is not None:
            timer = asyncio.get_running_loop().call_later(run_limit, self._time_out, active, run_limit)
        try:
            value = await self._runner.run(spec, params, ctx)
            outcome = complete_request(lease, value)
        except asyncio.CancelledError:
            self._session.abandon(lease)
            raise
        except Exception as exc:
            outcome = exception_request(lease, exc, timed_out=active.timed_out)
        finally:
            if timer is not None:
                timer.cancel()
            self._tasks.pop(lease, None)
        sent = self._session.finished(lease, outcome)
        log.info(
            "job ended: %s",
            describe(outcome) if sent else "outcome dropped (lease lost or job handed back)",
            extra={"job_id": lease.job_id, "attempt": lease.attempt, "epoch": lease.epoch},
        )
        self._notify()

    def _time_out(self, active: ActiveJob, timeout: float) -> None:
        """The attempt's run time-out passed: stop the handler (the server fails the attempt anyway)."""
        active.timed_out = True
        active.cancel(f"timed out after {timeout:g} s")

    async def _cancel_handlers(self) -> None:
        """Last resort on exit: cancel async handlers still running (threads cannot be interrupted)."""
        for job in list(self._session.active.values()):
            job.cancel("worker shutting down")
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    # --- stopping -----------------------------------------------------------------------------------

    async def _drain(self, grace: float) -> None:
        assert self._done is not None and self._force is not None
        self._session.begin_stop()
        log.info(
            "worker draining",
            extra={"running_jobs": self._session.running, "grace": grace, "worker_id": self.worker_id},
        )
        try:
            if grace > 0:
                await self._wait_until(lambda: self._session.running == 0, grace)
            released = self._session.release_all("worker shutting down")
            if released:
                log.info(
                    "handing back %d running job(s)",
                    len(released),
                    extra={"job_ids": [lease.job_id for lease in released]},
                )
            # The last outcomes and releases: wait a little for the server to record them.
            await self._wait_until(lambda: not self._session.pending, SETTLE_TIMEOUT)
            if self._session.pending:
                log.warning(
                    "stopping with %d outcome(s) not acknowledged; their leases will expire",
                    len(self._session.pending),
                )
            await self._close_stream()
        finally:
            self._done.set()

    async def _wait_until(self, condition: Callable[[], bool], limit: float) -> None:
        """Wait for ``condition`` (re-checked on every change) at most ``limit`` s, or until forced."""
        assert self._force is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while not condition() and not self._force.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, remaining)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _close_stream(self) -> None:
        """Stop writing and give the server a moment to end the stream cleanly."""
        self._closing = True
        conn = self._connection
        if conn is not None:
            conn.closing = True
            conn.wake.set()
        if self._connections is not None:
            await asyncio.wait({self._connections}, timeout=CLOSE_TIMEOUT)
