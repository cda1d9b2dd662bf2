"""The simulated cluster as a real-time Backend: behind the HTTP server, a client sees the simulated
cluster's time to first token and token cadence on its own clock.

How: one pacer task on the server's event loop maps virtual time to the monotonic clock
(virtual = v0 + (now - w0) * speed) and drives `sim.Engine` incrementally: it sleeps until the wall-clock
time of the engine's next event, then `engine.advance(now)`. A request is `engine.submit()`ted at the
virtual "now" of its arrival, so concurrent HTTP requests batch together exactly as the engine decides.
The engine's `on_tokens` callback turns each micro-batch's tokens into TokenEvents stamped with the wall
time of their virtual emit time.

Known gaps against the simulator run in virtual time:
- the engine reports a micro-batch when its token ids are back at the first stage, so tokens reach the
  client one return hop (link latency) after their emit time; the event's `time_s` is the emit time;
- asyncio timers wake up to ~1 ms late; every token of a step is late by the same amount, so TPOT keeps
  its value and TTFT gains about a millisecond;
- a cancelled request leaves the engine: from the queue at once, from the batch at its next token
  (`Engine.cancel`), so a client that times out creates no invisible load.

The sim generates exactly `max_tokens` tokens (it has no EOS), the same token ids as the instant backend
for a given seed, and counts prompts with the same word tokenizer.
"""
from __future__ import annotations

import asyncio
import functools
import math
import time
from dataclasses import dataclass

import numpy as np

from harness.backends.base import (BackendUnavailable, GenerationRequest, LoadReport, QueueFull, QueueStream,
                                   TokenEvent, plain_chat_prompt, step_frame)
from harness.backends.instant import WordTokenizer, output_token


@dataclass
class _Pending:
    request: GenerationRequest
    queue: asyncio.Queue
    emitted: int = 0
    done: bool = False
    cached: int = 0                  # prompt tokens served by the prefix cache


@dataclass
class SimBackendConfig:
    speed: float = 1.0                   # virtual seconds per wall second (1 = real time)
    max_waiting: int | None = None       # QueueFull beyond this many requests waiting for admission
    include_load: bool = True            # simulate model loading (in virtual time, not paced) for load()'s report
    model_id: str | None = None
    faults: tuple = ()                   # sim.Engine.inject fault dicts, at_s from when serving starts
    # failover: failed node names -> (cluster, plan, cache) on the nodes left; None: a node failure ends serving
    replan: object = None


