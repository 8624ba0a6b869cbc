"""The server's in-process execution: a context whose progress goes straight to the JobManager.

What a result, an exception or a time-out means for the job is decided by the JobManager; running the
function is ``jobwire.handlers.runner.HandlerRunner``'s job, the same runner remote workers use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from jobwire.handlers.api import Progress
from jobwire.handlers.runner import CancellableContext

ProgressCallback = Callable[[str, Progress], None]

LOCAL_WORKER_ID = "local"


class LocalJobContext(CancellableContext):
    """The context of a handler running inside the server process."""

    def __init__(
        self,
        job_id: str,
        job_type: str,
        attempt: int,
        lease_epoch: int,
        progress: Progress | None,
        loop: asyncio.AbstractEventLoop,
        on_progress: ProgressCallback,
    ) -> None:
        super().__init__(job_id, job_type, attempt, lease_epoch, progress, loop)
        self._on_progress = on_progress

    def _emit(self, progress: Progress) -> None:
        self._on_progress(self.job_id, progress)
