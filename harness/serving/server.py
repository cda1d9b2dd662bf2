"""The embedded OpenAI-compatible server: FastAPI in front of any Backend (sim, mlx, instant).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streaming or not),
GET /health, GET /metrics (Prometheus text). vLLM's extensions `min_tokens`, `ignore_eos` and
`stop_token_ids` pin the output length so every backend does the same work.

Streaming sends one chunk per generated token, the first one already carrying text (no role-only chunk),
`finish_reason` on the last content chunk, then the usage chunk when `stream_options.include_usage` is set,
then `data: [DONE]`.

Start it in-process with `EmbeddedServer(backend).start()` (returns the URL, serves from a background
thread on 127.0.0.1) or standalone with `python -m harness serve`.

A backend's `stats()` may report `num_requests_running`, `num_requests_waiting` (ints), `kv_cache_usage`
({node: fraction 0..1}), `kv_cache_bytes` ({node: bytes}) and `healthy` (bool, for /health); /metrics
exports them, falling back to the server's own request counts.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from harness.backends.base import Backend, BackendUnavailable, GenerationRequest, LoadReport, QueueFull, TokenEvent


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int = 32768            # hard bound on max_tokens a client may ask for
    default_max_tokens: int = 256      # when the client sets none
    max_prompt_tokens: int = 131072
    retry_after_s: int = 1             # Retry-After on 429


# ---------------------------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    # Clients (openai SDK, vLLM bench, GuideLLM) send fields we do not use (top_p, logprobs, user...): accept them.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: "_StreamOptions | None" = None
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1, le=1)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


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


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnect(request: Request, awaitable):
    """Await `awaitable`, but cancel it and raise _ClientGone if the client hangs up first."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # let the backend's generator unwind before anyone closes it (aclose on a running one fails)
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})
    if task.cancelled():
        raise _ClientGone()
    return task.result()


class _Generation:
    """One request's token stream: applies stop strings, counts tokens, feeds the metrics."""

    def __init__(self, app_state: "_AppState", stream: AsyncIterator[TokenEvent], prompt_tokens: int,
                 stop: list[str], arrived: float):
        self.s, self.stream, self.stop = app_state, stream, stop
        self.prompt_tokens, self.cached_tokens, self.completion_tokens = prompt_tokens, 0, 0
        self.arrived, self.first_at, self.last_at = arrived, None, None
        self.text = ""
        self.finish_reason: str | None = None
        self.first: TokenEvent | None = None
        self._counted_running = False
        self._closed = False
        app_state.metrics.waiting += 1

    async def start(self, request: Request) -> None:
        """Wait for the first token (so QueueFull/BackendUnavailable still become a status code)."""
        try:
            self.first = await _unless_disconnect(request, anext(self.stream))
        except StopAsyncIteration:
            self.first = None
        self._to_running()

    def _to_running(self) -> None:
        self.s.metrics.waiting -= 1
        self.s.metrics.running += 1
        self._counted_running = True

    async def pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """(text, finish_reason) per token; the last one has a finish reason."""
        event = self.first
        while event is not None:
            text = self._take(event)
            yield text, self.finish_reason
            if self.finish_reason is not None:
                return
            event = await anext(self.stream, None)
        if self.finish_reason is None:   # the backend ended without saying why
            self.finish_reason = "length"
            yield "", self.finish_reason

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
    return "".join(part.get("text", "") for part in m.content if part.get("type") == "text")


def _prompt_ids(backend: Backend, body: CompletionBody | ChatBody) -> tuple[int, ...]:
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


def _generation_request(state: _AppState, body: CompletionBody | ChatBody) -> GenerationRequest:
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
    prompt = _prompt_ids(state.backend, body)
    if not prompt:
        raise ApiError(400, "the prompt is empty", "messages" if isinstance(body, ChatBody) else "prompt")
    if len(prompt) > limits.max_prompt_tokens:
        raise ApiError(400, f"prompt has {len(prompt)} tokens, at most {limits.max_prompt_tokens}", "prompt")
    extra = body.model_extra or {}
    prefix = extra.get("prefix_id")
    return GenerationRequest(
        request_id=uuid.uuid4().hex, prompt=prompt, max_tokens=max_tokens, min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos, temperature=body.temperature, seed=body.seed,
        stop_token_ids=tuple(body.stop_token_ids or ()), prefix_id=str(prefix) if prefix is not None else None)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must not be empty", "stop")
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


