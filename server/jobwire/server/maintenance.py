"""Housekeeping the dispatcher does for the whole cluster.

- Requeue the in-process attempts of a replica that is gone (it died, or was restarted under a new
  name): nobody runs them any more, and waiting for their leases to expire would only delay them.
- Purge finished jobs past their retention.
- Forget job types that no worker declared for the retention period and that no job still needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from jobwire.server.attempts import Abandoned, Ending, end_attempt
from jobwire.server.clock import Clock
from jobwire.server.cluster import ClusterStatus
from jobwire.server.executor import LOCAL_WORKER_ID
from jobwire.server.job import ErrorCode, JobError
from jobwire.server.job_types import TypeRegistry
from jobwire.server.queue_view import QueueView
from jobwire.server.stores.base import JobStore

log = logging.getLogger("jobwire.maintenance")


class Maintenance:
    def __init__(
        self,
        store: JobStore,
        clock: Clock,
        ending: Ending,
        types: TypeRegistry,
        queue: QueueView,
        status: Callable[[], ClusterStatus],
        retention: float,
    ) -> None:
        self._store = store
        self._clock = clock
        self._ending = ending
        self._types = types
        self._queue = queue
        self._status = status
        self._retention = retention

    async def requeue_orphans(self, live_replicas: set[str]) -> int:
        """Queue again the jobs whose in-process attempt belongs to a replica not in ``live_replicas``."""
        orphans = [
            job
            for job in await self._store.load_active()
            if job.worker_id == LOCAL_WORKER_ID and job.executor.partition("/")[0] not in live_replicas
        ]
        error = JobError(ErrorCode.ABORTED, "the server stopped while the job ran", "SERVER_RESTARTED")
        requeued = 0
        for job in orphans:
            # CANCELLING ends CANCELLED (``decide``); the rest are queued again as attempt + 1.
            if await end_attempt(self._store, job, Abandoned(error), self._clock.now(), self._ending):
                requeued += 1
        if requeued:
            log.info("requeued %d jobs whose in-process attempt died with its replica", requeued)
        return requeued

    async def sweep(self) -> tuple[int, list[str]]:
        """Purge expired jobs and stale types: (jobs purged, type names forgotten)."""
        now = self._clock.now()
        purged = await self._store.purge_expired(now)
        if purged:
            log.info("purged %d finished jobs past their retention", purged)
        horizon = now - self._retention
        status = self._status().types
        in_use = set(self._queue.queued_by_type()) | {job.type for job in await self._store.load_active()}
        stale = [
            t.name
            for t in self._types.known.values()
            if t.name not in self._types.local
            and t.last_seen < horizon
            and t.name not in in_use
            and not (t.name in status and status[t.name].executors)
        ]
        if stale:
            await self._store.delete_job_types(stale)
            log.info("forgot %d job types no worker declared for the retention period", len(stale))
        return purged, stale
