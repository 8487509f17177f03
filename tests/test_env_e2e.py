"""``eval "$(sluice env)"`` end to end: curl and Python's urllib, in a bash that has only
what ``sluice env`` printed, reach a local HTTPS service through a real Sluice that
intercepts the tunnel, authenticates the token and hides it from the upstream."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

from tests.conftest import free_port

SLUICE = str(Path(sys.executable).parent / "sluice")


class EchoHeaders(BaseHTTPRequestHandler):
    """Answers with the request's headers as JSON, so a test sees what reached upstream."""

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def https_upstream(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A loopback HTTPS server with a certificate from a throwaway CA; yields (port, CA)."""
    ca = trustme.CA()
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHeaders)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], ca_file
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def running_sluice(config: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [SLUICE, "proxy", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=config.parent,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in proc.stdout:
            if "admin API on" in line or time.monotonic() > deadline:
                break
        assert proc.poll() is None, "sluice did not start"
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def write_config(tmp_path: Path, upstream_port: int, ca_file: Path) -> Path:
    port = free_port()
    path = tmp_path / "sluice.toml"
    path.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:{free_port()}"\n'
        'state_dir = "state"\n\n[identity]\nmode = "local"\n\n[recording]\nenabled = false\n\n'
        f'[forward]\nca_bundle = "{ca_file.name}"\n\n'
        f'[[egress]]\nname = "local-https"\nhost = "127.0.0.1"\nports = [{upstream_port}]\n'
        'tls = "intercept"\nallow_private = true\n\n'
        '[[rules]]\nname = "e2e-agent"\ntarget = "local-https"\nsubject = "e2e-agent"\n'
        'action = "allow"\n',
        encoding="utf-8",
    )
    return path


def in_agent_shell(config: Path, script: str, sub: str = "e2e-agent") -> str:
    """Run ``script`` in a bash whose environment is only PATH plus what sluice env printed."""
    env = {"PATH": os.environ["PATH"], "HOME": str(config.parent)}
    prelude = f'eval "$({SLUICE} env -c {config} --sub {sub} --ttl 10m)" || exit 99\n'
    done = subprocess.run(
        ["bash", "-c", prelude + script],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=config.parent,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_and_python_through_sluice(tmp_path: Path) -> None:
    with https_upstream(tmp_path) as (port, ca_file):
        config = write_config(tmp_path, port, ca_file)
        with running_sluice(config):
            url = f"https://127.0.0.1:{port}/hello"
            out = in_agent_shell(config, f"curl -sS --max-time 20 {url}")
            seen = json.loads(out)
            assert seen["path"] == "/hello"
            headers = {name.lower(): value for name, value in seen["headers"].items()}
            assert "proxy-authorization" not in headers
            assert "authorization" not in headers
            token = re.search(r":([^:@]+)@", in_agent_shell(config, 'echo "$HTTPS_PROXY"'))
            assert token is not None and token.group(1) not in out

            code = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
            out = in_agent_shell(config, f"{sys.executable} -c {json.dumps(code)}")
            assert json.loads(out)["path"] == "/hello"

            # Another subject is authenticated but no rule allows it: refused inside the tunnel.
            status = in_agent_shell(
                config, f"curl -s -o /dev/null -w '%{{http_code}}' {url}", sub="someone-else"
            )
            assert status == "403"

            # Loopback is not exempt: the admin API (401 when reached directly) is refused
            # by Sluice's egress policy because the request went through the proxy.
            admin = re.search(r'admin_listen = "([^"]+)"', config.read_text())
            assert admin is not None
            status = in_agent_shell(
                config,
                f"curl -s -o /dev/null -w '%{{http_code}}' http://{admin.group(1)}/api/health",
            )
            assert status == "403"

            # Without the token the proxy asks for one (407) and nothing reaches upstream.
            status = in_agent_shell(
                config,
                'curl -s -o /dev/null -w "%{http_connect}" --proxy "http://${HTTPS_PROXY#*@}" '
                + url
                + " || true",
            )
            assert status == "407"
