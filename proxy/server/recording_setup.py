"""The proxy's recorder, wired: opened before the first listener, supervised, tapped.

A proxy that cannot record answers 503 to everything rather than forwarding unrecorded;
the supervisor brings the recorder back when the disk does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.config import Config
from proxy.events import EventBus
from proxy.masking.engine import Masker
from proxy.recording import Recorder
from proxy.recording.keys import SIGNING_KEY_FILE
from proxy.recording.supervisor import RecorderSupervisor
from proxy.server.flow_detail import FlowDetails
from proxy.server.recording_tap import RecordingTap

#: Events that become records of their own (requests are recorded by the forwarder).
RECORDED_EVENTS = (
    "approval.requested",
    "approval.decided",
    "approval.expired",
    "approval.withdrawn",
    "config.reloaded",
    "config.reload_failed",
)


@dataclass
class Recording:
    recorder: Recorder
    supervisor: RecorderSupervisor
    tap: RecordingTap


async def open_recording(config: Config, state_dir: Path, bus: EventBus) -> Recording | None:
    """None when recording is off. Failing to open leaves the recorder failed (every
    request gets 503) and retried in the background, as is one that fails later."""
    settings = config.recording
    if not settings.enabled:
        return None
    recorder = Recorder(
        state_dir / settings.directory,
        state_dir / SIGNING_KEY_FILE,
        rotate_bytes=settings.rotate_size,
        rotate_seconds=settings.rotate_age,
        retention_seconds=settings.retention,
        checkpoint_every=settings.checkpoint_every,
        checkpoint_seconds=settings.checkpoint_interval,
        max_inline_body=settings.max_inline_body,
        oversize=settings.oversize,
        redact_headers=settings.redact_headers,
    )
    recorder.on_state_change(
        lambda state, reason: bus.publish("recorder.state", state=state, reason=reason)
    )
    supervisor = RecorderSupervisor(recorder, first_delay=settings.retry_interval)
    await supervisor.start()
    tap = RecordingTap(recorder, bus, settings.capture_limit)
    bus.add_listener(lambda event: tap.note(event.type, **event.data), RECORDED_EVENTS)
    return Recording(recorder, supervisor, tap)


def flow_details(
    config: Config, state_dir: Path, tap: RecordingTap | None, masker: Callable[[], Masker | None]
) -> FlowDetails | None:
    """Bodies for consoles come from the recording; without one there are none."""
    if tap is None:
        return None
    return FlowDetails(state_dir / config.recording.directory, tap.flush, masker)
