"""Presentation for the CLI: rich tables, the live watch view, and JSON output.

Nothing here parses arguments or makes calls; it only turns messages into text.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable
from types import TracebackType
from typing import Any, TextIO

from google.protobuf import duration_pb2, json_format, message, timestamp_pb2
from rich import box
from rich.console import Console, Group
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from jobwire.client.errors import JobwireError, from_status
from jobwire.client.jobs import is_terminal, job_params, job_result, state_name
from jobwire.v1 import job_pb2, job_service_pb2

STATE_STYLES = {
    "queued": "cyan",
    "running": "blue",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "cancelling": "magenta",
}


PIPE_WIDTH = 160


def make_console(file: TextIO | None = None) -> Console:
    """A console for tables; no auto-highlighting, so ids and numbers print as they are.

    Piped output gets a wide page instead of rich's 80 columns, so that tables are not truncated
    for grep and friends ($COLUMNS still wins when set).
    """
    console = Console(file=file, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(file=file, highlight=False, width=PIPE_WIDTH)
    return console


# --- JSON -------------------------------------------------------------------------------------------


def to_dict(msg: message.Message) -> dict[str, Any]:
    """The proto3 JSON mapping of a message, with the .proto field names."""
    return dict(
        json_format.MessageToDict(
            msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


def print_json(value: Any, file: TextIO | None = None) -> None:
    """One pretty-printed JSON document."""
    print(json.dumps(value, indent=2, ensure_ascii=False), file=file)


def print_json_line(value: Any, file: TextIO | None = None) -> None:
    """One compact JSON object on its own line, flushed so that pipes see it at once."""
    print(json.dumps(value, ensure_ascii=False, separators=(",", ":")), file=file, flush=True)


# --- formatting helpers -----------------------------------------------------------------------------


def styled_state(state: int) -> Text:
    name = state_name(state)
    return Text(name, style=STATE_STYLES.get(name, ""))


def fmt_time(stamp: timestamp_pb2.Timestamp, present: bool = True) -> str:
    """Local wall-clock time, or "-" when the field is unset."""
    if not present:
        return "-"
    return stamp.ToDatetime(tzinfo=datetime.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_seconds(seconds: float) -> str:
    """A short human duration: 850 ms, 12.3 s, 4 min 05 s, 2 h 03 min."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if minutes else f"{hours} h"


def fmt_duration(duration: duration_pb2.Duration, present: bool = True) -> str:
    if not present:
        return "-"
    return fmt_seconds(duration.ToNanoseconds() / 1e9)


def run_time(job: job_pb2.Job) -> str:
    """How long the current attempt has run (until now while it still runs)."""
    if not job.HasField("start_time"):
        return "-"
    start = job.start_time.ToDatetime(tzinfo=datetime.UTC)
    if job.HasField("end_time"):
        end = job.end_time.ToDatetime(tzinfo=datetime.UTC)
    else:
        end = datetime.datetime.now(datetime.UTC)
    return fmt_seconds(max(0.0, (end - start).total_seconds()))


def fmt_progress(job: job_pb2.Job) -> str:
    """Progress as '42% (3/10) message', or '-' before the handler reported anything."""
    if not job.HasField("progress"):
        return "-"
    p = job.progress
    text = f"{p.percent:.0f}%"
    if p.total_steps:
        text += f" ({p.current_step}/{p.total_steps})"
    if p.message:
        text += f" {p.message}"
    details = fmt_details(p)
    if details:
        text += f" [{details}]"
    return text


