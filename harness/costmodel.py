"""Roofline cost model (DESIGN §7): pure functions of chip, link, model and a profile of fitted factors.

Decode step:  t = max(bytes / (eta_bw * BW), flops / (mu * peak)) + step overhead + layers x layer overhead
Prefill:      the same roofline over the prompt's FLOPs and the weights it reads
Link:         t = latency + per-message overhead + bytes / bandwidth
MoE:          a forward of T tokens reads the experts its tokens touch, E (1 - (1 - k/E)^T) per MoE layer (uniform
              top-k routing), at expert_eta of the dense read rate, and each touched expert's GEMM pays
              expert_fill_tokens tokens of compute on top (a small per-expert GEMM fills its tiles poorly)
Attention:    with attn_eta_bw and attn_mu set, attention over the cached context is its own kernel with its own
              roofline, max(KV bytes / (attn_eta_bw BW), pair FLOPs / (attn_mu peak)), added to the weights'
              roofline instead of hidden inside it (0: inside, as the plain roofline)
Engines:      a profile's `engines` table overrides factors per serving engine (mlx-lm, llama.cpp, exo, ...) and
              adds the engine's fixed per-request cost and prefill chunk; Profile.for_engine picks one
Stages:       `StageModel` times one pipeline stage (a node or a tensor-parallel group) for the planner and the
              simulator alike; `PlanOptions` says at which context and prompt length a plan is predicted.
Strategies use it to rank plans; the simulator uses it to time events. Efficiency factors live in a profile
file (harness/profiles/*.json), never in code; a missing or malformed profile is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from harness.specs import Chip, Cluster, Link, ModelSpec, PartitionPlan, UserError, read_json, reject_unknown

PROFILE_DIR = Path(__file__).parent / "profiles"
REQUIRED = ("eta_bw", "mu_compute", "step_overhead_s", "layer_overhead_s", "link_overhead_us", "ssd_gbs")
# Terms a profile may add; their defaults are the plain roofline, so a profile without them prices as before.
OPTIONAL = {"overlap": 1.0, "seq_layer_overhead_s": 0.0, "prefill_ramp_tokens": 0.0, "iteration_gap_s": 0.0,
            "attn_eta_bw": 0.0, "attn_mu": 0.0, "tcp_hop_latencies": 1.0, "rdma_hop_overhead_us": 0.0}
OPTIONAL_RANGES = {"overlap": (0.0, 1.0), "seq_layer_overhead_s": (0.0, np.inf), "prefill_ramp_tokens": (0.0, np.inf),
                   "iteration_gap_s": (0.0, np.inf), "attn_eta_bw": (0.0, 1.0), "attn_mu": (0.0, 1.0),
                   "tcp_hop_latencies": (1.0, 100.0), "rdma_hop_overhead_us": (0.0, np.inf),
                   "expert_eta": (0.05, 1.0), "expert_fill_tokens": (0.0, np.inf),
                   "request_overhead_s": (0.0, np.inf), "prefill_chunk_tokens": (0.0, np.inf)}
# MoE terms: one value per profile (or engine), not per chip: they scale the work, not a chip's rate
MOE_TERMS = {"expert_eta": 1.0, "expert_fill_tokens": 0.0}
# what only an engine has: its fixed cost per request (TTFT floor: tokenising, scheduling, the first
# round trip) and the tokens it prefills per forward (0: the whole prompt in one)
ENGINE_TERMS = {"request_overhead_s": 0.0, "prefill_chunk_tokens": 0.0}
# a decode step's measured time at each batch size over the cost model's own, relative to one sequence (index
# batch - 1): small-batch GEMM kernels on a CPU are not linear in the batch (`calibrate --from` on a validate-ci
# run of a 40M model fitted (1, 1.027, 1.265, 0.907) for a rank on one OpenBLAS thread); () = no such term
TABLE_TERMS = ("decode_batch_scale",)
FACTOR_KEYS = (*REQUIRED, *OPTIONAL, *TABLE_TERMS)   # what a per_chip entry may override
ENGINE_KEYS = (*REQUIRED, *OPTIONAL, *MOE_TERMS, *ENGINE_TERMS, "per_chip", "basis")   # what an engines entry may set
DEFAULT_ENGINE = "mlx-lm"   # the engine a profile's own factors are for; its engines entry, if any, is empty
# A profile file's keys: the factors, their provenance, and the notes `harness calibrate` writes beside them.
PROFILE_KEYS = ("name", "source", *FACTOR_KEYS, *MOE_TERMS, *ENGINE_TERMS, "per_chip", "per_generation", "engines",
                "ssd_basis", "link_basis", "moe_basis", "fit")


@dataclass(frozen=True)
class Profile:
    name: str
    eta_bw: float              # achieved / peak memory bandwidth in decode
    mu_compute: float          # achieved / peak FLOPS in prefill
    step_overhead_s: float     # fixed cost per engine step per stage (sampling, scheduling, Python)
    layer_overhead_s: float    # cost per layer per step beyond the roofline (kernel launches, synchronisation)
    link_overhead_us: float    # software cost per message on top of the link's latency
    ssd_gbs: float             # default SSD read rate for model loading
    per_chip: dict = field(default_factory=dict)   # {"M2 Ultra": {"eta_bw": 0.45, ...}} overrides
    source: str = ""
    # share of the smaller of memory and compute time hidden under the larger (1: GPU-like full overlap; a CPU
    # core that streams weights cannot multiply at the same time, so less)
    overlap: float = 1.0
    seq_layer_overhead_s: float = 0.0   # cost per sequence per layer per forward (cache bookkeeping, masks)
    prefill_ramp_tokens: float = 0.0    # tokens at which a forward reaches half of mu_compute (small GEMMs)
    # idle time between two engine iterations outside every stage: the serving loop handing out the tokens and
    # sending the next command to the ranks (the real backend's driver round trip)
    iteration_gap_s: float = 0.0
    # attention over the cached context as its own roofline (0, 0: inside the weights' roofline, as before)
    attn_eta_bw: float = 0.0            # achieved / peak bandwidth reading the KV cache in attention
    attn_mu: float = 0.0                # achieved / peak FLOPS of the attention kernels (QK^T, softmax, AV)
    expert_eta: float = 1.0             # read rate of routed experts relative to dense weights (gathers)
    expert_fill_tokens: float = 0.0     # extra tokens of compute each touched expert's GEMM pays per forward
    engines: dict = field(default_factory=dict)   # {"llama.cpp": {"step_overhead_s": ..., ...}} overrides
    # per chip generation ("M1" ... "M5"): factors for a chip without its own per_chip entry, and a "basis"
    # saying how they were found (an estimate where the generation has no rows)
    per_generation: dict = field(default_factory=dict)
    engine: str = DEFAULT_ENGINE        # the engine this profile prices
    request_overhead_s: float = 0.0     # the engine's fixed cost per request (TTFT floor)
    prefill_chunk_tokens: float = 0.0   # tokens the engine prefills per forward (0: the whole prompt)
    # per-hop cost by transport: a TCP message (MLX ring, llama.cpp RPC, exo's ring) waits this many of its
    # link's one-way latencies (1: the latency alone; small messages under load pay ACK-clocked round trips),
    # an RDMA message (JACCL) this much software time on top of the verbs latency
    tcp_hop_latencies: float = 1.0
    rdma_hop_overhead_us: float = 0.0
    decode_batch_scale: tuple = ()      # TABLE_TERMS

    def __post_init__(self):
        check_optional_terms(self.__dict__, f"profile {self.name}", partial=False)
        check_batch_scale(self.decode_batch_scale, f"profile {self.name}")
        for chip, factors in self.per_chip.items():
            check_optional_terms(factors, f"profile {self.name}: per_chip.{chip}")
            check_batch_scale(factors.get("decode_batch_scale", ()), f"profile {self.name}: per_chip.{chip}")
        for name, entry in self.engines.items():
            check_optional_terms(entry, f"profile {self.name}: engines.{name}")
        for gen, factors in self.per_generation.items():
            check_optional_terms(factors, f"profile {self.name}: per_generation.{gen}")

    def for_engine(self, engine: str | None) -> "Profile":
        """This profile for one serving engine: its engines entry's factors (and per-chip factors) over the
        profile's own. The default engine (mlx-lm), or an engine without an entry in a profile with no engines
        table, is the profile itself."""
        engine = engine or DEFAULT_ENGINE
        if engine == self.engine:
            return self
        if engine not in self.engines and engine != DEFAULT_ENGINE:
            known = sorted({DEFAULT_ENGINE, *self.engines})
            raise UserError(f"profile {self.name} has no engine {engine!r}; known: {', '.join(known)}")
        entry = dict(self.engines.get(engine, {}))
        entry.pop("basis", None)
        chips = {**self.per_chip}
        for chip, factors in entry.pop("per_chip", {}).items():
            chips[chip] = {**chips.get(chip, {}), **factors}
        return replace(self, engine=engine, per_chip=chips, **{k: float(v) for k, v in entry.items()})

    @property
    def attention_apart(self) -> bool:
        """Whether attention over the context is priced as its own term (both its factors set)."""
        return self.attn_eta_bw > 0 and self.attn_mu > 0

    def attention_s(self, chip: Chip, kv_bytes: float, flops: float) -> float:
        """Attention's own roofline: the KV it reads and the pair FLOPs it does (0 unless attention_apart)."""
        if not self.attention_apart or not (kv_bytes or flops):
            return 0.0
        return max(kv_bytes / (self._get(chip, "attn_eta_bw") * chip.mem_bw_gbs * 1e9),
                   flops / (self._get(chip, "attn_mu") * chip.fp16_tflops * 1e12))

    def _get(self, chip: Chip, key: str) -> float:
        """A factor for one chip: its per_chip entry, else its generation's (per_generation, "M3" for "M3 Max"),
        else the profile's own."""
        own = self.per_chip.get(chip.name)
        if own is not None and key in own:
            return own[key]
        if self.per_generation:   # this runs several times per stage per engine step: the name split is cached
            gen = self.per_generation.get(_generation(chip.name))
            if gen is not None and key in gen:
                return gen[key]
        return getattr(self, key)

    def exposed(self, chip: Chip) -> float:
        """Share of the smaller roofline side that is NOT hidden under the larger: 1 - overlap."""
        return 1.0 - self._get(chip, "overlap")

    def ramp(self, chip: Chip, tokens: float) -> float:
        """Compute-time multiplier of a forward of `tokens` tokens: mu_compute / mu_eff(tokens) = 1 + ramp/tokens
        (0 tokens: no ramp, the plain compute rate)."""
        r = self._get(chip, "prefill_ramp_tokens")
        return 1.0 + r / tokens if r and tokens else 1.0

    def batch_scale(self, chip: Chip, batch: int) -> float:
        """The decode_batch_scale entry for `batch` sequences on this chip: past the table its last entry (the
        batch sizes the fit saw), without a table 1."""
        table = self._get(chip, "decode_batch_scale")
        return float(table[min(batch, len(table)) - 1]) if table and batch >= 1 else 1.0

    def bandwidth(self, chip: Chip) -> float:
        """Effective bytes/s a decode step streams on this chip."""
        return self._get(chip, "eta_bw") * chip.mem_bw_gbs * 1e9

    def flops(self, chip: Chip) -> float:
        """Effective FLOP/s a prefill achieves on this chip."""
        return self._get(chip, "mu_compute") * chip.fp16_tflops * 1e12

    def overhead(self, chip: Chip, layers: int, seqs: int = 1) -> float:
        """Time a step of `layers` layers over `seqs` sequences costs beyond the roofline: it grows with the
        layers a stage runs, so splitting a model over more stages does not multiply it."""
        per_layer = self._get(chip, "layer_overhead_s") + seqs * self._get(chip, "seq_layer_overhead_s")
        return self._get(chip, "step_overhead_s") + layers * per_layer


