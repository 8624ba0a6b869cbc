"""Assembles and runs the gRPC server: JobService, health, reflection, options, and graceful drain."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_async
from grpc_reflection.v1alpha import reflection, reflection_pb2

from jobwire.handlers.api import HandlerSpec, load_handlers
from jobwire.server.api.authentication import Authenticator
from jobwire.server.api.health import Health
from jobwire.server.api.job_service import JobServiceServicer
from jobwire.server.api.registration import add_servicer
from jobwire.server.api.worker_service import WorkerServiceServicer
from jobwire.server.clock import Clock
from jobwire.server.config import ServerConfig, is_loopback
from jobwire.server.manager import JobManager
from jobwire.server.stores.factory import open_store
from jobwire.server.tokens import KeyFileError, KeyRing, TokenVerifier
from jobwire.v1 import job_service_pb2, worker_service_pb2

log = logging.getLogger("jobwire.server")

JOB_SERVICE_DESCRIPTOR = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]
JOB_SERVICE = JOB_SERVICE_DESCRIPTOR.full_name
WORKER_SERVICE_DESCRIPTOR = worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"]
SERVICES = ("", JOB_SERVICE, WORKER_SERVICE_DESCRIPTOR.full_name)  # the names health answers for
MAX_MESSAGE_BYTES = 4 << 20
# On stop, how long calls still in flight may take to finish before they are cancelled. New work is
# refused by then, so what is left are short unary calls and state changes committing.
IN_FLIGHT_GRACE = 10.0
# On stop, how long new calls are answered UNAVAILABLE (at least) before the listener stops.
REFUSE_WINDOW = 1.0
# How often the auth key file is looked at for changes (a rotation reaches every replica this fast).
KEY_RELOAD_INTERVAL = 5.0

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


class StartupError(Exception):
    """The server could not start (a port in use, a store that cannot be opened): one line for the user."""


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
        self.authenticator = Authenticator()
        self._key_reloader: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Recover jobs, then listen. Returns the bound port; StartupError if either cannot be done."""
        if self._server is not None:
            return self.port
        port: int
        host = self.config.listen_host
        address = f"{host}:{self.config.port}"
        _check_port_free(host, self.config.port)  # before the store: fail fast, and quietly
        self.authenticator = _authenticator(self.config)
        credentials = _server_credentials(self.config)
        try:
            await self.manager.open()
        except StartupError:
            raise
        except Exception as error:  # whatever the store raised: the operator needs one clear line
            raise StartupError(f"cannot open the store {self.config.store}: {error}") from error
        server = grpc.aio.server(options=SERVER_OPTIONS)

        # Until the queue is recovered, calls get UNAVAILABLE (SERVER_STARTING) and health NOT_SERVING.
        def ready() -> bool:
            return self.manager.ready

        add_servicer(
            JobServiceServicer(self.manager), JOB_SERVICE_DESCRIPTOR, server, self.authenticator, ready
        )
        add_servicer(
            WorkerServiceServicer(self.manager), WORKER_SERVICE_DESCRIPTOR, server, self.authenticator, ready
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        _add_reflection(
            server,
            [
                JOB_SERVICE,
                WORKER_SERVICE_DESCRIPTOR.full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            ],
        )
        try:  # grpcio 1.85 raises; older versions returned 0
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            await self.manager.drain(0)
            await self.manager.close()
            raise StartupError(
                f"cannot listen on {address}: the port is in use or the address is not local (--host, --port)"
            )
        for service in SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server, self.port = server, port
        try:
            await self.manager.start()  # recovery: load the queue (long with a deep one), join the cluster
        except Exception as error:
            await self.stop(grace=0)
            raise StartupError(f"cannot recover the jobs of {self.config.store}: {error}") from error
        for service in SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._log_security(host)
        if self.authenticator.tokens is not None:
            self._key_reloader = asyncio.create_task(self._reload_keys_forever(), name="jobwire-key-reload")
        log.info(
            "jobwire listening",
            extra={
                "address": address,
                "port": port,
                "store": self.config.store,
                "job_types": sorted(self.manager.handlers),
                "max_running": self.config.max_running,
                "authentication": self.authenticator.enabled,
                "tls": credentials is not None,
            },
        )
        return port

    def _log_security(self, host: str) -> None:
        """Say at start-up who can reach this server and how they are checked."""
        config, tokens = self.config, self.authenticator.tokens
        if not self.authenticator.enabled:
            if is_loopback(host):
                log.warning(
                    "authentication is off: listening on loopback only (%s), and every caller is an admin; "
                    "turn it on with --auth-key-file (see README, Security)",
                    host,
                )
            else:
                log.warning(
                    "authentication is off and --insecure is set: anyone who reaches %s can read and change "
                    "every job",
                    host,
                )
            return
        ways = []
        if tokens is not None:
            ways.append(f"bearer tokens ({len(tokens.keyring.verifying_keys)} verifying keys)")
        if config.tls_client_ca:
            ways.append("client certificates")
        log.info("authentication is on: %s", " and ".join(ways))
        if tokens is not None and not config.tls_cert and not is_loopback(host):
            log.warning(
                "bearer tokens travel in plaintext: serve TLS (--tls-cert, --tls-key) unless a proxy "
                "terminates TLS in front of this server"
            )

    async def _reload_keys_forever(self) -> None:
        """Pick up a rotated key file, so that rotation needs no restart."""
        tokens = self.authenticator.tokens
        assert tokens is not None
        while True:
            await asyncio.sleep(KEY_RELOAD_INTERVAL)
            try:
                if tokens.reload_if_changed():
                    log.info("auth keys reloaded: %d verifying keys", len(tokens.keyring.verifying_keys))
            except KeyFileError as error:
                log.error("auth key file not reloaded (the previous keys stay in use): %s", error)

    async def stop(self, grace: float | None = None, delay: float = 0.0) -> None:
        """Drain, in the order load balancers can follow:

        1. health turns NOT_SERVING, and everything keeps working for ``delay`` seconds, so that load
           balancers and clients watching health move to another server before anything is refused;
        2. new work is refused (UNAVAILABLE), watch streams end with their resume point and worker
           sessions end, so that both reconnect elsewhere;
        3. local jobs get ``grace`` seconds to finish, the rest are queued again;
        4. new calls keep getting UNAVAILABLE for at least REFUSE_WINDOW (when there was a delay);
        5. calls still in flight finish (up to IN_FLIGHT_GRACE), then the listener stops and the store
           closes.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.drain_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        log.info("draining: health is NOT_SERVING", extra={"drain_delay": delay, "drain_grace": grace})
        if delay > 0:
            await asyncio.sleep(delay)
        self.manager.begin_drain()
        refusing_since = asyncio.get_running_loop().time()
        await self.manager.drain(grace)
        # Answer UNAVAILABLE a little longer before the listener stops: a call that reaches grpc core
        # while it shuts down is cancelled (CANCELLED, which clients do not retry), so clients should
        # have heard UNAVAILABLE and gone by then.
        refused_for = asyncio.get_running_loop().time() - refusing_since
        if delay > 0 and refused_for < REFUSE_WINDOW:
            await asyncio.sleep(REFUSE_WINDOW - refused_for)
        if self._server is not None:
            await self._server.stop(grace=IN_FLIGHT_GRACE)
        if self._key_reloader is not None:
            self._key_reloader.cancel()
        await self.manager.close()
        log.info("jobwire stopped")
        self._stopped.set()


def _authenticator(config: ServerConfig) -> Authenticator:
    """Tokens verified with the key file's keys, and client certificates, as configured."""
    tokens = None
    if config.auth_key_file:
        try:
            tokens = TokenVerifier(KeyRing.load(config.auth_key_file))
        except KeyFileError as error:
            raise StartupError(str(error)) from None
    return Authenticator(tokens, certificates=bool(config.tls_client_ca))


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise StartupError(f"{flag} {path}: {error.strerror}") from None


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS, and with a client CA mutual TLS (client certificates required), or None for plaintext."""
    if not config.tls_cert:
        return None
    key, chain = _read(config.tls_key, "--tls-key"), _read(config.tls_cert, "--tls-cert")
    for data, flag in ((key, "--tls-key"), (chain, "--tls-cert")):
        if b"-----BEGIN" not in data:
            raise StartupError(f"{flag}: not a PEM file")
    client_ca = _read(config.tls_client_ca, "--tls-client-ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _check_port_free(host: str, port: int) -> None:
    """StartupError if the port is taken, said in one line before grpc core logs its own bind error."""
    if port == 0:
        return
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds: TIME_WAIT is no conflict
        try:
            probe.bind((bare or "::", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise StartupError(f"cannot listen on {host}:{port}: the port is in use (--port)") from None
            raise StartupError(f"cannot listen on {host}:{port}: {error.strerror} (--host)") from None


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


async def serve(config: ServerConfig, handlers: dict[str, HandlerSpec]) -> None:
    """Run until SIGTERM or SIGINT, then drain (SIGINT, an operator's Ctrl-C, skips the drain delay)."""
    server = JobwireServer(config, handlers)
    await server.start()
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, received.put_nowait, sig)
    sig = await received.get()
    log.info("%s received: draining", sig.name, extra={"signal": sig.name})
    await server.stop(delay=config.drain_delay if sig is signal.SIGTERM else 0.0)
