"""Per-generation efficiency (issue 11, item 2): a chip without its own factors takes its generation's, and a
generation without rows is flagged as estimated (M5: derived TFLOPS, Neural Accelerators not modelled)."""
from __future__ import annotations

import json

import pytest

from harness import calibrate as cal
from harness import catalog
from harness.costmodel import PROFILE_DIR, Profile, load_profile
from harness.specs import UserError

BASE = Profile(name="t", eta_bw=0.8, mu_compute=0.6, step_overhead_s=0.0, layer_overhead_s=0.0,
               link_overhead_us=0.0, ssd_gbs=4.0, per_chip={"M3 Max": {"eta_bw": 0.7}},
               per_generation={"M3": {"eta_bw": 0.9, "mu_compute": 0.5}})


def test_chip_then_generation_then_global():
    m3max, m3ultra, m4max = (catalog.find_chip(n) for n in ("M3 Max", "M3 Ultra", "M4 Max"))
    assert BASE.bandwidth(m3max) == pytest.approx(0.7 * m3max.mem_bw_gbs * 1e9)        # its own
    assert BASE.flops(m3max) == pytest.approx(0.5 * m3max.fp16_tflops * 1e12)           # its generation's
    assert BASE.bandwidth(m3ultra) == pytest.approx(0.9 * m3ultra.mem_bw_gbs * 1e9)     # its generation's
    assert BASE.bandwidth(m4max) == pytest.approx(0.8 * m4max.mem_bw_gbs * 1e9)         # the global one


def test_calibrate_fits_generations_and_flags_the_missing_ones():
    obs, _ = cal.load_observations()
    profile = cal.fit_profile(obs)
    assert set(profile.per_generation) == {"M1", "M2"}
    assert profile.per_generation["M2"]["eta_bw"] > profile.per_generation["M1"]["eta_bw"]
    table = cal.generation_table(profile, obs)
    assert table["M3"]["basis"].startswith("estimated") and "eta_bw" not in table["M3"]
    assert "Neural Accelerators" in table["M5"]["basis"]


def test_generation_factors_leave_the_fitted_chips_alone():
    """Every M1/M2 chip of the catalog has its own factors, so the generation ones change none of them."""
    p = load_profile()
    for chip in catalog.chips():
        if chip.name.split()[0] in ("M1", "M2"):
            assert chip.name in p.per_chip
    assert set(p.per_generation) == {"M1", "M2"}


@pytest.mark.parametrize("factors, message", [({"eta_bw": -1}, "per_generation.M3.eta_bw must be a positive number"),
                                              ({"bogus": 1}, "bogus")])
def test_per_generation_is_checked(tmp_path, factors, message):
    data = json.loads((PROFILE_DIR / "fitted.json").read_text())
    data["per_generation"] = {"M3": factors}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        load_profile(bad)
