"""Fixtures that run the one store conformance suite against every backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobwire.server.job import Job, JobIdGenerator
from jobwire.server.state_machine import JobState
from jobwire.server.stores.base import JobStore
from jobwire.server.stores.memory import MemoryStore
from jobwire.server.stores.postgres import PostgresStore
from jobwire.server.stores.sqlite import SqliteStore
from support.postgres import drop_schema, new_schema, require_postgres, store_url

T0 = 1_700_000_000.0
_ids = JobIdGenerator()

BACKENDS = ("memory", "sqlite", "postgres")


def make_job(**overrides: Any) -> Job:
    """A queued job with a fresh, increasing id; any Job field can be overridden."""
    fields: dict[str, Any] = {
        "id": _ids.new_id(),
        "type": "test.echo",
        "state": JobState.QUEUED,
        "priority": 5,
        "params": {"n": 1},
        "labels": {},
        "create_time": T0,
        "update_time": T0,
        "queue_time": T0,
    }
    fields.update(overrides)
    return Job(**fields)


@pytest.fixture(name="make_job")
def make_job_fixture() -> Callable[..., Job]:
    """``make_job`` as a fixture, so test modules need not import this conftest."""
    return make_job


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        require_postgres()
    return str(request.param)


@pytest.fixture
def durable(backend: str) -> bool:
    """Whether the backend keeps jobs across a close and a new store on the same location."""
    return backend != "memory"


@pytest.fixture
def new_store(backend: str, tmp_path: Path) -> Iterator[Callable[[], JobStore]]:
    """Makes an unopened store; for durable backends every call points at the same location (for
    PostgreSQL, a schema of this test's own, dropped afterwards)."""
    if backend == "memory":
        yield MemoryStore
    elif backend == "sqlite":
        path = str(tmp_path / "jobs.db")
        yield lambda: SqliteStore(path)
    else:
        schema = new_schema()
        yield lambda: PostgresStore(store_url(schema))
        asyncio.run(drop_schema(schema))


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema name for a test of its own (skipped without the server), dropped after."""
    require_postgres()
    schema = new_schema()
    yield schema
    asyncio.run(drop_schema(schema))


@pytest.fixture
async def store(new_store: Callable[[], JobStore]) -> AsyncIterator[JobStore]:
    s = new_store()
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def reopen(
    new_store: Callable[[], JobStore], durable: bool
) -> AsyncIterator[Callable[[JobStore], Awaitable[JobStore | None]]]:
    """Closes a store and opens a fresh one on the same location (None for a non-durable backend)."""
    opened: list[JobStore] = []

    async def _reopen(old: JobStore) -> JobStore | None:
        await old.close()
        if not durable:
            return None
        s = new_store()
        await s.open()
        opened.append(s)
        return s

    yield _reopen
    for s in opened:
        await s.close()


@pytest.fixture
async def epoch(store: JobStore) -> AsyncIterator[int]:
    """The dispatcher epoch this test claims under: it joins the store's cluster as its dispatcher."""
    cluster = store.cluster()
    won: list[int] = []

    async def on_leadership(value: int | None) -> None:
        if value is not None:
            won.append(value)

    await cluster.join(lambda message: None, on_leadership)
    assert won, "the test's replica did not become the dispatcher"
    yield won[-1]
    await cluster.leave()
