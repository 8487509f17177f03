"""Secrets behind encodings: JSON escapes, base64 values, SSE deltas, compression, outbound."""

from __future__ import annotations

import base64
import gzip
import importlib.util
import json
import random
import zlib

import pytest

from proxy.masking import Masker
from proxy.masking.encodings import DecodeError, Decoder, decode_body, mask_json, scan
from proxy.masking.engine import hyperscan_available
from proxy.masking.fakes import fake
from proxy.masking.seen import SeenSecrets
from proxy.masking.sse import SseMasker, json_strings

KEY = b"k"
BACKENDS = ["python", "hyperscan"] if hyperscan_available() else ["python"]


@pytest.fixture(scope="module", params=BACKENDS)
def masker(request: pytest.FixtureRequest) -> Masker:
    return Masker(hmac_key=KEY, backend=request.param)


def token(rule: str = "github-pat", seed: int = 1) -> str:
    return fake(rule, random.Random(seed))[0]


# --- JSON ------------------------------------------------------------------------------


def test_json_escaped_pem_and_slashes(masker: Masker) -> None:
    pem, body = fake("pem-private-key", random.Random(4))
    doc = {
        "private_key": pem,
        "dsn": "postgres://app:Sx9-fq2LmZ0p@db/app",
        "note": "ghp_ in \u00e9t\u00e9",
    }
    raw = json.dumps(doc).replace("/", "\\/").encode()
    result = mask_json(masker, raw)
    assert len(result.masked) == len(raw)
    parsed = json.loads(result.masked)
    assert "Sx9-fq2LmZ0p" not in parsed["dsn"] and parsed["dsn"].startswith("postgres://app:")
    assert (
        parsed["private_key"].startswith("-----BEGIN")
        and body.strip()[:40] not in parsed["private_key"]
    )
    rules = {s.rule for s in result.spans}
    assert {"pem-private-key", "postgres-url-password"} <= rules


def test_json_unicode_escapes_hide_a_token(masker: Masker) -> None:
    secret = token()
    spelled = "".join(f"\\u{ord(c):04x}" if c == "_" else c for c in secret)
    raw = f'{{"t": "{spelled}"}}'.encode()
    assert masker.mask_bytes(raw).spans == []  # the byte scan cannot see it
    result = mask_json(masker, raw)
    assert [s.rule for s in result.spans] == ["github-pat"]
    assert json.loads(result.masked)["t"].startswith(b"ghp\\u005f".decode("unicode_escape")[:3])
    assert secret[4:] not in result.masked.decode()
    assert len(result.masked) == len(raw)


def test_base64_file_contents_are_decoded_masked_and_reencoded(masker: Masker) -> None:
    secret = token("npm-token")
    content = f"registry=https://registry.npmjs.org/\n//registry.npmjs.org/:_authToken={secret}\n"
    encoded = base64.b64encode(content.encode() * 3).decode()
    wrapped = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60)) + "\n"
    raw = json.dumps({"name": ".npmrc", "encoding": "base64", "content": wrapped}).encode()
    result = mask_json(masker, raw)
    assert len(result.masked) == len(raw)
    parsed = json.loads(result.masked)
    decoded = base64.b64decode(parsed["content"]).decode()
    # the generic NAME=value rule overlaps (key _authToken) and masks the npm_ prefix too
    assert secret not in decoded and decoded.count("_authToken=" + "*" * 40) == 3
    assert len(result.spans) == 3 and all(s.rule == "npm-token" for s in result.spans)
    fingerprints = {s.fingerprint for s in result.spans}
    assert fingerprints == {masker.fingerprint(secret.encode())}


def test_json_without_secrets_is_untouched(masker: Masker) -> None:
    raw = json.dumps(
        {"a": "line\nbreak", "b": base64.b64encode(b"hello world, nothing here").decode()}
    )
    assert mask_json(masker, raw.encode()).masked == raw.encode()


# --- SSE -------------------------------------------------------------------------------


def sse_events(deltas: list[str], style: str) -> bytes:
    out = []
    for delta in deltas:
        if style == "openai":
            payload = {"id": "c1", "choices": [{"index": 0, "delta": {"content": delta}}]}
        elif style == "anthropic":
            payload = {
                "type": "content_block_delta",
                "delta": {"type": "text_delta", "text": delta},
            }
        else:
            out.append(f"data: {delta}\n\n")
            continue
        out.append(f"event: x\ndata: {json.dumps(payload)}\n\n")
    return "".join(out).encode()


@pytest.mark.parametrize("style", ["openai", "anthropic", "raw"])
@pytest.mark.parametrize("chunk", [1, 5, 64, 100000])
def test_sse_token_split_across_events(masker: Masker, style: str, chunk: int) -> None:
    secret = token("anthropic-api-key", 3)
    text = f"Here is the key: {secret} and more text.\nBye"
    rng = random.Random(chunk)
    deltas, pos = [], 0
    while pos < len(text):
        step = rng.randint(1, 6)
        deltas.append(text[pos : pos + step])
        pos += step
    raw = sse_events(deltas, style)
    sse = SseMasker(masker)
    out = b"".join(sse.feed(raw[i : i + chunk]) for i in range(0, len(raw), chunk))
    out += sse.flush_idle() + sse.finish()
    assert len(out) == len(raw)
    joined = ""
    for line in out.decode().splitlines():
        if line.startswith("data: "):
            value = line[6:]
            if style == "openai":
                joined += json.loads(value)["choices"][0]["delta"]["content"]
            elif style == "anthropic":
                joined += json.loads(value)["delta"]["text"]
            else:
                joined += value
    assert joined.startswith("Here is the key: sk-ant-" + "*" * (len(secret) - 7) + " and more")
    assert [s.rule for s in sse.spans] == ["anthropic-api-key"]
    span = sse.spans[0]
    assert raw[span.start] == ord("s") and raw[span.end - 1] == ord(secret[-1])


