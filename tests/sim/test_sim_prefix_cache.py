"""Prefix caching carried out by the simulator: cached prefixes skip their prefill, lower tiers cost load time."""
import pytest

from harness import catalog
from harness.costmodel import load_profile
from harness.workloads import build_workload
from sim import simulate
from sim.prefix_cache import make_prefix_cache
from strategies.partitioning._plans import PlanOptions
from strategies.registry import get_strategy

CHATS = {"kind": "conversations", "conversations": 6, "turns": 3, "system_prompt_tokens": 1024,
         "user": 64, "output": 16, "think_time_s": 20.0, "arrival": {"process": "poisson", "rate": 0.1}, "seed": 3}


@pytest.fixture(scope="module")
def setup():
    cluster, model = catalog.load_cluster("m2ultra-4x-tb4"), catalog.load_model("llama-3.1-8b", 4)
    profile = load_profile()
    plan = get_strategy("uniform")(cluster, model, PlanOptions(profile))
    return cluster, model, plan, profile


def run(setup, workload, policy, **kw):
    cluster, model, plan, profile = setup
    cache = make_prefix_cache(policy, cluster, model, plan, profile, **kw)
    res = simulate(cluster, model, plan, profile, build_workload(workload), include_load=False, cache=cache)
    return res.requests.to_pandas(), cache


def test_later_turns_hit_and_skip_their_prefill(setup):
    plain, _ = run(setup, CHATS, "none")
    cached, cache = run(setup, CHATS, "lru")
    ttft = lambda df: (df["first_token_s"] - df["start_s"]).mean()
    assert ttft(cached) < 0.6 * ttft(plain)
    first_turns = cached["cached_tokens"] == 0
    assert first_turns.sum() >= 6 and (cached.loc[~first_turns, "cached_tokens"] >= 1024).all()
    stats = cache.stats()
    assert stats["prefill_tokens_saved"] == cached["cached_tokens"].sum() > 0
    assert (cached["output_tokens"] == plain["output_tokens"]).all()


def test_no_shared_prefix_means_no_change(setup):
    synthetic = {"kind": "synthetic", "num_requests": 20, "seed": 1, "arrival": {"process": "poisson", "rate": 2.0},
                 "prompt": 300, "output": 20}
    plain, _ = run(setup, synthetic, "none")
    cached, cache = run(setup, synthetic, "lru")
    assert cache.stats()["blocks_hit"] == 0
    assert (cached["first_token_s"] - plain["first_token_s"]).abs().max() < 1e-9


def test_lower_tier_hits_are_counted_per_tier_and_never_slow_the_first_token(setup):
    # an L1 too small for one conversation's prefix pushes blocks down to L2/L3 and hits come back from there
    # (the slower-than-recompute case is tested on the policy itself, in tests/test_caching.py)
    plain, _ = run(setup, CHATS, "none")
    tiered, cache = run(setup, CHATS, "tiered_lru", l1_share=0.0005)
    stats = cache.stats()
    assert stats["blocks_hit"] == sum(stats[f"hits_{t}"] for t in ("L1", "L2", "L3"))
    assert stats["demoted"] > 0
    ttft = lambda df: (df["first_token_s"] - df["start_s"]).mean()
    assert ttft(tiered) <= ttft(plain) + 1e-9
