"""Watch events: ordering, coalescing of progress for slow readers, lazy snapshots, replay, closing."""

from __future__ import annotations

import asyncio
import dataclasses

from jobwire.server.changes import ChangeKind, JobChange
from jobwire.server.events import EventHub, EventKind
from jobwire.server.job import Job, Progress
from jobwire.server.state_machine import JobState


def make_job() -> Job:
    return Job("j1", "t", JobState.RUNNING, 5, {}, {}, 0.0, 0.0, 0.0)


async def no_read(job_id: str, sequence: int) -> Job | None:
    raise AssertionError("a change that carries its job is never read back")


def step(
    hub: EventHub, job: Job, kind: ChangeKind, state: JobState | None = None, percent: float = 0
) -> None:
    """Publish the job's next change (with a snapshot, as a single process's feed does)."""
    job.sequence += 1
    if state is not None:
        job.state = state
    job.progress = Progress(percent=percent)
    hub.on_changes([JobChange.of(job.copy(), kind)], now=0.0)


async def test_slow_reader_gets_merged_progress_but_every_transition() -> None:
    hub = EventHub(no_read)
    job = make_job()
    subscription = hub.subscribe(job.id)
    for i in range(100):
        step(hub, job, ChangeKind.PROGRESS, percent=i)
    step(hub, job, ChangeKind.STATE, JobState.CANCELLING)
    for i in range(100):
        step(hub, job, ChangeKind.PROGRESS, percent=i)
    step(hub, job, ChangeKind.STATE, JobState.CANCELLED)
    received = []
    while (event := await subscription.next()) is not None:
        received.append(event)
        if event.job.state.is_terminal:
            break
    assert [e.kind for e in received] == [
        EventKind.PROGRESS_UPDATED,
        EventKind.STATE_CHANGED,
        EventKind.PROGRESS_UPDATED,
        EventKind.STATE_CHANGED,
    ]
    assert received[0].job.progress is not None and received[0].job.progress.percent == 99  # latest wins
    assert [e.sequence for e in received] == sorted(e.sequence for e in received)


async def test_changes_without_a_snapshot_are_read_in_turn_and_unreadable_progress_is_skipped() -> None:
    """On a shared store another replica's change comes without the job: the watcher reads it."""
    reads: list[tuple[str, int]] = []
    job = make_job()

    async def read(job_id: str, sequence: int) -> Job | None:
        reads.append((job_id, sequence))
        if sequence == 3:
            return None  # progress overtaken by a newer change
        snapshot = job.copy()
        snapshot.sequence = sequence
        return snapshot

    hub = EventHub(read, keep_history=False)
    subscription = hub.subscribe(job.id)
    for sequence, kind in ((2, ChangeKind.STATE), (3, ChangeKind.PROGRESS), (4, ChangeKind.STATE)):
        change = JobChange(
            job.id, sequence, kind, JobState.RUNNING, "t", 5, 0.0, None, 1, "r/s", 0.0, "default"
        )
        hub.on_changes([change], now=0.0)
    first, second = await subscription.next(), await subscription.next()
    assert first is not None and second is not None
    assert [first.sequence, second.sequence] == [2, 4]
    assert reads == [(job.id, 2), (job.id, 3), (job.id, 4)]
    assert hub.replay(job.id, 1, up_to=4) is None  # a shared store keeps the history, not the hub


async def test_events_are_snapshots_not_live_objects() -> None:
    hub = EventHub(no_read)
    job = make_job()
    subscription = hub.subscribe(job.id)
    step(hub, job, ChangeKind.PROGRESS, percent=10)
    job.progress = Progress(percent=50)
    event = await subscription.next()
    assert event is not None and event.job.progress is not None and event.job.progress.percent == 10


def test_changes_of_jobs_nobody_watches_are_not_kept() -> None:
    hub = EventHub(no_read)
    job = make_job()
    step(hub, job, ChangeKind.STATE, JobState.SUCCEEDED)
    assert hub.replay(job.id, 0, up_to=job.sequence) is None
    assert not hub._logs


