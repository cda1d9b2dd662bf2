"""One whole simulated run: load the model, feed a workload, serve it to the end, hand back records."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import simpy

from harness.backend import LoadReport
from harness.costmodel import Profile
from harness.specs import Cluster, ModelSpec, PartitionPlan
from harness.workloads import Workload
from sim.engine import Engine, EngineConfig
from sim.loading import load_nodes


@dataclass
class SimResult:
    requests: object            # pyarrow Table, harness.records.REQUEST_COLUMNS
    steps: object               # pyarrow Table, harness.records.STEP_COLUMNS
    load: LoadReport
    stats: dict = field(default_factory=dict)   # engine facts: KV capacity and peaks, preemptions, steps


def simulate(cluster: Cluster, model: ModelSpec, plan: PartitionPlan, profile: Profile, workload: Workload,
             config: EngineConfig = EngineConfig(), include_load: bool = True, weights_local: set | None = None,
             progress=None, step_sink=None) -> SimResult:
    """Simulate serving `workload` on `plan`; deterministic for a given workload (its seed decides everything).

    Times in the records are seconds from the start of the run; with include_load the workload starts when
    every node has loaded its weights. `progress(done, total, virtual_now)` is called as requests finish.
    `step_sink(table)`: stream step records out in pieces (SimResult.steps is then None), which keeps memory
    flat on long runs; without it they are returned as one table.
    """
    env = simpy.Environment()
    wall = time.perf_counter()
    total = len(workload)
    state = {"done": 0, "next": 0, "every": max(total // 100, 1)}
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
    engine = Engine(env, cluster, model, plan, profile, config, start_at=t_ready, on_finish=on_finish,
                    step_sink=step_sink)
    engine_box.append(engine)
    if workload.closed_loop:
        env.process(_closed_loop_start(env, engine, workload, state, t_ready))
    else:
        env.process(_open_loop(env, engine, workload, t_ready))
    env.run()
    if step_sink is not None:
        engine.flush_steps()
        steps = None
    else:
        steps = _with_load_rows(engine.steps_table(), load_rows)
    requests = engine.requests_table()
    wall = time.perf_counter() - wall
    return SimResult(requests=requests, steps=steps,
                     load=_load_report(engine, load_end, t_ready, include_load),
                     stats=_stats(engine, t_ready, wall))


def _open_loop(env, engine: Engine, wl: Workload, t0: float):
    arr, prompt, out = wl.arrival_s, wl.prompt_tokens, wl.output_tokens
    # one event per distinct arrival time: a burst of simultaneous requests costs one wake-up
    bounds = np.flatnonzero(np.diff(arr)) + 1
    starts = np.concatenate([[0], bounds]) if len(arr) else []
    ends = np.concatenate([bounds, [len(arr)]]) if len(arr) else []
    for a, b in zip(starts, ends):
        at = t0 + float(arr[a])
        if at > env.now:
            yield env.timeout(at - env.now)
        for i in range(a, b):
            engine.submit(int(prompt[i]), int(out[i]), wl.request_id(i), scheduled_s=at)


def _closed_loop_start(env, engine: Engine, wl: Workload, state: dict, t0: float):
    if t0 > env.now:
        yield env.timeout(t0 - env.now)
    for _ in range(min(wl.concurrency, len(wl))):
        _submit_next(engine, wl, state)


def _submit_next(engine: Engine, wl: Workload, state: dict) -> None:
    i = state["next"]
    if i < len(wl):
        state["next"] = i + 1
        engine.submit(int(wl.prompt_tokens[i]), int(wl.output_tokens[i]), wl.request_id(i))


def _load_report(engine: Engine, load_end: dict, t_ready: float, included: bool) -> LoadReport:
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
