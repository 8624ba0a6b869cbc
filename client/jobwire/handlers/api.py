"""Handler declaration, the context a handler runs with, and loading handlers from modules."""

from __future__ import annotations

import abc
import importlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

HandlerFunc = Callable[[dict[str, Any], "JobContext"], Any]
F = TypeVar("F", bound=Callable[..., Any])

JOB_TYPE_PATTERN = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
_SPEC_ATTRIBUTE = "__jobwire_handler__"


# At most this many bytes of JSON in a progress report's ``details``.
MAX_PROGRESS_DETAILS_BYTES = 4096


@dataclass(slots=True)
class Progress:
    """How far a running job has got (the proto's ``Progress``).

    ``details`` holds the job's own figures (items processed and failed, bytes, rate...) as a JSON
    object; it is never changed in place (a report replaces it), so copies may share it.
    """

    percent: float = 0.0
    message: str = ""
    current_step: int = 0
    total_steps: int = 0
    details: dict[str, Any] | None = None

    def copy(self) -> Progress:
        """A copy the reporter's later changes cannot reach (``details`` is shared: it is replaced,
        never changed in place)."""
        return Progress(self.percent, self.message, self.current_step, self.total_steps, self.details)


def progress_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """A report's ``details`` as a plain JSON object of at most MAX_PROGRESS_DETAILS_BYTES; ValueError
    (or TypeError) for anything else: it is the handler's mistake, raised where it reported."""
    if not isinstance(details, Mapping):
        raise TypeError(f"progress details must be a mapping (a JSON object), not {type(details).__name__}")
    text = json.dumps(dict(details), allow_nan=False, separators=(",", ":"))
    if len(text.encode()) > MAX_PROGRESS_DETAILS_BYTES:
        raise ValueError(f"progress details are over {MAX_PROGRESS_DETAILS_BYTES} bytes of JSON")
    plain: dict[str, Any] = json.loads(text)
    return plain


@dataclass(frozen=True, slots=True)
class RetryDefaults:
    """A job type's default retry settings; None leaves a field to the server's default."""

    max_attempts: int | None = None
    initial_backoff: float | None = None  # seconds
    max_backoff: float | None = None  # seconds
    backoff_multiplier: float | None = None
    # google.rpc.Code values whose failures are not retried (the proto's non_retryable_codes).
    non_retryable_codes: tuple[int, ...] | None = None


class JobCancelled(Exception):
    """The job was cancelled; raised inside a handler by the context's cancellation checks."""


