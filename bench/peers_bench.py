"""Jobwire side by side with the Python job queues a team would pick instead, in one run on one machine.

Run: ``.venv/bin/python bench/peers_bench.py [--quick] [--json] [--only jobwire,celery,rq,arq,procrastinate]``
after ``.venv/bin/python -m pip install -e '.[dev,bench]'`` (the peers are the ``bench`` extra, never runtime
dependencies), with Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres,
database test) running. ``--quick`` (3,000 jobs, 20 latency jobs, 1 s enqueue windows) takes about two and
a half minutes and shows the shape; the default sizes give the figures to quote (about fifteen minutes,
mostly RQ's forking worker and the idle latencies).

Systems, each measured in turn in the same run, with the same job count and ``--workers`` (2) worker
processes: ``jobwire`` (SQLite store, synchronous=FULL: durable, as bench/remote_bench.py), ``jobwire-inproc``
(the same server running the jobs itself: no worker process), ``celery`` (Redis broker), ``rq`` (default
forking Worker), ``rq-simple`` (RQ's SimpleWorker), ``arq`` (Redis), ``procrastinate`` (PostgreSQL). One row
each of:

  enqueue/s       single-job enqueue rate from this one client process, no worker running: the library's
                  normal call; with ``--concurrency`` (64) calls in flight where it has an asyncio API (arq
                  ``enqueue_job``, procrastinate ``defer_async``, Jobwire SubmitJob), else a plain loop
                  (Celery ``delay``, RQ ``enqueue``). Every enqueued job is then counted in the broker.
  batch jobs/s    the library's own bulk call, 1,000 jobs a call (RQ ``enqueue_many``, procrastinate
                  ``batch_defer_async``, Celery ``group(...).apply_async()``, which still sends one message
                  per task, Jobwire BatchSubmitJobs); asyncio APIs with ``--batch-concurrency`` (4) calls
                  in flight, the others a plain loop; arq has no bulk call: "-".
  e2e jobs/s      ``--jobs`` no-op jobs (20,000; 3,000 with --quick) enqueued as fast as the library allows
                  (its bulk call, 1,000 jobs a call, one call at a time; arq: enqueue_job, ``--concurrency``
                  in flight) while the workers run them: the time from the first enqueue to the last job done.
  start p50/p99   enqueue-to-start latency on an idle system: ``--latency-jobs`` (200; 20 with --quick) jobs
                  one at a time after 5 warm-up jobs, each started before the next is sent, each after a
                  random pause of 0 to ``--latency-pause`` (0.5) s (the same pauses for every system), so
                  that jobs arrive at random points of a polling worker's cycle. Peers: the task pushes
                  ``time.time()`` to a Redis list as it starts and the client BLPOPs it (latency = that time
                  minus the client's ``time.time()`` before the enqueue call). Jobwire: SubmitJob then
                  WatchJob, until the client receives the job started: conservative, as it includes the
                  server-to-client stream hop (the job's own start_time minus the send time is in the notes).

The bare grpc.aio echo server's calls/s (bench/submit_bench.py: same payload and calls in flight as
Jobwire's SubmitJob) is measured at the start and at the end of the run and printed above the table.

Workers, started with each library's own CLI as subprocesses, each in its own process group, killed as a
group at the end, also on error (SIGTERM, then SIGKILL after 10 s):

  celery          ``celery -A peers_bench:celery_app worker --pool prefork --concurrency N`` (one main
                  process and N pool processes running the tasks);
  rq              ``rq worker`` x N: the default Worker, which forks a work horse per job; the horse imports
                  the task's module every time, so RQ's tasks live in a small module written at run time
                  (importing this file takes ~0.2 s, a cost no real tasks module would put on RQ);
  rq-simple       ``rq worker --worker-class rq.SimpleWorker`` x N: jobs run in the worker process;
  arq             ``arq peers_bench.ArqWorkerSettings`` x N (asyncio; max_jobs 10 each);
  procrastinate   ``procrastinate --app=peers_bench.proc_app worker`` x N (asyncio; concurrency 1 each);
  jobwire         ``jobwire worker --handlers support.worker_handlers --concurrency 32`` x N, running
                  ``remote.noop`` (bench/remote_bench.py's setup and its ``end_to_end``, imported).

Every peer runs with its documented defaults; no setting is changed (Celery: prefetch multiplier 4, early
acks, no result backend; RQ: results kept 500 s; arq: poll_delay 0.5 s and at most 100 job ids read per
poll, which bound both its idle start latency and its throughput on no-op jobs; procrastinate:
LISTEN/NOTIFY, concurrency 1, psycopg's default pool of 4 connections). The only setting given is where to
find the broker: Redis database 15, the ``peers_bench`` PostgreSQL database. e2e completion: the Redis peers'
no-op task INCRs a Redis counter (one more Redis call per job, a small cost to them) that the client reads
every 50 ms; procrastinate's no-op does nothing and the client counts its jobs table's ``succeeded`` rows
every 50 ms; Jobwire's finished jobs are counted with GetQueueStats every 50 ms (remote_bench).

Durability differs, and is part of what is compared: Jobwire writes every job to SQLite with
synchronous=FULL and procrastinate to PostgreSQL (fsync and synchronous_commit as the server reports them,
printed); the Redis peers keep jobs in Redis memory (its persistence settings are printed: here neither AOF
nor snapshots, so a crash loses the queue). Isolation: the Redis peers use only Redis database 15 (FLUSHDB
before and after each peer); procrastinate its own database ``peers_bench``, dropped and created again each
run and dropped at the end; Jobwire temporary SQLite files. Other work on the machine during the run skews
the figures: the CPU time that processes other than this run's (and Redis and PostgreSQL) used meanwhile is
printed, from /proc (approximate: it includes any of this run's processes that were never reaped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg  # type: ignore[import-not-found, unused-ignore]
import redis  # type: ignore[import-not-found, unused-ignore]
import redis.asyncio as aioredis  # type: ignore[import-not-found, unused-ignore]
from arq.connections import (  # type: ignore[import-not-found, unused-ignore]
    ArqRedis,
    RedisSettings,
    create_pool,
)
from celery import Celery, group  # type: ignore[import-not-found, import-untyped, unused-ignore]
from figures import fmt, percentile, without_nan  # bench/, on the path of this script and its workers
from procrastinate import App, PsycopgConnector  # type: ignore[import-not-found, unused-ignore]
from rq import Queue, Worker  # type: ignore[import-not-found, unused-ignore]

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent / "tests"
REDIS_URL = os.environ.get("PEERS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_SERVER = os.environ.get("PEERS_BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
PG_ADMIN_URL = f"{PG_SERVER}/test"  # only to drop and create the bench's own database
PG_DATABASE = "peers_bench"
PG_URL = f"{PG_SERVER}/{PG_DATABASE}"
DONE_KEY = "peers_bench:done"  # INCRed by the Redis peers' no-op task
STARTED_KEY = "peers_bench:started"  # the start times pushed by every peer's latency task
RQ_QUEUE = "peers_bench"
RQ_TASKS_MODULE = "peers_bench_rq_tasks"  # RQ's tasks: see RQ_TASKS_SOURCE
RQ_NOOP = f"{RQ_TASKS_MODULE}.noop"
BATCH = 1000
LATENCY_WARMUP = 5
NO_DRAIN_DELAY = ("--drain-delay", "0")  # Jobwire servers stop at once (no load balancer to wait for)
SYSTEMS = ("jobwire", "jobwire-inproc", "celery", "rq", "rq-simple", "arq", "procrastinate")

if __name__ == "__main__":
    # Run as the module ``peers_bench``, as the peers' workers import it, and before this copy makes any
    # app: the tasks and apps the client uses are then the very objects the workers know by name.
    sys.path.insert(0, str(BENCH_DIR))
    import peers_bench

    sys.exit(peers_bench.main())


# -- the peers' tasks: imported by their worker processes as module ``peers_bench`` -----------------------

_task_redis: tuple[int, redis.Redis] | None = None


def task_redis() -> redis.Redis:
    """One Redis client per process (made after any fork), for the tasks' counter and start times."""
    global _task_redis
    if _task_redis is None or _task_redis[0] != os.getpid():
        _task_redis = (os.getpid(), redis.Redis.from_url(REDIS_URL))
    return _task_redis[1]


