"""The forward proxy's shared parts: resolution, address checks, pinning, upstream TLS.

A destination is resolved once (through an injectable resolver), every answer is
checked, and only checked addresses are ever connected to: tunnels connect to them
directly (through an injectable connector), and the aiohttp client used for
intercepted and plain ``http://`` requests resolves names only through
``PinnedResolver``, which answers from the pin table and nothing else. SNI and Host stay
the name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from proxy.config import Config, TargetModel
from proxy.config_models import TargetMasking
from proxy.egress import (
    AddressVerdict,
    Authority,
    EgressEntry,
    PinTable,
    check_addresses,
    is_ip_literal,
)
from proxy.identity import Identity

log = logging.getLogger("sluice.forward")

#: ``await resolver(host, port)``: the addresses a name resolves to, as text.
Resolver = Callable[[str, int], Awaitable[list[str]]]
#: ``await connector(address, port, protocol_factory)``: a connected transport/protocol.
Connector = Callable[
    [str, int, Callable[[], asyncio.Protocol]],
    Awaitable[tuple[asyncio.Transport, asyncio.Protocol]],
]


class CertificateAuthority(Protocol):
    """What interception needs of the local CA (``proxy.tls.ca.LocalCA``)."""

    def server_context(self, hostname: str) -> ssl.SSLContext: ...


async def system_resolve(host: str, port: int) -> list[str]:
    """The system resolver (getaddrinfo), every address it answers."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def system_connect(
    address: str, port: int, factory: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(factory, address, port)
    return transport, protocol  # type: ignore[return-value]


def default_ca(state_dir: Path) -> CertificateAuthority:
    from proxy.tls.ca import LocalCA  # created lazily: only interception needs it

    return LocalCA.load_or_create(state_dir)


