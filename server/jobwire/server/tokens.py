"""Bearer tokens: signed JWTs that any server replica verifies on its own.

Why JWT (through PyJWT): every language has a library that reads and writes it, and a replica verifies
one with nothing but the public keys: no shared state, no database lookup per call, so replicas scale
and fail independently.

Why Ed25519 (EdDSA): it is asymmetric, so servers hold only public keys and a compromised server cannot
mint tokens; only the operator's key file (``jobwire token keygen``) can. Keys and signatures are small
(32 and 64 bytes) and verifying is fast, which matters because every RPC verifies a token.

Verification pins the algorithm to EdDSA and never lets a token choose it (no "alg" confusion: no HS256
signed with a public key, no ``none``). Each token names its key in the ``kid`` header, which picks the
verifying key: a key file holds several keys at once, so keys rotate without invalidating live tokens
(``keygen --rotate`` puts a new signing key first and keeps the old ones for verifying).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from jwt.types import Options

from jobwire.server.access import (
    Principal,
    Role,
    check_subject,
    check_tenant,
    check_type_patterns,
    parse_role,
)
from jobwire.server.errors import Unauthenticated

ALGORITHM = "EdDSA"
ISSUER = "jobwire"
AUDIENCE = "jobwire"
# A token is an HTTP/2 header value; far past any token Jobwire issues, well inside gRPC's metadata limit.
MAX_TOKEN_LENGTH = 8 * 1024
MAX_TTL = 10 * 365 * 86400.0  # ten years: longer is a key that never expires, not a token
# A key file holds a few PEM keys (about 120 bytes each); anything bigger is the wrong file.
MAX_KEY_FILE = 1024 * 1024
CACHE_SIZE = 10_000
MAX_MESSAGE = 299  # error messages travel in gRPC trailers and logs: one short line
KEYGEN_HINT = "create one with: jobwire token keygen --auth-key-file PATH"

# What identifies one version of a key file, cheaply (os.stat, no read): the inode too, because an
# atomic replace (os.replace) by a same-sized file within one mtime tick changes only the inode.
FileStamp = tuple[int, int, int]

# Three base64url parts (RFC 7515: no padding); the header must not be empty. Checked in C before PyJWT,
# which checks each character in Python: garbage is refused cheaply.
_TOKEN_FORM = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_OTHER_KEY_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((rsa.RSAPrivateKey, rsa.RSAPublicKey), "an RSA key"),
    ((ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey), "an EC (ECDSA) key"),
    ((dsa.DSAPrivateKey, dsa.DSAPublicKey), "a DSA key"),
    ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "an Ed448 key"),
    ((x25519.X25519PrivateKey, x25519.X25519PublicKey), "an X25519 key"),
    ((x448.X448PrivateKey, x448.X448PublicKey), "an X448 key"),
)


class KeyFileError(ValueError):
    """A key file that cannot be used; the message is one line for an operator and names the file."""


def _file_error(path: str, problem: str) -> KeyFileError:
    return KeyFileError(f"--auth-key-file {path}: {problem}")


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """A key's ``kid``: derived from the key itself, so every tool computes the same id with no registry."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class KeyRing:
    """The keys of one key file: the key that signs new tokens and every key that verifies them.

    A key file is PEM blocks one after another, each an Ed25519 PRIVATE KEY (PKCS8) or PUBLIC KEY
    (SubjectPublicKeyInfo). The first private key signs; every key, private or public, verifies (by its
    ``kid``). A file of public keys only lets a server verify tokens but not issue them: that is what a
    server should get when only the operator issues tokens.
    """

    __slots__ = ("path", "signing_key", "signing_kid", "stamp", "verifying_keys")

    def __init__(
        self,
        path: str,
        signing_key: ed25519.Ed25519PrivateKey | None,
        verifying_keys: dict[str, ed25519.Ed25519PublicKey],
        stamp: FileStamp | None = None,
    ) -> None:
        self.path = path
        self.signing_key = signing_key
        self.signing_kid = key_id(signing_key.public_key()) if signing_key is not None else None
        self.verifying_keys = verifying_keys
        self.stamp = stamp  # (inode, mtime_ns, size) of the file as it was read; None when not from a file

    def __repr__(self) -> str:
        return f"KeyRing({self.path!r}, signing_kid={self.signing_kid!r}, kids={list(self.verifying_keys)})"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyRing:
        """The keys in the file at ``path``; KeyFileError (one line naming the file) when it is unusable."""
        name = os.fspath(path)
        data, stamp = _read_key_file(name)
        return cls.from_pem(data, name, stamp=stamp)

    @classmethod
    def from_pem(cls, data: bytes, path: str = "<memory>", *, stamp: FileStamp | None = None) -> KeyRing:
        """The keys in ``data`` (a key file's contents); ``path`` is only for the messages."""
        if not data.strip():
            raise _file_error(path, f"is empty ({KEYGEN_HINT})")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise _file_error(path, "is not a PEM text file (Jobwire keys are PEM, not DER)") from None
        blocks = list(_PEM_BLOCK.finditer(text))
        if text.count("-----BEGIN ") > len(blocks):
            raise _file_error(path, "holds a PEM block without its END line (is the file cut short?)")
        signing_key: ed25519.Ed25519PrivateKey | None = None
        verifying_keys: dict[str, ed25519.Ed25519PublicKey] = {}
        for number, block in enumerate(blocks, start=1):
            key = _load_block(path, number, block.group(1), block.group(0).encode("ascii"))
            if isinstance(key, ed25519.Ed25519PrivateKey):
                if signing_key is None:
                    signing_key = key
                public = key.public_key()
            else:
                public = key
            verifying_keys.setdefault(key_id(public), public)  # the same key twice is harmless
        if not verifying_keys:
            raise _file_error(path, f"holds no Ed25519 key ({KEYGEN_HINT})")
        return cls(path, signing_key, verifying_keys, stamp)

    def public_pem(self) -> str:
        """Every verifying key as PEM, in the file's order: a key file for servers that only verify."""
        return "".join(
            key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode("ascii")
            for key in self.verifying_keys.values()
        )


