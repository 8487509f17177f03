"""Reject ambiguous requests before policy sees them, so policy and upstream agree.

The path policy matches is the path the upstream receives: percent-decoded once, with
no dot segments and no encoded separators that an upstream might decode differently.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from aiohttp import web

_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
#: Forward requests keep ``%2F`` (npm scoped packages, GitLab project ids need it): policy
#: sees it decoded, and dot segments are checked after decoding, so ``%2F..%2F`` is refused.
_ENCODED_BACKSLASH_OR_NUL = re.compile(r"%(5c|00)", re.IGNORECASE)


class BadRequest(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BodyTooLarge(Exception):
    """The body grew past the limit that applies to it."""


@dataclass(frozen=True, slots=True)
class RequestTarget:
    """Where a request goes: the target, the decoded path policy matches, and the same
    path still percent-encoded exactly as the agent sent it, for the upstream."""

    name: str | None
    path: str
    raw_path: str
    raw_query: str


def check_request(
    request: web.Request, fixed_target: str | None, raw_target: str | None = None
) -> RequestTarget:
    """Split off the target and refuse ambiguous paths, or raise BadRequest.

    ``raw_target`` replaces the request-target as sent (the path and query of an
    absolute-form forward request)."""
    headers = request.headers
    if "Transfer-Encoding" in headers and "Content-Length" in headers:
        raise BadRequest("Content-Length and Transfer-Encoding together")
    if len(headers.getall("Content-Length", ())) > 1:
        raise BadRequest("more than one Content-Length")
    if len(headers.getall("Host", ())) > 1:
        raise BadRequest("more than one Host")
    raw_path, _, raw_query = (raw_target or request.raw_path).partition("?")
    if not raw_path.startswith("/"):
        raise BadRequest("request target must be an absolute path")
    forward = raw_target is not None
    if (_ENCODED_BACKSLASH_OR_NUL if forward else _ENCODED_SEPARATOR).search(raw_path):
        raise BadRequest("encoded '/', '\\' or NUL in the path")
    path = request.rel_url.path
    segments = path.split("/")
    if any(segment in (".", "..") for segment in segments) or "\\" in path:
        raise BadRequest("dot segments or backslashes in the path")
    if fixed_target is not None:
        return RequestTarget(fixed_target, path, raw_path, raw_query)
    # No encoded '/' (checked above), so decoded and raw segments correspond one to one.
    raw_segments = raw_path.split("/")
    name = segments[1] if len(segments) > 1 else ""
    return RequestTarget(
        name or None,
        "/" + "/".join(segments[2:]),
        "/" + "/".join(raw_segments[2:]),
        raw_query,
    )


async def read_bounded(request: web.Request, limit: int, deadline: float) -> bytes:
    """Read a whole body for inspection, refusing more than ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(deadline):
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
    return b"".join(chunks)
