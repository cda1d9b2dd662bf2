"""none: no prefix cache; every prompt is prefilled in full. The baseline."""
from strategies.caching._base import CacheConfig, Lookup, Stats
from strategies.registry import cache_policy


class NoCache:
    name = "none"

    def __init__(self, config: CacheConfig):
        self.config = config
        self.stats_ = Stats(hits_per_tier=[0] * len(config.tiers))

    def lookup(self, keys) -> Lookup:
        self.stats_.lookups += 1
        self.stats_.blocks_asked += len(keys)
        return Lookup(0, tuple(0 for _ in self.config.tiers))

    def insert(self, keys) -> list:
        return []

    def pin(self, keys) -> None:
        pass

    def unpin(self, keys) -> None:
        pass

    def stats(self) -> dict:
        return self.stats_.to_dict(self.config)


@cache_policy("none")
def make(config: CacheConfig) -> NoCache:
    return NoCache(config)