def chip_generation(chip: Chip) -> str:
    """A chip's generation: the first word of its name ("M4 Max" -> "M4")."""
    return _generation(chip.name)


@lru_cache(maxsize=None)
def _generation(name: str) -> str:
    return name.split()[0]


def check_batch_scale(table, origin: str) -> None:
    """decode_batch_scale is a list of positive numbers, one per batch size from 1."""
    if not isinstance(table, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or
                                                   not 0 < v <= 100 for v in table):
        raise UserError(f"{origin}: decode_batch_scale must be a list of numbers in (0, 100] (batch 1, 2, ...), "
                        f"got {table!r}")


def check_optional_terms(values: dict, origin: str, partial: bool = True) -> None:
    """The optional terms present in `values` are numbers inside their physical range."""
    for key, (low, high) in OPTIONAL_RANGES.items():
        if partial and key not in values:
            continue
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
            raise UserError(f"{origin}: {key} must be a number in [{low:g}, {high:g}], got {v!r}")


DEFAULT_PROFILE = "fitted"   # written by `python -m harness calibrate` from the public single-device data


def load_profile(path: str | Path | None = None) -> Profile:
    """A profile by file path or by name in harness/profiles/; default: the fitted profile."""
    p = Path(path) if path else PROFILE_DIR / f"{DEFAULT_PROFILE}.json"
    if not p.exists() and (PROFILE_DIR / f"{path}.json").exists():
        p = PROFILE_DIR / f"{path}.json"
    if not p.exists():
        raise UserError(f"cost-model profile {p} does not exist; run `python -m harness calibrate` or pass --profile")
    data = read_json(p, "cost-model profile")
    if isinstance(data.get("profile"), dict) and "eta_bw" not in data:   # a profile-host file: its profile part
        data = data["profile"]
    _reject_unknown_profile_keys(data, f"cost-model profile {p}")
    missing = [k for k in REQUIRED if not isinstance(data.get(k), (int, float))]
    if missing:
        raise UserError(f"cost-model profile {p}: missing or non-numeric {', '.join(missing)}")
    check_optional_terms(data, f"cost-model profile {p}")
    generations = {g: {k: v for k, v in e.items() if k != "basis"} for g, e in data.get("per_generation", {}).items()}
    return Profile(name=data.get("name", p.stem), per_chip=data.get("per_chip", {}), source=data.get("source", ""),
                   engines=data.get("engines", {}), per_generation={g: e for g, e in generations.items() if e},
                   **{k: float(data[k]) for k in REQUIRED},
                   **{k: float(data[k]) for k in (*OPTIONAL, *MOE_TERMS, *ENGINE_TERMS) if k in data},
                   **{k: tuple(data[k]) for k in TABLE_TERMS if k in data})


