"""Issue 11, item 3: models from parameter counts (`--model params=235b,active=22b,layers=94`) and quants as
users quote them (`--quant 4.5`, `1.58`, `mixed:4/6`). Integer quants and catalog models keep every figure."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness import catalog, experiment
from harness.catalog.params import nearest_template
from harness.specs import UserError, model_from_config, quant_value

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ quants
@pytest.mark.parametrize("given, canonical", [
    ("4", 4), (4, 4), ("4.0", 4), (4.0, 4), (16, 16), ("32", 32),
    ("4.5", 4.5), (3.5, 3.5), ("1.58", 1.58), (" 2.7 ", 2.7),
    ("mixed:4/6", "mixed:4/6"), ("mixed_4_6", "mixed:4/6"), ("MIXED:3/4", "mixed:3/4"),
])
def test_quant_value_is_canonical(given, canonical):
    got = quant_value(given)
    assert got == canonical and type(got) is type(canonical)


QUANT_HINT = "expected bits such as 4, 4.5 or mixed:4/6"
BPW_RANGE = "allowed: bits per weight from 1 to under 16, scales included (such as 4.5 or 1.58), or integer bits"
MIXED_RULE = ("allowed: mixed:A/B with A below B, each one of 2, 3, 4, 5, 6, 8 "
              "(mlx-lm's recipes: mixed:2/6, 3/4, 3/6, 4/6)")


@pytest.mark.parametrize("given, message", [
    ("abc", f"quant 'abc': {QUANT_HINT}"),
    ("4b", f"quant '4b': {QUANT_HINT}"),
    ("", f"quant '': {QUANT_HINT}"),
    (True, f"quant True: {QUANT_HINT}"),
    ([4], f"quant [4]: {QUANT_HINT}"),
    (7, "quant: found 7; allowed: one of 2, 3, 4, 5, 6, 8, 16, 32, bits per weight such as 4.5, or mixed:4/6"),
    ("0.5", f"quant: found 0.5; {BPW_RANGE}"),
    ("16.5", f"quant: found 16.5; {BPW_RANGE}"),
    ("nan", f"quant: found nan; {BPW_RANGE}"),
    ("mixed:6/4", f"quant 'mixed:6/4': {MIXED_RULE}"),
    ("mixed:4/7", f"quant 'mixed:4/7': {MIXED_RULE}"),
])
def test_bad_quants_name_what_was_found_and_what_is_allowed(given, message):
    with pytest.raises(UserError) as err:
        quant_value(given)
    assert str(err.value) == message


TINY = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 1000}


@pytest.mark.parametrize("quant, group, bpw, high_bpw", [
    (4, 64, 4.5, 4.5), (4, 32, 5.0, 5.0), (8, 128, 8.25, 8.25), (16, 64, 16.0, 16.0), (32, 64, 32.0, 32.0),
    (4.5, 64, 4.5, 4.5), (4.5, 32, 4.5, 4.5), (1.58, 64, 1.58, 1.58), (3.5, 128, 3.5, 3.5),
    ("mixed:4/6", 64, 4.5, 6.5), ("mixed:3/4", 32, 4.0, 5.0),
])
def test_bits_per_weight(quant, group, bpw, high_bpw):
    spec = model_from_config(TINY, "tiny", quant, group)
    assert (spec.bits_per_weight, spec.high_bits_per_weight) == (bpw, high_bpw)


def test_fractional_bits_include_the_scales():
    """4.5 bits per weight is what 4-bit mlx affine with groups of 64 stores: the same bytes everywhere."""
    fractional, integer = model_from_config(TINY, "t", 4.5), model_from_config(TINY, "t", 4, 64)
    assert fractional.total_weight_bytes() == integer.total_weight_bytes()
    assert fractional.weight_bytes(0, 8) == integer.weight_bytes(0, 8)


def test_mixed_recipe_raises_the_layers_mlx_lm_raises():
    """mlx_lm/convert.py mixed_quant_predicate: index < n//8 or index >= 7n//8 or (index - n//8) % 3 == 2."""
    spec = model_from_config(TINY, "t", "mixed:4/6")
    assert [i for i in range(8) if spec._raised_by_mixed_recipe(i)] == [0, 3, 6, 7]
    deep = model_from_config({**TINY, "num_hidden_layers": 32}, "t", "mixed:4/6")
    assert [i for i in range(32) if deep._raised_by_mixed_recipe(i)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27,
                                                                         28, 29, 30, 31]


