"""The one small interface every backend implements: the SimPy cluster (`sim`), real MLX ranks (`mlx`) and the
zero-cost `instant` one.

The server, the load generator and the run job only talk to a Backend: everything they use is a member of the
protocol below, never probed with getattr. A backend is built by `harness.backends.make_backend`, the one `match`
over backend names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

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


class ReadyEvents(Protocol):
    """What a stream from `generate()` may offer besides `__anext__` (optional; the instant backend's does):
    `ready(limit)` returns the events it holds already, at most `limit`, without waiting, and [] when the next
    one is still coming or the stream has ended. It raises what `__anext__` would (QueueFull on the first call).
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
