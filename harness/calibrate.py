"""Fit the cost-model profile (eta_bw, mu_compute, step and per-layer overheads) to public single-device data.

Data: harness/catalog/calibration/apple_silicon_single_device_calibration.csv (a copy of the project's public
data file, with its source columns). Each usable row is one published llama.cpp/MLX run of a model we have a
config for, on a chip in the catalog:
- decode (tg): aggregate tokens/s of `batch` sequences generating `gen_tokens` after `context_depth` cached
  tokens, so one step takes batch / tg_tok_s at a mean context of depth + gen/2;
- prefill (pp): `prompt_tokens` tokens after `context_depth` cached tokens take prompt / pp_tok_s.

Fit (closed-form weighted least squares on relative error, no optimiser dependency):
1. decode rows, batch 1: t = bytes / (eta * BW) + c_step + c_layer * layers, linear in (1/eta, c_step, c_layer)
   -> global eta_bw, step_overhead_s and layer_overhead_s (non-negative least squares);
2. prefill rows, batch 1: t - overhead = flops / (mu * peak) -> global mu_compute;
3. per chip (optional), with the global overhead fixed: the same two fits over that chip's rows.
4. MoE (named terms, fitted on MoE rows only, global factors fixed; dense rows unaffected): expert_eta, the
   routed experts' read rate relative to dense weights in decode, and expert_fill_tokens, the compute each
   expert touched by an engine chunk pays on top of its tokens (small per-expert GEMMs), with the chunk the
   engine's physical batch (the row's stated n_ubatch, else the engine's default: ENGINE_CHUNK);
5. attention apart (--terms attention): the KV read efficiency attn_eta_bw and the attention FLOPS efficiency
   attn_mu fitted beside eta_bw and mu_compute, attention taken out of the weights' roofline;
6. per generation (M1 ... M5): the decode bandwidth efficiency of the generation's rows, for a chip of that
   generation without per-chip rows (memory technology and controllers change by generation: in the #4167 table
   the M2 family reaches 0.92-0.95 of peak, the M1 family 0.75-0.90; prefill compute efficiency does not group
   by generation, 0.61-0.69 in both, so it stays global); generations without rows are flagged as estimated;
7. engines: for each engine with rows of its own besides the default (mlx-lm), its per-step cost over the
   profile's (engines.<name>.step_overhead_s, non-negative) and its prefill chunk; an engine seen only on
   clusters (exo) gets its per-step cost from its multi-node rows (one stream, zero depth, priced links), paid
   once per stage per engine step, the roofline fixed (fit_multinode_engine).
Rows with batch > 1 are not fitted; they are reported as a check of batched-decode scaling.
Then every row is predicted with harness.costmodel itself and the error is reported.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from harness import catalog, costmodel
from harness.costmodel import Profile
from harness.specs import GIB, Chip, Cluster, Link, ModelSpec, Node, PartitionPlan, Stage, UserError

DATA = Path(__file__).parent / "catalog" / "calibration" / "apple_silicon_single_device_calibration.csv"
# published M3/M4-era rows (llama.cpp and mlx-lm) found for issue 11; not in the default fit, so the committed
# fitted.json stays what DATA gives: add them with `calibrate --with-public`
PUBLIC = DATA.with_name("public_mac_measurements.csv")
# published multi-Mac runs (nodes, link, strategy, concurrency columns): never in the roofline fit; predicted with
# the planner's own pipeline/tensor-parallel pricing (costmodel.decode_steps_s) and reported apart
MULTINODE = DATA.with_name("public_mac_multinode.csv")

# published model names -> catalog presets with the same architecture
MODEL_MAP = {
    "LLaMA-2 7B": "llama-2-7b", "LLaMA 7B": "llama-2-7b", "LLaMA 7B (as in #4167 comparison)": "llama-2-7b",
    "Llama 3 8B": "llama-3.1-8b", "Llama 3.1 8B": "llama-3.1-8b", "Llama 3 70B": "llama-3.1-70b", "Meta-Llama-3-70B-Instruct": "llama-3.1-70b",
    "Qwen2.5-Coder-7B": "qwen2.5-7b", "Qwen3-Coder-30B-A3B-Instruct": "qwen3-30b-a3b",
    "Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b", "Llama 3.2 3B Instruct": "llama-3.2-3b",
    # Llama 3.3 70B keeps the Llama 3.1 70B architecture; Qwen3-30B-A3B is the catalog's MoE preset
    "Llama 3.3 70B Instruct": "llama-3.1-70b", "Llama-3.3-70B-Instruct-4bit": "llama-3.1-70b",
    "Qwen3-30B-A3B": "qwen3-30b-a3b", "DeepSeek R1": "deepseek-v3",
    "GLM-5": "glm-5", "GLM-5.3-Flash": "glm-5.3-flash",
}


# the tokens an engine puts through one forward of a prefill (its physical batch) when a row does not say:
# llama-bench's n_ubatch default is 512 (llama.cpp tools/llama-bench README: "-ub, --ubatch-size <n> (default:
# 512)"); mlx-lm prefills prompt_step/prefill_step_size = 2048 tokens at a time (mlx_lm generate_step default)
ENGINE_CHUNK = {"llama.cpp": 512, "mlx-lm": 2048}
ENGINE_NAMES = {"mlx": "mlx-lm"}   # engine_family -> the profile's engine names
TERMS = ("moe", "engine", "generation", "attention", "transport")
# what the committed fitted.json carries; attention and transport move dense plans (and the golden runs)
DEFAULT_TERMS = ("moe", "engine", "generation")


def profile_engine(engine: str) -> str:
    """The profile engine name of a row's engine cell ("llama.cpp (Metal,BLAS)" -> "llama.cpp", "mlx" -> "mlx-lm")."""
    fam = engine_family(engine)
    return ENGINE_NAMES.get(fam, fam)


def stated_chunk(engine: str, version: str, notes: str = "") -> int:
    """The physical prefill batch a row ran with: n_ubatch/-ub stated in its version or notes, else its engine's
    default (0: unknown, the whole prompt in one forward)."""
    m = re.search(r"(?:n_ubatch|-ub|ubatch[- ]size)\s*=?\s*(\d+)", f"{version} {notes}")
    return int(m.group(1)) if m else ENGINE_CHUNK.get(profile_engine(engine), 0)


