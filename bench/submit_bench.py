"""SubmitJob throughput against the bare gRPC ceiling, and submit-to-start latency, in one run.

Run: ``.venv/bin/python bench/submit_bench.py [--concurrency 32] [--duration 5] [--warmup 1] [--json]``

Cases, each against a server in its OWN process (the client runs in this one):

  (a) a bare ``grpc.aio`` unary echo server (this script with ``--serve-echo``): the ceiling R;
  (b) Jobwire SubmitJob, memory store;
  (c) Jobwire SubmitJob, SQLite store in a temp file (default synchronous=FULL, group commit);
  (a') the echo again, last: ratios use the mean of (a) and (a'), which also shows the machine's drift;
  (b0) with ``--submit-only``: SubmitJob on memory with jobs that stay QUEUED (the submit path alone);
  (d) submit-to-start latency on an idle server: one demo.sleep job at a time, followed with WatchJob.

The load cases send the same pre-serialized SubmitJobRequest bytes (a small ``demo.echo`` job) with N
calls in flight on one channel, so the client does identical work in (a), (b) and (c) and only the
server differs. Jobwire also dispatches and runs every submitted job in the same server process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from figures import fmt, percentile, without_nan

from jobwire.client.channels import open_aio_channel
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

ECHO_METHOD = "/bench.Echo/Echo"
SUBMIT_METHOD = "/jobwire.v1.JobService/SubmitJob"
START_TIMEOUT = 30.0
J = job_pb2
S = job_service_pb2
T = TypeVar("T")


# -- servers in child processes -----------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_mib(pid: int) -> float:
    """A process's resident memory (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class ChildServer:
    """A server in a child process; its port is read from its "... listening" JSON log line on stderr."""

    def __init__(self, name: str, args: Sequence[str], ready_message: str) -> None:
        self.name = name
        self.args = list(args)
        self.ready_message = ready_message
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.log_lines: list[str] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Spawn (never fork: grpc objects exist here) and wait for the listening line."""
        self.process = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        ready = threading.Event()
        marker = f'"{self.ready_message}"'

        def read_logs() -> None:  # keeps draining stderr so the child never blocks on a full pipe
            assert self.process is not None and self.process.stderr is not None
            for line in self.process.stderr:
                self.log_lines.append(line)
                if not ready.is_set() and marker in line:
                    self.port = int(json.loads(line)["port"])
                    ready.set()

        threading.Thread(target=read_logs, name=f"{self.name}-logs", daemon=True).start()
        if not ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n" + "".join(self.log_lines[-30:]))
        return self.target

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the child has used so far (Linux /proc), or None if unknown."""
        if self.process is None:
            return None
        try:
            return process_cpu_seconds(self.process.pid)
        except OSError:
            return None

    def rss_mib(self) -> float:
        assert self.process is not None
        return process_rss_mib(self.process.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (graceful drain), then SIGKILL if it takes too long."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def echo_server() -> ChildServer:
    script = str(Path(__file__).resolve())
    return ChildServer("echo", [sys.executable, script, "--serve-echo"], "echo listening")


def jobwire_server(store: str, max_running: int, *extra: str) -> ChildServer:
    args = [
        sys.executable,
        "-m",
        "jobwire.server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--store",
        store,
        "--max-running",
        str(max_running),
        "--log-format",
        "json",
        "--drain-grace",
        "1",
        *extra,
    ]
    return ChildServer(f"jobwire ({store})", args, "jobwire listening")


async def serve_echo() -> None:
    """The bare echo server: raw bytes in, the same bytes out, with Jobwire's server options."""
    from jobwire.server.app import SERVER_OPTIONS

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server(options=SERVER_OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo)},  # no (de)serializers: bytes
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        raise OSError("echo server could not bind 127.0.0.1:0")
    await server.start()
    print(json.dumps({"message": "echo listening", "port": port}), file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


# -- measurements --------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One throughput case."""

    case: str
    calls: int
    errors: int
    seconds: float
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_call: float | None
    client_cpu_us_per_call: float
    ratio_to_echo: float | None = None
    jobs_finished_per_s: float | None = None  # Jobwire: jobs that reached a terminal state in the window
    backlog_at_end: int | None = None  # Jobwire: jobs QUEUED at the end of the window
    error_codes: dict[str, int] = field(default_factory=dict)


@dataclass
class LatencyResult:
    """Submit-to-start latency on an idle server."""

    case: str
    jobs: int
    client_p50_ms: float
    client_p90_ms: float
    client_p99_ms: float
    server_p50_ms: float
    server_p99_ms: float
    first_seen_running: int  # how many watches saw RUNNING itself (others saw the job already finished)


def submit_payload() -> bytes:
    """A small demo.echo SubmitJobRequest, serialized once."""
    request = S.SubmitJobRequest(type="demo.echo", priority=5, labels={"bench": "submit"})
    request.params.update({"n": 1, "note": "bench"})
    return request.SerializeToString()


def parked_payload() -> bytes:
    """A demo.sleep job of an hour: with ``--type-limits demo.sleep=1`` it waits in the queue."""
    request = S.SubmitJobRequest(type="demo.sleep", priority=5, labels={"bench": "submit"})
    request.params.update({"seconds": 3600, "steps": 1})
    return request.SerializeToString()


async def drive_load(
    case: str,
    server: ChildServer,
    method: str,
    payload: bytes,
    check: Callable[[bytes], None],
    concurrency: int,
    warmup: float,
    duration: float,
    probe: Callable[[grpc.aio.Channel], Awaitable[tuple[int, int]]] | None = None,
    metadata: tuple[tuple[str, str], ...] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> LoadResult:
    """``concurrency`` calls in flight for ``warmup`` + ``duration`` seconds; only the latter is measured.

    ``probe`` (Jobwire only) returns (queued, finished) job counts; it is called at both ends of the window.
    ``metadata`` goes with every call (a bearer token); ``credentials`` make the channel TLS.
    """
    # round robin when the target names several servers
    async with open_aio_channel(server.target, credentials) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out: no client-side (de)serialization
        check(await call(payload, timeout=10, metadata=metadata))
        begin = time.perf_counter()
        window_start, window_end = begin + warmup, begin + warmup + duration
        latencies: list[float] = []
        errors: dict[str, int] = {}
        completed = 0
        server_cpu: list[float | None] = []  # the server's CPU seconds at the window's start and end
        client_cpu: list[float] = []
        counts: list[tuple[int, int]] = []

        async def sample() -> None:
            for moment in (window_start, window_end):
                await asyncio.sleep(max(0.0, moment - time.perf_counter()))
                server_cpu.append(server.cpu_seconds())
                client_cpu.append(time.process_time())
                if probe is not None:
                    counts.append(await probe(channel))

        async def worker() -> None:
            nonlocal completed
            while (sent := time.perf_counter()) < window_end:
                try:
                    await call(payload, timeout=30, metadata=metadata)
                except grpc.aio.AioRpcError as error:
                    name = error.code().name
                    errors[name] = errors.get(name, 0) + 1
                    continue
                done = time.perf_counter()
                if window_start <= done <= window_end:
                    completed += 1
                    if sent >= window_start:
                        latencies.append(done - sent)

        await asyncio.gather(sample(), *(worker() for _ in range(concurrency)))

    server_start, server_end = server_cpu
    server_us = None
    if server_start is not None and server_end is not None and completed:
        server_us = (server_end - server_start) / completed * 1e6
    client_us = (client_cpu[1] - client_cpu[0]) / completed * 1e6 if completed else math.nan
    return LoadResult(
        case=case,
        calls=completed,
        errors=sum(errors.values()),
        seconds=duration,
        calls_per_s=completed / duration,
        p50_ms=percentile(latencies, 50) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        server_cpu_us_per_call=server_us,
        client_cpu_us_per_call=client_us,
        jobs_finished_per_s=(counts[1][1] - counts[0][1]) / duration if counts else None,
        backlog_at_end=counts[1][0] if counts else None,
        error_codes=errors,
    )


def check_echo(payload: bytes) -> Callable[[bytes], None]:
    def check(response: bytes) -> None:
        if response != payload:
            raise RuntimeError("the echo server answered something else than the request")

    return check


def check_submit_type(job_type: str) -> Callable[[bytes], None]:
    def check(response: bytes) -> None:
        job = S.SubmitJobResponse.FromString(response).job
        if not job.id or job.type != job_type or job.state != J.JOB_STATE_QUEUED:
            raise RuntimeError(f"unexpected SubmitJob response: {job}")

    return check


check_submit = check_submit_type("demo.echo")


TERMINAL = (J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED, J.JOB_STATE_CANCELLED)


async def job_counts(channel: grpc.aio.Channel) -> tuple[int, int]:
    """(jobs QUEUED, jobs finished) on a Jobwire server, from GetQueueStats."""
    stats = await job_service_pb2_grpc.JobServiceStub(channel).GetQueueStats(
        S.GetQueueStatsRequest(), timeout=30
    )
    queued = sum(c.count for c in stats.state_counts if c.state == J.JOB_STATE_QUEUED)
    return queued, sum(c.count for c in stats.state_counts if c.state in TERMINAL)


async def submit_to_start(case: str, target: str, jobs: int, warmup_jobs: int = 5) -> LatencyResult:
    """One demo.sleep (seconds 0) job at a time: SubmitJob, then WatchJob until it ends.

    Client figure: from sending SubmitJob to receiving the job in a started state (RUNNING, or already
    finished if the snapshot arrives after the run). Server figure: start_time - create_time.
    """
    client: list[float] = []
    server: list[float] = []
    saw_running = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        request = S.SubmitJobRequest(type="demo.sleep")
        request.params.update({"seconds": 0, "steps": 1})
        for index in range(warmup_jobs + jobs):
            sent = time.perf_counter()
            job = (await stub.SubmitJob(request, timeout=30)).job
            started_at: float | None = None
            last = job
            async for update in stub.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=30):
                if started_at is None and update.job.state != J.JOB_STATE_QUEUED:
                    started_at = time.perf_counter()
                    saw_running += index >= warmup_jobs and update.job.state == J.JOB_STATE_RUNNING
                last = update.job
            if last.state != J.JOB_STATE_SUCCEEDED or started_at is None:
                raise RuntimeError(f"job {job.id} ended {J.JobState.Name(last.state)}")
            if index >= warmup_jobs:
                client.append(started_at - sent)
                server.append((last.start_time.ToNanoseconds() - last.create_time.ToNanoseconds()) / 1e9)
    return LatencyResult(
        case=case,
        jobs=jobs,
        client_p50_ms=percentile(client, 50) * 1e3,
        client_p90_ms=percentile(client, 90) * 1e3,
        client_p99_ms=percentile(client, 99) * 1e3,
        server_p50_ms=percentile(server, 50) * 1e3,
        server_p99_ms=percentile(server, 99) * 1e3,
        first_seen_running=saw_running,
    )


async def with_server(server: ChildServer, body: Callable[[ChildServer], Awaitable[T]]) -> T:
    """Start ``server``, run ``body`` against it, always stop it."""
    await asyncio.to_thread(server.start)
    try:
        return await body(server)
    finally:
        await asyncio.to_thread(server.stop)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """All cases in sequence, one server process at a time."""
    payload = submit_payload()

    async def load_case(
        case: str, server: ChildServer, method: str, check: Callable[[bytes], None], body: bytes = payload
    ) -> LoadResult:
        async def measure(server: ChildServer) -> LoadResult:
            probe = job_counts if method == SUBMIT_METHOD else None
            return await drive_load(
                case, server, method, body, check, args.concurrency, args.warmup, args.duration, probe
            )

        return await with_server(server, measure)

    async def latency_case(case: str, server: ChildServer) -> LatencyResult:
        return await with_server(server, lambda s: submit_to_start(case, s.target, args.latency_jobs))

    with tempfile.TemporaryDirectory(prefix="jobwire-bench-") as folder:
        sqlite_load = f"sqlite:///{Path(folder) / 'load.db'}"
        sqlite_idle = f"sqlite:///{Path(folder) / 'latency.db'}"
        print(
            f"running: {args.concurrency} calls in flight, {args.warmup:g} s warm-up + "
            f"{args.duration:g} s per load case ...",
            file=sys.stderr,
        )
        load = [
            await load_case("(a) bare grpc.aio echo", echo_server(), ECHO_METHOD, check_echo(payload)),
            await load_case(
                "(b) SubmitJob, memory",
                jobwire_server("memory:", args.max_running),
                SUBMIT_METHOD,
                check_submit,
            ),
            await load_case(
                "(c) SubmitJob, SQLite FULL",
                jobwire_server(sqlite_load, args.max_running),
                SUBMIT_METHOD,
                check_submit,
            ),
        ]
        if args.submit_only:
            # demo.sleep limited to one running job: every other submitted job stays QUEUED, never runs.
            parked = jobwire_server("memory:", args.max_running, "--type-limits", "demo.sleep=1")
            load.append(
                await load_case(
                    "(b0) memory, never run",
                    parked,
                    SUBMIT_METHOD,
                    check_submit_type("demo.sleep"),
                    parked_payload(),
                )
            )
            parked_sqlite = jobwire_server(
                f"sqlite:///{Path(folder) / 'parked.db'}", args.max_running, "--type-limits", "demo.sleep=1"
            )
            load.append(
                await load_case(
                    "(c0) SQLite, never run",
                    parked_sqlite,
                    SUBMIT_METHOD,
                    check_submit_type("demo.sleep"),
                    parked_payload(),
                )
            )
        # The echo again, last: the machine's speed drifts, so the ratios use the mean of both echo runs.
        load.append(await load_case("(a') echo again", echo_server(), ECHO_METHOD, check_echo(payload)))
        latency = [
            await latency_case("(d) idle, memory", jobwire_server("memory:", args.max_running)),
            await latency_case("(d) idle, SQLite FULL", jobwire_server(sqlite_idle, args.max_running)),
        ]

    echo_rates = [r.calls_per_s for r in load if r.case.startswith("(a")]
    echo_rate = statistics.fmean(echo_rates)
    for result in load:
        if not result.case.startswith("(a"):
            result.ratio_to_echo = result.calls_per_s / echo_rate if echo_rate else None
    return {
        "echo_calls_per_s": echo_rate,
        "echo_drift": (max(echo_rates) - min(echo_rates)) / echo_rate if echo_rate else None,
        "settings": {
            "concurrency": args.concurrency,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "max_running": args.max_running,
            "latency_jobs": args.latency_jobs,
            "payload_bytes": len(payload),
            "cpus": os.cpu_count(),
            "event_loop": event_loop_name(),
            "python": sys.version.split()[0],
            "grpcio": grpc.__version__,
        },
        "load": [asdict(r) for r in load],
        "latency": [asdict(r) for r in latency],
    }


# -- output ----------------------------------------------------------------------------------------------


def print_tables(results: dict[str, Any]) -> None:
    settings = results["settings"]
    print(
        f"\nSubmit throughput: {settings['concurrency']} calls in flight, one grpc.aio client channel, "
        f"{settings['duration_s']:g} s measured after {settings['warmup_s']:g} s warm-up; "
        f"server in its own process; {settings['cpus']} CPUs; client loop {settings['event_loop']}; "
        f"request {settings['payload_bytes']} bytes"
    )
    header = (
        f"{'case':<28}{'calls/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'x echo':>8}"
        f"{'srv CPU µs/call':>17}{'cli CPU µs/call':>17}{'errors':>8}{'jobs done/s':>13}{'backlog':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results["load"]:
        print(
            f"{r['case']:<28}{r['calls_per_s']:>9.0f}{fmt(r['p50_ms'], '.2f'):>9}"
            f"{fmt(r['p99_ms'], '.2f'):>9}{fmt(r['ratio_to_echo'], '.2f'):>8}"
            f"{fmt(r['server_cpu_us_per_call'], '.0f'):>17}"
            f"{fmt(r['client_cpu_us_per_call'], '.0f'):>17}{r['errors']:>8}"
            f"{fmt(r['jobs_finished_per_s'], '.0f'):>13}"
            f"{fmt(r['backlog_at_end'], 'd'):>9}"
        )
        if r["error_codes"]:
            print(f"{'':<28}errors: {r['error_codes']}")
    print(
        f"x echo = calls/s / {results['echo_calls_per_s']:.0f}, the mean of (a) and (a'), which differ by "
        f"{100 * (results['echo_drift'] or 0):.0f}% (drift of the machine's speed during the run)."
    )
    print(
        f"(b) and (c): every submitted job is a demo.echo job that the same server process also dispatches "
        f"and runs (--max-running {settings['max_running']}).\n'jobs done/s' = jobs that reached a "
        "terminal state during the window; 'backlog' = jobs QUEUED at its end (both from GetQueueStats)."
    )
    if any(r["case"].startswith("(b0)") for r in results["load"]):
        print(
            "(b0): demo.sleep jobs with --type-limits demo.sleep=1, so they stay QUEUED: "
            "the submit path alone."
        )

    print(
        f"\nSubmit-to-start latency on an idle server: {settings['latency_jobs']} demo.sleep jobs "
        "(seconds 0), one at a time, each followed with WatchJob"
    )
    header = (
        f"{'case':<24}{'client p50':>11}{'p90':>8}{'p99':>8}{'server p50':>12}{'p99':>8}{'saw RUNNING':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in results["latency"]:
        print(
            f"{r['case']:<24}{r['client_p50_ms']:>11.2f}{r['client_p90_ms']:>8.2f}{r['client_p99_ms']:>8.2f}"
            f"{r['server_p50_ms']:>12.2f}{r['server_p99_ms']:>8.2f}{r['first_seen_running']:>9}/{r['jobs']}"
        )
    print(
        "client = SubmitJob sent -> first WatchJob message showing the job started (ms): RUNNING, or "
        "already SUCCEEDED when the\nrun ended before the watch began ('saw RUNNING' counts the former); "
        "server = job.start_time - job.create_time (ms)."
    )


def event_loop_name() -> str:
    try:
        import uvloop  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return "asyncio (uvloop not installed)"
    return "uvloop"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--concurrency", type=int, default=32, help="calls in flight (default 32)")
    add("--duration", type=float, default=5.0, help="measured seconds per load case (default 5)")
    add("--warmup", type=float, default=1.0, help="warm-up seconds per load case (default 1)")
    add("--max-running", type=int, default=8, help="Jobwire --max-running (default 8)")
    add("--latency-jobs", type=int, default=200, help="jobs in the latency case (default 200)")
    add(
        "--submit-only",
        action="store_true",
        help="add case (b0): SubmitJob on memory with jobs that stay queued (submit path without dispatch)",
    )
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)  # the echo child process
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.latency_jobs < 1:
        parser.error("concurrency and latency-jobs must be >= 1, duration > 0, warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_echo:
        asyncio.run(serve_echo())
        return 0
    if event_loop_name() == "uvloop":  # the client only: the servers run plain asyncio, like Jobwire's
        import uvloop

        uvloop.install()
    results = asyncio.run(run(args))
    print_tables(results)
    if args.json:
        print(json.dumps(without_nan(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
