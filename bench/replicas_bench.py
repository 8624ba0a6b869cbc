"""Jobwire on PostgreSQL with 1, 2 and 3 replicas, against the bare gRPC echo server in the same run.

Run: ``.venv/bin/python bench/replicas_bench.py [--duration 5] [--json]`` (PostgreSQL on 127.0.0.1:5432,
or JOBWIRE_TEST_POSTGRES).

For each replica count, on a fresh schema, every server in its own process, one client channel spreading
calls over the replicas (round robin), 32 calls in flight:

- **submit**: SubmitJob calls/s of jobs that stay queued (the submit path alone);
- **end to end**: demo.echo jobs submitted, dispatched, run by the replicas' in-process handlers and
  recorded SUCCEEDED: jobs finished per second;
- **submit -> start**: one job at a time on an idle cluster, submitted to a replica that is not the
  dispatcher when there is one (the path across replicas);
- **database**: commits per finished job and PostgreSQL CPU per job (all its processes, from /proc),
  during the end-to-end window;
- **dispatcher CPU per dispatch**: with 3 replicas, a dispatcher that serves no calls and runs no jobs
  (clients go to the two others, which run the jobs): its CPU divided by the jobs it dispatched;
- **failover**: the dispatcher killed with SIGKILL, then one job submitted to a survivor: kill -> start.

On a 2-core machine more replicas cannot add CPU: the replicas, the client and PostgreSQL share the same
two cores. The last figures say where the ceiling would be on a bigger machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from figures import percentile  # noqa: E402
from submit_bench import (  # noqa: E402
    ECHO_METHOD,
    ChildServer,
    check_echo,
    drive_load,
    echo_server,
    jobwire_server,
    submit_payload,
)

from jobwire.client.channels import open_aio_channel  # noqa: E402
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc  # noqa: E402
from support.postgres import POSTGRES_DSN, drop_schema, new_schema, store_url  # noqa: E402

S = job_service_pb2
J = job_pb2
SUBMIT_METHOD = "/jobwire.v1.JobService/SubmitJob"
TERMINAL = (J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED, J.JOB_STATE_CANCELLED)


def postgres_cpu_seconds() -> float:
    """CPU seconds used so far by every PostgreSQL process of this machine (Linux /proc)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name.startswith("postgres"):
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def commits() -> int:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        value: int = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        return value
    finally:
        await conn.close()


class Cluster:
    """``count`` replicas on a fresh schema; the first one started becomes the dispatcher."""

    def __init__(self, count: int, *extra: str, dispatcher_extra: tuple[str, ...] = ()) -> None:
        self.schema = new_schema()
        url = store_url(self.schema)
        self.servers = [
            jobwire_server(url, 8, *extra, *(dispatcher_extra if i == 0 else ())) for i in range(count)
        ]

    async def __aenter__(self) -> Cluster:
        for server in self.servers:
            await asyncio.to_thread(server.start)
            await asyncio.sleep(0.3)  # the first to start takes the dispatcher lock
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self.servers:
            if server.process is not None and server.process.poll() is None:
                server.process.kill()
                server.process.wait(10)
        await drop_schema(self.schema)

    def target(self, servers: list[ChildServer] | None = None) -> str:
        return ",".join(s.target for s in (servers or self.servers))

    def cpu(self, servers: list[ChildServer] | None = None) -> float:
        return sum(s.cpu_seconds() or 0.0 for s in (servers or self.servers))


