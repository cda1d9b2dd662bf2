"""The embedded OpenAI-compatible server: FastAPI in front of any Backend (sim, mlx, instant).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streaming or not),
GET /health, GET /metrics (Prometheus text). vLLM's extensions `min_tokens`, `ignore_eos` and
`stop_token_ids` pin the output length so every backend does the same work.

Streaming sends one chunk per generated token, the first one already carrying text (no role-only chunk),
`finish_reason` on the last content chunk, then the usage chunk when `stream_options.include_usage` is set,
then `data: [DONE]`. A valid streaming body takes a fast path in plain ASGI (`_serve_stream`, from the guard
that read the body; FastAPI never sees it): the events of every token the backend holds ready (its stream's
optional `ready`, base.ReadyEvents) go out in one write per event-loop tick, and a hang-up is watched by one
pending receive(), started the first time the stream has to wait.

Start it in-process with `EmbeddedServer(backend).start()` (returns the URL, serves from a background
thread on 127.0.0.1) or standalone with `python -m harness serve`.

Hostile input: every error, the server's own (400 for any malformed body, never 422) and Starlette's or h11's
(404, 405, unparsable body or request head) alike, is `{"error": {"message", "type", "param", "code"}}`, and an
unforeseen exception is an OpenAI-shaped 500 that keeps the connection usable. ServerLimits bounds what a request
may cost before work starts (body, prompt characters before tokenizing, stop lists) and how long a connection
may take (request head, body, idle keep-alive). `api_key` guards every route but /health.

A backend's `stats()` may report `num_requests_running`, `num_requests_waiting` (ints), `kv_cache_usage`
({node: fraction 0..1}), `kv_cache_bytes` ({node: bytes}) and `healthy` (bool, for /health); /metrics
exports them, falling back to the server's own request counts.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, AsyncIterator, Literal

import anyio
import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from harness.backends.base import (Backend, BackendUnavailable, GenerationRequest, InvalidRequest, LoadReport, QueueFull,
                                  TokenEvent)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int = 32768            # hard bound on max_tokens a client may ask for
    default_max_tokens: int = 256      # when the client sets none
    max_prompt_tokens: int = 131072
    # Checked before tokenizing, so an absurd prompt costs no tokenizer time: 8 characters per allowed token is
    # twice what English text takes with a BPE vocabulary.
    max_prompt_chars: int = 8 * 131072
    max_stop_strings: int = 64         # each one is searched for after every token
    max_stop_chars: int = 8192         # all stop strings together
    max_stop_token_ids: int = 1024
    retry_after_s: int = 1             # Retry-After on 429
    header_timeout_s: float = 10.0     # a connection must send a whole request head within this
    keep_alive_s: float = 5.0          # idle time allowed between requests on one connection
    body_timeout_s: float = 30.0       # a request body must arrive within this
    max_header_bytes: int = 16 * 1024  # h11's bound on a request head


# Prompts longer than this are tokenized in a worker thread, so /health and the streams of other requests keep
# their cadence; shorter ones stay on the loop, where a thread hop would cost more than the tokenizing.
_TOKENIZE_INLINE_CHARS = 32 * 1024
_TOKEN_ID = Annotated[int, Field(ge=0, lt=2**31)]
# At most this many ready tokens go out in one write: it bounds one stream's share of an event-loop tick (the
# server yields between writes), and 64 tokens are ~10 KiB of SSE.
_COALESCE_MAX_TOKENS = 64


# ---------------------------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    # Clients (openai SDK, vLLM bench, GuideLLM) send fields we do not use (top_p, logprobs, user...): accept them.
    # Strict: the OpenAPI document says integer, so `true` or "5" for max_tokens is a 400, not a silent 1 or 5.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=-2**63, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: "_StreamOptions | None" = None
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[_TOKEN_ID] | None = None
    n: int = Field(default=1, ge=1, le=1)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class CompletionBody(_Body):
    prompt: str | list[_TOKEN_ID] | list[str] | list[list[_TOKEN_ID]]


class _ContentPart(BaseModel):
    # Parts of other types (image_url, input_audio...) are accepted and ignored: only text reaches the model.
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> "_ContentPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a part of type 'text' needs a string 'text'")
        return self


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[_ContentPart] | None = None


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


_Body.model_rebuild()
CompletionBody.model_rebuild()
ChatBody.model_rebuild()


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class _ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """What every error answer carries (the OpenAI shape)."""
    error: _ErrorDetail


# ---------------------------------------------------------------------------------------------- metrics

class _Metrics:
    """Per-app registry, so several servers in one process (tests, sweeps) never share counters."""

    def __init__(self, backend: Backend):
        self.registry = CollectorRegistry()
        self.backend = backend
        self.waiting = 0      # accepted, no token yet
        self.running = 0      # streaming tokens
        r = self.registry
        self.prompt_tokens = Counter("harness:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("harness:generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("harness:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.failed = Counter("harness:request_failure", "Requests answered with an error", ["status"], registry=r)
        buckets = (.001, .0025, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
        self.ttft = Histogram("harness:time_to_first_token_seconds", "Server-side time to first token",
                              buckets=buckets, registry=r)
        self.tpot = Histogram("harness:time_per_output_token_seconds", "Server-side time per output token",
                              buckets=(.0005, .001, .0025, .005, .01, .025, .05, .075, .1, .15, .2, .3, .4, .5,
                                       .75, 1, 2.5), registry=r)
        r.register(_StatsCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatsCollector:
    """Reads backend.stats() at scrape time, so gauges are never stale."""

    def __init__(self, metrics: _Metrics):
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        try:
            stats = self.m.backend.stats() or {}
        except Exception:  # a scrape must not fail because a rank is down; health says that
            stats = {}
        running = GaugeMetricFamily("harness:num_requests_running", "Requests generating tokens")
        running.add_metric([], float(stats.get("num_requests_running", self.m.running)))
        waiting = GaugeMetricFamily("harness:num_requests_waiting", "Requests waiting for their first token")
        waiting.add_metric([], float(stats.get("num_requests_waiting", self.m.waiting)))
        kv = GaugeMetricFamily("harness:kv_cache_usage_perc", "KV-cache use per node (0..1)", labels=["node"])
        for node, frac in sorted((stats.get("kv_cache_usage") or {}).items()):
            kv.add_metric([str(node)], float(frac))
        kv_bytes = GaugeMetricFamily("harness:kv_cache_usage_bytes", "KV-cache bytes in use per node",
                                     labels=["node"])
        for node, used in sorted((stats.get("kv_cache_bytes") or {}).items()):
            kv_bytes.add_metric([str(node)], float(used))
        yield from (running, waiting, kv, kv_bytes)


# ---------------------------------------------------------------------------------------------- generation

class _ClientGone(Exception):
    pass


class _DisconnectWatch:
    """Cancels `scope` (around a whole generation, streamed or collected) when the client hangs up: one pending
    receive() in one task, started only the first time the generation has to wait for its backend, instead of a
    watcher per wait. One whose tokens are all ready never starts it: it never waits, and uvicorn drops its
    writes to a gone client. The backend's stream is cancelled in the request's own task: unwound by gen.close()."""

    def __init__(self, receive):
        self.receive = receive
        self.scope = anyio.CancelScope()
        self.task: asyncio.Task | None = None
        self.ended = False

    def arm(self) -> None:
        if self.task is None and not self.ended:
            self.task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if not self.ended:   # uvicorn also says http.disconnect once the response is complete
            self.scope.cancel()

    def end(self) -> None:
        """Before the response's last write, which makes receive() say http.disconnect."""
        self.ended = True
        if self.task is not None:
            self.task.cancel()


