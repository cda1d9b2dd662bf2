"""Command-line arguments that pick a cluster, model, quantization and strategy, shared by every command
that makes a plan (plan, simulate, run, serve)."""
from __future__ import annotations

import argparse
import sys

from harness import catalog
from harness.costmodel import OBJECTIVES, PlanOptions, load_profile
from harness.specs import Cluster, ModelSpec, PartitionPlan, UserError, quant_value
from strategies.registry import strategy_names

DEFAULT_CLUSTER = "mixed"
DEFAULT_MODEL = "llama-3.1-70b"


def add_plan_arguments(p: argparse.ArgumentParser, strategy_default: str = "hybrid_optimal") -> None:
    g = p.add_argument_group("cluster, model and plan")
    g.add_argument("--cluster", default=DEFAULT_CLUSTER,
                   help=f"cluster JSON file, or a bundled one: {', '.join(catalog.cluster_names())} (default %(default)s)")
    g.add_argument("--model", default=DEFAULT_MODEL, help=model_help())
    g.add_argument("--quant", type=quant_arg, default=4, metavar="BITS", help=QUANT_HELP)
    g.add_argument("--group-size", type=int, default=64, help="quantization group size: 32, 64, 128 (default %(default)s)")
    g.add_argument("--strategy", default=strategy_default,
                   help=f"partitioning strategy: {', '.join(strategy_names())}; or 'all' to compare them "
                        "(default %(default)s)")
    g.add_argument("--objective", default="latency", choices=list(OBJECTIVES),
                   help="what hybrid_optimal minimises: " + "; ".join(f"{k} = {v}" for k, v in OBJECTIVES.items())
                        + " (default %(default)s)")
    g.add_argument("--kv-reserve-tokens", type=int, default=8192,
                   help="KV-cache tokens each stage must keep room for (default %(default)s)")
    g.add_argument("--context-tokens", type=int, default=1024,
                   help="context length assumed when predicting a decode step (default %(default)s)")
    g.add_argument("--prompt-tokens", type=int, default=512,
                   help="prompt length of the predicted time to first token (default %(default)s)")
    g.add_argument("--output-tokens", type=int, default=128,
                   help="output length per request, for the sustainable rate and goodput (default %(default)s)")
    g.add_argument("--arrival-rate", type=float, default=0.0, metavar="RPS",
                   help="the workload's arrival rate, requests/s, shown against the sustainable rate (default: none)")
    add_whatif_arguments(g)
    g.add_argument("--profile", default=None,
                   help="cost-model profile: a JSON file or a name in harness/profiles/ (default: fitted, from `harness calibrate`)")


def model_help() -> str:
    return (f"config.json path / model folder, a preset: {', '.join(catalog.model_names())}; or parameter "
            f"counts, {catalog.PARAMS_FORM} (default %(default)s)")


QUANT_HELP = ("weight bits: 2, 3, 4, 5, 6, 8 (mlx affine, group scales on top); 16 unquantized; 32 float32 (CPU "
              "hosts); a fraction is bits per weight with scales included, as llama.cpp/unsloth quote it (4.5, "
              "3.5, 1.58); mixed:A/B is mlx-lm's mixed_A_B recipe, e.g. mixed:4/6 (default %(default)s)")


def quant_arg(text: str) -> int | float | str:
    """--quant as argparse's type: the canonical quant (4, 4.5, "mixed:4/6"), or argparse's usage error."""
    try:
        return quant_value(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_whatif_arguments(g) -> None:
    from harness.whatif import NODE_SPEC_HELP
    g.add_argument("--link", default=None, metavar="KIND",
                   help=f"what if every link were KIND: {', '.join(catalog.link_kinds())} (pairs without "
                        "Thunderbolt 5 on both ends get tb4-tcp instead of a TB5 kind) (default: the cluster's links)")
    g.add_argument("--add-node", action="append", default=None, metavar="CHIP:MEM",
                   help=f"what if the cluster had one more Mac: {NODE_SPEC_HELP}; repeat for more "
                        "(cabled like most of the cluster's pairs, or by --link)")


def load_inputs(args) -> tuple[Cluster, ModelSpec]:
    return load_cluster(args.cluster, getattr(args, "link", None), getattr(args, "add_node", None)), \
        catalog.load_model(args.model, args.quant, args.group_size)


def load_cluster(name: str, link: str | None = None, added=None) -> Cluster:
    """A cluster file or preset, with the what-ifs applied; what the what-ifs could not do is said on stderr."""
    from harness.whatif import apply
    cluster, notes = apply(catalog.load_cluster(name), link, added or ())
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return cluster


def plan_options(args):
    return PlanOptions(profile=load_profile(args.profile), objective=args.objective,
                       kv_reserve_tokens=args.kv_reserve_tokens, context_tokens=args.context_tokens,
                       prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                       arrival_rate_rps=args.arrival_rate)


def strategies_for(name: str) -> list[str]:
    from strategies.registry import get_strategy, strategy_names
    if name == "all":
        return strategy_names()
    get_strategy(name)  # unknown names fail here, listing the known ones
    return [name]


def make_plan(args, strategy: str | None = None) -> tuple[Cluster, ModelSpec, PartitionPlan]:
    cluster, model = load_inputs(args)
    return cluster, model, plan_with(strategy or args.strategy, cluster, model, plan_options(args))


def plan_with(name: str, cluster: Cluster, model: ModelSpec, options) -> PartitionPlan:
    """One strategy's plan; a DoesNotFit names the strategy once (the strategies' own messages do not)."""
    from harness.specs import DoesNotFit
    from strategies.registry import get_strategy
    try:
        return get_strategy(name)(cluster, model, options)
    except DoesNotFit as exc:
        raise DoesNotFit(f"{name}: {exc}") from None
