"""`python -m harness plan`: split a model's layers over a cluster with one strategy, or compare them all."""
from __future__ import annotations

import dataclasses
import json
import sys
import time

from harness.cli import text_table
from harness.costmodel import DEFAULT_ENGINE
from harness.planning import add_plan_arguments, load_inputs, plan_options, plan_with, strategies_for
from harness.specs import DoesNotFit, PartitionPlan

HELP = "split a model over a cluster and print the plan (predicted per-token time, memory per node)"
DESCRIPTION = """Split a model's layers over a cluster with a partitioning strategy and print the plan:
per stage the layers, memory used / usable, and predicted decode, prefill and hop times; then the predicted
time per token, TTFT and bottleneck. Every predicted figure is theoretical (the roofline cost model with the
profile's efficiency factors), not a measurement.

examples:
  python -m harness plan --cluster mixed --model llama-3.1-70b --quant 4 --strategy all
  python -m harness plan --cluster runs/clusters/seed-64gb.json --model path/to/config.json --json"""


# hybrid_optimal's search statistics note starts so (strategies/partitioning/hybrid_optimal.py)
SEARCH_NOTE = "search ("


def add_arguments(p) -> None:
    add_plan_arguments(p)
    p.add_argument("--all", action="store_true", help="compare every strategy side by side (same as --strategy all)")
    p.add_argument("--json", action="store_true", help="print the plan(s) as JSON for machines")
    p.add_argument("--engine", default=None, metavar="NAME",
                   help="serving engine the prediction is for: the profile's engines entry (its per-step and "
                        "per-request costs, prefill chunk); default mlx-lm, the profile's own factors")


def run(args) -> int:
    names = strategies_for("all" if args.all else args.strategy)
    cluster, model = load_inputs(args)
    options = plan_options(args)
    if args.engine:
        options = dataclasses.replace(options, profile=options.profile.for_engine(args.engine))
    started = time.perf_counter()
    if len(names) == 1:
        results: dict[str, PartitionPlan | str] = {names[0]: plan_with(names[0], cluster, model, options)}
    else:
        results = compare_strategies(names, cluster, model, options)
    planning_s = time.perf_counter() - started
    if args.json:
        out = {n: (r.to_dict() if isinstance(r, PartitionPlan) else {"error": r}) for n, r in results.items()}
        json.dump(out if len(names) > 1 else out[names[0]], sys.stdout, indent=2)
        print()
        return _fit_status(results, cluster, model)
    print(header(cluster, model, options))
    if len(names) == 1:
        print(plan_table(results[names[0]]))
        print(concurrency_table(cluster, model, results[names[0]], options))
    else:
        print(comparison_table(results))
    print(f"\nplanned in {planning_s:.2f} s (measured)")
    return _fit_status(results, cluster, model)


def concurrency_table(cluster, model, plan: PartitionPlan, options) -> str:
    """How many users the plan serves: per-stream and aggregate decode speed at 1, 4, 16 and 64 streams."""
    from harness.costmodel import CONCURRENCY_LEVELS, concurrent_decode, stage_models
    stages = stage_models(cluster, model, plan)
    rows = [("users", "tok/s per stream", "tok/s in all", "KV tokens needed / room", "fits")]
    for users in CONCURRENCY_LEVELS:
        r = concurrent_decode(cluster, model, stages, options, users)
        rows.append((str(users), f"{r['per_stream_tok_s']:.1f}", f"{r['aggregate_tok_s']:.1f}",
                     f"{r['kv_tokens_needed']:,} / {r['kv_tokens_room']:,.0f}", "yes" if r["fits"] else "no"))
    return ("\nconcurrent streams (theoretical: steady decode at the decode context, one micro-batch per stage; "
            f"each stream holds {options.request_tokens} tokens of KV on every stage):\n" + text_table(rows))


def compare_strategies(names: list[str], cluster, model, options) -> dict[str, PartitionPlan | str]:
    """Every strategy's plan, or the reason it does not fit (its message, without the strategy's name)."""
    from strategies.registry import get_strategy
    results: dict[str, PartitionPlan | str] = {}
    for name in names:
        try:
            results[name] = get_strategy(name)(cluster, model, options)
        except DoesNotFit as exc:
            results[name] = str(exc)
    return results


def _fit_status(results: dict, cluster, model) -> int:
    """Raise when no strategy fits, so `--strategy all` exits non-zero like a single strategy that does not fit."""
    if not any(isinstance(r, PartitionPlan) for r in results.values()):
        raise DoesNotFit(f"none of the {len(results)} strategies fits {model.name} ({model.quant}-bit) "
                         f"on {cluster.name}; each strategy's reason is printed with it")
    return 0


