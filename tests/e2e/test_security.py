"""Authentication, roles, tenants, quotas and the audit trail, end to end against real servers.

Servers run with authentication on (Ed25519 key files made in tmp_path, client certificates from a
throwaway CA) on loopback ports; the tests call them through the generated stubs, and through the SDK
and the ``jobwire`` CLI where said. Every error is checked down to its google.rpc details: the status
code, and the ErrorInfo reason (domain jobwire.dev) in the ``grpc-status-details-bin`` trailer.

1. credentials: every RPC without a token, with garbage, expired, unknown-key, forged, tampered,
   unsigned (alg none) and badly-claimed tokens; checked before decoding; health and reflection open;
2. roles: the permission table, written out, for every role and RPC;
3. tenants: 10,000 random cross-tenant lookups, listings, request_id scoping, page tokens;
4. workers: which types a tenant's worker may declare, whose jobs it receives, forged lease tokens;
   and a token-limited worker writing to a job of a type it may not run;
5. mutual TLS: certificates as identities, the CLI over TLS, tokens over TLS;
6. quotas: queued jobs, submit rate, running jobs; QuotaFailure and RetryInfo, through the SDK too;
   concurrent submits; a retried submit at the queued limit;
7. the audit trail: who did what, with which request_id, from where; the CLI; paging;
8. the operator: refusing to listen beyond loopback without authentication, key rotation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobwire.cli.main import main as cli_main
from jobwire.client import JobwireClient, ResourceExhaustedError
from jobwire.server.config import ServerConfig
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from jobwire.v1 import worker_service_pb2 as W
from support.raw_worker import RawWorker
from support.security import (
    Keys,
    Pki,
    bearer,
    error_info,
    expect_error,
    field_violations,
    in_an_hour,
    lease,
    make_pki,
    person,
    quota_failure,
    retry_delay,
    rich_status,
    unknown_key_token,
)
from support.servers import TESTS_DIR, ServerProcess, ServerThread

S = job_service_pb2
J = job_pb2
Code = grpc.StatusCode
ROOT = Path(__file__).resolve().parents[2]
JOBWIRE_CLI = str(ROOT / ".venv" / "bin" / "jobwire")
WAIT = 20.0

# Every RPC of both services, from the descriptors: a new RPC joins the role table by itself.
RPCS = tuple(
    method.name
    for service in (
        job_service_pb2.DESCRIPTOR.services_by_name["JobService"],
        W.DESCRIPTOR.services_by_name["WorkerService"],
    )
    for method in service.methods
)


# --- servers and calls ------------------------------------------------------------------------------


def auth_config(keys: Keys, **overrides: Any) -> ServerConfig:
    config = ServerConfig(host="127.0.0.1", port=0, store="memory:", auth_key_file=str(keys.path))
    return replace(config, **overrides)


@contextlib.contextmanager
def running(config: ServerConfig) -> Iterator[ServerThread]:
    server = ServerThread(config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Api:
    """JobService through the generated stub on one channel, each call with the given token."""

    def __init__(self, target: str, credentials: Any = None) -> None:
        self.target = target
        self.channel = (
            grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
        )
        self.stub = job_service_pb2_grpc.JobServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def submit(self, token: str | None, job_type: str = "demo.echo", **fields: Any) -> J.Job:
        params = fields.pop("params", None)
        request = S.SubmitJobRequest(type=job_type, **fields)
        if params is not None:
            request.params.update(params)
        job: J.Job = self.stub.SubmitJob(request, metadata=bearer(token), timeout=10).job
        return job

    def send(self, token: str | None, request: S.SubmitJobRequest) -> J.Job:
        job: J.Job = self.stub.SubmitJob(request, metadata=bearer(token), timeout=10).job
        return job

    def queued(self, token: str | None, job_type: str = "demo.echo", **fields: Any) -> J.Job:
        """A job that stays QUEUED (scheduled an hour ahead)."""
        return self.submit(token, job_type, schedule_time=in_an_hour(), **fields)

    def get(self, token: str | None, job_id: str) -> J.Job:
        job: J.Job = self.stub.GetJob(S.GetJobRequest(job_id=job_id), metadata=bearer(token), timeout=10).job
        return job

    def cancel(self, token: str | None, job_id: str, request_id: str = "") -> J.Job:
        request = S.CancelJobRequest(job_id=job_id, reason="test", request_id=request_id)
        job: J.Job = self.stub.CancelJob(request, metadata=bearer(token), timeout=10).job
        return job

    def retry(self, token: str | None, job_id: str, request_id: str = "") -> J.Job:
        request = S.RetryJobRequest(job_id=job_id, request_id=request_id)
        job: J.Job = self.stub.RetryJob(request, metadata=bearer(token), timeout=10).job
        return job

    def list_all(self, token: str | None, page_size: int = 7, **fields: Any) -> list[J.Job]:
        """Every page of ListJobs."""
        jobs: list[J.Job] = []
        request = S.ListJobsRequest(page_size=page_size, **fields)
        while True:
            page = self.stub.ListJobs(request, metadata=bearer(token), timeout=10)
            jobs.extend(page.jobs)
            if not page.next_page_token:
                return jobs
            request.page_token = page.next_page_token

    def audit(self, token: str | None, job_id: str, page_size: int = 0) -> list[J.AuditEntry]:
        entries: list[J.AuditEntry] = []
        request = S.ListJobAuditEntriesRequest(job_id=job_id, page_size=page_size)
        while True:
            page = self.stub.ListJobAuditEntries(request, metadata=bearer(token), timeout=10)
            entries.extend(page.entries)
            if not page.next_page_token:
                return entries
            request.page_token = page.next_page_token

    def wait_for(
        self, token: str | None, job_id: str, predicate: Callable[[J.Job], bool], timeout: float = WAIT
    ) -> J.Job:
        """Poll GetJob until ``predicate`` holds (the wait reason is computed on each read)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(token, job_id)
            if predicate(job):
                return job
            assert time.monotonic() < deadline, f"job never got there: {job}"
            time.sleep(0.02)


def version(job: J.Job) -> tuple[int, int, int, int]:
    """What changes whenever a job changes: its state, update time, attempt and lease epoch."""
    return (job.state, job.update_time.ToNanoseconds(), job.attempt, job.lease_epoch)


