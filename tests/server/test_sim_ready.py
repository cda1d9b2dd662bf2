"""The sim backend's stream hands over every token the engine has emitted at once (base.ReadyEvents, issue 15):
the server writes them in fewer writes than tokens, with the same text and token count as one token a write,
and a hang-up or a failure mid-stream is handled as before. Real servers on 127.0.0.1 and the backend's own
streams; a write is one chunk of the chunked HTTP body, read off a raw socket."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from harness.backends.base import BackendUnavailable, GenerationRequest
from harness.backends.sim import SimBackend, SimBackendConfig
from harness.serving.server import EmbeddedServer
from tests.server.conftest import ReadyToggle
from tests.server.test_server_fast_path import _dechunk, _events, _raw_post, _token_events

GUARD_S = 10   # hang bounds only, never timing asserts


class _Sim(ReadyToggle, SimBackend):
    """The sim backend, remembering the server's loop; `plain` hides its streams' `ready`."""


def _sim(setup, speed: float, plain: bool = False) -> _Sim:
    backend = _Sim(*setup, config=SimBackendConfig(speed=speed))
    backend.plain = plain
    return backend


def _until(check, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not check():
        assert time.monotonic() < deadline, f"{what} within {GUARD_S} s"
        time.sleep(0.01)


async def _until_async(check, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not check():
        assert time.monotonic() < deadline, f"{what} within {GUARD_S} s"
        await asyncio.sleep(0.01)


def _texts(chunks: list[bytes], chat: bool) -> list[str]:
    out = []
    for data in _events(chunks)[:-1]:
        choices = json.loads(data)["choices"]
        if choices:
            out.append(choices[0]["delta"]["content"] if chat else choices[0]["text"])
    return out


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_tokens_emitted_together_go_out_in_fewer_writes_with_the_same_text(setup, path):
    # at 10^4 virtual seconds a wall second a 22 ms decode step is 2 us: the pacer emits many tokens per
    # event-loop tick, so the server finds them ready together
    tokens = 48
    chat = path.endswith("chat/completions")
    body = {"max_tokens": tokens, "ignore_eos": True, "seed": 7, "stream": True,
            "stream_options": {"include_usage": True},
            **({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": [1, 2, 3, 4]})}
    answers = {}
    for plain in (False, True):
        with EmbeddedServer(_sim(setup, speed=1e4, plain=plain)) as server:
            status, chunks = _raw_post(server.url, path, body)
            assert status == 200
            answers[plain] = chunks
    ready, plain = answers[False], answers[True]
    assert [_token_events(c) for c in plain] == [1] * tokens      # without ready(): one write per token
    assert sum(map(_token_events, ready)) == tokens and len(ready) <= tokens // 4
    assert _texts(ready, chat) == _texts(plain, chat) and len(_texts(ready, chat)) == tokens
    usage = [json.loads(_events(c)[-2])["usage"] for c in (ready, plain)]
    assert usage[0] == usage[1] and usage[0]["completion_tokens"] == tokens


def test_ready_hands_over_the_emitted_tokens_in_order_then_ends(setup):
    async def scenario():
        backend = SimBackend(*setup, config=SimBackendConfig(speed=1e4))
        await backend.load()
        try:
            request = GenerationRequest("a", (1, 2, 3, 4), max_tokens=40, ignore_eos=True, seed=5)
            awaited = [ev async for ev in backend.generate(request)]
            stream = backend.generate(GenerationRequest("b", (1, 2, 3, 4), max_tokens=40, ignore_eos=True, seed=5))
            assert stream.ready(64) == []          # not started: the request enters on the first __anext__
            got = [await stream.__anext__()]
            await _until_async(lambda: backend.stats()["num_requests_running"] == 0, "the request finished")
            got += stream.ready(5)
            assert len(got) == 6                   # never more than asked for
            got += stream.ready(64)
            assert stream.ready(64) == []
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            assert [(e.token_id, e.text, e.finish_reason, e.prompt_tokens) for e in got] == \
                   [(e.token_id, e.text, e.finish_reason, e.prompt_tokens) for e in awaited]
            assert len(got) == 40 and got[-1].finish_reason == "length"
            assert backend.stats()["requests_cancelled"] == 0
        finally:
            await backend.close()
    asyncio.run(scenario())


def test_an_error_queued_behind_tokens_comes_after_them_as_when_awaited(setup):
    async def scenario():
        backend = SimBackend(*setup, config=SimBackendConfig(speed=50.0))
        await backend.load()
        try:
            streams = [backend.generate(GenerationRequest(r, (1, 2, 3, 4), max_tokens=4000, ignore_eos=True,
                                                          seed=5)) for r in "ab"]
            firsts = [await s.__anext__() for s in streams]
            # (the engine counts a steady decode's tokens when it ends: count those the backend emitted)
            await _until_async(lambda: min(p.emitted for p in backend._pending.values()) >= 8,
                               "8 tokens each")
        finally:
            await backend.close()             # BackendUnavailable is queued behind the tokens not taken
        coalesced, awaited = streams
        taken = [firsts[0], *coalesced.ready(4000)]
        assert len(taken) >= 8 and all(e.finish_reason is None for e in taken)
        assert coalesced.ready(64) == []       # the error is left to __anext__
        with pytest.raises(BackendUnavailable, match="sim backend closed") as error_ready:
            await coalesced.__anext__()
        one_by_one = [firsts[1]]
        with pytest.raises(BackendUnavailable) as error_awaited:
            while True:
                one_by_one.append(await awaited.__anext__())
        assert str(error_ready.value) == str(error_awaited.value)
        n = min(len(taken), len(one_by_one))   # b entered a step after a: it may have a token or two less
        assert len(one_by_one) >= 8 and [e.token_id for e in taken[:n]] == [e.token_id for e in one_by_one[:n]]
        for s in streams:
            assert s.ready(64) == []
            with pytest.raises(StopAsyncIteration):
                await s.__anext__()
    asyncio.run(scenario())


def _stream_then(url: str, body: dict, after_tokens: int, action) -> list[bytes]:
    """POSTs a streaming completion on a raw socket, runs `action` once `after_tokens` token events came, and
    returns the body's chunks (one per server write) read to the end."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=GUARD_S) as sock:
        sock.sendall(head + payload)
        data, acted = b"", False
        while chunk := sock.recv(65536):
            data += chunk
            if not acted and data.count(b'"finish_reason":null') >= after_tokens:
                action()
                acted = True
    return _dechunk(data.partition(b"\r\n\r\n")[2])


