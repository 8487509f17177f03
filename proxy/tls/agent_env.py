"""What an agent's shell needs so all of its traffic goes through Sluice: proxy variables
and a CA trust that includes Sluice's CA.

Choices, and why:

- Both spellings of each proxy variable: curl honours only lower-case ``http_proxy``,
  other runtimes prefer upper case. Node needs ``NODE_USE_ENV_PROXY=1`` as well.
- ``NO_PROXY`` lists Sluice's own listeners (``host:port``) and nothing else. Exempting
  ``localhost``/``127.0.0.1`` as shells often do would let the agent reach every loopback
  service (databases, dev servers, cloud metadata relays) around the gateway; setting the
  variable at all also replaces an inherited ``no_proxy`` that would do the same. Clients
  that do not understand ports in ``NO_PROXY`` (curl, wget) simply send those requests
  through the proxy, which is still Sluice.
- ``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` and ``GIT_SSL_CAINFO``
  *replace* a runtime's trust store, so they point at a bundle of the system CAs plus
  Sluice's (tunnels Sluice does not intercept must still verify the real site);
  ``NODE_EXTRA_CA_CERTS`` *adds* to Node's store, so it gets Sluice's CA alone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote

from proxy.config_models import parse_host_port
from proxy.tls.ca import CAError, LocalCA

BUNDLE_FILE = "ca-bundle.pem"
BUNDLE_MARKER = b"# Sluice local CA (TLS interception by the gateway)"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")
REPLACING_CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")
ADDING_CA_VARIABLES = ("NODE_EXTRA_CA_CERTS",)
#: Node's http, https and fetch ignore the proxy variables unless this is set (Node 22.21+,
#: 24+; older versions ignore it).
NODE_PROXY_SWITCH = "NODE_USE_ENV_PROXY"
_WELL_KNOWN_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # macOS, BSDs
    "/etc/ssl/ca-bundle.pem",  # openSUSE
)
_MAX_BUNDLE = 16 << 20


def client_address(listen: str) -> str:
    """``host:port`` a local client dials: a wildcard listener is reached on loopback."""
    host, port = parse_host_port(listen)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def proxy_url(listen: str, user: str | None = None, token: str | None = None) -> str:
    """``http://user:token@host:port``: the token travels as the Basic-auth password,
    which every proxy-aware client turns into ``Proxy-Authorization``."""
    userinfo = ""
    if token is not None:
        userinfo = f"{quote(user or 'agent', safe='')}:{quote(token, safe='')}@"
    return f"http://{userinfo}{client_address(listen)}"


def system_ca_candidates(exclude: Iterable[Path] = ()) -> list[Path]:
    """Where this machine's trusted roots may be, best first."""
    paths = ssl.get_default_verify_paths()
    names: list[str | None] = [
        os.environ.get("SSL_CERT_FILE"),
        paths.cafile,
        paths.openssl_cafile,
        *_WELL_KNOWN_BUNDLES,
    ]
    with contextlib.suppress(ImportError):
        import certifi  # optional: present wherever requests or httpx is

        names.append(certifi.where())
    skip = {path.resolve() for path in exclude}
    seen: list[Path] = []
    for name in names:
        if not name:
            continue
        path = Path(name)
        if path.is_file() and path.resolve() not in skip and path.resolve() not in seen:
            seen.append(path.resolve())
    return seen


def system_ca_pem(exclude: Iterable[Path] = ()) -> tuple[bytes, Path | None]:
    """The first readable bundle holding certificates, and its path (None if none).

    A bundle some ``sluice env`` wrote (``SSL_CERT_FILE`` in a shell that already ran it,
    perhaps for another state dir) is skipped: it would carry that other CA along."""
    for path in system_ca_candidates(exclude):
        try:
            if path.stat().st_size > _MAX_BUNDLE:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if b"-----BEGIN CERTIFICATE-----" in data and BUNDLE_MARKER not in data:
            return data, path
    return b"", None


def write_bundle(ca: LocalCA) -> tuple[Path, Path | None]:
    """Write ``<ca dir>/ca-bundle.pem`` (system roots + Sluice's CA), replaced atomically so
    an agent reading it never sees half a file. Returns it and the system bundle used."""
    target = ca.cert_path.parent / BUNDLE_FILE
    system, source = system_ca_pem(exclude=[target, ca.cert_path])
    if system and not system.endswith(b"\n"):
        system += b"\n"
    data = system + BUNDLE_MARKER + b"\n" + ca.certificate_pem()
    temp = target.with_name(f".{BUNDLE_FILE}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(temp, target)  # replaces a planted symlink itself, never its target
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise CAError(f"cannot write {target}: {exc.strerror}") from None
    return target, source


def agent_environment(
    *,
    proxy: str,
    no_proxy: Iterable[str],
    bundle: Path,
    ca_cert: Path,
) -> dict[str, str]:
    """The variables, in the order they are printed."""
    values = dict.fromkeys(PROXY_VARIABLES, proxy)
    values.update(dict.fromkeys(NO_PROXY_VARIABLES, ",".join(no_proxy)))
    values.update(dict.fromkeys(REPLACING_CA_VARIABLES, str(bundle)))
    values.update(dict.fromkeys(ADDING_CA_VARIABLES, str(ca_cert)))
    values[NODE_PROXY_SWITCH] = "1"
    return values


def render_exports(values: Mapping[str, str], comments: Iterable[str] = ()) -> str:
    """POSIX shell, every value quoted: the output is meant for ``eval "$(sluice env)"``."""
    lines = [f"# {''.join(c if c.isprintable() else '?' for c in comment)}" for comment in comments]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in values.items()]
    return "\n".join(lines) + "\n"
