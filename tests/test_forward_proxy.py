"""The forward proxy in process: CONNECT and absolute-form requests on the main listener.

Every upstream listens on 127.0.0.1 and the proxy resolves names through a fixed table
(``forward_support.static_resolver``), so nothing here ever leaves 127.0.0.0/8; names
that resolve elsewhere (10.0.0.5, 169.254.169.254) are only ever checked, never
connected to, which the recording connector proves.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from forward_support import (
    LOOPBACK_NAMES,
    RecordingConnector,
    Seen,
    basic,
    bundle,
    close,
    forward_proxy,
    proxy_client,
    raw_connect,
    recording_app,
    records,
    serve,
    server_context,
    sluice_ca,
    static_resolver,
    token,
    via_proxy,
    write_forward_config,
)
from helpers import admin_token, parse_raw_response, raw_exchange
from yarl import URL

from proxy.config import ConfigError, load_config
from proxy.events import Event
from proxy.masking.fakes import fake
from proxy.server.forward import system_resolve
from proxy.server.runtime import ProxyRuntime

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
GH = fake("github-pat", random.Random(101))[0]
GH_OUT = fake("github-pat", random.Random(105))[0]
UPSTREAM_CA = trustme.CA()
SOURCE_ROOT = Path(__file__).resolve().parent.parent
ALLOW_ALL = [{"name": "allow-all", "action": "allow"}]
PRIVATE_OK = [{"name": "tests", "host": "*.test", "allow_private": True}]


class Events:
    def __init__(self, runtime: ProxyRuntime) -> None:
        self.items: list[Event] = []
        runtime.bus.add_listener(self.items.append)

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e.data
            for e in self.items
            if e.type == kind and all(e.data.get(k) == v for k, v in match.items())
        ]


# --------------------------------------------------------------------------- identity


async def test_connect_without_or_with_a_bad_token_gets_407(tmp_path: Path) -> None:
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK)
    connector = RecordingConnector()
    async with forward_proxy(path, connector=connector) as runtime:
        for headers in ({}, {"Proxy-Authorization": "Bearer not-a-token"}):
            reply = await raw_connect(runtime, "repo.test:443", headers)
            assert reply.status == 407
            assert sorted(reply.headers["proxy-authenticate"]) == [
                'Basic realm="sluice"',
                'Bearer realm="sluice"',
            ]
            body = json.loads(reply.body)
            assert body["error"] == "proxy_auth_required"
            assert "not-a-token" not in reply.body.decode()
            await close(reply)
    assert connector.attempts == []


async def test_bearer_and_basic_proxy_authorization_are_both_accepted(tmp_path: Path) -> None:
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK)
    async with (
        serve(recording_app([]), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        agent = token(runtime)
        for auth in (f"Bearer {agent}", basic(agent)):
            reply = await raw_connect(
                runtime, f"repo.test:{up.port}", {"Proxy-Authorization": auth}
            )
            assert reply.status == 200, reply.body
            await close(reply)


async def test_absolute_form_needs_a_proxy_token_too(tmp_path: Path) -> None:
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK)
    seen: list[Seen] = []
    async with serve(recording_app(seen)) as up, forward_proxy(path) as runtime:
        url = f"http://repo.test:{up.port}/hello"
        status, headers, body = await via_proxy(runtime, "GET", url, auth=None)
        assert status == 407
        assert "Proxy-Authenticate" in headers
        assert seen == []
        agent = token(runtime)
        status, _, body = await via_proxy(runtime, "GET", url, auth=basic(agent))
        assert status == 200, body
        assert json.loads(body)["path"] == "/hello"
        # Proxy-Authorization is Sluice's, never the destination's
        assert "Proxy-Authorization" not in seen[0].headers
        assert seen[0].headers["Host"] == f"repo.test:{up.port}"


async def test_identity_mode_none_needs_no_token(tmp_path: Path) -> None:
    path = write_forward_config(
        tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK, identity={"mode": "none"}
    )
    seen: list[Seen] = []
    async with serve(recording_app(seen)) as up, forward_proxy(path) as runtime:
        status, _, _ = await via_proxy(runtime, "GET", f"http://repo.test:{up.port}/", auth=None)
        assert status == 200
        reply = await raw_connect(runtime, f"repo.test:{up.port}")
        assert reply.status == 200
        await close(reply)


# --------------------------------------------------------------------------- policy


async def test_denied_host_is_refused_before_connecting(tmp_path: Path) -> None:
    rules = [
        {"name": "no-sneaky", "host": "sneaky.test", "action": "deny", "reason": "not there"},
        *ALLOW_ALL,
    ]
    path = write_forward_config(tmp_path, rules=rules, egress=PRIVATE_OK)
    connector = RecordingConnector()
    seen: list[Seen] = []
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path, connector=connector) as runtime,
    ):
        auth = {"Proxy-Authorization": f"Bearer {token(runtime)}"}
        reply = await raw_connect(runtime, f"sneaky.test:{up.port}", auth)
        assert reply.status == 403
        body = json.loads(reply.body)
        assert (body["error"], body["rule"], body["reason"]) == ("denied", "no-sneaky", "not there")
        await close(reply)
        status, _, raw = await via_proxy(
            runtime, "GET", f"http://sneaky.test:{up.port}/x", auth=auth["Proxy-Authorization"]
        )
        assert status == 403 and json.loads(raw)["rule"] == "no-sneaky"
    assert seen == [] and connector.attempts == []
    assert runtime.forward is not None and runtime.forward.pins.lookups == 0


async def test_denied_port_is_refused_before_connecting(tmp_path: Path) -> None:
    seen: list[Seen] = []
    async with serve(recording_app(seen), server_context(UPSTREAM_CA)) as up:
        rules = [
            {"name": "repo-https", "host": "repo.test", "port": up.port, "action": "allow"},
            {"name": "other-ports", "host": "repo.test", "action": "deny", "reason": "port"},
        ]
        egress = [{"name": "repo", "host": "repo.test", "allow_private": True}]
        path = write_forward_config(tmp_path, rules=rules, egress=egress)
        connector = RecordingConnector()
        async with forward_proxy(path, connector=connector) as runtime:
            auth = {"Proxy-Authorization": f"Bearer {token(runtime)}"}
            for port in (22, 8443):
                reply = await raw_connect(runtime, f"repo.test:{port}", auth)
                assert reply.status == 403
                assert json.loads(reply.body)["rule"] == "other-ports"
                await close(reply)
            reply = await raw_connect(runtime, f"repo.test:{up.port}", auth)
            assert reply.status == 200
            await close(reply)
    assert seen == [] and connector.attempts == []


async def test_passthrough_without_an_allowing_rule_is_default_denied(tmp_path: Path) -> None:
    egress = [{"name": "opaque", "host": "*.test", "tls": "passthrough", "allow_private": True}]
    path = write_forward_config(tmp_path, rules=[], egress=egress)
    connector = RecordingConnector()
    async with forward_proxy(path, connector=connector) as runtime:
        auth = {"Proxy-Authorization": f"Bearer {token(runtime)}"}
        reply = await raw_connect(runtime, "repo.test:443", auth)
        assert reply.status == 403
        assert "default deny" in json.loads(reply.body)["reason"]
        await close(reply)
    assert connector.attempts == []


# --------------------------------------------------------------------------- addresses


async def test_a_name_resolving_to_loopback_is_refused_unless_named(tmp_path: Path) -> None:
    """No egress entry, an allow-all rule: loopback is still out of reach."""
    path = write_forward_config(tmp_path, rules=ALLOW_ALL)
    connector = RecordingConnector()
    seen: list[Seen] = []
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path, connector=connector) as runtime,
    ):
        events = Events(runtime)
        auth = f"Bearer {token(runtime)}"
        reply = await raw_connect(runtime, f"sneaky.test:{up.port}", {"Proxy-Authorization": auth})
        assert reply.status == 403
        body = json.loads(reply.body)
        assert body["error"] == "destination_refused"
        assert "127.0.0.1" in body["reason"] and "loopback" in body["reason"]
        await close(reply)
        status, _, raw = await via_proxy(
            runtime, "GET", f"http://sneaky.test:{up.port}/", auth=auth
        )
        assert status == 403 and json.loads(raw)["code"] == "destination_refused"
        done = events.of("request.completed", status=403)
        assert len(done) == 2
    assert seen == [] and connector.attempts == []


async def test_localhost_through_the_system_resolver_is_refused(tmp_path: Path) -> None:
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, identity={"mode": "none"})
    connector = RecordingConnector()
    seen: list[Seen] = []
    async with (
        serve(recording_app(seen)) as up,
        forward_proxy(path, resolver=system_resolve, connector=connector) as runtime,
    ):
        reply = await raw_connect(runtime, f"localhost:{up.port}")
        assert reply.status == 403
        assert json.loads(reply.body)["error"] == "destination_refused"
        await close(reply)
        status, _, _ = await via_proxy(runtime, "GET", f"http://localhost:{up.port}/", auth=None)
        assert status == 403
    assert seen == [] and connector.attempts == []


async def test_a_rule_naming_the_host_exactly_lets_it_through(tmp_path: Path) -> None:
    seen: list[Seen] = []
    async with serve(recording_app(seen)) as up:
        rules = [{"name": "this-one", "host": "repo.test", "action": "allow"}]
        path = write_forward_config(tmp_path, rules=rules, identity={"mode": "none"})
        async with forward_proxy(path) as runtime:
            status, _, _ = await via_proxy(
                runtime, "GET", f"http://repo.test:{up.port}/", auth=None
            )
            assert status == 200
            glob = [{"name": "globbed", "host": "*.test", "action": "allow"}]
            path.write_text(path.read_text().replace('host = "repo.test"', 'host = "*.test"'))
            runtime.holder.reload(runtime.bus)
            assert glob  # a glob does not name a destination explicitly
            status, _, raw = await via_proxy(
                runtime, "GET", f"http://repo.test:{up.port}/", auth=None
            )
            assert status == 403, raw
    assert len(seen) == 1


PRIVATE_ANSWERS = {
    "internal.test": ["10.0.0.5"],
    "metadata.test": ["169.254.169.254"],
    "cgnat.test": ["100.64.1.1"],
    "mapped.test": ["::ffff:10.0.0.5"],
    "ula.test": ["fd00::1"],
    "mixed.test": ["93.184.216.34", "192.168.1.1"],
}


@pytest.mark.parametrize("mode", ["intercept", "passthrough"])
async def test_private_and_metadata_addresses_are_never_connected_to(
    tmp_path: Path, mode: str
) -> None:
    egress = [{"name": "any", "host": "*", "tls": mode}]
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=egress)
    connector = RecordingConnector()
    resolver = static_resolver({**LOOPBACK_NAMES, **PRIVATE_ANSWERS})
    async with forward_proxy(path, resolver=resolver, connector=connector) as runtime:
        auth = f"Bearer {token(runtime)}"
        targets = [f"{name}:443" for name in PRIVATE_ANSWERS]
        targets += ["169.254.169.254:80", "10.1.2.3:443", "[::1]:443", "0.0.0.0:443"]
        for authority in targets:
            reply = await raw_connect(runtime, authority, {"Proxy-Authorization": auth})
            assert reply.status == 403, (authority, reply.body)
            assert json.loads(reply.body)["error"] == "destination_refused"
            await close(reply)
        for name in PRIVATE_ANSWERS:
            status, _, raw = await via_proxy(runtime, "GET", f"http://{name}/latest", auth=auth)
            assert status == 403, raw
        assert runtime.forward is not None and runtime.forward.pins.lookups == 0
    assert connector.attempts == []


async def test_an_unresolvable_name_is_a_clear_502(tmp_path: Path) -> None:
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, identity={"mode": "none"})
    connector = RecordingConnector()
    async with forward_proxy(path, connector=connector) as runtime:
        reply = await raw_connect(runtime, "nowhere.test:443")
        assert reply.status == 502
        body = json.loads(reply.body)
        assert body["error"] == "destination_unresolved" and "nowhere.test" in body["reason"]
        await close(reply)
    assert connector.attempts == []


# --------------------------------------------------------------------------- interception


async def test_intercepted_https_is_masked_recorded_and_evented(tmp_path: Path) -> None:
    async def leaky(request: web.Request) -> web.Response:
        return web.Response(text=f"token={GH}\n", content_type="text/plain")

    seen: list[Seen] = []
    rules = [{"name": "repo-read", "host": "repo.test", "method": "GET", "action": "allow"}]
    egress = [{"name": "repo", "host": "repo.test", "allow_private": True}]
    path = write_forward_config(
        tmp_path, rules=rules, egress=egress, ca_bundle=bundle(tmp_path, UPSTREAM_CA)
    )
    async with (
        serve(recording_app(seen, leaky), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        events = Events(runtime)
        auth = f"Bearer {token(runtime)}"
        url = f"https://repo.test:{up.port}/file?x=1"
        status, _, body = await via_proxy(
            runtime, "GET", url, auth=auth, headers={"Authorization": "Bearer upstream-cred"}
        )
        assert status == 200
        assert GH not in body.decode() and body.startswith(b"token=")
        assert seen[0].path_qs == "/file?x=1"
        # the agent's Authorization is for the destination and reaches it; Sluice's does not
        assert seen[0].headers["Authorization"] == "Bearer upstream-cred"
        assert "Proxy-Authorization" not in seen[0].headers
        done = events.of("request.completed", target="repo") or events.of(
            "request.completed", masked=1
        )
        assert done and done[0]["masked"] == 1
        received = events.of("request.received", method="GET")
        assert received[0]["target"] == "repo"
        assert (received[0]["host"], received[0]["port"]) == ("repo.test", up.port)
        assert received[0]["forward"] == "intercept"
        flows = runtime.flows.recent(10)
        connect = [f for f in flows if f.get("method") == "CONNECT"]
        assert connect and connect[0]["decision"] == "intercepted"
        # a POST is not allowed by any rule: default deny inside the tunnel
        status, _, raw = await via_proxy(runtime, "POST", url, auth=auth, data=b"{}")
        assert status == 403 and "default deny" in json.loads(raw)["reason"]
        assert len(seen) == 1
    written = records(runtime.state_dir)
    urls = [r.get("url") for r in written if r.get("kind") == "request"]
    assert f"https://repo.test:{up.port}/file?x=1" in urls
    assert f"repo.test:{up.port}" in urls  # the CONNECT itself
    assert auth.split()[1] not in json.dumps(written, default=str)


async def test_a_secret_sent_out_over_https_is_refused(tmp_path: Path) -> None:
    sample = tomllib.loads((SOURCE_ROOT / "sample_config.toml").read_text())
    rules = [*(r for r in sample["rules"] if r["name"] == "no-exfiltration"), *ALLOW_ALL]
    assert len(rules) == 2
    seen: list[Seen] = []
    path = write_forward_config(
        tmp_path, rules=rules, egress=PRIVATE_OK, ca_bundle=bundle(tmp_path, UPSTREAM_CA)
    )
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        auth = f"Bearer {token(runtime)}"
        url = f"https://repo.test:{up.port}/upload"
        status, _, raw = await via_proxy(
            runtime, "POST", url, auth=auth, data=json.dumps({"note": GH_OUT}).encode()
        )
        assert status == 403 and json.loads(raw)["rule"] == "no-exfiltration"
        status, _, _ = await via_proxy(runtime, "POST", url, auth=auth, data=b'{"note": "hi"}')
        assert status == 200
    assert [s.body for s in seen] == [b'{"note": "hi"}']


async def test_upstream_certificate_failure_is_a_clear_502(tmp_path: Path) -> None:
    other = trustme.CA()  # the proxy trusts a CA that did not sign the upstream
    path = write_forward_config(
        tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK, ca_bundle=bundle(tmp_path, other)
    )
    seen: list[Seen] = []
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        auth = f"Bearer {token(runtime)}"
        status, _, raw = await via_proxy(runtime, "GET", f"https://repo.test:{up.port}/", auth=auth)
        assert status == 502
        body = json.loads(raw)
        assert body["error"] == "upstream_tls_failed"
        assert "repo.test" in body["reason"] and auth.split()[1] not in raw.decode()
    assert seen == []


async def test_held_request_inside_a_tunnel_waits_for_a_person(tmp_path: Path) -> None:
    rules = [
        {"name": "deploys", "host": "repo.test", "method": "POST", "action": "approve"},
        *ALLOW_ALL,
    ]
    seen: list[Seen] = []
    path = write_forward_config(
        tmp_path,
        rules=rules,
        egress=PRIVATE_OK,
        ca_bundle=bundle(tmp_path, UPSTREAM_CA),
        extra={"approvals": {"timeout": "10s"}},
    )
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        auth = f"Bearer {token(runtime)}"
        task = asyncio.create_task(
            via_proxy(runtime, "POST", f"https://repo.test:{up.port}/deploy", auth=auth, data=b"x")
        )
        admin = {"Authorization": f"Bearer {admin_token(runtime)}"}
        async with proxy_client() as client:
            pending: list[dict[str, Any]] = []
            for _ in range(100):
                async with client.get(f"{runtime.admin_url}/api/approvals", headers=admin) as r:
                    pending = (await r.json())["approvals"]
                if pending:
                    break
                await asyncio.sleep(0.05)
            assert pending and pending[0]["target"] == "tests" and pending[0]["path"] == "/deploy"
            assert seen == []
            async with client.post(
                f"{runtime.admin_url}/api/approvals/{pending[0]['id']}",
                headers=admin,
                json={"decision": "approve", "scope": "once"},
            ) as r:
                assert r.status == 200
        status, _, _ = await asyncio.wait_for(task, 10)
        assert status == 200 and len(seen) == 1


# --------------------------------------------------------------------------- passthrough


async def test_passthrough_tunnel_is_opaque_and_recorded(tmp_path: Path) -> None:
    egress = [{"name": "opaque", "host": "repo.test", "tls": "passthrough", "allow_private": True}]
    rules = [{"name": "opaque-ok", "target": "opaque", "port": "1024-65535", "action": "allow"}]
    path = write_forward_config(tmp_path, rules=rules, egress=egress)
    seen: list[Seen] = []
    connector = RecordingConnector()
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path, connector=connector) as runtime,
    ):
        events = Events(runtime)
        auth = f"Bearer {token(runtime)}"
        # the client checks the upstream's own certificate: Sluice is not in the middle
        context = ssl.create_default_context(cafile=None)
        UPSTREAM_CA.configure_trust(context)
        async with (
            proxy_client() as client,
            client.get(
                f"https://repo.test:{up.port}/opaque",
                proxy=runtime.main_url,
                proxy_headers={"Proxy-Authorization": auth},
                ssl=context,
            ) as reply,
        ):
            assert reply.status == 200
            assert (await reply.json())["path"] == "/opaque"
        for _ in range(100):
            done = events.of("request.completed", tunnel="passthrough")
            if done:
                break
            await asyncio.sleep(0.05)
        assert done and done[0]["bytes_in"] > 0 and done[0]["bytes_out"] > 0
        # nothing inside the tunnel is a request of Sluice's
        assert events.of("request.received", method="GET") == []
    assert connector.attempts == [("127.0.0.1", up.port)]
    written = records(runtime.state_dir)
    closed = [r for r in written if r.get("kind") == "tunnel.closed"]
    assert closed and closed[0]["mode"] == "passthrough" and closed[0]["bytes_down"] > 0


# --------------------------------------------------------------------------- lazy resolution


class CountingResolver:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.calls: list[str] = []
        self.inner = static_resolver(table)

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return list(await self.inner(host, port))


async def test_an_intercepted_default_deny_resolves_nothing(tmp_path: Path) -> None:
    """A CONNECT no rule speaks for opens (each request inside is decided), but the name is
    not looked up: CONNECTs alone cannot turn Sluice's resolver into a DNS channel."""
    egress = [{"name": "any", "host": "*"}]
    rules = [{"name": "reads", "host": "*", "method": "GET", "action": "allow"}]
    path = write_forward_config(tmp_path, rules=rules, egress=egress)
    resolver = CountingResolver({**LOOPBACK_NAMES, **PRIVATE_ANSWERS})
    connector = RecordingConnector()
    async with forward_proxy(path, resolver=resolver, connector=connector) as runtime:
        auth = f"Bearer {token(runtime)}"
        status, _, raw = await via_proxy(runtime, "POST", "https://secret-data.test/", auth=auth)
        assert status == 403 and "default deny" in json.loads(raw)["reason"]
        assert resolver.calls == []
        # a request a rule allows is resolved then, and refused for its address
        status, _, raw = await via_proxy(runtime, "GET", "https://metadata.test/latest", auth=auth)
        assert status == 403, raw
        assert json.loads(raw)["code"] == "destination_refused"
        assert resolver.calls == ["metadata.test"]
        assert runtime.forward is not None and runtime.forward.pins.lookups == 0
    assert connector.attempts == []


