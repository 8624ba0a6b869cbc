"""Bad input found by trying Jobwire as an attacker would: each gets a clear error, never UNKNOWN."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobwire.server.config import ServerConfig
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from jobwire.v1 import worker_service_pb2 as W
from support.raw_worker import RawWorker
from support.servers import ServerThread

S = job_service_pb2
J = job_pb2
TRAILER_LIMIT = 16 * 1024  # Python/C-core clients refuse response metadata past this


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[ServerThread]:
    config = ServerConfig(host="127.0.0.1", port=0, store=f"sqlite:///{tmp_path / 'jobs.db'}")
    with ServerThread(config) as running:
        yield running


def _stub(target: str) -> tuple[grpc.Channel, job_service_pb2_grpc.JobServiceStub]:
    channel = grpc.insecure_channel(target)
    return channel, job_service_pb2_grpc.JobServiceStub(channel)


def test_a_page_token_of_deeply_nested_json_is_invalid_argument(sqlite_server: ServerThread) -> None:
    channel, stub = _stub(sqlite_server.target)
    with channel:
        for payload in ("[" * 5000, "{" * 3000, '{"after": 1, "filter": []}'):
            token = base64.urlsafe_b64encode(payload.encode()).decode()
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListJobs(S.ListJobsRequest(page_token=token))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "page_token" in (caught.value.details() or "")


def test_too_many_label_filters_are_invalid_argument_on_sqlite(sqlite_server: ServerThread) -> None:
    channel, stub = _stub(sqlite_server.target)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListJobs(S.ListJobsRequest(labels={f"k{i}": "v" for i in range(999)}))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "labels" in (caught.value.details() or "")
        # At the cap, the query still runs.
        assert not stub.ListJobs(S.ListJobsRequest(labels={f"k{i}": "v" for i in range(64)})).jobs


def test_many_field_violations_give_a_bounded_error(sqlite_server: ServerThread) -> None:
    channel, stub = _stub(sqlite_server.target)
    with channel:
        request = S.SubmitJobRequest(type="test.echo", labels={f"BAD KEY {i}": "v" * 300 for i in range(60)})
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(request)
        error = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED on the client
        trailers = dict(error.trailing_metadata() or ())
        details = trailers["grpc-status-details-bin"]
        assert isinstance(details, bytes) and len(details) < TRAILER_LIMIT / 2
        assert "more" in (error.details() or "")


def test_health_list_names_every_service(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
    assert listed.statuses["jobwire.v1.JobService"].status == health_pb2.HealthCheckResponse.SERVING
    assert listed.statuses[""].status == health_pb2.HealthCheckResponse.SERVING


def test_a_fail_job_with_an_undecodable_detail_is_recorded_and_the_session_lives(
    server: ServerThread,
) -> None:
    channel, stub = _stub(server.target)
    with channel, RawWorker(server.target) as worker:
        worker.register("raw.fail", credits=1)
        request = S.SubmitJobRequest(type="raw.fail")
        request.retry_policy.max_attempts = 1
        job = stub.SubmitJob(request).job
        lease = worker.next("assignment").assignment.lease
        broken = any_pb2.Any(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=b"\xff\xff\xff")
        error = status_pb2.Status(code=2, message="it broke", details=[broken])
        worker.send(W.ConnectRequest(fail_job=W.FailJob(lease=lease, error=error)))
        assert worker.next("write_result").write_result.accepted
        failed = stub.GetJob(S.GetJobRequest(job_id=job.id)).job
        assert failed.state == J.JOB_STATE_FAILED and failed.error.message == "it broke"
        # The same session keeps working.
        worker.send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
        second = stub.SubmitJob(S.SubmitJobRequest(type="raw.fail")).job
        assignment = worker.next("assignment").assignment
        assert assignment.job.id == second.id
        worker.send(W.ConnectRequest(complete_job=W.CompleteJob(lease=assignment.lease)))
        assert worker.next("write_result").write_result.accepted


def test_a_worker_progress_report_with_oversized_details_keeps_the_rest(server: ServerThread) -> None:
    channel, stub = _stub(server.target)
    with channel, RawWorker(server.target) as worker:
        worker.register("raw.details", credits=1)
        job = stub.SubmitJob(S.SubmitJobRequest(type="raw.details")).job
        lease = worker.next("assignment").assignment.lease
        progress = J.Progress(percent=40, message="big")
        progress.details.update({"blob": "x" * 5000})
        worker.send(W.ConnectRequest(report_progress=W.ReportProgress(lease=lease, progress=progress)))
        for _ in range(200):
            shown = stub.GetJob(S.GetJobRequest(job_id=job.id)).job.progress
            if shown.percent == 40:
                break
            time.sleep(0.01)
        assert (shown.percent, shown.message, shown.HasField("details")) == (40, "big", False)
        worker.send(W.ConnectRequest(complete_job=W.CompleteJob(lease=lease)))
        assert worker.next("write_result").write_result.accepted  # the session lives on