def test_replay_covers_the_gap_or_says_it_cannot() -> None:
    hub = EventHub(no_read, retain_per_job=5)
    job = make_job()
    hub.unsubscribe(hub.subscribe(job.id))  # watched once: its changes are kept from then on
    hub.subscribe(job.id)
    for _ in range(10):  # sequences 2..11; the last 5 (7..11) are retained
        step(hub, job, ChangeKind.PROGRESS)
    replayed = hub.replay(job.id, 6, up_to=11)
    assert replayed is not None and [e.sequence for e in replayed] == [7, 8, 9, 10, 11]
    assert hub.replay(job.id, 5, up_to=11) is None
    assert hub.replay("other", 0, up_to=1) is None


async def test_close_all_ends_waiting_watchers_and_new_ones() -> None:
    hub = EventHub(no_read)
    subscription = hub.subscribe("j1")
    waiter = asyncio.create_task(subscription.next())
    await asyncio.sleep(0)
    hub.close_all()
    assert await waiter is None
    assert await hub.subscribe("j2").next() is None


def test_sweep_drops_finished_unwatched_logs() -> None:
    hub = EventHub(no_read, retain_after_finish=10)
    job = make_job()
    subscription = hub.subscribe(job.id)
    step(hub, job, ChangeKind.STATE, JobState.SUCCEEDED)
    hub.unsubscribe(subscription)
    assert hub.sweep(now=5) == 0
    assert hub.sweep(now=10) == 1
    assert hub.replay(job.id, 1, up_to=2) is None


def progress_only(job: Job, percent: float, update_time: float) -> JobChange:
    """The job's next change as a progress report without the job (as SQLite's feed sends it)."""
    job.sequence += 1
    change = JobChange.of(job, ChangeKind.PROGRESS, with_job=False)
    return dataclasses.replace(change, progress=Progress(percent=percent), update_time=update_time)


async def test_a_progress_change_without_the_job_patches_the_watched_snapshot() -> None:
    hub = EventHub(no_read)
    job = make_job()
    job.params = {"big": "x" * 100}
    subscription = hub.subscribe(job.id)
    hub.seen(job)  # the watcher's own read
    first = job.sequence + 1
    hub.on_changes([progress_only(job, 40, 7.0)], now=0.0)
    event = await subscription.next()
    assert event is not None and event.kind is EventKind.PROGRESS_UPDATED
    assert (event.sequence, event.job.sequence, event.job.update_time) == (first, first, 7.0)
    assert event.job.progress == Progress(percent=40) and event.job.params == job.params
    hub.on_changes([progress_only(job, 60, 8.0)], now=0.0)  # patches the previous patch
    event = await subscription.next()
    assert event is not None and event.job.progress == Progress(percent=60)
    assert [e.sequence for e in hub.replay(job.id, first - 1, first + 1) or []] == [first, first + 1]


async def test_a_progress_change_after_an_unseen_change_is_read_and_the_read_serves_the_next() -> None:
    reads: list[int] = []
    job = make_job()

    async def read(job_id: str, sequence: int) -> Job | None:
        reads.append(sequence)
        snapshot = job.copy()
        snapshot.sequence = sequence
        return snapshot

    hub = EventHub(read)
    subscription = hub.subscribe(job.id)
    hub.seen(job.copy())
    job.sequence += 1  # a change this hub never heard of
    hub.on_changes([progress_only(job, 10, 1.0)], now=0.0)
    event = await subscription.next()
    assert event is not None and reads == [job.sequence]
    hub.on_changes([progress_only(job, 20, 2.0)], now=0.0)  # the read snapshot serves the next ones
    event = await subscription.next()
    assert event is not None and event.job.progress == Progress(percent=20) and len(reads) == 1
