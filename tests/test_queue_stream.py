"""base.QueueStream, the sim and mlx backends' stream: it behaves as the async generator over a worker's queue it
replaced (start on the first __anext__, `end` exactly once however the stream is over) and hands over what is
queued already with ready() (base.ReadyEvents)."""
from __future__ import annotations

import asyncio
import gc

import pytest

from harness.backends.base import BackendUnavailable, QueueFull, QueueStream, TokenEvent


def _event(i: int, last: bool = False) -> TokenEvent:
    return TokenEvent(token_id=i, text=f" t{i}", time_s=0.0, finish_reason="length" if last else None)


def _stream(items=(), refuse: BaseException | None = None):
    calls = {"start": 0, "end": 0}
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def start():
        calls["start"] += 1
        if refuse is not None:
            raise refuse
        return queue, lambda: calls.__setitem__("end", calls["end"] + 1)
    return QueueStream(start), queue, calls


def test_ready_takes_what_is_queued_in_order_up_to_the_finishing_event():
    async def scenario():
        stream, queue, calls = _stream([_event(i) for i in range(5)] + [_event(5, last=True), _event(6)])
        assert stream.ready(64) == [] and calls["start"] == 0     # starts on the first __anext__ only
        got = [await stream.__anext__(), *stream.ready(2)]
        got += stream.ready(64)
        assert [e.token_id for e in got] == [0, 1, 2, 3, 4, 5] and calls["end"] == 1
        assert stream.ready(64) == []
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        await stream.aclose()
        assert calls == {"start": 1, "end": 1}
    asyncio.run(scenario())


def test_an_error_behind_events_comes_from_the_next_anext_after_them():
    async def scenario():
        error = BackendUnavailable("rank 1 lost")
        stream, _, calls = _stream([_event(0), _event(1), _event(2), error, _event(3)])
        got = [await stream.__anext__(), *stream.ready(64)]
        assert [e.token_id for e in got] == [0, 1, 2] and calls["end"] == 0
        assert stream.ready(64) == []
        with pytest.raises(BackendUnavailable, match="rank 1 lost"):
            await stream.__anext__()
        assert calls["end"] == 1 and stream.ready(64) == []
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
    asyncio.run(scenario())


def test_a_refused_start_raises_from_the_first_anext_and_never_ends():
    async def scenario():
        stream, _, calls = _stream(refuse=QueueFull("2 waiting"))
        with pytest.raises(QueueFull):
            await stream.__anext__()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        await stream.aclose()
        assert calls == {"start": 1, "end": 0}
    asyncio.run(scenario())


def test_closed_before_it_started_it_never_starts():
    async def scenario():
        stream, _, calls = _stream([_event(0)])
        await stream.aclose()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        assert calls == {"start": 0, "end": 0}
    asyncio.run(scenario())


def test_a_cancelled_wait_ends_it_once():
    async def scenario():
        stream, _, calls = _stream([_event(0)])
        await stream.__anext__()
        waiting = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await stream.aclose()
        assert calls["end"] == 1
    asyncio.run(scenario())


def test_dropped_unclosed_it_ends_on_its_loop():
    async def scenario():
        stream, _, calls = _stream([_event(0), _event(1)])
        await stream.__anext__()
        del stream
        gc.collect()
        assert calls["end"] == 0          # not in the collector: on the loop, like an async generator's finalizer
        await asyncio.sleep(0)
        assert calls["end"] == 1
    asyncio.run(scenario())
