"""none: no prefix cache; every prompt is prefilled in full. The baseline."""
from strategies.caching._base import CacheConfig, Lookup, PolicyBase
from strategies.registry import cache_policy


class NoCache(PolicyBase):
    name = "none"

    def lookup(self, keys) -> Lookup:
        self._count_lookup(len(keys), [0] * len(self.config.tiers))
        return Lookup(0, tuple(0 for _ in self.config.tiers))

    def holds(self, key) -> bool:
        return False

    def insert(self, keys) -> list:
        return []


@cache_policy("none")
def make(config: CacheConfig) -> NoCache:
    return NoCache(config)
