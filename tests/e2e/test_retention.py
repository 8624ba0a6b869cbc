"""Retention: a job's own (SubmitJobRequest.retention), else the server's for its outcome, else
--retention; the job is purged once it has passed, on memory and SQLite alike."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from jobwire.client import InvalidArgumentError, JobwireClient, NotFoundError
from jobwire.server.config import ServerConfig
from jobwire.v1 import job_pb2
from support.servers import ServerThread

J = job_pb2
WAIT = 20.0
HOUR, DAY = 3600.0, 86400.0


def kept_for(job: J.Job) -> float:
    return (job.expire_time.ToNanoseconds() - job.end_time.ToNanoseconds()) / 1e9


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_outcome_defaults_and_a_jobs_own_retention(store: str, tmp_path: Path) -> None:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory:" if store == "memory" else f"sqlite:///{tmp_path / 'jobs.db'}",
        retention=2 * DAY,
        retention_failed=3 * DAY,
        retention_cancelled=HOUR,
    )
    with ServerThread(config) as server, JobwireClient(server.target) as client:
        succeeded = client.wait(client.submit("test.echo").id, timeout=WAIT)
        failed = client.wait(client.submit("test.fail").id, timeout=WAIT)
        cancelled = client.wait(client.cancel(client.submit("test.wait_cancel").id).id, timeout=WAIT)
        own = client.submit("test.fail", retention=90)
        assert own.retention.ToSeconds() == 90
        own = client.wait(own.id, timeout=WAIT)
        assert [round(kept_for(j)) for j in (succeeded, failed, cancelled, own)] == [
            2 * DAY,
            3 * DAY,
            HOUR,
            90,
        ]
        assert not succeeded.HasField("retention")  # took the server's


def test_a_job_is_purged_once_its_retention_has_passed() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, store="memory:", sweep_interval=0.1)
    with ServerThread(config) as server, JobwireClient(server.target) as client:
        short = client.wait(client.submit("test.echo", retention=1).id, timeout=WAIT)
        kept = client.wait(client.submit("test.echo").id, timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                client.get(short.id)
            except NotFoundError:
                break
            assert time.monotonic() < deadline, "the job outlived its retention"
            time.sleep(0.1)
        assert client.get(kept.id).state == J.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize("seconds", [0.5, 3651 * DAY])
def test_a_retention_out_of_range_is_invalid_argument(server: ServerThread, seconds: float) -> None:
    with JobwireClient(server.target) as client, pytest.raises(InvalidArgumentError) as raised:
        client.submit("test.echo", retention=seconds)
    assert [v[0] for v in raised.value.field_violations] == ["retention"]


def test_a_bad_outcome_retention_flag_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention-failed"):
        ServerConfig(host="127.0.0.1", port=0, store="memory:", retention_failed=-1).validate()
