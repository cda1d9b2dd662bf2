"""Fit this host's cost-model profile to measured engine steps (steps.parquet of real runs).

Each single-forward decode or prefill row of a stage is one equation (harness.costmodel's own step model):

    compute_s = overlapped(mem / eta_bw, comp x (1 + ramp / T) / mu_compute, 1 - overlap)
                + step_overhead_s + layers x layer_overhead_s + seqs x layers x seq_layer_overhead_s

mem = the forward's bytes over the chip's peak bandwidth, comp = its FLOPs over the chip's peak FLOP/s (both the
cost model's own work, via StageModel), T = the forward's tokens (prefill only: decode forwards get no ramp),
seqs = its sequences. For a fixed (overlap, ramp) and a fixed choice of which roofline side is the larger in each
row, the equation is linear in (1/eta, 1/mu, the three overheads): a non-negative least squares on relative error
(rows weighted by 1/measured) solves it, and the choice of sides is iterated to a fixed point. (overlap, ramp) come
from a grid, refined around the best point. Terms the data cannot determine are held at the base profile:
mu_compute and the ramp without prefill rows, the ramp with prompts of one length (RAMP_SPREAD), eta_bw without
decode rows, the overlap without both kinds, the per-layer overhead with one layer count only, the per-sequence
overhead with one sequence count only.

Small-batch decode on a CPU is not linear in the batch (GEMM kernels by row count), so the fit also finds
decode_batch_scale: each decode row's prediction is multiplied by its batch size's entry, the entries are the
median measured / predicted ratio by batch size relative to the smallest batch (1 where it has rows), and the
coefficients are solved again with them, a few rounds (BATCH_SCALE_ROUNDS).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from harness import costmodel
from harness.costmodel import Profile
from harness.specs import UserError
from harness.validation import components

COEFS = ("inv_eta", "inv_mu", "step_overhead_s", "layer_overhead_s", "seq_layer_overhead_s")
RATES = ("inv_eta", "inv_mu")          # must stay > 0: a free resource is not a physical answer
OVERLAP_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
RAMP_GRID = (0.0, 16.0, 32.0, 64.0, 128.0, 256.0)
MAX_SIDE_ITERATIONS = 20


@dataclass(frozen=True)
class Rows:
    """The fit's equations: one entry per single-forward measured row."""
    mem: np.ndarray        # bytes / peak bandwidth (s)
    comp: np.ndarray       # FLOPs / peak FLOP/s (s)
    tokens: np.ndarray     # tokens of the forward for the ramp (0 for decode: no ramp)
    layers: np.ndarray
    seqs: np.ndarray
    measured: np.ndarray   # compute_s
    prefill: np.ndarray    # bool
    scale: np.ndarray | None = None   # each row's decode_batch_scale entry; None: all 1

    def __post_init__(self):
        if self.scale is None:
            object.__setattr__(self, "scale", np.ones(len(self.measured)))


# ----------------------------------------------------------------------------------------------- equations
def sample_rows(steps: pd.DataFrame, plan, model, cluster, base: Profile) -> Rows:
    """The equations of one run's steps on its plan."""
    stages = costmodel.stage_models(cluster, model, plan)
    picked = components.single_forward_rows(steps)
    cols = [_row_terms(r, stages, model, base) for r in picked.itertuples()]
    arr = np.array(cols, dtype=float).reshape(-1, 6)
    return Rows(mem=arr[:, 0], comp=arr[:, 1], tokens=arr[:, 2], layers=arr[:, 3], seqs=arr[:, 4],
                measured=arr[:, 5], prefill=(picked["kind"] == "prefill").to_numpy())


def _row_terms(r, stages, model, base: Profile) -> tuple:
    if not 0 <= int(r.stage) < len(stages):
        raise UserError(f"steps name stage {int(r.stage)} but the plan has {len(stages)} stage(s)")
    st = stages[int(r.stage)]
    chip = st.chips[0]
    if r.kind == "decode":
        terms = st.decode_terms(model, base, int(r.batch_size))
        ctx = components.context_sum(r, st)
        nbytes, flops, tokens = terms.nbytes + ctx * terms.kv_bytes, terms.flops + ctx * terms.attn_flops, 0
    else:
        (nbytes, flops), tokens = st.prefill_work(model, int(r.tokens), 0, int(r.batch_size)), int(r.tokens)
    return (nbytes / (chip.mem_bw_gbs * 1e9), flops / (chip.fp16_tflops * 1e12), tokens, st.end - st.start,
            int(r.batch_size), float(r.compute_s))


