"""Cluster sizing (issue 13, item 2): the cheapest cluster of Macs, bought at list price, that meets a model's
targets (per-stream decode tokens/s and TTFT at a number of concurrent users).

Two passes, as the issue asks:
  * screening (theoretical): every multiset of priced Mac configurations up to --max-nodes, under each link kind,
    is split with exo's memory-weighted pipeline (ring_memory_weighted's arithmetic) and priced with the cost
    model's StageModel directly; stage times are memoised per (chip, layers, batch), so a candidate costs
    microseconds and no full plan is built;
  * confirmation (simulated): the best few are planned with ring_memory_weighted and served by sim.run.simulate
    under a closed loop of `users` concurrent streams.

Screening figures, per candidate with k stages and C users in m = min(C, k) micro-batches of b = ceil(C/m):
  round   = max(sum of (stage decode + outgoing hop), m x the slowest (stage decode + hop))
  prefill = the prompt's prefill on every stage + its forward hops
  TPOT    = round + (C - 1) x prefill / output_tokens: while one stream's output is decoded, every other user's
            next prompt stalls the pipeline once for its prefill (prefills do not overlap decode rounds, as in
            costmodel.request_pipeline_s)                                         -> tok/s per stream = 1 / TPOT
  TTFT    = prefill + one round it may wait behind the others' decode step.
"""
from __future__ import annotations

import csv
import html
import itertools
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from harness import catalog, costmodel
from harness.catalog import default_usable_fraction, find_chip, link_kinds, make_link
from harness.costmodel import TOKEN_ID_BYTES, PlanOptions, StageModel
from harness.specs import GB, Chip, ModelSpec, UserError
from harness.whatif import fitting_kind
from strategies.partitioning.ring_memory_weighted import memory_weighted_counts

PRICES_CSV = catalog.HERE / "apple_silicon_prices.csv"
PRICE_COLUMNS = ("product", "chip", "gpu_cores", "memory_gb", "usd", "date", "source", "confidence")
SCREEN_STRATEGY = "ring_memory_weighted"


# ----------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Offer:
    """One Mac configuration one can buy, at its US list price."""
    product: str
    chip: Chip
    memory_gb: float
    usd: float
    date: str
    source: str
    confidence: str

    @property
    def label(self) -> str:
        return f"{self.chip.name} {self.chip.gpu_cores}c {self.memory_gb:g}GB"


def load_offers(path: str | Path = PRICES_CSV) -> tuple[Offer, ...]:
    """The price list; a row with a missing column, a bad number or an unknown chip is a one-line error."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"price list {path} does not exist")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in PRICE_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise UserError(f"price list {path}: missing column(s) {', '.join(missing)}; required: "
                            f"{', '.join(PRICE_COLUMNS)}")
        offers = tuple(_offer(row, f"price list {path} row {i + 2}") for i, row in enumerate(reader))
    if not offers:
        raise UserError(f"price list {path}: no rows; expected one priced Mac configuration a line")
    return offers


def _offer(row: dict, where: str) -> Offer:
    cores, memory, usd = (_positive(row[k], f"{where}: {k}") for k in ("gpu_cores", "memory_gb", "usd"))
    chip = find_chip(row["chip"], int(cores), where=f"{where}: ")
    if memory > chip.max_mem_gb:
        raise UserError(f"{where}: memory_gb {memory:g} is more than {chip.label} supports ({chip.max_mem_gb:g} GB)")
    return Offer(row["product"], chip, memory, usd, row["date"], row["source"], row["confidence"])


def _positive(text: str, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{where}: found {text!r}; allowed: a positive number")
    return value


@dataclass(frozen=True)
class Targets:
    tok_s: float                 # per-stream decode tokens/s every user must get
    users: int = 1               # concurrent streams
    ttft_ms: float | None = None  # time to first token bound; None = any

    def describe(self) -> str:
        ttft = f", TTFT <= {self.ttft_ms:g} ms" if self.ttft_ms is not None else ""
        return f">= {self.tok_s:g} tok/s per stream at {self.users} concurrent user(s){ttft}"


TARGET_KEYS = ("tok_s", "users", "ttft_ms")


def parse_targets(text: str) -> Targets:
    """'tok_s=10,users=4,ttft_ms=3000' (tok_s required)."""
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in TARGET_KEYS:
            raise UserError(f"--targets: found {part!r}; allowed: {', '.join(k + '=NUMBER' for k in TARGET_KEYS)}")
        values[key] = _positive(raw.strip(), f"--targets {key}")
    if "tok_s" not in values:
        raise UserError(f"--targets {text!r}: tok_s=NUMBER is required (per-stream decode tokens/s), e.g. tok_s=10,users=4")
    users = values.get("users", 1)
    if users != int(users):
        raise UserError(f"--targets users: found {users:g}; allowed: a whole number >= 1")
    return Targets(tok_s=values["tok_s"], users=int(users), ttft_ms=values.get("ttft_ms"))


def parse_links(text: str | None) -> tuple[str, ...]:
    """Comma-separated link kinds; default every kind of links.json except this project's loopback."""
    known = [k for k in link_kinds() if k != "loopback"]
    if not text:
        return tuple(known)
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in link_kinds()]
    if bad or not kinds:
        raise UserError(f"--links: found {', '.join(bad) or repr(text)}; allowed: {', '.join(known)}")
    return kinds


