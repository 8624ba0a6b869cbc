"""The handler API: how job types are written, for the server's in-process executor and remote workers alike.

A handler is a plain or ``async`` function taking the job's params and a ``JobContext``::

    from jobwire.handlers import JobContext, handler

    @handler("reports.render", max_running=2, timeout=600)
    async def render(params: dict, ctx: JobContext) -> dict:
        for page in range(params["pages"]):
            await ctx.asleep(0)                      # raises JobCancelled once cancellation is asked
            ctx.report_progress(current_step=page + 1, total_steps=params["pages"])
        return {"url": "..."}

The handler knows nothing of where it runs: the context is the only thing it talks to, so the same
function runs inside ``jobwire serve --handlers mod`` and in a separate worker process.
"""

from jobwire.handlers.api import (
    HandlerSpec,
    JobCancelled,
    JobContext,
    NonRetryableError,
    Progress,
    RetryDefaults,
    handler,
    load_handlers,
)

__all__ = [
    "HandlerSpec",
    "JobCancelled",
    "JobContext",
    "NonRetryableError",
    "Progress",
    "RetryDefaults",
    "handler",
    "load_handlers",
]
