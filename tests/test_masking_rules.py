"""Every built-in rule: fakes in the issuer's format are masked, near misses are not."""

from __future__ import annotations

import random
import re
import zlib

import pytest

from proxy.masking import Masker, RuleError, builtin_rules, select_rules
from proxy.masking.builtin_tokens import bech32_ok
from proxy.masking.engine import hyperscan_available
from proxy.masking.fakes import FAKES, crc_token, fake
from proxy.masking.rules import base62, crc32_base62_ok, is_placeholder, shannon_entropy

KEY = b"k"
BACKENDS = ["python", "hyperscan"] if hyperscan_available() else ["python"]
RULES = {rule.id: rule for rule in builtin_rules()}
CONTEXTS = ["{}", "x {} y", '"{}"', "'{}',", "key={}&next=1", "{}\n", "(\n  {}\n)", "\t{}\r\n"]


@pytest.fixture(scope="module", params=BACKENDS)
def masker(request: pytest.FixtureRequest) -> Masker:
    return Masker(hmac_key=KEY, backend=request.param)


def spans_of(masker: Masker, text: str) -> list[tuple[int, int, str]]:
    return [(s.start, s.end, s.rule) for s in masker.mask_bytes(text.encode()).spans]


def test_every_rule_has_a_fake_and_a_near_miss() -> None:
    assert set(FAKES) == set(RULES)
    assert set(NEAR_MISSES) == set(RULES)
    assert len(RULES) >= 30


@pytest.mark.parametrize("rule_id", sorted(RULES))
def test_fakes_are_masked_in_every_context(masker: Masker, rule_id: str) -> None:
    rng = random.Random(rule_id)
    for context in CONTEXTS:
        if rule_id == "generic-secret-assignment" and context.startswith("key="):
            continue  # "key=API_TOKEN=..." is one value for the generic rule
        text, secret = fake(rule_id, rng)
        line = context.replace("{}", text)
        start = line.index(secret)
        assert spans_of(masker, line) == [(start, start + len(secret), rule_id)], line
        masked = masker.mask_bytes(line.encode()).masked.decode()
        keep = RULES[rule_id].keep_prefix
        assert masked[start : start + keep] == secret[:keep]
        hidden = secret[keep:].replace("\n", "")
        assert hidden not in masked
        assert len(masked) == len(line)


@pytest.mark.parametrize("rule_id", sorted(RULES))
def test_near_misses_are_left_alone(masker: Masker, rule_id: str) -> None:
    rng = random.Random(rule_id + "-miss")
    for sample in NEAR_MISSES[rule_id](rng):
        assert spans_of(masker, sample) == [], sample


def _truncated(rule_id: str, body: int) -> object:
    """The prefix plus too few body characters; the whole token glued to a word."""

    def make(rng: random.Random) -> list[str]:
        text, _ = fake(rule_id, rng)
        prefix = next(k for k in RULES[rule_id].keywords if text.startswith(k))
        return [text[: len(prefix) + body], "x" + text, "_" + text]

    return make


def _crc_misses(prefix: str) -> object:
    def make(rng: random.Random) -> list[str]:
        good = crc_token(prefix, rng)
        bad_check = good[:-1] + ("A" if good[-1] != "A" else "B")
        return [bad_check, good[:-1], good + "Z", "x" + good, prefix + "a" * 36]

    return make


def _context_misses(*samples: str) -> object:
    return lambda rng: list(samples)


