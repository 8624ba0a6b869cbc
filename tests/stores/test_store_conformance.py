"""One conformance suite for every JobStore backend (the ``store`` fixture is parametrised in conftest).

Backend-specific checks (SQLite group commit, flush timer, schema version and migrations) and the
``open_store`` factory are at the end.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg
import pytest

from jobwire.handlers.api import Progress, RetryDefaults
from jobwire.server.audit import ATTEMPT_STARTED, MAX_AUDIT_ENTRIES, RETRIED, SUBMITTED, AuditEntry
from jobwire.server.changes import ChangeKind, JobChange
from jobwire.server.job import AttemptRecord, ErrorCode, Job, JobError, RetryPolicy, WaitReason
from jobwire.server.job_types import JobType
from jobwire.server.state_machine import JobState
from jobwire.server.stores.base import (
    Claim,
    Cursor,
    DuplicateRequestId,
    Expect,
    JobCount,
    JobFilter,
    JobQuery,
    JobStore,
    ListOrder,
    QueuedJob,
    RateLimited,
    SubmitRate,
)
from jobwire.server.stores.factory import open_store
from jobwire.server.stores.memory import MemoryStore
from jobwire.server.stores.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from jobwire.server.stores.postgres import PostgresStore
from jobwire.server.stores.rows import COLUMNS, job_to_row, job_type_to_row
from jobwire.server.stores.sqlite import MIGRATIONS, SqliteStore
from support.postgres import POSTGRES_DSN, store_url

MakeJob = Callable[..., Job]
Reopen = Callable[[JobStore], Awaitable[JobStore | None]]
T0 = 1_700_000_000.0


async def flushed(store: JobStore, reopen: Reopen, job_id: str) -> Job:
    """The stored job once pending progress is written: after close and reopen when the backend is durable."""
    reopened = await reopen(store)
    job = await (reopened or store).get(job_id)
    assert job is not None
    return job


async def ids(store: JobStore, query: JobQuery) -> list[str]:
    return [job.id for job in await store.list(query)]


def full_job(make_job: MakeJob) -> Job:
    """A job with every stored field set to something other than its default, unicode included.

    The store does not judge whether the fields make sense together (that is the manager's job).
    """
    return make_job(
        type="übersetzung/翻訳",
        state=JobState.FAILED,
        priority=9,
        params={
            "text": "naïve café ☕",
            "n": 3,
            "ratio": 0.25,
            "flags": [True, False, None],
            "nested": {"deep": ["a", {"b": 1.5}]},
        },
        labels={"team": "données", "env": "prod", "emoji": "🚀", "dotted.key/x": "v"},
        create_time=T0 + 0.123456789,
        update_time=T0 + 10.5,
        queue_time=T0 + 1.25,
        attempt=2,
        progress=Progress(percent=42.5, message="étape 3 — ok", current_step=3, total_steps=7),
        result={"partial": "résultat", "count": 2},
        error=JobError(
            ErrorCode.DEADLINE_EXCEEDED, "timed out ⏱", "JOB_TIMEOUT", {"timeout": "30s", "clé": "valeur"}
        ),
        start_time=T0 + 2.0,
        end_time=T0 + 9.75,
        expire_time=T0 + 86_400.0,
        request_id="req-ünïcode-1",
        request_fingerprint="sha256:abc",
        timeout=30.0,
        cancel_reason="",
        sequence=17,
        retry_policy=RetryPolicy(
            max_attempts=5,
            initial_backoff=0.5,
            max_backoff=60.0,
            backoff_multiplier=3.0,
            non_retryable_codes=frozenset({3, 4}),
        ),
        schedule_time=T0 + 3600.5,
        attempts=(
            # 9 = FAILED_PRECONDITION: a code a remote worker may report that ErrorCode does not name.
            AttemptRecord(
                1, T0 + 2.0, T0 + 3.5, JobError(9, "état invalide", "BAD_STATE", {"k": "v"}), "wörker-1"
            ),
            AttemptRecord(2, T0 + 5.0, T0 + 6.0, None, "local"),
            AttemptRecord(3, T0 + 7.0, T0 + 9.75, JobError(ErrorCode.UNAVAILABLE, "gone", "WORKER_LOST"), ""),
        ),
        worker_id="worker-7/🚀",
        lease_expire_time=T0 + 40.25,
        lease_epoch=12,
        attempt_base=1,
        tenant="acme-corp.eu",
        created_by="jürgen.müller@例え.jp/🚀",
        retention=86400.5,
    )


# --- round trips -----------------------------------------------------------------------------------


async def test_insert_get_round_trips_every_field(store: JobStore, reopen: Reopen, make_job: MakeJob) -> None:
    job = full_job(make_job)
    await store.insert(job)
    source: JobStore | None = store
    while source is not None:
        got = await source.get(job.id)
        assert got == job
        assert got is not job
        assert type(got.state) is JobState
        # Codes are plain ints, whether or not ErrorCode names them.
        assert got.error is not None and type(got.error.code) is int
        assert [None if a.outcome is None else type(a.outcome.code) for a in got.attempts] == [int, None, int]
        assert type(got.attempts) is tuple and all(type(a) is AttemptRecord for a in got.attempts)
        assert type(got.retry_policy) is RetryPolicy and type(got.retry_policy.max_attempts) is int
        assert isinstance(got.params["ratio"], float) and isinstance(got.params["n"], int)
        source = await reopen(source) if source is store else None  # again from disk, if durable


async def test_round_trips_defaults_and_none(store: JobStore, make_job: MakeJob) -> None:
    minimal = make_job(params={}, timeout=None)
    with_timeout = make_job(timeout=0.5, cancel_reason="user asked", state=JobState.CANCELLING)
    await store.insert(minimal)
    await store.insert(with_timeout)
    got_minimal = await store.get(minimal.id)
    got_timeout = await store.get(with_timeout.id)
    assert got_minimal == minimal
    assert got_minimal is not None
    assert (got_minimal.progress, got_minimal.result, got_minimal.error, got_minimal.timeout) == (
        None,
        None,
        None,
        None,
    )
    assert (got_minimal.retry_policy, got_minimal.schedule_time, got_minimal.attempts) == (
        RetryPolicy(),
        None,
        (),
    )
    assert (got_minimal.worker_id, got_minimal.lease_expire_time) == ("", None)
    assert (got_minimal.lease_epoch, got_minimal.attempt_base) == (0, 0)
    assert got_timeout == with_timeout


async def test_error_codes_round_trip_as_plain_ints(store: JobStore, make_job: MakeJob) -> None:
    codes = [0, 3, 9, 16, ErrorCode.CANCELLED]
    jobs = [make_job(state=JobState.FAILED, error=JobError(code, f"code {code}", "R")) for code in codes]
    for job in jobs:
        await store.insert(job)
    for job, code in zip(jobs, codes, strict=True):
        got = await store.get(job.id)
        assert got is not None and got.error is not None
        assert got.error.code == int(code) and type(got.error.code) is int


async def test_computed_fields_are_never_stored(
    store: JobStore, reopen: Reopen, make_job: MakeJob, epoch: int
) -> None:
    computed = {"queue_position": 3, "wait_reason": WaitReason.NO_WORKER, "wait_message": "no worker ☹"}
    job = make_job(**computed)
    expected = full_job_like(job)
    expected.queue_position, expected.wait_reason, expected.wait_message = 0, WaitReason.NONE, ""
    other = make_job(**computed)
    await store.insert(job)
    await store.insert(other)
    [claimed] = await store.claim([Claim(other.id, "w", "r/s1", T0 + 30)], T0, epoch)
    assert claimed is not None
    readers: list[Callable[[JobStore], Awaitable[list[Job]]]] = [
        lambda s: s.list(JobQuery()),
        lambda s: s.load_active(),
    ]
    source: JobStore | None = store
    while source is not None:
        got = await source.get(job.id)
        assert got == expected
        for read in readers:
            for listed in await read(source):
                assert (listed.queue_position, listed.wait_reason, listed.wait_message) == (
                    0,
                    WaitReason.NONE,
                    "",
                )
                assert type(listed.wait_reason) is WaitReason
        source = await reopen(source) if source is store else None


async def test_get_missing_returns_none(store: JobStore) -> None:
    assert await store.get("0" * 26) is None


async def test_returned_jobs_are_copies(store: JobStore, make_job: MakeJob) -> None:
    job = full_job(make_job)
    await store.insert(job)
    got = await store.get(job.id)
    assert got is not None and got.progress is not None and got.error is not None
    got.state = JobState.SUCCEEDED
    got.labels["team"] = "changed"
    got.progress.percent = 99.0
    got.error.metadata["timeout"] = "changed"
    got.sequence = 999
    outcome = got.attempts[0].outcome
    assert outcome is not None
    outcome.metadata["k"] = "changed"
    outcome.message = "changed"
    [listed] = await store.list(JobQuery())
    listed.labels.clear()
    listed_outcome = listed.attempts[0].outcome
    assert listed_outcome is not None
    listed_outcome.metadata.clear()
    assert await store.get(job.id) == full_job_like(job)


def copy_error(error: JobError) -> JobError:
    return JobError(error.code, error.message, error.reason, dict(error.metadata))


def full_job_like(job: Job) -> Job:
    """An independent copy to compare against (the original may be mutated by a test)."""
    copy = job.copy()
    copy.labels = dict(job.labels)
    if job.error is not None:
        copy.error = copy_error(job.error)
    copy.attempts = tuple(
        AttemptRecord(a.attempt, a.start_time, a.end_time, a.outcome and copy_error(a.outcome), a.worker_id)
        for a in job.attempts
    )
    return copy


async def test_mutating_the_job_after_a_write_does_not_reach_the_store(
    store: JobStore, make_job: MakeJob
) -> None:
    job = full_job(make_job)
    expected = full_job_like(job)
    await store.insert(job)
    assert job.progress is not None and job.error is not None
    job.state = JobState.RUNNING
    job.labels["team"] = "changed"
    job.progress.percent = 1.0
    job.error.metadata["clé"] = "changed"
    outcome = job.attempts[0].outcome
    assert outcome is not None
    outcome.metadata["k"] = "changed"
    job.attempts += (AttemptRecord(4, T0, T0, None, "late"),)
    job.lease_epoch = 99
    assert await store.get(job.id) == expected

    changes = {"error": JobError(ErrorCode.CANCELLED, "cancelled", "JOB_CANCELLED", {"a": "b"})}
    updated = await store.transition(job.id, Expect(JobState.FAILED), JobState.CANCELLED, changes, T0 + 99)
    assert updated is not None
    changes["error"].metadata["a"] = "changed"  # the store kept its own copy
    stored = await store.get(job.id)
    assert stored is not None and stored.error is not None and stored.error.metadata == {"a": "b"}


async def test_job_mutated_while_insert_is_pending_is_stored_as_it_was(
    store: JobStore, make_job: MakeJob
) -> None:
    """The row is captured when insert is called, not when the writer gets round to it."""
    job = make_job(labels={"k": "v"})
    expected = full_job_like(job)
    pending = asyncio.ensure_future(store.insert(job))
    await asyncio.sleep(0)  # let insert start and queue its write
    job.labels["k"] = "changed"
    job.state = JobState.RUNNING
    await pending
    assert await store.get(job.id) == expected


# --- request ids -----------------------------------------------------------------------------------


async def test_duplicate_request_id_is_refused(store: JobStore, make_job: MakeJob) -> None:
    first = make_job(request_id="req-1")
    second = make_job(request_id="req-1")
    await store.insert(first)
    with pytest.raises(DuplicateRequestId):
        await store.insert(second)
    assert await store.get(second.id) is None
    assert await store.get_by_request_id("default", "req-1") == first


async def test_empty_request_id_never_conflicts(store: JobStore, make_job: MakeJob) -> None:
    jobs = [make_job(request_id="") for _ in range(3)]
    for job in jobs:
        await store.insert(job)
    for job in jobs:
        assert await store.get(job.id) == job
    assert await store.get_by_request_id("default", "") is None


async def test_one_duplicate_in_concurrent_inserts_fails_only_itself(
    store: JobStore, make_job: MakeJob
) -> None:
    jobs = [make_job(request_id=f"req-{i}") for i in range(20)]
    jobs.append(make_job(request_id="req-7"))
    outcomes = await asyncio.gather(*(store.insert(job) for job in jobs), return_exceptions=True)
    assert [type(o) for o in outcomes].count(DuplicateRequestId) == 1
    assert isinstance(outcomes[-1], DuplicateRequestId)
    for job in jobs[:-1]:
        assert await store.get(job.id) == job
    assert await store.get(jobs[-1].id) is None


async def test_get_by_request_id(store: JobStore, make_job: MakeJob) -> None:
    job = make_job(request_id="abc")
    await store.insert(make_job(request_id="other"))
    await store.insert(job)
    assert await store.get_by_request_id("default", "abc") == job
    assert await store.get_by_request_id("default", "missing") is None


async def test_duplicate_id_is_refused(store: JobStore, make_job: MakeJob) -> None:
    job = make_job()
    await store.insert(job)
    with pytest.raises(ValueError):
        await store.insert(make_job(id=job.id))


async def test_request_ids_are_unique_per_tenant(store: JobStore, make_job: MakeJob) -> None:
    in_a = make_job(tenant="a", request_id="req-1")
    in_b = make_job(tenant="b", request_id="req-1")
    await store.insert(in_a)
    await store.insert(in_b)  # the same request_id in another tenant is another request
    assert await store.get_by_request_id("a", "req-1") == in_a
    assert await store.get_by_request_id("b", "req-1") == in_b
    assert await store.get_by_request_id("default", "req-1") is None
    assert await store.get_by_request_id("c", "req-1") is None
    again_in_a = make_job(tenant="a", request_id="req-1")
    with pytest.raises(DuplicateRequestId):
        await store.insert(again_in_a)
    assert await store.get(again_in_a.id) is None
    assert await store.get_by_request_id("a", "req-1") == in_a


async def test_concurrent_inserts_of_one_request_id_conflict_only_within_a_tenant(
    store: JobStore, make_job: MakeJob
) -> None:
    jobs = [make_job(tenant=tenant, request_id="same") for tenant in ("a", "b", "c")]
    duplicate = make_job(tenant="b", request_id="same")
    outcomes = await asyncio.gather(
        *(store.insert(job) for job in [*jobs, duplicate]), return_exceptions=True
    )
    assert outcomes[:3] == [None, None, None]
    assert isinstance(outcomes[3], DuplicateRequestId)
    for job in jobs:
        assert await store.get_by_request_id(job.tenant, "same") == job
    assert await store.get(duplicate.id) is None


async def test_purge_frees_the_request_id_only_in_its_tenant(store: JobStore, make_job: MakeJob) -> None:
    purged = make_job(tenant="a", state=JobState.SUCCEEDED, request_id="r", expire_time=T0)
    kept = make_job(tenant="b", state=JobState.SUCCEEDED, request_id="r", expire_time=None)
    await store.insert(purged)
    await store.insert(kept)
    assert await store.purge_expired(T0) == 1
    assert await store.get_by_request_id("a", "r") is None
    assert await store.get_by_request_id("b", "r") == kept
    with pytest.raises(DuplicateRequestId):
        await store.insert(make_job(tenant="b", request_id="r"))
    new = make_job(tenant="a", request_id="r")
    await store.insert(new)
    assert await store.get_by_request_id("a", "r") == new


# --- compare-and-set: transitions, claims, leases ------------------------------------------------------


async def test_transition_sets_the_changes_state_update_time_and_next_sequence(
    store: JobStore, reopen: Reopen, make_job: MakeJob
) -> None:
    job = make_job(state=JobState.RUNNING, sequence=4, attempt=1, worker_id="w-1", lease_epoch=2)
    await store.insert(job)
    failure = JobError(14, "worker went away", "WORKER_LOST", {"worker_id": "w-1"})
    changes = {
        "attempt": 2,
        "attempts": (AttemptRecord(1, T0 + 1, T0 + 5, failure, "w-1"),),
        "progress": None,
        "schedule_time": T0 + 7,
        "queue_time": T0 + 7,
        "lease_expire_time": None,
    }
    updated = await store.transition(job.id, Expect(JobState.RUNNING, 2), JobState.QUEUED, changes, T0 + 5)
    expected = full_job_like(job)
    expected.state, expected.update_time, expected.sequence = JobState.QUEUED, T0 + 5, 5
    for name, value in changes.items():
        setattr(expected, name, value)
    assert updated == expected
    stored = await flushed(store, reopen, job.id)
    assert stored == expected


async def test_a_queued_job_can_change_its_priority_labels_and_schedule(
    store: JobStore, reopen: Reopen, make_job: MakeJob
) -> None:
    """What UpdateJob writes: QUEUED -> QUEUED with new ordering fields; counts move with the priority."""
    job = make_job(priority=2, labels={"team": "a"})
    await store.insert(job)
    changes = {"priority": 8, "labels": {"team": "b", "env": "prod"}, "schedule_time": T0 + 60}
    updated = await store.transition(job.id, Expect(JobState.QUEUED), JobState.QUEUED, changes, T0 + 1)
    expected = full_job_like(job)
    expected.update_time, expected.sequence = T0 + 1, job.sequence + 1
    for name, value in changes.items():
        setattr(expected, name, value)
    assert updated == expected
    assert await store.count() == [JobCount(JobState.QUEUED, job.type, 8, 1)]
    by_label = await store.list(JobQuery(JobFilter(labels=(("env", "prod"),)), limit=10))
    assert [j.id for j in by_label] == [job.id]
    assert await flushed(store, reopen, job.id) == expected


async def test_transition_is_a_compare_and_set(store: JobStore, make_job: MakeJob) -> None:
    job = make_job(state=JobState.RUNNING, lease_epoch=3, lease_expire_time=T0 + 30)
    await store.insert(job)
    cancel = {"cancel_reason": "no"}
    assert await store.transition(job.id, Expect(JobState.QUEUED), JobState.CANCELLED, {}, T0) is None
    assert (
        await store.transition(job.id, Expect(JobState.RUNNING, 2), JobState.CANCELLING, cancel, T0) is None
    )
    expired_by_20 = Expect(JobState.RUNNING, 3, lease_expired_by=T0 + 20)
    assert await store.transition(job.id, expired_by_20, JobState.QUEUED, {}, T0 + 20) is None
    assert await store.get(job.id) == job  # nothing changed
    expired_by_30 = Expect(JobState.RUNNING, 3, lease_expired_by=T0 + 30)
    updated = await store.transition(
        job.id, expired_by_30, JobState.QUEUED, {"lease_expire_time": None}, T0 + 30
    )
    assert updated is not None and updated.sequence == job.sequence + 1
    assert await store.transition("0" * 26, Expect(JobState.QUEUED), JobState.CANCELLED, {}, T0) is None


async def test_transition_refuses_fields_that_never_change(store: JobStore, make_job: MakeJob) -> None:
    job = make_job()
    await store.insert(job)
    for field in ("params", "type", "sequence", "request_id", "tenant", "created_by"):
        with pytest.raises(ValueError):
            await store.transition(job.id, Expect(JobState.QUEUED), JobState.CANCELLED, {field: 1}, T0)
    assert await store.get(job.id) == job


async def test_concurrent_transitions_only_one_wins(store: JobStore, make_job: MakeJob) -> None:
    job = make_job()
    await store.insert(job)
    attempts = [
        store.transition(job.id, Expect(JobState.QUEUED), JobState.CANCELLED, {"cancel_reason": f"r{i}"}, T0)
        for i in range(5)
    ]
    outcomes = await asyncio.gather(*attempts)
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == 1
    assert await store.get(job.id) == winners[0]


async def test_claim_starts_a_new_attempt_under_a_new_lease(
    store: JobStore, make_job: MakeJob, epoch: int
) -> None:
    fresh = make_job()
    retried = make_job(
        attempt=2, lease_epoch=4, error=JobError(2, "x", "Y"), result={"r": 1}, schedule_time=T0 + 5
    )
    running = make_job(state=JobState.RUNNING, lease_epoch=1)
    for job in (fresh, retried, running):
        await store.insert(job)
    claims = [
        Claim(fresh.id, "w-1", "r1/s1", T0 + 30),
        Claim(retried.id, "local", "r1/local", None),
        Claim(running.id, "w-2", "r1/s2", T0 + 30),
        Claim("0" * 26, "w-3", "r1/s3", T0 + 30),
    ]
    first, second, third, missing = await store.claim(claims, T0 + 1, epoch)
    assert third is None and missing is None
    assert first is not None and second is not None
    assert (first.state, first.attempt, first.lease_epoch, first.sequence) == (JobState.RUNNING, 1, 1, 2)
    assert (first.worker_id, first.executor, first.lease_expire_time, first.start_time) == (
        "w-1",
        "r1/s1",
        T0 + 30,
        T0 + 1,
    )
    assert (second.attempt, second.lease_epoch, second.error, second.result, second.schedule_time) == (
        2,
        5,
        None,
        None,
        None,
    )
    assert (second.worker_id, second.executor, second.lease_expire_time) == ("local", "r1/local", None)
    assert await store.get(fresh.id) == first and await store.get(running.id) == running


async def test_concurrent_claims_of_one_job_only_one_wins(
    store: JobStore, make_job: MakeJob, epoch: int
) -> None:
    job = make_job()
    await store.insert(job)
    claims = [store.claim([Claim(job.id, f"w-{i}", f"r{i}/s", T0 + 30)], T0, epoch) for i in range(5)]
    won = [c[0] for c in await asyncio.gather(*claims) if c[0] is not None]
    assert len(won) == 1
    assert await store.get(job.id) == won[0]


async def test_a_claim_under_an_old_dispatcher_epoch_is_refused(
    store: JobStore, make_job: MakeJob, epoch: int
) -> None:
    job = make_job()
    await store.insert(job)
    if store.shared:  # a single process has one dispatcher for ever: nothing to fence
        assert await store.claim([Claim(job.id, "w", "r/s", T0 + 30)], T0, epoch - 1) == [None]
        assert await store.get(job.id) == job
        assert await store.list_audit(job.id, 0, 10) == []  # no attempt started: none recorded
    [claimed] = await store.claim([Claim(job.id, "w", "r/s", T0 + 30)], T0, epoch)
    assert claimed is not None


async def test_leases_are_renewed_only_while_current(store: JobStore, make_job: MakeJob) -> None:
    running = make_job(state=JobState.RUNNING, lease_epoch=3, lease_expire_time=T0 + 30)
    finished = make_job(state=JobState.SUCCEEDED, lease_epoch=1)
    await store.insert(running)
    await store.insert(finished)
    renewed = await store.renew_leases(
        [(running.id, 3), (running.id, 2), (finished.id, 1), ("0" * 26, 1)], T0 + 60
    )
    assert renewed == [True, False, False, False]
    stored = await store.get(running.id)
    assert stored is not None and stored.lease_expire_time == T0 + 60
    assert stored.sequence == running.sequence  # not a change
    assert await store.renew_leases([(running.id, 3)], T0 + 10) == [True]  # never shortened
    stored = await store.get(running.id)
    assert stored is not None and stored.lease_expire_time == T0 + 60
    assert await store.renew_leases([], T0) == []


async def test_refresh_extends_only_remote_attempts(store: JobStore, make_job: MakeJob) -> None:
    remote = make_job(state=JobState.RUNNING, worker_id="w-1", lease_expire_time=T0 + 5)
    local = make_job(state=JobState.RUNNING, worker_id="local", lease_expire_time=None)
    queued = make_job(worker_id="")
    for job in (remote, local, queued):
        await store.insert(job)
    assert await store.refresh_remote_leases(T0 + 100) == 1
    assert (await store.get(remote.id)).lease_expire_time == T0 + 100  # type: ignore[union-attr]
    assert (await store.get(local.id)) == local
    assert (await store.get(queued.id)) == queued


# --- progress --------------------------------------------------------------------------------------


async def test_progress_is_written_under_the_lease_as_a_change(
    store: JobStore, reopen: Reopen, make_job: MakeJob
) -> None:
    job = make_job(state=JobState.RUNNING, attempt=1, worker_id="w-1", lease_epoch=1, sequence=5)
    await store.insert(job)
    for step in range(1, 51):
        store.record_progress(job.id, 1, Progress(step * 2.0, f"step {step}", step, 50), T0 + step)
    stored = await flushed(store, reopen, job.id)
    assert stored.progress == Progress(100.0, "step 50", 50, 50)
    assert stored.update_time == T0 + 50
    assert 5 < stored.sequence <= 55  # one sequence per note written: the notes may have been merged
    expected = full_job_like(job)
    expected.progress, expected.update_time, expected.sequence = stored.progress, T0 + 50, stored.sequence
    assert stored == expected


async def test_progress_of_a_lost_lease_changes_nothing(
    store: JobStore, reopen: Reopen, make_job: MakeJob
) -> None:
    stale = make_job(state=JobState.RUNNING, lease_epoch=2)
    done = make_job(state=JobState.SUCCEEDED, lease_epoch=1)
    await store.insert(stale)
    await store.insert(done)
    store.record_progress(stale.id, 1, Progress(50.0, "from an old attempt"), T0 + 1)
    store.record_progress(done.id, 1, Progress(50.0, "after the end"), T0 + 1)
    store.record_progress("0" * 26, 1, Progress(50.0), T0 + 1)
    source = await reopen(store) or store
    assert await source.get(stale.id) == stale
    assert await source.get(done.id) == done


# --- the change feed ------------------------------------------------------------------------------


class Feed:
    """Collects what a store's feed delivers."""

    def __init__(self, store: JobStore) -> None:
        self.changes: list[JobChange] = []
        self.batches = 0
        store.subscribe(self._on)

    def _on(self, changes: Sequence[JobChange]) -> None:
        self.batches += 1
        self.changes.extend(changes)

    def summary(self) -> list[tuple[str, int, ChangeKind, JobState]]:
        return [(c.job_id, c.sequence, c.kind, c.state) for c in self.changes]


async def until_fed(feed: Feed, count: int) -> None:
    for _ in range(400):
        if len(feed.changes) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the feed delivered {len(feed.changes)} changes, not {count}")


async def test_every_change_reaches_the_feed_in_order_before_its_writer_returns(
    store: JobStore, make_job: MakeJob, epoch: int
) -> None:
    feed = Feed(store)
    job = make_job()
    await store.insert(job)
    assert feed.summary() == [(job.id, 1, ChangeKind.STATE, JobState.QUEUED)]
    [claimed] = await store.claim([Claim(job.id, "w", "r/s", T0 + 30)], T0, epoch)
    assert claimed is not None and feed.summary()[-1] == (job.id, 2, ChangeKind.STATE, JobState.RUNNING)
    assert await store.renew_leases([(job.id, claimed.lease_epoch)], T0 + 60) == [True]
    assert len(feed.changes) == 2  # a renewal is not a change
    store.record_progress(job.id, claimed.lease_epoch, Progress(50.0, "half"), T0 + 2)
    await until_fed(feed, 3)
    assert feed.summary()[-1] == (job.id, 3, ChangeKind.PROGRESS, JobState.RUNNING)
    ended = await store.transition(
        job.id,
        Expect(JobState.RUNNING, claimed.lease_epoch),
        JobState.SUCCEEDED,
        {"result": {"ok": 1}},
        T0 + 3,
    )
    assert ended is not None
    assert feed.summary()[-1] == (job.id, 4, ChangeKind.STATE, JobState.SUCCEEDED)
    last = feed.changes[-1]
    assert (last.type, last.priority, last.lease_epoch, last.executor) == (job.type, job.priority, 1, "r/s")
    if not store.shared:
        assert last.job == ended  # a single process's feed carries the whole job
        # A progress change carries its progress: in the whole job, or alone with the update time.
        progressed = feed.changes[2]
        if progressed.job is not None:
            assert (progressed.job.progress, progressed.job.update_time) == (Progress(50.0, "half"), T0 + 2)
        else:
            assert (progressed.progress, progressed.update_time) == (Progress(50.0, "half"), T0 + 2)
    refused = await store.transition(job.id, Expect(JobState.RUNNING), JobState.FAILED, {}, T0 + 4)
    assert refused is None and len(feed.changes) == 4  # nothing written, nothing published


async def test_load_queue_and_load_active(store: JobStore, make_job: MakeJob) -> None:
    queued = [make_job(priority=p, schedule_time=T0 + 60 if p == 1 else None) for p in (3, 1, 7)]
    running = make_job(state=JobState.RUNNING, params={"big": "x" * 100}, lease_epoch=2)
    cancelling = make_job(state=JobState.CANCELLING)
    for job in (*queued, running, cancelling, make_job(state=JobState.SUCCEEDED)):
        await store.insert(job)
    assert await store.load_queue() == [
        QueuedJob(j.id, j.type, j.priority, j.queue_time, j.schedule_time, j.sequence, j.tenant)
        for j in queued
    ]
    active = await store.load_active()
    assert [j.id for j in active] == [running.id, cancelling.id]
    assert active[0].params == {} and active[0].lease_epoch == 2  # no payload: not needed to end it
    expected = full_job_like(running)
    expected.params = {}
    assert active[0] == expected


# --- listing ---------------------------------------------------------------------------------------


async def test_list_is_newest_first_and_limited(store: JobStore, make_job: MakeJob) -> None:
    jobs = [make_job() for _ in range(7)]
    for job in reversed(jobs):  # insertion order must not matter
        await store.insert(job)
    newest_first = [job.id for job in reversed(jobs)]
    assert await ids(store, JobQuery()) == newest_first
    assert await ids(store, JobQuery(limit=3)) == newest_first[:3]
    assert await ids(store, JobQuery(after=Cursor(newest_first[2]))) == newest_first[3:]
    assert await store.list(JobQuery(limit=2)) == list(reversed(jobs))[:2]


async def test_list_without_payload_leaves_params_and_result_out(store: JobStore, make_job: MakeJob) -> None:
    job = make_job(
        params={"big": "x" * 1000}, state=JobState.SUCCEEDED, result={"r": [1, 2]}, labels={"a": "b"}
    )
    await store.insert(job)
    [basic] = await store.list(JobQuery(with_payload=False))
    assert basic.params == {} and basic.result is None
    basic.params, basic.result = job.params, job.result
    assert basic == job  # everything else is there
    [full] = await store.list(JobQuery())
    assert full == job


async def test_paging_sees_every_job_once_while_jobs_arrive(store: JobStore, make_job: MakeJob) -> None:
    originals = [make_job() for _ in range(23)]
    for job in originals:
        await store.insert(job)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await ids(store, JobQuery(limit=5, after=None if cursor is None else Cursor(cursor)))
        seen += page
        if len(page) < 5:
            break
        cursor = page[-1]
        for _ in range(3):  # newer jobs land above the cursor, never in later pages
            await store.insert(make_job())
    assert seen == sorted((job.id for job in originals), reverse=True)


async def test_filter_by_states(store: JobStore, make_job: MakeJob) -> None:
    by_state = {state: make_job(state=state) for state in JobState}
    for job in by_state.values():
        await store.insert(job)
    wanted = frozenset({JobState.RUNNING, JobState.CANCELLING})
    got = await ids(store, JobQuery(filter=JobFilter(states=wanted)))
    assert got == sorted((by_state[s].id for s in wanted), reverse=True)


@pytest.mark.parametrize("order", list(ListOrder), ids=[o.name for o in ListOrder])
async def test_every_order_pages_through_every_job_once(
    store: JobStore, make_job: MakeJob, order: ListOrder
) -> None:
    jobs = [make_job(priority=p) for p in (5, 1, 9, 5, 1, 9, 3)]
    for job in jobs:
        await store.insert(job)
    expected = sorted(jobs, key=lambda j: j.id, reverse=order is not ListOrder.OLDEST)
    if order in (ListOrder.PRIORITY_HIGH, ListOrder.PRIORITY_LOW):  # newest first within a priority
        expected.sort(key=lambda j: j.priority, reverse=order is ListOrder.PRIORITY_HIGH)
    seen: list[Job] = []
    cursor = None
    while page := await store.list(JobQuery(limit=2, after=cursor, order=order)):
        seen.extend(page)
        cursor = Cursor(page[-1].id, page[-1].priority)
    assert [j.id for j in seen] == [j.id for j in expected]


async def test_filter_by_priorities_and_count_matching(store: JobStore, make_job: MakeJob) -> None:
    jobs = [make_job(priority=p, type=t) for p, t in ((1, "a"), (5, "a"), (9, "b"), (5, "b"), (0, "a"))]
    for job in jobs:
        await store.insert(job)
    five_or_nine = JobFilter(priorities=frozenset({5, 9}))
    assert sorted(await ids(store, JobQuery(filter=five_or_nine))) == sorted(j.id for j in jobs[1:4])
    assert await store.count_matching(five_or_nine) == 3
    assert await store.count_matching(JobFilter(priorities=frozenset({5}), types=frozenset({"a"}))) == 1
    assert await store.count_matching(JobFilter()) == 5


async def test_filter_by_types(store: JobStore, make_job: MakeJob) -> None:
    a, b, c = make_job(type="resize"), make_job(type="transcode"), make_job(type="email")
    for job in (a, b, c):
        await store.insert(job)
    got = await ids(store, JobQuery(filter=JobFilter(types=frozenset({"resize", "email"}))))
    assert got == [c.id, a.id]


async def test_filter_by_labels_all_must_match(store: JobStore, make_job: MakeJob) -> None:
    both = make_job(labels={"team": "ml", "env": "prod", "extra": "x"})
    one_only = make_job(labels={"team": "ml"})
    wrong_value = make_job(labels={"team": "ml", "env": "dev"})
    none = make_job(labels={})
    odd_key = make_job(labels={'we"ird.key[0]': "ü"})
    for job in (both, one_only, wrong_value, none, odd_key):
        await store.insert(job)
    labels = (("team", "ml"), ("env", "prod"))
    assert await ids(store, JobQuery(filter=JobFilter(labels=labels))) == [both.id]
    assert await ids(store, JobQuery(filter=JobFilter(labels=(("team", "ml"),)))) == [
        wrong_value.id,
        one_only.id,
        both.id,
    ]
    assert await ids(store, JobQuery(filter=JobFilter(labels=(('we"ird.key[0]', "ü"),)))) == [odd_key.id]


async def test_filter_by_create_time_start_inclusive_end_exclusive(
    store: JobStore, make_job: MakeJob
) -> None:
    jobs = [make_job(create_time=T0 + i) for i in range(5)]
    for job in jobs:
        await store.insert(job)
    window = JobFilter(create_time_start=T0 + 1, create_time_end=T0 + 3)
    assert await ids(store, JobQuery(filter=window)) == [jobs[2].id, jobs[1].id]
    assert await ids(store, JobQuery(filter=JobFilter(create_time_start=T0 + 3))) == [jobs[4].id, jobs[3].id]
    assert await ids(store, JobQuery(filter=JobFilter(create_time_end=T0 + 1))) == [jobs[0].id]


async def test_filters_combine_with_paging(store: JobStore, make_job: MakeJob) -> None:
    matching = []
    for i in range(12):
        job = make_job(
            type="resize" if i % 2 else "email",
            state=JobState.QUEUED if i % 3 else JobState.FAILED,
            labels={"team": "ml"} if i % 4 else {},
            create_time=T0 + i,
        )
        await store.insert(job)
        if job.type == "resize" and job.state == JobState.QUEUED and job.labels and job.create_time >= T0 + 2:
            matching.append(job.id)
    job_filter = JobFilter(
        states=frozenset({JobState.QUEUED}),
        types=frozenset({"resize"}),
        labels=(("team", "ml"),),
        create_time_start=T0 + 2,
    )
    first = await ids(store, JobQuery(filter=job_filter, limit=2))
    rest = await ids(store, JobQuery(filter=job_filter, limit=50, after=Cursor(first[-1])))
    assert first + rest == sorted(matching, reverse=True)
    assert len(matching) >= 3


# --- purge, count ----------------------------------------------------------------------


async def test_purge_expired_deletes_only_expired_finished_jobs(store: JobStore, make_job: MakeJob) -> None:
    now = T0 + 100
    expired = [
        make_job(state=JobState.SUCCEEDED, expire_time=now - 1),
        make_job(state=JobState.FAILED, expire_time=now),  # "at or before now"
        make_job(state=JobState.CANCELLED, expire_time=now - 50),
    ]
    kept = [
        make_job(state=JobState.SUCCEEDED, expire_time=now + 1),
        make_job(state=JobState.FAILED, expire_time=None),
        make_job(state=JobState.RUNNING, expire_time=now - 1),
        make_job(state=JobState.QUEUED, expire_time=now - 1),
        make_job(state=JobState.CANCELLING, expire_time=now),
    ]
    for job in expired + kept:
        await store.insert(job)
    assert await store.purge_expired(now) == 3
    for job in expired:
        assert await store.get(job.id) is None
    assert await ids(store, JobQuery()) == sorted((job.id for job in kept), reverse=True)
    assert await store.purge_expired(now) == 0


async def test_purge_frees_the_request_id(store: JobStore, make_job: MakeJob) -> None:
    old = make_job(state=JobState.SUCCEEDED, request_id="again", expire_time=T0)
    await store.insert(old)
    assert await store.purge_expired(T0) == 1
    assert await store.get_by_request_id("default", "again") is None
    new = make_job(request_id="again")
    await store.insert(new)
    assert await store.get_by_request_id("default", "again") == new


async def test_count_groups_by_state_type_and_priority(store: JobStore, make_job: MakeJob) -> None:
    specs = [
        (JobState.QUEUED, "a", 5),
        (JobState.QUEUED, "a", 5),
        (JobState.QUEUED, "a", 9),
        (JobState.QUEUED, "b", 5),
        (JobState.RUNNING, "a", 5),
        (JobState.FAILED, "b", 0),
    ]
    for state, job_type, priority in specs:
        await store.insert(make_job(state=state, type=job_type, priority=priority))
    counts = await store.count()
    key = lambda c: (c.state, c.type, c.priority)  # noqa: E731
    assert sorted(counts, key=key) == [
        JobCount(JobState.QUEUED, "a", 5, 2),
        JobCount(JobState.QUEUED, "a", 9, 1),
        JobCount(JobState.QUEUED, "b", 5, 1),
        JobCount(JobState.RUNNING, "a", 5, 1),
        JobCount(JobState.FAILED, "b", 0, 1),
    ]
    assert all(type(c.state) is JobState for c in counts)


async def test_count_of_an_empty_store(store: JobStore) -> None:
    assert await store.count() == []


async def recount(store: JobStore, tenants: frozenset[str] = frozenset()) -> list[JobCount]:
    """The counts as a count of every stored job would give them."""
    jobs = await store.list(JobQuery(JobFilter(tenants=tenants), limit=10_000))
    counted = Counter((job.state, job.type, job.priority) for job in jobs)
    return [JobCount(*key, n) for key, n in sorted(counted.items())]


async def test_counts_follow_every_insert_change_and_purge(
    store: JobStore, reopen: Reopen, make_job: MakeJob, epoch: int
) -> None:
    async def check() -> None:
        for tenants in (frozenset(), frozenset({"a"}), frozenset({"b", "c"})):
            assert await store.count(tenants) == await recount(store, tenants)

    queued = [make_job(tenant="a", type="t1", priority=p % 3) for p in range(6)]
    for job in queued[:3]:
        await store.insert(job)
    await store.insert_many(queued[3:], [])
    await store.insert_many([make_job(tenant="b", type="t2") for _ in range(4)], [])
    await check()
    [claimed] = await store.claim([Claim(queued[0].id, "w", "r/s1", T0 + 30)], T0, epoch)
    assert claimed is not None
    await store.transition(queued[1].id, Expect(JobState.QUEUED), JobState.CANCELLED, {"expire_time": T0}, T0)
    await store.transition(
        queued[0].id, Expect(JobState.RUNNING), JobState.SUCCEEDED, {"expire_time": T0 + 3600}, T0
    )
    await check()
    assert await store.transition(queued[2].id, Expect(JobState.RUNNING), JobState.FAILED, {}, T0) is None
    await check()
    assert await store.purge_expired(T0) == 1  # the cancelled job; the succeeded one expires later
    await check()
    assert await store.count(frozenset({"a"})) == [
        JobCount(JobState.QUEUED, "t1", 0, 1),
        JobCount(JobState.QUEUED, "t1", 1, 1),
        JobCount(JobState.QUEUED, "t1", 2, 2),
        JobCount(JobState.SUCCEEDED, "t1", 0, 1),
    ]
    reopened = await reopen(store)
    if reopened is not None:  # durable: the counts are stored with the jobs
        assert await reopened.count() == await recount(reopened)


# --- job types -------------------------------------------------------------------------------------


_WORKER_RETRY = RetryDefaults(
    max_attempts=3, initial_backoff=0.5, max_backoff=30.0, backoff_multiplier=1.5, non_retryable_codes=(3,)
)


def worker_type(
    name: str,
    *,
    timeout: float | None = 30.0,
    max_running: int | None = 4,
    retry: RetryDefaults = _WORKER_RETRY,
    last_seen: float = T0 + 0.125,
    tenant: str = "",
) -> JobType:
    """A type as a worker declares it: every field set unless overridden."""
    return JobType(name, timeout, max_running, retry, last_seen, tenant)


async def test_job_types_empty(store: JobStore) -> None:
    assert await store.load_job_types() == []
    await store.save_job_types([])
    assert await store.load_job_types() == []


async def test_job_types_round_trip_ordered_by_name(store: JobStore, reopen: Reopen) -> None:
    types = [
        worker_type("video.transcode"),
        worker_type("a/b:c-d_e"),  # the handler name pattern: letters, digits and ._:/-
        JobType("email"),  # every optional field unset
        worker_type("Zeta", retry=RetryDefaults(initial_backoff=2.0), timeout=None, max_running=None),
        worker_type("report", retry=RetryDefaults(max_attempts=1), last_seen=0.0),
    ]
    await store.save_job_types(types)
    expected = sorted(types, key=lambda t: t.name)
    assert [t.name for t in expected] == ["Zeta", "a/b:c-d_e", "email", "report", "video.transcode"]
    source: JobStore | None = store
    while source is not None:
        loaded = await source.load_job_types()
        assert loaded == expected
        assert all(type(t.retry) is RetryDefaults for t in loaded)
        by_name = {t.name: t for t in loaded}
        assert by_name["email"] == JobType("email", None, None, RetryDefaults(), 0.0)
        assert type(by_name["report"].retry.max_attempts) is int
        source = await reopen(source) if source is store else None  # again from disk, if durable


async def test_job_types_upsert_by_name(store: JobStore, reopen: Reopen) -> None:
    await store.save_job_types([worker_type("resize"), worker_type("email")])
    newer = worker_type("resize", timeout=None, max_running=1, retry=RetryDefaults(), last_seen=T0 + 60)
    await store.save_job_types([newer, worker_type("zip")])
    expected = [worker_type("email"), newer, worker_type("zip")]
    assert await store.load_job_types() == expected
    # A name given twice in one call: the later one wins.
    await store.save_job_types([worker_type("email", max_running=1), worker_type("email", max_running=9)])
    expected[0] = worker_type("email", max_running=9)
    assert await store.load_job_types() == expected
    reopened = await reopen(store)
    if reopened is not None:
        assert await reopened.load_job_types() == expected


async def test_job_types_do_not_touch_jobs(store: JobStore, make_job: MakeJob) -> None:
    job = make_job(type="resize")
    await store.insert(job)
    await store.save_job_types([worker_type("resize")])
    assert await store.count() == [JobCount(JobState.QUEUED, "resize", 5, 1)]
    assert await store.purge_expired(T0 + 10**9) == 0
    assert await store.load_job_types() == [worker_type("resize")]
    assert await store.get(job.id) == job


async def test_job_types_list_changed_while_save_is_pending(store: JobStore) -> None:
    """The rows are captured when save_job_types is called, not when the writer gets round to it."""
    types = [worker_type("a"), worker_type("b")]
    pending = asyncio.ensure_future(store.save_job_types(types))
    await asyncio.sleep(0)
    types.append(worker_type("c"))
    types[0] = worker_type("a", max_running=99)
    await pending
    assert await store.load_job_types() == [worker_type("a"), worker_type("b")]


async def test_concurrent_job_type_saves_are_all_kept(store: JobStore) -> None:
    names = [f"type.{i:03d}" for i in range(50)]
    await asyncio.gather(*(store.save_job_types([worker_type(name)]) for name in names))
    assert [t.name for t in await store.load_job_types()] == names


async def test_a_job_type_belongs_to_its_tenant(store: JobStore, reopen: Reopen) -> None:
    mine = worker_type("acme.report", tenant="acme")
    shared = worker_type("email", tenant="")
    assert await store.save_job_types([mine, shared]) == []
    # Another tenant, or the shared namespace, cannot take a tenant's name; nor a tenant a shared one.
    taken = worker_type("acme.report", tenant="globex", max_running=99, last_seen=T0 + 60)
    assert await store.save_job_types([taken]) == ["acme.report"]
    assert await store.save_job_types([worker_type("acme.report", tenant="", max_running=1)]) == [
        "acme.report"
    ]
    assert await store.save_job_types([worker_type("email", tenant="acme", max_running=7)]) == ["email"]
    assert await store.load_job_types() == [mine, shared]
    # The owner may update its own, each refusal in a batch is named, and the rest of it is saved.
    newer = worker_type("acme.report", tenant="acme", max_running=2, last_seen=T0 + 120)
    newer_shared = worker_type("email", tenant="", timeout=None, last_seen=T0 + 120)
    zip_type = worker_type("globex.zip", tenant="globex")
    batch = [newer, worker_type("email", tenant="globex"), zip_type, newer_shared, worker_type("globex.zip")]
    assert await store.save_job_types(batch) == ["email", "globex.zip"]
    expected = [newer, newer_shared, zip_type]
    source: JobStore | None = store
    while source is not None:
        loaded = await source.load_job_types()
        assert loaded == expected
        assert [t.tenant for t in loaded] == ["acme", "", "globex"]
        source = await reopen(source) if source is store else None  # again from disk, if durable


async def test_a_forgotten_job_type_can_be_declared_by_another_tenant(store: JobStore) -> None:
    assert await store.save_job_types([worker_type("t", tenant="a")]) == []
    await store.delete_job_types(["t"])
    assert await store.save_job_types([worker_type("t", tenant="b")]) == []
    assert await store.load_job_types() == [worker_type("t", tenant="b")]


# --- tenants ---------------------------------------------------------------------------------------


async def test_filter_by_tenants_and_count_per_tenant(store: JobStore, make_job: MakeJob) -> None:
    a1 = make_job(tenant="a", type="x", created_by="alice")
    b1 = make_job(tenant="b", type="x")
    a2 = make_job(tenant="a", type="y", state=JobState.RUNNING)
    c1 = make_job(tenant="c", type="x", priority=9)
    for job in (a1, b1, a2, c1):
        await store.insert(job)

    def of(*tenants: str, states: frozenset[JobState] = frozenset()) -> JobQuery:
        return JobQuery(filter=JobFilter(tenants=frozenset(tenants), states=states))

    assert await ids(store, of("a")) == [a2.id, a1.id]
    assert await ids(store, of("a", "c")) == [c1.id, a2.id, a1.id]
    assert await ids(store, of("nobody")) == []
    assert await ids(store, of("a", states=frozenset({JobState.QUEUED}))) == [a1.id]
    assert await ids(store, JobQuery()) == [c1.id, a2.id, b1.id, a1.id]  # no tenants: every tenant's
    first = await ids(store, JobQuery(filter=JobFilter(tenants=frozenset({"a", "b"})), limit=2))
    rest = await ids(
        store, JobQuery(filter=JobFilter(tenants=frozenset({"a", "b"})), after=Cursor(first[-1]))
    )
    assert first + rest == [a2.id, b1.id, a1.id]
    [basic] = await store.list(
        JobQuery(filter=JobFilter(tenants=frozenset({"a"})), limit=1, after=Cursor(a2.id))
    )
    assert (basic.tenant, basic.created_by) == ("a", "alice")  # kept in a listing without the payload

    key = lambda c: (c.state, c.type, c.priority)  # noqa: E731
    assert sorted(await store.count(frozenset({"a"})), key=key) == [
        JobCount(JobState.QUEUED, "x", 5, 1),
        JobCount(JobState.RUNNING, "y", 5, 1),
    ]
    assert sorted(await store.count(frozenset({"b", "c"})), key=key) == [
        JobCount(JobState.QUEUED, "x", 5, 1),
        JobCount(JobState.QUEUED, "x", 9, 1),
    ]
    assert await store.count(frozenset({"nobody"})) == []
    assert sorted(await store.count(), key=key) == [
        JobCount(JobState.QUEUED, "x", 5, 2),
        JobCount(JobState.QUEUED, "x", 9, 1),
        JobCount(JobState.RUNNING, "y", 5, 1),
    ]


async def test_queued_and_active_jobs_and_changes_carry_their_tenant(
    store: JobStore, make_job: MakeJob, epoch: int
) -> None:
    feed = Feed(store)
    queued = [make_job(tenant=tenant, created_by=f"{tenant}-user") for tenant in ("a", "b", "default")]
    running = make_job(tenant="b", created_by="bob", state=JobState.RUNNING)
    for job in (*queued, running):
        await store.insert(job)
    assert [c.tenant for c in feed.changes] == ["a", "b", "default", "b"]
    assert await store.load_queue() == [
        QueuedJob(j.id, j.type, j.priority, j.queue_time, j.schedule_time, j.sequence, j.tenant)
        for j in queued
    ]
    assert [(j.tenant, j.created_by) for j in await store.load_active()] == [("b", "bob")]
    [claimed] = await store.claim([Claim(queued[0].id, "w", "r/s", T0 + 30)], T0, epoch)
    assert claimed is not None and (claimed.tenant, claimed.created_by) == ("a", "a-user")
    assert feed.changes[-1].tenant == "a"
    ended = await store.transition(
        claimed.id, Expect(JobState.RUNNING, claimed.lease_epoch), JobState.SUCCEEDED, {}, T0 + 1
    )
    assert ended is not None and (ended.tenant, ended.created_by) == ("a", "a-user")
    assert [q.tenant for q in await store.load_queue()] == ["b", "default"]


# --- the audit trail -------------------------------------------------------------------------------


def audit_entry(job_id: str, n: int, action: str = RETRIED) -> AuditEntry:
    """The ``n``-th entry of a test trail: every field set, and told apart by its detail."""
    return AuditEntry(
        job_id, T0 + n, action, f"user-{n}@example.com", f"req-{n}", "ipv4:10.0.0.1:5000", f"step {n}"
    )


async def trail(store: JobStore, job_id: str) -> list[AuditEntry]:
    """The job's whole audit trail, oldest first."""
    return await store.list_audit(job_id, 0, 10 * MAX_AUDIT_ENTRIES)


def without_ids(entries: Sequence[AuditEntry]) -> list[AuditEntry]:
    """The entries as they were given to the store (entry_id 0), to compare with what it returns."""
    return [entry._replace(entry_id=0) for entry in entries]


async def test_insert_records_its_audit_entry(store: JobStore, reopen: Reopen, make_job: MakeJob) -> None:
    job = make_job(tenant="acme", created_by="jürgen@例え.jp")
    submitted = AuditEntry(
        job.id,
        T0 + 0.123456789,
        SUBMITTED,
        "jürgen@例え.jp",
        "req-ünïcode-1",
        "ipv6:[::1]:50051",
        "type übersetzung/翻訳, priority 9 ☕ " + "é" * 2000,
    )
    assert len(submitted.detail) == 1024  # cut on construction: the store keeps all that is left
    quiet = make_job()
    await store.insert(job, submitted)
    await store.insert(quiet)  # no entry: none recorded
    source: JobStore | None = store
    while source is not None:
        [got] = await source.list_audit(job.id, 0, 10)
        assert type(got.entry_id) is int and got.entry_id > 0
        assert got == submitted._replace(entry_id=got.entry_id)
        assert await source.list_audit(quiet.id, 0, 10) == []
        source = await reopen(source) if source is store else None  # again from disk, if durable


async def test_a_refused_insert_records_nothing(store: JobStore, make_job: MakeJob) -> None:
    first = make_job(request_id="r")
    second = make_job(request_id="r")
    await store.insert(first, audit_entry(first.id, 0, SUBMITTED))
    with pytest.raises(DuplicateRequestId):
        await store.insert(second, audit_entry(second.id, 1, SUBMITTED))
    assert await trail(store, second.id) == []
    assert without_ids(await trail(store, first.id)) == [audit_entry(first.id, 0, SUBMITTED)]


async def test_transition_records_its_audit_only_when_it_happens(store: JobStore, make_job: MakeJob) -> None:
    job = make_job(state=JobState.RUNNING, lease_epoch=2)
    await store.insert(job)
    refused = audit_entry(job.id, 1, "attempt failed")
    assert (
        await store.transition(job.id, Expect(JobState.RUNNING, 1), JobState.FAILED, {}, T0, refused) is None
    )
    assert (
        await store.transition(job.id, Expect(JobState.QUEUED), JobState.CANCELLED, {}, T0, refused) is None
    )
    late = Expect(JobState.RUNNING, 2, lease_expired_by=T0)  # its lease never expires: refused
    assert await store.transition(job.id, late, JobState.QUEUED, {}, T0, refused) is None
    missing = "0" * 26
    gone = audit_entry(missing, 1)
    assert await store.transition(missing, Expect(JobState.QUEUED), JobState.CANCELLED, {}, T0, gone) is None
    assert await trail(store, job.id) == []
    assert await trail(store, missing) == []

    done = audit_entry(job.id, 2, "attempt succeeded")
    changes = {"result": {"ok": True}}
    assert await store.transition(job.id, Expect(JobState.RUNNING, 2), JobState.SUCCEEDED, changes, T0, done)
    [got] = await trail(store, job.id)
    assert got == done._replace(entry_id=got.entry_id) and got.entry_id > 0
    assert (
        await store.transition(job.id, Expect(JobState.RUNNING, 2), JobState.FAILED, {}, T0, refused) is None
    )
    assert await trail(store, job.id) == [got]


async def test_of_concurrent_audited_transitions_only_the_winner_is_recorded(
    store: JobStore, make_job: MakeJob
) -> None:
    job = make_job()
    await store.insert(job)
    outcomes = await asyncio.gather(
        *(
            store.transition(
                job.id,
                Expect(JobState.QUEUED),
                JobState.CANCELLED,
                {"cancel_reason": f"r{i}"},
                T0,
                audit_entry(job.id, i, "cancelled"),
            )
            for i in range(5)
        )
    )
    [winner] = [(i, o) for i, o in enumerate(outcomes) if o is not None]
    assert without_ids(await trail(store, job.id)) == [audit_entry(job.id, winner[0], "cancelled")]


async def test_claim_records_the_attempt_it_starts(store: JobStore, make_job: MakeJob, epoch: int) -> None:
    fresh = make_job()
    retried = make_job(attempt=2, lease_epoch=4)
    running = make_job(state=JobState.RUNNING, lease_epoch=1)
    for job in (fresh, retried, running):
        await store.insert(job)
    claims = [
        Claim(fresh.id, "wörker/🚀", "r1/s1", T0 + 30, principal="worker:acme/ü", peer="ipv4:10.1.2.3:4567"),
        Claim(retried.id, "local", "r1/local", None),  # an in-process attempt: the default principal
        Claim(running.id, "w-2", "r1/s2", T0 + 30, principal="worker:x", peer="ipv4:10.9.9.9:1"),
        Claim("0" * 26, "w-3", "r1/s3", T0 + 30, principal="worker:y"),
    ]
    first, second, third, missing = await store.claim(claims, T0 + 1, epoch)
    assert first is not None and second is not None and third is None and missing is None
    [started] = await trail(store, fresh.id)
    assert started.entry_id > 0
    assert started == AuditEntry(
        fresh.id,
        T0 + 1,
        ATTEMPT_STARTED,
        "worker:acme/ü",
        "",
        "ipv4:10.1.2.3:4567",
        "attempt 1 on wörker/🚀",
        started.entry_id,
    )
    assert without_ids(await trail(store, retried.id)) == [
        AuditEntry(retried.id, T0 + 1, ATTEMPT_STARTED, "jobwire", "", "", "attempt 2 on local")
    ]
    assert await trail(store, running.id) == []
    assert await trail(store, "0" * 26) == []

    # Released and claimed again: its trail tells both attempts, in order.
    released = audit_entry(retried.id, 5, "attempt released")
    requeue = {"attempt": 3, "lease_expire_time": None}
    expect = Expect(JobState.RUNNING, second.lease_epoch)
    assert await store.transition(retried.id, expect, JobState.QUEUED, requeue, T0 + 5, released)
    [again] = await store.claim([Claim(retried.id, "w-9", "r2/s9", T0 + 60, "worker:z", "p")], T0 + 6, epoch)
    assert again is not None
    assert without_ids(await trail(store, retried.id)) == [
        AuditEntry(retried.id, T0 + 1, ATTEMPT_STARTED, "jobwire", "", "", "attempt 2 on local"),
        released,
        AuditEntry(retried.id, T0 + 6, ATTEMPT_STARTED, "worker:z", "", "p", "attempt 3 on w-9"),
    ]


async def test_list_audit_pages_in_order_and_never_mixes_jobs(store: JobStore, make_job: MakeJob) -> None:
    job = make_job(state=JobState.RUNNING, lease_epoch=1)
    other = make_job(state=JobState.RUNNING, lease_epoch=1)
    await store.insert(job, audit_entry(job.id, 0, SUBMITTED))
    await store.insert(other, audit_entry(other.id, 0, SUBMITTED))
    for n in range(1, 7):  # the two trails interleave in the store
        for j in (job, other):
            changed = await store.transition(
                j.id, Expect(JobState.RUNNING, 1), JobState.RUNNING, {}, T0 + n, audit_entry(j.id, n)
            )
            assert changed is not None
    entries = await trail(store, job.id)
    assert [e.detail for e in entries] == [f"step {n}" for n in range(7)]
    assert all(e.job_id == job.id for e in entries)
    assert [e.entry_id for e in entries] == sorted({e.entry_id for e in entries})  # strictly increasing
    assert not {e.entry_id for e in entries} & {e.entry_id for e in await trail(store, other.id)}

    pages: list[list[AuditEntry]] = []
    after = 0
    while page := await store.list_audit(job.id, after, 3):
        pages.append(page)
        after = page[-1].entry_id
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [e for page in pages for e in page] == entries
    assert await store.list_audit(job.id, entries[2].entry_id, 2) == entries[3:5]
    assert await store.list_audit(job.id, entries[2].entry_id - 1, 1) == [entries[2]]
    assert await store.list_audit(job.id, entries[-1].entry_id, 10) == []
    assert await store.list_audit(job.id, 0, 0) == []
    assert await store.list_audit("0" * 26, 0, 10) == []


async def test_purge_deletes_the_audit_entries_of_the_purged_jobs_only(
    store: JobStore, make_job: MakeJob
) -> None:
    expired = make_job(state=JobState.SUCCEEDED, expire_time=T0)
    later = make_job(state=JobState.SUCCEEDED, expire_time=T0 + 100)
    queued = make_job()
    for job in (expired, later, queued):
        await store.insert(job, audit_entry(job.id, 0, SUBMITTED))
    kept = {job.id: await trail(store, job.id) for job in (later, queued)}
    assert await store.purge_expired(T0) == 1
    assert await trail(store, expired.id) == []
    for job_id, entries in kept.items():
        assert len(entries) == 1 and await trail(store, job_id) == entries


async def test_the_audit_trail_is_trimmed_when_the_job_is_queued_again(
    store: JobStore, make_job: MakeJob
) -> None:
    job = make_job(state=JobState.RUNNING, lease_epoch=1)
    other = make_job(state=JobState.RUNNING, lease_epoch=1)
    await store.insert(job, audit_entry(job.id, 0, SUBMITTED))
    await store.insert(other, audit_entry(other.id, 0, SUBMITTED))
    total = MAX_AUDIT_ENTRIES + 10
    # RUNNING -> RUNNING keeps every entry (only a change back to QUEUED trims). All at once, so that the
    # SQL stores write them in a few transactions.
    running = Expect(JobState.RUNNING, 1)
    updated = await asyncio.gather(
        *(
            store.transition(job.id, running, JobState.RUNNING, {}, T0 + n, audit_entry(job.id, n))
            for n in range(1, total)
        )
    )
    assert all(u is not None for u in updated)
    before = await trail(store, job.id)
    assert [e.detail for e in before] == [f"step {n}" for n in range(total)]

    released = audit_entry(job.id, total, "attempt released")
    assert await store.transition(job.id, running, JobState.QUEUED, {}, T0 + total, released)
    after = await trail(store, job.id)
    assert len(after) == MAX_AUDIT_ENTRIES  # the most recent ones, the new entry included
    assert after[:-1] == before[-(MAX_AUDIT_ENTRIES - 1) :]
    assert without_ids(after[-1:]) == [released]

    # Queued again while at the cap: the oldest entry makes room for the new one.
    requeued = audit_entry(job.id, total + 1, RETRIED)
    assert await store.transition(job.id, Expect(JobState.QUEUED), JobState.QUEUED, {}, T0, requeued)
    final = await trail(store, job.id)
    assert final[:-1] == after[1:] and without_ids(final[-1:]) == [requeued]

    # Another job's trail is not touched, and a short trail going back to the queue loses nothing.
    assert await store.transition(other.id, running, JobState.QUEUED, {}, T0, audit_entry(other.id, 1))
    assert [e.detail for e in await trail(store, other.id)] == ["step 0", "step 1"]


# --- submit rates ----------------------------------------------------------------------------------


async def test_a_submit_rate_lets_a_burst_through_then_refuses(store: JobStore, make_job: MakeJob) -> None:
    rate = SubmitRate(per_minute=6)  # a token every 10 s, 6 at most
    feed = Feed(store)
    for _ in range(6):
        await store.insert(make_job(tenant="a"), rate=rate)
    refused = make_job(tenant="a")
    with pytest.raises(RateLimited) as limited:
        await store.insert(refused, audit_entry(refused.id, 0, SUBMITTED), rate)
    assert limited.value.retry_after == pytest.approx(10.0)
    assert await store.get(refused.id) is None
    assert await trail(store, refused.id) == []
    assert len(feed.changes) == 6 and len(await store.list(JobQuery())) == 6

    halfway = make_job(tenant="a", create_time=T0 + 5)  # half a token since the last one taken
    with pytest.raises(RateLimited) as limited:
        await store.insert(halfway, rate=rate)
    assert limited.value.retry_after == pytest.approx(5.0)
    assert await store.get(halfway.id) is None

    await store.insert(make_job(tenant="a", create_time=T0 + 10), rate=rate)  # 60 / 6 s later: one more
    with pytest.raises(RateLimited) as limited:
        await store.insert(make_job(tenant="a", create_time=T0 + 10), rate=rate)
    assert limited.value.retry_after == pytest.approx(10.0)
    assert len(feed.changes) == 7

    # An hour later the bucket holds a minute's worth (the burst), not an hour's.
    for _ in range(6):
        await store.insert(make_job(tenant="a", create_time=T0 + 3600), rate=rate)
    with pytest.raises(RateLimited):
        await store.insert(make_job(tenant="a", create_time=T0 + 3600), rate=rate)
    assert len(await store.list(JobQuery(limit=100))) == 13


async def test_submit_buckets_are_per_tenant(store: JobStore, make_job: MakeJob) -> None:
    rate = SubmitRate(per_minute=2)
    await store.insert(make_job(tenant="a"), rate=rate)
    await store.insert(make_job(tenant="a"), rate=rate)
    for _ in range(5):  # refused inserts take nothing, from anyone's bucket
        with pytest.raises(RateLimited):
            await store.insert(make_job(tenant="a"), rate=rate)
    # Without a rate an insert neither waits for nor takes a token (a tenant without a submit quota).
    await store.insert(make_job(tenant="a"))
    for _ in range(2):  # b's bucket is full
        await store.insert(make_job(tenant="b"), rate=rate)
    with pytest.raises(RateLimited) as limited:
        await store.insert(make_job(tenant="b"), rate=rate)
    assert limited.value.retry_after == pytest.approx(30.0)
    for tenant in ("a", "b"):  # 30 s later: exactly one token each
        await store.insert(make_job(tenant=tenant, create_time=T0 + 30), rate=rate)
        with pytest.raises(RateLimited):
            await store.insert(make_job(tenant=tenant, create_time=T0 + 30), rate=rate)
    counts = {tenant: sum(c.count for c in await store.count(frozenset({tenant}))) for tenant in "ab"}
    assert counts == {"a": 4, "b": 3}


async def test_concurrent_inserts_take_exactly_the_burst(store: JobStore, make_job: MakeJob) -> None:
    rate = SubmitRate(per_minute=5)
    jobs = [make_job(tenant="a") for _ in range(12)]
    outcomes = await asyncio.gather(*(store.insert(job, rate=rate) for job in jobs), return_exceptions=True)
    assert outcomes[:5] == [None] * 5  # first come, first served
    assert all(isinstance(o, RateLimited) for o in outcomes[5:])
    assert await ids(store, JobQuery()) == [job.id for job in reversed(jobs[:5])]


async def test_a_clock_running_behind_does_not_refill_a_bucket_twice(
    store: JobStore, make_job: MakeJob
) -> None:
    """Two replicas draw from one bucket, each with its own clock (the create_time): one that runs behind
    must not make the other's next insert count the same seconds' refill again.

    Regression: taking a token set the bucket's "counted at" time to the insert's create_time even when
    that was earlier, so every insert from the replica behind rewound the bucket and the next one from
    the replica ahead was refilled for the skew again (all 60 inserts passed a 6-a-minute bucket).
    """
    rate = SubmitRate(per_minute=6)  # a token every 10 s, 6 at most
    granted = 0
    for step in range(10):  # 10 s apart, by both clocks
        for clock in (T0 + 60 + 10 * step, T0 + 10 * step):  # the second replica's clock is 60 s behind
            for _ in range(3):
                try:
                    await store.insert(make_job(tenant="a", create_time=clock), rate=rate)
                except RateLimited:
                    continue
                granted += 1
    # Whatever the order of the times it was given, a bucket grants at most its burst plus the refill
    # over the span of those times: 6 + 150 s / 10 s.
    assert granted <= 6 + 15


async def test_a_refused_duplicate_takes_no_token(store: JobStore, make_job: MakeJob) -> None:
    rate = SubmitRate(per_minute=2)
    await store.insert(make_job(tenant="a", request_id="r"), rate=rate)
    with pytest.raises(DuplicateRequestId):
        await store.insert(make_job(tenant="a", request_id="r"), rate=rate)
    await store.insert(make_job(tenant="a"), rate=rate)  # the second token is still there
    with pytest.raises(RateLimited):
        await store.insert(make_job(tenant="a"), rate=rate)


# --- lifecycle and durability ----------------------------------------------------------------------


async def test_open_and_close_are_idempotent(new_store: Callable[[], JobStore], make_job: MakeJob) -> None:
    store = new_store()
    await store.open()
    await store.open()
    job = make_job()
    await store.insert(job)
    assert await store.get(job.id) == job
    await store.close()
    await store.close()


async def test_concurrent_inserts_are_group_committed_and_durable(
    store: JobStore, reopen: Reopen, make_job: MakeJob
) -> None:
    jobs = [make_job(labels={"i": str(i)}) for i in range(200)]
    commits_before = getattr(store, "commits", 0)
    await asyncio.gather(*(store.insert(job) for job in jobs))
    if isinstance(store, SqliteStore):
        assert store.commits - commits_before < len(jobs)  # several inserts shared a transaction
    source = await reopen(store) or store
    assert await source.list(JobQuery(limit=1000)) == list(reversed(jobs))
    assert await source.count() == [JobCount(JobState.QUEUED, "test.echo", 5, 200)]


# --- SQLite specifics ------------------------------------------------------------------------------


async def test_sqlite_progress_is_flushed_by_the_timer(tmp_path: Path, make_job: MakeJob) -> None:
    store = SqliteStore(str(tmp_path / "jobs.db"), progress_flush_interval=0.05)
    await store.open()
    try:
        job = make_job(state=JobState.RUNNING, lease_epoch=1)
        await store.insert(job)
        store.record_progress(job.id, 1, Progress(33.0, "a third"), T0 + 1)
        for _ in range(200):  # waiting for the flush timer is the point of this test
            stored = await store.get(job.id)
            if stored is not None and stored.sequence == 2:
                break
            await asyncio.sleep(0.01)
        assert stored is not None and stored.progress == Progress(33.0, "a third")
    finally:
        await store.close()


async def test_sqlite_progress_notes_coalesce_into_one_transaction(tmp_path: Path, make_job: MakeJob) -> None:
    store = SqliteStore(str(tmp_path / "jobs.db"), progress_flush_interval=3600)
    await store.open()
    jobs = [make_job(state=JobState.RUNNING, lease_epoch=1) for _ in range(3)]
    for job in jobs:
        await store.insert(job)
    commits = store.commits
    for step in range(100):
        for job in jobs:
            store.record_progress(job.id, 1, Progress(float(step)), T0 + step)
    await store.close()
    assert store.commits == commits + 1
    reopened = SqliteStore(str(tmp_path / "jobs.db"))
    await reopened.open()
    try:
        for job in jobs:
            stored = await reopened.get(job.id)
            assert stored is not None and stored.progress == Progress(99.0)
            assert stored.sequence == job.sequence + 1  # 100 notes, one write
    finally:
        await reopened.close()


async def test_sqlite_schema_is_versioned_and_open_is_repeatable(tmp_path: Path, make_job: MakeJob) -> None:
    path = tmp_path / "sub" / "dir" / "jobs.db"  # missing directories are created
    job = make_job()
    for _ in range(2):
        store = SqliteStore(str(path), synchronous="normal")
        await store.open()
        await store.insert(make_job())
        await store.close()
    store = SqliteStore(str(path))
    await store.open()
    await store.insert(job)
    await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"jobs_tenant_request_id", "jobs_state_id", "jobs_expire_time", "job_audit_job_id"} <= indexes
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"jobs", "job_types", "job_audit", "tenant_rates"} <= tables
    finally:
        conn.close()


