"""Malformed and hostile HTTP over raw sockets: the guard answers and the proxy lives on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import (
    client_session,
    parse_raw_response,
    raw_exchange,
    running_proxy,
    upstream_app,
    write_config,
)

from proxy.server.runtime import ProxyRuntime

SECRET_MARKER = "S3CR3T-M4RK3R-b1d2c3"


class Counter:
    def __init__(self) -> None:
        self.requests = 0

    async def handle(self, _request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(text="fine")


@contextlib.asynccontextmanager
async def guarded_proxy(
    tmp_path: Path, **limits: Any
) -> AsyncIterator[tuple[ProxyRuntime, Counter]]:
    counter = Counter()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", counter.handle)
    settings = {"max_header_size": "1KiB", "max_headers": 20, "header_timeout": "5s"}
    settings.update(limits)
    async with upstream_app(app) as url:
        path = write_config(tmp_path, upstreams={"repo": url}, limits=settings)
        async with running_proxy(path) as runtime:
            yield runtime, counter


async def assert_still_serving(runtime: ProxyRuntime, counter: Counter) -> None:
    before = counter.requests
    async with client_session() as client, client.get(f"{runtime.main_url}/repo/ok") as reply:
        assert reply.status == 200
        assert await reply.text() == "fine"
    assert counter.requests == before + 1


def error_of(reply: bytes) -> tuple[int, dict[str, Any]]:
    status, headers, body = parse_raw_response(reply)
    assert headers.get("content-type", "").startswith("application/json"), reply[:300]
    return status, json.loads(body)


def request_head(*lines: str, method: str = "POST", target: str = "/repo/ok") -> bytes:
    """A request line, Host and ``lines``, without the blank line that ends the head."""
    head = f"{method} {target} HTTP/1.1\r\nHost: sluice\r\n" + "".join(f"{x}\r\n" for x in lines)
    return head.encode("latin-1")


@pytest.mark.asyncio
async def test_content_length_with_transfer_encoding_is_400(tmp_path: Path) -> None:
    async with guarded_proxy(tmp_path) as (runtime, counter):
        payload = (
            request_head("Content-Length: 5", "Transfer-Encoding: chunked")
            + b"\r\n0\r\n\r\nGET /repo/smuggled HTTP/1.1\r\nHost: sluice\r\n\r\n"
        )
        reply = await raw_exchange(runtime.main_url, payload, seconds=3)
        status, body = error_of(reply)
        assert status == 400
        assert body["error"] == "bad_request"
        assert reply.count(b"HTTP/1.") == 1, "the smuggled request was answered"
        assert counter.requests == 0
        await assert_still_serving(runtime, counter)


@pytest.mark.asyncio
async def test_duplicate_content_length_is_400(tmp_path: Path) -> None:
    async with guarded_proxy(tmp_path) as (runtime, counter):
        for lengths in (("5", "5"), ("5", "6")):
            payload = (
                request_head(f"Content-Length: {lengths[0]}", f"Content-Length: {lengths[1]}")
                + b"\r\nhello!"
            )
            reply = await raw_exchange(runtime.main_url, payload, seconds=3)
            status, body = error_of(reply)
            assert status == 400, lengths
            assert body["error"] == "bad_request"
        assert counter.requests == 0
        await assert_still_serving(runtime, counter)


@pytest.mark.asyncio
async def test_over_long_header_is_431_and_its_value_never_echoed_or_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    caplog.set_level(logging.DEBUG, logger="sluice")
    caplog.set_level(logging.DEBUG, logger="asyncio")
    # asyncio debug mode makes aiohttp log request errors with their exception attached
    asyncio.get_running_loop().set_debug(True)
    token = "eyJ" + SECRET_MARKER + "x" * 3000
    async with guarded_proxy(tmp_path) as (runtime, counter):
        for line in (f"Authorization: Bearer {token}", f"X-Long-{SECRET_MARKER}: {token}"):
            payload = request_head(line, method="GET") + b"\r\n"
            reply = await raw_exchange(runtime.main_url, payload, seconds=3)
            status, body = error_of(reply)
            assert status == 431, reply[:300]
            assert body["error"] == "headers_too_large"
            assert SECRET_MARKER.encode() not in reply
            assert b"eyJ" not in reply
        # an over-long request line too
        reply = await raw_exchange(
            runtime.main_url,
            f"GET /repo/{SECRET_MARKER}{'y' * 3000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            seconds=3,
        )
        assert error_of(reply)[0] == 431
        assert SECRET_MARKER.encode() not in reply
        assert counter.requests == 0
        await assert_still_serving(runtime, counter)
    asyncio.get_running_loop().set_debug(False)
    assert caplog.records, "expected the guard to log the refusal"
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "") + str(record.exc_info or "")
        assert SECRET_MARKER not in text, f"secret logged by {record.name}: {text[:200]}"
    assert SECRET_MARKER not in caplog.text


@pytest.mark.asyncio
async def test_too_many_headers_is_431(tmp_path: Path) -> None:
    async with guarded_proxy(tmp_path, max_headers=10) as (runtime, counter):
        lines = [f"X-Filler-{i}: {i}" for i in range(30)]
        payload = request_head(*lines, method="GET") + b"\r\n"
        reply = await raw_exchange(runtime.main_url, payload, seconds=3)
        status, body = error_of(reply)
        assert status == 431
        assert body["error"] == "headers_too_large"
        assert counter.requests == 0
        await assert_still_serving(runtime, counter)


@pytest.mark.asyncio
async def test_slow_headers_get_408_and_are_closed(tmp_path: Path) -> None:
    async with guarded_proxy(tmp_path, header_timeout="1s") as (runtime, counter):
        head = b"GET /repo/ok HTTP/1.1\r\nHost: sluice\r\nX-Slow: " + b"z" * 40
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await raw_exchange(
            runtime.main_url, [bytes([b]) for b in head], delay=0.2, seconds=4
        )
        elapsed = loop.time() - started
        assert elapsed < 3.0, f"the slow connection stayed open {elapsed:.1f}s"
        status, body = error_of(reply)
        assert status == 408
        assert body["error"] == "header_timeout"
        assert counter.requests == 0
        await assert_still_serving(runtime, counter)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + SECRET_MARKER.encode() + b"\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6 " + SECRET_MARKER.encode() + b"\r\n\r\n",
        b"\x00\x01\x02\x03 " + SECRET_MARKER.encode() + b" \xff\xfe\r\n\r\n",
        b"GET /repo/ok " + SECRET_MARKER.encode() + b"\r\n\r\n",
    ],
    ids=["tls", "ssh", "binary", "bad-version"],
)
async def test_non_http_garbage_is_400_without_echo(tmp_path: Path, garbage: bytes) -> None:
    async with guarded_proxy(tmp_path) as (runtime, counter):
        reply = await raw_exchange(runtime.main_url, garbage, seconds=3)
        status, body = error_of(reply)
        assert status == 400
        assert body["error"] == "bad_request"
        assert SECRET_MARKER.encode() not in reply
        assert counter.requests == 0
        await assert_still_serving(runtime, counter)


@pytest.mark.asyncio
async def test_connection_cap_refuses_the_fourth_connection(tmp_path: Path) -> None:
    async with guarded_proxy(tmp_path, max_connections=3) as (runtime, counter):
        host, _, port = runtime.main_url.removeprefix("http://").rpartition(":")
        held = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
        try:
            await asyncio.sleep(0.2)  # let the proxy accept all three
            reply = await raw_exchange(
                runtime.main_url, b"GET /repo/ok HTTP/1.1\r\nHost: x\r\n\r\n", seconds=3
            )
            if reply:
                status, body = error_of(reply)
                assert status == 503
                assert body["error"] == "too_many_connections"
            # the held connections still work
            reader, writer = held[0]
            writer.write(b"GET /repo/ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 3)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            assert counter.requests == 1
        finally:
            for _reader, writer in held:
                writer.close()
        await asyncio.sleep(0.2)  # let the proxy see the closes
        await assert_still_serving(runtime, counter)
