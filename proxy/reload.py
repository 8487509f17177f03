"""Hot reload: validate the whole new config, swap it atomically, keep the last good one.

The directory is watched, not the file: editors save by writing a temp file and renaming
it, and a watch on the old inode goes blind after the first save.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from watchfiles import awatch

from proxy.config import Config, ConfigError, load_config
from proxy.events import EventBus

log = logging.getLogger("sluice.reload")


class ConfigHolder:
    """The current config. A request reads ``current`` once and keeps that object."""

    def __init__(self, config: Config) -> None:
        self.current = config
        self.last_error: str | None = None
        self.reloads = 0

    def reload(self, bus: EventBus | None = None) -> bool:
        """Try the file on disk; on any error keep what runs and say why."""
        try:
            fresh = load_config(self.current.path, state_dir=self.current.state_override)
        except ConfigError as exc:
            self.last_error = str(exc)
            log.warning("config reload rejected, keeping the running config:\n%s", exc)
            if bus is not None:
                bus.publish(
                    "config.reload_failed",
                    path=str(self.current.path),
                    error=str(exc),
                    running=self.current.digest,
                )
            return False
        if fresh.digest == self.current.digest:
            return True
        changed = _restart_only_changes(self.current, fresh)
        self.current = fresh
        self.last_error = None
        self.reloads += 1
        log.info("config reloaded (%s)", fresh.digest)
        if bus is not None:
            bus.publish(
                "config.reloaded",
                path=str(fresh.path),
                digest=fresh.digest,
                rules=len(fresh.policy.rules),
                needs_restart=changed,
            )
        return True


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """Settings a running process cannot change: reported, applied at the next start."""
    changed = []
    for key in ("listen", "admin_listen", "state_dir"):
        if getattr(old.proxy, key) != getattr(new.proxy, key):
            changed.append(f"proxy.{key}")
    old_listens = {name: t.listen for name, t in old.targets.items()}
    new_listens = {name: t.listen for name, t in new.targets.items()}
    if old_listens != new_listens:
        changed.append("targets.listen")
    return changed


async def watch_config(
    holder: ConfigHolder,
    bus: EventBus,
    stop: asyncio.Event,
    *,
    on_reload: Callable[[ConfigHolder], None] | None = None,
    debounce_ms: int = 150,
) -> None:
    """Reload whenever the config file (by name) changes in its directory."""
    path = holder.current.path
    learned = holder.current.learned_rules_path
    watched = {str(path), str(learned)}

    def relevant(_change: object, changed_path: str) -> bool:
        return changed_path in watched

    folders = {str(path.parent)}
    if learned.parent.is_dir():
        folders.add(str(learned.parent))
    async for _changes in awatch(
        *sorted(folders),
        watch_filter=relevant,
        stop_event=stop,
        debounce=debounce_ms,
        recursive=False,
        rust_timeout=500,
    ):
        if holder.reload(bus) and on_reload is not None:
            on_reload(holder)
