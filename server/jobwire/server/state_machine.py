"""The job state machine, written down once. Every state change in Jobwire goes through ``check_transition``.

    QUEUED     -> RUNNING | CANCELLED
    RUNNING    -> SUCCEEDED | FAILED | CANCELLING | QUEUED   (QUEUED: another attempt follows)
    CANCELLING -> CANCELLED
    FAILED     -> QUEUED    (RetryJob)
    CANCELLED  -> QUEUED    (RetryJob)

CANCELLING always ends CANCELLED: whatever the handler does after it was told to stop (return, raise,
ignore the request until the grace period runs out), the user asked for the job to stop.
"""

from __future__ import annotations

import enum

from jobwire.server.errors import IllegalTransition


class JobState(enum.IntEnum):
    """Lifecycle states; the values equal the proto's ``JobState`` numbers."""

    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5
    CANCELLING = 6

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def is_active(self) -> bool:
        """Holding a run slot: a handler may be executing."""
        return self in ACTIVE_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.RUNNING, JobState.CANCELLING})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # QUEUED -> QUEUED: UpdateJob changed a job that has not started (its priority, labels, schedule).
    JobState.QUEUED: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLING, JobState.QUEUED}),
    JobState.CANCELLING: frozenset({JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}


def check_transition(current: JobState, target: JobState) -> None:
    """Raise IllegalTransition unless current -> target is in the table."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(f"illegal job state transition {current.name} -> {target.name}")