class Targets:
    """What ``drive_load`` needs of a server, for a whole cluster: one target naming every replica
    (the client's round robin spreads the calls), and their CPU summed."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.target = cluster.target()

    def cpu_seconds(self) -> float | None:
        return self.cluster.cpu()


async def finished_jobs(target: str) -> tuple[int, int]:
    async with open_aio_channel(target) as channel:
        stats = await job_service_pb2_grpc.JobServiceStub(channel).GetQueueStats(
            S.GetQueueStatsRequest(), timeout=30
        )
    queued = sum(c.count for c in stats.state_counts if c.state == J.JOB_STATE_QUEUED)
    return queued, sum(c.count for c in stats.state_counts if c.state in TERMINAL)


async def end_to_end(
    cluster: Cluster, args: argparse.Namespace, servers: list[ChildServer] | None = None
) -> dict[str, Any]:
    """``args.jobs`` demo.echo jobs submitted as fast as 32 calls in flight allow, each dispatched, run
    in-process and recorded SUCCEEDED: jobs/s from the first submit to the last success, and what each
    job cost (every cost of every job counted once)."""
    target = cluster.target(servers)
    payload = submit_payload()
    commits_before, pg_before, cpu_before = await commits(), postgres_cpu_seconds(), cluster.cpu()
    dispatcher_before = cluster.servers[0].cpu_seconds() or 0.0
    began = time.perf_counter()
    submitted = 0
    async with open_aio_channel(target) as channel:
        call = channel.unary_unary(SUBMIT_METHOD)

        async def submitter() -> None:
            nonlocal submitted
            while submitted < args.jobs:
                submitted += 1
                await call(payload, timeout=60)

        await asyncio.gather(*(submitter() for _ in range(args.concurrency)))
        submitted_in = time.perf_counter() - began
        while (await finished_jobs(target))[1] < args.jobs:  # noqa: ASYNC110  (polling another process)
            await asyncio.sleep(0.05)
    seconds = time.perf_counter() - began
    commits_after, pg_after, cpu_after = await commits(), postgres_cpu_seconds(), cluster.cpu()
    dispatcher_after = cluster.servers[0].cpu_seconds() or 0.0
    jobs = args.jobs
    return {
        "submits_per_s": jobs / submitted_in,
        "jobs_per_s": jobs / seconds,
        "commits_per_job": (commits_after - commits_before) / jobs,
        "postgres_cpu_us_per_job": (pg_after - pg_before) / jobs * 1e6,
        "replicas_cpu_us_per_job": (cpu_after - cpu_before) / jobs * 1e6,
        "dispatcher_cpu_us_per_job": (dispatcher_after - dispatcher_before) / jobs * 1e6,
    }


async def submit_to_start(target: str, jobs: int) -> dict[str, float]:
    client, server = [], []
    async with open_aio_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        request = S.SubmitJobRequest(type="demo.sleep")
        request.params.update({"seconds": 0, "steps": 1})
        for index in range(jobs + 5):
            sent = time.perf_counter()
            job = (await stub.SubmitJob(request, timeout=30)).job
            started = None
            last = job
            async for update in stub.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=30):
                if started is None and update.job.state != J.JOB_STATE_QUEUED:
                    started = time.perf_counter()
                last = update.job
            if index >= 5 and started is not None:
                client.append(started - sent)
                server.append((last.start_time.ToNanoseconds() - last.create_time.ToNanoseconds()) / 1e9)
    return {
        "client_p50_ms": percentile(client, 50) * 1e3,
        "client_p99_ms": percentile(client, 99) * 1e3,
        "server_p50_ms": percentile(server, 50) * 1e3,
        "server_p99_ms": percentile(server, 99) * 1e3,
    }


async def failover(rounds: int) -> list[float]:
    """Kill the dispatcher, submit one job to a survivor: seconds from the kill to the job's start."""
    gaps = []
    for _ in range(rounds):
        async with Cluster(3) as cluster:
            dispatcher = cluster.servers[0]
            survivor = cluster.servers[1]
            assert dispatcher.process is not None
            killed_at = time.time()
            dispatcher.process.kill()
            async with open_aio_channel(survivor.target) as channel:
                stub = job_service_pb2_grpc.JobServiceStub(channel)
                request = S.SubmitJobRequest(type="demo.echo")
                job = (await stub.SubmitJob(request, timeout=30)).job
                async for update in stub.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=60):
                    last = update.job
                gaps.append(last.start_time.ToNanoseconds() / 1e9 - killed_at)
    return gaps