class PinnedResolver(AbstractResolver):
    """aiohttp's resolver for forward requests: only addresses that passed the checks."""

    def __init__(self, pins: PinTable) -> None:
        self.pins = pins

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self.pins.lookup(host)
        if not addresses:  # never checked: refuse rather than ask DNS
            raise OSError(f"{host} has no checked address")
        results: list[ResolveResult] = []
        for address in addresses:
            version = ipaddress.ip_address(address).version
            results.append(
                {
                    "hostname": host,
                    "host": address,
                    "port": port,
                    "family": socket.AF_INET6 if version == 6 else socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        return results

    async def close(self) -> None:
        return None


def _pinned_session(pins: PinTable) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        auto_decompress=False,
        connector=aiohttp.TCPConnector(
            limit=0,
            limit_per_host=0,
            resolver=PinnedResolver(pins),
            use_dns_cache=False,  # a cache could outlive the pin it came from
        ),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class DestinationRefused(Exception):
    """The destination may not be reached: status, machine code and a reason."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


@dataclass
class Tunnel:
    """An intercepted CONNECT: what every request inside it inherits."""

    authority: Authority
    target: str
    entry: EgressEntry | None
    identity: Identity
    addresses: tuple[str, ...]  # passthrough only: what the tunnel connected to
    request_id: str
    requests: int = 0
    #: Intercepted: allow_private -> the checked addresses, so a kept-alive tunnel resolves
    #: once per kind of check, not per request.
    checked: dict[bool, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ForwardRequest:
    """A request bound for a forward destination (inside a tunnel, or absolute-form)."""

    authority: Authority
    scheme: str
    target: str
    entry: EgressEntry | None
    tunnel: Tunnel | None = None
    addresses: tuple[str, ...] = field(default=())
    #: The check allowed non-public addresses: such requests use their own connection
    #: pool and pins, never shared with requests that were checked as public-only.
    private: bool = False

    @property
    def mode(self) -> str:
        return "intercept" if self.tunnel is not None else "http"

    def base_url(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = (
            self.authority.shown
            if self.authority.port != default
            else (f"[{self.authority.host}]" if ":" in self.authority.host else self.authority.host)
        )
        return f"{self.scheme}://{host}"


class ForwardService:
    """Everything forward requests share across connections."""

    def __init__(
        self,
        state_dir: Path,
        *,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
        ca_factory: Callable[[Path], CertificateAuthority] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.resolver = resolver or system_resolve
        self.connector = connector or system_connect
        self._ca_factory = ca_factory or default_ca
        self._ca: CertificateAuthority | None = None
        self._ca_lock = asyncio.Lock()
        self.pins = PinTable()  # public addresses only (checked without allow_private)
        self.private_pins = PinTable()  # checked with allow_private
        self.session: aiohttp.ClientSession | None = None
        self.private_session: aiohttp.ClientSession | None = None
        self._ssl: dict[str, ssl.SSLContext] = {}
        self._ssl_for: Config | None = None
        self._last_ssl: ssl.SSLContext | None = None
        self._models: dict[str, TargetModel] = {}
        self._models_for: Config | None = None
        self.tunnels: set[asyncio.BaseTransport] = set()
        self.max_tunnels = 1024
        #: (bound address, port) of the proxy's own listeners, admin API included.
        self.own_endpoints: set[tuple[str, int]] = set()

    async def start(self) -> None:
        # Two pools: aiohttp keys pooled connections by name and port, not by address, so
        # a connection opened under allow_private must never serve a public-only request.
        self.session = _pinned_session(self.pins)
        self.private_session = _pinned_session(self.private_pins)

    def route(self, forward: ForwardRequest) -> tuple[aiohttp.ClientSession, PinTable]:
        """The connection pool and pin table a checked request must use."""
        session = self.private_session if forward.private else self.session
        assert session is not None
        return session, self.private_pins if forward.private else self.pins

    async def close(self) -> None:
        for transport in list(self.tunnels):
            transport.abort()
        self.tunnels.clear()
        for session in (self.session, self.private_session):
            if session is not None:
                await session.close()

    def ssl_context(self, config: Config) -> ssl.SSLContext:
        """Upstream trust: the configured bundle, else the system store (SSL_CERT_FILE)."""
        if self._ssl_for is config and self._last_ssl is not None:
            return self._last_ssl  # one config at a time: no path work per request
        bundle = config.ca_bundle_path
        key = str(bundle) if bundle else ""
        context = self._ssl.get(key)
        if context is None:
            context = ssl.create_default_context(cafile=str(bundle) if bundle else None)
            context.set_alpn_protocols(["http/1.1"])
            self._ssl[key] = context
        self._ssl_for, self._last_ssl = config, context
        return context

    async def server_context(self, hostname: str) -> ssl.SSLContext:
        """The leaf for an intercepted name, from the local CA (created on first use)."""
        if self._ca is None:
            async with self._ca_lock:  # created once, by one task
                if self._ca is None:
                    self._ca = await asyncio.to_thread(self._ca_factory, self.state_dir)
        cached = getattr(self._ca, "cached_context", None)
        context = cached(hostname) if cached is not None else None
        if context is not None:  # a cache hit needs no thread hop
            return context
        return await asyncio.to_thread(self._ca.server_context, hostname)

    def target_model(self, config: Config, forward: ForwardRequest) -> TargetModel:
        """The stand-in target that masking and relay code expect (cached per config)."""
        if self._models_for is not config:
            self._models_for, self._models = config, {}
        key = f"{forward.target} {forward.base_url()}"
        model = self._models.get(key)
        if model is None:
            if len(self._models) >= 1024:
                self._models.clear()
            model = self._models[key] = self._target_model(config, forward)
        return model

    def _target_model(self, config: Config, forward: ForwardRequest) -> TargetModel:
        entries = config.egress_entries or {}
        model = entries.get(forward.target)
        masking = model.masking if model is not None else TargetMasking()
        return TargetModel.model_construct(
            name=forward.target,
            upstream=forward.base_url(),
            listen=None,
            preserve_host=False,
            credential=model.credential if model is not None else None,
            masking=masking,
        )

    async def check_destination(
        self, config: Config, authority: Authority, allow_private: bool
    ) -> AddressVerdict:
        """Resolve once and check every answer; DestinationRefused if it may not be reached."""
        host = authority.host
        if is_ip_literal(host):
            answers = [host]
        else:
            try:
                async with asyncio.timeout(config.limits.upstream_connect_timeout):
                    answers = await self.resolver(host, authority.port)
            except Exception as exc:  # no answer is a refusal, never a guess
                log.info("cannot resolve %s: %s", host, type(exc).__name__)
                raise DestinationRefused(
                    502, "destination_unresolved", f"{host} could not be resolved"
                ) from None
        verdict = check_addresses(host, answers, allow_private=allow_private)
        if not verdict.ok:
            raise DestinationRefused(
                403, "destination_refused", verdict.refused or f"{host} may not be reached"
            )
        if any(self._is_own(address, authority.port) for address in verdict.addresses):
            raise DestinationRefused(
                403,
                "destination_is_sluice",
                f"{authority.shown} is this proxy's own listener; it is never a destination",
            )
        return verdict

    def _is_own(self, address: str, port: int) -> bool:
        """Whether address:port reaches one of the proxy's own sockets (loops, admin API)."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        for bound, bound_port in self.own_endpoints:
            if bound_port != port:
                continue
            mine = ipaddress.ip_address(bound)
            if mine.is_unspecified or mine == ip or (mine.is_loopback and ip.is_loopback):
                return True
        return False

    async def connect_any(
        self,
        config: Config,
        addresses: tuple[str, ...],
        port: int,
        factory: Callable[[], asyncio.Protocol],
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """Connect to the first checked address that answers (bounded in time)."""
        last: BaseException | None = None
        for address in addresses:
            try:
                async with asyncio.timeout(config.limits.upstream_connect_timeout):
                    return await self.connector(address, port, factory)
            except (OSError, TimeoutError) as exc:
                last = exc
        raise ConnectionError(type(last).__name__ if last else "no address")
