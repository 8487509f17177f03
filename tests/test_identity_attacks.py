"""Hostile bearer tokens: each is refused with 401, reaches no upstream, fetches nothing.

Two levels, one case table: ``TokenVerifier`` with the local issuer's keys (no sockets at
all) and the whole proxy in identity mode "local" with a real upstream that counts what
it receives and a stand-in attacker server (for ``jku`` / ``x5u``) that counts fetches.
Every refusal is ``401`` with ``WWW-Authenticate: Bearer error="invalid_token"`` and a
JSON reason, and no byte of the token shows up in the answer, the events or the logs.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import socket
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from helpers import (
    client_session,
    closed_port_url,
    config_text,
    json_of,
    running_proxy,
    upstream_app,
)

from proxy.identity import IdentityError, KeysUnavailable, TokenVerifier, extract_token
from proxy.identity.local import LocalIssuer, public_jwk
from proxy.identity.oidc import OidcKeys
from proxy.server.runtime import ProxyRuntime

ISSUER = "https://sluice.invalid/realms/dev"
AUDIENCE = "sluice-proxy"
INVALID_TOKEN = 'Bearer error="invalid_token"'
MISSING = object()

# --------------------------------------------------------------------------- forging


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: Any, payload: Any, sign: Callable[[bytes], bytes] | None) -> str:
    """A compact JWS with exactly these members (PyJWT would refuse to write most)."""
    head = b64url(json.dumps(header).encode())
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{head}.{b64url(body)}"
    signature = sign(signing_input.encode()) if sign is not None else b""
    return f"{signing_input}.{b64url(signature)}"


def hmac_signer(secret: bytes, digest: str = "sha256") -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, digest).digest()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def self_signed_der(key: Ed25519PrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class Ctx:
    """What a case needs to build its Authorization header."""

    issuer: LocalIssuer
    attacker_url: str
    attacker_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    now: int = field(default_factory=lambda: int(time.time()))

    @property
    def kid(self) -> str:
        return self.issuer.kid

    @property
    def attacker_jwk(self) -> dict[str, str]:
        return public_jwk(self.attacker_key.public_key())

    def claims(self, **changes: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "agent-7",
            "iat": self.now,
            "nbf": self.now,
            "exp": self.now + 600,
            "jti": "j-" + b64url(hashlib.sha256(str(self.now).encode()).digest())[:12],
            "groups": ["agents"],
        }
        for name, value in changes.items():
            if value is MISSING:
                payload.pop(name, None)
            else:
                payload[name] = value
        return payload

    def signed(self, payload: Any = None, **header: Any) -> str:
        """Signed with the real local key (so only the named defect can fail it)."""
        head = {"alg": "EdDSA", "typ": "JWT", "kid": self.kid, **header}
        head = {k: v for k, v in head.items() if v is not MISSING}
        return forge(head, self.claims() if payload is None else payload, self.issuer.key.sign)

    def by_attacker(self, **header: Any) -> str:
        head = {"alg": "EdDSA", "typ": "JWT", **header}
        return forge(head, self.claims(), self.attacker_key.sign)

    def public_pem(self) -> bytes:
        return self.issuer.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


Case = tuple[str, Callable[[Ctx], str | None], str]
NO_TOKEN = "a bearer token is required"
BAD_ALG = "token algorithm is not accepted"
BAD_SIG = "token signature or claims are invalid"
MALFORMED = "token is malformed"
UNKNOWN_KEY = "token is signed by an unknown key"
BAD_ISSUER = "token issuer is not trusted"
BAD_AUD = "token audience does not match"
BAD_AUD_TYPE = "token claim aud must be a string or a list of strings"


def bearer(build: Callable[[Ctx], str]) -> Callable[[Ctx], str]:
    return lambda ctx: "Bearer " + build(ctx)


def raw(value: str | None) -> Callable[[Ctx], str | None]:
    return lambda ctx: value


def _resolve(value: Any, ctx: Ctx) -> Any:
    return value(ctx) if callable(value) else value


def _alg_none(alg: str, with_kid: bool = True) -> Callable[[Ctx], str]:
    def build(ctx: Ctx) -> str:
        header = {"alg": alg, "typ": "JWT"} | ({"kid": ctx.kid} if with_kid else {})
        return forge(header, ctx.claims(), None)

    return bearer(build)


def _hmac(alg: str, secret: Callable[[Ctx], bytes]) -> Callable[[Ctx], str]:
    """HMAC keyed with something public about the real key (algorithm confusion)."""
    digest = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}[alg]
    return bearer(
        lambda c: forge(
            {"alg": alg, "typ": "JWT", "kid": c.kid}, c.claims(), hmac_signer(secret(c), digest)
        )
    )


def _claims(**changes: Any) -> Callable[[Ctx], str]:
    """Signed with the real key; only the claims differ."""
    return bearer(lambda c: c.signed(c.claims(**{k: _resolve(v, c) for k, v in changes.items()})))


def _header(**fields: Any) -> Callable[[Ctx], str]:
    """Signed with the real key; only the header differs."""
    return bearer(lambda c: c.signed(**fields))


def _attacker(**fields: Any) -> Callable[[Ctx], str]:
    """Signed with the attacker's key; header members may depend on the context."""
    return bearer(lambda c: c.by_attacker(**{k: _resolve(v, c) for k, v in fields.items()}))


