"""`GET /api/flows/<request_id>` on the admin API: one flow's headers and bodies.

A real proxy with recording on, a real upstream serving a canary secret; the endpoint reads
the flow back from the recording, so what it serves is what was recorded.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from test_recording_proxy import CANARY, CRED_ENV, recording_stack

from proxy.masking.fakes import fake

pytestmark = pytest.mark.asyncio
SENT = fake("github-pat", random.Random(991))[0]


async def admin(stack, path: str, token: str | None = "admin") -> tuple[int, dict]:  # type: ignore[no-untyped-def]
    headers = {"Authorization": stack.admin} if token == "admin" else {}
    async with stack.client.get(f"{stack.runtime.admin_url}{path}", headers=headers) as reply:
        return reply.status, json.loads(await reply.read())


async def test_a_flow_is_served_as_recorded_with_secrets_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRED_ENV, "vault-" + os.urandom(8).hex())
    async with recording_stack(tmp_path) as stack:
        got = await stack.send("/api/files/canary")
        assert got.status == 200 and CANARY.encode() not in got.body
        status, detail = await admin(stack, f"/api/flows/{got.headers['X-Sluice-Request-Id']}")
        assert status == 200, detail
        request, response = detail["request"], detail["response"]
        assert request["method"] == "GET" and request["url"] == "/files/canary"
        assert request["agent_url"].startswith("http://127.0.0.1:")
        assert ["Authorization", "[REDACTED]"] in request["headers"]
        assert response["status"] == 200
        assert response["body"]["text"].encode() == got.body  # exactly what the agent got
        assert [s["rule"] for s in response["body"]["mask_spans"]] == ["github-pat"]
        assert detail["decisions"][0]["action"] == "allowed"
        assert CANARY not in json.dumps(detail) and stack.token not in json.dumps(detail)

        # a streamed body the policy never read: recorded after it was sent, served masked
        payload = json.dumps({"title": "x" * 5000, "key": SENT}).encode()
        sent = await stack.send("/api/things/7", method="POST", body=payload)
        assert sent.status == 200 and stack.upstream.seen[-1].body == payload
        status, detail = await admin(stack, f"/api/flows/{sent.headers['X-Sluice-Request-Id']}")
        assert status == 200, detail
        body = detail["request"]["body"]
        assert body["size"] == len(payload) and not body["truncated"]
        assert SENT not in body["text"] and '"title": "xxxxx' in body["text"]
        assert [s["rule"] for s in body["mask_spans"]] == ["github-pat"]


async def test_bad_unknown_and_unauthenticated_lookups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRED_ENV, "vault-" + os.urandom(8).hex())
    async with recording_stack(tmp_path) as stack:
        got = await stack.send("/api/things/1")
        request_id = got.headers["X-Sluice-Request-Id"]
        assert (await admin(stack, f"/api/flows/{request_id}", token=None))[0] == 401
        status, body = await admin(stack, "/api/flows/ffffffff00000000")
        assert (status, body["error"]) == (404, "unknown_flow")
        status, body = await admin(stack, "/api/flows/%5Bbold%5D..%2F")
        assert (status, body["error"]) == (400, "bad_request")


async def test_a_proxy_that_records_nothing_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRED_ENV, "vault-" + os.urandom(8).hex())
    async with recording_stack(tmp_path, recording={"enabled": False}) as stack:
        got = await stack.send("/api/things/1")
        status, body = await admin(stack, f"/api/flows/{got.headers['X-Sluice-Request-Id']}")
        assert (status, body["error"]) == (404, "not_recorded")