celery_app = Celery("peers_bench", broker=REDIS_URL)


@celery_app.task(name="peers_bench.celery_noop")  # type: ignore[untyped-decorator, unused-ignore]
def celery_noop() -> None:
    task_redis().incr(DONE_KEY)


@celery_app.task(name="peers_bench.celery_started")  # type: ignore[untyped-decorator, unused-ignore]
def celery_started() -> None:
    task_redis().rpush(STARTED_KEY, time.time())


# RQ's default Worker forks a work horse per job, and the horse imports the job's module every time (its
# parent never does): so RQ's tasks live in a module as small as a real tasks module, written at run time
# into the workers' PYTHONPATH, rather than in this one (importing this file takes ~0.2 s: every peer).
RQ_TASKS_SOURCE = f"""\"\"\"RQ tasks of bench/peers_bench.py (written by it at run time).\"\"\"

import time

from rq import get_current_job


def noop() -> None:
    get_current_job().connection.incr({DONE_KEY!r})


def started() -> None:
    now = time.time()
    get_current_job().connection.rpush({STARTED_KEY!r}, now)
"""


async def arq_noop(ctx: dict[str, Any]) -> None:
    await ctx["redis"].incr(DONE_KEY)


async def arq_started(ctx: dict[str, Any]) -> None:
    await ctx["redis"].rpush(STARTED_KEY, time.time())


class ArqWorkerSettings:
    """``arq peers_bench.ArqWorkerSettings``: arq's defaults but for the Redis database."""

    functions = [arq_noop, arq_started]
    redis_settings = RedisSettings.from_dsn(REDIS_URL)


proc_app = App(connector=PsycopgConnector(conninfo=PG_URL))


@proc_app.task(name="peers_bench.proc_noop")  # type: ignore[untyped-decorator, unused-ignore]
async def proc_noop() -> None:
    return None


@proc_app.task(name="peers_bench.proc_started")  # type: ignore[untyped-decorator, unused-ignore]
async def proc_started() -> None:
    task_redis().rpush(STARTED_KEY, time.time())


def rv(value: Any) -> Any:
    """A sync Redis command's reply (redis-py types them as reply-or-awaitable for both clients)."""
    return value


# -- measurement helpers ------------------------------------------------------------------------------------


@dataclass
class Rate:
    """An enqueue rate: calls completed inside the measured window."""

    jobs_per_s: float
    calls: int
    jobs_per_call: int
    in_flight: int  # 1 for a plain loop
    total_jobs: int  # every job enqueued, warm-up and tail included (checked against the broker)
    errors: int = 0


def sync_rate(call: Callable[[], object], jobs_per_call: int, warmup: float, duration: float) -> Rate:
    """A plain loop of ``call``: ``warmup`` seconds, then calls for ``duration`` seconds, timed to the end
    of the last one (no rounding to whole calls when a call is a batch of 1,000)."""
    total = 0
    warm_until = time.perf_counter() + warmup
    while time.perf_counter() < warm_until:
        call()
        total += 1
    start = time.perf_counter()
    calls = 0
    while True:
        call()
        calls += 1
        if (now := time.perf_counter()) >= start + duration:
            break
    total += calls
    return Rate(calls * jobs_per_call / (now - start), calls, jobs_per_call, 1, total * jobs_per_call)


async def async_rate(
    call: Callable[[], Awaitable[object]], jobs_per_call: int, in_flight: int, warmup: float, duration: float
) -> Rate:
    """``in_flight`` concurrent loops of ``call``; counted: the calls that end after ``warmup`` seconds,
    over the time from then to the last of them (no new call starts after ``duration`` more seconds)."""
    start = time.perf_counter() + warmup
    stop = start + duration
    calls = total = 0
    last = start

    async def loop() -> None:
        nonlocal calls, total, last
        while time.perf_counter() < stop:
            await call()
            total += 1
            if (now := time.perf_counter()) >= start:
                calls += 1
                last = max(last, now)

    await asyncio.gather(*(loop() for _ in range(in_flight)))
    rate = calls * jobs_per_call / (last - start) if last > start else math.nan
    return Rate(rate, calls, jobs_per_call, in_flight, total * jobs_per_call)


