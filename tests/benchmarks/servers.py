"""The servers under test: the upstream and minimal-proxy roles, and Sluice's configs."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from pathlib import Path
from typing import Any

from harness import BODY_1K, CHUNK, ECHO_PATH, TARGET

#: Identity settings of the ``sluice+id`` case; the benchmark issues its token with these.
ID_ISSUER = "sluice-bench"
ID_AUDIENCE = "sluice"
ID_SUBJECT = "bench-agent"
#: The ``jwt`` credential on the benchmarked target: Sluice mints per session, for the upstream.
CREDENTIAL = "repo-jwt"
CREDENTIAL_ISSUER = "sluice"  # JwtCredentialModel's default issuer; audience: the target name


# --------------------------------------------------------------------------------------
# Child roles: the upstream and the minimal proxy run as `bench_proxy.py --role ...`.
# --------------------------------------------------------------------------------------


def _listen_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _serve_forever(app: Any) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = _listen_socket()
    await web.SockSite(runner, sock, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"READY {sock.getsockname()[1]}", flush=True)
    await stop.wait()
    await runner.cleanup()


def role_upstream() -> None:
    """A repo-ish upstream: 1 KiB for any GET, or ``?bytes=N`` streamed in 256 KiB chunks.

    On ``ECHO_PATH`` it answers with the request headers it received (sanity checks only).
    """
    from aiohttp import web

    chunk = bytes(CHUNK)

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == ECHO_PATH:
            # Hex, so Sluice's masking (which would rightly mask a JWT) leaves it readable.
            seen = json.dumps(list(request.headers.items())).encode().hex()
            return web.json_response({"headers_hex": seen})
        wanted = request.query.get("bytes")
        if wanted is None:
            return web.Response(body=BODY_1K, content_type="text/plain")
        size = int(wanted)
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        response.content_length = size
        await response.prepare(request)
        left = size
        try:
            while left > 0:
                piece = chunk if left >= CHUNK else chunk[:left]
                await response.write(piece)  # waits for the socket to drain: bounded memory
                left -= len(piece)
            await response.write_eof()
        except ConnectionError:
            pass
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    asyncio.run(_serve_forever(app))


def role_minimal(upstream: str) -> None:
    """The floor: one aiohttp server, one ClientSession, stream the body back."""
    import aiohttp
    from aiohttp import web
    from yarl import URL

    drop = {"host", "connection", "keep-alive", "content-length", "transfer-encoding"}
    state: dict[str, aiohttp.ClientSession] = {}

    async def on_startup(_app: web.Application) -> None:
        state["session"] = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
        )

    async def on_cleanup(_app: web.Application) -> None:
        await state["session"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        url = URL(upstream + request.raw_path, encoded=True)
        data = request.content if request.body_exists else None
        try:
            upstream_response = await state["session"].request(
                request.method, url, headers=headers, data=data, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError):
            return web.Response(status=502, text="upstream failed")
        response = web.StreamResponse(status=upstream_response.status)
        try:
            if "Content-Type" in upstream_response.headers:
                response.headers["Content-Type"] = upstream_response.headers["Content-Type"]
            if upstream_response.content_length is not None:
                response.content_length = upstream_response.content_length
            await response.prepare(request)
            async for piece in upstream_response.content.iter_chunked(CHUNK):
                await response.write(piece)
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientError, TimeoutError):
            # The client left (or the upstream broke) mid-body: drop the connection quietly.
            if request.transport is not None:
                request.transport.close()
        finally:
            upstream_response.release()
        return response

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    asyncio.run(_serve_forever(app))


# --------------------------------------------------------------------------------------
# Sluice configs: 20 rules, the allow that matches the benchmark request is last.
# --------------------------------------------------------------------------------------


def sluice_config(upstream: str, *, jwt_key_file: Path | None = None) -> str:
    """The generated config. With ``jwt_key_file`` (the ``sluice+id`` case) agents need a
    token from the local issuer, and requests to the benchmarked target carry a ``jwt``
    credential minted by Sluice, signed with that key."""
    if jwt_key_file is None:
        identity = 'mode = "none"\n'
        credential = ""
    else:
        identity = f'mode = "local"\nissuer = "{ID_ISSUER}"\naudience = "{ID_AUDIENCE}"\n'
        credential = f'credential = "{CREDENTIAL}"\n'
        identity += f"""
[credentials.{CREDENTIAL}]
kind = "jwt"
key_file = '{jwt_key_file}'
ttl = "5m"
"""
    return f"""\
