"""The HTTP load generator: sends a workload's requests to an OpenAI-compatible server and records, per
request, the raw client-side timestamps that harness.metrics turns into vLLM-style figures (DESIGN §8).

Modes (`LoadMode`):
  - "workload":    send each request at its workload arrival time (or closed-loop, if the workload says so)
  - "synchronous": one request at a time, the next as soon as the previous ends
  - "concurrent":  N requests always in flight (closed loop)
  - "constant":    a fixed rate (requests/s), evenly spaced
  - "poisson":     a Poisson process of the given rate (seeded)
`sweep_modes()` gives one mode per rate or concurrency. Warm-up requests go first and are never recorded.

Every request asks for `stream_options.include_usage` and counts output tokens from `usage`; its output
length is pinned with `max_tokens = min_tokens = output_tokens` and `ignore_eos` (vLLM's extensions).
Times are seconds from the run's start on the client's clock (`time.perf_counter`); dispatch delay
(start_s - scheduled_s) shows a generator that falls behind its schedule.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import random
import re
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import httpx
import numpy as np

from harness.backends.instant import WORDS
from harness.specs import UserError
from harness.workloads import RequestSpec, Workload

MODES = ("workload", "synchronous", "concurrent", "constant", "poisson")


@dataclass(frozen=True)
class LoadMode:
    kind: str = "workload"
    value: float = 0.0           # concurrency for "concurrent", requests/s for "constant"/"poisson"
    seed: int = 0                # Poisson arrivals

    def __post_init__(self):
        if self.kind not in MODES:
            raise UserError(f"unknown load mode {self.kind!r}; known: {', '.join(MODES)}")
        if self.kind in ("concurrent", "constant", "poisson") and not self.value > 0:
            raise UserError(f"load mode {self.kind} needs a value > 0")

    @property
    def label(self) -> str:
        return self.kind if self.kind in ("workload", "synchronous") else f"{self.kind}={self.value:g}"


@dataclass(frozen=True)
class Target:
    url: str                                # base URL, e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str | None = None                # None: the first id GET /v1/models lists
    api_key: str | None = None
    endpoint: str = "completions"           # "completions" | "chat"
    pin_output: bool = True                 # send min_tokens + ignore_eos
    send_prefix_id: bool = False            # harness extension, understood by the embedded server
    timeout_s: float = 600.0
    prompt_vocab: int = 0                   # > 0: send exact token ids below this (completions only), not words

    def __post_init__(self):
        if self.prompt_vocab and self.endpoint != "completions":
            raise UserError("exact token prompts (prompt_vocab) need the completions endpoint: chat prompts are text")

    @property
    def base(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


@dataclass
class LoadResult:
    mode: LoadMode
    rows: list[dict]                        # harness.metrics.REQUEST_COLUMNS, source="measured"
    wall_start_unix: float                  # when t=0 was, for the environment record
    duration_s: float
    t0_monotonic: float = 0.0               # time.monotonic() at t=0
    model: str = ""
    warmup_requests: int = 0
    notes: list[str] = field(default_factory=list)

    def frame(self):
        import pandas as pd
        from harness.metrics import REQUEST_COLUMNS
        return pd.DataFrame(self.rows, columns=list(REQUEST_COLUMNS))

    def dispatch_delays_s(self) -> np.ndarray:
        return np.array([r["start_s"] - r["scheduled_s"] for r in self.rows], dtype=float)

    def dispatch_summary(self) -> dict:
        """Measured lag between the schedule and the actual send, in ms."""
        d = self.dispatch_delays_s() * 1e3
        if not d.size:
            return {"mean_dispatch_delay_ms": math.nan, "p99_dispatch_delay_ms": math.nan,
                    "max_dispatch_delay_ms": math.nan}
        return {"mean_dispatch_delay_ms": float(d.mean()), "p99_dispatch_delay_ms": float(np.percentile(d, 99)),
                "max_dispatch_delay_ms": float(d.max())}


class LoadSink:
    """Sees a load run as it happens: `start(result)` before the warm-up and again at t=0 (mode, model and
    clocks; no rows yet), then `row(row)` as each request finishes, which hands it to `on_row` (a run folder's
    journal). A run cut short by Ctrl-C, SIGTERM or a failure never returns its LoadResult; `partial(rows)` is
    one over what finished."""

    def __init__(self, on_row: Callable[[dict], None] | None = None):
        self.on_row = on_row
        self.started: LoadResult | None = None

    def start(self, result: LoadResult) -> None:
        self.started = result

    def row(self, row: dict) -> None:
        if self.on_row is not None:
            self.on_row(row)

    def workers_started(self, pids: list[int]) -> None:
        """With workers > 1: the worker processes' ids, once they run (for a supervisor that watches them)."""

    def partial(self, rows: list[dict]) -> LoadResult | None:
        """None when the run stopped before any request was sent (it never started)."""
        if self.started is None:
            return None
        return replace(self.started, rows=rows, duration_s=time.monotonic() - self.started.t0_monotonic,
                       notes=[*self.started.notes, "cut short: only the requests that finished"])


