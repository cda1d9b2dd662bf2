"""One whole simulated run: load the model, feed a workload, serve it to the end, hand back records."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import simpy

from harness.specs import LoadReport
from harness.costmodel import Profile
from harness.specs import Cluster, ModelSpec, PartitionPlan
from harness.workloads import Workload
from sim.engine import Engine, EngineConfig
from sim.loading import load_nodes


@dataclass
class SimResult:
    requests: object            # pyarrow Table, harness.metrics.REQUEST_COLUMNS
    steps: object               # pyarrow Table, harness.metrics.STEP_COLUMNS
    load: LoadReport
    stats: dict = field(default_factory=dict)   # engine facts: KV capacity and peaks, preemptions, steps


def simulate(cluster: Cluster, model: ModelSpec, plan: PartitionPlan, profile: Profile, workload: Workload,
             config: EngineConfig = EngineConfig(), include_load: bool = True, weights_local: set | None = None,
             progress=None, step_sink=None, cache=None) -> SimResult:
    """Simulate serving `workload` on `plan`; deterministic for a given workload (its seed decides everything).

    Times in the records are seconds from the start of the run; with include_load the workload starts when
    every node has loaded its weights. `progress(done, total, virtual_now)` is called as requests finish.
    `step_sink(table)`: stream step records out in pieces (SimResult.steps is then None), which keeps memory
    flat on long runs; without it they are returned as one table.
    `cache`: a sim.prefix_cache.PrefixCache; requests' declared shared prefixes are looked up on arrival
    (cached tokens are not prefilled, lower-tier hits wait for their load) and remembered after the prefill.
    """
    if cache is not None:   # its L1 share comes out of the pool running requests use
        config = cache.engine_config(config)
    env = simpy.Environment()
    wall = time.perf_counter()
    total = len(workload)
    state = {"done": 0, "next": 0, "every": max(total // 100, 1), "cache": cache, "keys": {}}
    engine_box: list[Engine] = []

    def on_finish(t, slots):
        state["done"] += len(slots)
        if progress and state["done"] // state["every"] != (state["done"] - len(slots)) // state["every"]:
            progress(state["done"], total, t)
        if workload.closed_loop:
            for _ in range(len(slots)):
                _submit_next(engine_box[0], workload, state)

    probe = Engine(simpy.Environment(), cluster, model, plan, profile, config)  # stage models for loading
    load_end, load_rows = ({}, [])
    if include_load:
        load_end, load_rows = load_nodes(env, cluster, probe.stages, profile, weights_local)
        env.run()
    t_ready = max(load_end.values(), default=0.0)
    if step_sink is not None and load_rows:
        step_sink(_with_load_rows(probe.steps_table(), load_rows))
    def on_tokens(t, slots, finished):   # the first token ends a prefill: its prefix blocks are cached now
        for slot in slots.tolist():
            keys = state["keys"].pop(slot, None)
            if keys:
                cache.remember(keys)

    engine = Engine(env, cluster, model, plan, profile, config, start_at=t_ready, on_finish=on_finish,
                    step_sink=step_sink, on_tokens=on_tokens if cache is not None else None)
    engine_box.append(engine)
    if workload.closed_loop:
        env.process(_closed_loop_start(env, engine, workload, state, t_ready))
    else:
        env.process(_open_loop(env, engine, workload, t_ready, state))
    env.run()
    if step_sink is not None:
        engine.flush_steps()
        steps = None
    else:
        steps = _with_load_rows(engine.steps_table(), load_rows)
    requests = engine.requests_table()
    wall = time.perf_counter() - wall
    return SimResult(requests=requests, steps=steps,
                     load=_load_report(engine, load_end, include_load),
                     stats=_stats(engine, t_ready, wall))


def _open_loop(env, engine: Engine, wl: Workload, t0: float, state: dict):
    arr = wl.arrival_s
    # one event per distinct arrival time: a burst of simultaneous requests costs one wake-up
    bounds = np.flatnonzero(np.diff(arr)) + 1
    starts = np.concatenate([[0], bounds]) if len(arr) else []
    ends = np.concatenate([bounds, [len(arr)]]) if len(arr) else []
    for a, b in zip(starts, ends):
        at = t0 + float(arr[a])
        if at > env.now:
            yield env.timeout(at - env.now)
        for i in range(a, b):
            _submit(env, engine, wl, i, state, scheduled_s=at)


def _closed_loop_start(env, engine: Engine, wl: Workload, state: dict, t0: float):
    if t0 > env.now:
        yield env.timeout(t0 - env.now)
    for _ in range(min(wl.concurrency, len(wl))):
        _submit_next(engine, wl, state)


def _submit_next(engine: Engine, wl: Workload, state: dict) -> None:
    i = state["next"]
    if i < len(wl):
        state["next"] = i + 1
        _submit(engine.env, engine, wl, i, state)


def _submit(env, engine: Engine, wl: Workload, i: int, state: dict, scheduled_s: float | None = None) -> None:
    """Hand request i to the engine, first asking the prefix cache (if any) how much of its prompt it holds."""
    prompt, out, rid = int(wl.prompt_tokens[i]), int(wl.output_tokens[i]), wl.request_id(i)
    cache = state["cache"]
    if cache is None:
        engine.submit(prompt, out, rid, scheduled_s=scheduled_s)
        return
    spec = wl.request(i)
    keys = cache.keys_from_prefix(spec.prefix_id, spec.prefix_tokens)
    hit = cache.admit(keys, prompt)
    if hit.load_s > 0:   # lower-tier blocks travel to unified memory before the request can start
        env.process(_submit_later(env, engine, hit.load_s, prompt - hit.cached_tokens, out, rid, keys, state,
                                  scheduled_s if scheduled_s is not None else env.now, hit.cached_tokens))
        return
    slot = engine.submit(prompt - hit.cached_tokens, out, rid, scheduled_s=scheduled_s, cached_tokens=hit.cached_tokens)
    state["keys"][slot] = keys


def _submit_later(env, engine, delay, prompt, out, rid, keys, state, scheduled_s, cached):
    arrived = env.now
    yield env.timeout(delay)
    slot = engine.submit(prompt, out, rid, scheduled_s=scheduled_s, arrived_s=arrived, cached_tokens=cached)
    state["keys"][slot] = keys


def _load_report(engine: Engine, load_end: dict, included: bool) -> LoadReport:
    mem = {}
    peak = engine.kv_peak_bytes()
    for st in engine.stages:
        for n in st.nodes:
            mem[n] = int(st.weight_bytes_node + peak.get(n, 0))
    notes = () if included else ("model loading not simulated",)
    return LoadReport(load_s_per_node=dict(load_end), memory_bytes_per_node=mem, source="simulated", notes=notes)


def _stats(engine: Engine, t_ready: float, wall: float) -> dict:
    peak = engine.kv_peak_bytes()
    return {"source": "simulated", "serving_start_s": t_ready, "virtual_end_s": engine.env.now,
            "engine_steps": engine._step, "preemptions": engine.preemptions,
            "kv_capacity_tokens": engine.kv_capacity_tokens, "kv_peak_tokens": engine.peak_blocks * engine.block,
            "kv_peak_bytes_per_node": peak,
            "weights_bytes_per_node": {n: st.weight_bytes_node for st in engine.stages for n in st.nodes},
            "unfinished": engine.unfinished(), "wall_s": wall, "wall_s_source": "measured"}


def _with_load_rows(steps, load_rows):
    if not load_rows:
        return steps
    import pyarrow as pa
    extra = pa.table({"step": [-1] * len(load_rows), "stage": [r[0] for r in load_rows],
                      "node": [r[1] for r in load_rows], "kind": ["load"] * len(load_rows),
                      "start_s": [float(r[2]) for r in load_rows], "end_s": [float(r[3]) for r in load_rows],
                      "batch_size": [0] * len(load_rows), "tokens": [0] * len(load_rows),
                      "kv_bytes": [0] * len(load_rows), "source": ["simulated"] * len(load_rows)})
    return pa.concat_tables([extra.cast(steps.schema), steps])


def reference_work_s(events: int = 50_000) -> float:
    """Wall time of a fixed SimPy workload (timeouts through one event loop), measured now on this machine.

    The simulator's wall time divided by this is a speed figure that machine load and CPU model largely cancel
    out of, so a CI check can compare it with a committed baseline (a ratio measured in the same run).
    """
    env = simpy.Environment()

    def ticker(n):
        for _ in range(n):
            yield env.timeout(1.0)

    for _ in range(10):
        env.process(ticker(events // 10))
    start = time.perf_counter()
    env.run()
    return time.perf_counter() - start
