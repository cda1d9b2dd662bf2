"""Pure parts of the launcher and worker: hostfile shape, layer-order to rank-order translation, BLAS env."""
from __future__ import annotations

from harness.mlx import blas, launcher, worker


def test_rank_zero_gets_the_last_layers():
    counts = [1, 3, 2]                       # layer order: stage 0 runs layers 0..0
    assert worker.rank_split(counts) == [2, 3, 1]
    assert [worker.stage_of_rank(r, 3) for r in range(3)] == [2, 1, 0]
    assert worker.layer_range(counts, worker.stage_of_rank(0, 3)) == (4, 6)
    assert worker.layer_range(counts, worker.stage_of_rank(2, 3)) == (0, 1)


def test_ring_hostfile_has_one_address_list_per_rank():
    ports = launcher.free_ports(3)
    assert len(set(ports)) == 3
    hf = launcher.ring_hostfile(["127.0.0.1"] * 3, ports)
    assert hf == [[f"127.0.0.1:{p}"] for p in ports]


def test_rank_env_pins_and_limits_blas_threads(tmp_path):
    env = launcher._rank_env(1, 2, tmp_path / "h.json", "/x/libopenblas.so.0", [0, 1], 2)
    assert env["MLX_RANK"] == "1" and env["HARNESS_CPU_CORE"] == "1"
    assert env["OPENBLAS_NUM_THREADS"] == "1" and env["LD_PRELOAD"].startswith("/x/libopenblas.so.0")
    single = launcher._rank_env(0, 1, None, None, [0, 1], 2)
    assert "MLX_RANK" not in single and "HARNESS_CPU_CORE" not in single
    assert single["OPENBLAS_NUM_THREADS"] == "2"


def test_blas_override(monkeypatch):
    monkeypatch.setenv("HARNESS_BLAS", "none")
    assert blas.find_openblas() is None
    monkeypatch.setenv("HARNESS_BLAS", "/opt/lib/libopenblas.so")
    assert blas.find_openblas() == "/opt/lib/libopenblas.so"
