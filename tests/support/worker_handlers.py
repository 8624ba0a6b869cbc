"""Job types run by remote worker processes in the tests (``jobwire worker --handlers
support.worker_handlers``). Their types are distinct from ``support.handlers``: a server under test must
not load this module, so that only its workers can run them."""

from __future__ import annotations

import os
import time
from typing import Any

from jobwire.handlers import JobContext, NonRetryableError, handler


@handler("remote.sleep")
async def remote_sleep(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Sleeps ``seconds`` in ``steps`` steps, reporting progress after each; stops when cancelled."""
    seconds = float(params.get("seconds", 1))
    steps = max(1, int(params.get("steps", 10)))
    for step in range(steps):
        await ctx.asleep(seconds / steps)
        details = {"steps_done": step + 1, "unit": "step"}
        ctx.report_progress(
            current_step=step + 1, total_steps=steps, message=f"step {step + 1}", details=details
        )
    return {"slept": seconds, "attempt": ctx.attempt, "pid": os.getpid()}


@handler("remote.fail")
def remote_fail(params: dict[str, Any], ctx: JobContext) -> None:
    raise ValueError(params.get("message", "remote boom"))


@handler("remote.nonretryable")
async def remote_nonretryable(params: dict[str, Any], ctx: JobContext) -> None:
    raise NonRetryableError(params.get("message", "bad params"))


@handler("remote.record")
def remote_record(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """After ``seconds`` (a plain sleep: it ignores cancellation, like a careless handler), appends
    "<job_id>:<attempt>:<epoch>" to the file ``path``: which attempts did their side effect, and when."""
    time.sleep(float(params.get("seconds", 0)))
    with open(params["path"], "a", encoding="utf-8") as out:
        out.write(f"{ctx.job_id}:{ctx.attempt}:{ctx.lease_epoch}\n")
    return {"attempt": ctx.attempt, "epoch": ctx.lease_epoch}


@handler("remote.echo")
def remote_echo(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    return params


@handler("remote.noop")
async def remote_noop(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Does nothing: what a job costs the server and the worker beyond its own work."""
    return {}