# ---------------------------------------------------------------------------------------------- prompts

def prompt_text(spec: RequestSpec, index: int, seed: int = 0) -> str:
    """`prompt_tokens` common words (one token each on the word tokenizer, about one on BPE tokenizers).

    Requests with the same prefix id share their first `prefix_tokens` words, so prefix caches can hit.
    """
    shared = min(spec.prefix_tokens, spec.prompt_tokens) if spec.prefix_id is not None else 0
    words: list[str] = []
    if shared:
        rng = random.Random(f"prefix:{spec.prefix_id}:{seed}")
        words += rng.choices(WORDS, k=shared)
    rng = random.Random(f"req:{index}:{seed}")
    words += rng.choices(WORDS, k=spec.prompt_tokens - shared)
    return " ".join(words)


def prompt_token_ids(spec: RequestSpec, index: int, seed: int, vocab: int) -> list[int]:
    """Exactly `prompt_tokens` token ids in [lo, vocab), seeded like prompt_text (shared prefixes included): the
    model sees the very lengths the workload states, as the simulator does. Low ids are skipped because
    tokenizers put special tokens there."""
    lo = min(16, vocab - 1)
    shared = min(spec.prefix_tokens, spec.prompt_tokens) if spec.prefix_id is not None else 0
    ids = random.Random(f"prefix:{spec.prefix_id}:{seed}").choices(range(lo, vocab), k=shared) if shared else []
    return ids + random.Random(f"req:{index}:{seed}").choices(range(lo, vocab), k=spec.prompt_tokens - shared)


def request_body(target: Target, model: str, spec: RequestSpec, index: int, seed: int) -> dict:
    body: dict = {"model": model, "max_tokens": spec.output_tokens, "stream": True,
                  "stream_options": {"include_usage": True}, "temperature": 0.0, "seed": seed + index}
    text = (prompt_token_ids(spec, index, seed, target.prompt_vocab) if target.prompt_vocab
            else prompt_text(spec, index, seed))
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if target.pin_output:
        body.update(min_tokens=spec.output_tokens, ignore_eos=True)
    if target.send_prefix_id and spec.prefix_id is not None:
        body["prefix_id"] = spec.prefix_id
    return body


# ---------------------------------------------------------------------------------------------- one request

class _Clock:
    """t=0 of a run. `lead_s` puts t=0 that far ahead, so worker processes told of it are waiting when it
    comes. perf_counter and monotonic are system-wide clocks (CLOCK_MONOTONIC on Linux, mach_absolute_time
    on macOS), so a worker rebuilt with `shared(t0, t0_monotonic)` reads the same instants as its parent."""

    def __init__(self, lead_s: float = 0.0):
        self.t0 = time.perf_counter() + lead_s
        self.t0_monotonic = time.monotonic() + lead_s   # to place backend events (monotonic) on this run's clock

    @classmethod
    def shared(cls, t0: float, t0_monotonic: float) -> "_Clock":
        clock = cls.__new__(cls)
        clock.t0, clock.t0_monotonic = t0, t0_monotonic
        return clock

    def now(self) -> float:
        return time.perf_counter() - self.t0


def _row(spec: RequestSpec, scheduled: float) -> dict:
    return {"request_id": spec.request_id, "source": "measured", "scheduled_s": scheduled, "start_s": math.nan,
            "first_token_s": math.nan, "end_s": math.nan, "prompt_tokens": spec.prompt_tokens,
            "output_tokens": 0, "cached_tokens": 0, "chunk_times_s": [], "success": False, "error": ""}


async def send_one(client: httpx.AsyncClient, url: str, body: dict, row: dict, clock: _Clock) -> dict:
    """POST one streaming request and fill `row` with its timestamps and usage."""
    chunks: list[float] = row["chunk_times_s"]
    state = {"usage": None, "error": None, "done": False}
    row["start_s"] = clock.now()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:300]
                state["error"] = f"HTTP {resp.status_code}: {detail}"
            else:
                await _read_sse(resp, chunks, state, clock)
    except (httpx.HTTPError, OSError) as exc:
        state["error"] = f"{type(exc).__name__}: {exc}"
    return _finish_row(row, state, clock)


