"""Bearer tokens: issuing, verifying (every way a token can be wrong), key files, rotation, the CLI."""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from jobwire.server import tokens
from jobwire.server.access import Principal, Role
from jobwire.server.errors import Unauthenticated
from jobwire.server.token_cli import add_token_arguments, run_token
from jobwire.server.tokens import (
    KeyFileError,
    KeyRing,
    TokenVerifier,
    generate_private_key_pem,
    issue_token,
    key_id,
    write_key_file,
)

NOW = 1_900_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys.pem"
    write_key_file(path, rotate=False)
    return path


@pytest.fixture
def ring(key_path: Path) -> KeyRing:
    return KeyRing.load(key_path)


@pytest.fixture
def other_ring() -> KeyRing:
    return KeyRing.from_pem(generate_private_key_pem(), "other.pem")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(ring: KeyRing, clock: Clock) -> TokenVerifier:
    return TokenVerifier(ring, clock=clock)


def issue(ring: KeyRing, **overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "tenant": "acme",
        "role": "submitter",
        "subject": "alice",
        "ttl": 3600.0,
        "now": NOW,
    }
    arguments.update(overrides)
    return issue_token(ring, **arguments)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def signed(ring: KeyRing, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """A token with any claims, really signed by ``ring``'s key: what only a key holder can make."""
    assert ring.signing_key is not None
    head = header if header is not None else {"alg": "EdDSA", "kid": ring.signing_kid, "typ": "JWT"}
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(ring.signing_key.sign(signing_input.encode()))}"


def good_claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": "jobwire",
        "aud": "jobwire",
        "sub": "alice",
        "tenant": "acme",
        "role": "viewer",
        "iat": int(NOW),
        "exp": int(NOW) + 600,
        "jti": "0123456789abcdef",
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not ...}


def refused(verifier: TokenVerifier, token: Any, *reasons: str) -> Unauthenticated:
    """Verifying fails with one of ``reasons``, and a message fit for a log line and an RPC status."""
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token)
    error = caught.value
    assert error.reason in reasons, error.message
    assert "\n" not in error.message and len(error.message) < 300
    if isinstance(token, str) and len(token) > 20:
        assert token not in error.message
    return error


# Issuing and verifying


def test_a_token_round_trips_to_its_principal(ring: KeyRing, verifier: TokenVerifier) -> None:
    token = issue(ring, role="Submitter", types=["reports.*", "email"])
    assert verifier.verify(token) == Principal("alice", "acme", Role.SUBMITTER, ("reports.*", "email"))
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["kid"] == ring.signing_kid
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == claims["aud"] == "jobwire"
    assert claims["iat"] == int(NOW) and claims["exp"] == int(NOW) + 3600
    assert len(claims["jti"]) == 16 and claims["types"] == ["reports.*", "email"]

    plain = issue(ring, role=Role.WORKER, subject="w-1")
    assert verifier.verify(plain) == Principal("w-1", "acme", Role.WORKER, None)
    assert "types" not in jwt.decode(plain, options={"verify_signature": False})


