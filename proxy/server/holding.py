"""The aiohttp side of approvals: hold a request, wait, and tell the agent what happened.

Every answer an agent gets here is JSON it can act on: who denied and why, that it timed
out and how a person can still approve it, or that the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web

from proxy.approvals import (
    ApprovalDesk,
    DeskClosed,
    Held,
    QueueFull,
    State,
    destination_of,
    fingerprint,
)
from proxy.config import Config
from proxy.identity import Identity
from proxy.identity.oidc import check_fetch_url
from proxy.matcher import Facts
from proxy.policy import Action, Decision
from proxy.server.requestcheck import BodyTooLarge, read_bounded

log = logging.getLogger("sluice.approvals")
PREVIEW_BYTES = 2048


class HoldRefused(Exception):
    """The held request ends without reaching the upstream."""

    def __init__(
        self,
        status: int,
        error: str,
        reason: str,
        *,
        decision: str = "denied",
        rule: str | None = None,
        approval: Mapping[str, object] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason
        self.decision, self.rule, self.extra = decision, rule, extra
        self.approval = approval  # for the recording, not for the agent's answer


def approval_facts(held: Held) -> dict[str, object]:
    """Who decided a held request, for how long, and how far the decision reaches."""
    decided = held.decided_at if held.decided_at is not None else time.time()
    return {
        "approval_id": held.id,
        "approver": held.decided_by,
        "scope": held.scope.value if held.scope is not None else None,
        "held_ms": round((decided - held.created) * 1000, 1),
    }


def body_preview(body: bytes, mask: Any = None) -> str:
    """What an approver sees of the body: bounded, printable, masked when a masker is set."""
    shown = body[:PREVIEW_BYTES]
    if mask is not None:
        shown = mask(shown)
    text = shown.decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in text)
    return text + ("…" if len(body) > PREVIEW_BYTES else "")


class Holding:
    def __init__(
        self, desk: ApprovalDesk, session: aiohttp.ClientSession | None, mask: Any = None
    ) -> None:
        self.desk = desk
        self.session = session
        self.mask = mask
        self._notifications: set[asyncio.Task[None]] = set()

    async def read_body(
        self, request: web.Request, config: Config, decision: Decision, body: bytes | None
    ) -> bytes:
        """The whole body a person will judge (and the recording keeps), within limits."""
        settings = config.approvals
        if body is not None and len(body) > settings.max_body:
            raise HoldRefused(
                403,
                "denied",
                f"the request body is larger than "
                f"{settings.max_body} bytes, too large to hold for approval",
                rule=decision.rule,
                code="body_too_large",
            )
        if body is None:
            try:
                body = await read_bounded(request, settings.max_body, config.limits.body_timeout)
            except BodyTooLarge:
                raise HoldRefused(
                    403,
                    "denied",
                    f"the request body is larger than "
                    f"{settings.max_body} bytes, too large to hold for approval",
                    rule=decision.rule,
                    code="body_too_large",
                ) from None
            except TimeoutError:
                raise HoldRefused(
                    408, "body_timeout", "request body was not received in time", decision="refused"
                ) from None
        return body

    async def resolve(
        self,
        request: web.Request,
        config: Config,
        facts: Facts,
        identity: Identity,
        decision: Decision,
        body: bytes | None,
        request_id: str,
    ) -> tuple[Decision, bytes]:
        """Wait for a human; return an allow decision and the exact body that was held."""
        settings = config.approvals
        self.desk.max_pending = settings.max_pending  # follow reloads
        self.desk.retry_window = settings.retry_window
        body = await self.read_body(request, config, decision, body)
        target = facts.target or ""
        # Forward requests share target names across hosts: the destination is bound too.
        bound = target if facts.port is None else f"{target}@{facts.host}:{facts.port}"
        fp = fingerprint(facts.method, bound, facts.path, facts.query, body)
        destination = destination_of(facts.host, facts.port) if facts.port is not None else None
        standing = self.desk.standing_verdict(fp, identity.session, decision.rule, destination)
        if standing is not None:
            if standing.verdict == "allow":
                return Decision(
                    Action.ALLOW, decision.rule, f"approved earlier by {standing.by}", "approved"
                ), body
            raise HoldRefused(
                403,
                "denied",
                f"denied earlier for this session by {standing.by}",
                rule=decision.rule,
                code="approval_denied",
                decided_by=standing.by,
            )
        now = time.time()
        try:
            held = self.desk.hold(
                request_id=request_id,
                session=identity.session,
                subject=identity.subject,
                method=facts.method,
                target=target,
                path=facts.path,
                query=facts.query,
                rule=decision.rule,
                reason=decision.reason,
                preview=body_preview(body, self.mask),
                body_sha256=hashlib.sha256(body).hexdigest(),
                fingerprint=fp,
                deadline=now + settings.timeout,
                session_expires=identity.expires_at,
                host=facts.host if facts.port is not None else None,
                port=facts.port,
            )
        except DeskClosed:
            raise HoldRefused(
                503,
                "proxy_stopping",
                "the proxy is stopping; retry shortly",
                decision="refused",
                rule=decision.rule,
            ) from None
        except QueueFull:
            raise HoldRefused(
                429,
                "approval_queue_full",
                f"{settings.max_pending} requests already wait for a person; retry later",
                decision="refused",
                rule=decision.rule,
                code="approval_queue_full",
            ) from None
        self._notify(config, held.summary())
        gone_source = getattr(request.protocol, "gone", None)
        state = await self.desk.wait(held, gone_source() if gone_source else None)
        if state is State.APPROVED:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise HoldRefused(
                    499,
                    "client_gone",
                    "the agent hung up before the approval",
                    decision="withdrawn",
                    rule=decision.rule,
                )
            return Decision(
                Action.ALLOW,
                decision.rule,
                f"approved by {held.decided_by}",
                "approved",
                approval=approval_facts(held),
            ), body
        if state is State.DENIED:
            by = held.decided_by or "Sluice"
            said = held.decision_reason or "no reason given"
            raise HoldRefused(
                403,
                "denied",
                f"denied by {by}: {said}",
                rule=decision.rule,
                code="approval_denied",
                decided_by=held.decided_by,
                approval_id=held.id,
                approval=approval_facts(held),
            )
        if state is State.EXPIRED:
            until = held.deadline + self.desk.retry_window
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
            raise HoldRefused(
                403,
                "approval_timeout",
                f"no one decided within {settings.timeout:g}s. A person can still approve "
                f"approval {held.id} until {stamp}; "
                "then send the identical request again and it goes through once.",
                rule=decision.rule,
                code="approval_timeout",
                approval_id=held.id,
                retry_until=until,
            )
        raise HoldRefused(
            499,
            "client_gone",
            "the agent hung up while held",
            decision="withdrawn",
            rule=decision.rule,
        )

    def _notify(self, config: Config, summary: dict[str, Any]) -> None:
        """Fire and forget: a slow or failing webhook never delays the hold."""
        notify = config.approvals.notify
        if not notify.webhook or self.session is None:
            return
        task = asyncio.create_task(self._post(notify.webhook, notify.timeout, summary))
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def _post(self, url: str, seconds: float, summary: dict[str, Any]) -> None:
        assert self.session is not None
        text = (
            f"Sluice holds {summary['method']} /{summary['target']}{summary['path']} from "
            f"{summary['subject']} (rule {summary['rule']}: {summary['reason']}); "
            f"approval {summary['id']}"
        )
        try:
            check_fetch_url(url)
            async with self.session.post(
                url,
                json={"text": text, "approval": summary},
                timeout=aiohttp.ClientTimeout(total=seconds),
                allow_redirects=False,
            ) as reply:
                if reply.status >= 300:
                    log.warning("approval webhook answered %d", reply.status)
        except Exception as exc:  # logged by type only: the URL may carry a secret
            log.warning("approval webhook failed: %s", type(exc).__name__)

    async def close(self) -> None:
        for task in list(self._notifications):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
