"""Several server processes on one PostgreSQL database: every call works on every replica, and the
scheduling rules hold across the cluster as if there were one server.

Three ``python -m jobwire.server`` processes share a fresh schema; the tests talk to them through the
generated stubs (and a hand-driven worker session), one replica per role.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from jobwire.server.state_machine import TRANSITIONS, JobState
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from jobwire.v1 import worker_service_pb2 as W
from support.postgres import require_postgres
from support.raw_worker import RawWorker
from support.replicas import Replicas

S = job_service_pb2
J = job_pb2
TERMINAL = (J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED, J.JOB_STATE_CANCELLED)


@pytest.fixture
def replicas() -> Iterator[Replicas]:
    require_postgres()
    cluster = Replicas().start()
    try:
        yield cluster
    finally:
        cluster.close()


def final_state(stub: job_service_pb2_grpc.JobServiceStub, job_id: str) -> J.Job:
    last: J.Job | None = None
    for update in stub.WatchJob(S.WatchJobRequest(job_id=job_id), timeout=30):
        last = update.job
    assert last is not None and last.state in TERMINAL, last
    return last


def assert_legal_sequence(states: list[int]) -> None:
    """Consecutive states seen by a watcher follow the state machine (no transition was missed)."""
    for before, after in itertools.pairwise(states):
        if before != after:
            assert JobState(after) in TRANSITIONS[JobState(before)], [JobState(s).name for s in states]


def test_a_job_submitted_on_one_replica_is_watched_on_another_and_cancelled_on_a_third(
    replicas: Replicas,
) -> None:
    a, b, c = replicas.stubs
    job = a.SubmitJob(S.SubmitJobRequest(type="test.wait_cancel", labels={"team": "x"})).job
    sequences, states = [], []
    for update in b.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=30):
        sequences.append(update.sequence)
        states.append(update.job.state)
        if update.job.state == J.JOB_STATE_RUNNING and update.job.progress.message == "waiting":
            cancelled = c.CancelJob(S.CancelJobRequest(job_id=job.id, reason="from C")).job
            assert cancelled.state in (J.JOB_STATE_CANCELLING, J.JOB_STATE_CANCELLED)
    assert sequences == sorted(set(sequences)), sequences  # in order, no duplicate
    assert states[-1] == J.JOB_STATE_CANCELLED and J.JOB_STATE_CANCELLING in states
    assert_legal_sequence(states)
    views = [stub.GetJob(S.GetJobRequest(job_id=job.id)).job for stub in replicas.stubs]
    assert all(v == views[0] for v in views) and views[0].cancel_reason == "from C"
    listed = c.ListJobs(S.ListJobsRequest(labels={"team": "x"})).jobs
    assert [j.id for j in listed] == [job.id]
    # RetryJob on another replica: the job runs again (wherever there is room), and ends.
    assert b.RetryJob(S.RetryJobRequest(job_id=job.id)).job.state == J.JOB_STATE_QUEUED
    c.CancelJob(S.CancelJobRequest(job_id=job.id))
    assert final_state(a, job.id).state == J.JOB_STATE_CANCELLED


def test_request_id_deduplication_holds_across_replicas(replicas: Replicas) -> None:
    ids = {
        stub.SubmitJob(S.SubmitJobRequest(type="test.echo", request_id="same-everywhere")).job.id
        for stub in replicas.stubs
    }
    assert len(ids) == 1
    with pytest.raises(grpc.RpcError) as reused:
        replicas.stubs[1].SubmitJob(
            S.SubmitJobRequest(type="test.echo", request_id="same-everywhere", priority=1)
        )
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_batch_accepted_on_one_replica_runs_and_is_deduplicated_on_the_others(replicas: Replicas) -> None:
    a, b, c = replicas.stubs
    requests = [S.SubmitJobRequest(type="test.echo", request_id=f"batch-{n}") for n in range(200)]
    for n, request in enumerate(requests):
        request.params.update({"n": n})
    first = a.BatchSubmitJobs(S.BatchSubmitJobsRequest(requests=requests), timeout=30).jobs
    # Retries through the two other replicas: the same jobs, none stored twice.
    again = [
        stub.BatchSubmitJobs(S.BatchSubmitJobsRequest(requests=requests), timeout=30).jobs for stub in (b, c)
    ]
    assert [j.id for j in again[0]] == [j.id for j in again[1]] == [j.id for j in first]
    assert final_state(c, first[150].id).result["n"] == 150
    listed = b.ListJobs(S.ListJobsRequest(page_size=1000), timeout=10).jobs
    assert sorted(j.request_id for j in listed) == sorted(f"batch-{n}" for n in range(200))


def test_a_worker_on_one_replica_runs_a_job_submitted_on_another(replicas: Replicas) -> None:
    a, b, _c = replicas.stubs
    with RawWorker(replicas.servers[2].target) as worker:
        worker.register("raw.double", credits=1, worker_id="on-c")
        job = a.SubmitJob(S.SubmitJobRequest(type="raw.double", params=_struct(x=21))).job
        assignment = worker.next("assignment").assignment
        assert assignment.job.id == job.id and assignment.job.params["x"] == 21
        progress = W.ReportProgress(lease=assignment.lease, progress=J.Progress(percent=50, message="half"))
        worker.send(W.ConnectRequest(report_progress=progress))
        complete = W.CompleteJob(lease=assignment.lease, result=_struct(doubled=42))
        worker.send(W.ConnectRequest(complete_job=complete))
        assert worker.next("write_result").write_result.accepted
    done = final_state(b, job.id)
    assert done.state == J.JOB_STATE_SUCCEEDED and done.worker_id == "on-c"
    assert json_format.MessageToDict(done.result) == {"doubled": 42.0} and done.progress.message == "half"


def test_priority_order_holds_across_replicas(replicas: Replicas) -> None:
    a, b, c = replicas.stubs
    with RawWorker(replicas.servers[1].target) as worker:
        worker.register("raw.order", credits=1)
        first = a.SubmitJob(S.SubmitJobRequest(type="raw.order", priority=0)).job
        held = worker.next("assignment").assignment
        assert held.job.id == first.id
        # While the only worker is busy, jobs arrive on two other replicas in mixed priorities.
        submitted = []
        for i, priority in enumerate([3, 9, 5, 9, 1, 5, 7]):
            stub = (a, c)[i % 2]
            submitted.append(stub.SubmitJob(S.SubmitJobRequest(type="raw.order", priority=priority)).job)
        expected = [j.id for j in sorted(submitted, key=lambda j: -j.priority)]  # stable: FIFO within
        positions = {j.id: b.GetJob(S.GetJobRequest(job_id=j.id)).job.queue_position for j in submitted}
        assert sorted(positions, key=positions.__getitem__) == expected  # every replica knows the order
        started = []
        lease = held.lease
        for _ in submitted:
            worker.send(W.ConnectRequest(complete_job=W.CompleteJob(lease=lease)))
            worker.send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
            assignment = worker.next("assignment").assignment
            started.append(assignment.job.id)
            lease = assignment.lease
        worker.send(W.ConnectRequest(complete_job=W.CompleteJob(lease=lease)))
        assert worker.next("write_result").write_result.accepted
    assert started == expected


def test_an_update_on_one_replica_reorders_the_cluster_queue(replicas: Replicas) -> None:
    a, b, c = replicas.stubs
    with RawWorker(replicas.servers[1].target) as worker:
        worker.register("raw.update", credits=0)
        jobs = [a.SubmitJob(S.SubmitJobRequest(type="raw.update", priority=5)).job for _ in range(3)]
        request = S.UpdateJobRequest(job=J.Job(id=jobs[2].id, priority=9))
        request.update_mask.paths.append("priority")
        assert c.UpdateJob(request).job.priority == 9
        deadline = time.monotonic() + 10
        while b.GetJob(S.GetJobRequest(job_id=jobs[2].id)).job.queue_position != 1:
            assert time.monotonic() < deadline, "replica b never saw the new order"
            time.sleep(0.02)
        worker.send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
        assert worker.next("assignment").assignment.job.id == jobs[2].id  # the dispatcher saw it too


def test_a_type_limit_holds_across_replicas(replicas: Replicas) -> None:
    jobs = [
        replicas.stubs[i % 3]
        .SubmitJob(S.SubmitJobRequest(type="test.limited", params=_struct(seconds=0.1)))
        .job
        for i in range(6)
    ]
    windows = sorted(
        (f.start_time.ToNanoseconds(), f.end_time.ToNanoseconds())
        for f in (final_state(replicas.stubs[0], job.id) for job in jobs)
    )
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert start >= end, "two test.limited jobs (max_running=1) ran at once"


def test_a_watch_resumes_on_another_replica_with_no_gap(replicas: Replicas) -> None:
    a, b, _ = replicas.stubs
    job = a.SubmitJob(S.SubmitJobRequest(type="test.progress", params=_struct(count=50))).job
    first = a.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=30)
    seen = [next(first)]
    first.cancel()  # the stream breaks after its first message, as if replica A had died
    last = seen[-1].sequence
    rest = list(b.WatchJob(S.WatchJobRequest(job_id=job.id, after_sequence=last), timeout=30))
    sequences = [u.sequence for u in seen + rest]
    assert sequences == sorted(set(sequences))
    assert rest[-1].job.state == J.JOB_STATE_SUCCEEDED
    states = [u.job.state for u in seen + rest]
    assert_legal_sequence(states)
    # Replayed transitions carry the params the snapshots leave out.
    assert all(u.job.params["count"] == 50 for u in rest)


def test_the_dispatcher_can_die_and_another_replica_takes_over(replicas: Replicas) -> None:
    time.sleep(0.2)
    dispatcher = next(
        i for i, s in enumerate(replicas.servers) if any("dispatches (epoch" in line for line in s.log_lines)
    )
    replicas.servers[dispatcher].kill()
    survivor = replicas.stubs[(dispatcher + 1) % 3]
    job = survivor.SubmitJob(S.SubmitJobRequest(type="test.echo", params=_struct(n=1))).job
    assert final_state(survivor, job.id).state == J.JOB_STATE_SUCCEEDED


def _struct(**values: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message
