"""UpdateJob (AIP-134): the priority, labels and schedule time of a job that has not started, through
the generated stubs against a real server; the run order, watchers and the audit trail follow."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import timestamp_pb2

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from jobwire.v1 import worker_service_pb2 as W
from support.raw_worker import RawWorker
from support.security import expect_error, field_violations
from support.servers import ServerThread

S = job_service_pb2
J = job_pb2
Code = grpc.StatusCode
TYPE = "update.idle"


@pytest.fixture
def idle(server: ServerThread) -> Iterator[RawWorker]:
    """A worker of TYPE with no credits: its jobs wait in the queue until it asks for one."""
    with RawWorker(server.target) as worker:
        worker.register(TYPE, credits=0)
        yield worker


def update(stub: job_service_pb2_grpc.JobServiceStub, job: J.Job, *paths: str, request_id: str = "") -> J.Job:
    request = S.UpdateJobRequest(job=job, request_id=request_id)
    request.update_mask.paths.extend(paths)
    updated: J.Job = stub.UpdateJob(request, timeout=10).job
    return updated


def submit(stub: job_service_pb2_grpc.JobServiceStub, **fields: object) -> J.Job:
    job: J.Job = stub.SubmitJob(S.SubmitJobRequest(type=TYPE, **fields), timeout=10).job  # type: ignore[arg-type]
    return job


def get(stub: job_service_pb2_grpc.JobServiceStub, job_id: str) -> J.Job:
    job: J.Job = stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10).job
    return job


def test_a_raised_priority_moves_the_job_to_the_front_and_it_runs_first(
    stub: job_service_pb2_grpc.JobServiceStub, idle: RawWorker
) -> None:
    jobs = [submit(stub) for _ in range(3)]
    assert get(stub, jobs[2].id).queue_position == 3
    updated = update(stub, J.Job(id=jobs[2].id, priority=9), "priority")
    assert (updated.priority, updated.state, updated.queue_position) == (9, J.JOB_STATE_QUEUED, 1)
    assert get(stub, jobs[0].id).queue_position == 2
    idle.send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
    assert idle.next("assignment").assignment.job.id == jobs[2].id


def test_labels_are_replaced_and_filter_listings(
    stub: job_service_pb2_grpc.JobServiceStub, idle: RawWorker
) -> None:
    job = submit(stub, labels={"team": "a", "old": "x"})
    updated = update(stub, J.Job(id=job.id, labels={"team": "b"}), "labels")
    assert dict(updated.labels) == {"team": "b"}
    listed = stub.ListJobs(S.ListJobsRequest(labels={"team": "b"}), timeout=10).jobs
    assert [j.id for j in listed] == [job.id]
    assert not stub.ListJobs(S.ListJobsRequest(labels={"old": "x"}), timeout=10).jobs


def test_a_schedule_time_delays_the_job_and_clearing_it_makes_it_ready(
    stub: job_service_pb2_grpc.JobServiceStub, idle: RawWorker
) -> None:
    job = submit(stub)
    later = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
    delayed = update(stub, J.Job(id=job.id, schedule_time=later), "schedule_time")
    assert delayed.schedule_time == later and delayed.wait_reason == J.WAIT_REASON_SCHEDULED
    idle.send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
    with pytest.raises(AssertionError):
        idle.next("assignment", timeout=0.5)  # scheduled: not handed out
    ready = update(stub, J.Job(id=job.id), "schedule_time")  # unset: as soon as possible
    assert not ready.HasField("schedule_time")
    assert idle.next("assignment").assignment.job.id == job.id


def test_watchers_see_the_change_and_the_audit_trail_records_it(
    stub: job_service_pb2_grpc.JobServiceStub, idle: RawWorker
) -> None:
    job = submit(stub, priority=2)
    watch = stub.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=10)
    assert next(watch).event_type == S.WATCH_EVENT_TYPE_SNAPSHOT
    update(stub, J.Job(id=job.id, priority=7), "priority", request_id="upd-1")
    event = next(watch)
    watch.cancel()
    assert event.event_type == S.WATCH_EVENT_TYPE_STATE_CHANGED
    assert (event.job.state, event.job.priority) == (J.JOB_STATE_QUEUED, 7)
    entries = stub.ListJobAuditEntries(S.ListJobAuditEntriesRequest(job_id=job.id), timeout=10).entries
    last = entries[-1]
    assert (last.action, last.request_id, last.detail) == ("updated", "upd-1", "priority: 2 -> 7")


def test_an_update_that_changes_nothing_writes_nothing(
    stub: job_service_pb2_grpc.JobServiceStub, idle: RawWorker
) -> None:
    job = submit(stub, priority=4, labels={"a": "b"})
    same = update(stub, J.Job(id=job.id, priority=4, labels={"a": "b"}), "priority", "labels")
    assert same.update_time == job.update_time
    entries = stub.ListJobAuditEntries(S.ListJobAuditEntriesRequest(job_id=job.id), timeout=10).entries
    assert [e.action for e in entries] == ["submitted"]


def test_a_job_that_has_started_cannot_be_updated(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    job = stub.SubmitJob(S.SubmitJobRequest(type="test.wait_cancel"), timeout=10).job
    for _ in range(200):
        if get(stub, job.id).state == J.JOB_STATE_RUNNING:
            break
        time.sleep(0.01)
    err = expect_error(
        lambda: update(stub, J.Job(id=job.id, priority=9), "priority"),
        Code.FAILED_PRECONDITION,
        "JOB_NOT_QUEUED",
    )
    assert "RUNNING" in err.details()
    stub.CancelJob(S.CancelJobRequest(job_id=job.id), timeout=10)


@pytest.mark.parametrize(
    ("job", "paths", "field"),
    [
        (J.Job(priority=3), ["priority"], "job.id"),
        (J.Job(id="x", priority=3), [], "update_mask"),
        (J.Job(id="x", priority=3), ["priority", "type"], "update_mask.paths[1]"),
        (J.Job(id="x"), ["*"], "update_mask.paths[0]"),
        (J.Job(id="x", priority=10), ["priority"], "job.priority"),
        (J.Job(id="x", labels={"Bad Key": "v"}), ["labels"], "job.labels"),
    ],
    ids=["no id", "no mask", "unknown path", "wildcard", "priority out of range", "bad label"],
)
def test_bad_updates_are_invalid_argument_naming_the_field(
    stub: job_service_pb2_grpc.JobServiceStub, job: J.Job, paths: list[str], field: str
) -> None:
    if job.id == "x":
        job.id = submit_any(stub).id
    err = expect_error(lambda: update(stub, job, *paths), Code.INVALID_ARGUMENT)
    assert any(name.startswith(field) for name, _ in field_violations(err)), field_violations(err)


def test_an_unknown_job_is_not_found(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    expect_error(
        lambda: update(stub, J.Job(id="nope", priority=1), "priority"), Code.NOT_FOUND, "JOB_NOT_FOUND"
    )


def submit_any(stub: job_service_pb2_grpc.JobServiceStub) -> J.Job:
    """A job that stays queued (scheduled in an hour) on a server with no worker for TYPE."""
    later = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
    job: J.Job = stub.SubmitJob(S.SubmitJobRequest(type="demo.echo", schedule_time=later), timeout=10).job
    return job
