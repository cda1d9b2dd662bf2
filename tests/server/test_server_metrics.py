"""/health and /metrics (Prometheus text) over real HTTP."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness.backends.instant import InstantBackend
from harness.serving.server import EmbeddedServer


def _samples(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_tokens_and_latencies():
    with EmbeddedServer(InstantBackend()) as server:
        for n in (3, 5):
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "a b", "max_tokens": n}, timeout=10)
            assert r.status_code == 200
        httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 0}, timeout=10)
        m = _samples(server.url)
    assert m[("harness:generation_tokens_total", ())] == 8
    assert m[("harness:prompt_tokens_total", ())] == 4
    assert m[("harness:time_to_first_token_seconds_count", ())] == 2
    assert m[("harness:time_per_output_token_seconds_count", ())] == 2
    assert m[("harness:request_success_total", (("finished_reason", "length"),))] == 2
    assert m[("harness:request_failure_total", (("status", "400"),))] == 1
    assert m[("harness:num_requests_running", ())] == 0
    assert m[("harness:kv_cache_usage_perc", (("node", "local"),))] == 0


def test_health_is_ok_when_loaded():
    with EmbeddedServer(InstantBackend()) as server:
        r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_server_stops_and_frees_its_port():
    server = EmbeddedServer(InstantBackend())
    url = server.start()
    server.stop()
    try:
        httpx.get(url + "/health", timeout=2)
        refused = False
    except httpx.ConnectError:
        refused = True
    assert refused
