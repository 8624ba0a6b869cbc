"""The PostgreSQL store: one database shared by any number of Jobwire replicas (docs/architecture.md).

Why asyncpg: it is asyncio-native and fast (a binary protocol implemented in C), and its connections
deliver ``LISTEN`` notifications to callbacks as they arrive while the same connection runs other
queries — which the replica's session connection needs: it listens to the change feed and the control
channel, and holds the advisory locks that say who dispatches and which replicas are alive. (psycopg 3's
``notifies()`` generator blocks the connection it reads from.)

Three kinds of connection per replica:

- the **writer**: one connection, one task, group commit. Writes queue up while a transaction runs;
  the next transaction takes them all (like the SQLite writer thread). The changes a transaction makes
  are announced in the same transaction (``pg_notify``, one message per batch of changes, each under the
  8,000-byte payload limit), so other replicas hear of exactly what committed, in commit order. Each
  state transition also keeps a snapshot of the job, without its params, in ``job_changes``: watchers
  on other replicas read it, and a watcher resuming after its replica died replays from it.
- the **session**: LISTEN on the change and control channels; a session-level advisory lock per
  replica (alive while the connection is: a SIGKILLed replica's lock is released at once) and, on the
  dispatcher, the dispatcher lock.
- a **pool** for reads.

Every replica uses the schema named in the URL (``?schema=``, default ``jobwire``), created and
migrated on start under an advisory lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from jobwire.handlers.api import Progress
from jobwire.server.audit import ATTEMPT_STARTED, MAX_AUDIT_ENTRIES, AuditEntry
from jobwire.server.changes import ChangeKind, ChangeListener, JobChange
from jobwire.server.cluster import (
    Cluster,
    ClusterStatus,
    Credits,
    DispatcherUp,
    ExecutorDown,
    ExecutorInfo,
    ExecutorUp,
    LeadershipHandler,
    Message,
    MessageHandler,
    StatusUpdate,
    TypesChanged,
    TypeStatus,
)
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
    COLUMNS,
    QUEUE_COLUMNS,
    audit_to_row,
    changed_columns,
    job_to_row,
    job_type_to_row,
    order_sql,
    progress_json,
    row_to_audit,
    row_to_job,
    row_to_job_type,
)

log = logging.getLogger("jobwire.stores.postgres")

_T = TypeVar("_T")

DEFAULT_SCHEMA = "jobwire"
NOTIFY_LIMIT = 7_900  # bytes of one NOTIFY payload (PostgreSQL refuses 8,000 and more)
TAKEOVER_POLL = 0.5  # seconds between two tries for the dispatcher lock
MAX_BATCH = 256  # writes per transaction at most
COUNT_FOLD_INTERVAL = 1.0  # seconds between two folds of the job count deltas

# Numbered migrations: MIGRATIONS[n - 1] takes the schema from version n - 1 to n. Append only.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE jobs (
            id                  TEXT PRIMARY KEY,
            type                TEXT NOT NULL,
            state               INTEGER NOT NULL,
            priority            INTEGER NOT NULL,
            params              TEXT NOT NULL,
            labels              TEXT NOT NULL,
            create_time         DOUBLE PRECISION NOT NULL,
            update_time         DOUBLE PRECISION NOT NULL,
            queue_time          DOUBLE PRECISION NOT NULL,
            attempt             INTEGER NOT NULL,
            progress            TEXT,
            result              TEXT,
            error               TEXT,
            start_time          DOUBLE PRECISION,
            end_time            DOUBLE PRECISION,
            expire_time         DOUBLE PRECISION,
            request_id          TEXT NOT NULL DEFAULT '',
            request_fingerprint TEXT NOT NULL DEFAULT '',
            timeout             DOUBLE PRECISION,
            cancel_reason       TEXT NOT NULL DEFAULT '',
            sequence            BIGINT NOT NULL,
            retry_policy        TEXT NOT NULL,
            schedule_time       DOUBLE PRECISION,
            attempts            TEXT NOT NULL DEFAULT '[]',
            worker_id           TEXT NOT NULL DEFAULT '',
            lease_expire_time   DOUBLE PRECISION,
            lease_epoch         BIGINT NOT NULL DEFAULT 0,
            attempt_base        INTEGER NOT NULL DEFAULT 0,
            executor            TEXT NOT NULL DEFAULT '',
            -- Watchers cannot resume from before this sequence: the change snapshots before it are gone.
            changes_kept_from   BIGINT NOT NULL DEFAULT 0
        )
        """,
        "CREATE UNIQUE INDEX jobs_request_id ON jobs (request_id) WHERE request_id <> ''",
        "CREATE INDEX jobs_state_id ON jobs (state, id)",
        "CREATE INDEX jobs_expire_time ON jobs (expire_time) WHERE expire_time IS NOT NULL",
        """
        CREATE TABLE job_types (
            name        TEXT PRIMARY KEY,
            timeout     DOUBLE PRECISION,
            max_running INTEGER,
            retry       TEXT NOT NULL,
            last_seen   DOUBLE PRECISION NOT NULL
        )
        """,
        # The job right after each state transition, without its params (a JSON array of the columns).
        """
        CREATE TABLE job_changes (
            job_id      TEXT NOT NULL,
            sequence    BIGINT NOT NULL,
            snapshot    TEXT NOT NULL,
            created_at  DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (job_id, sequence)
        )
        """,
        "CREATE INDEX job_changes_created_at ON job_changes (created_at)",
        # Who dispatches: the holder of the dispatcher lock bumps the epoch; claims check it.
        """
        CREATE TABLE dispatcher (
            singleton   BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
            epoch       BIGINT NOT NULL,
            replica     TEXT NOT NULL,
            since       DOUBLE PRECISION NOT NULL
        )
        """,
        "INSERT INTO dispatcher (epoch, replica, since) VALUES (0, '', 0)",
        # Control messages too large for a NOTIFY payload travel here; the NOTIFY names the row.
        """
        CREATE TABLE messages (
            id          BIGSERIAL PRIMARY KEY,
            payload     TEXT NOT NULL,
            created_at  DOUBLE PRECISION NOT NULL
        )
        """,
    ),
    # 2: tenants (request_ids unique per tenant), who submitted, type ownership, the audit trail, and
    # the tenants' submit buckets.
    (
        "ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'",
        "ALTER TABLE jobs ADD COLUMN created_by TEXT NOT NULL DEFAULT ''",
        "DROP INDEX jobs_request_id",
        "CREATE UNIQUE INDEX jobs_tenant_request_id ON jobs (tenant, request_id) WHERE request_id <> ''",
        "CREATE INDEX jobs_tenant_id ON jobs (tenant, id)",
        "ALTER TABLE job_types ADD COLUMN tenant TEXT NOT NULL DEFAULT ''",
        # Ids are taken while the job's row is locked by the change they record: in commit order per job.
        """
        CREATE TABLE job_audit (
            id          BIGSERIAL PRIMARY KEY,
            job_id      TEXT NOT NULL,
            time        DOUBLE PRECISION NOT NULL,
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
            tokens      DOUBLE PRECISION NOT NULL,
            updated     DOUBLE PRECISION NOT NULL
        )
        """,
    ),  # 3: job counts for GetQueueStats, kept without a hot row: every change of a job's state or priority
    # (and every insert and delete) appends a delta, and the deltas are folded into job_counts about
    # once a second by one replica at a time. A count reads job_counts plus the deltas not yet folded.
    (
        """
        CREATE TABLE job_counts (
            state       INTEGER NOT NULL,
            type        TEXT NOT NULL,
            priority    INTEGER NOT NULL,
            tenant      TEXT NOT NULL,
            n           BIGINT NOT NULL,
            PRIMARY KEY (state, type, priority, tenant)
        )
        """,
        """
        CREATE TABLE job_count_deltas (
            state       INTEGER NOT NULL,
            type        TEXT NOT NULL,
            priority    INTEGER NOT NULL,
            tenant      TEXT NOT NULL,
            n           INTEGER NOT NULL
        )
        """,
        "INSERT INTO job_counts SELECT state, type, priority, tenant, COUNT(*) FROM jobs GROUP BY 1, 2, 3, 4",
        """
        CREATE FUNCTION jobs_count_delta() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'INSERT' THEN
                INSERT INTO job_count_deltas VALUES (OLD.state, OLD.type, OLD.priority, OLD.tenant, -1);
            END IF;
            IF TG_OP <> 'DELETE' THEN
                INSERT INTO job_count_deltas VALUES (NEW.state, NEW.type, NEW.priority, NEW.tenant, 1);
            END IF;
            RETURN NULL;
        END
        $$
        """,
        """
        CREATE TRIGGER jobs_counted AFTER INSERT OR DELETE ON jobs
        FOR EACH ROW EXECUTE FUNCTION jobs_count_delta()
        """,
        """
        CREATE TRIGGER jobs_counted_update AFTER UPDATE OF state, priority ON jobs FOR EACH ROW
        WHEN (OLD.state <> NEW.state OR OLD.priority <> NEW.priority) EXECUTE FUNCTION jobs_count_delta()
        """,
    ),
    # 4: how long a job is kept once it ends, when it set its own retention.
    ("ALTER TABLE jobs ADD COLUMN retention DOUBLE PRECISION",),
)

