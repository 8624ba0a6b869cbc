"""Helpers for the security tests: key files and tokens (good and bad), decoded rich errors, a throwaway
PKI for mutual TLS, and a worker session driven by hand with credentials.

Everything here talks to real servers over loopback through the generated stubs; nothing patches the
server.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from jobwire.server.tokens import KeyRing, generate_private_key_pem, issue_token, write_key_file
from jobwire.v1 import worker_service_pb2 as W

DETAILS_KEY = "grpc-status-details-bin"
ERROR_DOMAIN = "jobwire.dev"
WAIT = 20.0

Metadata = tuple[tuple[str, str], ...]


# --- keys and tokens --------------------------------------------------------------------------------


class Keys:
    """A key file made with ``tokens.write_key_file``, and tokens it signs (or that it must refuse)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        write_key_file(path, rotate=False)
        self.ring = KeyRing.load(path)

    def reload(self) -> None:
        self.ring = KeyRing.load(self.path)

    def token(
        self,
        tenant: str,
        role: str,
        subject: str | None = None,
        *,
        types: list[str] | None = None,
        ttl: float = 3600.0,
        now: float | None = None,
    ) -> str:
        return issue_token(
            self.ring,
            tenant=tenant,
            role=role,
            subject=subject or f"{role}@{tenant}",
            ttl=ttl,
            types=types,
            now=now,
        )

    def expired_token(self, tenant: str = "a", role: str = "admin") -> str:
        """Issued two hours ago for one minute: far past the verifier's 30 s leeway."""
        return self.token(tenant, role, ttl=60.0, now=time.time() - 7200.0)

    def forged_token(self, tenant: str = "a", role: str = "admin") -> str:
        """Claims signed by a stranger's Ed25519 key, but naming this file's kid: a forged signature."""
        stranger = KeyRing.from_pem(generate_private_key_pem())
        assert stranger.signing_key is not None
        now = int(time.time())
        claims = {
            "iss": "jobwire",
            "aud": "jobwire",
            "sub": "mallory",
            "tenant": tenant,
            "role": role,
            "iat": now,
            "exp": now + 3600,
        }
        return jwt.encode(
            claims, stranger.signing_key, algorithm="EdDSA", headers={"kid": self.ring.signing_kid}
        )

    def signed(self, **overrides: Any) -> str:
        """Genuinely signed by this file's key, with claims of the test's choosing (None drops one)."""
        assert self.ring.signing_key is not None
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": "jobwire",
            "aud": "jobwire",
            "sub": "mallory",
            "tenant": "a",
            "role": "admin",
            "iat": now,
            "exp": now + 3600,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(
            claims, self.ring.signing_key, algorithm="EdDSA", headers={"kid": self.ring.signing_kid}
        )

    def unsigned_token(self) -> str:
        """``alg: none``: the oldest JWT trick: claims with no signature at all."""
        header = {"alg": "none", "typ": "JWT", "kid": self.ring.signing_kid}
        now = int(time.time())
        claims: dict[str, Any] = {"iss": "jobwire", "aud": "jobwire", "sub": "mallory", "tenant": "a"}
        claims["role"] = "admin"
        claims.update({"iat": now, "exp": now + 3600})
        return f"{_b64(header)}.{_b64(claims)}."

    def tampered_token(self, tenant: str = "a") -> str:
        """A genuine viewer token whose payload was edited to say admin (its signature kept)."""
        header, payload, signature = self.token(tenant, "viewer").split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["role"] = "admin"
        edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return f"{header}.{edited}.{signature}"


def _b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def unknown_key_token(folder: Path, tenant: str = "a", role: str = "admin") -> str:
    """A well-formed token signed by a key in another file (a kid the server has never seen)."""
    other = Keys(folder / "other-keys.pem")
    return other.token(tenant, role)


def bearer(token: str | None) -> Metadata:
    return () if token is None else (("authorization", f"Bearer {token}"),)


# --- rich errors ------------------------------------------------------------------------------------


def rich_status(err: Any) -> Any:
    """The google.rpc.Status of an RpcError (sync or aio), from its grpc-status-details-bin trailer."""
    for key, value in err.trailing_metadata() or ():
        if key == DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no {DETAILS_KEY} trailer on {err.code()}: {err.details()}")