class SimBackend:
    """Backend over `sim.Engine` paced in real time. Build with the same inputs as `sim.simulate`."""

    name = "sim"
    source = "simulated"   # its latencies are the simulated cluster's, paced on the wall clock

    def __init__(self, cluster, model, plan, profile, engine_config=None, config: SimBackendConfig | None = None,
                 cache=None):
        """`cache`: a sim.prefix_cache.PrefixCache; its L1 share is taken out of the engine's KV pool."""
        from sim.admission import Admission
        from sim.engine import EngineConfig
        self.cluster, self.model, self.plan, self.profile = cluster, model, plan, profile
        self.engine_config = engine_config or EngineConfig()
        self.cache = cache
        self.admission = Admission(cache)   # the same admission process sim.simulate runs in virtual time
        if cache is not None:
            self.engine_config = cache.engine_config(self.engine_config)
        self.config = config or SimBackendConfig()
        if not self.config.speed > 0:
            raise ValueError("speed must be > 0")
        self.model_id = self.config.model_id or getattr(model, "name", "sim")
        self.tokenizer = WordTokenizer()
        self.engine = None
        self._pending: dict[int, _Pending] = {}
        self._pacer: asyncio.Task | None = None
        self._wakeup: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._w0 = self._v0 = 0.0
        self.cancelled = 0
        self.failovers: list[dict] = []      # each node failure the cluster served on after (or tried to)
        self._failed: frozenset = frozenset()
        self._earlier_steps: list = []       # step records of the engines a failover replaced
        self._resume_v = 0.0                 # virtual time serving resumes after a failover's reload

    # ------------------------------------------------------------------ tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat_prompt(self, messages: list[dict]) -> str:
        return plain_chat_prompt(messages)

    # ------------------------------------------------------------------ clock

    def virtual_now(self) -> float:
        return self._v0 + (time.monotonic() - self._w0) * self.config.speed

    def wall_of(self, virtual_s: float) -> float:
        """time.monotonic() value at which virtual time `virtual_s` happens."""
        return self._w0 + (virtual_s - self._v0) / self.config.speed

    # ------------------------------------------------------------------ lifecycle

    async def load(self) -> LoadReport:
        report = self._load_report()
        self.engine = self._new_engine(0.0)
        self._w0, self._v0 = time.monotonic(), 0.0
        self._closed = False
        self._pacer = asyncio.get_running_loop().create_task(self._pace(), name="sim-pacer")
        return report

    def _new_engine(self, start_v: float):
        """An engine over the current plan whose clock starts at virtual `start_v`, with the faults still ahead."""
        import simpy
        from sim.engine import Engine
        engine = Engine(simpy.Environment(initial_time=start_v), self.cluster, self.model, self.plan, self.profile,
                        self.engine_config, on_tokens=self._on_tokens, on_finish=self._on_finish)
        known = {n.name for n in self.cluster.nodes}
        for fault in self.config.faults:
            ahead = fault["at_s"] >= start_v and all(fault.get(k) in known for k in ("node", "peer") if k in fault)
            if ahead:
                engine.inject(dict(fault))
        return engine

    def _fail_over(self) -> bool:
        """A node failed: plan again on the nodes left, reload the weights that moved (in virtual time), and
        serve on from there. False when failover is off, or when the nodes left cannot hold the model.
        A link dropped for good counts as losing one of its ends, the one holding fewer of the plan's layers
        (ties: the later in the plan; sim.Engine.end_to_lose), so the same re-planning serves on without it."""
        if self.config.replan is None or self.engine.down_node in self._failed:
            return False
        from harness.specs import DoesNotFit, UserError
        node, at, fault = self.engine.down_node, self.engine.env.now, self.engine.down
        failed = self._failed | {node}
        try:
            cluster, plan, cache = self.config.replan(failed)
        except (DoesNotFit, UserError) as exc:
            self.failovers.append({"failed_node": node, "at_s": at, "fault": fault, "error": str(exc)})
            self._failed = failed
            return False
        self._earlier_steps.append(self.engine.steps_table())
        self._pending.clear()                # every request in flight got its error from the failed engine
        self._failed, self.cluster, self.plan = failed, cluster, plan
        from sim.admission import Admission
        self.cache, self.admission = cache, Admission(cache)
        reload_s = max(self._load_report().load_s_per_node.values(), default=0.0) if self.config.include_load else 0.0
        self._resume_v = at + reload_s
        self.engine = self._new_engine(self._resume_v)
        self.failovers.append({"failed_node": node, "at_s": at, "fault": fault, "reload_s": reload_s,
                               "serving_again_s": self._resume_v,
                               "plan": [{"nodes": list(st.nodes), "layers": [st.layer_start, st.layer_end]}
                                        for st in plan.stages]})
        return True

    def _load_report(self) -> LoadReport:
        import simpy
        from sim.costs import stage_models
        from sim.loading import load_nodes
        stages = stage_models(self.cluster, self.model, self.plan)
        mem = {n: int(st.weight_bytes_node) for st in stages for n in st.nodes}
        if not self.config.include_load:
            return LoadReport({}, mem, "simulated", ("model loading not simulated",))
        env = simpy.Environment()
        done, _rows = load_nodes(env, self.cluster, stages, self.profile)
        env.run()
        return LoadReport(dict(done), mem, "simulated",
                          ("load times simulated in virtual time; serving starts at once in real time",))

    async def close(self) -> None:
        if self._pacer is not None:
            self._pacer.cancel()
            await asyncio.gather(self._pacer, return_exceptions=True)
            self._pacer = None
        for p in self._pending.values():
            p.queue.put_nowait(BackendUnavailable("sim backend closed"))
        self._pending.clear()
        self._closed = True   # the engine stays, so its records can be read after the server stops

    # ------------------------------------------------------------------ the pacer

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                now = self.virtual_now()
                if now >= self.engine.env.now:   # during a failover's reload the new engine's clock is ahead
                    self.engine.advance(now)
                if self.engine.down and self._fail_over():
                    continue
                nxt = _next_event_time(self.engine)
                wake_at = math.inf if math.isinf(nxt) else self.wall_of(nxt)
                if wake_at <= time.monotonic():
                    await asyncio.sleep(0)       # due already: let the loop breathe, then advance
                    continue
                await self._sleep_until(loop, wake_at)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:   # an engine bug must fail the waiting requests, not hang them
            self._error = exc
            for p in self._pending.values():
                p.queue.put_nowait(BackendUnavailable(f"sim engine failed: {exc!r}"))
            raise

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, wake_at: float) -> None:
        """Sleep until monotonic time `wake_at` or until a new request kicks us, whichever is first.

        A bare timer on the loop (its clock is time.monotonic) rather than wait_for(): no task per wake-up,
        so tokens leave closer to their simulated time.
        """
        self._wakeup = loop.create_future()
        timer = None if math.isinf(wake_at) else loop.call_at(wake_at, _resolve, self._wakeup)
        try:
            await self._wakeup
        finally:
            if timer is not None:
                timer.cancel()

    def _kick(self) -> None:
        if self._wakeup is not None:
            _resolve(self._wakeup)

    def _on_tokens(self, t: float, slots: np.ndarray, done: np.ndarray) -> None:
        when = self.wall_of(t)
        self.admission.on_tokens(t, slots, done)
        for slot, last in zip(slots.tolist(), done.tolist()):
            p = self._pending.get(slot)
            if p is None:        # cancelled by its client, or a request of another owner
                continue
            token = output_token(p.request, p.emitted)
            p.emitted += 1
            p.done = bool(last)
            p.queue.put_nowait(TokenEvent(token_id=token, text=self.tokenizer.token_text(token), time_s=when,
                                          finish_reason="length" if last else None,
                                          prompt_tokens=len(p.request.prompt), cached_tokens=p.cached))

    def _on_finish(self, t: float, slots: np.ndarray) -> None:
        from sim.engine import FAILED
        for slot in slots.tolist():
            p = self._pending.get(slot)
            if p is not None and self.engine.status[slot] == FAILED:
                p.queue.put_nowait(BackendUnavailable(self.engine.errors.get(slot, "request failed")))

    # ------------------------------------------------------------------ Backend API

    def generate(self, request: GenerationRequest) -> QueueStream:
        """The request's tokens: a QueueStream, so the server takes every token the pacer has emitted and the
        client has not had yet in one write (base.ReadyEvents). The request enters the engine on the stream's
        first `__anext__`."""
        if self.engine is None or self._closed or self._error is not None:
            why = f" ({self._error!r})" if self._error else ""
            raise BackendUnavailable(f"sim backend not loaded or closed{why}")
        return QueueStream(functools.partial(self._admit, request))

    async def _admit(self, request: GenerationRequest):
        """Submits the request; its token queue and what ends it (QueueStream's start)."""
        engine = self.engine
        if self.virtual_now() < engine.env.now:   # failing over: the weights that moved are still loading
            raise BackendUnavailable(f"failing over after {self._failover_cause()}: serving "
                                     f"again at {self._resume_v:.1f} s (simulated)")
        engine.advance(self.virtual_now())
        if engine.down:                      # an injected node failure: the simulated cluster is down
            raise BackendUnavailable(engine.down)
        # only requests the batch cannot take count as waiting: every request sits in the queue until the
        # engine's next step, however much room the batch has
        unadmitted = len(engine.waiting) - engine.free_sequence_slots()
        if self.config.max_waiting is not None and unadmitted >= self.config.max_waiting:
            raise QueueFull(f"{unadmitted} requests waiting beyond the batch's free places "
                            f"(max_waiting={self.config.max_waiting})")
        pending = _Pending(request, asyncio.Queue())
        entered = asyncio.get_running_loop().create_future()
        engine.advance(self.virtual_now())   # the engine's clock must read "now" before the request arrives
        self.admission.submit(engine, self._admission_request(request),
                              on_submit=lambda s: self._entered(s, pending, entered))
        self._kick()                         # the request (or its cache load) is new work for the pacer
        try:
            slot = await entered             # done already unless lower-tier blocks had to load
        except BaseException:
            entered.cancel()                 # its client left during the load: _entered drops it
            raise
        if slot in engine.errors:
            del self._pending[slot]
            raise BackendUnavailable(engine.errors[slot])
        return pending.queue, functools.partial(self._leave, engine, slot, pending)

    def _leave(self, engine, slot: int, pending: _Pending) -> None:
        """The stream is over (finished, failed or closed by its client): a request still running leaves the
        engine. After a failover the slot number may belong to the new engine's request: compare."""
        if self._pending.get(slot) is pending and self._pending.pop(slot) and not pending.done:
            self.cancelled += 1
            cancel = getattr(engine, "cancel", None)
            if cancel is not None:   # free its batch slot and KV when the engine supports it
                cancel(slot)

    def _failover_cause(self) -> str:
        """What the cluster is failing over from: "NODE failed", or the dropped link's "link A-B down"."""
        last = self.failovers[-1]
        if last["fault"].startswith("link "):
            return last["fault"].split(" at ")[0]
        return f"{last['failed_node']} failed"

    def _admission_request(self, request: GenerationRequest):
        from sim.admission import AdmissionRequest
        keys = self.cache.keys_from_tokens(request.prompt) if self.cache is not None else ()
        return AdmissionRequest(len(request.prompt), request.max_tokens, request.request_id, keys)

    def _entered(self, slot: int, pending: _Pending, entered: asyncio.Future) -> None:
        """The engine has the request (now, or after a cache load): its tokens must find it from here on."""
        if entered.cancelled():
            self.cancelled += 1
            return
        pending.cached = int(self.engine.cached[slot])
        self._pending[slot] = pending
        entered.set_result(slot)

    def stats(self) -> dict:
        engine = self.engine
        if engine is None or self._closed:
            return {"healthy": False, "num_requests_running": 0, "num_requests_waiting": 0}
        from sim.engine import RUNNING
        used = engine.total_blocks - engine.free_blocks
        frac = used / engine.total_blocks if engine.total_blocks else 0.0
        per_node = {n: st.kv_bytes_per_token_node * engine.block * used for st in engine.stages for n in st.nodes}
        reloading = self.virtual_now() < engine.env.now
        return {"healthy": self._error is None and not engine.down and not reloading,
                "error": engine.down or (f"failing over until {self._resume_v:.1f} s" if reloading else None),
                **({"failovers": self.failovers} if self.failovers else {}),
                "num_requests_running": int(np.count_nonzero(engine.status[:engine.n] == RUNNING)),
                "num_requests_waiting": len(engine.waiting),
                "kv_cache_usage": {n: frac for n in per_node}, "kv_cache_bytes": per_node,
                "virtual_now_s": engine.env.now, "preemptions": engine.preemptions,
                "requests_cancelled": self.cancelled, "source": "simulated",
                **({"cache": self.cache.stats()} if self.cache is not None else {})}

    def requests_table(self):
        """The engine's own records of what it served (virtual time, source="simulated")."""
        return self.engine.requests_table()

    def steps_table(self):
        """The engine's step records in virtual time (pyarrow), after those of engines a failover replaced;
        step_table() puts them on a run's clock."""
        import pyarrow as pa
        tables = [*self._earlier_steps, self.engine.steps_table()]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def step_table(self, t0_monotonic: float, t0_unix: float):
        """The engine's step records with virtual times moved onto the run's clock (virtual -> monotonic -> t=0)."""
        if self.engine is None:
            return step_frame()
        df = self.steps_table().to_pandas()
        for col in ("start_s", "end_s"):
            df[col] = self.wall_of(df[col]) - t0_monotonic   # wall_of is linear, so it maps a whole column
        return df


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _next_event_time(engine) -> float:
    """The engine's next real event. SimPy (4.1) re-queues `run(until)`'s spent stop marker at `now` with
    no callbacks, so `env.peek()` right after `advance()` says "now" forever; look past such markers."""
    t = engine.next_event_time()
    env = engine.env
    if t > env.now:
        return t
    return min((item[0] for item in env._queue if item[0] > env.now or item[3].callbacks), default=math.inf)

