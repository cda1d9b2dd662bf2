"""Frozen data for the whole harness: chips, nodes, links, clusters, models and partition plans.

Everything here is plain data plus the arithmetic that follows from it (parameter counts, bytes per layer,
KV bytes per token, FLOPs). No I/O except the loaders at the bottom, which read JSON files and either return
a complete object or raise UserError naming the file, the field and what was expected.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: printed as one clear line by the CLI, never a traceback."""


class DoesNotFit(UserError):
    """The model (with its KV reserve) needs more memory than the nodes offer."""


def join_key(path: str, key: str | int) -> str:
    """A key path as users read it: `[load].warmup`, `nodes[1].chip`, `arrival.rate` (`path` may be empty)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def reject_unknown(data, allowed, origin: str, path: str = "") -> None:
    """Raise UserError when `data` is not a table or holds a key outside `allowed`, naming the file (`origin`),
    the key path and the nearest valid key: a typo must never fall back silently to a default.
    Keys starting with "_" are notes (JSON has no comments), e.g. "_about"."""
    allowed = tuple(allowed)
    if not isinstance(data, dict):
        raise UserError(f"{origin}: {path or 'the file'} must be a table with keys {', '.join(allowed)}; got {data!r}")
    unknown = [k for k in data if not (isinstance(k, str) and k.startswith("_")) and k not in allowed]
    if unknown:
        named = "; ".join(f"'{join_key(path, k)}'" + did_you_mean(str(k), allowed) for k in unknown)
        scope = f" in {path}" if path else ""
        raise UserError(f"{origin}: unknown key {named} (known keys{scope}: {', '.join(allowed) or 'none'})")


def did_you_mean(word: str, choices) -> str:
    """`, did you mean 'x'?` for the choice nearest a misspelt word, or "" when none is near."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f", did you mean '{close[0]}'?" if close else ""


GIB = 1024**3
GB = 1e9

# Bounds on what an input file may ask for, so an absurd value is refused before any table is built
# (a per-layer table of 10**9 layers is 7 GB). Each is far above any real model or cluster of Macs.
MAX_LAYERS = 1024              # the largest released models have about 130
MAX_HIDDEN = 1 << 20
MAX_HEADS = 1 << 14
MAX_WIDTH = 1 << 24            # MLP widths and vocabularies
MAX_EXPERTS = 1 << 14
MAX_NODES = 256                # a cluster file's nodes; links are a full mesh, so this bounds them too
MAX_FILE_BYTES = 64 << 20      # any JSON or TOML input file


def shown(value) -> str:
    """A found value as an error message quotes it: repr, cut short so a huge list still gives one line."""
    try:
        text = repr(value)
    except ValueError:          # an int too long for repr (Python refuses > 4300 digits)
        text = "an integer of thousands of digits"
    return text if len(text) <= 60 else text[:57] + "..."


def integer_in(value, where: str, low: int, high: int, why: str = "") -> int:
    """`value` when it is an int (not a bool) within [low, high], else UserError naming where, found, allowed."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{where}: found {shown(value)}; allowed: an integer from {low} to {high}{why}")
    return value


def number_in(value, where: str, low: float = 0.0, high: float = math.inf, low_open: bool = True) -> float:
    """`value` as a float when it is a finite number (not a bool) above low (or at it, low_open=False) and at
    most high, else UserError."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        top = f" and <= {high:g}" if math.isfinite(high) else ""
        raise UserError(f"{where}: found {shown(value)}; allowed: a finite number {bound}{top}")
    return float(value)


