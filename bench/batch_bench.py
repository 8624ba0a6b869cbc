"""BatchSubmitJobs throughput in jobs per second, against the bare gRPC echo server's calls per second.

Run: ``.venv/bin/python bench/batch_bench.py [--batch 1000] [--concurrency 4] [--duration 3] [--json]``

Every server runs in its own process; the client sends the same pre-serialized request each time
(``--batch`` small ``demo.sleep`` jobs that stay QUEUED: the type may run one job at a time, so the
figure is the submit path alone, durable on SQLite and PostgreSQL). Cases: the echo server (the ceiling
R, in calls/s), BatchSubmitJobs on memory, SQLite (synchronous=FULL) and PostgreSQL (skipped when it
cannot be reached), SubmitJob one job a call on SQLite for comparison, and the echo again. Jobs/s are
given as a multiple of R, measured in the same run (the issue's aim: at least 10x R).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from submit_bench import (  # noqa: E402
    ECHO_METHOD,
    SUBMIT_METHOD,
    ChildServer,
    LoadResult,
    check_echo,
    check_submit_type,
    drive_load,
    echo_server,
    jobwire_server,
    parked_payload,
    submit_payload,
    with_server,
)

from jobwire.v1 import job_pb2, job_service_pb2  # noqa: E402
from support.postgres import drop_schema, new_schema, reachable, store_url  # noqa: E402

S = job_service_pb2
J = job_pb2
BATCH_METHOD = "/jobwire.v1.JobService/BatchSubmitJobs"
# Jobs stay queued: never more than the queue limit, and only demo.sleep=1 may run.
PARKED = ("--type-limits", "demo.sleep=1", "--max-queued", "100000000")


def batch_payload(size: int) -> bytes:
    single = S.SubmitJobRequest.FromString(parked_payload())
    return S.BatchSubmitJobsRequest(requests=[single] * size).SerializeToString()


def check_batch(size: int) -> Callable[[bytes], None]:
    def check(response: bytes) -> None:
        jobs = S.BatchSubmitJobsResponse.FromString(response).jobs
        if len(jobs) != size or any(job.state != J.JOB_STATE_QUEUED for job in jobs):
            raise RuntimeError(f"unexpected BatchSubmitJobs response: {len(jobs)} jobs")

    return check


async def run(args: argparse.Namespace) -> dict[str, Any]:
    echo_body = submit_payload()

    async def case(
        name: str, server: ChildServer, method: str, body: bytes, check: Callable[[bytes], None], jobs: int
    ) -> tuple[LoadResult, int]:
        concurrency = args.echo_concurrency if method != BATCH_METHOD else args.concurrency

        async def measure(running: ChildServer) -> LoadResult:
            return await drive_load(
                name, running, method, body, check, concurrency, args.warmup, args.duration
            )

        return await with_server(server, measure), jobs

    results: list[tuple[LoadResult, int]] = []
    batch_body, check = batch_payload(args.batch), check_batch(args.batch)
    with tempfile.TemporaryDirectory(prefix="jobwire-batch-") as folder:
        results.append(await case("echo", echo_server(), ECHO_METHOD, echo_body, check_echo(echo_body), 1))
        results.append(
            await case(
                f"BatchSubmitJobs x{args.batch}, memory",
                jobwire_server("memory:", 8, *PARKED),
                BATCH_METHOD,
                batch_body,
                check,
                args.batch,
            )
        )
        results.append(
            await case(
                f"BatchSubmitJobs x{args.batch}, SQLite FULL",
                jobwire_server(f"sqlite:///{Path(folder) / 'batch.db'}", 8, *PARKED),
                BATCH_METHOD,
                batch_body,
                check,
                args.batch,
            )
        )
        if await reachable():
            schema = new_schema()
            try:
                results.append(
                    await case(
                        f"BatchSubmitJobs x{args.batch}, PostgreSQL",
                        jobwire_server(store_url(schema), 8, *PARKED),
                        BATCH_METHOD,
                        batch_body,
                        check,
                        args.batch,
                    )
                )
            finally:
                await drop_schema(schema)
        else:
            print("PostgreSQL not reachable: its case is skipped", file=sys.stderr)
        results.append(
            await case(
                "SubmitJob x1, SQLite FULL",
                jobwire_server(f"sqlite:///{Path(folder) / 'single.db'}", 8, *PARKED),
                SUBMIT_METHOD,
                parked_payload(),
                check_submit_type("demo.sleep"),
                1,
            )
        )
        results.append(
            await case("echo again", echo_server(), ECHO_METHOD, echo_body, check_echo(echo_body), 1)
        )

    echo_rates = [r.calls_per_s for r, _ in results if r.case.startswith("echo")]
    echo = statistics.fmean(echo_rates)
    rows = []
    for result, jobs in results:
        jobs_per_s = result.calls_per_s * jobs
        rows.append(
            {
                **asdict(result),
                "jobs_per_call": jobs,
                "jobs_per_s": jobs_per_s,
                "jobs_per_s_over_echo": jobs_per_s / echo if echo else None,
            }
        )
    return {
        "echo_calls_per_s": echo,
        "echo_drift": (max(echo_rates) - min(echo_rates)) / echo if echo else None,
        "settings": vars(args),
        "cases": rows,
    }


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\necho R = {results['echo_calls_per_s']:,.0f} calls/s "
        f"(the two echo runs differ by {results['echo_drift']:.0%})"
    )
    print(f"{'case':<36} {'calls/s':>9} {'jobs/s':>10} {'x R':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for row in results["cases"]:
        ratio = row["jobs_per_s_over_echo"]
        print(
            f"{row['case']:<36} {row['calls_per_s']:>9,.0f} {row['jobs_per_s']:>10,.0f} "
            f"{ratio:>7.2f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['errors']:>7}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--batch", type=int, default=1000, help="jobs per call (default 1000, at most 1000)")
    add("--concurrency", type=int, default=4, help="batch calls in flight (default 4)")
    add(
        "--echo-concurrency", type=int, default=32, help="calls in flight for echo and SubmitJob (default 32)"
    )
    add("--duration", type=float, default=3.0, help="measured seconds per case (default 3)")
    add("--warmup", type=float, default=1.0, help="warm-up seconds per case (default 1)")
    add("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= 1000 or args.concurrency < 1 or args.duration <= 0:
        parser.error("--batch must be 1 to 1000, --concurrency at least 1, --duration more than 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    print_table(results)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
