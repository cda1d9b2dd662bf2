"""Small run folders written with the project's run-folder writer, in the documented format (DESIGN §9).

Times are built so that metrics are known exactly: every request has TTFT `ttft_s` and TPOT `tpot_s`."""
from __future__ import annotations

import numpy as np
import pandas as pd

from harness import metrics
from harness.runfolder import RunWriter
from harness.specs import PartitionPlan, Stage

PLAN = PartitionPlan(
    strategy="ring_memory_weighted", objective="latency", cluster="test-cluster", model="llama-3.1-70b",
    quant_bits=4, num_layers=80,
    stages=(Stage(("studio-1",), 0, 40, 1, memory_used_gb=150.0, memory_available_gb=180.0, decode_ms=30.0),
            Stage(("mini-1",), 40, 56, 1, memory_used_gb=40.0, memory_available_gb=48.0, decode_ms=20.0),
            # memory figures are per member node: this stage holds 2 x 30 GB of 2 x 48 GB
            Stage(("mini-2", "mini-3"), 56, 80, 2, memory_used_gb=30.0, memory_available_gb=48.0, decode_ms=25.0)),
    # the plan uses every node of its cluster, so the planner's cluster-wide memory figure is the stages' 250 / 324 GB
    predicted={"tpot_ms": 75.0, "tokens_per_s": 1000 / 75.0, "ttft_ms": 80.0, "prompt_tokens": 512, "load_s": 41.0,
               "memory_utilisation": 250 / 324},
).to_dict()


def request_rows(n: int, seed: int = 0, source: str = "simulated", ttft_s: float = 0.05,
                 tpot_s: float = 0.02, rate: float = 5.0) -> pd.DataFrame:
    """n requests with exact chunk times: TTFT and TPOT are known by construction."""
    rng = np.random.default_rng(seed)
    start = np.cumsum(rng.exponential(1.0 / rate, n))
    out = rng.integers(8, 32, n)
    chunks = [list(s + ttft_s + tpot_s * np.arange(k)) for s, k in zip(start, out)]
    return pd.DataFrame({
        "request_id": [f"req-{i:06d}" for i in range(n)], "source": source,
        "scheduled_s": start, "start_s": start, "first_token_s": start + ttft_s,
        "end_s": [c[-1] for c in chunks], "prompt_tokens": np.full(n, 512), "output_tokens": out,
        "cached_tokens": np.zeros(n, dtype=int), "chunk_times_s": chunks,
        "success": np.ones(n, dtype=bool), "error": "",
    })


def step_rows(duration_s: float, source: str = "simulated") -> pd.DataFrame:
    rows = []
    for stage, node in enumerate(["studio-1", "mini-1", "mini-2"]):
        rows.append((0, stage, node, "load", 0.0, 2.0 + stage, 0, 0, 0, float("nan"), source))
        t = 3.0 + stage * 0.01
        for step in range(1, int(duration_s / 0.05)):
            rows.append((step, stage, node, "decode", t, t + 0.03, 4, 4, step * 1_000_000 % 9_000_000_000, 0.03, source))
            t += 0.05
    return pd.DataFrame(rows, columns=["step", "stage", "node", "kind", "start_s", "end_s", "batch_size", "tokens",
                                       "kv_bytes", "compute_s", "source"])


def write_run(root, label="run", n=60, seed=0, source="simulated", plan=PLAN, targets=None, rate=5.0,
              ttft_s=0.05, tpot_s=0.02, finish=True, extra_metrics=None, strategy=None, nested=False,
              fingerprint=None):
    """Write a run folder with the project's writer; finish=False leaves it interrupted."""
    requests = request_rows(n, seed, source, ttft_s, tpot_s, rate)
    plan = dict(plan, strategy=strategy or plan["strategy"])
    config = {"strategy": plan["strategy"], "backend": "sim", "model": plan["model"],
              "workload": {"kind": "synthetic", "num_requests": n, "seed": seed,
                           "arrival": {"process": "poisson", "rate": rate}}}
    if targets is not None:
        config["targets"] = targets
    writer = RunWriter(root, label=label, run_id=label)
    writer.write_json("config.json", config)
    writer.write_json("environment.json", {"python": "3.11", "git_commit": "0123456789abcdef"})
    writer.write_json("plan.json", plan)
    writer.write_requests(requests)
    writer.write_steps(step_rows(float(requests["end_s"].max()), source))
    if finish:
        summary_metrics = metrics.compute(requests) | (extra_metrics or {})
        # The run command keeps metrics at the top level of summary.json, next to bookkeeping fields;
        # nested=True writes the other documented layout, {"metrics": {...}}.
        body = {"metrics": summary_metrics} if nested else {
            **summary_metrics, "backend": "sim", "strategy": plan["strategy"], "predicted": plan["predicted"]}
        writer.finish({"source": source, **body, **({"fingerprint": fingerprint} if fingerprint else {})})
    else:
        try:
            with writer:        # what Ctrl-C during a run does to its folder
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
    return writer.path
