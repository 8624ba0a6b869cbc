"""The SQLite store: one file in WAL mode, one writer thread doing group commit, one reader thread.

Why this shape: sqlite3 calls block, so none may run on the event loop. SQLite admits one writer at a
time anyway, so a single writer thread that commits everything waiting in ONE transaction (group
commit) turns N concurrent writes into a handful of fsyncs instead of N. WAL lets the reader thread see
committed rows while the writer is busy. Progress notes are frequent, so they are coalesced in a dict
(latest wins per job) and ride along with the next transaction, or are flushed on a short timer.

The changes a transaction commits go to the feed on the event loop right after the commit, and before
the callers that made them are answered: a submit's job is in every queue view when SubmitJob returns.
One process only (``ProcessLock``): several servers on one store is what PostgreSQL is for.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import functools
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from jobwire.handlers.api import Progress
from jobwire.server.audit import MAX_AUDIT_ENTRIES, AuditEntry, attempt_started
from jobwire.server.changes import ChangeKind, ChangeListener, JobChange
from jobwire.server.job import Job
from jobwire.server.job_types import JobType
from jobwire.server.state_machine import ACTIVE_STATES, TERMINAL_STATES, JobState
from jobwire.server.stores.base import (
    Claim,
    DuplicateRequestId,
    Expect,
    JobCount,
    JobFilter,
    JobQuery,
    JobStore,
    QueuedJob,
    RateLimited,
    SubmitRate,
)
from jobwire.server.stores.batches import Outcomes, ProgressNote
from jobwire.server.stores.rows import (
    AUDIT_COLUMNS,
    BASIC_COLUMNS,
    CHANGE_COLUMNS,
    COLUMNS,
    QUEUE_COLUMNS,
    Row,
    audit_to_row,
    changed_columns,
    job_to_row,
    job_type_to_row,
    order_sql,
    progress_json,
    row_to_audit,
    row_to_job,
    row_to_job_type,
    row_to_progress_change,
)

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
    # 3: replicas: the executor an attempt was claimed for (routes the claim; finds a dead replica's).
    ("ALTER TABLE jobs ADD COLUMN executor TEXT NOT NULL DEFAULT ''",),
    # 4: tenants (request_ids unique per tenant), who submitted, type ownership, the audit trail, and
    # the tenants' submit buckets.
    (
        "ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'",
        "ALTER TABLE jobs ADD COLUMN created_by TEXT NOT NULL DEFAULT ''",
        "DROP INDEX jobs_request_id",
        "CREATE UNIQUE INDEX jobs_tenant_request_id ON jobs (tenant, request_id) WHERE request_id <> ''",
        "CREATE INDEX jobs_tenant_id ON jobs (tenant, id)",
        "ALTER TABLE job_types ADD COLUMN tenant TEXT NOT NULL DEFAULT ''",
        """
        CREATE TABLE job_audit (
            id          INTEGER PRIMARY KEY,    -- increasing: the order entries were written
            job_id      TEXT NOT NULL,
            time        REAL NOT NULL,
            action      TEXT NOT NULL,
            principal   TEXT NOT NULL,
            request_id  TEXT NOT NULL,
            peer        TEXT NOT NULL,
            detail      TEXT NOT NULL
        )
        """,
        "CREATE INDEX job_audit_job_id ON job_audit (job_id, id)",
        """
        CREATE TABLE tenant_rates (
            tenant      TEXT PRIMARY KEY,
            tokens      REAL NOT NULL,          -- left in the bucket when last counted
            updated     REAL NOT NULL           -- when they were counted
        )
        """,
    ),  # 5: job counts kept by triggers as jobs are stored, change state or priority, and are purged, so
    # that GetQueueStats reads a few rows instead of counting every job (rows at 0 are kept).
    (
        """
        CREATE TABLE job_counts (
            state       INTEGER NOT NULL,
            type        TEXT NOT NULL,
            priority    INTEGER NOT NULL,
            tenant      TEXT NOT NULL,
            n           INTEGER NOT NULL,
            PRIMARY KEY (state, type, priority, tenant)
        ) WITHOUT ROWID
        """,
        "INSERT INTO job_counts SELECT state, type, priority, tenant, COUNT(*) FROM jobs GROUP BY 1, 2, 3, 4",
        """
        CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN
            INSERT INTO job_counts VALUES (new.state, new.type, new.priority, new.tenant, 1)
                ON CONFLICT (state, type, priority, tenant) DO UPDATE SET n = n + 1;
        END
        """,
        """
        CREATE TRIGGER jobs_counted_update AFTER UPDATE OF state, priority ON jobs
        WHEN old.state <> new.state OR old.priority <> new.priority BEGIN
            UPDATE job_counts SET n = n - 1 WHERE state = old.state AND type = old.type
                AND priority = old.priority AND tenant = old.tenant;
            INSERT INTO job_counts VALUES (new.state, new.type, new.priority, new.tenant, 1)
                ON CONFLICT (state, type, priority, tenant) DO UPDATE SET n = n + 1;
        END
        """,
        """
        CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs BEGIN
            UPDATE job_counts SET n = n - 1 WHERE state = old.state AND type = old.type
                AND priority = old.priority AND tenant = old.tenant;
        END
        """,
    ),
    # 6: how long a job is kept once it ends, when it set its own retention.
    ("ALTER TABLE jobs ADD COLUMN retention REAL",),
)


_SELECT = f"SELECT {', '.join(COLUMNS)} FROM jobs"
_SELECT_BASIC = f"SELECT {', '.join(BASIC_COLUMNS)} FROM jobs"
_RETURNING = f" RETURNING {', '.join(COLUMNS)}"
_INSERT = f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_ACTIVE = ", ".join(str(int(s)) for s in sorted(ACTIVE_STATES))
_TERMINAL = ", ".join(str(int(s)) for s in sorted(TERMINAL_STATES))
_CLAIM = (
    "UPDATE jobs SET state = 2, attempt = MAX(attempt, 1), start_time = ?, error = NULL, result = NULL, "
    "worker_id = ?, executor = ?, lease_epoch = lease_epoch + 1, lease_expire_time = ?, "
    "schedule_time = NULL, update_time = ?, sequence = sequence + 1 WHERE id = ? AND state = 1" + _RETURNING
)
# Fenced by the lease: a note from an attempt that lost its lease changes nothing.
# Progress notes, many at once: (id, progress, time, lease epoch) rows, each fenced by its lease.
_PROGRESS = (
    "UPDATE jobs SET progress = v.column2, update_time = v.column3, sequence = sequence + 1 "
    "FROM (VALUES {rows}) AS v WHERE jobs.id = v.column1 AND jobs.lease_epoch = v.column4 "
    f"AND jobs.state IN ({_ACTIVE}) RETURNING {', '.join(f'jobs.{c}' for c in CHANGE_COLUMNS)}"
)
_RENEW = (
    "UPDATE jobs SET lease_expire_time = MAX(COALESCE(lease_expire_time, 0), ?) "
    f"WHERE id = ? AND lease_epoch = ? AND state IN ({_ACTIVE})"
)
_REFRESH_REMOTE = (
    "UPDATE jobs SET lease_expire_time = MAX(COALESCE(lease_expire_time, 0), ?) "
    f"WHERE state IN ({_ACTIVE}) AND worker_id <> 'local'"
)
# "+state" keeps the planner off the state index: most stored jobs are finished, so only the expire_time
# index (set on finished jobs only) narrows a purge down to the rows it deletes.
_PURGE = f"DELETE FROM jobs WHERE expire_time <= ? AND +state IN ({_TERMINAL})"
_QUEUE = f"SELECT {', '.join(QUEUE_COLUMNS)} FROM jobs WHERE state = 1 ORDER BY id"
_ACTIVE_JOBS = f"{_SELECT_BASIC} WHERE state IN ({_ACTIVE}) ORDER BY id"
_COUNT = (
    "SELECT state, type, priority, SUM(n) FROM job_counts{where} GROUP BY state, type, priority "
    "HAVING SUM(n) > 0 ORDER BY 1, 2, 3"
)
# A type is replaced only by its own tenant's declaration (no row changes otherwise).
_SAVE_JOB_TYPE = (
    "INSERT INTO job_types (name, timeout, max_running, retry, last_seen, tenant) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET timeout = excluded.timeout, max_running = excluded.max_running, "
    "retry = excluded.retry, last_seen = excluded.last_seen WHERE job_types.tenant = excluded.tenant"
)
_LOAD_JOB_TYPES = "SELECT name, timeout, max_running, retry, last_seen, tenant FROM job_types ORDER BY name"
_AUDIT = f"INSERT INTO job_audit ({', '.join(AUDIT_COLUMNS[:-1])}) VALUES (?, ?, ?, ?, ?, ?, ?)"
# Keep a job's most recent MAX_AUDIT_ENTRIES entries: run when it goes back into the queue, the only way
# its trail can keep growing.
_TRIM_AUDIT = (
    "DELETE FROM job_audit WHERE job_id = ?1 AND id <= "
    f"(SELECT id FROM job_audit WHERE job_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET {MAX_AUDIT_ENTRIES})"
)
_LIST_AUDIT = (
    f"SELECT {', '.join(AUDIT_COLUMNS)} FROM job_audit WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?"
)
_PURGE_AUDIT = (
    "DELETE FROM job_audit WHERE job_id IN "
    f"(SELECT id FROM jobs WHERE expire_time <= ? AND +state IN ({_TERMINAL}))"
)
# ?5 tokens from the tenant's bucket: refilled for the time since it was last counted, capped at the
# burst. No row changes (rowcount 0) when the bucket holds fewer. The time counted never goes
# back, so replicas whose clocks differ cannot refill the bucket twice for the same seconds.
_TAKE_TOKEN = (
    "INSERT INTO tenant_rates (tenant, tokens, updated) VALUES (?1, ?2 - ?5, ?3) "
    "ON CONFLICT (tenant) DO UPDATE SET tokens = MIN(?2, tokens + MAX(0, ?3 - updated) * ?4) - ?5, "
    "updated = MAX(updated, ?3) WHERE MIN(?2, tokens + MAX(0, ?3 - updated) * ?4) >= ?5"
)
_BUCKET = "SELECT MIN(?2, tokens + MAX(0, ?3 - updated) * ?4) FROM tenant_rates WHERE tenant = ?1"

Changes = list[JobChange]


# --- operations run by the writer thread: each returns its result and the changes it made -----------


# Rows per INSERT statement when a batch is stored. sqlite3 lets go of the GIL around every statement it
# steps, and while the event loop is busy each taking-back can wait a whole switch interval (5 ms): with
# executemany that is per row. One statement per 100 rows waits 100 times less (3,100 parameters, well
# under SQLite's 32,766).
_ROWS_PER_INSERT = 100


_JOB_ROW = f"({', '.join('?' * len(COLUMNS))})"
_AUDIT_ROW = f"({', '.join('?' * (len(AUDIT_COLUMNS) - 1))})"


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_rows(count: int) -> str:
    return f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES {', '.join([_JOB_ROW] * count)}"


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _progress_rows(count: int) -> str:
    return _PROGRESS.format(rows=", ".join(["(?, ?, ?, ?)"] * count))


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _audit_rows(count: int) -> str:
    return f"INSERT INTO job_audit ({', '.join(AUDIT_COLUMNS[:-1])}) VALUES {', '.join([_AUDIT_ROW] * count)}"


def _take_tokens(tenant: str, rate: SubmitRate, now: float, conn: sqlite3.Connection) -> float:
    """0 when ``rate.jobs`` tokens were taken from the tenant's bucket, else the seconds until they are
    there."""
    args = (tenant, rate.burst, now, rate.per_second)
    if conn.execute(_TAKE_TOKEN, (*args, rate.jobs)).rowcount == 1:
        return 0.0
    tokens: float = conn.execute(_BUCKET, args).fetchone()[0]
    return max(0.001, (rate.jobs - tokens) / rate.per_second)


def _used_request_ids(jobs: Sequence[Job], conn: sqlite3.Connection) -> list[str]:
    """The batch's request_ids that its tenant has already used, or that repeat within the batch."""
    wanted = [job.request_id for job in jobs if job.request_id]
    if not wanted:
        return []
    marks = ", ".join("?" * len(wanted))
    stored = conn.execute(
        f"SELECT request_id FROM jobs WHERE tenant = ? AND request_id IN ({marks})", (jobs[0].tenant, *wanted)
    ).fetchall()
    counts = Counter(wanted)
    return sorted({row[0] for row in stored} | {rid for rid, n in counts.items() if n > 1})