def _read_key_file(path: str) -> tuple[bytes, FileStamp]:
    try:
        with open(path, "rb") as file:
            # fstat the open file: the stamp describes exactly the bytes read, even if it is replaced now.
            info = os.fstat(file.fileno())
            data = file.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise _file_error(path, "no such file") from None
    except IsADirectoryError:
        raise _file_error(path, "is a directory, not a key file") from None
    except PermissionError:
        raise _file_error(path, "cannot be read: permission denied") from None
    except OSError as error:
        raise _file_error(path, f"cannot be read: {error.strerror or error}") from None
    if len(data) > MAX_KEY_FILE:
        raise _file_error(
            path, "is larger than 1 MiB: a key file holds a few PEM keys; is it the right file?"
        )
    return data, (info.st_ino, info.st_mtime_ns, info.st_size)


def _load_block(
    path: str, number: int, label: str, pem: bytes
) -> ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey:
    """One PEM block as an Ed25519 key, or a KeyFileError saying what the block is instead."""
    where = f"block {number}"
    if label == "ENCRYPTED PRIVATE KEY":
        raise _file_error(
            path,
            f"{where} is an encrypted private key; Jobwire reads unencrypted keys (protect the file "
            "with its permissions: chmod 600)",
        )
    if label == "OPENSSH PRIVATE KEY":
        raise _file_error(path, f"{where} is an OpenSSH key; Jobwire keys are Ed25519 in PEM ({KEYGEN_HINT})")
    key: Any
    try:
        if label.endswith("PRIVATE KEY"):
            key = serialization.load_pem_private_key(pem, password=None)
        elif label.endswith("PUBLIC KEY"):
            key = serialization.load_pem_public_key(pem)
        else:
            raise _file_error(path, f"{where} is a {label} block, not a key; Jobwire keys are Ed25519")
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        if isinstance(error, KeyFileError):
            raise
        raise _file_error(path, f"{where} ({label}) cannot be read: it is damaged or not a key") from None
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return key
    kind = next((name for types, name in _OTHER_KEY_KINDS if isinstance(key, types)), "not an Ed25519 key")
    raise _file_error(path, f"{where} is {kind}; Jobwire keys are Ed25519 ({KEYGEN_HINT})")


