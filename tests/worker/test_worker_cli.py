"""``jobwire worker``: flags, their environment defaults, and usage errors (exit 2) before connecting."""

from __future__ import annotations

import sys

import pytest

from jobwire.cli.main import build_parser, main


def test_flags_default_from_the_environment() -> None:
    env = {
        "JOBWIRE_SERVER": "jobs:7000",
        "JOBWIRE_HANDLERS": "a.b,c",
        "JOBWIRE_CONCURRENCY": "7",
        "JOBWIRE_WORKER_ID": "from-env",
    }
    args = build_parser(env).parse_args(["worker"])
    assert (args.server, args.handlers, args.concurrency, args.worker_id) == (
        "jobs:7000",
        "a.b,c",
        7,
        "from-env",
    )
    assert args.drain_grace == 30.0

    argv = ["worker", "--server", "other:1", "--handlers", "m", "--concurrency", "2"]
    args = build_parser(env).parse_args([*argv, "--worker-id", "w9", "--drain-grace", "0.5"])
    assert (args.server, args.handlers, args.concurrency, args.worker_id) == ("other:1", "m", 2, "w9")
    assert args.drain_grace == 0.5


@pytest.mark.parametrize(
    "argv",
    [
        ["worker"],  # no handlers at all
        ["worker", "--handlers", "json"],  # a module without @handler functions
        ["worker", "--handlers", "no_such_module_for_jobwire"],
        ["worker", "--handlers", "support.worker_handlers", "--concurrency", "0"],
        ["worker", "--handlers", "support.worker_handlers", "--drain-grace", "-1"],
        ["worker", "--handlers", "support.worker_handlers", "--bogus"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("JOBWIRE_HANDLERS", "JOBWIRE_CONCURRENCY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command may add the working directory
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
