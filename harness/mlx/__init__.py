"""The real backend: mlx-lm models pipelined over MLX's ring backend.

Modules:
- `modelbuild`: local random-weight mlx-lm models (qwen2) with a locally trained tokenizer, cached.
- `launcher`: start N ring ranks (loopback, optional network namespaces with shaped links, or real Macs).
- `worker`: the rank process: loads its layers, runs generation in lockstep, reports tokens and timings.
- the `MlxBackend` adapter that drives the ranks lives with the other backends, in `harness/backends/mlx.py`.
- `hostbench` / `profile`: micro-benchmarks that measure this host as a "chip" for the simulator.
- `blas`: finding an optimised BLAS to preload into rank processes.
- `relay`: a TCP relay that adds a link's latency (this kernel has no netem).

Importing this package does not import mlx: the CLI stays cheap to start.
"""