def _apply_insert(
    jobs: Sequence[Job],
    rows: list[Row],
    audits: list[Row],
    rate: SubmitRate | None,
    conn: sqlite3.Connection,
) -> tuple[float, Changes]:
    """Returns 0, or (nothing stored) the seconds until the tenant's bucket has the tokens again."""
    if len(jobs) > 1 and (used := _used_request_ids(jobs, conn)):
        raise DuplicateRequestId(used)
    if rate is not None:
        wait = _take_tokens(jobs[0].tenant, rate, jobs[0].create_time, conn)
        if wait:
            return wait, []
    try:
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[start : start + _ROWS_PER_INSERT]
            conn.execute(_insert_rows(len(chunk)), list(itertools.chain.from_iterable(chunk)))
    except sqlite3.IntegrityError as exc:
        if "jobs.tenant, jobs.request_id" in str(exc):
            raise DuplicateRequestId([job.request_id for job in jobs if job.request_id]) from exc
        if "jobs.id" in str(exc):
            raise ValueError(f"a job of {[job.id for job in jobs][:5]} already exists") from exc
        raise
    for start in range(0, len(audits), _ROWS_PER_INSERT):
        chunk = audits[start : start + _ROWS_PER_INSERT]
        conn.execute(_audit_rows(len(chunk)), list(itertools.chain.from_iterable(chunk)))
    return 0.0, [JobChange.of(job, ChangeKind.STATE) for job in jobs]


