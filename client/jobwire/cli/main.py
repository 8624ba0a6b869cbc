"""The ``jobwire`` command: argument parsing and command dispatch over the sync SDK.

Parsing of values lives in ``parsing``, presentation in ``render``; this module wires them to
:class:`jobwire.client.JobwireClient`, and ``worker`` to :class:`jobwire.worker.Worker`; ``serve`` and
``token`` are handed over to the server package, imported only then. Exit codes: 0
success (for ``worker``: stopped gracefully); 1 a watched job FAILED or was CANCELLED (for ``worker``:
the server refused it); 2 bad usage or an error from the server; 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jobwire.cli import render
from jobwire.cli.batches import submit_file
from jobwire.cli.parsing import UsageError, code_arg, label_arg, labels_dict, parse_params, state_arg
from jobwire.client import JobwireClient, JobwireError
from jobwire.client._core import DEFAULT_TARGET
from jobwire.client.durations import parse_duration, parse_time
from jobwire.v1 import job_pb2

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

Command = Callable[[JobwireClient, argparse.Namespace], int]

# Connection options that take a value: the word after them is never the subcommand.
VALUE_OPTIONS = ("--server", "--token", "--tls-ca", "--tls-cert", "--tls-key")
# Every option the top-level parser knows, for naming unknown ones when no subcommand is given.
TOP_LEVEL_OPTIONS = (*VALUE_OPTIONS, "--tls", "--no-tls", "--json", "-h", "--help")
# Subcommands whose flags belong to the server package: handed over before the normal parsing.
SERVER_COMMANDS = ("serve", "token")

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def _env_flag(value: str | None) -> bool:
    """An on/off environment variable: 1, true, yes or on (any case) mean on; anything else off."""
    return (value or "").strip().lower() in _TRUE_WORDS


def _add_tls_options(parser: argparse.ArgumentParser, environ: Mapping[str, str], *, top: bool) -> None:
    """--tls/--tls-ca/--tls-cert/--tls-key; defaults from $JOBWIRE_TLS* on the top-level parser only
    (the copies after the subcommand default to SUPPRESS, like --server's)."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=default(_env_flag(environ.get("JOBWIRE_TLS"))),
        help="connect over TLS, trusting the system's roots unless --tls-ca says otherwise "
        "(default: on when $JOBWIRE_TLS=1; implied by any --tls-* file)",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="PATH",
        default=default(environ.get("JOBWIRE_TLS_CA") or None),
        help="PEM file of the CA that signs the server's certificate; implies --tls "
        "(default: $JOBWIRE_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PATH",
        default=default(environ.get("JOBWIRE_TLS_CERT") or None),
        help="PEM client certificate, for mutual TLS; needs --tls-key (default: $JOBWIRE_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        metavar="PATH",
        default=default(environ.get("JOBWIRE_TLS_KEY") or None),
        help="PEM private key of --tls-cert (default: $JOBWIRE_TLS_KEY)",
    )


_ENV_NAMES = {"--tls-cert": "JOBWIRE_TLS_CERT", "--tls-key": "JOBWIRE_TLS_KEY"}


def _check_tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A client certificate without its key (or the reverse) is bad usage, said with the flags' names."""
    if bool(args.tls_cert) != bool(args.tls_key):
        given, missing = ("--tls-cert", "--tls-key") if args.tls_cert else ("--tls-key", "--tls-cert")
        parser.error(f"{given} needs {missing} (or ${_ENV_NAMES[missing]}): mutual TLS takes both")


