"""The priority heap: order, FIFO, aging, limits, removal, positions."""

from __future__ import annotations

import pytest

from jobwire.server.scheduler import Scheduler


def drain(scheduler: Scheduler) -> list[str]:
    """Pop everything, releasing each job at once (as if it ran instantly)."""
    order = []
    while (picked := scheduler.pop_ready()) is not None:
        order.append(picked[0])
        scheduler.release(picked[1])
    return order


def test_higher_priority_first_and_fifo_within_a_priority() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=0)
    for job_id, priority in [("a", 1), ("b", 9), ("c", 5), ("d", 9), ("e", 1)]:
        scheduler.push(job_id, "t", priority, queue_time=0.0)
    assert drain(scheduler) == ["b", "d", "c", "a", "e"]


def test_aging_lets_an_old_low_priority_job_overtake_new_high_ones() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=10.0)
    scheduler.push("old-low", "t", 0, queue_time=0.0)
    scheduler.push("new-high", "t", 9, queue_time=95.0)  # 95 - 90 = 5 > 0: the old job goes first
    scheduler.push("newer-high", "t", 9, queue_time=85.0)  # 85 - 90 = -5 < 0: waited long enough too
    assert drain(scheduler) == ["newer-high", "old-low", "new-high"]


def test_aging_rule_is_one_level_per_interval() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=60.0)
    assert scheduler.sort_key(5, 1000.0) == scheduler.sort_key(6, 1060.0)


def test_global_limit() -> None:
    scheduler = Scheduler(max_running=2, aging_interval=0)
    for job_id in "abc":
        scheduler.push(job_id, "t", 5, 0.0)
    assert scheduler.pop_ready() == ("a", "t")
    assert scheduler.pop_ready() == ("b", "t")
    assert scheduler.pop_ready() is None
    scheduler.release("t")
    assert scheduler.pop_ready() == ("c", "t")


def test_type_limit_does_not_block_other_types() -> None:
    scheduler = Scheduler(max_running=10, type_limits={"slow": 1}, aging_interval=0)
    scheduler.push("s1", "slow", 9, 0.0)
    scheduler.push("s2", "slow", 9, 0.0)
    scheduler.push("f1", "fast", 1, 0.0)
    assert scheduler.pop_ready() == ("s1", "slow")
    assert scheduler.pop_ready() == ("f1", "fast")  # s2 waits for its type's slot
    assert scheduler.pop_ready() is None
    scheduler.release("slow")
    assert scheduler.pop_ready() == ("s2", "slow")
    assert scheduler.running_by_type() == {"slow": 1, "fast": 1}


def test_removed_jobs_are_skipped_and_counts_follow() -> None:
    scheduler = Scheduler(max_running=5, aging_interval=0)
    for job_id, priority in [("a", 1), ("b", 2), ("c", 3)]:
        scheduler.push(job_id, "t", priority, 0.0)
    assert scheduler.remove("c") and not scheduler.remove("c") and not scheduler.remove("zzz")
    assert len(scheduler) == 2 and "c" not in scheduler
    assert scheduler.queued_by_priority() == {1: 1, 2: 1}
    assert drain(scheduler) == ["b", "a"]
    assert scheduler.queued_by_type() == {} and scheduler.running == 0


def test_positions_match_pop_order() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=30.0)
    import random

    rng = random.Random(7)
    ids = [f"j{i}" for i in range(200)]
    for i, job_id in enumerate(ids):
        scheduler.push(job_id, rng.choice("xyz"), rng.randint(0, 9), queue_time=i * rng.random())
    scheduler.remove("j5")
    positions = scheduler.positions(ids)
    order = drain(scheduler)
    assert "j5" not in positions
    assert sorted(positions, key=positions.__getitem__) == order
    assert sorted(positions.values()) == list(range(1, 200))


def test_bad_use_is_refused() -> None:
    with pytest.raises(ValueError):
        Scheduler(max_running=0)
    scheduler = Scheduler(max_running=1)
    scheduler.push("a", "t", 1, 0.0)
    with pytest.raises(ValueError):
        scheduler.push("a", "t", 1, 0.0)
    with pytest.raises(ValueError):
        scheduler.release("t")


def test_position_is_the_rank_across_types_and_follows_removals() -> None:
    scheduler = Scheduler(aging_interval=0)
    for job_id, job_type, priority in [("a", "x", 1), ("b", "y", 9), ("c", "x", 5), ("d", "y", 5)]:
        scheduler.push(job_id, job_type, priority, 0.0)
    assert [scheduler.position(j) for j in "abcd"] == [4, 1, 2, 3]
    scheduler.remove("c")
    assert [scheduler.position(j) for j in "abcd"] == [3, 1, 0, 2]
    assert scheduler.position("nope") == 0
