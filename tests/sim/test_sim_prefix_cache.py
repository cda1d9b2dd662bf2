"""Prefix caching carried out by the simulator: cached prefixes skip their prefill, lower tiers cost load time."""
import numpy as np
import pytest

from harness import catalog
from harness.costmodel import load_profile
from harness.workloads import build_workload
from sim import simulate
from sim.prefix_cache import make_prefix_cache
from harness.costmodel import PlanOptions
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


@pytest.mark.parametrize("policy, kw", [("lru", {}), ("tiered_lru", {"l1_share": 1e-7})])
def test_virtual_and_real_time_admission_cache_the_same_tokens(setup, policy, kw):
    # the same chats through simulate() and through the real-time SimBackend 100x faster than real time (its
    # wall-clock schedule is the virtual one / 100); tiered_lru with no L1 block makes every hit wait for its L2 load
    from harness.backends.sim import SimBackend, SimBackendConfig
    from harness.serving.loadgen import Target, run_load_sync
    from harness.serving.server import EmbeddedServer
    speed = 100.0
    chats = dict(CHATS, conversations=3, arrival={"process": "constant", "rate": 1 / 7})   # no two turns at once
    wall_chats = dict(chats, think_time_s=chats["think_time_s"] / speed,
                      arrival={"process": "constant", "rate": speed / 7})
    virtual, _ = run(setup, chats, policy, **kw)
    cache = make_prefix_cache(policy, *setup, **kw)
    backend = SimBackend(*setup, cache=cache, config=SimBackendConfig(speed=speed, include_load=False))
    with EmbeddedServer(backend) as server:
        client = run_load_sync(Target(server.url), build_workload(wall_chats)).frame()
    assert client["success"].all()
    in_order = lambda df: df.sort_values("scheduled_s")["cached_tokens"].tolist()
    assert in_order(client) == in_order(virtual), (in_order(client), in_order(virtual))
    assert sum(in_order(virtual)) > 0 and (policy == "lru" or cache.stats()["hits_L2"] > 0)
    # each turn meets an idle cluster, so its virtual TTFT (which counts the wait for loaded blocks) is the same
    ttft = lambda df: (df["first_token_s"] - df["start_s"]).to_numpy()
    assert np.allclose(ttft(backend.requests_table().to_pandas()), ttft(virtual), rtol=1e-9, atol=0)
