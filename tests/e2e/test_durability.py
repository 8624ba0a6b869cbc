"""Crash, restart, drain and retention: nothing acknowledged is ever lost, nothing stays RUNNING forever."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from jobwire.server.clock import FakeClock
from jobwire.server.config import ServerConfig
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from support.servers import ServerProcess, ServerThread

S = job_service_pb2
J = job_pb2


def connect(target: str) -> tuple[grpc.Channel, job_service_pb2_grpc.JobServiceStub]:
    channel = grpc.insecure_channel(target)
    return channel, job_service_pb2_grpc.JobServiceStub(channel)


def wait_running(stub: job_service_pb2_grpc.JobServiceStub, job_id: str) -> J.Job:
    update: S.WatchJobResponse
    for update in stub.WatchJob(S.WatchJobRequest(job_id=job_id), timeout=30):
        if update.job.state == J.JOB_STATE_RUNNING:
            return update.job
    raise AssertionError("job never ran")


def test_sigkill_then_restart_keeps_every_acknowledged_job(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = ServerProcess(store, "--max-running", "1", "--drain-grace", "0.5")
    first.start()
    channel, stub = connect(first.target)
    try:
        running = stub.SubmitJob(S.SubmitJobRequest(type="test.wait_cancel")).job
        wait_running(stub, running.id)
        queued = [
            stub.SubmitJob(S.SubmitJobRequest(type="test.echo", priority=p, request_id=f"r{i}")).job
            for i, p in enumerate([3, 7, 3, 7, 5] * 10)
        ]
        done = stub.SubmitJob(S.SubmitJobRequest(type="test.echo", priority=9))
        cancelled = stub.CancelJob(S.CancelJobRequest(job_id=queued[0].id)).job
        assert cancelled.state == J.JOB_STATE_CANCELLED
        expected_order = [
            j.id
            for j in sorted(queued[1:], key=lambda j: -j.priority)  # stable: FIFO within a priority
        ]
    finally:
        channel.close()
        first.kill()  # SIGKILL: no drain, no flush

    second = ServerProcess(store, "--max-running", "1", "--drain-grace", "0.5", "--aging-interval", "0")
    second.start()
    channel, stub = connect(second.target)
    try:
        again = wait_running(stub, running.id)
        assert again.attempt == 2, "the attempt the crash interrupted is retried as attempt 2"
        jobs = {j.id: j for j in _list_all(stub)}
        assert len(jobs) == 1 + len(queued) + 1
        assert jobs[done.job.id].state in (J.JOB_STATE_QUEUED, J.JOB_STATE_SUCCEEDED)
        assert jobs[queued[0].id].state == J.JOB_STATE_CANCELLED
        positions = {
            job_id: stub.GetJob(S.GetJobRequest(job_id=job_id)).job.queue_position
            for job_id in expected_order
        }
        assert sorted(expected_order, key=positions.__getitem__) == expected_order
        # The same request_id after the restart still finds the same job.
        assert (
            stub.SubmitJob(S.SubmitJobRequest(type="test.echo", priority=7, request_id="r1")).job.id
            == queued[1].id
        )

        # A watcher during a graceful drain is told to reconnect, and the running job is queued again.
        watch = stub.WatchJob(S.WatchJobRequest(job_id=running.id), timeout=30)
        next(watch)
        assert second.terminate() == 0
        with pytest.raises(grpc.RpcError) as caught:
            list(watch)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "after_sequence=" in caught.value.details()
    finally:
        channel.close()
        second.kill()

    third = ServerProcess(store, "--max-running", "1", "--drain-grace", "0.5")
    third.start()
    channel, stub = connect(third.target)
    try:
        assert wait_running(stub, running.id).attempt == 3
        stub.CancelJob(S.CancelJobRequest(job_id=running.id))
        for update in stub.WatchJob(S.WatchJobRequest(job_id=running.id), timeout=30):
            last = update.job
        assert last.state == J.JOB_STATE_CANCELLED
        for job in queued[1:]:
            final = list(stub.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=30))[-1].job
            assert final.state == J.JOB_STATE_SUCCEEDED
    finally:
        channel.close()
        third.terminate()


def _list_all(stub: job_service_pb2_grpc.JobServiceStub) -> list[J.Job]:
    jobs: list[J.Job] = []
    token = ""
    while True:
        page = stub.ListJobs(S.ListJobsRequest(page_size=7, page_token=token))
        jobs.extend(page.jobs)
        token = page.next_page_token
        if not token:
            return jobs


def test_draining_server_refuses_new_jobs(tmp_path: Path) -> None:
    thread = ServerThread(ServerConfig(host="127.0.0.1", port=0, store=f"sqlite:///{tmp_path / 'j.db'}"))
    thread.start()
    channel, stub = connect(thread.target)
    try:
        assert thread.server is not None
        manager = thread.server.manager

        async def drain() -> None:
            await manager.drain(0)

        thread.call(drain())
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(S.SubmitJobRequest(type="test.echo"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stub.GetQueueStats(S.GetQueueStatsRequest()).draining
    finally:
        channel.close()
        thread.stop()


def test_finished_jobs_are_purged_after_retention(tmp_path: Path) -> None:
    clock = FakeClock()
    config = ServerConfig(host="127.0.0.1", port=0, store=f"sqlite:///{tmp_path / 'j.db'}", retention=3600.0)
    thread = ServerThread(config, clock=clock)
    thread.start()
    channel, stub = connect(thread.target)
    try:
        assert thread.server is not None
        manager = thread.server.manager
        old = stub.SubmitJob(S.SubmitJobRequest(type="test.echo")).job
        final = list(stub.WatchJob(S.WatchJobRequest(job_id=old.id), timeout=30))[-1].job
        assert final.expire_time.seconds == pytest.approx(final.end_time.seconds + 3600, abs=1)
        clock.advance(1800)
        young = stub.SubmitJob(S.SubmitJobRequest(type="test.echo")).job
        list(stub.WatchJob(S.WatchJobRequest(job_id=young.id), timeout=30))
        unfinished = stub.SubmitJob(S.SubmitJobRequest(type="test.wait_cancel")).job
        clock.advance(1800)
        assert thread.call(manager.sweep()) == 1
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetJob(S.GetJobRequest(job_id=old.id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.GetJob(S.GetJobRequest(job_id=young.id)).job.state == J.JOB_STATE_SUCCEEDED
        assert stub.GetJob(S.GetJobRequest(job_id=unfinished.id)).job.state == J.JOB_STATE_RUNNING
        stub.CancelJob(S.CancelJobRequest(job_id=unfinished.id))
    finally:
        channel.close()
        thread.stop()
