"""Prefix-KV caching for the simulated cluster: tiers sized from the nodes, a policy from strategies.caching.

The policy decides; this module turns its decisions into time and memory the engine understands:
  * L1 (unified memory inside the GPU working set) is carved out of the engine's KV pool, so a hit's KV is
    already resident and the request needs new KV only for the tokens after it;
  * L2 (the RAM outside the GPU wired limit, KV stored at 8 bits), L3 (local SSD) and, when given a size, L4
    (network storage or a peer Mac's memory, read over the cluster's slowest link) hits must be loaded before
    the request can start: load time = block bytes / the tier's read rate;
  * a lower-tier block is used only while loading it beats recomputing it (the policy's check), and the
    recompute cost of a block is its prefill time through the plan's stages.
A cached prefix is not prefilled again: the engine prefills only prompt - cached tokens (sim.admission carries
a request through look-up, load and submit, for simulate() and the real-time SimBackend alike). Attention over the
cached tokens during that prefill is not charged (a small underestimate for long prefixes).

Block keys: from token ids as a hash chain over full blocks (the real-time server path, where prompts are
text), or (prefix id, block index) over the workload's declared shared prefix (the virtual-time path).
"""
from __future__ import annotations

from dataclasses import dataclass

from harness import costmodel
from harness.specs import GB, UserError
from sim.costs import kv_pool_tokens, stage_models
from strategies.caching._base import CacheConfig, Tier
from strategies.registry import get_cache_policy

BLOCK_TOKENS = 64
L1_SHARE = 0.25          # of the KV pool kept for cached prefixes (vLLM-style: cached blocks compete with running ones)
SSD_CACHE_GB = 64.0      # L3 budget on each node's SSD
L2_KV_BYTES = 1          # 8-bit KV in the L2 tier (halves the bytes of fp16 KV)
L4_ALONE_GBPS = 10.0     # a one-Mac cluster has no link: its L4 (a NAS) is taken to be on 10 GbE


@dataclass
class CacheHit:
    cached_tokens: int
    load_s: float


