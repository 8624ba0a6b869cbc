"""How long a finished job is kept before it is purged.

A job may carry its own retention (SubmitJobRequest.retention); otherwise the server's for its outcome
(``--retention-succeeded``, ``--retention-failed``, ``--retention-cancelled``), else ``--retention``.
The time is fixed when the job ends (``expire_time``), so changing the server's settings later does
not move it for jobs already finished.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from jobwire.server.state_machine import JobState

# What a job may ask for (SubmitJobRequest.retention).
MIN_RETENTION = 1.0
MAX_RETENTION = 3650 * 86400.0


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """The server's retention: one default, and optionally one per outcome."""

    default: float = 7 * 86400.0
    by_outcome: Mapping[JobState, float] = field(default_factory=dict)

    def for_job(self, job_retention: float | None, outcome: JobState) -> float:
        """Seconds to keep a job that just ended in ``outcome``: its own retention if it set one."""
        if job_retention is not None:
            return job_retention
        return self.by_outcome.get(outcome, self.default)
