"""Decode under concurrency (issue 11 item 4): how many users a plan serves, and how fast each stream is."""
import pytest

from harness import catalog
from harness.costmodel import CONCURRENCY_LEVELS, PlanOptions, concurrent_decode, load_profile, stage_models
from harness.planning import plan_with

CASES = [("mixed", "hybrid_optimal"), ("mixed", "ring_memory_weighted"), ("m2ultra-4x-tb4", "uniform")]


def table(cluster_name, strategy, **options):
    cluster, model = catalog.load_cluster(cluster_name), catalog.load_model("llama-3.1-70b", 4)
    opts = PlanOptions(profile=load_profile(None), **options)
    plan = plan_with(strategy, cluster, model, opts)
    stages = stage_models(cluster, model, plan)
    return plan, [concurrent_decode(cluster, model, stages, opts, u) for u in CONCURRENCY_LEVELS]


@pytest.mark.parametrize("cluster_name, strategy", CASES)
def test_one_user_gets_the_plans_own_speed_and_more_users_share_it(cluster_name, strategy):
    plan, rows = table(cluster_name, strategy)
    assert rows[0]["round_s"] * 1e3 == pytest.approx(plan.predicted["tpot_ms"], rel=1e-12)
    per_stream = [r["per_stream_tok_s"] for r in rows]
    aggregate = [r["aggregate_tok_s"] for r in rows]
    assert per_stream == sorted(per_stream, reverse=True)     # a stream never speeds up when others join
    assert aggregate == sorted(aggregate)                     # batching never loses total throughput here
    assert aggregate[-1] > 2 * aggregate[0]                   # and gains a lot: weights are read once per step


def test_users_whose_kv_does_not_fit_are_flagged():
    _, rows = table("mixed", "hybrid_optimal", prompt_tokens=8000, output_tokens=2000)
    assert [r["fits"] for r in rows] == [True, True, True, False]
    assert rows[-1]["kv_tokens_needed"] == 64 * 10_000 > rows[-1]["kv_tokens_room"]
