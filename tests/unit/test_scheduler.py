"""The priority heap: order, FIFO, aging, limits, removal, positions."""

from __future__ import annotations

import itertools
import random

import pytest

from jobwire.server.scheduler import Scheduler
from jobwire.server.tenants import TenantPolicies, TenantQuota


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


# --- tenants: fair sharing, limits, positions, counts --------------------------------------------------


def run(scheduler: Scheduler, now: float = 0.0, step: float = 1.0, limit: int | None = None) -> list[str]:
    """Pop (at most ``limit``) jobs with the clock advancing ``step`` a pop, releasing each one at once."""
    order: list[str] = []
    while limit is None or len(order) < limit:
        entry = scheduler.pop_entry(None, None, now + step * len(order))
        if entry is None:
            break
        order.append(entry[2])
        scheduler.release(entry[3], entry[5])
    return order


def weighted(**weights: float) -> TenantPolicies:
    return TenantPolicies(overrides={tenant: TenantQuota(weight=w) for tenant, w in weights.items()})


def test_a_tenant_with_a_few_jobs_is_not_stuck_behind_a_backlog() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=60.0)
    for i in range(1000):
        scheduler.push(f"a{i}", "t", 5, i * 0.001, "a")
    for i in range(10):
        scheduler.push(f"b{i}", "t", 5, 1.0 + i * 0.001, "b")  # later, at the same priority
    order = run(scheduler, now=2.0, step=0.01)
    # Equal passes: the older head goes first, then the two alternate; B's k-th job is the 2k-th start.
    assert order[:20] == [job for i in range(10) for job in (f"a{i}", f"b{i}")]
    assert order[20:] == [f"a{i}" for i in range(10, 1000)]


def test_weights_share_the_starts_between_tenants_that_wait() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=60.0, tenants=weighted(a=3.0, b=1.0))
    for i in range(1000):
        scheduler.push(f"a{i}", "t", 5, i * 0.001, "a")
    for i in range(30):
        scheduler.push(f"b{i}", "t", 5, 1.0 + i * 0.001, "b")
    order = run(scheduler, now=2.0, step=0.01)
    b_starts = [n for n, job in enumerate(order) if job.startswith("b")]
    assert len(b_starts) == 30 and 115 <= b_starts[-1] <= 119  # 3 of A's starts per one of B's: 1 + 4 * 29
    gaps = [later - earlier - 1 for earlier, later in itertools.pairwise(b_starts)]
    assert all(2 <= gap <= 4 for gap in gaps) and sum(gaps) == pytest.approx(3 * len(gaps), abs=2)


def test_within_a_tenant_the_heap_rule_holds_whatever_the_other_tenants_do() -> None:
    rng = random.Random(11)
    alone = {tenant: Scheduler(aging_interval=30.0) for tenant in "abc"}
    mixed = Scheduler(max_running=1, aging_interval=30.0, tenants=weighted(a=2.0))
    for i in range(600):
        tenant, job_type = rng.choice("abc"), rng.choice("xyz")
        priority, queue_time = rng.randint(0, 9), rng.uniform(0, 300)
        mixed.push(f"j{i}", job_type, priority, queue_time, tenant)
        alone[tenant].push(f"j{i}", job_type, priority, queue_time, tenant)
    order = run(mixed, now=300.0, step=0.5)
    for tenant, scheduler in alone.items():
        expected = drain_tenant(scheduler, tenant)
        assert [job for job in order if job in set(expected)] == expected


def drain_tenant(scheduler: Scheduler, tenant: str) -> list[str]:
    order: list[str] = []
    while (entry := scheduler.pop_entry(None, tenant)) is not None:
        order.append(entry[2])
        scheduler.release(entry[3], tenant)
    return order


def test_a_higher_priority_goes_first_across_tenants_until_the_other_has_waited() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=10.0)
    scheduler.push("a0", "t", 5, 0.0, "a")
    scheduler.push("a1", "t", 5, 0.0, "a")
    for i in range(200):
        scheduler.push(f"b{i}", "t", 9, 0.0, "b")
    order = run(scheduler, now=0.0, step=1.0)
    # One level per 10 s of waiting since A's last start (or since its job was queued): level 9 after 40 s.
    assert order.index("a0") == 40
    assert order.index("a1") == 80  # 40 s after A's last start (a0, at 40), whatever a1's own age
    assert order[:40] == [f"b{i}" for i in range(40)]


def test_a_tenants_wait_counts_from_when_its_job_was_queued_if_later_than_its_last_start() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=10.0)
    for i in range(200):
        scheduler.push(f"b{i}", "t", 9, 0.0, "b")
    order = run(scheduler, now=0.0, step=1.0, limit=15)
    scheduler.push("a0", "t", 5, 15.0, "a")  # A never started: it waits from 15 s on
    order += run(scheduler, now=15.0, step=1.0, limit=60)
    assert order.index("a0") == 55


