"""Watchers: a burst of WatchJob calls on a deep queue, the memory of idle streams, and how fast
progress reaches the watchers of running jobs.

Run: ``.venv/bin/python bench/watch_bench.py [--queued 100000] [--burst 5000] [--idle 10000]
[--running 1000] [--json]``

One server in a child process (SQLite, synchronous=FULL):

1. ``--queued`` jobs of a type whose only worker has left wait in the queue (submitted in batches);
2. ``--idle`` watch streams are held open, and the server's resident memory is read before and after:
   the cost of an idle stream (first, while no stream has been opened yet: memory freed by closed
   streams would otherwise be reused and hide the cost);
3. ``--burst`` WatchJob calls on queued jobs are opened at once, spread over channels of at most 5,000
   streams; each must receive its snapshot (errors are counted by status code);
4. ``--running`` ``demo.sleep`` jobs report progress at 10 Hz for ``--seconds``, each with a watcher;
   each progress message's delivery delay is the client's clock at receipt minus the job's update time
   (the same machine's clock), and all the server's CPU time (running the jobs included) is divided by
   the progress messages sent: an upper bound of what one progress event costs.

Targets (issue 10): burst errors 0; 10,000 idle streams at most 300 MiB; delivery p99 at most 100 ms;
at most 50 µs of server CPU per progress event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from figures import percentile  # noqa: E402
from submit_bench import ChildServer, jobwire_server  # noqa: E402

from jobwire.v1 import (  # noqa: E402
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    worker_service_pb2_grpc,
)
from jobwire.v1 import worker_service_pb2 as W  # noqa: E402

S = job_service_pb2
J = job_pb2
IDLE_TYPE = "bench.idle"
STREAMS_PER_CHANNEL = 5_000
PROGRESS = S.WATCH_EVENT_TYPE_PROGRESS_UPDATED


def channels_for(target: str, streams: int) -> list[grpc.aio.Channel]:
    count = max(1, -(-streams // STREAMS_PER_CHANNEL))
    # Distinct channel arguments: grpc would otherwise share one connection (and its stream limit).
    return [grpc.aio.insecure_channel(target, options=[("bench.channel", i)]) for i in range(count)]


async def declare_idle_type(target: str) -> None:
    """A worker declares IDLE_TYPE and leaves: the type stays known, its jobs wait (NO_WORKER)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        leave = asyncio.Event()

        async def requests() -> AsyncIterator[W.ConnectRequest]:
            yield W.ConnectRequest(
                register=W.RegisterWorker(
                    worker_id="bench", job_types=[W.JobTypeDeclaration(type=IDLE_TYPE)], credits=1
                )
            )
            await leave.wait()

        call = stub.Connect(requests())
        async for response in call:
            if response.WhichOneof("message") == "registered":
                break
        leave.set()
        call.cancel()


async def submit_in_batches(
    stub: job_service_pb2_grpc.JobServiceStub, request: S.SubmitJobRequest, count: int
) -> list[str]:
    ids: list[str] = []
    while len(ids) < count:
        size = min(1000, count - len(ids))
        answer = await stub.BatchSubmitJobs(S.BatchSubmitJobsRequest(requests=[request] * size), timeout=120)
        ids.extend(job.id for job in answer.jobs)
    return ids


async def open_watches(
    channels: list[grpc.aio.Channel], job_ids: Sequence[str]
) -> tuple[list[Any], Counter[str], float]:
    """Open one WatchJob per job at once; (open calls, outcome counts, seconds until every snapshot)."""
    calls: list[Any] = []
    outcomes: Counter[str] = Counter()
    stubs = [job_service_pb2_grpc.JobServiceStub(channel) for channel in channels]

    async def first_message(index: int, job_id: str) -> None:
        call = stubs[index % len(stubs)].WatchJob(S.WatchJobRequest(job_id=job_id, view=J.JOB_VIEW_BASIC))
        calls.append(call)
        try:
            await call.read()
            outcomes["snapshot"] += 1
        except grpc.aio.AioRpcError as error:
            outcomes[error.code().name] += 1

    began = time.perf_counter()
    await asyncio.gather(*(first_message(i, job_id) for i, job_id in enumerate(job_ids)))
    return calls, outcomes, time.perf_counter() - began


async def close_all(calls: list[Any], channels: list[grpc.aio.Channel]) -> None:
    """End the watch calls and their channels, and give the server a second to let go of them."""
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close()
    await asyncio.sleep(1.0)


