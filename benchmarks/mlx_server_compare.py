"""Our server on the real backend vs `mlx_lm.server`, same model, same machine, same load generator.

    python benchmarks/mlx_server_compare.py [--size 150m] [--requests 6] [--prompt 64] [--output 32]

Both servers get the same BLAS (OpenBLAS preloaded when installed, all cores). For each load mode
(one request at a time, then 4 concurrent) it prints measured mean TTFT, mean TPOT, output tok/s, and
the ratio ours / mlx_lm.server. Every figure is measured; nothing is simulated.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import metrics  # noqa: E402
from harness.serving.loadgen import LoadMode, Target, run_load_sync  # noqa: E402
from harness.mlx import blas, launcher, modelbuild  # noqa: E402
from harness.workloads import RequestSpec  # noqa: E402


def start_mlx_lm_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = launcher.free_ports(1)[0]
    ncpu = len(os.sched_getaffinity(0))
    env = dict(os.environ, **blas.blas_env(ncpu, blas.find_openblas()))
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(port),
                             "--log-level", "WARNING"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("mlx_lm.server did not start in 120 s")


def measure(url: str, model: str, specs, modes) -> list[dict]:
    out = []
    for mode in modes:
        res = run_load_sync(Target(url=url, model=model), specs, mode, warmup=2)
        out.append(metrics.compute(res.frame()))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="150m")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--ranks", type=int, default=1, help="pipeline ranks for our backend (1 or 2)")
    args = ap.parse_args()
    built = modelbuild.build(modelbuild.qwen2_config(args.size))
    layers = built.config["num_hidden_layers"]
    specs = [RequestSpec(f"q{i}", 0.0, args.prompt, args.output) for i in range(args.requests)]
    modes = [LoadMode("synchronous"), LoadMode("concurrent", 4)]
    print(f"model {built.path.name}; {args.requests} requests, {args.prompt} prompt words, {args.output} output "
          f"tokens; BLAS {blas.find_openblas() or 'bundled'}; loadavg {os.getloadavg()[0]:.2f}")

    log = Path(os.environ.get("TMPDIR", "/tmp")) / "mlx_lm_server.log"
    proc, url = start_mlx_lm_server(built.path, log)
    try:
        theirs = measure(url, str(built.path), specs, modes)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    from harness.backends.mlx import MlxBackend
    from harness.serving.server import EmbeddedServer
    split = None if args.ranks == 1 else [layers // 2, layers - layers // 2]
    backend = MlxBackend(built.path, split)
    with EmbeddedServer(backend) as server:
        ours = measure(server.url, backend.model_id, specs, modes)

    for mode, a, b in zip(modes, ours, theirs):
        print(f"[{mode.label}]")
        for key, label in (("mean_ttft_ms", "mean TTFT ms"), ("mean_tpot_ms", "mean TPOT ms"),
                           ("output_throughput", "output tok/s")):
            print(f"  measured {label:14s} ours ({args.ranks} rank) {a[key]:9.1f}   mlx_lm.server {b[key]:9.1f}   "
                  f"ratio ours/theirs {a[key] / b[key]:5.2f}")
        print(f"  completed ours {a.get('completed')}  mlx_lm.server {b.get('completed')}; "
              f"output tokens ours {a.get('total_output_tokens')}  theirs {b.get('total_output_tokens')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
