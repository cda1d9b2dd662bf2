"""One whole simulated run: load the model, feed a workload, serve it to the end, hand back records."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import simpy

from harness.costmodel import Profile
from harness.metrics import STEP_COLUMNS, arrow_schema
from harness.specs import Cluster, LoadReport, ModelSpec, PartitionPlan
from harness.workloads import Workload
from sim.admission import Admission, AdmissionRequest
from sim.costs import stage_models
from sim.engine import Engine, EngineConfig
from sim.loading import load_nodes


@dataclass
class SimResult:
    requests: object            # pyarrow Table, harness.metrics.REQUEST_COLUMNS
    steps: object               # pyarrow Table, harness.metrics.STEP_COLUMNS
    load: LoadReport
    stats: dict = field(default_factory=dict)   # engine facts: KV capacity and peaks, preemptions, steps
    # EngineConfig(step_records="summary"): harness.metrics.STEP_SUMMARY_COLUMNS, per-window aggregates of the step
    # records, and `steps` (or what step_sink gets) holds only the model-load rows; None with full step records
    step_summary: object = None


def simulate(cluster: Cluster, model: ModelSpec, plan: PartitionPlan, profile: Profile, workload: Workload,
             config: EngineConfig = EngineConfig(), include_load: bool = True, weights_local: set | None = None,
             progress=None, step_sink=None, cache=None, faults=()) -> SimResult:
    """Simulate serving `workload` on `plan`; deterministic for a given workload (its seed decides everything).

    Times in the records are seconds from the start of the run; with include_load the workload starts when
    every node has loaded its weights. `progress(done, total, virtual_now)` is called as requests finish.
    `step_sink(table)`: stream step records out in pieces (SimResult.steps is then None), which keeps memory
    flat on long runs; without it they are returned as one table. With config.step_records="summary" the
    engine's step records are aggregated per window instead (SimResult.step_summary); only load rows remain.
    `faults`: fault dicts (Engine.inject) whose at_s counts from the workload's start.
    `cache`: a sim.prefix_cache.PrefixCache; requests' declared shared prefixes go through sim.admission
    (cached tokens are not prefilled, lower-tier hits wait for their load, prefixes are remembered after the prefill).
    """
    if cache is not None:   # its L1 share comes out of the pool running requests use
        config = cache.engine_config(config)
    env = simpy.Environment()
    wall = time.perf_counter()
    total = len(workload)
    admission = Admission(cache)
    state = {"done": 0, "next": 0, "every": max(total // 100, 1), "admission": admission}
    engine_box: list[Engine] = []

    def on_finish(t, slots):
        state["done"] += len(slots)
        if progress and state["done"] // state["every"] != (state["done"] - len(slots)) // state["every"]:
            progress(state["done"], total, t)
        if workload.closed_loop:
            if engine_box[0].down:   # each refusal finishes at once: submit from an event, not recursively
                env.process(_submit_later(engine_box[0], workload, state, len(slots)))
                return
            for _ in range(len(slots)):
                _submit_next(engine_box[0], workload, state)

    load_end, load_rows = ({}, [])
    if include_load:
        load_end, load_rows = load_nodes(env, cluster, stage_models(cluster, model, plan), profile, weights_local)
        env.run()
    t_ready = max(load_end.values(), default=0.0)
    if step_sink is not None and load_rows:
        step_sink(_with_load_rows(arrow_schema(STEP_COLUMNS).empty_table(), load_rows))
    # without a cache no token callback: the engine fast-forwards decode steps only when nobody listens
    engine = Engine(env, cluster, model, plan, profile, config, start_at=t_ready, on_finish=on_finish,
                    step_sink=step_sink, on_tokens=admission.on_tokens if cache is not None else None)
    engine_box.append(engine)
    for fault in faults:
        engine.inject(fault | {"at_s": t_ready + fault["at_s"]})
    if workload.closed_loop:
        env.process(_closed_loop_start(env, engine, workload, state, t_ready))
    else:
        env.process(_open_loop(env, engine, workload, t_ready, state))
    env.run()
    step_summary = engine.step_summary_table()
    if step_sink is not None:
        engine.flush_steps()
        steps = None
    else:
        steps = _with_load_rows(engine.steps_table(), load_rows)
    requests = engine.requests_table()
    wall = time.perf_counter() - wall
    return SimResult(requests=requests, steps=steps,
                     load=_load_report(engine, load_end, include_load),
                     stats=_stats(engine, t_ready, wall), step_summary=step_summary)


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
            _submit(engine, wl, i, state, scheduled_s=at)


def _closed_loop_start(env, engine: Engine, wl: Workload, state: dict, t0: float):
    if t0 > env.now:
        yield env.timeout(t0 - env.now)
    for _ in range(min(wl.concurrency, len(wl))):
        _submit_next(engine, wl, state)


def _submit_later(engine: Engine, wl: Workload, state: dict, n: int):
    yield engine.env.timeout(0)
    for _ in range(n):
        _submit_next(engine, wl, state)


def _submit_next(engine: Engine, wl: Workload, state: dict) -> None:
    i = state["next"]
    if i < len(wl):
        state["next"] = i + 1
        _submit(engine, wl, i, state)


def _submit(engine: Engine, wl: Workload, i: int, state: dict, scheduled_s: float | None = None) -> None:
    """Hand request i to the engine through the prefix-cache admission (a plain submit when there is no cache)."""
    admission = state["admission"]
    admission.submit(engine, _admission_request(wl, i, admission.cache, scheduled_s))


def _admission_request(wl: Workload, i: int, cache, scheduled_s: float | None) -> AdmissionRequest:
    keys = ()
    if cache is not None:   # only then is the request's prefix worth building
        spec = wl.request(i)
        keys = cache.keys_from_prefix(spec.prefix_id, spec.prefix_tokens)
    return AdmissionRequest(int(wl.prompt_tokens[i]), int(wl.output_tokens[i]), wl.request_id(i), keys, scheduled_s)


def _load_report(engine: Engine, load_end: dict, included: bool) -> LoadReport:
    # weights only, as every backend reports them (harness.summary); the peak KV is in the run's stats
    mem = {n: int(st.weight_bytes_node) for st in engine.stages for n in st.nodes}
    notes = () if included else ("model loading not simulated",)
    return LoadReport(load_s_per_node=dict(load_end), memory_bytes_per_node=mem, source="simulated", notes=notes)


def _stats(engine: Engine, t_ready: float, wall: float) -> dict:
    peak = engine.kv_peak_bytes()
    return {"source": "simulated", "serving_start_s": t_ready, "virtual_end_s": engine.env.now,
            "engine_steps": engine._step,
            "steady_window_steps": engine.steady_steps, "preemptions": engine.preemptions,
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
                      "kv_bytes": [0] * len(load_rows),
                      "compute_s": [float("nan")] * len(load_rows), "source": ["simulated"] * len(load_rows)})
    return pa.concat_tables([extra.cast(steps.schema), steps])


def reference_work_s(events: int = 50_000, repeats: int = 5) -> float:
    """Wall time of a fixed SimPy workload (timeouts through one event loop), measured now on this machine: the
    median of `repeats` timings, since one 0.1 s timing varies up to 2x (a CI run once got half the usual time and
    so failed the ratio gate below).

    The simulator's wall time divided by this is a speed figure that machine load and CPU model largely cancel
    out of, so a CI check can compare it with a committed baseline (a ratio measured in the same run).
    """
    return statistics.median(_reference_once(events) for _ in range(repeats))


def _reference_once(events: int) -> float:
    env = simpy.Environment()

    def ticker(n):
        for _ in range(n):
            yield env.timeout(1.0)

    for _ in range(10):
        env.process(ticker(events // 10))
    start = time.perf_counter()
    env.run()
    return time.perf_counter() - start
