"""Every stored field has a cap, and no reply can outgrow the message limit whatever the store holds."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2

from jobwire.server.clock import FakeClock
from jobwire.server.config import ServerConfig
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from jobwire.v1 import worker_service_pb2 as W
from support.raw_worker import RawWorker
from support.servers import ServerThread

S = job_service_pb2
J = job_pb2
MESSAGE_LIMIT = 4 << 20


@pytest.fixture
def stub(server: ServerThread) -> Iterator[job_service_pb2_grpc.JobServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield job_service_pb2_grpc.JobServiceStub(channel)


def _reason(status: object) -> str:
    for detail in status.details:  # type: ignore[attr-defined]
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def test_big_params_never_make_a_listing_unreadable(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    blob = "p" * (900 * 1024)
    ids = []
    for i in range(6):
        request = S.SubmitJobRequest(type="test.gate", labels={"batch": "big"})
        request.params.update({"blob": blob, "i": i})
        ids.append(stub.SubmitJob(request).job.id)
    # The default (basic) view leaves the payload out: one small page.
    page = stub.ListJobs(S.ListJobsRequest(labels={"batch": "big"}))
    assert [j.id for j in page.jobs] == list(reversed(ids))
    assert all(not j.HasField("params") for j in page.jobs) and not page.next_page_token
    # The full view carries it, in pages that stop before the message limit.
    seen, token = [], ""
    while True:
        listing = S.ListJobsRequest(labels={"batch": "big"}, view=J.JOB_VIEW_FULL, page_token=token)
        page = stub.ListJobs(listing)
        assert page.ByteSize() < MESSAGE_LIMIT and page.jobs
        assert all(j.params["blob"] == blob for j in page.jobs)
        seen += [j.id for j in page.jobs]
        if not (token := page.next_page_token):
            break
    assert seen == list(reversed(ids))
    # GetJob and WatchJob take the view too.
    basic = stub.GetJob(S.GetJobRequest(job_id=ids[0], view=J.JOB_VIEW_BASIC)).job
    assert not basic.HasField("params") and basic.id == ids[0]
    first = next(iter(stub.WatchJob(S.WatchJobRequest(job_id=ids[0], view=J.JOB_VIEW_BASIC), timeout=5)))
    assert not first.job.HasField("params")
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetJob(S.GetJobRequest(job_id=ids[0], view=99))  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_in_process_result_over_the_cap_fails_the_job(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    request = S.SubmitJobRequest(type="test.big_result")
    request.params.update({"bytes": 5_000_000})
    job = stub.SubmitJob(request).job
    final = list(stub.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=20))[-1].job
    assert final.state == J.JOB_STATE_FAILED and final.attempt == 1  # not retried: it would be as big
    assert final.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert _reason(final.error) == "RESULT_TOO_LARGE" and not final.HasField("result")
    assert stub.GetJob(S.GetJobRequest(job_id=job.id)).job.ByteSize() < 64 * 1024


def test_a_worker_result_over_the_cap_fails_the_job(
    server: ServerThread, stub: job_service_pb2_grpc.JobServiceStub
) -> None:
    with RawWorker(server.target) as worker:
        worker.register("raw.big", credits=1)
        job = stub.SubmitJob(S.SubmitJobRequest(type="raw.big")).job
        lease = worker.next("assignment").assignment.lease
        complete = W.CompleteJob(lease=lease)
        complete.result.update({"blob": "r" * 3_600_000})
        worker.send(W.ConnectRequest(complete_job=complete))
        assert worker.next("write_result").write_result.accepted
    final = stub.GetJob(S.GetJobRequest(job_id=job.id)).job
    assert final.state == J.JOB_STATE_FAILED and _reason(final.error) == "RESULT_TOO_LARGE"
    assert final.ByteSize() < 64 * 1024


def test_huge_release_and_failure_reasons_are_cut(
    server: ServerThread, stub: job_service_pb2_grpc.JobServiceStub
) -> None:
    with RawWorker(server.target) as worker:
        worker.register("raw.release", credits=1)
        request = S.SubmitJobRequest(type="raw.release")
        request.retry_policy.max_attempts = 100
        job = stub.SubmitJob(request).job
        for _ in range(3):
            lease = worker.next("assignment").assignment.lease
            worker.send(W.ConnectRequest(release_job=W.ReleaseJob(lease=lease, reason="r" * 1_500_000)))
            assert worker.next("write_result").write_result.accepted
            worker.send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
        # An honest worker still gets the job, and the job is still readable.
        assignment = worker.next("assignment").assignment
        assert assignment.job.id == job.id and len(assignment.job.attempts) == 3
    stored = stub.GetJob(S.GetJobRequest(job_id=job.id)).job
    assert stored.ByteSize() < 64 * 1024
    assert all(len(a.outcome.message) <= 4096 for a in stored.attempts)


def test_known_job_types_are_capped_and_stats_stay_readable(
    server: ServerThread, stub: job_service_pb2_grpc.JobServiceStub
) -> None:
    workers = []
    try:
        for w in range(5):  # 5 x 200 types: as many as fit beside the in-process ones
            worker = RawWorker(server.target)
            workers.append(worker)
            types = [f"flood.w{w}.t{i}" for i in range(200)]
            if w < 4:
                worker.register(*types, credits=0)
            else:
                with pytest.raises(grpc.RpcError) as caught:
                    worker.register(*types, credits=0)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        too_many = RawWorker(server.target)
        workers.append(too_many)
        with pytest.raises(grpc.RpcError) as caught:
            too_many.register(*(f"x{i}" for i in range(201)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stats = stub.GetQueueStats(S.GetQueueStatsRequest())
        assert 800 <= len(stats.type_stats) <= 1000 and stats.ByteSize() < 1 << 20
        with pytest.raises(grpc.RpcError) as unknown:
            stub.SubmitJob(S.SubmitJobRequest(type="no.such.type"))
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(dict(unknown.value.trailing_metadata())["grpc-status-details-bin"]) < 8 * 1024
    finally:
        for worker in workers:
            worker.close()


def test_declared_types_nobody_declares_any_more_are_forgotten() -> None:
    clock = FakeClock()
    config = ServerConfig(host="127.0.0.1", port=0, store="memory:", retention=3600.0)
    with ServerThread(config, clock=clock) as server:
        assert server.server is not None
        manager = server.server.manager
        with RawWorker(server.target) as worker:
            worker.register("stale.type", "busy.type", credits=0)
        with grpc.insecure_channel(server.target) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            stub.SubmitJob(S.SubmitJobRequest(type="busy.type"))  # an unfinished job keeps its type
            clock.advance(3601)
            server.call(manager.sweep())
            assert "stale.type" not in manager.job_types and "busy.type" in manager.job_types
            assert [t.name for t in server.call(manager.store.load_job_types())] == ["busy.type"]
            with pytest.raises(grpc.RpcError):
                stub.SubmitJob(S.SubmitJobRequest(type="stale.type"))