def _reject_unknown_profile_keys(data: dict, origin: str) -> None:
    reject_unknown(data, PROFILE_KEYS, origin)
    per_chip = data.get("per_chip", {})
    if not isinstance(per_chip, dict):
        raise UserError(f"{origin}: per_chip must be an object mapping chip names to factors, got {per_chip!r}")
    for chip, factors in per_chip.items():
        reject_unknown(factors, FACTOR_KEYS, origin, f"per_chip.{chip}")
    generations = data.get("per_generation", {})
    if not isinstance(generations, dict):
        raise UserError(f"{origin}: per_generation must be an object mapping generations (M1 ...) to factors, "
                        f"got {generations!r}")
    for gen, factors in generations.items():
        if not isinstance(factors, dict):
            raise UserError(f"{origin}: per_generation.{gen} must be an object of factors, got {factors!r}")
        reject_unknown(factors, (*FACTOR_KEYS, "basis"), origin, f"per_generation.{gen}")
        for key, value in factors.items():
            if key != "basis" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise UserError(f"{origin}: per_generation.{gen}.{key} must be a positive number, got {value!r}")
    engines = data.get("engines", {})
    if not isinstance(engines, dict):
        raise UserError(f"{origin}: engines must be an object mapping engine names to factors, got {engines!r}")
    for name, entry in engines.items():
        if not isinstance(entry, dict):
            raise UserError(f"{origin}: engines.{name} must be an object of factors, got {entry!r}")
        reject_unknown(entry, ENGINE_KEYS, origin, f"engines.{name}")
        for key, value in entry.items():
            if key not in ("per_chip", "basis") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"{origin}: engines.{name}.{key} must be a number, got {value!r}")
        for chip, factors in entry.get("per_chip", {}).items():
            reject_unknown(factors, FACTOR_KEYS, origin, f"engines.{name}.per_chip.{chip}")


def overlapped(memory_s: float, compute_s: float, exposed: float) -> float:
    """Memory and compute time of one forward with `exposed` (1 - overlap) of the smaller one not hidden."""
    if memory_s >= compute_s:
        return memory_s + exposed * compute_s
    return compute_s + exposed * memory_s


def roofline(chip: Chip, profile: Profile, nbytes: float, flops: float, tokens: float = 0) -> float:
    """The forward's roofline; `tokens` (its tokens, for prefill and mixed forwards) applies the compute ramp."""
    compute_s = flops / profile.flops(chip) * profile.ramp(chip, tokens)
    return overlapped(nbytes / profile.bandwidth(chip), compute_s, profile.exposed(chip))


# ----------------------------------------------------------------------------------------------- MoE work
def experts_touched(model: ModelSpec, tokens: float) -> float:
    """Expected distinct routed experts per MoE layer that a forward of `tokens` tokens touches.

    Uniform top-k routing over E experts: a given expert is missed by one token with probability 1 - k/E, by all T
    tokens (routed independently) with probability (1 - k/E)^T, so E (1 - (1 - k/E)^T) experts are touched
    (the occupancy expectation; DeepSpeed-MoE and the MoE-Lightning/MoE-Infinity papers use the same count for
    the experts a batch loads). 1 token touches k; a long chunk touches all E."""
    if not model.moe:
        return 0.0
    e, k = model.experts, model.active_experts
    return e * (1.0 - (1.0 - k / e) ** max(tokens, 1))


def _moe_layers(model: ModelSpec, start: int, end: int) -> int:
    return model._prefix["moe_layers"][end] - model._prefix["moe_layers"][start] if model.moe else 0


def read_bytes(model: ModelSpec, profile: Profile | None, start: int, end: int, tokens: float = 1) -> float:
    """Weight bytes one forward of `tokens` tokens reads over layers [start, end), in dense-read equivalents:
    the dense part, plus the experts those tokens touch at 1/expert_eta (a gather of scattered expert matrices
    streams slower than one dense matrix; expert_eta 1: as fast). A dense model: every weight, once."""
    nbytes = model.decode_read_bytes(start, end, max(tokens, 1)) if model.moe else model.weight_bytes(start, end)
    eta = profile.expert_eta if profile is not None else 1.0
    if model.moe and eta != 1.0:
        nbytes += (1.0 / eta - 1.0) * (nbytes - model._range("dense", start, end))
    return nbytes


