"""Built-in rules for tokens that carry a public prefix (``ghp_``, ``xoxb-``, ``sk_live_``...).

Each entry is two lines: ``id | prefixes | body class | repeat | max length | visible prefix |
validator | description``, then the issuer's page that documents the format. The token is the
prefix plus a run of body characters that must end at a non-body character.
"""

from __future__ import annotations

from proxy.masking.rules import (
    Rule,
    Validator,
    crc32_base62_ok,
    entropy_floor,
    token_rule,
)

BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def github_checksum(token: bytes) -> bool:
    """``ghp_``/``npm_`` + 30 random base62 + 6-char base62 CRC32 of those 30 characters."""
    return crc32_base62_ok(token[4:])


def bech32_ok(value: bytes) -> bool:
    """BIP 173 checksum over ``age-secret-key-1...`` (age keys are upper-cased bech32)."""
    text = value.decode("ascii").lower()
    hrp, _, data = text.rpartition("1")
    values = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    values += [BECH32.index(c) for c in data]
    check = 1
    for item in values:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ item
        for bit, gen in enumerate((0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)):
            check ^= gen if top >> bit & 1 else 0
    return check == 1


_VALIDATORS: dict[str, Validator | None] = {
    "-": None,
    "crc32": github_checksum,
    "bech32": bech32_ok,
    "entropy3.5": entropy_floor(3.5),
}

_GH = "https://github.blog/engineering/platform-security/behind-githubs-new-authentication-token-formats/"
_GL = "https://docs.gitlab.com/security/tokens/#token-prefixes"
_SLACK = "https://api.slack.com/authentication/token-types"
_STRIPE = "https://docs.stripe.com/keys"
#: base64 of the macaroon location: "pypi.org" and "test.pypi.org".
_PYPI = "pypi-AgEIcHlwaS5vcmc pypi-AgENdGVzdC5weXBpLm9yZw"

