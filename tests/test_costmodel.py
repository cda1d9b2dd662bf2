import json

import pytest

from harness import catalog, costmodel
from harness.specs import Link, UserError


@pytest.fixture
def profile():
    return costmodel.load_profile()


def test_decode_step_is_the_bandwidth_roofline_plus_overhead(profile):
    chip = catalog.find_chip("M2 Ultra", 76)
    m = catalog.load_model("llama-3.1-8b", 4)
    t = costmodel.decode_time(chip, profile, m, 0, m.num_layers, batch=1, context_tokens=0)
    eta = profile.per_chip.get("M2 Ultra", {}).get("eta_bw", profile.eta_bw)
    overhead = profile.step_overhead_s + 32 * profile.layer_overhead_s
    expected = m.weight_bytes(0, m.num_layers) / (eta * 800e9) + overhead
    assert t == pytest.approx(expected, rel=1e-12)


def test_overhead_grows_with_the_layers_a_stage_runs(profile):
    chip = catalog.find_chip("M2 Ultra", 76)
    m = catalog.load_model("llama-3.1-70b", 4)
    whole = costmodel.decode_time(chip, profile, m, 0, 80)
    halves = costmodel.decode_time(chip, profile, m, 0, 40) + costmodel.decode_time(chip, profile, m, 40, 80)
    # two stages pay the per-step part twice, the per-layer part once in total
    assert halves - whole == pytest.approx(profile.step_overhead_s, abs=1e-12)


def test_prefill_is_compute_bound_for_long_prompts(profile):
    chip = catalog.find_chip("M2 Ultra", 76)
    m = catalog.load_model("llama-3.1-8b", 4)
    t = costmodel.prefill_time(chip, profile, m, 0, m.num_layers, tokens=2048)
    flops = m.prefill_flops(0, m.num_layers, 2048)
    mu = profile.per_chip.get("M2 Ultra", {}).get("mu_compute", profile.mu_compute)
    overhead = profile.step_overhead_s + 32 * profile.layer_overhead_s
    assert t == pytest.approx(flops / (mu * 27.2e12) + overhead, rel=1e-12)


def test_link_and_allreduce_times(profile):
    link = Link("a", "b", "1gbe", latency_us=100, bandwidth_gbps=1.0)
    assert costmodel.link_time(link, 1e6, profile) == pytest.approx(100e-6 + profile.link_overhead_us * 1e-6 + 8e-3)
    assert costmodel.allreduce_time(link, 1e6, 1, profile) == 0
    assert costmodel.allreduce_time(link, 4e6, 4, profile) == pytest.approx(6 * costmodel.link_time(link, 1e6, profile))


def test_per_chip_overrides_apply(tmp_path):
    data = json.loads((costmodel.PROFILE_DIR / "default.json").read_text())
    data["per_chip"] = {}
    data["per_chip"] = {"M2 Ultra": {"eta_bw": 0.5}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    p = costmodel.load_profile(path)
    assert p.bandwidth(catalog.find_chip("M2 Ultra")) == pytest.approx(0.5 * 800e9)
    assert p.bandwidth(catalog.find_chip("M1 Max")) == pytest.approx(data["eta_bw"] * 400e9)


def test_missing_or_broken_profile_is_an_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        costmodel.load_profile(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"eta_bw": 0.5}))
    with pytest.raises(UserError, match="mu_compute"):
        costmodel.load_profile(bad)