@dataclass
class EndToEnd:
    jobs: int
    enqueue_seconds: float
    seconds: float
    jobs_per_s: float


def wait_done(finished: Callable[[], int], jobs: int, began: float, timeout: float) -> float:
    """Poll ``finished`` every 50 ms until it reaches ``jobs``; the seconds since ``began``."""
    while (done := finished()) < jobs:
        if time.perf_counter() - began > timeout:
            raise RuntimeError(f"only {done} of {jobs} jobs done in {timeout:g} s")
        time.sleep(0.05)
    return time.perf_counter() - began


@dataclass
class SystemResult:
    """One row of the table."""

    system: str
    enqueue_per_s: float | None = None
    enqueue_note: str = ""
    batch_jobs_per_s: float | None = None
    batch_note: str = ""
    e2e_jobs_per_s: float | None = None
    e2e_note: str = ""
    start_p50_ms: float | None = None
    start_p99_ms: float | None = None
    latency_note: str = ""
    workers_note: str = ""
    durability: str = ""
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def set_latency(self, seconds: Sequence[float]) -> None:
        self.start_p50_ms = percentile(seconds, 50) * 1e3
        self.start_p99_ms = percentile(seconds, 99) * 1e3
        self.details["latency_jobs"] = len(seconds)
        self.details["start_p90_ms"] = percentile(seconds, 90) * 1e3
        self.details["start_max_ms"] = max(seconds) * 1e3 if seconds else None


# -- worker processes ---------------------------------------------------------------------------------------