class _Generation:
    """One request's token stream: applies stop strings, counts tokens, feeds the metrics."""

    def __init__(self, app_state: "_AppState", stream: AsyncIterator[TokenEvent], prompt_tokens: int,
                 stop: list[str], arrived: float):
        self.s, self.stream, self.stop = app_state, stream, stop
        self.prompt_tokens, self.cached_tokens, self.completion_tokens = prompt_tokens, 0, 0
        self.arrived, self.first_at, self.last_at = arrived, None, None
        self.text = ""
        self.finish_reason: str | None = None
        self._counted_running = False
        self._closed = False
        self._ready = getattr(stream, "ready", None)   # base.ReadyEvents: optional, so probed
        self._took_ready = False   # the last batch came without awaiting the backend (which yields the loop)
        app_state.metrics.waiting += 1

    async def next_events(self, watch: _DisconnectWatch) -> list[TokenEvent]:
        """Every event the backend holds ready (at most _COALESCE_MAX_TOKENS), else the next one awaited while
        `watch` looks out for a hang-up, with those ready after it; [] once the stream ends. A batch taken
        without awaiting yields the loop before the next one: one batch per stream per tick. The first call
        raises what the backend refuses with (QueueFull, BackendUnavailable), before any token is counted."""
        events: list[TokenEvent] = []
        if self._ready is not None:
            if self._took_ready:
                await asyncio.sleep(0)
            events = self._ready(_COALESCE_MAX_TOKENS)
        self._took_ready = bool(events)
        if not events:
            watch.arm()
            event = await anext(self.stream, None)
            if event is not None:
                events = [event, *self._ready(_COALESCE_MAX_TOKENS - 1)] if self._ready is not None else [event]
        if not self._counted_running:   # the backend took the request: waiting -> running
            self.s.metrics.waiting -= 1
            self.s.metrics.running += 1
            self._counted_running = True
        return events

    def take(self, events: list[TokenEvent]) -> list[str]:
        """The text of `events`, one per token, up to the one that finishes the request (later ones are dropped:
        a stop string ended it); [] is the end of a stream that never said why, a "length" finish, no text."""
        if not events:
            self.finish_reason = "length"
            return [""]
        texts = []
        for event in events:
            texts.append(self._take(event))
            if self.finish_reason is not None:
                break
        return texts

    def sse(self, events: list[TokenEvent], render: "_Renderer") -> bytes:
        """The SSE events for `events` (see take): a chunk per token with text, and the finishing one."""
        texts = self.take(events)
        if self.finish_reason is None:
            return b"".join([render.chunk(text, None) for text in texts if text])
        *running, last = texts
        chunks = [render.chunk(text, None) for text in running if text]
        return b"".join([*chunks, render.chunk(last, self.finish_reason)])

    def _take(self, event: TokenEvent) -> str:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            self.s.metrics.ttft.observe(now - self.arrived)
            self.prompt_tokens = event.prompt_tokens or self.prompt_tokens
            self.cached_tokens = event.cached_tokens
        self.last_at = now
        self.completion_tokens += 1
        text, self.finish_reason = event.text, event.finish_reason
        if self.stop:   # the window stop strings are searched in; nothing else reads the text back
            text = self._apply_stop(text)
            self.text += text
        return text

    def _apply_stop(self, text: str) -> str:
        # Search only the tail that could contain a stop string ending in this token.
        window = self.text[-max(map(len, self.stop)):] + text
        hits = [window.find(s) for s in self.stop if s in window]
        if not hits:
            return text
        self.finish_reason = "stop"
        keep = min(hits) - (len(window) - len(text))
        return text[:max(keep, 0)]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Closing the backend's iterator is what cancels the request there; shield it from the cancellation
        # that a client disconnect delivers to this task.
        with anyio.CancelScope(shield=True):
            aclose = getattr(self.stream, "aclose", None)
            if aclose is not None:
                await aclose()
        m = self.s.metrics
        if self._counted_running:
            m.running -= 1
        else:
            m.waiting -= 1
        m.prompt_tokens.inc(self.prompt_tokens if self.first_at else 0)
        m.generation_tokens.inc(self.completion_tokens)
        if self.finish_reason is not None:
            m.finished.labels(self.finish_reason).inc()
            if self.completion_tokens > 1:
                m.tpot.observe((self.last_at - self.first_at) / (self.completion_tokens - 1))
        else:
            m.finished.labels("abort").inc()

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class _AppState:
    backend: Backend
    limits: ServerLimits
    metrics: _Metrics
    load_report: LoadReport | None = None


