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

Kept KV lives in the ranks' memory whatever tier the policy names: a lower-tier hit is served at memory speed
(its load time is not paid), and entries are whole prompts (two prompts sharing a prefix keep it twice).
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
        self.drops.append(entry)

    def take_drops(self) -> list[str]:
        drops, self.drops = self.drops, []
        return drops

    def stats(self) -> dict:
        out = self.cache.stats()
        out.update(source="measured", entries_kept=len(self.keys),
                   note="decisions by the policy as in the simulator; KV kept and reused on the ranks")
        return out
