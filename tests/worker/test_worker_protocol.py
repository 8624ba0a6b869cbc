"""The Worker against a scripted fake WorkerService (a real grpc.aio server in the test's loop).

Each test plays the server's side of the conversation by hand, so that the worker's half of the
protocol (registration, credits, progress, outcomes, reconnection, fencing, draining) is checked
independently of the real server's implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2

from jobwire.client import UnauthenticatedError
from jobwire.handlers import HandlerSpec, JobContext, handler
from jobwire.v1 import job_pb2, worker_service_pb2_grpc
from jobwire.v1 import worker_service_pb2 as W
from jobwire.worker import Worker

STEP = 5.0  # seconds allowed for any one expected event

GATES: dict[str, asyncio.Event] = {}


@handler("fake.gated")
async def gated(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Reports progress, then waits for its gate (or cancellation)."""
    ctx.report_progress(percent=10, message="started")
    gate = GATES.setdefault(params["gate"], asyncio.Event())
    while not gate.is_set():
        await ctx.asleep(0.01)
    return {"gate": params["gate"], "attempt": ctx.attempt, "epoch": ctx.lease_epoch}


@handler("fake.double", max_attempts=3)
def double(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    return {"doubled": 2 * params["x"]}


HANDLERS: dict[str, HandlerSpec] = {
    "fake.gated": gated.__jobwire_handler__,  # type: ignore[attr-defined]
    "fake.double": double.__jobwire_handler__,  # type: ignore[attr-defined]
}


class FakeStream:
    """One Connect call as the test sees it: what the worker sent, and a way to answer."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self.metadata = metadata
        self.received: asyncio.Queue[W.ConnectRequest | None] = asyncio.Queue()  # None: worker closed
        self.outgoing: asyncio.Queue[W.ConnectResponse | grpc.StatusCode | None] = asyncio.Queue()
        self.batches = 0  # ConnectRequestBatch messages received (their contents are read one by one)
        self._unbatched: list[W.ConnectRequest] = []

    async def next(self, *kinds: str) -> W.ConnectRequest:
        """The next message of one of these kinds (heartbeats are skipped unless asked for)."""
        while True:
            if self._unbatched:
                message: W.ConnectRequest | None = self._unbatched.pop(0)
            else:
                message = await asyncio.wait_for(self.received.get(), STEP)
            assert message is not None, f"the worker closed the stream while {kinds} was expected"
            kind = message.WhichOneof("message")
            if kind == "batch":
                self.batches += 1
                self._unbatched.extend(message.batch.messages)
                continue
            if kind in kinds:
                return message
            assert kind == "heartbeat", f"expected {kinds}, got {message}"

    async def closed(self) -> None:
        """Wait until the worker half-closes the stream, skipping whatever it sends first."""
        while await asyncio.wait_for(self.received.get(), STEP) is not None:
            pass

    def send(self, **fields: Any) -> None:
        self.outgoing.put_nowait(W.ConnectResponse(**fields))

    def register(
        self, lease_seconds: float = 30.0, heartbeat_seconds: float = 60.0, accepts_batches: bool = False
    ) -> None:
        registered = W.WorkerRegistered(session_id="s1", accepts_batches=accepts_batches)
        registered.lease_duration.FromNanoseconds(int(lease_seconds * 1e9))
        registered.heartbeat_interval.FromNanoseconds(int(heartbeat_seconds * 1e9))
        self.send(registered=registered)

    def assign(
        self,
        job_id: str,
        job_type: str,
        params: dict[str, Any],
        attempt: int = 1,
        epoch: int = 1,
        run_limit: float | None = None,
    ) -> W.LeaseToken:
        struct = struct_pb2.Struct()
        struct.update(params)
        lease = W.LeaseToken(job_id=job_id, attempt=attempt, epoch=epoch)
        job = job_pb2.Job(
            id=job_id, type=job_type, state=job_pb2.JOB_STATE_RUNNING, params=struct, attempt=attempt
        )
        assignment = W.JobAssignment(job=job, lease=lease)
        if run_limit is not None:
            assignment.timeout.FromNanoseconds(int(run_limit * 1e9))
        self.send(assignment=assignment)
        return lease

    def assign_batch(self, jobs: list[tuple[str, dict[str, Any]]], job_type: str) -> list[W.LeaseToken]:
        """Several assignments in one ConnectResponseBatch."""
        messages = []
        for job_id, params in jobs:
            struct = struct_pb2.Struct()
            struct.update(params)
            lease = W.LeaseToken(job_id=job_id, attempt=1, epoch=1)
            job = job_pb2.Job(id=job_id, type=job_type, state=job_pb2.JOB_STATE_RUNNING, params=struct)
            messages.append(W.ConnectResponse(assignment=W.JobAssignment(job=job, lease=lease)))
        self.send(batch=W.ConnectResponseBatch(messages=messages))
        return [m.assignment.lease for m in messages]

    def ack(self, lease: W.LeaseToken, accepted: bool = True, reason: str = "") -> None:
        self.send(write_result=W.WriteResult(lease=lease, accepted=accepted, reason=reason))

    def fail(self, code: grpc.StatusCode) -> None:
        self.outgoing.put_nowait(code)


class FakeWorkerService(worker_service_pb2_grpc.WorkerServiceServicer):
    def __init__(self) -> None:
        self.streams: asyncio.Queue[FakeStream] = asyncio.Queue()

    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[W.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> None:
        stream = FakeStream({k: v for k, v in context.invocation_metadata() or ()})

        async def pump() -> None:
            async for request in request_iterator:
                stream.received.put_nowait(request)
            stream.received.put_nowait(None)
            stream.outgoing.put_nowait(None)  # like the real server: the worker closed, end the stream

        reader = asyncio.create_task(pump())
        self.streams.put_nowait(stream)
        try:
            while True:
                item = await stream.outgoing.get()
                if item is None:
                    return
                if isinstance(item, grpc.StatusCode):
                    await context.abort(item, f"fake server says {item.name}")
                await context.write(item)
        finally:
            reader.cancel()

    async def next_stream(self) -> FakeStream:
        return await asyncio.wait_for(self.streams.get(), STEP)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeWorkerService, str]]:
    server = grpc.aio.server()
    service = FakeWorkerService()
    worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    GATES.clear()
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        if not task.done():
            await asyncio.wait_for(worker.stop(grace=0), STEP * 2)
            await asyncio.wait_for(task, STEP)


def gate(name: str) -> asyncio.Event:
    return GATES.setdefault(name, asyncio.Event())


async def test_register_run_progress_complete_and_credit(fake: tuple[FakeWorkerService, str]) -> None:
    service, target = fake
    worker = Worker(target, HANDLERS, concurrency=3, worker_id="w-test", token="s3cret")
    async with running(worker):
        stream = await service.next_stream()
        register = (await stream.next("register")).register
        assert stream.metadata.get("authorization") == "Bearer s3cret"
        assert register.worker_id == "w-test"
        assert register.credits == 3
        types = {d.type: d for d in register.job_types}
        assert set(types) == {"fake.gated", "fake.double"}
        assert types["fake.double"].retry_policy.max_attempts == 3
        stream.register()

        lease = stream.assign("j1", "fake.double", {"x": 21})
        complete = (await stream.next("complete_job")).complete_job
        assert complete.lease == lease
        assert json_format.MessageToDict(complete.result) == {"doubled": 42.0}
        assert (await stream.next("add_credits")).add_credits.credits == 1
        stream.ack(lease)

        lease = stream.assign("j2", "fake.gated", {"gate": "g2"}, attempt=2, epoch=7)
        progress = (await stream.next("report_progress")).report_progress
        assert progress.lease == lease
        assert (progress.progress.percent, progress.progress.message) == (10.0, "started")
        gate("g2").set()
        complete = (await stream.next("complete_job")).complete_job
        assert json_format.MessageToDict(complete.result) == {"gate": "g2", "attempt": 2.0, "epoch": 7.0}
        stream.ack(lease)


async def test_a_batch_of_assignments_runs_and_every_outcome_arrives(
    fake: tuple[FakeWorkerService, str],
) -> None:
    service, target = fake
    worker = Worker(target, HANDLERS, concurrency=3)
    async with running(worker):
        stream = await service.next_stream()
        assert (await stream.next("register")).register.accepts_batches
        stream.register(accepts_batches=True)
        gate("b").clear()
        leases = stream.assign_batch([(f"b{i}", {"gate": "b"}) for i in range(3)], "fake.gated")
        for _ in leases:  # all three run: the assignments inside the batch were handled one by one
            await stream.next("report_progress")
        gate("b").set()  # outcomes and credits go out together as far as they are queued together
        outcomes: list[str] = []
        credits = 0
        while len(outcomes) < 3 or credits < 3:
            message = await stream.next("complete_job", "add_credits")
            if message.HasField("complete_job"):
                outcomes.append(message.complete_job.lease.job_id)
            else:
                credits += message.add_credits.credits
        assert sorted(outcomes) == ["b0", "b1", "b2"] and credits == 3


async def test_heartbeats_carry_the_running_leases(fake: tuple[FakeWorkerService, str]) -> None:
    service, target = fake
    async with running(Worker(target, HANDLERS, concurrency=2)):
        stream = await service.next_stream()
        await stream.next("register")
        stream.register(lease_seconds=0.3, heartbeat_seconds=0.1)
        lease = stream.assign("j1", "fake.gated", {"gate": "hb"})
        await stream.next("report_progress")
        beats = [(await stream.next("heartbeat")).heartbeat for _ in range(3)]
        assert all(list(beat.leases) == [lease] for beat in beats)
        gate("hb").set()
        await stream.next("complete_job")
        stream.ack(lease)


async def test_cancel_requested_fails_the_job_as_cancelled(fake: tuple[FakeWorkerService, str]) -> None:
    service, target = fake
    async with running(Worker(target, HANDLERS)):
        stream = await service.next_stream()
        await stream.next("register")
        stream.register()
        lease = stream.assign("j1", "fake.gated", {"gate": "never"})
        await stream.next("report_progress")
        stream.send(cancel_requested=W.CancelRequested(lease=lease, reason="user asked"))
        fail = (await stream.next("fail_job")).fail_job
        assert fail.lease == lease
        assert (fail.error.code, fail.error.message) == (code_pb2.CANCELLED, "user asked")
        await stream.next("add_credits")
        stream.ack(lease)


async def test_a_revoked_lease_is_stopped_and_its_outcome_never_sent(
    fake: tuple[FakeWorkerService, str],
) -> None:
    service, target = fake
    async with running(Worker(target, HANDLERS)):
        stream = await service.next_stream()
        await stream.next("register")
        stream.register()
        lease = stream.assign("j1", "fake.gated", {"gate": "never"})
        await stream.next("report_progress")
        stream.send(lease_revoked=W.LeaseRevoked(lease=lease, reason="expired"))
        # The handler stops; all the server hears of it is the credit coming back.
        assert (await stream.next("add_credits", "fail_job", "complete_job")).WhichOneof("message") == (
            "add_credits"
        )
        # A later job still runs normally.
        second = stream.assign("j2", "fake.double", {"x": 1})
        assert (await stream.next("complete_job", "fail_job")).complete_job.lease == second
        stream.ack(second)


async def test_reconnection_keeps_running_jobs_and_resends_unacknowledged_outcomes(
    fake: tuple[FakeWorkerService, str],
) -> None:
    service, target = fake
    worker = Worker(target, HANDLERS, concurrency=4, reconnect_backoff=(0.05, 0.2))
    async with running(worker):
        stream = await service.next_stream()
        await stream.next("register")
        stream.register()
        long_lease = stream.assign("long", "fake.gated", {"gate": "long"}, epoch=5)
        await stream.next("report_progress")
        done_lease = stream.assign("done", "fake.double", {"x": 2})
        await stream.next("complete_job")  # written, but the server "crashes" before answering
        await stream.next("add_credits")
        stream.fail(grpc.StatusCode.UNAVAILABLE)

        again = await service.next_stream()
        register = (await again.next("register")).register
        assert register.credits == 3, "one slot is still taken by the running job"
        again.register()
        beat = (await again.next("heartbeat")).heartbeat
        assert list(beat.leases) == [long_lease]
        resent = (await again.next("complete_job")).complete_job
        assert resent.lease == done_lease
        again.ack(done_lease)

        gate("long").set()  # the handler kept running across the reconnection
        finished = (await again.next("complete_job")).complete_job
        assert finished.lease == long_lease
        again.ack(long_lease)
        assert (await again.next("add_credits")).add_credits.credits == 1


async def test_stop_hands_running_jobs_back_and_closes_the_stream(
    fake: tuple[FakeWorkerService, str],
) -> None:
    service, target = fake
    worker = Worker(target, HANDLERS, concurrency=2, drain_grace=0.2)
    task = asyncio.create_task(worker.run())
    stream = await service.next_stream()
    await stream.next("register")
    stream.register()
    lease = stream.assign("j1", "fake.gated", {"gate": "never"})
    await stream.next("report_progress")
    stopping = asyncio.create_task(worker.stop())
    release = (await stream.next("release_job")).release_job
    assert release.lease == lease
    assert release.reason == "worker shutting down"
    # Still stopping: a late assignment is handed back at once.
    late = stream.assign("j2", "fake.double", {"x": 1})
    assert (await stream.next("release_job")).release_job.lease == late
    stream.ack(lease)
    stream.ack(late)
    await stream.closed()
    await asyncio.wait_for(stopping, STEP)
    await asyncio.wait_for(task, STEP)
    assert worker.running_jobs == 0


async def test_stop_lets_running_jobs_finish_within_the_grace(fake: tuple[FakeWorkerService, str]) -> None:
    service, target = fake
    worker = Worker(target, HANDLERS, concurrency=2)
    task = asyncio.create_task(worker.run())
    stream = await service.next_stream()
    await stream.next("register")
    stream.register()
    lease = stream.assign("j1", "fake.gated", {"gate": "soon"})
    await stream.next("report_progress")
    stopping = asyncio.create_task(worker.stop(grace=STEP))
    await asyncio.sleep(0.1)
    gate("soon").set()
    assert (await stream.next("complete_job", "release_job")).complete_job.lease == lease
    stream.ack(lease)
    await stream.closed()  # no AddCredits while stopping
    await asyncio.wait_for(stopping, STEP)
    await asyncio.wait_for(task, STEP)


async def test_a_refused_worker_stops_with_the_error(fake: tuple[FakeWorkerService, str]) -> None:
    service, target = fake
    worker = Worker(target, HANDLERS)
    task = asyncio.create_task(worker.run())
    stream = await service.next_stream()
    await stream.next("register")
    stream.fail(grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(UnauthenticatedError):
        await asyncio.wait_for(task, STEP)


async def test_the_worker_keeps_trying_while_the_server_is_down() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")  # reserve a port, serve nothing on it yet
    worker = Worker(f"127.0.0.1:{port}", HANDLERS, reconnect_backoff=(0.05, 0.2))
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.5)
    assert not task.done() and not worker.connected
    service = FakeWorkerService()
    worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(service, server)
    await server.start()
    try:
        stream = await service.next_stream()
        await stream.next("register")
        stream.register()
        for _ in range(100):
            if worker.connected:
                break
            await asyncio.sleep(0.02)
        assert worker.connected
        await asyncio.wait_for(worker.stop(), STEP)
        await asyncio.wait_for(task, STEP)
    finally:
        await server.stop(0)


async def test_an_attempt_past_its_time_out_is_stopped_by_the_worker(
    fake: tuple[FakeWorkerService, str],
) -> None:
    service, target = fake
    async with running(Worker(target, HANDLERS)):
        stream = await service.next_stream()
        await stream.next("register")
        stream.register()
        lease = stream.assign("j1", "fake.gated", {"gate": "never"}, run_limit=0.2)
        await stream.next("report_progress")
        fail = (await stream.next("fail_job", "complete_job")).fail_job
        assert fail.lease == lease
        assert fail.error.code == code_pb2.DEADLINE_EXCEEDED
        assert not fail.non_retryable
        stream.ack(lease)


async def test_a_second_stop_cuts_the_drain_short(fake: tuple[FakeWorkerService, str]) -> None:
    service, target = fake
    worker = Worker(target, HANDLERS, drain_grace=3600)
    task = asyncio.create_task(worker.run())
    stream = await service.next_stream()
    await stream.next("register")
    stream.register()
    lease = stream.assign("j1", "fake.gated", {"gate": "never"})
    await stream.next("report_progress")
    patient = asyncio.create_task(worker.stop())
    await asyncio.sleep(0.2)
    assert not patient.done(), "the first stop waits for the running job"
    impatient = asyncio.create_task(worker.stop(grace=0))
    assert (await stream.next("release_job")).release_job.lease == lease
    stream.ack(lease)
    await asyncio.wait_for(asyncio.gather(patient, impatient, task), STEP)