@dataclass(frozen=True)
class Obs:
    """One published figure turned into a step-time observation."""
    row: int                 # line in the CSV (header = line 1)
    kind: str                # "tg" | "pp"
    engine: str
    model_name: str
    quant: str
    chip: Chip
    model: ModelSpec
    batch: int
    tokens: int              # prompt tokens (pp) or generated tokens (tg)
    context: float           # tg: mean context; pp: context before the prompt
    published_tok_s: float
    confidence: str
    source: str = ""         # first URL of the row's source cell: the unit held out by leave-one-source-out
    nodes: int = 1           # Macs in the run (the single-device tables: 1)
    chunk: int = 0           # the engine's physical prefill batch (n_ubatch) for this row; 0: one forward
    link: str = ""           # multi-node: the catalog link kind between the Macs (row_link_kind)
    strategy: str = ""       # multi-node: "pipeline" (one stage a node) or "tensor" (one tensor-parallel group)
    mem_gb: float = 0.0      # multi-node: each Mac's memory (0: not stated, the chip's largest)

    @property
    def step_s(self) -> float:
        """Observed time of one step: prefill of the prompt, or one decode step of the batch."""
        return self.tokens / self.published_tok_s if self.kind == "pp" else self.batch / self.published_tok_s


def _int_prefix(text: str) -> int | None:
    m = re.match(r"\s*(\d+)", text or "")
    return int(m.group(1)) if m else None


def _num(text: str) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def quantized(model: ModelSpec, quant: str, weights_gib: float | None) -> ModelSpec | None:
    """The model at the published quantization. With the file size known, the effective bits per weight
    come from it (GGUF k-quants mix precisions); otherwise from the quant name."""
    q = quant.lower()
    if q in ("f16", "bf16", "fp16"):
        return model.with_quant(16)
    if not q.strip() and weights_gib:   # quant not stated, the file size is: its bits per weight, scales included
        return model.with_quant(round(weights_gib * GIB * 8 / model.total_params, 3))
    if "mxfp" in q:   # OCP microscaling: one 8-bit (E8M0) scale per block of 32 elements
        m = re.search(r"mxfp(\d)", q)
        if m and int(m.group(1)) in (4, 8):
            return replace(model, quant_bits=int(m.group(1)), group_size=128)   # 8/32 = 32/128 bits a weight
    m = re.search(r"(\d)", q)
    if not m or int(m.group(1)) not in (2, 3, 4, 5, 6, 8):
        return None
    bits = int(m.group(1))
    if weights_gib:
        bpw = weights_gib * GIB * 8 / model.total_params
        if bpw > bits + 1e-6:
            # bits_per_weight = bits + 32/group_size: pick the (fractional) group size that matches the file
            return replace(model, quant_bits=bits, group_size=32.0 / (bpw - bits))
    return model.with_quant(bits, 64)


def source_key(text: str) -> str:
    """The first URL of a source cell (cells may add "via ..." copies or several sources)."""
    m = re.search(r"https?://[^\s,;()\"]+", text or "")
    return m.group(0).rstrip(".") if m else (text or "").strip() or "(no source)"


def load_observations(path: str | Path | list = DATA) -> tuple[list[Obs], list[str]]:
    """Usable observations of one CSV or several, and one line per skipped row saying why."""
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    obs, skipped = [], []
    for p in paths:
        got, why = _load_one(p)
        obs.extend(got)
        skipped.extend(why if len(paths) == 1 else [f"{p.name} {w}" for w in why])
    return obs, skipped


def _load_one(path: Path) -> tuple[list[Obs], list[str]]:
    if not path.exists():
        raise UserError(f"calibration data {path} does not exist")
    obs, skipped = [], []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("model", "chip", "quant", "source") if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"calibration data {path}: missing column(s) {', '.join(missing)}; "
                            f"expected the columns of {DATA.name}")
        for line, row in enumerate(reader, start=2):
            got, why = _row_obs(line, row)
            obs.extend(got)
            if why:
                skipped.append(f"line {line} ({row['model']}, {row['chip']}): {why}")
    return obs, skipped


def _row_obs(line: int, row: dict) -> tuple[list[Obs], str]:
    preset = MODEL_MAP.get(row["model"])
    if preset is None:
        if "not stated" in row["model"]:
            return [], "the source does not state the model's size, so no config can price it"
        return [], "no catalog config for this model"
    cores = _int_prefix(row["gpu_cores"])
    try:
        chip = catalog.find_chip(row["chip"], cores)
    except UserError as exc:
        return [], str(exc)
    model = quantized(catalog.load_model(preset, 16), row["quant"], weights_gib(row["weights_gib"]))
    if model is None:
        return [], f"quantization {row['quant']!r} not modelled"
    nodes = int(_num(row.get("nodes")) or 1)
    topology = {}
    if nodes > 1:
        strategy = row.get("strategy", "").strip()
        if strategy not in ("pipeline", "tensor"):
            return [], f"strategy {strategy!r} not stated as pipeline or tensor"
        kind = row_link_kind(row.get("link", ""), chip)
        if kind is None:
            return [], f"link {row.get('link', '')!r} not stated well enough to name a link kind"
        topology = dict(nodes=nodes, link=kind, strategy=strategy, mem_gb=_num(_lead(row.get("mem_gb"))) or 0.0)
    # the multi-node table gives concurrent streams; the single-device tables a batch
    batch = int(_num(row.get("batch") or row.get("concurrency")) or 1)
    depth = _num(row["context_depth"]) or 0.0
    common = dict(row=line, engine=row["engine"], model_name=row["model"], quant=row["quant"], chip=chip,
                  model=model, batch=batch, confidence=row["confidence"],
                  source=source_key(row["source"]),
                  chunk=stated_chunk(row["engine"], row.get("engine_version", ""), row.get("notes", "")), **topology)
    out = []
    prompt, gen = _num(row["prompt_tokens"]), _num(row["gen_tokens"])
    if _num(row["tg_tok_s"]) and gen:
        out.append(Obs(kind="tg", tokens=int(gen), context=depth + gen / 2, published_tok_s=_num(row["tg_tok_s"]),
                       **common))
    if _num(row["pp_tok_s"]) and prompt and batch == 1:
        # a multi-node row is one run, a prompt then its generation: its context_depth is the prompt's own, so the
        # prompt starts from depth - prompt (a llama-bench row's pp test starts from the depth)
        before = max(depth - prompt, 0.0) if "nodes" in row else depth
        out.append(Obs(kind="pp", tokens=int(prompt), context=before, published_tok_s=_num(row["pp_tok_s"]),
                       **common))
    return out, "" if out else "no prompt/generation length given with the rate"


