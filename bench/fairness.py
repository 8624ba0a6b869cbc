"""Fair sharing: tenant B's queue wait while tenant A floods the queue, against B's wait on an idle server.

Run: ``.venv/bin/python bench/fairness.py [--flood 4000] [--run-time 0.01] [--max-running 4] [--json]``

One server in a child process (SQLite, authentication on, ``demo.sleep`` jobs of a fixed run time run
by its in-process handlers). Tenant B submits ``--b-jobs`` jobs, one every ``--b-interval`` seconds, and
each one's queue wait (start_time - create_time) is read back. Three cases, each on a fresh server:

- **idle**: only B submits;
- **A floods, B its own tenant**: A first submits ``--flood`` jobs (far more than the server runs in the
  time B submits), then B submits as above: B's jobs compete with A's backlog by fair sharing;
- **A floods, B with A's credential**: the same, but B's jobs are A's (one tenant, as before tenants):
  they wait behind A's whole backlog.

Printed per case: B's wait p50 and max, how many jobs were queued when B started submitting, and the ratio
of B's p50 to the idle one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from submit_bench import jobwire_server  # noqa: E402

from jobwire.server.tokens import KeyRing, issue_token, write_key_file  # noqa: E402
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc  # noqa: E402

TERMINAL = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def sleep_request(seconds: float, tag: str) -> job_service_pb2.SubmitJobRequest:
    request = job_service_pb2.SubmitJobRequest(type="demo.sleep", labels={"bench": tag})
    request.params.update({"seconds": seconds, "steps": 1})
    return request


async def flood(stub: Any, token: str, jobs: int, run_time: float) -> None:
    """Submit ``jobs`` jobs as fast as 64 calls in flight allow."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(jobs):
        queue.put_nowait(index)

    async def submitter() -> None:
        while not queue.empty():
            queue.get_nowait()
            await stub.SubmitJob(sleep_request(run_time, "a"), metadata=metadata(token), timeout=60)

    await asyncio.gather(*(submitter() for _ in range(64)))


async def b_waits(
    stub: Any, token: str, jobs: int, interval: float, run_time: float, limit: float
) -> list[float]:
    """Submit B's jobs one every ``interval``; each one's queue wait (``limit`` for one not started)."""
    ids = []
    for _ in range(jobs):
        response = await stub.SubmitJob(sleep_request(run_time, "b"), metadata=metadata(token), timeout=60)
        ids.append(response.job.id)
        await asyncio.sleep(interval)
    deadline = time.monotonic() + limit
    waits: dict[str, float] = {}
    while len(waits) < len(ids) and time.monotonic() < deadline:
        for job_id in ids:
            if job_id in waits:
                continue
            job = (
                await stub.GetJob(job_service_pb2.GetJobRequest(job_id=job_id), metadata=metadata(token))
            ).job
            if job.HasField("start_time"):
                waits[job_id] = (
                    job.start_time.ToMilliseconds() / 1000 - job.create_time.ToMilliseconds() / 1000
                )
        await asyncio.sleep(0.05)
    return [waits.get(job_id, limit) for job_id in ids]


async def queued(stub: Any, admin: str) -> int:
    stats = await stub.GetQueueStats(job_service_pb2.GetQueueStatsRequest(), metadata=metadata(admin))
    return sum(c.count for c in stats.state_counts if c.state == job_pb2.JOB_STATE_QUEUED)


async def run_case(args: argparse.Namespace, keys: str, tokens: dict[str, str], case: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        server = jobwire_server(
            f"sqlite:///{directory}/fairness.db",
            args.max_running,
            "--auth-key-file",
            keys,
            "--demo-handlers",
            "true",
        )
        server.start()
        try:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = job_service_pb2_grpc.JobServiceStub(channel)
                # One job first, so that no case pays for a cold server (first write, first thread).
                await b_waits(stub, tokens["b"], 1, 0.0, args.run_time, args.max_wait)
                if case != "idle":
                    await flood(stub, tokens["a"], args.flood, args.run_time)
                backlog = await queued(stub, tokens["admin"])
                b_token = tokens["a"] if case == "one tenant" else tokens["b"]
                waits = await b_waits(
                    stub, b_token, args.b_jobs, args.b_interval, args.run_time, args.max_wait
                )
        finally:
            server.stop()
    return {
        "case": case,
        "queued_when_b_starts": backlog,
        "b_wait_p50": statistics.median(waits),
        "b_wait_max": max(waits),
        "b_not_started": sum(1 for w in waits if w >= args.max_wait),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as directory:
        keys = str(Path(directory) / "keys.pem")
        write_key_file(keys, rotate=False)
        ring = KeyRing.load(keys)
        tokens = {
            "a": issue_token(ring, tenant="a", role="submitter", subject="a-bench", ttl=3600),
            "b": issue_token(ring, tenant="b", role="submitter", subject="b-bench", ttl=3600),
            "admin": issue_token(ring, tenant="ops", role="admin", subject="ops", ttl=3600),
        }
        results = []
        for case in ("idle", "fair", "one tenant"):
            results.append(await run_case(args, keys, tokens, case))
    return results


CASE_NAMES = {
    "idle": "idle server",
    "fair": "A floods, B its own tenant",
    "one tenant": "A floods, B with A's credential",
}


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    idle = results[0]["b_wait_p50"] or 1e-9
    print(
        f"fairness: {args.flood} jobs from A, then {args.b_jobs} from B every {args.b_interval}s; "
        f"demo.sleep {args.run_time * 1000:.0f} ms, --max-running {args.max_running}"
    )
    print(f"{'case':34} {'queued':>8} {'B wait p50':>11} {'B wait max':>11} {'p50 / idle':>11}")
    for r in results:
        capped = " (capped)" if r["b_not_started"] else ""
        print(
            f"{CASE_NAMES[r['case']]:34} {r['queued_when_b_starts']:>8} {r['b_wait_p50'] * 1000:>9.1f}ms "
            f"{r['b_wait_max'] * 1000:>9.1f}ms {r['b_wait_p50'] / idle:>10.1f}x{capped}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--flood", type=int, default=4000, help="A's jobs (default 4000)")
    parser.add_argument("--b-jobs", type=int, default=20, help="B's jobs (default 20)")
    parser.add_argument("--b-interval", type=float, default=0.2, help="seconds between B's submits")
    parser.add_argument("--run-time", type=float, default=0.01, help="each job's run time in seconds")
    parser.add_argument("--max-running", type=int, default=4, help="the server's --max-running")
    parser.add_argument("--max-wait", type=float, default=120.0, help="give up on a B job after this long")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
