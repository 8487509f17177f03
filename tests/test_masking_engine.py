"""The engine's contract: streamed == whole body == pure-Python oracle, with bounded holdback."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.masking import Masker, builtin_rules
from proxy.masking.engine import MaskStream, hyperscan_available
from proxy.masking.fakes import FAKES, fake

KEY = b"test-install-key"
RULE_IDS = sorted(FAKES)
BACKENDS = ["python", "hyperscan"] if hyperscan_available() else ["python"]
needs_hyperscan = pytest.mark.skipif(not hyperscan_available(), reason="hyperscan not installed")

#: Filler that keeps meeting keywords, delimiters and half-finished formats.
FILLER = [
    " ",
    "\n",
    "\r\n",
    "=",
    ":",
    '"',
    "'",
    "&",
    "/",
    "@",
    ".",
    "-",
    "_",
    ",",
    "\\n",
    "x",
    "A9",
    "token",
    "TOKEN=",
    "secret: ",
    "password = ",
    "api_key",
    "://",
    "https://u:",
    "@host",
    "ghp_",
    "gho_",
    "npm_",
    "eyJ",
    "eyJhbGciOiJIUzI1NiJ9.",
    "sk-",
    "sk_live_",
    "AKIA",
    "AIza",
    "xoxb-",
    "-----BEGIN ",
    "-----END ",
    "PRIVATE KEY-----",
    "-----BEGIN CERTIFICATE-----",
    "Bearer ",
    "Basic ",
    "postgres://",
    "redis://:",
    "AccountKey=",
    "hooks.slack.com/",
    "aws_secret_access_key=",
    "AGE-SECRET-KEY-1",
    "hvs.",
    "0123456789abcdefABCDEF",
]


@pytest.fixture(scope="module")
def maskers() -> dict[str, Masker]:
    return {name: Masker(hmac_key=KEY, backend=name) for name in BACKENDS}


def stream_through(
    masker: Masker, data: bytes, cuts: list[int], idle: set[int]
) -> tuple[bytes, MaskStream]:
    stream = masker.stream()
    out, last = [], 0
    for index, cut in enumerate([*sorted(cuts), len(data)]):
        out.append(stream.feed(data[last:cut]))
        last = cut
        assert_holdback(masker, stream)
        if index in idle:
            out.append(stream.flush_idle())
    out.append(stream.finish())
    assert stream.held == 0
    return b"".join(out), stream


def assert_holdback(masker: Masker, stream: MaskStream) -> None:
    """Held back: the longest trigger reach, or from the earliest undecided keyword on."""
    bound = masker.holdback
    if stream.open_from is not None:
        bound = max(bound, stream.total - stream.open_from)
    assert stream.held <= bound


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    rng = random.Random(draw(st.integers(0, 2**32)))
    parts = []
    for _ in range(draw(st.integers(0, 14))):
        if draw(st.booleans()):
            text, _ = fake(draw(st.sampled_from(RULE_IDS)), rng)
            if draw(st.integers(0, 5)) == 0:  # damage it: near misses at every length
                cut = draw(st.integers(0, len(text)))
                text = text[:cut] + draw(st.sampled_from(FILLER)) + text[cut + 1 :]
            parts.append(text)
        else:
            parts.append(draw(st.sampled_from(FILLER)))
    return "".join(parts).encode()


@given(data=documents(), seed=st.integers(0, 2**32))
@settings(
    max_examples=int(os.environ.get("MASKING_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_stream_equals_whole_equals_oracle(
    maskers: dict[str, Masker], data: bytes, seed: int
) -> None:
    rng = random.Random(seed)
    oracle = maskers["python"].mask_bytes(data)
    assert len(oracle.masked) == len(data)
    for masker in maskers.values():
        whole = masker.mask_bytes(data)
        assert whole.masked == oracle.masked
        assert whole.spans == oracle.spans
        cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 12))]
        if rng.random() < 0.2:
            cuts = list(range(len(data)))  # one byte at a time
        idle = {i for i in range(len(cuts) + 1) if rng.random() < 0.3}
        streamed, stream = stream_through(masker, data, cuts, idle)
        assert streamed == oracle.masked
        assert stream.spans == oracle.spans


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_secrets_all_found_across_chunkings(backend: str) -> None:
    masker = Masker(hmac_key=KEY, backend=backend)
    rng = random.Random(7)
    pieces, expected = [], []
    offset = 0
    for rule_id in RULE_IDS * 3:
        text, secret = fake(rule_id, rng)
        filler = f"\nline {rng.random()} of filler text, nothing secret here;\n"
        start = offset + len(filler) + text.index(secret)
        expected.append((start, start + len(secret), rule_id))
        pieces.append(filler + text)
        offset += len(filler) + len(text)
    data = "".join(pieces).encode()
    whole = masker.mask_bytes(data)
    assert [(s.start, s.end, s.rule) for s in whole.spans] == expected
    for size in (1, 7, 64, 4096, 65536):
        cuts = list(range(size, len(data), size))
        streamed, stream = stream_through(masker, data, cuts, set())
        assert streamed == whole.masked
        assert stream.spans == whole.spans


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_length_keeps_prefix_and_line_breaks(backend: str) -> None:
    masker = Masker(hmac_key=KEY, backend=backend)
    rng = random.Random(3)
    token, _ = fake("github-pat", rng)
    pem, body = fake("pem-private-key", rng)
    data = f"token {token} and\n{pem}\n".encode()
    result = masker.mask_bytes(data)
    assert len(result.masked) == len(data)
    assert b"ghp_" + b"*" * 36 in result.masked
    assert result.masked.count(b"\n") == data.count(b"\n")
    assert token[4:].encode() not in result.masked
    start = data.index(body.encode())
    masked_body = result.masked[start : start + len(body)]
    assert set(masked_body.replace(b"\n", b"")) == {ord("*")}
    assert b"-----BEGIN" in result.masked and b"-----END" in result.masked


@pytest.mark.parametrize("backend", BACKENDS)
def test_fingerprint_is_keyed_hmac_and_secret_not_kept(backend: str) -> None:
    rng = random.Random(5)
    token, _ = fake("npm-token", rng)
    data = f"x={token}\n".encode()
    one = Masker(hmac_key=b"key-one", backend=backend).mask_bytes(data).spans[0]
    two = Masker(hmac_key=b"key-two", backend=backend).mask_bytes(data).spans[0]
    assert len(one.fingerprint) == 16 and one.fingerprint != two.fingerprint
    assert token not in repr(one) and token[4:10] not in repr(one.as_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_matches_merge_by_union(backend: str) -> None:
    masker = Masker(hmac_key=KEY, backend=backend)
    rng = random.Random(11)
    jwt, _ = fake("jwt", rng)
    data = f"Authorization: Bearer {jwt}\n".encode()
    spans = masker.mask_bytes(data).spans
    start = data.index(jwt.encode())
    assert [(s.start, s.end) for s in spans] == [(start, start + len(jwt))]
    assert spans[0].rule == "jwt"  # listed before bearer-token


@pytest.mark.parametrize("backend", BACKENDS)
def test_pem_does_not_hold_back_everything(backend: str) -> None:
    """Outside an open PEM block the holdback is the short trigger reach, not 16 KiB."""
    masker = Masker(hmac_key=KEY, backend=backend)
    assert masker.holdback < 300
    stream = masker.stream()
    stream.feed(b"plain text " * 5000)
    assert stream.held <= masker.holdback
    stream.feed(b"-----BEGIN RSA PRIVATE KEY-----\nMIIE")
    assert stream.open_from is not None  # the block is open: held from its start
    stream.feed(b"A" * 64 + b"\n-----END RSA PRIVATE KEY-----\n" + b"more text " * 100)
    assert stream.open_from is None
    assert stream.held <= masker.holdback
    stream.finish()
    assert [s.rule for s in stream.spans] == ["pem-private-key"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_flush_idle_releases_all_that_cannot_start_a_secret(backend: str) -> None:
    masker = Masker(hmac_key=KEY, backend=backend)
    stream = masker.stream()
    first = stream.feed(b"data: hello world, streaming tokens\n")
    assert first == b""  # shorter than the holdback
    assert stream.flush_idle() == b"data: hello world, streaming tokens\n"
    stream.feed(b"data: your key is ghp_")
    released = stream.flush_idle()
    assert released == b"data: your key is "  # ghp_ may still become a token
    stream.feed(b"abc")
    assert stream.flush_idle() == b""
    tail = stream.feed(b" done\n") + stream.flush_idle() + stream.finish()
    assert tail == b"ghp_abc done\n"  # too short to be a token: released unmasked


def test_partial_keyword_at_the_end_is_held_on_idle(maskers: dict[str, Masker]) -> None:
    for masker in maskers.values():
        stream = masker.stream()
        stream.feed(b"a" * 500 + b" -----BEG")
        assert stream.flush_idle().endswith(b"a ")
        assert stream.held == len(b"-----BEG")
        stream.close()


def test_builtin_pack_is_large_and_sourced() -> None:
    rules = builtin_rules()
    assert len(rules) >= 30
    for rule in rules:
        assert rule.source.startswith("https://"), rule.id
        assert rule.keywords and rule.max_len >= 8


def test_unknown_backend_refused_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.masking import engine, keywords

    monkeypatch.setattr(keywords, "hs", None)
    with pytest.raises(RuntimeError):
        engine.Masker(hmac_key=KEY, backend="hyperscan")
    assert engine.Masker(hmac_key=KEY).backend == "python"


@needs_hyperscan
def test_hyperscan_stream_survives_garbage_collection() -> None:
    """The match callback must stay referenced; abandoned streams must not crash."""
    import gc

    masker = Masker(hmac_key=KEY, backend="hyperscan")
    for _ in range(50):
        stream = masker.stream()
        stream.feed(b"token=abc ghp_")
        del stream
        gc.collect()
    assert masker.mask_bytes(b"nothing").masked == b"nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rules_is_a_pass_through(backend: str) -> None:
    masker = Masker([], hmac_key=KEY, backend=backend)
    stream = masker.stream()
    assert stream.feed(b"ghp_anything") == b"ghp_anything"
    assert stream.finish() == b"" and stream.spans == []


def test_bad_masker_arguments() -> None:
    with pytest.raises(ValueError):
        Masker(hmac_key=b"")
    rule = builtin_rules()[0]
    with pytest.raises(ValueError, match="unique"):
        Masker([rule, rule], hmac_key=KEY)