async def _read_sse(resp: httpx.Response, chunks: list[float], state: dict, clock: _Clock) -> None:
    # aiter_raw skips httpx's decoder chain, a cost per read; only a compressed stream needs it
    reads = resp.aiter_bytes() if resp.headers.get("content-encoding") else resp.aiter_raw()
    buf = b""
    async for data in reads:
        now = clock.now()   # every event in this read arrived together
        buf += data
        if b"\r" in buf:   # on the joined buffer, so a CRLF split over two reads is still one line end
            buf = buf.replace(b"\r\n", b"\n")
        *events, buf = buf.split(b"\n\n")
        for event in events:
            _handle_event(event, now, chunks, state)


# A one-line `data: {...}` event whose first choice's content/text is a non-empty string; any quote inside a
# JSON string is escaped, so the pattern cannot match inside a value.
_PLAIN_CONTENT = re.compile(rb'data: ?\{.*"(?:content|text)": ?"(?!")')


def _is_plain_content(event: bytes) -> bool:
    """True for an event that certainly carries content and nothing else the generator reads (no usage, no
    error, one data line): nearly every event of a stream, and these skip json.loads. Anything else takes
    the full path. (It reads any choice's content, the full path the first one's: the generator asks for
    one choice.)"""
    return (b"\n" not in event and b'"usage"' not in event and b'"error"' not in event
            and _PLAIN_CONTENT.match(event) is not None)


def _handle_event(event: bytes, now: float, chunks: list[float], state: dict) -> None:
    if _is_plain_content(event):
        chunks.append(now)
        return
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            state["done"] = True
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            state["error"] = f"bad SSE payload: {payload[:100]!r}"
            return
        if obj.get("error"):
            state["error"] = f"stream error: {obj['error']}"
        if _has_content(obj):
            chunks.append(now)
        if obj.get("usage"):
            state["usage"] = obj["usage"]


def _has_content(obj: dict) -> bool:
    choices = obj.get("choices") or ()
    if not choices:
        return False
    choice = choices[0]
    delta = choice.get("delta")
    return bool(delta.get("content") if delta is not None else choice.get("text"))


def _finish_row(row: dict, state: dict, clock: _Clock) -> dict:
    chunks = row["chunk_times_s"]
    row["end_s"] = chunks[-1] if chunks else clock.now()
    row["first_token_s"] = chunks[0] if chunks else math.nan
    usage = state["usage"] or {}
    if usage:
        row["prompt_tokens"] = int(usage.get("prompt_tokens") or row["prompt_tokens"])
        row["output_tokens"] = int(usage.get("completion_tokens") or 0)
        row["cached_tokens"] = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    else:
        row["output_tokens"] = len(chunks)   # a server that ignores include_usage: the best we can count
    error = state["error"]
    if error is None and not chunks:
        error = "no content chunks"
    row["success"] = error is None
    row["error"] = error or ""
    return row


# ---------------------------------------------------------------------------------------------- schedules

def _as_specs(workload: Workload | Sequence[RequestSpec]) -> list[RequestSpec]:
    return list(workload)


def _effective_mode(mode: LoadMode, workload) -> LoadMode:
    if mode.kind == "workload" and isinstance(workload, Workload) and workload.closed_loop:
        return LoadMode("concurrent", float(workload.concurrency))
    return mode


def schedule(mode: LoadMode, specs: Sequence[RequestSpec]) -> np.ndarray | None:
    """Send times (s) for open-loop modes; None for closed-loop ones."""
    n = len(specs)
    match mode.kind:
        case "workload":
            return np.array([s.arrival_s for s in specs], dtype=float)
        case "constant":
            return np.arange(n) / mode.value
        case "poisson":
            gaps = np.random.default_rng(mode.seed).exponential(1.0 / mode.value, size=n)
            return np.cumsum(gaps) - gaps[0]
    return None


def _concurrency(mode: LoadMode) -> int:
    return 1 if mode.kind == "synchronous" else int(mode.value)


# ---------------------------------------------------------------------------------------------- the run

async def discover_model(client: httpx.AsyncClient, target: Target) -> str:
    if target.model:
        return target.model
    try:
        resp = await client.get(f"{target.base}/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise UserError(f"cannot list models at {target.base}/models ({exc}); pass the model name") from None


def endpoint_url(target: Target) -> str:
    return f"{target.base}/{'chat/completions' if target.endpoint == 'chat' else 'completions'}"


def client_hint(mode: LoadMode) -> int:
    """Connections worth keeping alive: the concurrency of a closed loop, 64 for an open one."""
    return _concurrency(mode) if mode.kind in ("synchronous", "concurrent") else 64


def _client(target: Target, concurrency_hint: int, ssl_context=None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(concurrency_hint, 16))
    return httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(target.timeout_s, connect=10),
                             verify=True if ssl_context is None else ssl_context)