def of_type(value, kind: type, where: str, allowed: str):
    """`value` when it is an instance of `kind` (a bool is not an int), else UserError naming what is allowed."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}: found {shown(value)}; allowed: {allowed}")
    return value


# ----------------------------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Chip:
    name: str                 # "M2 Ultra"
    gpu_bin: str              # "76-core GPU"
    gpu_cores: int
    mem_bw_gbs: float         # Apple's theoretical peak, 1e9 bytes/s
    fp16_tflops: float        # peak GPU ALU rate (FP16 == FP32 on M1-M4)
    max_mem_gb: float
    thunderbolt: str          # "Thunderbolt 5 (...)" etc; decides RDMA
    tflops_assumed: bool = False  # True where the source gives no TFLOPS and the catalog estimated it

    @property
    def rdma(self) -> bool:
        return "Thunderbolt 5" in self.thunderbolt

    @property
    def label(self) -> str:
        return f"{self.name} {self.gpu_cores}c"


@dataclass(frozen=True)
class Node:
    name: str
    chip: Chip
    memory_gb: float
    usable_fraction: float    # share of RAM the GPU may wire (macOS limit; raise it with iogpu.wired_limit_mb)
    ssd_gbs: float | None = None   # local SSD read rate; None = the profile's default
    host: str | None = None   # address for real runs
    role: str | None = None
    cpu_core: str | None = None   # the CPU core a rank is pinned to; ranks naming the same one time-share it

    @property
    def usable_bytes(self) -> float:
        return self.memory_gb * GB * self.usable_fraction


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    kind: str                 # "tb5-rdma" | "tb5-tcp" | "tb4-tcp" | "10gbe" | "2.5gbe" | "1gbe" | "wifi" | "loopback"
    latency_us: float         # one-way
    bandwidth_gbps: float     # effective, 1e9 bits/s

    @property
    def rdma(self) -> bool:
        return self.kind.endswith("rdma")


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]   # one per unordered pair; ring order belongs to the plan

    @cached_property
    def _by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    @cached_property
    def _links(self) -> dict[frozenset, Link]:
        return {frozenset((l.a, l.b)): l for l in self.links}

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def link(self, a: str, b: str) -> Link:
        return self._links[frozenset((a, b))]

    @property
    def total_usable_bytes(self) -> float:
        return sum(n.usable_bytes for n in self.nodes)


# ----------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers from an HF / mlx-lm config.json, plus the quantization it is served at."""

    name: str
    model_type: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int                          # dense MLP width
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    # mixture of experts (0 experts = dense)
    experts: int = 0
    active_experts: int = 0
    moe_ffn: int = 0
    shared_experts: int = 0
    shared_ffn: int = 0               # width of the shared expert(s), when not moe_ffn
    dense_layers: tuple[int, ...] = ()  # layer indices with a dense MLP in an MoE model
    # multi-head latent attention (DeepSeek V2/V3): KV cache holds the compressed latent
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # serving precision
    quant_bits: int | float = 16      # 16 = unquantized half precision; a fraction = bits per weight, scales included
    group_size: int = 64
    high_bits: int = 0                # mixed quant (mixed:quant_bits/high_bits); 0 = every matrix at quant_bits
    kv_bytes_per_value: int = 2       # fp16 KV cache

    # --- derived quantities -------------------------------------------------------------------
    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def bits_per_weight(self) -> float:
        """Quantized weights carry a 16-bit scale and bias per group (mlx affine quantization); 16 and 32 are
        unquantized half and single precision (the latter for models run on a CPU). A fractional quant_bits is
        bits per weight as llama.cpp and unsloth quote it, scales already included, so it is returned as is.
        In a mixed quant this is the low bits' figure; the matrices the recipe raises use `high_bits_per_weight`."""
        if self.quant_bits >= 16 or not float(self.quant_bits).is_integer():
            return float(self.quant_bits)
        return self.quant_bits + 32.0 / self.group_size

    @property
    def high_bits_per_weight(self) -> float:
        """Bits per weight of the matrices a mixed quant keeps at its high bits (the low figure when not mixed)."""
        return self.high_bits + 32.0 / self.group_size if self.high_bits else self.bits_per_weight

    @property
    def quant(self) -> int | float | str:
        """The quantization as a user writes it and as run records store it: 4, 4.5 or "mixed:4/6"."""
        return f"mixed:{self.quant_bits}/{self.high_bits}" if self.high_bits else self.quant_bits

    def _raised_by_mixed_recipe(self, i: int) -> bool:
        """Whether mlx-lm's mixed recipe (mlx_lm/convert.py, mixed_quant_predicate_builder) gives layer i's
        value and down projections the high bits: the first and last eighth of the layers, and every third
        layer in between."""
        n = self.num_layers
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    def _value_proj_params(self) -> int:
        """Params of the projections mlx-lm's recipe matches as "v_proj" / "v_a_proj": v_proj, or with MLA
        kv_a_proj_with_mqa (whose name contains "v_a_proj")."""
        if self.mla:
            return self.hidden * (self.kv_lora_rank + self.qk_rope_head_dim)
        return self.hidden * self.kv_heads * self.head_dim

    def _raised_bytes(self, i: int, params: float) -> float:
        """Bytes the mixed recipe adds to `params` weights of layer i by storing them at the high bits."""
        if not self.high_bits or not self._raised_by_mixed_recipe(i):
            return 0.0
        return params * (self.high_bits_per_weight - self.bits_per_weight) / 8

    def _attention_params(self) -> tuple[int, int]:
        """(matrix params, small params) of one attention block."""
        h = self.hidden
        if self.mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.heads * qk) if self.q_lora_rank else h * self.heads * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv += self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
            o = self.heads * self.v_head_dim * h
            small = self.q_lora_rank + self.kv_lora_rank
            return q + kv + o, small
        q = h * self.heads * self.head_dim
        kv = 2 * h * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * h
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return q + kv + o, bias

    def _is_moe_layer(self, i: int) -> bool:
        return self.moe and i not in self.dense_layers

    @cached_property
    def _layer_table(self) -> tuple[tuple[float, float, float, float], ...]:
        """Per layer: (params, stored bytes, dense bytes read per token, bytes of one routed expert)."""
        h, wbits = self.hidden, self.bits_per_weight
        attn, attn_small = self._attention_params()
        norms = 2 * h
        rows = []
        for i in range(self.num_layers):
            if self._is_moe_layer(i):
                expert = 3 * h * self.moe_ffn
                shared = 3 * h * (self.shared_ffn or self.moe_ffn) * self.shared_experts
                router = h * self.experts
                params = attn + attn_small + norms + router + shared + self.experts * expert
                dense_part = (attn + shared) * wbits / 8 + (attn_small + norms + router) * 2
                expert_bytes = expert * wbits / 8
                if self.high_bits:    # a down projection is a third of each MLP
                    dense_part += self._raised_bytes(i, self._value_proj_params() + shared / 3)
                    expert_bytes += self._raised_bytes(i, expert / 3)
                stored = dense_part + self.experts * expert_bytes
                rows.append((params, stored, dense_part, expert_bytes))
            else:
                mlp = 3 * h * self.ffn
                params = attn + attn_small + norms + mlp
                stored = (attn + mlp) * wbits / 8 + (attn_small + norms) * 2
                if self.high_bits:
                    stored += self._raised_bytes(i, self._value_proj_params() + mlp / 3)
                rows.append((params, stored, stored, 0.0))
        return tuple(rows)

    @cached_property
    def _prefix(self) -> dict[str, list[float]]:
        """Prefix sums over layers, so any stage's totals cost O(1)."""
        cols = {"params": 0, "stored": 1, "dense": 2, "expert": 3}
        out = {}
        for key, c in cols.items():
            acc, run = [0.0], 0.0
            for row in self._layer_table:
                run += row[c]
                acc.append(run)
            out[key] = acc
        moe_count, run = [0], 0
        for i in range(self.num_layers):
            run += self._is_moe_layer(i)
            moe_count.append(run)
        out["moe_layers"] = moe_count
        return out

    def _range(self, key: str, start: int, end: int) -> float:
        p = self._prefix[key]
        return p[end] - p[start]

    def layer_params(self, start: int = 0, end: int | None = None) -> float:
        return self._range("params", start, self.num_layers if end is None else end)

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    @property
    def total_params(self) -> float:
        return self.layer_params() + self.embed_params() + self.head_params() + self.hidden

    @property
    def active_params(self) -> float:
        """Parameters touched per token (routed experts counted k of E)."""
        return self._active_layer_params(0, self.num_layers) + self.embed_params() + self.head_params() + self.hidden

    def weight_bytes(self, start: int, end: int) -> float:
        """Bytes stored for layers [start, end)."""
        return self._range("stored", start, end)

    def embed_bytes(self) -> float:
        return self.embed_params() * self.bits_per_weight / 8

    def _head_bits(self) -> float:
        """mlx-lm's mixed recipe gives lm_head the high bits; a tied head is the embedding, at the low bits."""
        return self.bits_per_weight if self.tie_embeddings else self.high_bits_per_weight

    def head_bytes(self) -> float:
        """The output projection (the embedding matrix again when tied) plus the final norm."""
        return self.vocab * self.hidden * self._head_bits() / 8 + self.hidden * 2

    def total_weight_bytes(self) -> float:
        tied = 0 if self.tie_embeddings else self.vocab * self.hidden * self._head_bits() / 8
        return self.weight_bytes(0, self.num_layers) + self.embed_bytes() + tied + self.hidden * 2

    def decode_read_bytes(self, start: int, end: int, batch: int = 1) -> float:
        """Weight bytes one decode step reads for layers [start, end), batch sequences at once.

        With E experts and k routed per token, a batch of B tokens touches on average
        E * (1 - (1 - k/E)^B) distinct experts per MoE layer (uniform routing).
        """
        dense = self._range("dense", start, end)
        if not self.moe:
            return dense
        touched = self.experts * (1.0 - (1.0 - self.active_experts / self.experts) ** max(batch, 1))
        return dense + self._range("expert", start, end) * touched

    def kv_bytes_per_token_layer(self) -> float:
        if self.mla:  # the compressed latent plus the shared rope key
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.kv_bytes_per_value
        return 2 * self.kv_heads * self.head_dim * self.kv_bytes_per_value

    def kv_bytes_per_token(self, start: int = 0, end: int | None = None) -> float:
        end = self.num_layers if end is None else end
        return (end - start) * self.kv_bytes_per_token_layer()

    def _attn_flops_per_position(self) -> float:
        """FLOPs per (query token, cached position) pair per layer: QK^T plus AV."""
        if self.mla:
            return 2 * self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)
        return 4 * self.heads * self.head_dim

    def _active_layer_params(self, start: int, end: int) -> float:
        params = self.layer_params(start, end)
        if self.moe:
            n_moe = self._prefix["moe_layers"][end] - self._prefix["moe_layers"][start]
            params -= n_moe * (self.experts - self.active_experts) * 3 * self.hidden * self.moe_ffn
        return params

    def decode_flops(self, start: int, end: int, batch: int = 1, context: int = 0) -> float:
        """FLOPs of one decode step of `batch` sequences, each with `context` cached tokens."""
        matmul = 2.0 * batch * self._active_layer_params(start, end)
        return matmul + batch * context * (end - start) * self._attn_flops_per_position()

    def prefill_flops(self, start: int, end: int, tokens: int, context_before: int = 0) -> float:
        """FLOPs to prefill `tokens` new tokens after `context_before` cached ones (causal attention)."""
        matmul = 2.0 * tokens * self._active_layer_params(start, end)
        pairs = tokens * context_before + tokens * (tokens + 1) / 2
        return matmul + pairs * (end - start) * self._attn_flops_per_position()

    def head_flops(self, batch: int = 1) -> float:
        return 2.0 * batch * self.vocab * self.hidden

    def activation_bytes(self, tokens: int) -> int:
        """Hidden states sent between pipeline stages (half precision)."""
        return tokens * self.hidden * 2

    def with_quant(self, quant: int | float | str, group_size: int = 64) -> "ModelSpec":
        """The model at another quantization: 4, 4.5, "4.5" or "mixed:4/6" (see quant_value)."""
        bits, high = quant_parts(quant_value(quant))
        return replace(self, quant_bits=bits, high_bits=high, group_size=group_size)