def _new_key() -> tuple[bytes, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, key_id(key.public_key())


def generate_private_key_pem() -> bytes:
    """A new Ed25519 private key as PKCS8 PEM, unencrypted (the file's permissions protect it)."""
    return _new_key()[0]


def write_key_file(path: str | os.PathLike[str], *, rotate: bool) -> str:
    """Write a new signing key to ``path`` and return its kid.

    Without ``rotate`` the file must not exist yet (an existing key is never overwritten). With
    ``rotate`` the new key goes first, so it signs from now on, and every existing block stays after it,
    so tokens already issued still verify. The file is replaced atomically with mode 0600: a server
    reloading it reads the old file or the new one, never half of one.
    """
    name = os.fspath(path)
    if rotate:
        if not os.path.lexists(name):
            raise _file_error(name, "no such file (leave out --rotate to create it)")
        existing, _ = _read_key_file(name)
        KeyRing.from_pem(existing, name)  # refuse to carry a broken file forward
        if not existing.endswith(b"\n"):
            existing += b"\n"
        pem, kid = _new_key()
        _write_atomically(name, pem + existing, replace=True)
    else:
        if os.path.lexists(name):
            raise _file_error(name, "already exists (to add a new signing key to it, use --rotate)")
        pem, kid = _new_key()
        _write_atomically(name, pem, replace=False)
    return kid


def _write_atomically(path: str, data: bytes, *, replace: bool) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise _file_error(path, f"no such directory: {directory}")
    try:
        descriptor, temporary = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
        )
    except OSError as error:
        raise _file_error(path, f"cannot write in {directory}: {error.strerror or error}") from None
    moved = False
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temporary, path)
            moved = True
        else:
            try:
                os.link(temporary, path)  # unlike os.replace, never overwrites a file created meanwhile
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                if os.path.lexists(path):
                    raise FileExistsError(path) from None
                os.replace(temporary, path)
                moved = True
    except FileExistsError:
        raise _file_error(path, "already exists (to add a new signing key to it, use --rotate)") from None
    except OSError as error:
        raise _file_error(path, f"cannot be written: {error.strerror or error}") from None
    finally:
        if not moved:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
    with contextlib.suppress(OSError):  # make the rename itself durable
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


def issue_token(
    keyring: KeyRing,
    *,
    tenant: str,
    role: Role | str,
    subject: str,
    ttl: float,
    types: list[str] | None = None,
    now: float | None = None,
) -> str:
    """A signed token for ``subject`` acting as ``role`` in ``tenant``, valid for ``ttl`` seconds.

    ``types`` limits it to these job types (names or fnmatch patterns). ValueError for a bad argument,
    KeyFileError when the key file cannot sign (it holds only public keys).
    """
    check_tenant(tenant)
    parsed_role = role if isinstance(role, Role) else parse_role(role.strip().lower())  # an operator typed it
    check_subject(subject)
    if isinstance(types, str):  # "a,b" would otherwise become the patterns "a", ",", "b"
        raise ValueError("types must be a list of job types or patterns, not a string")
    patterns = None if types is None else list(check_type_patterns(list(types)))
    if not (isinstance(ttl, int | float) and math.isfinite(ttl) and 0 < ttl <= MAX_TTL):
        raise ValueError(
            f"a token's lifetime (ttl) must be more than 0 and at most 10 years (3650d), got {ttl!r} seconds"
        )
    if keyring.signing_key is None:
        raise _file_error(keyring.path, "holds only public keys; it can verify tokens but not issue them")
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "tenant": tenant,
        "role": parsed_role.value,
    }
    if patterns is not None:
        claims["types"] = patterns
    claims["iat"] = int(issued)
    claims["exp"] = math.ceil(issued + ttl)
    claims["jti"] = secrets.token_hex(8)
    return jwt.encode(claims, keyring.signing_key, algorithm=ALGORITHM, headers={"kid": keyring.signing_kid})


# PyJWT checks the signature, iss, aud and that claims are present; the time claims are checked here,
# against the verifier's clock (PyJWT reads the system clock, and takes "123" for a time) and with
# messages that say when.
_DECODE_OPTIONS: Options = {
    "require": ["exp", "iat", "sub", "iss", "aud"],
    "verify_exp": False,
    "verify_iat": False,
    "verify_nbf": False,
    "verify_sub": False,  # checked below, with the other identity claims
}


def _fail(reason: str, message: str, metadata: dict[str, str] | None = None) -> Unauthenticated:
    """An Unauthenticated error whose message is one short line, whatever the token held."""
    line = message.replace("\r", " ").replace("\n", " ")
    if len(line) > MAX_MESSAGE:
        line = line[: MAX_MESSAGE - 1] + "…"
    return Unauthenticated(line, reason=reason, metadata=metadata)


