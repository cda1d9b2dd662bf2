"""The streaming fast path (issue 15): ready tokens coalesced into one write per event-loop tick, bounded per
write, the same SSE as before for every client, and the guards (size, key, disconnect) unchanged on it.

A write is seen as one chunk of the chunked HTTP body, read off a raw socket."""
from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest

from harness.backends import instant
from harness.backends.base import GenerationRequest
from harness.backends.instant import InstantBackend
from harness.serving.server import EmbeddedServer, ServerLimits


def _raw_post(url: str, path: str, body: dict, headers: dict | None = None) -> tuple[int, list[bytes]]:
    """POST over a bare socket: the status and the body's HTTP chunks, one per server write."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = {"Host": "test", "Content-Type": "application/json", "Content-Length": str(len(payload)),
            "Connection": "close", **(headers or {})}
    request = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request.encode() + payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ")[1])
    if b"transfer-encoding: chunked" not in head_bytes.lower():
        return status, [rest]
    return status, _dechunk(rest)


def _dechunk(rest: bytes) -> list[bytes]:
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        rest = rest[size + 2:]


def _events(chunks: list[bytes]) -> list[str]:
    """The SSE events' data, checked to be `data: ...` events each ended by a blank line."""
    body = b"".join(chunks).decode()
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [e.removeprefix("data: ") for e in events]


def _token_events(chunk: bytes) -> int:
    return chunk.count(b'"finish_reason":')   # the usage chunk has none


CHAT = {"model": "instant", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def test_ready_tokens_go_out_in_one_write_as_valid_openai_sse(instant_server):
    body = {**CHAT, "max_tokens": 8, "seed": 3, "stream_options": {"include_usage": True}}
    status, chunks = _raw_post(instant_server.url, "/v1/chat/completions", body)
    assert status == 200
    assert len(chunks) == 1 and _token_events(chunks[0]) == 8   # before the fast path: one write per token
    *data, done = _events(chunks)
    assert done == "[DONE]"
    parsed = [json.loads(d) for d in data]
    tokens, usage = parsed[:-1], parsed[-1]
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None] * 7 + ["length"]
    assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(t["object"] == "chat.completion.chunk" and t["id"] == tokens[0]["id"] for t in tokens)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    text = "".join(t["choices"][0]["delta"]["content"] for t in tokens)
    plain = httpx.post(instant_server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=10)
    assert text == plain.json()["choices"][0]["message"]["content"]


def test_a_long_stream_is_written_in_bounded_batches(instant_server):
    status, chunks = _raw_post(instant_server.url, "/v1/completions",
                               {"prompt": "a", "max_tokens": 200, "stream": True})
    assert status == 200
    counts = [_token_events(c) for c in chunks]
    assert sum(counts) == 200 and max(counts) <= 64 and len(chunks) >= 4


@pytest.mark.parametrize("chat", [True, False])
def test_concurrent_streaming_clients_see_the_non_streaming_text(instant_server, chat):
    client = openai.OpenAI(base_url=instant_server.url + "/v1", api_key="x", max_retries=0, timeout=30)

    def streamed_and_plain(seed: int) -> tuple[str, str]:
        args = {"model": "instant", "max_tokens": 40 + seed, "seed": seed, "stop": [" work"]}
        if chat:
            args["messages"] = [{"role": "user", "content": "hi"}]
            parts = client.chat.completions.create(stream=True, **args)
            streamed = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
            return streamed, client.chat.completions.create(**args).choices[0].message.content
        parts = client.completions.create(prompt="hi", stream=True, **args)
        return "".join(p.choices[0].text for p in parts), client.completions.create(prompt="hi", **args).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(streamed_and_plain, range(16)))
    assert all(streamed == plain for streamed, plain in results)
    assert len({plain for _, plain in results}) > 1   # the seeds gave different texts, each matched


class _PlainStreams(InstantBackend):
    """The instant backend behind plain async generators: no `ready`, as a backend that offers only `__anext__`."""

    def generate(self, request):
        stream = super().generate(request)

        async def plain():
            try:
                async for event in stream:
                    yield event
            finally:
                await stream.aclose()
        return plain()


def test_a_backend_without_ready_streams_one_write_per_token():
    with EmbeddedServer(_PlainStreams()) as plain, EmbeddedServer(InstantBackend()) as coalesced:
        body = {"prompt": "a", "max_tokens": 6, "seed": 1, "stream": True}
        status, chunks = _raw_post(plain.url, "/v1/completions", body)
        _, together = _raw_post(coalesced.url, "/v1/completions", body)
    assert status == 200 and [_token_events(c) for c in chunks] == [1] * 6
    texts = [[json.loads(e)["choices"][0]["text"] for e in _events(c)[:-1]] for c in (chunks, together)]
    assert texts[0] == texts[1]