def test_key_id_is_a_sha256_prefix_of_the_raw_public_key(ring: KeyRing) -> None:
    assert ring.signing_key is not None
    public = ring.signing_key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(public) == ring.signing_kid == hashlib.sha256(raw).hexdigest()[:16]
    assert list(ring.verifying_keys) == [ring.signing_kid]


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"role": "root"}, "not a role"),
        ({"tenant": "Bad Tenant"}, "not a tenant"),
        ({"subject": ""}, "subject"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": -5}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"ttl": 3651 * 86400.0}, "10 years"),
        ({"types": []}, "at least one type"),
        ({"types": "a,b"}, "not a string"),
        ({"types": ["bad type"]}, "not a job type"),
    ],
)
def test_issuing_refuses_bad_arguments(ring: KeyRing, overrides: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        issue(ring, **overrides)


# What is refused, and why


def test_an_expired_token_says_when_it_expired(ring: KeyRing, clock: Clock) -> None:
    verifier = TokenVerifier(ring, leeway=30, clock=clock)
    token = issue(ring, ttl=60, now=NOW - 120)  # expired 60 s ago
    error = refused(verifier, token, "TOKEN_EXPIRED")
    assert "2030-03-17T17:45:40Z" in error.message and "1m ago" in error.message
    assert error.metadata == {"expired_at": "2030-03-17T17:45:40Z"}
    # Within the leeway it still counts.
    assert verifier.verify(issue(ring, ttl=60, now=NOW - 80)).subject == "alice"


def test_a_token_from_another_key_ring_is_from_an_unknown_key(
    other_ring: KeyRing, verifier: TokenVerifier
) -> None:
    error = refused(verifier, issue(other_ring), "TOKEN_UNKNOWN_KEY")
    assert f"does not know (kid '{other_ring.signing_kid}')" in error.message


def test_a_known_kid_on_another_keys_signature_is_a_bad_signature(
    ring: KeyRing, other_ring: KeyRing, verifier: TokenVerifier
) -> None:
    assert other_ring.signing_key is not None
    forged = jwt.encode(
        good_claims(role="admin"),
        other_ring.signing_key,
        algorithm="EdDSA",
        headers={"kid": ring.signing_kid},
    )
    refused(verifier, forged, "TOKEN_BAD_SIGNATURE")


def test_a_tampered_payload_is_a_bad_signature(ring: KeyRing, verifier: TokenVerifier) -> None:
    header, _, signature = issue(ring).split(".")
    payload = b64(json.dumps(good_claims(role="admin", tenant="other")).encode())
    refused(verifier, f"{header}.{payload}.{signature}", "TOKEN_BAD_SIGNATURE")
    # A signature cut short or dropped is no better.
    token = issue(ring)
    refused(verifier, token[:-4], "TOKEN_BAD_SIGNATURE", "TOKEN_MALFORMED")
    refused(verifier, token[: token.rindex(".") + 1], "TOKEN_BAD_SIGNATURE", "TOKEN_MALFORMED")


def _hs256_with_public_key(ring: KeyRing) -> str:
    """The classic "alg confusion" forgery: HMAC keyed with the server's public key."""
    secret = ring.public_pem().encode()
    signing_input = (
        f"{b64(json.dumps({'alg': 'HS256', 'kid': ring.signing_kid}).encode())}."
        f"{b64(json.dumps(good_claims(role='admin')).encode())}"
    )
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


MALFORMED: list[tuple[str, Callable[[KeyRing], Any]]] = [
    ("empty", lambda ring: ""),
    ("garbage", lambda ring: "garbage"),
    ("two parts", lambda ring: "abc.def"),
    ("four parts", lambda ring: "a.b.c.d"),
    ("9 KiB", lambda ring: "a" * 9 * 1024),
    ("9 KiB of dots", lambda ring: "a." * 4608),
    ("bearer prefix", lambda ring: "Bearer " + issue(ring)),
    ("non-ASCII", lambda ring: "é.é.é"),
    ("lone surrogate", lambda ring: "\ud800.a.b"),
    ("not a string", lambda ring: b"a.b.c"),
    ("padded", lambda ring: issue(ring).replace(".", "=.", 1)),
    ("header not base64", lambda ring: "!!!!." + issue(ring).split(".", 1)[1]),
    ("header one char too long", lambda ring: "abcde.abcd.abcd"),
    ("header not JSON", lambda ring: f"{b64(b'not json')}.e30.AAAA"),
    ("header not UTF-8", lambda ring: f"{b64(bytes([0xFF, 0xFE, 0x00]))}.e30.AAAA"),
    ("header a list", lambda ring: f"{b64(b'[1,2]')}.e30.AAAA"),
    ("header deeply nested", lambda ring: f"{b64(b'[' * 3000)}.e30.AAAA"),
    ("kid a number", lambda ring: signed(ring, good_claims(), {"alg": "EdDSA", "kid": 7})),
    (
        "HS256",
        lambda ring: jwt.encode(
            good_claims(), "s" * 32, algorithm="HS256", headers={"kid": ring.signing_kid}
        ),
    ),
    ("HS256 keyed with the public key", _hs256_with_public_key),
    (
        "alg none",
        lambda ring: jwt.encode(good_claims(), "", algorithm="none", headers={"kid": ring.signing_kid}),
    ),
    ("no alg", lambda ring: signed(ring, good_claims(), {"kid": ring.signing_kid})),
    ("payload not base64", lambda ring: issue(ring).split(".")[0] + ".@@@@.AAAA"),
    ("payload not JSON", lambda ring: _signed_raw(ring, b"not json")),
    ("payload a list", lambda ring: _signed_raw(ring, b"[1]")),
]


def _signed_raw(ring: KeyRing, payload: bytes) -> str:
    assert ring.signing_key is not None
    signing_input = f"{b64(json.dumps({'alg': 'EdDSA', 'kid': ring.signing_kid}).encode())}.{b64(payload)}"
    return f"{signing_input}.{b64(ring.signing_key.sign(signing_input.encode()))}"


@pytest.mark.parametrize("make", [make for _, make in MALFORMED], ids=[name for name, _ in MALFORMED])
def test_malformed_tokens_are_refused_as_malformed(
    ring: KeyRing, verifier: TokenVerifier, make: Callable[[KeyRing], Any]
) -> None:
    refused(verifier, make(ring), "TOKEN_MALFORMED")


def test_a_wrong_alg_is_named(ring: KeyRing, verifier: TokenVerifier) -> None:
    token = jwt.encode(good_claims(), "", algorithm="none", headers={"kid": ring.signing_kid})
    assert "alg 'none'" in refused(verifier, token, "TOKEN_MALFORMED").message


def test_a_token_without_kid_is_from_an_unknown_key(ring: KeyRing, verifier: TokenVerifier) -> None:
    refused(verifier, signed(ring, good_claims(), {"alg": "EdDSA"}), "TOKEN_UNKNOWN_KEY")


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"role": "root"}, "role"),
        ({"tenant": "Bad Tenant"}, "tenant"),
        ({"tenant": "x" * 5000}, "tenant"),
        ({"tenant": ...}, "tenant"),
        ({"tenant": 5}, "tenant"),
        ({"role": ["admin"]}, "role"),
        ({"sub": "y" * 5000}, "sub"),
        ({"sub": ""}, "sub"),
        ({"sub": ...}, "sub"),
        ({"sub": 42}, "sub"),
        ({"iss": "someone-else"}, "iss"),
        ({"iss": ...}, "iss"),
        ({"aud": "other"}, "aud"),
        ({"aud": ...}, "aud"),
        ({"exp": ...}, "exp"),
        ({"exp": "2030"}, "exp"),
        ({"exp": True}, "exp"),
        ({"exp": float("inf")}, "exp"),
        ({"iat": ...}, "iat"),
        ({"iat": "now"}, "iat"),
        ({"iat": int(NOW) + 3600}, "future"),
        ({"nbf": int(NOW) + 3600}, "not valid before"),
        ({"nbf": "soon"}, "nbf"),
        ({"types": "reports.*"}, "types"),
        ({"types": []}, "types"),
        ({"types": [1]}, "types"),
        ({"types": ["bad type"]}, "types"),
        ({"types": ["t"] * 101}, "types"),
        ({"jti": 5}, "JWT ID"),
    ],
)
def test_bad_claims_are_invalid(
    ring: KeyRing, verifier: TokenVerifier, changes: dict[str, Any], complaint: str
) -> None:
    error = refused(verifier, signed(ring, good_claims(**changes)), "TOKEN_INVALID")
    assert complaint in error.message