# ----------------------------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    offers: tuple[Offer, ...]     # the Macs bought, largest memory first (exo's ring order)
    link: str                     # the link kind between every pair (TB5 kinds fall back where a Mac lacks TB5)

    @property
    def usd(self) -> float:
        return sum(o.usd for o in self.offers)

    @property
    def label(self) -> str:
        counts: dict[str, int] = {}
        for o in self.offers:
            counts[o.label] = counts.get(o.label, 0) + 1
        macs = " + ".join(f"{n}x {label}" for label, n in counts.items())
        return macs if len(self.offers) == 1 else f"{macs} over {self.link}"


def cluster_data(cand: Candidate, name: str = "candidate") -> dict:
    """The candidate as the JSON shape of runs/clusters/*.json (parse with harness.catalog.parse_cluster)."""
    nodes = [{"name": f"mac{i}", "chip": o.chip.name, "gpu_cores": o.chip.gpu_cores, "memory_gb": o.memory_gb}
             for i, o in enumerate(cand.offers)]
    links = [{"a": f"mac{i}", "b": f"mac{j}", "kind": fitting_kind(cand.link, a.chip, b.chip)}
             for (i, a), (j, b) in itertools.combinations(enumerate(cand.offers), 2)]
    return {"name": name, "_about": f"size candidate: {cand.label}, ${cand.usd:,.0f} at list prices",
            "nodes": nodes, "links": links, "default_link": "tb4-tcp"}


def candidates(offers, max_nodes: int, links, budget: float | None = None):
    """Every multiset of offers with 1..max_nodes Macs, under each link kind (a single Mac: no link), within budget."""
    ordered = sorted(offers, key=lambda o: (-o.memory_gb, -o.chip.gpu_cores, o.usd))
    for n in range(1, max_nodes + 1):
        for combo in itertools.combinations_with_replacement(ordered, n):
            if budget is not None and sum(o.usd for o in combo) > budget:
                continue
            for link in (links[:1] if n == 1 else links):
                yield Candidate(combo, link)


def count_candidates(offers, max_nodes: int, links) -> int:
    """How many candidates `candidates` yields without a budget: C(P+n-1, n) multisets of n Macs per link."""
    p = len(offers)
    return sum(math.comb(p + n - 1, n) * (1 if n == 1 else len(links)) for n in range(1, max_nodes + 1))


# ----------------------------------------------------------------------------------------------- screening
@dataclass
class Screened:
    candidate: Candidate
    fits: bool
    tok_s: float = 0.0            # theoretical per-stream decode tokens/s at the target's users
    ttft_ms: float = math.inf     # theoretical
    reason: str = ""              # why it does not fit, or which target it misses
    meets: bool = False
    simulated: dict = field(default_factory=dict)   # filled for the confirmed few
    strategy: str = SCREEN_STRATEGY                 # the plan priced: hybrid_optimal where refine_with_planner won
    tp: bool = False                                # that plan has a tensor-parallel group