def invoke(api: Api, rpc: str, token: str | None, job_id: str, worker_type: str = "shared.any") -> Any:
    """Call ``rpc`` once with ``token``; its response (the first message of a stream), or RpcError."""
    stub, metadata = api.stub, bearer(token)
    if rpc == "SubmitJob":
        request = S.SubmitJobRequest(type="demo.echo", schedule_time=in_an_hour())
        return stub.SubmitJob(request, metadata=metadata, timeout=10)
    if rpc == "BatchSubmitJobs":
        batch = S.BatchSubmitJobsRequest(
            requests=[S.SubmitJobRequest(type="demo.echo", schedule_time=in_an_hour()) for _ in range(2)]
        )
        return stub.BatchSubmitJobs(batch, metadata=metadata, timeout=10)
    if rpc == "GetJob":
        return stub.GetJob(S.GetJobRequest(job_id=job_id), metadata=metadata, timeout=10)
    if rpc == "ListJobs":
        return stub.ListJobs(S.ListJobsRequest(), metadata=metadata, timeout=10)
    if rpc == "CancelJob":
        return stub.CancelJob(S.CancelJobRequest(job_id=job_id), metadata=metadata, timeout=10)
    if rpc == "WatchJob":
        call = stub.WatchJob(S.WatchJobRequest(job_id=job_id), metadata=metadata, timeout=10)
        try:
            return next(call)
        finally:
            call.cancel()
    if rpc == "GetQueueStats":
        return stub.GetQueueStats(S.GetQueueStatsRequest(), metadata=metadata, timeout=10)
    if rpc == "RetryJob":
        return stub.RetryJob(S.RetryJobRequest(job_id=job_id), metadata=metadata, timeout=10)
    if rpc == "UpdateJob":
        update = S.UpdateJobRequest(job=J.Job(id=job_id, priority=9))
        update.update_mask.paths.append("priority")
        return stub.UpdateJob(update, metadata=metadata, timeout=10)
    if rpc == "ListJobTypes":
        return stub.ListJobTypes(S.ListJobTypesRequest(), metadata=metadata, timeout=10)
    if rpc == "ListJobAuditEntries":
        audit = S.ListJobAuditEntriesRequest(job_id=job_id)
        return stub.ListJobAuditEntries(audit, metadata=metadata, timeout=10)
    assert rpc == "Connect", rpc
    with RawWorker(api.target, token) as worker:
        return worker.register(worker_type, credits=1, worker_id=f"w-{rpc}")


# --- 1. credentials ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys") / "keys.pem")


@pytest.fixture(scope="module")
def shared_server(keys: Keys) -> Iterator[ServerThread]:
    """One server with bearer tokens on, for the credential and role tables."""
    with running(auth_config(keys)) as server:
        yield server


@pytest.fixture(scope="module")
def api(shared_server: ServerThread) -> Iterator[Api]:
    client = Api(shared_server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def bad_tokens(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str | None, str]]:
    """Credentials the server must refuse, each with the ErrorInfo reason it must give."""
    return {
        "no token": (None, "CREDENTIALS_MISSING"),
        "garbage": ("garbage", "TOKEN_MALFORMED"),
        "expired": (keys.expired_token(), "TOKEN_EXPIRED"),
        "unknown key": (unknown_key_token(tmp_path_factory.mktemp("stranger")), "TOKEN_UNKNOWN_KEY"),
        "forged signature": (keys.forged_token(), "TOKEN_BAD_SIGNATURE"),
        "tampered claims": (keys.tampered_token(), "TOKEN_BAD_SIGNATURE"),
        "alg none": (keys.unsigned_token(), "TOKEN_MALFORMED"),
        "not a role": (keys.signed(role="root"), "TOKEN_INVALID"),
        "other audience": (keys.signed(aud="elsewhere"), "TOKEN_INVALID"),
        "no tenant": (keys.signed(tenant=None), "TOKEN_INVALID"),
    }


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(
    "credential",
    [
        "no token",
        "garbage",
        "expired",
        "unknown key",
        "forged signature",
        "tampered claims",
        "alg none",
        "not a role",
        "other audience",
        "no tenant",
    ],
)
def test_every_rpc_refuses_bad_credentials(
    api: Api, keys: Keys, bad_tokens: dict[str, tuple[str | None, str]], credential: str, rpc: str
) -> None:
    job = api.queued(keys.token("a", "submitter"))  # a real job: only the credential is wrong
    token, reason = bad_tokens[credential]
    err = expect_error(lambda: invoke(api, rpc, token, job.id), Code.UNAUTHENTICATED, reason)
    assert len(err.details().splitlines()) == 1
    if token:
        assert token not in err.details()  # a credential is never echoed back
    assert version(api.get(keys.token("a", "admin"), job.id)) == version(job)  # nothing happened to it


def test_a_token_is_checked_before_the_request_is_decoded(api: Api) -> None:
    """An unauthenticated caller learns nothing, not even that its request would not decode."""
    method = api.channel.unary_unary("/jobwire.v1.JobService/GetJob")
    with pytest.raises(grpc.RpcError) as raised:
        method(b"\xff\xff\xff not a protobuf", timeout=10)
    assert raised.value.code() == Code.UNAUTHENTICATED
    assert error_info(raised.value).reason == "CREDENTIALS_MISSING"
    with pytest.raises(grpc.RpcError) as raised:
        method(
            b"\xff\xff\xff not a protobuf", metadata=(("authorization", "Basic dXNlcjpwdw=="),), timeout=10
        )
    assert raised.value.code() == Code.UNAUTHENTICATED
    assert error_info(raised.value).reason == "TOKEN_MALFORMED"


def test_health_and_reflection_need_no_token(api: Api) -> None:
    health = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", "jobwire.v1.JobService", "jobwire.v1.WorkerService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"jobwire.v1.JobService", "jobwire.v1.WorkerService", "grpc.health.v1.Health"} <= names
    describe = reflection_pb2.ServerReflectionRequest(file_containing_symbol="jobwire.v1.JobService")
    described = list(reflection.ServerReflectionInfo(iter([describe]), timeout=10))
    assert described[0].file_descriptor_response.file_descriptor_proto


# --- 2. roles ---------------------------------------------------------------------------------------

OK, DENIED = "OK", "PERMISSION_DENIED"

