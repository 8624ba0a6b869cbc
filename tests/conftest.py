"""Shared fixtures: real servers on loopback ports, and the PostgreSQL switch."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from jobwire.v1 import job_service_pb2_grpc
from support.servers import ServerThread


@pytest.fixture
def server() -> Iterator[ServerThread]:
    """A fresh server (memory store, demo and test handlers) in a background thread."""
    with ServerThread() as running:
        yield running


@pytest.fixture
def jobwire_target(server: ServerThread) -> str:
    """The "127.0.0.1:PORT" of a fresh server."""
    return server.target


@pytest.fixture
def stub(jobwire_target: str) -> Iterator[job_service_pb2_grpc.JobServiceStub]:
    """Generated JobService stub (sync) connected to a fresh server."""
    with grpc.insecure_channel(jobwire_target) as channel:
        yield job_service_pb2_grpc.JobServiceStub(channel)
