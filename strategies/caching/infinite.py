"""infinite: every block ever inserted stays in L1. The ceiling no real policy can beat."""
from strategies.caching._base import CacheConfig, Lookup, Stats, leading_hits
from strategies.registry import cache_policy


class InfiniteCache:
    name = "infinite"

    def __init__(self, config: CacheConfig):
        self.config = config
        self.keys: set = set()
        self.stats_ = Stats(hits_per_tier=[0] * len(config.tiers))

    def lookup(self, keys) -> Lookup:
        hits = len(leading_hits(keys, lambda k: 0 if k in self.keys else None))
        self.stats_.lookups += 1
        self.stats_.blocks_asked += len(keys)
        self.stats_.hits_per_tier[0] += hits
        return Lookup(hits, (hits,) + (0,) * (len(self.config.tiers) - 1))

    def insert(self, keys) -> list:
        new = [k for k in keys if k not in self.keys]
        self.keys.update(new)
        self.stats_.inserted += len(new)
        return []

    def pin(self, keys) -> None:
        pass

    def unpin(self, keys) -> None:
        pass

    def stats(self) -> dict:
        return self.stats_.to_dict(self.config)


@cache_policy("infinite")
def make(config: CacheConfig) -> InfiniteCache:
    return InfiniteCache(config)
