"""Random fake secrets in each built-in rule's format, for tests, benchmarks and demos.

``fake(rule_id, rng)`` returns ``(text, secret)``: ``text`` is what to plant (the token, or
the line that gives it context) and ``secret`` the part the rule must report as its span.
Checksums are computed, so checksum-validated formats come out valid.
"""

from __future__ import annotations

import base64
import json
import random
import string
import zlib
from collections.abc import Callable

from proxy.masking.rules import base62

ALNUM = string.ascii_letters + string.digits
URLSAFE = ALNUM + "_-"
HEX = "0123456789abcdef"
_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def rand(rng: random.Random, alphabet: str, size: int) -> str:
    """Random text that always mixes letters and digits when the alphabet has both."""
    while True:
        text = "".join(rng.choice(alphabet) for _ in range(size))
        mixed = set(alphabet) & set(string.digits) and set(alphabet) & set(string.ascii_letters)
        if size < 8 or not mixed:
            return text
        if any(c.isdigit() for c in text) and any(c.isalpha() for c in text):
            return text


def crc_token(prefix: str, rng: random.Random) -> str:
    """GitHub classic and npm: 30 random base62 characters, then their base62 CRC32."""
    body = rand(rng, ALNUM, 30)
    return prefix + body + base62(zlib.crc32(body.encode()), 6).decode()


def _bech32_checksum(hrp: str, data: list[int]) -> list[int]:
    values = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + data
    check = 1
    for item in [*values, 0, 0, 0, 0, 0, 0]:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ item
        for bit, gen in enumerate((0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)):
            check ^= gen if top >> bit & 1 else 0
    check ^= 1
    return [(check >> 5 * (5 - i)) & 31 for i in range(6)]


def age_key(rng: random.Random) -> str:
    data = [rng.randrange(32) for _ in range(52)]
    words = data + _bech32_checksum("age-secret-key-", data)
    return "AGE-SECRET-KEY-1" + "".join(_BECH32[w] for w in words).upper()


def _b64(rng: random.Random, size: int) -> str:
    return base64.b64encode(rng.randbytes(size)).decode()


def pem_block(label: str, rng: random.Random, *, newline: str = "\n") -> tuple[str, str]:
    body = _b64(rng, 600)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    inner = newline + newline.join(lines) + newline
    return f"-----BEGIN {label}-----{inner}-----END {label}-----", inner


def jwt(rng: random.Random) -> str:
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    head = part({"alg": "HS256", "typ": "JWT"})
    body = part({"sub": rand(rng, ALNUM, 12), "iat": rng.randrange(1 << 31)})
    return f"{head}.{body}.{rand(rng, URLSAFE, 43)}"


def _same(token: str) -> tuple[str, str]:
    return token, token


def _context(line: str, secret: str) -> tuple[str, str]:
    return line.replace("{}", secret), secret


def _password(rng: random.Random) -> str:
    return rand(rng, ALNUM, 6) + rng.choice("!*-_~.") + rand(rng, ALNUM, 8)


Fake = Callable[[random.Random], tuple[str, str]]

