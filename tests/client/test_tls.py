"""TLS in the SDK, the worker and the CLI, proven against a tiny TLS server of our own (no Jobwire server).

A throwaway CA (``support.security.make_pki``) signs a server certificate (for 127.0.0.1 and localhost)
and a client certificate; a fake JobService on a grpc TLS server answers the calls the new SDK
methods and CLI commands make (audit pages, cancel/retry with a request_id, tenant filters, a quota
error) and records each request.
"""

from __future__ import annotations

import json
import re
import sys
import types
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from jobwire.cli.main import main
from jobwire.client import (
    AsyncJobwireClient,
    InvalidArgumentError,
    JobwireClient,
    ResourceExhaustedError,
    UnavailableError,
    tls_credentials,
)
from jobwire.client.channels import select_credentials
from jobwire.v1 import job_pb2, job_service_pb2
from jobwire.worker import Worker, load_handlers
from support.security import make_pki, person

HANDLERS = load_handlers(["support.worker_handlers"])

# --- a throwaway PKI ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files of a CA, a server certificate signed by it, and a client certificate signed by it."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed nothing here: trusting only it must fail the handshake


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    built = make_pki(tmp_path_factory.mktemp("pki"), {"client": person("alice", None, None)}, {})
    client_cert, client_key = built.client("client")
    return Pki(
        ca=built.ca,
        server_cert=built.server_cert,
        server_key=built.server_key,
        client_cert=client_cert,
        client_key=client_key,
        other_ca=built.other_ca,
    )


# --- a fake JobService --------------------------------------------------------------------------------

SERVICE = "jobwire.v1.JobService"
AUDIT_ACTIONS = ["submitted", "attempt started", "attempt failed", "retried", "cancel requested"]


def _quota_status() -> status_pb2.Status:
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="tenant acme is over its quota")
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason="TENANT_QUOTA_EXCEEDED", domain="jobwire.dev")
    )
    quota = error_details_pb2.QuotaFailure()
    quota.violations.add(subject="tenant:acme", description="at most 2 jobs queued")
    status.details.add().Pack(quota)
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3)))
    return status


def _job(job_id: str, tenant: str = "acme") -> job_pb2.Job:
    return job_pb2.Job(
        id=job_id, type="demo.echo", state=job_pb2.JOB_STATE_QUEUED, tenant=tenant, created_by="alice"
    )


@dataclass
class FakeJobService:
    """Answers the JobService calls these tests make, and records every request and who sent it."""

    requests: list[message.Message] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)

    def _record(self, request: message.Message, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        identity = context.auth_context().get("x509_common_name") or [b""]
        self.peers.append(identity[0].decode())
        self.authorization.extend(v for k, v in context.invocation_metadata() if k == "authorization")

    def get_job(self, request: job_service_pb2.GetJobRequest, context: grpc.ServicerContext) -> Any:
        self._record(request, context)
        return job_service_pb2.GetJobResponse(job=_job(request.job_id))

    def list_jobs(self, request: job_service_pb2.ListJobsRequest, context: grpc.ServicerContext) -> Any:
        self._record(request, context)
        tenants = list(request.tenants) or ["acme", "globex"]
        return job_service_pb2.ListJobsResponse(jobs=[_job(f"j-{t}", t) for t in tenants])

    def cancel_job(self, request: job_service_pb2.CancelJobRequest, context: grpc.ServicerContext) -> Any:
        self._record(request, context)
        job = _job(request.job_id)
        job.state = job_pb2.JOB_STATE_CANCELLED
        return job_service_pb2.CancelJobResponse(job=job)

    def retry_job(self, request: job_service_pb2.RetryJobRequest, context: grpc.ServicerContext) -> Any:
        self._record(request, context)
        return job_service_pb2.RetryJobResponse(job=_job(request.job_id))

    def audit(
        self, request: job_service_pb2.ListJobAuditEntriesRequest, context: grpc.ServicerContext
    ) -> Any:
        """Five entries, in pages of page_size (the token is the next index)."""
        self._record(request, context)
        if request.job_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "job missing not found")
        start = int(request.page_token or 0)
        end = min(len(AUDIT_ACTIONS), start + (request.page_size or 100))
        response = job_service_pb2.ListJobAuditEntriesResponse(
            next_page_token=str(end) if end < len(AUDIT_ACTIONS) else ""
        )
        for index in range(start, end):
            entry = response.entries.add(
                action=AUDIT_ACTIONS[index],
                principal="alice (acme/submitter)",
                request_id=f"req-{index}",
                peer="ipv4:10.0.0.7:5555",
                detail=f"step {index}",
            )
            entry.time.FromSeconds(1_700_000_000 + index)
        return response

    def submit_job(self, request: job_service_pb2.SubmitJobRequest, context: grpc.ServicerContext) -> Any:
        self._record(request, context)
        context.abort_with_status(rpc_status.to_status(_quota_status()))

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(
            fn: Callable[..., Any], request: type[message.Message], response: type[message.Message]
        ) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=request.FromString, response_serializer=response.SerializeToString
            )

        S = job_service_pb2
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetJob": unary(self.get_job, S.GetJobRequest, S.GetJobResponse),
                "ListJobs": unary(self.list_jobs, S.ListJobsRequest, S.ListJobsResponse),
                "CancelJob": unary(self.cancel_job, S.CancelJobRequest, S.CancelJobResponse),
                "RetryJob": unary(self.retry_job, S.RetryJobRequest, S.RetryJobResponse),
                "SubmitJob": unary(self.submit_job, S.SubmitJobRequest, S.SubmitJobResponse),
                "ListJobAuditEntries": unary(
                    self.audit, S.ListJobAuditEntriesRequest, S.ListJobAuditEntriesResponse
                ),
            },
        )