VALID_BITS = (2, 3, 4, 5, 6, 8, 16, 32)
MIXED_BITS = (2, 3, 4, 5, 6, 8)          # what a mixed quant's low and high bits may be
BPW_RANGE = (1.0, 16.0)                 # fractional bits per weight: 1.58 (ternary) up to under half precision
QUANT_HINT = "expected bits such as 4, 4.5 or mixed:4/6"


def quant_value(value, where: str = "quant") -> int | float | str:
    """A quantization as users quote it, checked and made canonical: integer bits (4: mlx affine, the group's
    scale and bias come on top), fractional bits per weight with scales included (4.5, 3.5, 1.58, as quoted
    for llama.cpp / unsloth files), or "mixed:A/B" (mlx-lm's mixed_A_B recipe; "mixed_4_6" is accepted too).
    A whole number written as a float (4.0) is integer bits. Raises UserError naming what was found."""
    if isinstance(value, str):
        return _quant_from_text(value.strip(), where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where} {shown(value)}: {QUANT_HINT}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if value not in VALID_BITS:
            raise UserError(f"{where}: found {shown(value)}; allowed: one of {', '.join(map(str, VALID_BITS))}, "
                            "bits per weight such as 4.5, or mixed:4/6")
        return value
    low, high = BPW_RANGE
    if not low <= value < high:    # also refuses nan and inf
        raise UserError(f"{where}: found {shown(value)}; allowed: bits per weight from {low:g} to under "
                        f"{high:g}, scales included (such as 4.5 or 1.58), or integer bits")
    return value