def _rs256_foreign(ctx: Ctx) -> str:
    key = rsa.generate_private_key(65537, 2048)
    return forge(
        {"alg": "RS256", "kid": ctx.kid},
        ctx.claims(),
        lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256()),
    )


def _tampered(ctx: Ctx) -> str:
    head, _, signature = ctx.signed().split(".")
    body = b64url(json.dumps(ctx.claims(sub="root", groups=["approvers"])).encode())
    return f"{head}.{body}.{signature}"


def _oversized(ctx: Ctx) -> str:
    token = ctx.signed(ctx.claims(padding="x" * 6400))
    assert 8192 < len(token) < 10000
    return token


def _jku(c: Ctx) -> str:
    return c.attacker_url + "/jwks.json"


def _x5u(c: Ctx) -> str:
    return c.attacker_url + "/cert.pem"


def _attacker_kid(c: Ctx) -> str:
    return c.attacker_jwk["kid"]


def _real_kid(c: Ctx) -> str:
    return c.kid


def _x5c(c: Ctx) -> list[str]:
    return [base64.b64encode(self_signed_der(c.attacker_key)).decode()]


def _pem(c: Ctx) -> bytes:
    return c.public_pem()


def _jwk_json(c: Ctx) -> bytes:
    return json.dumps(c.issuer.jwk).encode()


def _jwk_canonical(c: Ctx) -> bytes:
    return json.dumps(c.issuer.jwk, separators=(",", ":"), sort_keys=True).encode()


def _raw_x(c: Ctx) -> bytes:
    return base64.urlsafe_b64decode(c.issuer.jwk["x"] + "=")


def _basic_with_unsigned(c: Ctx) -> str:
    return basic("agent", forge({"alg": "none"}, c.claims(), None))


def _ago(seconds: int) -> Callable[[Ctx], int]:
    return lambda c: c.now - seconds


def _ahead(seconds: int) -> Callable[[Ctx], int]:
    return lambda c: c.now + seconds