def _apply_transition(
    sql: str, args: list[Any], audit: Row | None, trim: bool, conn: sqlite3.Connection
) -> tuple[Job | None, Changes]:
    row = conn.execute(sql, args).fetchone()
    if row is None:
        return None, []
    job = row_to_job(row)
    if audit is not None:
        conn.execute(_AUDIT, audit)
    if trim:
        conn.execute(_TRIM_AUDIT, (job.id,))
    return job, [JobChange.of(job, ChangeKind.STATE)]


def _apply_claims(
    rows: list[tuple[Any, ...]], claims: Sequence[Claim], now: float, conn: sqlite3.Connection
) -> tuple[list[Job | None], Changes]:
    claimed: list[Job | None] = []
    changes: Changes = []
    for args, claim in zip(rows, claims, strict=True):
        row = conn.execute(_CLAIM, args).fetchone()
        job = None if row is None else row_to_job(row)
        claimed.append(job)
        if job is not None:
            changes.append(JobChange.of(job, ChangeKind.STATE))
            entry = attempt_started(job.id, job.attempt, job.worker_id, now, claim.principal, claim.peer)
            conn.execute(_AUDIT, audit_to_row(entry))
    return claimed, changes


def _apply_renew(
    until: float, leases: list[tuple[str, int]], conn: sqlite3.Connection
) -> tuple[list[bool], Changes]:
    return [conn.execute(_RENEW, (until, job_id, epoch)).rowcount == 1 for job_id, epoch in leases], []