class WorkerGroup:
    """Worker commands as subprocesses, each in its own session/process group, logging to files."""

    def __init__(self, name: str, commands: Sequence[Sequence[str]], log_dir: Path) -> None:
        self.name = name
        self.commands = [list(c) for c in commands]
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log_paths: list[Path] = []

    def __enter__(self) -> WorkerGroup:
        env = dict(os.environ)
        paths = [str(BENCH_DIR), str(self.log_dir), env.get("PYTHONPATH", "")]  # log_dir: RQ's tasks
        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        try:
            for index, command in enumerate(self.commands):
                log_path = self.log_dir / f"{self.name}-{index}.log"
                with log_path.open("wb") as log:
                    self.processes.append(
                        subprocess.Popen(
                            command,
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                            cwd=BENCH_DIR,
                            start_new_session=True,
                        )
                    )
                self.log_paths.append(log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.log_paths if path.exists())

    def check_alive(self) -> None:
        for process, path in zip(self.processes, self.log_paths, strict=True):
            if process.poll() is not None:
                tail = path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} worker exited with {process.returncode}:\n{tail}")

    def wait_ready(self, ready: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} workers not ready in {timeout:g} s:\n{self.logs()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to each process group, then SIGKILL to whatever is left after 10 s."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the group: RQ work horses, Celery pool children
            process.wait(10)


def cli(name: str) -> str:
    """A console script of this venv (the libraries' own CLIs)."""
    return str(Path(sys.executable).parent / name)


# -- the peers ---------------------------------------------------------------------------------------------


class Peer:
    """One peer queue: how to clear it, enqueue, start its workers and tell when jobs are done."""

    name = ""
    enqueue_note = ""
    batch_note = ""
    e2e_note = ""
    workers_note = ""
    durability = ""

    def __init__(self) -> None:
        self.redis = redis.Redis.from_url(REDIS_URL)
        config = rv(self.redis.config_get("appendonly")) | rv(self.redis.config_get("save"))
        aof, save = config.get("appendonly"), config.get("save")
        self.durability = (
            "Redis memory only (no AOF, no snapshot: a crash loses the queue)"
            if aof == "no" and not save
            else f"Redis (appendonly={aof}, save={save!r})"
        )

    def reset(self) -> None:
        """Empty the broker; never while workers run (it would also remove their bindings)."""
        self.redis.flushdb()

    def close(self) -> None:
        self.reset()
        self.redis.close()

    def queued(self) -> int:
        raise NotImplementedError

    def single_rate(self, args: argparse.Namespace) -> Rate:
        raise NotImplementedError

    def batch_rate(self, args: argparse.Namespace) -> Rate | None:
        return None

    def worker_commands(self, workers: int) -> list[list[str]]:
        raise NotImplementedError

    def workers_ready(self, processes: WorkerGroup, workers: int) -> bool:
        raise NotImplementedError

    def latency(self, pauses: Sequence[float]) -> list[float]:
        """One job at a time, each after its pause; the first LATENCY_WARMUP are not counted."""
        raise NotImplementedError

    def enqueue_noops(self, jobs: int, in_flight: int) -> None:
        raise NotImplementedError

    def finished(self) -> int:
        return int(rv(self.redis.get(DONE_KEY)) or 0)

    def blpop_started(self) -> float:
        item = rv(self.redis.blpop([STARTED_KEY], timeout=60))
        if item is None:
            raise RuntimeError(f"{self.name}: a latency job did not start within 60 s")
        return float(item[1])

    def sync_latency(self, enqueue: Callable[[], object], pauses: Sequence[float]) -> list[float]:
        out: list[float] = []
        for index, pause in enumerate(pauses):
            time.sleep(pause)
            sent = time.time()
            enqueue()
            started = self.blpop_started()
            if index >= LATENCY_WARMUP:
                out.append(started - sent)
        return out


async def async_latency(enqueue: Callable[[], Awaitable[object]], pauses: Sequence[float]) -> list[float]:
    out: list[float] = []
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        for index, pause in enumerate(pauses):
            await asyncio.sleep(pause)
            sent = time.time()
            await enqueue()
            item: Any = await client.blpop([STARTED_KEY], timeout=60)
            if item is None:
                raise RuntimeError("a latency job did not start within 60 s")
            if index >= LATENCY_WARMUP:
                out.append(float(item[1]) - sent)
    finally:
        await client.aclose()
    return out


class CeleryPeer(Peer):
    name = "celery"
    enqueue_note = "delay(), plain loop"
    batch_note = "group(1000 x .s()).apply_async(), plain loop (one message per task)"
    e2e_note = "group of 1,000 at a time"
    workers_note = "celery worker --pool prefork --concurrency {n} (1 main + {n} pool processes)"

    def queued(self) -> int:
        keys = [key for key in self.redis.scan_iter("celery*") if rv(self.redis.type(key)) == b"list"]
        return sum(int(rv(self.redis.llen(key))) for key in keys)

    def single_rate(self, args: argparse.Namespace) -> Rate:
        return sync_rate(celery_noop.delay, 1, args.warmup, args.duration)

    def batch_rate(self, args: argparse.Namespace) -> Rate:
        def call() -> None:
            group(celery_noop.s() for _ in range(BATCH)).apply_async()

        return sync_rate(call, BATCH, args.warmup, args.duration)

    def worker_commands(self, workers: int) -> list[list[str]]:
        return [
            [
                cli("celery"),
                "-A",
                "peers_bench:celery_app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(workers),
            ]
        ]

    def workers_ready(self, processes: WorkerGroup, workers: int) -> bool:
        return bool(celery_app.control.ping(timeout=0.5))

    def latency(self, pauses: Sequence[float]) -> list[float]:
        return self.sync_latency(celery_started.delay, pauses)

    def enqueue_noops(self, jobs: int, in_flight: int) -> None:
        for start in range(0, jobs, BATCH):
            group(celery_noop.s() for _ in range(min(BATCH, jobs - start))).apply_async()


class RQPeer(Peer):
    name = "rq"
    enqueue_note = "Queue.enqueue(), plain loop"
    batch_note = "Queue.enqueue_many(1000 x prepare_data), plain loop"
    e2e_note = "enqueue_many of 1,000 at a time"
    workers_note = "rq worker x {n} (default Worker: forks a work horse per job)"

    def __init__(self) -> None:
        super().__init__()
        self.queue = Queue(RQ_QUEUE, connection=self.redis)

    def queued(self) -> int:
        return int(self.queue.count)

    def single_rate(self, args: argparse.Namespace) -> Rate:
        return sync_rate(lambda: self.queue.enqueue(RQ_NOOP), 1, args.warmup, args.duration)

    def enqueue_many(self, size: int) -> None:
        self.queue.enqueue_many([Queue.prepare_data(RQ_NOOP) for _ in range(size)])

    def batch_rate(self, args: argparse.Namespace) -> Rate:
        return sync_rate(lambda: self.enqueue_many(BATCH), BATCH, args.warmup, args.duration)

    worker_class: tuple[str, ...] = ()  # the default Worker

    def worker_commands(self, workers: int) -> list[list[str]]:
        command = [cli("rq"), "worker", *self.worker_class, "--url", REDIS_URL, RQ_QUEUE]
        return [command for _ in range(workers)]

    def workers_ready(self, processes: WorkerGroup, workers: int) -> bool:
        return int(Worker.count(connection=self.redis, queue=self.queue)) >= workers

    def latency(self, pauses: Sequence[float]) -> list[float]:
        return self.sync_latency(lambda: self.queue.enqueue(f"{RQ_TASKS_MODULE}.started"), pauses)

    def enqueue_noops(self, jobs: int, in_flight: int) -> None:
        for start in range(0, jobs, BATCH):
            self.enqueue_many(min(BATCH, jobs - start))


class RQSimplePeer(RQPeer):
    """RQ with its documented SimpleWorker: jobs run in the worker process itself, no fork per job."""

    name = "rq-simple"
    workers_note = "rq worker --worker-class rq.SimpleWorker x {n} (no fork per job)"
    worker_class = ("--worker-class", "rq.SimpleWorker")


class ArqPeer(Peer):
    name = "arq"
    enqueue_note = "enqueue_job(), asyncio, {c} in flight"
    batch_note = "no bulk call"
    e2e_note = "enqueue_job, {c} in flight"
    workers_note = (
        "arq peers_bench.ArqWorkerSettings x {n} (max_jobs 10; polls every 0.5 s for at most 100 job ids)"
    )

    def queued(self) -> int:
        return int(rv(self.redis.zcard("arq:queue")))

    async def with_pool(self, body: Callable[[ArqRedis], Awaitable[Any]]) -> Any:
        pool = await create_pool(RedisSettings.from_dsn(REDIS_URL))
        try:
            return await body(pool)
        finally:
            await pool.aclose()

    def single_rate(self, args: argparse.Namespace) -> Rate:
        async def body(pool: ArqRedis) -> Rate:
            return await async_rate(
                lambda: pool.enqueue_job("arq_noop"), 1, args.concurrency, args.warmup, args.duration
            )

        rate: Rate = asyncio.run(self.with_pool(body))
        return rate

    def worker_commands(self, workers: int) -> list[list[str]]:
        return [[cli("arq"), "peers_bench.ArqWorkerSettings"] for _ in range(workers)]

    def workers_ready(self, processes: WorkerGroup, workers: int) -> bool:
        return processes.logs().count("Starting worker for") >= workers

    def latency(self, pauses: Sequence[float]) -> list[float]:
        async def body(pool: ArqRedis) -> list[float]:
            return await async_latency(lambda: pool.enqueue_job("arq_started"), pauses)

        out: list[float] = asyncio.run(self.with_pool(body))
        return out

    def enqueue_noops(self, jobs: int, in_flight: int) -> None:
        async def body(pool: ArqRedis) -> None:
            remaining = jobs

            async def loop() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await pool.enqueue_job("arq_noop")

            await asyncio.gather(*(loop() for _ in range(in_flight)))

        asyncio.run(self.with_pool(body))


class ProcrastinatePeer(Peer):
    name = "procrastinate"
    enqueue_note = "defer_async(), asyncio, {c} in flight"
    batch_note = "batch_defer_async(1000 jobs), asyncio, {b} in flight"
    e2e_note = "batch_defer_async of 1,000 at a time; done = its jobs table's succeeded rows"
    workers_note = "procrastinate --app=peers_bench.proc_app worker x {n} (concurrency 1 each)"

    def __init__(self) -> None:
        super().__init__()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {PG_DATABASE}")

        async def apply_schema() -> None:
            async with proc_app.open_async():
                await proc_app.schema_manager.apply_schema_async()

        asyncio.run(apply_schema())
        self.db = psycopg.connect(PG_URL, autocommit=True)
        settings = self.db.execute("SELECT current_setting('fsync'), current_setting('synchronous_commit')")
        fsync, synchronous_commit = settings.fetchone() or ("?", "?")
        self.durability = f"PostgreSQL (fsync {fsync}, synchronous_commit {synchronous_commit})"

    def count(self, status: str) -> int:
        """Jobs of the no-op task in ``status`` (the latency jobs are another task)."""
        row = self.db.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status = %s AND task_name = %s",
            (status, proc_noop.name),
        ).fetchone()
        return int(row[0]) if row else 0

    def reset(self) -> None:
        super().reset()
        self.db.execute("TRUNCATE procrastinate_jobs CASCADE")

    def close(self) -> None:
        self.db.close()
        self.redis.flushdb()
        self.redis.close()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")

    def queued(self) -> int:
        return self.count("todo")

    def single_rate(self, args: argparse.Namespace) -> Rate:
        async def body() -> Rate:
            async with proc_app.open_async():
                return await async_rate(
                    proc_noop.defer_async, 1, args.concurrency, args.warmup, args.duration
                )

        return asyncio.run(body())

    def batch_rate(self, args: argparse.Namespace) -> Rate:
        kwargs: list[dict[str, Any]] = [{} for _ in range(BATCH)]

        async def body() -> Rate:
            async with proc_app.open_async():
                return await async_rate(
                    lambda: proc_noop.batch_defer_async(*kwargs),
                    BATCH,
                    args.batch_concurrency,
                    args.warmup,
                    args.duration,
                )

        return asyncio.run(body())

    def worker_commands(self, workers: int) -> list[list[str]]:
        return [[cli("procrastinate"), "--app=peers_bench.proc_app", "worker"] for _ in range(workers)]

    def workers_ready(self, processes: WorkerGroup, workers: int) -> bool:
        row = self.db.execute("SELECT count(*) FROM procrastinate_workers").fetchone()
        return row is not None and int(row[0]) >= workers

    def latency(self, pauses: Sequence[float]) -> list[float]:
        async def body() -> list[float]:
            async with proc_app.open_async():
                return await async_latency(proc_started.defer_async, pauses)

        return asyncio.run(body())

    def enqueue_noops(self, jobs: int, in_flight: int) -> None:
        async def body() -> None:
            async with proc_app.open_async():
                for start in range(0, jobs, BATCH):
                    await proc_noop.batch_defer_async(*({} for _ in range(min(BATCH, jobs - start))))

        asyncio.run(body())

    def finished(self) -> int:
        return self.count("succeeded")