CASES: list[Case] = [
    # alg "none" in every casing, with and without a kid: no signature to check at all
    ("alg-none", _alg_none("none"), BAD_ALG),
    ("alg-None", _alg_none("None"), BAD_ALG),
    ("alg-NONE", _alg_none("NONE"), BAD_ALG),
    ("alg-nOnE", _alg_none("nOnE"), BAD_ALG),
    ("alg-none-no-kid", _alg_none("none", with_kid=False), BAD_ALG),
    ("alg-empty", _alg_none(""), BAD_ALG),
    ("alg-missing", _header(alg=MISSING), BAD_ALG),
    ("alg-rs256-not-configured", bearer(_rs256_foreign), BAD_ALG),
    ("empty-signature", bearer(lambda c: c.signed().rsplit(".", 1)[0] + "."), BAD_SIG),
    ("signature-stripped", bearer(lambda c: c.signed().rsplit(".", 1)[0]), MALFORMED),
    ("payload-tampered", bearer(_tampered), BAD_SIG),
    # HMAC keyed with the published public key, in PEM and JWK form
    ("hs256-public-pem", _hmac("HS256", _pem), BAD_ALG),
    ("hs512-public-pem", _hmac("HS512", _pem), BAD_ALG),
    ("hs256-public-jwk", _hmac("HS256", _jwk_json), BAD_ALG),
    ("hs256-public-jwk-canonical", _hmac("HS256", _jwk_canonical), BAD_ALG),
    ("hs384-public-raw-x", _hmac("HS384", _raw_x), BAD_ALG),
    # required claims missing
    ("exp-missing", _claims(exp=MISSING), "token has no exp claim"),
    ("iat-missing", _claims(iat=MISSING), "token has no iat claim"),
    ("iss-missing", _claims(iss=MISSING), "token claim iss must be a non-empty string"),
    ("aud-missing", _claims(aud=MISSING), BAD_AUD_TYPE),
    ("sub-missing", _claims(sub=MISSING), "token claim sub must be a non-empty string"),
    # claims of the wrong type
    ("exp-numeric-string", _claims(exp="9999999999"), "token claim exp must be a number"),
    ("exp-null", _claims(exp=None), "token claim exp must be a number"),
    ("exp-bool", _claims(exp=True), "token claim exp must be a number"),
    ("iat-bool", _claims(iat=True), "token claim iat must be a number"),
    ("iat-string", _claims(iat="0"), "token claim iat must be a number"),
    ("nbf-string", _claims(nbf="0"), "token claim nbf must be a number"),
    ("iss-int", _claims(iss=1), "token claim iss must be a non-empty string"),
    ("iss-list", _claims(iss=[ISSUER]), "token claim iss must be a non-empty string"),
    ("aud-int", _claims(aud=7), BAD_AUD_TYPE),
    ("aud-empty-list", _claims(aud=[]), BAD_AUD_TYPE),
    ("aud-list-with-int", _claims(aud=[AUDIENCE, 7]), BAD_AUD_TYPE),
    ("aud-object", _claims(aud={"aud": AUDIENCE}), BAD_AUD_TYPE),
    ("sub-int", _claims(sub=1000), "token claim sub must be a non-empty string"),
    ("sub-empty", _claims(sub=""), "token claim sub must be a non-empty string"),
    ("sub-null", _claims(sub=None), "token claim sub must be a non-empty string"),
    ("jti-int", _claims(jti=5), "token claim jti must be a string"),
    ("payload-array", bearer(lambda c: c.signed([c.claims()])), MALFORMED),
    ("payload-not-json", bearer(lambda c: c.signed(b"\xff{not json")), MALFORMED),
    # time
    ("expired", _claims(iat=_ago(7200), nbf=_ago(7200), exp=_ago(3600)), "token has expired"),
    ("nbf-future", _claims(nbf=_ahead(3600), exp=_ahead(7200)), "token is not valid yet"),
    ("iat-future", _claims(iat=_ahead(3600), exp=_ahead(7200)), "token is not valid yet"),
    # issuer near misses
    ("iss-trailing-slash", _claims(iss=ISSUER + "/"), BAD_ISSUER),
    ("iss-upper-case", _claims(iss=ISSUER.upper()), BAD_ISSUER),
    ("iss-other-case-path", _claims(iss=ISSUER.replace("/dev", "/Dev")), BAD_ISSUER),
    ("iss-prefix", _claims(iss=ISSUER[:-1]), BAD_ISSUER),
    ("iss-extended", _claims(iss=ISSUER + "-evil"), BAD_ISSUER),
    ("iss-parent", _claims(iss="https://sluice.invalid"), BAD_ISSUER),
    ("iss-whitespace", _claims(iss=ISSUER + " "), BAD_ISSUER),
    # audience
    ("aud-other", _claims(aud="another-service"), BAD_AUD),
    ("aud-case", _claims(aud=AUDIENCE.upper()), BAD_AUD),
    ("aud-prefix", _claims(aud=AUDIENCE[:-1]), BAD_AUD),
    ("aud-list-without-us", _claims(aud=["a", "b"]), BAD_AUD),
    # key ids
    ("kid-path-traversal", _header(kid="../../etc/passwd"), UNKNOWN_KEY),
    ("kid-path-traversal-attacker", _attacker(kid="../../../../etc/passwd"), UNKNOWN_KEY),
    ("kid-absolute-path", _header(kid="/dev/null"), UNKNOWN_KEY),
    ("kid-nul-byte", _header(kid="a\x00b"), "token key id is invalid"),
    ("kid-sql", _header(kid="' OR '1'='1"), "token key id is invalid"),
    ("kid-int", _header(kid=1), MALFORMED),
    ("kid-10kb", _header(kid="A" * 10240), "token is too large"),
    # keys named by the token itself: never fetched, never trusted
    ("jku-attacker-kid", _attacker(kid=_attacker_kid, jku=_jku), UNKNOWN_KEY),
    ("jku-real-kid", _attacker(kid=_real_kid, jku=_jku), BAD_SIG),
    ("jku-no-kid", _attacker(jku=_jku), BAD_SIG),
    ("x5u-attacker", _attacker(x5u=_x5u), BAD_SIG),
    ("x5u-real-kid", _attacker(kid=_real_kid, x5u=_x5u), BAD_SIG),
    ("jwk-embedded", _attacker(jwk=lambda c: c.attacker_jwk), BAD_SIG),
    ("jwk-embedded-kid", _attacker(kid=_attacker_kid, jwk=lambda c: c.attacker_jwk), UNKNOWN_KEY),
    ("x5c-self-signed", _attacker(x5c=_x5c), BAD_SIG),
    ("x5c-and-jku-real-kid", _attacker(kid=_real_kid, jku=_jku, x5c=_x5c), BAD_SIG),
    ("crit-unknown", _header(crit=["x-attack"], **{"x-attack": 1}), MALFORMED),
    # size and garbage
    ("oversized", bearer(_oversized), "token is too large"),
    ("garbage-word", raw("Bearer garbage"), MALFORMED),
    ("garbage-dots", raw("Bearer a.b.c"), MALFORMED),
    ("garbage-only-dots", raw("Bearer ..."), MALFORMED),
    ("garbage-header-only", raw("Bearer eyJhbGciOiJFZERTQSJ9"), MALFORMED),
    ("garbage-random", raw("Bearer " + b64url(hashlib.sha512(b"x").digest() * 4)), MALFORMED),
    ("garbage-json", raw('Bearer {"payload":"e30","signatures":[]}'), MALFORMED),
    ("token-then-junk", lambda c: "Bearer " + c.signed() + " trailing", MALFORMED),
    # other ways to present (or not present) a token
    ("no-authorization", raw(None), NO_TOKEN),
    ("bearer-empty", raw("Bearer "), NO_TOKEN),
    ("scheme-token", lambda c: "Token " + c.signed(), NO_TOKEN),
    ("scheme-missing", lambda c: c.signed(), NO_TOKEN),
    ("basic-bad-password", raw(basic("agent", "hunter2-not-a-token")), MALFORMED),
    ("basic-empty-password", raw(basic("agent", "")), NO_TOKEN),
    (
        "basic-no-colon",
        lambda c: "Basic " + base64.b64encode(c.signed().encode()).decode(),
        NO_TOKEN,
    ),
    ("basic-not-base64", raw("Basic !!!not-base64!!!"), NO_TOKEN),
    ("basic-password-unsigned", _basic_with_unsigned, BAD_ALG),
]
CASE_IDS = [case[0] for case in CASES]


