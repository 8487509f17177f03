"""``CONNECT host:port``: identity, host-level policy, address checks, then a tunnel.

Order matters and every step fails closed: the token (``Proxy-Authorization``, 407
otherwise), the policy on destination facts (host, port, target = the ``[[egress]]``
entry's name or ``egress``), then resolution and the address checks, then the record;
only then is anything connected to. Intercepted tunnels (the default) terminate TLS with
a leaf from the local CA and hand the connection to the same aiohttp handler and
``Forwarder`` targets use, so every request inside gets policy, approvals, masking and
recording. Passthrough tunnels carry opaque bytes; their flow keeps the byte counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp.web_protocol import RequestHandler

from proxy.approvals import ApprovalDesk
from proxy.egress import Authority, BadDestination, parse_authority
from proxy.events import CURRENT_SESSION, EventBus
from proxy.identity import Identity, IdentityError, KeysUnavailable
from proxy.matcher import Facts
from proxy.policy import Action, Decision
from proxy.reload import ConfigHolder
from proxy.server.forward import DestinationRefused, ForwardService, Tunnel
from proxy.server.forward_front import ConnectHead, ForwardFront, raw_answer
from proxy.server.forward_outcomes import (
    PROXY_AUTHENTICATE,
    Connect,
    ConnectRefused,
    Outcomes,
    hold_connect,
)
from proxy.server.forward_tunnel import Pipe
from proxy.server.identity_http import IdentityGate
from proxy.server.recording_tap import RecordingRefused, RecordingTap, decision_fields

log = logging.getLogger("sluice.forward")


class ConnectHandler:
    def __init__(
        self,
        holder: ConfigHolder,
        bus: EventBus,
        gate: IdentityGate,
        forward: ForwardService,
        new_request_id: Callable[[], str],
        tunnel_handler: Callable[[], RequestHandler],
        tap: RecordingTap | None = None,
        desk: ApprovalDesk | None = None,
    ) -> None:
        self.holder, self.bus, self.gate, self.forward = holder, bus, gate, forward
        self.new_request_id = new_request_id
        self.tunnel_handler = tunnel_handler
        self.tap, self.desk = tap, desk
        self.outcomes = Outcomes(bus, tap)
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self, front: ForwardFront, head: ConnectHead) -> asyncio.Task[None]:
        job = Connect(front, head, self.holder.current, self.new_request_id(), time.perf_counter())
        task = asyncio.create_task(self._run(job), name=f"connect-{job.request_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _run(self, job: Connect) -> None:
        try:
            await self._connect(job)
        except ConnectRefused as refused:
            self.outcomes.refuse(job, refused)
        except Exception:  # never leave an agent hanging: refuse, keep the reason generic
            log.exception("CONNECT %s failed", job.request_id)
            self.outcomes.refuse(job, ConnectRefused(502, "internal_error", "the tunnel failed"))
        finally:
            job.front.release()

    async def _connect(self, job: Connect) -> None:
        config, head = job.config, job.head
        received: dict[str, Any] = {
            "request_id": job.request_id,
            "method": "CONNECT",
            "client": _peer(job.front),
            "path": "",
            "query": "",
        }
        try:
            authority = parse_authority(head.authority)
        except BadDestination as exc:
            self.bus.publish("request.received", host=head.authority[:255], **received)
            raise ConnectRefused(400, "bad_request", f"CONNECT target: {exc}") from None
        entry = config.egress.match(authority.host, authority.port)
        target = config.egress.target_name(entry)
        mode = config.egress.tls_mode(entry)
        received.update(host=authority.host, port=authority.port, target=target, forward=mode)
        if not config.forward.enabled:
            self.bus.publish("request.received", **received)
            raise ConnectRefused(405, "forward_disabled", "this proxy does not forward (CONNECT)")
        job.identity = identity = await self._authenticate(job, received)
        CURRENT_SESSION.set(identity.session)
        self.bus.publish("request.received", **received, **identity.to_event())
        if len(self.forward.tunnels) >= self.forward.max_tunnels:
            raise ConnectRefused(503, "too_many_tunnels", "the proxy is at its tunnel limit")
        facts = Facts(
            method="CONNECT",
            target=target,
            path="/",
            host=authority.host,
            port=authority.port,
            subject=identity.subject,
            groups=identity.groups,
            body=b"",
            carries_secret=False,
        )
        decision = config.policy.evaluate(facts)
        if not isinstance(decision, Decision):  # a body rule cannot need a body here: deny
            decision = Decision(Action.DENY, None, "policy could not decide", "policy_error")
        label = await self._tunnel_decision(job, mode, decision, target, authority, identity)
        addresses: tuple[str, ...] = ()
        allow_private = False
        if decision.action is Action.ALLOW or (
            mode == "passthrough" and decision.action is Action.APPROVE  # approved by now
        ):
            # Checked now so a refused destination refuses the CONNECT itself. Nothing is
            # resolved for an intercepted CONNECT that no rule allowed or that waits for a
            # person (a DNS channel out), and requests inside are checked again under the
            # rule that allowed each of them: this check only serves requests of its kind.
            allow_private = bool(entry and entry.allow_private) or config.policy.names_host(
                decision.rule, authority.host
            )
            try:
                verdict = await self.forward.check_destination(config, authority, allow_private)
            except DestinationRefused as refused:
                denial = Decision(Action.DENY, None, refused.reason, refused.code)
                await self._record(job, target, authority, denial, "denied")
                raise ConnectRefused(
                    refused.status, refused.code, refused.reason, decision="denied"
                ) from None
            addresses = verdict.addresses
        self.bus.publish(
            "request.decided",
            request_id=job.request_id,
            decision=label,
            rule=decision.rule,
            reason=decision.reason,
            code=decision.code,
        )
        await self._record(job, target, authority, decision, label)
        tunnel = Tunnel(authority, target, entry, identity, addresses, job.request_id)
        if addresses:
            tunnel.checked[allow_private] = addresses
        self.bus.publish("request.forwarded", request_id=job.request_id, upstream=target)
        if mode == "passthrough":
            await self._passthrough(job, tunnel, label)
        else:
            await self._intercept(job, tunnel, label)

    async def _authenticate(self, job: Connect, received: dict[str, Any]) -> Identity:
        try:
            return await self.gate.authenticate(job.config, job.head.get("Proxy-Authorization"))
        except IdentityError as exc:
            self.bus.publish("request.received", **received)
            raise ConnectRefused(
                407,
                "proxy_auth_required",
                exc.reason,
                decision="unauthenticated",
                headers=PROXY_AUTHENTICATE,
            ) from None
        except KeysUnavailable:
            self.bus.publish("request.received", **received)
            raise ConnectRefused(
                503,
                "identity_unavailable",
                "no identity provider keys are available to check the token",
                decision="unauthenticated",
            ) from None

    async def _tunnel_decision(
        self,
        job: Connect,
        mode: str,
        decision: Decision,
        target: str,
        authority: Authority,
        identity: Identity,
    ) -> str:
        """The CONNECT's label, or ConnectRefused.

        Passthrough: the host-level decision is final (allow, deny, or hold for a person).
        Intercept: only an explicit deny refuses the tunnel; every request inside is then
        decided in full (default deny included), and approvals hold those requests.
        """
        explicit = decision.rule is not None or decision.code != "denied"  # policy errors too
        if decision.action is Action.DENY and (mode == "passthrough" or explicit):
            await self._record(job, target, authority, decision, "denied")
            self.bus.publish(
                "request.decided",
                request_id=job.request_id,
                decision="denied",
                rule=decision.rule,
                reason=decision.reason,
                code=decision.code,
            )
            raise ConnectRefused(
                403,
                "denied",
                decision.reason,
                decision="denied",
                rule=decision.rule,
                code=decision.code,
            )
        if mode != "passthrough":
            return "intercepted"
        if decision.action is Action.APPROVE:
            # recorded before anyone decides, like a held request
            await self._record(job, target, authority, decision, "held")
            try:
                return await hold_connect(
                    self.desk, self.bus, job, decision, target, authority, identity
                )
            except ConnectRefused as refused:
                ended = Decision(Action.DENY, decision.rule, refused.reason, refused.error)
                await self._record(job, target, authority, ended, refused.decision)
                raise
        return "allowed"

    async def _record(
        self, job: Connect, target: str, authority: Authority, decision: Decision, label: str
    ) -> None:
        """Durable before anything is connected to (or refused): no record, no tunnel."""
        if self.tap is None or job.identity is None:
            return
        fields = decision_fields(decision, label)
        try:
            if job.recorded:  # held first: only how it ended is new
                await self.tap.decision(
                    request_id=job.request_id, session=job.identity.session, decision=fields
                )
                return
            job.recorded = True
            await self.tap.request(
                identity=job.identity,
                request_id=job.request_id,
                method="CONNECT",
                target=target,
                url=authority.shown,
                agent_url=authority.shown,
                client=_peer(job.front) or "",
                headers=job.head.headers,
                body=None,
                streamed=False,
                decision=fields,
                secret_values=[],
            )
        except RecordingRefused:
            raise ConnectRefused(
                503,
                "recording_unavailable",
                "the session recorder cannot write; nothing is forwarded unrecorded",
            ) from None

    def _established(self, job: Connect, transport: asyncio.Transport) -> None:
        """The 200 that opens the tunnel, in the flow and the recording (as its response)."""
        transport.write(raw_answer(200, b""))
        self.bus.publish(
            "request.response_started", request_id=job.request_id, status=200, upstream_ms=0
        )
        if self.tap is not None and job.identity is not None:
            self.tap.response(
                request_id=job.request_id,
                session=job.identity.session,
                status=200,
                headers=[],
                capture=None,
            )

    async def _passthrough(self, job: Connect, tunnel: Tunnel, label: str) -> None:
        front = job.front
        pipe = Pipe(job.config.limits.idle_timeout)
        try:
            upstream, _ = await self.forward.connect_any(
                job.config, tunnel.addresses, tunnel.authority.port, lambda: pipe.upstream
            )
        except ConnectionError:
            raise ConnectRefused(
                502,
                "upstream_unreachable",
                f"{tunnel.authority.shown} refused the connection or did not answer",
                decision=label,
            ) from None
        transport = front.transport
        if transport is None or transport.is_closing():
            upstream.close()
            raise ConnectRefused(499, "client_gone", "the agent hung up", decision=label)
        self.forward.tunnels.add(transport)
        self._established(job, transport)
        early, front.buffer = bytes(front.buffer), bytearray()
        front.state = "pipe"
        pipe.attach_client(transport)
        if early:
            pipe.carry(pipe.client, early)
        expires = tunnel.identity.expires_at
        # An opaque tunnel has no requests to re-check: it ends with the token it opened on.
        expiry = (
            asyncio.get_running_loop().call_later(max(0.0, expires - time.time()), pipe.abort)
            if expires is not None
            else None
        )
        try:
            await pipe.done
        except BaseException:  # cancelled (shutdown): cut both sides now
            pipe.abort()
            raise
        finally:
            # After a normal end both sides are closing gracefully: an abort here would
            # drop the last bytes still in a write buffer.
            if expiry is not None:
                expiry.cancel()
            self.forward.tunnels.discard(transport)
        self.outcomes.tunnel_closed(job, tunnel, label, "passthrough", up=pipe.up, down=pipe.down)

    async def _intercept(self, job: Connect, tunnel: Tunnel, label: str) -> None:
        front = job.front
        try:
            context = await self.forward.server_context(tunnel.authority.host)
        except Exception as exc:
            log.error("the local CA cannot issue for %s: %s", tunnel.authority.host, exc)
            raise ConnectRefused(
                502,
                "ca_unavailable",
                "Sluice's local CA cannot issue a certificate",
                decision=label,
            ) from None
        transport = front.transport
        if transport is None or transport.is_closing():
            raise ConnectRefused(499, "client_gone", "the agent hung up", decision=label)
        if front.buffer:  # bytes before our 200 cannot be the start of TLS with us
            raise ConnectRefused(
                400, "bad_request", "data was sent before the tunnel was open", decision=label
            )
        self._established(job, transport)
        front.state = "tls"
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport,
                front,
                context,
                server_side=True,
                ssl_handshake_timeout=job.config.limits.header_timeout,
            )
        except Exception as exc:
            transport.abort()
            self.outcomes.failed(
                job,
                label,
                f"the agent did not complete TLS with Sluice's CA "
                f"({type(exc).__name__}); does it trust the Sluice CA certificate?",
            )
            return
        if tls is None:
            return
        handler = self.tunnel_handler()
        handler.sluice_tunnel = tunnel  # type: ignore[attr-defined]
        closed: asyncio.Future[None] = loop.create_future()
        handler.sluice_on_lost = lambda: closed.done() or closed.set_result(None)  # type: ignore[attr-defined]
        self.forward.tunnels.add(tls)
        tls.set_protocol(handler)
        handler.connection_made(tls)
        pending, front.buffer = bytes(front.buffer), bytearray()
        front.state = "aiohttp"
        if pending:
            handler.data_received(pending)
        if tls.is_closing():  # the agent left during the handshake: no connection_lost to come
            handler.sluice_on_lost()  # type: ignore[attr-defined]
        try:
            await closed
        finally:
            self.forward.tunnels.discard(tls)
        self.outcomes.tunnel_closed(job, tunnel, label, "intercept", requests=tunnel.requests)


def _peer(front: ForwardFront) -> str | None:
    transport = front.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if peer else None