def _chat_prompt(backend: Backend, messages: list[_Message]) -> str:
    return backend.chat_prompt([{"role": m.role, "content": _message_text(m)} for m in messages])


def _message_text(m: _Message) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    return "".join(part.text for part in m.content if part.type == "text")


def _prompt_chars(body: CompletionBody | ChatBody) -> int:
    """The prompt's size in characters, known before any tokenizing (token-id prompts need none)."""
    if isinstance(body, ChatBody):
        return sum(len(_message_text(m)) for m in body.messages)
    prompt = body.prompt
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) for p in prompt if isinstance(p, str))


async def _prompt_ids(state: _AppState, body: CompletionBody | ChatBody) -> tuple[int, ...]:
    chars, limit = _prompt_chars(body), state.limits.max_prompt_chars
    if chars > limit:
        raise ApiError(400, f"prompt has {chars} characters, at most {limit}", _prompt_param(body))
    if chars > _TOKENIZE_INLINE_CHARS:
        return await anyio.to_thread.run_sync(_tokenize, state.backend, body)
    return _tokenize(state.backend, body)


def _prompt_param(body: CompletionBody | ChatBody) -> str:
    return "messages" if isinstance(body, ChatBody) else "prompt"


def _tokenize(backend: Backend, body: CompletionBody | ChatBody) -> tuple[int, ...]:
    if isinstance(body, ChatBody):
        return tuple(backend.encode(_chat_prompt(backend, body.messages)))
    prompt = body.prompt
    if isinstance(prompt, str):
        return tuple(backend.encode(prompt))
    if prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "only one prompt per request is supported (n=1, no batched prompts)", "prompt")
        prompt = prompt[0]
        return tuple(backend.encode(prompt)) if isinstance(prompt, str) else tuple(prompt)
    return tuple(prompt)