class NonRetryableError(Exception):
    """Raise from a handler to fail the job at once, without further attempts (e.g. invalid params)."""


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered job type: the function and its per-type defaults."""

    name: str
    func: HandlerFunc
    is_async: bool
    max_running: int | None = None  # per-type concurrency limit; None = only the global limit
    timeout: float | None = None  # default run time-out of one attempt, seconds; None = server default
    retry: RetryDefaults = RetryDefaults()


def handler(
    name: str,
    *,
    max_running: int | None = None,
    timeout: float | None = None,
    max_attempts: int | None = None,
    initial_backoff: float | None = None,
    max_backoff: float | None = None,
    backoff_multiplier: float | None = None,
    non_retryable_codes: Iterable[int] | None = None,
) -> Callable[[F], F]:
    """Mark a function as the handler of job type ``name``; ``load_handlers`` finds it in its module.

    ``max_running`` limits running jobs of this type server-wide; ``timeout`` (seconds) bounds one
    attempt; the retry settings are the type's defaults (a SubmitJob may override them), with
    ``non_retryable_codes`` the google.rpc.Code values (``grpc.StatusCode.X.value[0]``, or
    ``google.rpc.code_pb2.X``) whose failures end the job at once.
    """
    if not JOB_TYPE_PATTERN.match(name):
        raise ValueError(f"invalid job type name {name!r}: 1-128 characters of letters, digits and ._:/-")
    if max_running is not None and max_running < 1:
        raise ValueError("max_running must be at least 1")
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive")
    if max_attempts is not None and not 1 <= max_attempts <= 100:
        raise ValueError("max_attempts must be from 1 to 100")
    for label, value in (("initial_backoff", initial_backoff), ("max_backoff", max_backoff)):
        if value is not None and value <= 0:
            raise ValueError(f"{label} must be positive")
    if backoff_multiplier is not None and not 1.0 <= backoff_multiplier <= 10.0:
        raise ValueError("backoff_multiplier must be from 1 to 10")
    codes = None if non_retryable_codes is None else tuple(sorted(set(non_retryable_codes)))
    if codes is not None and (len(codes) > 16 or not all(1 <= code <= 16 for code in codes)):
        raise ValueError("non_retryable_codes must be at most 16 google.rpc.Code values from 1 to 16")
    retry = RetryDefaults(max_attempts, initial_backoff, max_backoff, backoff_multiplier, codes)

    def mark(func: F) -> F:
        spec = HandlerSpec(name, func, inspect.iscoroutinefunction(func), max_running, timeout, retry)
        setattr(func, _SPEC_ATTRIBUTE, spec)
        return func

    return mark


def load_handlers(module_names: Iterable[str]) -> dict[str, HandlerSpec]:
    """Import each module and collect its ``@handler`` functions, refusing two handlers for one type."""
    specs: dict[str, HandlerSpec] = {}
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            spec = getattr(value, _SPEC_ATTRIBUTE, None)
            if not isinstance(spec, HandlerSpec):
                continue
            existing = specs.get(spec.name)
            if existing is not None and existing.func is not spec.func:
                raise ValueError(f"job type {spec.name!r} has two handlers ({module_name})")
            specs[spec.name] = spec
    return specs


def load_handlers_from_cwd(module_names: Iterable[str]) -> dict[str, HandlerSpec]:
    """``load_handlers`` for the command line: modules are also found in the current directory, as
    ``python -m`` finds them, and a module that cannot be loaded is a ValueError with one clear line."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    names = list(module_names)
    for name in names:  # import one by one, to name the module that fails
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"cannot import {name}: {error}") from error
        except Exception as error:  # the module itself raised while being imported
            raise ValueError(f"importing {name} failed: {error!r}") from error
    return load_handlers(names)


class JobContext(abc.ABC):
    """What a running handler can see and do. Thread-safe: plain handlers call it from a worker thread."""

    job_id: str
    job_type: str
    attempt: int
    # The fencing epoch of this attempt's lease: it only grows, so a side effect tagged with it can be
    # refused when a later attempt has already written (e.g. UPDATE ... WHERE epoch < :epoch).
    lease_epoch: int

    @abc.abstractmethod
    def report_progress(
        self,
        percent: float | None = None,
        message: str | None = None,
        current_step: int | None = None,
        total_steps: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish progress; watchers see it at once. Fields left None keep their last value.

        With steps and no percent, percent is derived as 100 * current_step / total_steps.
        ``details`` is the job's own figures as a JSON object (``{"rows": 1200, "failed": 3}``), at
        most 4 KiB of JSON; it replaces the previous details whole. ValueError or TypeError when it
        cannot be a JSON object of that size.
        """

    @property
    @abc.abstractmethod
    def cancelled(self) -> bool:
        """True once the job has been asked to stop (cancelled, timed out, or the server is draining)."""

    def raise_if_cancelled(self) -> None:
        """Raise JobCancelled if the job has been asked to stop: call it between units of work."""
        if self.cancelled:
            raise JobCancelled(self.cancel_reason or "cancelled")

    @property
    @abc.abstractmethod
    def cancel_reason(self) -> str:
        """Why the job was asked to stop, '' if it was not."""

    @abc.abstractmethod
    def sleep(self, seconds: float) -> None:
        """Sleep in a plain handler, waking at once and raising JobCancelled when the job is cancelled."""

    @abc.abstractmethod
    async def asleep(self, seconds: float) -> None:
        """Sleep in an async handler, waking at once and raising JobCancelled when the job is cancelled."""
