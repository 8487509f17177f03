"""The reverse-proxy handler: who is calling, what policy says, then forward.

Every request reads the config once at the start and finishes under it, even if a
reload swaps in another meanwhile. Every refusal is JSON an agent can act on.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import secrets
import time
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web

from proxy.config import Config, TargetModel
from proxy.credentials import CredentialUnavailable, Injected
from proxy.events import CURRENT_SESSION, EventBus, elapsed_ms
from proxy.headers import forwarded_headers, request_headers_for_upstream
from proxy.identity import Identity, IdentityError, KeysUnavailable
from proxy.matcher import Facts, headers_for_facts
from proxy.policy import NEEDS_BODY, Action, Decision
from proxy.reload import ConfigHolder
from proxy.server.answers import Answers, Refusal
from proxy.server.forward import DestinationRefused, ForwardRequest, ForwardService
from proxy.server.forward_http import forward_request
from proxy.server.holding import Holding, HoldRefused
from proxy.server.identity_http import IdentityGate
from proxy.server.masked_relay import MaskingService
from proxy.server.recording_tap import RecordingTap
from proxy.server.relay import AgentBody, Relay, classify_upstream_error, upstream_url
from proxy.server.requestcheck import (
    BadRequest,
    BodyTooLarge,
    RequestTarget,
    check_request,
    read_bounded,
)

log = logging.getLogger("sluice.forwarder")
TARGET_KEY = web.AppKey("sluice_fixed_target", str)
_LABELS = {Action.ALLOW: "allowed", Action.DENY: "denied", Action.APPROVE: "held"}


@functools.lru_cache(maxsize=16)
def _client_timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read)


def _ended(refused: HoldRefused) -> Decision:
    """A held request's end as a decision (with who decided, when a person did)."""
    return Decision(Action.DENY, refused.rule, refused.reason, refused.error, refused.approval)


def _held_refusal(refused: HoldRefused) -> Refusal:
    return Refusal(
        refused.status,
        refused.error,
        refused.reason,
        rule=refused.rule,
        decision=refused.decision,
        extra=refused.extra,
        headers={"Retry-After": "30"} if refused.status == 429 else None,
    )


