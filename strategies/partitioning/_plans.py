"""Arithmetic every partitioning strategy shares: memory per stage, predicted times, building a checked plan.

A *unit* is a tuple of node names that runs one pipeline stage: one node, or a tensor-parallel group.
All predicted figures are theoretical (cost model), and every strategy's plan is scored by the same
`build_plan`, so strategies can be compared on one objective.
"""
from __future__ import annotations

from harness import costmodel
from harness.costmodel import TOKEN_ID_BYTES, PlanOptions, Profile, StageModel
from harness.specs import GB, Cluster, DoesNotFit, ModelSpec, NodeMemory, PartitionPlan, Stage

Unit = tuple[str, ...]
# Above this share of its usable memory a node has little room beyond the KV reserve (longer contexts, other
# apps, macOS itself), so the plan warns; it is advice, not a fit limit.
NEARLY_FULL = 0.9


# ----------------------------------------------------------------------------------------------- memory
def stage_memory_bytes(model: ModelSpec, options: PlanOptions, start: int, end: int, tp: int = 1) -> float:
    """Per member node: its share of the layers with their KV reserve, plus embeddings and head (costmodel)."""
    return costmodel.stage_memory_bytes(model, start, end, tp, options.kv_reserve_tokens)


def unit_available_bytes(cluster: Cluster, unit: Unit) -> float:
    """What bounds a unit: every member holds the same share, so the smallest member decides what fits."""
    return min(cluster.node(n).usable_bytes for n in unit)


def unit_memory(cluster: Cluster, unit: Unit, used_bytes: float) -> tuple[NodeMemory, ...]:
    """Each member's own figures: the same share of the stage (used_bytes each) against its own usable memory."""
    return tuple(NodeMemory(n, used_bytes / GB, cluster.node(n).usable_bytes / GB) for n in unit)


def max_layers(model: ModelSpec, options: PlanOptions, available: float, tp: int = 1) -> int:
    """Most layers a unit can hold wherever they start: the heaviest window of that length must fit."""
    best = 0
    for n in range(1, model.num_layers + 1):
        heaviest = max(stage_memory_bytes(model, options, s, s + n, tp) for s in range(model.num_layers - n + 1))
        if heaviest > available:
            break
        best = n
    return best


def require_total_fit(cluster: Cluster, model: ModelSpec, options: PlanOptions) -> None:
    """A clear error when even the whole cluster cannot hold the model once."""
    layers = model.weight_bytes(0, model.num_layers)
    kv = options.kv_reserve_tokens * model.kv_bytes_per_token()
    need = layers + kv + model.embed_bytes() + model.head_bytes()
    offer = cluster.total_usable_bytes
    if need > offer:
        raise DoesNotFit(
            f"{model.name} at {model.quant}-bit needs at least {need / GB:.1f} GB "
            f"(weights {layers / GB:.1f} GB + KV reserve for {options.kv_reserve_tokens} tokens {kv / GB:.1f} GB "
            f"+ embeddings/head {(model.embed_bytes() + model.head_bytes()) / GB:.1f} GB), but cluster "
            f"{cluster.name} offers {offer / GB:.1f} GB of usable GPU memory over {len(cluster.nodes)} nodes; "
            f"use fewer bits (--quant), a smaller --kv-reserve-tokens, or more nodes")


def no_arrangement(cluster: Cluster, model: ModelSpec, options: PlanOptions) -> DoesNotFit:
    """The error when the total fits but no split does (every node also holds embeddings and the head)."""
    holds = ", ".join(f"{n.name} {max_layers(model, options, n.usable_bytes)}" for n in cluster.nodes)
    copy = (model.embed_bytes() + model.head_bytes()) / GB
    return DoesNotFit(
        f"no split of {model.name} ({model.num_layers} layers, {model.quant}-bit, "
        f"{options.kv_reserve_tokens}-token KV reserve) fits {cluster.name}: every node also keeps a "
        f"{copy:.1f} GB copy of embeddings and head, leaving room for these many layers per node: {holds}; "
        f"use fewer bits, a smaller --kv-reserve-tokens, or nodes with more memory")


# ----------------------------------------------------------------------------------------------- times
def unit_stage(cluster: Cluster, model: ModelSpec, unit: Unit, start: int, end: int, last: bool) -> StageModel:
    """The cost model's stage for layers [start, end) on a unit: the simulator times the same object."""
    return costmodel.stage_model(cluster, model, unit, start, end, last)


def stage_decode_s(cluster, model, options, unit: Unit, start: int, end: int, last: bool) -> float:
    """One decode step (batch 1, options.context_tokens of context) on a unit."""
    return _reference_decode_s(unit_stage(cluster, model, unit, start, end, last), model, options)


def _reference_decode_s(stage: StageModel, model: ModelSpec, options: PlanOptions) -> float:
    return stage.decode_s(model, options.profile, 1, options.context_tokens)


