"""Remote workers end to end, with real processes: a ``python -m jobwire.server`` child and
``python -m jobwire.cli worker`` children, killed, frozen, restarted and drained for real.

The server never loads ``support.worker_handlers``: the ``remote.*`` types run only on the workers.
This file talks to the server through the generated stubs alone (no ``jobwire.client``, no
``jobwire.worker``), and one test is a worker written against those stubs only.
"""

from __future__ import annotations

import queue
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc, worker_service_pb2_grpc
from jobwire.v1 import worker_service_pb2 as W
from support.servers import ServerProcess
from support.workers import WAIT, WorkerProcess

S = job_service_pb2
J = job_pb2

LEASE = "1s"  # short leases: a dead or frozen worker loses its job within about a second


# --- processes --------------------------------------------------------------------------------------


class Cluster:
    """A server process, its JobService stub, and the workers started against it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.server: ServerProcess | None = None
        self.channel: grpc.Channel | None = None
        self.stub: job_service_pb2_grpc.JobServiceStub | None = None
        self.workers: dict[str, WorkerProcess] = {}

    def start_server(self, store: str = "memory:", *extra: str) -> str:
        self.server = ServerProcess(store, "--lease-duration", LEASE, "--demo-handlers", "false", *extra)
        target = self.server.start()
        if self.channel is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(target)
        self.stub = job_service_pb2_grpc.JobServiceStub(self.channel)
        return target

    @property
    def jobs(self) -> job_service_pb2_grpc.JobServiceStub:
        assert self.stub is not None
        return self.stub

    def start_worker(self, worker_id: str, *extra: str, concurrency: int = 1) -> WorkerProcess:
        assert self.server is not None
        worker = WorkerProcess(self.server.target, worker_id, *extra, concurrency=concurrency).start()
        self.workers[worker_id] = worker
        worker.wait_registered()
        return worker

    def submit(self, job_type: str, params: dict[str, Any] | None = None, **fields: Any) -> J.Job:
        request = S.SubmitJobRequest(type=job_type, **fields)
        if params is not None:
            request.params.update(params)
        job: J.Job = self.jobs.SubmitJob(request, timeout=10).job
        return job

    def get(self, job_id: str) -> J.Job:
        job: J.Job = self.jobs.GetJob(S.GetJobRequest(job_id=job_id), timeout=10).job
        return job

    def wait_for(self, job_id: str, predicate: Callable[[J.Job], bool], timeout: float = WAIT) -> J.Job:
        """Follow WatchJob until ``predicate(job)`` holds; the job as it then is."""
        update: S.WatchJobResponse
        try:
            for update in self.jobs.WatchJob(S.WatchJobRequest(job_id=job_id), timeout=timeout):
                if predicate(update.job):
                    return update.job
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        job = self.get(job_id)
        assert predicate(job), f"job never reached the expected state: {job}"
        return job

    def wait_state(self, job_id: str, state: J.JobState.ValueType, timeout: float = WAIT) -> J.Job:
        return self.wait_for(job_id, lambda j: j.state == state, timeout)

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        if self.channel is not None:
            self.channel.close()
        if self.server is not None:
            self.server.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path)
    try:
        yield running
    finally:
        running.close()


def fast_retries(max_attempts: int = 3) -> J.RetryPolicy:
    """Retries without a noticeable back-off, so that tests wait for events, not timers."""
    return J.RetryPolicy(
        max_attempts=max_attempts,
        initial_backoff=duration_pb2.Duration(nanos=50_000_000),
        max_backoff=duration_pb2.Duration(nanos=100_000_000),
    )


def error_reason(status: Any) -> str:
    """The ErrorInfo reason of a google.rpc.Status ('' without one)."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def result_of(job: J.Job) -> dict[str, Any]:
    value: dict[str, Any] = json_format.MessageToDict(job.result)
    return value


# --- tests ------------------------------------------------------------------------------------------


