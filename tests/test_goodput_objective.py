"""Issue 9: the goodput objective of hybrid_optimal, the plan's sustainable rate, and `run` planning for it."""
import numpy as np
import pytest

from harness import catalog
from harness.cli import main
from harness.costmodel import (OBJECTIVES, PlanOptions, batch_bound, kv_room_tokens, load_profile,
                               request_pipeline_s, stage_models, sustainable_rate_rps)
from harness.experiment import load_experiment
from harness.orchestrate import load_inputs, workload_shape
from harness.workloads import build_workload
from sim.run import simulate
from strategies.registry import get_strategy, strategy_names

PROFILE = load_profile()
# the CI smoke workload (runs/baselines/smoke.json): Poisson 0.15 requests/s, 512-token prompts, 128 out
CI_RATE, CI_PROMPT, CI_OUTPUT = 0.15, 512, 128


@pytest.fixture(scope="module")
def ci_inputs():
    cluster = catalog.load_cluster("m2ultra-4x-tb4")
    model = catalog.load_model("llama-3.1-70b", 4, 64)
    return cluster, model


def ci_options(objective: str) -> PlanOptions:
    return PlanOptions(PROFILE, objective=objective, prompt_tokens=CI_PROMPT, output_tokens=CI_OUTPUT,
                       arrival_rate_rps=CI_RATE)


def poisson(rate: float, n: int = 200, seed: int = 1):
    return build_workload({"kind": "synthetic", "num_requests": n, "seed": seed,
                           "arrival": {"process": "poisson", "rate": rate},
                           "prompt": {"dist": "fixed", "value": CI_PROMPT},
                           "output": {"dist": "fixed", "value": CI_OUTPUT}})


