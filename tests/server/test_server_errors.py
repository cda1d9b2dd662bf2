"""Error paths over real HTTP: 400 names the bad field, 401, 404, 413, 429 with Retry-After, 503, and the
server keeps serving after each of them."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from harness.backends.instant import InstantBackend
from harness.serving.server import EmbeddedServer


def _post(server, body, path="/v1/completions", timeout=10):
    return httpx.post(server.url + path, json=body, timeout=timeout)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 999999}, "max_tokens"),
    ({"prompt": "a", "temperature": 9}, "temperature"),
    ({"prompt": "a", "max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    ({"prompt": "a", "n": 2}, "n"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "a", "stream_options": {"include_usage": "perhaps"}}, "stream_options.include_usage"),
])
def test_bad_completion_field_is_named_and_server_keeps_serving(instant_server, body, param):
    r = _post(instant_server, body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert _post(instant_server, {"prompt": "still alive", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "max_completion_tokens"),
])
def test_bad_chat_field_is_named(instant_server, body, param):
    r = _post(instant_server, body, "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_invalid_json_is_400_then_server_keeps_serving(instant_server):
    r = httpx.post(instant_server.url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "error" in r.json()
    assert _post(instant_server, {"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_unknown_model_is_404(instant_server):
    r = _post(instant_server, {"model": "gpt-9", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_oversized_body_is_413(instant_server):
    r = _post(instant_server, {"prompt": "word " * 20000, "max_tokens": 1})   # ~100 kB > 64 kB bound
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_api_key_required_when_configured():
    with EmbeddedServer(InstantBackend(), api_key="s3cret") as server:
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="instant", prompt="a", max_tokens=1)
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="instant", prompt="a", max_tokens=1).usage.completion_tokens == 1
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200   # probes need no key


def test_full_queue_is_429_with_retry_after(paced_server):
    url = paced_server.url + "/v1/completions"
    opened = threading.Event()

    def hold():   # one long stream occupies the only slot
        body = {"prompt": "a", "max_tokens": 40, "stream": True}
        with httpx.stream("POST", url, json=body, timeout=10) as r:
            for _ in r.iter_bytes():
                opened.set()
    holder = threading.Thread(target=hold)
    holder.start()
    assert opened.wait(10)
    r = httpx.post(url, json={"prompt": "b", "max_tokens": 1}, timeout=10)
    holder.join(10)
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert httpx.post(url, json={"prompt": "c", "max_tokens": 1}, timeout=10).status_code == 200


def test_openai_sdk_sees_429_as_rate_limit(paced_server):
    client = openai.OpenAI(base_url=paced_server.url + "/v1", api_key="x", max_retries=0)
    stream = client.completions.create(model="instant", prompt="a", max_tokens=30, stream=True)
    next(iter(stream))
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="instant", prompt="b", max_tokens=1)
    stream.close()


def test_backend_unavailable_is_503():
    # load_backend=False: the server runs but its backend never loaded, as after a failed rank start
    with EmbeddedServer(InstantBackend(), load_backend=False) as server:
        r = _post(server, {"prompt": "a", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200


def test_client_disconnect_cancels_the_request(paced_server):
    backend = paced_server.backend
    body = {"prompt": "a", "max_tokens": 500, "stream": True}   # 10 s of tokens if nobody stopped it
    with httpx.stream("POST", paced_server.url + "/v1/completions", json=body, timeout=10) as r:
        it = r.iter_bytes()
        next(it)
    deadline = time.monotonic() + 5
    while backend.stats()["num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = backend.stats()
    assert stats["num_requests_running"] == 0
    assert stats["requests_cancelled"] == 1
    assert _post(paced_server, {"prompt": "b", "max_tokens": 1}).status_code == 200


def test_non_streaming_disconnect_cancels_the_request(paced_server):
    backend = paced_server.backend
    with pytest.raises(httpx.ReadTimeout):
        _post(paced_server, {"prompt": "a", "max_tokens": 500}, timeout=0.3)
    deadline = time.monotonic() + 5
    while backend.stats()["num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.stats()["requests_cancelled"] == 1


def test_disconnect_before_the_first_token_cancels_the_request():
    backend = InstantBackend(token_interval_s=0.5)   # first token after half a second
    with EmbeddedServer(backend) as server:
        with pytest.raises(httpx.ReadTimeout):
            _post(server, {"prompt": "a", "max_tokens": 50, "stream": True}, timeout=0.1)
        deadline = time.monotonic() + 5
        while backend.stats()["requests_cancelled"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.stats()["requests_cancelled"] == 1
        assert backend.stats()["num_requests_running"] == 0