def _lead(text: str | None) -> str:
    """The leading number of a cell ("80 (assumed)" -> "80")."""
    m = re.match(r"\s*(\d+(?:\.\d+)?)", text or "")
    return m.group(1) if m else ""


def weights_gib(text: str | None) -> float | None:
    """A weights cell in GiB: its leading number, read as decimal gigabytes where the cell says "GB" (a size may
    be labelled "(inferred: ...)")."""
    lead = _num(_lead(text))
    if lead is None:
        return None
    return lead * 1e9 / GIB if re.search(r"\d\s*GB\b", text or "") else lead


# ------------------------------------------------------------------------------------------------ fitting

def _decode_bytes_time(o: Obs) -> float:
    """A decode observation's bytes read per step over peak bandwidth (the cost model's own decode work)."""
    nbytes, _ = costmodel.decode_work(o.model, 0, o.model.num_layers, o.batch, o.context, with_head=True)
    return nbytes / (o.chip.mem_bw_gbs * 1e9)


def _prefill_flops_time(o: Obs) -> float:
    """A prefill observation's FLOPs over peak FLOPS (the cost model's own prefill work)."""
    _, flops = costmodel.prefill_work(o.model, 0, o.model.num_layers, o.tokens, int(o.context), with_head=True)
    return flops / (o.chip.fp16_tflops * 1e12)


Overheads = tuple[float, float]   # (step_overhead_s, layer_overhead_s)


def row_profile(o: Obs, profile: Profile) -> Profile:
    """The profile an observation is priced with: its engine's entry, at the row's own prefill chunk."""
    try:
        p = profile.for_engine(profile_engine(o.engine))
    except UserError:   # an engine the profile has no entry for: the profile's own factors
        p = profile
    return replace(p, prefill_chunk_tokens=float(o.chunk))


def _expert_bytes_time(o: Obs) -> float:
    """The routed experts' share of a MoE decode step's bytes over peak bandwidth (0 for a dense model)."""
    if not o.model.moe:
        return 0.0
    L = o.model.num_layers
    return (o.model.decode_read_bytes(0, L, o.batch) - o.model._range("dense", 0, L)) / (o.chip.mem_bw_gbs * 1e9)


def _fill_flops_time(o: Obs, fill: float, base: Profile) -> float:
    """A MoE prefill's expert-fill FLOPs at expert_fill_tokens = fill, over peak FLOPS, at the row's chunk (`base`:
    any profile, only those two terms are read)."""
    unit = replace(base, expert_fill_tokens=fill, prefill_chunk_tokens=float(o.chunk))
    return costmodel.expert_fill_flops(o.model, unit, 0, o.model.num_layers, o.tokens) / (o.chip.fp16_tflops * 1e12)


FILL_GRID = np.round(np.arange(0.0, 256.0 + 1e-9, 0.25), 2)   # expert_fill_tokens searched (tokens per expert)


def _kv_time(o: Obs) -> float:
    """A decode step's KV reads over peak bandwidth (attention's memory side)."""
    kv, _ = costmodel.decode_attention_work(o.model, 0, o.model.num_layers, o.batch * o.context)
    return kv / (o.chip.mem_bw_gbs * 1e9)


def _attn_flops_time(o: Obs) -> float:
    """A prefill's attention pair FLOPs over peak FLOPS (attention's compute side)."""
    _, f = costmodel.prefill_attention_work(o.model, 0, o.model.num_layers, o.tokens, int(o.context))
    return f / (o.chip.fp16_tflops * 1e12)


def _ls_positive(cols: list[np.ndarray], t: np.ndarray, w: np.ndarray, required: int = 0) -> np.ndarray:
    """Least squares of t ~ sum(c_i x_i) weighted by w with every c_i >= 0: the best subset whose unconstrained
    solution is non-negative (the columns are few; the first `required` are in every subset, the others may be
    pinned at 0)."""
    from itertools import combinations
    best = None
    n = len(cols)
    for r in range(n - required, -1, -1):
        for optional in combinations(range(required, n), r):
            keep = (*range(required), *optional)
            if not keep:
                continue
            a = np.column_stack([cols[i] * w for i in keep])
            coef, *_ = np.linalg.lstsq(a, t * w, rcond=None)
            if np.any(coef < 0):
                continue
            resid = float(np.sum((a @ coef - t * w) ** 2))
            if best is None or resid < best[0]:
                full = np.zeros(n)
                full[list(keep)] = coef
                best = (resid, full)
    return best[1] if best else np.zeros(n)