_COLS = ", ".join(COLUMNS)
_SELECT = f"SELECT {_COLS} FROM jobs"
_SELECT_BASIC = f"SELECT {', '.join(BASIC_COLUMNS)} FROM jobs"
_ACTIVE = ", ".join(str(int(s)) for s in sorted(ACTIVE_STATES))
_TERMINAL = ", ".join(str(int(s)) for s in sorted(TERMINAL_STATES))
# A change's snapshot: the columns as a JSON array, the params left out (they never change).
_SNAPSHOT = (
    "json_build_array(" + ", ".join("'{}'" if c == "params" else f"u.{c}" for c in COLUMNS) + ")::text"
)
_LOG_CHANGE = (
    "INSERT INTO job_changes (job_id, sequence, snapshot, created_at) "
    f"SELECT u.id, u.sequence, {_SNAPSHOT}, $1 FROM u"
)
_AUDIT_COLS = ", ".join(AUDIT_COLUMNS[:-1])
_INSERT = (
    f"INSERT INTO jobs ({_COLS}) VALUES ({', '.join(f'${i + 1}' for i in range(len(COLUMNS)))}) "
    "ON CONFLICT DO NOTHING RETURNING id"
)
# For a batch (executemany): a job whose request_id is taken fails the statement, it is not skipped.
_INSERT_STRICT = f"INSERT INTO jobs ({_COLS}) VALUES ({', '.join(f'${i + 1}' for i in range(len(COLUMNS)))})"
_INSERT_AUDIT = f"INSERT INTO job_audit ({_AUDIT_COLS}) VALUES ({', '.join(f'${i + 1}' for i in range(7))})"
_COUNT = (
    "SELECT state, type, priority, SUM(n)::bigint FROM (SELECT * FROM job_counts UNION ALL "
    "SELECT * FROM job_count_deltas) c {where}GROUP BY 1, 2, 3 HAVING SUM(n) > 0 ORDER BY 1, 2, 3"
)
# Every delta committed so far, into job_counts (rows in key order: two folds never deadlock).
_FOLD_COUNTS = (
    "WITH folded AS (DELETE FROM job_count_deltas RETURNING *) "
    "INSERT INTO job_counts SELECT state, type, priority, tenant, SUM(n) FROM folded "
    "GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 "
    "ON CONFLICT (state, type, priority, tenant) DO UPDATE SET n = job_counts.n + excluded.n"
)
_USED_REQUEST_IDS = "SELECT request_id FROM jobs WHERE tenant = $1 AND request_id = ANY($2::text[])"
# The job and its audit entry in one statement (one round trip).
_N = len(COLUMNS)
_INSERT_AUDITED = (
    f"WITH i AS ({_INSERT}), a AS (INSERT INTO job_audit ({_AUDIT_COLS}) "
    f"SELECT i.id, ${_N + 1}, ${_N + 2}, ${_N + 3}, ${_N + 4}, ${_N + 5}, ${_N + 6} FROM i) SELECT id FROM i"
)
_TAKE_TOKEN = (
    "INSERT INTO tenant_rates (tenant, tokens, updated) VALUES ($1, $2::float8 - $5::float8, $3) "
    "ON CONFLICT (tenant) DO UPDATE SET "
    "tokens = LEAST($2, tenant_rates.tokens + GREATEST(0, $3 - tenant_rates.updated) * $4) - $5, "
    "updated = GREATEST(tenant_rates.updated, $3) "
    "WHERE LEAST($2, tenant_rates.tokens + GREATEST(0, $3 - tenant_rates.updated) * $4) >= $5 "
    "RETURNING tokens"
)
_BUCKET = "SELECT LEAST($2, tokens + GREATEST(0, $3 - updated) * $4) FROM tenant_rates WHERE tenant = $1"
_TRIM_AUDIT = (
    "DELETE FROM job_audit WHERE job_id = $1 AND id <= "
    f"(SELECT id FROM job_audit WHERE job_id = $1 ORDER BY id DESC LIMIT 1 OFFSET {MAX_AUDIT_ENTRIES})"
)
# Every claim of a batch in one statement: one row per claim from the arrays, each fenced by the epoch.
_CLAIM = (
    "WITH c AS (SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::float8[], $7::text[], "
    "$8::text[]) AS c(id, worker_id, executor, lease_expire_time, principal, peer)), "
    "u AS (UPDATE jobs j SET state = 2, attempt = GREATEST(j.attempt, 1), start_time = $1, error = NULL, "
    "result = NULL, worker_id = c.worker_id, executor = c.executor, lease_epoch = j.lease_epoch + 1, "
    "lease_expire_time = c.lease_expire_time, schedule_time = NULL, update_time = $1, "
    "sequence = j.sequence + 1 FROM c WHERE j.id = c.id AND j.state = 1 "
    f"AND (SELECT epoch FROM dispatcher) = $6 RETURNING {', '.join('j.' + c for c in COLUMNS)}), "
    f"l AS ({_LOG_CHANGE}), "
    f"a AS (INSERT INTO job_audit ({_AUDIT_COLS}) SELECT u.id, $1, '{ATTEMPT_STARTED}', c.principal, '', "
    "c.peer, 'attempt ' || u.attempt || ' on ' || u.worker_id FROM u JOIN c ON c.id = u.id) "
    f"SELECT {_COLS} FROM u"
)
_PROGRESS = (
    "UPDATE jobs SET progress = $1, update_time = $2, sequence = sequence + 1 "
    f"WHERE id = $3 AND lease_epoch = $4 AND state IN ({_ACTIVE}) RETURNING {_COLS}"
)
_RENEW = (
    "UPDATE jobs SET lease_expire_time = GREATEST(COALESCE(lease_expire_time, 0), $1) "
    f"WHERE id = $2 AND lease_epoch = $3 AND state IN ({_ACTIVE}) RETURNING id"
)
_REFRESH_REMOTE = (
    "UPDATE jobs SET lease_expire_time = GREATEST(COALESCE(lease_expire_time, 0), $1) "
    f"WHERE state IN ({_ACTIVE}) AND worker_id <> 'local'"
)
_PURGE_CHANGES = (
    "DELETE FROM job_changes c USING jobs j WHERE c.job_id = j.id AND j.expire_time <= $1 "
    f"AND j.state IN ({_TERMINAL})"
)
_PURGE_AUDIT = (
    "DELETE FROM job_audit a USING jobs j WHERE a.job_id = j.id AND j.expire_time <= $1 "
    f"AND j.state IN ({_TERMINAL})"
)
_PURGE = f"DELETE FROM jobs WHERE expire_time <= $1 AND state IN ({_TERMINAL})"
# Change snapshots of jobs that ended long enough ago: resuming a finished watch from an old point
# then says OUT_OF_RANGE and the client starts from the job as it is.
_TRIM_CHANGES = (
    "WITH t AS (DELETE FROM job_changes c USING jobs j WHERE c.job_id = j.id AND j.end_time < $1 "
    f"AND j.state IN ({_TERMINAL}) RETURNING c.job_id) "
    "UPDATE jobs SET changes_kept_from = sequence + 1 WHERE id IN (SELECT DISTINCT job_id FROM t)"
)
# A type is replaced only by its own tenant's declaration (no row is returned otherwise).
_SAVE_JOB_TYPE = (
    "INSERT INTO job_types (name, timeout, max_running, retry, last_seen, tenant) "
    "VALUES ($1, $2, $3, $4, $5, $6) "
    "ON CONFLICT (name) DO UPDATE SET timeout = excluded.timeout, max_running = excluded.max_running, "
    "retry = excluded.retry, last_seen = excluded.last_seen WHERE job_types.tenant = excluded.tenant "
    "RETURNING name"
)

