"""The sim backend behind the server: a client that leaves takes its load with it, and --max-waiting counts only
requests the batch cannot take (both with real HTTP clients on 127.0.0.1)."""
from __future__ import annotations

import asyncio
import time

import httpx

from harness.backends.sim import SimBackend, SimBackendConfig
from harness.serving.server import EmbeddedServer

BODY = {"prompt": [1, 2, 3, 4], "max_tokens": 4000, "ignore_eos": True, "stream": True}


def test_a_disconnected_stream_stops_generating(setup):
    backend = SimBackend(*setup, config=SimBackendConfig(speed=50.0))
    with EmbeddedServer(backend) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json=BODY) as resp:
                for i, _ in enumerate(resp.iter_lines()):
                    if i > 5:
                        break                       # the client goes away mid-stream
            deadline = time.monotonic() + 10
            while backend.stats()["num_requests_running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = backend.stats()
            generated = int(backend.engine.generated[0])
            time.sleep(0.5)                            # 0.5 s at speed 50: hundreds of decode steps
            assert int(backend.engine.generated[0]) == generated, "tokens still generated for a client that left"
    assert stats["requests_cancelled"] == 1
    assert stats["num_requests_running"] == 0, "the engine still decodes for a client that left"
    assert generated < 4000


def test_max_waiting_counts_only_requests_the_batch_cannot_take(setup):
    backend = SimBackend(*setup, config=SimBackendConfig(speed=50.0, max_waiting=1))
    short = {"prompt": [1, 2, 3], "max_tokens": 2, "ignore_eos": True}

    async def flood(url, n):
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n)) as c:
            return [r.status_code for r in await asyncio.gather(*[c.post("/v1/completions", json=short)
                                                                  for _ in range(n)])]
    with EmbeddedServer(backend) as server:
        codes = asyncio.run(flood(server.url, 80))
    assert codes.count(429) == 0 and codes.count(200) == 80    # 80 fit in a batch of 128 places