_TABLE = f"""
github-pat | ghp_ | A-Za-z0-9 | {{36}} | 40 | 4 | crc32 | GitHub classic PAT
{_GH}
github-oauth-token | gho_ | A-Za-z0-9 | {{36}} | 40 | 4 | crc32 | GitHub OAuth access token
{_GH}
github-user-to-server-token | ghu_ | A-Za-z0-9 | {{36}} | 40 | 4 | crc32 | GitHub App user token
{_GH}
github-server-to-server-token | ghs_ | A-Za-z0-9 | {{36}} | 40 | 4 | crc32 | GitHub App installation
{_GH}
github-refresh-token | ghr_ | A-Za-z0-9 | {{36}} | 40 | 4 | crc32 | GitHub refresh token
{_GH}
github-fine-grained-pat | github_pat_ | A-Za-z0-9_ | {{40,}} | 255 | 11 | - | GitHub fine-grained
https://docs.github.com/en/authentication/keeping-your-account-and-data-secure/managing-your-personal-access-tokens
gitlab-pat | glpat- | A-Za-z0-9_.- | {{20,}} | 300 | 6 | - | GitLab access token
{_GL}
gitlab-deploy-token | gldt- | A-Za-z0-9_.- | {{20,}} | 300 | 5 | - | GitLab deploy token
{_GL}
gitlab-runner-token | glrt- | A-Za-z0-9_.- | {{20,}} | 300 | 5 | - | GitLab runner token
{_GL}
gitlab-pipeline-trigger-token | glptt- | A-Za-z0-9_.- | {{20,}} | 300 | 6 | - | GitLab trigger token
{_GL}
gitlab-oauth-app-secret | gloas- | A-Za-z0-9_.- | {{20,}} | 300 | 6 | - | GitLab OAuth secret
{_GL}
gitlab-ci-job-token | glcbt- | A-Za-z0-9_.- | {{20,}} | 300 | 6 | - | GitLab CI/CD job token
{_GL}
npm-token | npm_ | A-Za-z0-9 | {{36}} | 40 | 4 | crc32 | npm access token
https://github.blog/changelog/2021-09-23-npm-has-a-new-access-token-format/
pypi-token | {_PYPI} | A-Za-z0-9_- | {{50,}} | 1024 | 5 | - | PyPI API token
https://pypi.org/help/#apitoken
slack-bot-token | xoxb- | A-Za-z0-9- | {{20,}} | 255 | 5 | - | Slack bot token
{_SLACK}
slack-user-token | xoxp- | A-Za-z0-9- | {{20,}} | 255 | 5 | - | Slack user token
{_SLACK}
slack-app-token | xapp- | A-Za-z0-9- | {{20,}} | 255 | 5 | - | Slack app-level token
{_SLACK}
slack-legacy-token | xoxa- xoxr- xoxs- | A-Za-z0-9- | {{20,}} | 255 | 5 | - | Slack legacy token
{_SLACK}
slack-config-token | xoxe.xoxp- xoxe.xoxb- xoxe- | A-Za-z0-9- | {{20,}} | 300 | 5 | - | Slack config
https://api.slack.com/authentication/config-tokens
stripe-secret-key | sk_live_ sk_test_ | A-Za-z0-9 | {{20,}} | 255 | 8 | - | Stripe secret key
{_STRIPE}
stripe-restricted-key | rk_live_ rk_test_ | A-Za-z0-9 | {{20,}} | 255 | 8 | - | Stripe restricted
{_STRIPE}
stripe-webhook-secret | whsec_ | A-Za-z0-9 | {{24,}} | 255 | 6 | - | Stripe webhook secret
https://docs.stripe.com/webhooks#verify-events
anthropic-api-key | sk-ant- | A-Za-z0-9_- | {{32,}} | 300 | 7 | - | Anthropic key
https://docs.anthropic.com/en/api/overview
google-api-key | AIza | A-Za-z0-9_- | {{35}} | 39 | 4 | - | Google API key (AIza + 35)
https://cloud.google.com/docs/authentication/api-keys
huggingface-token | hf_ | A-Za-z0-9 | {{30,}} | 80 | 3 | entropy3.5 | Hugging Face token
https://huggingface.co/docs/hub/security-tokens
age-secret-key | AGE-SECRET-KEY-1 | {BECH32.upper()} | {{58}} | 74 | 16 | bech32 | age identity
https://age-encryption.org/v1
vault-token | hvs. hvb. hvr. | A-Za-z0-9_- | {{24,}} | 512 | 4 | - | Vault token
https://developer.hashicorp.com/vault/docs/concepts/tokens#token-prefixes
digitalocean-token | dop_v1_ doo_v1_ dor_v1_ | a-f0-9 | {{64}} | 71 | 7 | - | DigitalOcean token
https://docs.digitalocean.com/reference/api/create-personal-access-token/
databricks-token | dapi | a-f0-9 | {{32}} | 36 | 4 | - | Databricks token
https://docs.databricks.com/en/dev-tools/auth/pat.html
sentry-token | sntrys_ sntryu_ | A-Za-z0-9_+/= | {{40,}} | 512 | 7 | - | Sentry auth token
https://docs.sentry.io/account/auth-tokens/
docker-hub-token | dckr_pat_ dckr_oat_ | A-Za-z0-9_- | {{20,}} | 128 | 9 | - | Docker Hub token
https://docs.docker.com/security/for-developers/access-tokens/
"""


def token_rules() -> list[Rule]:
    lines = [line for line in _TABLE.strip().splitlines() if line.strip()]
    rules = []
    for spec, source in zip(lines[::2], lines[1::2], strict=True):
        rule_id, prefixes, body, count, max_len, keep, check, what = (
            field.strip() for field in spec.split("|")
        )
        rules.append(
            token_rule(
                rule_id,
                what,
                source.strip(),
                prefixes.split(),
                body,
                count=count,
                keep=int(keep),
                max_len=int(max_len),
                validator=_VALIDATORS[check],
            )
        )
    return rules
