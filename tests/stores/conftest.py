"""Fixtures that run the one store conformance suite against every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from jobwire.server.job import Job, JobIdGenerator
from jobwire.server.state_machine import JobState
from jobwire.server.stores.base import JobStore
from jobwire.server.stores.memory import MemoryStore
from jobwire.server.stores.sqlite import SqliteStore

T0 = 1_700_000_000.0
_ids = JobIdGenerator()

BACKENDS = ("memory", "sqlite")


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
    return str(request.param)


@pytest.fixture
def durable(backend: str) -> bool:
    """Whether the backend keeps jobs across a close and a new store on the same location."""
    return backend != "memory"


@pytest.fixture
def new_store(backend: str, tmp_path: Path) -> Callable[[], JobStore]:
    """Makes an unopened store; for durable backends every call points at the same location."""
    if backend == "memory":
        return MemoryStore
    path = str(tmp_path / "jobs.db")
    return lambda: SqliteStore(path)


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
