"""uniform: an even layer split over every node in the cluster file's order (mlx-lm's default split).

mlx-lm gives the extra layers of an uneven division to its low ranks, which hold the LAST layers, so in
layer order the trailing stages get one more. It ignores memory: a node that cannot hold its share is an error.
"""
from strategies.partitioning._plans import build_plan, require_fit, require_total_fit
from strategies.registry import partitioner


def even_counts(layers: int, stages: int) -> list[int]:
    base, extra = divmod(layers, stages)
    return [base] * (stages - extra) + [base + 1] * extra


@partitioner("uniform")
def plan(cluster, model, options):
    require_total_fit(cluster, model, options)
    names = [n.name for n in cluster.nodes][: model.num_layers]
    warnings = () if len(names) == len(cluster.nodes) else (
        f"{len(cluster.nodes) - len(names)} nodes left idle: only {model.num_layers} layers to share",)
    units = [(n,) for n in names]
    return require_fit(build_plan("uniform", cluster, model, options, units,
                                  even_counts(model.num_layers, len(units)), warnings))
