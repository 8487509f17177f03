"""The config file's sections as strict models: the keys users, docs and tests rely on.

Extend these, never rename them. Loading and the errors with file and line live in
``proxy.config``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from yarl import URL

from proxy.units import parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


def parse_host_port(value: object) -> tuple[str, int]:
    """``"127.0.0.1:8700"`` or ``"[::1]:8700"`` into host and port."""
    if not isinstance(value, str):
        raise ValueError(f'expected "HOST:PORT", got {value!r}')
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", value)
    if not match:
        raise ValueError(f'expected "HOST:PORT" such as "127.0.0.1:8700", got {value!r}')
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


def _check_listen(value: object) -> str:
    parse_host_port(value)
    return str(value)


Listen = Annotated[str, BeforeValidator(_check_listen)]


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_upstream(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a URL string, got {value!r}")
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"upstream must be an http:// or https:// URL, got {value!r}")
    if url.query_string or url.fragment:
        raise ValueError("upstream must not carry a query or fragment")
    return value.rstrip("/")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ProxySection(_Section):
    listen: Listen = "127.0.0.1:8700"
    admin_listen: Listen = "127.0.0.1:8701"
    state_dir: str = ".sluice"
    drain_timeout: Duration = 10.0


class LimitsSection(_Section):
    header_timeout: Duration = 10.0
    body_timeout: Duration = 120.0
    idle_timeout: Duration = 75.0
    max_header_size: Size = 16384
    max_headers: int = Field(default=100, ge=1, le=10000)
    max_body_size: Size = 64 * 1024 * 1024
    max_body_inspect: Size = 1024 * 1024
    max_connections: int = Field(default=1024, ge=1)
    upstream_connect_timeout: Duration = 5.0
    upstream_timeout: Duration = 60.0


ASYMMETRIC = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
HMAC = ("HS256", "HS384", "HS512")


def _check_algorithms(value: object) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a non-empty list of algorithm names")
    unknown = [name for name in value if name not in ASYMMETRIC + HMAC]
    if unknown:
        raise ValueError(f"unknown JWT algorithms {unknown}; use {', '.join(ASYMMETRIC)}")
    hmac_used = [name for name in value if name in HMAC]
    if hmac_used and len(hmac_used) < len(value):
        raise ValueError("mixing HMAC and asymmetric algorithms is not allowed")
    if hmac_used:
        raise ValueError("HMAC algorithms are not accepted; tokens must be asymmetrically signed")
    return list(value)


class IdentitySection(_Section):
    mode: Literal["none", "local", "oidc"] = "none"
    issuer: str | None = None
    audience: str = "sluice"
    groups_claim: str = Field(default="groups", pattern=r"^[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*$")
    algorithms: Annotated[list[str], BeforeValidator(_check_algorithms)] | None = None
    leeway: Duration = 30.0
    approver_groups: list[str] = Field(default_factory=list)
    discovery_url: str | None = None
    jwks_url: str | None = None
    jwks_refresh: Duration = 600.0
    jwks_max_stale: Duration = 3600.0
    jwks_cooldown: Duration = 30.0
    max_token_size: Size = 8192
    token_ttl: Duration = 8 * 3600.0

    @property
    def effective_issuer(self) -> str:
        return self.issuer or "sluice-local"

    @property
    def effective_algorithms(self) -> list[str]:
        if self.algorithms:
            return self.algorithms
        return ["EdDSA"] if self.mode == "local" else ["RS256", "ES256", "EdDSA"]


class _CredentialBase(_Section):
    header: str = Field(default="Authorization", pattern=r"^[A-Za-z0-9-]+$")
    format: str = "Bearer {token}"


class StaticCredentialModel(_CredentialBase):
    kind: Literal["static"]
    env: str | None = None
    file: str | None = None


class JwtCredentialModel(_CredentialBase):
    kind: Literal["jwt"]
    key_file: str
    algorithm: Literal["ES256", "EdDSA"] = "ES256"
    ttl: Duration = 300.0
    issuer: str = "sluice"
    audience: str | None = None


class OAuth2CredentialModel(_CredentialBase):
    kind: Literal["oauth2_client_credentials"]
    token_url: str
    client_id: str
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    scope: str | None = None
    audience: str | None = None
    auth_method: Literal["basic", "post"] = "basic"


class CommandCredentialModel(_CredentialBase):
    kind: Literal["command"]
    argv: list[str] = Field(min_length=1)
    timeout: Duration = 10.0
    ttl: Duration = 300.0


CREDENTIAL_KINDS = frozenset({"static", "jwt", "oauth2_client_credentials", "command"})
CredentialModel = Annotated[
    StaticCredentialModel | JwtCredentialModel | OAuth2CredentialModel | CommandCredentialModel,
    Field(discriminator="kind"),
]


class EventsSection(_Section):
    buffer: int = Field(default=10000, ge=100, le=1_000_000)
    flows: int = Field(default=2000, ge=10, le=1_000_000)


class MaskingRuleModel(_Section):
    id: str = Field(pattern=_NAME)
    regex: str
    keywords: list[str] = Field(min_length=1)
    entropy: float | None = None
    keep_prefix: int = Field(default=0, ge=0)
    max_len: int = Field(default=256, ge=1, le=65536)
    caseless: bool = False
    description: str = "custom rule"


UnknownEncoding = Literal["refuse", "pass"]


class MaskingSection(_Section):
    enabled: bool = True
    disable: list[str] = Field(default_factory=list)
    rules: list[MaskingRuleModel] = Field(default_factory=list)
    #: A Content-Encoding Sluice cannot decode cannot be masked: refuse (502) or pass as is.
    unknown_encoding: UnknownEncoding = "refuse"
    #: JSON bodies up to this size are masked whole (escapes and base64 values seen).
    json_limit: Size = 8 * 1024 * 1024
    #: Media types passed through unmasked (globs): binary formats where masking corrupts.
    skip_types: list[str] = Field(
        default_factory=lambda: ["image/*", "video/*", "audio/*", "font/*"]
    )


class TargetMasking(_Section):
    enabled: bool | None = None
    disable: list[str] = Field(default_factory=list)
    unknown_encoding: UnknownEncoding | None = None


class TargetModel(_Section):
    name: str = Field(pattern=_NAME)
    upstream: Annotated[str, BeforeValidator(_check_upstream)]
    listen: Listen | None = None
    preserve_host: bool = False
    credential: str | None = None
    masking: TargetMasking = TargetMasking()


class ForwardSection(_Section):
    """The forward proxy on the main listener: ``CONNECT host:port`` and ``GET http://...``."""

    enabled: bool = True
    #: Upstream certificates are checked against this PEM bundle (relative to the config
    #: file); unset means the system store (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured).
    ca_bundle: str | None = None
    #: TLS handling for destinations no ``[[egress]]`` entry names.
    default_tls: Literal["intercept", "passthrough"] = "intercept"


