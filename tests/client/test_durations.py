"""Durations read the same way by every command: serve, the CLI and the worker."""

from __future__ import annotations

import datetime

import pytest

from jobwire.cli.main import build_parser
from jobwire.client.durations import parse_duration, parse_time
from jobwire.server.config import load_config


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("500ms", 0.5),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("1h30m", 5400.0),
        ("+1h", 3600.0),
        (" 1.5s ", 1.5),
        ("1m 30s", 90.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s", "-5s", "1h 2", "10 20"])
def test_not_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_times() -> None:
    now = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
    assert parse_time("+1h", now) == now + datetime.timedelta(hours=1)
    assert parse_time("2026-12-24T18:00") == datetime.datetime(2026, 12, 24, 18, 0, tzinfo=datetime.UTC)
    with pytest.raises(ValueError, match="not a time"):
        parse_time("tomorrow")


def test_every_command_takes_the_same_forms() -> None:
    parser = build_parser({})
    submit = parser.parse_args(["submit", "demo.echo", "--timeout", "30s", "--at", "+1h"])
    assert submit.timeout == 30.0
    assert submit.at > datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=59)
    worker = parser.parse_args(["worker", "--handlers", "m", "--drain-grace", "1m"])
    assert worker.drain_grace == 60.0
    config = load_config(None, {"JOBWIRE_DRAIN_GRACE": "10m", "JOBWIRE_DRAIN_DELAY": "+2s"})
    assert config.drain_grace == 600.0 and config.drain_delay == 2.0
