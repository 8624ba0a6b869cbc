"""The audit trail: every change to a job, who made it, when, and from where.

Entries are written by the store in the same transaction as the change they record (``insert``,
``transition`` and ``claim`` take or make them), so the trail can never miss a change that happened nor
record one that did not. They live as long as their job (purged with it). A job that is retried again
and again could grow its trail without end, so each time it goes back into the queue the store keeps
only its most recent ``MAX_AUDIT_ENTRIES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from jobwire.server.job import clip

# Kept per job at least (trimmed to this when the job is queued again).
MAX_AUDIT_ENTRIES = 1000
MAX_ACTION = 64
MAX_PRINCIPAL = 256
MAX_REQUEST_ID = 128
MAX_PEER = 128
MAX_DETAIL = 1024

# What happened (AuditEntry.action); the proto's AuditEntry documents the same list.
SUBMITTED = "submitted"
CANCEL_REQUESTED = "cancel requested"
CANCELLED = "cancelled"
RETRIED = "retried"
UPDATED = "updated"
ATTEMPT_STARTED = "attempt started"
ATTEMPT_SUCCEEDED = "attempt succeeded"
ATTEMPT_FAILED = "attempt failed"
ATTEMPT_RELEASED = "attempt released"
ATTEMPT_ABANDONED = "attempt abandoned"
LEASE_EXPIRED = "lease expired"
TIMED_OUT = "timed out"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: a caller's principal (and address, and request_id), or the server itself."""

    principal: str
    peer: str = ""
    request_id: str = ""

    def entry(self, job_id: str, time: float, action: str, detail: str = "") -> AuditEntry:
        return AuditEntry(job_id, time, action, self.principal, self.request_id, self.peer, detail)


# The server's own decisions: an expired lease, a time-out, a forced cancellation, a requeue.
SERVER = Actor("jobwire")


class _AuditFields(NamedTuple):
    job_id: str
    time: float
    action: str
    principal: str
    request_id: str = ""
    peer: str = ""
    detail: str = ""
    # Assigned by the store: increasing in the order entries were written (a page cursor).
    entry_id: int = 0


class AuditEntry(_AuditFields):
    """One recorded change. Every part is cut to its cap on construction, whoever supplied it.

    A named tuple rather than a dataclass: one is made for every change of every job, and a tuple of
    strings and numbers is the cheapest thing to make and to keep (the garbage collector stops tracking
    it).
    """

    __slots__ = ()

    def __new__(
        cls,
        job_id: str,
        time: float,
        action: str,
        principal: str,
        request_id: str = "",
        peer: str = "",
        detail: str = "",
        entry_id: int = 0,
    ) -> AuditEntry:
        if (  # one test on the hot path; cutting is the rare case
            len(detail) > MAX_DETAIL
            or len(peer) > MAX_PEER
            or len(request_id) > MAX_REQUEST_ID
            or len(principal) > MAX_PRINCIPAL
            or len(action) > MAX_ACTION
        ):
            action, principal = clip(action, MAX_ACTION), clip(principal, MAX_PRINCIPAL)
            request_id, peer = clip(request_id, MAX_REQUEST_ID), clip(peer, MAX_PEER)
            detail = clip(detail, MAX_DETAIL)
        return tuple.__new__(cls, (job_id, time, action, principal, request_id, peer, detail, entry_id))


def attempt_started(
    job_id: str, attempt: int, worker_id: str, time: float, principal: str, peer: str
) -> AuditEntry:
    """The entry a claim writes (the SQL stores build the same detail in SQL)."""
    return AuditEntry(job_id, time, ATTEMPT_STARTED, principal, "", peer, f"attempt {attempt} on {worker_id}")
