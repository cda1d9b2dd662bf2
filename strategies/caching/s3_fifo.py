"""s3_fifo: S3-FIFO (Yang et al., SOSP 2023) over L1: a small FIFO (10 %) filters one-hit wonders, a main
FIFO with a 2-bit frequency gives re-accessed blocks another lap, and a ghost FIFO of recently evicted keys
sends returning blocks straight to main. Pinned blocks are always given another lap."""
from collections import deque

from strategies.caching._base import CacheConfig, Lookup, PolicyBase, leading_hits
from strategies.registry import cache_policy

SMALL_SHARE = 0.1
MAX_FREQ = 3


class S3Fifo(PolicyBase):
    name = "s3_fifo"

    def __init__(self, config: CacheConfig):
        super().__init__(config)
        cap = config.l1.capacity_blocks
        self.small_cap = max(1, int(cap * SMALL_SHARE))
        self.main_cap = cap - self.small_cap  # 0 for a one-block cache: the small FIFO is all there is
        self.small: deque = deque()
        self.main: deque = deque()
        self.ghost: deque = deque()
        self.ghost_set: set = set()
        self.freq: dict = {}
        self.where: dict = {}   # key -> "small" | "main"

    def lookup(self, keys) -> Lookup:
        hits = leading_hits(keys, lambda k: 0 if k in self.where else None)
        for key in keys[: len(hits)]:
            self.freq[key] = min(self.freq[key] + 1, MAX_FREQ)
        per_tier = (len(hits),) + (0,) * (len(self.config.tiers) - 1)
        self._count_lookup(len(keys), per_tier)
        return Lookup(len(hits), per_tier)

    def holds(self, key) -> bool:
        return key in self.where

    def insert(self, keys) -> list:
        dropped = []
        for key in keys:
            if key in self.where:
                continue
            self.stats_.inserted += 1
            self.freq[key] = 0
            if key in self.ghost_set:
                self.ghost_set.discard(key)
                self._push_main(key, dropped)
            else:
                self.small.append(key)
                self.where[key] = "small"
                while len(self.small) > self.small_cap:
                    self._evict_small(dropped)
        return dropped

    def _evict_small(self, dropped: list) -> None:
        key = self.small.popleft()
        if self.freq[key] > 0 or key in self.pinned:
            self._push_main(key, dropped)
            return
        self._drop(key, dropped)
        self.ghost.append(key)
        self.ghost_set.add(key)
        while len(self.ghost) > max(self.main_cap, 1):
            self.ghost_set.discard(self.ghost.popleft())

    def _push_main(self, key, dropped: list) -> None:
        self.main.append(key)
        self.where[key] = "main"
        laps = 0
        while len(self.main) > self.main_cap and laps < 4 * len(self.main):
            victim = self.main.popleft()
            laps += 1
            if self.freq[victim] > 0 or victim in self.pinned:
                self.freq[victim] = max(0, self.freq[victim] - 1)
                self.main.append(victim)
            else:
                self._drop(victim, dropped)

    def _drop(self, key, dropped: list) -> None:
        self.where.pop(key, None)
        self.freq.pop(key, None)
        self.stats_.evicted += 1
        dropped.append(key)

    def stats(self) -> dict:
        out = super().stats()
        out["blocks_per_tier"] = [len(self.where)]
        return out


@cache_policy("s3_fifo")
def make(config: CacheConfig) -> S3Fifo:
    return S3Fifo(config)
