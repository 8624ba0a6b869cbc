"""BatchSubmitJobs through a real server: up to 1,000 jobs in one call, all stored or none (AIP-233)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobwire.server.config import ServerConfig
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from support.security import (
    Keys,
    bearer,
    error_info,
    expect_error,
    field_violations,
    in_an_hour,
    quota_failure,
    retry_delay,
)
from support.servers import ServerThread

S = job_service_pb2
J = job_pb2
Code = grpc.StatusCode
TERMINAL = (J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED, J.JOB_STATE_CANCELLED)


@contextlib.contextmanager
def serving(config: ServerConfig) -> Iterator[job_service_pb2_grpc.JobServiceStub]:
    with ServerThread(config) as server, grpc.insecure_channel(server.target) as channel:
        yield job_service_pb2_grpc.JobServiceStub(channel)


@pytest.fixture
def sqlite_config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, store=f"sqlite:///{tmp_path / 'jobs.db'}")


def request(job_type: str = "demo.echo", **fields: Any) -> S.SubmitJobRequest:
    params = fields.pop("params", None)
    message = S.SubmitJobRequest(type=job_type, **fields)
    if params is not None:
        message.params.update(params)
    return message


def batch(*requests: S.SubmitJobRequest) -> S.BatchSubmitJobsRequest:
    return S.BatchSubmitJobsRequest(requests=requests)


def scheduled(count: int) -> S.BatchSubmitJobsRequest:
    """A batch of ``count`` jobs that stay QUEUED (scheduled an hour ahead)."""
    return batch(*(request(schedule_time=in_an_hour()) for _ in range(count)))


def stored(stub: job_service_pb2_grpc.JobServiceStub, metadata: Any = ()) -> list[J.Job]:
    return list(stub.ListJobs(S.ListJobsRequest(page_size=1000), metadata=metadata, timeout=10).jobs)


def test_a_batch_is_stored_in_order_and_every_job_runs(sqlite_config: ServerConfig) -> None:
    with serving(sqlite_config) as stub:
        sent = [request(params={"n": i}, priority=i % 10, labels={"batch": "one"}) for i in range(500)]
        answer = stub.BatchSubmitJobs(batch(*sent), timeout=30)
        assert len(answer.jobs) == 500
        assert len({job.id for job in answer.jobs}) == 500
        assert [job.priority for job in answer.jobs] == [i % 10 for i in range(500)]
        assert all(job.labels["batch"] == "one" and not job.HasField("params") for job in answer.jobs)
        assert all(job.state != J.JOB_STATE_UNSPECIFIED for job in answer.jobs)
        for i in (0, 255, 499):  # run by the server's demo.echo handler, which returns its params
            job_id = answer.jobs[i].id
            last = None
            for update in stub.WatchJob(S.WatchJobRequest(job_id=job_id), timeout=30):
                last = update.job
            assert last is not None and last.state == J.JOB_STATE_SUCCEEDED
            assert dict(last.params) == {"n": i} and dict(last.result)["n"] == i
            trail = stub.ListJobAuditEntries(S.ListJobAuditEntriesRequest(job_id=job_id), timeout=10)
            assert trail.entries[0].action == "submitted"


def test_one_bad_request_refuses_the_whole_batch_naming_it(sqlite_config: ServerConfig) -> None:
    with serving(sqlite_config) as stub:
        sent = [request() for _ in range(10)]
        sent[3] = request(priority=12)
        sent[7] = request("no.such.type")
        err = expect_error(lambda: stub.BatchSubmitJobs(batch(*sent), timeout=10), Code.INVALID_ARGUMENT)
        fields = [field for field, _ in field_violations(err)]
        assert fields == ["requests[3].priority"]  # validated first; the unknown type after
        sent[3] = request()
        err = expect_error(
            lambda: stub.BatchSubmitJobs(batch(*sent), timeout=10), Code.INVALID_ARGUMENT, "UNKNOWN_JOB_TYPE"
        )
        assert [field for field, _ in field_violations(err)] == ["requests[7].type"]
        big = request(params={"blob": "x" * (1 << 20)})
        err = expect_error(
            lambda: stub.BatchSubmitJobs(batch(request(), big), timeout=10), Code.INVALID_ARGUMENT
        )
        assert [field for field, _ in field_violations(err)] == ["requests[1].params"]
        assert stored(stub) == []


def test_the_size_of_a_batch_is_bounded(sqlite_config: ServerConfig) -> None:
    with serving(sqlite_config) as stub:
        err = expect_error(lambda: stub.BatchSubmitJobs(batch(), timeout=10), Code.INVALID_ARGUMENT)
        assert field_violations(err) == [("requests", "at least one job")]
        too_many = batch(*(request() for _ in range(1001)))
        err = expect_error(lambda: stub.BatchSubmitJobs(too_many, timeout=10), Code.INVALID_ARGUMENT)
        assert field_violations(err) == [("requests", "at most 1000 jobs in one batch, got 1001")]
        assert len(stub.BatchSubmitJobs(batch(*(request() for _ in range(1000))), timeout=30).jobs) == 1000


def test_a_retried_batch_returns_the_same_jobs_and_stores_none_twice(sqlite_config: ServerConfig) -> None:
    with serving(sqlite_config) as stub:
        sent = [request(request_id=f"r-{i}", schedule_time=in_an_hour()) for i in range(5)]
        first = stub.BatchSubmitJobs(batch(*sent), timeout=10).jobs
        again = stub.BatchSubmitJobs(batch(*sent), timeout=10).jobs
        assert [job.id for job in again] == [job.id for job in first]
        # Two of the old requests and two new ones: the old ones get their jobs, the new ones are stored.
        mixed = [sent[1], request(request_id="r-new-1"), sent[4], request(request_id="r-new-2")]
        answer = stub.BatchSubmitJobs(batch(*mixed), timeout=10).jobs
        assert (answer[0].id, answer[2].id) == (first[1].id, first[4].id)
        assert answer[1].id not in {job.id for job in first} and answer[1].request_id == "r-new-1"
        assert len(stored(stub)) == 7


def test_a_request_id_reused_or_repeated_refuses_the_batch(sqlite_config: ServerConfig) -> None:
    with serving(sqlite_config) as stub:
        stub.SubmitJob(request(request_id="taken", params={"a": 1}), timeout=10)
        reused = [request(request_id="fresh"), request(request_id="taken", params={"a": 2})]
        err = expect_error(
            lambda: stub.BatchSubmitJobs(batch(*reused), timeout=10),
            Code.INVALID_ARGUMENT,
            "REQUEST_ID_REUSED",
        )
        assert [field for field, _ in field_violations(err)] == ["requests[1].request_id"]
        repeated = [request(request_id="x"), request(request_id="y"), request(request_id="x")]
        err = expect_error(lambda: stub.BatchSubmitJobs(batch(*repeated), timeout=10), Code.INVALID_ARGUMENT)
        assert field_violations(err) == [("requests[2].request_id", "repeats requests[0].request_id")]
        assert [job.request_id for job in stored(stub)] == ["taken"]


def test_a_batch_needs_room_in_the_queue_for_all_its_jobs(sqlite_config: ServerConfig) -> None:
    with serving(replace(sqlite_config, max_queued=10)) as stub:
        stub.BatchSubmitJobs(scheduled(4), timeout=10)
        err = expect_error(
            lambda: stub.BatchSubmitJobs(scheduled(7), timeout=10),
            Code.RESOURCE_EXHAUSTED,
            "QUEUE_FULL",
        )
        assert "room for 6 more jobs, not 7" in err.details()
        assert len(stored(stub)) == 4
        assert len(stub.BatchSubmitJobs(scheduled(6), timeout=10).jobs) == 6


def test_a_batch_belongs_to_the_callers_tenant_and_draws_on_its_submit_rate(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys.pem")
    config = ServerConfig(
        host="127.0.0.1", port=0, store="memory:", auth_key_file=str(keys.path), tenant_submit_rate=10
    )
    with serving(config) as stub:
        alice = bearer(keys.token("a", "submitter", "alice"))
        viewer = bearer(keys.token("a", "viewer"))
        expect_error(
            lambda: stub.BatchSubmitJobs(scheduled(1), metadata=viewer, timeout=10),
            Code.PERMISSION_DENIED,
        )
        err = expect_error(
            lambda: stub.BatchSubmitJobs(scheduled(11), metadata=alice, timeout=10),
            Code.INVALID_ARGUMENT,
        )
        assert field_violations(err)[0][0] == "requests" and "submit rate" in field_violations(err)[0][1]
        jobs = stub.BatchSubmitJobs(scheduled(6), metadata=alice, timeout=10).jobs
        assert {(job.tenant, job.created_by) for job in jobs} == {("a", "alice")}
        err = expect_error(
            lambda: stub.BatchSubmitJobs(scheduled(5), metadata=alice, timeout=10),
            Code.RESOURCE_EXHAUSTED,
            "TENANT_QUOTA_EXCEEDED",
        )
        assert quota_failure(err).violations[0].subject == "tenant:a"
        assert (delay := retry_delay(err)) is not None and 0 < delay <= 6.1  # one more token: 6 s
        assert error_info(err).metadata["quota_subject"] == "tenant:a"
        bob = bearer(keys.token("b", "submitter", "bob"))
        stub.BatchSubmitJobs(scheduled(5), metadata=bob, timeout=10)
        assert len(stored(stub, alice)) == 6 and len(stored(stub, bob)) == 5


def test_batches_given_up_mid_call_leave_every_stored_job_running(sqlite_config: ServerConfig) -> None:
    """A caller that gives up never splits the truth: each stored job is one the server runs."""
    with serving(sqlite_config) as stub:
        for i in range(30):
            with contextlib.suppress(grpc.RpcError):
                stub.BatchSubmitJobs(batch(*(request() for _ in range(50))), timeout=0.001 * (1 + i % 10))
        jobs = stored(stub)
        assert len(jobs) % 50 == 0  # whole batches only
        for job in jobs:
            last = None
            for update in stub.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=30):
                last = update.job
            assert last is not None and last.state == J.JOB_STATE_SUCCEEDED, last