def test_no_mutation_of_a_token_is_accepted(ring: KeyRing, verifier: TokenVerifier) -> None:
    token = issue(ring)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "
    rng = random.Random(7)
    for _ in range(300):
        position = rng.randrange(len(token))
        replacement = rng.choice([c for c in alphabet if c != token[position]])
        mutated = token[:position] + replacement + token[position + 1 :]
        refused(
            verifier,
            mutated,
            "TOKEN_MALFORMED",
            "TOKEN_BAD_SIGNATURE",
            "TOKEN_UNKNOWN_KEY",
            "TOKEN_INVALID",
        )
    assert verifier.verify(token).subject == "alice"


# The cache


def test_a_cached_token_stops_verifying_when_it_expires(ring: KeyRing, clock: Clock) -> None:
    verifier = TokenVerifier(ring, leeway=5, clock=clock)
    token = issue(ring, ttl=60)
    assert verifier.verify(token).tenant == "acme"
    assert verifier.cached == 1
    clock.now = NOW + 64  # still inside exp + leeway: served from the cache
    assert verifier.verify(token).tenant == "acme"
    clock.now = NOW + 65
    refused(verifier, token, "TOKEN_EXPIRED")
    assert verifier.cached == 0


def test_repeated_tokens_skip_the_signature_check(
    ring: KeyRing, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[str] = []
    original = TokenVerifier._verify_signed

    def counting(self: TokenVerifier, token: str) -> tuple[Principal, float]:
        checks.append(token)
        return original(self, token)

    monkeypatch.setattr(TokenVerifier, "_verify_signed", counting)
    token = issue(ring)
    for _ in range(5):
        verifier.verify("".join(token))  # an equal string, not the same object: as from each RPC
    assert len(checks) == 1


def test_the_cache_drops_the_least_recently_used(
    ring: KeyRing, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "CACHE_SIZE", 3)
    a, b, c, d = (issue(ring, subject=name) for name in "abcd")
    for token in (a, b, c, a, d):  # a used again, so b is the least recently used when d arrives
        verifier.verify(token)
    assert verifier.cached == 3
    assert set(verifier._cache) == {a, c, d}


# Key files and rotation


def test_rotation_signs_with_the_new_key_and_still_verifies_the_old(key_path: Path, clock: Clock) -> None:
    first = KeyRing.load(key_path)
    old_token = issue(first)
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(key_path, rotate=False)
    new_kid = write_key_file(key_path, rotate=True)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    second = KeyRing.load(key_path)
    assert second.signing_kid == new_kid != first.signing_kid
    assert list(second.verifying_keys) == [new_kid, first.signing_kid]
    new_token = issue(second)
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    verifier = TokenVerifier(second, clock=clock)
    assert verifier.verify(old_token) == verifier.verify(new_token)
    assert [p.name for p in key_path.parent.iterdir()] == ["keys.pem"]  # no temporary file left behind


def test_rotating_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such file"):
        write_key_file(tmp_path / "missing.pem", rotate=True)
    with pytest.raises(KeyFileError, match="no such directory"):
        write_key_file(tmp_path / "nowhere" / "keys.pem", rotate=False)


def test_a_public_keys_file_verifies_but_cannot_issue(key_path: Path, tmp_path: Path, clock: Clock) -> None:
    write_key_file(key_path, rotate=True)
    full = KeyRing.load(key_path)
    public_path = tmp_path / "public.pem"
    public_path.write_text(full.public_pem())
    public = KeyRing.load(public_path)
    assert public.signing_key is None and public.signing_kid is None
    assert list(public.verifying_keys) == list(full.verifying_keys)
    assert TokenVerifier(public, clock=clock).verify(issue(full)).subject == "alice"
    with pytest.raises(KeyFileError, match="holds only public keys; it can verify tokens but not issue them"):
        issue(public)


def test_duplicate_keys_count_once(key_path: Path, tmp_path: Path) -> None:
    text = key_path.read_text()
    doubled = tmp_path / "doubled.pem"
    doubled.write_text(text + KeyRing.load(key_path).public_pem() + text)
    assert len(KeyRing.load(doubled).verifying_keys) == 1


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "no such file"),
        ("", "is empty"),
        ("hello\n", "holds no Ed25519 key"),
        ("MISMATCHED", "without its END line"),
        (b"\x30\x82\xff\x00", "not a PEM text file"),
        (
            "KEY + RSA",
            "block 2 is an RSA key; Jobwire keys are Ed25519 (create one with: jobwire token keygen",
        ),
        ("EC", "block 1 is an EC (ECDSA) key"),
        ("TRUNCATED", "without its END line"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "block 1 is a CERTIFICATE block"),
        (
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "block 1 (PRIVATE KEY) cannot be read",
        ),
        ("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAA\n-----END ENCRYPTED PRIVATE KEY-----\n", "encrypted"),
        ("DIRECTORY", "is a directory"),
    ],
)
def test_unusable_key_files_say_why_in_one_line(
    tmp_path: Path, content: str | bytes | None, complaint: str
) -> None:
    path = tmp_path / "keys.pem"
    ed25519_pem = generate_private_key_pem().decode()
    if content == "KEY + RSA":
        content = ed25519_pem + _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    elif content == "EC":
        content = _pem(ec.generate_private_key(ec.SECP256R1()))
    elif content == "MISMATCHED":
        content = ed25519_pem.replace("BEGIN PRIVATE KEY", "BEGIN PRIV KEY")
    elif content == "TRUNCATED":
        content = ed25519_pem[:60]
    if content == "DIRECTORY":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(KeyFileError) as caught:
        KeyRing.load(path)
    message = str(caught.value)
    assert message.startswith(f"--auth-key-file {path}: ") and complaint in message, message
    assert "\n" not in message