def _quant_from_text(text: str, where: str):
    mixed = re.fullmatch(r"mixed[:_](\d+)[/_](\d+)", text.lower())
    if mixed:
        return _mixed_quant(int(mixed.group(1)), int(mixed.group(2)), text, where)
    try:
        number = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise UserError(f"{where} {shown(text)}: {QUANT_HINT}") from None
    return quant_value(number, where)


def _mixed_quant(low: int, high: int, text: str, where: str) -> str:
    if low not in MIXED_BITS or high not in MIXED_BITS or low >= high:
        raise UserError(f"{where} {shown(text)}: allowed: mixed:A/B with A below B, each one of "
                        f"{', '.join(map(str, MIXED_BITS))} (mlx-lm's recipes: mixed:2/6, 3/4, 3/6, 4/6)")
    return f"mixed:{low}/{high}"


def quant_parts(quant: int | float | str) -> tuple[int | float, int]:
    """(quant_bits, high_bits) of a canonical quant_value: "mixed:4/6" -> (4, 6); 4.5 -> (4.5, 0)."""
    if isinstance(quant, str):
        low, high = quant.removeprefix("mixed:").split("/")
        return int(low), int(high)
    return quant, 0


def model_from_config(config: dict, name: str, quant_bits: int | float | str = 16, group_size: int = 64,
                      origin: str = "config") -> ModelSpec:
    """Build a ModelSpec from an HF / mlx-lm config.json dict. Raises UserError naming the missing field.
    `quant_bits` is anything quant_value accepts."""
    quant_bits, high_bits = quant_parts(quant_value(quant_bits))
    if group_size not in (32, 64, 128):
        raise UserError(f"group size {group_size} is not supported; choose 32, 64 or 128")
    cfg = config.get("text_config", config)
    if not isinstance(cfg, dict):
        raise UserError(f"{origin}: text_config: found {shown(cfg)}; allowed: an object of model fields")
    check_model_config(cfg, origin)

    def need(key: str, *alts: str) -> int:
        for k in (key, *alts):
            if cfg.get(k) is not None:
                return cfg[k]
        raise UserError(f"{origin}: field '{key}' is missing; expected an HF/mlx-lm config.json with it")

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    experts = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    layers = need("num_hidden_layers")
    dense_layers: tuple[int, ...] = ()
    if experts:
        first_dense = cfg.get("first_k_dense_replace", 0) or 0
        step = cfg.get("decoder_sparse_step", 1) or 1
        mlp_only = set(cfg.get("mlp_only_layers", []) or [])
        dense_layers = tuple(i for i in range(layers)
                             if i < first_dense or (i + 1) % step != 0 or i in mlp_only)
    spec = ModelSpec(
        name=name,
        model_type=cfg.get("model_type", "unknown"),
        num_layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        ffn=need("intermediate_size"),
        vocab=need("vocab_size"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        experts=experts,
        active_experts=cfg.get("num_experts_per_tok", 0) or 0,
        moe_ffn=cfg.get("moe_intermediate_size", 0) or (cfg.get("intermediate_size") if experts else 0),
        shared_experts=cfg.get("n_shared_experts", 0) or (1 if cfg.get("shared_expert_intermediate_size") else 0),
        shared_ffn=cfg.get("shared_expert_intermediate_size", 0) or 0,
        dense_layers=dense_layers,
        q_lora_rank=cfg.get("q_lora_rank") or 0,
        kv_lora_rank=cfg.get("kv_lora_rank") or 0,
        qk_nope_head_dim=cfg.get("qk_nope_head_dim") or 0,
        qk_rope_head_dim=cfg.get("qk_rope_head_dim") or 0,
        v_head_dim=cfg.get("v_head_dim") or 0,
        quant_bits=quant_bits,
        group_size=group_size,
        high_bits=high_bits,
        kv_bytes_per_value=4 if quant_bits == 32 else 2,   # MLX keeps the KV cache in the weights' float type
    )
    _check_derived(spec, origin)
    return spec


# Each numeric field model_from_config reads: (smallest, largest) allowed. A field that is absent or null
# takes its default; the required ones are reported missing by model_from_config.
MODEL_INT_FIELDS = {
    "num_hidden_layers": (1, MAX_LAYERS), "hidden_size": (1, MAX_HIDDEN), "num_attention_heads": (1, MAX_HEADS),
    "num_key_value_heads": (1, MAX_HEADS), "head_dim": (1, MAX_HIDDEN), "intermediate_size": (1, MAX_WIDTH),
    "vocab_size": (1, MAX_WIDTH),
    "n_routed_experts": (0, MAX_EXPERTS), "num_experts": (0, MAX_EXPERTS), "num_local_experts": (0, MAX_EXPERTS),
    "num_experts_per_tok": (0, MAX_EXPERTS), "n_shared_experts": (0, MAX_EXPERTS),
    "moe_intermediate_size": (0, MAX_WIDTH), "shared_expert_intermediate_size": (0, MAX_WIDTH),
    "first_k_dense_replace": (0, MAX_LAYERS), "decoder_sparse_step": (0, MAX_LAYERS),
    "q_lora_rank": (0, MAX_HIDDEN), "kv_lora_rank": (0, MAX_HIDDEN), "qk_nope_head_dim": (0, MAX_HIDDEN),
    "qk_rope_head_dim": (0, MAX_HIDDEN), "v_head_dim": (0, MAX_HIDDEN),
}
MODEL_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias")


def check_model_config(cfg: dict, origin: str) -> None:
    """Type and range of every field model_from_config reads, before anything is built from them."""
    for key, (low, high) in MODEL_INT_FIELDS.items():
        if cfg.get(key) is not None:
            integer_in(cfg[key], f"{origin}: {key}", low, high)
    for key in MODEL_BOOL_FIELDS:
        if cfg.get(key) is not None:
            of_type(cfg[key], bool, f"{origin}: {key}", "true or false")
    if cfg.get("model_type") is not None:
        of_type(cfg["model_type"], str, f"{origin}: model_type", "a string such as \"llama\"")
    mlp_only = cfg.get("mlp_only_layers")
    if mlp_only is not None:
        of_type(mlp_only, list, f"{origin}: mlp_only_layers", "a list of layer indices")
        if len(mlp_only) > MAX_LAYERS:
            raise UserError(f"{origin}: mlp_only_layers: found {len(mlp_only)} entries; allowed: at most {MAX_LAYERS}")
        for i, layer in enumerate(mlp_only):
            integer_in(layer, f"{origin}: mlp_only_layers[{i}]", 0, MAX_LAYERS)


def _check_derived(spec: ModelSpec, origin: str) -> None:
    """Relations between fields that each passed on its own (a head width of 0 would divide by zero later)."""
    if spec.kv_heads > spec.heads:
        raise UserError(f"{origin}: num_key_value_heads: found {spec.kv_heads}; allowed: at most "
                        f"num_attention_heads ({spec.heads})")
    if spec.head_dim < 1:
        raise UserError(f"{origin}: head_dim: hidden_size {spec.hidden} / num_attention_heads {spec.heads} is 0; "
                        "allowed: give head_dim, or at most hidden_size heads")
    if spec.active_experts > spec.experts:
        raise UserError(f"{origin}: num_experts_per_tok: found {spec.active_experts}; allowed: at most the "
                        f"{spec.experts} routed experts")


# ----------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class NodeMemory:
    """One node's memory in a plan: what its share of a stage needs and what its own GPU may use."""

    node: str
    used_gb: float                    # weights + embeddings/head + KV reserve held on this node
    usable_gb: float                  # this node's usable GPU memory (its own, not its group's smallest)

    @property
    def fits(self) -> bool:
        return self.used_gb <= self.usable_gb * (1 + 1e-9)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a node, or a tensor-parallel group of nodes, running layers [layer_start, layer_end)."""

    nodes: tuple[str, ...]
    layer_start: int
    layer_end: int
    tp_degree: int = 1
    memory_used_gb: float = 0.0       # per member node: weights + embeddings/head + KV reserve (same on all)
    memory_available_gb: float = 0.0  # the smallest member's usable GPU memory; each member's own: memory_per_node
    decode_ms: float = 0.0            # predicted time of one decode step (batch 1) on this stage
    prefill_ms: float = 0.0           # predicted prefill of the reference prompt on this stage
    link_ms: float = 0.0              # sending this stage's output on (token ids back, for the last stage)
    memory_per_node: tuple[NodeMemory, ...] = ()  # each member's own figures, in the order of nodes

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start

    def member_memory(self) -> tuple[NodeMemory, ...]:
        """Each member's memory; a stage built without per-node figures (an older plan.json) gives every
        member the stage's single figures, which were the smallest member's."""
        if self.memory_per_node:
            return self.memory_per_node
        return tuple(NodeMemory(n, self.memory_used_gb, self.memory_available_gb) for n in self.nodes)

    @property
    def label(self) -> str:
        return "+".join(self.nodes)


@dataclass(frozen=True)
class PartitionPlan:
    strategy: str
    objective: str
    cluster: str
    model: str
    quant_bits: int
    num_layers: int
    stages: tuple[Stage, ...]                      # in layer order; the ring follows this order
    predicted: dict = field(default_factory=dict)  # tpot_ms, tokens_per_s, ttft_ms, bottleneck_ms, ... (theoretical)
    bottleneck: str = ""
    warnings: tuple[str, ...] = ()                 # something to act on: a node nearly full, a link that bottlenecks
    notes: tuple[str, ...] = ()                    # information only: how the strategy searched, idle nodes

    def split(self) -> list[int]:
        """Layer counts per stage in layer order (mlx-lm wants them reversed: rank 0 runs the LAST layers)."""
        return [s.layers for s in self.stages]

    @property
    def ring(self) -> tuple[str, ...]:
        return tuple(n for s in self.stages for n in s.nodes)

    def problems(self) -> list[str]:
        """Every way this plan is invalid; empty when it covers each layer once, in order, within memory."""
        out = []
        expect = 0
        for i, s in enumerate(self.stages):
            if s.layer_start != expect:
                out.append(f"stage {i} starts at layer {s.layer_start}, expected {expect}")
            if s.layer_end <= s.layer_start:
                out.append(f"stage {i} has no layers ({s.layer_start}..{s.layer_end})")
            if s.tp_degree != len(s.nodes):
                out.append(f"stage {i} tp_degree {s.tp_degree} != {len(s.nodes)} nodes")
            out += [f"stage {i} ({s.label}): {m.node} needs {m.used_gb:.1f} GB, has {m.usable_gb:.1f} GB"
                    for m in s.member_memory() if not m.fits]
            expect = s.layer_end
        if expect != self.num_layers:
            out.append(f"stages end at layer {expect}, model has {self.num_layers}")
        names = self.ring
        if len(set(names)) != len(names):
            out.append("a node appears in more than one stage")
        return out

    def validate(self) -> "PartitionPlan":
        problems = self.problems()
        if problems:
            raise ValueError(f"invalid plan from {self.strategy}: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = [asdict(s) | {"layers": s.layers} for s in self.stages]
        d["split"] = self.split()
        d["source"] = "theoretical"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PartitionPlan":
        stages = tuple(_stage_from_dict(s) for s in d["stages"])
        keep = {k: d[k] for k in ("strategy", "objective", "cluster", "model", "quant_bits", "num_layers",
                                  "predicted", "bottleneck")}
        return cls(stages=stages, warnings=tuple(d.get("warnings", ())), notes=tuple(d.get("notes", ())), **keep)


def _stage_from_dict(d: dict) -> Stage:
    """A Stage from plan.json; "layers" is derived, and plans written before per-node memory lack it."""
    fields = {k: v for k, v in d.items() if k not in ("layers", "nodes", "memory_per_node")}
    members = tuple(NodeMemory(**m) for m in d.get("memory_per_node", ()))
    return Stage(nodes=tuple(d["nodes"]), memory_per_node=members, **fields)


# ----------------------------------------------------------------------------------------------- loading
def read_text(path: Path, what: str) -> str:
    """A whole input file as UTF-8 text, bounded in size; UserError for a missing, unreadable, huge or
    non-UTF-8 file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise UserError(f"{what} file {path} cannot be read: {exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise UserError(f"{what} file {path}: larger than the {MAX_FILE_BYTES >> 20} MiB an input file may be")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} file {path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
                        "allowed: a UTF-8 text file") from None


def parse_file(path: Path, what: str, loads, syntax_error: type, fmt: str, nesting: str, where=lambda exc: ""):
    """`loads` of the file's text; one-line UserError for a missing, huge, non-UTF-8, invalid or too deep file.
    `where(exc)` places a syntax error (" at line L column C")."""
    text = read_text(path, what)
    try:
        return loads(text)
    except syntax_error as exc:
        raise UserError(f"{what} file {path}: not valid {fmt}{where(exc)}: {getattr(exc, 'msg', exc)}") from None
    except RecursionError:
        raise UserError(f"{what} file {path}: nested too deeply to read; allowed: a few levels of {nesting}") from None
    except ValueError as exc:    # e.g. an integer of more than 4300 digits
        raise UserError(f"{what} file {path}: not valid {fmt}: {exc}") from None


def read_json(path: Path, what: str) -> dict:
    data = parse_file(path, what, json.loads, json.JSONDecodeError, "JSON", "objects and lists",
                      where=lambda exc: f" at line {exc.lineno} column {exc.colno}")
    if not isinstance(data, dict):
        raise UserError(f"{what} file {path}: expected a JSON object at the top, got {type(data).__name__}")
    return data


def finite_positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LoadReport:
    """What loading a plan cost: seconds and bytes per node, measured (real ranks) or simulated."""
    load_s_per_node: dict[str, float]
    memory_bytes_per_node: dict[str, int]
    source: str                       # "measured" | "simulated"
    notes: tuple[str, ...] = field(default_factory=tuple)
