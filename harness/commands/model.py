"""`python -m harness model build ...`: local random-weight mlx-lm models for the real backend."""
from __future__ import annotations

import argparse
import json

HELP = "build local test models (mlx-lm format, random weights, local tokenizer)"
DESCRIPTION = """Build a local mlx-lm model folder (qwen2 architecture, random seeded weights, a BPE tokenizer
trained on the Python standard library). Folders are cached by config under $HARNESS_CACHE/models
(default ~/.cache/mac-cluster-harness/models); the path is printed on stdout.

examples:
  python -m harness model build --size tiny
  python -m harness model build --size 150m --bits 4
  python -m harness model build --twin llama-3.1-70b          # catalog preset name or a config.json path
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from harness.mlx import modelbuild   # standard library only at import: cheap for --help
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build (or find in the cache) a model folder")
    what = b.add_mutually_exclusive_group()
    what.add_argument("--size", choices=list(modelbuild.SIZES), default=None,
                      help="preset size (default tiny)")
    what.add_argument("--twin", metavar="PRESET",
                      help="scaled twin of a catalog model or config.json: same layers and heads, smaller width")
    b.add_argument("--head-dim", type=int, default=16, help="per-head width of a --twin (default 16)")
    b.add_argument("--bits", type=int, default=None, help="quantize to this many bits (4 or 8; fp32 otherwise)")
    b.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    b.add_argument("--cache-dir", default=None, help="where model folders live (default $HARNESS_CACHE/models)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--json", action="store_true", help="print a JSON description instead of the bare path")


def run(args: argparse.Namespace) -> int:
    from harness.mlx import modelbuild

    cfg = (modelbuild.twin_config(args.twin, head_dim=args.head_dim) if args.twin
           else modelbuild.qwen2_config(args.size or "tiny"))
    built = modelbuild.build(cfg, bits=args.bits, seed=args.seed, cache_dir=args.cache_dir, force=args.force)
    if args.json:
        print(json.dumps({"path": str(built.path), "cached": built.cached,
                          "parameters": modelbuild.parameter_count(cfg),
                          "layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"]}, indent=2))
    else:
        print(built.path)
    return 0
