"""Job types: what the server knows about each type, whoever declared it.

A type is declared by an in-process handler (``@handler``) or by a remote worker when it registers.
Worker-declared types are stored, so that after a restart jobs of a type whose workers are all down can
still be submitted: they wait (wait reason NO_WORKER) until a worker of that type connects.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from jobwire.handlers.api import HandlerSpec, RetryDefaults
from jobwire.server.job import RetryPolicy

# Job types the server knows at most, in-process and declared together: every one is listed in
# GetQueueStats and kept in the store, so their number is bounded like every other stored thing.
MAX_KNOWN_TYPES = 1000


@dataclass(frozen=True, slots=True)
class JobType:
    """One type's defaults, as its declarer gave them (None = the server's default)."""

    name: str
    timeout: float | None = None
    max_running: int | None = None
    retry: RetryDefaults = field(default_factory=RetryDefaults)
    # When a worker last declared it (seconds since the epoch); 0 for in-process handlers.
    last_seen: float = 0.0

    @classmethod
    def from_handler(cls, spec: HandlerSpec) -> JobType:
        return cls(spec.name, spec.timeout, spec.max_running, spec.retry)


@functools.lru_cache(maxsize=4096)  # all arguments are frozen: a handful of combinations serve every submit
def resolve_retry_policy(
    requested: RetryDefaults | None, declared: RetryDefaults, server: RetryPolicy
) -> RetryPolicy:
    """The job's policy: each field from the request, else the type's declaration, else the server."""

    def pick(name: str) -> float:
        for source in (requested, declared):
            value = getattr(source, name) if source is not None else None
            if value is not None:
                return float(value)
        return float(getattr(server, name))

    return RetryPolicy(
        max_attempts=int(pick("max_attempts")),
        initial_backoff=pick("initial_backoff"),
        max_backoff=pick("max_backoff"),
        backoff_multiplier=pick("backoff_multiplier"),
    )
