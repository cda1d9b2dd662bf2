"""Per-stage timing for the simulator, built once from a plan and delegating to harness.costmodel.

Kept apart from the engine so the engine's hot loop only calls `StageModel.mixed_s` and `DecodeTimer` with plain numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness import costmodel
from harness.costmodel import Profile
from harness.specs import Chip, Cluster, Link, ModelSpec, PartitionPlan, UserError



@dataclass(frozen=True)
class StageModel:
    """What the engine needs to know about one pipeline stage."""
    index: int
    nodes: tuple[str, ...]
    chip: Chip                    # the slowest member's chip (a tensor-parallel group moves at its pace)
    start: int
    end: int
    tp: int
    last: bool
    tp_link: Link | None          # the group's slowest internal link (all-reduces), None without TP
    kv_bytes_per_token_node: float   # KV bytes per cached token on each member node
    weight_bytes_node: float      # bytes each member node loads

    def decode_s(self, model: ModelSpec, profile: Profile, batch: int, ctx_sum: float) -> float:
        mean_ctx = ctx_sum / batch
        t = costmodel.decode_time(self.chip, profile, model, self.start, self.end, batch, mean_ctx,
                                  tp=self.tp, with_head=self.last)
        return t + self.allreduce_s(model, profile, batch)

    def prefill_s(self, model: ModelSpec, profile: Profile, tokens: int, ctx_before: int) -> float:
        t = costmodel.prefill_time(self.chip, profile, model, self.start, self.end, tokens, ctx_before,
                                   tp=self.tp, with_head=self.last)
        return t + self.allreduce_s(model, profile, tokens)

    def mixed_s(self, model: ModelSpec, profile: Profile, n_dec: int, dec_ctx_sum: float,
                chunks: list[tuple[int, int]]) -> float:
        """A step mixing decodes and prefill chunks reads the weights once: one roofline over the summed work.

        Reduces exactly to decode_s / prefill_s when only one kind is present (tests rely on that).
        """
        if not chunks:
            return self.decode_s(model, profile, n_dec, dec_ctx_sum)
        if n_dec == 0 and len(chunks) == 1:
            return self.prefill_s(model, profile, *chunks[0])
        s, e, kvpt = self.start, self.end, model.kv_bytes_per_token(self.start, self.end)
        tokens = n_dec + sum(t for t, _ in chunks)
        nbytes = model.decode_read_bytes(s, e, tokens) + (dec_ctx_sum + sum(c + t for t, c in chunks)) * kvpt
        flops = model.decode_flops(s, e, 1, 0) * n_dec + dec_ctx_sum * (e - s) * model._attn_flops_per_position()
        flops += sum(model.prefill_flops(s, e, t, c) for t, c in chunks)
        nbytes, flops = nbytes / self.tp, flops / self.tp
        if self.last:
            nbytes += model.head_bytes()
            flops += model.head_flops(n_dec + len(chunks))
        t = costmodel.roofline(self.chip, profile, nbytes, flops) + profile.overhead(self.chip, e - s)
        return t + self.allreduce_s(model, profile, tokens)

    def allreduce_s(self, model: ModelSpec, profile: Profile, tokens: int) -> float:
        """Two all-reduces of the hidden states per layer (after attention and after the MLP)."""
        if self.tp <= 1:
            return 0.0
        per = costmodel.allreduce_time(self.tp_link, model.activation_bytes(tokens), self.tp, profile)
        return 2 * (self.end - self.start) * per


class DecodeTimer:
    """`StageModel.decode_s` for the hot loop: the roofline terms are affine in the summed context, so their
    batch-dependent parts are computed once per batch size and cached. Same formula as
    harness.costmodel.decode_time (tests/sim check they agree to rounding)."""

    def __init__(self, stage: StageModel, model: ModelSpec, profile: Profile):
        self.stage, self.model, self.profile = stage, model, profile
        s, e, tp = stage.start, stage.end, stage.tp
        self.bw, self.fl = profile.bandwidth(stage.chip), profile.flops(stage.chip)
        self.overhead = profile.overhead(stage.chip, e - s)
        self.kv_bytes = model.kv_bytes_per_token(s, e) / tp                    # per token of context read
        self.attn_flops = (e - s) * model._attn_flops_per_position() / tp      # per token of context read
        self._per_batch: dict[int, tuple[float, float, float]] = {}

    def _terms(self, batch: int) -> tuple[float, float, float]:
        st, m = self.stage, self.model
        nbytes = m.decode_read_bytes(st.start, st.end, batch) / st.tp
        flops = m.decode_flops(st.start, st.end, batch, 0) / st.tp
        if st.last:
            nbytes += m.head_bytes()
            flops += m.head_flops(batch)
        terms = (nbytes, flops, self.overhead + st.allreduce_s(m, self.profile, batch))
        self._per_batch[batch] = terms
        return terms

    def vector(self, batch: int, ctx_sums: np.ndarray) -> np.ndarray:
        """The same for many steps of one batch size at once (fast-forwarding steady decode)."""
        terms = self._per_batch.get(batch) or self._terms(batch)
        return np.maximum((terms[0] + ctx_sums * self.kv_bytes) / self.bw,
                          (terms[1] + ctx_sums * self.attn_flops) / self.fl) + terms[2]


def stage_models(cluster: Cluster, model: ModelSpec, plan: PartitionPlan) -> tuple[StageModel, ...]:
    """StageModels in layer order; checks that the plan matches the model and names known nodes."""
    if plan.num_layers != model.num_layers:
        raise UserError(f"plan covers {plan.num_layers} layers but {model.name} has {model.num_layers}")
    problems = [p for p in plan.problems() if "needs" not in p]  # memory is enforced by the KV pool instead
    if problems:
        raise UserError("invalid plan: " + "; ".join(problems))
    out = []
    for i, st in enumerate(plan.stages):
        try:
            nodes = [cluster.node(n) for n in st.nodes]
        except KeyError as exc:
            raise UserError(f"plan stage {i} names node {exc} which is not in cluster {cluster.name}") from None
        last = i == len(plan.stages) - 1
        tp = max(st.tp_degree, 1)
        # mlx-lm's pipeline keeps the embeddings and the output head on every rank
        weights = model.weight_bytes(st.layer_start, st.layer_end) / tp + model.embed_bytes() + model.head_bytes()
        out.append(StageModel(
            index=i, nodes=st.nodes, chip=min((n.chip for n in nodes), key=lambda c: c.mem_bw_gbs),
            start=st.layer_start, end=st.layer_end, tp=tp, last=last, tp_link=_slowest_link(cluster, st.nodes),
            kv_bytes_per_token_node=model.kv_bytes_per_token(st.layer_start, st.layer_end) / tp,
            weight_bytes_node=weights))
    return tuple(out)


def _slowest_link(cluster: Cluster, names: tuple[str, ...]) -> Link | None:
    links = [cluster.link(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    return min(links, key=lambda l: l.bandwidth_gbps) if links else None


def hop_links(cluster: Cluster, stages: tuple[StageModel, ...]) -> tuple[list[Link], Link | None]:
    """Forward links between consecutive stages (first member to first member), and the link carrying token ids
    from the last stage back to the first (None for a single stage)."""
    fwd = [cluster.link(a.nodes[0], b.nodes[0]) for a, b in zip(stages, stages[1:])]
    back = cluster.link(stages[-1].nodes[0], stages[0].nodes[0]) if len(stages) > 1 else None
    return fwd, back


def kv_pool_tokens(cluster: Cluster, stages) -> int:
    """KV pool size in tokens: the stage with the least room (free bytes / its KV bytes per token) decides."""
    room = []
    for st in stages:
        usable = min(cluster.node(n).usable_bytes for n in st.nodes)
        free = usable - st.weight_bytes_node
        if free <= 0:
            raise UserError(f"stage {st.index} ({'+'.join(st.nodes)}): weights need "
                            f"{st.weight_bytes_node / 1e9:.1f} GB but only {usable / 1e9:.1f} GB is usable")
        room.append(free / st.kv_bytes_per_token_node)
    return int(min(room))
