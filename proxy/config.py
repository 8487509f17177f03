"""Load and validate the TOML config; every error names its file and line.

The key names here are the interface docs, tests and users rely on: extend, never rename.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from yarl import URL

from proxy.policy import Policy, PolicyError
from proxy.tomlpos import KeyLines, Loc
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


class TargetModel(_Section):
    name: str = Field(pattern=_NAME)
    upstream: Annotated[str, BeforeValidator(_check_upstream)]
    listen: Listen | None = None
    preserve_host: bool = False
    credential: str | None = None


class RuleModel(BaseModel):
    """Only the meta keys are typed here; matcher fields are checked by the matcher itself."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    name: str = Field(pattern=_NAME)
    action: Literal["allow", "deny", "approve"]
    reason: str = ""


class ConfigModel(_Section):
    proxy: ProxySection = ProxySection()
    limits: LimitsSection = LimitsSection()
    identity: IdentitySection = IdentitySection()
    events: EventsSection = EventsSection()
    targets: list[TargetModel] = Field(default_factory=list)
    rules: list[RuleModel] = Field(default_factory=list)
    credentials: dict[str, CredentialModel] = Field(default_factory=dict)


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int | None
    where: str
    message: str

    def __str__(self) -> str:
        place = f"{self.file}:{self.line}" if self.line else self.file
        return (
            f"{place}: {self.where}: {self.message}" if self.where else f"{place}: {self.message}"
        )


class ConfigError(Exception):
    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = list(issues)


@dataclass(frozen=True)
class Config:
    """A validated config with its compiled policy; immutable so a reload swaps it whole."""

    path: Path
    digest: str
    proxy: ProxySection
    limits: LimitsSection
    identity: IdentitySection
    events: EventsSection
    targets: Mapping[str, TargetModel]
    credentials: Mapping[str, Any]
    policy: Policy

    @property
    def state_dir(self) -> Path:
        state = Path(self.proxy.state_dir).expanduser()
        return state if state.is_absolute() else self.path.parent / state


def _where(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_issues(exc: ValidationError, file: str, lines: KeyLines) -> list[ConfigIssue]:
    issues = []
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
        if len(loc) >= 3 and loc[0] == "credentials" and loc[2] in CREDENTIAL_KINDS:
            loc = (*loc[:2], *loc[3:])  # pydantic names the union member; the file does not
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        issues.append(ConfigIssue(file, lines.line_of(loc), _where(loc), message))
    return issues


def _semantic_issues(model: ConfigModel, file: str, lines: KeyLines) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []

    def add(loc: Loc, message: str) -> None:
        issues.append(ConfigIssue(file, lines.line_of(loc), _where(loc), message))

    for kind, items in (("targets", model.targets), ("rules", model.rules)):
        seen: set[str] = set()
        for index, item in enumerate(items):
            if item.name in seen:
                add((kind, index, "name"), f"duplicate name {item.name!r}")
            seen.add(item.name)
    names = {target.name for target in model.targets}
    for index, rule in enumerate(model.rules):
        wanted = (rule.model_extra or {}).get("target")
        for name in [wanted] if isinstance(wanted, str) else wanted or []:
            if isinstance(name, str) and not any(c in name for c in "*?[") and name not in names:
                add(("rules", index, "target"), f"unknown target {name!r}")
    listens = [("proxy", "listen"), ("proxy", "admin_listen")]
    hosts = [parse_host_port(model.proxy.listen)[0], parse_host_port(model.proxy.admin_listen)[0]]
    for index, target in enumerate(model.targets):
        if target.listen:
            listens.append(("targets", index, "listen"))
            hosts.append(parse_host_port(target.listen)[0])
    if model.identity.mode == "none":
        for loc, host in zip(listens, hosts, strict=True):
            if not is_loopback_host(host):
                add(
                    loc, f'identity mode "none" is only allowed on loopback listeners, not {host!r}'
                )
    issues.extend(_identity_issues(model, add))
    for index, target in enumerate(model.targets):
        if target.credential and target.credential not in model.credentials:
            add(("targets", index, "credential"), f"unknown credential {target.credential!r}")
    for name, credential in model.credentials.items():
        if isinstance(credential, StaticCredentialModel) and (credential.env is None) == (
            credential.file is None
        ):
            add(("credentials", name), "a static credential needs exactly one of env or file")
        if isinstance(credential, OAuth2CredentialModel):
            if (credential.client_secret_env is None) == (credential.client_secret_file is None):
                add(
                    ("credentials", name),
                    "needs exactly one of client_secret_env or client_secret_file",
                )
            _check_url(credential.token_url, ("credentials", name, "token_url"), add)
        if "{token}" not in credential.format:
            add(("credentials", name, "format"), "format must contain {token}")
    return issues


def _check_url(url: str, loc: Loc, add: Any) -> None:
    from proxy.identity.oidc import check_fetch_url

    try:
        check_fetch_url(url)
    except ValueError as exc:
        add(loc, str(exc))


def _identity_issues(model: ConfigModel, add: Any) -> list[ConfigIssue]:
    identity = model.identity
    if identity.mode == "oidc":
        if not identity.issuer:
            add(("identity", "issuer"), 'identity mode "oidc" needs an issuer URL')
        else:
            _check_url(identity.issuer, ("identity", "issuer"), add)
        for key in ("discovery_url", "jwks_url"):
            if getattr(identity, key):
                _check_url(getattr(identity, key), ("identity", key), add)
    elif identity.mode == "local" and identity.algorithms and identity.algorithms != ["EdDSA"]:
        add(("identity", "algorithms"), 'local mode signs with EdDSA; set algorithms = ["EdDSA"]')
    return []


def load_config_text(text: str, path: Path) -> Config:
    file = str(path)
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        if line is None and (found := re.search(r"at line (\d+)", str(exc))):
            line = int(found.group(1))  # Python < 3.14 keeps the line only in the message
        message = getattr(exc, "msg", re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc)))
        raise ConfigError([ConfigIssue(file, line, "", f"invalid TOML: {message}")]) from None
    lines = KeyLines(text)
    try:
        model = ConfigModel.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_issues(exc, file, lines)) from None
    issues = _semantic_issues(model, file, lines)
    policy = None
    try:
        policy = Policy.from_tables(
            [rule.model_dump() for rule in model.rules],
            max_body_inspect=model.limits.max_body_inspect,
        )
    except PolicyError as exc:
        loc = ("rules", exc.index, *exc.field.split("."))
        issues.append(ConfigIssue(file, lines.line_of(loc), _where(loc), exc.message))
    if issues or policy is None:
        raise ConfigError(issues)
    return Config(
        path=path,
        digest=hashlib.sha256(text.encode()).hexdigest()[:12],
        proxy=model.proxy,
        limits=model.limits,
        identity=model.identity,
        events=model.events,
        targets={target.name: target for target in model.targets},
        credentials=dict(model.credentials),
        policy=policy,
    )


def load_config(path: Path) -> Config:
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid UTF-8"
        raise ConfigError(
            [ConfigIssue(str(path), None, "", f"cannot read config: {reason}")]
        ) from None
    return load_config_text(text, path)


def default_config_path(cwd: Path | None = None) -> Path:
    """``sluice.toml`` in the working directory if present, else the bundled sample."""
    cwd = cwd or Path.cwd()
    local = cwd / "sluice.toml"
    if local.exists():
        return local
    return Path(__file__).resolve().parent.parent / "sample_config.toml"