# The version-1 schema exactly as it shipped (MIGRATIONS[0] must never change, but this test does not
# trust that: it builds the old database from its own copy).
_SCHEMA_V1 = (
    """
    CREATE TABLE jobs (
        id                  TEXT PRIMARY KEY,
        type                TEXT NOT NULL,
        state               INTEGER NOT NULL,
        priority            INTEGER NOT NULL,
        params              TEXT NOT NULL,
        labels              TEXT NOT NULL,
        create_time         REAL NOT NULL,
        update_time         REAL NOT NULL,
        queue_time          REAL NOT NULL,
        attempt             INTEGER NOT NULL,
        progress            TEXT,
        result              TEXT,
        error               TEXT,
        start_time          REAL,
        end_time            REAL,
        expire_time         REAL,
        request_id          TEXT NOT NULL DEFAULT '',
        request_fingerprint TEXT NOT NULL DEFAULT '',
        timeout             REAL,
        cancel_reason       TEXT NOT NULL DEFAULT '',
        sequence            INTEGER NOT NULL
    )
    """,
    "CREATE UNIQUE INDEX jobs_request_id ON jobs (request_id) WHERE request_id <> ''",
    "CREATE INDEX jobs_state_id ON jobs (state, id)",
    "CREATE INDEX jobs_expire_time ON jobs (expire_time) WHERE expire_time IS NOT NULL",
)


