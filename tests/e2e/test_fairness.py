"""Fair sharing across tenants, through a real server: a tenant's few jobs do not wait for another
tenant's backlog, and weights share the starts.

A shared (admin) worker with one credit takes the jobs one at a time, so the order it is given them in
is exactly the dispatcher's order.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from jobwire.server.config import ServerConfig
from jobwire.v1 import job_service_pb2, job_service_pb2_grpc
from jobwire.v1 import worker_service_pb2 as W
from support.raw_worker import RawWorker
from support.security import Keys, bearer
from support.servers import ServerThread

S = job_service_pb2
BACKLOG = 2000


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys.pem")


@pytest.fixture
def server(keys: Keys, tmp_path: Path) -> Iterator[ServerThread]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text("[tenants.heavy]\nweight = 3\n")
    config = ServerConfig(
        host="127.0.0.1", port=0, store="memory:", auth_key_file=str(keys.path), tenants_file=str(tenants)
    )
    with ServerThread(config) as started:
        yield started


@pytest.fixture
def stub(server: ServerThread) -> Iterator[job_service_pb2_grpc.JobServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield job_service_pb2_grpc.JobServiceStub(channel)


def submit(stub: job_service_pb2_grpc.JobServiceStub, token: str, count: int) -> list[str]:
    def one(_: int) -> str:
        request = S.SubmitJobRequest(type="shared.fair")
        return str(stub.SubmitJob(request, metadata=bearer(token), timeout=30).job.id)

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(count)))


def start_order(worker: RawWorker, starts: int) -> list[str]:
    """The next ``starts`` jobs the one-credit worker is given, each completed before the next."""
    order = []
    for _ in range(starts):
        assignment = worker.next("assignment").assignment
        order.append(assignment.job.id)
        worker.send(W.ConnectRequest(complete_job=W.CompleteJob(lease=assignment.lease)))
        worker.send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
    return order


def test_a_few_jobs_start_within_a_few_dispatches_of_another_tenants_backlog(
    server: ServerThread, stub: job_service_pb2_grpc.JobServiceStub, keys: Keys
) -> None:
    with RawWorker(server.target, keys.token("ops", "admin")) as worker:
        worker.register("shared.fair", credits=1)
        flood = submit(stub, keys.token("a", "submitter"), BACKLOG)
        held = worker.next("assignment").assignment  # the worker is busy with one of a's jobs
        late = submit(stub, keys.token("b", "submitter"), 10)
        worker.send(W.ConnectRequest(complete_job=W.CompleteJob(lease=held.lease)))
        worker.send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
        order = start_order(worker, 25)
    # b's jobs alternate with a's backlog of 1,999 (a first: its head is older): b's last starts 20th,
    # not after a's backlog.
    assert sorted(order.index(job_id) + 1 for job_id in late) == list(range(2, 21, 2))
    assert set(order) - set(late) <= set(flood)


def test_weights_share_the_starts(
    server: ServerThread, stub: job_service_pb2_grpc.JobServiceStub, keys: Keys
) -> None:
    with RawWorker(server.target, keys.token("ops", "admin")) as worker:
        worker.register("shared.fair", credits=1)
        heavy = set(submit(stub, keys.token("heavy", "submitter"), 200))  # weight 3 (the tenants file)
        held = worker.next("assignment").assignment
        light = set(submit(stub, keys.token("light", "submitter"), 200))  # weight 1 (the default)
        worker.send(W.ConnectRequest(complete_job=W.CompleteJob(lease=held.lease)))
        worker.send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
        order = start_order(worker, 80)
    heavy_starts = sum(1 for job_id in order if job_id in heavy)
    light_starts = sum(1 for job_id in order if job_id in light)
    assert heavy_starts + light_starts == 80
    assert 2.5 <= heavy_starts / light_starts <= 3.5, (heavy_starts, light_starts)