# Reloading


def test_reload_picks_up_a_rotation_and_drops_a_removed_key(key_path: Path, clock: Clock) -> None:
    verifier = TokenVerifier(KeyRing.load(key_path), clock=clock)
    old_token = issue(verifier.keyring)
    assert verifier.verify(old_token).subject == "alice"  # now cached
    assert verifier.reload_if_changed() is False

    new_kid = write_key_file(key_path, rotate=True)
    assert verifier.reload_if_changed() is True
    assert verifier.keyring.signing_kid == new_kid
    new_token = issue(KeyRing.load(key_path))
    assert verifier.verify(new_token).subject == "alice"
    assert verifier.verify(old_token).subject == "alice"

    # The operator retires the old key: keep only the new one (the file's first block).
    key_path.write_text(
        key_path.read_text().split("-----END PRIVATE KEY-----")[0] + "-----END PRIVATE KEY-----\n"
    )
    assert list(KeyRing.load(key_path).verifying_keys) == [new_kid]
    assert verifier.reload_if_changed() is True
    refused(verifier, old_token, "TOKEN_UNKNOWN_KEY")  # though it was cached
    assert verifier.verify(new_token).subject == "alice"


def test_a_broken_reload_keeps_the_old_keys_and_is_reported_once(key_path: Path, clock: Clock) -> None:
    verifier = TokenVerifier(KeyRing.load(key_path), clock=clock)
    token = issue(verifier.keyring)
    key_path.write_text("not a key\n")
    with pytest.raises(KeyFileError, match="holds no Ed25519 key"):
        verifier.reload_if_changed()
    assert verifier.reload_if_changed() is False  # the same broken file: not reported again
    assert verifier.verify(token).subject == "alice"
    key_path.unlink()
    with pytest.raises(KeyFileError, match="no such file"):
        verifier.reload_if_changed()
    assert verifier.reload_if_changed() is False
    assert verifier.verify(token).subject == "alice"
    write_key_file(key_path, rotate=False)  # a new key altogether
    assert verifier.reload_if_changed() is True
    refused(verifier, token, "TOKEN_UNKNOWN_KEY")


