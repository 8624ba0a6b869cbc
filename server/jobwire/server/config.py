"""Server configuration: defaults, ``JOBWIRE_*`` environment variables, command-line flags, validation.

Precedence: flag > environment variable > default. Durations accept plain seconds or a unit suffix
(``500ms``, ``30s``, ``10m``, ``2h``, ``7d``).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from jobwire.client.durations import parse_duration
from jobwire.server.job import RetryPolicy
from jobwire.server.manager import ManagerSettings
from jobwire.server.state_machine import JobState
from jobwire.server.stores.factory import check_store_url
from jobwire.server.tenants import TenantPolicies, TenantQuota, load_tenants_file

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def parse_optional_duration(text: str) -> float | None:
    """'0', 'none' or '' mean no limit."""
    if text.strip().lower() in ("", "0", "none", "off"):
        return None
    return parse_duration(text)


def parse_type_limits(text: str) -> dict[str, int]:
    """'reports.render=2,emails.send=10' -> {'reports.render': 2, 'emails.send': 10}."""
    limits: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if not name or not value.isdigit() or int(value) < 1:
            raise ValueError(f"bad type limit {part!r}: use TYPE=N with N >= 1")
        limits[name] = int(value)
    return limits


def parse_modules(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def parse_port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"not a port number: {text!r} (use 0 to 65535; 0 picks a free port)") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"not a port number: {value} (use 0 to 65535; 0 picks a free port)")
    return value


def parse_log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"not a log level: {text!r} (use {', '.join(LOG_LEVELS)})")
    return level


def parse_log_format(text: str) -> str:
    if text not in ("json", "text"):
        raise ValueError(f"not a log format: {text!r} (use json or text)")
    return text


def parse_store(text: str) -> str:
    """The store URL, checked now so that a typo is one clear line before anything starts."""
    check_store_url(text)
    return text


def parse_file(text: str) -> str:
    """A file that must exist and be readable now (a key, a certificate, the tenants file)."""
    path = text.strip()
    if not path:
        return ""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not readable")
    return path


def parse_limit(text: str) -> int | None:
    """A per-tenant limit: a whole number, 0 or 'none' for no limit."""
    value = text.strip().lower()
    if value in ("", "0", "none", "off"):
        return None
    return _positive_int(value)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (only this machine can connect)."""
    bare = host.strip().strip("[]")
    if bare.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Option:
    """How one config field is read from flags and the environment."""

    flag: str
    parse: Callable[[str], Any]
    help: str
    switch: bool = False  # a flag that may be given bare (``--insecure``), meaning true