@pytest.mark.parametrize("verdict", ["approve", "deny"])
async def test_a_passthrough_connect_can_be_held_for_a_person(tmp_path: Path, verdict: str) -> None:
    egress = [{"name": "opaque", "host": "repo.test", "tls": "passthrough", "allow_private": True}]
    rules = [{"name": "ask", "target": "opaque", "action": "approve", "reason": "new host"}]
    path = write_forward_config(
        tmp_path, rules=rules, egress=egress, extra={"approvals": {"timeout": "10s"}}
    )
    connector = RecordingConnector()
    async with (
        serve(recording_app([]), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path, connector=connector) as runtime,
    ):
        auth = {"Proxy-Authorization": f"Bearer {token(runtime)}"}
        task = asyncio.create_task(raw_connect(runtime, f"repo.test:{up.port}", auth))
        admin = {"Authorization": f"Bearer {admin_token(runtime)}"}
        async with proxy_client() as client:
            pending: list[dict[str, Any]] = []
            for _ in range(100):
                async with client.get(f"{runtime.admin_url}/api/approvals", headers=admin) as r:
                    pending = (await r.json())["approvals"]
                if pending:
                    break
                await asyncio.sleep(0.05)
            assert pending and pending[0]["method"] == "CONNECT"
            assert pending[0]["path"] == f"repo.test:{up.port}"
            assert connector.attempts == []
            async with client.post(
                f"{runtime.admin_url}/api/approvals/{pending[0]['id']}",
                headers=admin,
                json={"decision": verdict, "scope": "once"},
            ) as r:
                assert r.status == 200
        reply = await asyncio.wait_for(task, 10)
        await close(reply)
        if verdict == "approve":
            assert reply.status == 200
            assert connector.attempts == [("127.0.0.1", up.port)]
        else:
            assert reply.status == 403 and json.loads(reply.body)["code"] == "approval_denied"
            assert connector.attempts == []
    # recorded before anyone decided, then how it ended, then what the agent got
    written = [
        r for r in records(runtime.state_dir) if r.get("request_id") == pending[0]["request_id"]
    ]
    kinds = [r["kind"] for r in written if not r["kind"].startswith("approval.")]
    actions = [r["action"] for r in written if r["kind"] in ("request", "decision")]
    if verdict == "approve":  # the request record carries "held"; the outcome follows
        assert kinds[:2] == ["request", "decision"], kinds
        assert actions == ["held", "approved"]
    else:
        assert kinds == ["request", "decision", "response"], kinds
        assert actions == ["held", "denied"]
        assert written[-1]["status"] == 403 and "error" not in written[-1]