def secret_fragments(authorization: str | None) -> list[str]:
    """The parts of what the caller sent that must never be echoed or logged."""
    if not authorization:
        return []
    value = authorization.partition(" ")[2] or authorization
    fragments = {value}
    token = extract_token(authorization)
    if token:
        fragments.add(token)
        fragments.update(part for part in token.split(".") if len(part) >= 12)
    return sorted((f for f in fragments if len(f) >= 12), key=len)


# --------------------------------------------------------------------------- unit level


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail (and record) any attempt to resolve a name or open a connection."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError("network use is forbidden in this unit test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def make_verifier(issuer: LocalIssuer, lookups: list[Any], **options: Any) -> TokenVerifier:
    async def keys(kid: str | None, refetch: bool = False) -> Any:
        lookups.append(kid)
        return await issuer.key_for(kid, refetch)

    return TokenVerifier(
        keys=keys,
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=["EdDSA"],
        leeway=5.0,
        max_token_size=options.get("max_token_size", 8192),
    )


@pytest.fixture
def local_issuer(tmp_path: Path) -> LocalIssuer:
    return LocalIssuer(tmp_path / "state", issuer=ISSUER, audience=AUDIENCE)


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "build", "reason"), CASES, ids=CASE_IDS)
async def test_verifier_refuses(
    name: str,
    build: Callable[[Ctx], str | None],
    reason: str,
    local_issuer: LocalIssuer,
    no_network: list[Any],
) -> None:
    ctx = Ctx(local_issuer, "http://127.0.0.1:9")
    authorization = build(ctx)
    token = extract_token(authorization)
    if token is None:
        assert reason == NO_TOKEN, f"{name}: refused before verification, expected {reason!r}"
        return
    lookups: list[Any] = []
    with pytest.raises(IdentityError) as caught:
        await make_verifier(local_issuer, lookups).verify(token)
    assert caught.value.reason == reason
    for fragment in secret_fragments(authorization):
        assert fragment not in str(caught.value)
    # the key set is only ever asked by kid: a URL from the token is never looked up
    assert all(kid is None or "://" not in str(kid) for kid in lookups)
    assert no_network == []