# Written out by hand (not derived from access.PERMISSIONS): what each role may call.
EXPECTED: dict[str, dict[str, str]] = {
    "admin": {
        "SubmitJob": OK,
        "BatchSubmitJobs": OK,
        "GetJob": OK,
        "ListJobs": OK,
        "CancelJob": OK,
        "WatchJob": OK,
        "GetQueueStats": OK,
        "RetryJob": OK,
        "UpdateJob": OK,
        "ListJobAuditEntries": OK,
        "ListJobTypes": OK,
        "Connect": OK,
    },
    "submitter": {
        "SubmitJob": OK,
        "BatchSubmitJobs": OK,
        "GetJob": OK,
        "ListJobs": OK,
        "CancelJob": OK,
        "WatchJob": OK,
        "GetQueueStats": OK,
        "RetryJob": OK,
        "UpdateJob": OK,
        "ListJobAuditEntries": OK,
        "ListJobTypes": OK,
        "Connect": DENIED,
    },
    "viewer": {
        "SubmitJob": DENIED,
        "BatchSubmitJobs": DENIED,
        "GetJob": OK,
        "ListJobs": OK,
        "CancelJob": DENIED,
        "WatchJob": OK,
        "GetQueueStats": OK,
        "RetryJob": DENIED,
        "UpdateJob": DENIED,
        "ListJobAuditEntries": OK,
        "ListJobTypes": OK,
        "Connect": DENIED,
    },
    "worker": {
        "SubmitJob": DENIED,
        "BatchSubmitJobs": DENIED,
        "GetJob": DENIED,
        "ListJobs": DENIED,
        "CancelJob": DENIED,
        "WatchJob": DENIED,
        "GetQueueStats": DENIED,
        "RetryJob": DENIED,
        "UpdateJob": DENIED,
        "ListJobAuditEntries": DENIED,
        "ListJobTypes": DENIED,
        "Connect": OK,
    },
}
# The action a refusal names (ErrorInfo metadata "action").
ACTIONS = {
    "SubmitJob": "submit",
    "BatchSubmitJobs": "submit",
    "GetJob": "read",
    "ListJobs": "read",
    "CancelJob": "cancel",
    "WatchJob": "read",
    "GetQueueStats": "read",
    "RetryJob": "retry",
    "UpdateJob": "update",
    "ListJobAuditEntries": "read",
    "ListJobTypes": "read",
    "Connect": "work",
}


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize("role", ["admin", "submitter", "viewer", "worker"])
def test_each_role_may_make_exactly_the_calls_of_the_table(api: Api, keys: Keys, role: str, rpc: str) -> None:
    owner = keys.token("a", "submitter", "owner")
    token = keys.token("a", role, f"{role}-1", types=["a.*"] if role == "worker" else None)
    job = api.queued(owner)
    if rpc == "RetryJob":
        api.cancel(owner, job.id)  # a retry of a CANCELLED job puts it back in the queue
    before = api.get(owner, job.id)
    worker_type = "shared.roles" if role == "admin" else "a.roles"
    if EXPECTED[role][rpc] == OK:
        answer = invoke(api, rpc, token, job.id, worker_type)
        if rpc == "CancelJob":
            assert answer.job.state == J.JOB_STATE_CANCELLED
        elif rpc == "RetryJob":
            assert (before.state, answer.job.state) == (J.JOB_STATE_CANCELLED, J.JOB_STATE_QUEUED)
        elif rpc == "UpdateJob":
            assert (answer.job.state, answer.job.priority) == (J.JOB_STATE_QUEUED, 9)
        elif rpc == "SubmitJob":
            assert (answer.job.tenant, answer.job.created_by) == ("a", f"{role}-1")
        elif rpc == "BatchSubmitJobs":
            assert [(j.tenant, j.created_by) for j in answer.jobs] == [("a", f"{role}-1")] * 2
        elif rpc in ("GetJob", "WatchJob"):
            assert answer.job.id == job.id
        elif rpc == "Connect":
            assert answer.session_id
        return
    err = expect_error(lambda: invoke(api, rpc, token, job.id, worker_type), Code.PERMISSION_DENIED, DENIED)
    info = error_info(err)
    assert (info.metadata["role"], info.metadata["action"]) == (role, ACTIONS[rpc])
    after = api.get(owner, job.id)
    assert version(after) == version(before)  # the refusal changed nothing


def test_listing_another_tenant_is_for_admins_only(api: Api, keys: Keys) -> None:
    api.queued(keys.token("a", "submitter"))
    api.queued(keys.token("b", "submitter"))
    for role in ("submitter", "viewer"):
        token = keys.token("a", role)
        expect_error(functools.partial(api.list_all, token, tenants=["b"]), Code.PERMISSION_DENIED, DENIED)
        assert {j.tenant for j in api.list_all(token, tenants=["a"])} == {"a"}
    admin = keys.token("ops", "admin")
    assert {j.tenant for j in api.list_all(admin, page_size=100, tenants=["b"])} == {"b"}
    assert {"a", "b"} <= {j.tenant for j in api.list_all(admin, page_size=100)}
    stats = api.stub.GetQueueStats(S.GetQueueStatsRequest(), metadata=bearer(keys.token("b", "viewer")))
    assert stats.tenant == "b" and [t.tenant for t in stats.tenant_stats] == ["b"]


def test_a_token_limited_to_types_submits_only_those(api: Api, keys: Keys) -> None:
    token = keys.token("a", "submitter", "narrow", types=["demo.echo", "test.*"])
    assert api.queued(token, "demo.echo").created_by == "narrow"
    assert api.queued(token, "test.echo").created_by == "narrow"
    err = expect_error(lambda: api.queued(token, "demo.sleep"), Code.PERMISSION_DENIED, DENIED)
    assert error_info(err).metadata["type"] == "demo.sleep"


# --- 3. tenants -------------------------------------------------------------------------------------

LOOKUPS = 10_000
CONCURRENCY = 64
CROSS_RPCS = ("GetJob", "CancelJob", "RetryJob", "WatchJob", "ListJobAuditEntries")


def _tenant_jobs(api: Api, token: str, tenant: str) -> list[J.Job]:
    """Jobs in every state a lookup might meet: finished, queued, cancelled."""
    done = [api.submit(token, params={"n": i}, labels={"kind": "done"}) for i in range(6)]
    queued = [api.queued(token, labels={"kind": "queued"}) for _ in range(6)]
    cancelled = [api.cancel(token, api.queued(token, labels={"kind": "cancelled"}).id) for _ in range(4)]
    for job in done:
        api.wait_for(token, job.id, lambda j: j.state == J.JOB_STATE_SUCCEEDED)
    jobs = [api.get(token, j.id) for j in done + queued + cancelled]
    assert {j.tenant for j in jobs} == {tenant}
    return jobs


