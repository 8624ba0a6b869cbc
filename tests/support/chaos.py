"""Chaos on a cluster: replicas killed with SIGKILL and restarted while jobs, workers and watchers run.

Three server processes on one PostgreSQL schema (fixed ports, so a restarted replica comes back where
clients look for it), two worker processes connected to all three, a submitter that keeps submitting
(each job with a request_id, retried on UNAVAILABLE until acknowledged, as the SDK does), and watchers
that follow a sample of the jobs, resuming with ``after_sequence`` wherever they can. Every few seconds
a random replica is killed with SIGKILL and started again.

Afterwards the cluster is left alone until every acknowledged job has ended, and the report counts:
acknowledged jobs lost, jobs that succeeded twice (two accepted successful attempts), jobs stuck
(not finished in time), watch gaps (a watcher that missed a state transition or saw sequences go
backwards), and for each kill the time until the next job started.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from dataclasses import dataclass, field

import grpc
import grpc.aio

from jobwire.client.channels import open_aio_channel
from jobwire.server.state_machine import TRANSITIONS, JobState
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from support.postgres import drop_schema, new_schema, store_url
from support.servers import ServerProcess
from support.workers import WorkerProcess

S = job_service_pb2
J = job_pb2
TERMINAL = {J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED, J.JOB_STATE_CANCELLED}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


@dataclass
class Kill:
    at: float  # wall clock
    port: int
    was_dispatcher: bool
    next_start: float | None = None  # wall clock of the first job start after the kill

    @property
    def gap(self) -> float | None:
        return None if self.next_start is None else self.next_start - self.at


@dataclass
class ChaosReport:
    seconds: float = 0.0
    acknowledged: int = 0
    finished: int = 0
    lost: list[str] = field(default_factory=list)
    succeeded_twice: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    watched: int = 0
    watch_gaps: list[str] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    submit_errors: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        dispatcher_gaps = [k.gap for k in self.kills if k.was_dispatcher and k.gap is not None]
        other_gaps = [k.gap for k in self.kills if not k.was_dispatcher and k.gap is not None]
        return [
            f"chaos for {self.seconds:.0f} s: {len(self.kills)} replicas killed with SIGKILL and restarted",
            f"acknowledged jobs {self.acknowledged}, finished {self.finished}",
            f"acknowledged jobs lost {len(self.lost)}",
            f"jobs that succeeded twice under valid leases {len(self.succeeded_twice)}",
            f"jobs stuck {len(self.stuck)}",
            f"watched jobs {self.watched}, watch gaps {len(self.watch_gaps)}",
            "kill -> next job start, dispatcher killed (s): " + _figures(dispatcher_gaps),
            "kill -> next job start, another replica killed (s): " + _figures(other_gaps),
            f"submit calls that failed and were retried: {self.submit_errors or 'none'}",
        ]


def _figures(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"n={len(ordered)} median {ordered[len(ordered) // 2]:.2f} max {ordered[-1]:.2f}"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Chaos:
    def __init__(self, duration: float, kill_every: float, seed: int = 1, rate: float = 40.0) -> None:
        self.duration = duration
        self.kill_every = kill_every
        self.rng = random.Random(seed)
        self.rate = rate  # submits per second
        self.schema = new_schema()
        self.url = store_url(self.schema)
        self.ports = _free_ports(3)
        self.servers: dict[int, ServerProcess] = {}
        self.workers: list[WorkerProcess] = []
        self.report = ChaosReport()
        self.acknowledged: list[str] = []
        self._stop = asyncio.Event()

    @property
    def target(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def _start_server(self, port: int) -> ServerProcess:
        server = ServerProcess(
            self.url,
            "--port",
            str(port),
            "--lease-duration",
            "2s",
            "--max-running",
            "4",
            "--cancel-grace",
            "1s",
        )
        server.start(timeout=60)
        self.servers[port] = server
        return server

    async def run(self) -> ChaosReport:
        began = time.monotonic()
        try:
            for port in self.ports:
                self._start_server(port)
            for i in range(2):
                worker = WorkerProcess(
                    self.target, f"chaos-w{i}", "--drain-grace", "1s", concurrency=4
                ).start()
                self.workers.append(worker)
                worker.wait_registered()
            async with open_aio_channel(self.target) as channel:
                stub = job_service_pb2_grpc.JobServiceStub(channel)
                watchers: list[asyncio.Task[None]] = []
                submitter = asyncio.create_task(self._submit_forever(stub, watchers))
                await self._kill_for(self.duration)
                self._stop.set()
                await submitter
                await asyncio.gather(*watchers)
                await self._settle(stub)
        finally:
            for worker in self.workers:
                worker.stop()
            for server in self.servers.values():
                server.kill()
            await drop_schema(self.schema)
        self.report.seconds = time.monotonic() - began
        return self.report

    # -- the load -----------------------------------------------------------------------------------

    async def _submit_forever(
        self, stub: job_service_pb2_grpc.JobServiceStub, watchers: list[asyncio.Task[None]]
    ) -> None:
        number = 0
        while not self._stop.is_set():
            number += 1
            job_type = "remote.echo" if number % 3 else "test.echo"
            request = S.SubmitJobRequest(type=job_type, request_id=f"chaos-{self.schema}-{number}")
            request.params.update({"n": number})
            request.retry_policy.max_attempts = 20
            job_id = await self._submit(stub, request)
            if job_id is not None:
                self.acknowledged.append(job_id)
                if number % 4 == 0:
                    self.report.watched += 1
                    watchers.append(asyncio.create_task(self._watch(stub, job_id)))
            await asyncio.sleep(1 / self.rate)

    async def _submit(
        self, stub: job_service_pb2_grpc.JobServiceStub, request: S.SubmitJobRequest
    ) -> str | None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                response = await stub.SubmitJob(request, timeout=5)
                return str(response.job.id)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    raise
                name = error.code().name
                self.report.submit_errors[name] = self.report.submit_errors.get(name, 0) + 1
                await asyncio.sleep(0.1)
        return None  # never acknowledged: not counted

    async def _watch(self, stub: job_service_pb2_grpc.JobServiceStub, job_id: str) -> None:
        """Follow one job to its end across broken streams; record a gap if a transition is missed."""
        last_sequence, last_state = 0, None
        deadline = time.monotonic() + self.duration + 90
        while time.monotonic() < deadline:
            try:
                call = stub.WatchJob(
                    S.WatchJobRequest(job_id=job_id, after_sequence=last_sequence), timeout=30
                )
                async for update in call:
                    if update.sequence <= last_sequence and last_sequence:
                        self.report.watch_gaps.append(
                            f"{job_id}: sequence {update.sequence} after {last_sequence}"
                        )
                        return
                    state = JobState(update.job.state)
                    if (
                        last_state is not None
                        and state != last_state
                        and state not in TRANSITIONS[last_state]
                    ):
                        self.report.watch_gaps.append(f"{job_id}: {last_state.name} -> {state.name}")
                        return
                    last_sequence, last_state = update.sequence, state
                    if update.job.state in TERMINAL:
                        return
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                    self.report.watch_gaps.append(f"{job_id}: resume point {last_sequence} lost")
                    return
                if error.code() not in RETRYABLE and error.code() != grpc.StatusCode.UNKNOWN:
                    raise
            await asyncio.sleep(0.1)
        self.report.watch_gaps.append(f"{job_id}: never saw the end")

    # -- the chaos ----------------------------------------------------------------------------------

    def _dispatcher_port(self) -> int | None:
        """The replica that logged taking the dispatcher lock last (the live one among them)."""
        best: tuple[str, int] | None = None
        for port, server in self.servers.items():
            for line in server.log_lines:
                if "dispatches (epoch" in line and (best is None or line > best[0]):
                    best = (line, port)
        return None if best is None else best[1]

    async def _kill_for(self, duration: float) -> None:
        end = time.monotonic() + duration
        while time.monotonic() < end:
            await asyncio.sleep(self.kill_every * (0.5 + self.rng.random()))
            if time.monotonic() >= end:
                break
            port = self.rng.choice(self.ports)
            dispatcher = self._dispatcher_port() == port
            self.servers[port].kill()
            self.report.kills.append(Kill(time.time(), port, dispatcher))
            await asyncio.sleep(0.3)
            await asyncio.get_running_loop().run_in_executor(None, self._start_server, port)

    async def _settle(self, stub: job_service_pb2_grpc.JobServiceStub) -> None:
        """Let every acknowledged job end, then count what went wrong."""
        report = self.report
        report.acknowledged = len(self.acknowledged)
        deadline = time.monotonic() + 90
        pending = list(self.acknowledged)
        jobs: dict[str, J.Job] = {}
        while pending and time.monotonic() < deadline:
            still = []
            for job_id in pending:
                try:
                    job = (await stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10)).job
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        report.lost.append(job_id)
                        continue
                    still.append(job_id)
                    continue
                jobs[job_id] = job
                if job.state not in TERMINAL:
                    still.append(job_id)
            pending = still
            if pending:
                await asyncio.sleep(0.5)
        report.stuck = pending
        report.finished = sum(1 for job in jobs.values() if job.state in TERMINAL)
        for job_id, job in jobs.items():
            successes = sum(1 for a in job.attempts if a.outcome.code == 0)
            if successes > 1:
                report.succeeded_twice.append(job_id)
        starts = sorted(
            [a.start_time.ToNanoseconds() / 1e9 for job in jobs.values() for a in job.attempts]
            + [job.start_time.ToNanoseconds() / 1e9 for job in jobs.values() if job.HasField("start_time")]
        )
        for kill in report.kills:
            later = [s for s in starts if s > kill.at]
            kill.next_start = later[0] if later else None
