"""Prefix caching on real MLX ranks: the driver's bookkeeping between a cache policy and the ranks' kept KV.

The decisions are the simulator's own: the same `sim.prefix_cache.PrefixCache` (block keys from token ids, a
policy from `strategies/caching/`) is asked the same questions at the same moments as `sim.admission` asks
them: `admit` when a request is handed to the ranks, `remember` once its prompt is prefilled. So one trace
gets the same hit or miss per request in both backends. The ranks carry the decisions out (harness.mlx.worker):

- a request whose prompt has full blocks asks every rank to keep its layers' part of the prompt KV once
  prefilled (an *entry*, `save_as`);
- a hit starts the request from the entry that holds its last hit block, cut to the hit's tokens (`reuse`),
  so only the rest of the prompt is prefilled;
- an entry is dropped on every rank at once when the policy holds none of its blocks any more, or a newer
  entry holds all of them (`drop`), so ranks never diverge and kept KV stays within what the policy counts.

- an entry lives where the policy keeps its best block (`move`, for a policy with tiers: `tier_of(key)`): L1
  as computed, L2 8-bit quantized in rank memory, L3 (and below) on each rank's disk through mlx-lm's
  `save_prompt_cache`; a hit from L2/L3 is brought back first, so the rank pays the real load time.

Entries are whole prompts (two prompts sharing a prefix keep it twice).
"""
from __future__ import annotations

from harness.mlx.errors import UserError


class RankCache:
    def __init__(self, cache):
        if not hasattr(cache.policy, "holds"):
            raise UserError(f"cache policy {cache.policy_name!r} has no holds(key): the mlx backend needs it "
                            "to free the KV the policy no longer holds")
        self.cache = cache
        self.block = cache.block
        self.keys: dict[str, list] = {}        # kept entry -> its block keys
        self.tokens: dict[str, int] = {}       # kept entry -> tokens of KV it holds
        self.holder: dict = {}                 # block key -> the newest kept entry that holds it
        self.pending: dict[str, list] = {}     # entry asked for, not prefilled yet -> its keys
        self.drops: list[str] = []
        self.where: dict[str, str] = {}        # kept entry -> the tier the ranks were last told
        self.moved: dict[str, int] = {}        # moves told to the ranks, by target tier
        self._seq = 0

    def plan_insert(self, prompt) -> tuple[dict, int]:
        """The insert command's cache fields for this prompt, and the prompt tokens served from cache."""
        keys = self.cache.keys_from_tokens(prompt)
        cached = self.cache.admit(keys, len(prompt)).cached_tokens
        fields = {}
        if cached:
            entry = self.holder.get(keys[-(-cached // self.block) - 1])
            # an entry keeps its prompt's KV less the last token (that one is computed with the first output)
            usable = min(cached, self.tokens[entry]) if entry is not None else 0
            self.cache.saved_tokens -= cached - usable
            cached = usable
            if cached:
                fields["reuse"] = [entry, cached]
        if keys:
            self._seq += 1
            entry = f"e{self._seq}"
            self.pending[entry] = keys
            fields["save_as"] = entry
        return fields, cached

    def saved(self, entry: str, tokens: int) -> None:
        """Every rank kept `entry` (its prompt is prefilled): the policy learns its blocks now."""
        keys = self.pending.pop(entry, None)
        if keys is None:
            return
        self.cache.remember(keys)
        self.keys[entry], self.tokens[entry] = keys, tokens
        for key in keys[: -(-tokens // self.block)]:   # blocks it holds, the last one perhaps in part
            self.holder[key] = entry
        self._reconcile()

    def forget(self, entry: str | None) -> None:
        """The request ended before its prompt was prefilled: nothing will be kept for it."""
        self.pending.pop(entry, None)

    def _reconcile(self) -> None:
        holds = self.cache.policy.holds
        for entry, keys in list(self.keys.items()):
            if not any(self.holder.get(k) == entry and holds(k) for k in keys):
                self._drop(entry)

    def _drop(self, entry: str) -> None:
        for key in self.keys.pop(entry):
            if self.holder.get(key) == entry:
                del self.holder[key]
        del self.tokens[entry]
        self.where.pop(entry, None)
        self.drops.append(entry)

    def take_drops(self) -> list[str]:
        drops, self.drops = self.drops, []
        return drops

    def take_moves(self) -> list[list[str]]:
        """[entry, tier] for every kept entry whose best block changed tier since the ranks were last told."""
        tier_of = getattr(self.cache.policy, "tier_of", None)
        if tier_of is None:
            return []
        names = [t.name for t in self.cache.config.tiers]
        moves = []
        for entry, keys in self.keys.items():
            tiers = [tier_of(k) for k in keys if self.holder.get(k) == entry]
            tier = names[min(t for t in tiers if t is not None)] if any(t is not None for t in tiers) else None
            if tier is not None and self.where.get(entry, "L1") != tier:
                self.where[entry] = tier
                moves.append([entry, tier])
        for _, tier in moves:
            self.moved[tier] = self.moved.get(tier, 0) + 1
        return moves

    def stats(self) -> dict:
        out = self.cache.stats()
        tiers = {}
        for entry in self.keys:
            tiers[self.where.get(entry, "L1")] = tiers.get(self.where.get(entry, "L1"), 0) + 1
        out.update(source="measured", entries_kept=len(self.keys), entries_by_tier=tiers, tier_moves=dict(self.moved),
                   note="decisions by the policy as in the simulator; KV kept and reused on the ranks")
        return out