def _ls_scale(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """The one coefficient s minimising sum((w (s x - y))^2): y ~ s x on relative error (w = 1 / t)."""
    return float(np.sum(x * w * y * w) / np.sum((x * w) ** 2))


def _overhead(o: Obs, ovh: Overheads) -> float:
    return ovh[0] + ovh[1] * o.model.num_layers


def fit_decode(rows: list[Obs], overheads: Overheads | None = None,
               attention: tuple[float, float] | None = None) -> tuple[float, Overheads]:
    """(eta_bw, overheads) minimising relative error of t = x / eta + c_step + c_layer * layers.

    Overheads given: only eta is fitted. Otherwise the non-negative least-squares solution over the three
    unknowns (a coefficient that would go negative is pinned at 0 and the rest refitted).
    """
    x = np.array([_decode_bytes_time(o) for o in rows])
    layers = np.array([o.model.num_layers for o in rows], dtype=float)
    t = np.array([o.step_s for o in rows])
    w = 1.0 / t                                       # relative errors: divide each equation by its t
    if overheads is None:
        inv_eta, step, layer = _ls_positive([x, np.ones_like(t), layers], t, w, required=1)
        return 1.0 / inv_eta, (float(step), float(layer))
    c = np.array([_overhead(o, overheads) for o in rows])
    if attention:   # the KV reads at their own rate: known time, not the weights'
        kv = np.array([_kv_time(o) for o in rows])
        x, c = x - kv, c + kv / attention[0]
    return 1.0 / _ls_scale(x, t - c, w), overheads


def fit_prefill(rows: list[Obs], overheads: Overheads, attention: tuple[float, float] | None = None) -> float:
    """mu_compute minimising relative error of t - overhead = flops_time / mu."""
    f = np.array([_prefill_flops_time(o) for o in rows])
    t = np.array([o.step_s for o in rows])
    c = np.array([_overhead(o, overheads) for o in rows])
    if attention:
        a = np.array([_attn_flops_time(o) for o in rows])
        f, c = f - a, c + a / attention[1]
    return 1.0 / _ls_scale(f, t - c, 1.0 / t)


# a chip cannot stream or compute faster than its peak: a per-chip or per-generation fit above it (the M3 rows
# with the M1/M2-era per-layer overhead) is held at the peak
PEAK = 1.0


def fit_attention(tg: list[Obs], pp: list[Obs]) -> tuple[float, Overheads, float, float, float]:
    """(eta_bw, overheads, mu_compute, attn_eta_bw, attn_mu) with attention apart: decode
    t = weights/eta + KV/attn_eta + c_step + c_layer L, prefill t - overhead = matmul/mu + pairs/attn_mu."""
    x = np.array([_decode_bytes_time(o) for o in tg])          # weights + KV (+ head) at peak
    kv = np.array([_kv_time(o) for o in tg])
    layers = np.array([o.model.num_layers for o in tg], dtype=float)
    t = np.array([o.step_s for o in tg])
    c = _ls_positive([x - kv, kv, np.ones_like(t), layers], t, 1.0 / t)
    eta, attn_eta = 1.0 / c[0], (1.0 / c[1] if c[1] > 0 else 1.0)
    overheads = (float(c[2]), float(c[3]))
    f = np.array([_prefill_flops_time(o) for o in pp])
    a = np.array([_attn_flops_time(o) for o in pp])
    tp = np.array([o.step_s - _overhead(o, overheads) for o in pp])
    w = 1.0 / np.array([o.step_s for o in pp])
    d = _ls_positive([f - a, a], tp, w)
    mu, attn_mu = 1.0 / d[0], (1.0 / d[1] if d[1] > 0 else 1.0)
    return eta, overheads, mu, min(attn_eta, 1.0), min(attn_mu, 1.0)


# With attention inside the roofline, the MoE terms are fitted on rows without a deep context: decode rows whose KV
# reads are under this share of the bytes, prefill rows with nothing cached before the prompt (the prompt's own
# causal attention is in every dense prefill row mu_compute was fitted on too). A deep context's attention cost,
# which the plain roofline under-prices, would otherwise be read as expert cost.
ATTENTION_SHARE_MAX = 0.1


def fit_moe(tg: list[Obs], pp: list[Obs], eta: float, mu: float, overheads: Overheads,
            attention: tuple[float, float] | None = None) -> dict:
    """expert_eta from MoE decode rows and expert_fill_tokens from MoE prefill rows, the global factors fixed;
    {} when there are no MoE rows (the neutral defaults then hold)."""
    out = {}
    if not attention:   # inside the roofline, attention's error would be read as the experts': rows where it is small
        tg = [o for o in tg if _kv_time(o) < ATTENTION_SHARE_MAX * _decode_bytes_time(o)]
        pp = [o for o in pp if o.context == 0]
    moe_tg = [o for o in tg if o.model.moe]
    if moe_tg:
        xe = np.array([_expert_bytes_time(o) for o in moe_tg])
        x = np.array([_decode_bytes_time(o) for o in moe_tg])
        t = np.array([o.step_s for o in moe_tg])
        known = (x - xe) / eta + np.array([_overhead(o, overheads) for o in moe_tg])
        if attention:
            kv = np.array([_kv_time(o) for o in moe_tg])
            known += kv / attention[0] - kv / eta
        inv = _ls_scale(xe, t - known, 1.0 / t)   # 1 / (eta * expert_eta)
        out["expert_eta"] = round(float(np.clip(1.0 / (eta * inv), 0.05, 1.0)) if inv > 0 else 1.0, 4)
    moe_pp = [o for o in pp if o.model.moe]
    if moe_pp:
        f = np.array([_prefill_flops_time(o) for o in moe_pp])
        t = np.array([o.step_s for o in moe_pp])
        known = f / mu + np.array([_overhead(o, overheads) for o in moe_pp])
        if attention:
            a = np.array([_attn_flops_time(o) for o in moe_pp])
            known += a / attention[1] - a / mu
        # the waste is min(fill, tokens per expert): not linear in fill, so the least-squares fill is searched
        base = costmodel.load_profile("default")   # read once: the search prices every row at every grid point
        resid = [float(np.sum(((known + np.array([_fill_flops_time(o, x, base) for o in moe_pp]) / mu - t) / t) ** 2))
                 for x in FILL_GRID]
        out["expert_fill_tokens"] = float(FILL_GRID[int(np.argmin(resid))])
    return out


def fit_engines(obs: list[Obs], profile: Profile, default: str = costmodel.DEFAULT_ENGINE,
                moe: dict | None = None) -> dict:
    """Per engine other than the default with batch-1 decode rows: the per-step cost over the profile's own
    (the mean residual step time, >= 0), the engine's prefill chunk (ENGINE_CHUNK) and its MoE terms
    (`moe`: {engine: fit_moe's result}, fitted on that engine's rows: the expert GEMM fill is its kernels')."""
    moe = moe or {}
    engines = {}
    for name in sorted(({profile_engine(o.engine) for o in obs} | set(moe)) - {default}):
        entry = {}
        if name in ENGINE_CHUNK:
            entry["prefill_chunk_tokens"] = ENGINE_CHUNK[name]
        entry.update(moe.get(name, {}))
        engines[name] = entry
    profile = replace(profile, engines={n: dict(e) for n, e in engines.items()})
    for name, entry in engines.items():
        tg = [o for o in obs if o.kind == "tg" and o.batch == 1 and profile_engine(o.engine) == name]
        if tg:
            t = np.array([o.step_s for o in tg])
            pred = np.array([o.batch / predict(o, profile) for o in tg])
            w = 1.0 / t
            extra = float(np.sum((t - pred) * w * w) / np.sum(w * w))
            entry["step_overhead_s"] = round(profile.step_overhead_s + max(extra, 0.0), 6)
        what = [f"{len(tg)} decode rows"] if tg else []
        if name in moe:
            what.append("its MoE rows for " + ", ".join(moe[name]))
        entry["basis"] = f"fitted on {' and '.join(what)} of {name}" if what else "engine default chunk only"
    return engines


def fit_profile(obs: list[Obs], per_chip: bool = True, base: Profile | None = None,
                terms: tuple[str, ...] = DEFAULT_TERMS, exclude_sources: tuple[str, ...] = (),
                multinode_engines: bool = True) -> Profile:
    """A Profile fitted to the single-device batch-1 observations (multi-node rows are never in the roofline
    fit); link and SSD figures are kept from `base`. `terms` names the optional terms fitted beside the
    roofline's (TERMS); the transport term's link-only pairs leave out `exclude_sources` (a held-out source).
    With the engine term, an engine whose only rows are multi-node (exo) gets its per-step cost from those rows
    in `obs` (fit_multinode_engine; multinode_engines=False leaves it out, for the before/after report)."""
    unknown = set(terms) - set(TERMS)
    if unknown:
        raise UserError(f"unknown calibration term(s) {', '.join(sorted(unknown))}; choose from {', '.join(TERMS)}")
    multi = [o for o in obs if o.nodes > 1 and o.source not in exclude_sources]
    obs = [o for o in obs if o.nodes == 1]
    tg = [o for o in obs if o.kind == "tg" and o.batch == 1]
    pp = [o for o in obs if o.kind == "pp"]
    if not tg or not pp:
        raise UserError("calibration needs at least one decode (tg) and one prefill (pp) row")
    attention = None
    if "attention" in terms:
        eta, overheads, mu, attn_eta, attn_mu = fit_attention(tg, pp)
        attention = (attn_eta, attn_mu)
    else:
        eta, overheads = fit_decode(tg)
        mu = fit_prefill(pp, overheads)
    # the MoE terms per engine (an expert GEMM's fill is its engine's kernels): the default engine's are the
    # profile's own, another engine's go to its engines entry
    moe, engine_moe = {}, {}
    if "moe" in terms:
        for name in sorted({profile_engine(o.engine) for o in tg + pp if o.model.moe}):
            mine = fit_moe([o for o in tg if profile_engine(o.engine) == name],
                           [o for o in pp if profile_engine(o.engine) == name], eta, mu, overheads, attention)
            if name == costmodel.DEFAULT_ENGINE:
                moe = mine
            elif mine:
                engine_moe[name] = mine
    chips: dict[str, dict] = {}
    if per_chip:
        for name in sorted({o.chip.name for o in obs}):
            entry = {}
            mine_tg = [o for o in tg if o.chip.name == name]
            mine_pp = [o for o in pp if o.chip.name == name]
            if len(mine_tg) >= 2:
                entry["eta_bw"] = round(min(fit_decode(mine_tg, overheads, attention)[0], PEAK), 4)
            if len(mine_pp) >= 2:
                entry["mu_compute"] = round(min(fit_prefill(mine_pp, overheads, attention), PEAK), 4)
            if entry:
                chips[name] = entry
    base = base or costmodel.load_profile("default")  # SSD and link figures the data cannot fit
    extra = dict(attn_eta_bw=round(attention[0], 4), attn_mu=round(attention[1], 4)) if attention else {}
    profile = Profile(name="fitted", eta_bw=round(eta, 4), mu_compute=round(mu, 4),
                      step_overhead_s=round(overheads[0], 6), layer_overhead_s=round(overheads[1], 7),
                      link_overhead_us=base.link_overhead_us, ssd_gbs=base.ssd_gbs, per_chip=chips,
                      source="fitted: python -m harness calibrate on harness/catalog/calibration/"
                             "apple_silicon_single_device_calibration.csv (public llama.cpp and MLX single-device rows)",
                      **moe, **extra)
    if "generation" in terms:
        gens = {}
        for gen in sorted({costmodel.chip_generation(o.chip) for o in tg}):
            mine = [o for o in tg if costmodel.chip_generation(o.chip) == gen]
            if len(mine) >= 2:
                gens[gen] = {"eta_bw": round(min(fit_decode(mine, overheads, attention)[0], PEAK), 4)}
        profile = replace(profile, per_generation=gens)
    if "engine" in terms or engine_moe:
        profile = replace(profile, engines=fit_engines(obs, profile, moe=engine_moe) if "engine" in terms
                          else {n: {**e, "basis": f"its MoE rows for {', '.join(e)}"} for n, e in engine_moe.items()})
    if "transport" in terms:
        fit = fit_transport(exclude_sources=exclude_sources)
        if fit["tcp_hop_latencies"] is not None:
            profile = replace(profile, tcp_hop_latencies=fit["tcp_hop_latencies"])
    if "engine" in terms and multinode_engines:   # after transport: a TCP row is usable once its hops are priced
        engines = dict(profile.engines)
        for name in multinode_engine_names(multi, profile):
            fit = fit_multinode_engine(multi, profile, name, tcp_priced="transport" in terms)
            if fit is not None:
                engines[name] = {**engines.get(name, {}), "step_overhead_s": fit["step_overhead_s"],
                                 "basis": fit["basis"]}
        profile = replace(profile, engines=engines)
    return profile


# ------------------------------------------------------------------------------ multi-node: an engine's step cost

def multinode_engine_names(multi: list[Obs], profile: Profile) -> list[str]:
    """Engines of the multi-node rows whose per-step cost no single-device row fits: not the default engine (its
    step cost is the profile's own, fitted on single devices) and no engines entry with a fitted step cost."""
    return sorted(n for n in {profile_engine(o.engine) for o in multi} - {costmodel.DEFAULT_ENGINE}
                  if "step_overhead_s" not in profile.engines.get(n, {}))


def multinode_step_rows(multi: list[Obs], name: str, tcp_priced: bool = False) -> list[Obs]:
    """The multi-node rows of engine `name` its per-step cost is fitted on: one stream's decode (batched rows are
    checks, as on single devices) with nothing cached before the generation (the cost is the intercept at zero
    depth: a deep context's attention, which the roofline under-prices, is not the engine's), over links whose
    hops the profile prices: RDMA (the verbs latency) always, TCP only with a fitted tcp_hop_latencies
    (`tcp_priced`; otherwise a Wi-Fi hop's unpriced waits would be read as the engine's cost)."""
    return [o for o in multi if o.kind == "tg" and o.batch == 1 and profile_engine(o.engine) == name
            and o.context - o.tokens / 2 <= 0.5
            and (tcp_priced or all(costmodel.link_transport(link) == "rdma" for link in row_cluster(o)[0].links))]


def fit_multinode_engine(multi: list[Obs], profile: Profile, name: str, tcp_priced: bool = False) -> dict | None:
    """Engine `name`'s step_overhead_s from its multi-node rows (multinode_step_rows), the profile fixed: the
    cost model charges step_overhead_s once per stage per engine step (Profile.overhead inside every
    StageModel step; a tensor-parallel group is one stage stepping in lockstep), so a one-stream token of a
    k-stage plan pays it k times: t = t_model + k x extra, extra by least squares on relative error (>= 0) and
    step_overhead_s = the profile's own + extra. None without a usable row. With the rows and sources it came
    from (its provenance) and each row's own per-stage residual."""
    rows = multinode_step_rows(multi, name, tcp_priced)
    if not rows:
        return None
    own = profile.step_overhead_s
    base = replace(profile, engines={**profile.engines, name: {**profile.engines.get(name, {}), "step_overhead_s": own}})
    t = np.array([o.step_s for o in rows])
    pred = np.array([o.batch / predict(o, base) for o in rows])
    k = np.array([len(row_cluster(o)[1]) for o in rows], dtype=float)   # stages a token crosses
    w = 1.0 / t
    extra = max(float(np.sum((t - pred) * k * w * w) / np.sum((k * w) ** 2)), 0.0)
    step = round(own + extra, 6)
    sources = sorted({o.source for o in rows})
    lines = ", ".join(str(o.row) for o in rows)
    short = ", ".join(s.replace("https://github.com/", "") for s in sources)
    return {"engine": name, "step_overhead_s": step, "rows": [
                {"line": o.row, "source": o.source, "plan": groups(o)["plan"], "stages": int(n),
                 "published_tok_s": o.published_tok_s, "residual_ms_per_stage": round(float(1e3 * (ti - pi) / n), 2)}
                for o, ti, pi, n in zip(rows, t, pred, k)],
            "sources": sources,
            "basis": f"step_overhead_s fitted on {len(rows)} multi-node decode rows of {name} ({MULTINODE.name} "
                     f"lines {lines}; {short}): one stream, nothing cached before the generation, "
                     f"{'RDMA or priced TCP' if tcp_priced else 'RDMA'} links; paid once per stage per engine "
                     "step (a tensor-parallel group is one stage)"}



def multinode_engine_fits(obs: list[Obs], multi: list[Obs], terms: tuple[str, ...] = DEFAULT_TERMS,
                          per_chip: bool = True) -> dict:
    """Provenance of each engine step cost fitted on multi-node rows (fit_multinode_engine): the value the profile
    fitted on `obs` + `multi` carries, with its rows and sources, and the value each leave-one-source-out fit
    used (fitted on the other sources' multi-node rows only)."""
    out = {"method": "t = t_model + stages x extra on one-stream decode rows at zero depth over RDMA (or priced "
                     "TCP) links, least squares on relative error; step_overhead_s = the profile's own + extra, "
                     "paid once per stage per engine step", "engines": {}}
    if "engine" not in terms:
        return out
    base = fit_profile(obs + multi, per_chip=per_chip, terms=terms, multinode_engines=False)
    for name in multinode_engine_names(multi, base):
        fit = fit_multinode_engine(multi, base, name, tcp_priced="transport" in terms)
        if fit is None:
            continue
        held = {}
        for source in sorted({o.source for o in multi}):
            rest = fit_profile([o for o in obs + multi if o.source != source], per_chip=per_chip, terms=terms,
                               exclude_sources=(source,))
            held[source] = rest.engines.get(name, {}).get("step_overhead_s")
        out["engines"][name] = {**fit, "held_out_step_overhead_s": held}
    return out

# ------------------------------------------------------------------------------------ multi-node: transports

def row_link_kind(text: str, chip: Chip) -> str | None:
    """The catalog link kind a multi-node row's `link` cell names (None: not stated well enough, e.g.
    "Ethernet" without its speed)."""
    t = text.lower()
    if "rdma" in t:
        return "tb5-rdma"
    if "wi-fi" in t or "wifi" in t:
        return "wifi"
    if "thunderbolt" in t:
        return "tb5-tcp" if "5" in chip.thunderbolt else "tb4-tcp"
    for kind in ("10gbe", "2.5gbe", "1gbe"):
        if kind.replace("gbe", "") + " gb" in t or kind in t:
            return kind
    return None


def transport_pairs(path: str | Path = MULTINODE, exclude_sources: tuple[str, ...] = ()) -> list[dict]:
    """Published pairs that differ only in the link: the same source, model, node count and pipeline, one
    stream. Their per-token time difference is the hops' difference, whatever the model: a pipeline of n
    nodes makes n hops a token (n - 1 activations forward, the token id back). Sources in `exclude_sources`
    (one held out by leave-one-source-out) give no pair."""
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if _num(r["tg_tok_s"]) and (_num(r["concurrency"]) or 1) == 1
                and r["strategy"] == "pipeline" and r["confidence"] in ("medium", "high")
                and source_key(r["source"]) not in exclude_sources]
    kinds = catalog.link_kinds()
    pairs = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            same = all(a[k] == b[k] for k in ("model", "nodes", "chip", "gen_tokens", "context_depth"))
            if not same or source_key(a["source"]) != source_key(b["source"]) or a["link"] == b["link"]:
                continue
            chip = catalog.find_chip(a["chip"])
            ka, kb = row_link_kind(a["link"], chip), row_link_kind(b["link"], chip)
            if ka is None or kb is None:
                continue
            slow, fast = (a, b) if _num(a["tg_tok_s"]) < _num(b["tg_tok_s"]) else (b, a)
            ks, kf = (ka, kb) if slow is a else (kb, ka)
            pairs.append({"source": source_key(a["source"]), "model": a["model"], "nodes": int(_num(a["nodes"])),
                          "slow_link": ks, "fast_link": kf, "slow_tok_s": _num(slow["tg_tok_s"]),
                          "fast_tok_s": _num(fast["tg_tok_s"]), "slow_latency_us": kinds[ks]["latency_us"],
                          "fast_latency_us": kinds[kf]["latency_us"]})
    return pairs