async def _cross_tenant_storm(target: str, plan: list[tuple[str, str, str, str]]) -> tuple[int, list[str]]:
    """Make every (rpc, token, job_id, owner) call of ``plan``; (calls made, problems found)."""
    problems: list[str] = []
    made = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        pending = iter(plan)

        async def one(rpc: str, token: str, job_id: str) -> None:
            metadata = bearer(token)
            if rpc == "GetJob":
                await stub.GetJob(S.GetJobRequest(job_id=job_id), metadata=metadata, timeout=30)
            elif rpc == "CancelJob":
                await stub.CancelJob(S.CancelJobRequest(job_id=job_id), metadata=metadata, timeout=30)
            elif rpc == "RetryJob":
                await stub.RetryJob(S.RetryJobRequest(job_id=job_id), metadata=metadata, timeout=30)
            elif rpc == "ListJobAuditEntries":
                request = S.ListJobAuditEntriesRequest(job_id=job_id)
                await stub.ListJobAuditEntries(request, metadata=metadata, timeout=30)
            else:
                call = stub.WatchJob(S.WatchJobRequest(job_id=job_id), metadata=metadata, timeout=30)
                try:
                    await call.read()
                finally:
                    call.cancel()

        async def caller() -> None:
            nonlocal made
            for rpc, token, job_id, owner in pending:
                made += 1
                try:
                    await one(rpc, token, job_id)
                except grpc.aio.AioRpcError as err:
                    if err.code() != Code.NOT_FOUND:
                        problems.append(f"{rpc} {job_id}: {err.code()} {err.details()}")
                        continue
                    status = rich_status(err)
                    if error_info(err).reason != "JOB_NOT_FOUND":
                        problems.append(f"{rpc} {job_id}: reason {error_info(err).reason}")
                    if owner in (err.details() or "") or owner.encode() in status.SerializeToString():
                        problems.append(f"{rpc} {job_id}: the error names tenant {owner}: {err.details()}")
                else:
                    problems.append(f"{rpc} {job_id}: answered another tenant's caller")

        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    return made, problems


def test_tenants_never_see_each_others_jobs(keys: Keys) -> None:
    # A server process of its own, so that the server and this client each have a core.
    server = ServerProcess("memory:", "--auth-key-file", str(keys.path))
    server.start()
    api = Api(server.target)
    try:
        _check_tenant_isolation(api, keys)
    finally:
        api.close()
        server.kill()


def _check_tenant_isolation(api: Api, keys: Keys) -> None:
    tokens = {
        "alpha": keys.token("alpha", "submitter", "alice"),
        "bravo": keys.token("bravo", "submitter", "bob"),
    }
    jobs = {tenant: _tenant_jobs(api, token, tenant) for tenant, token in tokens.items()}

    rng = random.Random(20261215)
    plan = []
    for _ in range(LOOKUPS):
        owner = rng.choice(("alpha", "bravo"))
        intruder = "bravo" if owner == "alpha" else "alpha"
        plan.append((rng.choice(CROSS_RPCS), tokens[intruder], rng.choice(jobs[owner]).id, owner))
    started = time.perf_counter()
    made, problems = asyncio.run(_cross_tenant_storm(api.target, plan))
    elapsed = time.perf_counter() - started
    print(f"cross-tenant lookups: {made} in {elapsed:.2f}s ({made / elapsed:.0f}/s), all NOT_FOUND")
    assert made == LOOKUPS
    assert problems == [], f"{len(problems)} problems, e.g. {problems[:5]}"

    # Nothing the intruders tried changed anything, and their names are nowhere in the trails.
    for tenant, token in tokens.items():
        intruder = "bob" if tenant == "alpha" else "alice"
        for job in jobs[tenant]:
            assert version(api.get(token, job.id)) == version(job)
            assert not any(intruder in e.principal for e in api.audit(token, job.id))

    # Listings: every page of each tenant's own jobs, and nothing else.
    for tenant, token in tokens.items():
        listed = api.list_all(token, page_size=5)
        assert sorted(j.id for j in listed) == sorted(j.id for j in jobs[tenant])
        assert {j.tenant for j in listed} == {tenant}
        for kind in ("done", "queued", "cancelled"):
            assert {j.tenant for j in api.list_all(token, page_size=2, labels={"kind": kind})} == {tenant}


