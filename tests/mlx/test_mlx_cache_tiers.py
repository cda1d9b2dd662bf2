"""Cache tiers on real ranks: tiered_lru's demotions move a kept prefix to 8-bit quantized memory (L2) and to the
rank's disk through mlx-lm's save_prompt_cache (L3); a hit brings it back. The same trace gets the same cached
tokens per request in the simulator, and a prefix served from disk gives exactly the tokens of no cache."""
from __future__ import annotations

import asyncio
import os
from dataclasses import replace

import pytest

from harness.backends import BackendOptions, make_backend
from harness.backends.mlx_cache import RankCache
from harness.backends.sim import SimBackend, SimBackendConfig
from harness.mlx import worker
from strategies.caching._base import Tier
from strategies.registry import get_cache_policy
from tests.mlx.test_mlx_prefix_cache import GUARD_S, _serve_in_turn, _trace, planned  # noqa: F401  (fixture)


def _kv(offset=5, heads=2, dim=8, seed=0):
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache
    mx.random.seed(seed)
    c = KVCache()
    c.update_and_fetch(mx.random.normal((1, heads, offset, dim)), mx.random.normal((1, heads, offset, dim)))
    return c


def test_kept_tiers_round_trip_memory_quantized_and_disk():
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache
    kept = worker.KeptTiers()
    caches = [KVCache(), _kv(), _kv(seed=1)]        # a pipeline rank's list: an unused layer first
    l2 = kept.move("e1", caches, "L2")
    back = kept.materialize("e1", l2)
    assert back[0].keys is None and back[1].offset == 5
    err = float(mx.abs(back[1].keys - caches[1].keys[..., :5, :]).max())
    assert 0 < err < 0.05                               # 8-bit: close, not equal
    assert kept.nbytes(l2) < sum(c.nbytes for c in caches[1:])
    l3 = kept.move("e1", back, "L3")
    assert isinstance(l3, str) and os.path.exists(l3) and kept.nbytes(l3) == 0
    again = kept.materialize("e1", l3)
    assert again[0].keys is None and mx.array_equal(again[2].values, back[2].values[..., :5, :])
    assert kept.counts() == {"L1": 0, "L2": 0, "L3": 1}
    kept.forget("e1")
    assert not os.path.exists(l3)


def _tiny_tiers(p, which: str):
    """The plan's tiered_lru cache with one block in L1 and one in L2, so the trace pushes prefixes to disk."""
    from sim.prefix_cache import make_prefix_cache
    cache = make_prefix_cache(which, p.cluster, p.model, p.plan, p.profile)
    l1, l2, l3 = cache.config.tiers
    cache.config = replace(cache.config, tiers=(replace(l1, capacity_blocks=1), replace(l2, capacity_blocks=1), l3))
    cache.policy = get_cache_policy(which)(cache.config)
    return cache


@pytest.mark.slow
def test_tiered_lru_on_real_ranks_spills_to_disk_and_matches_the_simulator(planned):
    sim = SimBackend(planned.cluster, planned.model, planned.plan, planned.profile,
                     config=SimBackendConfig(speed=1000.0), cache=_tiny_tiers(planned, "tiered_lru"))
    sim_out = asyncio.run(asyncio.wait_for(_serve_in_turn(sim, _trace()), GUARD_S))
    real = make_backend("mlx", BackendOptions(planned=lambda: planned, cache="tiered_lru"))
    real.cache = RankCache(_tiny_tiers(planned, "tiered_lru"))
    real_out = asyncio.run(asyncio.wait_for(_serve_in_turn(real, _trace()), GUARD_S))
    plain = make_backend("mlx", BackendOptions(planned=lambda: planned, cache="none"))
    plain_out = asyncio.run(asyncio.wait_for(_serve_in_turn(plain, _trace()), GUARD_S))
    assert [c for c, _ in real_out] == [c for c, _ in sim_out]
    assert sum(c > 0 for c, _ in real_out) >= 2
    moved = real.cache.stats()["tier_moves"]
    assert moved.get("L3", 0) >= 1 and moved.get("L1", 0) >= 1, moved   # spilled to disk and brought back
    assert [ids for _, ids in real_out] == [ids for _, ids in plain_out]


