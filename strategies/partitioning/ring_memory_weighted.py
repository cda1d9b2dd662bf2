"""ring_memory_weighted: exo's classic split. Nodes ordered by memory (most first, ties by name descending),
each given a share of the layer range proportional to its memory.

The arithmetic follows exo's documented behaviour: a node's fraction ends at round(start + mem/total, 5); its
layers run from int(start * L) to int(end * L) - 1; the last node runs to the final layer; empty shards are dropped.
Like exo it does not look at per-node limits, so a share that overflows a node is reported as an error.
"""
from strategies.partitioning._plans import build_plan, by_memory, require_fit, require_total_fit
from strategies.registry import partitioner


def memory_weighted_counts(memories: list[float], layers: int) -> list[int]:
    total = sum(memories)
    bounds, start = [], 0.0
    for mem in memories:
        end = round(start + mem / total, 5)
        bounds.append((start, end))
        start = end
    counts = []
    for i, (lo, hi) in enumerate(bounds):
        first = int(lo * layers)
        last = layers - 1 if i == len(bounds) - 1 else int(hi * layers) - 1
        counts.append(max(0, last - first + 1))
    return counts


@partitioner("ring_memory_weighted")
def plan(cluster, model, options):
    require_total_fit(cluster, model, options)
    order = by_memory(cluster, [n.name for n in cluster.nodes])
    counts = memory_weighted_counts([cluster.node(n).memory_gb for n in order], model.num_layers)
    kept = [(n,) for n, c in zip(order, counts) if c > 0]
    warnings = () if len(kept) == len(order) else (f"{len(order) - len(kept)} nodes got no layers",)
    return require_fit(build_plan("ring_memory_weighted", cluster, model, options, kept,
                                  [c for c in counts if c > 0], warnings))