@pytest.mark.parametrize("store", ["memory:", "sqlite"])
def test_request_ids_and_page_tokens_are_scoped_to_the_tenant(keys: Keys, tmp_path: Path, store: str) -> None:
    url = store if store == "memory:" else f"sqlite:///{tmp_path / 'jobs.db'}"
    with running(auth_config(keys, store=url)) as server:
        api = Api(server.target)
        alpha, bravo = keys.token("alpha", "submitter"), keys.token("bravo", "submitter")
        first = api.queued(alpha, request_id="order-42", labels={"n": "1"})
        again = api.queued(bravo, request_id="order-42", labels={"n": "1"})
        assert again.id != first.id, "dedup crossed tenants: bravo got alpha's job"
        assert (again.tenant, first.tenant) == ("bravo", "alpha")
        assert api.queued(bravo, request_id="order-42", labels={"n": "1"}).id == again.id
        assert api.queued(alpha, request_id="order-42", labels={"n": "1"}).id == first.id
        # A different request under bravo's key is bravo's conflict, and names no alpha job.
        err = expect_error(
            lambda: api.queued(bravo, request_id="order-42", labels={"n": "2"}),
            Code.INVALID_ARGUMENT,
            "REQUEST_ID_REUSED",
        )
        assert first.id not in err.details()

        for _ in range(4):
            api.queued(alpha)
        page = api.stub.ListJobs(S.ListJobsRequest(page_size=2), metadata=bearer(alpha), timeout=10)
        assert page.next_page_token
        expect_error(
            lambda: api.stub.ListJobs(
                S.ListJobsRequest(page_size=2, page_token=page.next_page_token),
                metadata=bearer(bravo),
                timeout=10,
            ),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert [j.id for j in api.list_all(bravo)] == [again.id]
        api.close()


# --- 4. workers -------------------------------------------------------------------------------------


def _complete(worker: RawWorker, assignment: W.JobAssignment, result: dict[str, Any]) -> None:
    request = W.ConnectRequest(complete_job=W.CompleteJob(lease=assignment.lease))
    request.complete_job.result.update(result)
    worker.send(request)


def test_a_tenants_worker_declares_only_its_types_and_runs_only_its_jobs(keys: Keys) -> None:
    with running(auth_config(keys)) as server:
        target, api = server.target, Api(server.target)
        alice, bob = keys.token("a", "submitter", "alice"), keys.token("b", "submitter", "bob")
        worker_a = keys.token("a", "worker", "wa", types=["a.*"])
        worker_b = keys.token("b", "worker", "wb")
        admin = keys.token("ops", "admin", "root")
        with RawWorker(target, worker_a) as wa, RawWorker(target, admin) as shared:
            assert wa.register("a.work", credits=100, worker_id="wa").session_id
            assert shared.register("shared.work", credits=100, worker_id="shared").session_id

            refused = [
                (worker_b, "a.work"),  # another tenant's type
                (worker_b, "demo.echo"),  # the server's own handler
                (worker_a, "other"),  # outside the token's types (a.*)
                (worker_a, "demo.echo"),
                (worker_a, "shared.work"),  # shared by an admin's worker: not a tenant's to run
                (alice, "a.work"),  # a submitter is no worker
                (keys.token("a", "viewer"), "a.work"),
            ]
            for token, job_type in refused:
                with RawWorker(target, token) as intruder:
                    expect_error(
                        functools.partial(intruder.register, job_type, worker_id="intruder"),
                        Code.PERMISSION_DENIED,
                        "PERMISSION_DENIED",
                    )
            with RawWorker(target, worker_b) as wb:
                assert wb.register("b.work", worker_id="wb").session_id  # its own new type is fine

            # Tenant b cannot even see tenant a's type: unknown, and not listed among the known ones.
            err = expect_error(lambda: api.queued(bob, "a.work"), Code.INVALID_ARGUMENT, "UNKNOWN_JOB_TYPE")
            texts = [err.details(), *(description for _, description in field_violations(err))]
            assert len(texts) > 1
            for text in texts:
                assert "known types:" in text and "a.work" not in text.partition("known types:")[2], text
            assert "a.work" not in {
                t.type
                for t in api.stub.GetQueueStats(
                    S.GetQueueStatsRequest(), metadata=bearer(bob), timeout=10
                ).type_stats
            }

            own = [api.submit(alice, "a.work", params={"i": i}) for i in range(15)]
            mixed = [api.submit(alice, "shared.work", params={"i": i}) for i in range(10)]
            mixed += [api.submit(bob, "shared.work", params={"i": i}) for i in range(10)]
            for _ in own:
                assignment = wa.next("assignment").assignment
                _complete(wa, assignment, {"by": "wa"})
            victim: W.JobAssignment | None = None
            for _ in mixed:
                assignment = shared.next("assignment").assignment
                if victim is None and assignment.job.tenant == "b":
                    victim = assignment  # held RUNNING by the admin's worker for the forgery below
                else:
                    _complete(shared, assignment, {"by": "shared"})
            for job in own:
                done = api.wait_for(alice, job.id, lambda j: j.state == J.JOB_STATE_SUCCEEDED)
                assert done.worker_id == "wa"
            assert victim is not None

            got = [m.assignment.job for m in wa.messages("assignment")]
            assert sorted(j.id for j in got) == sorted(j.id for j in own)
            assert {(j.tenant, j.type) for j in got} == {("a", "a.work")}
            tenants_shared = {m.assignment.job.tenant for m in shared.messages("assignment")}
            assert tenants_shared == {"a", "b"}  # b's jobs were dispatched, just never to a's worker

            # a's worker forges writes for b's job, whose lease token it knows: all refused.
            stolen = lease(victim.job.id, victim.lease.attempt, victim.lease.epoch)
            before = api.get(admin, victim.job.id)
            stolen_job = victim.job.id

            def about_victim(response: W.ConnectResponse) -> bool:
                kind = response.WhichOneof("message")
                return bool(getattr(response, str(kind)).lease.job_id == stolen_job)

            wa.send(W.ConnectRequest(heartbeat=W.Heartbeat(leases=[stolen])))
            wa.next("lease_revoked", where=about_victim)
            progress = W.ReportProgress(lease=stolen, progress=J.Progress(percent=99, message="forged"))
            wa.send(W.ConnectRequest(report_progress=progress))
            wa.next("lease_revoked", where=about_victim)
            failure = W.FailJob(lease=stolen, non_retryable=True)
            failure.error.code, failure.error.message = 13, "forged failure"
            writes = [
                W.ConnectRequest(fail_job=failure),
                W.ConnectRequest(complete_job=W.CompleteJob(lease=stolen)),
                W.ConnectRequest(release_job=W.ReleaseJob(lease=stolen, reason="forged")),
            ]
            for forged in writes:
                wa.send(forged)
                result = wa.next("write_result", where=about_victim).write_result
                assert not result.accepted, result
            after = api.get(admin, victim.job.id)
            assert version(after) == version(before)
            assert (after.state, after.worker_id) == (J.JOB_STATE_RUNNING, "shared")
            assert after.progress.message != "forged"

            _complete(shared, victim, {"by": "shared"})
            done = api.wait_for(bob, victim.job.id, lambda j: j.state == J.JOB_STATE_SUCCEEDED)
            assert done.result["by"] == "shared" and len(done.attempts) == 1
            for job in mixed:
                assert (
                    api.wait_for(admin, job.id, lambda j: j.state == J.JOB_STATE_SUCCEEDED).worker_id
                    == "shared"
                )
        api.close()


def test_a_worker_cannot_take_over_a_job_of_a_type_it_may_not_run(keys: Keys) -> None:
    # Regression: WorkerSession.may_run checked only the tenant, so a worker could end (or re-attach) a
    # job of its tenant of a type it may not run, given its lease token (ids are known to the tenant;
    # attempt and epoch are small counters). Now a worker holds only jobs of the types it declared.
    with running(auth_config(keys)) as server:
        target, api = server.target, Api(server.target)
        alice = keys.token("a", "submitter", "alice")
        with (
            RawWorker(target, keys.token("a", "worker", "wa", types=["a.*"])) as wa,
            RawWorker(target, keys.token("ops", "admin", "root")) as shared,
        ):
            wa.register("a.work", credits=10, worker_id="wa")
            shared.register("shared.work", credits=10, worker_id="shared")
            job = api.submit(alice, "shared.work")
            held = shared.next("assignment").assignment
            assert (held.job.id, held.job.tenant) == (job.id, "a")
            before = api.get(alice, job.id)

            failure = W.FailJob(lease=held.lease, non_retryable=True)
            failure.error.code, failure.error.message = 13, "failed by a worker that may not run it"
            wa.send(W.ConnectRequest(fail_job=failure))
            result = wa.next("write_result").write_result
            after = api.get(alice, job.id)
            try:
                assert not result.accepted, "a worker limited to a.* ended a shared.work job it never held"
                assert version(after) == version(before)
            finally:
                if after.state == J.JOB_STATE_RUNNING:
                    _complete(shared, held, {"by": "shared"})
        api.close()


# --- 5. mutual TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(
        tmp_path_factory.mktemp("pki"),
        clients={
            "alice": person("alice", "a", "submitter"),
            "carol": person("carol", "a", "viewer"),
            "root": person("root", "a", "root"),  # not a role
            "tenantless": person("dave", None, "submitter"),
        },
        stranger_clients={"mallory": person("mallory", "a", "admin")},
    )


