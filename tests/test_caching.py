import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.cli import main
from strategies.caching._base import CacheConfig, Lookup, PolicyBase, Tier
from strategies.registry import cache_policy, cache_policy_names, get_cache_policy, unregister_cache_policy

KNOWN = ["infinite", "lru", "none", "s3_fifo", "tiered_lru"]


def config(l1=2, l2=0, l2_load=0.1, recompute=1.0):
    tiers = (Tier("L1", l1),) + ((Tier("L2", l2, l2_load),) if l2 else ())
    return CacheConfig(tiers=tiers, recompute_s_per_block=recompute)


def test_known_policies_registered_in_name_order_and_duplicates_refused():
    names = cache_policy_names()
    assert set(KNOWN) <= set(names) and names == sorted(names)
    with pytest.raises(ValueError, match="twice"):
        cache_policy("lru")(lambda config: None)


def test_lru_evicts_least_recent_and_respects_pins():
    c = get_cache_policy("lru")(config(l1=2))
    c.insert(["a", "b"])
    assert c.lookup(["a"]).blocks == 1          # a is now most recent
    assert c.insert(["c"]) == ["b"]
    assert c.lookup(["b"]).blocks == 0
    c.pin(["a"])
    assert c.insert(["d"]) == ["c"]             # a is pinned, c goes
    assert c.lookup(["a", "d"]).blocks == 2


def test_lookup_counts_only_the_leading_prefix():
    c = get_cache_policy("infinite")(config())
    c.insert(["p0", "p1", "x3"])
    assert c.lookup(["p0", "p1", "p2", "x3"]).blocks == 2


def test_tiered_lru_demotes_then_promotes_with_load_time():
    c = get_cache_policy("tiered_lru")(config(l1=1, l2=2, l2_load=0.1, recompute=1.0))
    c.insert(["a", "b"])                        # a pushed down to L2
    hit = c.lookup(["a", "b"])
    assert (hit.blocks, hit.per_tier, hit.load_s) == (2, (1, 1), pytest.approx(0.1))
    stats = c.stats()
    # promoting a pushes b down, then promoting b pushes a down again: L1 = [b], L2 = [a]
    assert stats["demoted"] == 3 and stats["promoted"] == 2 and stats["blocks_per_tier"] == [1, 1]
    assert c.lookup(["b"]).per_tier == (1, 0)


def test_tiered_lru_recomputes_when_loading_costs_more():
    c = get_cache_policy("tiered_lru")(config(l1=1, l2=2, l2_load=2.0, recompute=1.0))
    c.insert(["a", "b"])
    assert c.lookup(["a", "b"]).blocks == 0      # a sits in slow L2: recompute it, and so everything after it


def test_s3_fifo_resists_a_scan_that_flushes_lru():
    cold = [f"cold{i}" for i in range(20)]
    s3, lru = get_cache_policy("s3_fifo")(config(l1=10)), get_cache_policy("lru")(config(l1=10))
    for c in (s3, lru):
        c.insert(["hot"])
        c.lookup(["hot"])
        for key in cold:
            c.insert([key])
    assert s3.lookup(["hot"]).blocks == 1
    assert lru.lookup(["hot"]).blocks == 0


def test_none_never_hits():
    c = get_cache_policy("none")(config())
    c.insert(["a"])
    assert c.lookup(["a"]).blocks == 0


@settings(max_examples=80, deadline=None)
@given(trace=st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=6), min_size=1, max_size=60),
       cap=st.integers(1, 8))
def test_no_policy_beats_infinite_and_capacity_holds(trace, cap):
    # every registered policy, so a new one is held to this without editing the test
    cfg = config(l1=cap, l2=cap, l2_load=0.1, recompute=1.0)
    ceiling = get_cache_policy("infinite")(cfg)
    policies = {name: get_cache_policy(name)(cfg) for name in cache_policy_names() if name != "infinite"}
    for prompt in trace:
        keys = [f"b{k}" for k in prompt]
        best = ceiling.lookup(keys).blocks
        ceiling.insert(keys)
        for name, p in policies.items():
            assert p.lookup(keys).blocks <= best, name
            p.insert(keys)
            for held, tier in zip(p.stats().get("blocks_per_tier", []), cfg.tiers):
                assert held <= tier.capacity_blocks, name


class ClaimsEverything(PolicyBase):
    """A broken policy: it reports a hit for every block it is asked about, cached or not."""

    def lookup(self, keys) -> Lookup:
        return Lookup(len(keys), (len(keys),) + (0,) * (len(self.config.tiers) - 1))

    def insert(self, keys) -> list:
        return []


@pytest.fixture
def throwaway_policy():
    name = "zz_claims_everything"
    cache_policy(name)(ClaimsEverything)
    yield name
    unregister_cache_policy(name)


def test_a_registered_policy_is_held_to_the_shared_properties_and_listed_in_help(throwaway_policy, capsys):
    with pytest.raises(AssertionError, match=throwaway_policy):
        test_no_policy_beats_infinite_and_capacity_holds()
    for command in ("simulate", "run"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert throwaway_policy in capsys.readouterr().out


def test_an_unregistered_policy_is_gone():
    cache_policy("zz_gone")(ClaimsEverything)
    unregister_cache_policy("zz_gone")
    assert "zz_gone" not in cache_policy_names()
    with pytest.raises(ValueError, match="not registered"):
        unregister_cache_policy("zz_gone")
