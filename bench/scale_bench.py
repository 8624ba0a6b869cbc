"""A deep queue: server memory per queued job, and how long a restart takes to SERVING.

Run: ``.venv/bin/python bench/scale_bench.py [--queued 1000000] [--json]``

A SQLite store is filled straight through the store API (``--queued`` jobs of a type no worker serves,
so they stay QUEUED in the run order). A server process is started on an empty store and on the full
one; for each: the seconds from spawning the process to its port answering health (NOT_SERVING while it
recovers the queue), to SERVING, and its resident memory once SERVING. Memory per queued job is the
difference divided by the jobs. Targets (issue 10): at most 300 bytes per queued job beyond the
stored row, restart to SERVING at most 10 s at 1,000,000 queued.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from read_bench import fill  # noqa: E402
from submit_bench import jobwire_server  # noqa: E402


def start_and_time(store: str, port_file: Path) -> dict[str, Any]:
    """Start a server on ``store``; when its port answers health, when it is SERVING, its memory."""
    server = jobwire_server(store, 8, "--port", "0")
    began = time.perf_counter()
    server.start(timeout=600)  # returns once the server logs "jobwire listening": SERVING
    serving = time.perf_counter() - began
    try:
        with grpc.insecure_channel(server.target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        return {"serving_s": serving, "rss_mib": server.rss_mib()}
    finally:
        server.stop()


def run(queued: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jobwire-scale-") as folder:
        empty_path, full_path = Path(folder) / "empty.db", Path(folder) / "full.db"
        began = time.perf_counter()
        asyncio.run(fill(str(full_path), queued, 0))
        filled = time.perf_counter() - began
        asyncio.run(fill(str(empty_path), 0, 0))
        empty = start_and_time(f"sqlite:///{empty_path}", Path(folder) / "empty.port")
        full = start_and_time(f"sqlite:///{full_path}", Path(folder) / "full.port")
        size = sum(os.path.getsize(p) for p in Path(folder).glob("full.db*") if p.is_file())
    per_job = (full["rss_mib"] - empty["rss_mib"]) * 1024 * 1024 / queued
    return {
        "queued": queued,
        "fill_s": filled,
        "empty": empty,
        "full": full,
        "bytes_per_queued_job": per_job,
        "sqlite_file_mib": size / 1024 / 1024,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queued", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = run(args.queued)
    full, empty = results["full"], results["empty"]
    print(
        f"{args.queued:,} queued jobs (filled in {results['fill_s']:.0f} s; "
        f"SQLite file {results['sqlite_file_mib']:.0f} MiB)"
    )
    print(f"{'figure':<46} {'measured':>12} {'target':>10}")
    print(f"{'restart to SERVING':<46} {full['serving_s']:>10.1f} s {'<= 10 s':>10}")
    print(f"{'  an empty store, for comparison':<46} {empty['serving_s']:>10.1f} s")
    print(f"{'server memory per queued job':<46} {results['bytes_per_queued_job']:>10.0f} B {'<= 300 B':>10}")
    print(f"{'  resident memory, full / empty (MiB)':<46} {full['rss_mib']:>6.0f} / {empty['rss_mib']:.0f}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