# Streams are spread over up to this many HTTP clients: httpcore 1.0's pool does O(connections^2) work on
# every request start and end (for each idle connection it counts the whole pool), which was 40 % of the
# generator's time at 64 streams (measured, cProfile); small pools keep that term small.
MAX_CLIENT_SHARDS = 16


class ClientShards:
    """Several httpx clients with small pools, one SSL context between them (a client makes its own in
    about 35 ms otherwise); request or stream k uses `pick(k)`."""

    def __init__(self, target: Target, concurrency_hint: int):
        count = max(1, min(MAX_CLIENT_SHARDS, concurrency_hint))
        ssl_context = httpx.create_ssl_context()
        self.clients = [_client(target, math.ceil(concurrency_hint / count), ssl_context) for _ in range(count)]

    def pick(self, k: int) -> httpx.AsyncClient:
        return self.clients[k % len(self.clients)]

    async def __aenter__(self) -> "ClientShards":
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients), return_exceptions=True)


async def run_load(target: Target, workload: Workload | Sequence[RequestSpec], mode: LoadMode = LoadMode(), *,
                   warmup: int = 0, seed: int = 0, max_duration_s: float | None = None,
                   progress: Callable[[int, int], None] | None = None, sink: LoadSink | None = None,
                   workers: int = 1) -> LoadResult:
    """Send the workload to `target` in `mode`; returns per-request rows (the warm-up requests excluded).

    `max_duration_s` bounds the run: no request is sent after it, and requests still running at
    twice that are cancelled and recorded as failed. `progress(done, total)` is called as requests end, and
    `sink` (LoadSink) gets each finished request's row at once, so an interrupted run can keep them.
    `workers` > 1 spreads the requests over that many processes on one clock (harness.serving.loadgen_workers).
    """
    specs = _as_specs(workload)
    mode = _effective_mode(mode, workload)
    if workers < 1:
        raise UserError(f"workers must be at least 1, not {workers}")
    if workers > 1:
        from harness.serving.loadgen_workers import run_in_workers
        return await run_in_workers(target, specs, mode, workers=workers, warmup=warmup, seed=seed,
                                    max_duration_s=max_duration_s, progress=progress, sink=sink)
    hint = client_hint(mode)
    async with ClientShards(target, hint) as clients:
        model = await discover_model(clients.pick(0), target)
        url = endpoint_url(target)
        sink = sink or LoadSink()
        _begin(sink, mode, model, warmup)   # a run stopped during the warm-up still gets a summary (of nothing)
        if warmup:
            await _warmup(clients, url, target, model, warmup_specs(specs, warmup), seed, hint)
        bodies = [request_body(target, model, s, i, seed) for i, s in enumerate(specs)]
        with gc_frozen():
            clock, wall_start = _begin(sink, mode, model, warmup)
            tally = _Tally(len(specs), progress, sink)
            try:
                rows = await _dispatch(clients, url, specs, bodies, mode, clock, max_duration_s, tally)
            except asyncio.CancelledError:   # Ctrl-C: the requests cut off from here on did not finish
                tally.stopping = True
                raise
            duration = clock.now()
    return LoadResult(mode=mode, rows=rows, wall_start_unix=wall_start, duration_s=duration,
                      t0_monotonic=clock.t0_monotonic, model=model, warmup_requests=warmup)


@contextlib.contextmanager
def gc_frozen():
    """The measured part of a run with the heap as it was frozen out of the garbage collector's reach.

    A full (generation 2) collection stops the event loop for as long as it takes to scan every tracked
    object: 29-45 ms measured here with the harness, httpx and the server's modules loaded. It comes once
    the allocations since the last one cross the collector's threshold, so a sequence of runs (100, 200,
    300 req/s) gets it in whichever run crosses the threshold: the p99 dispatch delay of that one run jumps
    to the pause's length (issue 15's 200 req/s anomaly). Collecting once before t=0 and freezing what is
    left means the run's own collections scan only the objects the run made (its rows, its tasks).
    """
    frozen_by_caller = gc.get_freeze_count() > 0
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_by_caller:
            gc.unfreeze()


