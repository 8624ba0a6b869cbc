"""Server configuration: defaults, ``JOBWIRE_*`` environment variables, command-line flags, validation.

Precedence: flag > environment variable > default. Durations accept plain seconds or a unit suffix
(``500ms``, ``30s``, ``10m``, ``2h``, ``7d``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from jobwire.client.durations import parse_duration
from jobwire.server.job import RetryPolicy
from jobwire.server.manager import ManagerSettings
from jobwire.server.stores.factory import check_store_url

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


@dataclass(frozen=True)
class Option:
    """How one config field is read from flags and the environment."""

    flag: str
    parse: Callable[[str], Any]
    help: str


@dataclass(frozen=True)
class ServerConfig:
    host: str = "[::]"
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
    sweep_interval: float = 60.0
    stats_window: float = 300.0
    lease_duration: float = 30.0
    default_max_attempts: int = 3
    retry_initial_backoff: float = 1.0
    retry_max_backoff: float = 300.0
    log_format: str = "json"
    log_level: str = "INFO"

    def manager_settings(self) -> ManagerSettings:
        return ManagerSettings(
            max_running=self.max_running,
            max_queued=self.max_queued,
            type_limits=self.type_limits,
            aging_interval=self.aging_interval,
            default_timeout=self.default_timeout,
            cancel_grace=self.cancel_grace,
            retention=self.retention,
            sweep_interval=self.sweep_interval,
            stats_window=self.stats_window,
            lease_duration=self.lease_duration,
            retry_policy=RetryPolicy(
                max_attempts=self.default_max_attempts,
                initial_backoff=self.retry_initial_backoff,
                max_backoff=self.retry_max_backoff,
            ),
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
        if self.lease_duration < 0.1:
            raise ValueError("lease-duration must be at least 100ms")
        if not 1 <= self.default_max_attempts <= 100:
            raise ValueError("default-max-attempts must be from 1 to 100")
        if self.retry_initial_backoff <= 0 or self.retry_max_backoff < self.retry_initial_backoff:
            raise ValueError("retry backoffs must be positive, the maximum at least the initial one")
        if self.log_format not in ("json", "text"):
            raise ValueError("log-format must be json or text")


OPTIONS: dict[str, Option] = {
    "host": Option("--host", str, "address to listen on (default [::], all interfaces)"),
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
}


def env_name(field_name: str) -> str:
    return "JOBWIRE_" + field_name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, option in OPTIONS.items():
        parser.add_argument(option.flag, dest=name, default=None, help=f"{option.help} [{env_name(name)}]")


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
