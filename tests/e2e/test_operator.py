"""What an operator sees: one clear line for every mistake, one server per SQLite file, and a drain that
load balancers, watchers and clients can follow."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from support.servers import TESTS_DIR, ServerProcess

S = job_service_pb2
J = job_pb2


def serve(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``jobwire serve ARGS`` through the CLI entry point, expected to exit by itself."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "jobwire.cli", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--log-level", "LOUD"], "--log-level: not a log level: 'LOUD'"),
        (["--store", "bogus"], "--store: unsupported store 'bogus'"),
        (["--handlers", "no.such.module"], "--handlers: cannot import no.such.module"),
        (["--port", "abc"], "--port: not a port number: 'abc'"),
        (["--port", "70000"], "--port: not a port number: 70000"),
        (["--drain-grace", "soon"], "--drain-grace: not a duration: 'soon'"),
        (["--store", "sqlite:////proc/no/such/dir/jobs.db"], "cannot open the store"),
    ],
)
def test_operator_mistakes_get_one_clear_line(args: list[str], says: str) -> None:
    done = serve("--store", "memory:", *args)
    assert done.returncode in (1, 2)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobwire serve: ") and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    first = ServerProcess("memory:")
    first.start()
    try:
        done = serve("--store", "memory:", "--port", str(first.port))
        assert done.returncode == 1
        assert (
            done.stderr.strip()
            == f"jobwire serve: cannot listen on localhost:{first.port}: the port is in use (--port)"
        )
    finally:
        first.kill()


def test_serve_finds_handler_modules_in_the_current_directory(tmp_path: Path) -> None:
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "jobs.py").write_text(
        "from jobwire.handlers import handler\n\n"
        "@handler('my.job')\nasync def job(params, ctx):\n    return {}\n"
    )
    server = ServerProcess("memory:", "--handlers", "mypkg.jobs", cwd=tmp_path)
    server.start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            job = (
                job_service_pb2_grpc.JobServiceStub(channel).SubmitJob(S.SubmitJobRequest(type="my.job")).job
            )
        assert job.state == J.JOB_STATE_QUEUED
    finally:
        server.kill()


def test_a_second_server_on_one_sqlite_file_refuses_to_start(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = ServerProcess(store)
    first.start()
    try:
        assert first.process is not None
        done = serve("--store", store)
        assert done.returncode == 1
        line = done.stderr.strip()
        assert "\n" not in line and f"another Jobwire server (pid {first.process.pid}) is using" in line, line
    finally:
        first.kill()
    # The lock dies with its holder (even a SIGKILLed one): the store opens again.
    again = ServerProcess(store)
    again.start()
    again.kill()


def _resume_point(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return dict(info.metadata)
    return {}


def test_drain_turns_health_first_keeps_serving_then_ends_watches_early(tmp_path: Path) -> None:
    server = ServerProcess(f"sqlite:///{tmp_path / 'jobs.db'}", "--drain-delay", "2s", "--drain-grace", "20s")
    server.start()
    assert server.process is not None
    channel = grpc.insecure_channel(server.target)
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        running = stub.SubmitJob(S.SubmitJobRequest(type="test.wait_cancel")).job  # holds the grace period
        stream = stub.WatchJob(S.WatchJobRequest(job_id=running.id), timeout=60)
        assert next(stream).job.id == running.id
        server.process.send_signal(15)
        while (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        ):
            pass
        # NOT_SERVING, and the server still takes work: load balancers have time to move away.
        accepted = stub.SubmitJob(S.SubmitJobRequest(type="test.echo"), timeout=5).job
        assert accepted.state == J.JOB_STATE_QUEUED
        # Then the watch ends with UNAVAILABLE and where to resume, long before the grace period is over.
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        resume = _resume_point(ended.value)
        assert resume["job_id"] == running.id and int(resume["after_sequence"]) >= 1
        assert server.process.poll() is None, "the server was still draining its running job"
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitJob(S.SubmitJobRequest(type="test.echo"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
        server.kill()


def test_calls_in_flight_at_drain_complete_or_get_unavailable_never_cancelled(tmp_path: Path) -> None:
    server = ServerProcess(f"sqlite:///{tmp_path / 'jobs.db'}", "--drain-delay", "0.5s")
    server.start()
    assert server.process is not None
    codes: dict[str, int] = {}
    stop = threading.Event()

    async def submit_until_refused() -> None:
        async with grpc.aio.insecure_channel(server.target) as aio_channel:
            aio_stub = job_service_pb2_grpc.JobServiceStub(aio_channel)

            async def one() -> None:
                try:
                    await aio_stub.SubmitJob(S.SubmitJobRequest(type="test.echo"), timeout=20)
                    name = "OK"
                except grpc.aio.AioRpcError as error:
                    name = error.code().name
                codes[name] = codes.get(name, 0) + 1
                if name != "OK":
                    stop.set()

            while not stop.is_set():
                await asyncio.gather(*(one() for _ in range(32)))

    runner = threading.Thread(target=asyncio.run, args=(submit_until_refused(),))
    runner.start()
    while codes.get("OK", 0) < 200:
        time.sleep(0.01)
    server.process.send_signal(15)
    runner.join(60)
    server.process.wait(60)
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes.get("UNAVAILABLE")


async def test_a_recovering_server_answers_health_not_serving_and_calls_unavailable(tmp_path: Path) -> None:
    """While the queue is loaded from the store (long with a deep one), the port is open: health says
    NOT_SERVING and calls get UNAVAILABLE with SERVER_STARTING and a RetryInfo, instead of connections
    being refused; then SERVING."""
    from jobwire.server.app import JobwireServer
    from jobwire.server.config import ServerConfig
    from jobwire.server.stores.base import QueuedJob

    server = JobwireServer(ServerConfig(host="127.0.0.1", port=0, store=f"sqlite:///{tmp_path / 'jobs.db'}"))
    store = server.manager.store
    recovering = asyncio.Event()
    load_queue = store.load_queue

    async def slow_load_queue() -> list[QueuedJob]:
        await recovering.wait()  # the seam: a queue that takes as long as the test wants to load
        return await load_queue()

    store.load_queue = slow_load_queue  # type: ignore[method-assign]
    starting = asyncio.create_task(server.start())
    for _ in range(500):  # the port is open before the queue is recovered
        if server.port:
            break
        assert not starting.done(), starting
        await asyncio.sleep(0.01)
    assert server.port, "the server listened only after recovering"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            for service in ("", "jobwire.v1.JobService", "jobwire.v1.WorkerService"):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SubmitJob(job_service_pb2.SubmitJobRequest(type="demo.echo"), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            status = rpc_status.from_call(refused.value)
            assert status is not None
            details = {detail.type_url.rsplit("/", 1)[-1]: detail for detail in status.details}
            info = error_details_pb2.ErrorInfo()
            details["google.rpc.ErrorInfo"].Unpack(info)
            assert info.reason == "SERVER_STARTING" and "google.rpc.RetryInfo" in details

            recovering.set()
            await starting
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            job = (await stub.SubmitJob(job_service_pb2.SubmitJobRequest(type="demo.echo"), timeout=5)).job
            assert job.state == job_pb2.JOB_STATE_QUEUED
    finally:
        recovering.set()
        await server.stop(grace=0)
