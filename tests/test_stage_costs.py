"""One stage cost model: what a plan predicts for one stream is what the simulator measures for one request,
also on heterogeneous clusters with tensor-parallel groups (where the planner's and the simulator's twins of
the stage cost used to disagree)."""
from __future__ import annotations

import pytest

from harness import catalog, costmodel
from harness.costmodel import PlanOptions
from harness.specs import Cluster, Link, Node
from harness.workloads import build_workload
from sim import EngineConfig, simulate
from strategies.partitioning._plans import build_plan
from strategies.registry import get_strategy

PROMPT, OUTPUT = 512, 128
# decode step k (k = 1 .. OUTPUT-1) reads PROMPT + k tokens of KV; a batch-1 step is affine in that, so the
# mean gap equals one step at the mean context PROMPT + OUTPUT/2
CONTEXT = PROMPT + OUTPUT // 2


@pytest.fixture(scope="module")
def profile():
    return costmodel.load_profile()


def options(profile) -> PlanOptions:
    return PlanOptions(profile, context_tokens=CONTEXT, prompt_tokens=PROMPT)


def one_request_ms(cluster, model, plan, profile) -> tuple[float, float]:
    """(TTFT, TPOT) in ms of one request alone on the simulated cluster: no load, no cache, no queueing."""
    wl = build_workload({"kind": "synthetic", "num_requests": 1, "prompt": PROMPT, "output": OUTPUT,
                         "seed": 0, "arrival": {"process": "all_at_once"}})
    row = simulate(cluster, model, plan, profile, wl, EngineConfig(), include_load=False).requests.to_pylist()[0]
    ttft = row["first_token_s"] - row["start_s"]
    return ttft * 1e3, (row["end_s"] - row["first_token_s"]) * 1e3 / (OUTPUT - 1)


def node(name: str, chip: str, cores: int, memory_gb: float) -> Node:
    return Node(name, catalog.find_chip(chip, cores), memory_gb, 0.75)


def lopsided_pair_cluster() -> Cluster:
    """An M4 Pro and an M1 Max over RDMA, plus an M2 Ultra over TCP. The M4 Pro has less memory bandwidth
    but more effective FLOPS than the 24-core M1 Max, so the pair's slowest member differs for decode and prefill."""
    nodes = (node("m4pro", "M4 Pro", 20, 64), node("m1max", "M1 Max", 24, 64), node("m2u", "M2 Ultra", 76, 192))
    links = (catalog.make_link("m4pro", "m1max", "tb5-rdma"), catalog.make_link("m4pro", "m2u", "tb4-tcp"),
             catalog.make_link("m1max", "m2u", "tb4-tcp"))
    return Cluster("lopsided-pair", nodes, links)


def uneven_links_cluster() -> Cluster:
    """A TP-4 group whose links differ: one has a long latency but a wide pipe, one a short latency but a
    narrow pipe. Small (decode) all-reduces wait for the first, large (prefill) ones for the second."""
    names = ("s0", "s1", "s2", "s3")
    nodes = tuple(node(n, "M4 Max", 40, 128) for n in names)
    special = {("s0", "s1"): (200.0, 80.0), ("s2", "s3"): (3.0, 5.0)}
    links = tuple(Link(a, b, "tb5-rdma", *special.get((a, b), (5.0, 60.0)))
                  for i, a in enumerate(names) for b in names[i + 1:])
    return Cluster("uneven-links", nodes, links)


def assert_plan_matches_simulation(cluster, model, plan, profile):
    ttft, tpot = one_request_ms(cluster, model, plan, profile)
    assert plan.predicted["tpot_ms"] == pytest.approx(tpot, rel=1e-9)
    assert plan.predicted["ttft_ms"] == pytest.approx(ttft, rel=1e-9)


def test_hybrid_optimal_on_the_mixed_cluster_predicts_the_simulated_stream(profile):
    cluster, model = catalog.load_cluster("mixed"), catalog.load_model("llama-3.1-70b", 4)
    plan = get_strategy("hybrid_optimal")(cluster, model, options(profile))
    assert any(s.tp_degree > 1 for s in plan.stages)   # the TB5-RDMA pair runs tensor parallel
    assert_plan_matches_simulation(cluster, model, plan, profile)


@pytest.mark.parametrize("strategy", ["uniform", "ring_memory_weighted", "compute_balanced", "min_latency"])
def test_pipeline_strategies_on_the_mixed_cluster_predict_the_simulated_stream(profile, strategy):
    cluster, model = catalog.load_cluster("mixed"), catalog.load_model("llama-3.1-70b", 4)
    plan = get_strategy(strategy)(cluster, model, options(profile))
    assert_plan_matches_simulation(cluster, model, plan, profile)


def test_a_tp_pair_of_different_chips_goes_at_its_slowest_members_pace(profile):
    cluster, model = lopsided_pair_cluster(), catalog.load_model("llama-3.1-8b", 4)
    plan = build_plan("test", cluster, model, options(profile), [("m4pro", "m1max"), ("m2u",)], [12, 20])
    assert_plan_matches_simulation(cluster, model, plan, profile)


def test_a_tp_group_with_uneven_links_waits_for_the_slowest_link_at_each_message_size(profile):
    cluster, model = uneven_links_cluster(), catalog.load_model("llama-3.1-8b", 4)
    plan = build_plan("test", cluster, model, options(profile), [("s0", "s1", "s2", "s3")], [32])
    assert_plan_matches_simulation(cluster, model, plan, profile)


def test_hybrid_optimal_searches_with_the_stage_models_decode_cost(profile):
    from strategies.partitioning._plans import stage_decode_s
    from strategies.partitioning.hybrid_optimal import _Search
    cluster, model, opts = lopsided_pair_cluster(), catalog.load_model("llama-3.1-8b", 4), options(profile)
    pair = ("m4pro", "m1max")
    step, last = _Search(cluster, model, opts).costs(pair)   # the search's vectorised cost matrices
    assert step[3, 15] == pytest.approx(stage_decode_s(cluster, model, opts, pair, 3, 15, False), rel=1e-12)
    assert last[20] == pytest.approx(stage_decode_s(cluster, model, opts, pair, 20, 32, True), rel=1e-12)