@pytest.mark.asyncio
async def test_verifier_accepts_the_genuine_token(
    local_issuer: LocalIssuer, no_network: list[Any]
) -> None:
    ctx = Ctx(local_issuer, "http://127.0.0.1:9")
    identity = await make_verifier(local_issuer, []).verify(ctx.signed())
    assert identity.subject == "agent-7"
    assert identity.groups == ("agents",)
    issued = local_issuer.issue("agent-8", ["a", "b"], 60)
    assert (await make_verifier(local_issuer, []).verify(issued)).groups == ("a", "b")
    assert no_network == []


@pytest.mark.asyncio
async def test_verifier_checks_kid_shape_even_when_size_allows(
    local_issuer: LocalIssuer,
) -> None:
    ctx = Ctx(local_issuer, "http://127.0.0.1:9")
    verifier = make_verifier(local_issuer, [], max_token_size=65536)
    for kid in ("A" * 10240, "A" * 129):
        with pytest.raises(IdentityError) as caught:
            await verifier.verify(ctx.signed(kid=kid))
        assert caught.value.reason == "token key id is invalid"
    # 128 characters is still a well-formed kid; it just names no key
    with pytest.raises(IdentityError) as caught:
        await verifier.verify(ctx.signed(kid="A" * 128))
    assert caught.value.reason == UNKNOWN_KEY


