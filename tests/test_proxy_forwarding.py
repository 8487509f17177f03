"""The proxy end to end over real 127.0.0.1 sockets: policy, headers, streaming, failures."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import (
    LOOPBACK,
    client_session,
    closed_port_url,
    config_text,
    free_port,
    json_of,
    parse_raw_response,
    raw_exchange,
    raw_upstream,
    read_request_head,
    replace_file,
    running_proxy,
    upstream_app,
    write_config,
)

from proxy.server.runtime import ProxyRuntime

MiB = 1024 * 1024


class Recorder:
    """An aiohttp upstream that records each request it handled and answers with JSON."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * MiB)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode("latin-1"),
        }
        self.requests.append(seen)
        return web.json_response({"upstream": "ok", **seen})


def header_names(pairs: list[list[str]]) -> set[str]:
    return {name.lower() for name, _ in pairs}


def header_values(pairs: list[list[str]], name: str) -> list[str]:
    return [value for key, value in pairs if key.lower() == name.lower()]


async def assert_denied(
    response: aiohttp.ClientResponse, rule: str | None, code: str = "denied"
) -> dict[str, Any]:
    assert response.status == 403
    assert response.content_type == "application/json"
    data = await json_of(response)
    assert data["error"] == "denied"
    assert data["rule"] == rule
    assert data["reason"]
    assert data["code"] == code
    assert data["request_id"] == response.headers["X-Sluice-Request-Id"]
    return data


# --------------------------------------------------------------------------- allow / deny


@pytest.mark.asyncio
async def test_allow_reaches_upstream_deny_and_default_deny_do_not(tmp_path: Path) -> None:
    recorder = Recorder()
    rules = [
        {"name": "no-secrets", "action": "deny", "path": "/secret/**", "reason": "not here"},
        {"name": "read-ok", "action": "allow", "method": "GET", "path": "/ok/**"},
    ]
    async with upstream_app(recorder.app()) as url:
        path = write_config(tmp_path, upstreams={"repo": url}, rules=rules)
        async with running_proxy(path) as runtime, client_session() as client:
            base = runtime.main_url
            async with client.get(f"{base}/repo/ok/file.txt?x=1") as response:
                assert response.status == 200
                data = await json_of(response)
                assert data["upstream"] == "ok"
                assert data["path"] == "/ok/file.txt?x=1"
                request_id = response.headers["X-Sluice-Request-Id"]
                assert len(request_id) == 16
                assert header_values(data["headers"], "X-Sluice-Request-Id") == [request_id]
            assert len(recorder.requests) == 1

            async with client.get(f"{base}/repo/secret/key") as response:
                denied = await assert_denied(response, "no-secrets")
                assert denied["reason"] == "not here"
                assert set(denied) == {"error", "reason", "rule", "request_id", "code"}

            async with client.post(f"{base}/repo/ok/file.txt", data=b"x") as response:
                default = await assert_denied(response, None)
                assert "default deny" in default["reason"]

            async with client.get(f"{base}/repo/elsewhere") as response:
                await assert_denied(response, None)
            assert len(recorder.requests) == 1, "a denied request reached the upstream"

            ids = set()
            for target_path in ("/repo/ok/a", "/repo/secret/a", "/repo/nope"):
                async with client.get(base + target_path) as response:
                    ids.add(response.headers["X-Sluice-Request-Id"])
            assert len(ids) == 3, "request ids must be unique per request"