def _create_v1_database(path: Path, rows: list[dict[str, object]]) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in _SCHEMA_V1:
            conn.execute(statement)
        for row in rows:
            columns = ", ".join(row)
            conn.execute(
                f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    finally:
        conn.close()


async def test_sqlite_migrates_a_version_1_database_in_place(tmp_path: Path, make_job: MakeJob) -> None:
    path = tmp_path / "jobs.db"
    finished, running = make_job(), make_job()
    _create_v1_database(
        path,
        [
            {
                "id": finished.id,
                "type": "resize",
                "state": int(JobState.FAILED),
                "priority": 7,
                "params": '{"w":640}',
                "labels": '{"team":"ml"}',
                "create_time": T0,
                "update_time": T0 + 9,
                "queue_time": T0,
                "attempt": 1,
                "progress": '{"percent":50.0,"message":"half","current_step":1,"total_steps":2}',
                "result": None,
                "error": '{"code":4,"message":"timed out","reason":"JOB_TIMEOUT",'
                '"metadata":{"timeout":"30s"}}',
                "start_time": T0 + 1,
                "end_time": T0 + 9,
                "expire_time": T0 + 86_400,
                "request_id": "req-old",
                "request_fingerprint": "sha256:old",
                "timeout": 30.0,
                "cancel_reason": "",
                "sequence": 4,
            },
            {
                "id": running.id,
                "type": "email",
                "state": int(JobState.RUNNING),
                "priority": 5,
                "params": "{}",
                "labels": "{}",
                "create_time": T0,
                "update_time": T0,
                "queue_time": T0,
                "attempt": 1,
                "sequence": 2,
            },
        ],
    )
    expected_finished = Job(
        id=finished.id,
        type="resize",
        state=JobState.FAILED,
        priority=7,
        params={"w": 640},
        labels={"team": "ml"},
        create_time=T0,
        update_time=T0 + 9,
        queue_time=T0,
        attempt=1,
        progress=Progress(50.0, "half", 1, 2),
        error=JobError(ErrorCode.DEADLINE_EXCEEDED, "timed out", "JOB_TIMEOUT", {"timeout": "30s"}),
        start_time=T0 + 1,
        end_time=T0 + 9,
        expire_time=T0 + 86_400,
        request_id="req-old",
        request_fingerprint="sha256:old",
        timeout=30.0,
        sequence=4,
    )
    expected_running = Job(
        id=running.id,
        type="email",
        state=JobState.RUNNING,
        priority=5,
        params={},
        labels={},
        create_time=T0,
        update_time=T0,
        queue_time=T0,
        attempt=1,
        sequence=2,
    )

    store = SqliteStore(str(path))
    await store.open()
    try:
        got = await store.get(finished.id)
        assert got == expected_finished
        assert got is not None
        assert (got.retry_policy, got.schedule_time, got.attempts) == (RetryPolicy(), None, ())
        assert (got.worker_id, got.lease_expire_time, got.lease_epoch, got.attempt_base) == ("", None, 0, 0)
        assert await store.get_by_request_id("default", "req-old") == expected_finished
        assert await store.load_active() == [expected_running]
        assert await store.load_job_types() == []
        # The migrated rows take the new fields, and the new table works.
        expected_running.attempts = (AttemptRecord(1, T0, T0 + 2, JobError(9, "x", "Y"), "w"),)
        expected_running.lease_epoch, expected_running.sequence = 3, 3
        expected_running.update_time = T0 + 2
        changes = {"attempts": expected_running.attempts, "lease_epoch": 3}
        assert await store.transition(running.id, Expect(JobState.RUNNING), JobState.RUNNING, changes, T0 + 2)
        await store.save_job_types([worker_type("email")])
    finally:
        await store.close()

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        conn.close()
    store = SqliteStore(str(path))  # opening again at the current version migrates nothing
    await store.open()
    try:
        assert await store.get(running.id) == expected_running
        assert await store.get(finished.id) == expected_finished
        assert await store.load_job_types() == [worker_type("email")]
    finally:
        await store.close()


def _old_style(job: Job) -> tuple[tuple[str, ...], tuple[object, ...]]:
    """The columns and values of ``job``'s row as written before tenants (and retention, added after)."""
    assert COLUMNS[-3:] == ("tenant", "created_by", "retention")
    return COLUMNS[:-3], job_to_row(job)[:-3]


def _before_tenants(make_job: MakeJob) -> tuple[Job, Job]:
    """A job with every field set and a queued one, as they read back once migrated: tenant "default",
    nobody as their creator, no retention of their own."""
    finished = full_job(make_job)
    finished.tenant, finished.created_by, finished.retention = "default", "", None
    queued = make_job(type="email", request_id="req-queued")
    return finished, queued


async def _check_migrated_to_tenants(store: JobStore, finished: Job, queued: Job, make_job: MakeJob) -> None:
    """What a store opened on a database from before tenants must show and do."""
    assert await store.get(finished.id) == finished
    assert await store.get(queued.id) == queued
    assert await store.get_by_request_id("default", finished.request_id) == finished
    assert await store.get_by_request_id("acme", finished.request_id) is None
    assert await store.load_queue() == [
        QueuedJob(queued.id, "email", 5, queued.queue_time, None, queued.sequence, "default")
    ]
    assert await ids(store, JobQuery(filter=JobFilter(tenants=frozenset({"default"})))) == [
        queued.id,
        finished.id,
    ]
    assert await store.count(frozenset({"acme"})) == []
    assert await store.count() == await recount(store)  # counted when the count table was made
    # The old types are shared: no tenant may take them.
    assert await store.load_job_types() == [worker_type("email")]
    assert await store.save_job_types([worker_type("email", tenant="acme")]) == ["email"]
    # The old request_ids still deduplicate, within the tenant "default" only.
    with pytest.raises(DuplicateRequestId):
        await store.insert(make_job(request_id="req-queued"))
    in_acme = make_job(request_id="req-queued", tenant="acme", created_by="ana")
    await store.insert(in_acme, audit_entry(in_acme.id, 0, SUBMITTED), SubmitRate(per_minute=1))
    assert await store.get_by_request_id("acme", "req-queued") == in_acme
    assert await store.get_by_request_id("default", "req-queued") == queued
    # The audit trail and the buckets work on the old jobs too.
    assert without_ids(await trail(store, in_acme.id)) == [audit_entry(in_acme.id, 0, SUBMITTED)]
    assert await trail(store, queued.id) == []
    cancel = audit_entry(queued.id, 1, "cancelled")
    cancelled = await store.transition(queued.id, Expect(JobState.QUEUED), JobState.CANCELLED, {}, T0, cancel)
    assert cancelled is not None and (cancelled.tenant, cancelled.created_by) == ("default", "")
    assert without_ids(await trail(store, queued.id)) == [cancel]
    with pytest.raises(RateLimited):
        await store.insert(make_job(tenant="acme"), rate=SubmitRate(per_minute=1))


async def test_sqlite_migrates_a_version_3_database_to_tenants(tmp_path: Path, make_job: MakeJob) -> None:
    path = tmp_path / "jobs.db"
    finished, queued = _before_tenants(make_job)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        for statements in MIGRATIONS[:3]:
            for statement in statements:
                conn.execute(statement)
        for job in (finished, queued):
            columns, values = _old_style(job)
            conn.execute(
                f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", values
            )
        conn.execute(
            "INSERT INTO job_types (name, timeout, max_running, retry, last_seen) VALUES (?, ?, ?, ?, ?)",
            job_type_to_row(worker_type("email"))[:-1],
        )
        conn.execute("PRAGMA user_version = 3")
        conn.commit()
    finally:
        conn.close()

    store = SqliteStore(str(path))
    await store.open()
    try:
        await _check_migrated_to_tenants(store, finished, queued, make_job)
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 6
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "jobs_request_id" not in indexes and "jobs_tenant_request_id" in indexes
    finally:
        conn.close()


async def test_postgres_migrates_a_version_1_schema_to_tenants(
    postgres_schema: str, make_job: MakeJob
) -> None:
    schema = postgres_schema
    finished, queued = _before_tenants(make_job)
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path = "{schema}"')
        for statement in POSTGRES_MIGRATIONS[0]:
            await conn.execute(statement)
        await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        await conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        for job in (finished, queued):
            columns, values = _old_style(job)
            placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
            await conn.execute(f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({placeholders})", *values)
        await conn.execute(
            "INSERT INTO job_types (name, timeout, max_running, retry, last_seen) "
            "VALUES ($1, $2, $3, $4, $5)",
            *job_type_to_row(worker_type("email"))[:-1],
        )
    finally:
        await conn.close()
    store = PostgresStore(store_url(schema))
    try:
        await store.open()
        await _check_migrated_to_tenants(store, finished, queued, make_job)
        version = await store._fetch("SELECT version FROM schema_version")
        assert [row[0] for row in version] == [len(POSTGRES_MIGRATIONS)]
    finally:
        await store.close()


async def test_sqlite_failed_migration_leaves_the_old_version(tmp_path: Path, make_job: MakeJob) -> None:
    """Migrations run in one transaction: a failure midway leaves the database at version 1, intact."""
    path = tmp_path / "jobs.db"
    job = make_job()
    _create_v1_database(
        path,
        [
            {
                "id": job.id,
                "type": "t",
                "state": int(JobState.QUEUED),
                "priority": 5,
                "params": "{}",
                "labels": "{}",
                "create_time": T0,
                "update_time": T0,
                "queue_time": T0,
                "attempt": 0,
                "sequence": 1,
            }
        ],
    )
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE job_types (name TEXT)")  # in the way of migration 2's CREATE TABLE
    conn.commit()
    conn.close()
    store = SqliteStore(str(path))
    with pytest.raises(sqlite3.OperationalError, match="job_types"):
        await store.open()
    await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
        assert "retry_policy" not in columns and len(columns) == 21
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    finally:
        conn.close()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    store = SqliteStore(str(path))
    with pytest.raises(RuntimeError, match="newer"):
        await store.open()
    await store.close()


async def test_sqlite_use_after_close_raises(tmp_path: Path, make_job: MakeJob) -> None:
    store = SqliteStore(str(tmp_path / "jobs.db"))
    with pytest.raises(RuntimeError):
        await store.insert(make_job())
    await store.open()
    await store.close()
    with pytest.raises(RuntimeError):
        await store.insert(make_job())
    with pytest.raises(RuntimeError):
        await store.get("x")
    store.record_progress("x", 1, Progress(1.0), T0)  # the attempt is being abandoned anyway: dropped


def test_sqlite_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        SqliteStore("x.db", synchronous="SOMETIMES")
    with pytest.raises(ValueError):
        SqliteStore("x.db", max_batch=0)
    with pytest.raises(ValueError):
        SqliteStore(":memory:")


# --- open_store ------------------------------------------------------------------------------------


def test_open_store_memory() -> None:
    assert isinstance(open_store("memory:"), MemoryStore)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///jobs.db", "jobs.db"),
        ("sqlite:///data/jobs.db", "data/jobs.db"),
        ("sqlite:////var/lib/jobwire/jobs.db", "/var/lib/jobwire/jobs.db"),
        ("jobs.db", "jobs.db"),
        ("/tmp/x/jobs.db", "/tmp/x/jobs.db"),
    ],
)
def test_open_store_sqlite_paths(url: str, path: str) -> None:
    store = open_store(url)
    assert isinstance(store, SqliteStore)
    assert store.path == path


