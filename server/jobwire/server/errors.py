"""The one exception root of the server's domain.

Each class's docstring is its default message. The gRPC layer (``api/errors.py``) is the only place
that maps these to status codes and ``google.rpc.ErrorInfo`` reasons.
"""

from __future__ import annotations


class JobwireError(Exception):
    """Jobwire could not do what was asked.

    ``metadata`` is machine-readable context for the caller (it becomes google.rpc.ErrorInfo.metadata).
    """

    def __init__(self, message: str | None = None, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        self.metadata = metadata or {}

    @property
    def message(self) -> str:
        return str(self.args[0])


class FieldViolation:
    """One bad field of a request: which one, and why."""

    __slots__ = ("description", "field")

    def __init__(self, field: str, description: str) -> None:
        self.field = field
        self.description = description

    def __repr__(self) -> str:
        return f"FieldViolation({self.field!r}, {self.description!r})"


# How many violations a message names; the rest are counted. An error must stay small whatever the
# request held: a client refuses response metadata past 16 KiB (see api/errors.py).
MESSAGE_VIOLATIONS = 5


class InvalidArgument(JobwireError):
    """The request is not valid."""

    def __init__(self, message: str | None = None, violations: list[FieldViolation] | None = None) -> None:
        self.violations = violations or []
        if message is None and self.violations:
            named = self.violations[:MESSAGE_VIOLATIONS]
            message = "; ".join(f"{v.field}: {v.description}" for v in named)
            if len(self.violations) > len(named):
                message += f"; and {len(self.violations) - len(named)} more"
        super().__init__(message)


class UnknownJobType(InvalidArgument):
    """No handler is registered for this job type."""


class RequestIdReused(InvalidArgument):
    """This request_id was already used for a different request."""


class JobNotFound(JobwireError):
    """No such job (it may have been purged after its retention period)."""


class JobAlreadyFinished(JobwireError):
    """The job has already finished and cannot be changed."""


class JobNotQueued(JobwireError):
    """The job has started (or ended): what may change only before it runs cannot change any more."""


class TooManyJobTypes(JobwireError):
    """The server knows as many job types as it may: no new one can be declared."""


class QueueFull(JobwireError):
    """The queue is full: too many jobs are waiting."""


class Unauthenticated(JobwireError):
    """The call carries no valid credentials.

    ``reason`` says which check failed (it becomes ErrorInfo.reason): CREDENTIALS_MISSING,
    TOKEN_MALFORMED, TOKEN_EXPIRED, TOKEN_UNKNOWN_KEY, TOKEN_BAD_SIGNATURE, TOKEN_INVALID,
    CERTIFICATE_INVALID.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: str = "UNAUTHENTICATED",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.reason = reason


class PermissionDenied(JobwireError):
    """The caller's role or credential does not allow this."""


class QuotaExceeded(JobwireError):
    """The caller's tenant is over one of its quotas (queued jobs, running jobs, submit rate).

    ``subject`` and ``description`` become a google.rpc.QuotaFailure violation; ``retry_after`` (seconds)
    a google.rpc.RetryInfo.
    """

    def __init__(self, message: str, *, subject: str, description: str, retry_after: float) -> None:
        super().__init__(message, metadata={"quota_subject": subject})
        self.subject = subject
        self.description = description
        self.retry_after = retry_after


class Draining(JobwireError):
    """The server is draining and accepts no new work."""


class Starting(JobwireError):
    """The server is still recovering its queue from the store: retry in a moment."""


class WatchPositionLost(JobwireError):
    """The requested watch position is no longer retained: watch again from the start."""


class IllegalTransition(JobwireError):
    """A job state transition that the state machine forbids: a bug in Jobwire, never bad input."""
