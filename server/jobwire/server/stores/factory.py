"""Choose a store backend from one configuration string, so the server and CLI take a single ``--store``."""

from __future__ import annotations

from urllib.parse import parse_qsl

from jobwire.server.stores.base import JobStore
from jobwire.server.stores.memory import MemoryStore
from jobwire.server.stores.sqlite import SqliteStore

ACCEPTED_FORMS = (
    "memory:, sqlite:///relative/path.db, sqlite:////absolute/path.db "
    "(optionally ?synchronous=NORMAL&max_batch=256&progress_flush_interval=0.05), "
    "a plain file path ending in .db, or postgresql://USER@HOST:PORT/DB (optionally ?schema=NAME)"
)


def check_store_url(url: str) -> None:
    """Raise ValueError, naming the accepted forms, unless ``url`` names a store (nothing is opened)."""
    open_store(url)


def open_store(url: str) -> JobStore:
    """The store ``url`` names, not yet opened (callers ``await store.open()``).

    ``sqlite:`` URLs follow the SQLAlchemy convention: three slashes then a relative path, four
    slashes for an absolute one.
    """
    if url == "memory:":
        return MemoryStore()
    scheme = url.partition(":")[0].lower()
    if scheme in ("postgresql", "postgres"):
        from jobwire.server.stores.postgres import PostgresStore, parse_url

        return PostgresStore(parse_url(url))
    if scheme == "sqlite":
        prefix = "sqlite:///"
        if not url.startswith(prefix):
            raise ValueError(
                f"bad SQLite store URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        path, _, query = url[len(prefix) :].partition("?")
        if not path or path == ":memory:":
            raise ValueError(
                f"bad SQLite store URL {url!r}: it needs a file path (for a store in memory use memory:)"
            )
        return _sqlite_store(path, query)
    if url.endswith(".db") and "://" not in url:
        return SqliteStore(url)
    raise ValueError(f"unsupported store {url!r}; use one of: {ACCEPTED_FORMS}")


def _sqlite_store(path: str, query: str) -> SqliteStore:
    """A SqliteStore with tuning options from a URL query string."""
    options = dict(parse_qsl(query, keep_blank_values=True))
    try:
        synchronous = options.pop("synchronous", "FULL")
        max_batch = int(options.pop("max_batch", "256"))
        interval = float(options.pop("progress_flush_interval", "0.05"))
    except ValueError as exc:
        raise ValueError(f"bad SQLite store option: {exc}") from exc
    if options:
        raise ValueError(
            f"unknown SQLite store option(s) {sorted(options)}; known: synchronous, "
            "max_batch, progress_flush_interval"
        )
    return SqliteStore(path, synchronous=synchronous, max_batch=max_batch, progress_flush_interval=interval)
