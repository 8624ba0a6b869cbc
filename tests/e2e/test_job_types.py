"""ListJobTypes: what a client in any language may submit, with each type's defaults and the capacity
connected for it now; through the generated stubs, the SDK and the CLI."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from google.protobuf import duration_pb2

from jobwire.cli.main import main
from jobwire.client import JobwireClient
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from jobwire.v1 import worker_service_pb2 as W
from support.raw_worker import RawWorker
from support.servers import ServerThread

S = job_service_pb2
J = job_pb2


def by_name(stub: job_service_pb2_grpc.JobServiceStub) -> dict[str, S.JobTypeInfo]:
    return {t.name: t for t in stub.ListJobTypes(S.ListJobTypesRequest(page_size=1000), timeout=10).job_types}


def test_in_process_and_declared_types_with_their_defaults_and_capacity(server: ServerThread) -> None:
    declaration = W.JobTypeDeclaration(
        type="raw.listed",
        max_running=3,
        timeout=duration_pb2.Duration(seconds=5),
        retry_policy=J.RetryPolicy(max_attempts=4, non_retryable_codes=[3]),
    )
    with grpc.insecure_channel(server.target) as channel, RawWorker(server.target) as worker:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        worker.send(
            W.ConnectRequest(register=W.RegisterWorker(worker_id="w", job_types=[declaration], credits=2))
        )
        worker.next("registered")
        deadline = time.monotonic() + 10
        while (listed := by_name(stub)).get("raw.listed") is None or listed["raw.listed"].executors != 1:
            assert time.monotonic() < deadline, listed.get("raw.listed")
            time.sleep(0.02)
        declared = listed["raw.listed"]
        assert (declared.in_process, declared.max_running, declared.free_slots, declared.running) == (
            False,
            3,
            2,
            0,
        )
        assert declared.timeout.seconds == 5 and declared.retry_policy.max_attempts == 4
        assert list(declared.retry_policy.non_retryable_codes) == [3]
        assert declared.HasField("last_declare_time") and declared.tenant == ""
        echo = listed["demo.echo"]
        assert echo.in_process and echo.executors == 1 and not echo.HasField("last_declare_time")
        assert listed["test.fail"].retry_policy.max_attempts == 1  # @handler("test.fail", max_attempts=1)
        assert list(listed) == sorted(listed)


def test_pages_walk_every_type_once_and_bad_input_is_invalid(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        everything = list(by_name(stub))
        seen: list[str] = []
        request = S.ListJobTypesRequest(page_size=3)
        while True:
            response = stub.ListJobTypes(request, timeout=10)
            seen += [t.name for t in response.job_types]
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
        assert seen == everything and len(seen) > 3
        for bad in (S.ListJobTypesRequest(page_size=-1), S.ListJobTypesRequest(page_token="nope")):
            with pytest.raises(grpc.RpcError) as raised:
                stub.ListJobTypes(bad, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sdk_and_cli(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    with JobwireClient(server.target) as client:
        names = [t.name for t in client.list_job_types()]
    assert "demo.sleep" in names and names == sorted(names)
    assert main(["--server", server.target, "types", "--json"]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert listed["demo.sleep"]["in_process"] is True
    assert main(["--server", server.target, "types"]) == 0
    assert "demo.sleep" in capsys.readouterr().out
