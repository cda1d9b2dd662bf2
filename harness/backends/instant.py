"""A backend with zero model cost: every token is ready the moment it is asked for.

Put behind the server it measures the server's (and the load generator's) own overhead: whatever latency a
client sees against it is HTTP, JSON and scheduling, never model time. It is a complete Backend: it counts
prompt tokens with the same word tokenizer the sim backend uses, honours max/min tokens, stop token ids and
a bound on concurrent requests (QueueFull beyond it), and reports its state in stats().
"""
from __future__ import annotations

import asyncio
import time
import zlib

from harness.backends.base import (BackendUnavailable, GenerationRequest, LoadReport, QueueFull, TokenEvent,
                                   plain_chat_prompt, step_frame)

# Common English words that most BPE vocabularies (GPT, Llama, Qwen) keep as one token with a leading space,
# so a prompt of N of them is close to N tokens on a real model too.
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their been has would when if no will more so who what its out "
    "into time up only about could new some them other may then these two first any like now my than people "
    "way over also did many after most well where use made year work back through down water long just day "
    "part number good each very still sound place little great"
).split()


class WordTokenizer:
    """One token per whitespace-separated word; ids of unknown words are a stable hash into the vocabulary."""

    vocab = WORDS
    index = {w: i for i, w in enumerate(WORDS)}

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, zlib.crc32(w.encode()) % len(WORDS)) for w in text.split()]

    def token_text(self, token_id: int) -> str:
        return "" if token_id >= len(WORDS) else " " + WORDS[token_id]


def output_token(request: GenerationRequest, position: int) -> int:
    """A deterministic token stream per (seed, position) so repeated runs return the same text."""
    seed = request.seed if request.seed is not None else 0
    return (seed * 7919 + position * 104729 + 17) % len(WORDS)


class InstantBackend:
    """Zero-cost backend. `max_running` bounds concurrent requests (QueueFull beyond it).

    `token_interval_s` > 0 paces tokens at a fixed cadence instead (first token after one interval): a
    predictable stream for tests of cancellation and back-pressure, and for load-generator ceilings.
    """

    name = "instant"
    source = "measured"   # what a client sees is the server's own cost, measured
    plan = None           # no model, so nothing to partition

    def __init__(self, model_id: str = "instant", max_running: int | None = None, token_interval_s: float = 0.0):
        self.model_id = model_id
        self.max_running = max_running
        self.token_interval_s = token_interval_s
        self._cancelled = 0
        self.tokenizer = WordTokenizer()
        self._loaded = False
        self._running = 0
        self._served = 0

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat_prompt(self, messages: list[dict]) -> str:
        return plain_chat_prompt(messages)

    async def load(self) -> LoadReport:
        self._loaded = True
        return LoadReport(load_s_per_node={"local": 0.0}, memory_bytes_per_node={"local": 0},
                          source="measured", notes=("instant backend: no model",))

    def generate(self, request: GenerationRequest) -> "_InstantStream":
        if not self._loaded:
            raise BackendUnavailable("instant backend not loaded")
        return _InstantStream(self, request)

    def stats(self) -> dict:
        return {"healthy": self._loaded, "num_requests_running": self._running, "num_requests_waiting": 0,
                "requests_served": self._served, "requests_cancelled": self._cancelled,
                "kv_cache_usage": {"local": 0.0}}

    def step_table(self, t0_monotonic: float, t0_unix: float):
        return step_frame()   # no engine, no steps

    async def close(self) -> None:
        self._loaded = False


class _InstantStream:
    """One request's tokens, as an async iterator that also hands over every token ready now (`ready`, see
    base.ReadyEvents). Unpaced, every token is ready; paced, token k is due `(k + 1) * token_interval_s` after
    the stream started, on a fixed schedule like a real engine's, so a consumer that fell behind finds several
    due at once."""

    def __init__(self, backend: InstantBackend, request: GenerationRequest):
        self.backend, self.request = backend, request
        self.position = 0
        self.started_at: float | None = None
        self.finished = False      # the last token was handed over
        self._holding = False      # counted in backend._running

    def __aiter__(self) -> "_InstantStream":
        return self

    async def __anext__(self) -> TokenEvent:
        self._begin()
        if self.finished:
            raise StopAsyncIteration
        interval = self.backend.token_interval_s
        if interval > 0:
            wait = self.started_at + (self.position + 1) * interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        elif self.position > 0:
            # Yield to the loop between tokens, as any real backend does, so one long request cannot starve the
            # others; this is the only cost the instant backend adds.
            await asyncio.sleep(0)
        return self._next_event()

    def ready(self, limit: int) -> list[TokenEvent]:
        self._begin()
        if self.finished:
            return []
        left = self.request.max_tokens - self.position
        interval = self.backend.token_interval_s
        if interval > 0:
            due = int((time.monotonic() - self.started_at) / interval)
            left = min(left, due - self.position)
        events = []
        for _ in range(min(limit, left)):
            events.append(self._next_event())
            if self.finished:   # a stop token before max_tokens
                break
        return events

    def _begin(self) -> None:
        # Checked when the stream starts (its first take), like any async-generator backend; one closed before
        # it started never starts, as an async generator closed before its first anext.
        if self.started_at is not None or self.finished:
            return
        backend = self.backend
        if backend.max_running is not None and backend._running >= backend.max_running:
            raise QueueFull(f"{backend._running} requests running, limit {backend.max_running}")
        backend._running += 1
        self._holding = True
        self.started_at = time.monotonic()

    def _next_event(self) -> TokenEvent:
        request, position = self.request, self.position
        self.position += 1
        token = output_token(request, position)
        stopped = token in request.stop_token_ids and position + 1 >= request.min_tokens
        last = position + 1 == request.max_tokens or stopped
        if last:   # done before the event leaves: a consumer may close us right after it
            self.finished = True
            self.backend._served += 1
            self._release()
        return TokenEvent(token_id=token, text=self.backend.tokenizer.token_text(token), time_s=time.monotonic(),
                          finish_reason=("stop" if stopped else "length") if last else None,
                          prompt_tokens=len(request.prompt))

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self.backend._running -= 1
            self.backend._cancelled += not self.finished

    async def aclose(self) -> None:
        self._release()
        self.finished = True

    def __del__(self) -> None:
        # dropped without aclose (an async generator would be closed by the loop's finalizer): still counted
        self._release()
