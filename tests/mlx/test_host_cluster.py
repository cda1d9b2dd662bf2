"""This host as N ranks: one description of the cluster that the simulator reads and the real ranks match."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.catalog import load_cluster
from harness.mlx import launcher
from harness.mlx.hostcluster import host_cluster, host_plan, write_host_files
from harness.specs import UserError

PROFILE = {"chip": {"name": "host-cpu", "gpu_bin": "cpu", "gpu_cores": 0, "mem_bw_gbs": 9.0, "fp16_tflops": 0.2,
                    "max_mem_gb": 24.0, "thunderbolt": "none", "ssd_gbs": 2.0},
           "profile": {"name": "host-cpu", "eta_bw": 1.0, "mu_compute": 1.0, "step_overhead_s": 0.004,
                       "layer_overhead_s": 0.0, "link_overhead_us": 0.0, "ssd_gbs": 2.0, "per_chip": {}},
           "link": {"kind": "loopback", "latency_us": 42.0, "bandwidth_gbps": 7.5},
           "rank": {"ranks": 2, "blas_threads": 1, "pinned_core": 0, "cores": 2, "ranks_per_core": 1}}


def test_written_cluster_parses_with_measured_chip_and_link(tmp_path):
    path = write_host_files(PROFILE, tmp_path, 3)
    cluster = load_cluster(str(path))
    assert [n.name for n in cluster.nodes] == ["rank-stage0", "rank-stage1", "rank-stage2"]
    assert all(n.chip.mem_bw_gbs == 9.0 and n.chip.fp16_tflops == 0.2 for n in cluster.nodes)
    assert all(n.memory_gb <= 8.0 for n in cluster.nodes)            # the host's memory shared by 3 ranks
    link = cluster.link("rank-stage0", "rank-stage2")
    assert (link.latency_us, link.bandwidth_gbps) == (42.0, 7.5)


def test_plan_puts_stage_i_on_rank_i(tmp_path):
    data = json.loads(write_host_files(PROFILE, tmp_path, 2).read_text())
    plan = host_plan(data, [5, 3])
    assert [(s.nodes, s.layer_start, s.layer_end) for s in plan.stages] == [(("rank-stage0",), 0, 5),
                                                                           (("rank-stage1",), 5, 8)]
    with pytest.raises(UserError, match="3 stages"):
        host_plan(data, [2, 2, 4])


def test_rank_compute_env_is_what_profile_host_measures():
    one = launcher.compute_env(0, 1, None, [0, 1], 2)
    two = launcher.compute_env(0, 2, None, [0, 1], 2)
    assert one["OPENBLAS_NUM_THREADS"] == "2" and "HARNESS_CPU_CORE" not in one
    assert two["OPENBLAS_NUM_THREADS"] == "1" and two["HARNESS_CPU_CORE"] == "0"
    assert launcher.compute_env(2, 3, None, [0, 1], 2)["HARNESS_CPU_CORE"] == "0"   # 3 ranks: two share core 0


@pytest.fixture(scope="module")
def two_rank_files(tmp_path_factory):
    """One real `profile-host --ranks 2 --cluster-out` run (~1 min) shared by the checks below."""
    out = tmp_path_factory.mktemp("host")
    run = subprocess.run([sys.executable, "-m", "harness", "profile-host", "--ranks", "2",
                          "--out", str(out / "profile-2ranks.json"), "--cluster-out", str(out / "cluster-2ranks.json"),
                          "--cache-dir", str(out / "models")], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads((out / "profile-2ranks.json").read_text()), out / "cluster-2ranks.json"


@pytest.mark.slow
def test_real_two_rank_profile_is_one_pinned_thread(two_rank_files):
    prof, _ = two_rank_files
    assert prof["rank"]["ranks"] == 2 and prof["rank"]["blas_threads"] == 1
    assert prof["rank"]["pinned_core"] in launcher.host_cores()
    assert prof["chip"]["mem_bw_gbs"] > 0 and prof["link"]["latency_us"] > 0


@pytest.mark.slow
def test_real_two_rank_cluster_carries_the_measured_chip_and_link(two_rank_files):
    prof, cluster_path = two_rank_files
    cluster = load_cluster(str(cluster_path))
    assert [n.name for n in cluster.nodes] == ["rank-stage0", "rank-stage1"]
    assert all(n.chip.mem_bw_gbs == prof["chip"]["mem_bw_gbs"] for n in cluster.nodes)
    assert cluster.link("rank-stage0", "rank-stage1").latency_us == prof["link"]["latency_us"]


def test_plan_puts_a_tp_stage_on_the_next_ranks(tmp_path):
    data = json.loads(write_host_files(PROFILE, tmp_path, 3).read_text())
    plan = host_plan(data, [5, 3], tp=[2, 1])
    assert [(s.nodes, s.tp_degree, s.layer_start, s.layer_end) for s in plan.stages] == [
        (("rank-stage0", "rank-stage1"), 2, 0, 5), (("rank-stage2",), 1, 5, 8)]
    with pytest.raises(UserError, match="4 ranks, but cluster"):
        host_plan(data, [5, 3], tp=[2, 2])


def test_each_rank_names_the_core_the_launcher_pins_it_to(tmp_path):
    cluster = load_cluster(str(write_host_files(PROFILE, tmp_path, 3)))
    pinned = [launcher.compute_env(r, 3, None, [0, 1], 2)["HARNESS_CPU_CORE"] for r in range(3)]
    assert [n.cpu_core for n in cluster.nodes] == [f"core{c}" for c in pinned] == ["core0", "core1", "core0"]
    assert load_cluster(str(write_host_files(PROFILE, tmp_path / "one", 1))).nodes[0].cpu_core is None


def test_three_ranks_on_two_cores_price_the_head_twice(tmp_path):
    """Every rank computes the output head at once; two of three share core 0, so the last stage pays it twice."""
    from harness import costmodel
    from harness.specs import model_from_config
    from harness.mlx.modelbuild import qwen2_config

    data = json.loads(write_host_files(PROFILE, tmp_path, 3).read_text())
    cluster, model = load_cluster(str(tmp_path / "cluster-3ranks.json")), model_from_config(qwen2_config("40m"), "40m")
    tp_pp, pair = host_plan(data, [5, 3], tp=[2, 1]), host_plan(data, [5, 3])
    assert costmodel.head_share(cluster, tp_pp) == 2 and costmodel.head_share(cluster, pair) == 1
    shared, alone = costmodel.stage_models(cluster, model, tp_pp)[-1], costmodel.stage_models(cluster, model, pair)[-1]
    assert shared.head_share == 2 and alone.head_share == 1
    profile = costmodel.load_profile()
    with_share, without = shared.decode_terms(model, profile, 3), alone.decode_terms(model, profile, 3)
    assert with_share.nbytes - without.nbytes == pytest.approx(model.head_bytes())
    assert with_share.flops - without.flops == pytest.approx(model.head_flops(3))
    (b2, f2), (b1, f1) = shared.prefill_work(model, 64, 0, 2, profile), alone.prefill_work(model, 64, 0, 2, profile)
    assert (b2 - b1, f2 - f1) == pytest.approx((model.head_bytes(), model.head_flops(2)))
    mixed = [st.mixed_s(model, profile, 2, 100.0, [(32, 0)]) for st in (shared, alone)]
    assert mixed[0] > mixed[1]
