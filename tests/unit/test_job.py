"""The job model: ids."""

from __future__ import annotations

from jobwire.server.job import JobIdGenerator


def test_job_ids_sort_by_creation_and_are_url_safe() -> None:
    generator = JobIdGenerator()
    ids = [generator.new_id() for _ in range(10_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 26 and i.isalnum() and i.islower() for i in ids)