def test_without_aging_priority_is_strict_across_tenants() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=0)
    scheduler.push("a0", "t", 5, 0.0, "a")
    for i in range(100):
        scheduler.push(f"b{i}", "t", 9, float(i), "b")
    scheduler.push("c0", "t", 7, 0.0, "c")
    order = run(scheduler, now=0.0, step=60.0)
    assert order == [f"b{i}" for i in range(100)] + ["c0", "a0"]


def test_an_old_backlog_does_not_outrank_another_tenant_at_the_same_priority() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=60.0)
    for i in range(2000):
        scheduler.push(f"a{i}", "t", 5, 0.0, "a")  # queued long ago: its own age is 15 levels
    started = run(scheduler, now=0.0, step=1.0, limit=900)  # A alone for 900 s
    assert started == [f"a{i}" for i in range(900)]
    for i in range(10):
        scheduler.push(f"b{i}", "t", 5, 900.0, "b")
    order = run(scheduler, now=900.0, step=1.0, limit=30)
    assert [order.index(f"b{i}") for i in range(10)] == [2 * i + 1 for i in range(10)]


def test_a_tenant_that_was_not_started_for_long_goes_first_once() -> None:
    """Queued long before anything could start: its first start is due, then it takes turns."""
    scheduler = Scheduler(max_running=1, aging_interval=60.0)
    for i in range(100):
        scheduler.push(f"a{i}", "t", 5, 0.0, "a")
    for i in range(10):
        scheduler.push(f"b{i}", "t", 5, 600.0, "b")
    order = run(scheduler, now=600.0, step=1.0, limit=21)
    assert order == [job for i in range(10) for job in (f"a{i}", f"b{i}")] + ["a10"]


def test_a_tenant_at_its_running_limit_does_not_block_the_others() -> None:
    policies = TenantPolicies(overrides={"a": TenantQuota(max_running=2)})
    scheduler = Scheduler(max_running=10, aging_interval=0, tenants=policies)
    for i in range(5):
        scheduler.push(f"a{i}", "t", 9, float(i), "a")
        scheduler.push(f"b{i}", "t", 1, float(i), "b")
    popped = [scheduler.pop_entry(None, None, 0.0) for _ in range(6)]
    assert [e[2] for e in popped if e is not None] == ["a0", "a1", "b0", "b1", "b2", "b3"]
    assert not scheduler.has_room("t", "a") and scheduler.has_room("t", "b")
    assert scheduler.pop_entry(None, "a", 0.0) is None  # A's own executor waits for A's slots
    scheduler.release("t", "a")
    entry = scheduler.pop_entry(None, None, 0.0)
    assert entry is not None and entry[2] == "a2"  # the freed slot goes to A's priority 9 at once
    assert scheduler.running_by_tenant() == {"a": {"t": 2}, "b": {"t": 4}}


def test_an_executor_of_one_tenant_takes_only_that_tenants_jobs() -> None:
    scheduler = Scheduler(aging_interval=0)
    scheduler.push("a-x", "x", 1, 0.0, "a")
    scheduler.push("b-x", "x", 9, 0.0, "b")
    scheduler.push("b-y", "y", 9, 0.0, "b")
    first = scheduler.pop_entry(["x"], "a", 0.0)
    assert first is not None and first[2] == "a-x"
    assert scheduler.pop_entry(["x"], "a", 0.0) is None
    assert scheduler.pop_entry(["z"], "b", 0.0) is None
    second = scheduler.pop_entry(["y"], "b", 0.0)
    assert second is not None and second[2] == "b-y"
    assert scheduler.pop_entry(None, "c", 0.0) is None
    assert scheduler.queued_by_tenant() == {"b": 1}


def test_restore_puts_a_popped_job_back_as_it_was() -> None:
    scheduler = Scheduler(max_running=5, aging_interval=0)
    for i in range(4):
        scheduler.push(f"a{i}", "t", 5, float(i), "a")
        scheduler.push(f"b{i}", "u", 5, float(i), "b")
    positions = scheduler.positions([f"{t}{i}" for t in "ab" for i in range(4)])
    counts = (scheduler.queued_by_tenant(), scheduler.queued_by_type(), scheduler.queued_by_priority())
    taken = scheduler.take(None, None, 0.0)
    assert taken is not None and taken[0][2] == "a0" and scheduler.running == 1
    scheduler.restore(*taken)
    assert scheduler.running == 0 and scheduler.running_by_tenant() == {} and "a0" in scheduler
    assert scheduler.positions(positions) == positions
    assert (
        scheduler.queued_by_tenant(),
        scheduler.queued_by_type(),
        scheduler.queued_by_priority(),
    ) == counts
    assert run(scheduler) == [job for i in range(4) for job in (f"a{i}", f"b{i}")]