def _show(value: object, limit: int = 40) -> str:
    """A claim or header value for a message: repr, cut short (it comes from an untrusted token)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _utc(timestamp: float) -> str:
    try:
        when = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{timestamp:g} (seconds since 1970)"
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _span(seconds: float) -> str:
    """45s, 12m, 3h12m, 5d4h: how long ago, roughly, for a person."""
    whole = int(max(0.0, seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m" if minutes else f"{secs}s"


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(
            "TOKEN_INVALID",
            f"the token's {name} claim must be a time in seconds since 1970, got {_show(value)}",
        )
    return float(value)


def _checked(claims: dict[str, Any], name: str, check: Callable[[Any], Any]) -> Any:
    value = claims.get(name)
    if value is None:
        raise _fail("TOKEN_INVALID", f"the token has no {name} claim")
    if not isinstance(value, str):
        raise _fail("TOKEN_INVALID", f"the token's {name} claim must be a string, got {_show(value)}")
    if len(value) > 200:  # longer than any valid one: say so rather than quote it
        raise _fail("TOKEN_INVALID", f"the token's {name} claim is not valid: {len(value)} characters long")
    try:
        return check(value)
    except ValueError as error:
        raise _fail("TOKEN_INVALID", f"the token's {name} claim is not valid: {error}") from None


def _header(token: str) -> dict[str, Any]:
    """The token's (unverified) header, read here rather than by PyJWT, which would decode it twice."""
    segment = token[: token.index(".")]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError) as error:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise _fail("TOKEN_MALFORMED", f"not a JWT: its header cannot be decoded ({error})") from None
    if not isinstance(header, dict):
        raise _fail("TOKEN_MALFORMED", "not a JWT: its header is not a JSON object")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _fail("TOKEN_MALFORMED", f"the token's kid must be a string, got {_show(kid)}")
    return header


