"""Which forward destination a request inside aiohttp is bound for, if any.

Two kinds reach the ``Forwarder`` this way: requests inside an intercepted CONNECT
(the connection carries its ``Tunnel``), and absolute-form ``GET http://host/path``
requests on the main listener. Everything else is a target request.
"""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from proxy.config import Config
from proxy.egress import Authority, BadDestination, normalise_host
from proxy.server.forward import ForwardRequest, Tunnel
from proxy.server.requestcheck import BadRequest


def forward_request(request: web.Request, config: Config) -> tuple[ForwardRequest, str] | None:
    """The destination and the origin-form request target (path and query, as sent), or
    None for a target request. Raises BadRequest for what cannot be forwarded."""
    tunnel: Tunnel | None = getattr(request.protocol, "sluice_tunnel", None)
    if tunnel is not None:
        _check_host_header(request, tunnel.authority)
        forward = ForwardRequest(tunnel.authority, "https", tunnel.target, tunnel.entry, tunnel)
        return forward, request.raw_path
    raw = request.raw_path
    if raw.startswith("/"):
        return None
    if request.method == "CONNECT":
        raise BadRequest("CONNECT must be the first request on a connection; open a new one")
    scheme = raw.partition(":")[0].lower()
    if scheme not in ("http", "https"):
        raise BadRequest("request target must be an absolute path or an http:// URL")
    if scheme == "https":
        raise BadRequest("send https:// requests through CONNECT (HTTPS_PROXY), not as a URL")
    if not config.forward.enabled:
        raise BadRequest("this proxy does not forward absolute-form requests")
    try:
        url = URL(raw, encoded=True)
        if url.user is not None or url.password is not None:
            raise BadRequest("user information in the request URL is not forwarded")
        host = normalise_host(url.raw_host or "")
        port = url.explicit_port or 80
    except (ValueError, BadDestination) as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest("the request URL has no usable host") from None
    if not 1 <= port <= 65535:
        raise BadRequest("the port must be between 1 and 65535")
    authority = Authority(host, port)
    entry = config.egress.match(host, port)
    origin = url.raw_path or "/"
    if url.raw_query_string:
        origin += "?" + url.raw_query_string
    return ForwardRequest(authority, "http", config.egress.target_name(entry), entry), origin


def _check_host_header(request: web.Request, authority: Authority) -> None:
    """Inside a tunnel, Host must name the CONNECT destination: no fronting another name."""
    host = request.headers.get("Host")
    if host is None:
        return
    try:
        if host.startswith("["):
            name, _, port_text = host[1:].partition("]")
            port_text = port_text.removeprefix(":")
            name = f"[{name}]"
        else:
            name, _, port_text = host.rpartition(":") if ":" in host else (host, "", "")
        same = normalise_host(name) == authority.host
    except BadDestination:
        same = False
    if not same or (port_text and port_text != str(authority.port)):
        raise BadRequest("the Host header does not name the CONNECT destination")
