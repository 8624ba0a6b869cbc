"""The PostgreSQL server of this machine (and of CI) for the tests, one fresh schema per user.

PostgreSQL runs on 127.0.0.1:5432 (user postgres, trust auth, database test) on every machine the
project runs on. Under ``CI=true`` a missing server fails the tests that need it; elsewhere they are
skipped with a message saying why.
"""

from __future__ import annotations

import asyncio
import os
import secrets

import asyncpg
import pytest

POSTGRES_DSN = os.environ.get("JOBWIRE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
_available: bool | None = None


def require_postgres() -> None:
    """Skip (or, under CI=true, fail) unless the test PostgreSQL answers."""
    global _available
    if _available is None:
        _available = asyncio.run(reachable())
    if not _available:
        message = f"PostgreSQL is not reachable at {POSTGRES_DSN} (set JOBWIRE_TEST_POSTGRES to use another)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI needs it", pytrace=False)
        pytest.skip(message)


async def reachable() -> bool:
    """Whether the test PostgreSQL answers within 5 seconds."""
    try:
        conn = await asyncio.wait_for(asyncpg.connect(POSTGRES_DSN), 5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await conn.close()
    return True


def new_schema() -> str:
    return "t_" + secrets.token_hex(6)


def store_url(schema: str) -> str:
    separator = "&" if "?" in POSTGRES_DSN else "?"
    return f"{POSTGRES_DSN}{separator}schema={schema}"


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