Changes = list[JobChange]


# --- configuration --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """What the URL says, beyond what libpq understands."""

    dsn: str
    schema: str = DEFAULT_SCHEMA
    pool_size: int = 8
    progress_flush_interval: float = 0.05
    connect_timeout: float = 10.0  # seconds; libpq's connect_timeout
    # Finished jobs' change snapshots are kept this long (seconds) for watchers resuming.
    keep_changes: float = 300.0


def parse_url(url: str) -> PostgresOptions:
    """``postgresql://USER@HOST:PORT/DB?schema=NAME&pool_size=N`` (also ``postgres://``); the rest of
    the query string is handed to the driver as libpq parameters would be."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    schema = query.pop("schema", DEFAULT_SCHEMA)
    if not schema.replace("_", "").isalnum() or not schema[0].isalpha() or len(schema) > 63:
        raise ValueError(f"bad schema name {schema!r}: letters, digits and _, starting with a letter")
    try:
        pool_size = int(query.pop("pool_size", "8"))
        interval = float(query.pop("progress_flush_interval", "0.05"))
        timeout = float(query.pop("connect_timeout", "10"))  # the driver takes it as an argument
    except ValueError as error:
        raise ValueError(f"bad PostgreSQL store option: {error}") from None
    if pool_size < 1 or interval <= 0 or timeout <= 0:
        raise ValueError("pool_size must be at least 1, progress_flush_interval and connect_timeout positive")
    dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(query), parts.fragment))
    return PostgresOptions(dsn, schema.lower(), pool_size, interval, timeout)


# --- the writer's queue -----------------------------------------------------------------------------------


WriteFn = Callable[[asyncpg.Connection, float], Awaitable[tuple[Any, Changes]]]


@dataclass(slots=True)
class _Op:
    apply: WriteFn
    future: asyncio.Future[Any]


async def _take_tokens(conn: asyncpg.Connection, tenant: str, rate: SubmitRate, now: float) -> float:
    """0 when ``rate.jobs`` tokens were taken from the tenant's bucket, else the seconds until they are
    there."""
    bucket = (tenant, rate.burst, now, rate.per_second)
    if await conn.fetchval(_TAKE_TOKEN, *bucket, rate.jobs) is not None:
        return 0.0
    tokens = await conn.fetchval(_BUCKET, *bucket)
    return max(0.001, (rate.jobs - (tokens or 0.0)) / rate.per_second)


def _change_summary(change: JobChange) -> list[Any]:
    return [
        change.job_id,
        change.sequence,
        int(change.kind),
        int(change.state),
        change.type,
        change.priority,
        change.queue_time,
        change.schedule_time,
        change.lease_epoch,
        change.executor,
        change.start_time,
        change.tenant,
    ]


def _change_from(summary: list[Any]) -> JobChange:
    job_id, sequence, kind, state, *rest = summary
    return JobChange(job_id, sequence, ChangeKind(kind), JobState(state), *rest)


def notify_payloads(origin: str, items: Sequence[Any]) -> list[str]:
    """Payloads ``ORIGIN|[item, ...]``, each under the NOTIFY limit (an item never splits).

    The origin comes first, outside the JSON, so that a replica skips its own messages without parsing.
    """
    payloads: list[str] = []
    batch: list[str] = []
    size = len(origin) + 3
    for item in items:
        encoded = json.dumps(item, separators=(",", ":"))
        if batch and size + len(encoded) + 1 > NOTIFY_LIMIT:
            payloads.append(origin + "|[" + ",".join(batch) + "]")
            batch, size = [], len(origin) + 3
        batch.append(encoded)
        size += len(encoded) + 1
    if batch:
        payloads.append(origin + "|[" + ",".join(batch) + "]")
    return payloads


def split_payload(payload: str) -> tuple[str, str]:
    """(origin, the JSON list) of a payload made by ``notify_payloads``."""
    origin, _, body = payload.partition("|")
    return origin, body


def _arg(args: list[Any], value: Any) -> str:
    """Add a query parameter; its placeholder."""
    args.append(value)
    return f"${len(args)}"


def _filter_where(job_filter: JobFilter, args: list[Any]) -> list[str]:
    """The conditions of a listing's filter, their parameters appended to ``args``."""
    where: list[str] = []
    if job_filter.tenants:
        where.append(f"tenant = ANY({_arg(args, sorted(job_filter.tenants))}::text[])")
    if job_filter.states:
        where.append(f"state = ANY({_arg(args, sorted(int(s) for s in job_filter.states))}::int[])")
    if job_filter.types:
        where.append(f"type = ANY({_arg(args, sorted(job_filter.types))}::text[])")
    for key, value in job_filter.labels:
        where.append(f"(labels::jsonb ->> {_arg(args, key)}) = {_arg(args, value)}")
    if job_filter.create_time_start is not None:
        where.append(f"create_time >= {_arg(args, job_filter.create_time_start)}")
    if job_filter.create_time_end is not None:
        where.append(f"create_time < {_arg(args, job_filter.create_time_end)}")
    if job_filter.priorities:
        where.append(f"priority = ANY({_arg(args, sorted(job_filter.priorities))}::int[])")
    return where


