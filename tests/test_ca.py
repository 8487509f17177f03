"""The local CA: files and modes, one CA under concurrent first use, and leaves that a
stdlib TLS client accepts in a real handshake on loopback."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.tls import CAError, LocalCA
from proxy.tls.ca import CA_CERT_FILE, CA_KEY_FILE, normalize_host
from tests.conftest import REPO_ROOT


def handshake(ca: LocalCA, server_name: str, leaf_host: str) -> tuple[str | None, str | None]:
    """Serve ``leaf_host``'s context on 127.0.0.1 and connect a verifying stdlib client.

    Returns (ALPN protocol, TLS version) seen by the client; raises ssl.SSLError on failure.
    """
    context = ca.server_context(leaf_host)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello")
                tls.recv(16)
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = ssl.create_default_context(cafile=str(ca.cert_path))
        client.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13 clients enforce
        client.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            assert tls.recv(16) == b"hello"
            tls.sendall(b"bye")
            return tls.selected_alpn_protocol(), tls.version()
    finally:
        thread.join(5)
        listener.close()


def test_files_modes_and_reuse(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ca = LocalCA.load_or_create(state)
    directory = state / "ca"
    assert ca.cert_path == directory / CA_CERT_FILE
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / CA_KEY_FILE).stat().st_mode) == 0o600
    assert ca.certificate_pem() == ca.cert_path.read_bytes()
    again = LocalCA.load_or_create(state)
    assert again.certificate_pem() == ca.certificate_pem()
    assert "PRIVATE" not in repr(again)


def test_ca_certificate_profile(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    cert = x509.load_pem_x509_certificate(ca.certificate_pem())
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == f"Sluice local CA ({socket.gethostname()})"[:64]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3650) <= lifetime <= datetime.timedelta(days=3651)


def test_concurrent_first_use_makes_one_ca(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code = (
        "import sys, hashlib\nfrom pathlib import Path\nfrom proxy.tls import LocalCA\n"
        "sys.stdin.read()\n"  # start together
        "ca = LocalCA.load_or_create(Path(sys.argv[1]))\n"
        "print(hashlib.sha256(ca.certificate_pem()).hexdigest())\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(state)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO_ROOT,
            text=True,
        )
        for _ in range(6)
    ]
    outputs = [proc.communicate("", timeout=60) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    digests = {out.strip() for out, _ in outputs}
    assert len(digests) == 1
    assert sorted(p.name for p in (state / "ca").iterdir()) == [
        ".lock",
        CA_KEY_FILE,
        CA_CERT_FILE,
    ]


def test_leaf_verifies_in_a_real_handshake(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    context = ca.server_context("sluice.test")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_RENEGOTIATION
    alpn, version = handshake(ca, "sluice.test", "sluice.test")
    assert alpn == "http/1.1"
    assert version in ("TLSv1.2", "TLSv1.3")


def test_ip_literal_gets_an_ip_san(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    assert handshake(ca, "127.0.0.1", "127.0.0.1")[0] == "http/1.1"
    leaf = ca.mint_leaf(normalize_host("[::1]"))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["::1"]
    assert san.get_values_for_type(x509.DNSName) == []


def test_leaf_for_another_host_is_rejected(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca, "bank.test", "sluice.test")


def test_leaf_profile(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    leaf = ca.mint_leaf(normalize_host("API.Example.COM."))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.com"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.UTC)
    assert leaf.not_valid_before_utc <= now - datetime.timedelta(minutes=59)
    assert leaf.not_valid_after_utc <= now + datetime.timedelta(days=30, minutes=1)
    leaf.verify_directly_issued_by(ca.cert)


def test_cache_hit_and_bound(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    assert ca.cached_context("a.test") is None
    first = ca.server_context("a.test")
    assert ca.server_context("A.test.") is first
    assert ca.cached_context("a.test") is first
    assert ca.minted == 1
    small = LocalCA(ca.cert, ca._key, ca.cert_path, cache_size=2)
    one = small.server_context("one.test")
    small.server_context("two.test")
    small.server_context("three.test")  # evicts one.test, the least recently used
    assert small.server_context("one.test") is not one
    assert small.minted == 4


@pytest.mark.parametrize(
    "bad", ["", "a b", "evil.test/x", "x" * 300, "-lead.test", "*.wild.test", "a..b"]
)
def test_bad_host_names_are_refused(tmp_path: Path, bad: str) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    with pytest.raises(ValueError):
        ca.server_context(bad)


def test_corrupt_key_is_an_error_not_a_new_ca(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    key_path = ca.cert_path.parent / CA_KEY_FILE
    key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CAError, match="not a readable private key") as info:
        LocalCA.load_or_create(tmp_path)
    assert "not a key" not in str(info.value)
    assert ca.cert_path.read_bytes() == ca.certificate_pem()


def test_mismatched_key_is_an_error(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    key_path = ca.cert_path.parent / CA_KEY_FILE
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.write_bytes(other)
    with pytest.raises(CAError, match="does not match"):
        LocalCA.load_or_create(tmp_path)
    assert ca.cert_path.read_bytes() == ca.certificate_pem()


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    os.chmod(ca.cert_path.parent / CA_KEY_FILE, 0o644)
    with pytest.raises(CAError, match="readable by others"):
        LocalCA.load_or_create(tmp_path)


def test_missing_certificate_is_reissued_for_the_same_key(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    ca.cert_path.unlink()  # as after a crash between the two files
    again = LocalCA.load_or_create(tmp_path)
    assert again.cert.public_key() == ca.cert.public_key()
    handshake(again, "sluice.test", "sluice.test")


def test_symlinks_are_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "ca").symlink_to(elsewhere)
    with pytest.raises(CAError, match="symlink"):
        LocalCA.load_or_create(state)
    assert list(elsewhere.iterdir()) == []

    other_state = tmp_path / "other"
    ca = LocalCA.load_or_create(other_state)
    key_path = ca.cert_path.parent / CA_KEY_FILE
    moved = tmp_path / "moved-key.pem"
    key_path.rename(moved)
    key_path.symlink_to(moved)
    with pytest.raises(CAError, match="symlink"):
        LocalCA.load_or_create(other_state)


def test_old_leaves_are_reminted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    first = ca.server_context("a.test")
    monkeypatch.setattr("proxy.tls.ca._REMINT_AFTER", 0.0)
    assert ca.server_context("a.test") is not first
    assert ca.minted == 2


def test_threads_share_the_cache_safely(tmp_path: Path) -> None:
    ca = LocalCA(*_parts(LocalCA.load_or_create(tmp_path)), cache_size=50)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for index in range(120):
                ca.server_context(f"h{(index + offset) % 80}.test")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n * 7,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(ca._cache) == 50


def _parts(ca: LocalCA) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    return ca.cert, ca._key, ca.cert_path


def test_international_names_become_a_labels(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path)
    assert normalize_host("Bücher.Example") == "xn--bcher-kva.example"
    leaf = ca.mint_leaf(normalize_host("bücher.example"))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["xn--bcher-kva.example"]
    assert ca.server_context("bücher.example") is ca.server_context("xn--bcher-kva.example")