def test_restore_keeps_a_starved_tenants_claim_to_the_next_start() -> None:
    """A claim that could not be written is undone: the next pick is the same job, as if never popped.

    Regression: restore gave back the pass but not when the tenant was last served, so a tenant that had
    aged up to the flooding tenant's level fell back to its own priority for 4 more aging intervals.
    """
    scheduler = Scheduler(max_running=10, aging_interval=10.0)
    scheduler.push("a0", "t", 5, 0.0, "a")
    for i in range(100):
        scheduler.push(f"b{i}", "t", 9, 0.0, "b")
    assert run(scheduler, now=0.0, step=1.0, limit=40) == [f"b{i}" for i in range(40)]
    taken = scheduler.take(None, None, 40.0)
    assert taken is not None and taken[0][2] == "a0"  # waited 40 s: level 9, and behind in turns
    scheduler.restore(*taken)
    again = scheduler.pop_entry(None, None, 40.0)
    assert again is not None and again[2] == "a0"


def test_restore_of_a_tenants_last_job_keeps_its_turn() -> None:
    """The same for the pass: a tenant whose only queued job is popped and restored keeps its turn.

    Regression: the tenant had no queue left when its job was restored, so it was taken for a tenant
    that starts waiting and its pass raised to the smallest of the others: the turn it was owed was lost.
    """
    policies = TenantPolicies(overrides={"a": TenantQuota(max_running=1)})
    scheduler = Scheduler(aging_interval=0, tenants=policies)
    for i in range(10):
        scheduler.push(f"b{i}", "t", 5, 0.0, "b")
    scheduler.push("a0", "t", 5, 0.0, "a")
    scheduler.mark_running("t", "a")  # A is at its limit while B starts 3 jobs
    assert run(scheduler, limit=3) == ["b0", "b1", "b2"]
    scheduler.release("t", "a")
    taken = scheduler.take(None, None, 0.0)
    assert taken is not None and taken[0][2] == "a0"  # 3 turns behind B
    scheduler.restore(*taken)
    again = scheduler.pop_entry(None, None, 0.0)
    assert again is not None and again[2] == "a0"


def test_position_is_exact_with_one_tenant_whoever_it_is() -> None:
    rng = random.Random(3)
    scheduler = Scheduler(max_running=1, aging_interval=30.0)
    ids = [f"j{i}" for i in range(300)]
    for i, job_id in enumerate(ids):
        scheduler.push(job_id, rng.choice("xyz"), rng.randint(0, 9), i * rng.random(), "acme")
    positions = scheduler.positions(ids)
    order = run(scheduler, now=0.0, step=0.0)
    assert [positions[job_id] for job_id in order] == list(range(1, 301))


def test_position_estimates_the_fair_share_of_the_other_tenants() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=60.0)
    for i in range(1000):
        scheduler.push(f"a{i}", "t", 5, i * 0.001, "a")
    for i in range(10):
        scheduler.push(f"b{i}", "t", 5, 1.0 + i * 0.001, "b")
    estimates = scheduler.positions([f"a{i}" for i in range(1000)] + [f"b{i}" for i in range(10)])
    actual = {job: n + 1 for n, job in enumerate(run(scheduler, now=2.0, step=0.01))}
    assert [actual["a0"], actual["b0"], actual["b9"], actual["a999"]] == [1, 2, 20, 1010]
    assert estimates["a0"] <= 2
    assert estimates["b0"] <= 2  # not behind A's backlog
    assert estimates["b9"] == 20
    # Regression: only the other tenants' jobs queued before this one were counted, but at an equal level
    # the order across tenants is by turn, not queue time (a999 was estimated 1,000th; it starts 1,010th).
    assert 1008 <= estimates["a999"] <= 1012  # about 1,000 + B's share
    assert [job for job in estimates if abs(estimates[job] - actual[job]) > 2] == []


def test_position_weighs_the_other_tenants_share() -> None:
    scheduler = Scheduler(max_running=1, aging_interval=60.0, tenants=weighted(a=3.0))
    for i in range(300):
        scheduler.push(f"a{i}", "t", 5, i * 0.001, "a")
    for i in range(20):
        scheduler.push(f"b{i}", "t", 5, 1.0 + i * 0.001, "b")
    estimates = scheduler.positions([f"b{i}" for i in range(20)])
    actual = {job: n + 1 for n, job in enumerate(run(scheduler, now=2.0, step=0.01))}
    for i in range(20):  # 3 of A's starts for each of B's: B's i-th job (from 0) is about the 4(i+1)-th
        assert abs(estimates[f"b{i}"] - actual[f"b{i}"]) <= 3


