"""JobService end to end: a real server on a loopback port, driven through the generated stubs."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from jobwire.server.config import ServerConfig
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from support import handlers as test_handlers
from support.servers import ServerThread

S = job_service_pb2
J = job_pb2


def struct(**values: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def submit(stub: job_service_pb2_grpc.JobServiceStub, job_type: str, **kwargs: object) -> J.Job:
    params = kwargs.pop("params", None)
    request = S.SubmitJobRequest(type=job_type, **kwargs)  # type: ignore[arg-type]
    if params is not None:
        request.params.update(params)  # type: ignore[arg-type]
    response: S.SubmitJobResponse = stub.SubmitJob(request)
    return response.job


def watch_all(
    stub: job_service_pb2_grpc.JobServiceStub, job_id: str, after: int = 0
) -> list[S.WatchJobResponse]:
    return list(stub.WatchJob(S.WatchJobRequest(job_id=job_id, after_sequence=after), timeout=30))


def wait_state(stub: job_service_pb2_grpc.JobServiceStub, job_id: str, *states: int) -> J.Job:
    """Follow WatchJob until the job is in one of ``states`` (no polling sleeps)."""
    update: S.WatchJobResponse
    for update in stub.WatchJob(S.WatchJobRequest(job_id=job_id), timeout=30):
        if update.job.state in states:
            return update.job
    job: J.Job = stub.GetJob(S.GetJobRequest(job_id=job_id)).job
    assert job.state in states, J.JobState.Name(job.state)
    return job


def rich_error(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """(code, ErrorInfo.reason, BadRequest field violations) of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    reason, violations = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            assert info.domain == "jobwire.dev"
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
    return error.code(), reason, violations


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    test_handlers.GATE.clear()
    yield test_handlers.GATE
    test_handlers.GATE.set()


def server_with(**settings: object) -> ServerThread:
    return ServerThread(ServerConfig(host="127.0.0.1", port=0, store="memory:", **settings))  # type: ignore[arg-type]


@pytest.fixture
def single_slot(gate: threading.Event) -> Iterator[job_service_pb2_grpc.JobServiceStub]:
    """A server that runs one job at a time, with strict priorities (no aging)."""
    with (
        server_with(max_running=1, aging_interval=0.0, cancel_grace=0.3, max_queued=5) as running,
        grpc.insecure_channel(running.target) as channel,
    ):
        yield job_service_pb2_grpc.JobServiceStub(channel)


# -- the happy path -----------------------------------------------------------------------------------


def test_submit_returns_queued_job_then_watch_streams_to_success(
    stub: job_service_pb2_grpc.JobServiceStub,
) -> None:
    job = submit(stub, "demo.sleep", params={"seconds": 0.2, "steps": 4}, labels={"team": "a"})
    assert job.state == J.JOB_STATE_QUEUED
    assert len(job.id) == 26 and job.id.isalnum()
    assert job.priority == 5 and job.labels["team"] == "a" and job.create_time.seconds > 0

    updates = watch_all(stub, job.id)
    sequences = [u.sequence for u in updates]
    assert sequences == sorted(set(sequences)), "sequences strictly increase"
    assert updates[0].event_type == S.WATCH_EVENT_TYPE_SNAPSHOT
    final = updates[-1].job
    assert final.state == J.JOB_STATE_SUCCEEDED
    assert dict(final.result) == {"slept_seconds": 0.2, "steps": 4.0}
    assert final.progress.percent == 100 and final.progress.total_steps == 4
    assert (
        final.attempt == 1
        and final.end_time.seconds > 0
        and final.expire_time.seconds > final.end_time.seconds
    )
    states = [u.job.state for u in updates if u.event_type == S.WATCH_EVENT_TYPE_STATE_CHANGED]
    assert J.JOB_STATE_SUCCEEDED in states
    assert any(u.event_type == S.WATCH_EVENT_TYPE_PROGRESS_UPDATED for u in updates)


