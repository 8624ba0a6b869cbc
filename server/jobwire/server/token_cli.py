"""``jobwire token``: the operator's key files and tokens (keygen, create, public-keys).

Every error ends the command with exit status 2 and one ``error: ...`` line on stderr, never a
traceback; ``create`` prints only the token on stdout, so ``TOKEN=$(jobwire token create ...)`` works.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from jobwire.client.durations import parse_duration
from jobwire.server.access import check_subject, check_tenant, check_type_patterns, parse_role
from jobwire.server.tokens import KeyFileError, KeyRing, issue_token, write_key_file

KEY_FILE_VARIABLE = "JOBWIRE_AUTH_KEY_FILE"
DEFAULT_TTL = "30d"
EXIT_OK = 0
EXIT_ERROR = 2

_T = TypeVar("_T")
_V = TypeVar("_V")


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``keygen``, ``create`` and ``public-keys`` subcommands, on ``parser``."""
    key_file = argparse.ArgumentParser(add_help=False)
    # Not required here: the variable may supply it, and run_token says in one line when neither does.
    key_file.add_argument(
        "--auth-key-file",
        metavar="PATH",
        help=f"the key file (PEM, Ed25519); default: ${KEY_FILE_VARIABLE}",
    )
    sub = parser.add_subparsers(dest="token_command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "keygen",
        parents=[key_file],
        help="create a key file, or add a new signing key to one (--rotate)",
        description="Create a key file holding a new Ed25519 private key (mode 0600). With --rotate, add a "
        "new key in front of an existing file's keys: it signs new tokens, the older keys still verify.",
    )
    p.add_argument(
        "--rotate",
        action="store_true",
        help="add a new signing key to an existing file, keeping the old keys",
    )

    p = sub.add_parser(
        "create",
        parents=[key_file],
        help="issue a token (prints only the token)",
        description="Issue a signed token. Only the token is printed, so that "
        "TOKEN=$(jobwire token create ...) works.",
    )
    p.add_argument("--tenant", required=True, help="the tenant the token acts in")
    p.add_argument("--role", required=True, help="admin, submitter, viewer or worker")
    p.add_argument(
        "--ttl",
        default=DEFAULT_TTL,
        metavar="DURATION",
        help=f"how long the token is valid: 90s, 10m, 1h30m, 30d (default: {DEFAULT_TTL}; at most 10 years)",
    )
    p.add_argument(
        "--types",
        metavar="A,B",
        help="limit the token to these job types: comma-separated names or patterns such as reports.*",
    )
    p.add_argument("--subject", metavar="NAME", help="who the token names (default: ROLE@TENANT)")

    sub.add_parser(
        "public-keys",
        parents=[key_file],
        help="print the public keys (PEM), for servers that should only verify tokens",
        description="Print the key file's public keys as PEM. A server given only these can verify tokens "
        "but cannot issue them.",
    )


def run_token(args: argparse.Namespace) -> int:
    """Run the parsed ``jobwire token`` command; 0 on success, 2 with one ``error:`` line on any error."""
    try:
        path = _key_file(args)
        if args.token_command == "keygen":
            _keygen(path, rotate=args.rotate)
        elif args.token_command == "create":
            print(_create(path, args))
        elif args.token_command == "public-keys":
            sys.stdout.write(KeyRing.load(path).public_pem())
        else:
            raise ValueError(f"unknown token command: {args.token_command!r}")
        sys.stdout.flush()
    except (ValueError, OSError) as error:  # KeyFileError is a ValueError
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _key_file(args: argparse.Namespace) -> str:
    path: str | None = args.auth_key_file or os.environ.get(KEY_FILE_VARIABLE) or None
    if path is None:
        raise ValueError(f"no key file: pass --auth-key-file PATH or set {KEY_FILE_VARIABLE}")
    return path


def _keygen(path: str, *, rotate: bool) -> None:
    kid = write_key_file(path, rotate=rotate)
    if rotate:
        older = len(KeyRing.load(path).verifying_keys) - 1
        still = "key still verifies" if older == 1 else "keys still verify"
        print(f"added key {kid} to {path} (it signs new tokens; the {older} older {still})")
    else:
        print(f"created key {kid} in {path}")
    print(
        f"note: servers using {path} reload it on their own within a few seconds when it changes",
        file=sys.stderr,
    )


def _create(path: str, args: argparse.Namespace) -> str:
    """Check each flag (so an error names it), then sign."""
    tenant = _flag("--tenant", check_tenant, args.tenant)
    role = _flag("--role", parse_role, args.role)
    ttl = _flag("--ttl", parse_duration, args.ttl)
    types = None
    if args.types is not None:
        names = [name.strip() for name in args.types.split(",") if name.strip()]
        types = list(_flag("--types", check_type_patterns, names))
    subject = args.subject if args.subject is not None else f"{role.value}@{tenant}"
    _flag("--subject", check_subject, subject)
    keyring = KeyRing.load(path)
    try:
        return issue_token(keyring, tenant=tenant, role=role, subject=subject, ttl=ttl, types=types)
    except KeyFileError:
        raise
    except ValueError as error:  # the only check left to issue_token: the ttl's range
        raise ValueError(f"--ttl {args.ttl}: {error}") from None


def _flag(flag: str, check: Callable[[_V], _T], value: _V) -> _T:
    try:
        return check(value)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None
