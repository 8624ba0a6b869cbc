"""Assembles and runs the gRPC server: JobService, health, reflection, options, and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_async
from grpc_reflection.v1alpha import reflection, reflection_pb2

from jobwire.handlers.api import HandlerSpec, load_handlers
from jobwire.server.api.health import Health
from jobwire.server.api.job_service import JobServiceServicer
from jobwire.server.api.registration import add_servicer
from jobwire.server.api.worker_service import WorkerServiceServicer
from jobwire.server.clock import Clock
from jobwire.server.config import ServerConfig
from jobwire.server.manager import JobManager
from jobwire.server.stores.factory import open_store
from jobwire.v1 import job_service_pb2, worker_service_pb2

log = logging.getLogger("jobwire.server")

JOB_SERVICE_DESCRIPTOR = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]
JOB_SERVICE = JOB_SERVICE_DESCRIPTOR.full_name
WORKER_SERVICE_DESCRIPTOR = worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"]
MAX_MESSAGE_BYTES = 4 << 20

SERVER_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", 10_000),
    ("grpc.max_metadata_size", 64 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_connection_age_ms", 30 * 60_000),  # clients rebalance across replicas
    ("grpc.max_connection_age_grace_ms", 5 * 60_000),
    # grpc core cancels calls waiting for the Python handler past these; keep them above any burst of
    # watchers we expect (see shared NOTES: 1,000 by default).
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
)


class JobwireServer:
    """One server process: ``await start()``, then ``await stop()`` (drain) — both idempotent."""

    def __init__(
        self,
        config: ServerConfig,
        handlers: dict[str, HandlerSpec] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        specs = load_handlers(config.handler_modules()) if handlers is None else handlers
        self.manager = JobManager(open_store(config.store), specs, config.manager_settings(), clock)
        self.health = Health()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> int:
        """Recover jobs, then listen. Returns the bound port."""
        if self._server is not None:
            return self.port
        port: int
        await self.manager.start()
        server = grpc.aio.server(options=SERVER_OPTIONS)
        add_servicer(JobServiceServicer(self.manager), JOB_SERVICE_DESCRIPTOR, server)
        add_servicer(WorkerServiceServicer(self.manager), WORKER_SERVICE_DESCRIPTOR, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        _add_reflection(
            server,
            [
                JOB_SERVICE,
                WORKER_SERVICE_DESCRIPTOR.full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            ],
        )
        address = f"{self.config.host}:{self.config.port}"
        port = server.add_insecure_port(address)
        if port == 0:  # grpcio returns 0 instead of raising when the bind fails
            await self.manager.drain(0)
            await self.manager.close()
            raise OSError(f"could not listen on {address} (in use, or not a local address?)")
        await server.start()
        self._server, self.port = server, port
        for service in ("", JOB_SERVICE, WORKER_SERVICE_DESCRIPTOR.full_name):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "jobwire listening",
            extra={
                "address": address,
                "port": port,
                "store": self.config.store,
                "job_types": sorted(self.manager.handlers),
                "max_running": self.config.max_running,
            },
        )
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new jobs, let running ones finish for ``grace`` seconds, queue the
        rest again, end watch streams, stop the server, close the store."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.drain_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.manager.drain(grace)
        if self._server is not None:
            await self._server.stop(grace=1.0)
        await self.manager.close()
        log.info("jobwire stopped")
        self._stopped.set()


def _add_reflection(server: grpc.aio.Server, services: list[str]) -> None:
    """Serve reflection as v1alpha (grpcio-reflection) and as v1, which newer clients ask for first.

    The two versions have the same messages on the wire; only the service name differs.
    """
    names = [*services, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    servicer = reflection_async.ReflectionServicer(names)
    v1 = grpc.method_handlers_generic_handler(
        "grpc.reflection.v1.ServerReflection",
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    server = JobwireServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
    log.info("signal received: draining", extra={"grace_seconds": config.drain_grace})
    await server.stop()
