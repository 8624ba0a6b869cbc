"""Job types used by the tests (loaded with ``--handlers support.handlers``)."""

from __future__ import annotations

import threading
import time
from typing import Any

from jobwire.handlers import JobContext, NonRetryableError, handler

# Set by tests to let `test.gate` jobs finish; a threading.Event works across the server's threads.
GATE = threading.Event()
# `test.counted` runs, by params["key"]: how many times a handler was invoked for each job.
RUNS: dict[str, int] = {}
RUNS_LOCK = threading.Lock()


@handler("test.echo")
def echo(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    return params


@handler("test.fail", max_attempts=1)
def fail(params: dict[str, Any], ctx: JobContext) -> None:
    raise ValueError("boom")


@handler("test.slow_once", max_attempts=3, timeout=0.05, non_retryable_codes=[4])
async def slow_once(params: dict[str, Any], ctx: JobContext) -> None:
    """Runs past its 50 ms time-out; DEADLINE_EXCEEDED (4) is not retried for this type."""
    await ctx.asleep(5)


@handler("test.scalar")
async def scalar(params: dict[str, Any], ctx: JobContext) -> int:
    return 42


@handler("test.not_json")
async def not_json(params: dict[str, Any], ctx: JobContext) -> object:
    return object()


@handler("test.wait_cancel")
async def wait_cancel(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Runs until cancelled (or ``seconds``), reporting progress once."""
    ctx.report_progress(percent=1, message="waiting")
    await ctx.asleep(float(params.get("seconds", 3600)))
    return {"waited": True}


@handler("test.sync_wait_cancel")
def sync_wait_cancel(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """A plain handler in a thread that stops when cancelled."""
    ctx.report_progress(percent=1, message="waiting")
    ctx.sleep(float(params.get("seconds", 3600)))
    return {"waited": True}


@handler("test.ignore_cancel")
def ignore_cancel(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Ignores cancellation for ``seconds`` (the server must force it after its grace period)."""
    time.sleep(float(params.get("seconds", 1)))
    return {"ignored": True}


@handler("test.gate")
def gate(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Blocks until GATE is set (or cancelled): lets a test hold jobs RUNNING."""
    while not GATE.wait(0.01):
        ctx.raise_if_cancelled()
    return {"order": params.get("order")}


@handler("test.limited", max_running=1)
async def limited(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    await ctx.asleep(float(params.get("seconds", 0.05)))
    return {}


@handler("test.progress")
async def progress(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Reports ``count`` progress updates as fast as it can (with ``details`` too when asked)."""
    count = int(params.get("count", 100))
    for i in range(count):
        details = {"done": i + 1, "left": count - i - 1} if params.get("details") else None
        ctx.report_progress(current_step=i + 1, total_steps=count, details=details)
    await ctx.asleep(0)
    return {"count": count}


@handler("test.flaky")
async def flaky(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Fails every attempt before ``succeed_on`` (default 2), then returns the attempt that succeeded."""
    if ctx.attempt < int(params.get("succeed_on", 2)):
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    return {"succeeded_on": ctx.attempt, "epoch": ctx.lease_epoch}


@handler("test.nonretryable", max_attempts=5)
def nonretryable(params: dict[str, Any], ctx: JobContext) -> None:
    raise NonRetryableError("bad input, retrying cannot help")


@handler("test.big_result", max_attempts=3)
async def big_result(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Returns a result of about ``bytes`` bytes."""
    return {"blob": "x" * int(params.get("bytes", 5_000_000))}


@handler("test.counted")
async def counted(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Counts its runs per ``key`` in RUNS, reports progress as it goes, and takes ``seconds``."""
    with RUNS_LOCK:
        RUNS[str(params.get("key"))] = RUNS.get(str(params.get("key")), 0) + 1
    steps = 3
    for step in range(1, steps + 1):
        await ctx.asleep(float(params.get("seconds", 0.02)) / steps)
        ctx.report_progress(current_step=step, total_steps=steps)
    return {}