def _check_ports(value: object) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of ports")
    for port in value:
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"expected ports between 1 and 65535, got {port!r}")
    return list(value)


class EgressModel(_Section):
    """Per destination pattern: how TLS is handled and whether private addresses are fine."""

    name: str = Field(pattern=_NAME)
    host: str | list[str]
    ports: Annotated[list[int], BeforeValidator(_check_ports)] | None = None
    tls: Literal["intercept", "passthrough"] = "intercept"
    #: Reach loopback/private/link-local addresses for these hosts (tests, internal services).
    allow_private: bool = False
    masking: TargetMasking = TargetMasking()
    #: Sluice signs in to these hosts on the agent's behalf (intercept only): the agent's
    #: own header of that name is dropped, so it never needs to hold the secret.
    credential: str | None = None

    @property
    def hosts(self) -> list[str]:
        return [self.host] if isinstance(self.host, str) else list(self.host)


class RuleModel(BaseModel):
    """Only the meta keys are typed here; matcher fields are checked by the matcher itself."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    name: str = Field(pattern=_NAME)
    action: Literal["allow", "deny", "approve"]
    reason: str = ""


class NotifySection(_Section):
    webhook: str | None = None
    timeout: Duration = 3.0


class ApprovalsSection(_Section):
    timeout: Duration = 90.0
    max_pending: int = Field(default=100, ge=1, le=100_000)
    max_body: Size = 1024 * 1024
    retry_window: Duration = 600.0
    learned_rules: str = "learned-rules.toml"
    notify: NotifySection = NotifySection()


class RecordingSection(_Section):
    enabled: bool = True
    directory: str = "recordings"  # relative to the state dir
    rotate_size: Size = 64 * 1024 * 1024
    rotate_age: Duration = 86400.0
    retention: Duration = 30 * 86400.0
    checkpoint_every: int = Field(default=1000, ge=1)
    checkpoint_interval: Duration = 30.0
    max_inline_body: Size = 256 * 1024
    oversize: Literal["sidecar", "truncate"] = "sidecar"
    #: How much of a streamed body is kept in its record (the rest is marked truncated).
    capture_limit: Size = 1024 * 1024
    redact_headers: list[str] = Field(default_factory=list)
    #: A recorder that cannot write is retried after this (doubling up to a minute); the
    #: proxy refuses requests meanwhile.
    retry_interval: Duration = 5.0


class ConfigModel(_Section):
    proxy: ProxySection = ProxySection()
    limits: LimitsSection = LimitsSection()
    identity: IdentitySection = IdentitySection()
    events: EventsSection = EventsSection()
    targets: list[TargetModel] = Field(default_factory=list)
    forward: ForwardSection = ForwardSection()
    egress: list[EgressModel] = Field(default_factory=list)
    rules: list[RuleModel] = Field(default_factory=list)
    credentials: dict[str, CredentialModel] = Field(default_factory=dict)
    approvals: ApprovalsSection = ApprovalsSection()
    masking: MaskingSection = MaskingSection()
    recording: RecordingSection = RecordingSection()
