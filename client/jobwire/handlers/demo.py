"""Built-in job types, so that a fresh server does something useful out of the box."""

from __future__ import annotations

import hashlib
from typing import Any

from jobwire.handlers.api import JobContext, handler


@handler("demo.sleep")
async def sleep(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Sleep ``seconds`` (float, default 1) in ``steps`` (int, default 10) steps, reporting each one done.

    ``current_step`` counts the steps done, and the message says the same ("3 of 10 steps done").
    Stops within one event-loop turn when cancelled.
    """
    seconds = float(params.get("seconds", 1.0))
    steps = int(params.get("steps", 10))
    if seconds < 0 or steps < 1:
        raise ValueError("seconds must be >= 0 and steps >= 1")
    ctx.report_progress(current_step=0, total_steps=steps, message=f"0 of {steps} steps done")
    for step in range(1, steps + 1):
        await ctx.asleep(seconds / steps)
        ctx.report_progress(current_step=step, total_steps=steps, message=f"{step} of {steps} steps done")
    return {"slept_seconds": seconds, "steps": steps}


@handler("demo.echo")
async def echo(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Return the params unchanged: the smallest possible job, for smoke tests and benchmarks.

    ``async`` because it never blocks: a plain function would pay a thread-pool hop for nothing.
    """
    return params


@handler("demo.hash")
def hash_iterations(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """CPU work in a thread: SHA-256 of ``data`` (str) iterated ``iterations`` times (default 100,000).

    Shows a plain (non-async) handler checking for cancellation between chunks.
    """
    data = str(params.get("data", "")).encode()
    iterations = int(params.get("iterations", 100_000))
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    digest = data
    chunk = max(1, iterations // 20)
    for done in range(0, iterations, chunk):
        ctx.raise_if_cancelled()
        for _ in range(min(chunk, iterations - done)):
            digest = hashlib.sha256(digest).digest()
        ctx.report_progress(current_step=min(done + chunk, iterations), total_steps=iterations)
    return {"sha256": digest.hex(), "iterations": iterations}