class PrefixCache:
    def __init__(self, policy: str, cluster, model, plan, profile, pool_tokens: int,
                 block_tokens: int = BLOCK_TOKENS, l1_share: float = L1_SHARE, ssd_cache_gb: float = SSD_CACHE_GB,
                 l4_gb: float = 0.0):
        if not 0 < l1_share < 1:
            raise UserError(f"the L1 share of the KV pool must be in (0, 1), got {l1_share}")
        self.block = block_tokens
        self.l1_tokens = int(pool_tokens * l1_share) // block_tokens * block_tokens
        self.engine_kv_tokens = pool_tokens - self.l1_tokens   # what is left for running requests
        if not 0 <= l4_gb <= 1e6:
            raise UserError(f"the L4 cache size must be 0 (none) to 1e6 GB, got {l4_gb}")
        self.config = self._tiers(cluster, model, plan, profile, ssd_cache_gb, l4_gb)
        self.policy = get_cache_policy(policy)(self.config)
        if l4_gb and len(getattr(self.policy, "tiers", ())) < len(self.config.tiers):
            raise UserError(f"cache policy {policy!r} keeps one tier: an L4 size needs a policy with tiers "
                            "(tiered_lru)")
        self.policy_name = policy
        self.saved_tokens = 0

    def _tiers(self, cluster, model, plan, profile, ssd_cache_gb, l4_gb) -> CacheConfig:
        nodes = [cluster.node(n) for s in plan.stages for n in s.nodes]
        block_bytes = self.block * model.kv_bytes_per_token()          # the whole pipeline's share of a block
        l2_block = block_bytes * L2_KV_BYTES / model.kv_bytes_per_value
        outside = min(n.memory_gb * (1 - n.usable_fraction) * GB / 2 for n in nodes)  # half of it left to macOS
        ssd_rate = min((n.ssd_gbs or profile.ssd_gbs) for n in nodes) * 1e9
        ram_rate = min(profile.bandwidth(n.chip) for n in nodes)
        per_node_share = len(nodes)                                      # each node holds its layers' part
        recompute = sum(costmodel.prefill_time(cluster.node(s.nodes[0]).chip, profile, model, s.layer_start,
                                               s.layer_end, self.block, tp=s.tp_degree) for s in plan.stages)
        tiers = (Tier("L1", self.l1_tokens // self.block),
                 Tier("L2", int(outside * per_node_share / l2_block), l2_block / ram_rate),
                 Tier("L3", int(ssd_cache_gb * GB * per_node_share / block_bytes), block_bytes / per_node_share / ssd_rate))
        if l4_gb > 0:   # the whole pipeline's blocks in one store; each node reads its share over its own link
            tiers += (Tier("L4", int(l4_gb * GB / block_bytes), block_bytes / per_node_share / l4_rate(cluster, nodes)),)
        return CacheConfig(tiers=tiers, recompute_s_per_block=recompute)

    # -- keys -------------------------------------------------------------------------------------------
    def keys_from_tokens(self, token_ids) -> list:
        """A hash chain over full blocks: equal keys mean equal prefixes up to and including that block."""
        keys, h = [], 0
        for i in range(len(token_ids) // self.block):
            h = hash((h, tuple(token_ids[i * self.block:(i + 1) * self.block])))
            keys.append(h)
        return keys

    def keys_from_prefix(self, prefix_id, prefix_tokens: int) -> list:
        if prefix_id is None:
            return []
        return [(prefix_id, i) for i in range(int(prefix_tokens) // self.block)]

    # -- decisions, carried out ----------------------------------------------------------------------------
    def admit(self, keys, prompt_tokens: int) -> CacheHit:
        """How much of the prompt the cache serves (at least one token is always prefilled) and the load time."""
        hit = self.policy.lookup(keys)
        cached = min(hit.blocks * self.block, prompt_tokens - 1)
        self.saved_tokens += cached
        return CacheHit(cached, hit.load_s)

    def remember(self, keys) -> None:
        """After the prefill: the prompt's blocks are now cached."""
        self.policy.insert(keys)

    def engine_config(self, config):
        """The engine's config with this cache's L1 share taken out of the KV pool."""
        from dataclasses import replace
        return replace(config, kv_tokens=self.engine_kv_tokens)

    def stats(self) -> dict:
        out = {"policy": self.policy_name, "block_tokens": self.block, "l1_tokens": self.l1_tokens,
               "prefill_tokens_saved": self.saved_tokens, "source": "simulated"}
        out.update(self.policy.stats())
        out["tiers"] = [{"name": t.name, "capacity_blocks": t.capacity_blocks, "load_s_per_block": t.load_s_per_block}
                        for t in self.config.tiers]
        return out


def l4_rate(cluster, nodes) -> float:
    """Bytes/s an L4 read gets: the slowest link touching the plan's nodes (the store sits across the network)."""
    names = {n.name for n in nodes}
    gbps = [link.bandwidth_gbps for link in cluster.links if link.a in names or link.b in names]
    return min(gbps or [L4_ALONE_GBPS]) * 1e9 / 8


def make_prefix_cache(policy: str, cluster, model, plan, profile, kv_cap_tokens: int = 0, **kw) -> PrefixCache | None:
    """None for policy "none" (nothing to carve out or look up). The KV pool is what memory allows, or the
    engine's cap (EngineConfig.kv_tokens) when smaller."""
    if policy == "none":
        get_cache_policy(policy)  # still validates the name
        return None
    pool_tokens = kv_pool_tokens(cluster, stage_models(cluster, model, plan))
    if kv_cap_tokens:
        pool_tokens = min(pool_tokens, kv_cap_tokens)
    return PrefixCache(policy, cluster, model, plan, profile, pool_tokens, **kw)