async def _generation_request(state: _AppState, body: CompletionBody | ChatBody) -> GenerationRequest:
    limits = state.limits
    if body.model is not None and body.model != state.backend.model_id:
        raise ApiError(404, f"The model `{body.model}` does not exist.", "model", code="model_not_found")
    max_tokens = body.max_tokens
    if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens must be at most {limits.max_tokens}", "max_tokens")
    if body.min_tokens > max_tokens:
        raise ApiError(400, "min_tokens must not exceed max_tokens", "min_tokens")
    stop_ids = body.stop_token_ids or ()
    if len(stop_ids) > limits.max_stop_token_ids:
        raise ApiError(400, f"stop_token_ids has {len(stop_ids)} ids, at most {limits.max_stop_token_ids}",
                       "stop_token_ids")
    prompt = await _prompt_ids(state, body)
    if not prompt:
        raise ApiError(400, "the prompt is empty", _prompt_param(body))
    if len(prompt) > limits.max_prompt_tokens:
        raise ApiError(400, f"prompt has {len(prompt)} tokens, at most {limits.max_prompt_tokens}",
                       _prompt_param(body))
    extra = body.model_extra or {}
    prefix = extra.get("prefix_id")
    return GenerationRequest(
        request_id=uuid.uuid4().hex, prompt=prompt, max_tokens=max_tokens, min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos, temperature=body.temperature, seed=body.seed,
        stop_token_ids=tuple(stop_ids), prefix_id=str(prefix) if prefix is not None else None)


def _stop_list(stop: str | list[str] | None, limits: ServerLimits) -> list[str]:
    """The stop strings, bounded: each one is searched for after every token."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must not be empty", "stop")
    if len(stops) > limits.max_stop_strings:
        raise ApiError(400, f"stop has {len(stops)} strings, at most {limits.max_stop_strings}", "stop")
    chars = sum(map(len, stops))
    if chars > limits.max_stop_chars:
        raise ApiError(400, f"stop strings have {chars} characters together, at most {limits.max_stop_chars}",
                       "stop")
    return stops


# ---------------------------------------------------------------------------------------------- responses

class _Renderer:
    """Builds the OpenAI JSON for completions (text) or chat (delta/message)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.first = True
        self._head: bytes | None = None

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, text: str, finish: str | None) -> bytes:
        """One SSE event. The envelope is rendered once per request and only the text is JSON-encoded per
        token: this is the server's hottest line (one call per token per stream)."""
        if self._head is None:
            self._prepare()
        head = self._head_first if self.first else self._head
        self.first = False
        tail = self._tail_running if finish is None else self._tail(finish)
        return head + json.dumps(text).encode() + tail

    def _prepare(self) -> None:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        envelope = json.dumps(self._envelope(obj, []), separators=(",", ":")).encode()
        start = b"data: " + envelope[:-len(b"[]}")] + b'[{"index":0,'
        if self.chat:
            self._head_first = start + b'"delta":{"role":"assistant","content":'
            self._head = start + b'"delta":{"content":'
            close = b'},"logprobs":null,"finish_reason":'
        else:
            self._head_first = self._head = start + b'"text":'
            close = b',"logprobs":null,"finish_reason":'
        self._close = close
        self._tail_running = close + b"null}]}\n\n"

    def _tail(self, finish: str) -> bytes:
        return self._close + json.dumps(finish).encode() + b"}]}\n\n"

    def usage_chunk(self, usage: dict) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return _sse({**self._envelope(obj, []), "usage": usage})

    def full(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._envelope(self.object, [choice]), "usage": usage}


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


