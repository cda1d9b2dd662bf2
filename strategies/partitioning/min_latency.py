"""min_latency: the fewest nodes that hold the model, fastest first: fewer hops, lower TTFT.

For k = 1, 2, ... it looks at every k-node set that can hold the model (fastest-first order) and keeps the
one with the lowest predicted time per token; layers fill the fastest node first, up to what it holds.
Beyond 10 nodes it only tries the k fastest and the k largest nodes, to stay quick.
"""
from itertools import combinations

from strategies.partitioning._plans import (by_memory, by_speed, build_plan, max_layers, no_arrangement, require_fit,
                                            require_total_fit, unit_available_bytes)
from strategies.registry import partitioner

EXHAUSTIVE_UP_TO = 10


def fill_fastest_first(caps: list[int], layers: int) -> list[int] | None:
    """Every node keeps at least one layer; the rest go to the earliest (fastest) nodes up to their caps."""
    if len(caps) > layers or sum(caps) < layers:
        return None
    counts, left = [1] * len(caps), layers - len(caps)
    for i, cap in enumerate(caps):
        extra = min(cap - 1, left)
        counts[i] += extra
        left -= extra
    return counts


def candidate_sets(cluster, options, k: int):
    names = [n.name for n in cluster.nodes]
    if len(names) <= EXHAUSTIVE_UP_TO:
        return combinations(names, k)
    return {tuple(by_speed(cluster, options.profile, names)[:k]), tuple(by_memory(cluster, names)[:k])}


@partitioner("min_latency")
def plan(cluster, model, options):
    require_total_fit(cluster, model, options)
    cap = {n.name: max_layers(model, options, unit_available_bytes(cluster, (n.name,))) for n in cluster.nodes}
    for k in range(1, min(len(cluster.nodes), model.num_layers) + 1):
        best = None
        for subset in candidate_sets(cluster, options, k):
            order = by_speed(cluster, options.profile, subset)
            counts = fill_fastest_first([cap[n] for n in order], model.num_layers)
            if counts is None:
                continue
            p = build_plan("min_latency", cluster, model, options, [(n,) for n in order], counts)
            if best is None or p.predicted["tpot_ms"] < best.predicted["tpot_ms"]:
                best = p
        if best is not None:
            return require_fit(best)
    raise no_arrangement(cluster, model, options)
