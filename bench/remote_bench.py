"""End to end with remote workers: no-op jobs submitted, run by worker processes and recorded
SUCCEEDED, against the bare gRPC echo server's calls per second in the same run.

Run: ``.venv/bin/python bench/remote_bench.py [--jobs 20000] [--workers 2] [--concurrency 32] [--json]``

A server (SQLite, synchronous=FULL, ``--max-running`` high enough not to be the limit) and ``--workers``
``jobwire worker`` processes, each running ``--concurrency`` jobs at a time of ``remote.noop``
(tests/support/worker_handlers.py). The jobs are submitted with BatchSubmitJobs, 1,000 a call, as fast
as the server takes them; the figure is jobs recorded SUCCEEDED per second from the first submit to the
last success, with the server's and the workers' CPU time per job. Target (issue 10): at least 0.5x
the echo rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from submit_bench import (  # noqa: E402
    ECHO_METHOD,
    ChildServer,
    check_echo,
    drive_load,
    echo_server,
    job_counts,
    jobwire_server,
    process_cpu_seconds,
    submit_payload,
    with_server,
)

from jobwire.v1 import job_service_pb2, job_service_pb2_grpc  # noqa: E402
from support.workers import WorkerProcess  # noqa: E402

S = job_service_pb2


@contextlib.asynccontextmanager
async def remote_cluster(
    store: str, workers: int, concurrency: int, *extra: str
) -> AsyncIterator[tuple[ChildServer, list[WorkerProcess]]]:
    """A server on ``store`` and ``workers`` ``jobwire worker`` processes of ``concurrency`` slots each
    (``remote.noop`` and the other test worker handlers), all registered; stopped on the way out."""
    server = jobwire_server(store, workers * concurrency, "--max-queued", "10000000", *extra)
    await asyncio.to_thread(server.start)
    started = [
        WorkerProcess(server.target, f"bench-{i}", concurrency=concurrency).start() for i in range(workers)
    ]
    try:
        for worker in started:
            await asyncio.to_thread(worker.wait_registered)
        yield server, started
    finally:
        for worker in started:
            worker.stop()
        await asyncio.to_thread(server.stop)


async def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jobwire-remote-") as folder:
        store = f"sqlite:///{Path(folder) / 'remote.db'}"
        async with remote_cluster(store, args.workers, args.concurrency) as (server, workers):
            pids = [w.process.pid for w in workers if w.process is not None]
            assert server.process is not None
            server_cpu, worker_cpu = (
                process_cpu_seconds(server.process.pid),
                sum(map(process_cpu_seconds, pids)),
            )
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = job_service_pb2_grpc.JobServiceStub(channel)
                request = S.SubmitJobRequest(type="remote.noop")
                began = time.perf_counter()
                for start in range(0, args.jobs, 1000):
                    size = min(1000, args.jobs - start)
                    await stub.BatchSubmitJobs(
                        S.BatchSubmitJobsRequest(requests=[request] * size), timeout=60
                    )
                submitted = time.perf_counter() - began
                finished = 0
                while finished < args.jobs:
                    await asyncio.sleep(0.05)
                    _, finished = await job_counts(channel)
                    if time.perf_counter() - began > args.timeout:
                        raise RuntimeError(
                            f"only {finished} of {args.jobs} jobs finished in {args.timeout} s"
                        )
                seconds = time.perf_counter() - began
            server_cpu = process_cpu_seconds(server.process.pid) - server_cpu
            worker_cpu = sum(map(process_cpu_seconds, pids)) - worker_cpu
    return {
        "jobs": args.jobs,
        "submit_seconds": submitted,
        "seconds": seconds,
        "jobs_per_s": args.jobs / seconds,
        "server_cpu_us_per_job": server_cpu / args.jobs * 1e6,
        "worker_cpu_us_per_job": worker_cpu / args.jobs * 1e6,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = submit_payload()

    async def echo() -> float:
        result = await with_server(
            echo_server(), lambda s: drive_load("echo", s, ECHO_METHOD, body, check_echo(body), 32, 1.0, 3.0)
        )
        return result.calls_per_s

    before = await echo()
    jobs = await end_to_end(args)
    after = await echo()
    rate = (before + after) / 2
    return {
        **jobs,
        "echo_calls_per_s": rate,
        "ratio_to_echo": jobs["jobs_per_s"] / rate,
        "settings": vars(args),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=32, help="jobs at a time per worker (default 32)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    print(
        f"{results['jobs']:,} no-op jobs on {args.workers} worker processes x {args.concurrency}: "
        f"{results['jobs_per_s']:,.0f} jobs/s end to end, {results['ratio_to_echo']:.2f}x echo "
        f"({results['echo_calls_per_s']:,.0f} calls/s; target 0.5x); submitted in "
        f"{results['submit_seconds']:.1f} s; CPU per job: server {results['server_cpu_us_per_job']:.0f} µs, "
        f"workers {results['worker_cpu_us_per_job']:.0f} µs"
    )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
