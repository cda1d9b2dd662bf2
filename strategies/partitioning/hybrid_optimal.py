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
  * goodput maximises the sustainable request rate (costmodel.sustainable_rate_rps): it minimises a request's
    pipeline time, its prompt's prefill summed over the stages plus output_tokens decode steps of B sequences
    at the bottleneck stage (with hop) over B, over splits and every micro-batch size B up to max_num_seqs that
    every stage's KV memory allows (one micro-batch per stage in flight, each sequence holding prompt + output
    tokens). A sum plus a bottleneck is no single DP; `best_goodput_split` solves it exactly with additive DPs
    under bounds on the bottleneck. Maximising the rate rather than a latency at the experiment's arrival rate
    gives the plan the most headroom at any rate and keeps the search exact; the arrival rate is printed
    beside the sustainable rate (PartitionPlan.predicted).
Because every other strategy's plan is one of these (set, order, split) points and all plans are scored by the
same cost model, this one is never worse on its objective. Beyond 8 nodes the set search narrows to the fastest
and the largest nodes (prefixes), without tensor parallelism.
"""
from __future__ import annotations

from itertools import combinations, permutations

import numpy as np

from strategies.partitioning._plans import (TOKEN_ID_BYTES, Unit, allreduce_per_layer_s, build_plan, by_memory,
                                            by_speed, hop_s, no_arrangement, require_fit, require_total_fit,
                                            unit_available_bytes, unit_stage)
from strategies.registry import partitioner

ALL_ORDERS_UP_TO = 4
FULL_SEARCH_UP_TO = 8
TP_SIZES = (2, 3, 4)


@partitioner("hybrid_optimal")
def plan(cluster, model, options):
    require_total_fit(cluster, model, options)
    search = _Search(cluster, model, options)
    best = None
    goodput = options.objective == "goodput"
    for units in search.unit_sets():
        for order in search.orders(units):
            # goodput's search prunes against the best plan so far: it is the costly one
            value, counts = search.best_goodput_split(order, best[0] if best else np.inf) if goodput \
                else search.best_split(order)
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
        self._prefill: dict[Unit, tuple[np.ndarray, np.ndarray]] = {}
        self._steps: dict[Unit, tuple[np.ndarray, np.ndarray]] = {}
        self._hops: dict[tuple, np.ndarray] = {}
        self._room: dict[Unit, np.ndarray] = {}
        self._bounds: dict[tuple[Unit, int], set[int]] = {}
        self._work: tuple[np.ndarray, np.ndarray] | None = None
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
        """Most layers the unit can hold in some window: a set whose caps cannot add up to the model is skipped.
        The lightest window counts, not the heaviest (max_layers): a node too small for a dense layer may still
        hold a lighter one, and the split search decides which layers it gets."""
        if unit not in self._cap:
            fits = np.isfinite(self.costs(unit)[0])          # fits[i, j]: layers [i, j) fit with their KV reserve
            spans = np.arange(self.L + 1)[None, :] - np.arange(self.L + 1)[:, None]
            self._cap[unit] = int(spans[fits].max(initial=0))
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
            bw, fl, ovh = p.bandwidth(chip), p.flops(chip), self._overhead(chip)
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
        if unit not in self._prefill:
            self._prefill[unit] = self._build_prefill(unit)
        return self._prefill[unit]

    def _build_prefill(self, unit: Unit):
        m, o, p, L, tp = self.model, self.options, self.options.profile, self.L, len(unit)
        idx = np.arange(L + 1)
        reads = np.array([m.weight_bytes(0, j) + o.prompt_tokens * m.kv_bytes_per_token(0, j) for j in idx])
        flops = np.array([m.prefill_flops(0, j, o.prompt_tokens, 0) for j in idx])
        reads, flops = (reads[None, :] - reads[:, None]) / tp, (flops[None, :] - flops[:, None]) / tp
        pre, pre_last = np.full((L + 1, L + 1), -np.inf), np.full(L + 1, -np.inf)
        for name in unit:
            chip = self.cluster.node(name).chip
            bw, fl, ovh = p.bandwidth(chip), p.flops(chip), self._overhead(chip)
            pre = np.maximum(pre, np.maximum(reads / bw, flops / fl) + ovh)
            pre_last = np.maximum(pre_last, np.maximum((reads[:, L] + m.head_bytes()) / bw,
                                                       (flops[:, L] + m.head_flops(1)) / fl) + ovh[:, L])
        if tp > 1:
            comm = unit_stage(self.cluster, m, unit, 0, 1, False).allreduce_per_layer_s(m, p, o.prompt_tokens)
            pre, pre_last = pre + (idx[None, :] - idx[:, None]) * comm, pre_last + (L - idx) * comm
        return self._reserve_masked(unit, pre, pre_last)

    def _reserve_masked(self, unit: Unit, matrix: np.ndarray, last: np.ndarray):
        """inf where layers [i, j) do not fit the unit with their KV reserve, or i >= j (as in costs())."""
        fits = np.isfinite(self.costs(unit)[0])
        matrix, last = matrix.copy(), last.copy()
        matrix[..., ~fits] = np.inf
        last[..., ~fits[:, self.L]] = np.inf
        return matrix, last

    def _overhead(self, chip) -> np.ndarray:
        """overhead[i, j]: the profile's step overhead of layers [i, j) on the chip."""
        p, idx = self.options.profile, np.arange(self.L + 1)
        return p.overhead(chip, 0) + (idx[None, :] - idx[:, None]) * (p.overhead(chip, 1) - p.overhead(chip, 0))

    def _batched_steps(self, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
        """(S, S_last): S[b, i, j] = decode step (StageModel.decode_s) of b+1 sequences at the mean decode context
        over layers [i, j) on the unit, without the hop; inf where the range does not fit with its KV reserve."""
        if unit not in self._steps:
            self._steps[unit] = self._build_batched_steps(unit)
        return self._steps[unit]

    def _build_batched_steps(self, unit: Unit):
        m, p, L, tp = self.model, self.options.profile, self.L, len(unit)
        idx, B = np.arange(L + 1), self.batches
        read, flops = self._batched_work()
        d_read = (read[:, None, :] - read[:, :, None]) / tp
        d_flops = (flops[:, None, :] - flops[:, :, None]) / tp
        step, last = np.full(d_read.shape, -np.inf), np.full(d_read.shape[:2], -np.inf)
        for name in unit:
            chip = self.cluster.node(name).chip
            bw, fl, ovh = p.bandwidth(chip), p.flops(chip), self._overhead(chip)
            step = np.maximum(step, np.maximum(d_read / bw, d_flops / fl) + ovh)
            last = np.maximum(last, np.maximum((d_read[:, :, L] + m.head_bytes()) / bw,
                                               (d_flops[:, :, L] + m.head_flops(1) * B[:, None]) / fl) + ovh[:, L])
        if tp > 1:
            stage = unit_stage(self.cluster, m, unit, 0, 1, False)
            comm = np.array([stage.allreduce_per_layer_s(m, p, int(n)) for n in B])
            step = step + (idx[None, :] - idx[:, None]) * comm[:, None, None]
            last = last + (L - idx) * comm[:, None]
        return self._reserve_masked(unit, step, last)

    def _batched_work(self) -> tuple[np.ndarray, np.ndarray]:
        """Bytes read and FLOPs of one decode step over layers [0, j), per batch size: arrays [b, j]."""
        if self._work is None:
            m, ctx, idx = self.model, self.options.mean_decode_context, np.arange(self.L + 1)
            kv = m.kv_bytes_per_token_layer()
            read = np.array([[m.decode_read_bytes(0, j, int(n)) + n * ctx * j * kv for j in idx] for n in self.batches])
            flops = np.array([[m.decode_flops(0, j, int(n), ctx) for j in idx] for n in self.batches])
            self._work = (read, flops)
        return self._work

    def _kv_room(self, unit: Unit) -> np.ndarray:
        """room[i, j]: KV tokens layers [i, j) on the unit can cache beside their weights (costmodel.kv_room_tokens)."""
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
