"""Remote workers: run the same ``@handler`` functions as ``jobwire serve --handlers`` in another process.

Usage::

    from jobwire.worker import Worker, load_handlers

    worker = Worker("jobs.internal:50051", load_handlers(["myapp.jobs"]), concurrency=8)
    raise SystemExit(worker.run_forever())   # SIGTERM/SIGINT drain it

or, inside an event loop, ``await worker.run()`` and ``await worker.stop()``. The worker speaks
``jobwire.v1.WorkerService.Connect`` (see its proto for the protocol): it registers its job types,
takes jobs as it has capacity, renews their leases, reports progress and outcomes, reconnects after
network failures or server restarts without losing running work, and hands jobs back when stopped.
"""

from jobwire.handlers.api import HandlerSpec, load_handlers
from jobwire.worker.worker import RemoteJobContext, Worker, default_worker_id

__all__ = ["HandlerSpec", "RemoteJobContext", "Worker", "default_worker_id", "load_handlers"]
