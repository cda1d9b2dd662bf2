"""The one small interface every backend implements: the SimPy cluster (`sim`), real MLX ranks (`mlx`) and the
zero-cost `instant` one.

The server, the load generator and the run job only talk to a Backend: everything they use is a member of the
protocol below, never probed with getattr. A backend is built by `harness.backends.make_backend`, the one `match`
over backend names.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Protocol

from harness.specs import LoadReport, PartitionPlan  # noqa: F401  (part of the protocol's vocabulary)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: tuple[int, ...]           # token ids; the sim backend only uses len(prompt) and prefix ids
    max_tokens: int
    min_tokens: int = 0               # pins the output length with ignore_eos, as vLLM accepts
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    prefix_id: str | None = None      # shared-prefix group, for caching policies


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str
    time_s: float                     # time.monotonic() (real-time backends) when the token was ready
    finish_reason: str | None = None  # None while running, then "length" | "stop"
    prompt_tokens: int = 0
    cached_tokens: int = 0


class BackendUnavailable(RuntimeError):
    """The backend cannot serve (a rank died, not loaded): the server answers 503."""


class QueueFull(RuntimeError):
    """Too many requests waiting: the server answers 429."""


class InvalidRequest(ValueError):
    """This request cannot run on this backend (a token id outside the model's vocabulary, an empty prompt):
    the server answers 400, and the backend stays healthy."""


class QueueStream:
    """A request's TokenEvents as a backend's worker puts them on an asyncio queue, as an async iterator that
    also hands over every event queued already (`ready`, see ReadyEvents): the sim and mlx backends' streams.
    An exception put on the queue is raised in the consumer, after every event queued before it.

    It behaves as the async generator it replaces would: `start()` is awaited on the first `__anext__` (it
    checks and admits the request and returns its queue and an `end` callback); what it raises (QueueFull,
    BackendUnavailable, InvalidRequest) comes out of that first `__anext__`, and a stream closed before it never
    starts. Once started, `end()` runs exactly once, on the stream's event loop, when the stream is over: at its
    finishing event, at an error (queued, or the cancellation of a waiting `__anext__`), at `aclose()`, or when
    the stream is dropped unclosed (as a generator's `finally`, run by the loop's finalizer)."""

    def __init__(self, start: Callable[[], Awaitable[tuple[asyncio.Queue, Callable[[], None]]]]):
        self._start = start
        self._queue: asyncio.Queue | None = None
        self._end: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._over = False                         # no events to come: finished, failed or closed
        self._error: BaseException | None = None   # queued behind the events ready() took: __anext__ raises it

    def __aiter__(self) -> "QueueStream":
        return self

    async def __anext__(self) -> TokenEvent:
        if self._over:
            raise StopAsyncIteration
        if self._queue is None:
            try:
                self._queue, self._end = await self._start()
            except BaseException:
                self._over = True
                raise
            self._loop = asyncio.get_running_loop()
        if self._error is not None:
            error, self._error = self._error, None
            self._finish()
            raise error
        try:
            item = await self._queue.get()
        except BaseException:   # cancelled while waiting: over, as a generator an exception leaves
            self._finish()
            raise
        if isinstance(item, BaseException):
            self._finish()
            raise item
        if item.finish_reason is not None:
            self._finish()
        return item

    def ready(self, limit: int) -> list[TokenEvent]:
        """The events queued already, at most `limit`, in order, up to the finishing one; [] before the first
        `__anext__` started the stream, once it is over, or when the next item is an error (the awaited
        `__anext__` raises it, so the events before it go out first, as they would one at a time)."""
        if self._over or self._queue is None or self._error is not None:
            return []
        queue, events = self._queue, []
        while len(events) < limit and not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, BaseException):
                self._error = item
                break
            events.append(item)
            if item.finish_reason is not None:
                self._finish()
                break
        return events

    async def aclose(self) -> None:
        self._error = None
        self._finish()

    def _finish(self) -> None:
        self._over = True
        end, self._end = self._end, None
        if end is not None:
            end()

    def __del__(self) -> None:
        # dropped unclosed: end it on its loop, where the backend's state lives, as the loop would close an
        # async generator (never here: a garbage collection may run in the middle of the backend's own code)
        end, self._end = self._end, None
        if end is not None:
            try:
                self._loop.call_soon_threadsafe(end)
            except RuntimeError:   # the loop is closed: nobody left to tell
                pass


class ReadyEvents(Protocol):
    """What a stream from `generate()` may offer besides `__anext__` (optional; the instant backend's does):
    `ready(limit)` returns the events it holds already, at most `limit`, in order, without waiting, and [] when
    the next one is still coming or the stream has ended. An error is either raised as `__anext__` would raise it
    (the instant stream: QueueFull on the first call) or left to the next `__anext__`, with [] (QueueStream: the
    sim and mlx backends, whose streams also answer [] until their first `__anext__` has started them).
    The server sends everything ready in one write per event-loop tick; a stream without it gets one write per
    token, which is the same bytes."""

    def ready(self, limit: int) -> list[TokenEvent]: ...


class Backend(Protocol):
    name: str                        # its name in harness.backends.BACKEND_NAMES (summary.json records it)
    model_id: str                    # what /v1/models lists and requests must name
    source: str                      # "simulated" | "measured": what every timing it stands behind is
    plan: PartitionPlan | None       # the partition plan it serves, or None (instant; mlx given a bare split)

    def encode(self, text: str) -> list[int]: ...
    def chat_prompt(self, messages: list[dict]) -> str: ...
    async def load(self) -> LoadReport: ...
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]: ...
    def stats(self) -> dict: ...
    def step_table(self, t0_monotonic: float, t0_unix: float):
        """Its step records as a DataFrame with harness.metrics.STEP_COLUMNS, in seconds from the run's t=0;
        t=0 comes on both clocks (time.monotonic(), time.time()) since each backend keeps its own."""
    async def close(self) -> None: ...


def plain_chat_prompt(messages: list[dict]) -> str:
    """A chat as plain text ("role: content" lines, then "assistant:"), for backends without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def step_frame(rows: list[dict] = ()):
    """A pandas DataFrame of step records with exactly harness.metrics.STEP_COLUMNS (typed even when empty)."""
    import pandas as pd
    from harness.metrics import STEP_COLUMNS
    if rows:
        return pd.DataFrame(list(rows), columns=list(STEP_COLUMNS))
    types = {"str": "object", "float": "float64", "int": "int64", "bool": "bool"}
    return pd.DataFrame({c: pd.Series(dtype=types[t]) for c, t in STEP_COLUMNS.items()})
