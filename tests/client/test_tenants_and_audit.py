"""Tenants, audit trails, quotas and the TLS options, without any server.

CLI parsing of the new options (environment defaults, either side of the subcommand), request building
in ``_core``, decoding of QuotaFailure and the auth errors from hand-built google.rpc.Status messages,
and the rendering of audit trails, tenants and per-tenant stats from hand-built protos.
"""

from __future__ import annotations

import io

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from rich.console import Console, RenderableType

from jobwire.cli import render
from jobwire.cli.main import _command_position, build_parser, main
from jobwire.client import (
    FailedPreconditionError,
    InvalidArgumentError,
    JobFailedError,
    JobwireError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    _core,
)
from jobwire.client.errors import from_status
from jobwire.v1 import job_pb2, job_service_pb2

TLS_ENV = ("JOBWIRE_TLS", "JOBWIRE_TLS_CA", "JOBWIRE_TLS_CERT", "JOBWIRE_TLS_KEY")


def _text(renderable: RenderableType) -> str:
    """What a table prints, on a page wide enough that nothing folds."""
    out = io.StringIO()
    Console(file=out, width=220, highlight=False, color_system=None).print(renderable)
    return out.getvalue()


# --- CLI parsing ----------------------------------------------------------------------------------


def test_tls_options_default_to_off() -> None:
    args = build_parser({}).parse_args(["stats"])
    assert (args.tls, args.tls_ca, args.tls_cert, args.tls_key) == (False, None, None, None)


def test_tls_options_come_from_the_environment() -> None:
    env = {
        "JOBWIRE_TLS": "1",
        "JOBWIRE_TLS_CA": "/etc/ca.pem",
        "JOBWIRE_TLS_CERT": "/etc/me.pem",
        "JOBWIRE_TLS_KEY": "/etc/me.key",
    }
    args = build_parser(env).parse_args(["get", "j"])
    assert (args.tls, args.tls_ca, args.tls_cert, args.tls_key) == (
        True,
        "/etc/ca.pem",
        "/etc/me.pem",
        "/etc/me.key",
    )
    # Given on the command line, before or after the subcommand, they win over the environment.
    args = build_parser(env).parse_args(["--tls-ca", "a.pem", "get", "j", "--tls-cert", "c.pem", "--no-tls"])
    assert (args.tls, args.tls_ca, args.tls_cert, args.tls_key) == (False, "a.pem", "c.pem", "/etc/me.key")


@pytest.mark.parametrize(
    ("value", "on"), [("1", True), ("true", True), ("YES", True), ("0", False), ("", False)]
)
def test_jobwire_tls_words(value: str, on: bool) -> None:
    assert build_parser({"JOBWIRE_TLS": value}).parse_args(["stats"]).tls is on


