"""``jobwire serve``: the server's flags (also ``JOBWIRE_*`` variables) and its entry point."""

from __future__ import annotations

import argparse
import asyncio
import sys

from jobwire.handlers.api import load_handlers_from_cwd
from jobwire.handlers.logs import configure_logging
from jobwire.server.config import add_arguments, load_config


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except ValueError as error:
        print(f"jobwire serve: {error}", file=sys.stderr)
        return 2
    try:
        handlers = load_handlers_from_cwd(config.handler_modules())
    except ValueError as error:
        print(f"jobwire serve: --handlers: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    from jobwire.server.app import StartupError, serve

    try:
        asyncio.run(serve(config, handlers))
    except StartupError as error:
        print(f"jobwire serve: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobwire.server``: the same as ``jobwire serve``."""
    parser = argparse.ArgumentParser(prog="jobwire serve", description="Run the Jobwire gRPC job server.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