@dataclass(frozen=True)
class ServerConfig:
    host: str = ""  # "": loopback when authentication is off, every interface when it is on
    port: int = 50051
    store: str = "sqlite:///jobwire.db"
    handlers: list[str] = field(default_factory=list)
    demo_handlers: bool = True
    max_running: int = 8
    max_queued: int = 100_000
    type_limits: dict[str, int] = field(default_factory=dict)
    aging_interval: float = 60.0
    default_timeout: float | None = None
    cancel_grace: float = 10.0
    drain_delay: float = 5.0
    drain_grace: float = 30.0
    retention: float = 7 * 86400.0
    retention_succeeded: float | None = None  # None: --retention
    retention_failed: float | None = None
    retention_cancelled: float | None = None
    sweep_interval: float = 60.0
    stats_window: float = 300.0
    lease_duration: float = 30.0
    default_max_attempts: int = 3
    retry_initial_backoff: float = 1.0
    retry_max_backoff: float = 300.0
    log_format: str = "json"
    log_level: str = "INFO"
    auth_key_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    insecure: bool = False
    tenants_file: str = ""
    tenant_max_queued: int | None = None
    tenant_max_running: int | None = None
    tenant_submit_rate: int | None = None

    @property
    def authentication(self) -> bool:
        """Whether callers must prove who they are (bearer tokens, client certificates, or both)."""
        return bool(self.auth_key_file or self.tls_client_ca)

    @property
    def listen_host(self) -> str:
        """Where to listen: ``--host``, else loopback only while anyone who connects is trusted."""
        if self.host:
            return self.host
        return "[::]" if self.authentication or self.insecure else "localhost"

    def tenant_policies(self) -> TenantPolicies:
        """The tenants' quotas: the ``--tenant-*`` defaults, and the tenants file's overrides."""
        default = TenantQuota(
            max_queued=self.tenant_max_queued,
            max_running=self.tenant_max_running,
            submit_rate=self.tenant_submit_rate,
        )
        overrides = load_tenants_file(self.tenants_file, default) if self.tenants_file else {}
        return TenantPolicies(default, overrides)

    def manager_settings(self) -> ManagerSettings:
        return ManagerSettings(
            max_running=self.max_running,
            max_queued=self.max_queued,
            type_limits=self.type_limits,
            aging_interval=self.aging_interval,
            default_timeout=self.default_timeout,
            cancel_grace=self.cancel_grace,
            retention=self.retention,
            outcome_retention={
                state: seconds
                for state, seconds in (
                    (JobState.SUCCEEDED, self.retention_succeeded),
                    (JobState.FAILED, self.retention_failed),
                    (JobState.CANCELLED, self.retention_cancelled),
                )
                if seconds is not None
            },
            sweep_interval=self.sweep_interval,
            stats_window=self.stats_window,
            lease_duration=self.lease_duration,
            retry_policy=RetryPolicy(
                max_attempts=self.default_max_attempts,
                initial_backoff=self.retry_initial_backoff,
                max_backoff=self.retry_max_backoff,
            ),
            tenants=self.tenant_policies(),
        )

    def handler_modules(self) -> list[str]:
        return (["jobwire.handlers.demo"] if self.demo_handlers else []) + list(self.handlers)

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be from 0 to 65535")
        if self.max_running < 1 or self.max_queued < 1:
            raise ValueError("max-running and max-queued must be at least 1")
        if min(self.aging_interval, self.cancel_grace, self.drain_grace, self.drain_delay) < 0:
            raise ValueError("aging-interval, cancel-grace, drain-delay and drain-grace must not be negative")
        if self.retention <= 0 or self.sweep_interval <= 0 or self.stats_window <= 0:
            raise ValueError("retention, sweep-interval and stats-window must be positive")
        kept = (self.retention_succeeded, self.retention_failed, self.retention_cancelled)
        if any(seconds is not None and seconds <= 0 for seconds in kept):
            raise ValueError("retention-succeeded, retention-failed and retention-cancelled must be positive")
        if self.lease_duration < 0.1:
            raise ValueError("lease-duration must be at least 100ms")
        if not 1 <= self.default_max_attempts <= 100:
            raise ValueError("default-max-attempts must be from 1 to 100")
        if self.retry_initial_backoff <= 0 or self.retry_max_backoff < self.retry_initial_backoff:
            raise ValueError("retry backoffs must be positive, the maximum at least the initial one")
        if self.log_format not in ("json", "text"):
            raise ValueError("log-format must be json or text")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
        if self.host and not is_loopback(self.host) and not self.authentication and not self.insecure:
            raise ValueError(
                f"--host {self.host}: listening beyond this machine without authentication lets anyone "
                "who reaches the port read and change every job; turn authentication on "
                "(--auth-key-file, --tls-client-ca) or say --insecure"
            )
        self.tenant_policies()  # a bad tenants file is one clear line now, not a failure later


