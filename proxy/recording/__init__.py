"""Tamper-evident session recordings: a hash-chained, Ed25519-sealed JSON Lines log.

Writing: ``Recorder`` (``writer``). Reading: ``Recording`` (``reader``). Checking:
``verify`` (``verify``). Commands: ``run_verify``, ``run_sessions``, ``run_export_har``
(``cli``). The format is described in ``format``. Plain Python: no aiohttp, no UI.
"""

from proxy.recording.errors import RecorderUnavailable, RecordingCorrupt
from proxy.recording.reader import Flow, Recording, SessionSummary
from proxy.recording.verify import FileResult, verify
from proxy.recording.writer import Recorder

__all__ = [
    "FileResult",
    "Flow",
    "Recorder",
    "RecorderUnavailable",
    "Recording",
    "RecordingCorrupt",
    "SessionSummary",
    "verify",
]
