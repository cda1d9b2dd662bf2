"""Fixtures: real servers on 127.0.0.1 (uvicorn in a background thread), never an in-process test client."""
from __future__ import annotations

import time

import httpx
import pytest

from harness.backends.instant import InstantBackend
from harness.serving.server import EmbeddedServer, ServerLimits


@pytest.fixture(scope="module")
def setup():
    """(cluster, model, plan, profile) the sim-backend server tests serve: Llama 3.1 8B on seed-64gb, uniform."""
    import argparse
    from harness.costmodel import load_profile
    from harness.planning import add_plan_arguments, make_plan
    p = argparse.ArgumentParser()
    add_plan_arguments(p)
    cluster, model, plan = make_plan(p.parse_args(["--cluster", "seed-64gb", "--model", "llama-3.1-8b",
                                                   "--strategy", "uniform"]))
    return cluster, model, plan, load_profile(None)


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


def free_port() -> int:
    from harness.mlx.launcher import free_ports
    return free_ports(1)[0]


def wait_healthy(url: str, bound_s: float = 20.0) -> None:
    """Until GET /health answers 200 (a hang bound, not a timing assert); RuntimeError past the bound."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {bound_s:.0f} s")


class PlainStream:
    """A backend's stream with its optional `ready` hidden (base.ReadyEvents): what the server does with a
    backend that offers only `__anext__`, one write per token, for the same tokens."""

    def __init__(self, stream):
        self.stream = stream

    def __aiter__(self):
        return self

    def __anext__(self):
        return self.stream.__anext__()

    async def aclose(self) -> None:
        await self.stream.aclose()


class ReadyToggle:
    """Mixed into a backend: remembers the server's loop; `plain = True` hides its streams' `ready`."""

    plain = False

    def generate(self, request):
        import asyncio
        self.loop = asyncio.get_running_loop()
        stream = super().generate(request)
        return PlainStream(stream) if self.plain else stream