def test_l4_spills_into_the_folder_harness_l4_dir_names(tmp_path, monkeypatch):
    """L4 stands for network storage: a shared mount the ranks write their layers' part into, one folder each."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache
    monkeypatch.setenv("HARNESS_L4_DIR", str(tmp_path))
    kept = worker.KeptTiers()
    l4 = kept.move("e7", [KVCache(), _kv()], "L4")
    assert l4.startswith(str(tmp_path)) and os.path.exists(l4) and kept.counts()["L4"] == 1
    back = kept.move("e7", l4, "L1")
    assert back[0].keys is None and mx.array_equal(back[1].keys[..., :5, :], _kv().keys[..., :5, :])
    assert not os.path.exists(l4)


def _deep_tiers(p):
    """tiered_lru with one block in each of L1, L2 and L3 and an L4 tier, so the trace's prefixes reach L4."""
    from sim.prefix_cache import make_prefix_cache
    cache = make_prefix_cache("tiered_lru", p.cluster, p.model, p.plan, p.profile, l4_gb=1.0)
    l1, l2, l3, l4 = cache.config.tiers
    small = tuple(replace(t, capacity_blocks=1) for t in (l1, l2, l3))
    cache.config = replace(cache.config, tiers=(*small, replace(l4, load_s_per_block=0.0)))  # always worth loading
    cache.policy = get_cache_policy("tiered_lru")(cache.config)
    return cache


@pytest.mark.slow
def test_an_l4_tier_on_real_ranks_matches_the_simulator(planned, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_L4_DIR", str(tmp_path))
    sim = SimBackend(planned.cluster, planned.model, planned.plan, planned.profile,
                     config=SimBackendConfig(speed=1000.0), cache=_deep_tiers(planned))
    sim_out = asyncio.run(asyncio.wait_for(_serve_in_turn(sim, _trace()), GUARD_S))
    real = make_backend("mlx", BackendOptions(planned=lambda: planned, cache="tiered_lru"))
    real.cache = RankCache(_deep_tiers(planned))
    real_out = asyncio.run(asyncio.wait_for(_serve_in_turn(real, _trace()), GUARD_S))
    assert [c for c, _ in real_out] == [c for c, _ in sim_out]
    assert real.cache.stats()["tier_moves"].get("L4", 0) >= 1, real.cache.stats()["tier_moves"]
    assert not list(tmp_path.iterdir())     # the ranks' L4 folders go with them


def _pinned_lru(p, prefix):
    """lru with three blocks of L1 and the shared prefix's three blocks pinned: the other prompt cannot push it out."""
    from sim.prefix_cache import make_prefix_cache
    cache = make_prefix_cache("lru", p.cluster, p.model, p.plan, p.profile)
    cache.config = replace(cache.config, tiers=(replace(cache.config.tiers[0], capacity_blocks=3),))
    cache.policy = get_cache_policy("lru")(cache.config)
    cache.policy.pin(cache.keys_from_tokens(prefix))
    return cache


@pytest.mark.slow
def test_pinned_blocks_stay_kept_on_real_ranks_as_in_the_simulator(planned):
    prefix = _trace()[0][:192]          # the shared prefix's three full blocks
    sim = SimBackend(planned.cluster, planned.model, planned.plan, planned.profile,
                     config=SimBackendConfig(speed=1000.0), cache=_pinned_lru(planned, prefix))
    sim_out = asyncio.run(asyncio.wait_for(_serve_in_turn(sim, _trace()), GUARD_S))
    real = make_backend("mlx", BackendOptions(planned=lambda: planned, cache="lru"))
    real.cache = RankCache(_pinned_lru(planned, prefix))
    real_out = asyncio.run(asyncio.wait_for(_serve_in_turn(real, _trace()), GUARD_S))
    assert [c for c, _ in real_out] == [c for c, _ in sim_out]
    assert [c for c, _ in real_out][2] == 192 and [c for c, _ in real_out][4] == 192   # every later base turn hits