def fit_transport(path: str | Path = MULTINODE, exclude_sources: tuple[str, ...] = ()) -> dict:
    """tcp_hop_latencies from the link-only pairs: per hop, t_slow - t_fast = k lat_slow - cost_fast, with
    cost_fast the RDMA latency (or k lat_fast for a TCP fast side); least squares over the pairs. None
    without a usable pair. Also each pair's own k and what the fit implies for a Thunderbolt-bridge TCP hop."""
    pairs = transport_pairs(path, exclude_sources)
    ks = []
    for p in pairs:
        per_hop_us = (1.0 / p["slow_tok_s"] - 1.0 / p["fast_tok_s"]) * 1e6 / p["nodes"]
        if p["fast_link"].endswith("rdma"):
            k = (per_hop_us + p["fast_latency_us"]) / p["slow_latency_us"]
        else:
            k = per_hop_us / (p["slow_latency_us"] - p["fast_latency_us"])
        p["tcp_hop_latencies"] = round(k, 2)
        ks.append(k)
    k = round(float(np.clip(np.mean(ks), 1.0, 100.0)), 2) if ks else None
    tb = catalog.link_kinds()["tb5-tcp"]["latency_us"]
    return {"tcp_hop_latencies": k, "pairs": pairs,
            "implied_tb_tcp_hop_us": round(k * tb, 0) if k else None,
            "method": "pipeline pairs of one source that differ only in the link; n hops a token"}