def tls_config(pki: Pki, **overrides: Any) -> ServerConfig:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory:",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
    )
    return replace(config, **overrides)


def cli_env() -> dict[str, str]:
    """The environment for a ``jobwire`` child: none of the caller's JOBWIRE_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("JOBWIRE_")}


def test_client_certificates_identify_callers(pki: Pki) -> None:
    with running(tls_config(pki)) as server:
        target = server.target
        alice = Api(target, pki.credentials("alice"))
        job = alice.submit(None, "demo.echo", params={"hello": "tls"})
        assert (job.tenant, job.created_by) == ("a", "alice")
        assert alice.audit(None, job.id)[0].principal == "alice (a/submitter)"

        for name in ("root", "tenantless"):
            other = Api(target, pki.credentials(name))
            expect_error(
                functools.partial(other.get, None, job.id), Code.UNAUTHENTICATED, "CERTIFICATE_INVALID"
            )
            other.close()
        carol = Api(target, pki.credentials("carol"))
        assert carol.get(None, job.id).id == job.id
        expect_error(lambda: carol.submit(None), Code.PERMISSION_DENIED, "PERMISSION_DENIED")
        carol.close()

        # No certificate, or one from a CA the server does not trust: no connection at all.
        for credentials in (pki.credentials(None), _stranger_credentials(pki)):
            stranger = Api(target, credentials)
            with pytest.raises(grpc.RpcError) as raised:
                stranger.get(None, job.id)
            assert raised.value.code() == Code.UNAVAILABLE
            stranger.close()
        plain = Api(target)
        with pytest.raises(grpc.RpcError) as raised:
            plain.get(None, job.id)
        assert raised.value.code() == Code.UNAVAILABLE
        plain.close()

        # The SDK and the CLI, with the same files.
        cert, key = pki.client("alice")
        with JobwireClient(target, tls_ca=pki.ca, tls_cert=cert, tls_key=key, call_timeout=10) as sdk:
            assert sdk.get(job.id).created_by == "alice"
        tls_args = ["--server", target, "--tls-ca", pki.ca, "--tls-cert", cert, "--tls-key", key]
        done = subprocess.run(
            [JOBWIRE_CLI, *tls_args, "submit", "demo.echo", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(),
        )
        assert done.returncode == 0, done.stderr
        submitted = json.loads(done.stdout)
        assert (submitted["tenant"], submitted["created_by"]) == ("a", "alice")
        root_cert, root_key = pki.client("root")
        refused = subprocess.run(
            [
                JOBWIRE_CLI,
                "--server",
                target,
                "--tls-ca",
                pki.ca,
                "--tls-cert",
                root_cert,
                "--tls-key",
                root_key,
                "get",
                submitted["id"],
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(),
        )
        assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
        alice.close()


def _stranger_credentials(pki: Pki) -> Any:
    cert, key = pki.client("mallory")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(pki.ca).read_bytes(),
        private_key=Path(key).read_bytes(),
        certificate_chain=Path(cert).read_bytes(),
    )


def test_tokens_work_over_mutual_tls(pki: Pki, keys: Keys) -> None:
    with running(tls_config(pki, auth_key_file=str(keys.path))) as server:
        target = server.target
        root_cert, root_key = pki.client("root")  # a certificate the server cannot take as an identity
        bob = keys.token("b", "submitter", "bob")
        with JobwireClient(
            target, token=bob, tls_ca=pki.ca, tls_cert=root_cert, tls_key=root_key, call_timeout=10
        ) as sdk:
            job = sdk.submit("demo.echo", {"via": "token"})
            assert (job.tenant, job.created_by) == ("b", "bob")  # the token decides
            assert list(sdk.list_jobs()) != []

        alice = Api(target, pki.credentials("alice"))
        assert alice.submit(None).created_by == "alice"  # no token: the certificate decides
        # A token, when sent, decides: a bad one is refused over a good certificate, a viewer's is a viewer.
        expect_error(lambda: alice.submit("garbage"), Code.UNAUTHENTICATED, "TOKEN_MALFORMED")
        expect_error(
            lambda: alice.submit(keys.token("a", "viewer")), Code.PERMISSION_DENIED, "PERMISSION_DENIED"
        )
        assert alice.get(bob, job.id).created_by == "bob"  # bob's token, over alice's certificate
        expect_error(lambda: alice.get(None, job.id), Code.NOT_FOUND, "JOB_NOT_FOUND")  # alice is tenant a
        alice.close()

        worker = keys.token("a", "worker", "wa", types=["a.*"])
        with RawWorker(target, worker, pki.credentials("root")) as over_tls:
            assert over_tls.register("a.tls", worker_id="tls-worker").session_id


# --- 6. quotas --------------------------------------------------------------------------------------


def _later_request(request_id: str = "", job_type: str = "demo.echo") -> S.SubmitJobRequest:
    """A submit that stays QUEUED, built once so that it can be sent again byte for byte."""
    return S.SubmitJobRequest(type=job_type, request_id=request_id, schedule_time=in_an_hour())


def _check_quota_error(err: Any, tenant: str) -> float:
    """RESOURCE_EXHAUSTED with QuotaFailure naming the tenant and a RetryInfo; the delay."""
    failure = quota_failure(err)
    assert failure is not None, "no QuotaFailure"
    assert [v.subject for v in failure.violations] == [f"tenant:{tenant}"]
    delay = retry_delay(err)
    assert delay is not None and delay > 0, "no RetryInfo"
    return delay


def test_a_tenants_queued_jobs_are_limited(keys: Keys) -> None:
    with running(auth_config(keys, tenant_max_queued=3)) as server:
        api = Api(server.target)
        a, b = keys.token("a", "submitter"), keys.token("b", "submitter")
        requests = [_later_request(f"q{i}") for i in range(4)]
        accepted = [api.send(a, request) for request in requests[:3]]
        err = expect_error(lambda: api.send(a, requests[3]), Code.RESOURCE_EXHAUSTED, "TENANT_QUOTA_EXCEEDED")
        _check_quota_error(err, "a")
        assert api.send(b, requests[3]).tenant == "b"  # another tenant's room is its own

        with JobwireClient(server.target, token=a, call_timeout=10) as sdk:
            with pytest.raises(ResourceExhaustedError) as raised:
                sdk.submit("demo.echo", request_id="sdk-1", schedule_time=_an_hour_from_now())
            assert raised.value.reason == "TENANT_QUOTA_EXCEEDED"
            assert [subject for subject, _ in raised.value.quota_violations] == ["tenant:a"]
            assert raised.value.retry_delay is not None and raised.value.retry_delay > 0

        api.cancel(a, accepted[0].id)
        assert api.send(a, requests[3]).tenant == "a"  # room again once a job left the queue
        api.close()


@pytest.mark.parametrize("limit", ["tenant_max_queued", "max_queued"])
def test_a_retried_submit_at_the_queued_limit_returns_the_accepted_job(keys: Keys, limit: str) -> None:
    # Regression: the queue limits were checked before request_id deduplication, so a client retrying
    # a SubmitJob that was already accepted (its answer lost) got RESOURCE_EXHAUSTED instead of its job.
    with running(auth_config(keys, **{limit: 3})) as server:
        api = Api(server.target)
        a = keys.token("a", "submitter")
        requests = [_later_request(f"q{i}") for i in range(3)]
        accepted = [api.send(a, request) for request in requests]
        try:
            assert api.send(a, requests[2]).id == accepted[2].id
        finally:
            api.close()


async def _submit_all(target: str, token: str, requests: list[S.SubmitJobRequest]) -> list[Any]:
    """Send every request at once; each answer's job, or its AioRpcError."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        calls = [stub.SubmitJob(r, metadata=bearer(token), timeout=30) for r in requests]
        answers = await asyncio.gather(*calls, return_exceptions=True)
    return [a.job if isinstance(a, S.SubmitJobResponse) else a for a in answers]


