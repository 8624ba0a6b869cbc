"""State changes that run to their end whatever the caller does.

A gRPC call whose client gives up (a short deadline, a dropped connection) is cancelled: grpcio cancels
the handler's task at its next ``await``. A state change interrupted there would be half done, e.g.
committed to the store but never put in the queue, or taken out of the queue but never committed, and
the store and the live state would disagree from then on. So every state-changing operation runs in a
task of its own, shielded from its caller: the caller may stop waiting, the change still completes (or
fails) as a whole. ``wait`` lets a draining server let those in flight finish before the store closes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

log = logging.getLogger("jobwire.completion")

P = ParamSpec("P")
T = TypeVar("T")


class InFlight:
    """The operations started and not finished yet."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, operation: Coroutine[Any, Any, T]) -> T:
        """Run ``operation`` to completion even if the awaiting caller is cancelled."""
        task = asyncio.ensure_future(operation)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        # Retrieve the outcome so that an operation whose caller went away never logs "never retrieved";
        # its error already reached the caller if one was still waiting.
        if not task.cancelled() and task.exception() is not None:
            log.debug("operation failed after its caller left", exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, limit: float) -> None:
        """Wait up to ``limit`` seconds for every operation in flight (and any they start) to end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.wait(set(self._tasks), timeout=remaining)


class HasInFlight(Protocol):
    in_flight: InFlight


S = TypeVar("S", bound=HasInFlight)


def completes(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """Decorate a state-changing coroutine method: it runs to its end even if its caller is cancelled."""

    async def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.in_flight.run(method(self, *args, **kwargs))

    functools.update_wrapper(run, method)
    return run