def test_running_and_queued_counts_per_tenant() -> None:
    policies = TenantPolicies(overrides={"a": TenantQuota(max_running=3)})
    scheduler = Scheduler(aging_interval=0, tenants=policies)
    scheduler.set_running({("a", "x"): 2, ("b", "x"): 1, ("b", "y"): 4, ("c", "y"): 0})
    assert scheduler.running == 7
    assert scheduler.running_by_type() == {"x": 3, "y": 4}
    assert scheduler.running_by_tenant() == {"a": {"x": 2}, "b": {"x": 1, "y": 4}}
    assert scheduler.has_room("x", "a")
    scheduler.mark_running("y", "a")
    assert not scheduler.has_room("x", "a") and scheduler.has_room("x", "b")
    scheduler.release("x", "a")
    assert scheduler.running_by_tenant()["a"] == {"x": 1, "y": 1}
    with pytest.raises(ValueError):
        scheduler.release("x", "c")  # nothing of C's is running
    scheduler.set_running({})
    assert (scheduler.running, scheduler.running_by_tenant(), scheduler.running_by_type()) == (0, {}, {})

    for job_id, job_type, priority, tenant in [
        ("1", "x", 5, "a"),
        ("2", "x", 9, "a"),
        ("3", "y", 5, "a"),
        ("4", "x", 5, "b"),
        ("5", "z", 1, "c"),
    ]:
        scheduler.push(job_id, job_type, priority, 0.0, tenant)
    scheduler.push("6", "x", 5, 0.0)  # the default tenant
    assert scheduler.queued_by_tenant() == {"a": 3, "b": 1, "c": 1, "default": 1}
    assert [scheduler.queued_in(t) for t in ("a", "b", "c", "default", "nobody")] == [3, 1, 1, 1, 0]
    assert scheduler.queued_by_type() == {"x": 4, "y": 1, "z": 1}
    assert scheduler.queued_by_type("a") == {"x": 2, "y": 1}
    assert scheduler.queued_by_type("nobody") == {}
    assert scheduler.queued_by_priority() == {5: 4, 9: 1, 1: 1}
    assert scheduler.queued_by_priority("a") == {5: 2, 9: 1}
    assert scheduler.queued_by_priority("c") == {1: 1}
    assert scheduler.remove("3") and scheduler.remove("5")
    assert scheduler.queued_by_tenant() == {"a": 2, "b": 1, "default": 1}
    assert scheduler.queued_by_type("a") == {"x": 2} and scheduler.queued_by_priority("c") == {}
    entry = scheduler.pop_entry(["x"], "b", 0.0)
    assert entry is not None and entry[2] == "4"
    assert scheduler.queued_in("b") == 0 and scheduler.running_by_tenant() == {"b": {"x": 1}}


def test_push_many_queues_exactly_as_pushing_one_by_one() -> None:
    """A restart loads the queue with push_many: the run order, positions and counts must be those of
    the same pushes made one at a time (several tenants, types, priorities, equal sort keys)."""
    rng = random.Random(7)
    jobs = [
        (
            f"j{i:05d}",
            rng.choice(["a", "b", "c"]),
            rng.randrange(10),
            float(rng.randrange(50)),
            rng.choice(["t1", "t2"]),
        )
        for i in range(2000)
    ]
    one_by_one, at_once = Scheduler(aging_interval=5.0), Scheduler(aging_interval=5.0)
    for job_id, job_type, priority, queue_time, tenant in jobs:
        one_by_one.push(job_id, job_type, priority, queue_time, tenant)
    at_once.push_many(jobs)
    assert len(at_once) == len(one_by_one) == 2000
    for job_id in ("j00000", "j00999", "j01999"):
        assert at_once.position(job_id) == one_by_one.position(job_id)
    assert at_once.queued_by_priority() == one_by_one.queued_by_priority()
    assert at_once.queued_by_tenant() == one_by_one.queued_by_tenant()
    assert at_once.queued_by_type("t1") == one_by_one.queued_by_type("t1")
    order: list[list[str]] = [[], []]
    for index, scheduler in enumerate((one_by_one, at_once)):
        while (taken := scheduler.take(None, None, 0.0)) is not None:
            order[index].append(taken[0][2])
            scheduler.release(taken[0][3], taken[0][5])
    assert order[0] == order[1] and len(order[0]) == 2000
    with pytest.raises(ValueError, match="already queued"):
        at_once.push_many([("again", "a", 5, 0.0, "t1"), ("again", "a", 5, 0.0, "t1")])
