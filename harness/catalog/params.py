"""Models from parameter counts, as users quote them: `--model params=235b,active=22b,layers=94`.

When no config.json is at hand, the architecture is borrowed from the catalog preset nearest in total
parameters of the same kind (dense, or mixture of experts), and resized until the counts match:

- the hidden size is searched (in steps of 32, so every matrix splits into mlx's quantization groups of 32)
  with the template's head count and MLP widths scaled in proportion to it, keeping its shape ratios;
- then the one width that the counts pin down is solved for exactly: a dense model's MLP width from `params`,
  an MoE model's expert width from `params - active` (only the routed experts not taken per token differ).

Scaling a real architecture was chosen over deriving one from textbook ratios (hidden = f(params, layers)):
the vocabulary (a large share of a small model), the grouped-query KV heads (which set the KV cache and so
the plan's memory), the expert count and experts per token, the leading dense layers and DeepSeek's latent
attention all carry over from a released model of about that size, where fixed ratios would guess them.
The result matches `params` and `active` within 2 % (checked here; a request no architecture can meet, such
as more layers than the active parameters can fill, is a UserError saying what was nearest).
"""
from __future__ import annotations

import math
import re
from dataclasses import replace

from harness.specs import (MAX_EXPERTS, MAX_HEADS, MAX_HIDDEN, MAX_LAYERS, ModelSpec, UserError, did_you_mean,
                           integer_in, shown)

PARAMS_FORM = "params=235b,active=22b,layers=94[,hidden=N,kv_heads=N,head_dim=N,experts=N]"
COUNT_KEYS = ("params", "active")
SIZE_KEYS = {"layers": (1, MAX_LAYERS), "hidden": (32, MAX_HIDDEN), "kv_heads": (1, MAX_HEADS),
             "head_dim": (1, 4096), "experts": (2, MAX_EXPERTS)}
KEYS = COUNT_KEYS + tuple(SIZE_KEYS)
SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
PARAMS_RANGE = (1e6, 1e14)           # a million to a hundred trillion: anything outside is a typo
TOLERANCE = 0.02                      # how close total and active params must come to the counts asked for
HIDDEN_STEP = 32


def is_params_form(text: str) -> bool:
    """A --model value in key=value form (a path or preset name never holds '=')."""
    return "=" in text


def model_from_params(text: str) -> ModelSpec:
    """The ModelSpec (16-bit) for a `params=...` text; its name is the text in canonical form, so it can be
    given to --model again. Raises UserError naming the key, what was found and what is allowed."""
    asked = parse_params(text)
    moe = _is_moe(asked)
    template = nearest_template(asked["params"], moe)
    base = _reshaped(template, asked)
    spec = _fit_moe(base, asked) if moe else _fit_dense(base, asked)
    spec = replace(spec, name=canonical_name(asked))
    _check_match(spec, asked, template.name)
    return spec


# ----------------------------------------------------------------------------------------------- parsing
def parse_params(text: str) -> dict[str, float | int]:
    """{key: value} of `params=235b,active=22b,...`, every key and value checked."""
    asked: dict[str, float | int] = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise UserError(f"model {shown(text)}: {shown(part)} is not key=value; allowed: {PARAMS_FORM}")
        if key not in KEYS:
            raise UserError(f"model {shown(text)}: unknown key {shown(key)}{did_you_mean(key, KEYS)} "
                            f"(keys: {', '.join(KEYS)})")
        if key in asked:
            raise UserError(f"model {shown(text)}: key {shown(key)} is given twice")
        asked[key] = _count(key, value.strip()) if key in COUNT_KEYS else _size(key, value.strip())
    if "params" not in asked:
        raise UserError(f"model {shown(text)}: key 'params' is missing; allowed: {PARAMS_FORM}")
    return asked


def _count(key: str, value: str) -> float:
    """235b, 22B, 500m, 1.5t or a plain number of parameters."""
    low, high = PARAMS_RANGE
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmbt]?)", value.lower())
    number = float(match.group(1)) * SUFFIXES[match.group(2)] if match else None
    if number is None or not low <= number <= high:
        raise UserError(f"model {key}: found {shown(value)}; allowed: a parameter count from 1m to 100t, "
                        "such as 235b, 22b or 500m")
    return number


def _size(key: str, value: str) -> int:
    """An integer key (layers, hidden, ...): digits, or with a k suffix (hidden=8k)."""
    low, high = SIZE_KEYS[key]
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", value.lower())
    number = float(match.group(1)) * SUFFIXES[match.group(2)] if match else math.nan
    whole = int(number) if number.is_integer() else value     # a fraction is reported as found
    return integer_in(whole, f"model {key}", low, high)


def _is_moe(asked: dict) -> bool:
    """Mixture of experts when fewer parameters are active than stored, or when experts are given."""
    total, active = asked["params"], asked.get("active", asked["params"])
    if active > total:
        raise UserError(f"model active: found {_short(active)}; allowed: at most params ({_short(total)})")
    moe = active < total
    if "experts" in asked and not moe:
        raise UserError(f"model experts: found {asked['experts']}; allowed: only with active below params "
                        "(a mixture of experts activates fewer parameters than it stores)")
    return moe


def canonical_name(asked: dict) -> str:
    return ",".join(f"{k}={_short(v) if k in COUNT_KEYS else v}" for k, v in asked.items())


