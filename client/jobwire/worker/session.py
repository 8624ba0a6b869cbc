"""The worker's bookkeeping, with no I/O: leases, credits, the outgoing queue, unacknowledged outcomes.

``worker.py`` owns the stream, the tasks and the timers; every decision about what to send lives here,
so it can be tested without a server. Everything is called on the event loop's thread.

The rules it encodes (see ``protos/jobwire/v1/worker_service.proto``):

* credits: a fresh registration offers ``concurrency`` minus the handlers still alive, and each finished
  handler gives one credit back with AddCredits (not while stopping);
* outcomes (CompleteJob, FailJob, ReleaseJob) stay *pending* until a WriteResult answers them, and are
  re-sent on every new connection;
* a revoked lease is forgotten: its handler is told to stop and whatever it ends with is never sent;
* progress reports are coalesced per job, so a chatty handler can never flood the stream; the last one
  is sent before the job's outcome, so a finished job shows its final progress.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2
from google.rpc import code_pb2, status_pb2

from jobwire.handlers.api import HandlerSpec, JobCancelled, NonRetryableError, Progress
from jobwire.v1 import job_pb2, worker_service_pb2

W = worker_service_pb2

MAX_ERROR_MESSAGE = 4096


@dataclass(frozen=True, slots=True)
class Lease:
    """One attempt's lease (the proto's LeaseToken), hashable so that it can key the bookkeeping."""

    job_id: str
    attempt: int
    epoch: int

    @classmethod
    def from_proto(cls, token: worker_service_pb2.LeaseToken) -> Lease:
        return cls(token.job_id, token.attempt, token.epoch)

    def to_proto(self) -> worker_service_pb2.LeaseToken:
        return W.LeaseToken(job_id=self.job_id, attempt=self.attempt, epoch=self.epoch)

    def __str__(self) -> str:
        return f"{self.job_id}#{self.attempt}@{self.epoch}"


# --- building messages ------------------------------------------------------------------------------


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1_000_000_000))
    return duration


def declaration(spec: HandlerSpec) -> worker_service_pb2.JobTypeDeclaration:
    """A HandlerSpec as a JobTypeDeclaration; defaults left None stay zero/unset (server's defaults)."""
    decl = W.JobTypeDeclaration(type=spec.name, max_running=spec.max_running or 0)
    retry = spec.retry
    policy = decl.retry_policy
    if retry.max_attempts is not None:
        policy.max_attempts = retry.max_attempts
    if retry.initial_backoff is not None:
        policy.initial_backoff.CopyFrom(_duration(retry.initial_backoff))
    if retry.max_backoff is not None:
        policy.max_backoff.CopyFrom(_duration(retry.max_backoff))
    if retry.backoff_multiplier is not None:
        policy.backoff_multiplier = retry.backoff_multiplier
    if retry.non_retryable_codes:
        policy.non_retryable_codes.extend(retry.non_retryable_codes)
    if spec.timeout is not None:
        decl.timeout.CopyFrom(_duration(spec.timeout))
    return decl


def register_request(
    worker_id: str, handlers: Mapping[str, HandlerSpec], credits: int
) -> worker_service_pb2.ConnectRequest:
    """The first message of every connection."""
    return W.ConnectRequest(
        register=W.RegisterWorker(
            worker_id=worker_id,
            job_types=[declaration(spec) for _, spec in sorted(handlers.items())],
            credits=credits,
            accepts_batches=True,
        )
    )


def progress_proto(progress: Progress) -> job_pb2.Progress:
    message = job_pb2.Progress(
        percent=progress.percent,
        message=progress.message,
        current_step=progress.current_step,
        total_steps=progress.total_steps,
    )
    if progress.details is not None:
        message.details.update(progress.details)
    return message


def progress_from_proto(job: job_pb2.Job) -> Progress | None:
    """The job's last progress (a retried attempt starts from it), None when it never reported any."""
    if not job.HasField("progress"):
        return None
    p = job.progress
    details = json_format.MessageToDict(p.details) if p.HasField("details") else None
    return Progress(p.percent, p.message, p.current_step, p.total_steps, details)


def complete_request(lease: Lease, value: Any) -> worker_service_pb2.ConnectRequest:
    """The outcome for a handler's return value: CompleteJob, or a non-retryable FailJob when the value
    cannot be a JSON object (the same rule as the server's in-process handlers)."""
    try:
        result = json.loads(json.dumps({} if value is None else value, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        message = f"the handler returned a value that is not JSON-compatible: {exc}"
        return fail_request(lease, code_pb2.UNKNOWN, message, non_retryable=True)
    if not isinstance(result, dict):
        result = {"value": result}
    struct = struct_pb2.Struct()
    struct.update(result)
    return W.ConnectRequest(complete_job=W.CompleteJob(lease=lease.to_proto(), result=struct))


def fail_request(
    lease: Lease, code: int, message: str, *, non_retryable: bool = False
) -> worker_service_pb2.ConnectRequest:
    status = status_pb2.Status(code=code, message=message[:MAX_ERROR_MESSAGE])
    return W.ConnectRequest(
        fail_job=W.FailJob(lease=lease.to_proto(), error=status, non_retryable=non_retryable)
    )


def exception_request(
    lease: Lease, error: BaseException, *, timed_out: bool = False
) -> worker_service_pb2.ConnectRequest:
    """The outcome for a handler that raised.

    JobCancelled is CANCELLED (or DEADLINE_EXCEEDED when the worker stopped it at its time-out);
    NonRetryableError fails the job at once; anything else is a retryable UNKNOWN failure.
    """
    if isinstance(error, JobCancelled):
        if timed_out:
            return fail_request(lease, code_pb2.DEADLINE_EXCEEDED, str(error) or "timed out")
        return fail_request(lease, code_pb2.CANCELLED, str(error) or "cancelled")
    message = f"{type(error).__name__}: {error}"
    return fail_request(lease, code_pb2.UNKNOWN, message, non_retryable=isinstance(error, NonRetryableError))


def release_request(lease: Lease, reason: str) -> worker_service_pb2.ConnectRequest:
    return W.ConnectRequest(release_job=W.ReleaseJob(lease=lease.to_proto(), reason=reason))


def outcome_lease(request: worker_service_pb2.ConnectRequest) -> Lease | None:
    """The lease an outcome message is about (None for other messages)."""
    kind = request.WhichOneof("message")
    if kind == "complete_job":
        return Lease.from_proto(request.complete_job.lease)
    if kind == "fail_job":
        return Lease.from_proto(request.fail_job.lease)
    if kind == "release_job":
        return Lease.from_proto(request.release_job.lease)
    return None


def describe(request: worker_service_pb2.ConnectRequest) -> str:
    """A short human description of an outcome, for logs."""
    kind = request.WhichOneof("message")
    if kind == "fail_job":
        error = request.fail_job.error
        return f"fail_job ({code_pb2.Code.Name(error.code)}: {error.message})"
    return str(kind)


# --- the outgoing queue -----------------------------------------------------------------------------


class _Entry:
    __slots__ = ("key", "message")

    def __init__(self, message: worker_service_pb2.ConnectRequest, key: Hashable | None) -> None:
        self.message: worker_service_pb2.ConnectRequest | None = message
        self.key = key


class Outbox:
    """Messages waiting to be written on one connection, in order.

    A message pushed with a ``key`` replaces the unsent message with the same key in place (keeping
    its position), which is how progress reports and heartbeats are coalesced: however fast they are
    produced, at most one per key waits while the stream is slow.
    """

    def __init__(self, on_push: Callable[[], None] | None = None) -> None:
        self._queue: deque[_Entry] = deque()
        self._keyed: dict[Hashable, _Entry] = {}
        self.on_push = on_push

    def push(self, message: worker_service_pb2.ConnectRequest, key: Hashable | None = None) -> None:
        if key is not None:
            entry = self._keyed.get(key)
            if entry is not None:
                entry.message = message
                return
        entry = _Entry(message, key)
        if key is not None:
            self._keyed[key] = entry
        self._queue.append(entry)
        if self.on_push is not None:
            self.on_push()

    def discard(self, key: Hashable) -> None:
        """Drop the unsent message with this key, if any."""
        entry = self._keyed.pop(key, None)
        if entry is not None:
            entry.message = None

    def pop(self) -> worker_service_pb2.ConnectRequest | None:
        """The next message to write, or None when there is none."""
        while self._queue:
            entry = self._queue.popleft()
            if entry.key is not None and self._keyed.get(entry.key) is entry:
                del self._keyed[entry.key]
            if entry.message is not None:
                return entry.message
        return None

    def pop_many(self, limit: int) -> list[worker_service_pb2.ConnectRequest]:
        """Up to ``limit`` messages to write, in order, with their AddCredits summed into one at the end
        (credits only add up, so where they stand among the others does not matter)."""
        taken: list[worker_service_pb2.ConnectRequest] = []
        credits = 0
        for _ in range(limit):
            if (message := self.pop()) is None:
                break
            if message.WhichOneof("message") == "add_credits":
                credits += message.add_credits.credits
            else:
                taken.append(message)
        if credits:
            taken.append(W.ConnectRequest(add_credits=W.AddCredits(credits=credits)))
        return taken

    def __len__(self) -> int:
        return sum(1 for entry in self._queue if entry.message is not None)


def progress_key(lease: Lease) -> Hashable:
    return ("progress", lease)


HEARTBEAT_KEY: Hashable = ("heartbeat",)


# --- the session ------------------------------------------------------------------------------------


@dataclass(slots=True)
class ActiveJob:
    """A job whose handler is alive on this worker."""

    lease: Lease
    job_type: str
    cancel: Callable[[str], None]  # asks the handler to stop (the context's cancel)
    revoked: bool = False  # the lease is lost: the handler's outcome must never be sent
    released: bool = False  # handed back with ReleaseJob: its outcome is not sent either
    timed_out: bool = False  # the worker stopped it at its run time-out


@dataclass(slots=True)
class WriteAck:
    """What a WriteResult answered: the outcome it acknowledged (None if none was pending)."""

    lease: Lease
    accepted: bool
    reason: str
    outcome: worker_service_pb2.ConnectRequest | None
    resent: bool  # the outcome had been sent again after a reconnection


@dataclass
class WorkerSession:
    """Everything the worker must remember across connections; one per Worker."""

    worker_id: str
    handlers: Mapping[str, HandlerSpec]
    concurrency: int
    stopping: bool = False
    outbox: Outbox | None = None  # the current connection's, None while disconnected
    active: dict[Lease, ActiveJob] = field(default_factory=dict)
    pending: dict[Lease, worker_service_pb2.ConnectRequest] = field(default_factory=dict)
    _resent: set[Lease] = field(default_factory=set)

    # -- connections --

    def connect(self, on_push: Callable[[], None] | None = None) -> Outbox:
        """A new connection's outbox: RegisterWorker (credits for the free slots), a Heartbeat that
        re-attaches the jobs still running, then every outcome not yet acknowledged."""
        outbox = Outbox(on_push)
        outbox.push(register_request(self.worker_id, self.handlers, self.free_credits()))
        leases = self.heartbeat_leases()
        if leases:
            outbox.push(self.heartbeat_request(leases), HEARTBEAT_KEY)
        for lease, outcome in self.pending.items():
            outbox.push(outcome)
            self._resent.add(lease)
        self.outbox = outbox
        return outbox

    def disconnect(self) -> None:
        """The stream broke: what was queued is dropped (the next connection rebuilds it)."""
        self.outbox = None

    def free_credits(self) -> int:
        """Credits to offer on registration: free slots, none while stopping."""
        if self.stopping:
            return 0
        return max(0, self.concurrency - len(self.active))

    # -- what the server says --

    def can_accept(self, job_type: str) -> str | None:
        """None if an assignment of this type can run; else why not (the I/O side answers it)."""
        if self.stopping:
            return "worker shutting down"
        if job_type not in self.handlers:
            return f"this worker has no handler for job type {job_type!r}"
        return None

    def start(self, lease: Lease, job_type: str, cancel: Callable[[str], None]) -> ActiveJob:
        job = ActiveJob(lease, job_type, cancel)
        self.active[lease] = job
        return job

    def refuse(self, lease: Lease, reason: str) -> None:
        """Answer an assignment the worker cannot run.

        While stopping it is handed back unrun (ReleaseJob). A type this worker never declared (a
        server bug) fails the attempt retryably rather than being released, so that it cannot bounce
        between the server and this worker forever; the credit is given back.
        """
        if self.stopping:
            self._send_outcome(lease, release_request(lease, reason))
        else:
            self._send_outcome(lease, fail_request(lease, code_pb2.UNIMPLEMENTED, reason))
            self._send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))

    def abandon(self, lease: Lease) -> None:
        """The handler's task was cancelled (hard stop): forget the job without an outcome."""
        self.active.pop(lease, None)

    def cancel_requested(self, lease: Lease, reason: str) -> bool:
        """CancelRequested: tell the handler to stop. False if the job is not running here."""
        job = self.active.get(lease)
        if job is None or job.revoked:
            return False
        job.cancel(reason or "cancelled")
        return True

    def lease_revoked(self, lease: Lease, reason: str) -> bool:
        """LeaseRevoked: stop the handler and forget the job. False if it was not known."""
        known = False
        job = self.active.get(lease)
        if job is not None and not job.revoked:
            job.revoked = True
            job.cancel(f"lease lost: {reason}" if reason else "lease lost")
            known = True
        if self.outbox is not None:
            self.outbox.discard(progress_key(lease))
        if self.pending.pop(lease, None) is not None:
            known = True
        self._resent.discard(lease)
        return known

    def write_result(self, lease: Lease, accepted: bool, reason: str) -> WriteAck:
        """WriteResult: the outcome for this lease is settled, recorded or refused."""
        outcome = self.pending.pop(lease, None)
        resent = lease in self._resent
        self._resent.discard(lease)
        return WriteAck(lease, accepted, reason, outcome, resent)

    # -- what the handlers do --

    def progress(self, lease: Lease, progress: Progress) -> None:
        """Queue a ReportProgress, replacing one for the same job that is still waiting."""
        job = self.active.get(lease)
        if job is None or job.revoked or job.released or self.outbox is None:
            return
        message = W.ConnectRequest(
            report_progress=W.ReportProgress(lease=lease.to_proto(), progress=progress_proto(progress))
        )
        self.outbox.push(message, progress_key(lease))

    def finished(self, lease: Lease, outcome: worker_service_pb2.ConnectRequest) -> bool:
        """A handler ended with ``outcome``. Returns True if the outcome is to be sent.

        A revoked or released job's outcome is dropped. Each handler that ends gives its credit back
        (AddCredits) unless the worker is stopping.
        """
        job = self.active.pop(lease, None)
        if job is None:
            return False
        send = not (job.revoked or job.released)
        if send:
            self._send_outcome(lease, outcome)
        if not self.stopping:
            self._send(W.ConnectRequest(add_credits=W.AddCredits(credits=1)))
        return send

    # -- heartbeats and stopping --

    def heartbeat_leases(self) -> list[Lease]:
        """The leases to renew: every live handler whose lease is still ours."""
        return [lease for lease, job in self.active.items() if not (job.revoked or job.released)]

    @staticmethod
    def heartbeat_request(leases: Iterable[Lease]) -> worker_service_pb2.ConnectRequest:
        return W.ConnectRequest(heartbeat=W.Heartbeat(leases=[lease.to_proto() for lease in leases]))

    def heartbeat(self) -> None:
        """Queue a Heartbeat (replacing one still waiting) with the current leases."""
        if self.outbox is not None:
            self.outbox.push(self.heartbeat_request(self.heartbeat_leases()), HEARTBEAT_KEY)

    def begin_stop(self) -> None:
        """No more credits: assignments that still arrive are handed back."""
        self.stopping = True

    def release_all(self, reason: str) -> list[Lease]:
        """Drain's last step: stop every handler still running and hand its job back."""
        released = []
        for lease, job in self.active.items():
            if job.revoked or job.released:
                continue
            job.released = True
            job.cancel(reason)
            if self.outbox is not None:
                self.outbox.discard(progress_key(lease))
            self._send_outcome(lease, release_request(lease, reason))
            released.append(lease)
        return released

    @property
    def running(self) -> int:
        """Handlers alive (including revoked or released ones that have not returned yet)."""
        return len(self.active)

    # -- internals --

    def _send_outcome(self, lease: Lease, outcome: worker_service_pb2.ConnectRequest) -> None:
        """Queue an outcome; a progress report still waiting goes first (it is the job's last one)."""
        self.pending[lease] = outcome
        self._resent.discard(lease)
        if self.outbox is not None:
            self.outbox.push(outcome)

    def _send(self, message: worker_service_pb2.ConnectRequest) -> None:
        if self.outbox is not None:
            self.outbox.push(message)


def duration_seconds(duration: duration_pb2.Duration) -> float | None:
    """A Duration in seconds, None when zero (unset)."""
    seconds = duration.ToNanoseconds() / 1e9
    return seconds if seconds > 0 and math.isfinite(seconds) else None