class Screener:
    """Prices candidates with the cost model; stage times are memoised, so the same Mac holding the same layers
    at the same batch is priced once for the whole search."""

    def __init__(self, model: ModelSpec, options: PlanOptions, targets: Targets):
        self.model, self.options, self.targets = model, options, targets
        self._stage_times = lru_cache(maxsize=None)(self._stage_times_uncached)

    def screen(self, cand: Candidate) -> Screened:
        layers = memory_weighted_counts([o.memory_gb for o in cand.offers], self.model.num_layers)
        spans, start = [], 0
        for offer, count in zip(cand.offers, layers):
            if count:
                spans.append((offer, start, start + count))
                start += count
        too_big = [o for o, s, e in spans if not self._fits(o, s, e)]
        if too_big:
            return Screened(cand, False, reason=f"{too_big[0].label} cannot hold its memory-weighted share of "
                                                f"{self.model.name} plus the KV reserve")
        tok_s, ttft_ms = self._figures(cand, spans)
        out = Screened(cand, True, tok_s, ttft_ms)
        out.reason = self._misses(out)
        out.meets = not out.reason
        return out

    def _fits(self, offer: Offer, start: int, end: int) -> bool:
        need = costmodel.stage_memory_bytes(self.model, start, end, 1, self.options.kv_reserve_tokens)
        return need <= offer.memory_gb * GB * default_usable_fraction(offer.memory_gb)

    def _figures(self, cand: Candidate, spans) -> tuple[float, float]:
        users, k = self.targets.users, len(spans)
        micro = min(users, k)
        batch = math.ceil(users / micro)
        steps, prefill = [], 0.0
        for i, (offer, s, e) in enumerate(spans):
            nxt = spans[(i + 1) % k][0]
            decode_s, prefill_s = self._stage_times(offer.chip, s, e, i == k - 1, batch)
            last = i == k - 1
            hop = 0.0 if k == 1 else self._hop_s(cand.link, offer.chip, nxt.chip,
                                                 TOKEN_ID_BYTES * batch if last else self.model.activation_bytes(batch))
            steps.append(decode_s + hop)
            prefill += prefill_s + (0.0 if last else self._hop_s(cand.link, offer.chip, nxt.chip,
                                                                  self.model.activation_bytes(self.options.prompt_tokens)))
        return stream_figures(steps, prefill, users, micro, self.options.output_tokens)

    def _stage_times_uncached(self, chip: Chip, start: int, end: int, last: bool, batch: int) -> tuple[float, float]:
        model, opts = self.model, self.options
        stage = StageModel(index=0, nodes=("n",), chips=(chip,), start=start, end=end, last=last, tp_links=(),
                           kv_bytes_per_token_node=model.kv_bytes_per_token(start, end),
                           weight_bytes_node=costmodel.stage_memory_bytes(model, start, end))
        decode = stage.decode_s(model, opts.profile, batch, batch * opts.mean_decode_context)
        return decode, stage.prefill_s(model, opts.profile, opts.prompt_tokens, 0)

    def _hop_s(self, kind: str, a: Chip, b: Chip, nbytes: float) -> float:
        link = make_link("a", "b", fitting_kind(kind, a, b))
        return costmodel.link_time(link, nbytes, self.options.profile)

    def _misses(self, s: Screened) -> str:
        return misses(s, self.targets)


def misses(s: Screened, t: Targets) -> str:
    """Which target a screened candidate misses, or "" when it meets them all."""
    if s.tok_s < t.tok_s:
        return f"{s.tok_s:.1f} tok/s per stream < {t.tok_s:g}"
    if t.ttft_ms is not None and s.ttft_ms > t.ttft_ms:
        return f"TTFT {s.ttft_ms:.0f} ms > {t.ttft_ms:g}"
    return ""


def stream_figures(steps: list[float], prefill_s: float, users: int, micro: int, output_tokens: int
                   ) -> tuple[float, float]:
    """(tok/s per stream, TTFT ms) from the stage steps (decode + outgoing hop) and the prompt's prefill chain."""
    round_s = costmodel.pipeline_round_s(steps, micro)
    # prefills do not overlap decode rounds (costmodel.request_pipeline_s): while one user's output is
    # decoded, each other user's next prompt stalls every stream for its prefill chain once
    tpot = round_s + (users - 1) * prefill_s / output_tokens
    wait = round_s if users > 1 else 0.0
    return 1.0 / tpot, 1e3 * (prefill_s + wait)


# The memory-weighted split never forms tensor-parallel groups (which over Thunderbolt 5 RDMA can be faster) and
# uses every Mac: this many of the cheapest RDMA candidates are also planned by hybrid_optimal (a few ms each).
TP_REFINED = 150