def concat_rows(parts: list[Rows]) -> Rows:
    if not parts or sum(len(p.measured) for p in parts) == 0:
        raise UserError("no single-forward decode or prefill steps with a measured compute_s to fit")
    return Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in Rows.__dataclass_fields__))


def ramped(rows: Rows, ramp: float) -> np.ndarray:
    """Compute time at full efficiency, stretched by the ramp of each forward's tokens."""
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(rows.tokens > 0, 1.0 + ramp / rows.tokens, 1.0)
    return rows.comp * factor


def design(rows: Rows, comp: np.ndarray, exposed: float, memory_larger: np.ndarray) -> np.ndarray:
    """Columns for COEFS given which roofline side is the larger in each row."""
    x_mem = rows.mem * np.where(memory_larger, 1.0, exposed)
    x_comp = comp * np.where(memory_larger, exposed, 1.0)
    cols = np.column_stack([x_mem, x_comp, np.ones_like(rows.mem), rows.layers, rows.seqs * rows.layers])
    return cols * rows.scale[:, None]


def predict(rows: Rows, coef: np.ndarray, exposed: float, ramp: float) -> np.ndarray:
    """The cost model's step time for every row (the true max/min, not the linearised sides)."""
    m, c = rows.mem * coef[0], ramped(rows, ramp) * coef[1]
    t = np.maximum(m, c) + exposed * np.minimum(m, c) + coef[2] + coef[3] * rows.layers + coef[4] * rows.seqs * rows.layers
    return t * rows.scale


# ----------------------------------------------------------------------------------------------- solving
def nnls(a: np.ndarray, b: np.ndarray, must: tuple[int, ...] = ()) -> np.ndarray:
    """Non-negative least squares by trying every column subset (at most 5 columns) that keeps `must`:
    the optimum is the unconstrained solution on its own support."""
    n, best, best_res = a.shape[1], None, np.inf
    for k in range(n, 0, -1):
        for cols in itertools.combinations(range(n), k):
            if not set(must) <= set(cols):
                continue
            sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.all(sol >= 0):
                res = float(np.sum((a[:, cols] @ sol - b) ** 2))
                if res < best_res:
                    best, best_res = (cols, sol), res
    if best is None and must:   # no solution keeps every rate positive: the plain non-negative one
        return nnls(a, b)
    coef = np.zeros(n)
    if best is not None:
        coef[list(best[0])] = best[1]
    return coef


def solve_at(rows: Rows, overlap: float, ramp: float, free: np.ndarray, base_coef: np.ndarray) -> tuple[np.ndarray, float]:
    """(coefficients, sum of squared relative errors) at one (overlap, ramp), sides iterated to a fixed point."""
    exposed, comp, w = 1.0 - overlap, ramped(rows, ramp), 1.0 / rows.measured
    coef, seen, best = base_coef.copy(), set(), (base_coef, np.inf)
    must = tuple(i for i, name in enumerate(np.array(COEFS)[free]) if name in RATES)
    for _ in range(MAX_SIDE_ITERATIONS):
        larger = rows.mem * coef[0] >= comp * coef[1]
        key = larger.tobytes()
        if key in seen:
            break
        seen.add(key)
        x = design(rows, comp, exposed, larger)
        target = rows.measured - x[:, ~free] @ base_coef[~free]
        coef = base_coef.copy()
        coef[free] = nnls(x[:, free] * w[:, None], target * w, must)
        res = float(np.sum(((predict(rows, coef, exposed, ramp) - rows.measured) * w) ** 2))
        if res < best[1]:
            best = (coef, res)
    return best


IDENTIFY_ORDER = (0, 1, 4, 2, 3)   # rates first, then the per-sequence, fixed and per-layer overheads
MIN_INDEPENDENT = 0.02             # share of a column's norm the columns before it must leave unexplained


RAMP_SPREAD = 2.0   # the prefill ramp needs forwards whose token counts differ by this factor (10th to 90th pct)


def free_terms(rows: Rows) -> dict:
    """Which unknowns these rows determine (see the module docstring)."""
    has_pre, has_dec = bool(rows.prefill.any()), bool((~rows.prefill).any())
    free = identifiable_columns(rows, {0: has_dec, 1: has_pre})
    return {**{name: bool(free[i]) for i, name in enumerate(COEFS)},
            "overlap": has_pre and has_dec, "prefill_ramp_tokens": has_pre and ramp_identifiable(rows)}


