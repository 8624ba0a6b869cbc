"""Every transition is checked in one place, and matches the table in the proto and the docs."""

from __future__ import annotations

import itertools

import pytest

from jobwire.server.errors import IllegalTransition
from jobwire.server.state_machine import TERMINAL_STATES, TRANSITIONS, JobState, check_transition
from jobwire.v1 import job_pb2

LEGAL = {
    (JobState.QUEUED, JobState.QUEUED),  # UpdateJob
    (JobState.QUEUED, JobState.RUNNING),
    (JobState.QUEUED, JobState.CANCELLED),
    (JobState.RUNNING, JobState.SUCCEEDED),
    (JobState.RUNNING, JobState.FAILED),
    (JobState.RUNNING, JobState.CANCELLING),
    (JobState.RUNNING, JobState.QUEUED),
    (JobState.CANCELLING, JobState.CANCELLED),
    (JobState.FAILED, JobState.QUEUED),
    (JobState.CANCELLED, JobState.QUEUED),
}


@pytest.mark.parametrize(("source", "target"), list(itertools.product(JobState, JobState)))
def test_transition_table(source: JobState, target: JobState) -> None:
    if (source, target) in LEGAL:
        check_transition(source, target)
    else:
        with pytest.raises(IllegalTransition, match=f"{source.name} -> {target.name}"):
            check_transition(source, target)


def test_terminal_states_leave_only_through_retry() -> None:
    assert all(TRANSITIONS[s] <= {JobState.QUEUED} for s in TERMINAL_STATES)
    assert TRANSITIONS[JobState.SUCCEEDED] == frozenset()
    assert all(s.is_terminal for s in TERMINAL_STATES)


def test_values_match_the_proto() -> None:
    for state in JobState:
        assert job_pb2.JobState.Value(f"JOB_STATE_{state.name}") == state.value
    assert len(job_pb2.JobState.keys()) == len(JobState) + 1  # + UNSPECIFIED