PEERS: dict[str, Callable[[], Peer]] = {
    "celery": CeleryPeer,
    "rq": RQPeer,
    "rq-simple": RQSimplePeer,
    "arq": ArqPeer,
    "procrastinate": ProcrastinatePeer,
}


def run_peer(name: str, args: argparse.Namespace, log_dir: Path) -> SystemResult:
    """Enqueue rates with no worker, then workers up: idle latency, then end to end; always cleaned up."""
    result = SystemResult(system=name)
    peer: Peer | None = None
    try:
        peer = PEERS[name]()
        # {n}: worker processes, {c}: calls in flight, {b}: bulk calls in flight
        labels = {"n": args.workers, "c": args.concurrency, "b": args.batch_concurrency}
        result.enqueue_note = peer.enqueue_note.format(**labels)
        result.batch_note = peer.batch_note.format(**labels)
        result.e2e_note = peer.e2e_note.format(**labels)
        result.workers_note = peer.workers_note.format(**labels)
        result.durability = peer.durability
        result.latency_note = "task pushes time.time() to Redis as it starts"
        peer.reset()
        expected = 0
        for kind in ("single", "batch"):
            rate = peer.single_rate(args) if kind == "single" else peer.batch_rate(args)
            if rate is None:
                continue
            expected += rate.total_jobs
            queued = peer.queued()
            if queued != expected:  # every enqueued job must be in the broker: no silent drops
                raise RuntimeError(f"{kind} enqueue: {queued} jobs queued, {expected} enqueued")
            result.details[f"{kind}_enqueue"] = asdict(rate)
            if kind == "single":
                result.enqueue_per_s = rate.jobs_per_s
            else:
                result.batch_jobs_per_s = rate.jobs_per_s
        peer.reset()
        with WorkerGroup(name, peer.worker_commands(args.workers), log_dir) as workers:
            workers.wait_ready(lambda: peer is not None and peer.workers_ready(workers, args.workers))
            log(f"{name}: workers ready; idle start latency, {args.latency_jobs} jobs")
            result.set_latency(peer.latency(args.pauses))
            workers.check_alive()
            log(f"{name}: end to end, {args.jobs:,} jobs")
            peer.redis.delete(DONE_KEY)
            began = time.perf_counter()
            peer.enqueue_noops(args.jobs, args.concurrency)
            enqueued = time.perf_counter() - began
            seconds = wait_done(peer.finished, args.jobs, began, args.timeout)
            e2e = EndToEnd(args.jobs, enqueued, seconds, args.jobs / seconds)
            result.e2e_jobs_per_s = e2e.jobs_per_s
            result.details["e2e"] = asdict(e2e)
            workers.check_alive()
    except Exception as error:  # reported in the table, not hidden: the other systems still run
        result.error = f"{type(error).__name__}: {error}"
        log(f"{name} FAILED: {result.error}")
    finally:
        if peer is not None:
            with contextlib.suppress(Exception):
                peer.close()
    return result


# -- Jobwire ----------------------------------------------------------------------------------------------


def jobwire_imports() -> None:
    """The Jobwire benchmarks' modules live in bench/ and tests/: only this client process needs them."""
    for folder in (str(BENCH_DIR), str(TESTS_DIR)):
        if folder not in sys.path:
            sys.path.insert(0, folder)


async def echo_rate(args: argparse.Namespace) -> float:
    """The bare grpc.aio echo server's calls/s, with SubmitJob's payload and calls in flight."""
    from submit_bench import ECHO_METHOD, check_echo, drive_load, echo_server, submit_payload, with_server

    body = submit_payload()
    result = await with_server(
        echo_server(),
        lambda s: drive_load(
            "echo", s, ECHO_METHOD, body, check_echo(body), args.concurrency, args.warmup, args.duration
        ),
    )
    return result.calls_per_s


