"""Local model folders: built once, cached by config, loaded through mlx-lm's own loading path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.mlx import modelbuild
from harness.mlx.errors import UserError


def test_build_is_cached_and_loads_through_mlx_lm(tmp_path):
    cfg = modelbuild.qwen2_config("tiny")
    first = modelbuild.build(cfg, cache_dir=tmp_path)
    again = modelbuild.build(cfg, cache_dir=tmp_path)
    assert not first.cached and again.cached and again.path == first.path
    for name in ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"):
        assert (first.path / name).exists(), name
    assert not list(tmp_path.glob(".building-*")), "no half-built folder may stay behind"

    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model, load_tokenizer
    model, config = load_model(first.path, lazy=True)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert n_params == modelbuild.parameter_count(cfg)
    assert len(model.layers) == cfg["num_hidden_layers"]
    tok = load_tokenizer(first.path, eos_token_ids=config["eos_token_id"])
    text = "for item in range(10):\n    print(item, 'ünïcode')"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(ids) < cfg["vocab_size"]
    assert tok.eos_token_ids == {cfg["eos_token_id"]}


def test_a_different_seed_is_a_different_folder(tmp_path):
    cfg = modelbuild.qwen2_config("tiny")
    assert modelbuild.build(cfg, seed=1, cache_dir=tmp_path).path != modelbuild.build(cfg, cache_dir=tmp_path).path


def test_four_bit_model_loads(tmp_path):
    built = modelbuild.build(modelbuild.qwen2_config("tiny"), bits=4, cache_dir=tmp_path)
    from mlx_lm.utils import load
    model, _ = load(str(built.path))
    assert json.loads((built.path / "config.json").read_text())["quantization"]["bits"] == 4
    assert type(model.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"


def test_twin_keeps_layers_and_heads_at_smaller_width(tmp_path):
    preset = tmp_path / "big.json"
    preset.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 5,
                                  "num_attention_heads": 32, "num_key_value_heads": 8,
                                  "intermediate_size": 14336, "vocab_size": 128256}))
    cfg = modelbuild.twin_config(preset, head_dim=4)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (5, 32, 8)
    assert cfg["hidden_size"] == 128 and cfg["intermediate_size"] == 448
    assert cfg["twin_of"]["hidden_size"] == 4096
    built = modelbuild.build(cfg, cache_dir=tmp_path / "cache")
    from mlx_lm.utils import load_model
    model, _ = load_model(built.path)
    assert len(model.layers) == 5 and model.layers[0].self_attn.n_kv_heads == 8


def test_unknown_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown model size"):
        modelbuild.qwen2_config("7b")
    with pytest.raises(UserError, match="neither a config.json path nor a catalog model"):
        modelbuild.twin_config("no-such-model")
    with pytest.raises(UserError, match="bits"):
        modelbuild.build(modelbuild.qwen2_config("tiny"), bits=5, cache_dir=tmp_path)


def test_cli_builds_and_prints_the_path(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "harness", "model", "build", "--size", "tiny",
                          "--cache-dir", str(tmp_path), "--json"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert Path(info["path"]).parent == tmp_path and info["layers"] == 6
    bad = subprocess.run([sys.executable, "-m", "harness", "model", "build", "--twin", "nope",
                          "--cache-dir", str(tmp_path)], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "error:" in bad.stderr
