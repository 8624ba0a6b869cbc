"""The whole benchmark set in one run: each figure beside its target (issue 10) and the echo rate.

Run: ``.venv/bin/python bench/run.py [--quick] [--json]``

It runs, one after the other: ``submit_bench`` (SubmitJob against the bare grpc.aio echo server, the
submit path alone and with every job run; submit-to-start latency), ``batch_bench`` (BatchSubmitJobs on
memory, SQLite and PostgreSQL), ``read_bench`` (GetJob, ListJobs and GetQueueStats under a deep queue),
``watch_bench`` (a burst of watchers, idle streams, progress delivery) and ``remote_bench`` (end to end
with two ``jobwire worker`` processes). Ratios are to the echo rate measured in the same run.
``--quick`` shrinks every size and duration to finish in about two minutes: its figures show the
shape, the full run gives the ones to quote. What the set does not measure is listed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import batch_bench
import read_bench
import remote_bench
import submit_bench
import watch_bench

NOT_MEASURED = [
    "the peers side by side (bench/peers_bench.py, on its own: it installs and runs four other systems)",
    "1,000,000 queued jobs (bench/scale_bench.py, on its own: it takes a few minutes)",
    "the same set on 1, 2 and 3 PostgreSQL replicas (see bench/replicas_bench.py)",
]


def sizes(quick: bool) -> dict[str, list[str]]:
    """Each benchmark's arguments, full or quick."""
    if quick:
        return {
            "submit": ["--submit-only", "--duration", "1", "--warmup", "0.3", "--latency-jobs", "30"],
            "batch": ["--duration", "1", "--warmup", "0.3", "--concurrency", "2"],
            "read": ["10000", "200"],
            "watch": [
                *("--queued", "5000", "--burst", "1000", "--idle", "1000"),
                *("--running", "100", "--seconds", "1.5"),
            ],
            "remote": ["--jobs", "3000"],
        }
    return {
        "submit": ["--submit-only"],
        "batch": ["--duration", "5", "--concurrency", "2"],
        "read": ["100000", "1000"],
        "watch": [],
        "remote": ["--jobs", "20000"],
    }


def load_case(results: dict[str, Any], prefix: str) -> dict[str, Any]:
    return next(case for case in results["load"] if case["case"].startswith(prefix))


def batch_case(results: dict[str, Any], store: str) -> dict[str, Any] | None:
    return next((case for case in results["cases"] if case["case"].endswith(store)), None)


Row = tuple[str, float | None, str, Callable[[float], bool]]


def at_least(aim: float) -> Callable[[float], bool]:
    return lambda value: value >= aim


def at_most(aim: float) -> Callable[[float], bool]:
    return lambda value: value <= aim


