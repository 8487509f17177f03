"""Forward-proxy destinations: which host and port, how TLS is handled, and which
addresses may be connected to.

Plain Python (no aiohttp): the server layer resolves a name once through an injected
resolver, asks ``check_addresses`` about every address, and connects only to an address
that passed. A name that resolves to loopback, link-local (cloud metadata), private,
shared (CGNAT), multicast or reserved space is refused unless the config names it
explicitly, so an agent cannot reach the host's own services or the metadata endpoint
through a public-looking name (or a DNS answer that changes between check and connect).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from proxy.matcher import compile_host_globs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
TlsMode = Literal["intercept", "passthrough"]
#: The target name of forward requests that no ``[[egress]]`` entry names.
DEFAULT_EGRESS_NAME = "egress"

#: A name whose last label is a number is an IPv4 address in some spelling (WHATWG URL).
_NUMERIC_LAST_LABEL = re.compile(r"(?:^|\.)(?:0x[0-9a-f]*|[0-9]+)$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$"
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class BadDestination(ValueError):
    """A CONNECT authority or absolute URL host that is not a plain host and port."""


@dataclass(frozen=True, slots=True)
class Authority:
    host: str  # lower case, no brackets, no trailing dot
    port: int

    @property
    def shown(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def normalise_host(host: str) -> str:
    """Lower case, brackets and one trailing dot removed; raises BadDestination."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise BadDestination(f"not an IPv6 address: {host!r}") from None
    text = text.lower().removesuffix(".")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if _NUMERIC_LAST_LABEL.search(text):
        # 1572395042, 0x5db8d822, 0135.184.216.34, 127.1: what resolvers (inet_aton) and
        # browsers (WHATWG URL) read as IPv4. Policy must see the address they reach.
        try:
            return socket.inet_ntoa(socket.inet_aton(text))
        except OSError:
            raise BadDestination(f"not a valid IPv4 address: {host!r}") from None
    if not _HOSTNAME.match(text):
        raise BadDestination(f"not a host name: {host!r}")
    return text


def parse_authority(text: str, default_port: int | None = None) -> Authority:
    """``host:port`` or ``[v6]:port`` (the CONNECT request-target); no userinfo, no path."""
    if not text or any(char in text for char in "/@?#\\ \t") or not text.isascii():
        raise BadDestination("expected host:port")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadDestination("unclosed '[' in the authority")
        host_part, rest = text[: end + 1], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    else:
        host_part, sep, port_text = text.rpartition(":")
        if not sep:
            host_part, port_text = text, ""
    if port_text is None or (port_text == "" and default_port is None):
        raise BadDestination("expected host:port")
    if port_text == "":
        port = default_port or 0
    elif not port_text.isdigit() or len(port_text) > 5:
        raise BadDestination("the port must be a number")
    else:
        port = int(port_text)
    if not 1 <= port <= 65535:
        raise BadDestination("the port must be between 1 and 65535")
    return Authority(normalise_host(host_part), port)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, compatible, NAT64, 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    packed = int(address)
    if packed >> 32 == 0 and packed > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(packed)
    return None


def non_public_reason(address: IPAddress) -> str | None:
    """Why an address is not a public internet address, or None if it is one."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            reason = non_public_reason(inner)
            return f"{reason} (IPv4 inside IPv6)" if reason else None
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (cloud metadata lives here)"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "shared address space (CGNAT)"
    if isinstance(address, ipaddress.IPv6Address) and address in ipaddress.ip_network("fc00::/7"):
        return "unique local (ULA)"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local (fec0::/10, still routed inside some networks)"
    if address.is_private:
        return "private"
    if address.is_reserved or not address.is_global:
        return "reserved"
    return None


@dataclass(frozen=True, slots=True)
class AddressVerdict:
    """The addresses that may be connected to, or why none may."""

    addresses: tuple[str, ...]
    refused: str | None = None

    @property
    def ok(self) -> bool:
        return self.refused is None and bool(self.addresses)


def check_addresses(host: str, answers: Iterable[str], *, allow_private: bool) -> AddressVerdict:
    """Every answer is checked; one non-public answer refuses the name (a resolver that
    mixes a public and a private answer is how rebinding attacks pick their moment)."""
    seen: list[str] = []
    for text in answers:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return AddressVerdict((), f"{host} resolved to something that is not an address")
        reason = non_public_reason(address)
        if reason is not None and not allow_private:
            return AddressVerdict(
                (),
                f"{host} resolves to {address}, a {reason} address; a rule or [[egress]] "
                "entry must name this destination explicitly (allow_private) to reach it",
            )
        if str(address) not in seen:
            seen.append(str(address))
    if not seen:
        return AddressVerdict((), f"{host} did not resolve to any address")
    return AddressVerdict(tuple(seen))


@dataclass(frozen=True)
class EgressEntry:
    """One ``[[egress]]`` entry, compiled."""

    name: str
    hosts: tuple[str, ...]
    ports: frozenset[int] | None
    tls: TlsMode
    allow_private: bool
    host_matches: Callable[[str], bool]

    def matches(self, host: str, port: int) -> bool:
        if self.ports is not None and port not in self.ports:
            return False
        return self.host_matches(host)


def compile_entry(
    name: str, hosts: Sequence[str], ports: Sequence[int] | None, tls: TlsMode, allow_private: bool
) -> EgressEntry:
    return EgressEntry(
        name=name,
        hosts=tuple(hosts),
        ports=frozenset(ports) if ports else None,
        tls=tls,
        allow_private=allow_private,
        host_matches=compile_host_globs("host", list(hosts)),
    )


class EgressTable:
    """Entries in config order; the first whose host pattern and ports match applies."""

    def __init__(self, entries: Sequence[EgressEntry], default_tls: TlsMode = "intercept") -> None:
        self.entries = tuple(entries)
        self.default_tls: TlsMode = default_tls

    def match(self, host: str, port: int) -> EgressEntry | None:
        for entry in self.entries:
            if entry.matches(host, port):
                return entry
        return None

    def target_name(self, entry: EgressEntry | None) -> str:
        return entry.name if entry is not None else DEFAULT_EGRESS_NAME

    def tls_mode(self, entry: EgressEntry | None) -> TlsMode:
        return entry.tls if entry is not None else self.default_tls


class PinTable:
    """Host name to the addresses that were checked for it, for a resolver that must
    never answer anything else. Bounded; the newest pin of a name wins."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._pins: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self.lookups = 0

    def pin(self, host: str, addresses: Sequence[str]) -> None:
        self._pins[host.lower()] = tuple(addresses)
        self._pins.move_to_end(host.lower())
        while len(self._pins) > self.capacity:
            self._pins.popitem(last=False)

    def lookup(self, host: str) -> tuple[str, ...]:
        """The pinned addresses; empty means: never checked, so never connect."""
        self.lookups += 1
        return self._pins.get(host.lower().removesuffix("."), ())
