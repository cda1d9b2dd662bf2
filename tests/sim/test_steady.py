"""Several schedulers' steady decode fast-forwarded in one event (sim.steady) must give exactly the rows of
stepping them one micro-batch at a time: every request and step row compared value for value."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import simpy

from harness import catalog
from harness.catalog import load_model
from harness.costmodel import PlanOptions, load_profile, stage_models
from harness.workloads import build_workload, parse_workload
from sim import Engine, EngineConfig, simulate
from sim.prefix_cache import make_prefix_cache
from sim.steady import decode_times
from strategies.registry import get_strategy
from tests.sim.conftest import feed_and_probe, make_cluster, make_plan, make_profile
from tests.sim.test_sim_golden import CHATS, _rows


def _four_stage_70b():
    cluster, model = catalog.load_cluster("m2ultra-4x-tb4"), catalog.load_model("llama-3.1-70b", 4)
    profile = load_profile()
    return cluster, model, get_strategy("uniform")(cluster, model, PlanOptions(profile)), profile


def _small(stages=3, tp=False):
    model = load_model("llama-3.1-8b", 4, 64)
    if tp:
        return make_cluster(3), model, make_plan(model, [("n0", "n1"), ("n2",)], [20, 12]), make_profile()
    q = model.num_layers // stages
    plan = make_plan(model, [(f"n{i}",) for i in range(stages)], [q] * (stages - 1) + [model.num_layers - q * (stages - 1)])
    return make_cluster(stages), model, plan, make_profile()


def _both(setup, workload, config=EngineConfig(), **kw):
    """(fast, step by step) results of one seeded run."""
    out = []
    for steady in (True, False):
        cfg = dataclasses.replace(config, fast_forward_schedulers=steady)
        out.append(simulate(*setup, build_workload(workload), cfg, include_load=False, **kw))
    return out


def _assert_same(fast, slow):
    assert _rows(fast.requests) == _rows(slow.requests)
    assert _rows(fast.steps) == _rows(slow.steps)
    for key in ("engine_steps", "preemptions", "kv_peak_tokens", "virtual_end_s", "unfinished"):
        assert fast.stats[key] == slow.stats[key], key


CASES = {
    "light 70b, 4 stages": (_four_stage_70b, "poisson,rate=0.2,n=120,prompt=512,output=128,seed=0", {}, ()),
    "3 stages, 2 micro-batches": (_small, "poisson,rate=1,n=80,prompt=300,output=120,seed=2",
                                  {"micro_batches": 2}, ()),
    "6 micro-batches on 3 stages": (_small, "poisson,rate=2,n=80,prompt=200,output=100,seed=8",
                                    {"micro_batches": 6}, ()),
    "tensor parallel": (lambda: _small(tp=True), "poisson,rate=1.5,n=80,prompt=256,output=90,seed=4", {}, ()),
    "kv pool short (preemptions)": (_small, "poisson,rate=4,n=60,prompt=256,output=160,seed=5",
                                    {"kv_tokens": 3000, "max_batched_tokens": 512}, ()),
    "node down": (_small, "poisson,rate=1,n=80,prompt=256,output=120,seed=3", {},
                  ({"kind": "node_down", "node": "n1", "at_s": 40.0},)),
    "straggler": (_small, "poisson,rate=1,n=80,prompt=256,output=120,seed=3", {},
                  ({"kind": "straggler", "node": "n2", "factor": 1.7, "at_s": 30.0},)),
    "slow link": (_small, "poisson,rate=1,n=80,prompt=256,output=120,seed=3", {},
                  ({"kind": "slow_link", "node": "n0", "peer": "n1", "factor": 3.0, "at_s": 30.0},)),
    "link flap": (_small, "poisson,rate=1,n=80,prompt=256,output=120,seed=3", {},
                  ({"kind": "link_down", "node": "n1", "peer": "n2", "at_s": 30.0, "duration_s": 2.0},)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_steady_windows_give_the_step_by_step_rows(name):
    setup, workload, config, faults = CASES[name]
    fast, slow = _both(setup(), parse_workload(workload), EngineConfig(**config), faults=faults)
    _assert_same(fast, slow)
    assert slow.stats["steady_window_steps"] == 0
    if name in ("light 70b, 4 stages", "3 stages, 2 micro-batches", "tensor parallel", "node down", "straggler"):
        assert fast.stats["steady_window_steps"] > 0.3 * fast.stats["engine_steps"]    # the fast path ran


def test_closed_loop_submits_from_finishes_as_step_by_step():
    spec = {"kind": "synthetic", "num_requests": 60, "seed": 6, "prompt": {"dist": "uniform", "low": 16, "high": 400},
            "output": {"dist": "uniform", "low": 20, "high": 150}, "closed_loop": {"concurrency": 5}}
    fast, slow = _both(_small(), spec, EngineConfig(max_num_seqs=2))     # spread over the schedulers
    _assert_same(fast, slow)
    assert fast.stats["steady_window_steps"] > 0


def test_prefix_cache_runs_give_the_step_by_step_rows():
    setup = _small()
    fast, slow = (simulate(*setup, build_workload(CHATS), EngineConfig(fast_forward_schedulers=steady),
                           include_load=False, cache=make_prefix_cache("lru", *setup)) for steady in (True, False))
    _assert_same(fast, slow)


def test_a_probe_reading_the_engine_sees_the_step_by_step_state():
    """An outside process is an event: a window stops before it, so what it reads is what stepping gives."""
    setup, wl = _small(), build_workload(parse_workload("poisson,rate=1,n=60,prompt=256,output=120,seed=9"))
    seen = {}
    for steady in (True, False):
        env = simpy.Environment()
        eng = Engine(env, *setup, EngineConfig(fast_forward_schedulers=steady))
        samples = seen[steady] = []
        feed_and_probe(env, eng, wl, 0.37,
                       lambda: samples.append((env.now, eng._step, eng.free_blocks, eng._stage_free[0])))
        env.run(until=float(wl.arrival_s[-1]) + 30)
        samples.append(_rows(eng.requests_table()))
    assert seen[True] == seen[False]


@pytest.mark.parametrize("attention_apart", [False, True])
def test_decode_times_are_the_cost_model_bit_for_bit(attention_apart):
    cluster, model, plan, profile = _small(tp=True)
    if attention_apart:
        profile = make_profile(attn_eta_bw=0.6, attn_mu=0.4)     # Profile.attention_apart
    for n in (1, 3, 17):
        terms = [st.decode_terms(model, profile, n) for st in stage_models(cluster, model, plan)]
        ctx = (np.arange(40, dtype=np.int64) * n + 1000 * n).astype(np.float64)
        got = decode_times(terms, ctx)
        want = np.array([[t.at(float(c)) for c in ctx] for t in terms])
        assert got.tolist() == want.tolist()
