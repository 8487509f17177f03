"""Assemble and run one proxy: listeners, client session, admin API, config watcher."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.approvals import ApprovalDesk, Held
from proxy.config import Config, parse_host_port
from proxy.events import EventBus
from proxy.flows import FlowTable
from proxy.learned import append_rule, rule_for
from proxy.masking.engine import Masker
from proxy.metrics import ProxyMetrics
from proxy.recording import Recorder
from proxy.recording.supervisor import RecorderSupervisor
from proxy.reload import ConfigHolder, watch_config
from proxy.server.admin import AdminApi
from proxy.server.forward import CertificateAuthority, Connector, ForwardService, Resolver
from proxy.server.forward_connect import ConnectHandler
from proxy.server.forward_front import ForwardFront
from proxy.server.forwarder import TARGET_KEY, Forwarder
from proxy.server.guard import GuardedAppRunner, assert_c_parser, install_log_redaction
from proxy.server.holding import Holding
from proxy.server.identity_http import HttpFetcher, IdentityGate
from proxy.server.masked_relay import MaskingService
from proxy.server.recording_setup import flow_details, open_recording
from proxy.server.recording_tap import RecordingTap
from proxy.state import ensure_state_dir, load_or_create_admin_token

log = logging.getLogger("sluice.runtime")
SWITCH_INTERVAL = 0.0005


@dataclass
class Overrides:
    """Command-line settings that win over the config file for this process."""

    listen: str | None = None
    admin_listen: str | None = None
    state_dir: Path | None = None


@dataclass
class Listener:
    name: str
    runner: GuardedAppRunner
    url: str = ""
    #: The main listener's own asyncio server (CONNECT front door), if it has one.
    front: asyncio.Server | None = None


@dataclass
class ProxyRuntime:
    config: Config
    overrides: Overrides = field(default_factory=Overrides)
    watch: bool = True
    #: Forward proxy seams for tests: name resolution, tunnel connects, the local CA.
    resolver: Resolver | None = None
    connector: Connector | None = None
    ca_factory: Callable[[Path], CertificateAuthority] | None = None

    def __post_init__(self) -> None:
        override = self.overrides.state_dir
        if override is not None and self.config.state_override != override:
            self.config = replace(self.config, state_dir=override, state_override=override)
        self.holder = ConfigHolder(self.config)
        self.bus = EventBus(self.config.events.buffer)
        self.flows = FlowTable(self.config.events.flows)
        self.metrics = ProxyMetrics(
            in_flight=lambda: self.forwarder.in_flight if self.forwarder else 0
        )
        self.bus.add_listener(self.flows.apply)
        self.bus.add_listener(self.metrics.observe, ProxyMetrics.EVENT_TYPES)
        self.listeners: list[Listener] = []
        self.admin_url = ""
        self._stop_watch = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._fetch_session: aiohttp.ClientSession | None = None
        self.gate: IdentityGate | None = None
        self.admin: AdminApi | None = None
        self.desk: ApprovalDesk | None = None
        self.holding: Holding | None = None
        self.masking: MaskingService | None = None
        self.recorder: Recorder | None = None
        self.recorder_supervisor: RecorderSupervisor | None = None
        self.tap: RecordingTap | None = None
        self.forwarder: Forwarder | None = None
        self.forward: ForwardService | None = None
        self.connects: ConnectHandler | None = None
        self._tunnel_runner: GuardedAppRunner | None = None

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def main_url(self) -> str:
        return self.listeners[0].url if self.listeners else ""

    async def start(self) -> None:
        assert_c_parser()
        install_log_redaction()
        config = self.config
        token = load_or_create_admin_token(ensure_state_dir(self.state_dir))
        limits = config.limits
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=10),
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # Identity providers and token endpoints get their own session: JSON, decompressed.
        self._fetch_session = aiohttp.ClientSession(
            trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        self.gate = IdentityGate(self.state_dir, HttpFetcher(self._fetch_session))
        self.gate.verifier(config)  # create the local signing key (or fail) before listening
        self.desk = ApprovalDesk(
            max_pending=config.approvals.max_pending,
            retry_window=config.approvals.retry_window,
            emit=lambda kind, summary: self.bus.publish(kind, **summary),
            learn=self._learn,
        )
        recording = await open_recording(config, self.state_dir, self.bus)
        if recording is not None:
            self.recorder, self.recorder_supervisor = recording.recorder, recording.supervisor
            self.tap = recording.tap
        self.masking = MaskingService(self.state_dir)
        self.masking.masker(config)  # compile the rules before the first request needs them
        self.holding = Holding(self.desk, self._fetch_session, self._preview_mask)
        self.forward = ForwardService(
            self.state_dir,
            resolver=self.resolver,
            connector=self.connector,
            ca_factory=self.ca_factory,
        )
        await self.forward.start()
        self.forwarder = Forwarder(
            self.holder,
            self.bus,
            self._session,
            self.gate,
            self.holding,
            self.masking,
            self.tap,
            self.forward,
        )
        guard: dict[str, Any] = {
            "header_timeout": limits.header_timeout,
            "max_header_bytes": limits.max_header_size * 2,
            "max_connections": limits.max_connections,
        }
        handler_options: dict[str, Any] = {
            "keepalive_timeout": limits.idle_timeout,
            "max_line_size": limits.max_header_size,
            "max_field_size": limits.max_header_size,
            "max_headers": limits.max_headers,
            "access_log": None,
            # Bodies pass as sent: inflating them here would forward a decoded body under
            # the agent's Content-Encoding. The outbound scan decodes for itself.
            "auto_decompress": False,
            "handle_signals": False,
            # The drain itself is bounded by _drain(); this only cuts what is left after it.
            "shutdown_timeout": 0.1,
        }
        main = self._proxy_app(None, limits.max_body_size)
        # Connections inside intercepted CONNECTs: the same app, no socket of its own.
        self._tunnel_runner = GuardedAppRunner(
            self._proxy_app(None, limits.max_body_size), guard=guard, **handler_options
        )
        await self._tunnel_runner.setup()
        self.connects = ConnectHandler(
            self.holder,
            self.bus,
            self.gate,
            self.forward,
            self.forwarder.next_request_id,
            self._tunnel_runner.server,  # type: ignore[arg-type]
            self.tap,
            self.desk,
        )
        await self._listen_front(
            main, self.overrides.listen or config.proxy.listen, guard, handler_options
        )
        for target in config.targets.values():
            if target.listen:
                app = self._proxy_app(target.name, limits.max_body_size)
                await self._listen(target.name, app, target.listen, guard, handler_options)
        self.admin = AdminApi(
            token=token,
            holder=self.holder,
            bus=self.bus,
            flows=self.flows,
            metrics=self.metrics,
            status=self._status,
            gate=self.gate,
            desk=self.desk,
            details=flow_details(config, self.state_dir, self.tap, self._details_masker),
        )
        admin_runner = GuardedAppRunner(self.admin.make_app(), guard=guard, **handler_options)
        await admin_runner.setup()
        self.admin_url = await _start_site(
            admin_runner, self.overrides.admin_listen or config.proxy.admin_listen
        )
        self._admin_runner = admin_runner
        if self.forward is not None:  # Sluice never forwards to itself, whatever a rule says
            urls = [URL(listener.url) for listener in self.listeners] + [URL(self.admin_url)]
            self.forward.own_endpoints = {(url.host or "", url.port or 0) for url in urls}
        if self.watch:
            self._watch_task = asyncio.create_task(
                watch_config(self.holder, self.bus, self._stop_watch), name="config-watch"
            )
        # Everything allocated so far lives as long as the process: keep the collector from
        # rescanning it, and collect young objects less often (measured: ~20% less CPU per
        # request under load, see docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        # The recorder's thread needs the GIL back after each write and fsync; under load
        # the default 5 ms switch interval makes every group commit wait for it, and every
        # request with it (measured: docs/benchmarks.md, recording on vs off).
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.bus.publish(
            "proxy.started",
            listen=self.main_url,
            admin=self.admin_url,
            identity=config.identity.mode,
            config=str(config.path),
            digest=config.digest,
        )

    def _proxy_app(self, fixed_target: str | None, max_body: int) -> web.Application:
        assert self.forwarder is not None
        app = web.Application(client_max_size=max_body, handler_args=None)
        if fixed_target is not None:
            app[TARGET_KEY] = fixed_target
        app.router.add_route("*", "/{tail:.*}", self.forwarder.handle)
        return app

    async def _listen(
        self,
        name: str,
        app: web.Application,
        address: str,
        guard: dict[str, Any],
        options: dict[str, Any],
    ) -> None:
        runner = GuardedAppRunner(app, guard=guard, **options)
        await runner.setup()
        listener = Listener(name, runner)
        self.listeners.append(listener)
        listener.url = await _start_site(runner, address)

    async def _listen_front(
        self, app: web.Application, address: str, guard: dict[str, Any], options: dict[str, Any]
    ) -> None:
        """The main listener: CONNECT answered by ForwardFront, the rest by aiohttp."""
        runner = GuardedAppRunner(app, guard=guard, **options)
        await runner.setup()
        plain = runner.server
        assert plain is not None and self.connects is not None
        connects = self.connects
        sock = _bind(address)
        server = await asyncio.get_running_loop().create_server(
            lambda: ForwardFront(
                connects,
                plain,  # type: ignore[arg-type]
                header_timeout=guard["header_timeout"],
                max_header_bytes=guard["max_header_bytes"],
            ),
            sock=sock,
            backlog=1024,
        )
        self.listeners.append(Listener("main", runner, _url_of(sock), front=server))

    def _status(self) -> dict[str, Any]:
        return {
            "listen": self.main_url,
            "admin": self.admin_url,
            "in_flight": self.forwarder.in_flight if self.forwarder else 0,
            "recorder": {
                "state": self.recorder.state if self.recorder else "off",
                "reason": self.recorder.failure if self.recorder else None,
                "file": str(self.recorder.current_file) if self.recorder else None,
                # records per fsync: how well group commit is amortising the disk
                "records": self.recorder.stats.records if self.recorder else 0,
                "fsyncs": self.recorder.stats.batches if self.recorder else 0,
            },
            "forward": {
                "enabled": self.holder.current.forward.enabled,
                "tunnels": len(self.forward.tunnels) if self.forward else 0,
                "connects_in_progress": len(self.connects.tasks) if self.connects else 0,
            },
            "subscribers": self.bus.subscriber_count,
            "dropped_subscribers": self.bus.dropped_subscribers,
        }

    def _details_masker(self) -> Masker | None:
        """Request bodies served to consoles are masked like responses (current rules)."""
        current = self.holder.current
        if self.masking is None or not current.masking.enabled:
            return None
        return self.masking.masker(current)

    def _preview_mask(self, data: bytes) -> bytes:
        """Approvers see a body preview with its secrets masked, like the agent would."""
        assert self.masking is not None
        return self.masking.masker(self.holder.current).mask_bytes(data).masked

    def _learn(self, held: Held, verdict: str, approver: str) -> str:
        """Scope "always": append a rule to the learned file and apply it at once."""
        rule = rule_for(held, verdict, approver)
        append_rule(self.holder.current.learned_rules_path, rule)
        self.holder.reload(self.bus)
        return str(rule["name"])

    async def _drain(self) -> None:
        """Close every agent listener first, end keep-alive, then wait (bounded) for
        in-flight requests; whatever still runs after ``drain_timeout`` is cut."""
        if self.forwarder is not None:
            self.forwarder.draining = True  # new requests on kept-alive connections: 503
        for listener in self.listeners:
            if listener.front is not None:
                listener.front.close()
            for site in list(listener.runner.sites):
                await site.stop()
        if self.forwarder is not None and self.forwarder.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.forwarder.idle.wait(), self.config.proxy.drain_timeout)

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests for a bounded time, then close."""
        self._stop_watch.set()
        if self.desk is not None:
            # Pending approvals end as denials (and events), never as approvals.
            self.desk.deny_all("the proxy stopped before anyone decided")
        self.bus.publish(
            "proxy.stopping", in_flight=self.forwarder.in_flight if self.forwarder else 0
        )
        await self._drain()
        for listener in self.listeners:
            await listener.runner.cleanup()
        if self._tunnel_runner is not None:
            await self._tunnel_runner.cleanup()
        if self.connects is not None:
            for task in list(self.connects.tasks):
                task.cancel()
            await asyncio.gather(*self.connects.tasks, return_exceptions=True)
        if self.forward is not None:
            await self.forward.close()
        if self.admin is not None:
            self.admin.closing.set()
            await self._admin_runner.cleanup()
            if self.admin.details is not None:
                self.admin.details.close()  # the open recording's file handles
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        if self.holding is not None:
            await self.holding.close()
        if self.tap is not None:
            await self.tap.flush()
        if self.recorder_supervisor is not None:
            await self.recorder_supervisor.stop()
        if self.recorder is not None:
            with contextlib.suppress(Exception):  # a failed recorder cannot seal; verify says so
                await self.recorder.close()
        for session in (self._session, self._fetch_session):
            if session is not None:
                await session.close()


async def _start_site(runner: web.AppRunner, address: str) -> str:
    sock = _bind(address)
    site = web.SockSite(runner, sock, backlog=1024)
    await site.start()
    return _url_of(sock)


def _bind(address: str) -> socket.socket:
    host, port = parse_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _url_of(sock: socket.socket) -> str:
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return f"http://{shown}:{bound_port}"
