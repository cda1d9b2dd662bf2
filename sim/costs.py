"""What the simulator adds to the stage cost model of harness.costmodel: the size of the KV pool.

Stage timing (StageModel, stage_models, hop_links) lives in harness.costmodel, shared with the planner, so a
plan's prediction and the simulator's timing come from one formula; the names are re-exported for sim/ users.
"""
from __future__ import annotations

from harness.costmodel import StageModel, hop_links, kv_room_tokens, stage_models
from harness.specs import Cluster, UserError

__all__ = ["StageModel", "hop_links", "kv_pool_tokens", "stage_models"]


def kv_pool_tokens(cluster: Cluster, stages) -> int:
    """KV pool size in tokens: the stage with the least room (free bytes / its KV bytes per token) decides."""
    for st in stages:
        usable = min(cluster.node(n).usable_bytes for n in st.nodes)
        if usable <= st.weight_bytes_node:
            raise UserError(f"stage {st.index} ({'+'.join(st.nodes)}): weights need "
                            f"{st.weight_bytes_node / 1e9:.1f} GB but only {usable / 1e9:.1f} GB is usable")
    return int(min(kv_room_tokens(cluster, st) for st in stages))