def _apply_refresh(until: float, conn: sqlite3.Connection) -> tuple[int, Changes]:
    return conn.execute(_REFRESH_REMOTE, (until,)).rowcount, []


def _apply_purge(now: float, conn: sqlite3.Connection) -> tuple[int, Changes]:
    conn.execute(_PURGE_AUDIT, (now,))
    return conn.execute(_PURGE, (now,)).rowcount, []


def _apply_save_job_types(rows: list[Row], conn: sqlite3.Connection) -> tuple[list[str], Changes]:
    # In order, so a name given twice keeps its last row; a row that changed nothing is another tenant's.
    refused = [row[0] for row in rows if conn.execute(_SAVE_JOB_TYPE, row).rowcount == 0]
    return refused, []


def _apply_delete_job_types(names: list[str], conn: sqlite3.Connection) -> tuple[None, Changes]:
    conn.executemany("DELETE FROM job_types WHERE name = ?", [(name,) for name in names])
    return None, []


def transition_sql(
    job_id: str, expect: Expect, target: JobState, changes: Mapping[str, Any], now: float
) -> tuple[str, list[Any]]:
    """The compare-and-set UPDATE of ``JobStore.transition`` and its parameters (in the caller's thread)."""
    pairs = [("state", int(target)), *changed_columns(changes), ("update_time", now)]
    sql = "UPDATE jobs SET " + ", ".join(f"{column} = ?" for column, _ in pairs)
    sql += ", sequence = sequence + 1 WHERE id = ? AND state = ?"
    args: list[Any] = [value for _, value in pairs] + [job_id, int(expect.state)]
    if expect.lease_epoch is not None:
        sql += " AND lease_epoch = ?"
        args.append(expect.lease_epoch)
    if expect.lease_expired_by is not None:
        sql += " AND lease_expire_time <= ?"
        args.append(expect.lease_expired_by)
    return sql + _RETURNING, args


