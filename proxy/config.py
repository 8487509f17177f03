"""Load and validate the TOML config; every error names its file and line.

The section models live in ``proxy.config_models``; they are re-exported here.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from proxy.config_models import (
    ASYMMETRIC,
    CREDENTIAL_KINDS,
    HMAC,
    ApprovalsSection,
    CommandCredentialModel,
    ConfigModel,
    CredentialModel,
    Duration,
    EgressModel,
    EventsSection,
    ForwardSection,
    IdentitySection,
    JwtCredentialModel,
    LimitsSection,
    Listen,
    MaskingSection,
    NotifySection,
    OAuth2CredentialModel,
    ProxySection,
    RecordingSection,
    RuleModel,
    Size,
    StaticCredentialModel,
    TargetModel,
    is_loopback_host,
    parse_host_port,
)
from proxy.egress import DEFAULT_EGRESS_NAME, EgressTable, compile_entry
from proxy.policy import Policy, PolicyError
from proxy.tomlpos import KeyLines, Loc

__all__ = [
    "ASYMMETRIC",
    "CREDENTIAL_KINDS",
    "HMAC",
    "ApprovalsSection",
    "CommandCredentialModel",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "ConfigModel",
    "CredentialModel",
    "Duration",
    "EgressModel",
    "EventsSection",
    "ForwardSection",
    "IdentitySection",
    "JwtCredentialModel",
    "LimitsSection",
    "Listen",
    "MaskingSection",
    "NotifySection",
    "OAuth2CredentialModel",
    "ProxySection",
    "RecordingSection",
    "RuleModel",
    "Size",
    "StaticCredentialModel",
    "TargetModel",
    "default_config_path",
    "is_loopback_host",
    "load_config",
    "load_config_text",
    "parse_host_port",
]


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
    approvals: ApprovalsSection
    masking: MaskingSection
    recording: RecordingSection
    targets: Mapping[str, TargetModel]
    credentials: Mapping[str, Any]
    policy: Policy
    #: The state dir in force: ``proxy.state_dir`` (relative to the file) or the override.
    state_dir: Path
    state_override: Path | None = None
    forward: ForwardSection = field(default_factory=ForwardSection)
    egress: EgressTable = field(default_factory=lambda: EgressTable(()))
    #: The ``[[egress]]`` entries as written (masking overrides, names).
    egress_entries: Mapping[str, EgressModel] | None = None

    @property
    def ca_bundle_path(self) -> Path | None:
        if not self.forward.ca_bundle:
            return None
        bundle = Path(self.forward.ca_bundle).expanduser()
        return bundle if bundle.is_absolute() else self.path.parent / bundle

    @property
    def learned_rules_path(self) -> Path:
        """Rules the approvers taught (``always``); written by Sluice, never by hand."""
        return self.state_dir / self.approvals.learned_rules


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

    for kind, items in (
        ("targets", model.targets),
        ("rules", model.rules),
        ("egress", model.egress),
    ):
        seen: set[str] = set()
        for index, item in enumerate(items):
            if item.name in seen:
                add((kind, index, "name"), f"duplicate name {item.name!r}")
            seen.add(item.name)
    names = {target.name for target in model.targets}
    for index, entry in enumerate(model.egress):
        if entry.name in names or entry.name == DEFAULT_EGRESS_NAME:
            add(("egress", index, "name"), f"name {entry.name!r} is taken (targets, 'egress')")
    for index, target in enumerate(model.targets):
        if target.name == DEFAULT_EGRESS_NAME:
            add(("targets", index, "name"), "'egress' names forward-proxy requests")
    names |= {entry.name for entry in model.egress} | {DEFAULT_EGRESS_NAME}
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
    _masking_issues(model, add)
    for index, target in enumerate(model.targets):
        if target.credential and target.credential not in model.credentials:
            add(("targets", index, "credential"), f"unknown credential {target.credential!r}")
    for index, entry in enumerate(model.egress):
        if entry.credential and entry.credential not in model.credentials:
            add(("egress", index, "credential"), f"unknown credential {entry.credential!r}")
        if entry.credential and entry.tls == "passthrough":
            add(
                ("egress", index, "credential"),
                "a passthrough tunnel is opaque: Sluice cannot sign in inside it "
                '(use tls = "intercept")',
            )
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


def _masking_issues(model: ConfigModel, add: Any) -> None:
    """Compile the masking rule selections now, so a bad regex fails the config, not a request."""
    from proxy.masking.builtin import builtin_rules
    from proxy.masking.rules import RuleError, select_rules

    masking = model.masking
    custom = [rule.model_dump() for rule in masking.rules]
    try:
        select_rules(builtin_rules(), enabled=True, disable=masking.disable, custom=custom)
    except RuleError as exc:
        add(("masking",), str(exc))
    for index, target in enumerate(model.targets):
        if target.masking.disable:
            try:
                select_rules(builtin_rules(), disable=[*masking.disable, *target.masking.disable])
            except RuleError as exc:
                add(("targets", index, "masking", "disable"), str(exc))
    if model.approvals.notify.webhook:
        _check_url(model.approvals.notify.webhook, ("approvals", "notify", "webhook"), add)


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


def _parse_toml(text: str, file: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        if line is None and (found := re.search(r"at line (\d+)", str(exc))):
            line = int(found.group(1))  # Python < 3.14 keeps the line only in the message
        message = getattr(exc, "msg", re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc)))
        raise ConfigError([ConfigIssue(file, line, "", f"invalid TOML: {message}")]) from None
    return data


def _learned_rules(path: Path) -> tuple[list[dict[str, Any]], KeyLines | None, str]:
    """The learned-rules file's ``[[rules]]``; absent means none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], None, ""
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid UTF-8"
        raise ConfigError([ConfigIssue(str(path), None, "", f"cannot read: {reason}")]) from None
    data = _parse_toml(text, str(path))
    lines = KeyLines(text)
    unknown = [key for key in data if key != "rules"]
    if unknown:
        raise ConfigError(
            [ConfigIssue(str(path), lines.line_of((unknown[0],)), unknown[0], "unknown key")]
        )
    try:
        rules = [RuleModel.model_validate(rule) for rule in data.get("rules", [])]
    except ValidationError as exc:
        raise ConfigError(_pydantic_issues(exc, str(path), lines)) from None
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return [rule.model_dump() for rule in rules], lines, digest