@pytest.mark.parametrize("store", ["memory:", "sqlite"])
@pytest.mark.parametrize("limit", ["tenant_max_queued", "tenant_submit_rate"])
def test_quotas_hold_under_concurrent_submits(keys: Keys, tmp_path: Path, store: str, limit: str) -> None:
    url = store if store == "memory:" else f"sqlite:///{tmp_path / 'jobs.db'}"
    with running(auth_config(keys, store=url, **{limit: 5})) as server:
        a = keys.token("a", "submitter")
        requests = [_later_request(f"c{i}") for i in range(40)]
        answers = asyncio.run(_submit_all(server.target, a, requests))
        accepted = [x for x in answers if isinstance(x, J.Job)]
        refused = [x for x in answers if not isinstance(x, J.Job)]
        assert all(e.code() == Code.RESOURCE_EXHAUSTED for e in refused), refused[:3]
        assert 1 <= len(accepted) <= 5, (
            f"{len(accepted)} of 40 concurrent submits accepted under a quota of 5"
        )
        api = Api(server.target)
        assert len(api.list_all(a, page_size=100)) == len(accepted)
        api.close()


def _an_hour_from_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)


@pytest.mark.parametrize("store", ["memory:", "sqlite"])
def test_a_tenants_submit_rate_is_limited(keys: Keys, tmp_path: Path, store: str) -> None:
    url = store if store == "memory:" else f"sqlite:///{tmp_path / 'jobs.db'}"
    with running(auth_config(keys, tenant_submit_rate=5, store=url)) as server:
        api = Api(server.target)
        a, b = keys.token("a", "submitter"), keys.token("b", "submitter")
        requests = [_later_request(f"r{i}") for i in range(6)]
        accepted = [api.send(a, request) for request in requests[:5]]
        err = expect_error(lambda: api.send(a, requests[5]), Code.RESOURCE_EXHAUSTED, "TENANT_QUOTA_EXCEEDED")
        delay = _check_quota_error(err, "a")
        assert 6.0 <= delay <= 12.01, f"5 a minute: one more in about 12 s, not {delay}"

        # The bucket is empty, but retries of accepted requests are answered with their jobs.
        for request, job in zip(requests[:5], accepted, strict=True):
            assert api.send(a, request).id == job.id
        # Each tenant has a bucket of its own.
        assert [api.send(b, request).tenant for request in requests[:5]] == ["b"] * 5

        with JobwireClient(server.target, token=a, call_timeout=10) as sdk:
            with pytest.raises(ResourceExhaustedError) as raised:
                sdk.submit("demo.echo", request_id="sdk-2", schedule_time=_an_hour_from_now())
            assert raised.value.quota_violations[0][0] == "tenant:a"
            assert raised.value.retry_delay is not None and 6.0 <= raised.value.retry_delay <= 12.01
        api.close()


def test_a_tenants_running_jobs_are_limited(keys: Keys) -> None:
    with running(auth_config(keys, tenant_max_running=1)) as server:
        api = Api(server.target)
        a, b = keys.token("a", "submitter"), keys.token("b", "submitter")
        first, second = (api.submit(a, "test.wait_cancel") for _ in range(2))
        other = api.submit(b, "test.wait_cancel")
        api.wait_for(b, other.id, lambda j: j.state == J.JOB_STATE_RUNNING)  # b is not held back by a

        def one_runs_one_waits(_: J.Job) -> bool:
            states = {api.get(a, first.id).state, api.get(a, second.id).state}
            return states == {J.JOB_STATE_RUNNING, J.JOB_STATE_QUEUED}

        api.wait_for(a, first.id, one_runs_one_waits)
        waiting = next(
            j for j in (api.get(a, first.id), api.get(a, second.id)) if j.state == J.JOB_STATE_QUEUED
        )
        waiting = api.wait_for(a, waiting.id, lambda j: j.wait_reason == J.WAIT_REASON_TENANT_LIMIT)
        assert "a" in waiting.wait_message
        assert api.get(b, other.id).state == J.JOB_STATE_RUNNING

        stats = api.stub.GetQueueStats(S.GetQueueStatsRequest(), metadata=bearer(a), timeout=10)
        assert [(t.tenant, t.running, t.queued, t.max_running) for t in stats.tenant_stats] == [
            ("a", 1, 1, 1)
        ]
        for token, job in ((a, first), (a, second), (b, other)):
            api.cancel(token, job.id)
        api.close()


# --- 7. the audit trail -----------------------------------------------------------------------------