def test_open_store_sqlite_options() -> None:
    store = open_store("sqlite:///jobs.db?synchronous=normal&max_batch=32&progress_flush_interval=0.5")
    assert isinstance(store, SqliteStore)
    assert (store.synchronous, store.max_batch, store.progress_flush_interval) == ("NORMAL", 32, 0.5)
    with pytest.raises(ValueError, match="unknown"):
        open_store("sqlite:///jobs.db?cache=big")


@pytest.mark.parametrize(
    ("url", "schema", "dsn"),
    [
        ("postgresql://u@localhost/jobwire", "jobwire", "postgresql://u@localhost/jobwire"),
        ("postgres://localhost:5433/db?schema=Tenant_2", "tenant_2", "postgresql://localhost:5433/db"),
        ("postgresql://h/db?sslmode=disable&schema=s", "s", "postgresql://h/db?sslmode=disable"),
        (
            "postgresql://h/db?connect_timeout=3&application_name=a",
            "jobwire",
            "postgresql://h/db?application_name=a",
        ),
    ],
)
def test_open_store_postgresql(url: str, schema: str, dsn: str) -> None:
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    assert (store.schema, store.options.dsn) == (schema, dsn)


@pytest.mark.parametrize(
    "url", ["postgresql://h/db?schema=1bad", "postgresql://h/db?schema=a-b", "postgresql://h/db?pool_size=0"]
)
def test_open_store_postgresql_bad_options(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "memory",
        "mysql://x/y",
        "postgresql+psycopg://localhost/db",
        "sqlite://jobs.db",
        "sqlite:///",
        "sqlite:///:memory:",
        "jobs.sqlite",
        "redis://localhost",
    ],
)
def test_open_store_rejects_other_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"memory:|sqlite:///"):
        open_store(url)