def ramp_identifiable(rows: Rows) -> bool:
    """Prompts of one length cannot tell the ramp from mu_compute (1 + ramp / T is a constant): a fit that picks
    one anyway prices a batch of prompts (more tokens per forward) as cheaper than it is, so the ramp is held at
    the base profile unless the prefill forwards span RAMP_SPREAD in tokens."""
    low, high = np.percentile(rows.tokens[rows.prefill], [10, 90])
    return bool(low > 0 and high / low >= RAMP_SPREAD)


def identifiable_columns(rows: Rows, allowed: dict) -> np.ndarray:
    """Columns (in IDENTIFY_ORDER) that the ones taken before them do not explain: one model on one stage has
    near-constant weight bytes, so its fixed overhead and its bandwidth cannot be told apart, and the first
    (the bandwidth) is kept while the overhead stays at the base profile."""
    x = design(rows, rows.comp, 1.0, np.ones(len(rows.mem), bool)) / rows.measured[:, None]
    taken: list[int] = []
    for i in IDENTIFY_ORDER:
        col = x[:, i]
        if not allowed.get(i, True) or not np.any(col):
            continue
        rest = col - x[:, taken] @ np.linalg.lstsq(x[:, taken], col, rcond=None)[0] if taken else col
        if np.linalg.norm(rest) > MIN_INDEPENDENT * np.linalg.norm(col):
            taken.append(i)
    return np.isin(np.arange(len(COEFS)), taken)


def base_coefficients(base: Profile) -> np.ndarray:
    return np.array([1.0 / base.eta_bw, 1.0 / base.mu_compute, base.step_overhead_s, base.layer_overhead_s,
                     base.seq_layer_overhead_s])


def refine(values: tuple, best: float, low: float, high: float, fine: bool) -> tuple:
    """A finer grid around the best coarse value."""
    if not fine:
        return values
    if high == 1.0:   # the overlap: linear steps
        return tuple(np.clip(best + np.arange(-0.125, 0.126, 0.025), low, high))
    return tuple(best * np.geomspace(0.5, 2.0, 13)) if best > 0 else (0.0, 2.0, 4.0, 8.0)


def grid_search(rows: Rows, base: Profile, free: dict) -> dict:
    """The best (overlap, ramp, coefficients, residual) over a coarse grid, then a finer one around its best."""
    mask, base_coef = np.array([free[c] for c in COEFS]), base_coefficients(base)
    overlaps = OVERLAP_GRID if free["overlap"] else (base.overlap,)
    ramps = RAMP_GRID if free["prefill_ramp_tokens"] else (base.prefill_ramp_tokens,)
    best = _best_of(rows, overlaps, ramps, mask, base_coef)
    fine_o = refine(overlaps, best["overlap"], 0.0, 1.0, free["overlap"])
    fine_r = refine(ramps, best["prefill_ramp_tokens"], 0.0, np.inf, free["prefill_ramp_tokens"])
    finer = _best_of(rows, fine_o, fine_r, mask, base_coef)
    return finer if finer["residual"] < best["residual"] else best


def _best_of(rows, overlaps, ramps, mask, base_coef) -> dict:
    best = None
    for ov, ramp in itertools.product(overlaps, ramps):
        coef, res = solve_at(rows, float(ov), float(ramp), mask, base_coef)
        if best is None or res < best["residual"]:
            best = {"overlap": float(ov), "prefill_ramp_tokens": float(ramp), "coef": coef, "residual": res}
    return best


def bounded_rates(rows: Rows, best: dict, base_coef: np.ndarray) -> dict:
    """A rate whose roofline side never binds (full overlap, the other side larger in every row) comes out of
    the solve as 0, i.e. an infinitely fast resource; the data only say it is at least so fast that it never
    binds. It gets the slowest such value, never slower than the base profile's: the fitted rows' times are
    unchanged, and a larger model or batch on this host is not priced as free bandwidth."""
    coef, comp = best["coef"].copy(), ramped(rows, best["prefill_ramp_tokens"])
    if best["overlap"] < 1.0:   # min(mem, comp) is charged: both sides are seen
        return best
    with np.errstate(divide="ignore", invalid="ignore"):
        if coef[0] == 0 and coef[1] > 0:
            coef[0] = min(base_coef[0], float(np.min(np.where(rows.mem > 0, comp * coef[1] / rows.mem, np.inf))))
        if coef[1] == 0 and coef[0] > 0:
            coef[1] = min(base_coef[1], float(np.min(np.where(comp > 0, rows.mem * coef[0] / comp, np.inf))))
    return {**best, "coef": coef}


