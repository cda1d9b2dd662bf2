"""hybrid_optimal: search node subsets, tensor-parallel groups, ring orders and contiguous layer splits for the
plan with the lowest predicted objective (options.objective, default "latency": time per output token of one
stream; "throughput": the pipeline bottleneck), subject to every stage fitting in memory with its KV reserve.

The search space:
  * units: single nodes, plus tensor-parallel groups of 2-4 nodes whose every link is RDMA (Thunderbolt 5) and
    whose size divides the attention and KV heads;
  * every set of disjoint units that can hold the model, and for each set every ring order (up to 4 units),
    or else the orders the other strategies use (cluster file, most memory first, fastest first);
  * for each (set, order) an exact dynamic programme over contiguous splits (numpy, O(k L^2)): minimise the
    sum of stage times (latency) or the largest stage time plus hop (throughput), each stage holding >= 1 layer.
  * goodput maximises the sustainable request rate (costmodel.sustainable_rate_rps): it minimises a request's
    pipeline time, its prompt's prefill summed over the stages plus output_tokens decode steps of B sequences
    at the bottleneck stage (with hop) over B, over splits and every micro-batch size B up to max_num_seqs that
    every stage's KV memory allows (one micro-batch per stage in flight, each sequence holding prompt + output
    tokens). A sum plus a bottleneck is no single DP; `best_goodput_split` solves it exactly with additive DPs
    under bounds on the bottleneck. Maximising the rate rather than a latency at the experiment's arrival rate
    gives the plan the most headroom at any rate and keeps the search exact; the arrival rate is printed
    beside the sustainable rate (PartitionPlan.predicted).

How it stays exact at 16 nodes (the whole space is searched, at any size; nothing is narrowed):
  * symmetry: nodes with the same chip, memory and usable share, and the same link to every other node, are
    interchangeable (swapping two of them maps every plan to one with the same figures). Such nodes form a
    class; links inside a class and between two classes are then all alike. A unit's *type* is the multiset of
    its members' classes, and the search walks multisets of unit types (a DFS over types with multiplicities,
    within each class's node count) instead of node sets: each is one representative of all the node sets that
    differ only by swapping interchangeable nodes. Ring orders are likewise tried once per sequence of types.
    Eight identical minis on one switch are then 8 sets (1..8 minis), not 255.
  * branch and bound: every unit's cost matrix M[i, j] (decode step of layers [i, j), or prefill for goodput)
    is bounded below by a fixed part plus per-layer parts, a_u + sum of b_u(l) over the layers, with b_u from the
    roofline's memory side (compute side for prefill), the per-layer overhead and the all-reduces, and a_u the
    largest constant keeping the bound under every entry of M (so it holds by construction, whatever the
    profile). Any plan over a set of units then costs at least the sum of a_u, plus each unit's cheapest b_u
    times its layer count (1..its capacity, the cheapest units filled first), plus the cheapest possible hops
    (throughput: the slowest unit's one-layer stage with a hop, or the mean of the stages; goodput: the prefill
    sum alone). First an incumbent: for each unit type, it plus the cheapest units until the model fits, in its
    best-bounded order. Then the DFS cuts every partial multiset whose bound (its units with one layer each, the
    other layers at the cluster's cheapest per-layer cost, its hops) cannot beat the incumbent, with all its
    completions; the surviving sets are evaluated best bound first, each set's orders likewise (latency: the
    order's own hops), and the search stops when the next bound cannot beat the best plan. Bounds are only
    compared with a relative slack of 1e-9, and ties go to the set met first in the enumeration.
  * bottleneck bounds (throughput, goodput; issue 15): share_floor(u)[n-1] is the least cost of any stage of >= n
    layers on unit u (throughput: its decode step; goodput: its decode share of a request at any batch size),
    taken from the very matrices the split programmes read (a dense goodput model: from the roofline of the
    least window's work, kept 1e-12 below). A plan whose slowest stage costs <= tau has each unit holding at
    most N_u(tau) = #{n: q_u[n-1] <= tau} layers, so sum_u N_u(tau) >= L: throughput's bound on a set is the
    L-th smallest q value (each with its hop); a partial multiset is cut when its units plus the nodes still
    left (each credited with the most layers per member any later unit type holds within tau) cannot hold
    the model within the incumbent. Goodput couples the two parts: for tau = the bottleneck share, the least
    prefill sum with each unit capped at N_u(tau) layers (a fractional knapsack, cheapest per-layer prefill
    first) plus tau, least over the tau grid. The first incumbent of these objectives also tries every node as
    its own stage. Every bound is a relaxation of the same programmes, so the plan is the exhaustive one.
  * the statistics (sets enumerated and cut, orders tried and cut, dynamic programmes run, seconds) are in the
    plan's notes, which `python -m harness plan` prints.
Monotone: a sub-cluster's node sets are node sets of the cluster, with the same links, costs and order rules
(relative file, speed and memory ranks survive dropping nodes), so the cluster's search covers every plan its
sub-clusters can find; nothing depends on the cluster's size. The worst case stays exponential in the number
of classes: ten nodes in nine classes of a small model took up to 7 s (measured), while 16 nodes of the six
bundled kinds take about 0.3 s (latency), 0.1 s (throughput) and 0.8 s (goodput; benchmarks/planner_scale.py).
Because every other strategy's plan is one of these (set, order, split) points and all plans are scored by the
same cost model, this one is never worse on its objective.
"""
from __future__ import annotations

from itertools import combinations, permutations

import numpy as np

from harness.costmodel import decode_attention_work, prefill_attention_work, prefill_work, read_bytes
from strategies.partitioning._plans import (TOKEN_ID_BYTES, Unit, allreduce_per_layer_s, build_plan, by_memory,
                                            by_speed, hop_s, no_arrangement, require_fit, require_total_fit,
                                            unit_available_bytes, unit_stage)
from strategies.registry import partitioner

ALL_ORDERS_UP_TO = 4
TP_SIZES = (2, 3, 4)
# a bound this close to the best value still lets the set through: rounding in the bound must never cut a tie
BOUND_SLACK = 1e-9


@partitioner("hybrid_optimal")
def plan(cluster, model, options):
    return search_plan(cluster, model, options)


def search_plan(cluster, model, options, bounds: bool = True):
    """The plan; bounds=False evaluates every set and order (the benchmark's exhaustive reference)."""
    require_total_fit(cluster, model, options)
    search = _Search(cluster, model, options, bounds)
    best = search.best()
    if best is None:
        raise no_arrangement(cluster, model, options)
    _, _, order, counts = best
    return require_fit(build_plan("hybrid_optimal", cluster, model, options, list(order), counts,
                                  (search.statistics(),)))


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def node_classes(cluster) -> list[list[str]]:
    """Interchangeable nodes, in cluster-file order: same chip, memory and usable share, and the same link to
    every other node. The relation is transitive (a~b and b~c make link(a, b) = link(c, b)), so one pass works."""
    def alike(a, b) -> bool:
        na, nb = cluster.node(a), cluster.node(b)
        if (na.chip, na.memory_gb, na.usable_fraction) != (nb.chip, nb.memory_gb, nb.usable_fraction):
            return False
        return all(_link_key(cluster, a, x) == _link_key(cluster, b, x)
                   for x in (n.name for n in cluster.nodes) if x not in (a, b))
    classes: list[list[str]] = []
    for node in cluster.nodes:
        home = next((c for c in classes if alike(c[0], node.name)), None)
        if home is None:
            classes.append([node.name])
        else:
            home.append(node.name)
    return classes