FAKES: dict[str, Fake] = {
    "github-pat": lambda r: _same(crc_token("ghp_", r)),
    "github-oauth-token": lambda r: _same(crc_token("gho_", r)),
    "github-user-to-server-token": lambda r: _same(crc_token("ghu_", r)),
    "github-server-to-server-token": lambda r: _same(crc_token("ghs_", r)),
    "github-refresh-token": lambda r: _same(crc_token("ghr_", r)),
    "github-fine-grained-pat": lambda r: _same(
        f"github_pat_11{rand(r, ALNUM, 20)}_{rand(r, ALNUM, 59)}"
    ),
    "gitlab-pat": lambda r: _same("glpat-" + rand(r, URLSAFE, 20)),
    "gitlab-deploy-token": lambda r: _same("gldt-" + rand(r, URLSAFE, 20)),
    "gitlab-runner-token": lambda r: _same("glrt-" + rand(r, URLSAFE, 20)),
    "gitlab-pipeline-trigger-token": lambda r: _same("glptt-" + rand(r, HEX, 40)),
    "gitlab-oauth-app-secret": lambda r: _same("gloas-" + rand(r, HEX, 64)),
    "gitlab-ci-job-token": lambda r: _same("glcbt-" + rand(r, URLSAFE, 24)),
    "npm-token": lambda r: _same(crc_token("npm_", r)),
    "pypi-token": lambda r: _same("pypi-AgEIcHlwaS5vcmc" + rand(r, URLSAFE, 160)),
    "slack-bot-token": lambda r: _same(
        f"xoxb-{rand(r, string.digits, 11)}-{rand(r, string.digits, 13)}-{rand(r, ALNUM, 24)}"
    ),
    "slack-user-token": lambda r: _same(
        f"xoxp-{rand(r, string.digits, 11)}-{rand(r, string.digits, 12)}-{rand(r, HEX, 32)}"
    ),
    "slack-app-token": lambda r: _same(
        f"xapp-1-A{rand(r, ALNUM, 10)}-{rand(r, string.digits, 13)}-{rand(r, HEX, 64)}"
    ),
    "slack-legacy-token": lambda r: _same(f"xoxa-2-{rand(r, ALNUM, 40)}"),
    "slack-config-token": lambda r: _same(f"xoxe.xoxp-1-{rand(r, ALNUM, 120)}"),
    "stripe-secret-key": lambda r: _same("sk_live_" + rand(r, ALNUM, 99)),
    "stripe-restricted-key": lambda r: _same("rk_test_" + rand(r, ALNUM, 99)),
    "stripe-webhook-secret": lambda r: _same("whsec_" + rand(r, ALNUM, 32)),
    "anthropic-api-key": lambda r: _same(f"sk-ant-api03-{rand(r, URLSAFE, 93)}AA"),
    "google-api-key": lambda r: _same("AIza" + rand(r, URLSAFE, 35)),
    "huggingface-token": lambda r: _same("hf_" + rand(r, string.ascii_letters, 34)),
    "age-secret-key": lambda r: _same(age_key(r)),
    "vault-token": lambda r: _same("hvs." + rand(r, URLSAFE, 90)),
    "digitalocean-token": lambda r: _same("dop_v1_" + rand(r, HEX, 64)),
    "databricks-token": lambda r: _same("dapi" + rand(r, HEX, 32)),
    "sentry-token": lambda r: _same("sntryu_" + rand(r, HEX, 64)),
    "docker-hub-token": lambda r: _same("dckr_pat_" + rand(r, URLSAFE, 27)),
    "slack-webhook-url": lambda r: _context(
        "https://hooks.slack.com/services/{}",
        f"T{rand(r, ALNUM.upper(), 8)}/B{rand(r, ALNUM.upper(), 10)}/{rand(r, ALNUM, 24)}",
    ),
    "openai-api-key": lambda r: _same(
        f"sk-proj-{rand(r, URLSAFE, 74)}T3BlbkFJ{rand(r, URLSAFE, 74)}"
    ),
    "aws-access-key-id": lambda r: _same("AKIA" + rand(r, string.ascii_uppercase + "234567", 16)),
    "aws-secret-access-key": lambda r: _context(
        "aws_secret_access_key = {}", rand(r, ALNUM + "/+", 40)
    ),
    "azure-storage-account-key": lambda r: _context(
        "DefaultEndpointsProtocol=https;AccountName=acct1;AccountKey={};"
        "EndpointSuffix=core.windows.net",
        _b64(r, 64),
    ),
    "azure-shared-access-key": lambda r: _context(
        "Endpoint=sb://ns1.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;"
        "SharedAccessKey={}",
        _b64(r, 32),
    ),
    "openssh-private-key": lambda r: pem_block("OPENSSH PRIVATE KEY", r),
    "pgp-private-key": lambda r: pem_block("PGP PRIVATE KEY BLOCK", r),
    "pem-private-key": lambda r: pem_block(r.choice(["RSA ", "EC ", ""]) + "PRIVATE KEY", r),
    "jwt": lambda r: _same(jwt(r)),
    "postgres-url-password": lambda r: _context(
        "postgresql://app:{}@db.internal:5432/app", _password(r)
    ),
    "mysql-url-password": lambda r: _context("mysql://root:{}@10.0.0.5/shop", _password(r)),
    "mongodb-url-password": lambda r: _context(
        "mongodb+srv://svc:{}@cluster0.abcde.mongodb.net/db", _password(r)
    ),
    "redis-url-password": lambda r: _context("redis://:{}@cache:6379/0", _password(r)),
    "amqp-url-password": lambda r: _context("amqps://worker:{}@mq.internal/vhost", _password(r)),
    "url-credentials": lambda r: _context("https://deploy:{}@git.internal/repo.git", _password(r)),
    "bearer-token": lambda r: _context("Authorization: Bearer {}", rand(r, URLSAFE, 40)),
    "basic-auth": lambda r: _context(
        "Authorization: Basic {}",
        base64.b64encode(f"svc:{_password(r)}".encode()).decode(),
    ),
    "generic-secret-assignment": lambda r: _context(
        r.choice(["API_TOKEN={}", 'client_secret: "{}"', '"apiKey": "{}"', "password = '{}'"]),
        rand(r, ALNUM, 32),
    ),
}


def fake(rule_id: str, rng: random.Random) -> tuple[str, str]:
    return FAKES[rule_id](rng)
