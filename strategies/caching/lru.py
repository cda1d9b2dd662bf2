"""lru: one least-recently-used tier in unified memory, with pinning. Blocks it evicts are gone.
(tiered_lru with only the first tier.)"""
from dataclasses import replace

from strategies.caching._base import CacheConfig
from strategies.caching.tiered_lru import TieredLru
from strategies.registry import cache_policy


class Lru(TieredLru):
    name = "lru"


@cache_policy("lru")
def make(config: CacheConfig) -> Lru:
    return Lru(replace(config, tiers=config.tiers[:1]))
