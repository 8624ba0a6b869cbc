"""RetryPolicy.non_retryable_codes: a failure with one of the codes ends the job at once, whatever
attempts are left; from the request, the handler's type, or a worker's declaration."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, status_pb2

from jobwire.client import InvalidArgumentError, JobwireClient
from jobwire.v1 import job_pb2, job_service_pb2
from jobwire.v1 import worker_service_pb2 as W
from support.raw_worker import RawWorker
from support.servers import ServerThread

J = job_pb2
S = job_service_pb2
WAIT = 20.0


def attempts_of(client: JobwireClient, job_id: str) -> tuple[int, list[int]]:
    done = client.wait(job_id, timeout=WAIT)
    return done.state, [a.outcome.code for a in done.attempts]


def test_a_code_named_in_the_request_is_not_retried(server: ServerThread) -> None:
    with JobwireClient(server.target) as client:
        stopped = client.submit(
            "test.flaky", {"succeed_on": 3}, non_retryable_codes=[grpc.StatusCode.UNKNOWN], max_attempts=3
        )
        assert list(stopped.retry_policy.non_retryable_codes) == [code_pb2.UNKNOWN]
        assert attempts_of(client, stopped.id) == (J.JOB_STATE_FAILED, [code_pb2.UNKNOWN])
        other = client.submit("test.flaky", {"succeed_on": 2}, non_retryable_codes=[3], max_attempts=3)
        state, codes = attempts_of(client, other.id)  # UNKNOWN is not listed: retried, then succeeds
        assert (state, codes) == (J.JOB_STATE_SUCCEEDED, [code_pb2.UNKNOWN, code_pb2.OK])


def test_a_type_default_applies_when_the_request_names_none(server: ServerThread) -> None:
    with JobwireClient(server.target) as client:
        job = client.submit("test.slow_once")
        assert list(job.retry_policy.non_retryable_codes) == [code_pb2.DEADLINE_EXCEEDED]
        assert attempts_of(client, job.id) == (J.JOB_STATE_FAILED, [code_pb2.DEADLINE_EXCEEDED])


def test_a_worker_declared_list_applies_to_its_type(server: ServerThread) -> None:
    policy = J.RetryPolicy(max_attempts=3, non_retryable_codes=[code_pb2.INVALID_ARGUMENT])
    declaration = W.JobTypeDeclaration(type="raw.codes", retry_policy=policy)
    with RawWorker(server.target) as worker, JobwireClient(server.target) as client:
        worker.send(
            W.ConnectRequest(register=W.RegisterWorker(worker_id="w", job_types=[declaration], credits=1))
        )
        worker.next("registered")
        job = client.submit("raw.codes")
        lease = worker.next("assignment").assignment.lease
        error = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad input")
        worker.send(W.ConnectRequest(fail_job=W.FailJob(lease=lease, error=error)))
        assert worker.next("write_result").write_result.accepted
        assert attempts_of(client, job.id) == (J.JOB_STATE_FAILED, [code_pb2.INVALID_ARGUMENT])


@pytest.mark.parametrize("codes", [[0], [17], [3, -1]], ids=["OK", "unknown", "negative"])
def test_bad_code_lists_are_invalid_argument(server: ServerThread, codes: list[int]) -> None:
    with JobwireClient(server.target) as client, pytest.raises(InvalidArgumentError) as raised:
        client.submit("demo.echo", non_retryable_codes=codes)
    assert [v[0] for v in raised.value.field_violations] == ["retry_policy.non_retryable_codes"]


def test_the_cli_takes_codes_by_name(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    from jobwire.cli.main import main

    args = ["--server", server.target, "submit", "test.flaky", "--max-attempts", "3", "--json"]
    assert main([*args, "--no-retry-on", "unknown", "--no-retry-on", "DEADLINE_EXCEEDED"]) == 0
    out = capsys.readouterr().out
    assert '"UNKNOWN"' in out and '"DEADLINE_EXCEEDED"' in out
