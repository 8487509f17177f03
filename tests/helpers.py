"""Helpers for the proxy integration tests: configs, an in-process proxy, real upstreams.

Everything listens on 127.0.0.1 and nothing here ever contacts another address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from aiohttp import web

from proxy.config import load_config
from proxy.server.runtime import Overrides, ProxyRuntime
from proxy.state import ADMIN_TOKEN_FILE

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def closed_port_url() -> str:
    """An http URL on a loopback port nothing listens on: connecting is refused."""
    return f"http://{LOOPBACK}:{free_port()}"


ALLOW_ALL = [{"name": "allow-all", "action": "allow"}]


def config_text(
    tmp_path: Path,
    *,
    upstreams: Mapping[str, str] | None = None,
    rules: Iterable[Mapping[str, Any]] = ALLOW_ALL,
    limits: Mapping[str, Any] | None = None,
    proxy: Mapping[str, Any] | None = None,
    target_listen: Mapping[str, str] | None = None,
    targets: Iterable[Mapping[str, Any]] | None = None,
) -> str:
    """A TOML config on free loopback ports with its state dir inside ``tmp_path``.

    ``upstreams`` maps target name to upstream URL; ``target_listen`` gives some of them
    a dedicated listener; ``targets`` replaces both with raw target tables.
    """
    proxy_section: dict[str, Any] = {
        "listen": f"{LOOPBACK}:{free_port()}",
        "admin_listen": f"{LOOPBACK}:{free_port()}",
        "state_dir": str(tmp_path / "state"),
        "drain_timeout": "5s",
    }
    proxy_section.update(proxy or {})
    if targets is None:
        targets = []
        for name, url in (upstreams or {}).items():
            table = {"name": name, "upstream": url}
            if target_listen and name in target_listen:
                table["listen"] = target_listen[name]
            targets.append(table)
    document: dict[str, Any] = {
        "proxy": proxy_section,
        "limits": dict(limits or {}),
        "targets": [dict(t) for t in targets],
        "rules": [dict(r) for r in rules],
    }
    return tomli_w.dumps(document)


def write_config(tmp_path: Path, name: str = "sluice.toml", **kwargs: Any) -> Path:
    """Write ``config_text(...)`` to ``tmp_path/name`` and return its path."""
    path = tmp_path / name
    path.write_text(config_text(tmp_path, **kwargs), encoding="utf-8")
    return path


def replace_file(path: Path, text: str) -> None:
    """Save like an editor does: write a temp file next to it, then rename over it."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


@contextlib.asynccontextmanager
async def running_proxy(
    config_path: Path,
    *,
    watch: bool = False,
    ephemeral_ports: bool = True,
) -> AsyncIterator[ProxyRuntime]:
    """A ProxyRuntime started in this event loop, stopped (and drained) on exit.

    With ``ephemeral_ports`` the main and admin listeners bind port 0 through
    ``Overrides`` (no race over a port picked earlier); the runtime reports the real URLs.
    """
    config = load_config(config_path)
    overrides = (
        Overrides(listen=f"{LOOPBACK}:0", admin_listen=f"{LOOPBACK}:0")
        if ephemeral_ports
        else Overrides()
    )
    runtime = ProxyRuntime(config, overrides, watch=watch)
    try:
        await asyncio.wait_for(runtime.start(), 10)
        yield runtime
    finally:
        await asyncio.wait_for(runtime.stop(), 15)


def admin_token(runtime: ProxyRuntime) -> str:
    return (runtime.state_dir / ADMIN_TOKEN_FILE).read_text().strip()


@contextlib.asynccontextmanager
async def upstream_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free 127.0.0.1 port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@dataclass
class RawUpstream:
    """What a raw-socket upstream saw: one entry per accepted connection."""

    url: str = ""
    connections: int = 0
    received: list[bytes] = field(default_factory=list)


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, RawUpstream], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_upstream(handler: RawHandler) -> AsyncIterator[RawUpstream]:
    """An upstream speaking raw bytes, for answers aiohttp would never send."""
    stats = RawUpstream()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats.connections += 1
        try:
            await handler(reader, writer, stats)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(on_connect, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    stats.url = f"http://{LOOPBACK}:{port}"
    try:
        yield stats
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2)


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    """One request head from a raw upstream's reader."""
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def raw_exchange(
    url: str,
    payload: bytes | Iterable[bytes],
    *,
    seconds: float = 5.0,
    delay: float = 0.0,
    one_response: bool = False,
) -> bytes:
    """Send raw bytes (a list is sent piece by piece, ``delay`` apart) and read the
    reply until the server closes or ``seconds`` pass (or, with ``one_response``,
    until one complete response with a Content-Length body has arrived)."""
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    pieces = [payload] if isinstance(payload, bytes) else list(payload)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), seconds)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    received = bytearray()

    async def send() -> None:
        for index, piece in enumerate(pieces):
            if index and delay:
                await asyncio.sleep(delay)
            writer.write(piece)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while (left := deadline - loop.time()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            received += chunk
            if one_response and _complete_response(bytes(received)):
                break
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return bytes(received)


def _complete_response(data: bytes) -> bool:
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def parse_raw_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, lower-cased headers and body of one raw HTTP/1.1 response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def client_session(**kwargs: Any) -> aiohttp.ClientSession:
    """A client that never reads proxy settings from the environment, with a hard timeout."""
    kwargs.setdefault("timeout", aiohttp.ClientTimeout(total=20))
    return aiohttp.ClientSession(trust_env=False, **kwargs)


async def json_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    return json.loads(await response.read())