def test_handler_exception_fails_the_job_with_its_message(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    job = submit(stub, "test.fail")
    final = watch_all(stub, job.id)[-1].job
    assert final.state == J.JOB_STATE_FAILED
    assert final.error.code == grpc.StatusCode.UNKNOWN.value[0]
    assert final.error.message == "ValueError: boom"


def test_timeout_fails_with_deadline_exceeded(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    job = submit(stub, "test.wait_cancel", timeout=duration_pb2.Duration(nanos=100_000_000))
    final = watch_all(stub, job.id)[-1].job
    assert final.state == J.JOB_STATE_FAILED
    assert final.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert final.timeout.nanos == 100_000_000


def test_results_that_are_not_objects_are_wrapped_and_non_json_fails(
    stub: job_service_pb2_grpc.JobServiceStub,
) -> None:
    scalar = submit(stub, "test.scalar")
    assert dict(watch_all(stub, scalar.id)[-1].job.result) == {"value": 42}
    bad = watch_all(stub, submit(stub, "test.not_json").id)[-1].job
    assert bad.state == J.JOB_STATE_FAILED and "not JSON" in bad.error.message


def test_sync_handlers_run_in_threads_without_blocking_the_server(
    stub: job_service_pb2_grpc.JobServiceStub,
) -> None:
    job = submit(stub, "test.sync_wait_cancel", params={"seconds": 30})
    wait_state(stub, job.id, J.JOB_STATE_RUNNING)
    started = time.monotonic()
    assert stub.GetJob(S.GetJobRequest(job_id=job.id)).job.state == J.JOB_STATE_RUNNING
    assert time.monotonic() - started < 5  # generous: only proves the loop is not blocked for 30 s
    stub.CancelJob(S.CancelJobRequest(job_id=job.id))
    assert wait_state(stub, job.id, J.JOB_STATE_CANCELLED).state == J.JOB_STATE_CANCELLED


# -- cancellation -------------------------------------------------------------------------------------


def test_cancel_queued_job_is_immediate(
    single_slot: job_service_pb2_grpc.JobServiceStub, gate: threading.Event
) -> None:
    stub = single_slot
    blocker = submit(stub, "test.gate")
    queued = submit(stub, "test.echo")
    wait_state(stub, blocker.id, J.JOB_STATE_RUNNING)
    assert stub.GetJob(S.GetJobRequest(job_id=queued.id)).job.queue_position == 1
    cancelled = stub.CancelJob(S.CancelJobRequest(job_id=queued.id, reason="not needed")).job
    assert cancelled.state == J.JOB_STATE_CANCELLED
    assert cancelled.cancel_reason == "not needed"
    assert cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]
    # Cancelling again returns it unchanged.
    again = stub.CancelJob(S.CancelJobRequest(job_id=queued.id)).job
    assert again.state == J.JOB_STATE_CANCELLED and again.update_time == cancelled.update_time
    gate.set()
    assert wait_state(stub, blocker.id, J.JOB_STATE_SUCCEEDED).state == J.JOB_STATE_SUCCEEDED
    assert stub.GetJob(S.GetJobRequest(job_id=queued.id)).job.state == J.JOB_STATE_CANCELLED


def test_cancel_running_job_is_cooperative(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    job = submit(stub, "test.wait_cancel")
    wait_state(stub, job.id, J.JOB_STATE_RUNNING)
    response = stub.CancelJob(S.CancelJobRequest(job_id=job.id, reason="user asked")).job
    assert response.state in (J.JOB_STATE_CANCELLING, J.JOB_STATE_CANCELLED)
    final = wait_state(stub, job.id, J.JOB_STATE_CANCELLED)
    assert final.cancel_reason == "user asked" and "user asked" in final.error.message


def test_running_job_that_ignores_cancel_is_forced_after_grace(
    single_slot: job_service_pb2_grpc.JobServiceStub,
) -> None:
    stub = single_slot
    job = submit(stub, "test.ignore_cancel", params={"seconds": 3})
    wait_state(stub, job.id, J.JOB_STATE_RUNNING)
    stub.CancelJob(S.CancelJobRequest(job_id=job.id))
    final = wait_state(stub, job.id, J.JOB_STATE_CANCELLED)  # cancel_grace is 0.3 s, the handler takes 3 s
    assert final.state == J.JOB_STATE_CANCELLED


def test_cancel_finished_job_is_failed_precondition_naming_state(
    stub: job_service_pb2_grpc.JobServiceStub,
) -> None:
    job = submit(stub, "test.echo")
    wait_state(stub, job.id, J.JOB_STATE_SUCCEEDED)
    with pytest.raises(grpc.RpcError) as caught:
        stub.CancelJob(S.CancelJobRequest(job_id=job.id))
    code, reason, _ = rich_error(caught.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "JOB_ALREADY_FINISHED"
    assert "SUCCEEDED" in caught.value.details()


# -- scheduling ---------------------------------------------------------------------------------------


def test_priorities_are_honoured_under_a_limit_of_one(
    single_slot: job_service_pb2_grpc.JobServiceStub, gate: threading.Event
) -> None:
    stub = single_slot
    blocker = submit(stub, "test.gate", params={"order": "blocker"})
    wait_state(stub, blocker.id, J.JOB_STATE_RUNNING)
    jobs = [
        submit(stub, "test.gate", priority=p, params={"order": name})
        for p, name in [(1, "low"), (9, "high-1"), (5, "mid"), (9, "high-2")]
    ]
    positions = {
        j.params["order"]: stub.GetJob(S.GetJobRequest(job_id=j.id)).job.queue_position for j in jobs
    }
    assert positions == {"high-1": 1, "high-2": 2, "mid": 3, "low": 4}
    gate.set()
    finals = [wait_state(stub, j.id, J.JOB_STATE_SUCCEEDED) for j in jobs]
    order = sorted(finals, key=lambda j: (j.start_time.seconds, j.start_time.nanos))
    assert [j.result["order"] for j in order] == ["high-1", "high-2", "mid", "low"]


def test_per_type_limit_holds_while_other_types_run(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    limited = [submit(stub, "test.limited", params={"seconds": 0.05}) for _ in range(4)]
    other = submit(stub, "test.echo")
    assert wait_state(stub, other.id, J.JOB_STATE_SUCCEEDED)
    finals = [wait_state(stub, j.id, J.JOB_STATE_SUCCEEDED) for j in limited]
    spans = sorted((f.start_time.ToNanoseconds(), f.end_time.ToNanoseconds()) for f in finals)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, "test.limited (max_running=1) never overlaps itself"


def test_queue_full_is_resource_exhausted(
    single_slot: job_service_pb2_grpc.JobServiceStub, gate: threading.Event
) -> None:
    stub = single_slot
    blocker = submit(stub, "test.gate")
    wait_state(stub, blocker.id, J.JOB_STATE_RUNNING)
    for _ in range(5):
        submit(stub, "test.echo")
    with pytest.raises(grpc.RpcError) as caught:
        submit(stub, "test.echo")
    assert rich_error(caught.value)[:2] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")


# -- watch --------------------------------------------------------------------------------------------


def test_watch_resumes_after_a_sequence_and_rejects_lost_positions(
    stub: job_service_pb2_grpc.JobServiceStub,
) -> None:
    # Starting in a moment, so that the watch below sees it run (its changes are kept from then on).
    start = timestamp_pb2.Timestamp()
    start.FromNanoseconds(time.time_ns() + 300_000_000)
    job = submit(stub, "test.progress", params={"count": 20}, schedule_time=start)
    full = watch_all(stub, job.id)
    final_sequence = full[-1].sequence
    # Everything after a point the watcher saw is replayed from the retained log.
    assert final_sequence > 20  # created, running, 20 progress updates, succeeded
    middle = full[len(full) // 2].sequence
    resumed = watch_all(stub, job.id, after=middle)
    assert resumed and resumed[0].sequence > middle and resumed[-1].sequence == final_sequence
    replayed = [u.sequence for u in resumed]
    assert replayed == sorted(set(replayed))  # in order, no duplicate
    assert {u.sequence for u in full if u.sequence > middle} <= set(
        replayed
    )  # nothing the first saw is missing
    assert resumed[-1].job.state == J.JOB_STATE_SUCCEEDED
    # Resuming at the end of a finished job ends at once.
    assert watch_all(stub, job.id, after=final_sequence) == []
    # Beyond the end is OUT_OF_RANGE.
    with pytest.raises(grpc.RpcError) as caught:
        watch_all(stub, job.id, after=final_sequence + 1)
    assert rich_error(caught.value)[:2] == (grpc.StatusCode.OUT_OF_RANGE, "WATCH_POSITION_LOST")


def test_watch_of_finished_job_sends_snapshot_and_ends(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    job = submit(stub, "test.echo", params={"x": 1})
    wait_state(stub, job.id, J.JOB_STATE_SUCCEEDED)
    updates = watch_all(stub, job.id)
    assert len(updates) == 1 and updates[0].event_type == S.WATCH_EVENT_TYPE_SNAPSHOT
    assert updates[0].job.state == J.JOB_STATE_SUCCEEDED


def test_many_watchers_all_see_the_terminal_state(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    job = submit(stub, "demo.sleep", params={"seconds": 0.3, "steps": 30})
    streams = [stub.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=30) for _ in range(20)]
    for stream in streams:
        updates = list(stream)
        assert updates[-1].job.state == J.JOB_STATE_SUCCEEDED
        assert [u.sequence for u in updates] == sorted({u.sequence for u in updates})


# -- list ---------------------------------------------------------------------------------------------


def test_list_filters_and_pages_newest_first(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    first = [submit(stub, "test.echo", labels={"batch": "one", "n": str(i)}) for i in range(5)]
    middle = timestamp_pb2.Timestamp()
    middle.GetCurrentTime()
    second = [submit(stub, "test.fail", labels={"batch": "two"}) for _ in range(3)]
    for job in first + second:
        wait_state(stub, job.id, J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED)

    seen: list[str] = []
    token = ""
    while True:
        page = stub.ListJobs(S.ListJobsRequest(page_size=3, page_token=token))
        seen.extend(j.id for j in page.jobs)
        if len(seen) == 3:
            submit(stub, "test.echo")  # a new job must not shift the following pages
        token = page.next_page_token
        if not token:
            break
    assert seen == [j.id for j in reversed(first + second)]

    failed = stub.ListJobs(S.ListJobsRequest(states=[J.JOB_STATE_FAILED])).jobs
    assert {j.id for j in failed} == {j.id for j in second}
    by_label = stub.ListJobs(S.ListJobsRequest(labels={"batch": "one", "n": "3"})).jobs
    assert [j.id for j in by_label] == [first[3].id]
    by_type = stub.ListJobs(S.ListJobsRequest(types=["test.fail"], page_size=1000)).jobs
    assert len(by_type) == 3
    recent = stub.ListJobs(S.ListJobsRequest(create_time_start=middle, types=["test.echo", "test.fail"])).jobs
    assert {j.id for j in recent} >= {j.id for j in second} and not {j.id for j in recent} & {
        j.id for j in first
    }
    older = stub.ListJobs(S.ListJobsRequest(create_time_end=middle)).jobs
    assert {j.id for j in older} == {j.id for j in first}


# -- idempotency --------------------------------------------------------------------------------------


def test_repeated_request_id_returns_the_same_job(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    one = submit(stub, "test.echo", params={"a": 1}, request_id="req-1")
    two = submit(stub, "test.echo", params={"a": 1}, request_id="req-1")
    assert one.id == two.id
    assert len(stub.ListJobs(S.ListJobsRequest()).jobs) == 1
    with pytest.raises(grpc.RpcError) as caught:
        submit(stub, "test.echo", params={"a": 2}, request_id="req-1")
    assert rich_error(caught.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")


def test_concurrent_submits_with_one_request_id_create_one_job(
    stub: job_service_pb2_grpc.JobServiceStub,
) -> None:
    futures = [
        stub.SubmitJob.future(S.SubmitJobRequest(type="test.echo", request_id="same", params=struct(k=1)))
        for _ in range(20)
    ]
    ids = {f.result().job.id for f in futures}
    assert len(ids) == 1


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_fields", "field", "reason"),
    [
        ({"type": "no.such.type"}, "type", "UNKNOWN_JOB_TYPE"),
        ({"type": ""}, "type", "INVALID_ARGUMENT"),
        ({"type": "bad type!"}, "type", "INVALID_ARGUMENT"),
        ({"type": "test.echo", "priority": 10}, "priority", "INVALID_ARGUMENT"),
        ({"type": "test.echo", "priority": -1}, "priority", "INVALID_ARGUMENT"),
        ({"type": "test.echo", "labels": {"Bad Key": "v"}}, "labels['Bad Key']", "INVALID_ARGUMENT"),
        ({"type": "test.echo", "labels": {"k": "v" * 300}}, "labels['k']", "INVALID_ARGUMENT"),
        ({"type": "test.echo", "request_id": "r" * 129}, "request_id", "INVALID_ARGUMENT"),
        ({"type": "test.echo", "timeout": duration_pb2.Duration(seconds=-1)}, "timeout", "INVALID_ARGUMENT"),
        (
            {"type": "test.echo", "timeout": duration_pb2.Duration(seconds=8 * 86400)},
            "timeout",
            "INVALID_ARGUMENT",
        ),
    ],
)
def test_bad_submit_is_invalid_argument_with_field_violations(
    stub: job_service_pb2_grpc.JobServiceStub, request_fields: dict[str, object], field: str, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitJob(S.SubmitJobRequest(**request_fields))  # type: ignore[arg-type]
    code, got_reason, violations = rich_error(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and got_reason == reason
    assert field in [v[0] for v in violations]
    if reason == "UNKNOWN_JOB_TYPE":
        assert "known types: " in caught.value.details() and "demo.sleep" in caught.value.details()


def test_oversized_params_are_invalid_argument(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        submit(stub, "test.echo", params={"blob": "x" * (1 << 20)})
    code, _, violations = rich_error(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations[0][0] == "params"


def test_bad_ids_page_tokens_and_filters(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    cases: list[tuple[object, grpc.StatusCode, str]] = [
        (
            lambda: stub.GetJob(S.GetJobRequest(job_id="")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
        (lambda: stub.GetJob(S.GetJobRequest(job_id="nope")), grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND"),
        (
            lambda: stub.CancelJob(S.CancelJobRequest(job_id="nope")),
            grpc.StatusCode.NOT_FOUND,
            "JOB_NOT_FOUND",
        ),
        (
            lambda: stub.CancelJob(S.CancelJobRequest(job_id="x", reason="r" * 2000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
        (
            lambda: stub.ListJobs(S.ListJobsRequest(page_size=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
        (
            lambda: stub.ListJobs(S.ListJobsRequest(page_token="garbage!")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
        (
            lambda: stub.ListJobs(S.ListJobsRequest(states=[J.JOB_STATE_UNSPECIFIED])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
        (
            lambda: list(stub.WatchJob(S.WatchJobRequest(job_id="nope"))),
            grpc.StatusCode.NOT_FOUND,
            "JOB_NOT_FOUND",
        ),
        (
            lambda: list(stub.WatchJob(S.WatchJobRequest(job_id=""))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
    ]
    for call, code, reason in cases:
        with pytest.raises(grpc.RpcError) as caught:
            call()  # type: ignore[operator]
        assert rich_error(caught.value)[:2] == (code, reason)

    for _ in range(3):
        submit(stub, "test.echo")
    token = stub.ListJobs(S.ListJobsRequest(page_size=1)).next_page_token
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListJobs(S.ListJobsRequest(page_size=1, page_token=token, types=["test.echo"]))
    assert rich_error(caught.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    start, end = timestamp_pb2.Timestamp(seconds=200), timestamp_pb2.Timestamp(seconds=100)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListJobs(S.ListJobsRequest(create_time_start=start, create_time_end=end))
    assert ("create_time_end", "is before create_time_start") in rich_error(caught.value)[2]


def test_undecodable_request_bytes_are_invalid_argument(jobwire_target: str) -> None:
    """Garbage on the wire is bad input: INVALID_ARGUMENT with details, and the server carries on."""
    with grpc.insecure_channel(jobwire_target) as channel:
        raw = channel.unary_unary("/jobwire.v1.JobService/GetJob")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff\xff\xff", timeout=10)
        assert rich_error(caught.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert rich_error(caught.value)[2][0][0] == "request"
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        assert stub.GetQueueStats(S.GetQueueStatsRequest()).max_running == 8


# -- stats and health ---------------------------------------------------------------------------------


def test_queue_stats_counts_and_timings(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    ok = [submit(stub, "test.echo", priority=p) for p in (1, 1, 7)]
    bad = submit(stub, "test.fail")
    for job in [*ok, bad]:
        wait_state(stub, job.id, J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED)
    stats = stub.GetQueueStats(S.GetQueueStatsRequest())
    by_state = {c.state: c.count for c in stats.state_counts}
    assert by_state[J.JOB_STATE_SUCCEEDED] == 3 and by_state[J.JOB_STATE_FAILED] == 1
    assert len(by_state) == 6
    types = {t.type: t for t in stats.type_stats}
    assert types["test.echo"].total == 3 and types["test.limited"].max_running == 1
    assert stats.finished_in_window == 4 and stats.success_rate == pytest.approx(0.75)
    assert stats.max_running == 8 and stats.running == 0 and not stats.draining
    assert stats.window.seconds == 300


def test_health_is_serving(jobwire_target: str) -> None:
    with grpc.insecure_channel(jobwire_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "jobwire.v1.JobService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_progress_details_reach_watchers_and_are_kept(store: str, tmp_path: Any) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, store=f"sqlite:///{tmp_path / 'j.db'}")
    with (
        ServerThread(None if store == "memory" else config) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        stub = job_service_pb2_grpc.JobServiceStub(ch)
        job = submit(stub, "test.progress", params={"count": 5, "details": True})
        updates = watch_all(stub, job.id)
        details = [
            json_format.MessageToDict(u.job.progress.details) for u in updates if u.job.HasField("progress")
        ]
        assert details[-1] == {"done": 5, "left": 0}
        final = stub.GetJob(S.GetJobRequest(job_id=job.id)).job
        assert json_format.MessageToDict(final.progress.details) == {"done": 5, "left": 0}