@pytest.mark.parametrize(
    "argv",
    [
        ["--tls", "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem", "list"],
        ["list", "--tls", "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
        ["--tls-ca=ca.pem", "--tls", "list", "--tls-cert=c.pem", "--tls-key", "k.pem"],
    ],
)
def test_tls_options_either_side_of_the_subcommand(argv: list[str]) -> None:
    args = build_parser({}).parse_args(argv)
    assert (args.command, args.tls, args.tls_ca, args.tls_cert, args.tls_key) == (
        "list",
        True,
        "ca.pem",
        "c.pem",
        "k.pem",
    )


def test_worker_takes_the_tls_options_after_its_name() -> None:
    env = {"JOBWIRE_TLS_CA": "env-ca.pem"}
    args = build_parser(env).parse_args(["worker", "--tls", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert (args.tls, args.tls_ca, args.tls_cert, args.tls_key) == (True, "env-ca.pem", "c.pem", "k.pem")
    args = build_parser(env).parse_args(["--tls-ca", "top.pem", "worker"])
    assert args.tls_ca == "top.pem"


@pytest.mark.parametrize(
    ("argv", "position"),
    [
        (["list"], 0),
        (["--tls-ca", "ca.pem", "list"], 2),
        (["--tls", "--tls-cert", "c.pem", "--tls-key", "k.pem", "get", "x"], 5),
        (["--server", "h:1", "--token", "t", "--tls-ca", "serve", "token"], 6),  # a file named "serve"
        (["--tls-ca=ca.pem", "--no-tls", "stats"], 2),
        (["--tls-ca", "ca.pem"], None),
        ([], None),
    ],
)
def test_command_position_skips_the_values_of_tls_options(argv: list[str], position: int | None) -> None:
    assert _command_position(argv) == position


@pytest.mark.parametrize(
    "argv", [["--tls"], ["--no-tls", "--tls-ca", "ca.pem"], ["--tls-cert", "c", "--tls-key", "k"]]
)
def test_tls_options_without_a_command_ask_for_the_command(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized" not in err and "COMMAND" in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--tls-cert", "c.pem", "get", "j"], "--tls-cert needs --tls-key (or $JOBWIRE_TLS_KEY)"),
        (["get", "j", "--tls-key", "k.pem"], "--tls-key needs --tls-cert (or $JOBWIRE_TLS_CERT)"),
        (["worker", "--handlers", "m", "--tls-key", "k.pem"], "--tls-key needs --tls-cert"),
    ],
)
def test_a_certificate_without_its_key_is_bad_usage(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in TLS_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


def test_new_command_options() -> None:
    parser = build_parser({})
    args = parser.parse_args(["cancel", "j", "--reason", "r", "--request-id", "c-1"])
    assert (args.job_id, args.reason, args.request_id) == ("j", "r", "c-1")
    assert parser.parse_args(["cancel", "j"]).request_id is None
    assert parser.parse_args(["retry", "j", "--request-id", "r-1"]).request_id == "r-1"
    assert parser.parse_args(["retry", "j"]).request_id is None
    assert parser.parse_args(["list", "--tenant", "acme", "--tenant", "globex"]).tenants == ["acme", "globex"]
    assert parser.parse_args(["list"]).tenants is None
    args = parser.parse_args(["audit", "j", "--json"])
    assert (args.command, args.job_id, args.json) == ("audit", "j", True)


def test_help_lists_the_new_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("audit", "token", "--tls-ca", "--tls-cert", "--tls-key", "--tls"):
        assert word in out


# --- request building -----------------------------------------------------------------------------


def test_list_request_with_tenants() -> None:
    assert list(_core.build_list_request(tenants=["acme", "globex"]).tenants) == ["acme", "globex"]
    assert list(_core.build_list_request(tenants="acme").tenants) == ["acme"]  # one name, bare
    assert list(_core.build_list_request(tenants=iter(("a", "b"))).tenants) == ["a", "b"]
    assert list(_core.build_list_request().tenants) == []
    assert list(_core.build_list_request(tenants=None, types="t").types) == ["t"]


def test_cancel_and_retry_requests_carry_the_request_id() -> None:
    assert _core.build_cancel_request("j", "why", "c-1") == job_service_pb2.CancelJobRequest(
        job_id="j", reason="why", request_id="c-1"
    )
    assert _core.build_cancel_request("j").request_id == ""
    assert _core.build_retry_request("j", "r-1") == job_service_pb2.RetryJobRequest(
        job_id="j", request_id="r-1"
    )
    assert _core.build_retry_request("j").request_id == ""


def test_audit_request() -> None:
    request = _core.build_audit_request("j", page_size=50, page_token="tok")
    assert (request.job_id, request.page_size, request.page_token) == ("j", 50, "tok")
    assert _core.build_audit_request("j").page_size == _core.DEFAULT_PAGE_SIZE
    assert _core.build_audit_request("j", page_size=0).page_size == 0  # the server's default
    with pytest.raises(InvalidArgumentError) as raised:
        _core.build_audit_request("j", page_size=-1)
    assert raised.value.field_violations == [
        ("page_size", "must be 0 (the server's default) or more, got -1")
    ]


# --- errors ---------------------------------------------------------------------------------------


def _quota_status(code: int = code_pb2.RESOURCE_EXHAUSTED) -> status_pb2.Status:
    status = status_pb2.Status(code=code, message="tenant acme is over its quota")
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(
            reason="TENANT_QUOTA_EXCEEDED", domain="jobwire.dev", metadata={"tenant": "acme"}
        )
    )
    quota = error_details_pb2.QuotaFailure()
    quota.violations.add(subject="tenant:acme", description="at most 100 jobs queued")
    quota.violations.add(subject="tenant:acme", description="at most 60 submits a minute")
    status.details.add().Pack(quota)
    status.details.add().Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=500_000_000))
    )
    return status


