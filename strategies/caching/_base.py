"""Types every caching policy shares. A block is `block_tokens` tokens of a prompt prefix, named by a key
that is the same for the same prefix (e.g. hash of the prefix id and block index, or of the token ids)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Sequence

Key = Hashable


@dataclass(frozen=True)
class Tier:
    name: str                   # "L1 unified memory" | "L2 compressed RAM" | "L3 SSD" | "L4 peer"
    capacity_blocks: int
    load_s_per_block: float = 0.0   # time to bring one block back into the GPU working set (0 for L1)


@dataclass(frozen=True)
class CacheConfig:
    tiers: tuple[Tier, ...]
    recompute_s_per_block: float = float("inf")  # prefill cost of one block: a lower-tier hit must beat it

    @property
    def l1(self) -> Tier:
        return self.tiers[0]


@dataclass(frozen=True)
class Lookup:
    blocks: int                          # leading blocks served from cache (the usable prefix)
    per_tier: tuple[int, ...]            # of those, how many came from each tier
    load_s: float = 0.0                  # time to bring the lower-tier blocks up


@dataclass
class Stats:
    lookups: int = 0
    blocks_asked: int = 0
    hits_per_tier: list[int] = field(default_factory=list)
    inserted: int = 0
    evicted: int = 0
    demoted: int = 0
    promoted: int = 0

    def to_dict(self, config: CacheConfig) -> dict:
        hits = sum(self.hits_per_tier)
        out = {"lookups": self.lookups, "blocks_asked": self.blocks_asked, "blocks_hit": hits,
               "hit_rate": hits / self.blocks_asked if self.blocks_asked else 0.0, "inserted": self.inserted,
               "evicted": self.evicted, "demoted": self.demoted, "promoted": self.promoted}
        for tier, n in zip(config.tiers, self.hits_per_tier):
            out[f"hits_{tier.name}"] = n
        return out


class LruTier:
    """One LRU tier with pinning: pinned keys are never chosen as victims."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[Key, None] = OrderedDict()

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def touch(self, key) -> None:
        self.entries.move_to_end(key)

    def add(self, key, pinned: set) -> list[Key]:
        """Insert as most recent; return the victims pushed out (oldest unpinned first)."""
        self.entries[key] = None
        self.entries.move_to_end(key)
        victims = []
        while len(self.entries) > self.capacity:
            victim = next((k for k in self.entries if k not in pinned), None)
            if victim is None:  # everything pinned: refuse the newcomer instead of evicting a pin
                self.entries.pop(key)
                victims.append(key)
                break
            self.entries.pop(victim)
            victims.append(victim)
        return victims

    def remove(self, key) -> None:
        self.entries.pop(key, None)


def leading_hits(keys: Sequence[Key], where) -> list[int]:
    """Tier index of each leading key found by `where(key) -> tier or None`, stopping at the first miss."""
    tiers = []
    for key in keys:
        t = where(key)
        if t is None:
            break
        tiers.append(t)
    return tiers


class PolicyBase:
    """What every policy does the same way: pinned keys, counters, stats."""

    def __init__(self, config: CacheConfig):
        self.config = config
        self.pinned: set = set()
        self.stats_ = Stats(hits_per_tier=[0] * len(config.tiers))

    def pin(self, keys) -> None:
        self.pinned.update(keys)

    def unpin(self, keys) -> None:
        self.pinned.difference_update(keys)

    def _count_lookup(self, asked: int, per_tier) -> None:
        s = self.stats_
        s.lookups += 1
        s.blocks_asked += asked
        s.hits_per_tier = [a + b for a, b in zip(s.hits_per_tier, per_tier)]

    def stats(self) -> dict:
        return self.stats_.to_dict(self.config)