def test_goodput_is_an_objective_everywhere_it_is_offered():
    assert "goodput" in OBJECTIVES
    assert main(["plan", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--objective", "goodput"]) == 0


def test_goodput_keeps_the_model_spread_where_one_mac_would_serve_fewer_requests(ci_inputs):
    cluster, model = ci_inputs
    latency = get_strategy("hybrid_optimal")(cluster, model, ci_options("latency"))
    goodput = get_strategy("hybrid_optimal")(cluster, model, ci_options("goodput"))
    assert len(latency.stages) == 1            # the issue: a 0.9 % single-stream gain on one Mac
    assert len(goodput.stages) > 1
    assert goodput.predicted["sustainable_rate_rps"] > 1.1 * latency.predicted["sustainable_rate_rps"]


def test_goodput_plan_sustains_at_least_every_other_strategys_rate(ci_inputs):
    cluster, model = ci_inputs
    options = ci_options("goodput")
    plans = {name: get_strategy(name)(cluster, model, options) for name in strategy_names()}
    best = plans["hybrid_optimal"].predicted["sustainable_rate_rps"]
    for name, plan in plans.items():
        assert best >= plan.predicted["sustainable_rate_rps"] * (1 - 1e-9), name
        assert plan.predicted["objective_ms"] == pytest.approx(1e3 / plan.predicted["sustainable_rate_rps"])


def test_every_objective_predicts_the_sustainable_rate_and_the_workloads_rate(ci_inputs):
    cluster, model = ci_inputs
    for objective in OBJECTIVES:
        p = get_strategy("uniform")(cluster, model, ci_options(objective)).predicted
        assert p["sustainable_rate_rps"] > 0 and p["arrival_rate_rps"] == CI_RATE


def test_request_cost_sums_prefill_over_stages_and_takes_decode_at_the_bottleneck(ci_inputs):
    cluster, model = ci_inputs
    options = ci_options("goodput")
    plan = get_strategy("uniform")(cluster, model, options)
    stages = stage_models(cluster, model, plan)
    prefill = sum(st.prefill_s(model, PROFILE, CI_PROMPT, 0) for st in stages)
    batch = options.max_num_seqs
    cost = request_pipeline_s(cluster, model, stages, options, batch)
    slowest_step = max(st.decode_s(model, PROFILE, batch, batch * (CI_PROMPT + CI_OUTPUT / 2)) for st in stages)
    assert prefill + CI_OUTPUT * slowest_step / batch < cost < prefill + CI_OUTPUT * (slowest_step + 0.01) / batch
    assert sustainable_rate_rps(cluster, model, stages, options) == pytest.approx(1 / cost)   # 128 fit: the best


def test_batch_is_bounded_by_kv_room_for_every_micro_batch_and_by_max_num_seqs():
    options = PlanOptions(PROFILE, prompt_tokens=512, output_tokens=128)
    assert batch_bound(10_000, 2, options) == 7         # 10000 // (2 stages x 640 tokens)
    assert batch_bound(1e9, 2, options) == 128
    assert batch_bound(1000, 2, options) == 0


def test_a_small_kv_room_lowers_the_rate_through_the_batch():
    cluster = catalog.load_cluster("mini-pair")
    model = catalog.load_model("llama-3.1-8b", 4, 64)
    short, long = (get_strategy("hybrid_optimal")(cluster, model, PlanOptions(PROFILE, objective="goodput",
                                                                             prompt_tokens=p, output_tokens=128))
                   for p in (512, 32768))
    assert long.predicted["sustainable_rate_rps"] < short.predicted["sustainable_rate_rps"]


def in_system_at_last_arrival(result) -> int:
    d = result.requests.to_pandas()
    last = d.scheduled_s.max()
    return int(((d.start_s <= last) & (d.end_s > last)).sum())


def test_simulator_keeps_up_at_half_the_predicted_rate_and_saturates_at_twice(ci_inputs):
    cluster, model = ci_inputs
    plan = get_strategy("hybrid_optimal")(cluster, model, ci_options("goodput"))
    rate, ttft = plan.predicted["sustainable_rate_rps"], plan.predicted["ttft_ms"] / 1e3
    half = simulate(cluster, model, plan, PROFILE, poisson(rate * 0.5), include_load=False)
    twice = simulate(cluster, model, plan, PROFILE, poisson(rate * 2), include_load=False)
    median_ttft = [float(np.median(r.requests["first_token_s"].to_numpy() - r.requests["start_s"].to_numpy()))
                   for r in (half, twice)]
    assert in_system_at_last_arrival(half) <= 20 and median_ttft[0] < 1.5 * ttft       # a short, steady queue
    assert in_system_at_last_arrival(twice) >= 100 and median_ttft[1] > 4 * ttft       # the queue keeps growing


def test_run_plans_for_its_experiments_workload():
    exp = load_experiment(None)          # runs/default.toml
    assert exp["objective"] == "goodput"
    _, _, options = load_inputs(exp)
    assert options.objective == "goodput" and options.arrival_rate_rps == exp["workload"]["arrival"]["rate"]
    assert options.output_tokens == exp["workload"]["output"]["value"]
    assert 150 < options.prompt_tokens < 250      # lognormal, mean 192


def test_workload_shape_of_a_trace_without_a_declared_rate():
    wl = build_workload({"kind": "synthetic", "num_requests": 11, "arrival": {"process": "constant", "rate": 2.0},
                         "prompt": 100, "output": 10})
    undeclared = type(wl)(spec={}, arrival_s=wl.arrival_s, prompt_tokens=wl.prompt_tokens,
                          output_tokens=wl.output_tokens)
    assert workload_shape(undeclared) == {"prompt_tokens": 100, "output_tokens": 10, "arrival_rate_rps": 2.0}
    burst = build_workload({"kind": "synthetic", "num_requests": 4, "prompt": 100, "output": 10})
    assert workload_shape(burst)["arrival_rate_rps"] == 0.0


def test_plan_prints_the_sustainable_rate_against_the_workloads(capsys):
    assert main(["plan", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-70b", "--objective", "goodput",
                 "--output-tokens", "128", "--arrival-rate", "0.15"]) == 0
    out = capsys.readouterr().out
    assert "sustainable rate (theoretical): 0.23 requests/s of 512+128 tokens" in out
    assert "the workload's 0.15 requests/s would load it 66 %" in out


def every_plan(cluster, model, options):
    """Every (node order, contiguous split) plan that fits: what the exact search must match."""
    from itertools import combinations, permutations

    from strategies.partitioning._plans import build_plan
    names, L = [n.name for n in cluster.nodes], model.num_layers
    for k in range(1, len(names) + 1):
        for order in (p for c in combinations(names, k) for p in permutations(c)):
            for cuts in combinations(range(1, L), k - 1):
                counts = [b - a for a, b in zip((0, *cuts), (*cuts, L))]
                plan = build_plan("enumerated", cluster, model, options, [(n,) for n in order], counts)
                if not plan.problems():
                    yield plan


def test_goodput_search_finds_the_best_split_where_kv_room_bounds_the_batch():
    cluster = catalog.parse_cluster({"name": "tight", "nodes": [
        {"name": "a", "chip": "M4 Pro", "gpu_cores": 20, "memory_gb": 24},
        {"name": "b", "chip": "M4 Max", "gpu_cores": 40, "memory_gb": 36},
        {"name": "c", "chip": "M2 Ultra", "gpu_cores": 76, "memory_gb": 64}], "default_link": "tb4-tcp"})
    model = catalog.load_model("llama-3.1-8b", 8, 64)
    options = PlanOptions(PROFILE, objective="goodput", prompt_tokens=8192, output_tokens=512, kv_reserve_tokens=0)
    best = get_strategy("hybrid_optimal")(cluster, model, options).predicted["objective_ms"]
    plans = list(every_plan(cluster, model, options))
    assert best == pytest.approx(min(p.predicted["objective_ms"] for p in plans), rel=1e-12)
    bounds = {batch_bound(min(kv_room_tokens(cluster, st) for st in stage_models(cluster, model, p)),
                          len(p.stages), options) for p in plans}
    assert min(bounds) < 128      # the KV room, not max_num_seqs, bounds the batch of some plans