class PostgresStore(JobStore):
    """A JobStore in one PostgreSQL schema, shared by every replica pointed at it."""

    shared = True

    def __init__(self, options: PostgresOptions | str) -> None:
        self.options = parse_url(options) if isinstance(options, str) else options
        self.schema = self.options.schema
        self.changes_channel = f"jobwire_changes_{self.schema}"
        self.control_channel = f"jobwire_control_{self.schema}"
        self._pool: asyncpg.Pool | None = None
        self._writer_conn: asyncpg.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._folder: asyncio.Task[None] | None = None
        self._ops: deque[_Op] = deque()
        self._progress: dict[str, ProgressNote] = {}
        self._wake = asyncio.Event()
        self._flush_due = False
        self._accepting = False
        self._stopping = False
        self._listeners: list[ChangeListener] = []
        self._cluster = PostgresCluster(self)
        self.commits = 0

    # --- lifecycle ---------------------------------------------------------------------------------

    def _server_settings(self) -> dict[str, str]:
        return {"search_path": self.schema, "application_name": "jobwire"}

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            self.options.dsn, timeout=self.options.connect_timeout, server_settings=self._server_settings()
        )

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            conn = await self._connect()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise RuntimeError(f"cannot connect to PostgreSQL: {error}") from error
        try:
            await _migrate(conn, self.schema)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self.options.dsn,
            min_size=1,
            max_size=self.options.pool_size,
            timeout=self.options.connect_timeout,
            server_settings=self._server_settings(),
        )
        self._writer_conn = await self._connect()
        self._accepting, self._stopping = True, False
        self._writer = asyncio.create_task(self._write_forever(), name="jobwire-postgres-writer")
        self._folder = asyncio.create_task(self._fold_counts_forever(), name="jobwire-postgres-counts")
        await self._cluster.open()

    async def close(self) -> None:
        if self._pool is None:
            return
        if self._folder is not None:
            self._folder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._folder
            self._folder = None
        self._accepting = False
        self._stopping = True
        self._wake.set()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer
        await self._cluster.close()
        if self._writer_conn is not None:
            with contextlib.suppress(Exception):
                await self._writer_conn.close()
        await self._pool.close()
        self._pool = self._writer_conn = self._writer = None

    def cluster(self) -> PostgresCluster:
        return self._cluster

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def publish(self, changes: Sequence[JobChange]) -> None:
        """Hand changes to this replica's listeners (its own, with the jobs; others', from NOTIFY)."""
        for listener in self._listeners:
            try:
                listener(changes)
            except Exception:
                log.exception("a change listener failed")

    # --- writes ------------------------------------------------------------------------------------

    async def _submit(self, apply: WriteFn) -> Any:
        if not self._accepting:
            raise RuntimeError("PostgresStore is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops.append(_Op(apply, future))
        self._wake.set()
        return await future

    async def insert(self, job: Job, audit: AuditEntry | None = None, rate: SubmitRate | None = None) -> None:
        row = job_to_row(job)
        snapshot = job.copy()
        sql, args = (_INSERT, row) if audit is None else (_INSERT_AUDITED, (*row, *audit_to_row(audit)[1:]))

        async def apply(conn: asyncpg.Connection, now: float) -> tuple[float, Changes]:
            if rate is not None and (wait := await _take_tokens(conn, job.tenant, rate, job.create_time)):
                return wait, []
            inserted = await conn.fetchval(sql, *args)
            if inserted is None:
                if job.request_id and await conn.fetchval(_USED_REQUEST_IDS, job.tenant, [job.request_id]):
                    raise DuplicateRequestId([job.request_id])
                raise ValueError(f"job {job.id} already exists")
            return 0.0, [JobChange.of(snapshot, ChangeKind.STATE)]

        wait: float = await self._submit(apply)
        if wait:
            raise RateLimited(wait)

    async def insert_many(
        self, jobs: Sequence[Job], audits: Sequence[AuditEntry], rate: SubmitRate | None = None
    ) -> None:
        if not jobs:
            return
        tenant, now_of_jobs = jobs[0].tenant, jobs[0].create_time
        rows = [job_to_row(job) for job in jobs]
        entries = [audit_to_row(audit) for audit in audits]
        snapshots = [job.copy() for job in jobs]
        wanted = [job.request_id for job in jobs if job.request_id]

        async def apply(conn: asyncpg.Connection, now: float) -> tuple[float, Changes]:
            if wanted:
                stored = {r[0] for r in await conn.fetch(_USED_REQUEST_IDS, tenant, wanted)}
                used = stored | {rid for rid, n in Counter(wanted).items() if n > 1}
                if used:
                    raise DuplicateRequestId(sorted(used))
            if rate is not None and (wait := await _take_tokens(conn, tenant, rate, now_of_jobs)):
                return wait, []
            try:
                await conn.executemany(_INSERT_STRICT, rows)
            except asyncpg.UniqueViolationError as error:
                # Another replica took one of the request_ids since the check: the writer replays this
                # write alone (with a savepoint), and the check then names it.
                raise DuplicateRequestId(wanted) from error
            await conn.executemany(_INSERT_AUDIT, entries)
            return 0.0, [JobChange.of(snapshot, ChangeKind.STATE) for snapshot in snapshots]

        wait: float = await self._submit(apply)
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
        pairs = [("state", int(target)), *changed_columns(changes), ("update_time", now)]
        sets = ", ".join(f"{column} = ${i + 2}" for i, (column, _) in enumerate(pairs))
        args: list[Any] = [now, *(value for _, value in pairs), job_id, int(expect.state)]
        where = f"id = ${len(pairs) + 2} AND state = ${len(pairs) + 3}"
        if expect.lease_epoch is not None:
            args.append(expect.lease_epoch)
            where += f" AND lease_epoch = ${len(args)}"
        if expect.lease_expired_by is not None:
            args.append(expect.lease_expired_by)
            where += f" AND lease_expire_time <= ${len(args)}"
        logged = ""
        if audit is not None:
            first = len(args) + 1
            args.extend(audit_to_row(audit)[1:])
            logged = (
                f", a AS (INSERT INTO job_audit ({_AUDIT_COLS}) SELECT u.id, "
                + ", ".join(f"${first + i}" for i in range(6))
                + " FROM u)"
            )
        sql = (
            f"WITH u AS (UPDATE jobs SET {sets}, sequence = sequence + 1 WHERE {where} RETURNING {_COLS}), "
            f"c AS ({_LOG_CHANGE}){logged} SELECT {_COLS} FROM u"
        )
        trim = target is JobState.QUEUED

        async def apply(conn: asyncpg.Connection, at: float) -> tuple[Job | None, Changes]:
            row = await conn.fetchrow(sql, *args)
            if row is None:
                return None, []
            job = row_to_job(tuple(row))
            if trim:
                await conn.execute(_TRIM_AUDIT, job_id)
            return job, [JobChange.of(job, ChangeKind.STATE)]

        result: Job | None = await self._submit(apply)
        return result

    async def claim(
        self, claims: Sequence[Claim], now: float, leader_epoch: int
    ) -> builtins.list[Job | None]:
        ids = [c.job_id for c in claims]
        workers = [c.worker_id for c in claims]
        executors = [c.executor for c in claims]
        leases = [c.lease_until for c in claims]
        principals = [c.principal for c in claims]
        peers = [c.peer for c in claims]

        async def apply(conn: asyncpg.Connection, at: float) -> tuple[list[Job | None], Changes]:
            rows = await conn.fetch(
                _CLAIM, now, ids, workers, executors, leases, leader_epoch, principals, peers
            )
            by_id = {job.id: job for job in (row_to_job(tuple(row)) for row in rows)}
            claimed = [by_id.get(job_id) for job_id in ids]
            return claimed, [JobChange.of(job, ChangeKind.STATE) for job in claimed if job is not None]

        result: list[Job | None] = await self._submit(apply)
        return result

    def record_progress(self, job_id: str, lease_epoch: int, progress: Progress, now: float) -> None:
        if not self._accepting:
            return
        note = ProgressNote.of(lease_epoch, progress, now)
        if not self._progress:
            asyncio.get_running_loop().call_later(self.options.progress_flush_interval, self._progress_timer)
        self._progress[job_id] = note

    async def renew_leases(self, leases: Sequence[tuple[str, int]], until: float) -> builtins.list[bool]:
        if not leases:
            return []

        async def apply(conn: asyncpg.Connection, now: float) -> tuple[list[bool], Changes]:
            return [
                await conn.fetchval(_RENEW, until, job_id, epoch) is not None for job_id, epoch in leases
            ], []

        result: list[bool] = await self._submit(apply)
        return result

    async def refresh_remote_leases(self, until: float) -> int:
        async def apply(conn: asyncpg.Connection, now: float) -> tuple[int, Changes]:
            status = await conn.execute(_REFRESH_REMOTE, until)
            return int(status.split()[-1]), []

        result: int = await self._submit(apply)
        return result

    async def purge_expired(self, now: float) -> int:
        async def apply(conn: asyncpg.Connection, at: float) -> tuple[int, Changes]:
            await conn.execute(_PURGE_CHANGES, now)
            await conn.execute(_PURGE_AUDIT, now)
            status = await conn.execute(_PURGE, now)
            await conn.execute(_TRIM_CHANGES, now - self.options.keep_changes)
            await conn.execute("DELETE FROM messages WHERE created_at < $1", time.time() - 300)
            return int(status.split()[-1]), []

        result: int = await self._submit(apply)
        return result

    async def save_job_types(self, job_types: builtins.list[JobType]) -> builtins.list[str]:
        rows = [job_type_to_row(job_type) for job_type in job_types]

        async def apply(conn: asyncpg.Connection, now: float) -> tuple[list[str], Changes]:
            # In order, so a name given twice keeps its last row; no row back: another tenant's type.
            return [row[0] for row in rows if await conn.fetchval(_SAVE_JOB_TYPE, *row) is None], []

        refused: list[str] = await self._submit(apply)
        return refused

    async def delete_job_types(self, names: builtins.list[str]) -> None:
        async def apply(conn: asyncpg.Connection, now: float) -> tuple[None, Changes]:
            await conn.execute("DELETE FROM job_types WHERE name = ANY($1::text[])", list(names))
            return None, []

        await self._submit(apply)

    async def _fold_counts_forever(self) -> None:
        """Fold the count deltas into job_counts every COUNT_FOLD_INTERVAL, through the writer (one
        replica at a time: the others skip while it holds the lock)."""

        async def fold(conn: asyncpg.Connection, now: float) -> tuple[None, Changes]:
            lock = f"jobwire-counts:{self.schema}"
            if await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", lock):
                await conn.execute(_FOLD_COUNTS)
            return None, []

        while self._accepting:
            await asyncio.sleep(COUNT_FOLD_INTERVAL)
            try:
                await self._submit(fold)
            except Exception:  # the writer reconnects; try again next time
                log.warning("folding the job counts failed; will retry", exc_info=True)

    # --- the writer task -------------------------------------------------------------------------------

    async def _write_forever(self) -> None:
        """Commit what is queued, batch after batch; progress rides along, or goes on its timer."""
        while True:
            if not self._ops and not (self._progress and (self._flush_due or self._stopping)):
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._ops.popleft() for _ in range(min(MAX_BATCH, len(self._ops)))]
            progress, self._progress, self._flush_due = self._progress, {}, False
            outcomes = await self._write(batch, progress)
            if outcomes.changes:
                self.publish(outcomes.changes)
            for op, result, error in outcomes.results:
                if op.future.done():  # the caller gave up; the write happened anyway
                    continue
                if error is None:
                    op.future.set_result(result)
                else:
                    op.future.set_exception(error)

    def _progress_timer(self) -> None:
        self._flush_due = True
        self._wake.set()

    async def _write(self, batch: list[_Op], progress: dict[str, ProgressNote]) -> Outcomes[_Op]:
        """One transaction for the batch; if an op fails, again with a savepoint per op."""
        outcomes = await self._write_batch(batch, progress, isolate=False)
        if outcomes is None:
            outcomes = await self._write_batch(batch, progress, isolate=True)
        assert outcomes is not None
        return outcomes

    async def _write_batch(
        self, batch: list[_Op], progress: dict[str, ProgressNote], *, isolate: bool
    ) -> Outcomes[_Op] | None:
        conn = self._writer_conn
        assert conn is not None
        outcomes: Outcomes[_Op] = Outcomes()
        now = time.time()
        try:
            async with conn.transaction():
                # Progress first: a report made before an attempt's end lands before it.
                if progress:
                    outcomes.changes.extend(await self._flush_progress(conn, progress))
                for op in batch:
                    if not isolate:
                        try:
                            result, changes = await op.apply(conn, now)
                        except (asyncpg.PostgresError, DuplicateRequestId, ValueError):
                            raise _Retry() from None
                        outcomes.results.append((op, result, None))
                        outcomes.changes.extend(changes)
                        continue
                    try:
                        async with conn.transaction():  # a savepoint
                            result, changes = await op.apply(conn, now)
                    except (asyncpg.PostgresError, DuplicateRequestId, ValueError) as error:
                        outcomes.results.append((op, None, error))
                    else:
                        outcomes.results.append((op, result, None))
                        outcomes.changes.extend(changes)
                for payload in notify_payloads(
                    self._cluster.replica_id, [_change_summary(c) for c in outcomes.changes]
                ):
                    await conn.execute("SELECT pg_notify($1, $2)", self.changes_channel, payload)
        except _Retry:
            return None
        except Exception as error:
            log.exception("PostgreSQL transaction of %d writes failed", len(batch))
            await self._reconnect_writer()
            return Outcomes([(op, None, error) for op in batch])
        self.commits += 1
        return outcomes

    async def _flush_progress(self, conn: asyncpg.Connection, progress: dict[str, ProgressNote]) -> Changes:
        changes: Changes = []
        for job_id, note in progress.items():
            row = await conn.fetchrow(
                _PROGRESS, progress_json(note.progress), note.time, job_id, note.lease_epoch
            )
            if row is not None:
                changes.append(JobChange.of(row_to_job(tuple(row)), ChangeKind.PROGRESS))
        return changes

    async def _reconnect_writer(self) -> None:
        """After a failed transaction: a broken connection is replaced (a live one is kept)."""
        conn = self._writer_conn
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await conn.execute("SELECT 1")
                return
        with contextlib.suppress(Exception):
            self._writer_conn = await self._connect()

    # --- reads ---------------------------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open")
        result: list[asyncpg.Record] = await self._pool.fetch(sql, *args)
        return result

    async def get(self, job_id: str) -> Job | None:
        rows = await self._fetch(f"{_SELECT} WHERE id = $1", job_id)
        return row_to_job(tuple(rows[0])) if rows else None

    async def get_by_request_id(self, tenant: str, request_id: str) -> Job | None:
        if not request_id:
            return None
        rows = await self._fetch(
            f"{_SELECT} WHERE tenant = $1 AND request_id = $2 AND request_id <> ''", tenant, request_id
        )
        return row_to_job(tuple(rows[0])) if rows else None

    async def list_audit(self, job_id: str, after_id: int, limit: int) -> builtins.list[AuditEntry]:
        if limit <= 0:
            return []
        rows = await self._fetch(
            f"SELECT {', '.join(AUDIT_COLUMNS)} FROM job_audit WHERE job_id = $1 AND id > $2 "
            "ORDER BY id LIMIT $3",
            job_id,
            after_id,
            limit,
        )
        return [row_to_audit(tuple(row)) for row in rows]

    async def list(self, query: JobQuery) -> builtins.list[Job]:
        if query.limit <= 0:
            return []
        args: list[Any] = []
        where = _filter_where(query.filter, args)
        after, order_by = order_sql(query, lambda value: _arg(args, value))
        if after is not None:
            where.append(after)
        select = _SELECT if query.with_payload else _SELECT_BASIC
        sql = (
            select
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY {order_by} LIMIT {_arg(args, query.limit)}"
        )
        return [row_to_job(tuple(row)) for row in await self._fetch(sql, *args)]

    async def count_matching(self, job_filter: JobFilter) -> int:
        args: list[Any] = []
        where = _filter_where(job_filter, args)
        sql = "SELECT COUNT(*) FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        rows = await self._fetch(sql, *args)
        count: int = rows[0][0]
        return count

    async def count(self, tenants: frozenset[str] = frozenset()) -> builtins.list[JobCount]:
        where, args = ("WHERE tenant = ANY($1::text[]) ", [sorted(tenants)]) if tenants else ("", [])
        rows = await self._fetch(_COUNT.format(where=where), *args)
        return [JobCount(JobState(state), job_type, priority, n) for state, job_type, priority, n in rows]

    async def load_queue(self) -> builtins.list[QueuedJob]:
        rows = await self._fetch(f"SELECT {', '.join(QUEUE_COLUMNS)} FROM jobs WHERE state = 1 ORDER BY id")
        return [QueuedJob(*row) for row in rows]

    async def load_active(self) -> builtins.list[Job]:
        rows = await self._fetch(f"{_SELECT_BASIC} WHERE state IN ({_ACTIVE}) ORDER BY id")
        return [row_to_job(tuple(row)) for row in rows]

    async def read_changes(self, job_id: str, after_sequence: int) -> builtins.list[Job] | None:
        kept = await self._fetch("SELECT changes_kept_from, params FROM jobs WHERE id = $1", job_id)
        if not kept or after_sequence + 1 < kept[0][0]:
            return None
        params = json.loads(kept[0][1])  # the snapshots leave them out: they never change
        rows = await self._fetch(
            "SELECT snapshot FROM job_changes WHERE job_id = $1 AND sequence > $2 ORDER BY sequence",
            job_id,
            after_sequence,
        )
        snapshots = [row_to_job(json.loads(row[0])) for row in rows]
        for snapshot in snapshots:
            snapshot.params = params
        return snapshots

    async def read_change(self, job_id: str, sequence: int) -> Job | None:
        rows = await self._fetch(
            "SELECT snapshot FROM job_changes WHERE job_id = $1 AND sequence = $2", job_id, sequence
        )
        if rows:
            snapshot = row_to_job(json.loads(rows[0][0]))
            current = await self.get(job_id)  # the params, which the snapshot leaves out
            if current is not None:
                snapshot.params = current.params
            return snapshot
        return await super().read_change(job_id, sequence)

    async def load_job_types(self) -> builtins.list[JobType]:
        rows = await self._fetch(
            "SELECT name, timeout, max_running, retry, last_seen, tenant FROM job_types ORDER BY name"
        )
        return [row_to_job_type(tuple(row)) for row in rows]