@pytest.mark.asyncio
async def test_oidc_key_set_fetches_only_configured_urls() -> None:
    """jku/x5u in a token never widen what the OIDC key cache fetches."""
    provider_key = rsa.generate_private_key(65537, 2048)
    provider_issuer = "https://idp.invalid/realms/dev"
    fetched: list[str] = []
    attacker = "https://attacker.invalid"
    public = provider_key.public_key().public_numbers()

    def as_b64(number: int) -> str:
        return b64url(number.to_bytes((number.bit_length() + 7) // 8, "big"))

    async def fetch_json(url: str) -> Any:
        fetched.append(url)
        if url.endswith("/.well-known/openid-configuration"):
            return {"issuer": provider_issuer, "jwks_uri": provider_issuer + "/certs"}
        if url == provider_issuer + "/certs":
            return {
                "keys": [
                    {
                        "kty": "RSA",
                        "kid": "k1",
                        "n": as_b64(public.n),
                        "e": as_b64(public.e),
                        "alg": "RS256",
                        "use": "sig",
                    }
                ]
            }
        raise AssertionError(f"unexpected fetch of {url}")

    keys = OidcKeys(provider_issuer, fetch_json, algorithms=["RS256"], cooldown=0.0)
    verifier = TokenVerifier(
        keys=keys.key_for, issuer=provider_issuer, audience=AUDIENCE, algorithms=["RS256"]
    )
    attacker_key = rsa.generate_private_key(65537, 2048)
    now = int(time.time())
    claims = {"iss": provider_issuer, "aud": AUDIENCE, "sub": "x", "iat": now, "exp": now + 60}

    def rs256(key: rsa.RSAPrivateKey) -> Callable[[bytes], bytes]:
        return lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    for header in (
        {"alg": "RS256", "kid": "evil", "jku": attacker + "/jwks"},
        {"alg": "RS256", "kid": "k1", "jku": attacker + "/jwks"},
        {"alg": "RS256", "x5u": attacker + "/cert.pem"},
        {"alg": "RS256", "kid": "k1", "jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}},
    ):
        with pytest.raises(IdentityError):
            await verifier.verify(forge(header, claims, rs256(attacker_key)))
    assert fetched, "the configured discovery URL was used"
    assert all(not url.startswith(attacker) for url in fetched)
    genuine = await verifier.verify(
        forge({"alg": "RS256", "kid": "k1"}, claims, rs256(provider_key))
    )
    assert genuine.subject == "x"


# --------------------------------------------------------------------------- end to end


@dataclass
class Counter:
    url: str = ""
    requests: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def counting_server(routes: dict[str, Callable[[], web.Response]]) -> AsyncIterator[Counter]:
    counter = Counter()

    async def handle(request: web.Request) -> web.Response:
        counter.requests.append(f"{request.method} {request.path_qs}")
        make = routes.get(request.path)
        return make() if make else web.json_response({"ok": True, "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with upstream_app(app) as url:
        counter.url = url
        yield counter


def identity_config(tmp_path: Path, upstream: str, identity: dict[str, Any]) -> Path:
    document = tomllib.loads(config_text(tmp_path, upstreams={"api": upstream}))
    document["identity"] = identity
    path = tmp_path / "sluice.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


LOCAL_IDENTITY = {"mode": "local", "issuer": ISSUER, "audience": AUDIENCE, "leeway": "5s"}


@dataclass
class Stack:
    runtime: ProxyRuntime
    upstream: Counter
    attacker: Counter
    ctx: Ctx


@contextlib.asynccontextmanager
async def local_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    attacker_key = Ed25519PrivateKey.generate()
    attacker_jwks = {"keys": [public_jwk(attacker_key.public_key())]}
    cert_pem = x509.load_der_x509_certificate(self_signed_der(attacker_key)).public_bytes(
        serialization.Encoding.PEM
    )
    attacker_routes = {
        "/jwks.json": lambda: web.json_response(attacker_jwks),
        "/cert.pem": lambda: web.Response(body=cert_pem, content_type="application/x-pem-file"),
    }
    async with (
        counting_server({}) as upstream,
        counting_server(attacker_routes) as attacker,
        running_proxy(identity_config(tmp_path, upstream.url, LOCAL_IDENTITY)) as runtime,
    ):
        assert runtime.gate is not None and runtime.gate.local_issuer is not None
        ctx = Ctx(runtime.gate.local_issuer, attacker.url, attacker_key=attacker_key)
        yield Stack(runtime, upstream, attacker, ctx)


def capture_debug(caplog: pytest.LogCaptureFixture) -> None:
    for name in ("sluice", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)


def assert_nothing_leaked(
    fragments: list[str], body: str, runtime: ProxyRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    events = json.dumps([event.to_json() for event in runtime.bus.since(0)[0]])
    logs = "\n".join(f"{record.getMessage()} {record.exc_text or ''}" for record in caplog.records)
    for fragment in fragments:
        assert fragment not in body, "token bytes in the answer"
        assert fragment not in events, "token bytes in the events"
        assert fragment not in logs, "token bytes in the logs"
        assert fragment not in caplog.text, "token bytes in the log output"


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "build", "reason"), CASES, ids=CASE_IDS)
async def test_proxy_refuses(
    name: str,
    build: Callable[[Ctx], str | None],
    reason: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    capture_debug(caplog)
    async with local_stack(tmp_path) as stack, client_session() as client:
        authorization = build(stack.ctx)
        headers = {"Authorization": authorization} if authorization is not None else {}
        async with client.get(stack.runtime.main_url + "/api/resource", headers=headers) as reply:
            body = (await reply.read()).decode("utf-8", "replace")
            assert reply.status == 401, body
            assert reply.headers["WWW-Authenticate"] == INVALID_TOKEN
            assert reply.content_type == "application/json"
        document = json.loads(body)
        assert document["error"] == "invalid_token"
        assert document["reason"] == reason
        assert stack.upstream.requests == []
        assert stack.attacker.requests == [], "the proxy fetched a URL named by the token"
        completed = [e for e in stack.runtime.bus.since(0)[0] if e.type == "request.completed"]
        assert [(e.data["status"], e.data["decision"]) for e in completed] == [
            (401, "unauthenticated")
        ]
        assert_nothing_leaked(secret_fragments(authorization), body, stack.runtime, caplog)


@pytest.mark.asyncio
async def test_proxy_accepts_bearer_and_basic_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    capture_debug(caplog)
    async with local_stack(tmp_path) as stack, client_session() as client:
        token = stack.runtime.gate.local_issuer.issue("agent-7", ["agents"], 600)  # type: ignore[union-attr]
        accepted = {
            "bearer": f"Bearer {token}",
            "bearer-lower-case": f"bearer {token}",
            "basic-password": basic("x-access-token", token),
            "basic-empty-user": basic("", token),
        }
        for label, authorization in accepted.items():
            async with client.get(
                stack.runtime.main_url + "/api/ok", headers={"Authorization": authorization}
            ) as reply:
                assert reply.status == 200, (label, await reply.text())
                assert (await json_of(reply))["path"] == "/ok"
        assert len(stack.upstream.requests) == len(accepted)
        # the same token as a Basic password, one byte off: refused, nothing forwarded
        broken = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
        async with client.get(
            stack.runtime.main_url + "/api/ok",
            headers={"Authorization": basic("x-access-token", broken)},
        ) as reply:
            assert reply.status == 401
            assert reply.headers["WWW-Authenticate"] == INVALID_TOKEN
            assert (await json_of(reply))["error"] == "invalid_token"
        assert len(stack.upstream.requests) == len(accepted)
        subjects = {
            e.data.get("subject")
            for e in stack.runtime.bus.since(0)[0]
            if e.type == "request.received"
        }
        assert "agent-7" in subjects
        assert_nothing_leaked(secret_fragments(f"Bearer {token}"), "", stack.runtime, caplog)


@pytest.mark.asyncio
async def test_proxy_survives_a_burst_of_hostile_tokens(tmp_path: Path) -> None:
    """Every case at once over a few connections: still all 401, then a good one passes."""
    async with local_stack(tmp_path) as stack, client_session() as client:
        statuses = []
        for _, build, _ in CASES:
            authorization = build(stack.ctx)
            headers = {"Authorization": authorization} if authorization is not None else {}
            async with client.get(stack.runtime.main_url + "/api/x", headers=headers) as reply:
                statuses.append(reply.status)
        assert set(statuses) == {401}
        good = stack.runtime.gate.local_issuer.issue("agent-7", [], 60)  # type: ignore[union-attr]
        async with client.get(
            stack.runtime.main_url + "/api/x", headers={"Authorization": f"Bearer {good}"}
        ) as reply:
            assert reply.status == 200
        assert len(stack.upstream.requests) == 1
        assert stack.attacker.requests == []


# --------------------------------------------------------------------------- OIDC down


def rs256_token(issuer: str, kid: str | None = "k1") -> str:
    key = rsa.generate_private_key(65537, 2048)
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
    claims = {"iss": issuer, "aud": AUDIENCE, "sub": "agent-7", "iat": now, "exp": now + 600}
    return forge(header, claims, lambda d: key.sign(d, padding.PKCS1v15(), hashes.SHA256()))


@contextlib.asynccontextmanager
async def broken_provider(kind: str) -> AsyncIterator[tuple[str, Counter]]:
    """An issuer whose key set cannot be had, in several different ways."""
    if kind == "refused":
        yield closed_port_url(), Counter()
        return
    issuer_box: list[str] = []
    jwks_answers: dict[str, Callable[[], web.Response]] = {
        "http-500": lambda: web.Response(status=500, text="down"),
        "not-json": lambda: web.Response(text="<html>maintenance</html>"),
        "no-keys": lambda: web.json_response({"keys": []}),
        "symmetric-only": lambda: web.json_response(
            {"keys": [{"kty": "oct", "kid": "k1", "k": b64url(b"s" * 32), "alg": "HS256"}]}
        ),
        "redirect": lambda: web.Response(
            status=302, headers={"Location": "http://127.0.0.1:9/jwks"}
        ),
    }
    routes = {
        "/.well-known/openid-configuration": lambda: web.json_response(
            {"issuer": issuer_box[0], "jwks_uri": issuer_box[0] + "/jwks"}
        ),
        "/jwks": jwks_answers[kind],
    }
    async with counting_server(routes) as provider:
        issuer_box.append(provider.url)
        yield provider.url, provider


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "kind", ["refused", "http-500", "not-json", "no-keys", "symmetric-only", "redirect"]
)
async def test_oidc_without_keys_is_503_never_200(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    capture_debug(caplog)
    async with (
        counting_server({}) as upstream,
        broken_provider(kind) as (issuer, provider),
    ):
        identity = {
            "mode": "oidc",
            "issuer": issuer,
            "audience": AUDIENCE,
            "jwks_cooldown": "0s",
        }
        config = identity_config(tmp_path, upstream.url, identity)
        async with running_proxy(config) as runtime, client_session() as client:
            for kid in ("k1", None, "k1"):
                token = rs256_token(issuer, kid)
                async with client.get(
                    runtime.main_url + "/api/x", headers={"Authorization": f"Bearer {token}"}
                ) as reply:
                    body = await reply.text()
                    assert reply.status == 503, body
                    document = json.loads(body)
                    assert document["error"] == "identity_unavailable"
                assert_nothing_leaked(secret_fragments(f"Bearer {token}"), body, runtime, caplog)
            # a token that is refused on its own merits is still a 401, not a 503
            async with client.get(
                runtime.main_url + "/api/x", headers={"Authorization": "Bearer garbage"}
            ) as reply:
                assert reply.status == 401
        assert upstream.requests == []
        if kind != "refused":
            assert any(
                r.startswith("GET /.well-known/openid-configuration") for r in provider.requests
            )
        # the failure was logged (so the capture works), by type and URL only
        assert any(
            "cannot fetch identity provider keys" in record.getMessage()
            for record in caplog.records
        )


@pytest.mark.asyncio
async def test_oidc_verifier_raises_keys_unavailable_not_identity_error() -> None:
    async def down(url: str) -> Any:
        raise ConnectionRefusedError(url)

    issuer = "http://127.0.0.1:9"
    keys = OidcKeys(issuer, down, algorithms=["RS256"], cooldown=0.0)
    verifier = TokenVerifier(
        keys=keys.key_for, issuer=issuer, audience=AUDIENCE, algorithms=["RS256"]
    )
    with pytest.raises(KeysUnavailable):
        await verifier.verify(rs256_token(issuer))