def header(cluster, model, options) -> str:
    nodes = ", ".join(f"{n.name} ({n.chip.label}, {n.memory_gb:g} GB)" for n in cluster.nodes)
    return (f"model {model.name}: {model.total_params / 1e9:.1f} B params, {model.num_layers} layers, "
            f"{model.quant}-bit = {model.total_weight_bytes() / 1e9:.1f} GB of weights\n"
            f"cluster {cluster.name}: {nodes}\n"
            f"objective {options.objective}; KV reserve {options.kv_reserve_tokens} tokens; "
            f"decode predicted at {options.context_tokens} tokens of context; profile {options.profile.name}"
            f"{'' if options.profile.engine == DEFAULT_ENGINE else f', engine {options.profile.engine}'}\n")


def plan_table(plan: PartitionPlan) -> str:
    rows = [("stage", "nodes", "layers", "memory GB used/usable", "decode ms", "prefill ms", "hop ms")]
    for i, s in enumerate(plan.stages):
        tp = f" x{s.tp_degree} TP" if s.tp_degree > 1 else ""
        rows.append((str(i), s.label + tp, f"{s.layer_start}-{s.layer_end - 1} ({s.layers})",
                     stage_memory_cell(s), f"{s.decode_ms:.2f}",
                     f"{s.prefill_ms:.1f}", f"{s.link_ms:.3f}"))
    p = plan.predicted
    lines = [f"strategy {plan.strategy}", text_table(rows), "",
             f"predicted (theoretical): {p['tpot_ms']:.2f} ms per token = {p['tokens_per_s']:.1f} tokens/s for one stream; "
             f"TTFT {p['ttft_ms']:.0f} ms for a {p['prompt_tokens']}-token prompt",
             f"ceiling (theoretical): {p['ceiling_tokens_per_s']:.1f} tokens/s if every stage read its weights at "
             f"peak bandwidth with no overheads or hops",
             f"pipeline bottleneck {p['bottleneck_ms']:.2f} ms = {p['pipeline_tokens_per_s']:.1f} tokens/s with a "
             f"micro-batch per stage in flight: {plan.bottleneck}",
             f"memory: {p['memory_used_gb']:.1f} GB used of {p['memory_usable_gb']:.1f} GB usable on the nodes in the plan "
             f"({100 * p['memory_utilisation']:.0f} %)",
             sustainable_line(p)]
    lines += [f"warning: {w}" for w in plan.warnings] + [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def sustainable_line(p: dict) -> str:
    """The request rate the plan can serve before it saturates (costmodel.sustainable_rate_rps), and how much of
    it the workload's arrival rate takes when one is known."""
    rate, offered = p["sustainable_rate_rps"], p.get("arrival_rate_rps")
    load = f"; the workload's {offered:g} requests/s would load it {100 * offered / rate:.0f} %" if offered and rate else ""
    return (f"sustainable rate (theoretical): {rate:.2f} requests/s of {p['prompt_tokens']}+"
            f"{p['output_tokens']} tokens: prefill on every stage, batched decode at the bottleneck{load}")


def stage_memory_cell(stage) -> str:
    """A stage's memory used / usable; a tensor-parallel stage names each member with its own usable memory."""
    members = stage.member_memory()
    if len(members) == 1:
        return f"{members[0].used_gb:.1f} / {members[0].usable_gb:.1f}"
    return ", ".join(f"{m.node} {m.used_gb:.1f} / {m.usable_gb:.1f}" for m in members)


def comparison_table(results: dict) -> str:
    rows = [("strategy", "stages (layers)", "ms/token", "tok/s", "TTFT ms", "bottleneck ms", "sustainable req/s",
             "memory GB per node used/usable")]
    footer = []   # why a strategy does not fit, and the warnings of those that do
    for name, r in results.items():
        if isinstance(r, str):
            rows.append((name, "does not fit", "-", "-", "-", "-", "-", "-"))
            footer.append(f"{name}: {r}")
            continue
        p = r.predicted
        stages = " | ".join(f"{s.label}{'(tp' + str(s.tp_degree) + ')' if s.tp_degree > 1 else ''}:{s.layers}"
                            for s in r.stages)
        # one figure per node in ring order, so a tensor-parallel pair shows two, each with its own usable memory
        mem = " ".join(f"{m.used_gb:.0f}/{m.usable_gb:.0f}" for s in r.stages for m in s.member_memory())
        rows.append((name, stages, f"{p['tpot_ms']:.2f}", f"{p['tokens_per_s']:.1f}", f"{p['ttft_ms']:.0f}",
                     f"{p['bottleneck_ms']:.2f}", f"{p['sustainable_rate_rps']:.3g}", mem))
        footer += [f"{name} warning: {w}" for w in r.warnings]
        # how hard the search worked; the line must not start with the strategy's name, which starts its row
        footer += [f"note ({name}): {n}" for n in r.notes if n.startswith(SEARCH_NOTE)]
    out = [text_table(rows), "", "all figures predicted (theoretical) by the cost model; ms/token and tok/s are for one "
           "stream; bottleneck = slowest stage + its hop; sustainable req/s = requests per second the plan serves "
           "at the reference lengths with batched decode (the goodput objective's figure)"]
    out += footer
    return "\n".join(out)
