"""Unit tests of the worker's bookkeeping (``jobwire.worker.session``): no server, no event loop."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format
from google.rpc import code_pb2

from jobwire.handlers import HandlerSpec, JobCancelled, NonRetryableError, Progress, handler
from jobwire.v1 import worker_service_pb2 as W
from jobwire.worker.batches import batched
from jobwire.worker.session import (
    Lease,
    Outbox,
    WorkerSession,
    complete_request,
    declaration,
    exception_request,
    outcome_lease,
    register_request,
)


@handler("t.plain")
def plain(params: dict[str, Any], ctx: Any) -> None:
    return None


@handler(
    "t.tuned",
    max_running=3,
    timeout=2.5,
    max_attempts=4,
    initial_backoff=0.25,
    max_backoff=10,
    backoff_multiplier=3.0,
    non_retryable_codes=[4, 3, 3],
)
async def tuned(params: dict[str, Any], ctx: Any) -> None:
    return None


def spec(func: Any) -> HandlerSpec:
    value: HandlerSpec = func.__jobwire_handler__
    return value


HANDLERS = {"t.plain": spec(plain), "t.tuned": spec(tuned)}
A = Lease("job-a", 1, 10)
B = Lease("job-b", 2, 20)


class Cancels:
    """Records the reasons a handler was asked to stop with."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)


def drain(outbox: Outbox) -> list[W.ConnectRequest]:
    out = []
    while (message := outbox.pop()) is not None:
        out.append(message)
    return out


def kinds(messages: list[W.ConnectRequest]) -> list[str | None]:
    return [m.WhichOneof("message") for m in messages]


def connected(concurrency: int = 4) -> tuple[WorkerSession, Outbox]:
    session = WorkerSession("w1", HANDLERS, concurrency)
    outbox = session.connect()
    assert kinds(drain(outbox)) == ["register"]
    return session, outbox


# --- messages ---------------------------------------------------------------------------------------


def test_declaration_leaves_unset_defaults_at_zero() -> None:
    decl = declaration(spec(plain))
    assert decl.type == "t.plain"
    assert decl.max_running == 0
    assert not decl.HasField("timeout")
    assert decl.retry_policy == W.JobTypeDeclaration().retry_policy  # all zero: server defaults


def test_declaration_carries_the_handler_defaults() -> None:
    decl = declaration(spec(tuned))
    assert decl.max_running == 3
    assert decl.timeout.ToNanoseconds() == 2_500_000_000
    policy = decl.retry_policy
    assert policy.max_attempts == 4
    assert policy.initial_backoff.ToMilliseconds() == 250
    assert policy.max_backoff.ToSeconds() == 10
    assert policy.backoff_multiplier == 3.0
    assert list(policy.non_retryable_codes) == [3, 4]


def test_register_request_lists_every_type_and_the_credits() -> None:
    register = register_request("w1", HANDLERS, 7).register
    assert register.worker_id == "w1"
    assert [d.type for d in register.job_types] == ["t.plain", "t.tuned"]
    assert register.credits == 7


def test_complete_request_wraps_non_objects_and_none() -> None:
    result = complete_request(A, {"x": 1, "nested": [1, "a", None]}).complete_job
    assert json_format.MessageToDict(result.result) == {"x": 1.0, "nested": [1.0, "a", None]}
    assert result.lease == A.to_proto()
    assert json_format.MessageToDict(complete_request(A, 42).complete_job.result) == {"value": 42.0}
    assert json_format.MessageToDict(complete_request(A, [1, 2]).complete_job.result) == {"value": [1.0, 2.0]}
    assert json_format.MessageToDict(complete_request(A, None).complete_job.result) == {}


def test_a_result_that_is_not_json_fails_for_good() -> None:
    for value in (object(), {"f": math.nan}, {"s": {1, 2}}):
        fail = complete_request(A, value).fail_job
        assert fail.non_retryable
        assert fail.error.code == code_pb2.UNKNOWN
        assert "not JSON-compatible" in fail.error.message


def test_exceptions_map_to_fail_job() -> None:
    cancelled = exception_request(A, JobCancelled("stop please")).fail_job
    assert (cancelled.error.code, cancelled.error.message, cancelled.non_retryable) == (
        code_pb2.CANCELLED,
        "stop please",
        False,
    )
    timed_out = exception_request(A, JobCancelled("timed out after 1 s"), timed_out=True).fail_job
    assert timed_out.error.code == code_pb2.DEADLINE_EXCEEDED
    bad = exception_request(A, NonRetryableError("bad params")).fail_job
    assert (bad.error.code, bad.error.message, bad.non_retryable) == (
        code_pb2.UNKNOWN,
        "NonRetryableError: bad params",
        True,
    )
    boom = exception_request(A, ValueError("boom")).fail_job
    assert (boom.error.code, boom.error.message, boom.non_retryable) == (
        code_pb2.UNKNOWN,
        "ValueError: boom",
        False,
    )
    huge = exception_request(A, ValueError("x" * 10_000)).fail_job
    assert len(huge.error.message) == 4096