async def progress_delivery(
    server: ChildServer,
    stub: job_service_pb2_grpc.JobServiceStub,
    channels: list[grpc.aio.Channel],
    running: int,
    seconds: float,
) -> dict[str, Any]:
    request = S.SubmitJobRequest(type="demo.sleep", labels={"bench": "watch"})
    request.params.update({"seconds": seconds, "steps": int(seconds * 10)})
    stubs = [job_service_pb2_grpc.JobServiceStub(channel) for channel in channels]
    delays: list[float] = []
    counts: Counter[str] = Counter()
    cpu_before = server.cpu_seconds()
    ids = await submit_in_batches(stub, request, running)

    async def follow(index: int, job_id: str) -> None:
        call = stubs[index % len(stubs)].WatchJob(S.WatchJobRequest(job_id=job_id, view=J.JOB_VIEW_BASIC))
        try:
            async for update in call:
                if update.event_type == PROGRESS:
                    delays.append(time.time() - update.job.update_time.ToNanoseconds() / 1e9)
                    counts["progress"] += 1
        except grpc.aio.AioRpcError as error:
            counts[error.code().name] += 1

    await asyncio.gather(*(follow(i, job_id) for i, job_id in enumerate(ids)))
    cpu = (server.cpu_seconds() or 0.0) - (cpu_before or 0.0)
    return {
        "jobs": running,
        "progress_messages": counts["progress"],
        "errors": {k: v for k, v in counts.items() if k != "progress"},
        "delivery_p50_ms": percentile(delays, 50) * 1e3 if delays else None,
        "delivery_p99_ms": percentile(delays, 99) * 1e3 if delays else None,
        "server_cpu_us_per_progress": cpu / counts["progress"] * 1e6 if counts["progress"] else None,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="jobwire-watch-") as folder:
        server = jobwire_server(
            f"sqlite:///{Path(folder) / 'watch.db'}",
            max(8, args.running + 8),
            "--max-queued",
            str(10 * (args.queued + args.running) + 1000),
        )
        await asyncio.to_thread(server.start)
        try:
            async with grpc.aio.insecure_channel(server.target) as control:
                stub = job_service_pb2_grpc.JobServiceStub(control)
                await declare_idle_type(server.target)
                began = time.perf_counter()
                queued = await submit_in_batches(
                    stub, S.SubmitJobRequest(type=IDLE_TYPE), args.queued + args.idle
                )
                results["queued"] = {"jobs": len(queued), "seconds": time.perf_counter() - began}
                print(f"{len(queued):,} jobs queued", file=sys.stderr)

                before = server.rss_mib()
                channels = channels_for(server.target, args.idle)
                calls, outcomes, _ = await open_watches(channels, queued[-args.idle :])
                await asyncio.sleep(2.0)
                after = server.rss_mib()
                results["idle"] = {
                    "streams": args.idle,
                    "outcomes": dict(outcomes),
                    "rss_before_mib": before,
                    "rss_after_mib": after,
                    "kib_per_stream": (after - before) * 1024 / args.idle,
                }
                await close_all(calls, channels)

                channels = channels_for(server.target, args.burst)
                calls, outcomes, seconds = await open_watches(channels, queued[: args.burst])
                results["burst"] = {"calls": args.burst, "outcomes": dict(outcomes), "seconds": seconds}
                await close_all(calls, channels)

                channels = channels_for(server.target, args.running)
                results["progress"] = await progress_delivery(
                    server, stub, channels, args.running, args.seconds
                )
                for channel in channels:
                    await channel.close()
        finally:
            await asyncio.to_thread(server.stop)
    return results


def print_report(results: dict[str, Any]) -> None:
    burst, idle, progress = results["burst"], results["idle"], results["progress"]
    errors = sum(n for code, n in burst["outcomes"].items() if code != "snapshot")
    print(f"\n{results['queued']['jobs']:,} jobs queued in {results['queued']['seconds']:.1f} s")
    print(f"{'figure':<52} {'measured':>14} {'target':>12}")
    rows = [
        (f"burst of {burst['calls']:,} WatchJob calls: errors", f"{errors}", "0"),
        ("  every snapshot received after", f"{burst['seconds']:.1f} s", ""),
        (
            f"{idle['streams']:,} idle watch streams: server memory",
            f"{idle['rss_after_mib'] - idle['rss_before_mib']:.0f} MiB",
            "<= 300 MiB",
        ),
        ("  per stream", f"{idle['kib_per_stream']:.1f} KiB", ""),
        (
            f"progress of {progress['jobs']:,} jobs at 10 Hz: delivery p50",
            f"{progress['delivery_p50_ms']:.1f} ms",
            "",
        ),
        ("  delivery p99", f"{progress['delivery_p99_ms']:.1f} ms", "<= 100 ms"),
        ("  server CPU per progress message", f"{progress['server_cpu_us_per_progress']:.0f} µs", "<= 50 µs"),
        (
            "  progress messages (errors)",
            f"{progress['progress_messages']:,} ({sum(progress['errors'].values())})",
            "",
        ),
    ]
    for name, measured, target in rows:
        print(f"{name:<52} {measured:>14} {target:>12}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--queued", type=int, default=100_000, help="jobs waiting in the queue (default 100,000)")
    add("--burst", type=int, default=5_000, help="WatchJob calls opened at once (default 5,000)")
    add("--idle", type=int, default=10_000, help="idle watch streams held open (default 10,000)")
    add("--running", type=int, default=1_000, help="running jobs reporting progress (default 1,000)")
    add("--seconds", type=float, default=5.0, help="how long each of them runs (default 5)")
    add("--json", action="store_true", help="also print the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    print_report(results)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
