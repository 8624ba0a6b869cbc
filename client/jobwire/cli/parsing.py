"""Turning command-line text into SDK arguments: params, labels, states. No I/O, no presentation."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from jobwire.client.jobs import parse_state
from jobwire.v1 import job_pb2

__all__ = ["UsageError", "label_arg", "labels_dict", "parse_params", "parse_value", "state_arg"]


class UsageError(ValueError):
    """Bad command-line input found after argparse ran; reported like an argparse error (exit 2)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_value(text: str) -> Any:
    """A parameter value: JSON when it parses (numbers, true/false, null, lists, objects, quoted strings),
    else the text itself, so that ``name=world`` needs no quotes."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """Job params from ``key=value`` items and/or JSON objects (``'{"seconds": 2}'``), merged in order."""
    params: dict[str, Any] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                obj = json.loads(item, parse_constant=_reject_constant)
            except ValueError as exc:
                raise UsageError(f"params: {item!r} is not a valid JSON object: {exc}") from None
            if not isinstance(obj, dict):
                raise UsageError(f"params: {item!r} is not a JSON object")
            params.update(obj)
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"params: expected KEY=VALUE or a JSON object, got {item!r}")
        params[key] = parse_value(value)
    return params


def label_arg(text: str) -> tuple[str, str]:
    """argparse type for ``--label k=v``: a (key, value) pair; the value may be empty."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def code_arg(text: str) -> grpc.StatusCode:
    """argparse type for a status code: "INVALID_ARGUMENT", "invalid-argument" or its number (3)."""
    name = text.strip().upper().replace("-", "_")
    for code in grpc.StatusCode:
        if name in (code.name, str(code.value[0])) and code is not grpc.StatusCode.OK:
            return code
    raise argparse.ArgumentTypeError(
        f"unknown status code {text!r} (e.g. INVALID_ARGUMENT, DEADLINE_EXCEEDED)"
    )


def labels_dict(pairs: Iterable[tuple[str, str]] | None) -> dict[str, str]:
    """Repeated ``--label`` pairs as a dict (a later value for a key wins)."""
    return dict(pairs or ())


def state_arg(text: str) -> job_pb2.JobState.ValueType:
    """argparse type for ``--state``: "queued", "RUNNING", "job_state_failed", ..."""
    try:
        return parse_state(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
