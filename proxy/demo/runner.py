"""``sluice demo``: demo upstreams in this process, the proxy in its own, a scripted agent.

The proxy runs as a child process exactly as a user would run it (``sluice proxy``), and
the summary at the end comes from its admin API, so the demo exercises the real paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from proxy.config import Config
from proxy.demo.agent import AgentStep, run_agent
from proxy.demo.upstreams import start_upstreams
from proxy.demo.workspace import build_workspace
from proxy.state import ADMIN_TOKEN_FILE, ensure_state_dir

MARKS = {"allowed": "ALLOW", "denied": "DENY ", "error": "ERROR"}


def _upstream_port(config: Config, name: str) -> int | None:
    target = config.targets.get(name)
    if target is None:
        return None
    url = URL(target.upstream)
    return url.port if url.host in ("127.0.0.1", "localhost") else None


async def _wait_for_admin(
    admin_url: str, token_file: Path, proxy: asyncio.subprocess.Process
) -> str:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            if proxy.returncode is not None:
                raise RuntimeError(f"the proxy exited with status {proxy.returncode}")
            if token_file.exists():
                token = token_file.read_text().strip()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(
                        f"{admin_url}/api/health", headers={"Authorization": f"Bearer {token}"}
                    ) as reply:
                        if reply.status == 200:
                            return token
            await asyncio.sleep(0.05)
    raise RuntimeError("the proxy did not come up within 10 seconds")


def _agent_token(config: Config, state_dir: Path) -> str | None:
    """In local identity mode the demo agent gets a token, as a real agent would."""
    identity = config.identity
    if identity.mode != "local":
        return None
    from proxy.identity.local import LocalIssuer

    issuer = LocalIssuer(state_dir, issuer=identity.effective_issuer, audience=identity.audience)
    print("  agent identity demo-agent (groups: agents), token from the local issuer", flush=True)
    return issuer.issue("demo-agent", ["agents"], 3600, groups_claim=identity.groups_claim)


async def _demo_approver(admin_url: str, token: str, pause: float) -> None:
    """Stands in for the person at the console: sees each held request, then decides."""
    headers = {"Authorization": f"Bearer {token}"}
    seen: set[str] = set()
    async with aiohttp.ClientSession(headers=headers) as session:
        while True:
            await asyncio.sleep(0.1)
            async with session.get(f"{admin_url}/api/approvals") as reply:
                pending = (await reply.json())["approvals"] if reply.status == 200 else []
            for item in pending:
                if item["id"] in seen:
                    continue
                seen.add(item["id"])
                print(
                    f"  HELD       {item['method']:<6} /{item['target']}{item['path']:<34} "
                    f"rule {item['rule']}: {item['reason']}",
                    flush=True,
                )
                await asyncio.sleep(max(pause * 2, 0.3))
                decision = {
                    "decision": "deny",
                    "scope": "once",
                    "reason": "main is protected; open a pull request from agent/*",
                }
                async with session.post(
                    f"{admin_url}/api/approvals/{item['id']}", json=decision
                ) as reply:
                    await reply.read()
                print(
                    "             a person denies it via the admin API (the console "
                    "will offer a/s/A/d keys)",
                    flush=True,
                )


def _print_step(step: AgentStep) -> None:
    mark = MARKS.get(step.verdict, step.verdict.upper())
    status = step.status if step.status is not None else "---"
    print(f"  {mark} {status}  {step.method:<6} {step.path:<40} {step.intent}", flush=True)
    if step.verdict != "allowed":
        print(f"               -> {step.detail}", flush=True)


async def _summary(admin_url: str, token: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(f"{admin_url}/api/flows", params={"limit": "100"}) as reply,
    ):
        return (await reply.json())["flows"]


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def run_demo(config: Config, *, pause: float = 0.6, serve: bool = False) -> int:
    """Plain text by default; with ``serve`` the demo keeps running headless for a console
    attached to its admin API (the person at the console decides what is held)."""
    repo_port, build_port = _upstream_port(config, "repo"), _upstream_port(config, "build")
    if repo_port is None or build_port is None:
        print(
            "sluice demo needs targets named 'repo' and 'build' with loopback upstreams "
            "(see sample_config.toml)",
            file=sys.stderr,
        )
        return 2
    state_dir = ensure_state_dir(config.state_dir)
    workspace = build_workspace(state_dir / "demo-workspace")
    try:
        stop_upstreams = await start_upstreams(workspace, repo_port, build_port)
    except OSError as exc:
        print(f"sluice demo: cannot start the demo upstreams: {exc}", file=sys.stderr)
        return 1
    admin_url = f"http://{config.proxy.admin_listen}"
    proxy_url = f"http://{config.proxy.listen}"
    print(
        "Sluice demo: a scripted agent reaches a code repository and a build server "
        "through the proxy.",
        flush=True,
    )
    print(
        f"  repo upstream  http://127.0.0.1:{repo_port}   build upstream  "
        f"http://127.0.0.1:{build_port}",
        flush=True,
    )
    log_path = state_dir / "demo-proxy.log"
    with log_path.open("wb") as log:  # a file, not a pipe: a chatty proxy can never block
        proxy = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "proxy",
            "-c",
            str(config.path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        token = await _wait_for_admin(admin_url, state_dir / ADMIN_TOKEN_FILE, proxy)
        print(f"  proxy          {proxy_url}   admin API  {admin_url}\n", flush=True)
        agent_token = _agent_token(config, state_dir)
        if serve:
            print(f"admin API on {admin_url} (token in {state_dir / ADMIN_TOKEN_FILE})", flush=True)
            agent = asyncio.create_task(run_agent(proxy_url, token=agent_token, pause=pause))
            await _until_signalled()
            agent.cancel()
            return 0
        approver = asyncio.create_task(_demo_approver(admin_url, token, pause))
        try:
            steps = await run_agent(proxy_url, token=agent_token, pause=pause, on_step=_print_step)
        finally:
            approver.cancel()
        flows = await _summary(admin_url, token)
    except RuntimeError as exc:
        tail = log_path.read_text(errors="replace")[-4000:]
        print(f"sluice demo: {exc}\n{tail}", file=sys.stderr)
        return 1
    finally:
        if proxy.returncode is None:
            proxy.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proxy.wait(), 15)
        await stop_upstreams()
    allowed = sum(step.verdict == "allowed" for step in steps)
    denied = sum(step.verdict == "denied" for step in steps)
    print(
        f"\n{len(steps)} requests: {allowed} allowed, {denied} denied by policy, "
        f"{len(steps) - allowed - denied} failed.",
        flush=True,
    )
    print("The proxy's own record (GET /api/flows on the admin API):", flush=True)
    for flow in flows:
        rule = flow.get("rule") or "(default deny)"
        if flow.get("masked"):
            rule += f"  masked={flow['masked']}"
        print(
            f"  {flow.get('status')}  {flow.get('decision', '?'):<8} {flow.get('method'):<6} "
            f"/{flow.get('target')}{flow.get('path')}  rule={rule}",
            flush=True,
        )
    return 0
