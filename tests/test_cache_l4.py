"""An L4 prefix-cache tier (network storage or a peer Mac's memory): sized in GB, read over the cluster's slowest
link, only for a policy with tiers; the default (no L4) leaves the tiers as they were."""
from __future__ import annotations

import subprocess
import sys

import pytest

from harness import catalog
from harness.costmodel import PlanOptions, load_profile
from harness.specs import UserError
from sim.prefix_cache import make_prefix_cache
from strategies.registry import get_strategy


@pytest.fixture(scope="module")
def pair():
    cluster, model, profile = catalog.load_cluster("mini-pair"), catalog.load_model("qwen2.5-0.5b", 16), load_profile()
    return cluster, model, get_strategy("uniform")(cluster, model, PlanOptions(profile=profile)), profile


def test_l4_is_sized_in_gb_and_read_over_the_slowest_link(pair):
    cluster, model, plan, profile = pair
    plain = make_prefix_cache("tiered_lru", cluster, model, plan, profile)
    deep = make_prefix_cache("tiered_lru", cluster, model, plan, profile, l4_gb=10.0)
    assert [t.name for t in plain.config.tiers] == ["L1", "L2", "L3"]
    assert deep.config.tiers[:3] == plain.config.tiers
    l4 = deep.config.tiers[3]
    block_bytes = deep.block * model.kv_bytes_per_token()
    assert l4.name == "L4" and l4.capacity_blocks == int(10e9 / block_bytes)
    slowest = min(link.bandwidth_gbps for link in cluster.links) * 1e9 / 8
    stages = len([n for s in plan.stages for n in s.nodes])
    assert l4.load_s_per_block == pytest.approx(block_bytes / stages / slowest)
    assert l4.load_s_per_block > deep.config.tiers[2].load_s_per_block   # a 20 Gbit/s link is slower than the SSD


def test_l4_needs_a_policy_with_tiers_and_a_sane_size(pair):
    with pytest.raises(UserError, match="'lru' keeps one tier: an L4 size needs a policy with tiers"):
        make_prefix_cache("lru", *pair[:3], pair[3], l4_gb=1.0)
    with pytest.raises(UserError, match="L4 cache size must be 0"):
        make_prefix_cache("tiered_lru", *pair[:3], pair[3], l4_gb=-1.0)


def test_simulate_with_an_l4_tier_reports_it(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness", "simulate", "--cluster", "mini-pair", "--model",
                          "qwen2.5-0.5b", "--quant", "16", "--strategy", "uniform", "--cache", "tiered_lru",
                          "--cache-l4-gb", "5", "--workload", "conversations", "--quiet", "--out", str(tmp_path),
                          "--run-id", "l4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import json
    summary = json.loads((tmp_path / "l4" / "summary.json").read_text())
    assert json.loads((tmp_path / "l4" / "config.json").read_text())["cache_l4_gb"] == 5
    assert "L4" in json.dumps(summary)
    bad = subprocess.run([sys.executable, "-m", "harness", "simulate", "--cache", "s3_fifo", "--cache-l4-gb", "5",
                          "--quiet", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "needs a policy with tiers" in bad.stderr


def test_experiment_cache_l4_gb_is_range_checked():
    from harness.experiment import check_experiment
    check_experiment({"cache": "tiered_lru", "cache_l4_gb": 200}, "e.toml")
    with pytest.raises(UserError, match="e.toml: cache_l4_gb"):
        check_experiment({"cache_l4_gb": -3}, "e.toml")
    with pytest.raises(UserError, match="cache_l4_gb"):
        check_experiment({"cache_l4_gb": "big"}, "e.toml")


def test_a_wrong_harness_l4_dir_stops_real_ranks_before_they_start_and_not_the_simulator(pair, monkeypatch):
    from harness.backends import BackendOptions, Planned, make_backend
    monkeypatch.setenv("HARNESS_L4_DIR", "/nonexistent/l4")
    planned = Planned(*pair, model_source="qwen2.5-0.5b")
    options = BackendOptions(planned=lambda: planned, cache="tiered_lru", cache_l4_gb=1.0)
    assert make_backend("sim", options) is not None          # the simulator has no folder to write
    with pytest.raises(UserError, match="HARNESS_L4_DIR=/nonexistent/l4: not a folder"):
        make_backend("mlx", options)
