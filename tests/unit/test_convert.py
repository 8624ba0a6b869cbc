"""Domain <-> protobuf conversion."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from jobwire.server.api.convert import struct_to_dict


def test_struct_conversion_keeps_every_json_kind() -> None:
    value: dict[str, Any] = {
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
