"""Checks on what clients send, in domain terms; each problem becomes a FieldViolation."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from jobwire.handlers.api import JOB_TYPE_PATTERN
from jobwire.server.errors import FieldViolation, InvalidArgument
from jobwire.server.job import PRIORITY_MAX, PRIORITY_MIN

LABEL_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_REQUEST_ID = 128
MAX_REASON = 1024
MIN_TIMEOUT = 0.001
MAX_TIMEOUT = 7 * 24 * 3600.0


@dataclass(slots=True)
class SubmitRequest:
    """What a client asks SubmitJob for, after transport decoding."""

    type: str
    params: dict[str, Any]
    priority: int | None = None
    labels: dict[str, str] | None = None
    request_id: str = ""
    timeout: float | None = None


def submit_violations(request: SubmitRequest) -> list[FieldViolation]:
    """Every problem of a submit request except an unknown type (which needs the registry)."""
    violations: list[FieldViolation] = []
    if not request.type:
        violations.append(FieldViolation("type", "required"))
    elif not JOB_TYPE_PATTERN.match(request.type):
        violations.append(FieldViolation("type", "1-128 characters of letters, digits and ._:/-"))
    if request.priority is not None and not PRIORITY_MIN <= request.priority <= PRIORITY_MAX:
        violations.append(
            FieldViolation(
                "priority", f"must be from {PRIORITY_MIN} to {PRIORITY_MAX}, got {request.priority}"
            )
        )
    violations.extend(label_violations(request.labels or {}, "labels"))
    if len(request.request_id) > MAX_REQUEST_ID:
        violations.append(FieldViolation("request_id", f"at most {MAX_REQUEST_ID} characters"))
    if request.timeout is not None and not MIN_TIMEOUT <= request.timeout <= MAX_TIMEOUT:
        violations.append(FieldViolation("timeout", "must be from 1 millisecond to 7 days"))
    return violations


def label_violations(labels: dict[str, str], field: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if len(labels) > MAX_LABELS:
        violations.append(FieldViolation(field, f"at most {MAX_LABELS} labels"))
    for key, value in labels.items():
        if not LABEL_KEY_PATTERN.match(key):
            violations.append(
                FieldViolation(
                    f"{field}[{key!r}]",
                    "key must be 1-63 lowercase letters, digits, '_' or '-', starting with a letter",
                )
            )
        if len(value) > MAX_LABEL_VALUE:
            violations.append(FieldViolation(f"{field}[{key!r}]", f"value longer than {MAX_LABEL_VALUE}"))
    return violations


def check(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations=violations)


def fingerprint(request: SubmitRequest, priority: int) -> str:
    """A digest of everything that makes two submits 'the same request' (AIP-155)."""
    canonical = json.dumps(
        [request.type, request.params, priority, request.labels or {}, request.timeout],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