class TokenVerifier:
    """Turns a bearer token into a Principal, or raises Unauthenticated with the reason why not.

    Verified tokens are cached (at most CACHE_SIZE, least recently used dropped first): a client sends the
    same token on every call, and a cache hit costs a dict lookup instead of a signature check. An entry
    is used only until its token expires (exp + leeway) and reloading the key file empties the cache, so
    a removed key stops verifying at once.

    Not thread-safe, and needs not be: one asyncio event loop calls it, and neither ``verify`` nor
    ``reload_if_changed`` awaits, so each runs to completion without interleaving. (From several threads
    the worst outcome is a redundant signature check or a lost cache entry, never a wrong answer.)
    """

    def __init__(
        self, keyring: KeyRing, *, leeway: float = 30.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._keyring = keyring
        self._leeway = float(leeway)
        self._clock = clock
        self._jwt = jwt.PyJWT()
        # token -> (principal, when the entry stops counting: exp + leeway)
        self._cache: dict[str, tuple[Principal, float]] = {}
        # The file version last tried by reload_if_changed, loaded or not: a broken file is reported
        # once per change rather than on every poll.
        self._seen_stamp: FileStamp | None = keyring.stamp

    @property
    def keyring(self) -> KeyRing:
        return self._keyring

    @property
    def cached(self) -> int:
        """How many verified tokens the cache holds."""
        return len(self._cache)

    def verify(self, token: str) -> Principal:
        """The principal ``token`` speaks for; Unauthenticated (with a ``reason``) when it is not valid."""
        cache = self._cache
        entry = cache.pop(token, None) if type(token) is str and len(token) <= MAX_TOKEN_LENGTH else None
        if entry is not None and self._clock() < entry[1]:
            cache[token] = entry  # back at the end: most recently used
            return entry[0]
        principal, valid_until = self._verify_signed(token)
        if len(cache) >= CACHE_SIZE:
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                del cache[next(iter(cache))]  # the least recently used
        cache[token] = (principal, valid_until)
        return principal

    def _verify_signed(self, token: str) -> tuple[Principal, float]:
        """The full check: form, key, signature, then claims."""
        if not isinstance(token, str):
            raise _fail("TOKEN_MALFORMED", f"a token is a string, got {type(token).__name__}")
        if not token:
            raise _fail("TOKEN_MALFORMED", "the token is empty")
        if len(token) > MAX_TOKEN_LENGTH:
            raise _fail(
                "TOKEN_MALFORMED",
                f"the token is {len(token)} characters long; Jobwire tokens are at most {MAX_TOKEN_LENGTH}",
            )
        if not token.isascii():
            raise _fail("TOKEN_MALFORMED", "not a JWT: the token holds non-ASCII characters")
        parts = token.count(".") + 1
        if parts != 3:
            raise _fail(
                "TOKEN_MALFORMED",
                f"not a JWT: a JWT has 3 parts separated by dots, this token has {parts}"
                + (" (drop the 'Bearer ' prefix)" if token.startswith("Bearer ") else ""),
            )
        if _TOKEN_FORM.fullmatch(token) is None:
            raise _fail("TOKEN_MALFORMED", "not a JWT: its parts hold characters other than base64url")
        header = _header(token)
        alg = header.get("alg")
        if alg is None:
            raise _fail("TOKEN_MALFORMED", f"the token's header names no alg; Jobwire tokens use {ALGORITHM}")
        if alg != ALGORITHM:
            raise _fail(
                "TOKEN_MALFORMED",
                f"the token is signed with alg {_show(alg)}; Jobwire accepts only {ALGORITHM} (Ed25519)",
            )
        kid = header.get("kid")
        if kid is None:
            raise _fail("TOKEN_UNKNOWN_KEY", "the token names no key (its header has no kid)")
        key = self._keyring.verifying_keys.get(kid)
        if key is None:
            raise _fail(
                "TOKEN_UNKNOWN_KEY",
                f"the token is signed by a key this server does not know (kid {_show(kid)})",
                {"kid": str(kid)[:64]},
            )
        try:
            claims = self._jwt.decode(
                token, key, algorithms=[ALGORITHM], options=_DECODE_OPTIONS, audience=AUDIENCE, issuer=ISSUER
            )
        except jwt.InvalidSignatureError:
            raise _fail(
                "TOKEN_BAD_SIGNATURE",
                f"the token's signature does not match its key (kid {kid}): it was altered or forged",
                {"kid": kid},
            ) from None
        except jwt.MissingRequiredClaimError as error:
            raise _fail("TOKEN_INVALID", f"the token has no {error.claim} claim") from None
        except jwt.InvalidIssuerError:
            raise _fail(
                "TOKEN_INVALID", f"the token was not issued by Jobwire (iss must be {ISSUER!r})"
            ) from None
        except jwt.InvalidAudienceError:
            raise _fail(
                "TOKEN_INVALID", f"the token is not meant for Jobwire (aud must be {AUDIENCE!r})"
            ) from None
        except jwt.DecodeError as error:
            raise _fail("TOKEN_MALFORMED", f"the token cannot be decoded: {error}") from None
        except jwt.InvalidTokenError as error:
            raise _fail("TOKEN_INVALID", f"the token is not valid: {error}") from None
        return self._principal(claims)

    def _principal(self, claims: dict[str, Any]) -> tuple[Principal, float]:
        """The signed claims as a Principal (and when it stops counting), checked against the clock."""
        now = self._clock()
        leeway = self._leeway
        exp = _number(claims, "exp")
        if now >= exp + leeway:
            expired = _utc(exp)
            raise _fail(
                "TOKEN_EXPIRED",
                f"the token of {_show(claims.get('sub'))} expired at {expired} ({_span(now - exp)} ago); "
                "ask for a new one (jobwire token create)",
                {"expired_at": expired},
            )
        iat = _number(claims, "iat")
        if iat > now + leeway:
            raise _fail(
                "TOKEN_INVALID",
                f"the token was issued in the future ({_utc(iat)}): check the issuer's and server's clocks",
            )
        if claims.get("nbf") is not None:
            nbf = _number(claims, "nbf")
            if nbf > now + leeway:
                raise _fail("TOKEN_INVALID", f"the token is not valid before {_utc(nbf)}")
        subject: str = _checked(claims, "sub", check_subject)
        tenant: str = _checked(claims, "tenant", check_tenant)
        role: Role = _checked(claims, "role", parse_role)
        types = claims.get("types")
        if types is not None:
            if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
                raise _fail(
                    "TOKEN_INVALID", f"the token's types claim must be a list of strings, got {_show(types)}"
                )
            try:
                types = check_type_patterns(types)
            except ValueError as error:
                raise _fail("TOKEN_INVALID", f"the token's types claim is not valid: {error}") from None
        return Principal(subject, tenant, role, types), exp + leeway

    def reload_if_changed(self) -> bool:
        """Re-read the key file if it changed since it was last read; True when new keys are in use.

        On success the cache is emptied, so a key removed from the file stops verifying at once. On
        failure KeyFileError is raised and the old keys stay in use; a file version that failed is not
        tried (nor reported) again, its next change is.
        """
        path = self._keyring.path
        try:
            info = os.stat(path)
            stamp: FileStamp | None = (info.st_ino, info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = None
        if stamp == self._seen_stamp:
            return False
        self._seen_stamp = stamp
        keyring = KeyRing.load(path)
        self._seen_stamp = keyring.stamp  # what was read, should the file have changed since the stat
        self._keyring = keyring
        self._cache.clear()
        return True