NEAR_MISSES = {
    **{
        rid: _crc_misses(RULES[rid].keywords[0])
        for rid in RULES
        if rid.startswith("github-") and rid != "github-fine-grained-pat"
    },
    "npm-token": _crc_misses("npm_"),
    "github-fine-grained-pat": _context_misses("github_pat_short", "github_pat_" + "x" * 10),
    **{rid: _truncated(rid, 19) for rid in RULES if rid.startswith("gitlab-")},
    "slack-config-token": _context_misses("xoxe-short", "xoxe.xoxp-1-abc", "axoxe-" + "a1" * 20),
    "pypi-token": _context_misses("pypi-AgEIcHlwaS5vcmc", "pypi-token-name", "pypi-AgEIabc" * 8),
    **{
        rid: _truncated(rid, 12)
        for rid in RULES
        if rid.startswith("slack-") and rid not in ("slack-webhook-url", "slack-config-token")
    },
    "stripe-secret-key": _context_misses("sk_live_short", "sk_test_", "mask_live_" + "a1" * 20),
    "stripe-restricted-key": _context_misses("rk_live_abc", "work_live_" + "a1" * 20),
    "stripe-webhook-secret": _context_misses("whsec_short", "whsec_" + "a" * 10),
    "anthropic-api-key": _truncated("anthropic-api-key", 31),
    "google-api-key": _truncated("google-api-key", 34),
    "huggingface-token": _context_misses("hf_hub_download_from_remote_repo", "hf_" + "a" * 34),
    "age-secret-key": lambda rng: [
        fake("age-secret-key", rng)[0][:-1] + "Q"
        if not fake("age-secret-key", rng)[0].endswith("Q")
        else "",
        "AGE-SECRET-KEY-1" + "Q" * 58,
        "AGE-SECRET-KEY-1QQQ",
    ],
    "vault-token": _context_misses("hvs.short", "chvs.abcdefghijklmnopqrstuvwxyz123456"),
    "digitalocean-token": _truncated("digitalocean-token", 63),
    "databricks-token": _context_misses("dapi" + "0" * 31, "dapi" + "g" * 32, "xdapi" + "a" * 32),
    "sentry-token": _context_misses("sntrys_short", "sntryu_" + "a" * 20),
    "docker-hub-token": _context_misses("dckr_pat_short", "dckr_pat_"),
    "slack-webhook-url": _context_misses(
        "https://hooks.slack.com/services/", "https://hooks.slack.com/services/T000/B000"
    ),
    "openai-api-key": _context_misses(
        "sk-" + "a" * 48, "sk-proj-" + "b1" * 40, "task-T3BlbkFJ" + "a" * 20, "sk-T3BlbkFJ"
    ),
    "aws-access-key-id": _context_misses(
        "AKIAIOSFODNN7EXAMPLE",
        "AKIA1234",
        "XAKIA" + "A" * 16,
        "AKIA" + "A" * 17,
        "AKIAabcdefghijklmnop",
    ),
    "aws-secret-access-key": _context_misses(
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "aws_secret_access_key = short",
        "aws_secret_access_key = ${AWS_SECRET_ACCESS_KEY}",
        "aws_secret_access_key = " + "a" * 41,
    ),
    "azure-storage-account-key": _context_misses("AccountKey=<key>;", "AccountKey=short;"),
    "azure-shared-access-key": _context_misses(
        "SharedAccessKeyName=RootManageSharedAccessKey;", "SharedAccessKey={key}"
    ),
    "openssh-private-key": _context_misses(
        "-----BEGIN OPENSSH PRIVATE KEY-----\n...\n-----END OPENSSH PRIVATE KEY-----"
    ),
    "pgp-private-key": _context_misses(
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n-----END PGP PRIVATE KEY BLOCK-----",
        "-----BEGIN PGP PUBLIC KEY BLOCK-----\n"
        + "QUJD" * 30
        + "\n-----END PGP PUBLIC KEY BLOCK-----",
    ),
    "pem-private-key": _context_misses(
        "-----BEGIN CERTIFICATE-----\n" + "QUJD" * 30 + "\n-----END CERTIFICATE-----",
        "-----BEGIN RSA PRIVATE KEY-----\n" + "QUJD" * 30 + "\n-----END EC PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----\nMIIE...\n-----END PRIVATE KEY-----",
    ),
    "jwt": lambda rng: [
        "eyJub3RoaW5nIjoxfQ.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",  # header without alg/typ
        fake("jwt", rng)[0].rsplit(".", 1)[0],  # no signature
        "eyJhbGciOiJIUzI1NiJ9",
    ],
    "postgres-url-password": _context_misses(
        "postgres://user:password@localhost/db",
        "postgresql://postgres:postgres@localhost:5432/app",
        "postgres://app:${DB_PASSWORD}@db/app",
        "postgres://localhost:5432/app",
        "postgres is great: a://b",
    ),
    "mysql-url-password": _context_misses("mysql://root:changeme@db/x", "mysql://root@db/x"),
    "mongodb-url-password": _context_misses(
        "mongodb+srv://<username>:<password>@cluster0.mongodb.net", "mongodb://localhost:27017"
    ),
    "redis-url-password": _context_misses("redis://localhost:6379/0", "redis://:{password}@cache"),
    "amqp-url-password": _context_misses("amqp://guest:guest@localhost:5672/", "amqp://mq:5672"),
    "url-credentials": _context_misses(
        "https://user:pass@example.com",
        "http://localhost:8080/path",
        'f"{scheme}://{user}:{password}@{host}"',
        "https://%s:%s@%s",
        "https://user:your_password_here@host",
    ),
    "bearer-token": _context_misses(
        "Authorization: Bearer <token>",
        "Authorization: Bearer ${TOKEN}",
        "Authorization: Bearer YOUR_ACCESS_TOKEN_HERE",
        "bearer token authentication",
        "Bearer abc",
    ),
    "basic-auth": _context_misses("Basic usage of the API", "Basic dGVzdA==", "Basic auth is weak"),
    "generic-secret-assignment": _context_misses(
        "API_TOKEN=${API_TOKEN}",
        "API_TOKEN=$API_TOKEN",
        "password: changeme",
        'api_key = "<your-key>"',
        "SECRET_KEY=xxxxxxxxxxxxxxxx",
        'api_key = "your_api_key_here"',
        "password: ***",
        "token: null",
        "token = None",
        "secret: true",
        'password = ""',
        "token = self.get_token()",
        "tokenizer = AutoTokenizer.from_pretrained(name)",
        "token_url = https://auth.example.com/token2",
        "private_key: Ed25519PrivateKey | None = None",
        'TOKEN = "[a-zA-Z_][a-zA-Z0-9_-]*"',
        "password = os.environ['DB_PASSWORD1']",
        "secret = 'hunter'",
    ),
}


