"""Sluice's local certificate authority, so the forward proxy can read what agents send.

An agent's HTTPS goes through ``CONNECT``; to apply policy and masking inside the tunnel,
Sluice terminates TLS with a leaf certificate for the requested host, signed by this CA.
The agent trusts the CA through ``sluice env`` (``SSL_CERT_FILE``, ``NODE_EXTRA_CA_CERTS``).

The CA key can impersonate any site to whoever trusts the CA: it lives in
``<state_dir>/ca/`` (0700), the key file is 0600, symlinks are refused, and a key that does
not load or does not match the certificate is an error, never a silent new CA (that would
break every client already trusting the old one). Leaves are minted in process, share one
key per CA instance (an EC key generation per host would dominate the cost) and are cached.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import re
import secrets
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.state import StateError, ensure_state_dir

CA_DIR = "ca"
CA_CERT_FILE = "sluice-ca.pem"
CA_KEY_FILE = "sluice-ca-key.pem"
LOCK_FILE = ".lock"
CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=30)
LEAF_BACKDATE = datetime.timedelta(hours=1)  # clients with a clock slightly behind
CACHE_SIZE = 1024
#: Re-mint well before a leaf expires: a proxy can run for weeks.
_REMINT_AFTER = LEAF_VALIDITY.total_seconds() / 2
_MAX_PEM = 1 << 16
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
    r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$"
)


class CAError(StateError):
    """The CA files are unusable; the message names the file, never its contents."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def normalize_host(hostname: str) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A lower-case DNS name (A-labels) or an IP address; ValueError for anything else."""
    name = hostname.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(name)
    name = name.rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("not a valid host name") from None
    if not _HOSTNAME.match(name):
        raise ValueError("not a valid host name")
    return name


