"""The job model: ids."""

from __future__ import annotations

from typing import Any

from jobwire.server.job import JobIdGenerator


def test_job_ids_sort_by_creation_and_are_url_safe() -> None:
    generator = JobIdGenerator()
    ids = [generator.new_id() for _ in range(10_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 26 and i.isalnum() and i.islower() for i in ids)


def test_struct_conversion_keeps_every_json_kind() -> None:
    from google.protobuf import struct_pb2

    from jobwire.server.api.convert import struct_to_dict

    value = {
        "s": "x",
        "n": 1.5,
        "b": True,
        "none": None,
        "list": [1.0, "a", [False]],
        "obj": {"k": {"z": 2.0}},
    }
    message = struct_pb2.Struct()
    message.update(value)
    assert struct_to_dict(message) == value
