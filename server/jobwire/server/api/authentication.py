"""Who is calling: a call's credentials turned into a Principal, before any request is decoded.

Two kinds of credential, either or both (``jobwire serve --auth-key-file``, ``--tls-client-ca``):

- a bearer token in the ``authorization`` metadata (``Bearer <token>``), verified by ``tokens.py``;
- a client certificate (mutual TLS): its subject's CN is the subject, O the tenant, OU the role.

A call with a token is judged by its token (a bad token is refused even over a good certificate); a
call without one, by its certificate; a call with neither is UNAUTHENTICATED. A server that checks no
tokens ignores them (and says so once in its log). With authentication off
every call is ``ANONYMOUS`` (an admin of the tenant "default"), and the server listens on loopback
only unless told ``--insecure`` (``app.py``).

Health and reflection are registered without this check: load balancers and grpcurl reach them with
no credentials (README, "Security").
"""

from __future__ import annotations

import functools
import logging
import urllib.parse
from contextvars import ContextVar

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from jobwire.server.access import ANONYMOUS, Caller, Principal, check_subject, check_tenant, parse_role
from jobwire.server.errors import Unauthenticated
from jobwire.server.tokens import TokenVerifier

log = logging.getLogger("jobwire.api.auth")

_CALLER: ContextVar[Caller] = ContextVar("jobwire_caller")


def current_caller() -> Caller:
    """The caller of the RPC being served (set by ``registration`` before the servicer runs).

    Fails closed: an RPC that did not pass through the authentication step has no caller at all.
    """
    try:
        return _CALLER.get()
    except LookupError:
        raise RuntimeError(
            "no authenticated caller: register servicers with registration.add_servicer"
        ) from None


def set_caller(caller: Caller) -> None:
    _CALLER.set(caller)


class Authenticator:
    """Checks every call's credentials; with neither tokens nor certificates, everyone is ANONYMOUS."""

    def __init__(self, tokens: TokenVerifier | None = None, certificates: bool = False) -> None:
        self.tokens = tokens
        self.certificates = certificates
        self._warned_ignored_token = False

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.certificates

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """The call's caller; Unauthenticated when credentials are required and missing or bad."""
        peer = urllib.parse.unquote(context.peer() or "")  # grpc writes ipv6:%5B::1%5D:port
        token = _bearer_token(context.invocation_metadata() or ())
        if token is not None and self.tokens is None and not self._warned_ignored_token:
            self._warned_ignored_token = True
            log.warning(
                "a call carried a bearer token, but this server does not check tokens (no "
                "--auth-key-file): %s",
                "its client certificate identifies it" if self.certificates else "every caller is an admin",
            )
        if not self.enabled:
            return Caller(ANONYMOUS, peer)
        if token is not None and self.tokens is not None:
            return Caller(self.tokens.verify(token), peer)
        if self.certificates:
            pem = (context.auth_context() or {}).get("x509_pem_cert")
            if pem:
                return Caller(principal_from_certificate(bytes(pem[0])), peer)
        raise Unauthenticated(
            "this server requires credentials: send `authorization: Bearer <token>` metadata"
            + (" or a client certificate" if self.certificates else ""),
            reason="CREDENTIALS_MISSING",
        )


def _bearer_token(metadata: object) -> str | None:
    """The token of the ``authorization`` metadata; None when there is none."""
    for key, value in metadata:  # type: ignore[attr-defined]
        if key != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "the authorization metadata must be `Bearer <token>`", reason="TOKEN_MALFORMED"
            )
        return token.strip()
    return None


@functools.lru_cache(maxsize=1024)  # a client keeps its certificate: parse each one once
def principal_from_certificate(pem: bytes) -> Principal:
    """The principal a client certificate names: CN = subject, O = tenant, OU = role."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise Unauthenticated(
            f"unreadable client certificate: {error}", reason="CERTIFICATE_INVALID"
        ) from None
    subject = certificate.subject

    def one(oid: x509.ObjectIdentifier, what: str) -> str:
        values = subject.get_attributes_for_oid(oid)
        if len(values) != 1:
            raise Unauthenticated(
                f"the client certificate must name exactly one {what}", reason="CERTIFICATE_INVALID"
            )
        value = values[0].value
        return value.decode() if isinstance(value, bytes) else value

    try:
        return Principal(
            subject=check_subject(one(NameOID.COMMON_NAME, "subject (CN)")),
            tenant=check_tenant(one(NameOID.ORGANIZATION_NAME, "tenant (O)")),
            role=parse_role(one(NameOID.ORGANIZATIONAL_UNIT_NAME, "role (OU)")),
        )
    except ValueError as error:
        raise Unauthenticated(f"client certificate: {error}", reason="CERTIFICATE_INVALID") from None