BATCH_SCALE_ROUNDS = 3
MIN_BATCH_ROWS = 3      # decode rows a batch size needs for its own decode_batch_scale entry


def fit_with_batch_scale(rows: Rows, base: Profile, free: dict) -> tuple[dict, tuple]:
    """The grid-search fit, then rounds of (decode_batch_scale from its ratios, the fit again with it); the table
    is kept only where it lowers the residual."""
    base_coef = base_coefficients(base)
    best, table = bounded_rates(rows, grid_search(rows, base, free), base_coef), ()
    for _ in range(BATCH_SCALE_ROUNDS):
        new = batch_scale_table(rows, best)
        if not new:
            break
        scaled = with_batch_scale(rows, new)
        trial = bounded_rates(scaled, grid_search(scaled, base, free), base_coef)
        if trial["residual"] >= best["residual"]:
            break
        best, table = trial, new
    return best, table


def batch_scale_table(rows: Rows, best: dict) -> tuple:
    """decode_batch_scale for batch 1 .. the largest seen: the median measured / unscaled prediction of each batch
    size's decode rows over the smallest size's, sizes without MIN_BATCH_ROWS rows interpolated; () when fewer
    than two sizes have enough rows. `rows` are unscaled (sample_rows)."""
    ratio = rows.measured / predict(rows, best["coef"], 1.0 - best["overlap"], best["prefill_ramp_tokens"])
    decode = ~rows.prefill
    seen = {}
    for b in np.unique(rows.seqs[decode]):    # a decode row's sequences are its batch
        pick = decode & (rows.seqs == b)
        if pick.sum() >= MIN_BATCH_ROWS:
            seen[int(b)] = float(np.median(ratio[pick]))
    if len(seen) < 2:
        return ()
    sizes = sorted(seen)
    table = np.interp(np.arange(1, sizes[-1] + 1), sizes, [seen[b] / seen[sizes[0]] for b in sizes])
    return tuple(_sig(float(v), 4) for v in table)


def with_batch_scale(rows: Rows, table: tuple) -> Rows:
    """The rows with every decode row scaled by its batch size's entry (past the table: the last one)."""
    idx = np.clip(rows.seqs.astype(int), 1, len(table)) - 1
    return replace(rows, scale=np.where(rows.prefill, 1.0, np.asarray(table)[idx]))


# ----------------------------------------------------------------------------------------------- profile
def fitted_profile(base: Profile, best: dict, chips: set[str], source: str) -> Profile:
    """The base profile with the fitted terms; per-chip overrides of the fitted chips dropped (they would hide
    the fitted values)."""
    c = best["coef"]
    return replace(base, name="fitted-host", source=source, eta_bw=_sig(1.0 / c[0]), mu_compute=_sig(1.0 / c[1]),
                   step_overhead_s=_sig(c[2]), layer_overhead_s=_sig(c[3]), seq_layer_overhead_s=_sig(c[4]),
                   overlap=round(best["overlap"], 4), prefill_ramp_tokens=_sig(best["prefill_ramp_tokens"]),
                   per_chip={k: v for k, v in base.per_chip.items() if k not in chips})


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def fit_host_profile(samples, base: Profile, names: list[str] | None = None,
                     source: str = "fitted: harness.validation.fit") -> tuple[Profile, dict]:
    """Fit eta_bw, mu_compute, the overheads, the overlap and the prefill ramp to real step records.

    samples: [(steps DataFrame, PartitionPlan, ModelSpec, Cluster), ...]. Returns the profile and a report
    with the fitted and held terms and the in-sample component errors (measured vs fitted cost model)."""
    if not samples:
        raise UserError("fit_host_profile needs at least one (steps, plan, model, cluster) sample")
    rows = concat_rows([sample_rows(s, p, m, c, base) for s, p, m, c in samples])
    free = free_terms(rows)
    best, table = fit_with_batch_scale(rows, base, free)
    chips = {n.chip.name for _, _, _, c in samples for n in c.nodes}
    profile = replace(fitted_profile(base, best, chips, source), iteration_gap_s=_sig(iteration_gap_s(samples)),
                      decode_batch_scale=table)
    names = names or [f"sample {i}" for i in range(len(samples))]
    report = {"method": "NNLS on relative step-time error over a grid of overlap x prefill_ramp_tokens "
                        "(harness.validation.fit)",
              "rows": int(len(rows.measured)), "prefill_rows": int(rows.prefill.sum()),
              "rms_relative_error_pct": float(np.sqrt(best["residual"] / len(rows.measured)) * 100),
              "fitted": sorted(k for k, v in _profile_terms(free).items() if v),
              "held_at_base": sorted(k for k, v in _profile_terms(free).items() if not v),
              "decode_ramp": "not applied: decode forwards price compute at mu_compute (T = batch is no GEMM)",
              "in_sample": point_components(samples, names, profile)}
    return profile, report