def test_github_checksum_is_base62_crc32_of_the_random_part() -> None:
    body = "a" * 30
    expected = base62(zlib.crc32(body.encode()), 6)
    assert len(expected) == 6 and expected.isalnum()
    assert crc32_base62_ok(body.encode() + expected)
    assert not crc32_base62_ok(b"b" * 30 + expected)
    assert base62(0, 6) == b"000000" and base62(61, 2) == b"0z" and base62(62, 2) == b"10"
    token = crc_token("ghp_", random.Random(1))
    assert re.fullmatch(r"ghp_[A-Za-z0-9]{36}", token)


def test_bech32_checksum() -> None:
    key = fake("age-secret-key", random.Random(2))[0]
    assert bech32_ok(key.encode())
    broken = key[:-2] + ("Q" if key[-2] != "Q" else "P") + key[-1]
    assert not bech32_ok(broken.encode())


@pytest.mark.parametrize(
    "value",
    [
        "",
        "${VAR}",
        "$VAR",
        "changeme",
        "<your-key>",
        "xxxxxx",
        "your_api_key_here",
        "***",
        "null",
        "None",
        "true",
        "false",
        "{{ token }}",
        "%(password)s",
        "REDACTED",
    ],
)
def test_placeholders(value: str) -> None:
    assert is_placeholder(value.encode())


@pytest.mark.parametrize("value", ["k8Xq2LmZ0pRt", "hunter2!", "aB3dE5fG7hJ9"])
def test_not_placeholders(value: str) -> None:
    assert not is_placeholder(value.encode())


def test_entropy() -> None:
    assert shannon_entropy(b"aaaa") == 0
    assert shannon_entropy(b"ab") == 1
    assert shannon_entropy(bytes(range(256))) == 8


def test_config_selection_disable_and_custom_rules() -> None:
    assert select_rules(builtin_rules(), enabled=False) == []
    rules = select_rules(builtin_rules(), disable=["jwt", "generic-secret-assignment"])
    assert {r.id for r in rules} == set(RULES) - {"jwt", "generic-secret-assignment"}
    with pytest.raises(RuleError, match="unknown"):
        select_rules(builtin_rules(), disable=["no-such-rule"])
    custom = {
        "id": "acme-key",
        "regex": r"acme_[a-z0-9]{16}\b",
        "keywords": ["acme_"],
        "keep_prefix": 5,
    }
    rules = select_rules(builtin_rules(), custom=[custom])
    for backend in BACKENDS:
        masker = Masker(rules, hmac_key=KEY, backend=backend)
        result = masker.mask_bytes(b"key: acme_0123456789abcdef end")
        assert result.masked == b"key: acme_**************** end"
        assert [s.rule for s in result.spans] == ["acme-key"]


def test_custom_rule_entropy_floor_and_errors() -> None:
    spec = {"id": "corp", "regex": r"corp-[a-z]+", "keywords": ["corp-"], "entropy": 3.5}
    masker = Masker(select_rules([], custom=[spec]), hmac_key=KEY, backend="python")
    assert masker.mask_bytes(b"corp-aaaaaaaaaaaa").spans == []
    assert len(masker.mask_bytes(b"corp-qwertyuiopzxcvbnm").spans) == 1
    bad = [
        {"id": "x", "regex": "(", "keywords": ["x-"]},
        {"id": "x", "regex": "a", "keywords": []},
        {"id": "bad id!", "regex": "a", "keywords": ["ab"]},
        {"id": "x", "regex": "a", "keywords": ["ab"], "colour": "red"},
        {"id": "jwt", "regex": "a", "keywords": ["ab"]},
    ]
    for spec in bad:
        with pytest.raises(RuleError):
            select_rules(builtin_rules(), custom=[spec])


@pytest.mark.skipif(not hyperscan_available(), reason="hyperscan not installed")
def test_every_trigger_compiles_in_hyperscan() -> None:
    assert Masker(hmac_key=KEY, backend="hyperscan").backend == "hyperscan"