def rows(results: dict[str, Any]) -> list[Row]:
    """(figure, measured, target as said, whether a value meets it)."""
    submit, batch, read, watch = (results[k] for k in ("submit", "batch", "read", "watch"))
    table: list[Row] = [
        (
            "SubmitJob, memory, submit path (x echo)",
            load_case(submit, "(b0)")["ratio_to_echo"],
            ">= 0.8",
            at_least(0.8),
        ),
        (
            "SubmitJob, SQLite FULL, submit path (x echo)",
            load_case(submit, "(c0)")["ratio_to_echo"],
            ">= 0.7",
            at_least(0.7),
        ),
    ]
    echo = submit["echo_calls_per_s"]
    for prefix, name in (("(b)", "memory"), ("(c)", "SQLite FULL")):
        finished = load_case(submit, prefix)["jobs_finished_per_s"]
        table.append(
            (
                f"end to end, in-process handlers, {name} (x echo)",
                finished / echo if finished else None,
                ">= 0.5",
                at_least(0.5),
            )
        )
    remote = results["remote"]
    table.append(
        (
            f"end to end, {remote['settings']['workers']} remote worker processes, SQLite FULL (x echo)",
            remote["ratio_to_echo"],
            ">= 0.5",
            at_least(0.5),
        )
    )
    for store in ("memory", "SQLite FULL", "PostgreSQL"):
        case = batch_case(batch, store)
        if case is not None:
            table.append(
                (
                    f"BatchSubmitJobs, {store} (jobs/s x echo)",
                    case["jobs_per_s_over_echo"],
                    ">= 10",
                    at_least(10),
                )
            )
            table.append(
                (f"BatchSubmitJobs, {store} (jobs/s)", case["jobs_per_s"], ">= 40,000", at_least(40_000))
            )
    latency = {case["case"]: case for case in submit["latency"]}
    for case, figure in latency.items():
        table.append(
            (f"submit -> RUNNING p99, client, {case[4:]} (ms)", figure["client_p99_ms"], "<= 5", at_most(5))
        )
    for call in ("GetJob queued", "ListJobs queued", "GetQueueStats"):
        table.append(
            (
                f"{call} p99 at {read['queued']:,} queued (ms)",
                read["figures"][call]["p99_ms"],
                "<= 5",
                at_most(5),
            )
        )
    burst, idle, progress = watch["burst"], watch["idle"], watch["progress"]
    errors = sum(n for code, n in burst["outcomes"].items() if code != "snapshot")
    table += [
        (f"{burst['calls']:,} WatchJob calls at once: errors", float(errors), "0", at_most(0)),
        (
            f"{idle['streams']:,} idle watch streams (MiB)",
            idle["rss_after_mib"] - idle["rss_before_mib"],
            "<= 300 for 10,000",
            at_most(300 * idle["streams"] / 10_000),
        ),
        (
            f"progress of {progress['jobs']:,} jobs at 10 Hz: delivery p99 (ms)",
            progress["delivery_p99_ms"],
            "<= 100",
            at_most(100),
        ),
        (
            "server CPU per progress message, all included (µs)",
            progress["server_cpu_us_per_progress"],
            "<= 50",
            at_most(50),
        ),
    ]
    return table


def print_report(results: dict[str, Any]) -> None:
    echo, batch_echo = results["submit"]["echo_calls_per_s"], results["batch"]["echo_calls_per_s"]
    print(
        f"\nJobwire benchmarks, {results['date']}, {results['machine']}; "
        f"echo {echo:,.0f} calls/s (in the batch run: {batch_echo:,.0f})"
    )
    print(f"{'figure':<62} {'measured':>10} {'target':>18}  met")
    for name, value, target, meets in rows(results):
        shown = "-" if value is None else f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
        met = "-" if value is None else ("yes" if meets(value) else "no")
        print(f"{name:<62} {shown:>10} {target:>18}  {met}")
    print("\nnot measured by this set yet: " + "; ".join(NOT_MEASURED))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute and a half")
    parser.add_argument("--json", action="store_true", help="also print every result as JSON")
    args = parser.parse_args(argv)
    chosen = sizes(args.quick)
    began = time.monotonic()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "quick": args.quick,
    }
    print("submit_bench ...", file=sys.stderr)
    results["submit"] = asyncio.run(submit_bench.run(submit_bench.parse_args(chosen["submit"])))
    print("batch_bench ...", file=sys.stderr)
    results["batch"] = asyncio.run(batch_bench.run(batch_bench.parse_args(chosen["batch"])))
    print("read_bench ...", file=sys.stderr)
    queued, calls = (int(value) for value in chosen["read"])
    results["read"] = read_bench.run(queued, calls)
    print("watch_bench ...", file=sys.stderr)
    results["watch"] = asyncio.run(watch_bench.run(watch_bench.parse_args(chosen["watch"])))
    print("remote_bench ...", file=sys.stderr)
    results["remote"] = asyncio.run(remote_bench.run(remote_bench.parse_args(chosen["remote"])))
    results["seconds"] = time.monotonic() - began
    print_report(results)
    print(f"({results['seconds']:.0f} s)")
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