async def test_job_types_can_be_forgotten(store: JobStore, reopen: Reopen) -> None:
    await store.save_job_types([worker_type("a"), worker_type("b"), worker_type("c")])
    await store.delete_job_types(["a", "c", "never-stored"])
    assert await store.load_job_types() == [worker_type("b")]
    await store.delete_job_types([])
    reopened = await reopen(store)
    if reopened is not None:
        assert await reopened.load_job_types() == [worker_type("b")]


async def test_a_shared_store_keeps_each_transition_for_watchers_elsewhere(
    store: JobStore, make_job: MakeJob, epoch: int
) -> None:
    job = make_job(params={"p": [1, "two"]}, labels={"k": "v"})
    await store.insert(job)
    [claimed] = await store.claim([Claim(job.id, "w", "r/s", T0 + 30)], T0, epoch)
    assert claimed is not None
    store.record_progress(job.id, claimed.lease_epoch, Progress(50.0, "half"), T0 + 1)
    expect = Expect(JobState.RUNNING, claimed.lease_epoch)
    ended = await store.transition(job.id, expect, JobState.SUCCEEDED, {"result": {"ok": True}}, T0 + 2)
    assert ended is not None
    if not store.shared:  # a single process keeps this history in memory, not in the store
        assert await store.read_changes(job.id, 0) is None
        return
    replayed = await store.read_changes(job.id, 1)
    assert replayed is not None
    assert [(c.sequence, c.state) for c in replayed] == [
        (2, JobState.RUNNING),
        (ended.sequence, JobState.SUCCEEDED),
    ]
    assert replayed[0] == claimed and replayed[1] == ended  # params included, as they were
    assert await store.read_change(job.id, claimed.sequence) == claimed
    assert await store.read_changes(job.id, ended.sequence) == []
    assert await store.read_changes("0" * 26, 0) is None