def _tls_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The TLS keyword arguments of JobwireClient and Worker, from the parsed options."""
    return {"tls": args.tls, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


def _add_connection_options(
    parser: argparse.ArgumentParser, environ: Mapping[str, str], *, top: bool
) -> None:
    """--server/--token/--tls*/--json, accepted before the subcommand and after it.

    The copies on subcommands default to SUPPRESS so that they only override the top-level value
    when actually given.
    """

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        type=_target_arg,
        default=default(environ.get("JOBWIRE_SERVER") or DEFAULT_TARGET),
        help=f"server address (default: $JOBWIRE_SERVER, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--token",
        default=default(environ.get("JOBWIRE_TOKEN") or None),
        help="bearer token sent with every call (default: $JOBWIRE_TOKEN)",
    )
    _add_tls_options(parser, environ, top=top)
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="machine-readable JSON output (one object per line for watch)",
    )


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The full parser. ``serve`` and ``token`` are only placeholders here: their flags belong to the
    server package, which is imported only when one of them actually runs."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="jobwire", description="Submit, watch, list and cancel Jobwire jobs, or run the server."
    )
    _add_connection_options(parser, env, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_connection_options(common, env, top=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser(
        "serve",
        add_help=False,  # `jobwire serve --help` is answered by the server's own parser
        help="run the Jobwire server (see: jobwire serve --help)",
    )
    sub.add_parser(
        "token",
        add_help=False,  # `jobwire token --help` is answered by the server's own parser
        help="issue or inspect bearer tokens; needs the server package (see: jobwire token --help)",
    )

    p = sub.add_parser("submit", parents=[common], help="submit a job, or every job of a JSON Lines file")
    p.add_argument("type", nargs="?", help='job type, e.g. "demo.sleep"')
    p.add_argument(
        "params",
        nargs="*",
        metavar="PARAM",
        help="KEY=VALUE (VALUE parsed as JSON when it parses, else a string) or one JSON object",
    )
    p.add_argument("--priority", type=int, metavar="N", help="0 (lowest) to 9 (highest); server default 5")
    p.add_argument("--label", action="append", type=label_arg, metavar="KEY=VALUE", help="repeatable")
    p.add_argument(
        "--timeout",
        type=_duration_arg,
        metavar="DURATION",
        help="maximum run time of one attempt (30s, 10m, ...)",
    )
    p.add_argument("--request-id", metavar="ID", help="idempotency key (default: a fresh UUID4)")
    p.add_argument("--max-attempts", type=int, metavar="N", help="attempts in all (default: the type's)")
    p.add_argument(
        "--retention",
        type=_duration_arg,
        metavar="DURATION",
        help="keep the job this long once it ends (default: the server's for its outcome)",
    )
    p.add_argument(
        "--no-retry-on",
        action="append",
        type=code_arg,
        metavar="CODE",
        help="repeatable: a failure with this status code (INVALID_ARGUMENT, DEADLINE_EXCEEDED...) is "
        "not retried",
    )
    p.add_argument(
        "--at",
        type=_when_arg,
        metavar="WHEN",
        help="start no earlier than WHEN: an ISO 8601 time, or +DURATION from now (+90, +10m, +1h)",
    )
    p.add_argument("--watch", action="store_true", help="watch the job until it finishes")
    p.add_argument(
        "--from-file",
        metavar="PATH",
        help="submit one job per line of a JSON Lines file ('-': standard input), 1,000 per call, each "
        'call all or nothing; a line holds "type" and optionally "params", "priority", "labels", '
        '"request_id", "timeout", "max_attempts", "retention", "at"; the options above are defaults for '
        "every line",
    )
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser("get", parents=[common], help="show one job")
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(handler=cmd_get)

    p = sub.add_parser("list", parents=[common], help="list jobs, newest first")
    p.add_argument(
        "--state",
        action="append",
        type=state_arg,
        metavar="STATE",
        help="queued, running, succeeded, failed, cancelled or cancelling; repeatable",
    )
    p.add_argument("--type", action="append", dest="types", metavar="TYPE", help="repeatable")
    p.add_argument("--label", action="append", type=label_arg, metavar="KEY=VALUE", help="repeatable")
    p.add_argument(
        "--tenant",
        action="append",
        dest="tenants",
        metavar="TENANT",
        help="only this tenant's jobs; repeatable (admins: others see only their own tenant)",
    )
    p.add_argument("--priority", action="append", type=int, dest="priorities", metavar="N", help="repeatable")
    p.add_argument(
        "--order-by",
        default="",
        metavar="ORDER",
        help='"create_time desc" (default), "create_time", "priority desc" or "priority"',
    )
    p.add_argument("--count", action="store_true", help="print only how many jobs match")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="rows to show (default 20; 0 = all)")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("cancel", parents=[common], help="cancel a job")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--reason", default="", metavar="TEXT", help="recorded on the job")
    p.add_argument("--request-id", metavar="ID", help="id of this request, recorded in the job's audit trail")
    p.set_defaults(handler=cmd_cancel)

    p = sub.add_parser(
        "update", parents=[common], help="change the priority, labels or start time of a queued job"
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--priority", type=int, metavar="N", help="0 (lowest) to 9 (highest)")
    p.add_argument(
        "--label",
        action="append",
        type=label_arg,
        metavar="KEY=VALUE",
        help="repeatable: the job's labels become exactly these",
    )
    p.add_argument("--clear-labels", action="store_true", help="remove every label")
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--at",
        type=_when_arg,
        metavar="WHEN",
        help="start no earlier than WHEN: an ISO 8601 time, or +DURATION from now (+90, +10m, +1h)",
    )
    when.add_argument("--now", action="store_true", help="drop the start time: run as soon as possible")
    p.add_argument("--request-id", metavar="ID", help="id of this request, recorded in the job's audit trail")
    p.set_defaults(handler=cmd_update)

    p = sub.add_parser("retry", parents=[common], help="queue a failed or cancelled job again")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--request-id", metavar="ID", help="id of this request, recorded in the job's audit trail")
    p.set_defaults(handler=cmd_retry)

    p = sub.add_parser("audit", parents=[common], help="show a job's audit trail: who did what, and when")
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(handler=cmd_audit)

    p = sub.add_parser("watch", parents=[common], help="follow a job until it finishes")
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(handler=cmd_watch)

    p = sub.add_parser(
        "types", parents=[common], help="list the job types you may submit, and their capacity"
    )
    p.set_defaults(handler=cmd_types)

    p = sub.add_parser("stats", parents=[common], help="show queue statistics")
    p.set_defaults(handler=cmd_stats)

    _add_worker_parser(sub, env)
    return parser


def _when_arg(text: str) -> datetime.datetime:
    """``+90``, ``+10m`` (from now) or an ISO 8601 time (UTC when it names no zone)."""
    try:
        return parse_time(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _duration_arg(text: str) -> float:
    """A duration as every Jobwire command reads it: 90, 90s, 500ms, 10m, 1h30m, 7d."""
    try:
        value = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_worker_parser(sub: Any, env: Mapping[str, str]) -> None:
    """``jobwire worker``: run @handler functions for a server, over WorkerService."""
    p = sub.add_parser(
        "worker",
        help="run job handlers for a server (a remote worker)",
        description="Connect to a Jobwire server and run the @handler functions of the given modules "
        "for it, until SIGTERM or SIGINT (which drain: running jobs get --drain-grace seconds to "
        "finish, then are handed back).",
    )
    # Only --server, --token and --tls*: the top-level parser already resolves their $JOBWIRE_* defaults.
    p.add_argument(
        "--server", metavar="HOST:PORT", type=_target_arg, default=argparse.SUPPRESS, help="server address"
    )
    p.add_argument("--token", default=argparse.SUPPRESS, help="bearer token")
    _add_tls_options(p, env, top=False)
    p.add_argument(
        "--handlers",
        metavar="MOD1,MOD2",
        default=env.get("JOBWIRE_HANDLERS") or None,
        help="comma-separated modules with @handler functions (default: $JOBWIRE_HANDLERS)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        default=env.get("JOBWIRE_CONCURRENCY") or "4",
        help="jobs run at once (default: $JOBWIRE_CONCURRENCY, else 4)",
    )
    p.add_argument(
        "--worker-id",
        metavar="ID",
        default=env.get("JOBWIRE_WORKER_ID") or None,
        help="name shown in job histories (default: $JOBWIRE_WORKER_ID, else HOST/pid-PID)",
    )
    p.add_argument(
        "--drain-grace",
        type=_non_negative_duration,
        metavar="DURATION",
        default="30s",
        help="on SIGTERM/SIGINT, how long running jobs may take to finish before being handed back "
        "(default 30s)",
    )
    p.add_argument(
        "--log-format",
        choices=["json", "text"],
        default=env.get("JOBWIRE_LOG_FORMAT") or "json",
        help="log lines on stderr (default: $JOBWIRE_LOG_FORMAT, else json)",
    )
    p.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        default=env.get("JOBWIRE_LOG_LEVEL") or "INFO",
        help="default: $JOBWIRE_LOG_LEVEL, else INFO",
    )


def _run_worker(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``jobwire worker``: load the handlers and run a Worker until it is stopped by a signal."""
    from jobwire.handlers.api import load_handlers_from_cwd
    from jobwire.handlers.logs import configure_logging
    from jobwire.worker import Worker  # imported only when the command runs

    modules = [m.strip() for m in (args.handlers or "").split(",") if m.strip()]
    if not modules:
        parser.error("worker: --handlers (or $JOBWIRE_HANDLERS) is required")
    try:
        handlers = load_handlers_from_cwd(modules)
    except ValueError as exc:
        parser.error(f"worker: --handlers: {exc}")
    if not handlers:
        parser.error(f"worker: no @handler functions found in {', '.join(modules)}")
    configure_logging(args.log_format, args.log_level)
    try:
        worker = Worker(
            args.server,
            handlers,
            concurrency=args.concurrency,
            worker_id=args.worker_id,
            token=args.token,
            drain_grace=args.drain_grace,
            **_tls_kwargs(args),
        )
    except JobwireError as exc:  # an unreadable TLS file: said before anything connects
        _print_error(exc)
        return EXIT_ERROR
    code = worker.run_forever()
    stuck = worker.handler_threads_busy
    if stuck:
        # Plain handlers that ignore cancellation cannot be interrupted; do not hang the exit on them.
        logging.getLogger("jobwire.worker").warning("exiting with %d handler thread(s) still running", stuck)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code