def load_config_text(text: str, path: Path, *, state_dir: Path | None = None) -> Config:
    file = str(path)
    data = _parse_toml(text, file)
    lines = KeyLines(text)
    try:
        model = ConfigModel.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_issues(exc, file, lines)) from None
    issues = _semantic_issues(model, file, lines)
    state = Path(model.proxy.state_dir).expanduser()
    resolved_state = state_dir or (state if state.is_absolute() else path.parent / state)
    learned_path = resolved_state / model.approvals.learned_rules
    learned, learned_lines, learned_digest = _learned_rules(learned_path)
    own = [rule.model_dump() for rule in model.rules]
    clashes = {rule["name"] for rule in learned} & {rule["name"] for rule in own}
    for name in sorted(clashes):
        issues.append(ConfigIssue(str(learned_path), None, "rules", f"duplicate name {name!r}"))
    policy = None
    try:
        # Learned rules come first: an approver's "always" must win over the rule that held.
        policy = Policy.from_tables(learned + own, max_body_inspect=model.limits.max_body_inspect)
    except PolicyError as exc:
        if exc.index < len(learned):
            loc: Loc = ("rules", exc.index, *exc.field.split("."))
            line = learned_lines.line_of(loc) if learned_lines else None
            issues.append(ConfigIssue(str(learned_path), line, _where(loc), exc.message))
        else:
            loc = ("rules", exc.index - len(learned), *exc.field.split("."))
            issues.append(ConfigIssue(file, lines.line_of(loc), _where(loc), exc.message))
    egress = None
    try:
        egress = EgressTable(
            [compile_entry(e.name, e.hosts, e.ports, e.tls, e.allow_private) for e in model.egress],
            model.forward.default_tls,
        )
    except ValueError as exc:  # a bad host glob
        issues.append(ConfigIssue(file, lines.line_of(("egress",)), "egress", str(exc)))
    if issues or policy is None or egress is None:
        raise ConfigError(issues)
    return Config(
        path=path,
        digest=hashlib.sha256((text + learned_digest).encode()).hexdigest()[:12],
        proxy=model.proxy,
        limits=model.limits,
        identity=model.identity,
        events=model.events,
        approvals=model.approvals,
        masking=model.masking,
        recording=model.recording,
        targets={target.name: target for target in model.targets},
        credentials=dict(model.credentials),
        policy=policy,
        state_dir=resolved_state,
        state_override=state_dir,
        forward=model.forward,
        egress=egress,
        egress_entries={entry.name: entry for entry in model.egress},
    )


def load_config(path: Path, *, state_dir: Path | None = None) -> Config:
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid UTF-8"
        raise ConfigError(
            [ConfigIssue(str(path), None, "", f"cannot read config: {reason}")]
        ) from None
    return load_config_text(text, path, state_dir=state_dir)


def default_config_path(cwd: Path | None = None) -> Path:
    """``sluice.toml`` in the working directory if present, else the bundled sample."""
    cwd = cwd or Path.cwd()
    local = cwd / "sluice.toml"
    if local.exists():
        return local
    return Path(__file__).resolve().parent.parent / "sample_config.toml"