OPTIONS: dict[str, Option] = {
    "host": Option(
        "--host",
        str,
        "address to listen on (default: localhost while authentication is off, else [::], every interface)",
    ),
    "port": Option("--port", parse_port, "port to listen on; 0 picks a free one (default 50051)"),
    "store": Option("--store", parse_store, "sqlite:///path.db (default sqlite:///jobwire.db) or memory:"),
    "handlers": Option("--handlers", parse_modules, "comma-separated modules with @handler functions"),
    "demo_handlers": Option(
        "--demo-handlers", parse_bool, "load the built-in demo.* handlers (default true)"
    ),
    "max_running": Option("--max-running", _positive_int, "global limit on running jobs (default 8)"),
    "max_queued": Option("--max-queued", _positive_int, "queued jobs beyond which SubmitJob is refused"),
    "type_limits": Option("--type-limits", parse_type_limits, "per-type limits on running jobs: TYPE=N,..."),
    "aging_interval": Option("--aging-interval", parse_duration, "waiting this long is worth +1 priority"),
    "default_timeout": Option("--default-timeout", parse_optional_duration, "run time-out of an attempt"),
    "cancel_grace": Option("--cancel-grace", parse_duration, "how long a cancelled handler may take to stop"),
    "drain_delay": Option(
        "--drain-delay",
        parse_duration,
        "on SIGTERM, how long to keep serving after health turns NOT_SERVING, so that load balancers "
        "move away first (default 5s)",
    ),
    "drain_grace": Option("--drain-grace", parse_duration, "on SIGTERM, how long running jobs may finish"),
    "retention": Option("--retention", parse_duration, "how long finished jobs are kept (default 7d)"),
    "retention_succeeded": Option(
        "--retention-succeeded",
        parse_optional_duration,
        "how long SUCCEEDED jobs are kept (default --retention)",
    ),
    "retention_failed": Option(
        "--retention-failed", parse_optional_duration, "how long FAILED jobs are kept (default --retention)"
    ),
    "retention_cancelled": Option(
        "--retention-cancelled",
        parse_optional_duration,
        "how long CANCELLED jobs are kept (default --retention)",
    ),
    "sweep_interval": Option("--sweep-interval", parse_duration, "how often expired jobs are purged"),
    "stats_window": Option("--stats-window", parse_duration, "window of the GetQueueStats timings"),
    "lease_duration": Option(
        "--lease-duration", parse_duration, "how long a remote worker's lease lasts unrenewed (default 30s)"
    ),
    "default_max_attempts": Option(
        "--default-max-attempts", _positive_int, "attempts a job may have unless its type or request says"
    ),
    "retry_initial_backoff": Option("--retry-initial-backoff", parse_duration, "default first retry delay"),
    "retry_max_backoff": Option("--retry-max-backoff", parse_duration, "default longest retry delay"),
    "log_format": Option("--log-format", parse_log_format, "json (default) or text"),
    "log_level": Option("--log-level", parse_log_level, "DEBUG, INFO (default), WARNING, ERROR"),
    "auth_key_file": Option(
        "--auth-key-file",
        parse_file,
        "turn authentication on: verify bearer tokens with the keys in this file (made by `jobwire "
        "token keygen`; reloaded when it changes)",
    ),
    "tls_cert": Option("--tls-cert", parse_file, "serve TLS with this certificate chain (PEM)"),
    "tls_key": Option("--tls-key", parse_file, "the private key of --tls-cert (PEM)"),
    "tls_client_ca": Option(
        "--tls-client-ca",
        parse_file,
        "mutual TLS: require client certificates signed by these CAs (PEM); a certificate's CN is the "
        "subject, O the tenant, OU the role",
    ),
    "insecure": Option(
        "--insecure",
        parse_bool,
        "allow listening beyond loopback with authentication off (anyone who reaches the port is an admin)",
        switch=True,
    ),
    "tenants_file": Option("--tenants-file", parse_file, "per-tenant weights and quotas (TOML; see README)"),
    "tenant_max_queued": Option(
        "--tenant-max-queued", parse_limit, "queued jobs a tenant may have (default: no tenant limit)"
    ),
    "tenant_max_running": Option(
        "--tenant-max-running", parse_limit, "running jobs a tenant may have (default: no tenant limit)"
    ),
    "tenant_submit_rate": Option(
        "--tenant-submit-rate", parse_limit, "jobs a tenant may submit per minute (default: no limit)"
    ),
}


def env_name(field_name: str) -> str:
    return "JOBWIRE_" + field_name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, option in OPTIONS.items():
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if option.switch else {}
        parser.add_argument(
            option.flag, dest=name, default=None, help=f"{option.help} [{env_name(name)}]", **extra
        )


def load_config(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Defaults, overridden by the environment, overridden by flags; then validated."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for item in fields(ServerConfig):
        option = OPTIONS[item.name]
        raw = getattr(args, item.name, None) if args is not None else None
        source = option.flag
        if raw is None:
            raw = environ.get(env_name(item.name))
            source = env_name(item.name)
        if raw is None:
            continue
        try:
            values[item.name] = option.parse(raw)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error
    config = ServerConfig(**values)
    config.validate()
    return config
