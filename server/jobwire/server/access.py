"""Who may do what: principals, roles, tenants, and what each role allows.

Credentials are checked at the edge (``api/authentication.py`` turns a bearer token or a client
certificate into a ``Principal``); from there on every job operation asks this module whether its caller
may act, and on which tenant's jobs. With authentication off every caller is ``ANONYMOUS``: an admin of
the tenant ``default``, so a single-user server behaves as it always did.

Tenants isolate: a caller other than an admin sees only its own tenant's jobs, and another tenant's job
is indistinguishable from a missing one (``jobs.py`` answers NOT_FOUND).
"""

from __future__ import annotations

import enum
import fnmatch
import re
from dataclasses import dataclass, field

from jobwire.server.audit import Actor
from jobwire.server.errors import InvalidArgument, PermissionDenied

DEFAULT_TENANT = "default"
# Tenant names: lowercase, so that "Acme" and "acme" can never be two tenants.
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MAX_SUBJECT = 128
# Type patterns a credential may carry (``fnmatch``: ``reports.*``), at most this many.
MAX_TYPE_PATTERNS = 100
TYPE_PATTERN_PATTERN = re.compile(r"^[A-Za-z0-9._:/*?-]{1,128}$")


class Role(enum.StrEnum):
    ADMIN = "admin"
    SUBMITTER = "submitter"
    VIEWER = "viewer"
    WORKER = "worker"


class Action(enum.StrEnum):
    """What a call does, as far as permissions go (the value is how an error names it).

    String enums: a permission check hashes one on every call, and a string hashes in C.
    """

    SUBMIT = "submit jobs"
    READ = "read jobs"  # GetJob, ListJobs, WatchJob, GetQueueStats, ListJobAuditEntries
    CANCEL = "cancel jobs"
    UPDATE = "update queued jobs"  # UpdateJob
    RETRY = "retry jobs"
    WORK = "run jobs as a worker"  # WorkerService.Connect


# The whole permission model in one table (README "Security" shows it to users).
PERMISSIONS: dict[Role, frozenset[Action]] = {
    Role.ADMIN: frozenset(Action),
    Role.SUBMITTER: frozenset({Action.SUBMIT, Action.READ, Action.CANCEL, Action.RETRY, Action.UPDATE}),
    Role.VIEWER: frozenset({Action.READ}),
    Role.WORKER: frozenset({Action.WORK}),
}


def parse_role(text: str) -> Role:
    """A role by its exact name (credentials are signed: nothing about them is guessed)."""
    try:
        return Role(text)
    except ValueError:
        names = ", ".join(role.value for role in Role)
        raise ValueError(f"not a role: {_shown(text)} (use {names})") from None


def _shown(value: str) -> str:
    """A value for an error message: credentials come from anyone, so never echo much of one."""
    return repr(value if len(value) <= 40 else value[:39] + "…")


def check_tenant(name: str) -> str:
    if not TENANT_PATTERN.match(name):
        raise ValueError(
            f"not a tenant name: {_shown(name)} (1-63 characters of a-z, 0-9, '_', '.', '-', starting "
            "with a letter or digit)"
        )
    return name


def check_subject(subject: str) -> str:
    if not subject or len(subject) > MAX_SUBJECT or not subject.isprintable():
        raise ValueError(f"a subject is 1 to {MAX_SUBJECT} printable characters, got {_shown(subject)}")
    return subject


def check_type_patterns(patterns: list[str]) -> tuple[str, ...]:
    """Job type names or ``fnmatch`` patterns (``reports.*``) a credential is limited to."""
    if not patterns:
        raise ValueError("a list of types must name at least one type")
    if len(patterns) > MAX_TYPE_PATTERNS:
        raise ValueError(f"at most {MAX_TYPE_PATTERNS} types or patterns")
    for pattern in patterns:
        if not TYPE_PATTERN_PATTERN.match(pattern):
            raise ValueError(f"not a job type or pattern: {_shown(pattern)}")
    return tuple(patterns)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated identity: who (``subject``), of which tenant, in which role.

    ``types``: the job types (names or ``fnmatch`` patterns) this credential may submit or, for a
    worker, declare and run; None allows every type.
    """

    subject: str
    tenant: str
    role: Role
    types: tuple[str, ...] | None = None
    anonymous: bool = False
    # How the audit trail names it: ``alice (acme/submitter)`` (made once: it goes with every change).
    label: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        label = "anonymous" if self.anonymous else f"{self.subject} ({self.tenant}/{self.role.value})"
        object.__setattr__(self, "label", label)

    @property
    def all_tenants(self) -> bool:
        """Admins act on every tenant's jobs; everyone else on their own tenant's only."""
        return self.role is Role.ADMIN

    def can(self, action: Action) -> bool:
        return action in PERMISSIONS[self.role]

    def require(self, action: Action) -> None:
        """PermissionDenied unless the role allows ``action``."""
        if action not in PERMISSIONS[self.role]:
            raise PermissionDenied(
                f"{self.label} may not {action.value}: the {self.role.value} role does not allow it",
                metadata={"role": self.role.value, "action": action.name.lower()},
            )

    def sees(self, tenant: str) -> bool:
        return self.role is Role.ADMIN or tenant == self.tenant

    def may_use_type(self, name: str) -> bool:
        return self.types is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.types)

    def require_type(self, name: str) -> None:
        if not self.may_use_type(name):
            raise PermissionDenied(
                f"the credential of {self.label} does not allow job type {name!r} "
                f"(it allows {', '.join(self.types or ())})",
                metadata={"type": name[:128]},
            )

    def scope_tenants(self, requested: frozenset[str]) -> frozenset[str]:
        """The tenants a listing may cover: what an admin asks for (empty: all); a caller's own only."""
        if self.role is Role.ADMIN:
            return requested
        if requested and requested != {self.tenant}:
            raise PermissionDenied(
                f"{self.label} may list only its own tenant's jobs ({self.tenant})",
                metadata={"role": self.role.value},
            )
        return frozenset({self.tenant})


# Every caller when authentication is off: an admin of the default tenant.
ANONYMOUS = Principal("anonymous", DEFAULT_TENANT, Role.ADMIN, anonymous=True)


@dataclass(frozen=True, slots=True)
class Caller:
    """A principal making one call, from one address: what permission checks and the audit trail need."""

    principal: Principal
    peer: str = ""

    def actor(self, request_id: str = "") -> Actor:
        return Actor(self.principal.label, self.peer, request_id)


# Calls made from inside the process (tests driving the manager, the server's own housekeeping).
LOCAL_CALLER = Caller(ANONYMOUS)


def tenant_filter_violation(tenants: list[str]) -> InvalidArgument | None:
    """A ListJobs ``tenants`` filter that is too long or names something that cannot be a tenant."""
    if len(tenants) > 100:
        return InvalidArgument("tenants: at most 100")
    for index, name in enumerate(tenants):
        if not TENANT_PATTERN.match(name):
            return InvalidArgument(f"tenants[{index}]: not a tenant name: {name[:80]!r}")
    return None
