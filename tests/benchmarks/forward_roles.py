"""The forward benchmark's child roles, its client and its server setup: a threaded HTTPS
upstream; intercepted keep-alive connections (``CONNECT``, TLS to the proxy, ``GET``s) on
blocking ``ssl`` sockets, whose TLS runs in C so the client costs little CPU; the upstream's
throwaway CA, Sluice's config and mitmdump's own venv.

Imported by name (``import forward_roles``) from ``bench_forward.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import BODY_1K, REPO_ROOT
from report import shown

MITM_VENV = REPO_ROOT / ".venv-mitm"

PATH = "/api/files/src/cmd/server/main.go?ref=main"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY_1K) + BODY_1K
)


def _first_line(head: bytes) -> str:
    return head.split(b"\r\n", 1)[0].decode(errors="replace")


def addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def role_upstream(cert: str, key: str) -> None:
    """HTTPS/1.1 keep-alive server: a thread per connection, a fixed 1 KiB answer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(f"READY {listener.getsockname()[1]}", flush=True)

    def serve(conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(conn, server_side=True) as tls:
                buffer = b""
                while data := tls.recv(65536):
                    buffer += data
                    while (end := buffer.find(b"\r\n\r\n")) >= 0:
                        buffer = buffer[end + 4 :]
                        tls.sendall(RESPONSE)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class Client:
    """One intercepted connection: CONNECT, TLS to the proxy, then keep-alive GETs."""

    def __init__(self, proxy: tuple[str, int], target: tuple[str, int], cafile: str) -> None:
        authority = f"{target[0]}:{target[1]}"
        self.request = (
            f"GET {PATH} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: sluice-bench\r\n"
            "Accept: */*\r\n\r\n"
        ).encode()
        context = ssl.create_default_context(cafile=cafile)
        raw = socket.create_connection(proxy, timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            if not chunk:
                raise OSError("proxy closed the connection after CONNECT")
            head += chunk
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise OSError(f"CONNECT refused: {_first_line(head)}")
        self.tls = context.wrap_socket(raw, server_hostname=target[0])
        self.buffer = b""

    def get(self) -> int:
        """One request; returns the body length (raises on a non-200 or a broken frame)."""
        self.tls.sendall(self.request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
        if not head.startswith(b"HTTP/1.1 200"):
            raise OSError(f"status {_first_line(head)}")
        match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        if match is not None:
            return len(self._take(int(match.group(1))))
        if not re.search(rb"(?i)\r\ntransfer-encoding:\s*chunked", head):
            raise OSError("response without a length")
        total = 0
        while True:
            while (line_end := self.buffer.find(b"\r\n")) < 0:
                self._fill()
            size = int(self.buffer[:line_end].split(b";")[0], 16)
            self.buffer = self.buffer[line_end + 2 :]
            self._take(size + 2)
            total += size
            if size == 0:
                return total

    def _fill(self) -> None:
        data = self.tls.recv(65536)
        if not data:
            raise OSError("connection closed mid-response")
        self.buffer += data

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def close(self) -> None:
        self.tls.close()


def role_client(
    proxy: str, target: str, cafile: str, threads: int, start: float, end: float
) -> None:
    """Keep-alive load on ``threads`` connections; counts requests finished in [start, end)."""
    proxy_addr, target_addr = addr(proxy), addr(target)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []

    def run(mine: list[float]) -> None:
        try:
            client = Client(proxy_addr, target_addr, cafile)
        except (OSError, ssl.SSLError) as exc:
            errors.append(f"connect: {exc}")
            return
        clock, wall = time.perf_counter, time.time
        try:
            while (now := wall()) < end:
                began = clock()
                client.get()
                took = clock() - began
                if now >= start:
                    mine.append(took)
        except (OSError, ssl.SSLError, ValueError) as exc:
            errors.append(f"read: {exc}")
        finally:
            client.close()

    workers = [threading.Thread(target=run, args=(mine,)) for mine in latencies]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    merged = [round(x * 1e6) for mine in latencies for x in mine]
    print(json.dumps({"latencies_us": merged, "errors": errors}), flush=True)


# -- setting the servers up --------------------------------------------------------------


def upstream_ca(workdir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a 127.0.0.1 certificate for the upstream; proxies trust the CA."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    paths = workdir / "upstream-ca.pem", workdir / "upstream.pem", workdir / "upstream-key.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    leaf.cert_chain_pems[0].write_to_path(str(paths[1]))
    leaf.private_key_pem.write_to_path(str(paths[2]))
    return paths


def sluice_config(workdir: Path, upstream_port: int, ca_bundle: Path) -> Path:
    path = workdir / "sluice-forward.toml"
    path.write_text(
        f"""[proxy]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
state_dir = "state"

[identity]
mode = "none"

[recording]
enabled = false

[forward]
ca_bundle = "{ca_bundle}"

[[egress]]
name = "bench-upstream"
host = "127.0.0.1"
ports = [{upstream_port}]
tls = "intercept"
allow_private = true

[[rules]]
name = "bench-upstream"
target = "bench-upstream"
action = "allow"
"""
    )
    return path


def ensure_mitmdump() -> str:
    """mitmdump from its own venv, created on first use (never in ours: pins conflict)."""
    binary = MITM_VENV / "bin" / "mitmdump"
    if binary.exists():
        return str(binary)
    python = shutil.which("python3") or sys.executable
    print(f"installing mitmproxy into {shown(str(MITM_VENV))} (one time)...", flush=True)
    subprocess.run([python, "-m", "venv", str(MITM_VENV)], check=True, timeout=300)
    pip = [str(MITM_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "mitmproxy"]
    subprocess.run(pip, check=True, timeout=900)
    return str(binary)


def mitm_version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout.splitlines()[0].strip() if done.stdout else "mitmdump"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


# -- main ------------------------------------------------------------------------------
