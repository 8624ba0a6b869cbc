"""Helpers for reading Job messages, so callers need not know the protobuf well-known types."""

from __future__ import annotations

from typing import Any, TypeAlias

from google.protobuf import json_format, struct_pb2

from jobwire.v1 import job_pb2

__all__ = [
    "ACTIVE_STATES",
    "STATE_NAMES",
    "TERMINAL_STATES",
    "is_terminal",
    "job_params",
    "job_result",
    "parse_state",
    "state_name",
    "struct_to_dict",
]

JobState: TypeAlias = job_pb2.JobState.ValueType

TERMINAL_STATES: frozenset[JobState] = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)
"""States a job never leaves."""

ACTIVE_STATES: frozenset[JobState] = frozenset({job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_CANCELLING})
"""States in which a handler may be executing."""

_PREFIX = "JOB_STATE_"

STATE_NAMES: tuple[str, ...] = tuple(
    name.removeprefix(_PREFIX).lower()
    for name, number in job_pb2.JobState.items()
    if number != job_pb2.JOB_STATE_UNSPECIFIED
)
"""Short lowercase names of every settable state: "queued", "running", ..."""


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict (numbers come back as floats, as JSON has no integers)."""
    return dict(json_format.MessageToDict(value))


def job_result(job: job_pb2.Job) -> dict[str, Any] | None:
    """What the handler returned, or None until the job has SUCCEEDED with a result."""
    if not job.HasField("result"):
        return None
    return struct_to_dict(job.result)


def job_params(job: job_pb2.Job) -> dict[str, Any]:
    """The parameters the job was submitted with ({} when none)."""
    if not job.HasField("params"):
        return {}
    return struct_to_dict(job.params)


def state_name(state: int) -> str:
    """Short lowercase name of a state ("queued"); "unspecified" or the number for unknown values."""
    try:
        return job_pb2.JobState.Name(state).removeprefix(_PREFIX).lower()  # type: ignore[arg-type]
    except ValueError:
        return str(state)


def is_terminal(state: int) -> bool:
    """True for SUCCEEDED, FAILED and CANCELLED: the job will not change again."""
    return state in TERMINAL_STATES


def parse_state(value: int | str) -> JobState:
    """A JobState from its number or name ("queued", "QUEUED" or "JOB_STATE_QUEUED").

    Raises ValueError for unknown names and for UNSPECIFIED, which the server rejects in filters.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a job state: {value!r}")
    if isinstance(value, int):
        if value not in job_pb2.JobState.values() or value == job_pb2.JOB_STATE_UNSPECIFIED:
            raise ValueError(f"not a job state: {value!r}")
        return job_pb2.JobState.ValueType(value)
    name = value.strip().upper()
    if not name.startswith(_PREFIX):
        name = _PREFIX + name
    try:
        number = job_pb2.JobState.Value(name)
    except ValueError:
        raise ValueError(f"unknown job state {value!r}; expected one of: {', '.join(STATE_NAMES)}") from None
    if number == job_pb2.JOB_STATE_UNSPECIFIED:
        raise ValueError(f"unknown job state {value!r}; expected one of: {', '.join(STATE_NAMES)}")
    return number