class LocalCA:
    """The CA certificate and key, and a bounded cache of per-host server contexts."""

    def __init__(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        cert_path: Path,
        *,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.cert = cert
        self._key = key
        self.cert_path = cert_path
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski)
        self._cache: OrderedDict[str, tuple[float, ssl.SSLContext]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.minted = 0  # leaves minted so far (the cache's misses), for tests and metrics

    def __repr__(self) -> str:  # never the key
        return f"LocalCA({self.cert_path})"

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, state_dir: Path) -> LocalCA:
        """The CA in ``<state_dir>/ca/``, created on first use by exactly one process."""
        directory = _ca_dir(Path(state_dir))
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        if not (_exists(cert_path) and _exists(key_path)):
            with _locked(directory / LOCK_FILE):
                if not _exists(key_path):
                    _create(cert_path, key_path)
                elif not _exists(cert_path):
                    # A crash between the key and the certificate: finish the job with the
                    # same key rather than make a second CA.
                    key = _load_key(key_path)
                    _write_new(cert_path, _ca_cert(key).public_bytes(serialization.Encoding.PEM))
        key = _load_key(key_path)
        cert = _load_cert(cert_path)
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise CAError(
                f"{key_path} does not match {cert_path}; restore the pair, or delete both "
                "to create a new CA (clients must then trust the new one)"
            )
        return cls(cert, key, cert_path)

    def certificate_pem(self) -> bytes:
        return self._cert_pem

    # -- leaves ----------------------------------------------------------------------------

    def cached_context(self, hostname: str) -> ssl.SSLContext | None:
        """The cached context for ``hostname`` if it is fresh, without minting: cheap enough
        for an event loop, so only a miss needs a thread. ValueError for a bad name."""
        cache_key = str(normalize_host(hostname))
        with self._lock:
            entry = self._cache.get(cache_key)
            if entry is None or time.monotonic() - entry[0] >= _REMINT_AFTER:
                return None
            self._cache.move_to_end(cache_key)
            return entry[1]

    def server_context(self, hostname: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for ``hostname`` (cached, bounded LRU).

        ValueError when ``hostname`` is neither a DNS name nor an IP literal.
        """
        cached = self.cached_context(hostname)
        if cached is not None:
            return cached
        host = normalize_host(hostname)
        cache_key, now = str(host), time.monotonic()
        context = self._context_for(self.mint_leaf(host))
        with self._lock:
            self._cache[cache_key] = (now, context)
            self._cache.move_to_end(cache_key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            self.minted += 1
        return context

    def mint_leaf(
        self, host: str | ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> x509.Certificate:
        """A leaf for one normalized host: SAN, serverAuth, 30 days, backdated an hour."""
        now = _now()
        not_after = min(now + LEAF_VALIDITY, self.cert.not_valid_after_utc)
        if isinstance(host, str):
            san: x509.GeneralName = x509.DNSName(host)
            common_name = host if len(host) <= 64 else host[:64]
        else:
            san = x509.IPAddress(host)
            common_name = str(host)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - LEAF_BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._leaf_key.public_key()), False
            )
            .add_extension(self._aki, critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def _context_for(self, leaf: x509.Certificate) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation: a DoS lever
        context.set_alpn_protocols(["http/1.1"])
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self._leaf_key_pem
        _load_chain_from_memory(context, chain, self.cert_path.parent)
        return context


# -- files -------------------------------------------------------------------------------


def _ca_dir(state_dir: Path) -> Path:
    ensure_state_dir(state_dir)
    directory = state_dir / CA_DIR
    if directory.is_symlink():
        raise CAError(f"{directory} is a symlink; refusing to use it")
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise CAError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise CAError(f"{directory} belongs to another user; refusing to use it")
    if info.st_mode & 0o077:
        os.chmod(directory, 0o700)
    return directory


def _exists(path: Path) -> bool:
    if path.is_symlink():
        raise CAError(f"{path} is a symlink; refusing to use it")
    return path.exists()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock so two processes starting at once make one CA, not two."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = _now()
    name = x509.Name(
        [
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"Sluice local CA ({socket.gethostname()})"[:64]
            ),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sluice"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - LEAF_BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, hashes.SHA256())
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _create(cert_path: Path, key_path: Path) -> None:
    """Key first, then certificate, each appearing whole (temp file + link)."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(key_path, key_pem, mode=0o600)
    _write_new(cert_path, _ca_cert(key).public_bytes(serialization.Encoding.PEM))


def _write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temp file, fsync, link into place (fails if it exists), fsync the dir."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    finally:
        os.unlink(temp)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read(path: Path, *, private: bool) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if path.is_symlink():
            raise CAError(f"{path} is a symlink; refusing to use it") from None
        raise CAError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CAError(f"{path} is not a regular file")
        if private and info.st_mode & 0o077:
            raise CAError(
                f"{path} is readable by others (mode {oct(info.st_mode & 0o777)}); "
                "chmod 600 it if it was never exposed, else delete the CA and make a new one"
            )
        return os.read(fd, _MAX_PEM)
    finally:
        os.close(fd)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read(path, private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CAError(
            f"{path} is not a readable private key; restore it, or delete the ca directory "
            "to create a new CA (clients must then trust the new one)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CAError(f"{path} is not an EC P-256 key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, private=False))
    except ValueError:
        raise CAError(f"{path} is not a readable PEM certificate") from None


def _load_chain_from_memory(context: ssl.SSLContext, pem: bytes, spill_dir: Path) -> None:
    """``load_cert_chain`` wants a path: use an anonymous memory file, so the leaf key never
    touches the disk (a private temp file in the CA dir where memfd is unavailable)."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("sluice-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except (OSError, ssl.SSLError):
            pass  # no /proc: fall back
        finally:
            os.close(fd)
    handle, name = tempfile.mkstemp(dir=spill_dir, prefix=".leaf-", suffix=".pem")
    try:
        os.write(handle, pem)
        os.close(handle)
        context.load_cert_chain(name)
    finally:
        os.unlink(name)
