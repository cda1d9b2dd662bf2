"""Pure parts of the launcher and worker: hostfile shape, layer-order to rank-order translation, BLAS env."""
from __future__ import annotations

import shutil
import sys

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


def test_ranks_exit_when_their_launcher_is_killed(tmp_path):
    """A launcher killed with SIGKILL runs no cleanup; its ranks must still go away on their own."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from harness.mlx import modelbuild
    model = modelbuild.build(modelbuild.qwen2_config("tiny"), cache_dir=tmp_path).path
    script = ("import os, signal, sys\n"
              "from harness.mlx import launcher\n"
              f"g = launcher.launch({str(model)!r}, [3, 3])\n"
              "print(*[r.proc.stdout.readline().decode().strip() and r.proc.pid for r in g.ranks], flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    deadline = time.monotonic() + 20           # hang guard; the watchdog polls every 0.5 s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose: it holds no port, memory or core
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_a_strategy_plan_gives_the_split_and_node_names():
    from harness import catalog
    from harness.costmodel import load_profile
    from harness.backends.mlx import links_for_plan, rank_layout
    from harness.costmodel import PlanOptions
    from strategies.registry import get_strategy

    cluster = catalog.load_cluster("mixed")
    model = catalog.load_model("qwen2.5-0.5b", 16, 64)
    plan = get_strategy("ring_memory_weighted")(cluster, model, PlanOptions(profile=load_profile()))
    config = {"num_hidden_layers": model.num_layers}
    layout = rank_layout(plan, config)
    assert layout.split == plan.split() and sum(layout.split) == model.num_layers
    assert layout.stage_names == ["+".join(s.nodes) for s in plan.stages]
    assert rank_layout(plan.to_dict(), config) == layout   # plan.json form
    n = len(plan.stages)
    assert layout.rank_stage == [n - 1 - r for r in range(n)]   # rank 0 runs the last stage
    shapes = links_for_plan(plan, cluster)
    assert len(shapes) == len(plan.stages)
    first_hop = cluster.link(plan.stages[0].nodes[0], plan.stages[1].nodes[0]).bandwidth_gbps
    assert shapes[-1].bandwidth_gbps <= first_hop      # rank size-1 runs stage 0


def test_a_clean_close_removes_the_rank_folder_and_a_failed_rank_keeps_its_log():
    """launch() makes a temporary folder per group (hostfiles, rank logs): it used to stay behind after every run."""
    clean = launcher.launch("unused", [1], command=[sys.executable, "-c", "pass"])
    clean.ranks[0].proc.wait(timeout=30)
    clean.close()
    assert not clean.workdir.exists()
    failed = launcher.launch("unused", [1], command=[sys.executable, "-c", "import sys; sys.exit('boom')"])
    failed.ranks[0].proc.wait(timeout=30)
    failed.close()
    assert "boom" in (failed.workdir / "rank0.log").read_text()
    shutil.rmtree(failed.workdir)