# --- commands ---------------------------------------------------------------------------------------


def _exit_for(job: job_pb2.Job | None) -> int:
    return EXIT_OK if job is not None and job.state == job_pb2.JOB_STATE_SUCCEEDED else EXIT_JOB_FAILED


def _watch(client: JobwireClient, job_id: str, as_json: bool) -> int:
    """Follow a job to its end; the exit code says how it ended."""
    last: job_pb2.Job | None = None
    if as_json:
        for update in client.watch(job_id):
            render.print_json_line(render.to_dict(update))
            last = update.job
        return _exit_for(last)
    console = render.make_console()
    with render.WatchView(console, job_id) as view:
        for update in client.watch(job_id):
            view.update(update)
            last = update.job
    if last is not None:
        console.print(render.outcome_text(last))
    return _exit_for(last)


def cmd_submit(client: JobwireClient, args: argparse.Namespace) -> int:
    if args.from_file is not None:
        if args.type is not None or args.params:
            raise UsageError("give a job type or --from-file, not both")
        if args.watch:
            raise UsageError("--watch follows one job; it does not go with --from-file")
        return submit_file(client, args)
    if args.type is None:
        raise UsageError("a job type is required (or --from-file PATH)")
    params = parse_params(args.params)
    job = client.submit(
        args.type,
        params or None,
        priority=args.priority,
        labels=labels_dict(args.label),
        request_id=args.request_id,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        schedule_time=args.at,
        non_retryable_codes=args.no_retry_on,
        retention=args.retention,
    )
    if args.watch:
        if not args.json:
            print(job.id, flush=True)
        return _watch(client, job.id, args.json)
    if args.json:
        render.print_json(render.to_dict(job))
    else:
        print(job.id)
        render.make_console().print(render.job_summary_table(job))
    return EXIT_OK


