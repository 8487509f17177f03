"""The built-in rule pack, written from each issuer's public description of its token format.

Every rule carries the URL of the document its format comes from. Order matters only for
reporting: when matches of two rules overlap, the merged span names the one listed first.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from urllib.parse import unquote_to_bytes

from proxy.masking.builtin_tokens import token_rules
from proxy.masking.rules import (
    Rule,
    all_of,
    entropy_floor,
    is_placeholder,
    shannon_entropy,
)

PEM_RFC = "https://www.rfc-editor.org/rfc/rfc7468"

#: Whitespace spelled out: Python's and Hyperscan's ``\s`` need not agree.
_WS = r"\t\n\x0b\x0c\r "
_B64_BODY_CLASS = r"A-Za-z0-9+/=\t\n\x0b\x0c\r :,.()\\"


def _not_aws_example(token: bytes) -> bool:
    return b"EXAMPLE" not in token


def _jwt_header_ok(token: bytes) -> bool:
    """The header must decode to a JSON object naming an algorithm or a type."""
    head = token.split(b".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(head + b"=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(decoded, dict) and ("alg" in decoded or "typ" in decoded)


def _basic_credentials(value: bytes) -> bool:
    """``Basic`` carries base64 of ``user:password``; anything else is prose."""
    try:
        decoded = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        return False
    _user, colon, password = decoded.partition(b":")
    return bool(colon and password) and re.fullmatch(rb"[ -~]+", decoded) is not None


def _pem_body(value: bytes) -> bool:
    return len(re.findall(rb"[A-Za-z0-9+/]", value)) >= 40


_CODE_LIKE = re.compile(
    rb"^(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+|[a-z]+(?:[_-][a-z]+)*|"
    rb"[A-Z]+(?:_[A-Z]+)*|\d+(?:\.\d+)*|[./~].*|.*://.*)$"
)


_REGEX_RANGE = re.compile(rb"a-z|A-Z|0-9")


def _generic_value(value: bytes) -> bool:
    """A value assigned to a secret-looking name: long, random-looking, no placeholder."""
    if not 8 <= len(value) <= 200 or is_placeholder(value) or _CODE_LIKE.match(value):
        return False
    if _REGEX_RANGE.search(value):  # a regular expression, not a secret
        return False
    has_digit = any(48 <= c <= 57 for c in value)
    has_alpha = any(65 <= (c & 0xDF) <= 90 for c in value)
    return has_digit and has_alpha and shannon_entropy(value) >= 3.0


def _url_password(value: bytes) -> bool:
    """Placeholders, format strings and plain prose (``a%20secret``) are not passwords."""
    if is_placeholder(value) or value.startswith((b"%s", b"%(", b"{")):
        return False
    decoded = unquote_to_bytes(value)
    return not is_placeholder(decoded) and re.fullmatch(rb"[a-z]+(?: [a-z]+)+", decoded) is None


def _special_rules() -> list[Rule]:
    body = rf"(?:[{_B64_BODY_CLASS}]|-(?!----))+"
    body_stop = rf"[^{_B64_BODY_CLASS}-]"
    return [
        Rule(
            id="openai-api-key",
            description="OpenAI API key (sk-..., contains the marker T3BlbkFJ)",
            source="https://help.openai.com/en/articles/5112595-best-practices-for-api-key-safety",
            pattern=r"\bsk-(?=[A-Za-z0-9_-]*T3BlbkFJ)[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])",
            keywords=("sk-",),
            trigger=r"\bsk-",
            reach=3,
            max_len=256,
            stop=r"[^A-Za-z0-9_-]",
            keep_prefix=3,
        ),
        Rule(
            id="aws-access-key-id",
            description="AWS access key id (AKIA/ASIA/ABIA/ACCA + 16)",
            source="https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_identifiers.html#identifiers-unique-ids",
            pattern=r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])",
            keywords=("AKIA", "ASIA", "ABIA", "ACCA"),
            max_len=20,
            stop=r"[^A-Za-z0-9]",
            keep_prefix=4,
            validator=_not_aws_example,
        ),
        Rule(
            id="aws-secret-access-key",
            description="AWS secret access key (40 chars) next to its setting name",
            source="https://docs.aws.amazon.com/cli/latest/userguide/cli-configure-files.html",
            pattern=(
                r"(?:secret_?access_?key|aws_secret_key)[A-Za-z0-9_]{0,20}[\"']?[ \t]{0,8}"
                r"(?::=|=>|[:=])[ \t]{0,8}[\"']?(?P<secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
            ),
            keywords=("secret_access_key", "secretaccesskey", "aws_secret_key"),
            caseless=True,
            max_len=128,
            stop=r"[\r\n]",
            validator=_not_aws_example,
        ),
        Rule(
            id="azure-storage-account-key",
            description="Azure storage account key in a connection string (AccountKey=...)",
            source="https://learn.microsoft.com/en-us/azure/storage/common/storage-configure-connection-string",
            pattern=r"AccountKey=(?P<secret>[A-Za-z0-9+/]{20,}={0,2})(?![A-Za-z0-9+/=])",
            keywords=("AccountKey=",),
            caseless=True,
            max_len=160,
            stop=r"[^A-Za-z0-9+/=]",
        ),
        Rule(
            id="azure-shared-access-key",
            description="Azure Service Bus / Event Hubs key (SharedAccessKey=...)",
            source="https://learn.microsoft.com/en-us/azure/service-bus-messaging/service-bus-sas",
            pattern=r"SharedAccessKey=(?P<secret>[A-Za-z0-9+/]{20,}={0,2})(?![A-Za-z0-9+/=])",
            keywords=("SharedAccessKey=",),
            caseless=True,
            max_len=160,
            stop=r"[^A-Za-z0-9+/=]",
        ),
        Rule(
            id="openssh-private-key",
            description="OpenSSH private key block (also with JSON-escaped newlines)",
            source="https://github.com/openssh/openssh-portable/blob/master/PROTOCOL.key",
            pattern=(
                rf"-----BEGIN OPENSSH PRIVATE KEY-----(?P<secret>{body})"
                r"-----END OPENSSH PRIVATE KEY-----"
            ),
            keywords=("-----BEGIN OPENSSH PRIVATE KEY-----",),
            max_len=16384,
            stop=rf"-----END OPENSSH PRIVATE KEY-----|{body_stop}",
            validator=_pem_body,
        ),
        Rule(
            id="pgp-private-key",
            description="OpenPGP armored private key block",
            source="https://www.rfc-editor.org/rfc/rfc4880#section-6.2",
            pattern=(
                rf"-----BEGIN PGP PRIVATE KEY BLOCK-----(?P<secret>{body})"
                r"-----END PGP PRIVATE KEY BLOCK-----"
            ),
            keywords=("-----BEGIN PGP PRIVATE KEY BLOCK-----",),
            max_len=16384,
            stop=rf"-----END PGP PRIVATE KEY BLOCK-----|{body_stop}",
            validator=_pem_body,
        ),
        Rule(
            id="pem-private-key",
            description="PEM private key block: PKCS#8, RSA, EC, DSA, encrypted",
            source=PEM_RFC,
            pattern=(
                r"-----BEGIN (?!OPENSSH )(?P<label>(?:[A-Z0-9]+ )*)PRIVATE KEY-----"
                rf"(?P<secret>{body})-----END (?P=label)PRIVATE KEY-----"
            ),
            keywords=("-----BEGIN ",),
            max_len=16384,
            stop=(
                r"-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----"
                r"|(?<=-----BEGIN )(?![A-Z0-9 ]*PRIVATE KEY-----)[A-Z0-9 ]*(?:[^A-Z0-9 -]|-----)"
                rf"|{body_stop}"
            ),
            validator=_pem_body,
        ),
        Rule(
            id="jwt",
            description="JSON Web Token (eyJ header . eyJ payload . signature)",
            source="https://www.rfc-editor.org/rfc/rfc7519",
            pattern=r"\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+(?![A-Za-z0-9_-])",
            keywords=("eyJ",),
            trigger=r"\beyJ",
            reach=3,
            max_len=8192,
            stop=r"[^A-Za-z0-9_.-]",
            keep_prefix=3,
            validator=_jwt_header_ok,
        ),
    ]


# --- URLs and assignments --------------------------------------------------------------

_USER = rf"[^{_WS}/?#@:\"'<>\\]"
_PASS = rf"[^{_WS}/?#@\"'<>\\]"


def _url_rule(
    rule_id: str, what: str, source: str, scheme: str, keywords: list[str], scheme_fail: str | None
) -> Rule:
    """``scheme://user:password@host``: only the password is masked.

    ``scheme_fail`` matches at the keyword when what follows cannot be the scheme's rest.
    """
    return Rule(
        id=rule_id,
        description=what,
        source=source,
        pattern=(
            rf"{scheme}(?P<user>{_USER}{{0,64}}):(?!(?P=user)@)"
            rf"(?P<secret>{_PASS}{{1,128}})@"
        ),
        keywords=tuple(keywords),
        trigger=rf"{scheme}{_USER}*:{_PASS}+@",
        max_len=256,
        stop=rf"://{_PASS}*?[{_WS}/?#@\"'<>\\]" if scheme_fail else rf"[{_WS}/?#@\"'<>\\]",
        fail=scheme_fail,
        validator=_url_password,
    )


_DRIVER = r"(?:\+[a-z0-9]+)?://"
_GEN_KEY = r"(?:secret|token|passw(?:or)?d|passphrase|api[_-]?key|access[_-]?key|private[_-]?key)"
_GEN_SEP = r"[\"']?[ \t]{0,8}(?::=|=>|[:=])[ \t]{0,8}"
_GEN_QUOTED = rf"[^{_WS}\"'\\]"
_GEN_BARE = rf"[^{_WS}\"'\\`,;&(){{}}\[\]<>]"
_GEN_BAD_SUFFIX = (
    r"(?:url|uri|endpoint|path|file|filename|dir|type|name|id|ids|prefix|len|length|size|"
    r"count|field|header|param|env|var|ttl|expiry|expires|expires_at|expires_in|timeout|"
    r"policy|format|pattern|regex|hash|hint|label|required|enabled|mode|kind|class|source|"
    r"store|manager|provider|factory|getter|handler|cache|list|index|limit|rule|char|chars|"
    r"template|spec|location|ref|version|hint|method|scope|scopes|usage|style|set|map)"
)


def _caseless(regex: str) -> str:
    """Spell letters as ``[Aa]`` so a trigger can mix caseless words with case-sensitive
    classes (Hyperscan slows down about 6x on inline ``(?-i:...)``)."""
    return re.sub(r"(?<!\\)[A-Za-z]", lambda m: f"[{m[0].upper()}{m[0].lower()}]", regex)


_GENERIC = Rule(
    id="generic-secret-assignment",
    description="A value assigned to a name containing SECRET/TOKEN/PASSWORD/API_KEY "
    "(env, YAML, JSON, TOML), with an entropy floor and a placeholder allowlist",
    source="https://12factor.net/config",
    pattern=(
        rf"{_GEN_KEY}(?!(?-i:[a-z]))"
        rf"(?![A-Za-z0-9_.-]{{0,40}}?[_.-]?{_GEN_BAD_SUFFIX}{_GEN_SEP})"
        rf"[A-Za-z0-9_.-]{{0,40}}{_GEN_SEP}"
        rf"(?:\"(?P<secret>{_GEN_QUOTED}+)\"|'(?P<secret2>{_GEN_QUOTED}+)'"
        rf"|(?P<secret3>{_GEN_BARE}+)(?=[ \t]*(?:[\r\n&;#\"'<>}}]|\Z)))"
    ),
    keywords=(
        "secret",
        "token",
        "password",
        "passwd",
        "passphrase",
        "apikey",
        "api_key",
        "api-key",
        "accesskey",
        "access_key",
        "access-key",
        "privatekey",
        "private_key",
        "private-key",
    ),
    trigger=(
        rf"{_caseless(_GEN_KEY)}(?:[^a-z][A-Za-z0-9_.-]*)?"
        rf"{_GEN_SEP.replace('{0,8}', '*')}[\"']?{_GEN_QUOTED}"
    ),
    caseless=True,
    reach=11 + 40 + 1 + 8 + 2 + 8 + 2,
    max_len=256,
    stop=r"[\r\n]",
    validator=_generic_value,
)


def _http_auth_rules() -> list[Rule]:
    return [
        Rule(
            id="bearer-token",
            description="HTTP Authorization: Bearer credential",
            source="https://www.rfc-editor.org/rfc/rfc6750#section-2.1",
            pattern=(
                r"\bbearer[ \t]{1,16}(?P<secret>[A-Za-z0-9._~+/-]{16,}=*)"
                r"(?![A-Za-z0-9._~+/=-])"
            ),
            keywords=("bearer",),
            trigger=r"(?i)\bbearer[ \t]+[A-Za-z0-9._~+/-]",
            caseless=True,
            reach=6 + 16 + 1,
            max_len=4096,
            stop=r"[^ \tA-Za-z0-9._~+/=-]",
            validator=all_of(entropy_floor(3.0), lambda v: not _CODE_LIKE.match(v)),
        ),
        Rule(
            id="basic-auth",
            description="HTTP Authorization: Basic base64(user:password)",
            source="https://www.rfc-editor.org/rfc/rfc7617#section-2",
            pattern=(r"\bbasic[ \t]{1,16}(?P<secret>[A-Za-z0-9+/]{8,}={0,2})(?![A-Za-z0-9+/=])"),
            keywords=("basic",),
            trigger=r"(?i)\bbasic[ \t]+[A-Za-z0-9+/]",
            caseless=True,
            reach=5 + 16 + 1,
            max_len=1024,
            stop=r"[^ \tA-Za-z0-9+/=]",
            validator=_basic_credentials,
        ),
    ]


def builtin_rules() -> list[Rule]:
    """The shipped pack, specific formats first and the generic assignment rule last."""
    urls = [
        _url_rule(
            "postgres-url-password",
            "PostgreSQL connection URI with a password",
            "https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-URIS",
            rf"postgres(?:ql)?{_DRIVER}",
            ["postgres"],
            r"postgres(?:ql)?(?:\+[a-z0-9]+)?[^a-z0-9+:]",
        ),
        _url_rule(
            "mysql-url-password",
            "MySQL connection URI with a password",
            "https://dev.mysql.com/doc/refman/8.0/en/connecting-using-uri-or-key-value-pairs.html",
            rf"mysqlx?{_DRIVER}",
            ["mysql"],
            r"mysqlx?(?:\+[a-z0-9]+)?[^a-z0-9+:]",
        ),
        _url_rule(
            "mongodb-url-password",
            "MongoDB connection string with a password",
            "https://www.mongodb.com/docs/manual/reference/connection-string/",
            r"mongodb(?:\+srv)?://",
            ["mongodb"],
            r"mongodb(?:\+srv)?[^+:]",
        ),
        _url_rule(
            "redis-url-password",
            "Redis URI with a password",
            "https://www.iana.org/assignments/uri-schemes/prov/redis",
            r"rediss?://",
            ["redis"],
            r"rediss?[^s:]",
        ),
        _url_rule(
            "amqp-url-password",
            "AMQP (RabbitMQ) URI with a password",
            "https://www.rabbitmq.com/docs/uri-spec",
            r"amqps?://",
            ["amqp"],
            r"amqps?[^s:]",
        ),
        _url_rule(
            "url-credentials",
            "Credentials in a URL (scheme://user:password@host)",
            "https://www.rfc-editor.org/rfc/rfc3986#section-3.2.1",
            "://",
            ["://"],
            None,
        ),
    ]
    slack_webhook = Rule(
        id="slack-webhook-url",
        description="Slack incoming webhook or workflow trigger URL",
        source="https://api.slack.com/messaging/webhooks",
        pattern=(
            r"hooks\.slack\.com/(?:services|workflows|triggers)/"
            r"(?P<secret>[A-Za-z0-9_/-]{20,})(?![A-Za-z0-9_/-])"
        ),
        keywords=("hooks.slack.com/",),
        max_len=300,
        stop=r"[^A-Za-z0-9_/-]",
    )
    return [
        *token_rules(),
        slack_webhook,
        *_special_rules(),
        *urls,
        *_http_auth_rules(),
        _GENERIC,
    ]