def test_the_audit_trail_says_who_did_what_from_where(keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    with running(auth_config(keys)) as server:
        target, api = server.target, Api(server.target)
        alice = keys.token("a", "submitter", "alice")
        root = keys.token("ops", "admin", "root")
        worker = keys.token("a", "worker", "wa", types=["a.*"])
        with RawWorker(target, worker) as declaring:
            declaring.register("a.audit", worker_id="wa-declare")  # the type stays known after it leaves

        job = api.submit(alice, "a.audit", request_id="r1", params={"x": 1})
        assert api.cancel(root, job.id, request_id="r2").state == J.JOB_STATE_CANCELLED
        assert api.retry(alice, job.id, request_id="r3").state == J.JOB_STATE_QUEUED
        with RawWorker(target, worker) as running_worker:
            running_worker.register("a.audit", worker_id="wa-1")
            assignment = running_worker.next("assignment").assignment
            assert assignment.job.id == job.id
            _complete(running_worker, assignment, {"ok": True})
            assert running_worker.next("write_result").write_result.accepted
        api.wait_for(alice, job.id, lambda j: j.state == J.JOB_STATE_SUCCEEDED)

        entries = api.audit(keys.token("a", "viewer"), job.id)
        assert [(e.action, e.principal, e.request_id) for e in entries] == [
            ("submitted", "alice (a/submitter)", "r1"),
            ("cancelled", "root (ops/admin)", "r2"),
            ("retried", "alice (a/submitter)", "r3"),
            ("attempt started", "wa (a/worker)", ""),
            ("attempt succeeded", "wa (a/worker)", ""),
        ]
        assert all(e.peer.startswith("ipv4:127.0.0.1:") for e in entries), [e.peer for e in entries]
        assert "wa-1" in entries[3].detail
        times = [e.time.ToNanoseconds() for e in entries]
        assert times == sorted(times)

        assert api.audit(root, job.id) == entries  # an admin of another tenant reads every tenant
        for page_size in (1, 2, 3):
            assert api.audit(alice, job.id, page_size=page_size) == entries  # each entry exactly once
        expect_error(lambda: api.audit(keys.token("b", "viewer"), job.id), Code.NOT_FOUND, "JOB_NOT_FOUND")
        expect_error(lambda: api.audit(worker, job.id), Code.PERMISSION_DENIED, "PERMISSION_DENIED")

        capsys.readouterr()
        viewer = keys.token("a", "viewer", "vera")
        assert cli_main(["--server", target, "--token", viewer, "audit", job.id, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert [(e["action"], e["principal"], e["request_id"]) for e in shown] == [
            (e.action, e.principal, e.request_id) for e in entries
        ]
        assert all(e["peer"].startswith("ipv4:127.0.0.1:") for e in shown)
        outsider = keys.token("b", "viewer")
        assert cli_main(["--server", target, "--token", outsider, "audit", job.id, "--json"]) == 2
        assert "NOT_FOUND" in capsys.readouterr().err
        api.close()


# --- 8. the operator --------------------------------------------------------------------------------


def _server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobwire.server", *args]


def _child_env() -> dict[str, str]:
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    return env


def _without_host(process: ServerProcess) -> ServerProcess:
    at = process.args.index("--host")
    del process.args[at : at + 2]
    return process


def _logged(process: ServerProcess, message: str) -> dict[str, Any]:
    for line in process.log_lines:
        with contextlib.suppress(ValueError):
            entry: dict[str, Any] = json.loads(line)
            if message in entry.get("message", ""):
                return entry
    raise AssertionError(f"no log line with {message!r}: {process.log_lines}")


def _host(listening: dict[str, Any]) -> str:
    """The host of the "jobwire listening" line's address."""
    return str(listening["address"]).rpartition(":")[0]


def _healthy(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def test_without_authentication_the_server_stays_on_loopback(keys: Keys) -> None:
    refused = subprocess.Popen(
        _server_command("--host", "0.0.0.0", "--port", "0", "--store", "memory:"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    insecure = ServerProcess("memory:", "--host", "0.0.0.0", "--insecure")
    default = _without_host(ServerProcess("memory:"))
    authenticated = _without_host(ServerProcess("memory:", "--auth-key-file", str(keys.path)))
    servers = [insecure, default, authenticated]
    starters = [threading.Thread(target=s.start) for s in servers]  # in parallel: each takes a second
    for starter in starters:
        starter.start()
    try:
        out, err = refused.communicate(timeout=60)
        assert refused.returncode == 2
        assert out == "" and len(err.strip().splitlines()) == 1 and "--insecure" in err, err
        for starter in starters:
            starter.join(60)
        assert all(s.port for s in servers), [s.log_lines[-5:] for s in servers]

        assert _host(_logged(insecure, "jobwire listening")) == "0.0.0.0"
        assert "--insecure is set" in _logged(insecure, "authentication is off")["message"]
        assert _healthy(insecure.target)

        assert _host(_logged(default, "jobwire listening")) == "localhost"
        assert "loopback only" in _logged(default, "authentication is off")["message"]
        assert _healthy(default.target)

        assert _host(_logged(authenticated, "jobwire listening")) == "[::]"  # every interface
        assert "bearer tokens" in _logged(authenticated, "authentication is on")["message"]
        assert _healthy(authenticated.target)
    finally:
        for server in servers:
            server.kill()
        if refused.poll() is None:
            refused.kill()


def test_a_rotated_key_is_picked_up_without_a_restart(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "rotating.pem")
    with running(auth_config(keys)) as server:
        api = Api(server.target)
        old = keys.token("a", "submitter", "before")
        assert api.queued(old).created_by == "before"

        rotated = subprocess.run(
            [JOBWIRE_CLI, "token", "keygen", "--rotate", "--auth-key-file", str(keys.path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(),
        )
        assert rotated.returncode == 0, rotated.stderr
        assert "added key" in rotated.stdout
        created = subprocess.run(
            [
                JOBWIRE_CLI,
                "token",
                "create",
                "--auth-key-file",
                str(keys.path),
                "--tenant",
                "a",
                "--role",
                "submitter",
                "--subject",
                "after",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(),
        )
        assert created.returncode == 0, created.stderr
        new = created.stdout.strip()
        keys.reload()
        assert keys.ring.signing_kid is not None and keys.ring.signing_kid in _kid(new)

        deadline = time.monotonic() + 15.0  # the server looks at the file every 5 s
        while True:
            try:
                assert api.queued(new).created_by == "after"
                break
            except grpc.RpcError as err:
                assert err.code() == Code.UNAUTHENTICATED and error_info(err).reason == "TOKEN_UNKNOWN_KEY"
                assert time.monotonic() < deadline, "the rotated key file was never reloaded"
                time.sleep(0.1)
        assert api.queued(old).created_by == "before"  # tokens of the older key still verify

        # Removing the old key from the file revokes its tokens (the cache of verified tokens goes too).
        newest = keys.path.read_text().split("-----END PRIVATE KEY-----")[0] + "-----END PRIVATE KEY-----\n"
        replacement = keys.path.with_name("rotating.pem.new")
        replacement.write_text(newest)
        os.replace(replacement, keys.path)
        deadline = time.monotonic() + 15.0
        while True:
            try:
                api.queued(old)
            except grpc.RpcError as err:
                assert err.code() == Code.UNAUTHENTICATED and error_info(err).reason == "TOKEN_UNKNOWN_KEY"
                break
            assert time.monotonic() < deadline, "a removed key still verifies"
            time.sleep(0.1)
        assert api.queued(new).created_by == "after"
        api.close()


def _kid(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])
