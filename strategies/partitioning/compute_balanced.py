"""compute_balanced: layer shares proportional to each node's speed on a reference request, within memory caps.

A node's speed is 1 / (time for one layer to prefill the reference prompt and decode the reference output),
so it weighs memory bandwidth (decode) and FLOPS (prefill) as the request mix does. Shares that would
overflow a node are capped at what it holds and the rest flows to the others (water-filling).
Nodes are placed fastest first.
"""
from strategies.partitioning._plans import (by_speed, build_plan, max_layers, proportional_counts, require_fit,
                                            require_total_fit, stage_decode_s, stage_prefill_s, unit_available_bytes)
from strategies.registry import partitioner


def layer_speed(cluster, model, options, node: str) -> float:
    per_layer = (stage_prefill_s(cluster, model, options, (node,), 0, 1, False)
                 + options.output_tokens * stage_decode_s(cluster, model, options, (node,), 0, 1, False))
    return 1.0 / per_layer


@partitioner("compute_balanced")
def plan(cluster, model, options):
    require_total_fit(cluster, model, options)
    order = by_speed(cluster, options.profile, [n.name for n in cluster.nodes])[: model.num_layers]
    caps = [max_layers(model, options, unit_available_bytes(cluster, (n,))) for n in order]
    usable = [i for i, c in enumerate(caps) if c > 0]  # a node that cannot hold one layer sits out
    order, caps = [order[i] for i in usable], [caps[i] for i in usable]
    counts = proportional_counts([layer_speed(cluster, model, options, n) for n in order], model.num_layers, caps)
    warnings = () if len(order) == len(cluster.nodes) else (
        f"{len(cluster.nodes) - len(order)} nodes left idle (too little memory for one layer, or too few layers)",)
    return require_fit(build_plan("compute_balanced", cluster, model, options, [(n,) for n in order], counts, warnings))
