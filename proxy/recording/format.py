"""The recording format: JSON Lines chained by SHA-256, sealed by Ed25519 checkpoints.

Each line is one record, encoded canonically (compact JSON, keys in a fixed order, UTF-8)
and ending in ``\\n``::

    {"v":1,"seq":N,"ts":1700000000.123456,"prev":"<hex>","kind":"request",...}

``prev`` is the SHA-256 (hex) of the previous line's bytes *including* its ``\\n``; the
first record ever written has ``prev`` = 64 zeros. The chain runs on across files: the
first record of a file (``recorder.file`` or ``recorder.chain_reset``) names the file and
its index, and its ``prev`` is the previous file's last line hash.

A ``checkpoint`` seals everything before it: ``from_seq``/``to_seq``, ``head`` (the hash
of line ``to_seq``), the chain id and ``key_id`` (SHA-256 of the raw Ed25519 public key),
and ``sig``: Ed25519 over ``checkpoint_message(record)`` (the record without ``sig``,
sorted-key compact ASCII JSON, behind a domain-separation prefix).

Because every line is canonical, any edit shows up as a line that does not re-encode to
itself, or as a ``prev`` that no longer matches. Lines are encoded with orjson (a tenth of
the json module's cost, on every record the proxy writes); its output is the json
module's compact form except for exponents (``1.5e-7`` for ``1.5e-07``), so a line either
encoder produces from its record is canonical, and files written before orjson still
verify. This module does no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import orjson

FORMAT_VERSION = 1
GENESIS = "0" * 64
REDACTED = "[REDACTED]"

SESSION_START = "session.start"
SESSION_END = "session.end"
REQUEST = "request"
REQUEST_BODY = "request.body"  # a streamed request body, recorded once it was sent
APPROVAL_REQUESTED = "approval.requested"  # a request held for a person's decision
DECISION = "decision"
RESPONSE = "response"
ERROR = "error"
CONFIG_RELOAD = "config.reload"
CHECKPOINT = "checkpoint"
FILE_START = "recorder.file"
CHAIN_RESET = "recorder.chain_reset"
RECOVERED = "recorder.recovered"
RESUMED = "recorder.resumed"
RETENTION = "recorder.retention"
FILE_START_KINDS = frozenset({FILE_START, CHAIN_RESET})
#: The proxy writes a request's first decision into its request record (``action`` and
#: these): one record fewer per request. Older files have a separate ``decision`` record;
#: a held request's outcome is always a ``decision`` record of its own.
DECISION_FIELDS = (
    "action",
    "rule",
    "reason",
    "code",
    "approval_id",
    "approver",
    "scope",
    "held_ms",
)

#: Always redacted, whatever the caller says: they carry the agent's or a user's credentials.
ALWAYS_REDACTED = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
#: Decision ``action`` values counted as denied / held in summaries.
DENIED_ACTIONS = frozenset({"deny", "denied", "reject", "rejected", "expire", "expired"})
#: A held request's first decision record says "held" (a second says how it ended).
HELD_ACTIONS = frozenset({"hold", "held"})

HEAD_KEYS = ("v", "seq", "ts", "prev", "kind")
#: Written right after ``kind`` so the indexer can read them off a line's head with a regex.
INDEXED_KEYS = ("session", "request_id", "action", "status", "mask_spans")
#: Written last: they can be large.
TAIL_KEYS = ("headers", "body")
RESERVED_KEYS = frozenset(HEAD_KEYS)
_KIND = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
_STR = rb'"(?:[^"\\]|\\.)*"'
HEAD_RE = re.compile(
    rb'\{"v":1,"seq":(\d+),"ts":(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?),"prev":"([0-9a-f]{64})",'
    rb'"kind":"([a-z0-9_.]+)"'
    rb"(?:,\"session\":(" + _STR + rb"|null))?"
    rb"(?:,\"request_id\":(" + _STR + rb"|null))?"
    rb"(?:,\"action\":(" + _STR + rb"|null))?"
    rb"(?:,\"status\":(-?\d+|null))?"
    rb"(?:,\"mask_spans\":\[(\{)?)?"
)
_CHECKPOINT_DOMAIN = b"sluice-recording-checkpoint-v1\n"


class Head(NamedTuple):
    """What the indexer and verifier need from a line without parsing its body."""

    seq: int
    ts: float
    prev: str
    kind: str
    session: str | None
    request_id: str | None
    action: str | None
    status: int | None
    masked: bool


_CHECKED_KINDS: set[str] = set()


def check_kind(kind: str) -> None:
    if kind in _CHECKED_KINDS:  # a handful of kinds, checked once each
        return
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise ValueError(f"invalid record kind {kind!r}")
    if len(_CHECKED_KINDS) < 256:
        _CHECKED_KINDS.add(kind)


def line_hash(line: bytes) -> str:
    """The chain link: SHA-256 of a whole line, its trailing newline included."""
    return hashlib.sha256(line).hexdigest()


def encode_record(record: Mapping[str, Any]) -> bytes:
    """The canonical line for a record (with its ``\\n``): re-encoding a parsed line is a no-op."""
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # what orjson refuses (lone surrogates, huge ints) json may still hold
        return _json_line(record)


def _json_line(record: Mapping[str, Any]) -> bytes:
    """The json module's canonical line; raises for a value JSON cannot hold."""
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # lone surrogates (undecodable header bytes): escape them all
        text = json.dumps(record, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        return text.encode("ascii") + b"\n"


def micros(ts: float) -> float:
    """``ts`` to the microsecond, as round(ts, 6) but with integers (it runs per record)."""
    return math.floor(ts * 1_000_000 + 0.5) / 1_000_000


def decision_of(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The decision a record states: a ``decision`` record itself, or the one a
    ``request`` record carries (as if it were a ``decision`` record of the same seq)."""
    kind = record.get("kind")
    if kind == DECISION:
        return dict(record)
    if kind != REQUEST or record.get("action") is None:
        return None
    decision = {key: record[key] for key in (*HEAD_KEYS, "session", "request_id") if key in record}
    decision["kind"] = DECISION
    decision.update((key, record[key]) for key in DECISION_FIELDS if key in record)
    return decision


def build_record(
    seq: int, ts: float, prev: str, kind: str, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """Keys in the canonical order: head, indexed keys, the rest, then headers and body."""
    record: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "seq": seq,
        "ts": micros(ts),
        "prev": prev,
        "kind": kind,
    }
    for key in INDEXED_KEYS:
        if key in fields:
            record[key] = fields[key]
    for key, value in fields.items():
        if key in RESERVED_KEYS:
            raise ValueError(f"field {key!r} is reserved")
        if key not in record and key not in TAIL_KEYS:
            record[key] = value
    for key in TAIL_KEYS:
        if key in fields:
            record[key] = fields[key]
    return record


def parse_line(line: bytes) -> dict[str, Any] | None:
    """A line (without its newline) as a canonical record, or None if it is not one."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or tuple(record)[:5] != HEAD_KEYS:
        return None
    if record["v"] != FORMAT_VERSION or not isinstance(record["seq"], int):
        return None
    if encode_record(record) != line + b"\n" and _json_line(record) != line + b"\n":
        return None
    return record


def is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def _json_str(raw: bytes | None) -> str | None:
    if raw is None or raw == b"null":
        return None
    if b"\\" not in raw:
        return raw[1:-1].decode("utf-8", "replace")
    return str(json.loads(raw))


def parse_head(line: bytes) -> Head | None:
    """The head of a canonical line by regex (fast); falls back to a full parse."""
    match = HEAD_RE.match(line)
    if match is not None:
        status = match.group(8)
        return Head(
            int(match.group(1)),
            float(match.group(2)),
            match.group(3).decode(),
            match.group(4).decode(),
            _json_str(match.group(5)),
            _json_str(match.group(6)),
            _json_str(match.group(7)),
            int(status) if status and status != b"null" else None,
            match.group(9) is not None,
        )
    record = parse_line(line)
    return head_of(record) if record is not None else None


def head_of(record: Mapping[str, Any]) -> Head:
    session, request_id, action = record.get("session"), record.get("request_id"), None
    if isinstance(record.get("action"), str):
        action = record["action"]
    status = record.get("status")
    return Head(
        record["seq"],
        float(record["ts"]),
        str(record["prev"]),
        str(record["kind"]),
        str(session) if session is not None else None,
        str(request_id) if request_id is not None else None,
        action,
        status if isinstance(status, int) else None,
        bool(record.get("mask_spans")),
    )


# --------------------------------------------------------------------------- redaction


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_headers(
    headers: Any, hidden: frozenset[str] = ALWAYS_REDACTED, secrets: Iterable[str] = ()
) -> list[list[str]]:
    """``[[name, value], ...]`` with credential headers and known secret values replaced.

    ``hidden``: lower-case names whose values are replaced, ``ALWAYS_REDACTED`` included.
    """
    secrets = [s for s in secrets if s]
    if headers is None:
        return []
    out: list[list[str]] = []
    for name, value in headers.items() if hasattr(headers, "items") else headers:
        # one pass, converting only what is not already a str: this runs for every
        # request and response the proxy records
        name = name if type(name) is str else str(name)
        value = value if type(value) is str else str(value)
        if name.lower() in hidden:
            out.append([name, REDACTED])
        else:
            out.append([name, _scrub(value, secrets) if secrets else value])
    return out


def redact_url(url: str, secrets: Iterable[str] = ()) -> str:
    """Drops a password from the userinfo and any known secret value from the URL."""
    secrets = [s for s in secrets if s]
    if "@" not in url:  # no userinfo: nothing for urlsplit to find (the common case)
        return _scrub(url, secrets) if secrets else url
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            netloc = f"{parts.username or ''}:{REDACTED}@{host}"
            url = urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return _scrub(url, secrets)


# --------------------------------------------------------------------------- bodies


def body_bytes_of(value: bytes | bytearray | memoryview | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def inline_body(data: bytes) -> dict[str, Any]:
    """UTF-8 text as ``{"text": ...}``; anything else exactly as ``{"b64": ...}``."""
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(data).decode("ascii")}


def truncated_body(data: bytes, keep: int) -> dict[str, Any]:
    """The first ``keep`` bytes, marked: a reader must never mistake them for the whole body."""
    kept = data[:keep]
    try:
        data.decode("utf-8")
        is_text = True
    except UnicodeDecodeError:
        is_text = False
    if is_text:  # cut back to a character boundary so the prefix stays text
        for cut in range(4):
            try:
                text = kept[: len(kept) - cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            kept = kept[: len(kept) - cut]
            return {"truncated": True, "size": len(data), "kept": len(kept), "text": text}
    b64 = base64.b64encode(kept).decode("ascii")
    return {"truncated": True, "size": len(data), "kept": len(kept), "b64": b64}


def blob_ref(digest: str, size: int) -> dict[str, Any]:
    return {"blob": digest, "size": size}


def decode_body(ref: Mapping[str, Any] | None, load_blob: Callable[[str], bytes]) -> bytes:
    """A body reference back to bytes (for a truncated body: the kept prefix)."""
    if not ref:
        return b""
    if "blob" in ref:
        return load_blob(str(ref["blob"]))
    if "text" in ref:
        return str(ref["text"]).encode("utf-8")
    if "b64" in ref:
        return base64.b64decode(str(ref["b64"]))
    return b""


# --------------------------------------------------------------------------- checkpoints


def checkpoint_message(record: Mapping[str, Any]) -> bytes:
    """The bytes a checkpoint's signature covers: every field but ``sig``, canonically."""
    unsigned = {key: value for key, value in record.items() if key != "sig"}
    body = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return _CHECKPOINT_DOMAIN + body.encode("ascii")


def make_checkpoint(
    seq: int,
    ts: float,
    prev: str,
    *,
    from_seq: int,
    chain: str,
    key_id: str,
    sign: Callable[[bytes], bytes],
) -> dict[str, Any]:
    """A signed checkpoint sealing records ``from_seq..seq-1`` (head = ``prev``)."""
    fields = {
        "from_seq": from_seq,
        "to_seq": seq - 1,
        "head": prev,
        "chain": chain,
        "key_id": key_id,
    }
    record = build_record(seq, ts, prev, CHECKPOINT, fields)
    record["sig"] = base64.b64encode(sign(checkpoint_message(record))).decode("ascii")
    return record
