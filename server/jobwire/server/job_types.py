"""Job types: what the server knows about each type, whoever declared it.

A type is declared by an in-process handler (``@handler``) or by a remote worker when it registers.
Worker-declared types are stored, so that after a restart jobs of a type whose workers are all down can
still be submitted: they wait (wait reason NO_WORKER) until a worker of that type connects.

Type names are one namespace for the whole deployment. A type declared by a tenant's worker belongs to
that tenant: only its jobs may be of that type, and no other tenant can redeclare it. In-process types
and those admin workers declare are shared by every tenant.
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
    # The tenant whose workers declared it: only that tenant's jobs may be of this type, and no other
    # tenant may redeclare it. "" for a shared type: in-process handlers' and admin workers', open to
    # every tenant.
    tenant: str = ""

    def visible_to(self, tenant: str) -> bool:
        """Whether jobs of ``tenant`` may be of this type."""
        return not self.tenant or self.tenant == tenant

    @classmethod
    def from_handler(cls, spec: HandlerSpec) -> JobType:
        return cls(spec.name, spec.timeout, spec.max_running, spec.retry)


@dataclass(frozen=True, slots=True)
class KnownType:
    """A job type as ListJobTypes shows it: its declaration, and what stands behind it now."""

    job_type: JobType
    in_process: bool  # a handler of the server itself, not a worker's declaration
    limit: int | None  # running jobs of the type at once, cluster-wide (the operator's override first)
    executors: int  # connected executors that take it
    free: int  # jobs of the type they can take now
    running: int


@functools.lru_cache(maxsize=1024)  # all three are immutable; submits repeat a few combinations
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

    codes: frozenset[int] = server.non_retryable_codes
    for source in (declared, requested):  # the most specific list given wins, whole
        if source is not None and source.non_retryable_codes:
            codes = frozenset(source.non_retryable_codes)
    return RetryPolicy(
        max_attempts=int(pick("max_attempts")),
        initial_backoff=pick("initial_backoff"),
        max_backoff=pick("max_backoff"),
        backoff_multiplier=pick("backoff_multiplier"),
        non_retryable_codes=codes,
    )


class TypeRegistry:
    """The job types this deployment knows: in-process handlers' and those workers declared (stored).

    Every replica holds the same set: a declaration is stored, then announced (``TypesChanged``) so the
    others read the store again; a type unknown here is looked up in the store before a submit of it is
    refused, so a declaration on another replica is never missed.
    """

    def __init__(self, local: dict[str, JobType], limit_overrides: dict[str, int]) -> None:
        self.local = dict(local)  # in-process handlers keep their own settings, whatever workers declare
        self._overrides = dict(limit_overrides)
        self.known: dict[str, JobType] = dict(local)

    def replace_declared(self, declared: list[JobType]) -> None:
        """The stored declarations, as loaded from the store."""
        self.known = {**{t.name: t for t in declared if t.name not in self.local}, **self.local}

    def declare(self, declared: list[JobType]) -> None:
        for job_type in declared:
            if job_type.name not in self.local:
                self.known[job_type.name] = job_type

    def forget(self, names: list[str]) -> None:
        for name in names:
            if name not in self.local:
                self.known.pop(name, None)

    def get(self, name: str) -> JobType | None:
        return self.known.get(name)

    def visible(self, tenant: str | None) -> list[str]:
        """The names jobs of ``tenant`` may use (None: every name), sorted."""
        return sorted(name for name, t in self.known.items() if tenant is None or t.visible_to(tenant))

    def __contains__(self, name: object) -> bool:
        return name in self.known

    def __len__(self) -> int:
        return len(self.known)

    def limit(self, name: str) -> int | None:
        """The type's concurrency limit: the operator's override, else its declaration's."""
        declared = self.known.get(name)
        return self._overrides.get(name, declared.max_running if declared else None)

    def limits(self) -> dict[str, int]:
        limits = {name: self.limit(name) for name in self.known}
        return {name: limit for name, limit in limits.items() if limit is not None}

    def timeout(self, name: str, job_timeout: float | None, default: float | None) -> float | None:
        """An attempt's time-out: the job's, else its type's, else the server's."""
        declared = self.known.get(name)
        return job_timeout or (declared.timeout if declared else None) or default
