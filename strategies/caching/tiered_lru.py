"""tiered_lru: an LRU per tier (L1 unified memory, then e.g. L2 compressed RAM, L3 SSD, L4 a peer Mac).

A block pushed out of tier i is demoted to tier i+1; out of the last tier it is dropped. A lookup walks the
prompt's leading blocks; a block found in a lower tier is used only while loading it is cheaper than
recomputing it (the load-or-recompute check), and a used block is promoted back to L1.
Pinned blocks (e.g. a shared system prompt) are never evicted from L1.
"""
from strategies.caching._base import CacheConfig, Lookup, LruTier, PolicyBase, leading_hits
from strategies.registry import cache_policy


class TieredLru(PolicyBase):
    name = "tiered_lru"

    def __init__(self, config: CacheConfig):
        super().__init__(config)
        self.tiers = [LruTier(t.capacity_blocks) for t in config.tiers]

    def _where(self, key):
        for i, tier in enumerate(self.tiers):
            if key in tier:
                return i
        return None

    def _worth_loading(self, tier: int) -> bool:
        return tier == 0 or self.config.tiers[tier].load_s_per_block < self.config.recompute_s_per_block

    def lookup(self, keys) -> Lookup:
        found = leading_hits(keys, self._where)
        usable = []
        for t in found:
            if not self._worth_loading(t):
                break
            usable.append(t)
        per_tier = [0] * len(self.tiers)
        for t in usable:
            per_tier[t] += 1
        load_s = sum(self.config.tiers[t].load_s_per_block for t in usable)
        for key in keys[: len(usable)]:  # promoting one block may demote another: look each up afresh
            self._promote(key, self._where(key))
        self._count_lookup(len(keys), per_tier)
        return Lookup(len(usable), tuple(per_tier), load_s)

    def _promote(self, key, tier: int) -> None:
        if tier == 0:
            self.tiers[0].touch(key)
            return
        self.tiers[tier].remove(key)
        self.stats_.promoted += 1
        self._add(key, 0)

    def _add(self, key, tier: int) -> list:
        """Put a key in a tier and cascade the victims down; returns keys dropped from the last tier."""
        victims = self.tiers[tier].add(key, self.pinned if tier == 0 else set())
        if tier + 1 == len(self.tiers):
            self.stats_.evicted += len(victims)
            return victims
        dropped = []
        for v in victims:
            self.stats_.demoted += 1
            dropped += self._add(v, tier + 1)
        return dropped

    def tier_of(self, key) -> int | None:
        """The tier index holding the block (no side effect), None when none does: the real backend moves a
        kept prefix's KV to the tier its best block is in."""
        return self._where(key)

    def holds(self, key) -> bool:
        """Whether the block is in any tier (no side effect: the real backend frees the KV it no longer holds)."""
        return self._where(key) is not None

    def insert(self, keys) -> list:
        dropped = []
        for key in keys:
            t = self._where(key)
            if t is None:
                self.stats_.inserted += 1
                dropped += self._add(key, 0)
            elif t == 0:
                self.tiers[0].touch(key)
        return dropped

    def stats(self) -> dict:
        out = super().stats()
        out["blocks_per_tier"] = [len(t) for t in self.tiers]
        return out


@cache_policy("tiered_lru")
def make(config: CacheConfig) -> TieredLru:
    return TieredLru(config)
