"""Retries with back-off, schedule_time, RetryJob, time-outs and wait reasons, driven by an injected clock.

The server runs with a FakeClock: back-offs and schedules only pass when the test moves the clock and
calls ``manager.tick()`` — no test here sleeps to let time pass.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from jobwire.server.clock import FakeClock
from jobwire.server.config import ServerConfig
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from jobwire.v1 import worker_service_pb2 as W
from jobwire.v1 import worker_service_pb2_grpc as WG
from support.servers import ServerThread

S = job_service_pb2
J = job_pb2


class Harness:
    def __init__(
        self, thread: ServerThread, clock: FakeClock, stub: job_service_pb2_grpc.JobServiceStub
    ) -> None:
        self.thread, self.clock, self.stub = thread, clock, stub

    def advance(self, seconds: float) -> None:
        """Move time on and let the server act on what came due."""
        self.clock.advance(seconds)
        assert self.thread.server is not None
        self.thread.call(self.thread.server.manager.tick())

    def submit(self, job_type: str, **fields: object) -> J.Job:
        params = fields.pop("params", None)
        request = S.SubmitJobRequest(type=job_type, **fields)  # type: ignore[arg-type]
        if params is not None:
            request.params.update(params)  # type: ignore[arg-type]
        job: J.Job = self.stub.SubmitJob(request).job
        return job

    def wait_for(self, job_id: str, predicate: object) -> J.Job:
        """Follow WatchJob until ``predicate(job)`` holds."""
        update: S.WatchJobResponse
        for update in self.stub.WatchJob(S.WatchJobRequest(job_id=job_id), timeout=30):
            if predicate(update.job):  # type: ignore[operator]
                break
        job: J.Job = self.stub.GetJob(S.GetJobRequest(job_id=job_id)).job
        assert predicate(job), job  # type: ignore[operator]
        return job


@pytest.fixture
def harness() -> Iterator[Harness]:
    clock = FakeClock()
    config = ServerConfig(host="127.0.0.1", port=0, store="memory:", lease_duration=30.0)
    with ServerThread(config, clock=clock) as thread, grpc.insecure_channel(thread.target) as channel:
        yield Harness(thread, clock, job_service_pb2_grpc.JobServiceStub(channel))


def backoff_policy(max_attempts: int, initial: float = 10.0) -> J.RetryPolicy:
    return J.RetryPolicy(
        max_attempts=max_attempts,
        initial_backoff=duration_pb2.Duration(seconds=int(initial)),
        backoff_multiplier=2,
    )


def test_failed_attempts_wait_their_back_off_then_retry(harness: Harness) -> None:
    job = harness.submit("test.flaky", params={"succeed_on": 3}, retry_policy=backoff_policy(3))
    waiting = harness.wait_for(job.id, lambda j: j.state == J.JOB_STATE_QUEUED and len(j.attempts) == 1)
    first = waiting.attempts[0]
    assert first.attempt == 1 and first.outcome.message == "RuntimeError: attempt 1 fails"
    assert waiting.attempt == 2
    assert waiting.wait_reason == J.WAIT_REASON_RETRY_BACKOFF and "back-off" in waiting.wait_message
    delay = waiting.schedule_time.ToNanoseconds() / 1e9 - first.end_time.ToNanoseconds() / 1e9
    assert 5.0 <= delay <= 10.0, "first back-off is initial_backoff with jitter (50-100%)"

    harness.advance(4.9)  # not yet: jitter is never below 50%
    assert harness.stub.GetJob(S.GetJobRequest(job_id=job.id)).job.state == J.JOB_STATE_QUEUED
    harness.advance(5.2)
    waiting = harness.wait_for(job.id, lambda j: j.state == J.JOB_STATE_QUEUED and len(j.attempts) == 2)
    second_delay = (
        waiting.schedule_time.ToNanoseconds() / 1e9 - waiting.attempts[1].end_time.ToNanoseconds() / 1e9
    )
    assert 10.0 <= second_delay <= 20.0, "the back-off doubles"
    harness.advance(20.1)
    final = harness.wait_for(job.id, lambda j: j.state == J.JOB_STATE_SUCCEEDED)
    assert final.attempt == 3 and final.result["succeeded_on"] == 3
    assert [a.outcome.code for a in final.attempts] == [2, 2, 0]
    assert final.lease_epoch == 3


def test_spent_attempts_fail_the_job_with_every_error_kept(harness: Harness) -> None:
    job = harness.submit("test.flaky", params={"succeed_on": 10}, retry_policy=backoff_policy(2, initial=1))
    harness.wait_for(job.id, lambda j: len(j.attempts) == 1)
    harness.advance(1.0)
    final = harness.wait_for(job.id, lambda j: j.state == J.JOB_STATE_FAILED)
    assert final.attempt == 2 and len(final.attempts) == 2
    assert final.error.message == "RuntimeError: attempt 2 fails"


def test_non_retryable_failure_stops_at_once(harness: Harness) -> None:
    job = harness.submit("test.nonretryable")
    final = harness.wait_for(job.id, lambda j: j.state == J.JOB_STATE_FAILED)
    assert final.retry_policy.max_attempts == 5 and final.attempt == 1 and len(final.attempts) == 1
    assert "NonRetryableError" in final.error.message


def test_retry_policy_defaults_come_from_type_then_server(harness: Harness) -> None:
    declared = harness.submit("test.nonretryable")
    assert declared.retry_policy.max_attempts == 5  # from @handler(max_attempts=5)
    default = harness.submit("test.echo")
    assert default.retry_policy.max_attempts == 3 and default.retry_policy.backoff_multiplier == 2
    assert (
        default.retry_policy.initial_backoff.seconds == 1 and default.retry_policy.max_backoff.seconds == 300
    )
    override = harness.submit("test.echo", retry_policy=J.RetryPolicy(max_attempts=7))
    assert override.retry_policy.max_attempts == 7 and override.retry_policy.max_backoff.seconds == 300


def test_schedule_time_is_honoured(harness: Harness) -> None:
    when = timestamp_pb2.Timestamp(seconds=int(harness.clock.now() + 3600))
    job = harness.submit("test.echo", schedule_time=when)
    assert job.state == J.JOB_STATE_QUEUED and job.schedule_time == when
    got = harness.stub.GetJob(S.GetJobRequest(job_id=job.id)).job
    assert got.wait_reason == J.WAIT_REASON_SCHEDULED and got.queue_position == 0
    harness.advance(3599)
    assert harness.stub.GetJob(S.GetJobRequest(job_id=job.id)).job.state == J.JOB_STATE_QUEUED
    stats = harness.stub.GetQueueStats(S.GetQueueStatsRequest())
    assert stats.delayed == 1
    harness.advance(1)
    assert harness.wait_for(job.id, lambda j: j.state == J.JOB_STATE_SUCCEEDED).attempt == 1


def test_retry_job_gives_failed_and_cancelled_jobs_a_fresh_budget(harness: Harness) -> None:
    job = harness.submit("test.flaky", params={"succeed_on": 2}, retry_policy=J.RetryPolicy(max_attempts=1))
    failed = harness.wait_for(job.id, lambda j: j.state == J.JOB_STATE_FAILED)
    assert failed.attempt == 1
    retried = harness.stub.RetryJob(S.RetryJobRequest(job_id=job.id)).job
    assert retried.state in (J.JOB_STATE_QUEUED, J.JOB_STATE_RUNNING, J.JOB_STATE_SUCCEEDED)
    final = harness.wait_for(job.id, lambda j: j.state == J.JOB_STATE_SUCCEEDED)
    assert final.attempt == 2 and not final.HasField("error") and len(final.attempts) == 2
    with pytest.raises(grpc.RpcError) as caught:
        harness.stub.RetryJob(S.RetryJobRequest(job_id=job.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    waiting = harness.submit(
        "test.echo", schedule_time=timestamp_pb2.Timestamp(seconds=int(harness.clock.now() + 60))
    )
    assert harness.stub.RetryJob(S.RetryJobRequest(job_id=waiting.id)).job.state == J.JOB_STATE_QUEUED
    cancelled = harness.stub.CancelJob(S.CancelJobRequest(job_id=waiting.id)).job
    assert cancelled.state == J.JOB_STATE_CANCELLED
    again = harness.stub.RetryJob(S.RetryJobRequest(job_id=waiting.id)).job
    assert again.state == J.JOB_STATE_QUEUED and again.cancel_reason == ""
    with pytest.raises(grpc.RpcError) as caught:
        harness.stub.RetryJob(S.RetryJobRequest(job_id="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (J.RetryPolicy(max_attempts=101), "retry_policy.max_attempts"),
        (J.RetryPolicy(backoff_multiplier=0.5), "retry_policy.backoff_multiplier"),
        (
            J.RetryPolicy(initial_backoff=duration_pb2.Duration(seconds=2 * 86400)),
            "retry_policy.initial_backoff",
        ),
    ],
)
def test_bad_retry_policy_is_invalid_argument(harness: Harness, policy: J.RetryPolicy, field: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        harness.submit("test.echo", retry_policy=policy)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()


def test_remote_attempt_time_out_and_lease_expiry_follow_the_clock(harness: Harness) -> None:
    """A raw-stub worker takes a job and goes silent: the time-out, then the lease, end its attempts."""
    with grpc.insecure_channel(harness.thread.target) as channel:
        workers = WG.WorkerServiceStub(channel)
        pending: queue.Queue[W.ConnectRequest | None] = queue.Queue()
        declaration = W.JobTypeDeclaration(type="silent.work")
        pending.put(
            W.ConnectRequest(
                register=W.RegisterWorker(worker_id="silent", credits=2, job_types=[declaration])
            )
        )

        def requests() -> Iterator[W.ConnectRequest]:
            while (item := pending.get()) is not None:
                yield item

        responses = workers.Connect(requests(), timeout=30)
        assert next(responses).WhichOneof("message") == "registered"
        job = harness.submit(
            "silent.work",
            timeout=duration_pb2.Duration(seconds=10),
            retry_policy=backoff_policy(2, initial=1),
        )
        assigned = next(responses).assignment
        assert assigned.job.id == job.id and assigned.timeout.seconds == 10
        harness.advance(11)  # past the time-out, before the lease (30 s) expires
        revoked = next(responses).lease_revoked
        assert revoked.lease == assigned.lease
        waiting = harness.wait_for(job.id, lambda j: j.state == J.JOB_STATE_QUEUED)
        assert waiting.attempts[0].outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        # A late write from the timed-out attempt is refused.
        pending.put(W.ConnectRequest(complete_job=W.CompleteJob(lease=assigned.lease)))
        refused = next(responses).write_result
        assert not refused.accepted and refused.lease == assigned.lease
        harness.advance(1.0)  # the back-off: attempt 2 goes to the same worker
        second = next(responses).assignment
        assert second.lease.attempt == 2 and second.lease.epoch == assigned.lease.epoch + 1
        harness.advance(11)  # attempt 2 times out too: its attempts are spent
        assert next(responses).lease_revoked.lease == second.lease
        final = harness.wait_for(job.id, lambda j: j.state == J.JOB_STATE_FAILED)
        assert [a.outcome.code for a in final.attempts] == [4, 4]
        assert final.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]

        # Without a time-out, the lease decides: heartbeats keep it, silence loses it.
        leased = harness.submit("silent.work", retry_policy=backoff_policy(1))
        pending.put(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
        third = next(responses).assignment
        assert third.job.id == leased.id
        harness.advance(20)
        pending.put(W.ConnectRequest(heartbeat=W.Heartbeat(leases=[third.lease])))
        # A write the server must answer, sent after the heartbeat: its answer means the heartbeat was read.
        pending.put(W.ConnectRequest(complete_job=W.CompleteJob(lease=assigned.lease)))
        assert not next(responses).write_result.accepted
        renewed = harness.stub.GetJob(S.GetJobRequest(job_id=leased.id)).job
        assert renewed.lease_expire_time.seconds == int(harness.clock.now()) + 30
        harness.advance(15)  # 35 s after the assignment, 15 s after the heartbeat: still held
        assert harness.stub.GetJob(S.GetJobRequest(job_id=leased.id)).job.state == J.JOB_STATE_RUNNING
        harness.advance(16)
        assert next(responses).lease_revoked.lease == third.lease
        lost = harness.wait_for(leased.id, lambda j: j.state == J.JOB_STATE_FAILED)
        assert lost.attempts[0].outcome.details[0].value.startswith(b"\n\rLEASE_EXPIRED")
        pending.put(None)