# --- batches of inserts ----------------------------------------------------------------------------


async def test_a_batch_is_stored_whole_with_its_audit_entries_and_announced(
    store: JobStore, reopen: Reopen, make_job: MakeJob
) -> None:
    feed = Feed(store)
    jobs = [make_job(tenant="acme", request_id=f"b-{i}", priority=i % 10) for i in range(250)]
    entries = [audit_entry(job.id, i, SUBMITTED) for i, job in enumerate(jobs)]
    await store.insert_many(jobs, entries)
    assert [c.job_id for c in feed.changes] == [job.id for job in jobs]
    source: JobStore | None = store
    while source is not None:
        for i in (0, 117, 249):
            assert await source.get(jobs[i].id) == jobs[i]
            assert without_ids(await trail(source, jobs[i].id)) == [entries[i]]
        assert (await source.get_by_request_id("acme", "b-42")) == jobs[42]
        assert len(await source.list(JobQuery(limit=1000))) == 250
        source = await reopen(source) if source is store else None


async def test_a_batch_with_a_used_request_id_stores_nothing_and_names_every_one(
    store: JobStore, make_job: MakeJob
) -> None:
    await store.insert(make_job(tenant="t", request_id="taken-1"))
    await store.insert(make_job(tenant="t", request_id="taken-2"))
    await store.insert(make_job(tenant="other", request_id="free"))  # another tenant's: no conflict
    feed = Feed(store)
    batch = [make_job(tenant="t", request_id=rid) for rid in ("new-1", "taken-2", "free", "taken-1", "")]
    with pytest.raises(DuplicateRequestId) as refused:
        await store.insert_many(batch, [audit_entry(job.id, 0, SUBMITTED) for job in batch])
    assert sorted(refused.value.request_ids) == ["taken-1", "taken-2"]
    for job in batch:
        assert await store.get(job.id) is None
        assert await trail(store, job.id) == []
    assert feed.changes == []
    assert await store.get_by_request_id("t", "new-1") is None


