"""infinite: every block ever inserted stays in L1. The ceiling no real policy can beat."""
from strategies.caching._base import CacheConfig, Lookup, PolicyBase, leading_hits
from strategies.registry import cache_policy


class InfiniteCache(PolicyBase):
    name = "infinite"

    def __init__(self, config: CacheConfig):
        super().__init__(config)
        self.keys: set = set()

    def lookup(self, keys) -> Lookup:
        hits = len(leading_hits(keys, lambda k: 0 if k in self.keys else None))
        per_tier = (hits,) + (0,) * (len(self.config.tiers) - 1)
        self._count_lookup(len(keys), per_tier)
        return Lookup(hits, per_tier)

    def holds(self, key) -> bool:
        return key in self.keys

    def insert(self, keys) -> list:
        new = [k for k in keys if k not in self.keys]
        self.keys.update(new)
        self.stats_.inserted += len(new)
        return []


@cache_policy("infinite")
def make(config: CacheConfig) -> InfiniteCache:
    return InfiniteCache(config)