def allreduce_per_layer_s(cluster, model, options, unit: Unit) -> float:
    """One layer's all-reduces in a decode step (one token's hidden state) on a unit."""
    return unit_stage(cluster, model, unit, 0, 1, False).allreduce_per_layer_s(model, options.profile, 1)


def stage_prefill_s(cluster, model, options, unit: Unit, start: int, end: int, last: bool) -> float:
    """Prefilling the reference prompt (options.prompt_tokens, nothing cached) on a unit."""
    return _reference_prefill_s(unit_stage(cluster, model, unit, start, end, last), model, options)


def _reference_prefill_s(stage: StageModel, model: ModelSpec, options: PlanOptions) -> float:
    return stage.prefill_s(model, options.profile, options.prompt_tokens, 0)


def hop_s(cluster, options, src: Unit, dst: Unit, nbytes: float) -> float:
    return costmodel.link_time(costmodel.hop_link(cluster, src, dst), nbytes, options.profile)


# ----------------------------------------------------------------------------------------------- plans
def build_plan(strategy: str, cluster: Cluster, model: ModelSpec, options: PlanOptions,
               units: list[Unit], counts: list[int], notes: tuple[str, ...] = ()) -> PartitionPlan:
    """Turn (units in ring order, layer counts) into a plan with every predicted figure filled in.

    `notes` are the strategy's information (how it searched, idle nodes); the warnings, things to act on,
    follow from the plan's own figures."""
    if len(units) != len(counts) or sum(counts) != model.num_layers or min(counts) < 1:
        raise ValueError(f"{strategy}: counts {counts} do not cover {model.num_layers} layers over {len(units)} stages")
    stages, models, start, k = [], [], 0, len(units)
    for i, (unit, n) in enumerate(zip(units, counts)):
        end, last = start + n, i == k - 1
        models.append(unit_stage(cluster, model, unit, start, end, last))   # built once: times and the rate
        if k == 1:
            link = 0.0
        elif last:  # only the sampled token ids travel back to the first stage
            link = hop_s(cluster, options, unit, units[0], TOKEN_ID_BYTES)
        else:
            link = hop_s(cluster, options, unit, units[i + 1], model.activation_bytes(1))
        used = stage_memory_bytes(model, options, start, end, len(unit))
        stages.append(Stage(
            nodes=tuple(unit), layer_start=start, layer_end=end, tp_degree=len(unit),
            memory_used_gb=used / GB,
            memory_available_gb=unit_available_bytes(cluster, unit) / GB,
            decode_ms=_reference_decode_s(models[-1], model, options) * 1e3,
            prefill_ms=_reference_prefill_s(models[-1], model, options) * 1e3,
            link_ms=link * 1e3,
            memory_per_node=unit_memory(cluster, unit, used),
        ))
        start = end
    warnings = tuple(memory_warnings(stages, options) + link_warnings(cluster, stages))
    return PartitionPlan(strategy=strategy, objective=options.objective, cluster=cluster.name, model=model.name,
                         quant_bits=model.quant, num_layers=model.num_layers, stages=tuple(stages),
                         predicted=_predict(cluster, model, options, stages, units, models),
                         bottleneck=_bottleneck(stages), warnings=warnings, notes=tuple(notes))


def memory_warnings(stages: list[Stage], options: PlanOptions) -> list[str]:
    """Nodes that fit but are nearly full: each member is judged against its own usable memory."""
    return [f"{m.node} is {100 * m.used_gb / m.usable_gb:.0f} % full ({m.used_gb:.1f} of {m.usable_gb:.1f} GB "
            f"usable): little room beyond the {options.kv_reserve_tokens}-token KV reserve"
            for s in stages for m in s.member_memory() if NEARLY_FULL * m.usable_gb < m.used_gb <= m.usable_gb]


def link_warnings(cluster: Cluster, stages: list[Stage]) -> list[str]:
    """The pipeline's bottleneck when it is a hop rather than a stage's step: a faster link would lift it."""
    i, worst = max(enumerate(stages), key=lambda e: e[1].decode_ms + e[1].link_ms)
    if worst.link_ms <= worst.decode_ms:
        return []
    after = stages[(i + 1) % len(stages)]
    link = costmodel.hop_link(cluster, worst.nodes, after.nodes)
    return [f"the hop from stage {i} ({worst.label}) to {after.label} over {link.kind} takes {worst.link_ms:.2f} ms, "
            f"more than the stage's own step ({worst.decode_ms:.2f} ms): it is the pipeline's bottleneck"]


