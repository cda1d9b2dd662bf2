"""Roofline cost model (DESIGN §7): pure functions of chip, link, model and a profile of fitted factors.

Decode step:  t = max(bytes / (eta_bw * BW), flops / (mu * peak)) + step overhead + layers x layer overhead
Prefill:      the same roofline over the prompt's FLOPs and the weights it reads
Link:         t = latency + per-message overhead + bytes / bandwidth
Strategies use it to rank plans; the simulator uses it to time events. Efficiency factors live in a profile
file (harness/profiles/*.json), never in code; a missing or malformed profile is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.specs import Chip, Link, ModelSpec, UserError, read_json

PROFILE_DIR = Path(__file__).parent / "profiles"
REQUIRED = ("eta_bw", "mu_compute", "step_overhead_s", "layer_overhead_s", "link_overhead_us", "ssd_gbs")


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

    def _get(self, chip: Chip, key: str) -> float:
        return self.per_chip.get(chip.name, {}).get(key, getattr(self, key))

    def bandwidth(self, chip: Chip) -> float:
        """Effective bytes/s a decode step streams on this chip."""
        return self._get(chip, "eta_bw") * chip.mem_bw_gbs * 1e9

    def flops(self, chip: Chip) -> float:
        """Effective FLOP/s a prefill achieves on this chip."""
        return self._get(chip, "mu_compute") * chip.fp16_tflops * 1e12

    def overhead(self, chip: Chip, layers: int) -> float:
        """Time a step of `layers` layers costs beyond the roofline: it grows with the layers a stage runs,
        so splitting a model over more stages does not multiply it."""
        return self._get(chip, "step_overhead_s") + layers * self._get(chip, "layer_overhead_s")


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
    missing = [k for k in REQUIRED if not isinstance(data.get(k), (int, float))]
    if missing:
        raise UserError(f"cost-model profile {p}: missing or non-numeric {', '.join(missing)}")
    return Profile(name=data.get("name", p.stem), per_chip=data.get("per_chip", {}), source=data.get("source", ""),
                   **{k: float(data[k]) for k in REQUIRED})


def roofline(chip: Chip, profile: Profile, nbytes: float, flops: float) -> float:
    return max(nbytes / profile.bandwidth(chip), flops / profile.flops(chip))


def decode_time(chip: Chip, profile: Profile, model: ModelSpec, start: int, end: int, batch: int = 1,
                context_tokens: float = 0, tp: int = 1, with_head: bool = False) -> float:
    """One decode step of `batch` sequences (mean context `context_tokens`) over layers [start, end).

    tp > 1 shards the work over a tensor-parallel group (all-reduce time is added by the caller, who knows the link).
    with_head adds the final norm + output projection (the last stage's extra work).
    """
    nbytes, flops = decode_work(model, start, end, batch, context_tokens, tp, with_head)
    return roofline(chip, profile, nbytes, flops) + profile.overhead(chip, end - start)


def decode_work(model: ModelSpec, start: int, end: int, batch: int = 1, context_tokens: float = 0, tp: int = 1,
                with_head: bool = False) -> tuple[float, float]:
    """(bytes read, FLOPs) of one decode step: what decode_time puts through the roofline."""
    nbytes = (model.decode_read_bytes(start, end, batch) + batch * context_tokens * model.kv_bytes_per_token(start, end)) / tp
    flops = model.decode_flops(start, end, batch, context_tokens) / tp
    if with_head:
        nbytes += model.head_bytes()
        flops += model.head_flops(batch)
    return nbytes, flops


def prefill_time(chip: Chip, profile: Profile, model: ModelSpec, start: int, end: int, tokens: int,
                 context_before: int = 0, tp: int = 1, with_head: bool = False) -> float:
    """Prefill `tokens` new tokens after `context_before` cached ones over layers [start, end)."""
    nbytes, flops = prefill_work(model, start, end, tokens, context_before, tp, with_head)
    return roofline(chip, profile, nbytes, flops) + profile.overhead(chip, end - start)


def prefill_work(model: ModelSpec, start: int, end: int, tokens: int, context_before: int = 0, tp: int = 1,
                 with_head: bool = False) -> tuple[float, float]:
    """(bytes, FLOPs) of a prefill: what prefill_time puts through the roofline."""
    nbytes = (model.weight_bytes(start, end) + (context_before + tokens) * model.kv_bytes_per_token(start, end)) / tp
    flops = model.prefill_flops(start, end, tokens, context_before) / tp
    if with_head:  # only the last position's logits are needed
        nbytes += model.head_bytes()
        flops += model.head_flops(1)
    return nbytes, flops


TOKEN_ID_BYTES = 4   # what the last stage sends back to the first: one int32 per sequence


def link_time(link: Link, nbytes: float, profile: Profile) -> float:
    """One message over a link: latency + software overhead + serialisation."""
    return (link.latency_us + profile.link_overhead_us) * 1e-6 + nbytes * 8 / (link.bandwidth_gbps * 1e9)


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