def _unpacked(status: Any, message_type: Any) -> Any:
    for detail in status.details:
        if detail.Is(message_type.DESCRIPTOR):
            value = message_type()
            detail.Unpack(value)
            return value
    return None


def error_info(err: Any) -> Any:
    """The ErrorInfo of an RpcError; fails the test when there is none."""
    info = _unpacked(rich_status(err), error_details_pb2.ErrorInfo)
    assert info is not None, f"no ErrorInfo in the status of {err.code()}: {err.details()}"
    return info


def quota_failure(err: Any) -> Any:
    return _unpacked(rich_status(err), error_details_pb2.QuotaFailure)


def field_violations(err: Any) -> list[tuple[str, str]]:
    bad_request = _unpacked(rich_status(err), error_details_pb2.BadRequest)
    return [] if bad_request is None else [(v.field, v.description) for v in bad_request.field_violations]


def retry_delay(err: Any) -> float | None:
    info = _unpacked(rich_status(err), error_details_pb2.RetryInfo)
    return None if info is None else info.retry_delay.ToNanoseconds() / 1e9


def expect_error(call: Callable[[], Any], code: Any, reason: str | None = None) -> Any:
    """Run ``call``; it must fail with ``code`` (and ErrorInfo ``reason``, domain jobwire.dev). The error."""
    try:
        call()
    except grpc.RpcError as err:
        assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
        status = rich_status(err)
        assert status.code == code.value[0], f"the trailer's code {status.code} is not {code}"
        if reason is not None:
            info = error_info(err)
            assert (info.reason, info.domain) == (reason, ERROR_DOMAIN), f"{info.reason}: {err.details()}"
        return err
    raise AssertionError(f"expected {code}, but the call succeeded")


def in_an_hour() -> timestamp_pb2.Timestamp:
    """A schedule_time that keeps a job QUEUED (delayed) for the whole test."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromSeconds(int(time.time()) + 3600)
    return stamp


# --- a throwaway PKI --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for localhost/127.0.0.1, client certificates (by name)."""

    folder: Path
    ca: str
    server_cert: str
    server_key: str
    other_ca: str

    def client(self, name: str) -> tuple[str, str]:
        """The (certificate, key) paths of a client made by ``make_pki``."""
        return str(self.folder / f"{name}.pem"), str(self.folder / f"{name}.key")

    def credentials(self, client: str | None) -> Any:
        """grpc channel credentials trusting the CA, with the named client certificate (or none)."""
        root = Path(self.ca).read_bytes()
        if client is None:
            return grpc.ssl_channel_credentials(root_certificates=root)
        cert, key = self.client(client)
        return grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=Path(key).read_bytes(),
            certificate_chain=Path(cert).read_bytes(),
        )


def _ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> str:
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def person(common_name: str, tenant: str | None, role: str | None) -> x509.Name:
    """A client certificate's subject: CN = subject, O = tenant, OU = role."""
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if tenant is not None:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, tenant))
    if role is not None:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    return x509.Name(parts)


def make_pki(folder: Path, clients: dict[str, x509.Name], stranger_clients: dict[str, x509.Name]) -> Pki:
    """A CA, a server certificate it signs, ``clients`` it signs, and ``stranger_clients`` signed by
    another CA the server does not trust."""
    ca_key, other_key = _ec_key(), _ec_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jobwire security test CA")])
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "some other CA")])
    ca_cert = _certificate(ca_name, ca_key, None, ca=True)
    other_cert = _certificate(other_name, other_key, None, ca=True)
    server_key = _ec_key()
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
    ]
    server_cert = _certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        server_key,
        (ca_name, ca_key),
        sans=sans,
    )
    for issuer, names in (((ca_name, ca_key), clients), ((other_name, other_key), stranger_clients)):
        for file_name, subject in names.items():
            key = _ec_key()
            _write_pair(folder, file_name, _certificate(subject, key, issuer), key)
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (folder / "other-ca.pem").write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    return Pki(
        folder=folder,
        ca=str(folder / "ca.pem"),
        server_cert=_write_pair(folder, "server", server_cert, server_key),
        server_key=str(folder / "server.key"),
        other_ca=str(folder / "other-ca.pem"),
    )


# --- worker leases ---------------------------------------------------------------------------------


def lease(job_id: str, attempt: int, epoch: int) -> W.LeaseToken:
    return W.LeaseToken(job_id=job_id, attempt=attempt, epoch=epoch)