# The CLI


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    monkeypatch.delenv("JOBWIRE_AUTH_KEY_FILE", raising=False)
    parser = argparse.ArgumentParser(prog="jobwire token")
    add_token_arguments(parser)

    def run(*argv: str | Path) -> int:
        return run_token(parser.parse_args([str(word) for word in argv]))

    return run


def test_cli_keygen_create_and_public_keys(
    cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.pem"
    assert cli("keygen", "--auth-key-file", path) == 0
    out, err = capsys.readouterr()
    kid = KeyRing.load(path).signing_kid
    assert out == f"created key {kid} in {path}\n"
    assert "reload" in err and "within a few seconds" in err

    assert cli("keygen", "--auth-key-file", path, "--rotate") == 0
    out, _ = capsys.readouterr()
    new_kid = KeyRing.load(path).signing_kid
    assert out == f"added key {new_kid} to {path} (it signs new tokens; the 1 older key still verifies)\n"

    assert (
        cli("create", "--auth-key-file", path, "--tenant", "acme", "--role", "worker", "--types", "a, b.*")
        == 0
    )
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and err == ""
    verifier = TokenVerifier(KeyRing.load(path))
    assert verifier.verify(out.strip()) == Principal("worker@acme", "acme", Role.WORKER, ("a", "b.*"))
    claims = jwt.decode(out.strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] in (30 * 86400, 30 * 86400 + 1)

    assert cli("public-keys", "--auth-key-file", path) == 0
    out, _ = capsys.readouterr()
    assert out.count("BEGIN PUBLIC KEY") == 2 and "PRIVATE" not in out


def test_cli_reads_the_key_file_from_the_environment(
    cli: Callable[..., int],
    key_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JOBWIRE_AUTH_KEY_FILE", str(key_path))
    assert cli("create", "--tenant", "acme", "--role", "admin", "--ttl", "1h30m", "--subject", "ops") == 0
    token = capsys.readouterr().out.strip()
    assert TokenVerifier(KeyRing.load(key_path)).verify(token).subject == "ops"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] in (5400, 5401)


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["keygen", "--auth-key-file", "{key}"], "already exists"),
        (["keygen", "--auth-key-file", "{dir}/new.pem", "--rotate"], "no such file"),
        (["public-keys", "--auth-key-file", "{dir}/missing.pem"], "no such file"),
        (["public-keys"], "pass --auth-key-file PATH or set JOBWIRE_AUTH_KEY_FILE"),
        (
            ["create", "--auth-key-file", "{dir}/missing.pem", "--tenant", "a", "--role", "admin"],
            "no such file",
        ),
        (["create", "--auth-key-file", "{key}", "--tenant", "Bad Tenant", "--role", "admin"], "--tenant: "),
        (["create", "--auth-key-file", "{key}", "--tenant", "acme", "--role", "root"], "--role: not a role"),
        (
            ["create", "--auth-key-file", "{key}", "--tenant", "a", "--role", "admin", "--ttl", "soon"],
            "--ttl: ",
        ),
        (
            ["create", "--auth-key-file", "{key}", "--tenant", "a", "--role", "admin", "--ttl", "0s"],
            "--ttl 0s: ",
        ),
        (
            ["create", "--auth-key-file", "{key}", "--tenant", "a", "--role", "admin", "--ttl", "3651d"],
            "10 years",
        ),
        (
            ["create", "--auth-key-file", "{key}", "--tenant", "a", "--role", "admin", "--types", ","],
            "--types: ",
        ),
        (
            ["create", "--auth-key-file", "{key}", "--tenant", "a", "--role", "admin", "--types", "a b"],
            "--types: ",
        ),
        (
            ["create", "--auth-key-file", "{key}", "--tenant", "a", "--role", "admin", "--subject", ""],
            "--subject: ",
        ),
        (["create", "--auth-key-file", "{public}", "--tenant", "a", "--role", "admin"], "only public keys"),
    ],
)
def test_cli_errors_exit_2_with_one_line(
    cli: Callable[..., int],
    key_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    complaint: str,
) -> None:
    public = tmp_path / "public.pem"
    public.write_text(KeyRing.load(key_path).public_pem())
    words = [word.format(key=key_path, dir=tmp_path, public=public) for word in argv]
    assert cli(*words) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and complaint in err, err


def test_verifying_is_fast(ring: KeyRing) -> None:
    """Every RPC verifies a token: a cache hit must cost next to nothing (generous bounds for slow CI)."""
    verifier = TokenVerifier(ring)
    token = issue(ring, now=None)
    started = time.perf_counter()
    verifier.verify(token)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(1000):
        verifier.verify(token)
    cached = (time.perf_counter() - started) / 1000
    assert cold < 0.05 and cached < 0.0005
