"""The one small interface both backends implement: the SimPy cluster (`sim`) and real MLX ranks (`mlx`).

The server and the load generator only talk to a Backend. A backend is chosen with `match`, not a framework.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from harness.specs import LoadReport  # noqa: F401  (part of the protocol's vocabulary)


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


async def drain(queue) -> AsyncIterator[TokenEvent]:
    """TokenEvents a backend's worker puts on an asyncio queue, up to the one that finishes the request;
    an exception put on the queue is raised here, in the consumer."""
    while True:
        item = await queue.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None:
            return


class Backend(Protocol):
    name: str
    model_id: str

    def encode(self, text: str) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...
    async def load(self) -> LoadReport: ...
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]: ...
    def stats(self) -> dict: ...
    async def close(self) -> None: ...