def _short(count: float) -> str:
    """A count as users write it: 235b, 22b, 1.5t, 500m."""
    for suffix, scale in (("t", 1e12), ("b", 1e9), ("m", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.4g}{suffix}"
    return f"{count:g}"


# ----------------------------------------------------------------------------------------------- templates
def nearest_template(params: float, moe: bool) -> ModelSpec:
    """The catalog preset of the same kind whose total params are nearest (by ratio) to `params`."""
    from harness.catalog import load_model, model_names
    presets = [load_model(name) for name in model_names()]
    same_kind = [m for m in presets if m.moe == moe]
    return min(same_kind, key=lambda m: (abs(math.log(m.total_params / params)), m.name))


def _reshaped(template: ModelSpec, asked: dict) -> ModelSpec:
    """The template with the asked layers, experts and attention shape; widths are set by the fit."""
    layers = asked.get("layers", template.num_layers)
    spec = replace(template, num_layers=layers,
                   dense_layers=tuple(range(min(len(template.dense_layers), layers - 1))))
    if "kv_heads" in asked or "head_dim" in asked:
        spec = _without_latent_attention(spec, asked)
    if "experts" in asked:
        if asked["experts"] <= spec.active_experts:
            integer_in(asked["experts"], "model experts", spec.active_experts + 1, MAX_EXPERTS,
                       f" (more than the {spec.active_experts} routed per token, as in {template.name})")
        spec = replace(spec, experts=asked["experts"])
    return spec


def _without_latent_attention(spec: ModelSpec, asked: dict) -> ModelSpec:
    """Giving kv_heads or head_dim asks for grouped-query attention, so a latent-attention (MLA) template
    drops it; 128-wide heads and 8 KV heads are then the defaults, as in Llama 3 and Qwen 2.5/3."""
    if spec.mla:
        spec = replace(spec, q_lora_rank=0, kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=0,
                       v_head_dim=0, head_dim=128, kv_heads=min(8, spec.heads))
    return replace(spec, head_dim=asked.get("head_dim", spec.head_dim), kv_heads=asked.get("kv_heads", spec.kv_heads))


# ----------------------------------------------------------------------------------------------- fitting
def _at_hidden(base: ModelSpec, hidden: int, asked: dict) -> ModelSpec:
    """The base with hidden size `hidden`: head count and MLP widths scaled in proportion, the KV heads
    kept (and capped at the head count), so the template's shape ratios hold."""
    scale = hidden / base.hidden
    heads = max(1, round(base.heads * scale))
    kv_heads = min(asked.get("kv_heads", base.kv_heads), heads)
    return replace(base, hidden=hidden, heads=heads, kv_heads=kv_heads,
                   ffn=max(1, round(base.ffn * scale)), moe_ffn=max(1, round(base.moe_ffn * scale)) if base.moe else 0,
                   shared_ffn=round(base.shared_ffn * scale))


def _fit_dense(base: ModelSpec, asked: dict) -> ModelSpec:
    """Hidden size from the params (unless given), then the MLP width solved so total params match."""
    target = asked["params"]
    spec = _at_hidden(base, asked["hidden"], asked) if "hidden" in asked else \
        _search_hidden(lambda h: _at_hidden(base, h, asked), lambda m: m.total_params, target)
    mlp_per_unit = 3 * spec.hidden * spec.num_layers      # params one unit of MLP width adds
    without_mlp = spec.total_params - mlp_per_unit * spec.ffn
    return replace(spec, ffn=max(1, round((target - without_mlp) / mlp_per_unit)))


def _fit_moe(base: ModelSpec, asked: dict) -> ModelSpec:
    """Hidden size from the active params (unless given), with the expert width solved at each hidden size
    from params - active: the routed experts a token does not take are exactly that difference."""
    def with_experts(hidden: int) -> ModelSpec:
        spec = _at_hidden(base, hidden, asked)
        moe_layers = spec.num_layers - len(spec.dense_layers)
        per_unit = moe_layers * (spec.experts - spec.active_experts) * 3 * hidden
        return replace(spec, moe_ffn=max(1, round((asked["params"] - asked["active"]) / per_unit)))
    _check_routed_share(base, asked)
    if "hidden" in asked:
        return with_experts(asked["hidden"])
    return _search_hidden(with_experts, lambda m: m.active_params, asked["active"])


def _check_routed_share(spec: ModelSpec, asked: dict) -> None:
    """The experts a token takes hold k/(E-k) of params - active whatever the widths: active must exceed it."""
    k, idle = spec.active_experts, spec.experts - spec.active_experts
    routed = k * (asked["params"] - asked["active"]) / idle
    if routed >= asked["active"]:
        raise UserError(f"model active: found {_short(asked['active'])}; allowed: more than {_short(routed)}, "
                        f"which the {k} of {spec.experts} experts a token takes already hold (give more experts)")


def _search_hidden(build, measure, target: float) -> ModelSpec:
    """The spec build(h), h a multiple of HIDDEN_STEP, whose measure is nearest the target. measure grows
    with h (widths scale with it), so bisection finds the crossing; its neighbours settle the rounding."""
    low, high = 1, MAX_HIDDEN // HIDDEN_STEP
    while high - low > 1:
        mid = (low + high) // 2
        if measure(build(mid * HIDDEN_STEP)) < target:
            low = mid
        else:
            high = mid
    candidates = [build(k * HIDDEN_STEP) for k in range(max(1, low - 2), high + 3)]
    return min(candidates, key=lambda m: abs(measure(m) - target))


def _check_match(spec: ModelSpec, asked: dict, template: str) -> None:
    """Total and active params within TOLERANCE of what was asked, else say what was nearest."""
    wanted = {"params": (asked["params"], spec.total_params), "active": (asked.get("active", asked["params"]),
                                                                     spec.active_params)}
    for key, (want, got) in wanted.items():
        if abs(got - want) > TOLERANCE * want:
            raise UserError(f"model {key}: found {_short(want)}; no {spec.num_layers}-layer model shaped like "
                            f"{template} has it (nearest: {_short(got)} {key}, hidden {spec.hidden}); allowed: "
                            "other layers, hidden or experts, or leave them out to have them chosen")
