"""Reads under a deep queue: GetJob on a queued job against GetJob on a finished one, side by side.

Run: ``.venv/bin/python bench/read_bench.py [--queued 100000] [--calls 2000] [--json]``

A SQLite store is filled directly (through the store API, so no submit path is timed) with ``--queued``
jobs of a type no worker serves (they stay QUEUED, wait reason NO_WORKER) and 1,000 finished ones; then
a server process starts on it and one client measures, interleaved call by call so that both see the
same machine: GetJob of queued jobs spread over the whole queue, GetJob of finished jobs, and (for
reference) ListJobs of queued jobs and GetQueueStats. The figure to watch is the ratio of the two
GetJob medians: a queued job's position must not cost a pass over the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from jobwire.server.job import Job, JobIdGenerator
from jobwire.server.job_types import JobType
from jobwire.server.state_machine import JobState
from jobwire.server.stores.sqlite import SqliteStore
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from support.servers import ServerProcess

S = job_service_pb2
IDLE_TYPE = "bench.idle"


async def fill(path: str, queued: int, finished: int) -> tuple[list[str], list[str]]:
    """Insert the jobs straight into the store; returns (queued ids, finished ids)."""
    store = SqliteStore(path, synchronous="OFF", max_batch=1000)
    await store.open()
    ids = JobIdGenerator()
    now = time.time()
    await store.save_job_types([JobType(IDLE_TYPE, last_seen=now)])
    queued_ids: list[str] = []
    finished_ids: list[str] = []
    rng = random.Random(1)

    def job(state: JobState) -> Job:
        return Job(
            id=ids.new_id(),
            type=IDLE_TYPE if state is JobState.QUEUED else "test.echo",
            state=state,
            priority=rng.randrange(10),
            params={"n": rng.randrange(1000)},
            labels={"bench": "read"},
            create_time=now,
            update_time=now,
            queue_time=now + rng.random(),
            end_time=None if state is JobState.QUEUED else now,
            expire_time=None if state is JobState.QUEUED else now + 86400,
            result=None if state is JobState.QUEUED else {"ok": True},
        )

    batches: list[asyncio.Future[None]] = []
    for state, count, into in (
        (JobState.SUCCEEDED, finished, finished_ids),
        (JobState.QUEUED, queued, queued_ids),
    ):
        for start in range(0, count, 1000):
            jobs = [job(state) for _ in range(min(1000, count - start))]
            into.extend(item.id for item in jobs)
            batches.append(asyncio.ensure_future(store.insert_many(jobs, [])))
            if len(batches) >= 8:
                await asyncio.gather(*batches)
                batches = []
    await asyncio.gather(*batches)
    await store.close()
    return queued_ids, finished_ids


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    target: str, queued_ids: list[str], finished_ids: list[str], calls: int
) -> dict[str, dict[str, float]]:
    rng = random.Random(2)
    timings: dict[str, list[float]] = {
        "GetJob queued": [],
        "GetJob finished": [],
        "ListJobs queued": [],
        "GetQueueStats": [],
    }
    with grpc.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        for _ in range(50):  # warm up the channel and the server's caches
            stub.GetJob(S.GetJobRequest(job_id=finished_ids[0]))
        for i in range(calls):
            queued = stub.GetJob
            started = time.perf_counter()
            job = queued(S.GetJobRequest(job_id=rng.choice(queued_ids))).job
            timings["GetJob queued"].append(time.perf_counter() - started)
            assert job.state == job_pb2.JOB_STATE_QUEUED and job.queue_position > 0
            started = time.perf_counter()
            stub.GetJob(S.GetJobRequest(job_id=rng.choice(finished_ids)))
            timings["GetJob finished"].append(time.perf_counter() - started)
            if i % 10 == 0:
                started = time.perf_counter()
                stub.ListJobs(S.ListJobsRequest(states=[job_pb2.JOB_STATE_QUEUED], page_size=50))
                timings["ListJobs queued"].append(time.perf_counter() - started)
                started = time.perf_counter()
                stub.GetQueueStats(S.GetQueueStatsRequest())
                timings["GetQueueStats"].append(time.perf_counter() - started)
    return {
        name: {
            "p50_ms": statistics.median(values) * 1000,
            "p99_ms": percentile(values, 0.99) * 1000,
            "calls": len(values),
        }
        for name, values in timings.items()
    }


def run(queued: int, calls: int) -> dict[str, Any]:
    """Fill a store, start a server on it, measure; the figures and how long each step took."""
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/read.db"
        began = time.monotonic()
        queued_ids, finished_ids = asyncio.run(fill(path, queued, 1000))
        filled = time.monotonic() - began
        server = ServerProcess(f"sqlite:///{path}")
        began = time.monotonic()
        server.start(timeout=120)
        started = time.monotonic() - began
        try:
            figures = measure(server.target, queued_ids, finished_ids, calls)
        finally:
            server.kill()
    ratio = figures["GetJob queued"]["p50_ms"] / figures["GetJob finished"]["p50_ms"]
    return {
        "queued": queued,
        "fill_seconds": filled,
        "serving_after_seconds": started,
        "figures": figures,
        "ratio_queued_to_finished": ratio,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.queued, args.calls)
    if args.json:
        print(json.dumps(results))
        return 0
    print(
        f"{args.queued} queued jobs (filled in {results['fill_seconds']:.1f} s; server SERVING "
        f"{results['serving_after_seconds']:.1f} s after start)"
    )
    print(f"{'call':<18}{'p50 ms':>10}{'p99 ms':>10}{'calls':>8}")
    for name, figure in results["figures"].items():
        print(f"{name:<18}{figure['p50_ms']:>10.2f}{figure['p99_ms']:>10.2f}{figure['calls']:>8.0f}")
    ratio = results["ratio_queued_to_finished"]
    print(f"GetJob on a queued job / on a finished job (p50): {ratio:.2f}x  (target: at most 2x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