# Generated by tests/benchmarks/bench_proxy.py: 20 rules, the matching allow is last.
[proxy]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
state_dir = "state"
drain_timeout = "2s"

[limits]
max_connections = 1024

# The recorder's cost has its own benchmark (bench_recording_proxy.py, recording on vs
# off); this one measures policy, identity and the relay, masking included (the default).
[recording]
enabled = false

[identity]
{identity}
[[targets]]
name = "{TARGET}"
upstream = "{upstream}"
{credential}
[[targets]]
name = "build"
upstream = "{upstream}"

{RULES}"""


RULES = """\
[[rules]]   # 1
name = "credential-files"
path = ["**/.env", "**/.env.*", "**/*.pem", "**/*.key", "**/id_rsa*", "**/.ssh/**", "**/.aws/**"]
action = "deny"
reason = "credential files are not for agents"

[[rules]]   # 2
name = "vcs-and-package-credentials"
path = ["**/.git/**", "**/.git-credentials", "**/.netrc", "**/.npmrc", "**/.pypirc"]
action = "deny"
reason = "VCS internals and package registry credentials"

[[rules]]   # 3
name = "keystores"
path = ["**/*.p12", "**/*.pfx", "**/*.jks", "**/*.keystore", "**/*.kdbx"]
action = "deny"
reason = "key stores"

[[rules]]   # 4
name = "secret-dirs"
path = [
    "**/secrets/**", "**/.kube/**", "**/.docker/config.json", "**/.gnupg/**", "**/.terraform/**",
]
action = "deny"
reason = "secret directories"

[[rules]]   # 5
name = "no-deletes"
method = "DELETE"
action = "deny"
reason = "agents never delete"

[[rules]]   # 6
name = "no-force-push"
target = "repo"
method = "POST"
path = "/api/push"
query = { force = ["true", "1", "yes"] }
action = "deny"
reason = "force pushes rewrite history"

[[rules]]   # 7
name = "push-to-main"
target = "repo"
method = "POST"
path = "/api/push"
body = '"branch"\\s*:\\s*"(main|master)"'
action = "deny"
reason = "pushes to main need a human review"

[[rules]]   # 8
name = "admin-area"
path = ["/admin/**", "/api/admin/**", "/api/settings/**"]
action = "deny"
reason = "administration is for humans"

[[rules]]   # 9
name = "no-webhooks"
target = "repo"
method = ["POST", "PUT", "PATCH"]
path = "/api/hooks/**"
action = "deny"
reason = "webhooks can exfiltrate"

[[rules]]   # 10
name = "debug-override-header"
header.x-debug-override = "*"
action = "deny"
reason = "debug overrides bypass upstream checks"

[[rules]]   # 11
name = "old-api-version"
header.x-api-version = ["1", "1.*"]
action = "deny"
reason = "API v1 is retired"

[[rules]]   # 12
name = "token-in-query"
query = ["*access_token=*", "*private_token=*", "*api_key=*"]
action = "deny"
reason = "credentials in URLs end up in logs"

[[rules]]   # 13
name = "internal-hosts"
host = ["*.internal", "*.corp", "metadata.google.internal"]
action = "deny"
reason = "internal host names are off limits"

[[rules]]   # 14
name = "form-posts"
method = "POST"
content_type = "application/x-www-form-urlencoded"
action = "deny"
reason = "agents speak JSON"

[[rules]]   # 15
name = "build-trigger"
target = "build"
method = "POST"
path = "/api/builds"
action = "allow"
reason = "agents may start builds"

[[rules]]   # 16
name = "build-read"
target = "build"
method = "GET"
path = "/api/builds/**"
action = "allow"
reason = "build status and logs are readable"

[[rules]]   # 17
name = "push-agent-branches"
target = "repo"
method = "POST"
path = "/api/push"
body = '"branch"\\s*:\\s*"agent/[A-Za-z0-9._/-]+"'
action = "allow"
reason = "agents may push to their own agent/* branches"

[[rules]]   # 18
name = "issues-write"
target = "repo"
method = "POST"
path = "/api/issues/**"
action = "allow"
reason = "agents may comment on issues"

[[rules]]   # 19
name = "pulls-read"
target = "repo"
method = "GET"
path = "/api/pulls/**"
action = "allow"
reason = "pull requests are readable"

[[rules]]   # 20: the only rule the benchmark request matches
name = "repo-read"
target = "repo"
method = ["GET", "HEAD"]
path = "/api/**"
query = { ref = "*" }
action = "allow"
reason = "reading code is the agent's job"
"""