def _predict(cluster, model, options, stages: list[Stage], units: list[Unit], models: list[StageModel]) -> dict:
    tpot = sum(s.decode_ms + s.link_ms for s in stages)
    bottleneck = max(s.decode_ms + s.link_ms for s in stages)
    prompt_hops = sum(hop_s(cluster, options, units[i], units[i + 1], model.activation_bytes(options.prompt_tokens))
                      for i in range(len(units) - 1)) * 1e3
    # the first token is out when the last stage has sampled it (the server sits beside it, as in the simulator);
    # the token id's way back to the first stage delays the next step, so it is in tpot, not in ttft
    ttft = sum(s.prefill_ms for s in stages) + prompt_hops
    members = [m for s in stages for m in s.member_memory()]
    used = sum(m.used_gb for m in members)
    usable = sum(m.usable_gb for m in members)
    rate = costmodel.sustainable_rate_rps(cluster, model, models, options)
    objective = {"latency": tpot, "throughput": bottleneck, "goodput": 1e3 / rate if rate else float("inf")}[options.objective]
    floor_s = sum(max(costmodel.decode_floor_s(cluster.node(n).chip, model, s.layer_start, s.layer_end,
                                               s.tp_degree, i == len(stages) - 1) for n in s.nodes)
                  for i, s in enumerate(stages))
    return {
        "objective_ms": objective,
        "tpot_ms": tpot,
        "tokens_per_s": 1e3 / tpot,
        "bottleneck_ms": bottleneck,
        "pipeline_tokens_per_s": 1e3 / bottleneck,
        "ttft_ms": ttft,
        "ceiling_tokens_per_s": 1.0 / floor_s,   # peak bandwidth only, no hops or overheads
        "sustainable_rate_rps": rate,              # requests/s that saturate the bottleneck stage (costmodel)
        "arrival_rate_rps": options.arrival_rate_rps,
        "output_tokens": options.output_tokens,
        "prompt_tokens": options.prompt_tokens,
        "context_tokens": options.context_tokens,
        "kv_reserve_tokens": options.kv_reserve_tokens,
        "memory_used_gb": used,
        "memory_usable_gb": usable,
        "memory_utilisation": used / usable,
        "nodes_used": sum(s.tp_degree for s in stages),
        "source": "theoretical",
    }


def _bottleneck(stages: list[Stage]) -> str:
    worst = max(stages, key=lambda s: s.decode_ms + s.link_ms)
    kind = "link" if worst.link_ms > worst.decode_ms else "compute/memory"
    return f"{worst.label} ({kind}: step {worst.decode_ms:.2f} ms + hop {worst.link_ms:.2f} ms)"


def require_fit(plan: PartitionPlan) -> PartitionPlan:
    """Raise DoesNotFit naming the first overfull stage and node; a plan that fits is returned as it is."""
    for i, s in enumerate(plan.stages):
        for m in s.member_memory():   # every member against its own usable memory, so the refusal names the node
            if not m.fits:
                raise DoesNotFit(
                    f"stage {i} on {s.label}: {m.node} needs {m.used_gb:.1f} GB for its share of layers "
                    f"{s.layer_start}-{s.layer_end - 1} (with KV reserve and embeddings/head) but has "
                    f"{m.usable_gb:.1f} GB usable; try {_memory_aware_besides(plan.strategy)}, fewer bits, "
                    f"or a smaller --kv-reserve-tokens")
    return plan.validate()


def _memory_aware_besides(failed: str) -> str:
    """Strategies that size stages by memory, never the one that just failed (the caller names that one)."""
    return " or ".join(n for n in ("ring_memory_weighted", "hybrid_optimal") if n != failed)


# ----------------------------------------------------------------------------------------------- splitting
def proportional_counts(weights: list[float], total: int, caps: list[int] | None = None) -> list[int]:
    """Integer counts >= 1 summing to `total`, proportional to weights, never above caps (water-filling).

    Raises DoesNotFit when the caps cannot hold `total`.
    """
    n = len(weights)
    caps = caps or [total] * n
    if sum(caps) < total or min(caps) < 1:
        raise DoesNotFit(f"the nodes can hold at most {sum(caps)} of {total} layers "
                         f"(per node: {caps}); use fewer bits, a smaller KV reserve, or more nodes")
    counts = [1] * n
    left = total - n
    while left > 0:
        room = [i for i in range(n) if counts[i] < caps[i]]
        wsum = sum(weights[i] for i in room)
        shares = {i: left * weights[i] / wsum for i in room}
        grant = {i: min(int(shares[i]), caps[i] - counts[i]) for i in room}
        if sum(grant.values()) == 0:  # hand out single layers by largest remaining share
            i = max(room, key=lambda j: (shares[j] - int(shares[j]), weights[j], -j))
            grant = {i: 1}
        for i, g in grant.items():
            counts[i] += g
        left -= sum(grant.values())
    return counts


def effective_speed(cluster: Cluster, node: str, profile: Profile) -> float:
    """Effective decode bandwidth (bytes/s): the number that ranks nodes for decode."""
    return profile.bandwidth(cluster.node(node).chip)


def by_speed(cluster: Cluster, profile: Profile, names) -> list[str]:
    """Fastest first; ties keep the cluster file's order."""
    index = {n.name: i for i, n in enumerate(cluster.nodes)}
    return sorted(names, key=lambda n: (-effective_speed(cluster, n, profile), index[n]))


def by_memory(cluster: Cluster, names) -> list[str]:
    """exo's ring order: most memory first, ties by name descending."""
    return sorted(names, key=lambda n: (cluster.node(n).memory_gb, n), reverse=True)
