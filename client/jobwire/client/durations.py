"""Durations as people type them, read the same way by every command: ``jobwire serve``, the CLI, the worker.

``90`` or ``90s`` seconds, ``500ms``, ``10m``, ``2h``, ``7d``, or a combination such as ``1h30m``; a
leading ``+`` is allowed (``+1h``: an hour from now, where a time is asked for).
"""

from __future__ import annotations

import datetime
import re

_PART = re.compile(r"([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
FORMS = "seconds, or a number with ms/s/m/h/d such as 500ms, 30s, 10m, 1h30m, 7d"


def parse_duration(text: str) -> float:
    """Seconds in ``text``; ValueError (naming the accepted forms) when it is not a duration."""
    body = text.strip().removeprefix("+").strip()
    position, total, parts = 0, 0.0, 0
    while position < len(body):
        match = _PART.match(body, position)
        if match is None:
            break
        unit = match.group(2)
        if unit is None and (parts or match.end() < len(body)):  # a bare number must be the whole text
            break
        total += float(match.group(1)) * _UNITS[unit]
        position = match.end()
        while position < len(body) and body[position] == " ":
            position += 1
        parts += 1
    if not parts or position != len(body):
        raise ValueError(f"not a duration: {text!r} (use {FORMS})")
    return total


def parse_time(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """A point in time: ``+DURATION`` from now, or an ISO 8601 time (UTC when it names no zone)."""
    if text.strip().startswith("+"):
        base = now or datetime.datetime.now(datetime.UTC)
        return base + datetime.timedelta(seconds=parse_duration(text))
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use ISO 8601, e.g. 2026-12-24T18:00, or +DURATION)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)