GENERATIONS = ("M1", "M2", "M3", "M4", "M5")


def generation_table(profile: Profile, obs: list[Obs]) -> dict:
    """per_generation as written to a profile: each generation's fitted factors with their basis, and for a
    generation without rows the flag that its chips are priced on estimates."""
    out = {}
    for gen in GENERATIONS:
        rows = [o for o in obs if costmodel.chip_generation(o.chip) == gen and o.batch == 1]
        entry = dict(profile.per_generation.get(gen, {}))
        if entry:
            entry["basis"] = (f"fitted on {sum(o.kind == 'tg' for o in rows)} decode rows of "
                              f"{', '.join(sorted({o.chip.name for o in rows}))}")
        else:
            entry["basis"] = "estimated: no rows of this generation in the fit, its chips use the global factors"
        if gen == "M5":
            entry["basis"] += ("; M5 TFLOPS are derived (cores x 256 x clock) and its GPU Neural Accelerators "
                               "(matmul units) are not modelled, so M5 prefill is an estimate")
        out[gen] = entry
    return out


def row_cluster(o: Obs):
    """A multi-node row's run as the planner prices it: (cluster, stage models). o.nodes Macs of the row's chip,
    every pair on the row's link kind; pipeline: one stage a Mac, the layers split evenly in ring order (the
    first stages take the remainder); tensor: one tensor-parallel group of every Mac over all layers."""
    kind = catalog.link_kinds()[o.link]
    mem = o.mem_gb or o.chip.max_mem_gb
    nodes = tuple(Node(f"n{i}", o.chip, mem, catalog.default_usable_fraction(mem)) for i in range(o.nodes))
    links = tuple(Link(a.name, b.name, o.link, float(kind["latency_us"]), float(kind["bandwidth_gbps"]))
                  for i, a in enumerate(nodes) for b in nodes[i + 1:])
    cluster = Cluster(f"{o.nodes}x {o.chip.label} {o.link}", nodes, links)
    L = o.model.num_layers
    if o.strategy == "tensor":
        groups, splits = [tuple(n.name for n in nodes)], [L]
    else:
        q, r = divmod(L, o.nodes)
        groups, splits = [(n.name,) for n in nodes], [q + (i < r) for i in range(o.nodes)]
    stages, start = [], 0
    for g, n in zip(groups, splits):
        stages.append(Stage(nodes=g, layer_start=start, layer_end=start + n, tp_degree=len(g)))
        start += n
    plan = PartitionPlan(strategy=o.strategy, objective="latency", cluster=cluster.name, model=o.model.name,
                         quant_bits=o.model.quant_bits, num_layers=L, stages=tuple(stages))
    return cluster, costmodel.stage_models(cluster, o.model, plan)