def fmt_details(progress: job_pb2.Progress, limit: int = 120) -> str:
    """A progress report's details as 'rows=1200 failed=3' (nested values as JSON), cut at ``limit``."""
    if not progress.HasField("details"):
        return ""
    parts = []
    for key, value in sorted(json_format.MessageToDict(progress.details).items()):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        shown = value if isinstance(value, str | int | float | bool) else json.dumps(value)
        parts.append(f"{key}={shown}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt_labels(labels: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _tidy(value: Any) -> Any:
    """Whole floats back to ints for display: Struct stores every number as a double."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _tidy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tidy(v) for v in value]
    return value


def fmt_json(value: Any) -> str:
    return json.dumps(_tidy(value), ensure_ascii=False, sort_keys=True)


def fmt_error(job: job_pb2.Job) -> str:
    """The job's error as "CODE: message [reason]"."""
    if not job.HasField("error"):
        return "-"
    err: JobwireError = from_status(job.error)
    text = f"{err.code.name}: {err.message}"
    return f"{text} [{err.reason}]" if err.reason else text


# --- tables -----------------------------------------------------------------------------------------


def _kv_table(title: str | None = None) -> Table:
    table = Table(title=title, show_header=False, box=box.SIMPLE, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    return table


def job_summary_table(job: job_pb2.Job) -> Table:
    """The short view printed after submit."""
    table = _kv_table()
    table.add_row("id", job.id)
    table.add_row("type", job.type)
    table.add_row("state", styled_state(job.state))
    table.add_row("priority", str(job.priority))
    if job.state == job_pb2.JOB_STATE_QUEUED and job.queue_position:
        table.add_row("queue position", str(job.queue_position))
    if job.HasField("schedule_time"):
        table.add_row("runs after", fmt_time(job.schedule_time))
    return table


def fmt_attempt(job: job_pb2.Job) -> str:
    """'2 of 3', or after a RetryJob '6 (2 of 3 since the last retry)': the budget restarts then."""
    allowed = job.retry_policy.max_attempts or "-"
    if not job.attempt:
        return f"0 of {allowed}"
    if job.attempts_in_budget and job.attempts_in_budget != job.attempt:
        return f"{job.attempt} ({job.attempts_in_budget} of {allowed} since the last retry)"
    return f"{job.attempt} of {allowed}"


# What a wait reason means, for servers that send no wait_message with it.
_WAIT_HINTS: dict[int, str] = {
    job_pb2.WAIT_REASON_TENANT_LIMIT: "its tenant runs as many jobs as its quota allows",
}


def fmt_wait(job: job_pb2.Job) -> str:
    """Why a queued job waits, e.g. "no worker: no connected worker takes type x" or "tenant limit:
    ..."."""
    if not job.wait_reason:
        return "-"
    try:
        enum_name = job_pb2.WaitReason.Name(job.wait_reason)
    except ValueError:  # a reason newer than this client
        enum_name = f"reason {job.wait_reason}"
    name = enum_name.removeprefix("WAIT_REASON_").lower().replace("_", " ")
    message = job.wait_message or _WAIT_HINTS.get(job.wait_reason, "")
    return f"{name}: {message}" if message else name


def attempts_table(job: job_pb2.Job) -> Table:
    """Every finished attempt: when, where, and how it ended."""
    table = Table(title="attempts", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("#", "WORKER", "STARTED", "ENDED", "OUTCOME"):
        table.add_column(column)
    for attempt in job.attempts:
        outcome = "succeeded" if attempt.outcome.code == 0 else attempt.outcome.message
        table.add_row(
            str(attempt.attempt),
            attempt.worker_id or "-",
            fmt_time(attempt.start_time),
            fmt_time(attempt.end_time),
            Text(outcome, style="green" if attempt.outcome.code == 0 else "red"),
        )
    return table


def job_detail_table(job: job_pb2.Job) -> Table:
    """Everything worth knowing about one job, for ``get``."""
    table = _kv_table()
    table.add_row("id", job.id)
    table.add_row("type", job.type)
    table.add_row("state", styled_state(job.state))
    table.add_row("priority", str(job.priority))
    if job.tenant:
        table.add_row("tenant", job.tenant)
    if job.created_by:
        table.add_row("created by", job.created_by)
    table.add_row("attempt", fmt_attempt(job))
    table.add_row("progress", fmt_progress(job))
    if job.state == job_pb2.JOB_STATE_QUEUED:
        table.add_row("queue position", str(job.queue_position or "-"))
        table.add_row("waiting", fmt_wait(job))
    if job.HasField("schedule_time"):
        table.add_row("runs after", fmt_time(job.schedule_time))
    if job.worker_id:
        table.add_row("worker", f"{job.worker_id} (lease epoch {job.lease_epoch})")
    if job.HasField("lease_expire_time"):
        table.add_row("lease expires", fmt_time(job.lease_expire_time))
    table.add_row("created", fmt_time(job.create_time, job.HasField("create_time")))
    table.add_row("started", fmt_time(job.start_time, job.HasField("start_time")))
    table.add_row("ended", fmt_time(job.end_time, job.HasField("end_time")))
    table.add_row("run time", run_time(job))
    table.add_row("updated", fmt_time(job.update_time, job.HasField("update_time")))
    if job.HasField("expire_time"):
        table.add_row("expires", fmt_time(job.expire_time))
    table.add_row("timeout", fmt_duration(job.timeout, job.HasField("timeout")))
    if job.request_id:
        table.add_row("request id", job.request_id)
    table.add_row("labels", fmt_labels(job.labels))
    table.add_row("params", fmt_json(job_params(job)))
    result = job_result(job)
    if result is not None:
        table.add_row("result", fmt_json(result))
    if job.HasField("error"):
        table.add_row("error", Text(fmt_error(job), style="red"))
    if job.cancel_reason:
        table.add_row("cancel reason", job.cancel_reason)
    return table


def jobs_table(jobs: Iterable[job_pb2.Job]) -> Table:
    """One row per job, for ``list``; a TENANT column only when the jobs span several tenants (an
    admin's view), since for everyone else it would repeat one name on every row."""
    jobs = list(jobs)
    with_tenant = len({job.tenant for job in jobs}) > 1
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("ID", no_wrap=True)
    if with_tenant:
        table.add_column("TENANT", overflow="fold")
    table.add_column("TYPE", overflow="fold")
    table.add_column("STATE", no_wrap=True)
    table.add_column("PRI", justify="right")
    table.add_column("PROGRESS", overflow="fold")
    table.add_column("CREATED", no_wrap=True)
    table.add_column("LABELS", overflow="fold")
    for job in jobs:
        cells: list[str | Text] = [job.id, job.tenant or "-"] if with_tenant else [job.id]
        table.add_row(
            *cells,
            job.type,
            styled_state(job.state),
            str(job.priority),
            fmt_progress(job),
            fmt_time(job.create_time, job.HasField("create_time")),
            fmt_labels(job.labels),
        )
    return table


def job_types_table(types: Iterable[job_service_pb2.JobTypeInfo]) -> Table:
    """One row per job type, for ``types``: where it runs, the capacity connected now, its defaults."""
    table = Table(box=box.SIMPLE_HEAD)
    for name, justify in (
        ("TYPE", "left"),
        ("RUNS IN", "left"),
        ("EXECUTORS", "right"),
        ("FREE", "right"),
        ("RUNNING", "right"),
        ("LIMIT", "right"),
        ("TIMEOUT", "right"),
        ("ATTEMPTS", "right"),
        ("TENANT", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for info in types:
        timeout = info.timeout.ToNanoseconds() / 1e9 if info.HasField("timeout") else None
        table.add_row(
            info.name,
            "server" if info.in_process else "workers",
            str(info.executors),
            str(info.free_slots),
            str(info.running),
            str(info.max_running) if info.max_running else "-",
            fmt_seconds(timeout) if timeout else "-",
            str(info.retry_policy.max_attempts) if info.retry_policy.max_attempts else "-",
            info.tenant or "-",
        )
    return table


def audit_table(entries: Iterable[job_pb2.AuditEntry]) -> Table:
    """A job's audit trail, oldest first, for ``audit``."""
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("TIME", no_wrap=True)
    table.add_column("ACTION", no_wrap=True)
    table.add_column("PRINCIPAL", overflow="fold")
    table.add_column("REQUEST ID", overflow="fold")
    table.add_column("PEER", overflow="fold")
    table.add_column("DETAIL", overflow="fold")
    for entry in entries:
        table.add_row(
            fmt_time(entry.time, entry.HasField("time")),
            entry.action or "-",
            entry.principal or "-",
            entry.request_id or "-",
            entry.peer or "-",
            entry.detail or "-",
        )
    return table


def _limit(value: float) -> str:
    """A quota for display: "-" for 0, which means no limit."""
    return f"{value:g}" if value else "-"


def tenants_table(stats: job_service_pb2.GetQueueStatsResponse) -> Table | None:
    """Each tenant's share of the queue and its quotas, or None when that says nothing new: a single
    tenant without quotas (the counts above are already its own)."""
    rows = list(stats.tenant_stats)
    quotas = any(t.max_queued or t.max_running or t.submit_rate for t in rows)
    if len(rows) <= 1 and not quotas:
        return None
    table = Table(title="jobs by tenant", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("TENANT")
    table.add_column("QUEUED", justify="right")
    table.add_column("RUNNING", justify="right")
    table.add_column("WEIGHT", justify="right")
    table.add_column("MAX QUEUED", justify="right")
    table.add_column("MAX RUNNING", justify="right")
    table.add_column("SUBMITS/MIN", justify="right")
    for ts in sorted(rows, key=lambda t: t.tenant):
        table.add_row(
            ts.tenant or "-",
            str(ts.queued),
            str(ts.running),
            f"{ts.weight:g}" if ts.weight else "-",
            _limit(ts.max_queued),
            _limit(ts.max_running),
            _limit(ts.submit_rate),
        )
    return table


def stats_view(stats: job_service_pb2.GetQueueStatsResponse) -> Group:
    """Queue statistics as a few small tables, for ``stats``."""
    overview = _kv_table("queue")
    overview.add_row("scope", f"tenant {stats.tenant}" if stats.tenant else "all tenants")
    overview.add_row("running", f"{stats.running} / {stats.max_running or '-'}")
    overview.add_row("max queued", str(stats.max_queued or "-"))
    overview.add_row("draining", "yes" if stats.draining else "no")
    overview.add_row("connected workers", str(stats.connected_workers))
    overview.add_row("delayed (scheduled or back-off)", str(stats.delayed))
    window = fmt_duration(stats.window, stats.HasField("window"))
    overview.add_row(f"finished (last {window})", str(stats.finished_in_window))
    overview.add_row("success rate", f"{stats.success_rate * 100:.1f}%" if stats.finished_in_window else "-")
    overview.add_row("mean queue wait", fmt_duration(stats.mean_queue_wait))
    overview.add_row("mean run time", fmt_duration(stats.mean_run_time))
    overview.add_row("read at", fmt_time(stats.read_time, stats.HasField("read_time")))

    states = Table(title="jobs by state", box=box.SIMPLE_HEAD, title_justify="left")
    states.add_column("STATE")
    states.add_column("COUNT", justify="right")
    for sc in stats.state_counts:
        states.add_row(styled_state(sc.state), str(sc.count))

    types = Table(title="jobs by type", box=box.SIMPLE_HEAD, title_justify="left")
    types.add_column("TYPE")
    types.add_column("QUEUED", justify="right")
    types.add_column("RUNNING", justify="right")
    types.add_column("MAX RUNNING", justify="right")
    types.add_column("TOTAL", justify="right")
    types.add_column("WORKERS", justify="right")
    for ts in stats.type_stats:
        types.add_row(
            ts.type,
            str(ts.queued),
            str(ts.running),
            str(ts.max_running or "-"),
            str(ts.total),
            str(ts.workers),
        )

    priorities = Table(title="queued by priority", box=box.SIMPLE_HEAD, title_justify="left")
    priorities.add_column("PRIORITY", justify="right")
    priorities.add_column("QUEUED", justify="right")
    for pc in sorted(stats.priority_counts, key=lambda pc: -pc.priority):
        priorities.add_row(str(pc.priority), str(pc.queued))
    if not stats.priority_counts:
        priorities.add_row("-", "0")

    tenants = tenants_table(stats)
    if tenants is None:
        return Group(overview, states, types, priorities)
    return Group(overview, states, types, tenants, priorities)


def outcome_text(job: job_pb2.Job) -> Text:
    """One line saying how a watched job ended, with its result or error."""
    text = Text(f"job {job.id} ")
    text.append(state_name(job.state).upper(), style=STATE_STYLES.get(state_name(job.state), ""))
    if job.HasField("start_time") and job.HasField("end_time"):
        text.append(f" after {run_time(job)}")
    result = job_result(job)
    if result is not None:
        text.append(f": {fmt_json(result)}")
    elif job.HasField("error"):
        text.append(f": {fmt_error(job)}", style="red")
    return text


# --- live watch -------------------------------------------------------------------------------------


class WatchView:
    """A live progress bar for one job: state, percent, steps and the handler's message."""

    def __init__(self, console: Console, job_id: str) -> None:
        self._console = console
        self._job_id = job_id
        self._progress = Progress(
            TextColumn("{task.fields[state]:<10}", markup=False),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[steps]}", markup=False),
            TextColumn("{task.fields[message]}", markup=False),
            console=console,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> WatchView:
        return self  # the bar appears with the first update: nothing is drawn for a server not reached

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._progress.stop()

    def update(self, response: job_service_pb2.WatchJobResponse) -> None:
        """Show the job as of one watch message."""
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(self._job_id, total=100.0, state="", steps="", message="")
        job = response.job
        p = job.progress
        percent = p.percent
        if not percent and p.total_steps:
            percent = 100.0 * p.current_step / p.total_steps
        if job.state == job_pb2.JOB_STATE_SUCCEEDED:
            percent = 100.0
        steps = f"{p.current_step}/{p.total_steps}" if p.total_steps else ""
        details = fmt_details(p, 60)
        self._progress.update(
            self._task,
            completed=max(0.0, min(100.0, percent)),
            state=state_name(job.state),
            steps=steps,
            message=f"{p.message} [{details}]" if details else p.message,
        )
        if is_terminal(job.state):
            self._progress.refresh()