def _link_key(cluster, a: str, b: str) -> tuple:
    link = cluster.link(a, b)
    return link.kind, link.latency_us, link.bandwidth_gbps


class _Search:
    def __init__(self, cluster, model, options, bounds: bool = True):
        self.use_bounds = bounds
        self.cluster, self.model, self.options = cluster, model, options
        self.names = [n.name for n in cluster.nodes]
        self.L = model.num_layers
        self._cost: dict[Unit, tuple[np.ndarray, np.ndarray]] = {}
        self._cap: dict[Unit, int] = {}
        self._prefill: dict[Unit, tuple[np.ndarray, np.ndarray]] = {}
        self._steps: dict[Unit, tuple[np.ndarray, np.ndarray]] = {}
        self._hops: dict[tuple, np.ndarray] = {}
        self._room: dict[Unit, np.ndarray] = {}
        self._bounds: dict[tuple[Unit, int], set[int]] = {}
        self._lower: dict[Unit, tuple[float, np.ndarray]] = {}
        self._work: tuple[np.ndarray, np.ndarray] | None = None
        self._hop_floor: tuple[float, float] | None = None
        self._canons: dict[Unit, Unit] = {}
        self._floors: dict[Unit, np.ndarray] = {}
        self._deltas: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._held = None                    # _held_tables, for the bottleneck objectives
        self._held_changes: list[bool] = []
        self.sets_tried = self.orders_tried = self.programmes = 0
        self.sets_cut = self.orders_cut = 0
        self.classes = node_classes(cluster)
        self.class_of = {n: i for i, c in enumerate(self.classes) for n in c}

    def statistics(self) -> str:
        """Counts only: a plan (and the run folders that store it) must be the same every time it is made;
        `harness plan` prints the measured planning time beside it."""
        return (f"search (exact over {len(self.names)} nodes in {_count(len(self.classes), 'class', 'classes')} of interchangeable "
                f"nodes): {self.sets_tried} node sets evaluated, {self.sets_cut} cut by the lower bound; "
                f"{self.orders_tried} ring orders tried, {self.orders_cut} cut; {self.programmes} split "
                f"programmes run")

    # -- which units and orders ---------------------------------------------------------------------
    def tp_groups(self) -> list[Unit]:
        """Every TP group of nodes (kept for callers that want concrete groups; the search uses unit types)."""
        m = self.model
        groups = []
        for size in TP_SIZES:
            if m.heads % size or m.kv_heads % size:
                continue
            for combo in combinations(self.names, size):
                if all(self.cluster.link(a, b).rdma for a, b in combinations(combo, 2)):
                    groups.append(combo)
        return groups

    def unit_types(self) -> list[tuple[int, ...]]:
        """Unit types: a class for a single node, or a multiset of classes forming a valid TP group. Links inside
        and between classes are uniform, so one representative group decides whether a type is RDMA-linked."""
        m, sizes = self.model, [len(c) for c in self.classes]
        types = [(c,) for c in range(len(self.classes))]
        for size in TP_SIZES:
            if m.heads % size or m.kv_heads % size:
                continue
            for combo in _multisets(len(self.classes), size):
                if all(combo.count(c) <= sizes[c] for c in set(combo)) and self._rdma_type(combo):
                    types += [_led_by(combo, lead) for lead in sorted(set(combo))]
        return types

    def _rdma_type(self, combo: tuple[int, ...]) -> bool:
        members = self._assign([combo])[0]
        return all(self.cluster.link(a, b).rdma for a, b in combinations(members, 2))

    def _assign(self, types: list[tuple[int, ...]]) -> list[Unit]:
        """Concrete units for a list of types: each class hands out its nodes in cluster-file order."""
        nxt = [0] * len(self.classes)
        units = []
        for t in types:
            members = []
            for c in t:
                members.append(self.classes[c][nxt[c]])
                nxt[c] += 1
            units.append(tuple(members))
        return units

    def best(self):
        """(value, rank, order, counts) of the best plan, or None. Best-first branch and bound: sets in increasing
        order of their lower bound, each set's orders likewise, stopping once a bound reaches the best value. Ties
        go to the set and order met first in the enumeration (rank), as a plain scan would pick them."""
        goodput = self.options.objective == "goodput"
        best = self._incumbent()
        sets = sorted(((self._tight_set_bound(units), rank, units)
                       for rank, units in enumerate(self.unit_sets(best[0] if best else np.inf))),
                      key=lambda e: (e[0], e[1]))
        for n, (bound, rank, units) in enumerate(sets):
            if best is not None and self._cannot_win(bound, best[0]):
                self.sets_cut += len(sets) - n
                break
            self.sets_tried += 1
            for j, (obound, order) in enumerate(self.orders(units)):
                if best is not None and self._cannot_win(max(obound, self._order_floor(order)), best[0]):
                    self.orders_cut += 1
                    continue
                self.programmes += 1
                # goodput's search prunes against the best plan so far: it is the costly one
                value, counts = self.best_goodput_split(order, best[0] if best else np.inf) if goodput \
                    else self.best_split(order)
                key = (rank, j)
                if counts is not None and (best is None or value < best[0] - 1e-15
                                           or (value <= best[0] + 1e-15 and key < best[1])):
                    best = (value, key, order, counts)
        return best

    def _cannot_win(self, bound: float, best: float) -> bool:
        # the slack keeps rounding in a bound from cutting a plan that ties the best (ties go by rank)
        return self.use_bounds and bound * (1 - BOUND_SLACK) > best + 1e-15

    def _incumbent(self):
        """A good first plan, so that the enumeration can cut early: for each unit type, that unit plus the
        cheapest disjoint units per layer until the model fits, each set tried in its best-bounded order. Its
        rank is last, so that an equal plan met in the enumeration still wins the tie."""
        if not self.use_bounds:
            return None
        types = sorted(self.unit_types(), key=lambda t: self._unit_key(self._assign([t])[0]))
        best, seen = None, set()
        goodput = self.options.objective == "goodput"
        if self.options.objective != "latency":
            # the bottleneck objectives gain from more stages: every node its own stage, in each order searched
            singles = self._assign([(c,) for c, members in enumerate(self.classes) for _ in members])
            if self._holds_model(singles):
                seen.add(tuple(sorted((c,) for c, members in enumerate(self.classes) for _ in members)))
                for order in self._orders_of(singles):
                    value, counts = self.best_goodput_split(order, best[0] if best else np.inf) if goodput \
                        else self.best_split(order)
                    self.programmes += 1
                    if counts is not None and (best is None or value < best[0]):
                        best = (value, (np.inf, 0), order, counts)
        for first in types:
            chosen, left = [first], [len(c) for c in self.classes]
            for c in first:
                left[c] -= 1
            for t in types:   # greedy: cheapest per layer first, while the model does not fit yet
                while not self._holds_model(self._assign(chosen)) and all(left[c] >= t.count(c) for c in set(t)):
                    chosen.append(t)
                    for c in t:
                        left[c] -= 1
            key = tuple(sorted(chosen))
            units = self._assign(chosen)
            if key in seen or not self._holds_model(units):
                continue
            seen.add(key)
            if goodput and best is not None and self._cannot_win(self._tight_set_bound(units), best[0]):
                continue     # it cannot improve the incumbent: no need to price it
            order = min(self._orders_of(units), key=self._order_bound)
            value, counts = self.best_goodput_split(order, best[0] if best else np.inf) \
                if self.options.objective == "goodput" else self.best_split(order)
            self.programmes += 1
            if counts is not None and (best is None or value < best[0]):
                best = (value, (np.inf, 0), order, counts)
        return best

    def _unit_key(self, unit: Unit) -> float:
        a, b = self.lower(unit)
        return a + float(b.min()) * self.cap(unit) if np.isfinite(a) else np.inf

    def unit_sets(self, incumbent: float = np.inf):
        """Every multiset of unit types that fits the class sizes and can hold the model, as concrete units in
        cluster-file order of their first members (one representative per set of interchangeable node sets);
        a partial multiset whose bound shows that no completion can beat `incumbent` is cut with its subtree."""
        types = self.unit_types()
        self._floor = self._global_floor(types)
        if self.options.objective != "latency" and self.use_bounds and self._held is None:
            self._held = self._held_tables(types)
        left = [len(c) for c in self.classes]
        yield from self._type_sets(types, 0, left, [], incumbent, 0.0)

    def _type_sets(self, types, t, left, chosen, incumbent, bound):
        if t == len(types):
            if chosen:
                units = sorted(self._assign(chosen), key=lambda u: self.names.index(u[0]))
                if self._holds_model(units):
                    yield units
            return
        ty = types[t]
        most = min(left[c] // ty.count(c) for c in set(ty))
        for n in range(most, -1, -1):     # most copies first: every node in use is the first set, as before
            more = chosen + [ty] * n
            for c in ty:
                left[c] -= n
            cut = False
            if n:
                more_bound = self._partial_bound(self._assign(more))
                cut = self._cannot_win(more_bound, incumbent)
            else:
                more_bound = bound
            if not cut and self._held is not None and more and np.isfinite(incumbent) \
                    and (n or self._held_changes[t]):     # n = 0 with the same credits: the check already made
                cut = self._cannot_win(self._goodput_floor(more, t + 1, left, incumbent), incumbent) \
                    if self.options.objective == "goodput" else not self._may_hold(more, t + 1, left, incumbent)
            if cut:
                self.sets_cut += 1        # this subtree, counted once
            else:
                yield from self._type_sets(types, t + 1, left, more, incumbent, more_bound)
            for c in ty:
                left[c] += n

    def _global_floor(self, types) -> tuple[float, float]:
        """(cheapest per-layer bound of any unit, least sum over layers of the cheapest unit per layer)."""
        lows = [self.lower(self._assign([t])[0]) for t in types]
        bs = [b for a, b in lows if np.isfinite(a)]
        if not bs:
            return np.inf, np.inf
        return float(min(b.min() for b in bs)), float(np.min(bs, axis=0).sum())

    def _partial_bound(self, units) -> float:
        """A bound on every set containing these units: each holds >= 1 layer at its cheapest per-layer cost,
        the other layers cost at least the cluster's cheapest, and more units only add fixed parts and hops."""
        beta, per_layer = self._floor
        lows = [self.lower(u) for u in units]
        k, fixed = len(units), sum(a for a, _ in lows)
        ones = sum(float(b.min()) for _, b in lows)
        layers = max(ones + max(self.L - k, 0) * beta, per_layer)
        objective = self.options.objective
        if objective == "latency":
            return fixed + layers + self._hops_floor(k)
        if objective == "goodput":
            return fixed + layers
        hop = min(self._min_hops()) if k > 1 else 0.0
        return max(a + float(b.min()) for a, b in lows) + hop

    def _may_hold(self, chosen: list[tuple[int, ...]], t: int, left: list[int], incumbent: float) -> bool:
        """Throughput, by the bottleneck: whether a set of the `chosen` unit types plus units of types t.. made
        of the `left` nodes might beat the incumbent. Such a plan has every stage's share_floor cost within tau,
        the incumbent less the cheapest hop. A unit holds at most N_u(tau) = #{n: q_u[n-1] <= tau} layers within
        tau and at least one; a unit of the left nodes holds at most the sum over its members of their class's
        credit (the most layers any type t.. containing the class holds within tau, over its size: a unit of
        type t holding m <= N_t(tau) layers is m / |t| per member). If all of that falls short of the model's
        layers, no completion can beat the incumbent."""
        grid, held, credit, rows = self._held[:4]
        tau = (incumbent + 1e-15) / (1 - BOUND_SLACK)    # a plan above this is cut by _cannot_win anyway
        if len(chosen) > 1:
            tau -= min(self._min_hops())  # two stages or more: each pays at least the cheapest hop
        g = int(np.searchsorted(grid, tau, side="right"))
        total = 0.0
        for ty in chosen:
            n = held[rows[ty], g]
            if n == 0:
                return False
            total += n
        return total + float(np.dot(left, credit[t, :, g])) >= self.L - 1e-9

    def _held_tables(self, types):
        """For _may_hold: the tau grid (every type's share_floor values), held[type, g] = N_type(tau) for tau in
        [grid[g-1], grid[g]), credit[t, class, g] over the types t.., and each type's row."""
        floors = [self.share_floor(self._assign([ty])[0]) for ty in types]
        grid = np.unique(np.concatenate([q[np.isfinite(q)] for q in floors]))
        held = np.zeros((len(types), len(grid) + 1))
        for r, q in enumerate(floors):
            held[r, 1:] = np.searchsorted(q, grid, side="right")
        credit = np.zeros((len(types) + 1, len(self.classes), len(grid) + 1))
        for r in range(len(types) - 1, -1, -1):
            credit[r] = credit[r + 1]
            for c in set(types[r]):
                credit[r, c] = np.maximum(credit[r, c], held[r] / len(types[r]))
        rows = {ty: r for r, ty in enumerate(types)}
        self._held_changes = [not np.array_equal(credit[r], credit[r + 1]) for r in range(len(types))]
        if self.options.objective != "goodput":
            return grid, held, credit, rows
        lows = [self.lower(self._assign([ty])[0]) for ty in types]
        fixed = np.array([a for a, _ in lows])
        cost = np.array([float(b.min()) if np.isfinite(a) else np.inf for a, b in lows])
        cheapest = np.full((len(types) + 1, len(self.classes)), np.inf)
        for r in range(len(types) - 1, -1, -1):
            cheapest[r] = cheapest[r + 1]
            for c in set(types[r]):
                cheapest[r, c] = min(cheapest[r, c], cost[r])
            self._held_changes[r] = self._held_changes[r] or not np.array_equal(cheapest[r], cheapest[r + 1])
        first = np.array([q[0] for q in floors])
        return grid, held, credit, rows, fixed, cost, cheapest, first

    def _goodput_floor(self, chosen: list[tuple[int, ...]], t: int, left: list[int], incumbent: float = np.inf) \
            -> float:
        """Goodput: a bound on every set of the `chosen` unit types plus units of types t.. made of the `left`
        nodes. A plan's value is its prefill sum plus its slowest stage's decode share D. With tau = D, each
        chosen unit u holds 1..min(cap, N_u(tau)) layers at prefill >= a_u + b_u.min() a layer (lower()), and the
        left nodes of class c hold at most credit_c(tau) layers each at >= the cheapest per-layer prefill of the
        types t.. containing c (a unit's fixed part a >= 0): the least prefill is that fractional knapsack,
        filled cheapest first, and never below the per-layer floor. The bound is the least over tau (the grid
        of share_floor values, where the capacities change) of prefill floor + tau; inf if no tau holds the
        model. Only tau up to the incumbent less the per-layer floor can matter, so only those are priced."""
        grid, held, credit, rows, fixed, cost, cheapest, first = self._held
        L, per_layer = self.L, self._floor[1]
        r = [rows[ty] for ty in chosen]
        fixed_sum, cost_sum = float(fixed[r].sum()), float(cost[r].sum())
        top = (incumbent + 1e-15) / (1 - BOUND_SLACK) - fixed_sum - max(per_layer, cost_sum)
        hi = len(grid) if not np.isfinite(top) else int(np.searchsorted(grid, top, side="right"))
        lo = int(np.searchsorted(grid, float(first[r].max()), side="left"))   # every unit holds a layer
        if hi <= lo:
            return np.inf
        h = held[r, lo + 1:hi + 1]                       # column g prices tau = grid[g - 1]
        pool = [c for c, n in enumerate(left) if n and cheapest[t, c] < np.inf]
        caps = np.concatenate([h - 1, np.array(left)[pool, None] * credit[t, pool, lo + 1:hi + 1]])
        costs = np.concatenate([cost[r], cheapest[t, pool]])
        order = np.argsort(costs, kind="stable")
        caps, costs = caps[order], costs[order]
        rest = L - len(r)
        before = np.cumsum(caps, axis=0) - caps
        fill = np.clip(rest - before, 0.0, caps)
        prefill = fixed_sum + np.maximum(cost_sum + costs @ fill, per_layer)
        ok = (h.min(axis=0) >= 1) & (caps.sum(axis=0) >= rest - 1e-9)
        if not ok.any():
            return np.inf
        return float((prefill + grid[lo:hi])[ok].min())

    def share_floor(self, unit: Unit) -> np.ndarray:
        """q[n - 1], n = 1..L: no stage of n or more layers on the unit costs less than q[n - 1], non-decreasing
        (throughput: its decode step without the hop, best_split's matrices; goodput: its decode share of a
        request without the hop at any batch size, _decode_shares' matrices). Exact minima of the entries the
        split programmes read, so the bottleneck bounds hold whatever the profile."""
        unit = self._canon(unit)
        if unit not in self._floors:
            L, n = self.L, np.arange(1, self.L + 1)
            i, j = np.arange(L + 1)[:, None], np.arange(L + 1)[:, None] + n[None, :]
            inside, j = j <= L, np.minimum(j, L)
            if self.options.objective == "goodput" and not self.model.moe:   # no [b, i, j] matrices needed
                self._floors[unit] = self._dense_share_floor(unit)
                return self._floors[unit]
            if self.options.objective == "goodput":   # the least over batch sizes b of step[b] * (out / (b + 1))
                step, last = self._batched_steps(unit)
                share = (self.options.output_tokens / self.batches)       # as _decode_shares scales them
                step, last = (step * share[:, None, None]).min(axis=0), (last * share[:, None]).min(axis=0)
            else:
                step, last = self.costs(unit)
            g = np.minimum(np.where(inside, step[i, j], np.inf).min(axis=0), last[L - n])
            self._floors[unit] = np.minimum.accumulate(g[::-1])[::-1]
        return self._floors[unit]

    ROUNDING = 1e-12   # a floor computed in another order of operations than the entries it bounds: kept below

    def _dense_share_floor(self, unit: Unit) -> np.ndarray:
        """share_floor for goodput on a dense model without building the unit's [b, i, j] step matrices: a
        decode step of b sequences over any window of n layers costs at least, on each member's chip, the
        roofline of the window's least bytes and FLOPs (a dense model's work over [i, i + n) is its weights'
        and KV's; the least over i is taken apart for each) plus the chip's overhead of n layers (attention
        apart: plus n layers of it) and the n all-reduces; the slowest member decides, so the most of these
        over the members is a floor too. Times output_tokens / b, least over b; inf where no window of n
        layers fits (the masks of costs()); scaled by 1 - ROUNDING against rounding."""
        m, p, o, L, tp = self.model, self.options.profile, self.options, self.L, len(unit)
        idx, n, B = np.arange(L + 1), np.arange(1, L + 1), self.batches
        ctx = 0 if p.attention_apart else o.mean_decode_context
        weights = np.array([read_bytes(m, p, 0, j, 1) for j in idx])
        params = np.array([m._active_layer_params(0, j) for j in idx])
        least = lambda x: np.array([float((x[k:] - x[:-k]).min()) for k in n])   # noqa: E731
        reads = (least(weights)[None, :] + (B[:, None] * ctx) * n[None, :] * m.kv_bytes_per_token_layer()) / tp
        flops = ((2.0 * B[:, None]) * least(params)[None, :]
                 + (B[:, None] * ctx) * n[None, :] * m._attn_flops_per_position()) / tp
        step = np.full((len(B), L), -np.inf)
        for chip in dict.fromkeys(self.cluster.node(name).chip for name in unit):
            ovh = self._overhead(chip)[0, 1:][None, :]
            if p.attention_apart:
                attn = np.array([self._attention_per_layer(chip, tp, False, int(b), o.mean_decode_context) for b in B])
                ovh = ovh + attn[:, None] * n[None, :]
            step = np.maximum(step, np.maximum(reads / p.bandwidth(chip), flops / p.flops(chip)) + ovh)
        if tp > 1:
            stage = unit_stage(self.cluster, m, unit, 0, 1, False)
            step = step + np.array([stage.allreduce_per_layer_s(m, p, int(b)) for b in B])[:, None] * n[None, :]
        g = (step * (o.output_tokens / B)[:, None]).min(axis=0) * (1 - self.ROUNDING)
        fits = np.isfinite(self.costs(unit)[0])
        fits_n = np.array([bool(np.diagonal(fits, k).any()) for k in n])
        g = np.where(fits_n, np.maximum(g, 0.0), np.inf)
        return np.minimum.accumulate(g[::-1])[::-1]

    def _bottleneck_floor(self, units, hops) -> float:
        """A floor on the slowest stage (its share_floor cost plus its hop) of any split of these units, in any
        order, the hops given per unit: each unit holds >= 1 layer, and a split within tau needs
        sum_u N_u(tau) >= L, so tau is at least the L-th smallest of all the units' q + hop values."""
        qs = [self.share_floor(u) + h for u, h in zip(units, hops)]
        values = np.concatenate(qs)
        return max(max(float(q[0]) for q in qs), float(np.partition(values, self.L - 1)[self.L - 1]))

    def _tight_set_bound(self, units) -> float:
        """_set_bound, with the bottleneck floor: throughput's slowest stage, goodput's decode share."""
        bound, objective = self._set_bound(units), self.options.objective
        if objective == "latency" or not self.use_bounds:
            return bound
        if objective == "goodput":
            if self._held is None:
                types = self.unit_types()
                self._floor, self._held = self._global_floor(types), self._held_tables(types)
            coupled = self._goodput_floor([self._type_of(u) for u in units], 0, [0] * len(self.classes))
            return max(bound + self._bottleneck_floor(units, [0.0] * len(units)), coupled)
        hop = min(self._min_hops()) if len(units) > 1 else 0.0
        return max(bound, self._bottleneck_floor(units, [hop] * len(units)))

    def _order_floor(self, order) -> float:
        """A bound on every split of the units in this order: throughput's bottleneck with each stage's own hop."""
        if not self.use_bounds or self.options.objective == "latency":
            return -np.inf
        if self.options.objective == "throughput":
            return self._bottleneck_floor(list(order), self._ring_hops(order))
        return self._tight_set_bound(list(order))

    def _holds_model(self, units) -> bool:
        return len(units) <= self.L and sum(self.cap(u) for u in units) >= self.L

    def orders(self, units: list[Unit]) -> list[tuple[float, tuple[Unit, ...]]]:
        """(lower bound, order) for the ring orders searched, one per sequence of unit types, lowest bound first."""
        kept = [(self._order_bound(order), order) for order in self._orders_of(units)]
        self.orders_tried += len(kept)
        return sorted(kept, key=lambda e: e[0])

    def _orders_of(self, units: list[Unit]) -> list[tuple[Unit, ...]]:
        if len(units) <= ALL_ORDERS_UP_TO:
            found = list(permutations(units))
        else:  # the orders the other strategies use, so none of them can beat this search
            index = {n: i for i, n in enumerate(self.names)}
            speed = {n: i for i, n in enumerate(by_speed(self.cluster, self.options.profile, self.names))}
            memory = {n: i for i, n in enumerate(by_memory(self.cluster, self.names))}
            found = list(dict.fromkeys(tuple(sorted(units, key=lambda u: rank[u[0]])) for rank in (index, speed, memory)))
        kept, seen = [], set()
        for order in found:   # orders with the same sequence of unit types have the same plans
            key = tuple(self._type_of(u) for u in order)
            if key not in seen:
                seen.add(key)
                kept.append(order)
        return kept

    def _type_of(self, unit: Unit) -> tuple[int, ...]:
        """The leader's class, then the other members' classes sorted: hops leave from the leader."""
        return (self.class_of[unit[0]],) + tuple(sorted(self.class_of[n] for n in unit[1:]))

    def _canon(self, unit: Unit) -> Unit:
        """One unit standing for every unit of the same members' classes: they have the same costs."""
        if unit not in self._canons:
            self._canons[unit] = self._assign([tuple(sorted(self.class_of[n] for n in unit))])[0]
        return self._canons[unit]

    # -- lower bounds ---------------------------------------------------------------------------------
    def lower(self, unit: Unit) -> tuple[float, np.ndarray]:
        """(a, b): a + b[i:j].sum() <= the unit's cost of layers [i, j) (decode step, or prefill for goodput), for
        every range that fits, the last stage's too. b is the roofline's memory side per layer (compute side for
        prefill) and a the largest constant keeping the bound under every entry, so it holds by construction."""
        unit = self._canon(unit)
        if unit not in self._lower:
            self._lower[unit] = self._build_lower(unit)
        return self._lower[unit]

    def _build_lower(self, unit: Unit):
        m, o, p, L, tp = self.model, self.options, self.options.profile, self.L, len(unit)
        idx = np.arange(L + 1)
        apart = p.attention_apart   # attention's own time per layer then adds to the roofline side
        if o.objective == "goodput":
            matrix, last = self.prefill(unit)
            work = np.array([m.decode_flops(0, j, o.prompt_tokens, 0) if apart else
                             m.prefill_flops(0, j, o.prompt_tokens, 0) for j in idx]) / tp
            rate = min(p.flops(self.cluster.node(n).chip) for n in unit)
        else:
            matrix, last = self.costs(unit)
            work = (np.array([read_bytes(m, p, 0, j, 1) for j in idx])
                    + (0.0 if apart else o.context_tokens * idx * m.kv_bytes_per_token_layer())) / tp
            rate = min(p.bandwidth(self.cluster.node(n).chip) for n in unit)
        chips = [self.cluster.node(n).chip for n in unit]
        per_layer = min(p.overhead(c, 1) - p.overhead(c, 0) for c in chips)
        if apart:   # the member with the slowest roofline side pays at least the fastest member's attention
            per_layer += min(self._attention_per_layer(c, tp, o.objective == "goodput") for c in chips)
        comm = 0.0
        if tp > 1:
            tokens = o.prompt_tokens if o.objective == "goodput" else 1
            comm = unit_stage(self.cluster, m, unit, 0, 1, False).allreduce_per_layer_s(m, p, tokens)
        b = np.maximum(np.diff(work) / rate, 0.0) + max(per_layer, 0.0) + comm
        prefix = np.concatenate([[0.0], np.cumsum(b)])
        spans = prefix[None, :] - prefix[:, None]
        rest = np.concatenate([(matrix - spans)[np.isfinite(matrix)], (last - spans[:, L])[np.isfinite(last)]])
        if not len(rest):
            return np.inf, b
        a = float(rest.min())
        if -1e-12 < a < 0:   # rounding of an exact zero (a profile with no fixed step overhead); the slack covers it
            a = 0.0
        if a < 0:        # keep a >= 0 so that adding a unit never lowers a bound: drop the per-layer part
            finite = np.concatenate([matrix[np.isfinite(matrix)], last[np.isfinite(last)]])
            return max(float(finite.min()), 0.0), np.zeros(L)
        return a, b

    def _min_hops(self) -> tuple[float, float]:
        """The cheapest forward hop and token-id hop over any link of the cluster."""
        if self._hop_floor is None:
            keys = {_link_key(self.cluster, l.a, l.b): l for l in self.cluster.links}.values()
            act = self.model.activation_bytes(1)
            fwd = min((hop_s(self.cluster, self.options, (l.a,), (l.b,), act) for l in keys), default=0.0)
            back = min((hop_s(self.cluster, self.options, (l.a,), (l.b,), TOKEN_ID_BYTES) for l in keys), default=0.0)
            self._hop_floor = (fwd, back)
        return self._hop_floor

    def _hops_floor(self, k: int) -> float:
        fwd, back = self._min_hops()
        return 0.0 if k < 2 else (k - 1) * fwd + back

    def _layers_floor(self, units) -> float:
        """Least sum of per-layer bounds over the layers: each layer on its cheapest unit, or (often tighter)
        each unit's cheapest layer cost times its layer count, every unit holding 1..cap layers."""
        lows = [self.lower(u)[1] for u in units]
        per_layer = float(np.min(lows, axis=0).sum())
        cheapest = sorted((float(b.min()), self.cap(u)) for b, u in zip(lows, units))
        total, left = sum(c for c, _ in cheapest), self.L - len(units)
        for cost, cap in cheapest:           # the layers beyond one per unit go to the cheapest units first
            extra = min(cap - 1, left)
            total, left = total + extra * cost, left - extra
        return max(per_layer, total)

    def _set_bound(self, units) -> float:
        """A bound on every order and split of exactly these units."""
        fixed, k = sum(self.lower(u)[0] for u in units), len(units)
        layers = self._layers_floor(units)
        objective = self.options.objective
        if objective == "latency":
            return fixed + layers + self._hops_floor(k)
        if objective == "goodput":
            return fixed + layers
        hop = min(self._min_hops()) if k > 1 else 0.0    # throughput: the slowest stage with one layer, or the mean
        one_layer = max(self.lower(u)[0] + float(self.lower(u)[1].min()) for u in units)
        return max(one_layer + hop, (fixed + layers + self._hops_floor(k)) / k)

    def _order_bound(self, order) -> float:
        """The set's bound with the order's own hops (latency: their sum enters the objective as it is)."""
        if len(order) < 2 or self.options.objective == "goodput":
            return self._set_bound(list(order))
        if self.options.objective == "throughput":   # every stage with its own outgoing hop
            return max(self._set_bound(list(order)),
                       max(self.lower(u)[0] + float(self.lower(u)[1].min()) + h
                           for u, h in zip(order, self._ring_hops(order))))
        fixed = sum(self.lower(u)[0] for u in order)
        return fixed + self._layers_floor(list(order)) + sum(self._ring_hops(order))

    def _ring_hops(self, order) -> list[float]:
        k, act = len(order), self.model.activation_bytes(1)
        hops = [hop_s(self.cluster, self.options, order[s], order[s + 1], act) for s in range(k - 1)]
        return hops + [hop_s(self.cluster, self.options, order[-1], order[0], TOKEN_ID_BYTES) if k > 1 else 0.0]

    # -- costs ----------------------------------------------------------------------------------------
    def cap(self, unit: Unit) -> int:
        """Most layers the unit can hold in some window: a set whose caps cannot add up to the model is skipped.
        The lightest window counts, not the heaviest (max_layers): a node too small for a dense layer may still
        hold a lighter one, and the split search decides which layers it gets."""
        unit = self._canon(unit)
        if unit not in self._cap:
            fits = np.isfinite(self.costs(unit)[0])          # fits[i, j]: layers [i, j) fit with their KV reserve
            spans = np.arange(self.L + 1)[None, :] - np.arange(self.L + 1)[:, None]
            self._cap[unit] = int(spans[fits].max(initial=0))
        return self._cap[unit]

    def costs(self, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
        """(C, C_last): C[i, j] = decode step of layers [i, j) on the unit (inf if it does not fit or i >= j);
        C_last[i] = the same for [i, L) with the output head. Vectorises costmodel.StageModel.decode_s
        (every member's roofline + overhead, the slowest decides, plus the all-reduces); tests check they agree."""
        unit = self._canon(unit)
        if unit not in self._cost:
            self._cost[unit] = self._build_costs(unit)
        return self._cost[unit]

    def _build_costs(self, unit: Unit):
        m, o, p, L, tp = self.model, self.options, self.options.profile, self.L, len(unit)
        idx = np.arange(L + 1)
        apart, layers = p.attention_apart, idx[None, :] - idx[:, None]
        ctx = 0 if apart else o.context_tokens   # attention apart: its own time per layer, added below
        read = np.array([read_bytes(m, p, 0, j, 1) for j in idx]) + ctx * idx * m.kv_bytes_per_token_layer()
        flops = np.array([m.decode_flops(0, j, 1, ctx) for j in idx])
        d_read = (read[None, :] - read[:, None]) / tp
        d_flops = (flops[None, :] - flops[:, None]) / tp
        step = np.full((L + 1, L + 1), -np.inf)
        last = np.full(L + 1, -np.inf)
        for name in unit:
            chip = self.cluster.node(name).chip
            bw, fl, ovh = p.bandwidth(chip), p.flops(chip), self._overhead(chip)
            if apart:
                ovh = ovh + layers * self._attention_per_layer(chip, tp, False, 1, o.context_tokens)
            step = np.maximum(step, np.maximum(d_read / bw, d_flops / fl) + ovh)
            last = np.maximum(last, np.maximum((d_read[:, L] + m.head_bytes()) / bw,
                                               (d_flops[:, L] + m.head_flops(1)) / fl) + ovh[:, L])
        if tp > 1:
            layers = idx[None, :] - idx[:, None]
            comm = allreduce_per_layer_s(self.cluster, m, o, unit)
            step = step + layers * comm
            last = last + (L - idx) * comm
        stored = np.array([m.weight_bytes(0, j) + o.kv_reserve_tokens * m.kv_bytes_per_token(0, j) for j in idx])
        mem = (stored[None, :] - stored[:, None]) / tp + m.embed_bytes() + m.head_bytes()
        bad = (idx[None, :] <= idx[:, None]) | (mem > unit_available_bytes(self.cluster, unit))
        step[bad] = np.inf
        last[bad[:, L]] = np.inf
        return step, last

    # -- the dynamic programme --------------------------------------------------------------------------
    def best_split(self, order) -> tuple[float, list[int] | None]:
        k, L = len(order), self.L
        hops = [hop_s(self.cluster, self.options, order[s], order[s + 1], self.model.activation_bytes(1))
                for s in range(k - 1)]
        hops.append(hop_s(self.cluster, self.options, order[-1], order[0], TOKEN_ID_BYTES) if k > 1 else 0.0)
        latency = self.options.objective == "latency"
        combine = np.add if latency else np.maximum
        f = np.full(L + 1, np.inf)
        f[0] = 0.0
        choices = []
        for s, unit in enumerate(order):
            step, last = self.costs(unit)
            if s == k - 1:
                total = combine(f, last + (0.0 if latency else hops[s]))
                i = int(np.argmin(total))
                value = float(total[i]) + (sum(hops) if latency else 0.0)
                if not np.isfinite(value):
                    return np.inf, None
                return value, self._backtrack(choices, i, L)
            cand = combine(f[:, None], step + (0.0 if latency else hops[s]))
            arg = np.argmin(cand, axis=0)
            f = cand[arg, np.arange(L + 1)]
            choices.append(arg)
        raise AssertionError("unreachable")

    # -- goodput: Σ prefill + bottleneck decode, over splits and micro-batch sizes -------------------------
    def best_goodput_split(self, order, bar: float = np.inf) -> tuple[float, list[int] | None]:
        """Lowest costmodel.request_pipeline_s over splits and batch sizes b, exactly: for a given b and a
        bound tau on the bottleneck decode share, the best split minimises the prefill sum among the splits
        whose every stage stays within tau (an additive DP); tau runs over the share values in increasing
        order, and stops once tau plus the least prefill sum cannot beat the best found. Larger batches come
        first: a split's value only falls as its batch grows, so smaller ones stop once they cannot win.
        Splits no better than `bar` (the best plan so far) are not looked for."""
        prefill = [self.prefill(u) for u in order]
        p_min = self._additive_dp(prefill)[0]
        best = (np.inf, None)
        for b in self._batch_candidates(order):
            shares = self._decode_shares(order, b)
            if p_min + self._bottleneck_dp(shares)[0] >= min(bar, best[0]):
                break                       # without the KV bound even: no smaller batch can win either
            free = self._best_at_batch(prefill, shares, p_min, min(bar, best[0]))
            if free[1] is None or self._kv_holds(order, b, free[1]):
                # the best split ignoring the KV bound fits it (or none beats the bar): at a smaller batch every
                # split does worse than it does here, so this batch settles the order
                best = min(best, free, key=lambda vc: vc[0])
                break
            found = self._best_at_batch(prefill, self._kv_masked(order, b, shares), p_min, min(bar, best[0]))
            best = min(best, found, key=lambda vc: vc[0])
        if best[1] is None:    # no batch fits beside the weights: any split that fits rates 0
            return np.inf, self.best_split(order)[1]
        return best

    def _batch_candidates(self, order) -> list[int]:
        """Batch sizes worth trying, largest first: max_num_seqs, and every size at which some layer range's KV
        room stops holding one more sequence per micro-batch. Between two of these the same splits fit, and each
        does best at the larger size, so no other size can win."""
        bounds = {self.options.max_num_seqs}
        for unit in order:
            bounds.update(self._batch_bounds(unit, len(order)))
        return sorted(bounds, reverse=True)

    def _batch_bounds(self, unit: Unit, stages: int) -> set[int]:
        """Every largest micro-batch below max_num_seqs that a layer range fitting on the unit allows."""
        unit = self._canon(unit)
        key = (unit, stages)
        if key not in self._bounds:
            room = self._kv_room(unit)[np.isfinite(self.costs(unit)[0])]
            found = np.unique(room // (stages * self.options.request_tokens))
            self._bounds[key] = {int(b) for b in found if 1 <= b < self.options.max_num_seqs}
        return self._bounds[key]

    TAU_CHUNK = 64   # bounds tried in one vectorised DP

    def _best_at_batch(self, prefill, shares, p_min: float, bar: float):
        """Lowest prefill sum + bottleneck share at one batch size, below `bar`, or (inf, None)."""
        best = (np.inf, None)
        finite = np.concatenate([x[np.isfinite(x)].ravel() for pair in shares for x in pair])
        taus = np.unique(finite[finite >= self._bottleneck_dp(shares)[0]])
        lo, size = 0, 1
        while lo < len(taus):   # chunks grow: the first bounds often settle it
            chunk = taus[lo:lo + size]
            lo, size = lo + size, min(2 * size, self.TAU_CHUNK)
            chunk = chunk[chunk + p_min < min(bar, best[0])]
            if not len(chunk):
                break
            totals, counts = self._additive_dp_within(prefill, shares, chunk)
            i = int(np.argmin(totals + chunk))
            if np.isfinite(totals[i]) and totals[i] + chunk[i] < best[0]:
                best = (float(totals[i] + chunk[i]), counts(i))
        return best

    def _additive_dp_within(self, prefill, shares, taus: np.ndarray):
        """For every bound tau at once: the least prefill sum over the splits whose every stage's decode share is
        <= tau; returns the sums and a function giving the split (counts) of the tau at an index."""
        L = self.L
        f = np.full((len(taus), L + 1), np.inf)
        f[:, 0] = 0.0
        choices = []
        t3 = taus[:, None, None]
        for (p, _), (d, _) in zip(prefill[:-1], shares[:-1]):
            cand = f[:, :, None] + np.where(d[None] <= t3, p[None], np.inf)
            arg = np.argmin(cand, axis=1)
            f = np.take_along_axis(cand, arg[:, None, :], axis=1)[:, 0, :]
            choices.append(arg)
        (_, pl), (_, dl) = prefill[-1], shares[-1]
        total = f + np.where(dl[None] <= taus[:, None], pl[None], np.inf)
        ends = np.argmin(total, axis=1)
        sums = total[np.arange(len(taus)), ends]
        return sums, lambda i: self._backtrack([c[i] for c in choices], int(ends[i]), L)

    def _decode_shares(self, order, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per ring position: output_tokens decode steps at `batch`, with the outgoing hop, over `batch`
        (the stage's decode seconds per request), for every layer range; inf where the range does not fit."""
        hops = self._goodput_hops(order)
        share = self.options.output_tokens / batch
        out = []
        for s, unit in enumerate(order):
            step, last = self._batched_steps(unit)
            out.append((step[batch - 1] * share + hops[s][batch - 1], last[batch - 1] * share + hops[s][batch - 1]))
        return out

    def _kv_holds(self, order, batch: int, counts: list[int]) -> bool:
        """Whether every stage of the split caches one micro-batch of `batch` sequences per stage."""
        need = len(order) * self.options.request_tokens * batch
        ends = np.cumsum(counts)
        return all(self._kv_room(u)[e - n, e] >= need for u, n, e in zip(order, counts, ends))

    def _kv_masked(self, order, batch: int, shares):
        """The shares with inf where the range's KV room cannot hold one micro-batch of `batch` sequences per stage."""
        need = len(order) * self.options.request_tokens * batch
        out = []
        for unit, (d, dl) in zip(order, shares):
            room = self._kv_room(unit)
            out.append((np.where(room >= need, d, np.inf), np.where(room[:, self.L] >= need, dl, np.inf)))
        return out

    def _bottleneck_dp(self, stages) -> tuple[float, list[int] | None]:
        return self._chain_dp(stages, np.maximum)

    def _additive_dp(self, stages) -> tuple[float, list[int] | None]:
        return self._chain_dp(stages, np.add)

    def _chain_dp(self, stages, combine) -> tuple[float, list[int] | None]:
        """min over contiguous splits of combine() over the stages' (matrix, last-row) costs, and its counts."""
        L = self.L
        f = np.full(L + 1, np.inf)
        f[0] = 0.0
        choices = []
        for step, _ in stages[:-1]:
            cand = combine(f[:, None], step)
            arg = np.argmin(cand, axis=0)
            f = cand[arg, np.arange(L + 1)]
            choices.append(arg)
        total = combine(f, stages[-1][1])
        i = int(np.argmin(total))
        if not np.isfinite(total[i]):
            return np.inf, None
        return float(total[i]), self._backtrack(choices, i, L)

    @property
    def batches(self) -> np.ndarray:
        return np.arange(1, self.options.max_num_seqs + 1)

    def _goodput_hops(self, order) -> list[np.ndarray]:
        """Per ring position, per batch size: the outgoing hop's share of a request (output_tokens hops over B)."""
        if len(order) == 1:
            return [np.zeros(len(self.batches))]
        fwd = [self._hop_shares(a, b, self.model.activation_bytes(1)) for a, b in zip(order, order[1:])]
        return fwd + [self._hop_shares(order[-1], order[0], TOKEN_ID_BYTES)]

    def _hop_shares(self, src: Unit, dst: Unit, bytes_per_seq: float) -> np.ndarray:
        key = (src, dst, bytes_per_seq)
        if key not in self._hops:
            o, B = self.options, self.batches
            self._hops[key] = np.array([hop_s(self.cluster, o, src, dst, bytes_per_seq * int(n)) for n in B]) \
                * o.output_tokens / B
        return self._hops[key]

    def prefill(self, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
        """(P, P_last): prefill of the reference prompt over layers [i, j) on the unit (StageModel.prefill_s),
        inf where the range does not fit with its KV reserve; P_last[i] for [i, L) with the output head."""
        unit = self._canon(unit)
        if unit not in self._prefill:
            self._prefill[unit] = self._build_prefill(unit)
        return self._prefill[unit]

    def _build_prefill(self, unit: Unit):
        m, o, p, L, tp = self.model, self.options, self.options.profile, self.L, len(unit)
        idx = np.arange(L + 1)
        # the prompt's work over layers [0, j): a MoE model reads the experts it touches and pays their GEMM fill
        reads, flops = np.array([prefill_work(m, 0, j, o.prompt_tokens, profile=p) for j in idx]).T
        reads, flops = (reads[None, :] - reads[:, None]) / tp, (flops[None, :] - flops[:, None]) / tp
        pre, pre_last = np.full((L + 1, L + 1), -np.inf), np.full(L + 1, -np.inf)
        for name in unit:
            chip = self.cluster.node(name).chip
            bw, fl, ovh = p.bandwidth(chip), p.flops(chip), self._overhead(chip)
            if p.attention_apart:
                ovh = ovh + (idx[None, :] - idx[:, None]) * self._attention_per_layer(chip, tp, True)
            pre = np.maximum(pre, np.maximum(reads / bw, flops / fl) + ovh)
            pre_last = np.maximum(pre_last, np.maximum((reads[:, L] + m.head_bytes()) / bw,
                                                       (flops[:, L] + m.head_flops(1)) / fl) + ovh[:, L])
        if tp > 1:
            comm = unit_stage(self.cluster, m, unit, 0, 1, False).allreduce_per_layer_s(m, p, o.prompt_tokens)
            pre, pre_last = pre + (idx[None, :] - idx[:, None]) * comm, pre_last + (L - idx) * comm
        return self._reserve_masked(unit, pre, pre_last)

    def _reserve_masked(self, unit: Unit, matrix: np.ndarray, last: np.ndarray, copy: bool = True):
        """inf where layers [i, j) do not fit the unit with their KV reserve, or i >= j (as in costs())."""
        fits = np.isfinite(self.costs(unit)[0])
        if copy:
            matrix, last = matrix.copy(), last.copy()
        matrix[..., ~fits] = np.inf
        last[..., ~fits[:, self.L]] = np.inf
        return matrix, last

    def _attention_per_layer(self, chip, tp: int, prefill: bool, seqs: int = 1, ctx: float = 0.0) -> float:
        """Attention apart (Profile.attention_apart): one layer's attention time on a member, for the reference
        prompt's prefill or a decode step of `seqs` sequences at `ctx` tokens each (linear in the layers)."""
        m, p = self.model, self.options.profile
        if prefill:
            return p.attention_s(chip, *prefill_attention_work(m, 0, 1, self.options.prompt_tokens, 0, tp))
        return p.attention_s(chip, *decode_attention_work(m, 0, 1, seqs * ctx, tp))

    def _overhead(self, chip) -> np.ndarray:
        """overhead[i, j]: the profile's step overhead of layers [i, j) on the chip."""
        p, idx = self.options.profile, np.arange(self.L + 1)
        return p.overhead(chip, 0) + (idx[None, :] - idx[:, None]) * (p.overhead(chip, 1) - p.overhead(chip, 0))

    def _batched_steps(self, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
        """(S, S_last): S[b, i, j] = decode step (StageModel.decode_s) of b+1 sequences at the mean decode context
        over layers [i, j) on the unit, without the hop; inf where the range does not fit with its KV reserve."""
        unit = self._canon(unit)
        if unit not in self._steps:
            self._steps[unit] = self._build_batched_steps(unit)
        return self._steps[unit]

    def _build_batched_steps(self, unit: Unit):
        m, p, L, tp = self.model, self.options.profile, self.L, len(unit)
        idx, B = np.arange(L + 1), self.batches
        d_read, d_flops = self._batched_deltas(tp)
        step = last = None
        ctx = self.options.mean_decode_context
        for chip in dict.fromkeys(self.cluster.node(name).chip for name in unit):   # alike members alike
            bw, fl, ovh = p.bandwidth(chip), p.flops(chip), self._overhead(chip)
            if p.attention_apart:   # per batch size: its attention per layer times the layers
                attn = np.array([self._attention_per_layer(chip, tp, False, int(n), ctx) for n in B])
                ovh = ovh[None, :, :] + attn[:, None, None] * (idx[None, :] - idx[:, None])[None, :, :]
            cand = d_read / bw            # in place from here: the same operations, fewer large temporaries
            np.maximum(cand, d_flops / fl, out=cand)
            cand += ovh
            step = cand if step is None else np.maximum(step, cand, out=step)
            tail = np.maximum((d_read[:, :, L] + m.head_bytes()) / bw,
                              (d_flops[:, :, L] + m.head_flops(1) * B[:, None]) / fl) + ovh[..., L]
            last = tail if last is None else np.maximum(last, tail)
        if tp > 1:
            stage = unit_stage(self.cluster, m, unit, 0, 1, False)
            comm = np.array([stage.allreduce_per_layer_s(m, p, int(n)) for n in B])
            step += (idx[None, :] - idx[:, None]) * comm[:, None, None]
            last = last + (L - idx) * comm[:, None]
        return self._reserve_masked(unit, step, last, copy=False)

    def _batched_deltas(self, tp: int) -> tuple[np.ndarray, np.ndarray]:
        """Bytes read and FLOPs of a decode step over layers [i, j) per member of a tp-way unit: arrays [b, i, j]."""
        if tp not in self._deltas:
            read, flops = self._batched_work()
            self._deltas[tp] = ((read[:, None, :] - read[:, :, None]) / tp, (flops[:, None, :] - flops[:, :, None]) / tp)
        return self._deltas[tp]

    def _batched_work(self) -> tuple[np.ndarray, np.ndarray]:
        """Bytes read and FLOPs of one decode step over layers [0, j), per batch size: arrays [b, j]."""
        if self._work is None:
            m, ctx, idx, p = self.model, self.options.mean_decode_context, np.arange(self.L + 1), self.options.profile
            if p.attention_apart:   # attention is priced apart (_build_batched_steps)
                ctx = 0
            kv, B = m.kv_bytes_per_token_layer(), self.batches
            if m.moe:   # the experts a step touches depend on its sequences
                weights = np.array([[read_bytes(m, p, 0, j, int(n)) for j in idx] for n in B])
            else:       # a dense step reads every weight once, whatever its sequences: one row serves all
                weights = np.array([read_bytes(m, p, 0, j, 1) for j in idx])[None, :]
            # the same operations, in the same order, as read_bytes(...) + n * ctx * j * kv and decode_flops()
            read = weights + (B[:, None] * ctx) * idx[None, :] * kv
            params = np.array([m._active_layer_params(0, j) for j in idx])
            flops = (2.0 * B[:, None]) * params[None, :] + (B[:, None] * ctx) * idx[None, :] \
                * m._attn_flops_per_position()
            self._work = (read, flops)
        return self._work

    def _kv_room(self, unit: Unit) -> np.ndarray:
        """room[i, j]: KV tokens layers [i, j) on the unit can cache beside their weights (costmodel.kv_room_tokens)."""
        unit = self._canon(unit)
        if unit not in self._room:
            self._room[unit] = self._build_kv_room(unit)
        return self._room[unit]

    def _build_kv_room(self, unit: Unit) -> np.ndarray:
        m, idx, tp = self.model, np.arange(self.L + 1), len(unit)
        weights = np.array([m.weight_bytes(0, j) for j in idx])
        stored = (weights[None, :] - weights[:, None]) / tp + m.embed_bytes() + m.head_bytes()
        kv = np.maximum(idx[None, :] - idx[:, None], 1) * m.kv_bytes_per_token_layer() / tp
        return np.maximum(unit_available_bytes(self.cluster, unit) - stored, 0.0) / kv

    @staticmethod
    def _backtrack(choices, last_start: int, L: int) -> list[int]:
        bounds = [L, last_start]
        for arg in reversed(choices):
            bounds.append(int(arg[bounds[-1]]))
        bounds.reverse()
        return [b - a for a, b in zip(bounds, bounds[1:])]


def _led_by(combo: tuple[int, ...], lead: int) -> tuple[int, ...]:
    """The type of a group of these classes whose leader (the member hops leave from) is of class `lead`."""
    rest = list(combo)
    rest.remove(lead)
    return (lead,) + tuple(rest)


def _multisets(n: int, size: int):
    """Non-decreasing tuples of `size` values below n (multisets), in lexicographic order."""
    def rec(start, k):
        if k == 0:
            yield ()
            return
        for c in range(start, n):
            for rest in rec(c, k - 1):
                yield (c,) + rest
    yield from rec(0, size)