@pytest.mark.asyncio
async def test_body_rules_allow_deny_and_refuse_bodies_too_large_to_inspect(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    rules = [
        {
            "name": "push-main",
            "action": "deny",
            "method": "POST",
            "path": "/push",
            "body": r'"branch"\s*:\s*"main"',
            "reason": "no pushes to main",
        },
        {
            "name": "push-agent",
            "action": "allow",
            "method": "POST",
            "path": "/push",
            "body": r'"branch"\s*:\s*"agent/[a-z-]+"',
        },
        {"name": "reads", "action": "allow", "method": "GET"},
    ]
    async with upstream_app(recorder.app()) as url:
        path = write_config(
            tmp_path,
            upstreams={"repo": url},
            rules=rules,
            limits={"max_body_inspect": "1KiB"},
        )
        async with running_proxy(path) as runtime, client_session() as client:
            push = f"{runtime.main_url}/repo/push"
            agent_body = json.dumps({"branch": "agent/fix-typo"}).encode()
            async with client.post(push, data=agent_body) as response:
                assert response.status == 200
                assert (await json_of(response))["body"] == agent_body.decode()

            async with client.post(push, data=b'{"branch": "main"}') as response:
                await assert_denied(response, "push-main")

            async with client.post(push, data=b'{"branch": "other"}') as response:
                await assert_denied(response, None)

            big = json.dumps({"branch": "agent/ok", "pad": "x" * 2048}).encode()
            async with client.post(push, data=big) as response:
                data = await assert_denied(response, "push-main", code="body_too_large")
                assert "too large" in data["reason"]

            async def chunked_big() -> AsyncIterator[bytes]:
                for _ in range(4):
                    yield b'{"branch": "agent/ok", "pad": "' + b"y" * 600 + b'"}'

            async with client.post(push, data=chunked_big()) as response:
                await assert_denied(response, "push-main", code="body_too_large")

            async with client.get(f"{runtime.main_url}/repo/readme") as response:
                assert response.status == 200
        assert len(recorder.requests) == 2
        assert recorder.requests[0]["body"] == agent_body.decode()


# --------------------------------------------------------------------------- header hygiene


@pytest.mark.asyncio
async def test_hop_by_hop_and_forged_forwarding_headers_never_reach_the_upstream(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    async with upstream_app(recorder.app()) as url:
        path = write_config(tmp_path, upstreams={"repo": url})
        async with running_proxy(path) as runtime:
            host_port = runtime.main_url.removeprefix("http://")
            request = (
                "GET /repo/hdr HTTP/1.1\r\n"
                f"Host: {host_port}\r\n"
                "Connection: X-Custom, keep-alive\r\n"
                "X-Custom: hop-secret\r\n"
                "Keep-Alive: timeout=5\r\n"
                "TE: trailers\r\n"
                "Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n"
                "Proxy-Connection: keep-alive\r\n"
                "Upgrade: websocket\r\n"
                "X-Forwarded-For: 203.0.113.9\r\n"
                "X-Forwarded-Host: evil.example\r\n"
                "X-Forwarded-Proto: https\r\n"
                "Forwarded: for=203.0.113.9\r\n"
                "X-Real-IP: 203.0.113.9\r\n"
                "X-Sluice-Anything: forged\r\n"
                "X-Sluice-Request-Id: forged-id\r\n"
                "X-End-To-End: kept\r\n"
                "\r\n"
            ).encode()
            reply = await raw_exchange(runtime.main_url, request, one_response=True)
        status, headers, _body = parse_raw_response(reply)
        assert status == 200, reply[:300]
        request_id = headers["x-sluice-request-id"]
        assert len(recorder.requests) == 1
        seen = recorder.requests[0]["headers"]
        names = header_names(seen)
        for dropped in (
            "connection",
            "x-custom",
            "keep-alive",
            "te",
            "proxy-authorization",
            "proxy-connection",
            "upgrade",
            "forwarded",
            "x-real-ip",
            "x-sluice-anything",
        ):
            assert dropped not in names, f"{dropped} reached the upstream: {seen}"
        assert "hop-secret" not in json.dumps(seen)
        assert "203.0.113.9" not in json.dumps(seen)
        assert "evil.example" not in json.dumps(seen)
        assert header_values(seen, "X-End-To-End") == ["kept"]
        assert header_values(seen, "X-Forwarded-For") == [LOOPBACK]
        assert header_values(seen, "X-Forwarded-Host") == [host_port]
        assert header_values(seen, "X-Forwarded-Proto") == ["http"]
        assert header_values(seen, "X-Sluice-Request-Id") == [request_id]


@pytest.mark.asyncio
async def test_upstream_hop_by_hop_and_sluice_headers_are_dropped_from_responses(
    tmp_path: Path,
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: Any) -> None:
        await read_request_head(reader)
        body = b"hello"
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/plain\r\n"
            b"Connection: X-Up-Hop, keep-alive\r\n"
            b"X-Up-Hop: hop-value\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Authenticate: Basic realm=up\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Trailer: X-Checksum\r\n"
            b"X-Sluice-Request-Id: forged-by-upstream\r\n"
            b"X-Sluice-Decision: allowed\r\n"
            b"X-Kept: yes\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        await writer.drain()

    async with raw_upstream(answer) as upstream:
        path = write_config(tmp_path, upstreams={"raw": upstream.url})
        async with running_proxy(path) as runtime:
            request = b"GET /raw/x HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n"
            reply = await raw_exchange(runtime.main_url, request, seconds=5)
    status, headers, body = parse_raw_response(reply)
    assert status == 200, reply[:300]
    assert body == b"hello"
    assert headers["x-kept"] == "yes"
    assert headers["content-length"] == "5"
    for dropped in (
        "x-up-hop",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "trailer",
        "x-sluice-decision",
    ):
        assert dropped not in headers, f"{dropped} leaked to the client"
    assert headers.get("connection", "close") == "close"
    assert headers["x-sluice-request-id"] != "forged-by-upstream"
    assert reply.count(b"X-Sluice-Request-Id") == 1
    assert b"forged-by-upstream" not in reply
    assert b"hop-value" not in reply


# --------------------------------------------------------------------------- streaming


def pattern_block(index: int) -> bytes:
    """A deterministic, non-repeating-looking 1 MiB block."""
    seed = hashlib.sha256(struct.pack(">I", index)).digest()
    return seed * (MiB // len(seed))


@pytest.mark.asyncio
async def test_large_upload_and_download_stream_through_intact(tmp_path: Path) -> None:
    size_mib = 50

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {
                "sha256": digest.hexdigest(),
                "size": size,
                "te": request.headers.get("Transfer-Encoding"),
            }
        )

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for index in range(size_mib):
            await response.write(pattern_block(index))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    async with upstream_app(app) as url:
        path = write_config(tmp_path, upstreams={"files": url})
        async with running_proxy(path) as runtime, client_session() as client:
            sent = hashlib.sha256()

            async def body() -> AsyncIterator[bytes]:
                for index in range(size_mib):
                    block = pattern_block(index)
                    sent.update(block)
                    yield block

            async with asyncio.timeout(30):
                async with client.post(f"{runtime.main_url}/files/upload", data=body()) as reply:
                    assert reply.status == 200
                    result = await json_of(reply)
                assert result["size"] == size_mib * MiB
                assert result["sha256"] == sent.hexdigest()
                assert result["te"] == "chunked"

                expected = hashlib.sha256()
                for index in range(size_mib):
                    expected.update(pattern_block(index))
                got = hashlib.sha256()
                size = 0
                async with client.get(f"{runtime.main_url}/files/download") as reply:
                    assert reply.status == 200
                    async for chunk in reply.content.iter_chunked(MiB):
                        got.update(chunk)
                        size += len(chunk)
                assert size == size_mib * MiB
                assert got.hexdigest() == expected.hexdigest()


@pytest.mark.asyncio
async def test_streamed_response_arrives_incrementally(tmp_path: Path) -> None:
    release = asyncio.Event()
    finished = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        # Only continues once the client has seen the first event through the proxy.
        await asyncio.wait_for(release.wait(), 10)
        for index in range(3):
            await asyncio.sleep(0.05)
            await response.write(f"data: more {index}\n\n".encode())
        await response.write_eof()
        finished.set()
        return response

    app = web.Application()
    app.router.add_get("/events", events)
    async with upstream_app(app) as url:
        path = write_config(tmp_path, upstreams={"sse": url})
        async with running_proxy(path) as runtime, client_session() as client:
            async with client.get(f"{runtime.main_url}/sse/events") as reply:
                assert reply.status == 200
                assert reply.headers["Content-Type"] == "text/event-stream"
                first = await asyncio.wait_for(reply.content.readuntil(b"\n\n"), 5)
                assert first == b"data: first\n\n"
                assert not finished.is_set()
                release.set()
                rest = await asyncio.wait_for(reply.read(), 5)
            assert rest == b"data: more 0\n\ndata: more 1\n\ndata: more 2\n\n"
            assert finished.is_set()


# --------------------------------------------------------------------------- compression


@pytest.mark.asyncio
async def test_gzip_upstream_bodies_pass_through_untouched_when_masking_is_off(
    tmp_path: Path,
) -> None:
    original = b"".join(b"line %d of a compressible document\n" % i for i in range(5000))
    compressed = gzip.compress(original)
    assert len(compressed) < len(original) // 5

    async def fixed(_request: web.Request) -> web.Response:
        return web.Response(
            body=compressed,
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )
        await response.prepare(request)
        for start in range(0, len(compressed), 1000):
            await response.write(compressed[start : start + 1000])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/fixed", fixed)
    app.router.add_get("/chunked", chunked)
    async with upstream_app(app) as url:
        target = {"name": "gz", "upstream": url, "masking": {"enabled": False}}
        path = write_config(tmp_path, targets=[target])
        async with running_proxy(path) as runtime:
            base = runtime.main_url
            async with client_session(auto_decompress=False) as raw_client:
                async with raw_client.get(f"{base}/gz/fixed") as reply:
                    assert reply.status == 200
                    body = await reply.read()
                    assert reply.headers["Content-Encoding"] == "gzip"
                    assert reply.headers["Content-Length"] == str(len(compressed))
                    assert "Transfer-Encoding" not in reply.headers
                assert body == compressed
                async with raw_client.get(f"{base}/gz/chunked") as reply:
                    assert reply.status == 200
                    body = await reply.read()
                    assert reply.headers["Content-Encoding"] == "gzip"
                    assert "Content-Length" not in reply.headers
                    assert reply.headers["Transfer-Encoding"] == "chunked"
                assert body == compressed
            async with client_session() as client:
                for name in ("fixed", "chunked"):
                    async with client.get(f"{base}/gz/{name}") as reply:
                        assert await reply.read() == original


@pytest.mark.asyncio
async def test_gzip_bodies_are_decoded_for_masking_with_framing_that_matches(
    tmp_path: Path,
) -> None:
    """With masking on (the default) the agent gets the decoded bytes, and the headers say so."""
    original = b"".join(b"line %d of a compressible document\n" % i for i in range(5000))
    compressed = gzip.compress(original)

    async def fixed(_request: web.Request) -> web.Response:
        return web.Response(
            body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    app = web.Application()
    app.router.add_get("/fixed", fixed)
    async with upstream_app(app) as url:
        path = write_config(tmp_path, upstreams={"gz": url})
        async with (
            running_proxy(path) as runtime,
            client_session(auto_decompress=False) as raw_client,
            raw_client.get(f"{runtime.main_url}/gz/fixed") as reply,
        ):
            assert reply.status == 200
            body = await reply.read()
            assert "Content-Encoding" not in reply.headers
            assert reply.headers.get("Content-Length") in (None, str(len(body)))
        assert body == original


# --------------------------------------------------------------------------- upstream failures


@pytest.mark.asyncio
async def test_upstream_refused_is_502_unreachable(tmp_path: Path) -> None:
    path = write_config(tmp_path, upstreams={"down": closed_port_url()})
    async with running_proxy(path) as runtime, client_session() as client:
        async with client.get(f"{runtime.main_url}/down/x") as reply:
            assert reply.status == 502
            data = await json_of(reply)
        assert data["error"] == "upstream_unreachable"
        assert data["request_id"] == reply.headers["X-Sluice-Request-Id"]


@pytest.mark.asyncio
async def test_upstream_that_closes_without_answering_is_502_reset(tmp_path: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, _writer: Any, _stats: Any) -> None:
        await read_request_head(reader)

    async with raw_upstream(hang_up) as upstream:
        path = write_config(tmp_path, upstreams={"flaky": upstream.url})
        async with running_proxy(path) as runtime, client_session() as client:
            async with client.get(f"{runtime.main_url}/flaky/x") as reply:
                assert reply.status == 502
                data = await json_of(reply)
            assert data["error"] == "upstream_reset"
            assert 1 <= upstream.connections <= 2  # GET is idempotent: one retry is allowed


@pytest.mark.asyncio
async def test_upstream_too_slow_is_504_timeout(tmp_path: Path) -> None:
    done = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        await asyncio.wait_for(done.wait(), 5)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/slow", slow)
    async with upstream_app(app) as url:
        path = write_config(tmp_path, upstreams={"slow": url}, limits={"upstream_timeout": "300ms"})
        async with running_proxy(path) as runtime, client_session() as client:
            started = asyncio.get_running_loop().time()
            async with client.get(f"{runtime.main_url}/slow/slow") as reply:
                assert reply.status == 504
                data = await json_of(reply)
            assert data["error"] == "upstream_timeout"
            assert asyncio.get_running_loop().time() - started < 2.5
            done.set()


@pytest.mark.asyncio
async def test_post_to_a_resetting_upstream_is_not_retried(tmp_path: Path) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: Any) -> None:
        head = await read_request_head(reader)
        stats.received.append(head)
        sock = writer.get_extra_info("socket")
        # SO_LINGER 0: close() sends RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with raw_upstream(reset) as upstream:
        path = write_config(tmp_path, upstreams={"flaky": upstream.url})
        async with running_proxy(path) as runtime, client_session() as client:
            async with client.post(f"{runtime.main_url}/flaky/x", data=b"payload") as reply:
                assert reply.status == 502
                data = await json_of(reply)
            assert data["error"] == "upstream_reset"
            await asyncio.sleep(0.2)
            assert upstream.connections == 1, "a POST was sent to the upstream twice"
            assert len(upstream.received) == 1
            assert upstream.received[0].startswith(b"POST /x ")


# --------------------------------------------------------------------------- body limits


@pytest.mark.asyncio
async def test_body_over_max_size_with_content_length_is_413(tmp_path: Path) -> None:
    recorder = Recorder()
    async with upstream_app(recorder.app()) as url:
        path = write_config(tmp_path, upstreams={"repo": url}, limits={"max_body_size": "4KiB"})
        async with running_proxy(path) as runtime, client_session() as client:
            async with client.post(f"{runtime.main_url}/repo/x", data=b"z" * 5000) as reply:
                assert reply.status == 413
                data = await json_of(reply)
            assert data["error"] == "body_too_large"
            async with client.post(f"{runtime.main_url}/repo/x", data=b"z" * 4096) as reply:
                assert reply.status == 200
    assert [len(r["body"]) for r in recorder.requests] == [4096]


class CompleteBodies:
    """An upstream counting requests whose body it read completely."""

    def __init__(self) -> None:
        self.started = 0
        self.complete = 0
        self.broken = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.started += 1
        try:
            await request.read()
        except Exception:
            self.broken += 1
            raise
        self.complete += 1
        return web.Response(text="got it")


async def post_oversized_chunked(tmp_path: Path) -> tuple[int | None, Any, CompleteBodies]:
    """POST a 256 KiB chunked body through a proxy whose max_body_size is 64 KiB."""
    upstream = CompleteBodies()
    app = web.Application(client_max_size=16 * MiB)
    app.router.add_post("/{tail:.*}", upstream.handle)
    async with upstream_app(app) as url:
        path = write_config(tmp_path, upstreams={"repo": url}, limits={"max_body_size": "64KiB"})
        async with running_proxy(path) as runtime, client_session() as client:

            async def body() -> AsyncIterator[bytes]:
                for _ in range(32):
                    yield b"c" * 8192

            status: int | None = None
            data: Any = None
            try:
                async with client.post(f"{runtime.main_url}/repo/x", data=body()) as reply:
                    status = reply.status
                    data = await json_of(reply)
            except aiohttp.ClientError:
                pass  # the proxy may cut the connection instead of answering
            await asyncio.sleep(0.3)
    return status, data, upstream


@pytest.mark.asyncio
async def test_chunked_body_over_max_size_never_reaches_the_upstream_whole(
    tmp_path: Path,
) -> None:
    status, data, upstream = await post_oversized_chunked(tmp_path)
    assert upstream.complete == 0, "the upstream received the whole oversized body"
    assert status is None or status >= 400, data


@pytest.mark.asyncio
async def test_chunked_body_over_max_size_is_413(tmp_path: Path) -> None:
    status, data, _upstream = await post_oversized_chunked(tmp_path)
    assert status == 413, data
    assert data["error"] == "body_too_large"


@pytest.mark.asyncio
async def test_slow_streamed_request_body_is_408_not_blamed_on_the_upstream(
    tmp_path: Path,
) -> None:
    upstream = CompleteBodies()
    app = web.Application()
    app.router.add_post("/{tail:.*}", upstream.handle)
    async with upstream_app(app) as url:
        path = write_config(tmp_path, upstreams={"repo": url}, limits={"body_timeout": "300ms"})
        async with running_proxy(path) as runtime, client_session() as client:
            gate = asyncio.Event()

            async def body() -> AsyncIterator[bytes]:
                yield b"a" * 100
                await asyncio.wait_for(gate.wait(), 3)  # the agent stalls mid-body
                yield b"b"

            try:
                async with client.post(f"{runtime.main_url}/repo/x", data=body()) as reply:
                    status = reply.status
                    data = await json_of(reply)
            finally:
                gate.set()
            events, _gap = runtime.bus.since(0)
    assert upstream.complete == 0
    assert status == 408, data
    assert data["error"] == "body_timeout"
    assert not [e for e in events if e.data.get("upstream_error")], "blamed on the upstream"


# --------------------------------------------------------------------------- path safety


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "target",
    [
        "/repo/a/%2e%2e/b",
        "/repo/a%2Fb",
        "/repo/a%2fb",
        "/repo/%2e%2e/x",
        "/repo/a/../b",
        "/repo/./a",
        "/repo/a%5Cb",
        "/repo/a%00b",
    ],
)
async def test_ambiguous_paths_are_400(tmp_path: Path, target: str) -> None:
    recorder = Recorder()
    async with upstream_app(recorder.app()) as url:
        path = write_config(tmp_path, upstreams={"repo": url, "x": url})
        async with running_proxy(path) as runtime:
            request = f"GET {target} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n"
            reply = await raw_exchange(runtime.main_url, request.encode(), seconds=5)
    status, headers, body = parse_raw_response(reply)
    assert status == 400, reply[:300]
    data = json.loads(body)
    assert data["error"] == "bad_request"
    assert data["request_id"] == headers["x-sluice-request-id"]
    assert recorder.requests == []


@pytest.mark.asyncio
async def test_unknown_target_is_404(tmp_path: Path) -> None:
    path = write_config(tmp_path, upstreams={"repo": closed_port_url()})
    async with running_proxy(path) as runtime, client_session() as client:
        for target in ("/nope/x", "/"):
            async with client.get(runtime.main_url + target) as reply:
                assert reply.status == 404
                data = await json_of(reply)
            assert data["error"] == "unknown_target"
            assert data["request_id"] == reply.headers["X-Sluice-Request-Id"]


# --------------------------------------------------------------------------- hot reload


def fixed_proxy_section(tmp_path: Path) -> dict[str, str]:
    """The same listen addresses in every version of a config, so reloads change only rules."""
    return {
        "listen": f"{LOOPBACK}:{free_port()}",
        "admin_listen": f"{LOOPBACK}:{free_port()}",
        "state_dir": str(tmp_path / "state"),
    }


async def status_of(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url) as reply:
        await reply.read()
        return reply.status


async def eventually(predicate: Any, seconds: float = 10.0, step: float = 0.1) -> None:
    """Poll ``predicate`` until it holds; fail after ``seconds``."""
    async with asyncio.timeout(seconds):
        while True:
            if await predicate():
                return
            await asyncio.sleep(step)


def events_of(runtime: ProxyRuntime, kind: str) -> list[Any]:
    events, _gap = runtime.bus.since(0)
    return [event for event in events if event.type == kind]


@pytest.mark.asyncio
async def test_hot_reload_swaps_rules_and_keeps_the_last_good_config(tmp_path: Path) -> None:
    recorder = Recorder()
    allow = [{"name": "ok", "action": "allow", "path": "/ok"}]
    deny = [{"name": "ok-closed", "action": "deny", "path": "/ok", "reason": "closed"}]
    async with upstream_app(recorder.app()) as url:
        common = {"upstreams": {"repo": url}, "proxy": fixed_proxy_section(tmp_path)}
        path = tmp_path / "sluice.toml"
        path.write_text(config_text(tmp_path, rules=allow, **common))
        async with running_proxy(path, watch=True) as runtime, client_session() as client:
            ok = f"{runtime.main_url}/repo/ok"
            assert await status_of(client, ok) == 200
            await asyncio.sleep(0.3)  # let the watcher start before the first save

            replace_file(path, config_text(tmp_path, rules=deny, **common))

            async def denied() -> bool:
                return await status_of(client, ok) == 403

            await eventually(denied)
            forwarded = len(recorder.requests)  # polls before the swap were allowed
            assert runtime.holder.reloads == 1
            assert len(events_of(runtime, "config.reloaded")) == 1

            replace_file(path, '[[rules]\nname = "broken"\n')

            async def rejected() -> bool:
                return bool(events_of(runtime, "config.reload_failed"))

            await eventually(rejected)
            assert runtime.holder.last_error is not None
            assert "invalid TOML" in runtime.holder.last_error
            failed = events_of(runtime, "config.reload_failed")[0]
            assert failed.data["path"] == str(path)
            for _ in range(3):
                assert await status_of(client, ok) == 403  # still the last good config
            assert runtime.holder.current.policy.rules[0].name == "ok-closed"

            path.unlink()

            async def rejected_twice() -> bool:
                return len(events_of(runtime, "config.reload_failed")) >= 2

            await eventually(rejected_twice)
            assert "cannot read config" in (runtime.holder.last_error or "")
            assert await status_of(client, ok) == 403
            assert await status_of(client, f"{runtime.main_url}/repo/other") == 403
    assert len(recorder.requests) == forwarded


@pytest.mark.asyncio
async def test_request_in_flight_during_reload_finishes_under_the_old_config(
    tmp_path: Path,
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def blocking(_request: web.Request) -> web.Response:
        entered.set()
        await asyncio.wait_for(release.wait(), 10)
        return web.Response(text="finished")

    app = web.Application()
    app.router.add_get("/{tail:.*}", blocking)
    allow = [{"name": "ok", "action": "allow", "path": "/ok"}]
    deny = [{"name": "ok-closed", "action": "deny", "path": "/ok"}]
    async with upstream_app(app) as url:
        common = {"upstreams": {"repo": url}, "proxy": fixed_proxy_section(tmp_path)}
        path = tmp_path / "sluice.toml"
        path.write_text(config_text(tmp_path, rules=allow, **common))
        async with running_proxy(path) as runtime, client_session() as client:
            ok = f"{runtime.main_url}/repo/ok"

            async def in_flight() -> tuple[int, str]:
                async with client.get(ok) as reply:
                    return reply.status, await reply.text()

            task = asyncio.create_task(in_flight())
            await asyncio.wait_for(entered.wait(), 5)

            replace_file(path, config_text(tmp_path, rules=deny, **common))
            assert runtime.holder.reload(runtime.bus)
            assert runtime.holder.current.policy.rules[0].name == "ok-closed"
            assert await status_of(client, ok) == 403

            release.set()
            assert await asyncio.wait_for(task, 5) == (200, "finished")


# --------------------------------------------------------------------------- dedicated listener


@pytest.mark.asyncio
async def test_target_with_its_own_listener_answers_at_root_paths(tmp_path: Path) -> None:
    recorder = Recorder()
    rules = [{"name": "build-read", "action": "allow", "target": "build", "path": "/api/**"}]
    async with upstream_app(recorder.app()) as url:
        dedicated = f"{LOOPBACK}:{free_port()}"
        path = write_config(
            tmp_path,
            upstreams={"build": url},
            target_listen={"build": dedicated},
            rules=rules,
        )
        async with running_proxy(path) as runtime, client_session() as client:
            assert [listener.name for listener in runtime.listeners] == ["main", "build"]
            assert runtime.listeners[1].url == f"http://{dedicated}"
            async with client.get(f"http://{dedicated}/api/builds/1") as reply:
                assert reply.status == 200
                assert (await json_of(reply))["path"] == "/api/builds/1"
            async with client.get(f"{runtime.main_url}/build/api/builds/2") as reply:
                assert reply.status == 200
            async with client.get(f"http://{dedicated}/other") as reply:
                await assert_denied(reply, None)
    assert [r["path"] for r in recorder.requests] == ["/api/builds/1", "/api/builds/2"]


# --------------------------------------------------------------------------- shutdown


@pytest.mark.asyncio
async def test_stop_stops_accepting_on_every_listener_before_draining(tmp_path: Path) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/slow":
            entered.set()
            await asyncio.wait_for(release.wait(), 10)
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    async with upstream_app(app) as url:
        dedicated = f"{LOOPBACK}:{free_port()}"
        path = write_config(
            tmp_path,
            upstreams={"build": url},
            target_listen={"build": dedicated},
            proxy={"drain_timeout": "3s"},
        )
        async with running_proxy(path) as runtime, client_session() as client:

            async def slow() -> int:
                async with client.get(f"{runtime.main_url}/build/slow") as reply:
                    await reply.read()
                    return reply.status

            in_flight = asyncio.create_task(slow())
            await asyncio.wait_for(entered.wait(), 5)
            stopping = asyncio.create_task(runtime.stop())
            await asyncio.sleep(0.3)  # the main listener is draining now
            try:
                accepted_while_stopping = await status_of(client, f"http://{dedicated}/new")
            except aiohttp.ClientConnectionError:
                accepted_while_stopping = None
            finally:
                release.set()
                assert await asyncio.wait_for(in_flight, 5) == 200
                await asyncio.wait_for(stopping, 10)
    assert accepted_while_stopping is None, "a new request was served after stop() began"