def test_quota_failure_is_decoded() -> None:
    err = from_status(_quota_status())
    assert isinstance(err, ResourceExhaustedError)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.quota_violations == [
        ("tenant:acme", "at most 100 jobs queued"),
        ("tenant:acme", "at most 60 submits a minute"),
    ]
    assert (err.reason, err.metadata, err.retry_delay) == ("TENANT_QUOTA_EXCEEDED", {"tenant": "acme"}, 0.5)
    assert err.field_violations == []


def test_several_quota_failure_details_add_up() -> None:
    status = _quota_status()
    more = error_details_pb2.QuotaFailure()
    more.violations.add(subject="server", description="queue full")
    status.details.add().Pack(more)
    assert from_status(status).quota_violations[-1] == ("server", "queue full")


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (code_pb2.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (code_pb2.UNAUTHENTICATED, UnauthenticatedError),
        (code_pb2.PERMISSION_DENIED, PermissionDeniedError),
        (code_pb2.NOT_FOUND, NotFoundError),
        (code_pb2.FAILED_PRECONDITION, FailedPreconditionError),
        (code_pb2.INTERNAL, JobwireError),
    ],
)
def test_every_error_class_has_quota_violations(code: int, cls: type[JobwireError]) -> None:
    bare = from_status(status_pb2.Status(code=code, message="m"))
    assert type(bare) is cls
    assert bare.quota_violations == []
    assert from_status(_quota_status(code)).quota_violations[0] == ("tenant:acme", "at most 100 jobs queued")
    assert cls("built by hand").quota_violations == []


@pytest.mark.parametrize(
    "reason",
    [
        "CREDENTIALS_MISSING",
        "TOKEN_EXPIRED",
        "TOKEN_MALFORMED",
        "TOKEN_UNKNOWN_KEY",
        "TOKEN_BAD_SIGNATURE",
        "TOKEN_INVALID",
        "CERTIFICATE_INVALID",
    ],
)
def test_unauthenticated_carries_its_reason(reason: str) -> None:
    status = status_pb2.Status(code=code_pb2.UNAUTHENTICATED, message="no valid credentials")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="jobwire.dev"))
    err = from_status(status)
    assert isinstance(err, UnauthenticatedError)
    assert (err.code, err.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason)


def test_permission_denied() -> None:
    status = status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="viewers may not cancel jobs")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="ROLE_FORBIDS", domain="jobwire.dev"))
    err = from_status(status)
    assert isinstance(err, PermissionDeniedError)
    assert str(err) == "PERMISSION_DENIED: viewers may not cancel jobs"


def test_a_failed_job_with_a_quota_failure() -> None:
    job = job_pb2.Job(id="j", state=job_pb2.JOB_STATE_FAILED)
    job.error.CopyFrom(_quota_status())
    assert JobFailedError(job).quota_violations[1] == ("tenant:acme", "at most 60 submits a minute")


# --- rendering ------------------------------------------------------------------------------------


def _entry(
    second: int, action: str, principal: str, request_id: str = "", peer: str = "", detail: str = ""
) -> job_pb2.AuditEntry:
    entry = job_pb2.AuditEntry(
        action=action, principal=principal, request_id=request_id, peer=peer, detail=detail
    )
    entry.time.FromSeconds(1_700_000_000 + second)
    return entry


def test_audit_table() -> None:
    entries = [
        _entry(
            0, "submitted", principal="alice (acme/submitter)", request_id="req-1", peer="ipv4:10.0.0.7:5"
        ),
        _entry(5, "attempt started", principal="worker-3", detail="attempt 1"),
        _entry(9, "lease expired", principal="jobwire"),
    ]
    text = _text(render.audit_table(entries))
    for heading in ("TIME", "ACTION", "PRINCIPAL", "REQUEST ID", "PEER", "DETAIL"):
        assert heading in text
    lines = text.splitlines()
    submitted = next(line for line in lines if "submitted" in line)
    assert "alice (acme/submitter)" in submitted and "req-1" in submitted and "ipv4:10.0.0.7:5" in submitted
    assert render.fmt_time(entries[0].time) in submitted
    expired = next(line for line in lines if "lease expired" in line)
    assert expired.split()[-3:] == ["-", "-", "-"]  # no request id, peer or detail
    assert text.index("submitted") < text.index("attempt started") < text.index("lease expired")
    json_entry = render.to_dict(entries[1])
    assert (json_entry["action"], json_entry["detail"], json_entry["peer"]) == (
        "attempt started",
        "attempt 1",
        "",
    )


