"""Fuzzing every RPC of both services: bad input never gets UNKNOWN or INTERNAL, and the server lives on."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobwire.server.config import ServerConfig
from jobwire.v1 import job_service_pb2, job_service_pb2_grpc
from support.fuzzing import Fuzzer
from support.security import Keys
from support.servers import ServerThread

CALLS = 1500


def test_fuzzed_calls_never_get_unknown_internal_or_oversized_errors(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    fuzzer = Fuzzer(server.target, seed=20261201)
    with caplog.at_level(logging.WARNING):
        codes = asyncio.run(fuzzer.run(CALLS))
    print("fuzzed calls by status:", dict(sorted(codes.items())))
    assert not fuzzer.defects(), (fuzzer.defects(), fuzzer.samples)
    # The server side: no traceback logged while answering (grpcio logs handler exceptions as ERROR).
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]
    assert sum(codes.values()) == CALLS
    assert codes["INVALID_ARGUMENT"] > 0 and codes["OK"] > 0  # both sides of the input space were hit
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        job = stub.SubmitJob(job_service_pb2.SubmitJobRequest(type="test.echo"), timeout=5).job
        final = list(stub.WatchJob(job_service_pb2.WatchJobRequest(job_id=job.id), timeout=10))[-1]
        assert final.job.state == 3  # SUCCEEDED: the server still runs jobs


def test_fuzzed_credentials_never_get_unknown_or_internal(tmp_path: Path) -> None:
    """With authentication on: calls with valid tokens of every role, none, or broken ones, on every RPC."""
    keys = Keys(tmp_path / "keys.pem")
    tokens = [
        keys.token(tenant, role)
        for tenant in ("a", "b")
        for role in ("admin", "submitter", "viewer", "worker")
    ]
    config = ServerConfig(host="127.0.0.1", port=0, store="memory:", auth_key_file=str(keys.path))
    with ServerThread(config) as server:
        fuzzer = Fuzzer(server.target, seed=20261202, tokens=tokens)
        codes = asyncio.run(fuzzer.run(CALLS))
    print("fuzzed calls with credentials by status:", dict(sorted(codes.items())))
    assert not fuzzer.defects(), (fuzzer.defects(), fuzzer.samples)
    assert codes["UNAUTHENTICATED"] > 0 and codes["PERMISSION_DENIED"] > 0 and codes["OK"] > 0
