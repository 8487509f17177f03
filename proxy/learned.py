"""The learned-rules file: what approvers decided "always", as ordinary rules.

Written with tomli-w into the state dir, never into the user's own config (whose comments
and layout stay untouched); the config loader puts these rules first, and the hot reload
picks a new one up like any other edit.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from wcmatch import fnmatch, glob

from proxy.approvals import Held
from proxy.policy import LEARNED_PREFIX

HEADER = (
    '# Rules learned from approvals (scope "always"), written by Sluice.\n'
    "# Evaluated before the rules in your config. Delete a rule here to forget it.\n\n"
)


def rule_for(held: Held, verdict: str, approver: str) -> dict[str, Any]:
    """A rule matching exactly this kind of request: method, target, path and query."""
    said = f": {held.decision_reason}" if held.decision_reason else ""
    rule: dict[str, Any] = {
        "name": f"{LEARNED_PREFIX}{held.id}",
        "action": verdict,
        "reason": f"{'approved' if verdict == 'allow' else 'denied'} always by {approver}{said}",
        "target": held.target,
        "method": held.method,
        "path": glob.escape(held.path),
    }
    # No query means exactly none: approving /deploy must not approve /deploy?force=true.
    rule["query"] = fnmatch.escape(held.query) if held.query else ""
    if held.port is not None and held.host is not None:
        # A forward request: bound to its destination, not to every host of its target.
        rule["host"] = fnmatch.escape(held.host)
        rule["port"] = held.port
        if held.method == "CONNECT":  # a tunnel has no path; it was shown as host:port
            del rule["path"], rule["query"]
    return rule


def append_rule(path: Path, rule: dict[str, Any]) -> None:
    """Append atomically (temp file, fsync, rename): a crash leaves the old or the new file."""
    data: dict[str, Any] = {"rules": []}
    if path.exists():
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        data.setdefault("rules", [])
    data["rules"].append(rule)
    text = HEADER + tomli_w.dumps(data)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".learned-", suffix=".toml", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