# --- reads, run by the reader thread ---------------------------------------------------------------


def _read_get(job_id: str, conn: sqlite3.Connection) -> Job | None:
    row = conn.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else row_to_job(row)


def _read_by_request_id(tenant: str, request_id: str, conn: sqlite3.Connection) -> Job | None:
    # The literal "request_id <> ''" lets SQLite use the partial unique index.
    row = conn.execute(
        f"{_SELECT} WHERE tenant = ? AND request_id = ? AND request_id <> ''", (tenant, request_id)
    ).fetchone()
    return None if row is None else row_to_job(row)


def _read_audit(job_id: str, after_id: int, limit: int, conn: sqlite3.Connection) -> list[AuditEntry]:
    return [row_to_audit(row) for row in conn.execute(_LIST_AUDIT, (job_id, after_id, limit)).fetchall()]


def list_sql(query: JobQuery) -> tuple[str, list[object]]:
    """The SELECT for one page of a listing, and its parameters."""
    args: list[object] = []

    def arg(value: object) -> str:
        args.append(value)
        return "?"

    where = _filter_where(query.filter, args)  # first: "?" parameters go in the order they appear
    after, order_by = order_sql(query, arg)
    if after is not None:
        where.append(after)
    select = _SELECT if query.with_payload else _SELECT_BASIC
    sql = select + (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY {order_by} LIMIT ?"
    args.append(query.limit)
    return sql, args


def _filter_where(job_filter: JobFilter, args: list[object]) -> list[str]:
    """The conditions of a listing's filter, their parameters appended to ``args``."""
    where: list[str] = []
    if job_filter.tenants:
        where.append(f"tenant IN ({', '.join('?' * len(job_filter.tenants))})")
        args.extend(sorted(job_filter.tenants))
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
    if job_filter.priorities:
        where.append(f"priority IN ({', '.join('?' * len(job_filter.priorities))})")
        args.extend(sorted(job_filter.priorities))
    return where


def _read_count_matching(job_filter: JobFilter, conn: sqlite3.Connection) -> int:
    args: list[object] = []
    where = _filter_where(job_filter, args)
    sql = "SELECT COUNT(*) FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
    count: int = conn.execute(sql, args).fetchone()[0]
    return count


def _read_list(query: JobQuery, conn: sqlite3.Connection) -> list[Job]:
    sql, args = list_sql(query)
    return [row_to_job(row) for row in conn.execute(sql, args).fetchall()]


def _read_queue(conn: sqlite3.Connection) -> list[QueuedJob]:
    return [QueuedJob(*row) for row in conn.execute(_QUEUE).fetchall()]


def _read_active(conn: sqlite3.Connection) -> list[Job]:
    return [row_to_job(row) for row in conn.execute(_ACTIVE_JOBS).fetchall()]


def _read_job_types(conn: sqlite3.Connection) -> list[JobType]:
    return [row_to_job_type(row) for row in conn.execute(_LOAD_JOB_TYPES).fetchall()]


def _read_count(tenants: frozenset[str], conn: sqlite3.Connection) -> list[JobCount]:
    where = f" WHERE tenant IN ({', '.join('?' * len(tenants))})" if tenants else ""
    sql, args = _COUNT.format(where=where), sorted(tenants)
    return [
        JobCount(JobState(state), job_type, priority, n)
        for state, job_type, priority, n in conn.execute(sql, args).fetchall()
    ]


# --- the writer thread's plumbing ------------------------------------------------------------------


@dataclass(slots=True)
class _Op(Generic[_T]):
    """One queued write: what to run in the transaction, and whom to tell the outcome."""

    apply: Callable[[sqlite3.Connection], tuple[_T, Changes]]
    future: asyncio.Future[_T]


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
        progress_flush_interval: float = 0.05,
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
        self._progress: dict[str, ProgressNote] = {}
        self._progress_deadline = 0.0
        self._accepting = False
        self._stopping = False
        # Touched only by the event loop thread (open/close/reads/listeners).
        self._lifecycle = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._reader_conn: sqlite3.Connection | None = None
        self._lock: ProcessLock | None = None
        self._listeners: list[ChangeListener] = []

    # --- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._lifecycle:
            if self._writer is not None:
                return
            self._lock = ProcessLock.acquire(self.path)
            loop = self._loop = asyncio.get_running_loop()
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

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    # --- writes --------------------------------------------------------------------------------------

    async def _submit(self, apply: Callable[[sqlite3.Connection], tuple[_T, Changes]]) -> _T:
        """Queue one write for the writer's next transaction and wait until it is committed.

        If the caller is cancelled meanwhile, the write still happens (and its changes are published);
        only its outcome is dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        with self._cond:
            if not self._accepting:
                raise RuntimeError("SqliteStore is not open")
            self._ops.append(_Op(apply, future))
            self._cond.notify()
        return await future

    async def insert(self, job: Job, audit: AuditEntry | None = None, rate: SubmitRate | None = None) -> None:
        await self.insert_many([job], [] if audit is None else [audit], rate)

    async def insert_many(
        self, jobs: Sequence[Job], audits: Sequence[AuditEntry], rate: SubmitRate | None = None
    ) -> None:
        if not jobs:
            return
        # Rows are made in the caller's thread; the feed carries copies that later edits cannot reach.
        snapshots = [job.copy() for job in jobs]
        rows = [job_to_row(job) for job in jobs]
        entries = [audit_to_row(audit) for audit in audits]
        wait = await self._submit(functools.partial(_apply_insert, snapshots, rows, entries, rate))
        if wait:
            raise RateLimited(wait)

    async def transition(
        self,
        job_id: str,
        expect: Expect,
        target: JobState,
        changes: Mapping[str, Any],
        now: float,
        audit: AuditEntry | None = None,
    ) -> Job | None:
        sql, args = transition_sql(job_id, expect, target, changes, now)
        entry = None if audit is None else audit_to_row(audit)
        trim = target is JobState.QUEUED
        return await self._submit(functools.partial(_apply_transition, sql, args, entry, trim))

    async def claim(
        self, claims: Sequence[Claim], now: float, leader_epoch: int
    ) -> builtins.list[Job | None]:
        rows = [(now, c.worker_id, c.executor, c.lease_until, now, c.job_id) for c in claims]
        return await self._submit(functools.partial(_apply_claims, rows, list(claims), now))

    def record_progress(self, job_id: str, lease_epoch: int, progress: Progress, now: float) -> None:
        """Note the latest progress in a dict under a lock held only for microseconds; never does I/O."""
        note = ProgressNote.of(lease_epoch, progress, now)
        with self._cond:
            if not self._accepting:
                return  # closed: the attempt is being abandoned anyway
            if not self._progress:
                self._progress_deadline = time.monotonic() + self.progress_flush_interval
                self._cond.notify()
            self._progress[job_id] = note

    async def renew_leases(self, leases: Sequence[tuple[str, int]], until: float) -> builtins.list[bool]:
        if not leases:
            return []
        return await self._submit(functools.partial(_apply_renew, until, list(leases)))

    async def refresh_remote_leases(self, until: float) -> int:
        return await self._submit(functools.partial(_apply_refresh, until))

    async def purge_expired(self, now: float) -> int:
        return await self._submit(functools.partial(_apply_purge, now))

    async def save_job_types(self, job_types: builtins.list[JobType]) -> builtins.list[str]:
        rows = [job_type_to_row(job_type) for job_type in job_types]  # in the caller's thread, like jobs
        refused: list[str] = await self._submit(functools.partial(_apply_save_job_types, rows))
        return refused

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
                self._write(conn, loop, batch, progress)
        finally:
            conn.close()
            with self._cond:  # only after a bug in this loop: fail whatever is left rather than hang
                self._accepting = False
                leftover = list(self._ops)
                self._ops.clear()
            if leftover:
                failed = Outcomes(
                    [(op, None, RuntimeError("the SQLite writer thread stopped")) for op in leftover]
                )
                self._settle(loop, failed)

    def _next_batch(self) -> tuple[list[_Op[Any]], dict[str, ProgressNote]]:
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
        self,
        conn: sqlite3.Connection,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Op[Any]],
        progress: dict[str, ProgressNote],
    ) -> None:
        """Run the batch in one transaction, then publish its changes and answer its callers.

        Optimistically without savepoints (the common case: every op succeeds); if one fails, the
        transaction is rolled back and replayed with a SAVEPOINT per op, so a failure reaches only
        that op's caller.
        """
        outcomes = self._write_batch(conn, batch, progress, isolate=False)
        if outcomes is None:
            outcomes = self._write_batch(conn, batch, progress, isolate=True)
        assert outcomes is not None
        self._settle(loop, outcomes)

    def _write_batch(
        self,
        conn: sqlite3.Connection,
        batch: list[_Op[Any]],
        progress: dict[str, ProgressNote],
        *,
        isolate: bool,
    ) -> Outcomes[_Op[Any]] | None:
        """One attempt at committing the batch; None (rolled back) if an op failed and not ``isolate``."""
        outcomes: Outcomes[_Op[Any]] = Outcomes()
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Progress first: a report made before an attempt's end lands before it (the end is queued
            # after the report), and a note from a lease that already ended is refused by its fence.
            if progress:
                outcomes.changes.extend(self._flush_progress(conn, progress))
            for op in batch:
                if not isolate:
                    try:
                        result, changes = op.apply(conn)
                    except Exception:
                        conn.execute("ROLLBACK")
                        return None
                    outcomes.results.append((op, result, None))
                    outcomes.changes.extend(changes)
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    result, changes = op.apply(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.results.append((op, None, exc))
                else:
                    conn.execute("RELEASE op")
                    outcomes.results.append((op, result, None))
                    outcomes.changes.extend(changes)
            conn.execute("COMMIT")
        except Exception as exc:
            _log.exception("SQLite transaction of %d writes failed", len(batch))
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    _log.exception("SQLite rollback failed")
            return Outcomes([(op, None, exc) for op in batch])
        self.commits += 1
        return outcomes

    @staticmethod
    def _flush_progress(conn: sqlite3.Connection, progress: dict[str, ProgressNote]) -> Changes:
        changes: Changes = []
        conn.execute("SAVEPOINT progress")
        try:
            notes = [
                (job_id, progress_json(note.progress), note.time, note.lease_epoch)
                for job_id, note in progress.items()
            ]
            for start in range(0, len(notes), _ROWS_PER_INSERT):  # one statement per 100 notes
                chunk = notes[start : start + _ROWS_PER_INSERT]
                rows = conn.execute(_progress_rows(len(chunk)), list(itertools.chain.from_iterable(chunk)))
                # Only what changed, not the whole job: decoding every row would cost more than the note.
                changes.extend(
                    row_to_progress_change(row, progress[row[0]].progress, progress[row[0]].time)
                    for row in rows.fetchall()
                )
        except sqlite3.Error:
            # Progress is not worth failing the state changes committed with it.
            _log.exception("writing %d progress notes failed", len(progress))
            conn.execute("ROLLBACK TO progress")
            changes = []
        conn.execute("RELEASE progress")
        return changes

    def _settle(self, loop: asyncio.AbstractEventLoop, outcomes: Outcomes[_Op[Any]]) -> None:
        """Hand a committed transaction to the event loop: one wake-up for the whole batch."""
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed, nobody waits any more
            loop.call_soon_threadsafe(self._resolve, outcomes)

    def _resolve(self, outcomes: Outcomes[_Op[Any]]) -> None:
        """On the loop: publish the changes first, then answer the callers (see the module docstring)."""
        if outcomes.changes:
            for listener in self._listeners:
                try:
                    listener(outcomes.changes)
                except Exception:
                    _log.exception("a change listener failed")
        for op, result, exc in outcomes.results:
            if op.future.done():  # the caller was cancelled; the write happened anyway
                continue
            if exc is None:
                op.future.set_result(result)
            else:
                op.future.set_exception(exc)

    # --- reads ---------------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        reader, conn = self._reader, self._reader_conn
        if reader is None or conn is None:
            raise RuntimeError("SqliteStore is not open")
        return await asyncio.get_running_loop().run_in_executor(reader, fn, conn)

    async def get(self, job_id: str) -> Job | None:
        return await self._read(functools.partial(_read_get, job_id))

    async def get_by_request_id(self, tenant: str, request_id: str) -> Job | None:
        if not request_id:
            return None
        return await self._read(functools.partial(_read_by_request_id, tenant, request_id))

    async def list_audit(self, job_id: str, after_id: int, limit: int) -> builtins.list[AuditEntry]:
        if limit <= 0:
            return []
        return await self._read(functools.partial(_read_audit, job_id, after_id, limit))

    async def list(self, query: JobQuery) -> builtins.list[Job]:
        if query.limit <= 0:  # SQLite reads LIMIT -1 as "no limit"
            return []
        return await self._read(functools.partial(_read_list, query))

    async def count(self, tenants: frozenset[str] = frozenset()) -> builtins.list[JobCount]:
        return await self._read(functools.partial(_read_count, tenants))

    async def count_matching(self, job_filter: JobFilter) -> int:
        return await self._read(functools.partial(_read_count_matching, job_filter))

    async def load_queue(self) -> builtins.list[QueuedJob]:
        return await self._read(_read_queue)

    async def load_active(self) -> builtins.list[Job]:
        return await self._read(_read_active)

    async def load_job_types(self) -> builtins.list[JobType]:
        return await self._read(_read_job_types)
