"""Local test models in mlx-lm format, built without any model hub.

A model folder holds config.json, model.safetensors (+ model.safetensors.index.json, which mlx-lm's
sharded loader needs) and tokenizer files. The architecture is `qwen2`, the family that has
`model.model.pipeline()` in mlx-lm 0.32.2. Weights are random but seeded, so a given config always
gives the same model; folders are cached under a directory keyed by a hash of the config.

The tokenizer is a byte-level BPE trained with `tokenizers` on the Python standard library's sources,
using Qwen2's exact pre-tokenizer: transformers 5 forces its Qwen2 tokenizer class for `qwen2`
checkpoints, and that class re-creates this pre-tokenizer, so any other one would give different ids.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.mlx.errors import UserError

BUILDER_VERSION = 1       # bump when the output of a given config changes, to invalidate caches

# Qwen2's pre-tokenizer split pattern (from its tokenizer.json).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Preset sizes. head_dim = hidden / heads. Parameter counts are for fp32 with tied embeddings.
SIZES: dict[str, dict] = {
    # about 0.26M parameters: fast enough for tests that start several ranks
    "tiny": dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
    # about 27M parameters (0.11 GB fp32): a real-sized decode step (~10 ms here) that CI can afford
    "40m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1408, vocab_size=8192),
    # about 143M parameters (0.57 GB fp32)
    "150m": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, vocab_size=8192),
    # about 1.0B parameters (4 GB fp32)
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=16, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=8192),
}

# Random init gives blocks so small that the residual stream is the embedding and greedy decoding
# repeats one token; scaling the block weights up makes outputs vary, so equality tests mean something.
BLOCK_WEIGHT_SCALE = 2.0


@dataclass(frozen=True)
class BuiltModel:
    path: Path
    config: dict
    cached: bool              # True when the folder already existed


def default_cache_dir() -> Path:
    env = os.environ.get("HARNESS_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "mac-cluster-harness"
    return base / "models"


def qwen2_config(size: str) -> dict:
    if size not in SIZES:
        raise UserError(f"unknown model size {size!r}; choose one of: {', '.join(SIZES)}")
    return _complete(dict(SIZES[size]), name=f"qwen2-{size}")


def twin_config(preset: str | Path, head_dim: int = 16, vocab_size: int = 8192) -> dict:
    """A qwen2 config with the preset's layer count and head layout at a smaller width.

    The preset is an HF config.json (a path, or a name under harness/catalog/models/). Width shrinks
    by giving each head `head_dim` dimensions; the FFN shrinks by the same factor.
    """
    if head_dim <= 0:
        raise UserError(f"head_dim {head_dim}: must be a positive integer such as 16")
    src = _read_preset(preset)
    try:
        layers = int(src["num_hidden_layers"])
        heads = int(src["num_attention_heads"])
        kv_heads = int(src.get("num_key_value_heads") or heads)
        hidden = int(src["hidden_size"])
        ffn = int(src["intermediate_size"])
    except KeyError as exc:
        raise UserError(f"preset {preset}: config.json lacks {exc.args[0]!r}; "
                        "a twin needs num_hidden_layers, num_attention_heads, hidden_size, intermediate_size") from exc
    new_hidden = heads * head_dim
    new_ffn = max(8, round(ffn * new_hidden / hidden / 8) * 8)
    cfg = dict(hidden_size=new_hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, intermediate_size=new_ffn, vocab_size=vocab_size)
    name = Path(str(preset)).name.removesuffix(".json")   # not .stem: "llama-3.1-8b" has a dot
    out = _complete(cfg, name=f"twin-{name}")
    out["twin_of"] = {"preset": name, "model_type": src.get("model_type"), "hidden_size": hidden,
                      "intermediate_size": ffn, "vocab_size": src.get("vocab_size")}
    return out


def _read_preset(preset: str | Path) -> dict:
    from harness import catalog
    from harness.specs import read_json
    path = Path(preset)
    if not path.exists():
        path = catalog.MODEL_DIR / f"{preset}.json"
        if not path.exists():
            raise UserError(f"twin preset {preset!r} is neither a config.json path nor a catalog model; "
                            f"known catalog models: {', '.join(catalog.model_names())}")
    data = read_json(path, "twin preset")
    return data.get("text_config", data)   # multimodal configs keep the language model under text_config


def _complete(cfg: dict, name: str) -> dict:
    specials = {tok: cfg["vocab_size"] - len(SPECIAL_TOKENS) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    cfg.update(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=4096, tie_word_embeddings=True, torch_dtype="float32",
        bos_token_id=None, eos_token_id=specials["<|im_end|>"], harness_name=name,
    )
    return cfg


def config_key(cfg: dict, bits: int | None, seed: int) -> str:
    blob = json.dumps({"cfg": cfg, "bits": bits, "seed": seed, "v": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build(cfg: dict, bits: int | None = None, seed: int = 0, cache_dir: Path | None = None,
          force: bool = False) -> BuiltModel:
    """Build (or find in the cache) the model folder for `cfg`."""
    if bits is not None and bits not in (2, 3, 4, 6, 8):
        raise UserError(f"--bits {bits}: mlx quantization supports 2, 3, 4, 6 or 8 bits")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    suffix = f"-q{bits}" if bits else ""
    path = cache_dir / f"{cfg['harness_name']}{suffix}-{config_key(cfg, bits, seed)}"
    if path.exists() and (path / "config.json").exists() and not force:
        return BuiltModel(path, json.loads((path / "config.json").read_text()), cached=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        config = _write_model(tmp, dict(cfg), bits, seed)
        _write_tokenizer(tmp, cfg["vocab_size"], cfg["eos_token_id"])
        tmp.chmod(0o755)    # mkdtemp makes it private; a model cache is meant to be shared
        if path.exists():
            shutil.rmtree(path)
        # rename is atomic: a concurrent reader sees either no folder or a complete one
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return BuiltModel(path, config, cached=False)


def _write_model(folder: Path, cfg: dict, bits: int | None, seed: int) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models import qwen2
    from mlx_lm.utils import quantize_model, save_config, save_model

    mx.random.seed(seed)
    args = qwen2.ModelArgs.from_dict(cfg)
    model = qwen2.Model(args)
    scaled = {k: v * BLOCK_WEIGHT_SCALE if k.startswith("model.layers.") and k.endswith(".weight")
              and "norm" not in k else v for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(scaled.items()))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())
    if bits:
        model, cfg = quantize_model(model, cfg, group_size=64, bits=bits)
    save_model(folder, model)
    save_config(cfg, folder / "config.json")
    return cfg


def training_text(max_bytes: int = 4_000_000) -> list[str]:
    """Python standard library sources: present on every machine that runs this code."""
    stdlib = Path(os.__file__).resolve().parent
    texts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def _write_tokenizer(folder: Path, vocab_size: int, eos_id: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_regular = vocab_size - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=n_regular, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    # small vocabularies need little text; big ones more, to fill their merges
    tok.train_from_iterator(training_text(max_bytes=200_000 if vocab_size <= 1024 else 4_000_000), trainer)
    if tok.get_vocab_size() != n_regular:
        # too little text to learn all merges: pad with unused tokens so special ids stay where config says
        tok.add_tokens([f"<|unused_{i}|>" for i in range(n_regular - tok.get_vocab_size())])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    assert tok.token_to_id("<|im_end|>") == eos_id, "special token ids must match config.json"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def parameter_count(cfg: dict) -> int:
    h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    attn = h * h * 2 + 2 * h * kv + h + 2 * kv      # q, o, k, v weights + q/k/v biases
    return layers * (attn + 3 * h * f + 2 * h) + cfg["vocab_size"] * h + h

