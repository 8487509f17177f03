"""Helpers for the forward-proxy tests: HTTPS upstreams with trustme certificates, a
proxy whose name resolution is a fixed table (never real DNS), a connector that records
every connect attempt, and raw CONNECT exchanges.

Every address in here is in 127.0.0.0/8; a name the table does not know fails to resolve.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
import trustme
from aiohttp import web
from helpers import LOOPBACK, config_text

from proxy.config import load_config
from proxy.recording.files import list_recordings
from proxy.server.forward import system_connect
from proxy.server.runtime import Overrides, ProxyRuntime
from proxy.tls.ca import LocalCA

#: The names tests use for their upstreams; all resolve to 127.0.0.1 in the test resolver.
TEST_NAMES = ("repo.test", "git.test", "sneaky.test", "localhost")


def static_resolver(table: Mapping[str, list[str]]) -> Callable[[str, int], Any]:
    """A resolver answering from ``table``; unknown names fail like NXDOMAIN."""

    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"test resolver: no such name {host}")
        return list(table[host])

    return resolve


LOOPBACK_NAMES = {name: [LOOPBACK] for name in TEST_NAMES}


@dataclass
class RecordingConnector:
    """Records every tunnel connect attempt; only ever connects inside 127.0.0.0/8."""

    attempts: list[tuple[str, int]] = field(default_factory=list)

    async def __call__(self, address: str, port: int, factory: Any) -> Any:
        self.attempts.append((address, port))
        if not address.startswith("127."):
            raise OSError("test connector: refusing to leave 127.0.0.0/8")
        return await system_connect(address, port, factory)


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HttpsUpstream:
    url: str
    port: int
    seen: list[Seen] = field(default_factory=list)


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or (*TEST_NAMES, LOOPBACK))).configure_cert(context)
    return context


def recording_app(seen: list[Seen], handler: Any = None) -> web.Application:
    """Answers JSON (or ``handler``'s answer) and keeps what it received."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        if handler is not None:
            return await handler(request)
        return web.json_response({"upstream": "ok", "path": request.path_qs})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@contextlib.asynccontextmanager
async def serve(
    app: web.Application, context: ssl.SSLContext | None = None
) -> AsyncIterator[HttpsUpstream]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if context is not None else "http"
    try:
        yield HttpsUpstream(f"{scheme}://{LOOPBACK}:{port}", port)
    finally:
        await runner.cleanup()


def write_forward_config(
    tmp_path: Path,
    *,
    rules: list[dict[str, Any]],
    egress: list[dict[str, Any]] | None = None,
    ca_bundle: Path | None = None,
    identity: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    upstreams: dict[str, str] | None = None,
) -> Path:
    document = tomllib.loads(config_text(tmp_path, rules=rules, upstreams=upstreams))
    document["identity"] = identity or {"mode": "local", "approver_groups": ["approvers"]}
    document["egress"] = egress or []
    forward: dict[str, Any] = {}
    if ca_bundle is not None:
        forward["ca_bundle"] = str(ca_bundle)
    document["forward"] = forward
    document.update(extra or {})
    path = tmp_path / "sluice.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def forward_proxy(
    path: Path,
    *,
    resolver: Any = None,
    connector: Any = None,
    ca_factory: Any = None,
) -> AsyncIterator[ProxyRuntime]:
    runtime = ProxyRuntime(
        load_config(path),
        Overrides(listen=f"{LOOPBACK}:0", admin_listen=f"{LOOPBACK}:0"),
        watch=False,
        resolver=resolver or static_resolver(LOOPBACK_NAMES),
        connector=connector or RecordingConnector(),
        ca_factory=ca_factory,
    )
    try:
        await asyncio.wait_for(runtime.start(), 10)
        yield runtime
    finally:
        await asyncio.wait_for(runtime.stop(), 15)


def token(
    runtime: ProxyRuntime, subject: str = "agent", groups: tuple[str, ...] = ("agents",)
) -> str:
    issuer = runtime.gate.local_issuer if runtime.gate else None
    assert issuer is not None
    return issuer.issue(subject, list(groups), 600)


def basic(token_value: str, user: str = "agent") -> str:
    return "Basic " + base64.b64encode(f"{user}:{token_value}".encode()).decode()


def sluice_ca(runtime: ProxyRuntime) -> LocalCA:
    """The proxy's local CA (the same files the proxy creates lazily)."""
    return LocalCA.load_or_create(runtime.state_dir)


def client_context(cafile: Path | str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def proxy_address(runtime: ProxyRuntime) -> tuple[str, int]:
    host, _, port = runtime.main_url.removeprefix("http://").rpartition(":")
    return host, int(port)


@dataclass
class RawReply:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


async def raw_connect(
    runtime: ProxyRuntime, authority: str, headers: dict[str, str] | None = None
) -> RawReply:
    """Send ``CONNECT authority`` and read the answer's head (and JSON body if any)."""
    host, port = proxy_address(runtime)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    text = head.decode("latin-1").split("\r\n")
    status = int(text[0].split(" ", 2)[1])
    parsed: dict[str, list[str]] = {}
    for line in text[1:]:
        if line:
            name, _, value = line.partition(":")
            parsed.setdefault(name.strip().lower(), []).append(value.strip())
    body = b""
    length = int(parsed.get("content-length", ["0"])[0])
    if length:
        body = await asyncio.wait_for(reader.readexactly(length), 5)
    return RawReply(status, parsed, body, reader, writer)


async def close(reply: RawReply) -> None:
    reply.writer.close()
    with contextlib.suppress(Exception):
        await reply.writer.wait_closed()


def records(state_dir: Path) -> list[dict[str, Any]]:
    """Every record of every recording file, in file order (raw JSON lines)."""
    out = []
    for path in list_recordings(state_dir / "recordings"):
        for line in path.read_bytes().splitlines():
            out.append(json.loads(line))
    return out


def bundle(tmp_path: Path, ca: trustme.CA) -> Path:
    """The upstream's CA as a bundle file the proxy is told to trust."""
    path = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def proxy_client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=20))


async def via_proxy(
    runtime: ProxyRuntime,
    method: str,
    url: str,
    *,
    auth: str | None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request through the proxy with aiohttp's own proxy support (CONNECT for https)."""
    context = ssl.create_default_context(cafile=str(sluice_ca(runtime).cert_path))
    proxy_headers = {"Proxy-Authorization": auth} if auth else None
    if url.startswith("http://") and auth:  # aiohttp sends proxy_headers only on CONNECT
        headers = {**(headers or {}), "Proxy-Authorization": auth}
    async with (
        proxy_client() as client,
        client.request(
            method,
            url,
            proxy=runtime.main_url,
            proxy_headers=proxy_headers,
            ssl=context,
            data=data,
            headers=headers,
        ) as reply,
    ):
        return reply.status, dict(reply.headers), await reply.read()