def _profile_terms(free: dict) -> dict:
    rename = {"inv_eta": "eta_bw", "inv_mu": "mu_compute"}
    return {rename.get(k, k): v for k, v in free.items()}


def point_components(samples, names: list[str], profile: Profile) -> list[dict]:
    """Component errors of every sample with the profile, each row tagged with its point's name."""
    return [{"point": name, **row} for name, (s, p, m, c) in zip(names, samples)
            for row in components.component_errors(s, p, m, c, profile)]


# ----------------------------------------------------------------------------------------------- run folders
VALIDATION_KEYS = ("topology", "level", "cluster", "model_config", "model_name", "quant_bits")


def expand_point_dirs(dirs) -> list[Path]:
    """Run folders as given, or the points/*/ of a validate (or sweep) top folder."""
    out = []
    for d in map(Path, dirs):
        pts = sorted(p for p in (d / "points").glob("*") if (p / "config.json").exists())
        if pts:
            out.extend(pts)
        elif (d / "config.json").exists():
            out.append(d)
        else:
            raise UserError(f"{d}: neither a run folder (config.json) nor a folder with points/*/config.json")
    return out


def load_point(point_dir: Path) -> tuple[dict, tuple]:
    """(its validation object, (steps, plan, model, cluster)) of one real point folder."""
    from harness.catalog import parse_cluster
    from harness.specs import PartitionPlan, model_from_config
    v = _validation_object(point_dir)
    for name in ("steps.parquet", "plan.json"):
        if not (point_dir / name).exists():
            raise UserError(f"{point_dir}: {name} is missing (a real run folder has it beside config.json)")
    plan = PartitionPlan.from_dict(json.loads((point_dir / "plan.json").read_text()))
    group = int((v["model_config"].get("quantization") or {}).get("group_size", 64))
    model = model_from_config(v["model_config"], v["model_name"], quant_bits=int(v["quant_bits"]), group_size=group,
                              origin=f"{point_dir}/config.json validation.model_config")
    cluster = parse_cluster(resolve_host_profiles(v["cluster"], point_dir), origin=f"{point_dir}/config.json")
    return v, (pd.read_parquet(point_dir / "steps.parquet"), plan, model, cluster)


def _validation_object(point_dir: Path) -> dict:
    try:
        v = json.loads((point_dir / "config.json").read_text()).get("validation")
    except (OSError, ValueError) as exc:
        raise UserError(f"{point_dir}/config.json: cannot be read as JSON ({exc})") from exc
    if not isinstance(v, dict):
        raise UserError(f"{point_dir}/config.json: no \"validation\" object (written by `harness validate`)")
    missing = [k for k in VALIDATION_KEYS if k not in v]
    if missing:
        raise UserError(f"{point_dir}/config.json: validation object lacks {', '.join(missing)}")
    return v


def resolve_host_profiles(cluster: dict, point_dir: Path) -> dict:
    """The cluster with relative host_profile paths made absolute: beside the point, or in the validate
    folder's hosts/ (where `harness validate` keeps them)."""
    def absolute(ref: str) -> str:
        for cand in (Path(ref), point_dir / ref, point_dir.parent.parent / "hosts" / Path(ref).name):
            if cand.exists():
                return str(cand.resolve())
        raise UserError(f"{point_dir}: host_profile {ref} not found beside the point nor in ../../hosts/")
    nodes = [{**n, "host_profile": absolute(n["host_profile"])} if n.get("host_profile") else n
             for n in cluster.get("nodes", [])]
    return {**cluster, "nodes": nodes}


def parse_hold_out(items) -> dict | None:
    """--hold-out level=0.9 topology=2-rank -> {"level": "0.9", "topology": "2-rank"}."""
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in ("topology", "level") or not value:
            raise UserError(f"--hold-out {item!r}: expected topology=NAME or level=VALUE")
        out[key] = value
    return out


