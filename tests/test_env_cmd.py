"""``sluice env`` and ``sluice ca export`` as a user runs them: the real command in a
subprocess, its output eval'd by bash, the token checked by the proxy's own verifier."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from proxy.identity.local import LocalIssuer
from proxy.identity.tokens import TokenVerifier
from tests.conftest import REPO_ROOT

SLUICE = str(Path(sys.executable).parent / "sluice")
VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "NODE_USE_ENV_PROXY",
)


def write_config(
    directory: Path, mode: str, *, state_dir: str = "state", port: int = 18700
) -> Path:
    identity = f'mode = "{mode}"\n'
    if mode == "oidc":
        identity += 'issuer = "https://idp.example.test"\n'
    path = directory / "sluice.toml"
    path.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:{port + 1}"\n'
        f"state_dir = {json.dumps(state_dir)}\n\n[identity]\n{identity}\n"
        f'[[targets]]\nname = "repo"\nupstream = "http://127.0.0.1:9"\n'
        f'listen = "127.0.0.1:{port + 2}"\n',
        encoding="utf-8",
    )
    return path


def eval_env(
    config: Path, *args: str, inherit: dict[str, str] | None = None
) -> tuple[dict[str, str], subprocess.CompletedProcess[str]]:
    """Run ``eval "$(sluice env ...)"`` in bash and read back the variables it set."""
    script = 'out="$("$@")" || exit $?\neval "$out" || exit 99\n' + "".join(
        f'printf "%s\\0" "${name}"\n' for name in VARIABLES
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(config.parent), **(inherit or {})}
    proc = subprocess.run(
        ["bash", "-c", script, "bash", SLUICE, "env", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
        env=env,
    )
    if proc.returncode != 0:
        return {}, proc
    values = proc.stdout.split("\0")[: len(VARIABLES)]
    return dict(zip(VARIABLES, values, strict=True)), proc


def verify_token(state_dir: Path, token: str) -> tuple[str, float]:
    issuer = LocalIssuer(state_dir, issuer="sluice-local", audience="sluice")
    verifier = TokenVerifier(
        keys=issuer.key_for, issuer="sluice-local", audience="sluice", algorithms=["EdDSA"]
    )
    identity = asyncio.run(verifier.verify(token))
    return identity.subject, identity.expires_at or 0.0


def test_local_identity_exports_a_working_token(tmp_path: Path) -> None:
    config = write_config(tmp_path, "local")
    values, proc = eval_env(config, "--sub", "test-agent", "--ttl", "1h")
    assert proc.returncode == 0, proc.stderr
    proxy = values["HTTP_PROXY"]
    assert {values[name] for name in VARIABLES[:4]} == {proxy}
    url = urlsplit(proxy)
    assert (url.scheme, url.hostname, url.port) == ("http", "127.0.0.1", 18700)
    assert url.username == "test-agent"
    subject, expires = verify_token(tmp_path / "state", unquote(url.password or ""))
    assert subject == "test-agent"
    assert 3500 < expires - time.time() <= 3600
    # Only Sluice's own listeners are exempt: never loopback as a whole.
    assert values["NO_PROXY"] == values["no_proxy"] == "127.0.0.1:18700,127.0.0.1:18702"
    assert "token" not in proc.stderr.lower()


def test_ca_variables_and_bundle(tmp_path: Path) -> None:
    config = write_config(tmp_path, "local")
    values, proc = eval_env(config)
    assert proc.returncode == 0, proc.stderr
    ca_dir = tmp_path / "state" / "ca"
    ca_pem = (ca_dir / "sluice-ca.pem").read_bytes()
    exported = subprocess.run(
        [SLUICE, "ca", "export", "-c", str(config)], capture_output=True, timeout=60, check=True
    ).stdout
    assert exported == ca_pem
    assert values["NODE_EXTRA_CA_CERTS"] == str(ca_dir / "sluice-ca.pem")
    assert values["NODE_USE_ENV_PROXY"] == "1"
    bundle = Path(values["SSL_CERT_FILE"])
    assert bundle == ca_dir / "ca-bundle.pem"
    assert {values[n] for n in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")} == {
        str(bundle)
    }
    data = bundle.read_bytes()
    assert data.endswith(ca_pem)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o644
    context = ssl.create_default_context(cafile=str(bundle))
    subjects = [dict(x[0] for x in cert["subject"]) for cert in context.get_ca_certs()]
    names = [subject.get("commonName", "") for subject in subjects]
    assert any(name.startswith("Sluice local CA") for name in names)
    if ssl.get_default_verify_paths().openssl_cafile and Path("/etc/ssl/certs").is_dir():
        assert len(names) > 10, "the system roots are missing from the bundle"


def test_inherited_no_proxy_cannot_exempt_loopback(tmp_path: Path) -> None:
    config = write_config(tmp_path, "none")
    inherit = {"no_proxy": "localhost,127.0.0.1,::1", "NO_PROXY": "*"}
    values, proc = eval_env(config, inherit=inherit)
    assert proc.returncode == 0, proc.stderr
    assert values["no_proxy"] == values["NO_PROXY"] == "127.0.0.1:18700,127.0.0.1:18702"


def test_identity_none_has_no_credentials(tmp_path: Path) -> None:
    config = write_config(tmp_path, "none")
    values, proc = eval_env(config)
    assert proc.returncode == 0, proc.stderr
    assert values["HTTPS_PROXY"] == "http://127.0.0.1:18700"


def test_oidc_is_a_clear_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, "oidc")
    proc = subprocess.run(
        [SLUICE, "env", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "identity provider" in proc.stderr and "HTTPS_PROXY" in proc.stderr


def test_hostile_paths_and_names_stay_quoted(tmp_path: Path) -> None:
    state = "st ate $(touch pwned1) `touch pwned2` 'q\""
    config = write_config(tmp_path, "local", state_dir=state)
    values, proc = eval_env(config, "--sub", "a\ntouch pwned3\n#")
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("pwned*"))
    assert values["NODE_EXTRA_CA_CERTS"] == str(tmp_path / state / "ca" / "sluice-ca.pem")
    url = urlsplit(values["HTTPS_PROXY"])
    assert unquote(url.username or "") == "a\ntouch pwned3\n#"
    assert verify_token(tmp_path / state, unquote(url.password or ""))[0] == "a\ntouch pwned3\n#"


def test_ca_export_path_creates_the_ca(tmp_path: Path) -> None:
    config = write_config(tmp_path, "none")
    proc = subprocess.run(
        [SLUICE, "ca", "export", "--path", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path == tmp_path / "state" / "ca" / "sluice-ca.pem"
    assert path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_ca_error_is_reported_without_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, "none")
    key = tmp_path / "state" / "ca" / "sluice-ca-key.pem"
    key.parent.mkdir(parents=True, mode=0o700)
    key.write_bytes(b"SECRET-MATERIAL\n")
    key.chmod(0o600)
    proc = subprocess.run(
        [SLUICE, "ca", "export", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "not a readable private key" in proc.stderr
    assert "SECRET-MATERIAL" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("command", [["env", "--help"], ["ca", "export", "--help"]])
def test_help(command: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", *command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0 and "usage" in proc.stdout


def test_listen_port_zero_is_a_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, "none", port=0)
    proc = subprocess.run(
        [SLUICE, "env", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "fixed port" in proc.stderr


def test_output_also_works_in_a_posix_sh(tmp_path: Path) -> None:
    if shutil.which("sh") is None:
        pytest.skip("no sh")
    config = write_config(tmp_path, "none", state_dir="st ate")
    script = f'eval "$({SLUICE} env -c \'{config}\')" && printf %s "$GIT_SSL_CAINFO"'
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == str(tmp_path / "st ate" / "ca" / "ca-bundle.pem")


def test_an_inherited_sluice_bundle_is_not_nested(tmp_path: Path) -> None:
    first = tmp_path / "one"
    first.mkdir()
    values, proc = eval_env(write_config(first, "none"))
    assert proc.returncode == 0, proc.stderr
    other = tmp_path / "two"
    other.mkdir()
    inherit = {"SSL_CERT_FILE": values["SSL_CERT_FILE"]}
    again, proc = eval_env(write_config(other, "none"), inherit=inherit)
    assert proc.returncode == 0, proc.stderr
    bundle = Path(again["SSL_CERT_FILE"]).read_bytes()
    assert bundle.count(b"# Sluice local CA") == 1
    assert (first / "state" / "ca" / "sluice-ca.pem").read_bytes() not in bundle