def test_mixed_bytes_are_v_proj_down_proj_and_lm_head_at_high_bits():
    low, mixed = model_from_config(TINY, "t", 4), model_from_config(TINY, "t", "mixed:4/6")
    v_proj, down_proj, lm_head = 256 * 2 * 64, 256 * 512, 1000 * 256
    extra_bits = 6.5 - 4.5
    raised_layers = 4                                     # layers 0, 3, 6 and 7 of 8
    extra = (raised_layers * (v_proj + down_proj) + lm_head) * extra_bits / 8
    assert mixed.total_weight_bytes() - low.total_weight_bytes() == extra
    assert mixed.weight_bytes(1, 3) == low.weight_bytes(1, 3)          # layers 1 and 2 stay at the low bits
    assert mixed.quant == "mixed:4/6" and low.quant == 4


def test_mixed_moe_raises_each_experts_down_projection():
    moe = {**TINY, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128}
    low, mixed = model_from_config(moe, "m", 4), model_from_config(moe, "m", "mixed:4/6")
    per_layer = (256 * 2 * 64 + 4 * 256 * 128) * 2.0 / 8               # v_proj + every expert's down_proj
    assert mixed.weight_bytes(0, 1) - low.weight_bytes(0, 1) == per_layer
    assert mixed.weight_bytes(1, 2) == low.weight_bytes(1, 2)


# Figures of the commit before this work (the same calls at its HEAD): integer quants must not move.
CATALOG_FIGURES = [
    ("llama-3.1-8b", 4, 4517404672.0, 368099328.0, 3926392832.0),
    ("qwen3-30b-a3b", 4, 17192685568.0, 1052663808.0, 4245500928.0),
    ("deepseek-v3", 8, 713066276864.0, 1859899392.0, 99179443136.0),
    ("qwen2.5-0.5b", 16, 988065536.0, 89474304.0, 715794432.0),
]


@pytest.mark.parametrize("name, bits, total, first_three, decode_batch_4", CATALOG_FIGURES)
def test_catalog_models_at_integer_bits_keep_their_bytes(name, bits, total, first_three, decode_batch_4):
    spec = catalog.load_model(name, bits)
    assert spec.total_weight_bytes() == total
    assert spec.weight_bytes(0, 3) == first_three
    assert spec.decode_read_bytes(0, spec.num_layers, 4) == decode_batch_4


# ------------------------------------------------------------------------------------------ models from counts
# text -> (template, hidden, layers, experts, exact total params, exact active params)
PARAM_MODELS = [
    ("params=235b,active=22b,layers=94", "qwen3-235b-a22b", 4032, 94, 128, 234961723584.0, 21974387904.0),
    ("params=70b,layers=80", "llama-3.1-70b", 8160, 80, 0, 70000013280.0, 70000013280.0),
    ("params=671b,active=37b,layers=61", "deepseek-v3", 6976, 61, 256, 670962462016.0, 36996752704.0),
    ("params=8b", "llama-3.1-8b", 4096, 32, 0, 7999983616.0, 7999983616.0),
    ("params=30b,active=3b", "qwen3-30b-a3b", 1728, 48, 128, 29986967232.0, 2993671872.0),
    ("params=500m", "qwen2.5-0.5b", 896, 24, 0, 499967872.0, 499967872.0),
    ("params=123b,layers=88,hidden=12288,kv_heads=8", "qwen2.5-72b", 12288, 88, 0, 122999828480.0, 122999828480.0),
]


@pytest.mark.parametrize("text, template, hidden, layers, experts, total, active", PARAM_MODELS)
def test_models_from_parameter_counts(text, template, hidden, layers, experts, total, active):
    spec = catalog.load_model(text)
    asked = dict(part.split("=") for part in text.split(","))
    want_total = float(asked["params"][:-1]) * {"b": 1e9, "m": 1e6}[asked["params"][-1]]
    want_active = float(asked["active"][:-1]) * 1e9 if "active" in asked else want_total
    assert nearest_template(want_total, experts > 0).name == template
    assert (spec.name, spec.hidden, spec.num_layers, spec.experts) == (text, hidden, layers, experts)
    assert (spec.total_params, spec.active_params) == (total, active)
    assert abs(spec.total_params / want_total - 1) <= 0.02
    assert abs(spec.active_params / want_active - 1) <= 0.02


def test_given_sizes_are_kept():
    spec = catalog.load_model("params=1.5t,active=60b,layers=72,kv_heads=8,head_dim=128,experts=256")
    assert (spec.num_layers, spec.kv_heads, spec.head_dim, spec.experts, spec.mla) == (72, 8, 128, 256, False)
    assert abs(spec.total_params / 1.5e12 - 1) <= 0.02 and abs(spec.active_params / 60e9 - 1) <= 0.02


def test_a_params_model_takes_any_quant():
    spec = catalog.load_model("params=70b,layers=80", "mixed:4/6", 32)
    assert (spec.quant, spec.group_size, spec.high_bits_per_weight) == ("mixed:4/6", 32, 7.0)
    assert catalog.load_model("params=70b,layers=80", 3.5).bits_per_weight == 3.5


