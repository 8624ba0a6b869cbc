"""Channels to a Jobwire deployment of one server or many replicas, for the SDK, the CLI and the worker.

A target may name one server (``host:port``), several (``host1:port,host2:port``), or a DNS name whose
records list the replicas (``dns:///jobs.internal:50051``). Calls are spread over every address with
gRPC's ``round_robin`` policy, which also steps around a replica that went away; the servers close
connections after a maximum age, so long-lived clients pick up replicas that come and go.

``tls_credentials`` builds TLS credentials from PEM files (a private CA, and a client certificate for
mutual TLS); ``select_credentials`` is the one rule the SDK, the CLI and the worker share for choosing
between those, explicit ``channel_credentials`` and plaintext.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import grpc
import grpc.aio

from jobwire.client.errors import InvalidArgumentError

# Round robin over every address the target resolves to (the default, pick_first, uses one).
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
]


def resolve_target(target: str) -> str:
    """The gRPC target for ``target``; a comma-separated list of host:port becomes one target whose
    addresses round robin spreads calls over (gRPC's ``ipv4:``/``ipv6:`` lists take addresses only,
    so each host is resolved here)."""
    if "," not in target or "://" in target or target.startswith(("ipv4:", "ipv6:", "unix:", "dns:")):
        return target
    v4: list[str] = []
    v6: list[str] = []
    for address in (part.strip() for part in target.split(",") if part.strip()):
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        for family, _, _, _, sockaddr in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM):
            if family == socket.AF_INET:
                v4.append(f"{sockaddr[0]}:{port}")
            elif family == socket.AF_INET6:
                v6.append(f"[{sockaddr[0]}]:{port}")
    if v4:  # one family per target: IPv4 when the hosts have it
        return "ipv4:" + ",".join(dict.fromkeys(v4))
    return "ipv6:" + ",".join(dict.fromkeys(v6))


def channel_options(extra: list[tuple[str, Any]] | None = None) -> list[tuple[str, Any]]:
    return [*CHANNEL_OPTIONS, *(extra or [])]


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A blocking channel to every replica ``target`` names."""
    resolved, merged = resolve_target(target), channel_options(options)
    if credentials is not None:
        return grpc.secure_channel(resolved, credentials, options=merged)
    return grpc.insecure_channel(resolved, options=merged)


def open_aio_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to every replica ``target`` names."""
    resolved, merged = resolve_target(target), channel_options(options)
    if credentials is not None:
        return grpc.aio.secure_channel(resolved, credentials, options=merged)
    return grpc.aio.insecure_channel(resolved, options=merged)


def _read_pem(path: str, what: str, argument: str) -> bytes:
    """The bytes of one PEM file; an unreadable or non-PEM file is an InvalidArgumentError of one line
    naming it, raised now rather than as an obscure handshake failure on the first call."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read the TLS {what} file {path}: {exc.strerror or exc}",
            reason="TLS_FILE_UNREADABLE",
            metadata={"argument": argument, "path": path},
        ) from exc
    if b"-----BEGIN " not in data:
        raise InvalidArgumentError(
            f"the TLS {what} file {path} is not PEM (no -----BEGIN line)",
            reason="TLS_FILE_NOT_PEM",
            metadata={"argument": argument, "path": path},
        )
    return data


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files.

    ``ca_file`` holds the certificates that may sign the server's (None: the system's trusted roots);
    ``cert_file`` and ``key_file`` are a client certificate and its private key, for servers that
    authenticate callers by certificate (mutual TLS), so they come together or not at all. The files
    are read now: a missing or unreadable one raises :class:`InvalidArgumentError` naming it. An empty
    path counts as not given (as an unset environment variable would).
    """
    ca_file, cert_file, key_file = ca_file or None, cert_file or None, key_file or None
    if (cert_file is None) != (key_file is None):
        given, missing = ("tls_cert", "tls_key") if cert_file is not None else ("tls_key", "tls_cert")
        raise InvalidArgumentError(
            f"{given} was given without {missing}: a client certificate needs its private key and the "
            "key its certificate",
            reason="TLS_CERT_WITHOUT_KEY",
            metadata={"argument": missing},
        )
    root = _read_pem(ca_file, "CA", "tls_ca") if ca_file is not None else None
    cert = _read_pem(cert_file, "certificate", "tls_cert") if cert_file is not None else None
    key = _read_pem(key_file, "key", "tls_key") if key_file is not None else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


def select_credentials(
    channel_credentials: grpc.ChannelCredentials | None = None,
    *,
    tls: bool = False,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> grpc.ChannelCredentials | None:
    """The credentials a client opens its channel with (None: plaintext).

    Explicit ``channel_credentials`` win; otherwise TLS is used when ``tls`` is set or any of the PEM
    paths is given (naming a CA or a client certificate only makes sense over TLS).
    """
    if channel_credentials is not None:
        return channel_credentials
    if tls or tls_ca or tls_cert or tls_key:
        return tls_credentials(tls_ca, tls_cert, tls_key)
    return None