async def jobwire_enqueue(args: argparse.Namespace, folder: Path, result: SystemResult) -> None:
    """SubmitJob and BatchSubmitJobs x1000 on SQLite FULL, the jobs left QUEUED (as with the peers)."""
    from batch_bench import BATCH_METHOD, PARKED, batch_payload, check_batch
    from submit_bench import (
        SUBMIT_METHOD,
        check_submit_type,
        drive_load,
        jobwire_server,
        parked_payload,
        with_server,
    )

    single = await with_server(
        jobwire_server(f"sqlite:///{folder / 'single.db'}", 8, *PARKED, *NO_DRAIN_DELAY),
        lambda s: drive_load(
            "SubmitJob",
            s,
            SUBMIT_METHOD,
            parked_payload(),
            check_submit_type("demo.sleep"),
            args.concurrency,
            args.warmup,
            args.duration,
        ),
    )
    batch = await with_server(
        jobwire_server(f"sqlite:///{folder / 'batch.db'}", 8, *PARKED, *NO_DRAIN_DELAY),
        lambda s: drive_load(
            "BatchSubmitJobs",
            s,
            BATCH_METHOD,
            batch_payload(BATCH),
            check_batch(BATCH),
            args.batch_concurrency,
            args.warmup,
            args.duration,
        ),
    )
    if single.errors or batch.errors:
        raise RuntimeError(f"Jobwire enqueue errors: {single.error_codes} {batch.error_codes}")
    result.enqueue_per_s = single.calls_per_s
    result.batch_jobs_per_s = batch.calls_per_s * BATCH
    result.details["single_enqueue"] = asdict(single)
    result.details["batch_enqueue"] = asdict(batch)


async def jobwire_latency(target: str, job_type: str, pauses: Sequence[float]) -> dict[str, list[float]]:
    """One ``job_type`` job at a time, each after its pause: SubmitJob, then WatchJob until it ends.

    "seen": from the client's time.time() before SubmitJob to when it receives the job in a started state
    (RUNNING, or already finished); "server_start": the job's start_time minus that same send time.
    """
    import grpc

    from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

    seen: list[float] = []
    server_start: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        request = job_service_pb2.SubmitJobRequest(type=job_type)
        for index, pause in enumerate(pauses):
            await asyncio.sleep(pause)
            sent = time.time()
            job = (await stub.SubmitJob(request, timeout=30)).job
            started: float | None = None
            last = job
            async for update in stub.WatchJob(job_service_pb2.WatchJobRequest(job_id=job.id), timeout=60):
                if started is None and update.job.state != job_pb2.JOB_STATE_QUEUED:
                    started = time.time()
                last = update.job
            if last.state != job_pb2.JOB_STATE_SUCCEEDED or started is None:
                raise RuntimeError(f"job {job.id} ended {job_pb2.JobState.Name(last.state)}")
            if index >= LATENCY_WARMUP:
                seen.append(started - sent)
                server_start.append(last.start_time.ToNanoseconds() / 1e9 - sent)
    return {"seen": seen, "server_start": server_start}


def set_jobwire_latency(result: SystemResult, latency: dict[str, list[float]]) -> None:
    result.set_latency(latency["seen"])
    server_p50 = percentile(latency["server_start"], 50) * 1e3
    server_p99 = percentile(latency["server_start"], 99) * 1e3
    result.details["server_start_time_p50_ms"] = server_p50
    result.details["server_start_time_p99_ms"] = server_p99
    result.latency_note += f"; by the job's start_time: p50 {server_p50:.2f} ms, p99 {server_p99:.2f} ms"


async def jobwire_remote_latency(args: argparse.Namespace, folder: Path) -> dict[str, list[float]]:
    """remote.noop jobs one at a time through ``--workers`` ``jobwire worker`` processes, on SQLite."""
    from remote_bench import remote_cluster

    store = f"sqlite:///{folder / 'latency.db'}"
    async with remote_cluster(store, args.workers, args.jobwire_concurrency, *NO_DRAIN_DELAY) as (server, _):
        return await jobwire_latency(server.target, "remote.noop", args.pauses)


async def run_jobwire(args: argparse.Namespace, log_dir: Path) -> SystemResult:
    """Jobwire as remote_bench.py runs it: SQLite FULL, ``--workers`` ``jobwire worker`` processes."""
    from remote_bench import end_to_end

    result = SystemResult(
        system="jobwire",
        enqueue_note=f"SubmitJob, asyncio, {args.concurrency} in flight",
        batch_note=f"BatchSubmitJobs x1000, asyncio, {args.batch_concurrency} in flight",
        e2e_note="BatchSubmitJobs of 1,000 at a time (bench/remote_bench.py end_to_end)",
        workers_note=(
            f"jobwire worker x {args.workers} (--concurrency {args.jobwire_concurrency}), remote.noop"
        ),
        latency_note="client saw the job started in WatchJob",
        durability="SQLite, synchronous=FULL",
    )
    try:
        with tempfile.TemporaryDirectory(prefix="peers-jobwire-", dir=log_dir) as name:
            folder = Path(name)
            log("jobwire: enqueue rates")
            await jobwire_enqueue(args, folder, result)
            log(f"jobwire: idle start latency, {args.latency_jobs} jobs")
            set_jobwire_latency(result, await jobwire_remote_latency(args, folder))
            log(f"jobwire: end to end, {args.jobs:,} jobs")
            e2e = await end_to_end(
                argparse.Namespace(
                    jobs=args.jobs,
                    workers=args.workers,
                    concurrency=args.jobwire_concurrency,
                    timeout=args.timeout,
                )
            )
            result.e2e_jobs_per_s = e2e["jobs_per_s"]
            result.details["e2e"] = e2e
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"
        log(f"jobwire FAILED: {result.error}")
    return result