async def _open_generation(state: _AppState, body: CompletionBody | ChatBody) -> _Generation:
    """The checked request handed to the backend; ApiError for a bad body or a backend that refuses at once."""
    arrived = time.monotonic()
    stop = _stop_list(body.stop, state.limits)   # cheap checks first: a bad body costs no tokenizing
    gen_request = await _generation_request(state, body)
    try:
        stream = state.backend.generate(gen_request)
    except (QueueFull, BackendUnavailable) as exc:
        raise _map_backend_error(state, exc)
    return _Generation(state, stream, len(gen_request.prompt), stop, arrived)


async def _serve_stream(state: _AppState, body: CompletionBody | ChatBody, scope, receive, send) -> None:
    """A streaming completion in plain ASGI, the fast path of both generation routes (issue 15): no routing or
    response layers, no task per wait, and every ready token in one write per event-loop tick."""
    try:
        gen = await _open_generation(state, body)
    except (ApiError, QueueFull, BackendUnavailable) as exc:
        return await _counted_error(state, _map_backend_error(state, exc))(scope, receive, send)
    watch = _DisconnectWatch(receive)
    try:
        with watch.scope:   # a hang-up cancels it: the backend's request goes at gen.close()
            await _stream_events(state, body, gen, watch, scope, receive, send)
    finally:
        watch.end()
        await gen.close()


async def _stream_events(state: _AppState, body, gen: _Generation, watch: _DisconnectWatch, scope, receive,
                         send) -> None:
    try:   # the first token before the headers, so QueueFull or BackendUnavailable still become a status code
        events = await gen.next_events(watch)
    except Exception as exc:
        return await _counted_error(state, _map_backend_error(state, exc))(scope, receive, send)
    render = _Renderer(isinstance(body, ChatBody), state.backend.model_id)
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    unsent = tail = b""
    try:
        while True:
            unsent = gen.sse(events, render)
            if gen.finish_reason is not None:
                break
            await send({"type": "http.response.body", "body": unsent, "more_body": True})
            unsent = b""
            events = await gen.next_events(watch)   # one write per tick: it yields the loop first
        if body.stream_options and body.stream_options.include_usage:
            tail = render.usage_chunk(gen.usage())
    except Exception as exc:
        # Headers are gone already: report the failure in-band, as vLLM does (any backend error, since a
        # raise here would only cut the connection without saying why).
        tail = _sse(ApiError(503, f"backend failed: {exc}", type_="server_error").body())
    watch.end()
    await gen.close()   # before [DONE]: a client that reads it finds the request counted and the backend done
    await send({"type": "http.response.body", "body": unsent + tail + b"data: [DONE]\n\n", "more_body": False})


def _counted_error(state: _AppState, err: ApiError) -> JSONResponse:
    """The answer to `err`, counted in harness:request_failure: what the app's ApiError handler answers."""
    state.metrics.failed.labels(str(err.status)).inc()
    return _error_response(err)


class _StreamResponse(Response):
    """A streaming completion answered from FastAPI's route: the bodies the fast path leaves to it (a JSON
    content type other than application/json, say) stream the same way."""

    def __init__(self, state: _AppState, body: CompletionBody | ChatBody):
        super().__init__()
        self.state, self.request_body = state, body

    async def __call__(self, scope, receive, send) -> None:
        await _serve_stream(self.state, self.request_body, scope, receive, send)


