"""The mlx backend's stream hands over every token the driver has delivered at once (base.ReadyEvents, issue
15): the server writes them in fewer writes than tokens, with the same text and token count as one token a
write, and a hang-up or a dead rank mid-stream is handled as before. Real ranks on the tiny model and real
servers on 127.0.0.1; a write is one chunk of the chunked HTTP body, read off a raw socket.

To have tokens wait for the server, a test holds the server's event loop (one blocking callback on it) while
the ranks go on decoding: the driver thread queues their tokens, which the loop takes once it is free."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from harness.backends.base import GenerationRequest
from harness.backends.mlx import MlxBackend
from harness.serving.server import EmbeddedServer
from tests.server.conftest import ReadyToggle
from tests.server.test_server_fast_path import _events, _token_events
from tests.server.test_sim_ready import _stream_then

GUARD_S = 30   # hang bounds only, never timing asserts
PROMPT_TEXT = "def fibonacci(n):\n    return"


class _Mlx(ReadyToggle, MlxBackend):
    """The mlx backend, remembering the server's loop; `plain` hides its streams' `ready`."""


def _until(check, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not check():
        assert time.monotonic() < deadline, f"{what} within {GUARD_S} s"
        time.sleep(0.005)


def _idle(backend) -> bool:
    stats = backend.stats()
    return stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0


def _hold_loop_until(backend, check, what: str):
    """An action for _stream_then: blocks the server's loop (from its own thread) until `check()`."""
    def action():
        backend.loop.call_soon_threadsafe(_until, check, what)
    return action


@pytest.mark.slow
def test_ready_hands_over_the_delivered_tokens_in_order_then_ends(tiny):
    async def scenario():
        backend = MlxBackend(tiny, None)
        await backend.load()
        try:
            prompt = tuple(backend.encode(PROMPT_TEXT))
            request = GenerationRequest("a", prompt, max_tokens=24, ignore_eos=True)
            awaited = await asyncio.wait_for(_collect(backend.generate(request)), GUARD_S)
            stream = backend.generate(GenerationRequest("b", prompt, max_tokens=24, ignore_eos=True))
            assert stream.ready(64) == []          # not started: the request is queued on the first __anext__
            got = [await asyncio.wait_for(stream.__anext__(), GUARD_S)]
            deadline = time.monotonic() + GUARD_S
            while not _idle(backend):              # every token decoded and delivered to this loop
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)
            got += stream.ready(5)
            assert len(got) == 6                   # never more than asked for
            got += stream.ready(64)
            assert stream.ready(64) == []
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            assert [(e.token_id, e.text, e.finish_reason) for e in got] == \
                   [(e.token_id, e.text, e.finish_reason) for e in awaited]
            assert len(got) == 24 and got[-1].finish_reason == "length"
            rows = {r["request_id"]: r for r in backend.request_records()}
            assert rows["b"]["success"] and backend.stats()["num_requests_running"] == 0
        finally:
            await backend.close()
    asyncio.run(scenario())


async def _collect(stream):
    return [ev async for ev in stream]


def _texts(chunks: list[bytes]) -> list[str]:
    return [c["choices"][0]["text"] for c in map(json.loads, _events(chunks)[:-1]) if c.get("choices")]


@pytest.mark.slow
def test_tokens_decoded_while_the_server_was_busy_go_out_in_fewer_writes_with_the_same_text(tiny):
    tokens = 24
    backend = _Mlx(tiny, None)
    answers = {}
    with EmbeddedServer(backend) as server:
        body = {"model": backend.model_id, "prompt": backend.encode(PROMPT_TEXT), "max_tokens": tokens,
                "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        for plain in (False, True):
            backend.plain = plain
            answers[plain] = _stream_then(server.url, body, 1,
                                          _hold_loop_until(backend, lambda: _idle(backend), "the request decoded"))
    ready, plain = answers[False], answers[True]
    # a token whose text is held back (part of a multi-byte character) or empty gets no chunk of its own
    events = sum(map(_token_events, plain))
    assert set(map(_token_events, plain)) == {1} and events > tokens // 2   # without ready(): a write a token
    assert sum(map(_token_events, ready)) == events and len(ready) <= 3
    assert _texts(ready) == _texts(plain)
    usage = [json.loads(_events(c)[-2])["usage"] for c in (ready, plain)]
    assert usage[0] == usage[1] and usage[0]["completion_tokens"] == tokens


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_cancels_its_request(tiny):
    import socket
    backend = MlxBackend(tiny, None)
    with EmbeddedServer(backend) as server:
        host, port = server.url.removeprefix("http://").split(":")
        payload = json.dumps({"model": backend.model_id, "prompt": backend.encode(PROMPT_TEXT),
                              "max_tokens": 10_000, "ignore_eos": True, "stream": True}).encode()
        with socket.create_connection((host, int(port)), timeout=GUARD_S) as sock:
            sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload)
            data = b""
            while data.count(b'"finish_reason":null') < 3:
                data += sock.recv(65536)
        _until(lambda: _idle(backend), "the request cancelled")   # the client went away mid-stream
        (row,) = backend.request_records()
        assert row["error"] == "cancelled" and backend.stats()["healthy"]


@pytest.mark.slow
def test_a_rank_killed_mid_stream_is_reported_in_band_as_without_ready(tiny):
    errors = {}
    for plain in (False, True):
        backend = _Mlx(tiny, None)
        backend.plain = plain
        with EmbeddedServer(backend) as server:
            body = {"model": backend.model_id, "prompt": backend.encode(PROMPT_TEXT), "max_tokens": 10_000,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            def kill_while_held() -> None:   # on the server's loop, holding it: 4 more steps, then rank 0 goes
                first = backend.stats()["steps"]
                _until(lambda: backend.stats()["steps"] >= first + 4, "4 more steps")
                os.kill(backend.ranks.ranks[0].proc.pid, signal.SIGKILL)
                _until(lambda: backend.request_records()[0]["error"], "the rank's death noticed")

            chunks = _stream_then(server.url, body, 2,
                                  lambda: backend.loop.call_soon_threadsafe(kill_while_held))
        *data, done = _events(chunks)
        assert done == "[DONE]"
        tokens, last = [json.loads(d) for d in data[:-1]], json.loads(data[-1])
        assert len(tokens) >= 3 and all(t["choices"][0]["finish_reason"] is None for t in tokens)
        errors[plain] = last["error"]["message"].split("; last log")[0]   # no usage chunk: the error is last
        # the tokens decoded while the loop was held go out together with ready(), one a write without
        assert (max(map(_token_events, chunks)) > 1) is not plain
    assert errors[False] == errors[True]
    assert errors[False].startswith("backend failed: rank 0 ") and "killed by signal 9" in errors[False]