def test_get_shows_tenant_and_creator() -> None:
    job = job_pb2.Job(id="j", type="t", tenant="acme", created_by="alice")
    text = _text(render.job_detail_table(job))
    assert any(line.split() == ["tenant", "acme"] for line in text.splitlines())
    assert any(line.split() == ["created", "by", "alice"] for line in text.splitlines())
    old_server = _text(render.job_detail_table(job_pb2.Job(id="j", type="t")))
    assert "tenant" not in old_server and "created by" not in old_server


def test_list_shows_a_tenant_column_only_across_tenants() -> None:
    one = [job_pb2.Job(id=f"j{i}", type="t", tenant="acme") for i in range(3)]
    assert "TENANT" not in _text(render.jobs_table(one))
    assert "TENANT" not in _text(render.jobs_table([]))
    mixed = [*one, job_pb2.Job(id="g1", type="t", tenant="globex")]
    text = _text(render.jobs_table(iter(mixed)))  # any iterable, read once
    assert "TENANT" in text
    assert next(line for line in text.splitlines() if "g1" in line).split()[:2] == ["g1", "globex"]


def test_tenant_limit_reads_as_words() -> None:
    job = job_pb2.Job(state=job_pb2.JOB_STATE_QUEUED, wait_reason=job_pb2.WAIT_REASON_TENANT_LIMIT)
    assert render.fmt_wait(job) == "tenant limit: its tenant runs as many jobs as its quota allows"
    job.wait_message = "tenant acme runs 5 of its 5 jobs"
    assert render.fmt_wait(job) == "tenant limit: tenant acme runs 5 of its 5 jobs"
    assert "tenant limit" in _text(render.job_detail_table(job))
    newer = job_pb2.Job(state=job_pb2.JOB_STATE_QUEUED)
    newer.wait_reason = 99  # type: ignore[assignment]  # a reason newer than this client
    assert render.fmt_wait(newer) == "reason 99"


def _stats(tenant: str, *rows: job_service_pb2.TenantStats) -> job_service_pb2.GetQueueStatsResponse:
    return job_service_pb2.GetQueueStatsResponse(tenant=tenant, tenant_stats=list(rows))


def test_stats_show_the_scope() -> None:
    assert any(
        line.split() == ["scope", "tenant", "acme"]
        for line in _text(render.stats_view(_stats("acme"))).splitlines()
    )
    assert "all tenants" in _text(render.stats_view(_stats("")))


def test_stats_show_tenants_when_several_or_limited() -> None:
    T = job_service_pb2.TenantStats
    alone = _stats("acme", T(tenant="acme", queued=3, running=1, weight=1))
    assert "jobs by tenant" not in _text(render.stats_view(alone))

    limited = _stats("acme", T(tenant="acme", queued=3, running=1, weight=1, max_running=4))
    text = _text(render.stats_view(limited))
    assert "jobs by tenant" in text
    row = next(line for line in text.splitlines() if line.split()[:1] == ["acme"])
    assert row.split() == ["acme", "3", "1", "1", "-", "4", "-"]

    several = _stats(
        "",
        T(tenant="globex", queued=1, running=0, weight=2.5, max_queued=100, submit_rate=60),
        T(tenant="acme", queued=7, running=2, weight=1),
    )
    text = _text(render.stats_view(several))
    for heading in ("TENANT", "QUEUED", "RUNNING", "WEIGHT", "MAX QUEUED", "MAX RUNNING", "SUBMITS/MIN"):
        assert heading in text
    lines = text.splitlines()
    acme = next(i for i, line in enumerate(lines) if line.split()[:1] == ["acme"])
    globex = next(i for i, line in enumerate(lines) if line.split()[:1] == ["globex"])
    assert acme < globex  # sorted by name
    assert lines[globex].split() == ["globex", "1", "0", "2.5", "100", "-", "60"]