def test_a_failure_mid_stream_is_reported_in_band_as_without_ready(setup):
    body = {"prompt": [1, 2, 3, 4], "max_tokens": 4000, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    tails = {}
    for plain in (False, True):
        backend = _sim(setup, speed=50.0, plain=plain)
        with EmbeddedServer(backend) as server:
            chunks = _stream_then(server.url, body, 3, lambda: asyncio.run_coroutine_threadsafe(
                backend.close(), backend.loop).result(GUARD_S))
        *data, done = _events(chunks)
        assert done == "[DONE]"
        tokens, last = [json.loads(d) for d in data[:-1]], json.loads(data[-1])
        assert len(tokens) >= 3 and all(t["choices"][0]["finish_reason"] is None for t in tokens)
        tails[plain] = last                   # no usage chunk: the error is the last event
    assert tails[False] == tails[True]
    assert tails[False]["error"]["message"] == "backend failed: sim backend closed"


def test_a_client_that_leaves_a_coalesced_stream_cancels_its_request(setup):
    # at speed 200 a 22 ms step is 0.11 ms: the server takes several tokens a write all along
    backend = _sim(setup, speed=200.0)
    with EmbeddedServer(backend) as server:
        host, port = server.url.removeprefix("http://").split(":")
        payload = json.dumps({"prompt": [1, 2, 3, 4], "max_tokens": 30000, "ignore_eos": True,
                              "stream": True}).encode()
        with socket.create_connection((host, int(port)), timeout=GUARD_S) as sock:
            sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload)
            data = b""
            while data.count(b'"finish_reason":null') < 20:
                data += sock.recv(65536)
        # the client went away mid-stream
        _until(lambda: backend.stats()["requests_cancelled"] == 1, "the request cancelled")
        _until(lambda: backend.stats()["num_requests_running"] == 0, "the engine to drop it")
        generated = int(backend.engine.generated[0])
    assert generated < 30000