def _predict_multinode(o: Obs, profile: Profile) -> float:
    """Tokens/s of a multi-node row with the planner's pricing. Decode: `batch` concurrent streams split into one
    micro-batch per stage (fewer with fewer streams); a token round is the longer of one micro-batch's trip
    through every stage (each step with its outgoing hop) and the bottleneck stage serving every micro-batch
    (costmodel.pipeline_round_s, as costmodel.concurrent_decode); the aggregate rate is streams / round. Prefill:
    the prompt through every stage in turn plus its forward hops."""
    cluster, stages = row_cluster(o)
    if o.kind == "pp":
        fwd, _ = costmodel.hop_links(cluster, stages)
        t = sum(st.prefill_s(o.model, profile, o.tokens, int(o.context)) for st in stages)
        t += sum(costmodel.link_time(link, o.model.activation_bytes(o.tokens), profile) for link in fwd)
        return o.tokens / t
    micro = min(len(stages), o.batch)
    per_micro = -(-o.batch // micro)
    steps = costmodel.decode_steps_s(cluster, o.model, stages, profile, per_micro, o.context)
    return o.batch / costmodel.pipeline_round_s(steps, micro)


def predict(o: Obs, profile: Profile) -> float:
    """Predicted tokens/s for an observation, with the cost model's own functions."""
    L, profile = o.model.num_layers, row_profile(o, profile)
    if o.nodes > 1:
        return _predict_multinode(o, profile)
    if o.kind == "pp":
        return o.tokens / costmodel.prefill_time(o.chip, profile, o.model, 0, L, o.tokens, int(o.context),
                                                 with_head=True)
    return o.batch / costmodel.decode_time(o.chip, profile, o.model, 0, L, o.batch, o.context, with_head=True)


def error_table(obs: list[Obs], profile: Profile) -> list[dict]:
    rows = []
    for o in obs:
        pred = predict(o, profile)
        rows.append({"line": o.row, "kind": o.kind, "engine": o.engine, "model": o.model_name, "quant": o.quant,
                     "chip": o.chip.label, "batch": o.batch, "tokens": o.tokens, "context": o.context,
                     "published_tok_s": o.published_tok_s, "predicted_tok_s": round(pred, 2),
                     "error_pct": round(100.0 * (pred - o.published_tok_s) / o.published_tok_s, 1),
                     "fitted": o.batch == 1 and o.nodes == 1, "nodes": o.nodes, "link": o.link,
                     "strategy": o.strategy, "confidence": o.confidence, "source": o.source,
                     **groups(o)})
    return rows


def engine_family(engine: str) -> str:
    """The engine a row ran on, without build or front-end details ("llama.cpp (Metal,BLAS)" -> "llama.cpp")."""
    e = engine.lower()
    for name in ("llama.cpp", "vllm-mlx", "exo", "mlx"):
        if name in e:
            return name
    return e.split()[0] if e.split() else "(unknown)"


def groups(o: Obs) -> dict:
    """The dimensions the leave-one-source-out error is broken down by."""
    return {"engine_family": engine_family(o.engine), "generation": o.chip.name.split()[0],
            "arch": "MoE" if o.model.moe else "dense", "topology": "single" if o.nodes == 1 else "multi-node",
            "plan": "single device" if o.nodes == 1 else f"{o.strategy} x{o.nodes} over {o.link}"}


# ------------------------------------------------------------------------------------ leave-one-source-out

BREAKDOWN = (("engine", "engine_family"), ("chip generation", "generation"), ("dense/MoE", "arch"),
             ("nodes", "topology"), ("plan", "plan"))


def leave_one_source_out(obs: list[Obs], per_chip: bool = True, base: Profile | None = None,
                         terms: tuple[str, ...] = DEFAULT_TERMS, multinode_engines: bool = True,
                         sources: set[str] | None = None) -> tuple[list[dict], list[str]]:
    """Each source held out in turn: refit on every other source, predict the held-out batch-1 rows.

    A source is one publication (its first URL), so rows sharing a methodology are held out together and
    the error says how the model does on a publication it has not seen. Sources whose removal leaves no
    decode or no prefill row to fit are listed as not held out. `sources`: hold out only these (all: None);
    multinode_engines=False: the fits without the multi-node engine step cost (fit_profile).
    """
    rows, notes = [], []
    for source in sorted({o.source for o in obs} if sources is None else set(sources)):
        held = [o for o in obs if o.source == source and o.batch == 1]
        if not held:
            continue
        try:
            profile = fit_profile([o for o in obs if o.source != source], per_chip=per_chip, base=base, terms=terms,
                                  exclude_sources=(source,), multinode_engines=multinode_engines)
        except UserError as exc:
            notes.append(f"{source}: not held out ({exc})")
            continue
        rows.extend(error_table(held, profile))
    return rows, notes


def _medians(rows: list[dict]) -> dict:
    out = {}
    for kind, label in (("tg", "decode"), ("pp", "prefill")):
        errs = [abs(r["error_pct"]) for r in rows if r["kind"] == kind]
        out[f"{label}_rows"] = len(errs)
        out[f"{label}_median_abs_error_pct"] = round(float(np.median(errs)), 1) if errs else None
    return out


def loso_summary(rows: list[dict], notes: list[str]) -> dict:
    """Median |error| of the held-out predictions: overall, per breakdown dimension, and per source."""
    out = {"overall": _medians(rows), "method": "each source held out in turn, profile refitted on the rest "
           "(per-chip factors only from other sources), batch-1 rows of the held-out source predicted",
           "not_held_out": notes}
    for _, key in BREAKDOWN:
        out[key] = {v: _medians([r for r in rows if r[key] == v]) for v in sorted({r[key] for r in rows})}
    out["source"] = {s: _medians([r for r in rows if r["source"] == s]) for s in sorted({r["source"] for r in rows})}
    return out


def error_summary(table: list[dict]) -> dict:
    """Mean and max absolute % error per kind, over fitted (batch 1) rows and over batched check rows."""
    out = {}
    for kind in ("tg", "pp"):
        for fitted in (True, False):
            errs = [abs(r["error_pct"]) for r in table if r["kind"] == kind and r["fitted"] == fitted]
            if errs:
                key = f"{kind}_{'batch1' if fitted else 'batched_check'}"
                out[key] = {"rows": len(errs), "mean_abs_error_pct": round(float(np.mean(errs)), 1),
                            "median_abs_error_pct": round(float(np.median(errs)), 1),
                            "max_abs_error_pct": round(float(np.max(errs)), 1)}
    return out


# the named terms a profile file carries where the fit moved them off their neutral default
NAMED_TERMS = ("expert_eta", "expert_fill_tokens", "attn_eta_bw", "attn_mu", "tcp_hop_latencies")


def profile_json(profile: Profile, summary: dict, summary_global: dict, skipped: int,
                 loso: dict | None = None, generations: dict | None = None) -> dict:
    return {"name": profile.name, "source": profile.source,
            "eta_bw": profile.eta_bw, "mu_compute": profile.mu_compute, "step_overhead_s": profile.step_overhead_s,
            "layer_overhead_s": profile.layer_overhead_s,
            "link_overhead_us": profile.link_overhead_us, "ssd_gbs": profile.ssd_gbs,
            "ssd_basis": "kept from default.json (not in the calibration data)",
            "link_basis": "link_overhead_us kept from default.json (single-device data cannot fit it)",
            "per_chip": profile.per_chip,
            **{k: getattr(profile, k) for k in NAMED_TERMS
               if getattr(profile, k) != costmodel.Profile.__dataclass_fields__[k].default},
            **({"moe_basis": MOE_BASIS} if profile.expert_eta != 1.0 or profile.expert_fill_tokens else {}),
            **({"engines": profile.engines} if profile.engines else {}),
            **({"per_generation": generations} if generations else {}),
            "fit": {"errors_with_per_chip": summary, "errors_global_only": summary_global,
                    "leave_one_source_out": loso or {},
                    "rows_skipped": skipped, "method": "weighted least squares on relative step-time error; "
                    "batched rows are checks, not fitted"}}


MOE_BASIS = ("expert_eta and expert_fill_tokens fitted on the MoE rows (global factors fixed, so dense rows price "
             "as without them): experts touched per engine chunk E(1-(1-k/E)^T), uniform top-k routing")


def write_profile(data: dict, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path
