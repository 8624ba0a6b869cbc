"""Channels to a Jobwire deployment of one server or many replicas, for the SDK, the CLI and the worker.

A target may name one server (``host:port``), several (``host1:port,host2:port``), or a DNS name whose
records list the replicas (``dns:///jobs.internal:50051``). Calls are spread over every address with
gRPC's ``round_robin`` policy, which also steps around a replica that went away; the servers close
connections after a maximum age, so long-lived clients pick up replicas that come and go.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import grpc
import grpc.aio

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