async def test_a_request_id_repeated_within_a_batch_is_refused(store: JobStore, make_job: MakeJob) -> None:
    batch = [make_job(request_id="same"), make_job(request_id="other"), make_job(request_id="same")]
    with pytest.raises(DuplicateRequestId) as refused:
        await store.insert_many(batch, [])
    assert refused.value.request_ids == ["same"]
    assert len(await store.list(JobQuery())) == 0


async def test_a_batch_takes_a_token_per_job_or_none(store: JobStore, make_job: MakeJob) -> None:
    rate = SubmitRate(per_minute=10)
    await store.insert_many([make_job(tenant="a") for _ in range(4)], [], SubmitRate(10, jobs=4))
    too_many = [make_job(tenant="a") for _ in range(7)]  # 6 tokens left
    with pytest.raises(RateLimited) as limited:
        await store.insert_many(too_many, [], SubmitRate(10, jobs=7))
    assert limited.value.retry_after == pytest.approx(6.0)  # one more token: 6 s at 10 a minute
    assert len(await store.list(JobQuery(limit=100))) == 4
    await store.insert_many([make_job(tenant="a") for _ in range(6)], [], SubmitRate(10, jobs=6))
    with pytest.raises(RateLimited):
        await store.insert(make_job(tenant="a"), rate=rate)
    await store.insert(make_job(tenant="b"), rate=rate)  # another tenant's bucket is full
    assert len(await store.list(JobQuery(limit=100))) == 11