def cmd_get(client: JobwireClient, args: argparse.Namespace) -> int:
    job = client.get(args.job_id)
    if args.json:
        render.print_json(render.to_dict(job))
    else:
        console = render.make_console()
        console.print(render.job_detail_table(job))
        if job.attempts:
            console.print(render.attempts_table(job))
    return EXIT_OK


def cmd_update(client: JobwireClient, args: argparse.Namespace) -> int:
    if args.label and args.clear_labels:
        raise UsageError("--label and --clear-labels cannot be used together")
    changes: dict[str, Any] = {}
    if args.priority is not None:
        changes["priority"] = args.priority
    if args.label or args.clear_labels:
        changes["labels"] = labels_dict(args.label)
    if args.at is not None or args.now:
        changes["schedule_time"] = args.at
    if not changes:
        raise UsageError("nothing to change: give --priority, --label, --clear-labels, --at or --now")
    job = client.update(args.job_id, request_id=args.request_id, **changes)
    if args.json:
        render.print_json(render.to_dict(job))
    else:
        render.make_console().print(render.job_summary_table(job))
    return EXIT_OK


def cmd_retry(client: JobwireClient, args: argparse.Namespace) -> int:
    job = client.retry(args.job_id, request_id=args.request_id)
    if args.json:
        render.print_json(render.to_dict(job))
    else:
        render.make_console().print(render.job_summary_table(job))
    return EXIT_OK


