"""Tenants across replicas on PostgreSQL: quotas, isolation and fair sharing hold for the cluster.

Two ``python -m jobwire.server`` processes with authentication on share a fresh schema. The submit-rate
bucket lives in the store (exact across replicas), the dispatcher is one process (tenant fairness and
running limits are the cluster's), and a tenant's worker on one replica gets only its tenant's jobs,
wherever they were submitted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from jobwire.server.tokens import KeyRing, issue_token, write_key_file
from jobwire.v1 import job_service_pb2
from jobwire.v1 import worker_service_pb2 as W
from support.postgres import require_postgres
from support.raw_worker import RawWorker
from support.replicas import Replicas

S = job_service_pb2


class Cluster(Replicas):
    """Two replicas with authentication on, and tokens of two tenants, a worker and an admin."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        keys = str(tmp_path / "keys.pem")
        write_key_file(keys, rotate=False)
        ring = KeyRing.load(keys)
        self.tokens = {
            name: issue_token(ring, tenant=tenant, role=role, subject=name, ttl=3600)
            for name, tenant, role in (
                ("a", "a", "submitter"),
                ("b", "b", "submitter"),
                ("a-worker", "a", "worker"),
                ("admin", "ops", "admin"),
            )
        }
        super().__init__(2, "--auth-key-file", keys, *extra)

    def as_(self, name: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.tokens[name]}"),)


Start = Callable[..., Cluster]


@pytest.fixture
def start_cluster(tmp_path: Path) -> Iterator[Start]:
    """Starts a cluster with the given extra server flags; every one started is closed at the end."""
    require_postgres()
    started: list[Cluster] = []

    def start(*extra: str) -> Cluster:
        cluster = Cluster(tmp_path, *extra)
        started.append(cluster)
        return cluster.start()

    try:
        yield start
    finally:
        for cluster in started:
            cluster.close()


def test_the_submit_rate_is_one_bucket_for_the_whole_cluster(start_cluster: Start) -> None:
    cluster = start_cluster("--tenant-submit-rate", "6")
    accepted = refused = 0
    for i in range(10):  # alternating replicas: per-replica buckets would let 10 through
        try:
            cluster.stubs[i % 2].SubmitJob(
                S.SubmitJobRequest(type="test.echo"), metadata=cluster.as_("a"), timeout=10
            )
            accepted += 1
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            refused += 1
    assert (accepted, refused) == (6, 4)
    cluster.stubs[1].SubmitJob(S.SubmitJobRequest(type="test.echo"), metadata=cluster.as_("b"), timeout=10)


def test_a_tenants_worker_on_one_replica_gets_only_its_jobs_from_the_other(
    start_cluster: Start,
) -> None:
    cluster = start_cluster()
    first, second = cluster.stubs
    with RawWorker(cluster.servers[1].target, cluster.tokens["a-worker"]) as worker:
        worker.register("a.work", credits=10)
        with pytest.raises(grpc.RpcError) as unknown:  # a's type does not exist for b, on any replica
            first.SubmitJob(S.SubmitJobRequest(type="a.work"), metadata=cluster.as_("b"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        job = first.SubmitJob(S.SubmitJobRequest(type="a.work"), metadata=cluster.as_("a"), timeout=10).job
        assignment = worker.next("assignment").assignment
        assert assignment.job.id == job.id and assignment.job.tenant == "a"
        worker.send(W.ConnectRequest(complete_job=W.CompleteJob(lease=assignment.lease)))
        assert worker.next("write_result").write_result.accepted
    audit = second.ListJobAuditEntries(
        S.ListJobAuditEntriesRequest(job_id=job.id), metadata=cluster.as_("a"), timeout=10
    )
    actions = [entry.action for entry in audit.entries]
    assert actions == ["submitted", "attempt started", "attempt succeeded"]
    assert audit.entries[1].principal == "a-worker (a/worker)"


def test_fair_sharing_holds_when_the_tenants_submit_through_different_replicas(
    start_cluster: Start,
) -> None:
    cluster = start_cluster()
    first, second = cluster.stubs
    with RawWorker(cluster.servers[0].target, cluster.tokens["admin"]) as worker:  # a shared worker
        worker.register("shared.fair", credits=1)
        flood = [
            first.SubmitJob(
                S.SubmitJobRequest(type="shared.fair"), metadata=cluster.as_("a"), timeout=10
            ).job.id
            for _ in range(40)
        ]
        held = worker.next("assignment").assignment  # the worker is busy with one of a's jobs
        late = [
            second.SubmitJob(
                S.SubmitJobRequest(type="shared.fair"), metadata=cluster.as_("b"), timeout=10
            ).job.id
            for _ in range(3)
        ]
        order = [held.job.id]
        lease = held.lease
        for _ in range(10):
            worker.send(W.ConnectRequest(complete_job=W.CompleteJob(lease=lease)))
            worker.send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
            assignment = worker.next("assignment").assignment
            order.append(assignment.job.id)
            lease = assignment.lease
    started_b = [order.index(job_id) for job_id in late]
    # b's three jobs alternate with a's backlog of 39: they all start within the first seven.
    assert max(started_b) <= 7, (started_b, len(flood))