@dataclass
class TlsServer:
    target: str
    service: FakeJobService


@contextmanager
def _serve(pki: Pki, *, mutual: bool) -> Iterator[TlsServer]:
    """The fake JobService over TLS on a free loopback port; ``mutual`` requires a client certificate
    signed by the test CA."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service = FakeJobService()
    server.add_generic_rpc_handlers((service.handler(),))
    credentials = grpc.ssl_server_credentials(
        [(Path(pki.server_key).read_bytes(), Path(pki.server_cert).read_bytes())],
        root_certificates=Path(pki.ca).read_bytes(),
        require_client_auth=mutual,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield TlsServer(f"127.0.0.1:{port}", service)
    finally:
        server.stop(None)


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[TlsServer]:
    with _serve(pki, mutual=False) as running:
        yield running


@pytest.fixture
def mtls_server(pki: Pki) -> Iterator[TlsServer]:
    with _serve(pki, mutual=True) as running:
        yield running


# --- tls_credentials and the credentials rule -----------------------------------------------------


def test_an_unreadable_file_is_one_line_naming_it(tmp_path: Path, pki: Pki) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(InvalidArgumentError) as raised:
        tls_credentials(ca_file=missing)
    text = str(raised.value)
    assert missing in text and "CA" in text and "\n" not in text
    assert isinstance(raised.value, InvalidArgumentError)
    assert raised.value.reason == "TLS_FILE_UNREADABLE"
    assert raised.value.metadata == {"argument": "tls_ca", "path": missing}

    with pytest.raises(InvalidArgumentError, match="key file"):
        tls_credentials(cert_file=pki.client_cert, key_file=missing)
    with pytest.raises(InvalidArgumentError, match=re.escape(f"cannot read the TLS CA file {tmp_path}")):
        tls_credentials(ca_file=str(tmp_path))  # a directory


def test_a_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(InvalidArgumentError, match=re.escape(f"{junk} is not PEM")) as raised:
        tls_credentials(ca_file=str(junk))
    assert raised.value.reason == "TLS_FILE_NOT_PEM"


def test_a_client_certificate_and_its_key_come_together(pki: Pki) -> None:
    with pytest.raises(InvalidArgumentError, match="tls_cert was given without tls_key"):
        tls_credentials(cert_file=pki.client_cert)
    with pytest.raises(InvalidArgumentError, match="tls_key was given without tls_cert"):
        tls_credentials(ca_file=pki.ca, key_file=pki.client_key)
    assert isinstance(tls_credentials(pki.ca, pki.client_cert, pki.client_key), grpc.ChannelCredentials)


def test_no_files_means_the_system_roots_and_empty_paths_count_as_none() -> None:
    assert isinstance(tls_credentials(), grpc.ChannelCredentials)
    assert isinstance(tls_credentials("", "", ""), grpc.ChannelCredentials)


def test_which_credentials_a_client_uses(pki: Pki) -> None:
    assert select_credentials() is None  # plaintext by default
    assert select_credentials(tls=False, tls_ca="", tls_cert=None) is None
    assert select_credentials(tls=True) is not None
    assert select_credentials(tls_ca=pki.ca) is not None  # a CA implies TLS
    explicit = grpc.ssl_channel_credentials()
    # Explicit credentials win, even over paths that do not exist.
    assert select_credentials(explicit, tls=True, tls_ca="/does/not/exist") is explicit


def test_clients_and_worker_read_the_files_when_built(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing-ca.pem")
    with pytest.raises(InvalidArgumentError, match=r"missing-ca\.pem"):
        JobwireClient("127.0.0.1:1", tls_ca=missing)
    with pytest.raises(InvalidArgumentError, match=r"missing-ca\.pem"):
        Worker("127.0.0.1:1", HANDLERS, tls_ca=missing)
    with pytest.raises(InvalidArgumentError, match="tls_key"):
        Worker("127.0.0.1:1", HANDLERS, tls_cert=missing)


async def test_the_async_client_reads_the_files_when_built(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"missing-ca\.pem"):
        AsyncJobwireClient("127.0.0.1:1", tls_ca=str(tmp_path / "missing-ca.pem"))


# --- real TLS connections -------------------------------------------------------------------------


def test_sync_client_connects_with_a_private_ca(tls_server: TlsServer, pki: Pki) -> None:
    with JobwireClient(tls_server.target, tls_ca=pki.ca, token="t0k", call_timeout=10) as client:
        job = client.get("j1")
    assert (job.id, job.tenant, job.created_by) == ("j1", "acme", "alice")
    assert tls_server.service.authorization == ["Bearer t0k"]


def test_explicit_channel_credentials_still_work(tls_server: TlsServer, pki: Pki) -> None:
    with JobwireClient(tls_server.target, channel_credentials=tls_credentials(pki.ca), call_timeout=10) as c:
        assert c.get("j2").id == "j2"


def test_a_server_signed_by_another_ca_is_refused(tls_server: TlsServer, pki: Pki) -> None:
    with (
        JobwireClient(tls_server.target, tls_ca=pki.other_ca, call_timeout=5) as client,
        pytest.raises(UnavailableError),
    ):
        client.get("j1")


def test_plaintext_cannot_talk_to_a_tls_server(tls_server: TlsServer) -> None:
    with JobwireClient(tls_server.target, call_timeout=5) as client, pytest.raises(UnavailableError):
        client.get("j1")


async def test_async_client_connects_with_a_private_ca(tls_server: TlsServer, pki: Pki) -> None:
    async with AsyncJobwireClient(tls_server.target, tls_ca=pki.ca, call_timeout=10) as client:
        job = await client.get("j3")
        entries = [entry async for entry in client.audit("j3", page_size=2)]
        cancelled = await client.cancel("j3", "no longer needed", request_id="c-1")
        retried = await client.retry("j3", request_id="r-1")
        listed = [job async for job in client.list_jobs(tenants="globex")]
    assert job.tenant == "acme"
    assert [e.action for e in entries] == AUDIT_ACTIONS
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED and retried.id == "j3"
    assert [j.tenant for j in listed] == ["globex"]
    sent = tls_server.service.requests
    assert [r.page_token for r in sent if isinstance(r, job_service_pb2.ListJobAuditEntriesRequest)] == [
        "",
        "2",
        "4",
    ]
    cancel = next(r for r in sent if isinstance(r, job_service_pb2.CancelJobRequest))
    assert (cancel.reason, cancel.request_id) == ("no longer needed", "c-1")
    retry = next(r for r in sent if isinstance(r, job_service_pb2.RetryJobRequest))
    assert retry.request_id == "r-1"


def test_mutual_tls_needs_the_client_certificate(mtls_server: TlsServer, pki: Pki) -> None:
    with (
        JobwireClient(mtls_server.target, tls_ca=pki.ca, call_timeout=5) as client,
        pytest.raises(UnavailableError),
    ):
        client.get("j1")  # no client certificate: the handshake fails
    with JobwireClient(
        mtls_server.target, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key, call_timeout=10
    ) as client:
        assert client.get("j1").id == "j1"
    assert mtls_server.service.peers == ["alice"]  # the server saw the certificate's common name


# --- the SDK methods over the wire ----------------------------------------------------------------


def test_sync_sdk_methods_send_what_they_were_given(tls_server: TlsServer, pki: Pki) -> None:
    with JobwireClient(tls_server.target, tls_ca=pki.ca, call_timeout=10) as client:
        entries = list(client.audit("j1", page_size=2))
        assert [e.action for e in entries] == AUDIT_ACTIONS  # oldest first, across three pages
        assert [e.request_id for e in entries] == [f"req-{i}" for i in range(5)]
        assert client.cancel("j1", "old positional reason").state == job_pb2.JOB_STATE_CANCELLED
        client.cancel("j1", request_id="c-2")
        client.retry("j1")
        client.retry("j1", request_id="r-2")
        assert [j.tenant for j in client.list_jobs(tenants=["acme", "globex"])] == ["acme", "globex"]
        with pytest.raises(ResourceExhaustedError) as raised:
            client.submit("demo.echo")
    sent = tls_server.service.requests
    cancels = [r for r in sent if isinstance(r, job_service_pb2.CancelJobRequest)]
    assert [(c.reason, c.request_id) for c in cancels] == [("old positional reason", ""), ("", "c-2")]
    retries = [r for r in sent if isinstance(r, job_service_pb2.RetryJobRequest)]
    assert [r.request_id for r in retries] == ["", "r-2"]
    lists = [r for r in sent if isinstance(r, job_service_pb2.ListJobsRequest)]
    assert list(lists[0].tenants) == ["acme", "globex"]
    err = raised.value
    assert err.quota_violations == [("tenant:acme", "at most 2 jobs queued")]
    assert (err.reason, err.retry_delay) == ("TENANT_QUOTA_EXCEEDED", 3.0)


def test_audit_of_a_job_not_found_raises_on_iteration(tls_server: TlsServer, pki: Pki) -> None:
    from jobwire.client import NotFoundError

    with JobwireClient(tls_server.target, tls_ca=pki.ca, call_timeout=10) as client:
        entries = client.audit("missing")
        with pytest.raises(NotFoundError):
            next(entries)


# --- the CLI over TLS -----------------------------------------------------------------------------


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables as wide as they want, whatever terminal runs the tests; no TLS settings from outside."""
    monkeypatch.setenv("COLUMNS", "220")
    for name in ("JOBWIRE_TLS", "JOBWIRE_TLS_CA", "JOBWIRE_TLS_CERT", "JOBWIRE_TLS_KEY", "JOBWIRE_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("wide")
def test_cli_audit_over_tls(tls_server: TlsServer, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", tls_server.target, "--tls-ca", pki.ca, "audit", "j1"]) == 0
    out = capsys.readouterr().out
    for heading in ("TIME", "ACTION", "PRINCIPAL", "REQUEST ID", "PEER", "DETAIL"):
        assert heading in out
    assert out.index("submitted") < out.index("cancel requested")
    assert "alice (acme/submitter)" in out and "req-4" in out and "ipv4:10.0.0.7:5555" in out

    # The TLS options after the subcommand, and JSON: a list of entries, oldest first.
    assert main(["audit", "j1", "--server", tls_server.target, "--tls-ca", pki.ca, "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["action"] for e in entries] == AUDIT_ACTIONS
    assert entries[0]["request_id"] == "req-0"


@pytest.mark.usefixtures("wide")
def test_cli_tls_from_the_environment(
    tls_server: TlsServer, pki: Pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBWIRE_TLS_CA", pki.ca)
    assert main(["--server", tls_server.target, "get", "j1"]) == 0
    out = capsys.readouterr().out
    assert "tenant" in out and "acme" in out and "created by" in out and "alice" in out


@pytest.mark.usefixtures("wide")
def test_cli_mutual_tls(mtls_server: TlsServer, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--server", mtls_server.target, "--tls-ca", pki.ca]
    assert main([*base, "get", "j1", "--json"]) == 2  # no client certificate
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE")
    assert main([*base, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key, "get", "j1"]) == 0
    assert main([*base, "get", "j1", "--tls-cert", pki.client_cert, "--tls-key", pki.client_key]) == 0


@pytest.mark.usefixtures("wide")
def test_cli_cancel_retry_and_list_send_the_new_fields(
    tls_server: TlsServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--server", tls_server.target, "--tls-ca", pki.ca]
    assert main([*base, "cancel", "j1", "--reason", "why", "--request-id", "c-9"]) == 0
    assert main([*base, "retry", "j1", "--request-id", "r-9", "--json"]) == 0
    assert main([*base, "list", "--tenant", "acme", "--tenant", "globex"]) == 0
    out = capsys.readouterr().out
    assert "TENANT" in out and "globex" in out  # jobs of two tenants: the column appears
    assert main([*base, "list", "--tenant", "acme"]) == 0
    assert "TENANT" not in capsys.readouterr().out  # one tenant: no column
    sent = tls_server.service.requests
    cancel = next(r for r in sent if isinstance(r, job_service_pb2.CancelJobRequest))
    assert (cancel.reason, cancel.request_id) == ("why", "c-9")
    retry = next(r for r in sent if isinstance(r, job_service_pb2.RetryJobRequest))
    assert retry.request_id == "r-9"
    lists = [list(r.tenants) for r in sent if isinstance(r, job_service_pb2.ListJobsRequest)]
    assert lists == [["acme", "globex"], ["acme"]]


@pytest.mark.usefixtures("wide")
def test_cli_prints_quota_violations_and_the_retry_delay(
    tls_server: TlsServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--server", tls_server.target, "--tls-ca", pki.ca, "submit", "demo.echo"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: RESOURCE_EXHAUSTED: tenant acme is over its quota",
        "  tenant:acme: at most 2 jobs queued",
        "  retry after 3.0 s",
    ]


@pytest.mark.usefixtures("wide")
def test_cli_names_an_unreadable_tls_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "ca.pem")
    assert main(["--tls-ca", missing, "get", "j1"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"error: INVALID_ARGUMENT: cannot read the TLS CA file {missing}: No such file or directory\n"
    )


@pytest.mark.usefixtures("wide")
def test_cli_worker_names_an_unreadable_tls_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command may add the working directory
    monkeypatch.setenv("JOBWIRE_LOG_FORMAT", "text")
    missing = str(tmp_path / "ca.pem")
    argv = ["worker", "--handlers", "support.worker_handlers", "--tls-ca", missing]
    assert main(argv) == 2
    assert f"cannot read the TLS CA file {missing}" in capsys.readouterr().err


def test_cli_worker_passes_the_tls_options(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """``jobwire worker`` hands the TLS options to Worker (run_forever stubbed: nothing connects)."""
    import jobwire.worker as worker_package

    built: list[dict[str, Any]] = []

    class RecordingWorker(Worker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(kwargs)

        def run_forever(self) -> int:
            return 0

    monkeypatch.setattr(worker_package, "Worker", RecordingWorker)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("JOBWIRE_TLS", raising=False)
    argv = ["--tls-ca", pki.ca, "worker", "--handlers", "support.worker_handlers", "--log-format", "text"]
    assert main([*argv, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key]) == 0
    assert len(built) == 1
    assert {k: built[0][k] for k in ("tls", "tls_ca", "tls_cert", "tls_key")} == {
        "tls": False,
        "tls_ca": pki.ca,
        "tls_cert": pki.client_cert,
        "tls_key": pki.client_key,
    }


# --- `jobwire token` hands over to the server package ---------------------------------------------


def test_token_without_the_server_package_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "jobwire.server.token_cli", None)  # as if it were not installed
    assert main(["token", "issue", "--sub", "alice"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: `jobwire token` needs the Jobwire server package (jobwire.server.token_cli)"
    )


def test_token_runs_the_server_packages_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    fake = types.ModuleType("jobwire.server.token_cli")

    def add_token_arguments(parser: Any) -> None:
        seen.append(parser.prog)
        parser.add_argument("action")
        parser.add_argument("--sub")

    def run_token(args: Any) -> int:
        seen.append((args.action, args.sub))
        return 7

    fake.add_token_arguments = add_token_arguments  # type: ignore[attr-defined]
    fake.run_token = run_token  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "jobwire.server.token_cli", fake)
    # Connection options before `token` are checked by the top-level parser, and not passed on.
    assert main(["--server", "h:1", "--tls-ca", "ca.pem", "token", "issue", "--sub", "alice"]) == 7
    assert seen == ["jobwire token", ("issue", "alice")]
    with pytest.raises(SystemExit) as exited:
        main(["--bogus", "token", "issue"])
    assert exited.value.code == 2
