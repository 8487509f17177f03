"""Header hygiene between agent and upstream: what must never cross the proxy."""

from __future__ import annotations

from collections.abc import Iterable

#: RFC 9110 7.6.1 connection-specific fields, plus the legacy ones every proxy drops.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
#: Forwarding headers a client could forge to lie about its origin.
CLIENT_FORGEABLE_PREFIXES = ("x-forwarded-", "x-sluice-")
CLIENT_FORGEABLE = frozenset({"forwarded", "x-real-ip"})
#: Framing is recomputed by whoever writes the next hop's message.
FRAMING = frozenset({"content-length", "host"})

Pairs = Iterable[tuple[str, str]]


def connection_tokens(pairs: Pairs) -> frozenset[str]:
    """Header names a sender listed in ``Connection``: also hop-by-hop for this message."""
    tokens = set()
    for name, value in pairs:
        if name.lower() == "connection":
            tokens.update(token.strip().lower() for token in value.split(",") if token.strip())
    return frozenset(tokens)


#: The agent's own credentials for Sluice never travel further.
AGENT_CREDENTIALS = frozenset({"authorization"})


_ALWAYS_DROPPED = HOP_BY_HOP | FRAMING | CLIENT_FORGEABLE | AGENT_CREDENTIALS
_FORWARD_DROPPED = HOP_BY_HOP | FRAMING | CLIENT_FORGEABLE


def request_headers_for_upstream(
    pairs: Pairs, also_drop: Iterable[str] = (), *, keep_authorization: bool = False
) -> list[tuple[str, str]]:
    """Drop hop-by-hop, framing, forgeable forwarding and the agent's auth headers.

    ``also_drop`` names headers Sluice will set itself (an injected credential), so an
    agent can never supply or override them. Forward-proxy requests keep
    ``Authorization``: there it is the agent's credential for the destination, while its
    credential for Sluice travels in ``Proxy-Authorization`` (hop-by-hop, always dropped).
    """
    pairs = list(pairs)
    drop = _FORWARD_DROPPED if keep_authorization else _ALWAYS_DROPPED
    extra = connection_tokens(pairs) | {name.lower() for name in also_drop}
    if extra:
        drop = drop | extra
    return [
        (name, value)
        for name, value in pairs
        if (lowered := name.lower()) not in drop
        and not lowered.startswith(CLIENT_FORGEABLE_PREFIXES)
    ]


def response_headers_for_agent(pairs: Pairs) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers and any upstream attempt to speak as Sluice."""
    pairs = list(pairs)
    drop = HOP_BY_HOP | connection_tokens(pairs) | {"content-length"}
    return [
        (name, value)
        for name, value in pairs
        if (lowered := name.lower()) not in drop and not lowered.startswith("x-sluice-")
    ]


def forwarded_headers(
    *, client_ip: str, host: str, scheme: str, request_id: str
) -> list[tuple[str, str]]:
    """What Sluice itself tells the upstream about the original request."""
    return [
        ("X-Forwarded-For", client_ip),
        ("X-Forwarded-Host", host),
        ("X-Forwarded-Proto", scheme),
        ("X-Sluice-Request-Id", request_id),
    ]
