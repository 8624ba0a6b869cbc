"""The replicas of one Jobwire deployment: who dispatches, who is alive, and the messages between them.

A deployment is one or more server replicas on one store (docs/architecture.md). Exactly one replica is
the dispatcher at a time; its ``epoch`` grows with every change of dispatcher, and the store refuses
claims made under an old one. Replicas talk through small messages: executors announce their capacity
to the dispatcher, and the dispatcher publishes the cluster's status to everyone.

``LocalCluster`` is a cluster of one (SQLite, memory): always the dispatcher, always alive, messages are
calls. The PostgreSQL store provides the shared one (``stores/postgres.py``).
"""

from __future__ import annotations

import abc
import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


def new_replica_id() -> str:
    """A fresh name for this process's replica: a restarted process is a new replica."""
    return "r" + secrets.token_hex(4)


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    """Something that runs jobs: a replica's in-process handlers, or one worker session."""

    id: str  # "<replica>/local" or "<replica>/<session>"
    worker_id: str  # what a job it runs shows as worker_id: "local", or the worker's own id
    types: frozenset[str]
    # The only tenant whose jobs it may run (a tenant's worker); None for every tenant's (in-process
    # handlers, an admin's worker).
    tenant: str | None = None
    # Who it is, for the audit trail of the attempts it starts: its credential, and its address.
    principal: str = "jobwire"
    peer: str = ""

    @property
    def replica(self) -> str:
        return self.id.partition("/")[0]


@dataclass(frozen=True, slots=True)
class TypeStatus:
    """The dispatcher's view of one job type."""

    executors: int = 0  # executors that take it
    free: int = 0  # free credits among them
    running: int = 0
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """What the dispatcher knows and every replica needs for wait reasons and statistics."""

    types: dict[str, TypeStatus] = field(default_factory=dict)
    executors: int = 0
    workers: int = 0  # worker sessions (executors that are not in-process handlers)
    running: int = 0
    # Running jobs per tenant and type (for tenant limits and per-tenant statistics).
    tenants: dict[str, dict[str, int]] = field(default_factory=dict)

    def tenant_running(self, tenant: str) -> int:
        return sum(self.tenants.get(tenant, {}).values())


# --- messages ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecutorUp:
    """An executor is ready, with this many free credits (sent again to every new dispatcher)."""

    executor: ExecutorInfo
    credits: int


@dataclass(frozen=True, slots=True)
class Credits:
    """An executor can take ``delta`` more jobs."""

    executor_id: str
    delta: int


@dataclass(frozen=True, slots=True)
class ExecutorDown:
    executor_id: str


@dataclass(frozen=True, slots=True)
class DispatcherUp:
    """A replica became the dispatcher: every replica announces its executors again."""

    epoch: int


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    status: ClusterStatus


@dataclass(frozen=True, slots=True)
class TypesChanged:
    """Job types were declared or forgotten: read them from the store again."""


Message = ExecutorUp | Credits | ExecutorDown | DispatcherUp | StatusUpdate | TypesChanged
MessageHandler = Callable[[Message], None]
# Called with the epoch when this replica becomes the dispatcher, with None when it stops being it.
LeadershipHandler = Callable[[int | None], Awaitable[None]]


class Cluster(abc.ABC):
    """This replica's membership of the deployment."""

    replica_id: str

    @abc.abstractmethod
    async def join(self, on_message: MessageHandler, on_leadership: LeadershipHandler) -> None:
        """Start hearing messages and competing to be the dispatcher."""

    @abc.abstractmethod
    async def leave(self) -> None:
        """Stop dispatching (if this replica was) and hearing messages. Idempotent."""

    @abc.abstractmethod
    def send(self, message: Message) -> None:
        """Send to every replica, this one included. Never blocks; delivery is in order per sender."""

    @abc.abstractmethod
    async def live_replicas(self) -> set[str]:
        """The replicas alive now (their in-process attempts are theirs; the others' are orphans)."""

    def on_reset(self, callback: Callable[[], Awaitable[None]]) -> None:  # noqa: B027  (optional)
        """Call ``callback`` when this replica lost touch with the others (and may have missed changes
        and messages): what it derived from them must be rebuilt. A cluster of one never is."""


class LocalCluster(Cluster):
    """A cluster of one process: it is the dispatcher from the start, and messages are calls."""

    def __init__(self, replica_id: str | None = None) -> None:
        self.replica_id = replica_id or new_replica_id()
        self._on_message: MessageHandler | None = None
        self._on_leadership: LeadershipHandler | None = None
        self._joined = False

    async def join(self, on_message: MessageHandler, on_leadership: LeadershipHandler) -> None:
        self._on_message, self._on_leadership = on_message, on_leadership
        self._joined = True
        await on_leadership(1)

    async def leave(self) -> None:
        if self._joined and self._on_leadership is not None:
            self._joined = False
            await self._on_leadership(None)
        self._on_message = None

    def send(self, message: Message) -> None:
        if self._on_message is not None:
            self._on_message(message)

    async def live_replicas(self) -> set[str]:
        await asyncio.sleep(0)
        return {self.replica_id}