async def run_jobwire_inproc(args: argparse.Namespace, log_dir: Path) -> SystemResult:
    """Jobwire running the jobs in its server process (demo.echo), SQLite FULL: no worker processes."""
    import grpc
    from submit_bench import job_counts, jobwire_server, with_server

    from jobwire.v1 import job_service_pb2, job_service_pb2_grpc

    running = args.workers * args.jobwire_concurrency
    result = SystemResult(
        system="jobwire-inproc",
        enqueue_note="(as jobwire)",
        batch_note="(as jobwire)",
        e2e_note=f"BatchSubmitJobs of 1,000 at a time; demo.echo in the server, --max-running {running}",
        workers_note="none: the server process runs the handlers",
        latency_note="demo.echo; client saw the job started in WatchJob",
        durability="SQLite, synchronous=FULL",
    )
    try:
        with tempfile.TemporaryDirectory(prefix="peers-inproc-", dir=log_dir) as name:
            folder = Path(name)
            log(f"jobwire-inproc: idle start latency, {args.latency_jobs} jobs")
            latency = await with_server(
                jobwire_server(f"sqlite:///{folder / 'latency.db'}", running, *NO_DRAIN_DELAY),
                lambda s: jobwire_latency(s.target, "demo.echo", args.pauses),
            )
            set_jobwire_latency(result, latency)

            log(f"jobwire-inproc: end to end, {args.jobs:,} jobs")

            enqueue_seconds: list[float] = []

            async def e2e(server: Any) -> float:
                async with grpc.aio.insecure_channel(server.target) as channel:
                    stub = job_service_pb2_grpc.JobServiceStub(channel)
                    request = job_service_pb2.SubmitJobRequest(type="demo.echo")
                    began = time.perf_counter()
                    for start in range(0, args.jobs, BATCH):
                        size = min(BATCH, args.jobs - start)
                        await stub.BatchSubmitJobs(
                            job_service_pb2.BatchSubmitJobsRequest(requests=[request] * size), timeout=60
                        )
                    enqueue_seconds.append(time.perf_counter() - began)
                    finished = 0
                    while finished < args.jobs:
                        await asyncio.sleep(0.05)
                        _, finished = await job_counts(channel)
                        if time.perf_counter() - began > args.timeout:
                            raise RuntimeError(
                                f"only {finished} of {args.jobs} jobs done in {args.timeout} s"
                            )
                    return time.perf_counter() - began

            seconds = await with_server(
                jobwire_server(
                    f"sqlite:///{folder / 'e2e.db'}", running, "--max-queued", "10000000", *NO_DRAIN_DELAY
                ),
                e2e,
            )
            result.e2e_jobs_per_s = args.jobs / seconds
            result.details["e2e"] = {
                "jobs": args.jobs,
                "enqueue_seconds": enqueue_seconds[0],
                "seconds": seconds,
                "jobs_per_s": result.e2e_jobs_per_s,
            }
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"
        log(f"jobwire-inproc FAILED: {result.error}")
    return result


# -- the run -----------------------------------------------------------------------------------------------