# --- the outbox -------------------------------------------------------------------------------------


def test_outbox_coalesces_keyed_messages_in_place() -> None:
    pushes = []
    outbox = Outbox(on_push=lambda: pushes.append(1))
    first = W.ConnectRequest(add_credits=W.AddCredits(credits=1))
    outbox.push(first)
    for i in range(100):
        outbox.push(W.ConnectRequest(add_credits=W.AddCredits(credits=i + 10)), key="k")
    last = W.ConnectRequest(add_credits=W.AddCredits(credits=2))
    outbox.push(last)
    assert len(outbox) == 3
    assert [m.add_credits.credits for m in drain(outbox)] == [1, 109, 2]
    assert len(pushes) == 3  # replacing wakes nobody: the message is already queued

    outbox.push(W.ConnectRequest(add_credits=W.AddCredits(credits=5)), key="k")  # sent: a new slot
    outbox.discard("k")
    assert outbox.pop() is None


def test_pop_many_keeps_the_order_and_sums_the_credits_at_the_end() -> None:
    outbox = Outbox()
    leases = [Lease(f"j{i}", 1, 1) for i in range(3)]
    for lease in leases:
        outbox.push(complete_request(lease, None))
        outbox.push(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
    taken = outbox.pop_many(4)  # four messages taken: two outcomes, two credits summed
    assert [m.WhichOneof("message") for m in taken] == ["complete_job", "complete_job", "add_credits"]
    assert [outcome_lease(m) for m in taken[:2]] == leases[:2]
    assert taken[-1].add_credits.credits == 2
    rest = outbox.pop_many(100)
    assert [outcome_lease(m) for m in rest[:1]] == leases[2:] and rest[1].add_credits.credits == 1
    assert outbox.pop_many(100) == []


def test_batched_wraps_runs_under_the_byte_budget_and_sends_a_lone_message_as_itself() -> None:
    def wrap(run: list[W.ConnectRequest]) -> W.ConnectRequest:
        return W.ConnectRequest(batch=W.ConnectRequestBatch(messages=run))

    small = [complete_request(Lease(f"j{i}", 1, 1), {"n": i}) for i in range(5)]
    assert batched(small[:1], wrap) == small[:1]
    (one,) = batched(small, wrap)
    assert list(one.batch.messages) == small
    big = complete_request(Lease("big", 1, 1), {"text": "x" * 600})
    budget = big.ByteSize() + small[0].ByteSize() // 2  # the big one fits alone, with nothing beside it
    out = batched([small[0], big, small[1], small[2]], wrap, budget=budget)
    assert out[:2] == [small[0], big]
    assert list(out[2].batch.messages) == small[1:3]


# --- the session ------------------------------------------------------------------------------------


def test_progress_is_coalesced_per_job_and_its_last_report_goes_before_the_outcome() -> None:
    session, outbox = connected()
    session.start(A, "t.plain", Cancels())
    session.start(B, "t.plain", Cancels())
    for step in range(1, 1001):
        session.progress(A, Progress(percent=step / 10, current_step=step, total_steps=1000))
    session.progress(B, Progress(percent=50))
    messages = drain(outbox)
    assert kinds(messages) == ["report_progress", "report_progress"]
    assert messages[0].report_progress.progress.current_step == 1000
    assert messages[0].report_progress.lease == A.to_proto()

    session.progress(A, Progress(percent=99))
    session.progress(A, Progress(percent=100, current_step=2, total_steps=2))
    assert session.finished(A, complete_request(A, {}))
    messages = drain(outbox)
    # The last report is the job's final progress: it goes first, then the outcome.
    assert kinds(messages) == ["report_progress", "complete_job", "add_credits"]
    assert messages[0].report_progress.progress.current_step == 2
    session.progress(A, Progress(percent=50))  # after the outcome: ignored
    assert outbox.pop() is None


def test_outcomes_stay_pending_until_acknowledged() -> None:
    session, _ = connected()
    session.start(A, "t.plain", Cancels())
    session.finished(A, exception_request(A, ValueError("x")))
    assert list(session.pending) == [A]
    ack = session.write_result(A, True, "")
    assert ack.accepted and ack.outcome is not None and not ack.resent
    assert outcome_lease(ack.outcome) == A
    assert not session.pending
    unknown = session.write_result(B, False, "no such lease")
    assert unknown.outcome is None


def test_reconnection_registers_free_credits_heartbeats_and_resends_outcomes() -> None:
    session, _ = connected(concurrency=4)
    session.start(A, "t.plain", Cancels())
    session.start(B, "t.plain", Cancels())
    done = Lease("job-c", 1, 30)
    session.start(done, "t.plain", Cancels())
    session.finished(done, complete_request(done, {"ok": True}))
    session.disconnect()  # the complete_job and add_credits in the old outbox are lost with it
    finished_offline = Lease("job-d", 1, 40)
    session.start(finished_offline, "t.plain", Cancels())
    session.finished(finished_offline, complete_request(finished_offline, {}))  # nothing to send it on

    messages = drain(session.connect())
    assert kinds(messages) == ["register", "heartbeat", "complete_job", "complete_job"]
    assert messages[0].register.credits == 2  # 4 slots, A and B still running
    assert [Lease.from_proto(t) for t in messages[1].heartbeat.leases] == [A, B]
    assert {outcome_lease(m) for m in messages[2:]} == {done, finished_offline}
    ack = session.write_result(done, False, "job already finished")
    assert ack.resent and not ack.accepted


def test_no_credits_are_offered_or_given_back_while_stopping() -> None:
    session, outbox = connected(concurrency=2)
    session.start(A, "t.plain", Cancels())
    session.begin_stop()
    session.finished(A, complete_request(A, {}))
    assert kinds(drain(outbox)) == ["complete_job"]
    session.disconnect()
    assert session.connect().pop() == register_request("w1", HANDLERS, 0)


def test_cancel_requested_reaches_the_handler() -> None:
    session, _ = connected()
    cancels = Cancels()
    session.start(A, "t.plain", cancels)
    assert session.cancel_requested(A, "user asked")
    assert not session.cancel_requested(B, "unknown job")
    assert cancels.reasons == ["user asked"]


def test_a_revoked_lease_is_forgotten_and_its_outcome_never_sent() -> None:
    session, outbox = connected()
    cancels = Cancels()
    session.start(A, "t.plain", cancels)
    session.start(B, "t.plain", Cancels())
    session.progress(A, Progress(percent=10))
    assert session.lease_revoked(A, "the lease expired")
    assert cancels.reasons == ["lease lost: the lease expired"]
    assert session.heartbeat_leases() == [B]
    assert outbox.pop() is None  # its queued progress was dropped
    assert not session.finished(A, complete_request(A, {"late": True}))
    assert kinds(drain(outbox)) == ["add_credits"]  # the slot is free again all the same
    assert A not in session.pending
    assert not session.lease_revoked(A, "again")


def test_revocation_of_an_unacknowledged_outcome_drops_it() -> None:
    session, _ = connected()
    session.start(A, "t.plain", Cancels())
    session.finished(A, complete_request(A, {}))
    assert session.lease_revoked(A, "job finished")
    assert not session.pending


def test_heartbeat_is_coalesced() -> None:
    session, outbox = connected()
    session.start(A, "t.plain", Cancels())
    session.heartbeat()
    session.start(B, "t.plain", Cancels())
    session.heartbeat()
    messages = drain(outbox)
    assert kinds(messages) == ["heartbeat"]
    assert [Lease.from_proto(t) for t in messages[0].heartbeat.leases] == [A, B]


def test_release_all_hands_running_jobs_back() -> None:
    session, outbox = connected()
    cancels_a, cancels_b = Cancels(), Cancels()
    session.start(A, "t.plain", cancels_a)
    session.start(B, "t.plain", cancels_b)
    session.lease_revoked(B, "expired")
    session.begin_stop()
    assert session.release_all("worker shutting down") == [A]
    assert cancels_a.reasons == ["worker shutting down"]
    messages = drain(outbox)
    assert kinds(messages) == ["release_job"]
    assert messages[0].release_job.reason == "worker shutting down"
    assert not session.finished(A, exception_request(A, JobCancelled("worker shutting down")))
    assert outbox.pop() is None  # no outcome, no credit
    assert list(session.pending) == [A]  # until the server acknowledges the release
    assert session.release_all("again") == []


def test_assignments_refused_while_stopping_are_released() -> None:
    session, outbox = connected()
    assert session.can_accept("t.plain") is None
    assert session.can_accept("t.unknown") is not None
    session.refuse(A, "no handler")
    assert kinds(drain(outbox)) == ["fail_job", "add_credits"]
    session.begin_stop()
    reason = session.can_accept("t.plain")
    assert reason == "worker shutting down"
    session.refuse(B, reason)
    assert kinds(drain(outbox)) == ["release_job"]
    assert set(session.pending) == {A, B}