def expert_fill_flops(model: ModelSpec, profile: Profile | None, start: int, end: int, tokens: float) -> float:
    """Compute a forward of `tokens` tokens wastes on its routed experts' small GEMMs.

    Each touched expert (an expected E (1 - (1 - k/E)^T) per MoE layer and engine chunk) gets m = T k / touched
    of the chunk's tokens and pays min(expert_fill_tokens, m) tokens of compute on top: a GEMM tile is filled
    to its height whatever m is (about half a tile wasted on average once m is large), and below that an
    engine switches to mat-vec kernels, so the waste never exceeds the expert's own rows. A 512-token chunk
    over 256 experts (16 tokens each) thus runs at half the GEMM rate, a 4096-token one (128 each) near it,
    and a forward of a few tokens (decode-like) stays bandwidth-bound."""
    fill = profile.expert_fill_tokens if profile is not None else 0.0
    if not fill or not model.moe or tokens <= 0:
        return 0.0
    per_expert = 2.0 * 3 * model.hidden * model.moe_ffn
    wasted = 0.0
    for c in prefill_chunks(tokens, profile.prefill_chunk_tokens):
        touched = experts_touched(model, c)
        wasted += touched * min(fill, c * model.active_experts / touched)
    return wasted * per_expert * _moe_layers(model, start, end)


def prefill_read_bytes(model: ModelSpec, profile: Profile | None, start: int, end: int, tokens: int) -> float:
    """Weight bytes a prefill of `tokens` tokens reads. A MoE model: each of the engine's chunks (its physical
    batch, prefill_chunk_tokens) reads the dense part and the experts that chunk touches. A dense model: every
    weight once (its prefill is compute-bound at any chunk an engine uses, so the re-reads are not priced)."""
    if not model.moe:
        return model.weight_bytes(start, end)
    chunk = profile.prefill_chunk_tokens if profile is not None else 0.0
    return sum(read_bytes(model, profile, start, end, c) for c in prefill_chunks(tokens, chunk))


