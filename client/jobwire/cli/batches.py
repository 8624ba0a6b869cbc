"""``jobwire submit --from-file``: the jobs of a JSON Lines file, 1,000 per BatchSubmitJobs call.

The file is read as it is sent, so a file of any length needs little memory. Each call stores its jobs
all or none; when one fails, what was already submitted is said (and lines with a request_id can be
sent again safely: their jobs are not stored twice). Errors name the file's line, not the request's
index in a call.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from jobwire.cli import render
from jobwire.cli.parsing import UsageError, labels_dict
from jobwire.client import JobwireClient, JobwireError
from jobwire.client._core import MAX_BATCH_JOBS
from jobwire.client.durations import parse_duration, parse_time

FIELDS = ("type", "params", "priority", "labels", "request_id", "timeout", "max_attempts", "retention", "at")
_REQUEST_INDEX = re.compile(r"requests\[(\d+)\]\.?")


@dataclass(frozen=True, slots=True)
class Line:
    """One job of the file: its line number and ``JobwireClient.submit``'s arguments."""

    number: int
    job: dict[str, Any]


def submit_file(client: JobwireClient, args: argparse.Namespace) -> int:
    """Submit every job of ``args.from_file``; prints each job's id (or, with --json, one JSON object
    per line). The command's options are defaults for every line."""
    defaults: dict[str, Any] = {
        "priority": args.priority,
        "labels": labels_dict(args.label) or None,
        "timeout": args.timeout,
        "max_attempts": args.max_attempts,
        "schedule_time": args.at,
        "non_retryable_codes": args.no_retry_on,
        "retention": args.retention,
    }
    defaults = {key: value for key, value in defaults.items() if value is not None}
    name = "<stdin>" if args.from_file == "-" else args.from_file
    submitted = 0
    with _open(args.from_file) as stream:
        lines = read_lines(stream, name, defaults)
        while chunk := list(itertools.islice(lines, MAX_BATCH_JOBS)):
            try:
                jobs = client.submit_many([line.job for line in chunk])
            except JobwireError as error:
                if submitted:
                    print(
                        f"{name}: {submitted} jobs submitted, up to line {chunk[0].number - 1}",
                        file=sys.stderr,
                    )
                raise _by_line(error, name, chunk) from None
            for job in jobs:
                if args.json:
                    render.print_json_line(render.to_dict(job))
                else:
                    print(job.id, flush=True)
            submitted += len(jobs)
    if not submitted:
        raise UsageError(f"{name}: no jobs (one JSON object per line)")
    return 0


def _open(path: str) -> TextIO:
    if path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None


def read_lines(stream: TextIO, name: str, defaults: dict[str, Any]) -> Iterator[Line]:
    """The jobs of a JSON Lines stream, blank lines skipped; UsageError naming the line of the first
    that is not a job."""
    for number, text in enumerate(stream, 1):
        if text.strip():
            try:
                yield Line(number, {**defaults, **_job(text)})
            except ValueError as error:
                raise UsageError(f"{name}:{number}: {error}") from None


def _job(text: str) -> dict[str, Any]:
    """``submit``'s arguments from one line (ValueError saying what is wrong with it)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; a line may hold {', '.join(FIELDS)}")
    if not isinstance(value.get("type"), str):
        raise ValueError('"type" (a string) is required')
    job = {key: item for key, item in value.items() if item is not None}
    for key in ("timeout", "retention"):  # "30s" or seconds
        if key in job:
            given = job[key]
            job[key] = parse_duration(given) if isinstance(given, str) else _number(given, key)
    if "at" in job:
        job["schedule_time"] = parse_time(str(job.pop("at")))
    for key in ("priority", "max_attempts"):
        if key in job and (isinstance(job[key], bool) or not isinstance(job[key], int)):
            raise ValueError(f'"{key}" must be a whole number')
    if "labels" in job and not (
        isinstance(job["labels"], dict) and all(isinstance(v, str) for v in job["labels"].values())
    ):
        raise ValueError('"labels" must be an object of strings')
    if "params" in job and not isinstance(job["params"], dict):
        raise ValueError('"params" must be a JSON object')
    return job


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f'"{key}" must be seconds or a duration such as "30s"')
    return float(value)


def _by_line(error: JobwireError, name: str, chunk: list[Line]) -> JobwireError:
    """``error`` with each ``requests[i].field`` it names said as ``name:LINE: field``."""

    def said(text: str) -> str:
        return _REQUEST_INDEX.sub(lambda m: f"{name}:{chunk[int(m.group(1))].number}: ", text)

    return type(error)(
        said(error.message),
        code=error.code,
        reason=error.reason,
        domain=error.domain,
        metadata=error.metadata,
        field_violations=[(said(field), description) for field, description in error.field_violations],
        retry_delay=error.retry_delay,
        status=error.status,
        quota_violations=error.quota_violations,
    )
