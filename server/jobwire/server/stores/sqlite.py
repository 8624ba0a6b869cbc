"""The SQLite store: one file in WAL mode, one writer thread doing group commit, one reader thread.

Why this shape: sqlite3 calls block, so none may run on the event loop. SQLite admits one writer at a
time anyway, so a single writer thread that commits everything waiting in ONE transaction (group
commit) turns N concurrent inserts into a handful of fsyncs instead of N. WAL lets the reader thread
see committed rows while the writer is busy. Progress notes are advisory and frequent, so they are
coalesced in a dict (latest wins) and ride along with the next transaction, or are flushed on a timer.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

from jobwire.handlers.api import Progress, RetryDefaults
from jobwire.server.job import AttemptRecord, Job, JobError, RetryPolicy
from jobwire.server.job_types import JobType
from jobwire.server.state_machine import TERMINAL_STATES, JobState
from jobwire.server.stores.base import DuplicateRequestId, JobCount, JobQuery, JobStore

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

SYNCHRONOUS_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})

# Numbered migrations: MIGRATIONS[n - 1] takes the schema from version n - 1 to n (PRAGMA user_version).
# Append only; never edit a migration that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: initial schema.
    (
        """
        CREATE TABLE jobs (
            id                  TEXT PRIMARY KEY,
            type                TEXT NOT NULL,
            state               INTEGER NOT NULL,
            priority            INTEGER NOT NULL,
            params              TEXT NOT NULL,      -- JSON object
            labels              TEXT NOT NULL,      -- JSON object of strings
            create_time         REAL NOT NULL,      -- seconds since the epoch
            update_time         REAL NOT NULL,
            queue_time          REAL NOT NULL,
            attempt             INTEGER NOT NULL,
            progress            TEXT,               -- JSON {percent, message, current_step, total_steps}
            result              TEXT,               -- JSON object
            error               TEXT,               -- JSON {code, message, reason, metadata}
            start_time          REAL,
            end_time            REAL,
            expire_time         REAL,
            request_id          TEXT NOT NULL DEFAULT '',
            request_fingerprint TEXT NOT NULL DEFAULT '',
            timeout             REAL,
            cancel_reason       TEXT NOT NULL DEFAULT '',
            sequence            INTEGER NOT NULL
        )
        """,
        # Only non-empty request_ids are unique: an empty one means "no idempotency key".
        "CREATE UNIQUE INDEX jobs_request_id ON jobs (request_id) WHERE request_id <> ''",
        # Listing by state newest-first, and load_unfinished; plain newest-first uses the primary key.
        "CREATE INDEX jobs_state_id ON jobs (state, id)",
        "CREATE INDEX jobs_expire_time ON jobs (expire_time) WHERE expire_time IS NOT NULL",
    ),
    # 2: retries, schedules, attempt history and leases; job types declared by workers.
    (
        # The default is RetryPolicy() as it was when retries arrived (one attempt, i.e. no retry): the
        # policy of every job created before then, pinned here so a later change of the dataclass
        # defaults cannot silently make old jobs retryable.
        "ALTER TABLE jobs ADD COLUMN retry_policy TEXT NOT NULL DEFAULT "
        """'{"max_attempts":1,"initial_backoff":1.0,"max_backoff":300.0,"backoff_multiplier":2.0}'""",
        "ALTER TABLE jobs ADD COLUMN schedule_time REAL",
        # JSON list of {attempt, start_time, end_time, outcome (null or as the error column), worker_id}
        "ALTER TABLE jobs ADD COLUMN attempts TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE jobs ADD COLUMN worker_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE jobs ADD COLUMN lease_expire_time REAL",
        "ALTER TABLE jobs ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN attempt_base INTEGER NOT NULL DEFAULT 0",
        """
        CREATE TABLE job_types (
            name        TEXT PRIMARY KEY,
            timeout     REAL,
            max_running INTEGER,
            retry       TEXT NOT NULL,      -- JSON {max_attempts, initial_backoff, max_backoff,
                                            --       backoff_multiplier}, each null or a number
            last_seen   REAL NOT NULL
        )
        """,
    ),
)

_COLUMNS = (
    "id",
    "type",
    "state",
    "priority",
    "params",
    "labels",
    "create_time",
    "update_time",
    "queue_time",
    "attempt",
    "progress",
    "result",
    "error",
    "start_time",
    "end_time",
    "expire_time",
    "request_id",
    "request_fingerprint",
    "timeout",
    "cancel_reason",
    "sequence",
    "retry_policy",
    "schedule_time",
    "attempts",
    "worker_id",
    "lease_expire_time",
    "lease_epoch",
    "attempt_base",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
# The same columns with the payload left out (an empty params object, no result), for listings.
_SELECT_BASIC = (
    "SELECT "
    + ", ".join({"params": "'{}'", "result": "NULL"}.get(column, column) for column in _COLUMNS)
    + " FROM jobs"
)
_INSERT = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
# The row tuple starts with id, so an UPDATE takes row[1:] + (id,) and, for compare-and-set, + (state,).
_UPDATE = f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in _COLUMNS[1:])} WHERE id = ?"
_UPDATE_CAS = _UPDATE + " AND state = ?"
# Conditional on the sequence, so a progress note never overwrites a newer state written by update().
_FLUSH_PROGRESS = "UPDATE jobs SET progress = ?, sequence = ?, update_time = ? WHERE id = ? AND sequence < ?"
_TERMINAL = ", ".join(str(int(s)) for s in sorted(TERMINAL_STATES))
# "+state" keeps the planner off the state index: most stored jobs are finished, so only the expire_time
# index (set on finished jobs only) narrows a purge down to the rows it deletes.
_PURGE = f"DELETE FROM jobs WHERE expire_time <= ? AND +state IN ({_TERMINAL})"
_UNFINISHED_STATES = ", ".join(str(int(s)) for s in sorted(set(JobState) - TERMINAL_STATES))
_UNFINISHED = f"{_SELECT} WHERE state IN ({_UNFINISHED_STATES}) ORDER BY id"  # IN, not NOT IN: uses the index
_COUNT = "SELECT state, type, priority, COUNT(*) FROM jobs GROUP BY state, type, priority ORDER BY 1, 2, 3"
_SAVE_JOB_TYPE = (
    "INSERT INTO job_types (name, timeout, max_running, retry, last_seen) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET timeout = excluded.timeout, max_running = excluded.max_running, "
    "retry = excluded.retry, last_seen = excluded.last_seen"
)
_LOAD_JOB_TYPES = "SELECT name, timeout, max_running, retry, last_seen FROM job_types ORDER BY name"

Row = tuple[Any, ...]


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _progress_json(progress: Progress | None) -> str | None:
    if progress is None:
        return None
    return _dumps(
        {
            "percent": progress.percent,
            "message": progress.message,
            "current_step": progress.current_step,
            "total_steps": progress.total_steps,
        }
    )


def _error_obj(error: JobError) -> dict[str, Any]:
    # The code is any google.rpc.Code number, stored and loaded as a plain int.
    return {
        "code": int(error.code),
        "message": error.message,
        "reason": error.reason,
        "metadata": error.metadata,
    }


def _error_from(e: dict[str, Any]) -> JobError:
    return JobError(int(e["code"]), e["message"], e["reason"], dict(e["metadata"]))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@functools.lru_cache(maxsize=256)  # a few distinct policies serve millions of jobs
def _retry_policy_json(policy: RetryPolicy) -> str:
    return _dumps(
        {
            "max_attempts": policy.max_attempts,
            "initial_backoff": policy.initial_backoff,
            "max_backoff": policy.max_backoff,
            "backoff_multiplier": policy.backoff_multiplier,
        }
    )


def _retry_policy_from(text: str) -> RetryPolicy:
    r = json.loads(text)
    return RetryPolicy(
        int(r["max_attempts"]),
        float(r["initial_backoff"]),
        float(r["max_backoff"]),
        float(r["backoff_multiplier"]),
    )


def _attempts_json(attempts: Sequence[AttemptRecord]) -> str:
    if not attempts:
        return "[]"
    return _dumps(
        [
            {
                "attempt": a.attempt,
                "start_time": a.start_time,
                "end_time": a.end_time,
                "outcome": None if a.outcome is None else _error_obj(a.outcome),
                "worker_id": a.worker_id,
            }
            for a in attempts
        ]
    )


def _attempts_from(text: str) -> tuple[AttemptRecord, ...]:
    return tuple(
        AttemptRecord(
            int(a["attempt"]),
            float(a["start_time"]),
            float(a["end_time"]),
            None if a["outcome"] is None else _error_from(a["outcome"]),
            a["worker_id"],
        )
        for a in json.loads(text)
    )


def job_to_row(job: Job) -> Row:
    """Serialize in the caller's thread, so later changes to ``job`` cannot race with the writer.

    The computed fields (queue_position, wait_reason, wait_message) are not stored.
    """
    error = None if job.error is None else _dumps(_error_obj(job.error))
    return (
        job.id,
        job.type,
        int(job.state),
        job.priority,
        _dumps(job.params) if job.params else "{}",
        _dumps(job.labels) if job.labels else "{}",
        job.create_time,
        job.update_time,
        job.queue_time,
        job.attempt,
        _progress_json(job.progress),
        None if job.result is None else _dumps(job.result),
        error,
        job.start_time,
        job.end_time,
        job.expire_time,
        job.request_id,
        job.request_fingerprint,
        job.timeout,
        job.cancel_reason,
        job.sequence,
        _retry_policy_json(job.retry_policy),
        job.schedule_time,
        _attempts_json(job.attempts),
        job.worker_id,
        job.lease_expire_time,
        job.lease_epoch,
        job.attempt_base,
    )


def row_to_job(row: Sequence[Any]) -> Job:
    """The inverse of ``job_to_row``."""
    (
        job_id,
        job_type,
        state,
        priority,
        params,
        labels,
        create_time,
        update_time,
        queue_time,
        attempt,
        progress,
        result,
        error,
        start_time,
        end_time,
        expire_time,
        request_id,
        request_fingerprint,
        timeout,
        cancel_reason,
        sequence,
        retry_policy,
        schedule_time,
        attempts,
        worker_id,
        lease_expire_time,
        lease_epoch,
        attempt_base,
    ) = row
    job_progress = None
    if progress is not None:
        p = json.loads(progress)
        job_progress = Progress(p["percent"], p["message"], p["current_step"], p["total_steps"])
    job_error = None if error is None else _error_from(json.loads(error))
    return Job(
        id=job_id,
        type=job_type,
        state=JobState(state),
        priority=priority,
        params=json.loads(params),
        labels=json.loads(labels),
        create_time=create_time,
        update_time=update_time,
        queue_time=queue_time,
        attempt=attempt,
        progress=job_progress,
        result=None if result is None else json.loads(result),
        error=job_error,
        start_time=start_time,
        end_time=end_time,
        expire_time=expire_time,
        request_id=request_id,
        request_fingerprint=request_fingerprint,
        timeout=timeout,
        cancel_reason=cancel_reason,
        sequence=sequence,
        retry_policy=_retry_policy_from(retry_policy),
        schedule_time=schedule_time,
        attempts=_attempts_from(attempts),
        worker_id=worker_id,
        lease_expire_time=lease_expire_time,
        lease_epoch=lease_epoch,
        attempt_base=attempt_base,
    )


def job_type_to_row(job_type: JobType) -> Row:
    retry = job_type.retry
    return (
        job_type.name,
        job_type.timeout,
        job_type.max_running,
        _dumps(
            {
                "max_attempts": retry.max_attempts,
                "initial_backoff": retry.initial_backoff,
                "max_backoff": retry.max_backoff,
                "backoff_multiplier": retry.backoff_multiplier,
            }
        ),
        job_type.last_seen,
    )


def row_to_job_type(row: Sequence[Any]) -> JobType:
    name, timeout, max_running, retry, last_seen = row
    r = json.loads(retry)
    return JobType(
        name=name,
        timeout=timeout,
        max_running=max_running,
        retry=RetryDefaults(
            _optional_int(r["max_attempts"]),
            _optional_float(r["initial_backoff"]),
            _optional_float(r["max_backoff"]),
            _optional_float(r["backoff_multiplier"]),
        ),
        last_seen=last_seen,
    )


# --- operations run by the writer thread, each inside its own SAVEPOINT -------------------------------


def _apply_insert(row: Row, conn: sqlite3.Connection) -> None:
    try:
        conn.execute(_INSERT, row)
    except sqlite3.IntegrityError as exc:
        if "jobs.request_id" in str(exc):
            raise DuplicateRequestId(row[_COLUMNS.index("request_id")]) from exc
        if "jobs.id" in str(exc):
            raise ValueError(f"job {row[0]} already exists") from exc
        raise


def _apply_update(row: Row, expected_state: JobState | None, conn: sqlite3.Connection) -> bool:
    try:
        if expected_state is None:
            cursor = conn.execute(_UPDATE, (*row[1:], row[0]))
        else:
            cursor = conn.execute(_UPDATE_CAS, (*row[1:], row[0], int(expected_state)))
    except sqlite3.IntegrityError as exc:
        if "jobs.request_id" in str(exc):
            raise DuplicateRequestId(row[_COLUMNS.index("request_id")]) from exc
        raise
    return cursor.rowcount == 1


def _apply_purge(now: float, conn: sqlite3.Connection) -> int:
    return conn.execute(_PURGE, (now,)).rowcount


def _apply_save_job_types(rows: list[Row], conn: sqlite3.Connection) -> None:
    conn.executemany(_SAVE_JOB_TYPE, rows)  # in order, so a name given twice keeps its last row


def _apply_delete_job_types(names: list[str], conn: sqlite3.Connection) -> None:
    conn.executemany("DELETE FROM job_types WHERE name = ?", [(name,) for name in names])


# --- reads, run by the reader thread ---------------------------------------------------------------


def _read_get(job_id: str, conn: sqlite3.Connection) -> Job | None:
    row = conn.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else row_to_job(row)


def _read_by_request_id(request_id: str, conn: sqlite3.Connection) -> Job | None:
    # The literal "request_id <> ''" lets SQLite use the partial unique index.
    row = conn.execute(f"{_SELECT} WHERE request_id = ? AND request_id <> ''", (request_id,)).fetchone()
    return None if row is None else row_to_job(row)


def list_sql(query: JobQuery) -> tuple[str, list[object]]:
    """The SELECT for one page of a listing, and its parameters."""
    where: list[str] = []
    args: list[object] = []
    if query.before_id is not None:
        where.append("id < ?")
        args.append(query.before_id)
    job_filter = query.filter
    if job_filter.states:
        where.append(f"state IN ({', '.join('?' * len(job_filter.states))})")
        args.extend(sorted(int(s) for s in job_filter.states))
    if job_filter.types:
        where.append(f"type IN ({', '.join('?' * len(job_filter.types))})")
        args.extend(sorted(job_filter.types))
    for key, value in job_filter.labels:
        # json_each rather than json_extract(labels, '$.key'): label keys may hold '.', '"' or '['.
        where.append("EXISTS (SELECT 1 FROM json_each(jobs.labels) AS l WHERE l.key = ? AND l.value = ?)")
        args.extend((key, value))
    if job_filter.create_time_start is not None:
        where.append("create_time >= ?")
        args.append(job_filter.create_time_start)
    if job_filter.create_time_end is not None:
        where.append("create_time < ?")
        args.append(job_filter.create_time_end)
    select = _SELECT if query.with_payload else _SELECT_BASIC
    sql = select + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
    args.append(query.limit)
    return sql, args


def _read_list(query: JobQuery, conn: sqlite3.Connection) -> list[Job]:
    sql, args = list_sql(query)
    return [row_to_job(row) for row in conn.execute(sql, args).fetchall()]


def _read_unfinished(conn: sqlite3.Connection) -> list[Job]:
    return [row_to_job(row) for row in conn.execute(_UNFINISHED).fetchall()]


def _read_job_types(conn: sqlite3.Connection) -> list[JobType]:
    return [row_to_job_type(row) for row in conn.execute(_LOAD_JOB_TYPES).fetchall()]


def _read_count(conn: sqlite3.Connection) -> list[JobCount]:
    return [
        JobCount(JobState(state), job_type, priority, n)
        for state, job_type, priority, n in conn.execute(_COUNT).fetchall()
    ]


# --- the writer thread's plumbing ------------------------------------------------------------------


@dataclass(slots=True)
class _Op(Generic[_T]):
    """One queued write: what to run in the transaction, and whom to tell the outcome."""

    apply: Callable[[sqlite3.Connection], _T]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[_T]


class _ProgressNote(NamedTuple):
    progress: Progress | None
    sequence: int
    update_time: float


_Outcome = tuple[_Op[Any], Any, BaseException | None]


def _settle(outcomes: Sequence[_Outcome]) -> None:
    """Resolve futures from the writer thread: one loop wake-up per event loop, not one per op."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].loop, []).append(outcome)
    for loop, group in by_loop.items():
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed, nobody waits any more
            loop.call_soon_threadsafe(_resolve, group)