KEYS = "(keys: params, active, layers, hidden, kv_heads, head_dim, experts)"
FORM = "params=235b,active=22b,layers=94[,hidden=N,kv_heads=N,head_dim=N,experts=N]"


@pytest.mark.parametrize("text, message", [
    ("params=", "model params: found ''; allowed: a parameter count from 1m to 100t, such as 235b, 22b or 500m"),
    ("params=23x", "model params: found '23x'; allowed: a parameter count from 1m to 100t, such as 235b, 22b or 500m"),
    ("params=200t", "model params: found '200t'; allowed: a parameter count from 1m to 100t, such as 235b, 22b or "
                    "500m"),
    ("params=235b,layers=0", "model layers: found 0; allowed: an integer from 1 to 1024"),
    ("params=235b,layers=9.5", "model layers: found '9.5'; allowed: an integer from 1 to 1024"),
    ("params=7b,hidden=16", "model hidden: found 16; allowed: an integer from 32 to 1048576"),
    ("params=235b,active=300b", "model active: found 300b; allowed: at most params (235b)"),
    ("parms=7b", f"model 'parms=7b': unknown key 'parms', did you mean 'params'? {KEYS}"),
    ("params=7b,params=8b", "model 'params=7b,params=8b': key 'params' is given twice"),
    ("layers=32", f"model 'layers=32': key 'params' is missing; allowed: {FORM}"),
    ("params=7b,foo", f"model 'params=7b,foo': 'foo' is not key=value; allowed: {FORM}"),
    ("params=7b,experts=8", "model experts: found 8; allowed: only with active below params (a mixture of experts "
                            "activates fewer parameters than it stores)"),
    ("params=30b,active=3b,experts=4", "model experts: found 4; allowed: an integer from 9 to 16384 (more than the "
                                       "8 routed per token, as in qwen3-30b-a3b)"),
    ("params=100b,active=12b,layers=40,experts=64", "model active: found 12b; allowed: more than 12.57b, which the "
                                                    "8 of 64 experts a token takes already hold (give more experts)"),
    ("params=1m,layers=100", "model params: found 1m; no 100-layer model shaped like qwen2.5-0.5b has it (nearest: "
                             "5.716m params, hidden 32); allowed: other layers, hidden or experts, or leave them "
                             "out to have them chosen"),
])
def test_bad_parameter_counts_say_which_key(text, message):
    with pytest.raises(UserError) as err:
        catalog.load_model(text)
    assert str(err.value) == message


# ------------------------------------------------------------------------------------------ experiment files
@pytest.mark.parametrize("line", ['quant = 4.5', 'quant = "mixed:4/6"', 'quant = "1.58"', 'quant = 8',
                                  'model = "params=70b,layers=80"'])
def test_experiment_files_take_the_new_forms(line):
    experiment.check_experiment(experiment.tomllib.loads(line), "x.toml")


@pytest.mark.parametrize("line, message", [
    ('quant = "abc"', f"x.toml: quant 'abc': {QUANT_HINT}"),
    ("quant = 0.5", f"x.toml: quant: found 0.5; {BPW_RANGE}"),
    ("quant = true", f"x.toml: quant True: {QUANT_HINT}"),
])
def test_experiment_files_refuse_bad_quants(line, message):
    with pytest.raises(UserError) as err:
        experiment.check_experiment(experiment.tomllib.loads(line), "x.toml")
    assert str(err.value) == message


# ------------------------------------------------------------------------------------------------ CLI
def harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_plan_from_parameter_counts_and_a_mixed_quant():
    done = harness("plan", "--model", "params=235b,active=22b,layers=94", "--quant", "mixed:4/6")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first == ("model params=235b,active=22b,layers=94: 235.0 B params, 94 layers, mixed:4/6-bit = 141.7 GB "
                     "of weights")
    assert "predicted (theoretical)" in done.stdout


def test_plan_at_fractional_bits():
    done = harness("plan", "--model", "qwen3-235b-a22b", "--quant", "3.5", "--json")
    assert done.returncode == 0, done.stderr
    assert '"quant_bits": 3.5' in done.stdout


def test_plan_refuses_a_bad_model_in_one_line_with_exit_2():
    done = harness("plan", "--model", "params=235b,layers=9x")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: model layers: found '9x'; allowed: an integer from 1 to 1024"


def test_plan_refuses_a_bad_quant_with_the_usage_error():
    done = harness("plan", "--quant", "abc")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == ("python -m harness plan: error: argument --quant: quant 'abc': "
                                            f"{QUANT_HINT}")
