"""Host micro-benchmarks: the profile they write is usable by the cost model as it stands."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from harness.mlx import hostbench


def test_link_from_rtts_uses_half_rtt_and_the_large_message_slope():
    # one-way: 50 us fixed + 1 ns per byte (8 Gbit/s)
    rtts = {str(s): 2 * (50e-6 + s * 1e-9) for s in (64, 1 << 20, 16 << 20)}
    link = hostbench.link_from_rtts(rtts)
    assert link["latency_us"] == pytest.approx(50.064, rel=1e-6)
    assert link["bandwidth_gbps"] == pytest.approx(8.0, rel=1e-6)


@pytest.mark.slow
def test_profile_host_writes_a_profile_the_cost_model_loads(tmp_path):
    from harness.costmodel import load_profile
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "host.json"
    run = subprocess.run([sys.executable, "-m", "harness", "profile-host", "--out", str(out),
                          "--cache-dir", str(tmp_path / "models")], capture_output=True, text=True, cwd=root,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert data["source"] == "measured" and data["chip"]["gpu_cores"] == 0
    for key in ("mem_bw_gbs", "fp16_tflops", "max_mem_gb", "ssd_gbs"):
        assert data["chip"][key] > 0 and math.isfinite(data["chip"][key]), key
    assert data["link"]["kind"] == "loopback" and data["link"]["latency_us"] > 0
    for ranks, allsum in data["measurements"]["all_sum"].items():   # measured beside the cost model's figure
        assert int(ranks) in (2, 3) and set(allsum["median_s"]) == set(allsum["cost_model_s"])
        assert all(v > 0 for v in allsum["median_s"].values()), ranks
    profile_file = tmp_path / "profile.json"
    profile_file.write_text(json.dumps(data["profile"]))
    profile = load_profile(profile_file)
    assert profile.eta_bw == 1.0 and profile.step_overhead_s >= 0