async def test_concurrent_batches_and_inserts_of_one_request_id_store_it_once(
    store: JobStore, make_job: MakeJob
) -> None:
    calls = [
        store.insert_many([make_job(request_id=f"x-{i}") for i in range(k, k + 5)], []) for k in (0, 3, 6)
    ]
    calls.append(store.insert(make_job(request_id="x-4")))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(o is None or isinstance(o, DuplicateRequestId) for o in outcomes), outcomes
    stored = await store.list(JobQuery(limit=100))
    request_ids = [job.request_id for job in stored]
    assert len(request_ids) == len(set(request_ids))
    batches_stored = sum(o is None for o in outcomes[:3])
    assert len(stored) == 5 * batches_stored + (outcomes[3] is None)


async def test_postgres_folds_the_count_deltas_and_counts_stay_exact(
    postgres_schema: str, make_job: MakeJob
) -> None:
    """Two replicas' stores on one schema: each change appends a delta, one of them folds them."""
    first, second = PostgresStore(store_url(postgres_schema)), PostgresStore(store_url(postgres_schema))
    await first.open()
    await second.open()
    try:
        await first.insert_many([make_job(type="a") for _ in range(30)], [])
        await asyncio.gather(*(second.insert(make_job(type="b", priority=1)) for _ in range(20)))
        expected = [JobCount(JobState.QUEUED, "a", 5, 30), JobCount(JobState.QUEUED, "b", 1, 20)]
        assert await second.count() == expected  # before any fold: from the deltas
        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while await conn.fetchval(f'SELECT COUNT(*) FROM "{postgres_schema}".job_count_deltas'):
                assert asyncio.get_running_loop().time() < deadline, "the deltas were never folded"
                await asyncio.sleep(0.2)
            folded = await conn.fetch(f'SELECT type, n FROM "{postgres_schema}".job_counts ORDER BY 1')
        finally:
            await conn.close()
        assert [(row["type"], row["n"]) for row in folded] == [("a", 30), ("b", 20)]
        assert await first.count() == await second.count() == expected
    finally:
        await first.close()
        await second.close()
