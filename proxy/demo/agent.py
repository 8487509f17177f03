"""A scripted stand-in for an AI coding agent, mixing harmless and risky requests.

It only ever reports summaries of what came back, never bodies: the demo prints its steps, and
a leaked credential must not end up on screen just because the proxy let it through.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.masking.fakes import fake

_FIX = {"src/app.py": '"""HTTP entry point for the inventory service."""\n# fixed typo\n'}

# (intent, method, path, JSON body or None)
_SCRIPT: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("list files", "GET", "/repo/api/tree", None),
    ("read code", "GET", "/repo/api/files/src/app.py", None),
    ("read a credential file", "GET", "/repo/api/files/.env", None),
    ("read the deploy key", "GET", "/repo/api/files/keys/deploy_key.pem", None),
    (
        "push a fix to main",
        "POST",
        "/repo/api/push",
        {"branch": "main", "message": "Fix typo in module docstring", "files": _FIX},
    ),
    (
        "push to its own branch",
        "POST",
        "/repo/api/push",
        {"branch": "agent/fix-typo", "message": "Fix typo in module docstring", "files": _FIX},
    ),
    ("check the build", "GET", "/build/api/builds/latest", None),
    ("start a build", "POST", "/build/api/builds", {"branch": "agent/fix-typo"}),
    ("read the build log", "GET", "/build/api/builds/42/log", None),
    (
        "send a token it found to the build server",
        "POST",
        "/build/api/builds",
        {"branch": "agent/fix-typo", "env": {"NPM_TOKEN": "<token>"}},
    ),
    ("delete a branch", "DELETE", "/repo/api/branches/main", None),
]

_MAX_DETAIL = 200


@dataclass
class AgentStep:
    """One request the agent made and how the gateway treated it."""

    intent: str
    method: str
    path: str
    status: int | None
    verdict: str
    detail: str


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _summary(body: bytes, content_type: str) -> str:
    """Describe a body by shape only, so nothing sensitive is echoed."""
    data = _parse_json(body) if "json" in content_type else None
    if isinstance(data, dict):
        keys = ", ".join(sorted(str(k) for k in data))
        return f"json keys: {keys}" if data else "empty json object"
    if isinstance(data, list):
        return f"json list of {len(data)} items"
    return f"{len(body)} bytes {content_type or 'unknown type'}"


def classify(status: int, body: bytes, content_type: str) -> tuple[str, str]:
    """Turn a response into (verdict, detail) following the proxy's 403 contract."""
    data = _parse_json(body)
    if status == 403 and isinstance(data, dict) and data.get("error") == "denied":
        rule, reason = data.get("rule"), str(data.get("reason", ""))
        return "denied", _clip(f"{rule}: {reason}" if rule else reason)
    if status >= 400:
        if isinstance(data, dict) and "reason" in data:
            return "error", _clip(str(data["reason"]))
        return "error", f"HTTP {status}: {_summary(body, content_type)}"
    return "allowed", _summary(body, content_type)


async def _one_step(
    session: aiohttp.ClientSession,
    base_url: str,
    step: tuple[str, str, str, dict[str, Any] | None],
    headers: dict[str, str],
) -> AgentStep:
    intent, method, path, body = step
    if body is not None and "<token>" in json.dumps(body):
        # A credential the agent picked up elsewhere: real format, fake value.
        token = fake("npm-token", random.Random())[1]
        body = json.loads(json.dumps(body).replace("<token>", token))
    try:
        async with session.request(method, base_url + path, json=body, headers=headers) as resp:
            raw = await resp.read()
            verdict, detail = classify(resp.status, raw, resp.content_type)
            return AgentStep(intent, method, path, resp.status, verdict, detail)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        # The demo must keep going whatever the network does; InvalidURL is a ValueError.
        reason = _clip(f"{type(exc).__name__}: {exc}".rstrip(": "))
        return AgentStep(intent, method, path, None, "error", reason)


async def run_agent(
    base_url: str,
    *,
    token: str | None = None,
    pause: float = 0.4,
    on_step: Callable[[AgentStep], None] | None = None,
) -> list[AgentStep]:
    """Play the script against `base_url`; failures become "error" steps instead of raising."""
    base_url = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    steps: list[AgentStep] = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for index, script_step in enumerate(_SCRIPT):
            if index and pause > 0:
                await asyncio.sleep(pause)
            step = await _one_step(session, base_url, script_step, headers)
            steps.append(step)
            if on_step is not None:
                on_step(step)
    return steps
