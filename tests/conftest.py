"""Shared fixtures: free loopback ports and real aiohttp upstreams."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def port_factory() -> Callable[[], int]:
    return free_port