def cpu_snapshot() -> dict[str, float]:
    """Cumulative CPU seconds (Linux /proc): the whole machine's busy time, this process and its reaped
    descendants, and the Redis and PostgreSQL servers (with their reaped children: PostgreSQL backends)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    services = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            if name.startswith(("redis-server", "postgres")):
                numbers = text.rsplit(")", 1)[1].split()
                services += sum(int(n) for n in numbers[11:15])  # utime stime cutime cstime
    own = os.times()
    return {
        "machine": (user + nice + system + irq + softirq + steal) / tick,
        "own": own.user + own.system + own.children_user + own.children_system,
        "services": services / tick,
    }


def other_cpu(before: dict[str, float], after: dict[str, float]) -> float:
    """CPU seconds used by other work between two snapshots."""
    delta = {key: after[key] - before[key] for key in before}
    return max(0.0, delta["machine"] - delta["own"] - delta["services"])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for package in ("jobwire", "grpcio", "celery", "kombu", "redis", "rq", "arq", "procrastinate", "psycopg"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[package] = metadata.version(package)
    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(REDIS_URL)
        out["redis-server"] = str(rv(client.info("server"))["redis_version"])
        persistence = rv(client.config_get("appendonly")) | rv(client.config_get("save"))
        out["redis-persistence"] = (
            f"appendonly={persistence.get('appendonly')} save={persistence.get('save')!r}"
        )
        client.close()
    with contextlib.suppress(Exception), psycopg.connect(PG_ADMIN_URL) as connection:
        row = connection.execute("SHOW server_version").fetchone()
        out["postgresql"] = str(row[0]) if row else "?"
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    jobwire_imports()
    began = time.perf_counter()
    cpu_before = cpu_snapshot()
    results: list[SystemResult] = []
    # The same pauses before each latency job for every system: arrivals at random points of a polling
    # worker's cycle (arq polls every 0.5 s), as a job submitted to an idle system would arrive.
    pick = random.Random(20_250_101)
    args.pauses = [pick.uniform(0, args.latency_pause) for _ in range(LATENCY_WARMUP + args.latency_jobs)]
    with tempfile.TemporaryDirectory(prefix="peers-bench-") as name:
        log_dir = Path(name)
        (log_dir / f"{RQ_TASKS_MODULE}.py").write_text(RQ_TASKS_SOURCE)
        log("echo server")
        echo_before = asyncio.run(echo_rate(args))
        for system in args.only:
            started, cpu = time.perf_counter(), cpu_snapshot()
            if system == "jobwire":
                results.append(asyncio.run(run_jobwire(args, log_dir)))
            elif system == "jobwire-inproc":
                results.append(asyncio.run(run_jobwire_inproc(args, log_dir)))
            else:
                results.append(run_peer(system, args, log_dir))
            results[-1].details["seconds"] = time.perf_counter() - started
            results[-1].details["other_work_cpu_s"] = other_cpu(cpu, cpu_snapshot())
        log("echo server again")
        echo_after = asyncio.run(echo_rate(args))
    echo = statistics.fmean([echo_before, echo_after])
    return {
        "echo_calls_per_s": echo,
        "echo_before_after": [echo_before, echo_after],
        "echo_drift": abs(echo_before - echo_after) / echo if echo else None,
        "settings": {
            "jobs": args.jobs,
            "workers": args.workers,
            "latency_jobs": args.latency_jobs,
            "latency_pause_max_s": args.latency_pause,
            "concurrency": args.concurrency,
            "batch_concurrency": args.batch_concurrency,
            "jobwire_worker_concurrency": args.jobwire_concurrency,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "quick": args.quick,
            "cpus": os.cpu_count(),
            "versions": versions(),
        },
        "systems": [asdict(r) for r in results],
        "other_work_cpu_s": other_cpu(cpu_before, cpu_snapshot()),
        "load_average_1_5_15": os.getloadavg(),
        "seconds": time.perf_counter() - began,
    }


# -- output ------------------------------------------------------------------------------------------------


def short(error: str) -> str:
    """An error's first line and, for a multi-line one (a child's log tail), its last line: the table
    stays readable; the whole text is in the JSON."""
    lines = [line for line in error.splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1].strip()}"


def print_table(results: dict[str, Any], out: Any) -> None:
    settings = results["settings"]
    before, after = results["echo_before_after"]
    print(
        f"\nPeers side by side: {settings['jobs']:,} no-op jobs end to end on {settings['workers']} worker "
        f"processes each; {settings['latency_jobs']} idle start latencies; enqueue rates over "
        f"{settings['duration_s']:g} s after {settings['warmup_s']:g} s warm-up; {settings['cpus']} CPUs; "
        f"one run ({results['seconds']:.0f} s)",
        file=out,
    )
    print(
        f"bare grpc.aio echo: {results['echo_calls_per_s']:,.0f} calls/s "
        f"({settings['concurrency']} in flight, one channel; {before:,.0f} before, {after:,.0f} after)",
        file=out,
    )
    other = results["other_work_cpu_s"]
    print(
        f"other work on this machine during the run: {other:,.0f} CPU s, {other / results['seconds']:.2f} "
        f"cores on average of {settings['cpus']} (processes outside this run, Redis and PostgreSQL)",
        file=out,
    )
    header = (
        f"{'system':<16}{'enqueue/s':>11}{'batch jobs/s':>14}{'e2e jobs/s':>12}"
        f"{'start p50 ms':>14}{'p99 ms':>9}  enqueue call"
    )
    print(header, file=out)
    print("-" * (len(header) + 30), file=out)
    for r in results["systems"]:
        if r["error"] and r["e2e_jobs_per_s"] is None and r["enqueue_per_s"] is None:
            print(f"{r['system']:<16}FAILED: {short(r['error'])}", file=out)
            continue
        batch = "-" if r["batch_jobs_per_s"] is None else f"{r['batch_jobs_per_s']:,.0f}"
        if r["batch_note"].startswith("(as"):
            batch = "(same)"
        enqueue = "(same)" if r["enqueue_note"].startswith("(as") else fmt(r["enqueue_per_s"], ",.0f")
        print(
            f"{r['system']:<16}{enqueue:>11}{batch:>14}{fmt(r['e2e_jobs_per_s'], ',.0f'):>12}"
            f"{fmt(r['start_p50_ms'], '.2f'):>14}{fmt(r['start_p99_ms'], '.2f'):>9}  {r['enqueue_note']}",
            file=out,
        )
        if r["error"]:
            print(f"{'':<16}FAILED part way: {short(r['error'])}", file=out)
    echo = results["echo_calls_per_s"]
    jobwire = next((r for r in results["systems"] if r["system"] == "jobwire"), None)
    if jobwire and jobwire["enqueue_per_s"] and echo:
        print(
            f"jobwire x echo: SubmitJob {jobwire['enqueue_per_s'] / echo:.2f}x, "
            f"batch {fmt(jobwire['batch_jobs_per_s'] and jobwire['batch_jobs_per_s'] / echo, '.1f')}x, "
            f"e2e {fmt(jobwire['e2e_jobs_per_s'] and jobwire['e2e_jobs_per_s'] / echo, '.2f')}x",
            file=out,
        )
    print("\nNotes per system:", file=out)
    for r in results["systems"]:
        print(f"  {r['system']}:", file=out)
        print(f"    batch: {r['batch_note']}; e2e enqueue: {r['e2e_note']}", file=out)
        print(f"    workers: {r['workers_note']}; start: {r['latency_note']}", file=out)
        e2e = r["details"].get("e2e") or {}
        enqueue_s = e2e.get("enqueue_seconds", e2e.get("submit_seconds"))
        print(
            f"    durability: {r['durability']}; e2e enqueue took {fmt(enqueue_s, '.1f')} s of "
            f"{fmt(e2e.get('seconds'), '.1f')} s; this system took {r['details'].get('seconds', 0):.0f} s, "
            f"during which other work used {fmt(r['details'].get('other_work_cpu_s'), '.0f')} CPU s",
            file=out,
        )
    versions = ", ".join(f"{k} {v}" for k, v in settings["versions"].items())
    print(f"\nversions: {versions}", file=out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--jobs", type=int, help="no-op jobs in the end-to-end case (default 20,000; --quick 3,000)")
    add("--workers", type=int, default=2, help="worker processes per system (default 2)")
    add("--latency-jobs", type=int, help="jobs in the idle start-latency case (default 200; --quick 20)")
    add(
        "--latency-pause",
        type=float,
        default=0.5,
        help="before each latency job, a random pause of 0 to this many seconds (default 0.5)",
    )
    add("--concurrency", type=int, default=64, help="calls in flight for asyncio enqueue APIs (default 64)")
    add("--batch-concurrency", type=int, default=4, help="bulk calls in flight for asyncio APIs (default 4)")
    add("--jobwire-concurrency", type=int, default=32, help="jobs at a time per jobwire worker (default 32)")
    add("--duration", type=float, help="measured seconds per enqueue case (default 3; --quick 1)")
    add("--warmup", type=float, help="warm-up seconds per enqueue case (default 0.5; --quick 0.2)")
    add("--timeout", type=float, help="end-to-end time limit per system (default 600 s; --quick 120 s)")
    add(
        "--only",
        default=",".join(SYSTEMS),
        help=f"comma-separated systems (default: all of {', '.join(SYSTEMS)})",
    )
    add("--quick", action="store_true", help="small sizes: the whole run in about two and a half minutes")
    add("--json", action="store_true", help="print the results as JSON on stdout (the table goes to stderr)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "jobs": 3000 if quick else 20_000,
        "latency_jobs": 20 if quick else 200,
        "duration": 1.0 if quick else 3.0,
        "warmup": 0.2 if quick else 0.5,
        "timeout": 120.0 if quick else 600.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    if min(args.jobs, args.workers, args.latency_jobs, args.concurrency, args.batch_concurrency) < 1:
        parser.error("--jobs, --workers, --latency-jobs and the concurrencies must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = without_nan(run(args))
    print_table(results, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if any(r["error"] for r in results["systems"]) else 0