async def echo_rate(args: argparse.Namespace) -> float:
    server = echo_server()
    await asyncio.to_thread(server.start)
    try:
        payload = submit_payload()
        result = await drive_load(
            "echo",
            server,
            ECHO_METHOD,
            payload,
            check_echo(payload),
            args.concurrency,
            args.warmup,
            args.duration,
        )
        rate: float = result.calls_per_s
        return rate
    finally:
        await asyncio.to_thread(server.stop)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    echo_before = await echo_rate(args)
    rows: list[dict[str, Any]] = []
    for count in args.replicas:
        row: dict[str, Any] = {"replicas": count}
        # Submit path alone: demo.sleep jobs of an hour with room for one, so the rest stay queued.
        async with Cluster(count, "--type-limits", "demo.sleep=1") as cluster:
            parked = S.SubmitJobRequest(type="demo.sleep")
            parked.params.update({"seconds": 3600, "steps": 1})
            load = await drive_load(
                "submit",
                Targets(cluster),  # type: ignore[arg-type]  # drive_load reads .target and .cpu_seconds()
                SUBMIT_METHOD,
                parked.SerializeToString(),
                lambda b: None,
                args.concurrency,
                args.warmup,
                args.duration,
            )
            row["submit_per_s"] = load.calls_per_s
            row["submit_p99_ms"] = load.p99_ms
            row["submit_errors"] = load.errors
        async with Cluster(count) as cluster:
            row.update(await end_to_end(cluster, args))
        async with Cluster(count) as cluster:
            others = cluster.servers[1:] or cluster.servers
            row.update(await submit_to_start(cluster.target(others), args.latency_jobs))
        rows.append(row)
    dispatch: dict[str, Any] = {}
    if 3 in args.replicas:
        async with Cluster(3, dispatcher_extra=("--demo-handlers", "false")) as cluster:
            dispatch = await end_to_end(cluster, args, cluster.servers[1:])
    gaps = await failover(args.failovers)
    echo_after = await echo_rate(args)
    echo = statistics.fmean([echo_before, echo_after])
    for row in rows:
        row["submit_x_echo"] = row["submit_per_s"] / echo
        row["jobs_x_echo"] = (row["jobs_per_s"] or 0.0) / echo
    return {
        "echo_calls_per_s": echo,
        "echo_drift": abs(echo_before - echo_after) / echo,
        "rows": rows,
        "dedicated_dispatcher": dispatch,
        "failover_s": gaps,
        "cpus": os.cpu_count(),
    }


def print_report(results: dict[str, Any]) -> None:
    echo = results["echo_calls_per_s"]
    print(
        f"bare grpc.aio echo: {echo:.0f} calls/s (mean of a run before and after; drift "
        f"{100 * results['echo_drift']:.0f}%); {results['cpus']} CPUs shared by client, replicas and "
        "PostgreSQL"
    )
    header = (
        f"{'replicas':>8}{'submit/s':>10}{'x echo':>8}{'jobs/s':>9}{'x echo':>8}{'start p50':>11}{'p99':>7}"
        f"{'commits/job':>13}{'PG CPU µs/job':>15}{'replicas CPU µs/job':>21}"
    )
    print(header)
    print("-" * len(header))
    for row in results["rows"]:
        print(
            f"{row['replicas']:>8}{row['submit_per_s']:>10.0f}{row['submit_x_echo']:>8.2f}"
            f"{row['jobs_per_s'] or 0:>9.0f}{row['jobs_x_echo']:>8.2f}{row['client_p50_ms']:>11.2f}"
            f"{row['client_p99_ms']:>7.2f}{row['commits_per_job']:>13.2f}{row['postgres_cpu_us_per_job']:>15.0f}"
            f"{row['replicas_cpu_us_per_job']:>21.0f}"
        )
    print(
        "submit/s: SubmitJob of jobs that stay queued; jobs/s: demo.echo jobs submitted, run in-process "
        "and recorded SUCCEEDED;\nstart: client-seen ms from SubmitJob to RUNNING on an idle cluster "
        "(submitted to "
        "a replica that is not the dispatcher when there is one)."
    )
    dispatch = results["dedicated_dispatcher"]
    if dispatch:
        print(
            "dispatcher serving no calls and running no jobs (3 replicas): "
            f"{dispatch['dispatcher_cpu_us_per_job']:.0f} "
            f"µs of its CPU per job dispatched, at {dispatch['jobs_per_s'] or 0:.0f} jobs/s"
        )
    gaps = results["failover_s"]
    if gaps:
        print(
            "failover, dispatcher killed with SIGKILL -> next job started: "
            + ", ".join(f"{g:.2f} s" for g in gaps)
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=3000, help="jobs in the end-to-end case")
    parser.add_argument("--failovers", type=int, default=3)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print_report(results)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