class _FailsAfterTwo(InstantBackend):
    def generate(self, request):
        stream = super().generate(request)

        async def failing():
            yield await anext(stream)
            yield await anext(stream)
            raise RuntimeError("rank 1 lost")
        return failing()


def test_a_backend_failure_mid_stream_is_reported_in_band_then_done():
    with EmbeddedServer(_FailsAfterTwo()) as server:
        status, chunks = _raw_post(server.url, "/v1/completions", {"prompt": "a", "max_tokens": 9, "stream": True})
    *data, done = _events(chunks)
    assert status == 200 and done == "[DONE]" and len(data) == 3
    assert "rank 1 lost" in json.loads(data[2])["error"]["message"]


def test_a_body_fastapi_parses_itself_streams_the_same_events(instant_server):
    # a +json content type is JSON to FastAPI but not to the fast path, which leaves it to FastAPI's route
    body = {"prompt": "a", "max_tokens": 5, "seed": 2, "stream": True, "stop": [" was"]}
    answers = [_raw_post(instant_server.url, "/v1/completions", body, {"Content-Type": ctype})
               for ctype in ("application/json", "application/vnd.test+json")]
    events = []
    for status, chunks in answers:
        assert status == 200
        events.append([{k: v for k, v in json.loads(e).items() if k not in ("id", "created")}
                       for e in _events(chunks)[:-1]])
    assert events[0] == events[1] and events[0]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_oversized_streaming_body_is_413(instant_server, path):
    body = {**CHAT, "prompt": "word " * 20000, "max_tokens": 1}   # ~100 kB > 64 kB bound
    status, chunks = _raw_post(instant_server.url, path, body)
    assert status == 413 and json.loads(chunks[0])["error"]["code"] == "body_too_large"


def test_the_api_key_guards_the_streaming_routes():
    with EmbeddedServer(InstantBackend(), api_key="s3cret") as server:
        status, chunks = _raw_post(server.url, "/v1/chat/completions", {**CHAT, "max_tokens": 2})
        assert status == 401 and json.loads(chunks[0])["error"]["code"] == "invalid_api_key"
        status, _ = _raw_post(server.url, "/v1/chat/completions", {**CHAT, "max_tokens": 2},
                              {"Authorization": "Bearer s3cret"})
        assert status == 200


def test_a_chat_stream_left_between_tokens_cancels_the_request(paced_server):
    backend = paced_server.backend
    with httpx.stream("POST", paced_server.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 500},
                      timeout=10) as r:
        next(r.iter_bytes())
    deadline = time.monotonic() + 5   # a hang bound, not a timing assert
    while backend.stats()["num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.stats()["num_requests_running"] == 0 and backend.stats()["requests_cancelled"] == 1
    metrics = httpx.get(paced_server.url + "/metrics", timeout=10).text
    assert 'harness:request_success_total{finished_reason="abort"} 1.0' in metrics


def test_a_paced_stream_hands_over_every_due_token_at_once(monkeypatch):
    now = [100.0]
    # the instant module's clock only: patching time.monotonic itself would stop every event loop in the
    # process (the module's servers run in background threads) while the test runs
    monkeypatch.setattr(instant, "time", SimpleNamespace(monotonic=lambda: now[0]))
    backend = InstantBackend(token_interval_s=0.01)
    asyncio.run(backend.load())
    stream = backend.generate(GenerationRequest("r", (1, 2), max_tokens=8))
    assert stream.ready(64) == []            # token 0 is due one interval after the start
    now[0] += 0.055
    assert len(stream.ready(64)) == 5        # tokens 0-4 are due: a consumer that fell behind gets them all
    now[0] += 1.0
    assert len(stream.ready(2)) == 2         # never more than asked for
    rest = stream.ready(64)
    assert len(rest) == 1 and rest[-1].finish_reason == "length" and stream.ready(64) == []
    assert backend.stats()["num_requests_running"] == 0 and backend.stats()["requests_cancelled"] == 0


def test_limits_in_force_on_the_fast_path():
    limits = ServerLimits(max_tokens=16)
    with EmbeddedServer(InstantBackend(), limits=limits) as server:
        status, chunks = _raw_post(server.url, "/v1/completions", {"prompt": "a", "max_tokens": 17, "stream": True})
    assert status == 400 and json.loads(chunks[0])["error"]["param"] == "max_tokens"