def refine_with_planner(screened, model: ModelSpec, options: PlanOptions, targets: Targets,
                        limit: int = TP_REFINED) -> int:
    """Re-price the cheapest `limit` RDMA candidates with two or more Thunderbolt 5 Macs on hybrid_optimal's
    plan (latency objective) where it is faster; returns how many changed."""
    pool = sorted((s for s in screened if s.candidate.link == "tb5-rdma"
                   and sum(o.chip.rdma for o in s.candidate.offers) >= 2), key=lambda s: s.candidate.usd)
    changed = 0
    for s in pool[:limit]:
        found = _planned_figures(s.candidate, model, options, targets)
        if found is not None and found[0] > s.tok_s:
            s.fits, s.tok_s, s.ttft_ms, s.tp, s.strategy = True, *found, "hybrid_optimal"
            s.reason = misses(s, targets)
            s.meets = not s.reason
            changed += 1
    return changed


def _planned_figures(cand: Candidate, model: ModelSpec, options: PlanOptions, targets: Targets):
    """(tok/s per stream, TTFT ms, has a TP group) of hybrid_optimal's plan for the candidate, priced as the
    screening prices a split; None when it does not fit."""
    from harness.planning import plan_with
    from harness.specs import DoesNotFit
    cluster = catalog.parse_cluster(cluster_data(cand), "candidate", "size candidate")
    try:
        plan = plan_with("hybrid_optimal", cluster, model, replace(options, objective="latency"))
    except DoesNotFit:
        return None
    stages = costmodel.stage_models(cluster, model, plan)
    micro = min(targets.users, len(stages))
    batch = math.ceil(targets.users / micro)
    steps = costmodel.decode_steps_s(cluster, model, stages, options.profile, batch, options.mean_decode_context)
    forward, _ = costmodel.hop_links(cluster, stages)
    prompt_bytes = model.activation_bytes(options.prompt_tokens)
    prefill = sum(st.prefill_s(model, options.profile, options.prompt_tokens, 0) for st in stages) \
        + sum(costmodel.link_time(link, prompt_bytes, options.profile) for link in forward)
    return (*stream_figures(steps, prefill, targets.users, micro, options.output_tokens),
            any(st.tp_degree > 1 for st in plan.stages))


def rank(screened) -> list[Screened]:
    """Meeting candidates, cheapest first; ties go to the faster, then the fewer Macs."""
    return sorted((s for s in screened if s.meets),
                  key=lambda s: (s.candidate.usd, -s.tok_s, s.ttft_ms, len(s.candidate.offers)))


def pareto(screened) -> list[Screened]:
    """Fitting candidates no other beats on all of cost (lower), tok/s (higher) and TTFT (lower)."""
    pts = sorted((s for s in screened if s.fits), key=lambda s: (s.candidate.usd, -s.tok_s, s.ttft_ms))
    front: list[Screened] = []
    for s in pts:
        if not any(f.candidate.usd <= s.candidate.usd and f.tok_s >= s.tok_s and f.ttft_ms <= s.ttft_ms
                   for f in front):
            front.append(s)
    return front


# ----------------------------------------------------------------------------------------------- what one more buys
def one_more(best: Screened, offers, links, screener: Screener, max_nodes: int) -> list[tuple[str, Screened]]:
    """The best choice with each offer added once (same link), and under each other link kind."""
    cand = best.candidate
    rows = []
    if len(cand.offers) < max_nodes:
        for offer in offers:
            macs = tuple(sorted(cand.offers + (offer,), key=lambda o: (-o.memory_gb, -o.chip.gpu_cores, o.usd)))
            link = cand.link if len(cand.offers) > 1 else links[0]
            via = f" over {link}" if len(cand.offers) == 1 else ""   # a single Mac's addition needs a link chosen
            rows.append((f"+1 {offer.label} (${offer.usd:,.0f}){via}", screener.screen(Candidate(macs, link))))
    if len(cand.offers) > 1:
        for link in links:
            if link != cand.link:
                rows.append((f"links -> {link}", screener.screen(Candidate(cand.offers, link))))
    # priced as the search prices them: over RDMA a tensor-parallel plan may beat the memory-weighted pipeline
    refine_with_planner([s for _, s in rows], screener.model, screener.options, screener.targets, limit=len(rows))
    return rows