def prefill_chunks(tokens: int, chunk: float) -> list[int]:
    """The forwards an engine that prefills `chunk` tokens at a time splits a prompt into (0: one forward)."""
    c = int(chunk)
    if c <= 0 or tokens <= c:
        return [tokens]
    return [c] * (tokens // c) + ([tokens % c] if tokens % c else [])


def decode_time(chip: Chip, profile: Profile, model: ModelSpec, start: int, end: int, batch: int = 1,
                context_tokens: float = 0, tp: int = 1, with_head: bool = False) -> float:
    """One decode step of `batch` sequences (mean context `context_tokens`) over layers [start, end).

    tp > 1 shards the work over a tensor-parallel group (all-reduce time is added by the caller, who knows the link).
    with_head adds the final norm + output projection (the last stage's extra work).
    With attention apart, the KV reads and pair FLOPs leave the weights' roofline for attention's own.
    """
    apart = profile.attention_apart
    nbytes, flops = decode_work(model, start, end, batch, 0 if apart else context_tokens, tp, with_head, profile)
    t = roofline(chip, profile, nbytes, flops) + profile.overhead(chip, end - start, batch)
    if apart:
        kv, af = decode_attention_work(model, start, end, batch * context_tokens, tp)
        t += profile.attention_s(chip, kv, af)
    return t


def decode_attention_work(model: ModelSpec, start: int, end: int, ctx_sum: float, tp: int = 1) -> tuple[float, float]:
    """(KV bytes, pair FLOPs) of one decode step's attention over `ctx_sum` cached tokens (summed over the batch)."""
    return (ctx_sum * model.kv_bytes_per_token(start, end) / tp,
            ctx_sum * (end - start) * model._attn_flops_per_position() / tp)


def decode_work(model: ModelSpec, start: int, end: int, batch: int = 1, context_tokens: float = 0, tp: int = 1,
                with_head: bool = False, profile: Profile | None = None) -> tuple[float, float]:
    """(bytes read, FLOPs) of one decode step: what decode_time puts through the roofline (the profile, if
    given, for the MoE read efficiency)."""
    kv = batch * context_tokens * model.kv_bytes_per_token(start, end)
    nbytes = (read_bytes(model, profile, start, end, batch) + kv) / tp
    flops = model.decode_flops(start, end, batch, context_tokens) / tp
    if with_head:
        nbytes += model.head_bytes()
        flops += model.head_flops(batch)
    return nbytes, flops


def prefill_time(chip: Chip, profile: Profile, model: ModelSpec, start: int, end: int, tokens: int,
                 context_before: int = 0, tp: int = 1, with_head: bool = False) -> float:
    """Prefill `tokens` new tokens after `context_before` cached ones over layers [start, end), in one forward."""
    apart = profile.attention_apart
    nbytes, flops = prefill_work(model, start, end, tokens, context_before, tp, with_head, profile)
    t = roofline(chip, profile, nbytes, flops, tokens) + profile.overhead(chip, end - start)
    if apart:
        t += profile.attention_s(chip, *prefill_attention_work(model, start, end, tokens, context_before, tp))
    return t


def request_prefill_time(chip: Chip, profile: Profile, model: ModelSpec, start: int, end: int, tokens: int,
                         context_before: int = 0, tp: int = 1, with_head: bool = False) -> float:
    """A request's prefill as its engine runs it: prefill_time plus the engine's fixed per-request cost (the TTFT
    floor: tokenising, scheduling, the first round trip) when nothing was cached before it."""
    return prefill_time(chip, profile, model, start, end, tokens, context_before, tp, with_head) + (
        profile.request_overhead_s if context_before == 0 else 0.0)


def prefill_attention_work(model: ModelSpec, start: int, end: int, tokens: int, context_before: int = 0,
                           tp: int = 1) -> tuple[float, float]:
    """(KV bytes, pair FLOPs) of a prefill's causal attention: each new token against the cached ones and those
    before it (the KV of every position read once)."""
    pairs = tokens * context_before + tokens * (tokens + 1) / 2
    return ((context_before + tokens) * model.kv_bytes_per_token(start, end) / tp,
            pairs * (end - start) * model._attn_flops_per_position() / tp)


def prefill_work(model: ModelSpec, start: int, end: int, tokens: int, context_before: int = 0, tp: int = 1,
                 with_head: bool = False, profile: Profile | None = None) -> tuple[float, float]:
    """(bytes, FLOPs) of a prefill: what prefill_time puts through the roofline. With a profile: a MoE model
    reads only the experts the chunk touches (at expert_eta) and pays their GEMM fill; with attention apart,
    the KV reads and pair FLOPs are left to attention's own roofline."""
    apart = profile is not None and profile.attention_apart
    weights = prefill_read_bytes(model, profile, start, end, tokens) if profile is not None \
        else model.weight_bytes(start, end)
    kv = 0.0 if apart else (context_before + tokens) * model.kv_bytes_per_token(start, end)
    nbytes = (weights + kv) / tp
    if apart:
        flops = model.decode_flops(start, end, tokens, 0) / tp
    else:
        flops = model.prefill_flops(start, end, tokens, context_before) / tp
    if profile is not None and model.moe:
        flops += expert_fill_flops(model, profile, start, end, tokens) / tp
    if with_head:  # only the last position's logits are needed
        nbytes += model.head_bytes()
        flops += model.head_flops(1)
    return nbytes, flops


TOKEN_ID_BYTES = 4   # what the last stage sends back to the first: one int32 per sequence


def link_transport(link: Link) -> str:
    """"rdma" for an RDMA link kind (Thunderbolt 5 verbs: MLX JACCL, exo's MlxJaccl), else "tcp" (MLX ring,
    llama.cpp RPC and exo's ring run over TCP on Thunderbolt bridges, Ethernet and Wi-Fi)."""
    return "rdma" if "rdma" in link.kind else "tcp"


def hop_latency_s(link: Link, profile: Profile) -> float:
    """A message's fixed cost over a link, by transport: TCP waits tcp_hop_latencies one-way latencies, RDMA its
    latency plus rdma_hop_overhead_us; both plus the profile's per-message software overhead."""
    if link_transport(link) == "rdma":
        us = link.latency_us + profile.rdma_hop_overhead_us
    else:
        us = link.latency_us * profile.tcp_hop_latencies
    return (us + profile.link_overhead_us) * 1e-6


def link_time(link: Link, nbytes: float, profile: Profile) -> float:
    """One message over a link: latency (by transport) + software overhead + serialisation."""
    return hop_latency_s(link, profile) + nbytes * 8 / (link.bandwidth_gbps * 1e9)


def allreduce_time(link: Link, nbytes: float, ranks: int, profile: Profile) -> float:
    """Ring all-reduce: 2(n-1) steps, each moving nbytes/n."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * link_time(link, nbytes / ranks, profile)


def load_time(nbytes: float, profile: Profile, ssd_gbs: float | None = None) -> float:
    """Reading weights from local SSD."""
    return nbytes / ((ssd_gbs or profile.ssd_gbs) * 1e9)


def decode_floor_s(chip: Chip, model: ModelSpec, start: int, end: int, tp: int = 1, with_head: bool = False) -> float:
    """Theoretical floor of one decode step: the bytes it must read at the chip's peak bandwidth, no efficiency
    factor, no overheads. Its inverse over a plan is the ceiling printed next to predictions."""
    nbytes = model.decode_read_bytes(start, end) / tp + (model.head_bytes() if with_head else 0.0)
    return nbytes / (chip.mem_bw_gbs * 1e9)


# ----------------------------------------------------------------------------------------------- plan options
OBJECTIVES = {
    "latency": "time per output token of one stream: every stage's decode step plus every hop, in ring order (ms)",
    "throughput": "pipeline bottleneck: the slowest stage's decode step plus its outgoing hop (ms); "
                  "its inverse is the steady token rate with one micro-batch per stage in flight",
    "goodput": "pipeline time per request at the workload's lengths: its prefill on every stage plus its "
               "batched decode steps at the bottleneck (ms); its inverse is the plan's sustainable request rate",
}


@dataclass(frozen=True)
class PlanOptions:
    """What a plan is scored on: the profile, the objective, and the reference stream it predicts."""
    profile: Profile
    objective: str = "latency"
    kv_reserve_tokens: int = 8192   # KV cache each stage keeps free for its layers (one 8k context by default)
    context_tokens: int = 1024      # mean context assumed when predicting a decode step
    prompt_tokens: int = 512        # reference prompt for the predicted TTFT
    output_tokens: int = 128        # reference output, to weigh prefill against decode
    arrival_rate_rps: float = 0.0   # the workload's arrival rate (requests/s) the plan is judged against; 0 = unknown
    max_num_seqs: int = 128         # the engine's sequences per micro-batch (sim.engine.EngineConfig)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        for name in ("kv_reserve_tokens", "context_tokens", "prompt_tokens", "output_tokens", "arrival_rate_rps"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_num_seqs < 1 or self.output_tokens < 1:
            raise UserError(f"max_num_seqs and output_tokens must be >= 1, got {self.max_num_seqs} and "
                            f"{self.output_tokens}")

    @property
    def request_tokens(self) -> int:
        """KV tokens one request holds at its end: its prompt plus its output."""
        return self.prompt_tokens + self.output_tokens

    @property
    def mean_decode_context(self) -> float:
        """Mean context a request's decode steps read: from its prompt to prompt + output."""
        return self.prompt_tokens + self.output_tokens / 2


# ----------------------------------------------------------------------------------------------- links of a plan
def slowest_link(links, nbytes: float, profile: Profile) -> Link | None:
    """The link a message of `nbytes` takes longest to cross (latency + overhead + bytes/bandwidth). Which one
    that is depends on the size: small messages wait for the longest latency, large ones for the narrowest pipe."""
    return max(links, key=lambda link: link_time(link, nbytes, profile), default=None)


def group_links(cluster: Cluster, nodes: tuple[str, ...]) -> tuple[Link, ...]:
    """Every link inside a tensor-parallel group (none for a single node)."""
    return tuple(cluster.link(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1:])


def group_allreduce_time(links, nbytes: float, ranks: int, profile: Profile) -> float:
    """Ring all-reduce inside a group: every step moves nbytes/ranks and waits for the slowest link at that size."""
    if ranks <= 1:
        return 0.0
    return allreduce_time(slowest_link(links, nbytes / ranks, profile), nbytes, ranks, profile)


def hop_link(cluster: Cluster, src: tuple[str, ...], dst: tuple[str, ...]) -> Link:
    """Activations leave a stage from its first member and arrive at the next stage's first member."""
    return cluster.link(src[0], dst[0])


def hop_links(cluster: Cluster, stages) -> tuple[list[Link], Link | None]:
    """Forward links between consecutive stages, and the link carrying token ids from the last stage back to
    the first (None for a single stage)."""
    fwd = [hop_link(cluster, a.nodes, b.nodes) for a, b in zip(stages, stages[1:])]
    back = hop_link(cluster, stages[-1].nodes, stages[0].nodes) if len(stages) > 1 else None
    return fwd, back


# ----------------------------------------------------------------------------------------------- stages
def stage_memory_bytes(model: ModelSpec, start: int, end: int, tp: int = 1, kv_tokens: float = 0) -> float:
    """Per member node: its 1/tp share of the layers and of their KV for `kv_tokens` tokens, plus a full copy of
    embeddings and output head (mlx-lm's pipeline keeps both on every rank and every rank computes the logits)."""
    layers = model.weight_bytes(start, end) + kv_tokens * model.kv_bytes_per_token(start, end)
    return layers / tp + model.embed_bytes() + model.head_bytes()


@dataclass(frozen=True)
class DecodeTerms:
    """One stage's decode step for one batch size, affine in the batch's summed context inside the roofline:
    t = max over members of overlapped((nbytes + ctx x kv_bytes) / bw, (flops + ctx x attn_flops) / fl) + fixed,
    overlapped(m, c) = max(m, c) + exposed x min(m, c) with exposed = 1 - the member's overlap."""
    nbytes: float
    flops: float
    kv_bytes: float                                   # bytes read per token of context, per member
    attn_flops: float                                 # FLOPs per token of context, per member
    # per member: (bytes/s, FLOP/s, exposed share 1 - overlap, overhead + all-reduce s)
    members: tuple[tuple[float, float, float, float], ...]
    # attention apart (Profile.attention_apart): per member, seconds of attention per token of summed context
    # (its own roofline is linear in the context); then kv_bytes and attn_flops are 0. Empty: inside the roofline
    attn_s_per_ctx: tuple[float, ...] = ()

    def at(self, ctx_sum: float) -> float:
        if self.attn_s_per_ctx:
            return max(overlapped(self.nbytes / bw, self.flops / fl, exposed) + fixed + ctx_sum * a
                       for (bw, fl, exposed, fixed), a in zip(self.members, self.attn_s_per_ctx))
        b, f = self.nbytes + ctx_sum * self.kv_bytes, self.flops + ctx_sum * self.attn_flops
        bw, fl, exposed, fixed = self.members[0]   # no max() over a generator: this runs per stage per engine step
        t = overlapped(b / bw, f / fl, exposed) + fixed
        for bw, fl, exposed, fixed in self.members[1:]:
            t = max(t, overlapped(b / bw, f / fl, exposed) + fixed)
        return t

    def vector(self, ctx_sums: np.ndarray) -> np.ndarray:
        """`at` for many summed contexts at once (fast-forwarding steady decode)."""
        if self.attn_s_per_ctx:
            return np.max([overlapped(self.nbytes / bw, self.flops / fl, exposed) + fixed + ctx_sums * a
                           for (bw, fl, exposed, fixed), a in zip(self.members, self.attn_s_per_ctx)], axis=0)
        b, f = self.nbytes + ctx_sums * self.kv_bytes, self.flops + ctx_sums * self.attn_flops
        return np.max([_overlapped_vector(b / bw, f / fl, exposed) + fixed for bw, fl, exposed, fixed in self.members],
                      axis=0)


def _overlapped_vector(memory_s: np.ndarray, compute_s: np.ndarray, exposed: float) -> np.ndarray:
    roof = np.maximum(memory_s, compute_s)
    return roof + exposed * np.minimum(memory_s, compute_s) if exposed else roof


@dataclass(frozen=True)
class StageModel:
    """One pipeline stage: a node, or a tensor-parallel group whose members each hold 1/tp of the layers and
    step in lockstep, so every step lasts as long as its slowest member's share plus the group's all-reduces."""
    index: int
    nodes: tuple[str, ...]
    chips: tuple[Chip, ...]       # each member's chip, in the order of nodes
    start: int
    end: int
    last: bool                    # the last stage also runs the final norm and the output head
    tp_links: tuple[Link, ...]    # every link inside the group (empty without tensor parallelism)
    kv_bytes_per_token_node: float   # KV bytes per cached token on each member node
    weight_bytes_node: float      # bytes each member node loads
    # every rank of a real pipeline computes the output head at once (mlx-lm all-gathers the last hidden state),
    # so where k ranks are pinned to one CPU core the head takes k times as long: the shared-cores term
    head_share: int = 1

    @property
    def tp(self) -> int:
        return len(self.nodes)

    def _slowest(self, profile: Profile, nbytes: float, flops: float, tokens: float = 0, seqs: int = 1) -> float:
        """The lockstep step: the slowest member's roofline (compute ramp at `tokens`) plus its overhead for
        `seqs` sequences."""
        layers = self.end - self.start
        return max(roofline(c, profile, nbytes, flops, tokens) + profile.overhead(c, layers, seqs) for c in self.chips)

    def decode_s(self, model: ModelSpec, profile: Profile, batch: int, ctx_sum: float) -> float:
        """One decode step of `batch` sequences whose KV reads sum to `ctx_sum` tokens."""
        return self.decode_terms(model, profile, batch).at(ctx_sum)

    def decode_terms(self, model: ModelSpec, profile: Profile, batch: int) -> DecodeTerms:
        """The decode step of `batch` sequences as a function of their summed context (the simulator's hot loop
        caches these per batch size)."""
        s, e, tp = self.start, self.end, self.tp
        nbytes, flops = decode_work(model, s, e, batch, 0, tp, self.last, profile)
        nbytes, flops = nbytes + self._shared_head_bytes(model), flops + self._shared_head_flops(model, batch)
        fixed = self.allreduce_s(model, profile, batch)
        # the batch scale stretches a member's whole step but its all-reduces (overlapped() is homogeneous, so
        # dividing the rates by it scales the roofline)
        scales = [profile.batch_scale(c, batch) for c in self.chips]
        members = tuple((profile.bandwidth(c) / k, profile.flops(c) / k, profile.exposed(c),
                         k * profile.overhead(c, e - s, batch) + fixed) for c, k in zip(self.chips, scales))
        kv, af = decode_attention_work(model, s, e, 1.0, tp)
        if profile.attention_apart:
            rates = tuple(k * profile.attention_s(c, kv, af) for c, k in zip(self.chips, scales))
            return DecodeTerms(nbytes, flops, 0.0, 0.0, members, rates)
        return DecodeTerms(nbytes, flops, kv, af, members)

    def prefill_s(self, model: ModelSpec, profile: Profile, tokens: int, ctx_before: int, seqs: int = 1) -> float:
        """A prefill forward of `tokens` new tokens (over `seqs` sequences, e.g. a padded prompt batch) after
        `ctx_before` cached ones."""
        nbytes, flops = self.prefill_work(model, tokens, ctx_before, seqs, profile)
        t = self._slowest(profile, nbytes, flops, tokens, seqs) + self.allreduce_s(model, profile, tokens)
        if profile.attention_apart:
            kv, af = prefill_attention_work(model, self.start, self.end, tokens, ctx_before, self.tp)
            t += max(profile.attention_s(c, kv, af) for c in self.chips)
        return t + self._request_s(profile, [ctx_before])

    def _request_s(self, profile: Profile, contexts) -> float:
        """The engine's fixed per-request cost, paid by the first stage for every chunk that starts a request
        (nothing cached before it)."""
        if not profile.request_overhead_s or self.index != 0:
            return 0.0
        return profile.request_overhead_s * sum(1 for c in contexts if c == 0)

    def prefill_work(self, model: ModelSpec, tokens: int, ctx_before: int, seqs: int = 1,
                     profile: Profile | None = None) -> tuple[float, float]:
        """(bytes, FLOPs) per member of the prefill forward prefill_s prices (the profile, for the MoE terms and
        attention apart)."""
        nbytes, flops = prefill_work(model, self.start, self.end, tokens, ctx_before, self.tp, self.last, profile)
        if self.last and seqs > 1:   # every sequence's last position gets its logits
            flops += model.head_flops(seqs) - model.head_flops(1)
        return nbytes + self._shared_head_bytes(model), flops + self._shared_head_flops(model, seqs)

    def _shared_head_bytes(self, model: ModelSpec) -> float:
        """The head's extra reads where head_share ranks time-share a core (0 on a last stage of its own)."""
        return (self.head_share - 1) * model.head_bytes() if self.last else 0.0

    def _shared_head_flops(self, model: ModelSpec, seqs: int) -> float:
        return (self.head_share - 1) * model.head_flops(seqs) if self.last else 0.0

    def mixed_s(self, model: ModelSpec, profile: Profile, n_dec: int, dec_ctx_sum: float,
                chunks: list[tuple[int, int]]) -> float:
        """A step mixing decodes and prefill chunks (tokens, context before) reads the weights once: one roofline
        over the summed work. Reduces exactly to decode_s / prefill_s when only one kind is present."""
        if not chunks:
            return self.decode_s(model, profile, n_dec, dec_ctx_sum)
        if n_dec == 0 and len(chunks) == 1:
            return self.prefill_s(model, profile, *chunks[0])
        s, e, kvpt = self.start, self.end, model.kv_bytes_per_token(self.start, self.end)
        tokens = n_dec + sum(t for t, _ in chunks)
        weights = prefill_read_bytes(model, profile, s, e, tokens)   # dense: weight_bytes, i.e. decode_read_bytes
        if profile.attention_apart:   # attention over the context leaves the weights' roofline
            kv, af = decode_attention_work(model, s, e, dec_ctx_sum)
            work = [prefill_attention_work(model, s, e, t, c) for t, c in chunks]
            kv, af = kv + sum(w[0] for w in work), af + sum(w[1] for w in work)
            nbytes = weights
            flops = model.decode_flops(s, e, 1, 0) * n_dec + sum(model.decode_flops(s, e, t, 0) for t, _ in chunks)
        else:
            nbytes = weights + (dec_ctx_sum + sum(c + t for t, c in chunks)) * kvpt
            flops = model.decode_flops(s, e, 1, 0) * n_dec + dec_ctx_sum * (e - s) * model._attn_flops_per_position()
            flops += sum(model.prefill_flops(s, e, t, c) for t, c in chunks)
        if model.moe:
            flops += expert_fill_flops(model, profile, s, e, tokens)
        nbytes, flops = nbytes / self.tp, flops / self.tp
        if self.last:
            nbytes += self.head_share * model.head_bytes()
            flops += self.head_share * model.head_flops(n_dec + len(chunks))
        t = self._slowest(profile, nbytes, flops, tokens, n_dec + len(chunks)) + self.allreduce_s(model, profile, tokens)
        if profile.attention_apart:
            t += max(profile.attention_s(c, kv / self.tp, af / self.tp) for c in self.chips)
        return t + self._request_s(profile, [c for _, c in chunks])

    def allreduce_s(self, model: ModelSpec, profile: Profile, tokens: int) -> float:
        """Every layer's all-reduces for `tokens` tokens' hidden states."""
        return (self.end - self.start) * self.allreduce_per_layer_s(model, profile, tokens)

    def allreduce_per_layer_s(self, model: ModelSpec, profile: Profile, tokens: int) -> float:
        """Tensor parallelism costs two all-reduces of the hidden states per layer (after attention, after the MLP)."""
        return 2 * group_allreduce_time(self.tp_links, model.activation_bytes(tokens), self.tp, profile)


def stage_model(cluster: Cluster, model: ModelSpec, nodes: tuple[str, ...], start: int, end: int, last: bool,
                index: int = 0, head_share: int = 1) -> StageModel:
    """The StageModel of layers [start, end) on `nodes` (one node, or a tensor-parallel group)."""
    tp = len(nodes)
    return StageModel(index=index, nodes=tuple(nodes), chips=tuple(cluster.node(n).chip for n in nodes),
                      start=start, end=end, last=last, tp_links=group_links(cluster, tuple(nodes)),
                      kv_bytes_per_token_node=model.kv_bytes_per_token(start, end) / tp,
                      weight_bytes_node=stage_memory_bytes(model, start, end, tp), head_share=head_share)


def head_share(cluster: Cluster, plan: PartitionPlan) -> int:
    """Most of the plan's ranks pinned to one CPU core (nodes' cpu_core; 1 where none is shared): they all
    compute the output head at the same time."""
    cores = [cluster.node(n).cpu_core for st in plan.stages for n in st.nodes]
    labelled = [c for c in cores if c is not None]
    return max((labelled.count(c) for c in labelled), default=1)


def stage_models(cluster: Cluster, model: ModelSpec, plan: PartitionPlan) -> tuple[StageModel, ...]:
    """StageModels of a plan in layer order; checks that the plan matches the model and names known nodes."""
    if plan.num_layers != model.num_layers:
        raise UserError(f"plan covers {plan.num_layers} layers but {model.name} has {model.num_layers}")
    problems = [p for p in plan.problems() if "needs" not in p]  # memory is the simulator's KV pool's business
    if problems:
        raise UserError("invalid plan: " + "; ".join(problems))
    known = {n.name for n in cluster.nodes}
    unknown = [(i, n) for i, st in enumerate(plan.stages) for n in st.nodes if n not in known]
    if unknown:
        i, n = unknown[0]
        raise UserError(f"plan stage {i} names node {n!r} which is not in cluster {cluster.name}")
    k, share = len(plan.stages), head_share(cluster, plan)
    return tuple(stage_model(cluster, model, st.nodes, st.layer_start, st.layer_end, i == k - 1, i, share)
                 for i, st in enumerate(plan.stages))


# ----------------------------------------------------------------------------------------------- capacity
def kv_room_tokens(cluster: Cluster, stage: StageModel) -> float:
    """KV tokens a stage can cache beside its weights: its slowest-to-fill member decides (sim.costs agrees)."""
    usable = min(cluster.node(n).usable_bytes for n in stage.nodes)
    return max(usable - stage.weight_bytes_node, 0.0) / stage.kv_bytes_per_token_node


def batch_bound(kv_tokens: float, stages: int, options: PlanOptions) -> int:
    """Largest micro-batch the plan can run: one micro-batch per stage is in flight and every stage caches all
    of them, each sequence up to its full prompt + output; never above the engine's max_num_seqs."""
    return int(min(options.max_num_seqs, kv_tokens // (stages * options.request_tokens)))


def step_hops_s(cluster: Cluster, model: ModelSpec, stages, batch: int, profile: Profile) -> list[float]:
    """Each stage's outgoing hop for a micro-batch of `batch` sequences: activations forward, token ids back."""
    fwd, back = hop_links(cluster, stages)
    hops = [link_time(link, model.activation_bytes(batch), profile) for link in fwd]
    return hops + [link_time(back, TOKEN_ID_BYTES * batch, profile) if back else 0.0]


def request_pipeline_s(cluster: Cluster, model: ModelSpec, stages, options: PlanOptions, batch: int) -> float:
    """Seconds of pipeline time one request costs at micro-batch `batch` (theoretical):

    * its prompt's prefill on every stage, summed: the prompt's chunk crosses the stages one after another and
      each stage serves its micro-batches in order, so the decodes of every other micro-batch queue behind it
      stage after stage; while prompts arrive one at a time, prefills do not overlap (the simulator agrees);
    * its output_tokens decode steps at the bottleneck: decode micro-batches do overlap, one per stage in
      flight, so `batch` sequences get a token per slowest stage step plus its outgoing hop.
    """
    return _prefill_sum_s(model, stages, options) + _decode_share_s(cluster, model, stages, options, batch)


def _prefill_sum_s(model: ModelSpec, stages, options: PlanOptions) -> float:
    """The reference prompt's prefill on every stage, summed (the same at every micro-batch size)."""
    return sum(st.prefill_s(model, options.profile, options.prompt_tokens, 0) for st in stages)


def _decode_share_s(cluster: Cluster, model: ModelSpec, stages, options: PlanOptions, batch: int) -> float:
    """One request's share of output_tokens bottleneck decode steps (with hop) at micro-batch `batch`."""
    hops = step_hops_s(cluster, model, stages, batch, options.profile)
    ctx_sum = batch * options.mean_decode_context
    step = max(st.decode_s(model, options.profile, batch, ctx_sum) + h for st, h in zip(stages, hops))
    return options.output_tokens * step / batch


def sustainable_rate_rps(cluster: Cluster, model: ModelSpec, stages, options: PlanOptions) -> float:
    """Requests/s at which the plan saturates (theoretical): 1 / request_pipeline_s at the best micro-batch the
    KV memory allows. 0 when not even one sequence per stage fits beside the weights."""
    bound = batch_bound(min(kv_room_tokens(cluster, st) for st in stages), len(stages), options)
    if bound < 1:
        return 0.0
    # the prefill sum does not depend on the batch: computed once, not once per candidate size
    shares = [_decode_share_s(cluster, model, stages, options, b) for b in range(1, bound + 1)]
    return 1.0 / (_prefill_sum_s(model, stages, options) + min(shares))


CONCURRENCY_LEVELS = (1, 4, 16, 64)


def decode_steps_s(cluster: Cluster, model: ModelSpec, stages, profile: Profile, batch: int,
                   context_tokens: float) -> list[float]:
    """Each stage's decode step for a micro-batch of `batch` sequences of `context_tokens` each, with its
    outgoing hop (activations forward, token ids back from the last)."""
    hops = step_hops_s(cluster, model, stages, batch, profile)
    return [st.decode_s(model, profile, batch, batch * context_tokens) + h for st, h in zip(stages, hops)]


def pipeline_round_s(step_s, micro_batches: int) -> float:
    """One token round of steady pipelined decode: the longer of one micro-batch's trip through every stage
    (each step with its outgoing hop) and the bottleneck stage serving every micro-batch in turn."""
    return max(sum(step_s), micro_batches * max(step_s))


def concurrent_decode(cluster: Cluster, model: ModelSpec, stages, options: PlanOptions, users: int) -> dict:
    """Steady decode with `users` streams at once (theoretical), each at the plan's decode context
    (context_tokens, so one user gets the plan's own ms/token) and holding a request's full prompt + output in
    KV on every stage (whether they fit); they are split into one micro-batch per stage (fewer when there are fewer users),
    so a token round is the longer of one micro-batch's trip through every stage and the bottleneck stage
    serving every micro-batch. {users, fits, round_s, per_stream_tok_s, aggregate_tok_s, kv_tokens_needed}."""
    room = min(kv_room_tokens(cluster, st) for st in stages)
    needed = users * options.request_tokens
    micro = min(len(stages), users)
    batch = -(-users // micro)
    round_s = pipeline_round_s(decode_steps_s(cluster, model, stages, options.profile, batch,
                                              options.context_tokens), micro)
    return {"users": users, "fits": needed <= room, "round_s": round_s, "per_stream_tok_s": 1.0 / round_s,
            "aggregate_tok_s": users / round_s, "kv_tokens_needed": needed, "kv_tokens_room": room}