def _resolve(outcomes: Sequence[_Outcome]) -> None:
    for op, result, exc in outcomes:
        if op.future.done():  # the caller was cancelled; the write happened anyway
            continue
        if exc is None:
            op.future.set_result(result)
        else:
            op.future.set_exception(exc)


def _settle_ready(ready: asyncio.Future[None], exc: BaseException | None) -> None:
    if ready.done():  # open() was cancelled
        return
    if exc is None:
        ready.set_result(None)
    else:
        ready.set_exception(exc)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to ``len(MIGRATIONS)`` in one IMMEDIATE transaction, safe against a racing process."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database schema version {version} is newer than this Jobwire "
                f"understands ({len(MIGRATIONS)})"
            )
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class StoreInUse(RuntimeError):
    """Another process has this SQLite store open."""


class ProcessLock:
    """An exclusive lock on ``<database>.lock``, held while a store is open.

    Why: two servers on one SQLite file would each hold the live state of the same jobs and silently
    diverge (SQLite's own locking only serializes their writes). Several servers sharing one store is
    what the PostgreSQL store is for. ``flock`` is released by the kernel when the process dies, so a
    crash never leaves a stale lock; the file keeps the holder's pid only to name it in the message.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, database: str) -> ProcessLock:
        path = os.path.abspath(database) + ".lock"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreInUse(
                f"another Jobwire server (pid {holder}) is using {os.path.abspath(database)}; stop it "
                "first, or use a PostgreSQL store to run several servers on one store"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class SqliteStore(JobStore):
    """A JobStore in one SQLite file. Create, ``await open()``, use, ``await close()``."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        max_batch: int = 256,
        progress_flush_interval: float = 0.2,
    ) -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {sorted(SYNCHRONOUS_MODES)}, not {synchronous!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if progress_flush_interval <= 0:
            raise ValueError("progress_flush_interval must be positive")
        if path in ("", ":memory:") or path.startswith("file:"):
            raise ValueError(
                "SqliteStore needs a file path (the writer and reader use separate "
                "connections); use the memory: store for an in-memory one"
            )
        self.path = path
        self.synchronous = synchronous.upper()
        self.max_batch = max_batch
        self.progress_flush_interval = progress_flush_interval
        # Transactions committed by the writer thread; lets tests and metrics see group commit at work.
        self.commits = 0
        # Guards everything below it that the writer thread shares with the event loop thread.
        self._cond = threading.Condition()
        self._ops: deque[_Op[Any]] = deque()
        self._progress: dict[str, _ProgressNote] = {}
        self._progress_deadline = 0.0
        self._accepting = False
        self._stopping = False
        # Touched only by the event loop thread (open/close/reads).
        self._lifecycle = asyncio.Lock()
        self._writer: threading.Thread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._reader_conn: sqlite3.Connection | None = None
        self._lock: ProcessLock | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._lifecycle:
            if self._writer is not None:
                return
            self._lock = ProcessLock.acquire(self.path)
            loop = asyncio.get_running_loop()
            ready: asyncio.Future[None] = loop.create_future()
            with self._cond:
                self._stopping = False
            writer = threading.Thread(
                target=self._writer_main,
                args=(loop, ready),
                name=f"jobwire-sqlite-writer:{self.path}",
                daemon=True,
            )
            writer.start()
            reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobwire-sqlite-reader")
            try:
                await ready  # the schema exists once the writer says so
                # The reader connection is created on, and confined to, the single reader thread.
                reader_conn = await loop.run_in_executor(reader, self._connect_reader)
            except BaseException:
                with self._cond:
                    self._stopping = True
                    self._cond.notify()
                await asyncio.to_thread(writer.join)
                reader.shutdown(wait=False)
                self._release_lock()
                raise
            self._writer, self._reader, self._reader_conn = writer, reader, reader_conn
            with self._cond:
                self._accepting = True

    async def close(self) -> None:
        async with self._lifecycle:
            writer, reader, reader_conn = self._writer, self._reader, self._reader_conn
            if writer is None or reader is None or reader_conn is None:
                return
            with self._cond:
                self._accepting = False
                self._stopping = True
                self._cond.notify()
            await asyncio.to_thread(writer.join)  # the writer drains the queue and pending progress first
            # Reads already submitted run before the close; later ones see _reader_conn None and refuse.
            self._reader_conn = None
            await asyncio.get_running_loop().run_in_executor(reader, reader_conn.close)
            reader.shutdown(wait=False)
            self._writer = self._reader = None
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _connect(self) -> sqlite3.Connection:
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), never implicit.
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only = ON")
        return conn

    # --- writes --------------------------------------------------------------------------------------

    async def _submit(self, apply: Callable[[sqlite3.Connection], _T]) -> _T:
        """Queue one write for the writer's next transaction and wait until it is committed.

        If the caller is cancelled meanwhile, the write still happens; only its outcome is dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        with self._cond:
            if not self._accepting:
                raise RuntimeError("SqliteStore is not open")
            self._ops.append(_Op(apply, loop, future))
            self._cond.notify()
        return await future

    async def insert(self, job: Job) -> None:
        await self._submit(functools.partial(_apply_insert, job_to_row(job)))

    async def update(self, job: Job, expected_state: JobState | None = None) -> bool:
        return await self._submit(functools.partial(_apply_update, job_to_row(job), expected_state))

    def record_progress(self, job: Job) -> None:
        """Note the latest progress in a dict under a lock held only for microseconds; never does I/O."""
        progress = job.progress
        note = _ProgressNote(
            None
            if progress is None
            else Progress(progress.percent, progress.message, progress.current_step, progress.total_steps),
            job.sequence,
            job.update_time,
        )
        with self._cond:
            if not self._accepting:
                return  # closed: progress is advisory, so dropping it is allowed
            previous = self._progress.get(job.id)
            if previous is not None and previous.sequence > note.sequence:
                return
            if not self._progress:
                self._progress_deadline = time.monotonic() + self.progress_flush_interval
                self._cond.notify()
            self._progress[job.id] = note

    async def purge_expired(self, now: float) -> int:
        return await self._submit(functools.partial(_apply_purge, now))

    async def save_job_types(self, job_types: builtins.list[JobType]) -> None:
        rows = [job_type_to_row(job_type) for job_type in job_types]  # in the caller's thread, like jobs
        await self._submit(functools.partial(_apply_save_job_types, rows))

    async def delete_job_types(self, names: builtins.list[str]) -> None:
        await self._submit(functools.partial(_apply_delete_job_types, list(names)))

    # --- the writer thread ---------------------------------------------------------------------------

    def _writer_main(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        """Open, migrate, then commit batches until told to stop with nothing left to write."""
        try:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            conn = self._connect()
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise RuntimeError(f"could not switch {self.path} to WAL mode (got {mode})")
                _migrate(conn)
            except BaseException:
                conn.close()
                raise
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle_ready, ready, exc)
            return
        loop.call_soon_threadsafe(_settle_ready, ready, None)
        try:
            while True:
                batch, progress = self._next_batch()
                if not batch and not progress:
                    return
                self._write(conn, batch, progress)
        finally:
            conn.close()
            with self._cond:  # only after a bug in this loop: fail whatever is left rather than hang
                self._accepting = False
                leftover = list(self._ops)
                self._ops.clear()
            if leftover:
                _settle([(op, None, RuntimeError("the SQLite writer thread stopped")) for op in leftover])

    def _next_batch(self) -> tuple[list[_Op[Any]], dict[str, _ProgressNote]]:
        """Wait for work: queued ops (take up to max_batch), or due progress; empty only when stopping."""
        with self._cond:
            while not self._ops:
                if self._progress:
                    remaining = self._progress_deadline - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
                elif self._stopping:
                    break
                else:
                    self._cond.wait()
            batch = [self._ops.popleft() for _ in range(min(self.max_batch, len(self._ops)))]
            progress, self._progress = self._progress, {}
            return batch, progress

    def _write(
        self, conn: sqlite3.Connection, batch: list[_Op[Any]], progress: dict[str, _ProgressNote]
    ) -> None:
        """Run the batch in one transaction.

        Optimistically without savepoints (the common case: every op succeeds); if one fails, the
        transaction is rolled back and replayed with a SAVEPOINT per op, so a failure reaches only
        that op's caller.
        """
        if not self._write_batch(conn, batch, progress, isolate=False):
            self._write_batch(conn, batch, progress, isolate=True)

    def _write_batch(
        self,
        conn: sqlite3.Connection,
        batch: list[_Op[Any]],
        progress: dict[str, _ProgressNote],
        *,
        isolate: bool,
    ) -> bool:
        """One attempt at committing the batch; False (rolled back) if an op failed and not ``isolate``."""
        outcomes: list[_Outcome] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                if not isolate:
                    try:
                        outcomes.append((op, op.apply(conn), None))
                    except Exception:
                        conn.execute("ROLLBACK")
                        return False
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    result = op.apply(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((op, None, exc))
                else:
                    conn.execute("RELEASE op")
                    outcomes.append((op, result, None))
            # After the ops, so a note recorded before an update in this batch loses to it (sequence check).
            if progress:
                self._flush_progress(conn, progress)
            conn.execute("COMMIT")
        except Exception as exc:
            _log.exception("SQLite transaction of %d writes failed", len(batch))
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    _log.exception("SQLite rollback failed")
            outcomes = [(op, None, exc) for op in batch]
        else:
            self.commits += 1
        _settle(outcomes)
        return True

    @staticmethod
    def _flush_progress(conn: sqlite3.Connection, progress: dict[str, _ProgressNote]) -> None:
        rows = [
            (_progress_json(note.progress), note.sequence, note.update_time, job_id, note.sequence)
            for job_id, note in progress.items()
        ]
        conn.execute("SAVEPOINT progress")
        try:
            conn.executemany(_FLUSH_PROGRESS, rows)
        except sqlite3.Error:
            # Advisory data: losing one flush must not fail the state changes committed with it.
            _log.exception("flushing %d progress notes failed", len(rows))
            conn.execute("ROLLBACK TO progress")
        conn.execute("RELEASE progress")

    # --- reads ---------------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        reader, conn = self._reader, self._reader_conn
        if reader is None or conn is None:
            raise RuntimeError("SqliteStore is not open")
        return await asyncio.get_running_loop().run_in_executor(reader, fn, conn)

    async def get(self, job_id: str) -> Job | None:
        return await self._read(functools.partial(_read_get, job_id))

    async def get_by_request_id(self, request_id: str) -> Job | None:
        if not request_id:
            return None
        return await self._read(functools.partial(_read_by_request_id, request_id))

    async def list(self, query: JobQuery) -> list[Job]:
        if query.limit <= 0:  # SQLite reads LIMIT -1 as "no limit"
            return []
        return await self._read(functools.partial(_read_list, query))

    async def load_unfinished(self) -> builtins.list[Job]:
        return await self._read(_read_unfinished)

    async def count(self) -> builtins.list[JobCount]:
        return await self._read(_read_count)

    async def load_job_types(self) -> builtins.list[JobType]:
        return await self._read(_read_job_types)