async def _complete(state: _AppState, request: Request, body: CompletionBody | ChatBody) -> Response:
    if body.stream:
        return _StreamResponse(state, body)
    gen = await _open_generation(state, body)
    render = _Renderer(isinstance(body, ChatBody), state.backend.model_id)
    watch = _DisconnectWatch(request.receive)
    try:
        with watch.scope:   # a hang-up cancels it: the backend's request goes at gen.close()
            text = await _collect(gen, watch)
        if watch.scope.cancelled_caught:
            raise _ClientGone()
    except BaseException as exc:
        raise _map_backend_error(state, exc)
    finally:
        watch.end()
        await gen.close()
    return JSONResponse(render.full(text, gen.finish_reason, gen.usage()))


async def _collect(gen: _Generation, watch: _DisconnectWatch) -> str:
    """The whole completion's text, taken as a stream takes it (ready tokens at once, one batch per tick)."""
    texts: list[str] = []
    while gen.finish_reason is None:
        texts += gen.take(await gen.next_events(watch))
    return "".join(texts)


def _queue_full(state: _AppState, exc: Exception) -> ApiError:
    return ApiError(429, f"server busy: {exc}", type_="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(state.limits.retry_after_s)})


def _map_backend_error(state: _AppState, exc: BaseException) -> BaseException:
    if isinstance(exc, QueueFull):
        return _queue_full(state, exc)
    if isinstance(exc, BackendUnavailable):
        return ApiError(503, f"backend unavailable: {exc}", type_="server_error")
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), "prompt", code="invalid_request")
    if isinstance(exc, _ClientGone):
        return exc
    if isinstance(exc, Exception) and not isinstance(exc, ApiError):
        return ApiError(503, f"backend failed: {type(exc).__name__}: {exc}", type_="server_error")
    return exc


# ---------------------------------------------------------------------------------------------- the app

class _Guard:
    """Pure ASGI middleware: the API key, a bound on the request body (size and time) read before the app parses
    it, the fast path for streaming completions (served from the body read here, never reaching FastAPI), and
    the last word on anything unexpected: an OpenAI-shaped 500 that leaves the connection usable (an exception
    reaching uvicorn after the response started makes it drop the connection)."""

    def __init__(self, app, api_key: str | None, open_paths: frozenset[str], state: _AppState):
        self.app, self.open_paths, self.state, self.limits = app, open_paths, state, state.limits
        self.expected = b"Bearer " + api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self._guarded(scope, receive, tracked)
        except Exception as exc:
            if started:   # headers are gone: nothing left to say in HTTP
                raise
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            err = ApiError(500, f"internal server error ({type(exc).__name__})", type_="server_error")
            await _error_response(err)(scope, receive, send)

    async def _guarded(self, scope, receive, send):
        if self.expected is not None and scope["path"] not in self.open_paths and not self._authorized(scope):
            err = ApiError(401, "Incorrect API key provided.", type_="invalid_request_error",
                           code="invalid_api_key")
            return await _error_response(err)(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            with anyio.fail_after(self.limits.body_timeout_s):
                body, too_big = await self._read_body(receive)
        except TimeoutError:
            err = ApiError(408, f"request body not received within {self.limits.body_timeout_s:g} s",
                           code="body_timeout")
            return await _error_response(err)(scope, receive, send)
        if too_big:
            err = ApiError(413, f"request body larger than {self.limits.max_body_bytes} bytes", code="body_too_large")
            return await _error_response(err)(scope, receive, send)
        streaming = _streaming_body(scope, body)
        if streaming is not None:
            return await _serve_stream(self.state, streaming, scope, receive, send)
        return await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)   # constant time: no key prefix leaks through timing

    async def _read_body(self, receive) -> tuple[bytes, bool]:
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                return b"", True
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts), False


_STREAM_ROUTES = {"/v1/completions": CompletionBody, "/v1/chat/completions": ChatBody}


def _streaming_body(scope, raw: bytes) -> CompletionBody | ChatBody | None:
    """The parsed body of a valid streaming completion, else None: everything else (invalid bodies included,
    so every error keeps its one source) goes through FastAPI. It parses JSON only where FastAPI would: no
    content type, or application/json."""
    model = _STREAM_ROUTES.get(scope["path"])
    if model is None or b'"stream"' not in raw or not _json_content_type(scope):
        return None
    try:
        body = model.model_validate_json(raw)
    except ValueError:   # pydantic's ValidationError, invalid JSON included
        return None
    return body if body.stream else None


