"""The priority-heap scheduler: which queued job runs next, within the limits, fairly across tenants.

Order within a tenant. Higher priority first, FIFO within a priority, with aging so low priorities never
starve: a job of priority ``p`` that entered the queue at time ``t`` has the sort key
``t - p * aging_interval``, and the smallest key runs first. Waiting one ``aging_interval`` is worth one
priority level, and since the key never changes after a push, the queue needs no re-sorting as jobs
age. With ``aging_interval == 0`` the order is strict priority (key ``-p``), FIFO within a priority.
Ties break by push order.

Fair sharing across tenants. Each tenant's next job (the head of its queues, by the rule above) competes
with the other tenants' next jobs by *level*: its priority, plus one for every ``aging_interval`` its
tenant has waited without a start (since its last start, or since that job was queued if later), at
most PRIORITY_MAX. The highest level goes first; among equal levels, the tenant with the smallest
*pass* (stride scheduling: every start adds ``1 / weight`` to its tenant's pass) goes first, so tenants
with jobs waiting at the same level get starts in proportion to their weights, whatever their backlogs.
A tenant that floods the queue is served all the time, so its level stays its jobs' priority; a tenant
that submits a few jobs meanwhile gets its turn within a few starts (its pass joins at the smallest
pass of the tenants waiting, never behind them). A job's own age raises it only within its tenant:
across tenants, a backlog's age is no claim on the others' turns. With one tenant all of this reduces
to the single-tenant rule.

Limits. A global limit on running jobs, an optional limit per job type, and an optional limit per
tenant (``tenants.TenantPolicies``). A type or tenant at its limit never blocks the others.

Data structure. Each (type, tenant) queue is a sorted list (``sortedcontainers.SortedList``, a B-tree-like
list of sorted sublists) rather than a binary heap: it pops the smallest key in O(log n) like a heap,
and also removes any job and tells any job's rank in O(log n). So a cancelled job leaves at once, and a
queued job's position costs O(Q log n) for Q queues, never a pass over the queue: GetJob on a queued
job stays as cheap with 100,000 queued as with 10. Picking the next job compares the heads of the
queues that have room: O(Q).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Final, NamedTuple, TypeVar

from sortedcontainers import SortedList

from jobwire.server.access import DEFAULT_TENANT
from jobwire.server.job import PRIORITY_MAX
from jobwire.server.tenants import TenantPolicies

# One queued job: (sort key, push order, job id, job type, priority, tenant, queue time). Tuples compare
# in C, and since the push order is unique, comparisons never get past it.
Entry = tuple[float, int, str, str, int, str, float]
_ID: Final = 2
_TYPE: Final = 3
_PRIORITY: Final = 4
_TENANT: Final = 5
_QUEUE_TIME: Final = 6
_K = TypeVar("_K")
# Empty queues kept at most before they are dropped (a tenant or a type may come back; most do).
_PRUNE_EMPTY_QUEUES = 1024


class Turn(NamedTuple):
    """What one start changed in the fair-sharing state: ``restore`` puts it back exactly.

    A named tuple: one is made per dispatch, and a tuple is the cheapest thing to make.
    """

    tenant: str
    pass_before: float | None
    served_before: float | None
    last_pass_before: float


class Scheduler:
    """Queued jobs in run order, and the counts of running ones. Single-threaded (the event loop's)."""

    def __init__(
        self,
        *,
        max_running: int | None = None,
        type_limits: dict[str, int] | None = None,
        aging_interval: float = 60.0,
        tenants: TenantPolicies | None = None,
    ) -> None:
        if max_running is not None and max_running < 1:
            raise ValueError("max_running must be at least 1")
        if aging_interval < 0:
            raise ValueError("aging_interval must be >= 0")
        self.max_running = max_running
        self.type_limits = dict(type_limits or {})
        self.aging_interval = aging_interval
        self.tenants = tenants or TenantPolicies()
        # The same queues, indexed both ways: by type (what an executor takes), by tenant (fairness).
        # A queue that empties stays (making one costs more than keeping it) until there are many.
        self._by_type: dict[str, dict[str, SortedList]] = {}
        self._by_tenant: dict[str, dict[str, SortedList]] = {}
        self._empty_queues = 0
        self._entries: dict[str, Entry] = {}
        self._order = itertools.count()
        self._running_by_type: dict[str, int] = {}
        self._running_by_tenant_type: dict[tuple[str, str], int] = {}
        # Kept only when some tenant has a running limit (the only reader).
        self._running_by_tenant: dict[str, int] | None = {} if self.tenants.limits_running else None
        self._queued_by_priority: dict[tuple[str, int], int] = {}  # (tenant, priority)
        self._queued_by_tenant: dict[str, int] = {}  # the tenants waiting: those with queued jobs
        self.running = 0
        # Fair sharing: each tenant's pass (stride scheduling), when it last had a job started, and the
        # pass of the last start (where a tenant joins when no other one is waiting).
        self._pass: dict[str, float] = {}
        self._served: dict[str, float] = {}
        self._last_pass = 0.0

    # -- queue ---------------------------------------------------------------------------------------

    def sort_key(self, priority: int, queue_time: float) -> float:
        """The aging rule in one line (see the module docstring)."""
        if self.aging_interval == 0:
            return -float(priority)
        return queue_time - priority * self.aging_interval

    def push(
        self, job_id: str, job_type: str, priority: int, queue_time: float, tenant: str = DEFAULT_TENANT
    ) -> None:
        """Queue a job. Pushing a job that is already queued is a bug."""
        self._add(self._entry(job_id, job_type, priority, queue_time, tenant))

    def _entry(self, job_id: str, job_type: str, priority: int, queue_time: float, tenant: str) -> Entry:
        """A new entry, next in push order (ValueError for a job already queued)."""
        if job_id in self._entries:
            raise ValueError(f"job {job_id} is already queued")
        return (
            self.sort_key(priority, queue_time),
            next(self._order),
            job_id,
            job_type,
            priority,
            tenant,
            queue_time,
        )

    def push_many(self, jobs: Iterable[tuple[str, str, int, float, str]]) -> None:
        """Queue many jobs at once, each (job id, type, priority, queue time, tenant), in push order:
        the same run order as pushing them one by one, built a queue at a time (a restart loads the
        whole queue this way: sorting a list is many times faster than inserting into it)."""
        groups: dict[tuple[str, str], list[Entry]] = {}
        for job in jobs:
            entry = self._entry(*job)
            groups.setdefault((entry[_TENANT], entry[_TYPE]), []).append(entry)
            self._entries[entry[_ID]] = entry
        for (tenant, job_type), entries in groups.items():
            first, *rest = entries
            self._entries.pop(first[_ID])
            self._add(first)  # the tenant joins the fair share, the queue is made, as for one push
            queue = self._by_type[job_type][tenant]
            queue.update(rest)
            self._queued_by_tenant[tenant] += len(rest)
            for entry in rest:
                key = (tenant, entry[_PRIORITY])
                self._queued_by_priority[key] = self._queued_by_priority.get(key, 0) + 1

    def _add(self, entry: Entry) -> None:
        tenant, job_type = entry[_TENANT], entry[_TYPE]
        waiting = self._queued_by_tenant
        queued = waiting.get(tenant, 0)
        if not queued:  # the tenant starts waiting: it joins behind nobody, and ahead of nobody
            passes = [self._pass.get(t, 0.0) for t in waiting]
            floor = min(passes) if passes else self._last_pass
            self._pass[tenant] = max(self._pass.get(tenant, 0.0), floor)
        waiting[tenant] = queued + 1
        queues = self._by_tenant.get(tenant)
        if queues is None:
            queues = self._by_tenant[tenant] = {}
        queue = queues.get(job_type)
        if queue is None:
            queue = queues[job_type] = SortedList()
            self._by_type.setdefault(job_type, {})[tenant] = queue
        elif not queue:
            self._empty_queues -= 1
        queue.add(entry)
        self._entries[entry[_ID]] = entry
        key = (tenant, entry[_PRIORITY])
        self._queued_by_priority[key] = self._queued_by_priority.get(key, 0) + 1

    def _take_out(self, entry: Entry, queue: SortedList, head: bool = False) -> None:
        tenant = entry[_TENANT]
        if head:
            queue.pop(0)
        else:
            queue.remove(entry)
        if not queue:
            self._empty_queues += 1
            if self._empty_queues > _PRUNE_EMPTY_QUEUES:
                self._prune()
        del self._entries[entry[_ID]]
        _decrement(self._queued_by_priority, (tenant, entry[_PRIORITY]))
        _decrement(self._queued_by_tenant, tenant)

    def _prune(self) -> None:
        """Drop the empty queues (there are many: tenants or types that come and go)."""
        for index in (self._by_type, self._by_tenant):
            for outer in list(index):
                inner = index[outer]
                for name in [name for name, queue in inner.items() if not queue]:
                    del inner[name]
                if not inner:
                    del index[outer]
        self._empty_queues = 0

    def remove(self, job_id: str) -> bool:
        """Take a queued job out of the run order; False if it was not queued."""
        entry = self._entries.get(job_id)
        if entry is None:
            return False
        self._take_out(entry, self._by_type[entry[_TYPE]][entry[_TENANT]])
        return True

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # -- running -------------------------------------------------------------------------------------

    def has_room(self, job_type: str, tenant: str = DEFAULT_TENANT) -> bool:
        return self._type_has_room(job_type) and self._tenant_has_room(tenant)

    def _type_has_room(self, job_type: str) -> bool:
        limit = self.type_limits.get(job_type)
        return limit is None or self._running_by_type.get(job_type, 0) < limit

    def _tenant_has_room(self, tenant: str) -> bool:
        if self._running_by_tenant is None:
            return True
        limit = self.tenants.max_running(tenant)
        return limit is None or self._running_by_tenant.get(tenant, 0) < limit

    def set_type_limit(self, job_type: str, limit: int | None) -> None:
        if limit is None:
            self.type_limits.pop(job_type, None)
        else:
            self.type_limits[job_type] = limit

    def pop_ready(self, types: Iterable[str] | None = None) -> tuple[str, str] | None:
        """Take the next job that may start now and count it as running: (job_id, job_type), or None.

        With ``types``, only jobs of those types are considered (what one executor can run).
        """
        entry = self.pop_entry(types)
        return None if entry is None else (entry[_ID], entry[_TYPE])

    def pop_entry(
        self, types: Iterable[str] | None = None, tenant: str | None = None, now: float = 0.0
    ) -> Entry | None:
        """The next job an executor taking ``types`` (None: any) of ``tenant`` (None: any tenant's) may
        start, taken out and counted as running; ``now`` for the tenants' waits. None if there is none."""
        taken = self.take(types, tenant, now)
        return None if taken is None else taken[0]

    def take(
        self, types: Iterable[str] | None = None, tenant: str | None = None, now: float = 0.0
    ) -> tuple[Entry, Turn] | None:
        """``pop_entry``, and what the start changed in the fair-sharing state (for ``restore``)."""
        if self.max_running is not None and self.running >= self.max_running:
            return None
        waiting = self._queued_by_tenant
        if tenant is None and len(waiting) == 1:
            tenant = next(iter(waiting))  # one tenant waiting (the usual case): no choice to make
        if tenant is not None:
            found = self._head_of(tenant, types)
        else:
            heads = self._heads(types)
            found = (
                None
                if not heads
                else next(iter(heads.values()))
                if len(heads) == 1
                else self._fairest(heads, now)
            )
        if found is None:
            return None
        best, queue = found
        self._take_out(best, queue, head=True)
        chosen = best[_TENANT]
        self.mark_running(best[_TYPE], chosen)
        last_pass = self._last_pass
        current = self._pass.get(chosen)
        turn = Turn(chosen, current, self._served.get(chosen), last_pass)
        self._last_pass = last_pass = last_pass if current is None else current
        self._pass[chosen] = last_pass + 1.0 / self.tenants.weight(chosen)
        self._served[chosen] = now
        return best, turn

    def _head_of(self, tenant: str, types: Iterable[str] | None) -> tuple[Entry, SortedList] | None:
        """The tenant's next job among ``types`` whose type has room (and its queue), if it has room."""
        queues = self._by_tenant.get(tenant)
        if not queues or not self._tenant_has_room(tenant):
            return None
        best: tuple[Entry, SortedList] | None = None
        pairs = queues.items() if types is None else ((t, queues[t]) for t in types if t in queues)
        for job_type, queue in pairs:
            if not queue:
                continue
            head: Entry = queue[0]
            if (best is None or head < best[0]) and self._type_has_room(job_type):
                best = (head, queue)
        return best

    def _heads(self, types: Iterable[str] | None) -> dict[str, tuple[Entry, SortedList]]:
        """Per tenant with room, the head of its queues (of ``types``) that have room, and its queue."""
        heads: dict[str, tuple[Entry, SortedList]] = {}
        room: dict[str, bool] = {}
        for job_type in self._by_type if types is None else types:
            by_tenant = self._by_type.get(job_type)
            if by_tenant is None or not self._type_has_room(job_type):
                continue
            for owner, queue in by_tenant.items():
                if not queue:
                    continue
                has_room = room.get(owner)
                if has_room is None:
                    has_room = room[owner] = self._tenant_has_room(owner)
                if not has_room:
                    continue
                head = queue[0]
                current = heads.get(owner)
                if current is None or head < current[0]:
                    heads[owner] = (head, queue)
        return heads

    def _fairest(self, heads: dict[str, tuple[Entry, SortedList]], now: float) -> tuple[Entry, SortedList]:
        """Across tenants: highest level, then smallest pass, then smallest key (module docstring)."""
        best: tuple[Entry, SortedList] | None = None
        best_rank: tuple[int, float] | None = None
        aging = self.aging_interval
        for tenant, found in heads.items():
            head = found[0]
            level = head[_PRIORITY]
            if aging > 0:
                since = max(self._served.get(tenant, head[_QUEUE_TIME]), head[_QUEUE_TIME])
                level = min(PRIORITY_MAX, level + max(0, int((now - since) // aging)))
            rank = (-level, self._pass.get(tenant, 0.0))
            if (
                best is None
                or best_rank is None
                or rank < best_rank
                or (rank == best_rank and head < best[0])
            ):
                best, best_rank = found, rank
        assert best is not None
        return best

    def restore(self, entry: Entry, turn: Turn) -> None:
        """Undo ``take``: the job goes back exactly where it was, no longer counts as running, and its
        tenant keeps its turn (its pass and how long it has waited are as before the take)."""
        self._add(entry)
        self.release(entry[_TYPE], entry[_TENANT])
        _put_back(self._pass, turn.tenant, turn.pass_before)
        _put_back(self._served, turn.tenant, turn.served_before)
        self._last_pass = turn.last_pass_before

    def mark_running(self, job_type: str, tenant: str = DEFAULT_TENANT) -> None:
        """Count a job as running without popping it (a job recovered or started elsewhere)."""
        self.running += 1
        self._running_by_type[job_type] = self._running_by_type.get(job_type, 0) + 1
        key = (tenant, job_type)
        self._running_by_tenant_type[key] = self._running_by_tenant_type.get(key, 0) + 1
        if self._running_by_tenant is not None:
            self._running_by_tenant[tenant] = self._running_by_tenant.get(tenant, 0) + 1

    def set_running(self, by_tenant_type: dict[tuple[str, str], int]) -> None:
        """Replace the running counts (a new dispatcher counts the attempts it finds in the store)."""
        self._running_by_tenant_type = {k: n for k, n in by_tenant_type.items() if n > 0}
        self._running_by_type = {}
        tenants: dict[str, int] = {}
        for (tenant, job_type), n in self._running_by_tenant_type.items():
            self._running_by_type[job_type] = self._running_by_type.get(job_type, 0) + n
            tenants[tenant] = tenants.get(tenant, 0) + n
        if self._running_by_tenant is not None:
            self._running_by_tenant = tenants
        self.running = sum(self._running_by_type.values())

    def release(self, job_type: str, tenant: str = DEFAULT_TENANT) -> None:
        """A running job stopped: its slot is free."""
        key = (tenant, job_type)
        if self._running_by_tenant_type.get(key, 0) <= 0 or self.running <= 0:
            raise ValueError(f"release of {job_type!r} of tenant {tenant!r} with nothing running")
        self.running -= 1
        _decrement(self._running_by_type, job_type)
        _decrement(self._running_by_tenant_type, key)
        if self._running_by_tenant is not None:
            _decrement(self._running_by_tenant, tenant)

    # -- introspection -------------------------------------------------------------------------------

    def position(self, job_id: str) -> int:
        """The job's 1-based run-order position (0 if it is not queued), in O(Q log n) for Q queues.

        Exact with one tenant. With several it is an estimate (O(P) more per other tenant, for P
        priorities): the jobs ahead of it in its own tenant's queues, plus, from each other tenant, its
        queued jobs of a higher priority and, of those at the same priority, at most its fair share of
        the starts that come first (its ``weight`` over this tenant's).
        """
        entry = self._entries.get(job_id)
        if entry is None:
            return 0
        tenant, priority = entry[_TENANT], entry[_PRIORITY]
        own: int = sum(queue.bisect_left(entry) for queue in self._by_tenant[tenant].values())
        if len(self._queued_by_tenant) == 1:
            return 1 + own
        weight = self.tenants.weight(tenant)
        ahead = own
        for other in self._queued_by_tenant:
            if other == tenant:
                continue
            higher = sum(
                self._queued_by_priority.get((other, p), 0) for p in range(priority + 1, PRIORITY_MAX + 1)
            )
            same = self._queued_by_priority.get((other, priority), 0)
            share = math.ceil((own + 1) * self.tenants.weight(other) / weight)
            ahead += higher + min(same, share)
        return 1 + ahead

    def positions(self, job_ids: Iterable[str]) -> dict[str, int]:
        """1-based run-order positions of the given queued jobs (others are left out)."""
        return {job_id: self.position(job_id) for job_id in job_ids if job_id in self._entries}

    def running_by_type(self) -> dict[str, int]:
        return dict(self._running_by_type)

    def running_by_tenant(self) -> dict[str, dict[str, int]]:
        """Running jobs per tenant and type."""
        result: dict[str, dict[str, int]] = {}
        for (tenant, job_type), n in self._running_by_tenant_type.items():
            result.setdefault(tenant, {})[job_type] = n
        return result

    def queued_by_type(self, tenant: str | None = None) -> dict[str, int]:
        """Queued jobs per type (of one tenant, or of all)."""
        if tenant is not None:
            counts = {job_type: len(queue) for job_type, queue in self._by_tenant.get(tenant, {}).items()}
        else:
            counts = {job_type: sum(map(len, by.values())) for job_type, by in self._by_type.items()}
        return {job_type: n for job_type, n in counts.items() if n}

    def queued_by_tenant(self) -> dict[str, int]:
        return dict(self._queued_by_tenant)

    def queued_in(self, tenant: str) -> int:
        return self._queued_by_tenant.get(tenant, 0)

    def queued_by_priority(self, tenant: str | None = None) -> dict[int, int]:
        counts: dict[int, int] = {}
        for (owner, priority), n in self._queued_by_priority.items():
            if tenant is None or owner == tenant:
                counts[priority] = counts.get(priority, 0) + n
        return counts


def _decrement(counts: dict[_K, int], key: _K) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def _put_back(values: dict[str, float], key: str, before: float | None) -> None:
    if before is None:
        values.pop(key, None)
    else:
        values[key] = before
