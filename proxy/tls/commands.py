"""``sluice ca export`` and ``sluice env``: hand an agent the CA and the proxy settings."""

from __future__ import annotations

import datetime
import sys
from collections.abc import Sequence

from proxy.config import Config
from proxy.config_models import parse_host_port
from proxy.tls.agent_env import (
    agent_environment,
    client_address,
    proxy_url,
    render_exports,
    write_bundle,
)
from proxy.tls.ca import LocalCA

EXIT_OK, EXIT_USAGE = 0, 2


def run_ca_export(config: Config, path_only: bool) -> int:
    """Print the CA certificate (or its path), creating the CA on first use."""
    ca = LocalCA.load_or_create(config.state_dir)
    if path_only:
        print(ca.cert_path)
    else:
        sys.stdout.buffer.write(ca.certificate_pem())
        sys.stdout.flush()
    return EXIT_OK


def sluice_listeners(config: Config) -> list[str]:
    """Every address where Sluice itself answers agents: the only ``NO_PROXY`` entries."""
    listens = [config.proxy.listen, *(t.listen for t in config.targets.values() if t.listen)]
    out: list[str] = []
    for listen in listens:
        address = client_address(listen)
        if address not in out:
            out.append(address)
    return out


def run_env(config: Config, sub: str, groups: Sequence[str], ttl: float | None) -> int:
    """Print ``export`` lines for ``eval``; with local identity they carry a fresh token."""
    identity = config.identity
    listen = config.proxy.listen
    comments = [f"Sluice gateway for an agent (config {config.path})"]
    if identity.mode == "oidc":
        print(
            'sluice env: [identity] mode = "oidc": Sluice cannot issue tokens for your '
            "identity provider. Get a token from it, then set the proxy yourself:\n"
            f"  export HTTPS_PROXY=http://{sub}:$IDP_TOKEN@{client_address(listen)} "
            "(and HTTP_PROXY, http_proxy, https_proxy); "
            "`sluice ca export --path` names the CA to trust",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if parse_host_port(listen)[1] == 0:
        print(
            f"sluice env: proxy.listen is {listen!r}: port 0 is picked at start, so an agent "
            "cannot be pointed at it; give the proxy a fixed port",
            file=sys.stderr,
        )
        return EXIT_USAGE
    token = None
    if identity.mode == "local":
        from proxy.identity.local import LocalIssuer

        issuer = LocalIssuer(
            config.state_dir, issuer=identity.effective_issuer, audience=identity.audience
        )
        lifetime = ttl or identity.token_ttl
        token = issuer.issue(sub, list(groups), lifetime, groups_claim=identity.groups_claim)
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=lifetime)
        comments.append(f"token for {sub!r} valid until {until:%Y-%m-%d %H:%M} UTC")
    ca = LocalCA.load_or_create(config.state_dir)
    bundle, source = write_bundle(ca)
    if source is None:
        print(
            "sluice env: no system CA bundle found; the bundle trusts only Sluice's CA, so "
            "tunnels Sluice does not intercept will fail verification",
            file=sys.stderr,
        )
    values = agent_environment(
        proxy=proxy_url(listen, sub, token),
        no_proxy=sluice_listeners(config),
        bundle=bundle,
        ca_cert=ca.cert_path,
    )
    if sys.stdout.isatty():
        print('sluice env: meant for your shell: eval "$(sluice env ...)"', file=sys.stderr)
    sys.stdout.write(render_exports(values, comments))
    sys.stdout.flush()
    return EXIT_OK