# --------------------------------------------------------------------------- hygiene


async def test_proxy_tokens_never_reach_logs_events_or_recordings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    path = write_forward_config(
        tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK, ca_bundle=bundle(tmp_path, UPSTREAM_CA)
    )
    async with (
        serve(recording_app([]), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        events = Events(runtime)
        agent = token(runtime)
        bad = agent[:-6] + "AAAAAA"
        for auth in (f"Bearer {bad}", basic(bad), basic(agent)):
            reply = await raw_connect(
                runtime, f"repo.test:{up.port}", {"Proxy-Authorization": auth}
            )
            await close(reply)
        await via_proxy(runtime, "GET", f"https://repo.test:{up.port}/x", auth=f"Bearer {agent}")
        await via_proxy(runtime, "GET", f"http://repo.test:{up.port}/x", auth=basic(agent))
        await via_proxy(runtime, "GET", f"http://repo.test:{up.port}/x", auth=f"Bearer {bad}")
        shown = json.dumps([e.data for e in events.items], default=str)
    written = json.dumps(records(runtime.state_dir), default=str)
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for secret in (agent, bad, agent.split(".")[2], bad.split(".")[2]):
        assert secret not in shown and secret not in written and secret not in logged


async def test_forwarding_can_be_switched_off(tmp_path: Path) -> None:
    path = write_forward_config(
        tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK, extra={"forward": {"enabled": False}}
    )
    connector = RecordingConnector()
    async with forward_proxy(path, connector=connector) as runtime:
        auth = f"Bearer {token(runtime)}"
        reply = await raw_connect(runtime, "repo.test:443", {"Proxy-Authorization": auth})
        assert reply.status == 405 and json.loads(reply.body)["error"] == "forward_disabled"
        await close(reply)
        status, _, _ = await via_proxy(runtime, "GET", "http://repo.test:1/", auth=auth)
        assert status == 400
    assert connector.attempts == []


async def test_an_egress_entry_can_switch_masking_off(tmp_path: Path) -> None:
    async def leaky(request: web.Request) -> web.Response:
        return web.Response(text=f"token={GH}\n", content_type="text/plain")

    egress = [
        {"name": "raw", "host": "raw.test", "allow_private": True, "masking": {"enabled": False}},
        {"name": "lab", "host": "*.test", "allow_private": True},
    ]
    path = write_forward_config(
        tmp_path, rules=ALLOW_ALL, egress=egress, ca_bundle=bundle(tmp_path, UPSTREAM_CA)
    )
    resolver = static_resolver({**LOOPBACK_NAMES, "raw.test": ["127.0.0.1"]})
    async with (
        serve(recording_app([], leaky), server_context(UPSTREAM_CA, "raw.test", "repo.test")) as up,
        forward_proxy(path, resolver=resolver) as runtime,
    ):
        auth = f"Bearer {token(runtime)}"
        _, _, masked = await via_proxy(runtime, "GET", f"https://repo.test:{up.port}/", auth=auth)
        _, _, plain = await via_proxy(runtime, "GET", f"https://raw.test:{up.port}/", auth=auth)
    assert GH not in masked.decode() and GH in plain.decode()


async def test_an_idle_passthrough_tunnel_is_closed(tmp_path: Path) -> None:
    egress = [{"name": "opaque", "host": "repo.test", "tls": "passthrough", "allow_private": True}]
    rules = [{"name": "ok", "target": "opaque", "action": "allow"}]
    path = write_forward_config(
        tmp_path, rules=rules, egress=egress, extra={"limits": {"idle_timeout": "0.5s"}}
    )

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(data.upper())
        await writer.drain()
        await reader.read()  # then stay quiet until closed
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with forward_proxy(path) as runtime:
            events = Events(runtime)
            auth = {"Proxy-Authorization": f"Bearer {token(runtime)}"}
            reply = await raw_connect(runtime, f"repo.test:{port}", auth)
            assert reply.status == 200
            reply.writer.write(b"hello")
            assert await asyncio.wait_for(reply.reader.read(100), 5) == b"HELLO"
            assert await asyncio.wait_for(reply.reader.read(100), 5) == b""  # closed when idle
            await close(reply)
            for _ in range(50):
                if events.of("request.completed", tunnel="passthrough"):
                    break
                await asyncio.sleep(0.05)
            done = events.of("request.completed", tunnel="passthrough")
            assert done and (done[0]["bytes_in"], done[0]["bytes_out"]) == (5, 5)
    finally:
        server.close()


async def test_connects_count_against_the_connection_cap(tmp_path: Path) -> None:
    path = write_forward_config(
        tmp_path,
        rules=ALLOW_ALL,
        egress=PRIVATE_OK,
        identity={"mode": "none"},
        extra={"limits": {"max_connections": 2}},
    )
    async with (
        serve(recording_app([]), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        tunnels = [await raw_connect(runtime, f"repo.test:{up.port}") for _ in range(2)]
        assert [t.status for t in tunnels] == [200, 200]
        host, port = runtime.main_url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        answer = await asyncio.wait_for(reader.read(), 5)
        assert b" 503 " in answer.split(b"\r\n")[0] and b"too_many_connections" in answer
        writer.close()
        for tunnel in tunnels:
            await close(tunnel)
        await asyncio.sleep(0.2)
        again = await raw_connect(runtime, f"repo.test:{up.port}")
        assert again.status == 200
        await close(again)


async def test_a_passthrough_tunnel_delivers_every_byte_before_closing(tmp_path: Path) -> None:
    """The destination writes 8 MiB and hangs up at once: the agent still gets all of it."""
    egress = [{"name": "opaque", "host": "repo.test", "tls": "passthrough", "allow_private": True}]
    rules = [{"name": "ok", "target": "opaque", "action": "allow"}]
    path = write_forward_config(tmp_path, rules=rules, egress=egress)
    payload = random.Random(7).randbytes(8 * 1024 * 1024)

    async def blast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.write(payload)
        writer.close()

    server = await asyncio.start_server(blast, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with forward_proxy(path) as runtime:
            auth = {"Proxy-Authorization": f"Bearer {token(runtime)}"}
            reply = await raw_connect(runtime, f"repo.test:{port}", auth)
            assert reply.status == 200
            reply.writer.write(b"go!\n")
            await asyncio.sleep(0.5)  # a slow reader: the proxy's buffers are full at the end
            received = bytearray()
            async with asyncio.timeout(20):
                while chunk := await reply.reader.read(1 << 20):
                    received += chunk
            await close(reply)
            assert len(received) == len(payload) and bytes(received) == payload
    finally:
        server.close()


class RebindingResolver:
    """Answers 127.0.0.1 the first time and an address nothing listens on afterwards: a
    second lookup (between check and connect) would fail the request."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return ["127.0.0.1"] if self.calls == 1 else ["127.0.0.9"]


@pytest.mark.parametrize("kind", ["http", "intercept", "passthrough"])
async def test_the_checked_address_is_the_one_connected_to(tmp_path: Path, kind: str) -> None:
    tls = "passthrough" if kind == "passthrough" else "intercept"
    egress = [{"name": "lab", "host": "rebind.test", "tls": tls, "allow_private": True}]
    path = write_forward_config(
        tmp_path, rules=ALLOW_ALL, egress=egress, ca_bundle=bundle(tmp_path, UPSTREAM_CA)
    )
    resolver = RebindingResolver()
    connector = RecordingConnector()
    seen: list[Seen] = []
    context = server_context(UPSTREAM_CA, "rebind.test")
    async with (
        serve(recording_app(seen), None if kind == "http" else context) as up,
        forward_proxy(path, resolver=resolver, connector=connector) as runtime,
    ):
        auth = f"Bearer {token(runtime)}"
        scheme = "http" if kind == "http" else "https"
        url = f"{scheme}://rebind.test:{up.port}/pinned"
        if kind == "passthrough":
            client_ctx = ssl.create_default_context(cafile=None)
            UPSTREAM_CA.configure_trust(client_ctx)
            async with (
                proxy_client() as client,
                client.get(
                    url,
                    proxy=runtime.main_url,
                    proxy_headers={"Proxy-Authorization": auth},
                    ssl=client_ctx,
                ) as reply,
            ):
                status = reply.status
        else:
            status, _, _ = await via_proxy(runtime, "GET", url, auth=auth)
        assert status == 200
        # the name was looked up once; TLS and Host still used the name
        assert resolver.calls == 1
        if kind != "passthrough":
            assert seen[0].headers["Host"] == f"rebind.test:{up.port}"
    if kind == "passthrough":
        assert connector.attempts == [("127.0.0.1", up.port)]


async def test_bad_slow_or_huge_connect_heads_are_refused(tmp_path: Path) -> None:
    path = write_forward_config(
        tmp_path,
        rules=ALLOW_ALL,
        egress=PRIVATE_OK,
        extra={"limits": {"header_timeout": "0.5s", "max_header_size": "1KiB"}},
    )
    connector = RecordingConnector()
    async with forward_proxy(path, connector=connector) as runtime:
        url = runtime.main_url
        answers = {
            "slow": await raw_exchange(url, b"CONNECT repo.test:443 HTTP/1.1\r\n", seconds=3),
            "huge": await raw_exchange(
                url, b"CONNECT repo.test:443 HTTP/1.1\r\nX: " + b"a" * 5000, seconds=3
            ),
            "target": await raw_exchange(
                url, b"CONNECT user@repo.test:443 HTTP/1.1\r\n\r\n", seconds=3
            ),
            "split": await raw_exchange(
                url, [b"CONN", b"ECT repo.test HTTP/1.1\r\n\r\n"], delay=0.1, seconds=3
            ),
        }
    statuses = {name: parse_raw_response(data)[0] for name, data in answers.items()}
    assert statuses == {"slow": 408, "huge": 431, "target": 400, "split": 400}
    for data in answers.values():
        assert parse_raw_response(data)[1]["content-type"] == "application/json"
    assert connector.attempts == []


async def test_a_broken_local_ca_refuses_interception_clearly(tmp_path: Path) -> None:
    def broken(state_dir: Path) -> Any:
        raise OSError("the CA key cannot be read")

    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK)
    connector = RecordingConnector()
    seen: list[Seen] = []
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path, connector=connector, ca_factory=broken) as runtime,
    ):
        auth = {"Proxy-Authorization": f"Bearer {token(runtime)}"}
        reply = await raw_connect(runtime, f"repo.test:{up.port}", auth)
        assert reply.status == 502
        assert json.loads(reply.body)["error"] == "ca_unavailable"
        await close(reply)
    assert seen == [] and connector.attempts == []


async def test_encoded_slashes_pass_for_forward_requests_but_dot_segments_do_not(
    tmp_path: Path,
) -> None:
    """npm scoped packages (`/@types%2fnode`) and GitLab project ids need `%2F` intact."""
    rules = [{"name": "npm", "host": "repo.test", "path": "/@types/**", "action": "allow"}]
    path = write_forward_config(tmp_path, rules=rules, egress=PRIVATE_OK, identity={"mode": "none"})
    seen: list[Seen] = []

    async def raw_path(request: web.Request) -> web.Response:
        return web.json_response({"raw": request.raw_path})

    async with serve(recording_app(seen, raw_path)) as up, forward_proxy(path) as runtime:
        base = f"http://repo.test:{up.port}"
        async with proxy_client() as client:
            async with client.get(
                URL(f"{base}/@types%2fnode", encoded=True), proxy=runtime.main_url
            ) as reply:
                assert reply.status == 200
                assert (await reply.json())["raw"] == "/@types%2fnode"
            for bad in ("/@types%2f..%2f..%2fetc", "/@types%5cx", "/@types/x%00"):
                async with client.get(
                    URL(base + bad, encoded=True), proxy=runtime.main_url
                ) as reply:
                    assert reply.status == 400, bad
    assert len(seen) == 1


async def test_many_tunnels_at_once_and_nothing_left_open_after(tmp_path: Path) -> None:
    path = write_forward_config(
        tmp_path, rules=ALLOW_ALL, egress=PRIVATE_OK, ca_bundle=bundle(tmp_path, UPSTREAM_CA)
    )
    seen: list[Seen] = []
    async with (
        serve(recording_app(seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        auth = f"Bearer {token(runtime)}"
        context = ssl.create_default_context(cafile=str(sluice_ca(runtime).cert_path))

        async def agent(n: int) -> list[int]:
            statuses = []
            async with proxy_client() as client:
                for i in range(5):
                    async with client.get(
                        f"https://repo.test:{up.port}/a{n}/{i}",
                        proxy=runtime.main_url,
                        proxy_headers={"Proxy-Authorization": auth},
                        ssl=context,
                    ) as reply:
                        await reply.read()
                        statuses.append(reply.status)
            return statuses

        results = await asyncio.gather(*(agent(n) for n in range(30)))
        assert all(status == 200 for statuses in results for status in statuses)
        assert len(seen) == 150
        assert runtime.forward is not None and runtime.connects is not None
        for _ in range(100):
            if not runtime.forward.tunnels and not runtime.connects.tasks:
                break
            await asyncio.sleep(0.05)
        assert not runtime.forward.tunnels and not runtime.connects.tasks
        main = runtime.listeners[0].runner.server
        assert main is not None and main.open_connections == 0  # type: ignore[attr-defined]


async def test_an_egress_entry_signs_in_for_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent reaches the API without holding its token: Sluice injects it."""
    secret = "api-" + os.urandom(12).hex()
    monkeypatch.setenv("SLUICE_TEST_API_TOKEN", secret)

    async def echo(request: web.Request) -> web.Response:  # reflects what it received
        return web.json_response({"authorization": request.headers.get("Authorization")})

    seen: list[Seen] = []
    rules = [{"name": "api", "host": "repo.test", "method": "GET", "action": "allow"}]
    egress = [
        {"name": "api", "host": "repo.test", "allow_private": True, "credential": "api-token"}
    ]
    credentials = {
        "api-token": {
            "kind": "static",
            "env": "SLUICE_TEST_API_TOKEN",
            "header": "Authorization",
            "format": "Bearer {token}",
        }
    }
    path = write_forward_config(
        tmp_path,
        rules=rules,
        egress=egress,
        ca_bundle=bundle(tmp_path, UPSTREAM_CA),
        extra={"credentials": credentials},
    )
    async with (
        serve(recording_app(seen, echo), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        auth = f"Bearer {token(runtime)}"
        status, _, body = await via_proxy(
            runtime,
            "GET",
            f"https://repo.test:{up.port}/user",
            auth=auth,
            headers={"Authorization": "Bearer what-the-agent-had"},
        )
        assert status == 200
        assert seen[0].headers["Authorization"] == f"Bearer {secret}"  # Sluice's, not the agent's
        assert secret not in body.decode()  # echoed back: masked before the agent sees it
    assert secret not in json.dumps(records(runtime.state_dir), default=str)


async def test_a_passthrough_entry_cannot_carry_a_credential(tmp_path: Path) -> None:
    egress = [{"name": "api", "host": "repo.test", "tls": "passthrough", "credential": "nope"}]
    path = write_forward_config(tmp_path, rules=ALLOW_ALL, egress=egress)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    text = str(raised.value)
    assert "unknown credential 'nope'" in text and "passthrough tunnel is opaque" in text
