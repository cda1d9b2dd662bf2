"""Seeded simulator runs must give the same request and step rows as the code they were saved from.

The golden files were written by the simulator before the speed work (issue 15, item 3); any change that makes
the simulator faster must leave every row identical. Regenerate only on purpose: SIM_GOLDEN_WRITE=1 pytest this.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness import catalog
from harness.catalog import load_model
from harness.costmodel import PlanOptions, load_profile
from harness.workloads import build_workload, parse_workload
from sim import simulate
from sim.prefix_cache import make_prefix_cache
from strategies.registry import get_strategy
from tests.sim.conftest import make_cluster, make_plan, make_profile

GOLDEN = Path(__file__).parent / "golden"
CHATS = {"kind": "conversations", "conversations": 4, "turns": 3, "system_prompt_tokens": 1024,
         "user": 64, "output": 16, "think_time_s": 5.0, "arrival": {"process": "poisson", "rate": 0.5}, "seed": 3}


def _one_stage():
    model = load_model("llama-2-7b", 4)
    return make_cluster(1), model, make_plan(model, [("n0",)], [model.num_layers]), make_profile()


def _four_stages():
    model = load_model("llama-3.1-70b", 4)
    q = model.num_layers // 4
    plan = make_plan(model, [("n0",), ("n1",), ("n2",), ("n3",)], [q, q, q, model.num_layers - 3 * q])
    return make_cluster(4), model, plan, make_profile()


def _uniform_8b():
    cluster, model = catalog.load_cluster("m2ultra-4x-tb4"), catalog.load_model("llama-3.1-8b", 4)
    profile = load_profile()
    return cluster, model, get_strategy("uniform")(cluster, model, PlanOptions(profile)), profile


def _run(setup, workload, **kw):
    cluster, model, plan, profile = setup
    res = simulate(cluster, model, plan, profile, build_workload(workload), **kw)
    return res.requests, res.steps


def scenario(name):
    if name == "one_stage":
        return _run(_one_stage(), parse_workload("poisson,rate=1,n=60,prompt=512,output=128,seed=7"))
    if name == "four_stages_light":
        return _run(_four_stages(), parse_workload("poisson,rate=0.2,n=20,prompt=512,output=128,seed=5"))
    if name == "four_stages_busy":
        return _run(_four_stages(), parse_workload("poisson,rate=2,n=40,prompt=512,output=64,seed=11"),
                    include_load=False)
    if name == "caching":
        setup = _uniform_8b()
        cache = make_prefix_cache("lru", *setup)
        return _run(setup, CHATS, include_load=False, cache=cache)
    if name == "fault":
        model = load_model("llama-3.1-8b", 4, 64)
        setup = make_cluster(3), model, make_plan(model, [("n0",), ("n1",)], [16, 16]), make_profile()
        return _run(setup, parse_workload("poisson,rate=2,n=60,prompt=256,output=64,seed=3"), include_load=False,
                    faults=[dict(kind="node_down", node="n1", at_s=8.0)])
    raise ValueError(name)


SCENARIOS = ["one_stage", "four_stages_light", "four_stages_busy", "caching", "fault"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_rows_match_golden(name):
    requests, steps = scenario(name)
    if os.environ.get("SIM_GOLDEN_WRITE") == "1":
        GOLDEN.mkdir(exist_ok=True)
        pq.write_table(requests, GOLDEN / f"{name}.requests.parquet")
        pq.write_table(steps, GOLDEN / f"{name}.steps.parquet")
    want_requests = pq.read_table(GOLDEN / f"{name}.requests.parquet")
    want_steps = pq.read_table(GOLDEN / f"{name}.steps.parquet")
    assert requests.schema == want_requests.schema and steps.schema == want_steps.schema
    assert _rows(requests) == _rows(want_requests)
    assert _rows(steps) == _rows(want_steps)


def _rows(table):
    """Rows with NaN made comparable (NaN != NaN would fail identical rows); every other value compared exactly."""
    return [{k: _nan_safe(v) for k, v in row.items()} for row in table.to_pylist()]


def _nan_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, list):
        return [_nan_safe(v) for v in value]
    return value