def _json_content_type(scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return True


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error_response(ApiError(400, "request body is not valid JSON", None))
    # A union field (prompt, content) reports one error per alternative: the deepest one says the most.
    located = [([str(p) for p in e.get("loc", ()) if not _is_union_tag(p)], e) for e in errors] or [([], {})]
    loc, first = max(located, key=lambda pair: len(pair[0]))
    loc = [p for p in loc if p != "body"] if loc[:1] == ["body"] else loc
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return _error_response(ApiError(400, f"{param or 'body'}: {message}", param))


def _is_union_tag(part) -> bool:
    """pydantic names the union alternative in an error's loc ('str', 'list[int]', 'constrained-int',
    '_ContentPart'); field names never look like that."""
    if not isinstance(part, str):
        return False
    return ("[" in part or "-" in part or part[:1].isupper() or part[:1] == "_"
            or part in ("str", "int", "float", "bool", "dict", "list", "none"))


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (no route, wrong method, unparsable body) in the OpenAI shape."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        err = ApiError(404, f"no route {where}", code="not_found")
    elif exc.status_code == 405:
        err = ApiError(405, f"method not allowed: {where}", code="method_not_allowed")
    elif exc.status_code == 400:
        err = ApiError(400, "request body could not be parsed: it must be UTF-8 JSON", code="invalid_body")
    else:
        err = ApiError(exc.status_code, str(exc.detail))
    return JSONResponse(err.body(), status_code=err.status, headers=dict(exc.headers or {}))


def create_app(backend: Backend, *, api_key: str | None = None, limits: ServerLimits | None = None,
               load_backend: bool = True, metrics_open: bool = False) -> FastAPI:
    """The ASGI app. With load_backend, the app's startup awaits backend.load() and shutdown closes it.

    `api_key` protects every route but /health (and /metrics too unless `metrics_open`, for a scraper)."""
    limits = limits or ServerLimits()
    state = _AppState(backend, limits, _Metrics(backend))

    async def lifespan(_app):
        if load_backend:
            state.load_report = await backend.load()
        try:
            yield
        finally:
            if load_backend:
                await backend.close()

    app = FastAPI(title="harness OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.harness = state
    failed = state.metrics.failed

    def api_error(_request, err: ApiError) -> JSONResponse:
        return _counted_error(state, err)

    def invalid(_request, exc: RequestValidationError) -> JSONResponse:
        failed.labels("400").inc()
        return _validation_error(exc)

    def http_error(request, exc: StarletteHTTPException) -> JSONResponse:
        failed.labels(str(exc.status_code)).inc()
        return _http_error(request, exc)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(_ClientGone, lambda _r, _e: Response(status_code=499))
    _routes(app, state)
    open_paths = frozenset({"/health", "/metrics"} if metrics_open else {"/health"})
    app.add_middleware(_Guard, api_key=api_key, open_paths=open_paths, state=state)
    return app


def _error_doc(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


# What the OpenAPI document lists: the statuses the server answers (400, never FastAPI's 422), the SSE stream.
_ERRORS = {401: _error_doc("missing or wrong API key (with --api-key)"),
           404: _error_doc("unknown model"), 408: _error_doc("request body too slow"),
           413: _error_doc("request body too large"), 429: _error_doc("queue full (Retry-After says when)"),
           503: _error_doc("backend unavailable"), "default": _error_doc("any other error, same shape")}
# One server-sent event (what schemathesis checks each event against): a JSON chunk, or `[DONE]` at the end.
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE]"},
                             "event": {"type": "string"}}}