class Forwarder:
    def __init__(
        self,
        holder: ConfigHolder,
        bus: EventBus,
        session: aiohttp.ClientSession,
        gate: IdentityGate,
        holding: Holding | None = None,
        masking: MaskingService | None = None,
        tap: RecordingTap | None = None,
        forward: ForwardService | None = None,
    ) -> None:
        self.tap = tap
        self.answers = Answers(bus, tap)
        self.forward = forward
        self.holding = holding
        self.masking = masking
        self.draining = False
        self.holder = holder
        self.bus = bus
        self.session = session
        self.gate = gate
        self.relay = Relay(bus)
        # Request ids: unique per process run, cheap; they are labels, not secrets.
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def next_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):08x}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.idle.clear()
        started = time.perf_counter()
        request_id = f"{self._id_prefix}{next(self._ids):08x}"
        config = self.holder.current
        try:
            if self.draining:
                raise Refusal(
                    503,
                    "proxy_stopping",
                    "the proxy is stopping; retry shortly",
                    headers={"Connection": "close"},
                )
            return await self._process(
                request, config, request.app.get(TARGET_KEY), request_id, started
            )
        except Refusal as refusal:
            return self.answers.refuse(request, request_id, started, refusal)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()

    async def _process(
        self,
        request: web.Request,
        config: Config,
        fixed_target: str | None,
        request_id: str,
        started: float,
    ) -> web.StreamResponse:
        bus = self.bus
        received = {
            "request_id": request_id,
            "method": request.method,
            "host": request.host,
            "client": request.remote,
            "bytes_in": request.content_length,
        }
        fwd: ForwardRequest | None = None
        try:
            found = None
            if self.forward is not None and fixed_target is None:
                found = forward_request(request, config)
            if found is not None:
                fwd, origin = found
                received.update(host=fwd.authority.host, port=fwd.authority.port, forward=fwd.mode)
                where = check_request(request, fwd.target, origin)
            else:
                where = check_request(request, fixed_target)
        except BadRequest as exc:
            bus.publish("request.received", path=request.path, **received)
            raise Refusal(400, "bad_request", exc.reason) from None
        target_name = where.name
        shown_path, shown_query = where.path, where.raw_query
        if self.masking is not None:  # a token in a URL must not reach events or the console
            shown_path = self.masking.redact_text(config, shown_path)
            shown_query = self.masking.redact_text(config, shown_query)
        received.update(target=target_name, path=shown_path, query=shown_query)
        if fwd is not None and fwd.tunnel is not None:
            identity = fwd.tunnel.identity  # authenticated by its CONNECT
            fwd.tunnel.requests += 1
            if identity.expires_at is not None and identity.expires_at < time.time():
                bus.publish("request.received", **received)
                raise Refusal(401, "invalid_token", "the tunnel's token has expired; reconnect")
        else:
            identity = await self._authenticate(request, config, received, proxy=fwd is not None)
        CURRENT_SESSION.set(identity.session)
        bus.publish("request.received", **received, **identity.to_event())
        if fwd is not None:
            assert self.forward is not None
            target: TargetModel | None = self.forward.target_model(config, fwd)
        else:
            target = config.targets.get(target_name) if target_name else None
        if target is None:
            reason = f"no target named {target_name!r}" if target_name else "no target in the path"
            raise Refusal(404, "unknown_target", reason)
        facts = Facts(
            method=request.method,
            target=target_name,
            path=where.path,
            query=where.raw_query,
            host=fwd.authority.host if fwd is not None else request.host,
            port=fwd.authority.port if fwd is not None else None,
            headers=headers_for_facts(request.headers.items())
            if config.policy.reads_headers
            else {},
            subject=identity.subject,
            groups=identity.groups,
            content_type=request.headers.get("Content-Type", ""),
        )
        decision, body = await self._decide(request, config, facts, identity.session)
        label = _LABELS[decision.action]
        held = decision.action is Action.APPROVE
        if held:
            bus.publish(
                "request.held",
                request_id=request_id,
                decision="held",
                rule=decision.rule,
                reason=decision.reason,
                code="held",
            )
            # Recorded before anyone decides, with the body a person will judge: a crash
            # while it waits still leaves the request in the recording.
            try:
                body = await self.holding.read_body(request, config, decision, body)
            except HoldRefused as refused:
                await self.answers.record_request(
                    request,
                    identity,
                    where,
                    body,
                    request_id,
                    _ended(refused),
                    refused.decision,
                    fwd,
                )
                raise _held_refusal(refused) from None
            await self.answers.record_request(
                request, identity, where, body, request_id, decision, "held", fwd
            )
            try:
                decision, body = await self.holding.resolve(
                    request, config, facts, identity, decision, body, request_id
                )
            except HoldRefused as refused:
                await self.answers.record_decision(
                    request_id, identity.session, _ended(refused), refused.decision
                )
                raise _held_refusal(refused) from None
            label = "approved"
        if fwd is not None and decision.allowed:  # under this request's rule, after approval
            fwd, decision, label = await self._check_destination(config, fwd, decision, label)
        bus.publish(
            "request.decided",
            request_id=request_id,
            decision=label,
            rule=decision.rule,
            reason=decision.reason,
            code=decision.code,
        )
        if held:
            await self.answers.record_decision(request_id, identity.session, decision, label)
        else:
            await self.answers.record_request(
                request, identity, where, body, request_id, decision, label, fwd
            )
        if not decision.allowed:
            response = self.answers.deny(request_id, started, decision)
            self.answers.record_answer(request_id, identity.session, response)
            return response
        capture = self.tap.capture() if self.tap is not None else None
        sent = self.tap.capture() if self.tap is not None and body is None else None
        response = await self._forward(
            request,
            config,
            target,
            identity,
            where,
            body,
            request_id,
            started,
            label,
            capture,
            sent=sent,
            fwd=fwd,
        )
        if self.tap is not None:
            if sent is not None and sent.size:
                self.tap.request_body(request_id=request_id, session=identity.session, sent=sent)
            self.tap.response(
                request_id=request_id,
                session=identity.session,
                status=response.status,
                headers=response.headers.items(),
                capture=capture,
                duration_ms=elapsed_ms(started),
            )
        return response

    async def _check_destination(
        self, config: Config, fwd: ForwardRequest, decision: Decision, label: str
    ) -> tuple[ForwardRequest, Decision, str]:
        """Resolve and check the destination under the rule that allowed this request; a
        refused address is a denial. A tunnel remembers its checks (by allow_private)."""
        assert self.forward is not None
        entry = fwd.entry
        allow_private = bool(entry and entry.allow_private) or config.policy.names_host(
            decision.rule, fwd.authority.host
        )
        tunnel = fwd.tunnel
        addresses = tunnel.checked.get(allow_private) if tunnel is not None else None
        if addresses is None:
            try:
                verdict = await self.forward.check_destination(config, fwd.authority, allow_private)
            except DestinationRefused as refused:
                if refused.status != 403:
                    raise Refusal(refused.status, refused.code, refused.reason) from None
                return fwd, Decision(Action.DENY, None, refused.reason, refused.code), "denied"
            addresses = verdict.addresses
            if tunnel is not None:
                tunnel.checked[allow_private] = addresses
        return replace(fwd, addresses=addresses, private=allow_private), decision, label

    async def _authenticate(
        self,
        request: web.Request,
        config: Config,
        received: dict[str, object],
        *,
        proxy: bool = False,
    ) -> Identity:
        header = "Proxy-Authorization" if proxy else "Authorization"
        try:
            return await self.gate.authenticate(config, request.headers.get(header))
        except IdentityError as exc:
            self.bus.publish("request.received", **received)
            if proxy:
                raise Refusal(
                    407,
                    "proxy_auth_required",
                    exc.reason,
                    decision="unauthenticated",
                ) from None
            raise Refusal(
                401,
                "invalid_token",
                exc.reason,
                decision="unauthenticated",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            ) from None
        except KeysUnavailable:
            self.bus.publish("request.received", **received)
            raise Refusal(
                503,
                "identity_unavailable",
                "no identity provider keys are available to check the token",
                decision="unauthenticated",
            ) from None

    async def _decide(
        self, request: web.Request, config: Config, facts: Facts, session: str
    ) -> tuple[Decision, bytes | None]:
        policy = config.policy
        decision = policy.evaluate(facts)
        body: bytes | None = None
        if decision is NEEDS_BODY:
            try:
                body = await read_bounded(
                    request, policy.max_body_inspect, config.limits.body_timeout
                )
            except BodyTooLarge:
                decision = policy.body_too_large(facts)
            except TimeoutError:
                raise Refusal(
                    408, "body_timeout", "request body was not received in time"
                ) from None
            else:
                found = None
                if policy.scans_secrets and self.masking is not None:
                    found = self.masking.carries_secret(config, request, facts, body, session)
                decision = policy.evaluate(replace(facts, body=body, carries_secret=found))
        if not isinstance(decision, Decision):  # a second NEEDS_BODY would be a bug: deny
            decision = Decision(Action.DENY, None, "policy could not decide", "policy_error")
        if decision.action is Action.APPROVE and self.holding is None:
            decision = Decision(
                Action.DENY,
                decision.rule,
                f"{decision.reason} (needs a human approval, and approvals are "
                "not enabled on this proxy)",
                "approval_unavailable",
            )
        return decision, body

    async def _credential(
        self, config: Config, target: TargetModel, identity: Identity
    ) -> Injected | None:
        if not target.credential:
            return None
        provider = self.gate.credentials(config)[target.credential]
        try:
            return await provider.obtain(identity, target.name)
        except Exception as exc:  # any failure to obtain a credential refuses, never forwards
            detail = str(exc) if isinstance(exc, CredentialUnavailable) else type(exc).__name__
            log.warning("credential %s unavailable: %s", target.credential, detail)
            raise Refusal(
                503,
                "credential_unavailable",
                f"the credential for target {target.name} cannot be obtained",
            ) from None

    async def _forward(
        self,
        request: web.Request,
        config: Config,
        target: TargetModel,
        identity: Identity,
        where: RequestTarget,
        body: bytes | None,
        request_id: str,
        started: float,
        label: str = "allowed",
        capture: Any = None,
        sent: Any = None,
        fwd: ForwardRequest | None = None,
    ) -> web.StreamResponse:
        limits = config.limits
        injected = await self._credential(config, target, identity)
        drop = {injected.header.lower()} if injected else set()
        headers = request_headers_for_upstream(
            request.headers.items(), also_drop=drop, keep_authorization=fwd is not None
        )
        session = self.session
        extra: dict[str, Any] = {}
        if fwd is not None:
            # The destination is not ours to tell about the agent's host; only which
            # checked addresses it may be reached at (the pinned resolver's answer).
            assert self.forward is not None
            session, pins = self.forward.route(fwd)
            pins.pin(fwd.authority.host, fwd.addresses)
            if fwd.scheme == "https":
                extra["ssl"] = self.forward.ssl_context(config)
        else:
            headers += forwarded_headers(
                client_ip=request.remote or "unknown",
                host=request.host,
                scheme=request.scheme,
                request_id=request_id,
            )
        if injected is not None:
            headers.append((injected.header, injected.value))
        if target.preserve_host:
            headers.append(("Host", request.host))
        data: object = body
        agent_body: AgentBody | None = None
        if body is not None:
            headers.append(("Content-Length", str(len(body))))
        elif request.body_exists:
            if request.content_length is not None:
                if request.content_length > limits.max_body_size:
                    raise Refusal(
                        413, "body_too_large", f"request body exceeds {limits.max_body_size} bytes"
                    )
                headers.append(("Content-Length", str(request.content_length)))
            agent_body = AgentBody(request, limits.max_body_size, limits.body_timeout, sent)
            data = agent_body.chunks()
        timeout = _client_timeout(limits.upstream_connect_timeout, limits.upstream_timeout)
        self.bus.publish("request.forwarded", request_id=request_id, upstream=target.name)
        upstream_started = time.perf_counter()
        try:
            upstream = await session.request(
                request.method,
                upstream_url(target.upstream, where.raw_path, where.raw_query),
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=timeout,
                **extra,
            )
        except Exception as exc:
            if agent_body is not None and agent_body.fault == "too_large":
                raise Refusal(
                    413, "body_too_large", f"request body exceeds {limits.max_body_size} bytes"
                ) from None
            if agent_body is not None and agent_body.fault == "timeout":
                raise Refusal(
                    408, "body_timeout", "request body was not received in time"
                ) from None
            failed = self.relay.failed(
                request_id, started, target.name, classify_upstream_error(exc), label
            )
            if capture is not None and failed.body is not None:
                capture.add(bytes(failed.body))  # recorded as the agent received it
            return failed
        try:
            masking = (
                self.masking.for_target(config, target, identity.session)
                if self.masking is not None
                else None
            )
            return await self.relay.relay(
                request, upstream, request_id, started, upstream_started, label, masking, capture
            )
        finally:
            upstream.release()
