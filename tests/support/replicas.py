"""Several ``python -m jobwire.server`` processes on one fresh PostgreSQL schema, and a stub for each."""

from __future__ import annotations

import asyncio
from typing import Self

import grpc

from jobwire.v1 import job_service_pb2_grpc
from support.postgres import drop_schema, new_schema, store_url
from support.servers import ServerProcess


class Replicas:
    """``count`` replicas started with the given extra flags (leases of 2 s, so that recovery is quick).

    ``close`` kills them, drops the schema, and fails if any replica logged an ERROR.
    """

    def __init__(self, count: int = 3, *extra: str) -> None:
        self.schema = new_schema()
        self.url = store_url(self.schema)
        self.servers = [ServerProcess(self.url, "--lease-duration", "2s", *extra) for _ in range(count)]
        self.channels: list[grpc.Channel] = []
        self.stubs: list[job_service_pb2_grpc.JobServiceStub] = []

    def start(self) -> Self:
        for server in self.servers:
            server.start()
            channel = grpc.insecure_channel(server.target)
            self.channels.append(channel)
            self.stubs.append(job_service_pb2_grpc.JobServiceStub(channel))
        return self

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        for server in self.servers:
            server.kill()
        errors = [line for s in self.servers for line in s.log_lines if '"level": "ERROR"' in line]
        asyncio.run(drop_schema(self.schema))
        assert not errors, errors[:5]