_GENERATION_DOC = {
    200: {"description": "the completion; with `stream: true` a text/event-stream of chunks, then `data: [DONE]`",
          "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
    400: _error_doc("invalid request body (the param field names the field)"), **_ERRORS}


def _routes(app: FastAPI, state: _AppState) -> None:
    @app.get("/health")
    async def health():
        stats = state.backend.stats()
        healthy = bool(stats.get("healthy", True))
        body = {"status": "ok" if healthy else "unavailable"}
        if stats.get("error"):
            body["error"] = str(stats["error"])
        if "rank_states" in stats:          # real ranks: each one's node, process, last heartbeat and memory
            body["ranks"] = stats["rank_states"]
        return JSONResponse(body, status_code=200 if healthy else 503)

    # the error keeps its JSON media type (a "model" entry would take the route's text/plain)
    unauthorized = {"description": _ERRORS[401]["description"],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: unauthorized},
             description="Prometheus text exposition")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses={401: _ERRORS[401]})
    async def models():
        return {"object": "list", "data": [{"id": state.backend.model_id, "object": "model",
                                            "created": 0, "owned_by": "harness"}]}

    @app.post("/v1/completions", responses=_GENERATION_DOC)
    async def completions(body: CompletionBody, request: Request):
        return await _complete(state, request, body)

    @app.post("/v1/chat/completions", responses=_GENERATION_DOC)
    async def chat(body: ChatBody, request: Request):
        return await _complete(state, request, body)


# ---------------------------------------------------------------------------------------------- running it

class _HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol plus a header-read timeout, which uvicorn lacks: its keep-alive timer only runs
    after a response, and any byte stops it, so a client that connects and trickles (or sends nothing) would
    hold its connection forever. The clock starts when the connection opens, or when bytes of a next request
    arrive, and stops once h11 has the whole request head."""

    def __init__(self, *args, header_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:   # still no complete request head
            self._arm_head_timer()
        else:
            self._disarm_head_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (a malformed or oversized head): uvicorn's plain-text 400, in the OpenAI
        shape like every other error. The connection closes after it, as uvicorn's does."""
        body = json.dumps(ApiError(400, f"malformed HTTP request: {msg}", code="bad_http_request").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def _uvicorn_options(limits: ServerLimits) -> dict:
    """The connection-level bounds of ServerLimits, as uvicorn.Config arguments."""
    return {"http": functools.partial(_HeadTimeoutH11, header_timeout_s=limits.header_timeout_s),
            "timeout_keep_alive": limits.keep_alive_s, "h11_max_incomplete_event_size": limits.max_header_bytes}


class EmbeddedServer:
    """uvicorn serving `create_app(backend)` from a background thread on 127.0.0.1 and a free port.

        with EmbeddedServer(backend) as server:   # loads the backend; server.url is "http://127.0.0.1:PORT"
            ...
    """

    def __init__(self, backend: Backend, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 limits: ServerLimits | None = None, load_backend: bool = True, log_level: str = "warning",
                 metrics_open: bool = False):
        self.backend, self.host, self.port = backend, host, port
        limits = limits or ServerLimits()
        self.app = create_app(backend, api_key=api_key, limits=limits, load_backend=load_backend,
                              metrics_open=metrics_open)
        self._config = uvicorn.Config(self.app, log_level=log_level, lifespan="on", access_log=False,
                                      timeout_graceful_shutdown=5, **_uvicorn_options(limits))
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.url: str | None = None

    @property
    def load_report(self) -> LoadReport | None:
        return self.app.state.harness.load_report

    def start(self, timeout_s: float = 60.0) -> str:
        # proto must say TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto is IPPROTO_TCP, and
        # without it Nagle plus delayed ACKs add 40 ms to every response on a kept-alive connection.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="harness-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server did not start within {timeout_s} s")
            time.sleep(0.01)
        self.url = f"http://{self.host}:{self.port}"
        return self.url

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        except BaseException as exc:   # surfaced by start(); a thread cannot raise into its caller
            self._error = exc
        finally:
            sock.close()

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():   # streams still open past the grace period: drop them
            self._server.force_exit = True
            self._thread.join(timeout_s)
        self._thread = None

    def __enter__(self) -> "EmbeddedServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(backend: Backend, *, host: str, port: int, api_key: str | None = None,
                  limits: ServerLimits | None = None, log_level: str = "info", metrics_open: bool = False,
                  access_log: bool = False) -> None:
    """Blocking: what `python -m harness serve` runs. The access log is off unless asked for (issue 15): each
    line is formatted and written synchronously on the event loop, work a throughput run does not need."""
    limits = limits or ServerLimits()
    app = create_app(backend, api_key=api_key, limits=limits, metrics_open=metrics_open)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                access_log=access_log, **_uvicorn_options(limits))
