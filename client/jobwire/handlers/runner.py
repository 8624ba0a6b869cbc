"""Running handlers: the context machinery and the runner, shared by the server and remote workers.

``CancellableContext`` implements the parts of ``JobContext`` that do not depend on where the job runs
(cancellation, sleeping, merging progress reports, hopping from a handler's thread to the event loop);
subclasses say where progress goes. ``HandlerRunner`` runs async handlers on the loop and plain ones in
a bounded thread pool, so they never block it.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jobwire.handlers.api import HandlerSpec, JobCancelled, JobContext, Progress, progress_details


def merge_progress(
    previous: Progress | None,
    percent: float | None,
    message: str | None,
    current_step: int | None,
    total_steps: int | None,
    details: Mapping[str, Any] | None = None,
) -> Progress:
    """New progress from a report: unset fields keep their value; percent derives from steps if absent."""
    base = previous or Progress()
    new_current = base.current_step if current_step is None else int(current_step)
    new_total = base.total_steps if total_steps is None else int(total_steps)
    if percent is None:
        if (current_step is not None or total_steps is not None) and new_total > 0:
            percent = 100.0 * new_current / new_total
        else:
            percent = base.percent
    return Progress(
        percent=min(100.0, max(0.0, float(percent))),
        message=base.message if message is None else str(message)[:1024],
        current_step=new_current,
        total_steps=new_total,
        details=base.details if details is None else progress_details(details),
    )


class CancellableContext(JobContext):
    """A JobContext whose progress goes to ``_emit`` (always called on the event loop's thread)."""

    def __init__(
        self,
        job_id: str,
        job_type: str,
        attempt: int,
        lease_epoch: int,
        progress: Progress | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.job_id = job_id
        self.job_type = job_type
        self.attempt = attempt
        self.lease_epoch = lease_epoch
        self._progress = progress
        self._loop = loop
        self._cancelled = False
        self._cancel_reason = ""
        # Made on first use (most handlers never sleep): a threading.Event costs a Condition and a Lock.
        self._cancel_flag: threading.Event | None = None  # plain handlers wait on it in their thread
        # Async handlers' sleeps in progress (futures on the loop): a cancel ends them at once.
        self._sleeps: set[asyncio.Future[None]] = set()
        self._lock = threading.Lock()

    @abc.abstractmethod
    def _emit(self, progress: Progress) -> None:
        """Deliver a progress report (on the loop's thread)."""

    def report_progress(
        self,
        percent: float | None = None,
        message: str | None = None,
        current_step: int | None = None,
        total_steps: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        with self._lock:
            self._progress = merge_progress(
                self._progress, percent, message, current_step, total_steps, details
            )
            progress = self._progress
        if _in_loop_thread(self._loop):
            self._emit(progress)
        else:
            self._loop.call_soon_threadsafe(self._emit, progress)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def cancel_reason(self) -> str:
        return self._cancel_reason

    def cancel(self, reason: str) -> None:
        """Ask the handler to stop (called on the event loop)."""
        with self._lock:
            if self._cancelled:
                return
            self._cancel_reason = reason
            self._cancelled = True
            flag = self._cancel_flag
        if flag is not None:
            flag.set()
        for sleep in self._sleeps:
            if not sleep.done():
                sleep.set_result(None)

    def sleep(self, seconds: float) -> None:
        with self._lock:
            if self._cancel_flag is None:
                self._cancel_flag = threading.Event()
                if self._cancelled:
                    self._cancel_flag.set()
            flag = self._cancel_flag
        if flag.wait(max(0.0, seconds)):
            raise JobCancelled(self._cancel_reason)

    async def asleep(self, seconds: float) -> None:
        if self._cancelled:
            raise JobCancelled(self._cancel_reason)
        if seconds <= 0:
            await asyncio.sleep(0)
        else:
            # A future that a timer or a cancel resolves: a tenth of what wait_for on an Event costs
            # (no task to make, none to cancel and wait for), which counts with thousands of handlers.
            loop = asyncio.get_running_loop()
            sleep: asyncio.Future[None] = loop.create_future()
            timer = loop.call_later(seconds, _resolve, sleep)
            self._sleeps.add(sleep)
            try:
                await sleep
            finally:
                timer.cancel()
                self._sleeps.discard(sleep)
        if self._cancelled:
            raise JobCancelled(self._cancel_reason)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _in_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class HandlerRunner:
    """Runs handler functions; plain ones in a bounded thread pool so they never block the loop."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="jobwire-handler")
        self._busy = 0  # plain handlers executing in a thread right now
        self._busy_lock = threading.Lock()

    async def run(self, spec: HandlerSpec, params: dict[str, Any], ctx: JobContext) -> Any:
        if spec.is_async:
            return await spec.func(params, ctx)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, spec, params, ctx)

    def _call(self, spec: HandlerSpec, params: dict[str, Any], ctx: JobContext) -> Any:
        with self._busy_lock:
            self._busy += 1
        try:
            return spec.func(params, ctx)
        finally:
            with self._busy_lock:
                self._busy -= 1

    @property
    def threads_busy(self) -> int:
        """Plain handlers still executing in a thread (idle pool threads do not count)."""
        return self._busy

    def shutdown(self) -> None:
        """Stop taking work; threads still running a handler that ignores cancellation are left to end."""
        self._pool.shutdown(wait=False, cancel_futures=True)