# ----------------------------------------------------------------------------------------------- simulation
def simulate_candidate(s: Screened, model: ModelSpec, options: PlanOptions, targets: Targets,
                       requests_per_user: int = 4) -> dict:
    """Serve `users` closed-loop streams on the candidate's plan (the strategy it was priced with; simulated)."""
    from harness.planning import plan_with
    from harness.workloads import build_workload
    from sim.engine import EngineConfig
    from sim.run import simulate
    cluster = catalog.parse_cluster(cluster_data(s.candidate), "candidate", "size candidate")
    plan = plan_with(s.strategy, cluster, model, replace(options, objective="latency"))   # as it was screened
    n = targets.users * requests_per_user
    # outputs spread +-50 % around the reference, so the users fall out of step after the first wave and later
    # prompts arrive while the others decode (the case the screening's TTFT prices)
    out = options.output_tokens
    output = {"dist": "uniform", "low": max(2, out // 2), "high": max(2, out * 3 // 2)}
    workload = build_workload({"kind": "synthetic", "num_requests": n, "seed": 1,
                               "prompt": options.prompt_tokens, "output": output,
                               "closed_loop": {"concurrency": targets.users}})
    result = simulate(cluster, model, plan, options.profile, workload, EngineConfig(record_steps=False),
                      include_load=False)   # figures come from request rows: no step records to build
    return simulated_figures(result.requests.to_pandas(), skip_first=targets.users)


def simulated_figures(df, skip_first: int = 0) -> dict:
    """Median per-stream decode tok/s (1 / TPOT) and median TTFT of the successful requests. The first
    `skip_first` requests (all users starting at once, a cold burst of prompts) are left out of the TTFT, so it
    is the steady state the screening's TTFT predicts; the burst's median TTFT is reported beside it."""
    df = df.sort_values("start_s")
    burst = df.head(skip_first)
    out = _medians(df.iloc[skip_first:] if len(df) > skip_first else df)
    out["burst_ttft_ms"] = _medians(burst)["ttft_ms"] if skip_first else out["ttft_ms"]
    return out


def _medians(df) -> dict:
    ok = df[df["success"] & (df["output_tokens"] > 1)]
    if ok.empty:
        return {"tok_s": 0.0, "ttft_ms": math.inf, "requests": 0}
    ttft = ok["first_token_s"] - ok["start_s"]
    tpot = (ok["end_s"] - ok["first_token_s"]) / (ok["output_tokens"] - 1)
    return {"tok_s": float(1.0 / tpot.median()), "ttft_ms": float(1e3 * ttft.median()), "requests": int(len(ok))}


# ----------------------------------------------------------------------------------------------- Pareto plot
def write_pareto(out: Path, front, fitting, targets: Targets) -> None:
    """pareto.png and pareto.html: every fitting candidate's cost against its per-stream tok/s, coloured by
    TTFT, the Pareto-optimal ones ringed and listed (theoretical figures)."""
    _pareto_png(out / "pareto.png", front, fitting, targets)
    rows = "\n".join(f"<tr><td>{html.escape(s.candidate.label)}</td><td>{s.candidate.usd:,.0f}</td>"
                     f"<td>{s.tok_s:.1f}</td><td>{s.ttft_ms:.0f}</td><td>{'yes' if s.meets else 'no'}</td></tr>"
                     for s in front)
    (out / "pareto.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>size: Pareto front</title>\n"
        f"<h1>Cost vs per-stream tok/s vs TTFT</h1><p>Targets: {html.escape(targets.describe())}. "
        f"{len(fitting)} fitting candidates, {len(front)} Pareto-optimal (lower cost, higher tok/s, lower TTFT). "
        "All figures theoretical (cost-model screening); list prices from apple_silicon_prices.csv.</p>\n"
        '<img src="pareto.png" alt="cost vs tok/s">\n<table border=1 cellpadding=3><tr><th>cluster</th><th>USD</th>'
        f"<th>tok/s per stream</th><th>TTFT ms</th><th>meets</th></tr>\n{rows}\n</table>\n")


def _pareto_png(path: Path, front, fitting, targets: Targets) -> None:
    from matplotlib.figure import Figure    # the object API on the Agg canvas: no pyplot global state
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    sc = ax.scatter([s.candidate.usd for s in fitting], [s.tok_s for s in fitting],
                    c=[s.ttft_ms / 1e3 for s in fitting], s=8, cmap="viridis_r", alpha=0.5)
    ax.scatter([s.candidate.usd for s in front], [s.tok_s for s in front], s=60, facecolors="none",
               edgecolors="red", label="Pareto-optimal")
    ax.axhline(targets.tok_s, color="grey", linestyle="--", label=f"target {targets.tok_s:g} tok/s")
    fig.colorbar(sc, label="TTFT s (theoretical)")
    ax.set_xlabel("cluster list price, USD")
    ax.set_ylabel(f"tok/s per stream at {targets.users} user(s) (theoretical)")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