def held_out(v: dict, hold_out: dict | None) -> bool:
    """A point is held out when it matches every given key (levels compare as numbers when they are)."""
    return bool(hold_out) and all(_same(v.get(k), want) for k, want in hold_out.items())


def _same(have, want) -> bool:
    try:
        return float(have) == float(want)
    except (TypeError, ValueError):
        return str(have) == str(want)


def load_points(point_dirs) -> list[tuple]:
    """(folder, validation object, sample) of every real point under the given folders."""
    return [(p, *load_point(p)) for p in expand_point_dirs(point_dirs)]


def fit_from_points(point_dirs, base: Profile, hold_out: dict | None = None, loaded=None) -> tuple[Profile, dict]:
    """Fit on the real points not held out; report the held-out points' component errors separately."""
    loaded = loaded if loaded is not None else load_points(point_dirs)
    fit_on = [(p, s) for p, v, s in loaded if not held_out(v, hold_out)]
    kept = [(p, s) for p, v, s in loaded if held_out(v, hold_out)]
    if not fit_on:
        raise UserError(f"every point matches --hold-out {hold_out}; nothing is left to fit")
    source = "fitted: calibrate --from " + " ".join(str(d) for d in point_dirs)
    profile, report = fit_host_profile([s for _, s in fit_on], base, [p.name for p, _ in fit_on], source)
    report["hold_out"] = hold_out or {}
    report["held_out"] = point_components([s for _, s in kept], [p.name for p, _ in kept], profile)
    return profile, report


FITTED_KEYS = ("eta_bw", "mu_compute", "step_overhead_s", "layer_overhead_s", "seq_layer_overhead_s", "overlap",
               "prefill_ramp_tokens", "iteration_gap_s", "decode_batch_scale")


def fit_per_chip(point_dirs, base: Profile, hold_out: dict | None = None) -> tuple[Profile, dict]:
    """fit_from_points over every point for the global factors, then once per host chip (a single process on all
    cores and a rank pinned to one core are different chips) for per_chip overrides."""
    loaded = load_points(point_dirs)       # read once: the global and the per-chip fits share it
    profile, report = fit_from_points(point_dirs, base, hold_out, loaded)
    by_chip: dict[str, list] = {}
    for p, v, sample in loaded:
        if not held_out(v, hold_out):
            by_chip.setdefault(sample[3].nodes[0].chip.name, []).append((p, sample))
    per_chip = dict(profile.per_chip)
    if len(by_chip) > 1:
        for chip, group in by_chip.items():
            fitted, _ = fit_host_profile([s for _, s in group], base, [p.name for p, _ in group])
            per_chip[chip] = {k: getattr(fitted, k) for k in FITTED_KEYS}
    profile = replace(profile, per_chip=per_chip)
    report["in_sample"] = point_components([s for p, v, s in loaded if not held_out(v, hold_out)],
                                           [p.name for p, v, s in loaded if not held_out(v, hold_out)], profile)
    report["held_out"] = point_components([s for p, v, s in loaded if held_out(v, hold_out)],
                                          [p.name for p, v, s in loaded if held_out(v, hold_out)], profile)
    report["trained_points"] = [p.name for p, v, s in loaded if not held_out(v, hold_out)]
    return profile, report


def profile_json(profile: Profile, report: dict) -> dict:
    """The profile file calibrate --from writes (harness.costmodel.load_profile reads it)."""
    keys = (*costmodel.REQUIRED, *costmodel.OPTIONAL)
    tables = {k: list(getattr(profile, k)) for k in costmodel.TABLE_TERMS if getattr(profile, k)}
    return {"name": profile.name, "source": profile.source, **{k: getattr(profile, k) for k in keys}, **tables,
            "per_chip": profile.per_chip, "fit": report}


def iteration_gap_s(samples) -> float:
    """The median idle time between two engine iterations (no rank computing: the serving loop's round trip),
    from the step records; gaps over 50 ms are the engine waiting for work, not overhead."""
    gaps = []
    for steps, _, _, _ in samples:
        s = steps[steps["kind"].isin(["decode", "prefill", "mixed"])]
        it = s.groupby("step").agg(a=("start_s", "min"), b=("end_s", "max")).sort_index()
        g = (it["a"].shift(-1) - it["b"]).dropna().to_numpy()
        gaps.append(g[(g >= 0) & (g < 0.05)])
    allg = np.concatenate(gaps) if gaps else np.empty(0)
    return float(np.median(allg)) if allg.size else 0.0