async def _sse_stream(gen: _Generation, render: _Renderer, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        async for text, finish in gen.pieces():
            if text or finish is not None:
                yield render.chunk(text, finish)
        if include_usage:
            yield render.usage_chunk(gen.usage())
    except Exception as exc:
        # Headers are gone already: report the failure in-band, as vLLM does (any backend error, since a
        # raise here would only cut the connection without saying why).
        yield _sse(ApiError(503, f"backend failed: {exc}", type_="server_error").body())
    finally:
        await gen.close()
    yield b"data: [DONE]\n\n"


class _GenerationResponse(StreamingResponse):
    """Closes the generation even when the client leaves before the body starts streaming."""

    def __init__(self, gen: _Generation, body: AsyncIterator[bytes]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.gen.close()


async def _complete(state: _AppState, request: Request, body: CompletionBody | ChatBody) -> Response:
    arrived = time.monotonic()
    gen_request = _generation_request(state, body)
    stop = _stop_list(body.stop)
    try:
        stream = state.backend.generate(gen_request)
        gen = _Generation(state, stream, len(gen_request.prompt), stop, arrived)
    except (QueueFull, BackendUnavailable) as exc:
        raise _map_backend_error(state, exc)
    try:
        await gen.start(request)
    except BaseException as exc:
        await gen.close()
        raise _map_backend_error(state, exc)
    render = _Renderer(isinstance(body, ChatBody), state.backend.model_id)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _GenerationResponse(gen, _sse_stream(gen, render, include_usage))
    try:
        text = await _unless_disconnect(request, _collect(gen))
    except BaseException as exc:
        raise _map_backend_error(state, exc)
    finally:
        await gen.close()
    return JSONResponse(render.full(text, gen.finish_reason or "length", gen.usage()))


async def _collect(gen: _Generation) -> str:
    return "".join([text async for text, _ in gen.pieces()])


def _queue_full(state: _AppState, exc: Exception) -> ApiError:
    return ApiError(429, f"server busy: {exc}", type_="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(state.limits.retry_after_s)})


def _map_backend_error(state: _AppState, exc: BaseException) -> BaseException:
    if isinstance(exc, QueueFull):
        return _queue_full(state, exc)
    if isinstance(exc, BackendUnavailable):
        return ApiError(503, f"backend unavailable: {exc}", type_="server_error")
    if isinstance(exc, _ClientGone):
        return exc
    if isinstance(exc, Exception) and not isinstance(exc, ApiError):
        return ApiError(503, f"backend failed: {type(exc).__name__}: {exc}", type_="server_error")
    return exc


# ---------------------------------------------------------------------------------------------- the app

class _Guard:
    """Pure ASGI middleware: API key on /v1/*, and a bound on the request body read before the app parses it."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"].startswith("/v1/") and not self._authorized(scope):
            err = ApiError(401, "Incorrect API key provided.", type_="invalid_request_error",
                           code="invalid_api_key")
            return await _error_response(err)(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, too_big = await self._read_body(receive)
        if too_big:
            err = ApiError(413, f"request body larger than {self.max_body} bytes", code="body_too_large")
            return await _error_response(err)(scope, receive, send)
        return await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        return headers.get(b"authorization", b"") == b"Bearer " + self.api_key.encode()

    async def _read_body(self, receive) -> tuple[bytes, bool]:
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", True
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts), False


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
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        err = ApiError(400, "request body is not valid JSON", None)
    else:
        param = ".".join(loc) or None
        err = ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)
    return _error_response(err)


def create_app(backend: Backend, *, api_key: str | None = None, limits: ServerLimits | None = None,
               load_backend: bool = True) -> FastAPI:
    """The ASGI app. With load_backend, the app's startup awaits backend.load() and shutdown closes it."""
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
        failed.labels(str(err.status)).inc()
        return _error_response(err)

    def invalid(_request, exc: RequestValidationError) -> JSONResponse:
        failed.labels("400").inc()
        return _validation_error(exc)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(_ClientGone, lambda _r, _e: Response(status_code=499))
    _routes(app, state)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    return app


def _routes(app: FastAPI, state: _AppState) -> None:
    @app.get("/health")
    async def health():
        healthy = bool(state.backend.stats().get("healthy", True))
        return JSONResponse({"status": "ok" if healthy else "unavailable"}, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.backend.model_id, "object": "model",
                                            "created": 0, "owned_by": "harness"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return await _complete(state, request, body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        return await _complete(state, request, body)


# ---------------------------------------------------------------------------------------------- running it

class EmbeddedServer:
    """uvicorn serving `create_app(backend)` from a background thread on 127.0.0.1 and a free port.

        with EmbeddedServer(backend) as server:   # loads the backend; server.url is "http://127.0.0.1:PORT"
            ...
    """

    def __init__(self, backend: Backend, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 limits: ServerLimits | None = None, load_backend: bool = True, log_level: str = "warning"):
        self.backend, self.host, self.port = backend, host, port
        self.app = create_app(backend, api_key=api_key, limits=limits, load_backend=load_backend)
        self._config = uvicorn.Config(self.app, log_level=log_level, lifespan="on", access_log=False,
                                      timeout_graceful_shutdown=5)
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
                  limits: ServerLimits | None = None, log_level: str = "info") -> None:
    """Blocking: what `python -m harness serve` runs."""
    app = create_app(backend, api_key=api_key, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