class _Retry(Exception):
    """An op failed in an optimistic batch: roll back and replay with a savepoint per op."""


async def _migrate(conn: asyncpg.Connection, schema: str) -> None:
    """Create the schema and bring it to ``len(MIGRATIONS)``, once even when replicas start together."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"jobwire-migrate:{schema}")
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET LOCAL search_path = "{schema}"')
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT version FROM schema_version")
        if version is None:
            await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database schema version {version} is newer than this Jobwire understands "
                f"({len(MIGRATIONS)})"
            )
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("UPDATE schema_version SET version = $1", number)


# --- the cluster ------------------------------------------------------------------------------------


def _encode_message(message: Message) -> dict[str, Any]:
    if isinstance(message, ExecutorUp):
        info = message.executor
        return {
            "t": "up",
            "id": info.id,
            "w": info.worker_id,
            "types": sorted(info.types),
            "n": message.credits,
            "tn": info.tenant,
            "p": info.principal,
            "peer": info.peer,
        }
    if isinstance(message, Credits):
        return {"t": "credits", "id": message.executor_id, "n": message.delta}
    if isinstance(message, ExecutorDown):
        return {"t": "down", "id": message.executor_id}
    if isinstance(message, DispatcherUp):
        return {"t": "dispatcher", "epoch": message.epoch}
    if isinstance(message, StatusUpdate):
        status = message.status
        return {
            "t": "status",
            "e": status.executors,
            "w": status.workers,
            "r": status.running,
            "types": {name: [s.executors, s.free, s.running, s.limit] for name, s in status.types.items()},
            "tr": status.tenants,
        }
    return {"t": "types"}


def _decode_message(data: dict[str, Any]) -> Message | None:
    kind = data.get("t")
    if kind == "up":
        info = ExecutorInfo(
            data["id"],
            data["w"],
            frozenset(data["types"]),
            data.get("tn"),
            data.get("p", ""),
            data.get("peer", ""),
        )
        return ExecutorUp(info, int(data["n"]))
    if kind == "credits":
        return Credits(data["id"], int(data["n"]))
    if kind == "down":
        return ExecutorDown(data["id"])
    if kind == "dispatcher":
        return DispatcherUp(int(data["epoch"]))
    if kind == "status":
        types = {name: TypeStatus(e, f, r, lim) for name, (e, f, r, lim) in data["types"].items()}
        tenants = {tenant: dict(by_type) for tenant, by_type in data.get("tr", {}).items()}
        return StatusUpdate(ClusterStatus(types, int(data["e"]), int(data["w"]), int(data["r"]), tenants))
    if kind == "types":
        return TypesChanged()
    return None


class PostgresCluster(Cluster):
    """The replicas sharing one schema: advisory locks on each replica's session connection say who is
    alive and who dispatches; LISTEN/NOTIFY carries the change feed and the control messages."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._key = secrets.randbelow(2**31 - 1) + 1
        self.replica_id = f"r{self._key:08x}"
        self._session: asyncpg.Connection | None = None
        self._on_message: MessageHandler | None = None
        self._on_leadership: LeadershipHandler | None = None
        self._epoch: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox: deque[dict[str, Any]] = deque()
        self._outbox_wake = asyncio.Event()
        self._closing = False
        self._lost = asyncio.Event()
        self._resets: list[Callable[[], Awaitable[None]]] = []

    def on_reset(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._resets.append(callback)

    @property
    def replica_key(self) -> int:
        return self._key

    async def open(self) -> None:
        """Connect the session: take this replica's liveness lock, and listen to both channels."""
        self._closing = False
        await self._connect_session()
        self._tasks.append(asyncio.create_task(self._send_forever(), name="jobwire-control-sender"))

    async def _connect_session(self) -> None:
        session = await self.store._connect()
        # A dead peer (not only a killed process) releases its locks within about 10 s.
        for setting, value in (
            ("tcp_keepalives_idle", "5"),
            ("tcp_keepalives_interval", "2"),
            ("tcp_keepalives_count", "2"),
        ):
            with contextlib.suppress(asyncpg.PostgresError):
                await session.execute(f"SET {setting} = {value}")
        await session.execute(
            "SELECT pg_advisory_lock(hashtext($1), $2)", f"{self.store.schema}:replicas", self._key
        )
        await session.add_listener(self.store.changes_channel, self._on_changes)
        await session.add_listener(self.store.control_channel, self._on_control)
        session.add_termination_listener(self._on_terminated)
        self._session = session
        self._lost.clear()

    async def close(self) -> None:
        await self.leave()
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None

    # --- membership ----------------------------------------------------------------------------------

    async def join(self, on_message: MessageHandler, on_leadership: LeadershipHandler) -> None:
        self._on_message, self._on_leadership = on_message, on_leadership
        await self._try_to_dispatch()
        self._tasks.append(asyncio.create_task(self._compete_forever(), name="jobwire-dispatcher-lock"))

    async def leave(self) -> None:
        if self._epoch is not None:
            self._epoch = None
            if self._on_leadership is not None:
                await self._on_leadership(None)
            if self._session is not None and not self._session.is_closed():
                with contextlib.suppress(Exception):
                    await self._session.execute(
                        "SELECT pg_advisory_unlock(hashtext($1))", self._dispatcher_lock
                    )
        self._on_message = None

    @property
    def _dispatcher_lock(self) -> str:
        return f"{self.store.schema}:dispatcher"

    async def _try_to_dispatch(self) -> None:
        session = self._session
        if session is None or self._epoch is not None or self._on_leadership is None:
            return
        if not await session.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", self._dispatcher_lock):
            return
        epoch = await session.fetchval(
            "UPDATE dispatcher SET epoch = epoch + 1, replica = $1, since = $2 RETURNING epoch",
            self.replica_id,
            time.time(),
        )
        self._epoch = int(epoch)
        log.info("replica %s holds the dispatcher lock (epoch %d)", self.replica_id, self._epoch)
        await self._on_leadership(self._epoch)

    async def _compete_forever(self) -> None:
        """Try for the dispatcher lock every TAKEOVER_POLL; rebuild the session if it broke."""
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), TAKEOVER_POLL)
            try:
                if self._lost.is_set():
                    await self._recover_session()
                elif self._epoch is None:
                    await self._try_to_dispatch()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("the session connection failed (%s); trying again", error)
                self._lost.set()
                await asyncio.sleep(TAKEOVER_POLL)

    def _on_terminated(self, connection: asyncpg.Connection) -> None:
        if not self._closing:
            log.warning("replica %s lost its session connection to PostgreSQL", self.replica_id)
            self._lost.set()

    async def _recover_session(self) -> None:
        """The session broke: this replica's locks are gone. Stop dispatching, reconnect, resync."""
        if self._epoch is not None:
            self._epoch = None
            if self._on_leadership is not None:
                await self._on_leadership(None)
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._session.terminate()
        await self._connect_session()
        log.warning("replica %s reconnected its session: rebuilding what it follows", self.replica_id)
        for reset in self._resets:
            await reset()

    async def live_replicas(self) -> set[str]:
        if self.store._pool is None:
            return {self.replica_id}
        rows = await self.store._fetch(
            "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
            "AND classid = hashtext($1)::oid "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            f"{self.store.schema}:replicas",
        )
        return {f"r{row[0]:08x}" for row in rows}

    # --- messages ------------------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Delivered here at once (the dispatcher may be this replica), and to the others by NOTIFY."""
        self._outbox.append(_encode_message(message))
        self._outbox_wake.set()
        if self._on_message is not None:
            try:
                self._on_message(message)
            except Exception:
                log.exception("handling a control message failed")

    async def _send_forever(self) -> None:
        while True:
            await self._outbox_wake.wait()
            self._outbox_wake.clear()
            while self._outbox:
                items = [self._outbox.popleft() for _ in range(len(self._outbox))]
                try:
                    await self._send(items)
                except Exception:
                    log.exception("sending %d control messages failed; retrying", len(items))
                    self._outbox.extendleft(reversed(items))
                    await asyncio.sleep(0.2)

    async def _send(self, items: list[dict[str, Any]]) -> None:
        pool = self.store._pool
        if pool is None:
            return
        async with pool.acquire() as conn:
            for item in items:
                encoded = json.dumps(item, separators=(",", ":"))
                if len(encoded) > NOTIFY_LIMIT - 100:  # too large for a payload: through the table
                    row_id = await conn.fetchval(
                        "INSERT INTO messages (payload, created_at) VALUES ($1, $2) RETURNING id",
                        encoded,
                        time.time(),
                    )
                    item = {"t": "stored", "id": row_id}
                    encoded = json.dumps(item)
                payload = f"{self.replica_id}|{encoded}"
                await conn.execute("SELECT pg_notify($1, $2)", self.store.control_channel, payload)

    def _on_control(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        origin, body = split_payload(payload)
        if origin == self.replica_id:
            return  # delivered when it was sent
        try:
            data = json.loads(body)
        except ValueError:
            log.warning("ignoring an unreadable control message")
            return
        if data.get("t") == "stored":
            asyncio.get_running_loop().create_task(self._deliver_stored(int(data["id"])))
            return
        self._deliver(data)

    async def _deliver_stored(self, row_id: int) -> None:
        rows = await self.store._fetch("SELECT payload FROM messages WHERE id = $1", row_id)
        if rows:
            self._deliver(json.loads(rows[0][0]))

    def _deliver(self, data: dict[str, Any]) -> None:
        message = _decode_message(data)
        if message is not None and self._on_message is not None:
            try:
                self._on_message(message)
            except Exception:
                log.exception("handling a control message failed")

    def _on_changes(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        """Another replica's committed changes (this replica's own were delivered at commit)."""
        origin, body = split_payload(payload)
        if origin == self.replica_id:
            return
        try:
            changes = [_change_from(item) for item in json.loads(body)]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable change notification")
            return
        self.store.publish(changes)
