"""Tensor parallel vs one process vs a pipeline, on real ranks of this host (all figures measured).

    python benchmarks/mlx_tensor_parallel.py [--size 150m] [--tokens 32]

Each layout runs the same greedy single-stream request (and checks its tokens equal the one-process ones);
the table gives the median decode step (compute, from the ranks' own step records) and the request's
output tokens/s, with ratios against one process measured in the same run. On a 2-core host the ranks
share the cores, so this measures the cost of the collectives and hops, not a speed-up.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from harness.backends.base import GenerationRequest
from harness.backends.mlx import MlxBackend
from harness.mlx import modelbuild
from harness.specs import PartitionPlan, Stage


def plan_of(layers: int, stages: list[tuple[tuple[str, ...], int]]) -> PartitionPlan:
    out, start = [], 0
    for nodes, n in stages:
        out.append(Stage(nodes=nodes, layer_start=start, layer_end=start + n, tp_degree=len(nodes)))
        start += n
    return PartitionPlan(strategy="bench", objective="latency", cluster="this-host", model="bench", quant_bits=32,
                         num_layers=layers, stages=tuple(out))


async def measure(model, plan, prompt, tokens):
    backend = MlxBackend(model, plan, max_running=1)
    try:
        await backend.load()
        warm = GenerationRequest("warm", prompt, max_tokens=4, ignore_eos=True)
        [_ async for _ in backend.generate(warm)]
        first = len(backend.step_records())
        t0 = time.perf_counter()
        req = GenerationRequest("r", prompt, max_tokens=tokens, ignore_eos=True)
        ids = [ev.token_id async for ev in backend.generate(req)]
        wall = time.perf_counter() - t0
        rows = [r for r in backend.step_records()[first:] if r["kind"] == "decode"]
        step = statistics.median(r["end_s"] - r["start_s"] for r in rows)
        return ids, step, tokens / wall
    finally:
        await backend.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="150m", help="qwen2 preset to build (default %(default)s)")
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request (default %(default)s)")
    args = p.parse_args(argv)
    cfg = modelbuild.qwen2_config(args.size)
    model = modelbuild.build(cfg).path
    n = cfg["num_hidden_layers"]
    prompt = [(7 * i + 3) % cfg["vocab_size"] for i in range(64)]
    layouts = {"one process": None,
               "pipeline 2 ranks": plan_of(n, [(("a",), n // 2), (("b",), n - n // 2)]),
               "tensor parallel 2 ranks": plan_of(n, [(("a", "b"), n)]),
               "TP pair + 1 pipelined rank": plan_of(n, [(("a", "b"), n - 2), (("c",), 2)])}
    print(f"qwen2 {args.size} fp32, {n} layers; greedy, 64-token prompt, {args.tokens} output tokens (measured)")
    print(f"{'layout':<28}{'decode step ms':>16}{'tok/s':>10}{'step vs one':>13}{'tokens equal':>14}")
    base = None
    for name, plan in layouts.items():
        ids, step, rate = asyncio.run(measure(model, plan, prompt, args.tokens))
        base = base or (ids, step)
        print(f"{name:<28}{step * 1e3:>16.2f}{rate:>10.2f}{step / base[1]:>12.2f}x{str(ids == base[0]):>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
