"""`python -m harness whatif`: the same cluster and model under each link kind, side by side."""
from __future__ import annotations

from harness import catalog
from harness.cli import text_table
from harness.planning import add_plan_arguments, plan_options, plan_with
from harness.specs import DoesNotFit, UserError

HELP = "compare a cluster's plan under each link kind (is Thunderbolt 5 worth it?), all figures theoretical"
DESCRIPTION = """Plan the model over the cluster as it is cabled, then under each link kind (every pair of Macs
joined by that kind; a pair without Thunderbolt 5 on both ends gets tb4-tcp instead of a TB5 kind), and print
them side by side: for each kind the plan re-optimised for it (what you would run) and the cluster's own plan
re-costed over it (what the cabling alone changes). Every figure is theoretical (the cost model).

examples:
  python -m harness whatif                                    # the bundled mixed cluster, Llama 3.1 70B 4-bit
  python -m harness whatif --objective goodput --links tb5-rdma,tb5-tcp,10gbe
  python -m harness whatif --cluster m4pro-8x-mini --add-node "M4 Pro:64\""""

DEFAULT_LINKS = ("tb5-rdma", "tb5-tcp", "tb4-tcp", "10gbe", "wifi")


def add_arguments(p) -> None:
    add_plan_arguments(p)
    p.add_argument("--links", default=",".join(DEFAULT_LINKS),
                   help="comma-separated link kinds to compare (default %(default)s)")


def run(args) -> int:
    from harness.planning import load_cluster
    kinds = link_list(args.links)
    base = load_cluster(args.cluster, None, args.add_node)
    model = catalog.load_model(args.model, args.quant, args.group_size)
    options = plan_options(args)
    own = plan_with(args.strategy, base, model, options)
    rows = [compare_row("as cabled", own, own, own)]
    rows += [compare_row(kind, *plans_under(kind, base, model, options, own, args.strategy), own) for kind in kinds]
    print(f"{model.name} ({model.quant}-bit) on {base.name}, strategy {args.strategy}, "
          f"objective {options.objective}\n")
    print(text_table([HEADER] + rows))
    print("\nall figures theoretical (cost model). 'replanned' = the strategy's plan for that link kind; "
          "'own plan' = the as-cabled plan's stages re-costed over it; tok/s for one stream; "
          "req/s = the sustainable rate at the reference lengths; 'vs as cabled' = the replanned plan's objective "
          "figure against the as-cabled plan's (+ is better)")
    return 0


HEADER = ("links", "replanned stages", "ms/token", "tok/s", "TTFT ms", "req/s", "own plan ms/token", "vs as cabled")


def link_list(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in catalog.link_kinds()]
    if not kinds or unknown:
        raise UserError(f"--links: unknown or missing link kinds {unknown or text!r}; "
                        f"known kinds: {', '.join(catalog.link_kinds())}")
    return kinds


def plans_under(kind: str, base, model, options, own, strategy: str):
    """(the strategy's plan for the cluster cabled by `kind`, or why it does not fit; `own` re-costed over it)."""
    from harness.whatif import with_link
    cluster, _ = with_link(base, kind)
    try:
        replanned = plan_with(strategy, cluster, model, options)
    except DoesNotFit as exc:
        replanned = str(exc)
    return replanned, recost(own, cluster, model, options)


def recost(plan, cluster, model, options):
    """The plan's stages (nodes, layer counts) priced over another cabling of the same nodes."""
    from strategies.partitioning._plans import build_plan
    return build_plan(plan.strategy, cluster, model, options, [s.nodes for s in plan.stages], plan.split(),
                      notes=plan.notes)


def compare_row(label: str, replanned, own_recosted, baseline) -> tuple:
    own = own_recosted.predicted
    if isinstance(replanned, str):
        return (label, "does not fit", "-", "-", "-", "-", f"{own['tpot_ms']:.2f}", "-")
    p = replanned.predicted
    return (label, stages_text(replanned), f"{p['tpot_ms']:.2f}", f"{p['tokens_per_s']:.1f}", f"{p['ttft_ms']:.0f}",
            f"{p['sustainable_rate_rps']:.3g}", f"{own['tpot_ms']:.2f}", gain(replanned, baseline))


def stages_text(plan) -> str:
    return " | ".join(f"{s.label}{'(tp' + str(s.tp_degree) + ')' if s.tp_degree > 1 else ''}:{s.layers}"
                      for s in plan.stages)


def gain(plan, baseline) -> str:
    """How much better `plan` is than `baseline` on the objective both were planned for: ms/token for latency,
    the bottleneck stage for throughput, requests/s for goodput (objective_ms is 1000 / rate there)."""
    new, old = plan.predicted["objective_ms"], baseline.predicted["objective_ms"]
    if not (new and old) or new == float("inf") or old == float("inf"):
        return "-"
    return f"{100 * (old / new - 1):+.0f} % {plan.objective}"
