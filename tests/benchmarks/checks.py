"""Sanity checks before measuring: every case serves the body, Sluice decides as designed,
and in ``sluice+id`` the upstream sees Sluice's minted credential, never the agent's token."""

from __future__ import annotations

import json
import re
from pathlib import Path

from harness import BODY_1K, ECHO_PATH, TARGET, Child, http_get
from servers import CREDENTIAL_ISSUER, ID_SUBJECT


def _as_dict(lines: list[str]) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in lines)  # type: ignore[misc]


def sanity_checks(
    urls: dict[str, str],
    headers: dict[str, list[str]],
    sluices: dict[str, tuple[Child, Path]],
    agent_token: str,
    jwt_key: Path,
) -> list[str]:
    """Raise RuntimeError when a case is not what the benchmark claims to measure."""
    notes = []
    for case, url in urls.items():
        status, _headers, body = http_get(url, _as_dict(headers[case]))
        if status != 200 or body != BODY_1K:
            raise RuntimeError(f"{case}: GET {url} gave {status} and {len(body)} bytes")
    for case, (child, _state) in sluices.items():
        status, _headers, body = http_get(
            f"{child.url}/{TARGET}/config/.env", _as_dict(headers[case])
        )
        if status != 403 or json.loads(body).get("rule") != "credential-files":
            raise RuntimeError(f"{case} did not deny /.env as expected: {status} {body[:200]!r}")
    for case, (child, state_dir) in sluices.items():
        notes.append(_confirm_rule(case, child, state_dir, urls[case], headers[case]))
    child = sluices["sluice+id"][0]
    notes += _identity_checks(child, urls["sluice+id"], agent_token, jwt_key)
    return notes


def _confirm_rule(case: str, child: Child, state_dir: Path, url: str, headers: list[str]) -> str:
    """Through the admin API's flow table: the benchmark request was allowed by rule 20."""
    _status, reply_headers, _body = http_get(url, _as_dict(headers))
    request_id = reply_headers.get("X-Sluice-Request-Id")
    try:
        token = (state_dir / "admin.token").read_text().strip()
        admin = re.search(r"admin API on (http://\S+)", child.log.read_text()).group(1)  # type: ignore[union-attr]
        _s, _h, flows_body = http_get(
            f"{admin}/api/flows?limit=10", {"Authorization": f"Bearer {token}"}
        )
        flows = {f.get("request_id"): f for f in json.loads(flows_body)["flows"]}
        rule = flows.get(request_id, {}).get("rule")
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return f"{case}: could not confirm the matching rule through the admin API: {exc}"
    if rule != "repo-read":
        raise RuntimeError(f"{case}: benchmark request matched rule {rule!r}, not the last one")
    return f"{case} allowed the benchmark request by rule {rule!r} (rule 20 of 20)"


def _identity_checks(child: Child, url: str, agent_token: str, jwt_key: Path) -> list[str]:
    """No token: 401. With it: the upstream gets ``Authorization: Bearer <jwt>``, a token
    Sluice signed with the credential key for this target, and no trace of the agent's."""
    import jwt

    status, _headers, body = http_get(url)
    if status != 401:
        raise RuntimeError(f"sluice+id without a token answered {status}, not 401: {body[:200]!r}")
    agent = {"Authorization": f"Bearer {agent_token}"}
    echo = f"{child.url}/{TARGET}{ECHO_PATH}?ref=main"
    status, _headers, body = http_get(echo, agent)
    if status != 200:
        raise RuntimeError(f"sluice+id: GET {echo} gave {status}: {body[:200]!r}")
    received = json.loads(bytes.fromhex(json.loads(body)["headers_hex"]))
    auth = [value for name, value in received if name.lower() == "authorization"]
    if len(auth) != 1 or not auth[0].startswith("Bearer "):
        raise RuntimeError(f"sluice+id: upstream got Authorization {auth!r}, not one Bearer")
    minted = auth[0].removeprefix("Bearer ")
    if any(agent_token in value for _name, value in received):
        raise RuntimeError("sluice+id: the agent's token reached the upstream")
    public = jwt_key.with_suffix(".pub.pem").read_bytes()
    try:
        claims = jwt.decode(
            minted,
            public,
            algorithms=["ES256"],
            audience=TARGET,
            issuer=CREDENTIAL_ISSUER,
        )
    except jwt.PyJWTError as exc:
        raise RuntimeError(f"sluice+id: upstream token does not verify: {exc}") from None
    if claims.get("sub") != ID_SUBJECT:
        raise RuntimeError(f"sluice+id: upstream token is for {claims.get('sub')!r}")
    ttl = claims["exp"] - claims["iat"]
    return [
        "sluice+id without a token: 401",
        f"sluice+id: the upstream received Authorization: Bearer <jwt> (ES256, iss "
        f"{claims['iss']!r}, aud {claims['aud']!r}, sub {claims['sub']!r}, ttl {ttl} s), "
        "not the agent's token",
    ]