def test_sse_releases_events_without_waiting_when_idle(masker: Masker) -> None:
    sse = SseMasker(masker)
    first = sse.feed(b'data: {"delta": {"text": "hello"}}\n\n')
    assert first + sse.flush_idle() == b'data: {"delta": {"text": "hello"}}\n\n'


def test_json_strings_paths() -> None:
    value = b'{"a": [{"b": "x"}, "y"], "c": {"d": "z\\n"}}'
    paths = [(p, value[s:e]) for p, s, e in json_strings(value) or []]
    assert paths == [("a/0/b", b"x"), ("a/1", b"y"), ("c/d", b"z\\n")]
    assert json_strings(b"plain text") is None


# --- compression -----------------------------------------------------------------------

PLAIN = b"log line with " + token("stripe-secret-key").encode() + b"\n" + b"filler " * 2000


def _brotli(data: bytes) -> bytes:
    return pytest.importorskip("brotli").compress(data)


def _zstd(data: bytes) -> bytes:
    return pytest.importorskip("zstandard").ZstdCompressor().compress(data)


@pytest.mark.parametrize(
    ("coding", "pack"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda d: zlib.compress(d)[2:-4]),  # raw deflate, as some servers send
        ("br", _brotli),
        ("zstd", _zstd),
        ("gzip, br", lambda d: _brotli(gzip.compress(d))),
    ],
)
def test_compressed_bodies_decode_then_mask(masker: Masker, coding: str, pack: object) -> None:
    packed = pack(PLAIN)  # type: ignore[operator]
    assert decode_body(packed, coding) == PLAIN
    decoder = Decoder(coding)
    stream = masker.stream()
    out = b"".join(stream.feed(decoder.feed(packed[i : i + 97])) for i in range(0, len(packed), 97))
    out += stream.feed(decoder.finish()) + stream.finish()
    assert out == masker.mask_bytes(PLAIN).masked
    assert [s.rule for s in stream.spans] == ["stripe-secret-key"]


def test_decode_errors() -> None:
    with pytest.raises(DecodeError, match="unsupported"):
        Decoder("compress")
    with pytest.raises(DecodeError):
        decode_body(gzip.compress(PLAIN)[:-20], "gzip")
    with pytest.raises(DecodeError, match="exceeds"):
        decode_body(gzip.compress(b"\0" * 5_000_000), "gzip", max_size=1_000_000)
    if importlib.util.find_spec("brotli"):
        with pytest.raises(DecodeError):
            decode_body(b"not brotli at all", "br")
    assert decode_body(b"as is", "identity") == b"as is"


# --- outbound --------------------------------------------------------------------------


def test_scan_finds_percent_encoded_and_json_secrets(masker: Masker) -> None:
    secret = token("slack-bot-token")
    query = "channel=C1&token=" + secret.replace("-", "%2D")
    spans = scan(masker, query.encode())
    assert [s.rule for s in spans] == ["slack-bot-token"]
    assert query[spans[0].start : spans[0].end] == secret.replace("-", "%2D")
    body = ('{"msg": "key=' + secret.replace("-", "\\u002d") + '"}').encode()
    assert [s.rule for s in scan(masker, body)] == ["slack-bot-token"]
    assert scan(masker, b"Authorization: Bearer short") == []


def test_seen_secrets_catch_values_masked_earlier_in_any_encoding(masker: Masker) -> None:
    seen = SeenSecrets(KEY)
    password = "Zq8-vT3x!kP2"
    response = f"DATABASE_URL=postgres://app:{password}@db/app\n".encode()
    masked = masker.mask_bytes(response, seen)
    assert password.encode() not in masked.masked and len(seen) == 1
    fingerprint = masked.spans[0].fingerprint
    for outbound in (
        f'{{"note": "pw is {password}"}}',
        "q=" + base64.b64encode(password.encode()).decode(),
        "pw=Zq8-vT3x%21kP2&x=1",
        base64.urlsafe_b64encode(password.encode()).decode().rstrip("="),
    ):
        spans = scan(masker, outbound.encode(), seen)
        assert spans, outbound
        assert any(s.rule == "seen-secret" and s.fingerprint == fingerprint for s in spans)
    assert scan(masker, b"pw is Zq8-vT3x!kP3", seen) == []


def test_seen_secrets_are_bounded_and_store_no_plaintext() -> None:
    seen = SeenSecrets(KEY, max_secrets=3)
    for i in range(10):
        seen.add(f"secret-value-{i:04d}".encode())
    assert len(seen) == 3
    assert not seen.find(b"secret-value-0000")
    assert seen.find(b"x secret-value-0009 y")
    assert b"secret-value" not in repr(vars(seen)).encode()
