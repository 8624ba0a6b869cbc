"""ListJobs: filter by priority, order_by (AIP-132) with page tokens bound to it, total_size (AIP-158);
through the generated stubs, the SDK and the CLI, on the memory and SQLite stores."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from jobwire.cli.main import main
from jobwire.client import InvalidArgumentError, JobwireClient
from jobwire.server.config import ServerConfig
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from support.servers import ServerThread

S = job_service_pb2
J = job_pb2
PRIORITIES = (5, 1, 9, 5, 1, 9, 3)


@pytest.fixture(params=["memory", "sqlite"])
def loaded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, list[J.Job]]]:
    """A server holding seven queued jobs of mixed priorities (scheduled in an hour: they stay)."""
    store = "memory:" if request.param == "memory" else f"sqlite:///{tmp_path / 'jobs.db'}"
    with ServerThread(ServerConfig(host="127.0.0.1", port=0, store=store)) as server:
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        with JobwireClient(server.target) as client:
            jobs = [client.submit("demo.echo", priority=p, schedule_time=later) for p in PRIORITIES]
        yield server.target, jobs


def pages(stub: job_service_pb2_grpc.JobServiceStub, **fields: object) -> list[list[str]]:
    request = S.ListJobsRequest(page_size=2, **fields)  # type: ignore[arg-type]
    out = []
    while True:
        response = stub.ListJobs(request, timeout=10)
        out.append([j.id for j in response.jobs])
        if not response.next_page_token:
            return out
        request.page_token = response.next_page_token


def expected(jobs: list[J.Job], order_by: str) -> list[str]:
    """The ids in the order the server must give: ids grow with creation; within a priority, newest first."""
    ordered = sorted(jobs, key=lambda j: j.id, reverse=order_by != "create_time")
    if "priority" in order_by.lower():
        ordered.sort(key=lambda j: j.priority, reverse="desc" in order_by)
    return [j.id for j in ordered]


@pytest.mark.parametrize("order_by", ["", "create_time", "priority desc", "PRIORITY  ASC"])
def test_every_order_pages_through_every_job_once(loaded: tuple[str, list[J.Job]], order_by: str) -> None:
    target, jobs = loaded
    with grpc.insecure_channel(target) as channel:
        got = pages(job_service_pb2_grpc.JobServiceStub(channel), order_by=order_by)
    assert [i for page in got for i in page] == expected(jobs, order_by)


def test_a_token_is_bound_to_its_order_and_a_bad_order_is_invalid(loaded: tuple[str, list[J.Job]]) -> None:
    target, _ = loaded
    with grpc.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        token = stub.ListJobs(S.ListJobsRequest(page_size=2, order_by="priority desc")).next_page_token
        with pytest.raises(grpc.RpcError) as other_order:
            stub.ListJobs(S.ListJobsRequest(page_size=2, page_token=token))
        assert other_order.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "another order" in str(other_order.value.details())
        with pytest.raises(grpc.RpcError) as bad:
            stub.ListJobs(S.ListJobsRequest(order_by="type"))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "order_by" in str(bad.value.details())


def test_priority_filter_and_total_size(loaded: tuple[str, list[J.Job]]) -> None:
    target, jobs = loaded
    with grpc.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        response = stub.ListJobs(S.ListJobsRequest(priorities=[1, 9], page_size=3, include_total_size=True))
        assert response.total_size == 4 and len(response.jobs) == 3
        assert {j.priority for j in response.jobs} <= {1, 9}
        assert stub.ListJobs(S.ListJobsRequest()).total_size == 0  # only when asked
        with pytest.raises(grpc.RpcError) as bad:
            stub.ListJobs(S.ListJobsRequest(priorities=[10]))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with JobwireClient(target) as client:
        assert client.count_jobs(priorities=5) == 2
        assert client.count_jobs(states="queued") == len(jobs)
        ordered = [j.priority for j in client.list_jobs(order_by="priority", page_size=3)]
        assert ordered == sorted(PRIORITIES)
        with pytest.raises(InvalidArgumentError):
            list(client.list_jobs(order_by="nonsense"))


def test_cli_list_priority_order_and_count(
    loaded: tuple[str, list[J.Job]], capsys: pytest.CaptureFixture[str]
) -> None:
    target, _ = loaded
    base = ["--server", target, "list"]
    assert main([*base, "--priority", "9", "--priority", "3", "--count"]) == 0
    assert capsys.readouterr().out.strip() == "3"
    assert main([*base, "--order-by", "priority desc", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [j["priority"] for j in listed] == sorted(PRIORITIES, reverse=True)