def test_a_killed_workers_job_finishes_on_another_worker(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    job = cluster.submit("remote.sleep", {"seconds": 3, "steps": 30}, retry_policy=fast_retries())
    running = cluster.wait_state(job.id, J.JOB_STATE_RUNNING)
    victim = running.worker_id
    survivor = "w2" if victim == "w1" else "w1"
    assert victim in cluster.workers
    cluster.workers[victim].process.kill()  # type: ignore[union-attr]  # SIGKILL: no goodbye

    done = cluster.wait_for(job.id, lambda j: j.state in (J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED))
    assert done.state == J.JOB_STATE_SUCCEEDED, done
    assert done.attempt == 2
    assert done.worker_id == survivor
    assert result_of(done)["attempt"] == 2
    first = done.attempts[0]
    assert (first.attempt, first.worker_id) == (1, victim)
    assert first.outcome.code == code_pb2.ABORTED
    assert error_reason(first.outcome) == "LEASE_EXPIRED"
    assert done.attempts[-1].outcome.code == code_pb2.OK


def test_a_frozen_workers_late_writes_are_refused(cluster: Cluster) -> None:
    cluster.start_server()
    frozen = cluster.start_worker("w1")
    record = cluster.tmp_path / "record.txt"
    job = cluster.submit("remote.record", {"seconds": 2, "path": str(record)}, retry_policy=fast_retries())
    first = cluster.wait_state(job.id, J.JOB_STATE_RUNNING)
    assert first.worker_id == "w1"
    frozen.send_signal(signal.SIGSTOP)  # mid-attempt, past its lease: the server gives the job away
    try:
        cluster.start_worker("w2")
        done = cluster.wait_state(job.id, J.JOB_STATE_SUCCEEDED)
        assert (done.attempt, done.worker_id) == (2, "w2")
        assert error_reason(done.attempts[0].outcome) == "LEASE_EXPIRED"
    finally:
        frozen.send_signal(signal.SIGCONT)
    # The thawed worker finds out: a refused write, or a revoked lease for its heartbeat.
    frozen.wait_log(
        lambda e: (
            e.get("job_id") == job.id
            and ("refused" in e.get("message", "") or e.get("message", "").startswith("lease revoked"))
        )
    )
    frozen.wait_log(lambda e: e.get("job_id") == job.id and e.get("message", "").startswith("job ended"))

    final = cluster.get(job.id)
    assert final.state == J.JOB_STATE_SUCCEEDED and final.attempt == 2
    assert result_of(final) == {"attempt": 2, "epoch": done.lease_epoch}
    lines = [line.split(":") for line in record.read_text().split()]
    second = [line for line in lines if line[1] == "2"]
    assert second == [[job.id, "2", str(done.lease_epoch)]], "exactly one recorded second attempt"
    for job_id, attempt, epoch in lines:
        # The unfenced side effect of the frozen attempt may have happened; it carries the older epoch.
        assert job_id == job.id and attempt in ("1", "2")
        if attempt == "1":
            assert int(epoch) < done.lease_epoch
    print(f"side effects recorded: {lines}")


def test_cancelling_a_remote_job_reaches_its_worker(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    job = cluster.submit("remote.sleep", {"seconds": 600, "steps": 600})
    cluster.wait_for(job.id, lambda j: j.state == J.JOB_STATE_RUNNING and j.HasField("progress"))
    started = time.monotonic()
    cluster.jobs.CancelJob(S.CancelJobRequest(job_id=job.id, reason="test cancels"), timeout=10)
    done = cluster.wait_for(job.id, lambda j: j.state in (J.JOB_STATE_CANCELLED, J.JOB_STATE_FAILED))
    latency = time.monotonic() - started
    print(f"cancellation took {latency * 1000:.0f} ms to reach the worker and come back")
    assert done.state == J.JOB_STATE_CANCELLED
    assert done.error.code == code_pb2.CANCELLED
    assert latency < 10
    cluster.workers["w1"].wait_log(
        lambda e: e.get("job_id") == job.id and e.get("message") == "cancellation requested"
    )


def test_a_worker_written_against_the_generated_stubs_alone(cluster: Cluster) -> None:
    target = cluster.start_server()
    requests: queue.Queue[W.ConnectRequest | None] = queue.Queue()

    def outgoing() -> Iterator[W.ConnectRequest]:
        while (request := requests.get()) is not None:
            yield request

    with grpc.insecure_channel(target) as channel:
        responses = worker_service_pb2_grpc.WorkerServiceStub(channel).Connect(outgoing(), timeout=WAIT)
        try:
            requests.put(
                W.ConnectRequest(
                    register=W.RegisterWorker(
                        worker_id="raw-stubs",
                        job_types=[W.JobTypeDeclaration(type="raw.double")],
                        credits=1,
                    )
                )
            )
            first = next(responses)
            assert first.WhichOneof("message") == "registered"
            assert first.registered.lease_duration.ToNanoseconds() == 1_000_000_000

            job = cluster.submit("raw.double", {"x": 21})
            message = next(responses)
            while message.WhichOneof("message") != "assignment":
                message = next(responses)
            assignment = message.assignment
            assert assignment.job.id == job.id and assignment.lease.job_id == job.id
            lease = assignment.lease
            x = assignment.job.params["x"]
            requests.put(
                W.ConnectRequest(
                    report_progress=W.ReportProgress(
                        lease=lease, progress=J.Progress(percent=50, message="halfway")
                    )
                )
            )
            complete = W.CompleteJob(lease=lease)
            complete.result.update({"doubled": 2 * x})
            requests.put(W.ConnectRequest(complete_job=complete))
            message = next(responses)
            while message.WhichOneof("message") != "write_result":
                message = next(responses)
            assert message.write_result.accepted, message
            assert message.write_result.lease == lease
        finally:
            requests.put(None)
            responses.cancel()

    done = cluster.wait_state(job.id, J.JOB_STATE_SUCCEEDED)
    assert result_of(done) == {"doubled": 42}
    assert done.worker_id == "raw-stubs"
    assert done.progress.message == "halfway"


def test_a_declared_type_waits_for_a_worker_and_survives_a_restart(cluster: Cluster) -> None:
    store = f"sqlite:///{cluster.tmp_path / 'jobs.db'}"
    cluster.start_server(store)
    first = cluster.start_worker("w1")
    first.send_signal(signal.SIGTERM)
    assert first.wait_exit() == 0

    job = cluster.submit("remote.echo", {"hello": "world"})
    waiting = cluster.wait_for(job.id, lambda j: j.wait_reason == J.WAIT_REASON_NO_WORKER)
    assert waiting.state == J.JOB_STATE_QUEUED
    assert "remote.echo" in waiting.wait_message

    cluster.start_worker("w2")
    done = cluster.wait_state(job.id, J.JOB_STATE_SUCCEEDED)
    assert result_of(done) == {"hello": "world"}
    assert done.worker_id == "w2"
    cluster.workers.pop("w2").stop()

    assert cluster.server is not None
    cluster.server.kill()
    cluster.start_server(store)
    again = cluster.submit("remote.echo", {"after": "restart"})
    assert again.state == J.JOB_STATE_QUEUED
    waiting = cluster.wait_for(again.id, lambda j: j.wait_reason == J.WAIT_REASON_NO_WORKER)
    assert waiting.state == J.JOB_STATE_QUEUED
    with pytest.raises(grpc.RpcError) as unknown:
        cluster.submit("remote.never_declared")
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_draining_worker_hands_its_job_back(cluster: Cluster) -> None:
    cluster.start_server()
    draining = cluster.start_worker("w1", "--drain-grace", "0.5")
    job = cluster.submit("remote.sleep", {"seconds": 4, "steps": 40}, retry_policy=fast_retries())
    running = cluster.wait_state(job.id, J.JOB_STATE_RUNNING)
    assert running.worker_id == "w1"
    cluster.start_worker("w2")
    stopped_at = time.monotonic()
    draining.send_signal(signal.SIGTERM)
    assert draining.wait_exit() == 0
    print(f"the draining worker exited after {time.monotonic() - stopped_at:.2f} s")
    draining.wait_log(lambda e: e.get("message") == "handing back 1 running job(s)", timeout=1)

    done = cluster.wait_for(job.id, lambda j: j.state in (J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED))
    assert done.state == J.JOB_STATE_SUCCEEDED, done
    assert (done.attempt, done.worker_id) == (2, "w2")
    first = done.attempts[0]
    assert (first.worker_id, first.outcome.code) == ("w1", code_pb2.ABORTED)
    assert error_reason(first.outcome) == "ATTEMPT_RELEASED"


def test_a_non_retryable_failure_is_not_retried(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1", concurrency=2)
    bad = cluster.submit("remote.nonretryable", {"message": "no such customer"}, retry_policy=fast_retries(5))
    flaky = cluster.submit("remote.fail", {"message": "try again"}, retry_policy=fast_retries(2))

    failed = cluster.wait_state(bad.id, J.JOB_STATE_FAILED)
    assert failed.attempt == 1 and len(failed.attempts) == 1
    assert failed.error.code == code_pb2.UNKNOWN
    assert failed.error.message == "NonRetryableError: no such customer"

    retried = cluster.wait_state(flaky.id, J.JOB_STATE_FAILED)
    assert retried.attempt == 2 and len(retried.attempts) == 2
    assert retried.error.message == "ValueError: try again"


def test_running_work_survives_a_server_restart(cluster: Cluster) -> None:
    store = f"sqlite:///{cluster.tmp_path / 'jobs.db'}"
    cluster.start_server(store, "--lease-duration", "5s")
    assert cluster.server is not None
    port = cluster.server.port
    worker = cluster.start_worker("w1")
    job = cluster.submit("remote.sleep", {"seconds": 4, "steps": 40})
    cluster.wait_for(job.id, lambda j: j.state == J.JOB_STATE_RUNNING and j.HasField("progress"))

    cluster.server.kill()  # a crash: the worker's stream breaks, its handler keeps running
    cluster.start_server(store, "--lease-duration", "5s", "--port", str(port))
    worker.wait_registered(count=2)  # it reconnected and renewed its lease with a heartbeat

    done = cluster.wait_for(job.id, lambda j: j.state in (J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED))
    assert done.state == J.JOB_STATE_SUCCEEDED, done
    assert done.attempt == 1, "the attempt survived the restart: no retry"
    assert [a.outcome.code for a in done.attempts] == [code_pb2.OK]


def test_a_remote_job_keeps_its_last_progress_and_the_worker_exits_cleanly(cluster: Cluster) -> None:
    cluster.start_server()
    worker = cluster.start_worker("w1")
    worker.wait_registered()
    slept = cluster.submit("remote.sleep", {"seconds": 0.2, "steps": 2})
    done = cluster.wait_state(slept.id, J.JOB_STATE_SUCCEEDED)
    # The report sent just before the outcome is kept: 100% (2/2), not the step before.
    assert (done.progress.percent, done.progress.current_step, done.progress.total_steps) == (100.0, 2, 2)
    assert json_format.MessageToDict(done.progress.details) == {"steps_done": 2, "unit": "step"}
    echoed = cluster.submit("remote.echo", {"x": 1})  # a plain handler: it runs in a pool thread
    cluster.wait_state(echoed.id, J.JOB_STATE_SUCCEEDED)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait_exit() == 0
    assert not [e for e in worker.logs if "still running" in str(e.get("message"))], worker.logs[-5:]