def _begin(sink: LoadSink, mode: LoadMode, model: str, warmup: int, lead_s: float = 0.0) -> tuple[_Clock, float]:
    """A new t=0 on the client's clock (and its wall time), told to the sink."""
    clock, wall_start = _Clock(lead_s), time.time() + lead_s
    sink.start(LoadResult(mode=mode, rows=[], wall_start_unix=wall_start, duration_s=0.0,
                          t0_monotonic=clock.t0_monotonic, model=model, warmup_requests=warmup))
    return clock, wall_start


def warmup_specs(specs: Sequence[RequestSpec], count: int) -> list[tuple[int, RequestSpec]]:
    """The warm-up requests, numbered: (i, the workload's request i mod n renamed warmup-i)."""
    return [(i, replace(specs[i % len(specs)], request_id=f"warmup-{i}")) for i in range(count)]


async def _warmup(clients: ClientShards, url, target, model, warm: list[tuple[int, RequestSpec]], seed,
                  concurrency) -> None:
    """Requests before t=0 that fill connection pools and caches; never recorded."""
    clock = _Clock()
    sem = asyncio.Semaphore(max(1, min(concurrency, len(warm))))

    async def one(i, spec):
        async with sem:
            body = request_body(target, model, spec, -1 - i, seed)
            await send_one(clients.pick(i), url, body, _row(spec, 0.0), clock)
    await asyncio.gather(*(one(i, s) for i, s in warm))


class _Tally:
    def __init__(self, total: int, progress, sink: LoadSink):
        self.total, self.progress, self.sink, self.done = total, progress, sink, 0
        self.stopping = False

    async def send(self, client, url, body, row, clock) -> None:
        await send_one(client, url, body, row, clock)
        if self.stopping:   # its connection was closed under it by the interrupt: not a finished request
            return
        self.sink.row(row)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


async def _dispatch(clients: ClientShards, url, specs, bodies, mode, clock, max_duration_s,
                    tally: _Tally) -> list[dict]:
    times = schedule(mode, specs)
    deadline = max_duration_s if max_duration_s is not None else math.inf
    if times is None:
        coro = _closed_loop(clients, url, specs, bodies, _concurrency(mode), clock, deadline, tally)
    else:
        coro = _open_loop(clients, url, specs, bodies, times, clock, deadline, tally)
    return await coro


async def _open_loop(clients, url, specs, bodies, times, clock, deadline, tally: _Tally) -> list[dict]:
    tasks, rows = [], []
    for k, (spec, body, at) in enumerate(zip(specs, bodies, times)):
        if at > deadline:
            break
        delay = at - clock.now()
        if delay > 0:
            await asyncio.sleep(delay)
        rows.append(_row(spec, float(at)))
        tasks.append(asyncio.create_task(tally.send(clients.pick(k), url, body, rows[-1], clock)))
    await _wait_bounded(tasks, 2 * deadline - clock.now())
    return _mark_unfinished(rows, clock)


async def _closed_loop(clients, url, specs, bodies, concurrency, clock, deadline, tally: _Tally) -> list[dict]:
    queue = list(zip(specs, bodies))[::-1]
    rows: list[dict] = []

    async def worker(client):
        while queue and clock.now() < deadline:
            spec, body = queue.pop()
            rows.append(_row(spec, clock.now()))
            await tally.send(client, url, body, rows[-1], clock)
    tasks = [asyncio.create_task(worker(clients.pick(j))) for j in range(min(concurrency, len(queue)))]
    await _wait_bounded(tasks, 2 * deadline - clock.now())
    return sorted(_mark_unfinished(rows, clock), key=lambda r: r["request_id"])


async def _wait_bounded(tasks: list[asyncio.Task], timeout_s: float) -> None:
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=None if math.isinf(timeout_s) else max(timeout_s, 0))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _mark_unfinished(rows: list[dict], clock: _Clock) -> list[dict]:
    """Requests cut off by the run's time bound stay in the record, as failures."""
    for row in rows:
        if math.isnan(row["end_s"]):
            chunks = row["chunk_times_s"]
            row.update(end_s=clock.now(), first_token_s=chunks[0] if chunks else math.nan, success=False,
                       error="cancelled: run time limit", output_tokens=len(chunks))
    return rows


def sweep_modes(kind: str, values: Iterable[float], seed: int = 0) -> list[LoadMode]:
    """One mode per rate (constant/poisson) or concurrency (concurrent)."""
    return [LoadMode(kind, float(v), seed) for v in values]


def run_load_sync(target: Target, workload, mode: LoadMode = LoadMode(), **kwargs) -> LoadResult:
    """`run_load` from synchronous code (the CLI and the run orchestrator)."""
    return asyncio.run(run_load(target, workload, mode, **kwargs))
