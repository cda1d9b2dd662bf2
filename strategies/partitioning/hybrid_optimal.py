"""hybrid_optimal: search node subsets, tensor-parallel groups, ring orders and contiguous layer splits for the
plan with the lowest predicted objective (options.objective, default "latency": time per output token of one
stream; "throughput": the pipeline bottleneck), subject to every stage fitting in memory with its KV reserve.

The search:
  * units: single nodes, plus tensor-parallel groups of 2-4 nodes whose every link is RDMA (Thunderbolt 5) and
    whose size divides the attention and KV heads;
  * every set of disjoint units that can hold the model, and for each set every ring order (up to 4 units),
    or else the orders the other strategies use (cluster file, most memory first, fastest first);
  * for each (set, order) an exact dynamic programme over contiguous splits (numpy, O(k L^2)): minimise the
    sum of stage times (latency) or the largest stage time plus hop (throughput), each stage holding >= 1 layer.
Because every other strategy's plan is one of these (set, order, split) points and all plans are scored by the
same cost model, this one is never worse on its objective. Beyond 8 nodes the set search narrows to the fastest
and the largest nodes (prefixes), without tensor parallelism.
"""
from __future__ import annotations

from itertools import combinations, permutations

import numpy as np

from strategies.partitioning._plans import (TOKEN_ID_BYTES, Unit, allreduce_per_layer_s, build_plan, by_memory,
                                            by_speed, hop_s, max_layers, no_arrangement, require_fit, require_total_fit,
                                            unit_available_bytes)
from strategies.registry import partitioner

ALL_ORDERS_UP_TO = 4
FULL_SEARCH_UP_TO = 8
TP_SIZES = (2, 3, 4)


@partitioner("hybrid_optimal")
def plan(cluster, model, options):
    require_total_fit(cluster, model, options)
    search = _Search(cluster, model, options)
    best = None
    for units in search.unit_sets():
        for order in search.orders(units):
            value, counts = search.best_split(order)
            if counts is not None and (best is None or value < best[0] - 1e-15):
                best = (value, order, counts)
    if best is None:
        raise no_arrangement(cluster, model, options)
    _, order, counts = best
    note = f"searched {search.sets_tried} node sets and {search.orders_tried} ring orders"
    return require_fit(build_plan("hybrid_optimal", cluster, model, options, list(order), counts, (note,)))


class _Search:
    def __init__(self, cluster, model, options):
        self.cluster, self.model, self.options = cluster, model, options
        self.names = [n.name for n in cluster.nodes]
        self.L = model.num_layers
        self._cost: dict[Unit, tuple[np.ndarray, np.ndarray]] = {}
        self._cap: dict[Unit, int] = {}
        self.sets_tried = self.orders_tried = 0

    # -- which units and orders ---------------------------------------------------------------------
    def tp_groups(self) -> list[Unit]:
        m = self.model
        groups = []
        for size in TP_SIZES:
            if m.heads % size or m.kv_heads % size:
                continue
            for combo in combinations(self.names, size):
                if all(self.cluster.link(a, b).rdma for a, b in combinations(combo, 2)):
                    groups.append(combo)
        return groups

    def unit_sets(self):
        if len(self.names) > FULL_SEARCH_UP_TO:
            yield from self._narrow_sets()
            return
        groups = self.tp_groups()
        yield from self._partitions(0, frozenset(), [], groups)

    def _partitions(self, i, used, chosen, groups):
        """Every set of disjoint units over nodes[i:], each node unused, alone, or leading a TP group."""
        if i == len(self.names):
            if chosen and self._holds_model(chosen):
                self.sets_tried += 1
                yield list(chosen)
            return
        name = self.names[i]
        if name in used:
            yield from self._partitions(i + 1, used, chosen, groups)
            return
        # alone first, so that ties go to the nodes listed first in the cluster file
        yield from self._partitions(i + 1, used | {name}, chosen + [(name,)], groups)
        for g in groups:                                                                    # leads a TP group
            if g[0] == name and not (set(g) & used):
                yield from self._partitions(i + 1, used | set(g), chosen + [g], groups)
        yield from self._partitions(i + 1, used, chosen, groups)                            # unused

    def _narrow_sets(self):
        fast = by_speed(self.cluster, self.options.profile, self.names)
        big = by_memory(self.cluster, self.names)
        seen = set()
        for k in range(1, len(self.names) + 1):
            for pick in (fast[:k], big[:k]):
                key = frozenset(pick)
                if key not in seen and self._holds_model([(n,) for n in pick]):
                    seen.add(key)
                    self.sets_tried += 1
                    yield [(n,) for n in pick]

    def _holds_model(self, units) -> bool:
        return len(units) <= self.L and sum(self.cap(u) for u in units) >= self.L

    def orders(self, units: list[Unit]):
        if len(units) <= ALL_ORDERS_UP_TO:
            found = list(permutations(units))
        else:  # the orders the other strategies use, so none of them can beat this search
            index = {n: i for i, n in enumerate(self.names)}
            speed = {n: i for i, n in enumerate(by_speed(self.cluster, self.options.profile, self.names))}
            memory = {n: i for i, n in enumerate(by_memory(self.cluster, self.names))}
            found = list(dict.fromkeys(tuple(sorted(units, key=lambda u: rank[u[0]])) for rank in (index, speed, memory)))
        self.orders_tried += len(found)
        return found

    # -- costs ----------------------------------------------------------------------------------------
    def cap(self, unit: Unit) -> int:
        if unit not in self._cap:
            self._cap[unit] = max_layers(self.model, self.options, unit_available_bytes(self.cluster, unit), len(unit))
        return self._cap[unit]

    def costs(self, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
        """(C, C_last): C[i, j] = decode step of layers [i, j) on the unit (inf if it does not fit or i >= j);
        C_last[i] = the same for [i, L) with the output head. Vectorises costmodel.StageModel.decode_s
        (every member's roofline + overhead, the slowest decides, plus the all-reduces); tests check they agree."""
        if unit not in self._cost:
            self._cost[unit] = self._build_costs(unit)
        return self._cost[unit]

    def _build_costs(self, unit: Unit):
        m, o, p, L, tp = self.model, self.options, self.options.profile, self.L, len(unit)
        idx = np.arange(L + 1)
        read = np.array([m.decode_read_bytes(0, j, 1) for j in idx]) + o.context_tokens * idx * m.kv_bytes_per_token_layer()
        flops = np.array([m.decode_flops(0, j, 1, o.context_tokens) for j in idx])
        d_read = (read[None, :] - read[:, None]) / tp
        d_flops = (flops[None, :] - flops[:, None]) / tp
        step = np.full((L + 1, L + 1), -np.inf)
        last = np.full(L + 1, -np.inf)
        for name in unit:
            chip = self.cluster.node(name).chip
            bw, fl = p.bandwidth(chip), p.flops(chip)
            ovh = p.overhead(chip, 0) + (idx[None, :] - idx[:, None]) * (p.overhead(chip, 1) - p.overhead(chip, 0))
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

    @staticmethod
    def _backtrack(choices, last_start: int, L: int) -> list[int]:
        bounds = [L, last_start]
        for arg in reversed(choices):
            bounds.append(int(arg[bounds[-1]]))
        bounds.reverse()
        return [b - a for a, b in zip(bounds, bounds[1:])]
