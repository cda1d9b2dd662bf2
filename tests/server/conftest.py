"""Fixtures: real servers on 127.0.0.1 (uvicorn in a background thread), never an in-process test client."""
from __future__ import annotations

import pytest

from harness.backends.instant import InstantBackend
from harness.serving.server import EmbeddedServer, ServerLimits


@pytest.fixture(scope="module")
def instant_server():
    backend = InstantBackend()
    with EmbeddedServer(backend, limits=ServerLimits(max_tokens=4096, max_body_bytes=64 * 1024)) as server:
        yield server


@pytest.fixture
def paced_server():
    """Tokens every 20 ms, at most one request running: streams that stay open long enough to act on."""
    backend = InstantBackend(max_running=1, token_interval_s=0.02)
    with EmbeddedServer(backend) as server:
        yield server