def cmd_list(client: JobwireClient, args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise UsageError("--limit must be 0 or more")
    limit = args.limit or None
    filters: dict[str, Any] = {
        "states": args.state,
        "types": args.types,
        "labels": labels_dict(args.label),
        "tenants": args.tenants,
        "priorities": args.priorities,
    }
    if args.count:
        total = client.count_jobs(**filters)
        if args.json:
            render.print_json({"total_size": total})
        else:
            print(total)
        return EXIT_OK
    jobs_iter = client.list_jobs(
        **filters, page_size=min(limit, 100) if limit else 100, order_by=args.order_by
    )
    jobs = list(itertools.islice(jobs_iter, limit))
    if args.json:
        render.print_json([render.to_dict(job) for job in jobs])
    else:
        render.make_console().print(render.jobs_table(jobs))
    return EXIT_OK


def cmd_cancel(client: JobwireClient, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id, args.reason, request_id=args.request_id)
    if args.json:
        render.print_json(render.to_dict(job))
    else:
        render.make_console().print(render.job_summary_table(job))
    return EXIT_OK


def cmd_types(client: JobwireClient, args: argparse.Namespace) -> int:
    types = client.list_job_types()
    if args.json:
        render.print_json([render.to_dict(info) for info in types])
    else:
        render.make_console().print(render.job_types_table(types))
    return EXIT_OK


def cmd_audit(client: JobwireClient, args: argparse.Namespace) -> int:
    entries = list(client.audit(args.job_id))
    if args.json:
        render.print_json([render.to_dict(entry) for entry in entries])
    else:
        render.make_console().print(render.audit_table(entries))
    return EXIT_OK


def cmd_watch(client: JobwireClient, args: argparse.Namespace) -> int:
    return _watch(client, args.job_id, args.json)


def cmd_stats(client: JobwireClient, args: argparse.Namespace) -> int:
    stats = client.stats()
    if args.json:
        render.print_json(render.to_dict(stats))
    else:
        render.make_console().print(render.stats_view(stats))
    return EXIT_OK


def _hand_over(
    parser: argparse.ArgumentParser, command: str, module: str, description: str, argv: Sequence[str]
) -> int:
    """Hand a command that belongs to the server package (``serve``; ``token``, since tokens are signed
    with the server's keys) over to it, imported only now."""
    # importlib rather than an import statement: the client distribution must work, and type-check,
    # without the server package.
    try:
        server_module = importlib.import_module(module)
        add_arguments: Callable[[argparse.ArgumentParser], None] = getattr(
            server_module, f"add_{command}_arguments"
        )
        run: Callable[[argparse.Namespace], int] = getattr(server_module, f"run_{command}")
    except (ImportError, AttributeError) as exc:
        print(
            f"error: `jobwire {command}` needs the Jobwire server package ({module}): {exc}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    command_parser = argparse.ArgumentParser(prog=f"{parser.prog} {command}", description=description)
    add_arguments(command_parser)
    return run(command_parser.parse_args(list(argv)))


def _serve(parser: argparse.ArgumentParser, serve_argv: Sequence[str]) -> int:
    return _hand_over(parser, "serve", "jobwire.server.cli", "Run the Jobwire server.", serve_argv)


def _token(parser: argparse.ArgumentParser, token_argv: Sequence[str]) -> int:
    return _hand_over(
        parser,
        "token",
        "jobwire.server.token_cli",
        "Issue Jobwire bearer tokens and manage their keys.",
        token_argv,
    )


def _command_position(argv: Sequence[str]) -> int | None:
    """Where the subcommand stands in ``argv``: the first word that is neither an option nor its value."""
    index = 0
    while index < len(argv):
        word = argv[index]
        if word in VALUE_OPTIONS:
            index += 2
        elif word.startswith("-"):
            index += 1
        else:
            return index
    return None


def _target_arg(text: str) -> str:
    """--server: HOST:PORT (or any gRPC target such as dns:///name:port); a bad port is refused here,
    because gRPC would silently wrap it."""
    target = text.strip()
    if "://" not in target and not target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        for address in target.split(","):
            host, sep, port = address.rpartition(":")
            has_port = sep and host and not host.endswith(":")  # host:port or [v6]:port, not a bare IPv6
            if has_port and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise argparse.ArgumentTypeError(f"not a port: {port!r} in {text!r} (use 1 to 65535)")
    return target


def _print_error(err: JobwireError) -> None:
    """The error once: its message, then any field or quota violation the message does not already
    say, and how long the server asks to wait before retrying."""
    print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
    for field, description in err.field_violations:
        if f"{field}: {description}" not in err.message:
            print(f"  {field}: {description}", file=sys.stderr)
    for subject, description in err.quota_violations:
        if description not in err.message:
            print(f"  {subject}: {description}", file=sys.stderr)
    if err.retry_delay is not None:
        print(f"  retry after {render.fmt_seconds(err.retry_delay)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jobwire`` console script; returns the exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    command_at = _command_position(argv)
    if command_at is None:  # no command: name what is wrong before saying one is needed
        unknown = [w for w in argv if w.startswith("-") and w.split("=", 1)[0] not in TOP_LEVEL_OPTIONS]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if command_at is not None and argv[command_at] in SERVER_COMMANDS:
        # The server's flags belong to its own parser; what comes before the command is checked here.
        parser.parse_args(argv[: command_at + 1])
        hand_over = _serve if argv[command_at] == "serve" else _token
        return hand_over(parser, argv[command_at + 1 :])
    args = parser.parse_args(argv)
    _check_tls(parser, args)
    if args.command == "worker":
        return _run_worker(parser, args)
    handler: Command = args.handler
    try:
        with JobwireClient(args.server, token=args.token, **_tls_kwargs(args)) as client:
            return handler(client, args)
    except UsageError as exc:
        parser.error(str(exc))
    except JobwireError as exc:
        _print_error(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
