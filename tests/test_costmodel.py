import json

import numpy as np
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


def test_the_slowest_link_depends_on_the_message_size(profile):
    far = Link("a", "b", "tb5-rdma", latency_us=200, bandwidth_gbps=80.0)    # long latency, wide pipe
    narrow = Link("a", "c", "tb5-rdma", latency_us=3, bandwidth_gbps=5.0)    # short latency, narrow pipe
    # bandwidth alone (the simulator's old rule) always picked `narrow`, bandwidth/(1+latency) (the planner's
    # old rule) always `far`; the message's actual time picks `far` for 2 KB and `narrow` for 1 MB
    assert costmodel.slowest_link([far, narrow], 2e3, profile) is far
    assert costmodel.slowest_link([far, narrow], 1e6, profile) is narrow
    assert costmodel.group_allreduce_time([far, narrow], 4e6, 4, profile) == \
        costmodel.allreduce_time(narrow, 4e6, 4, profile)
    assert costmodel.group_allreduce_time([], 4e6, 1, profile) == 0.0


def tp_pair():
    """An M4 Pro (less bandwidth, more FLOPS) and a 24-core M1 Max in one tensor-parallel group."""
    from harness.specs import Cluster, Node
    nodes = (Node("p", catalog.find_chip("M4 Pro", 20), 64, 0.75), Node("x", catalog.find_chip("M1 Max", 24), 64, 0.75))
    return Cluster("pair", nodes, (catalog.make_link("p", "x", "tb5-rdma"),))


def test_a_tp_group_steps_at_its_slowest_members_pace(profile):
    m = catalog.load_model("llama-3.1-8b", 4)
    cluster = tp_pair()
    st = costmodel.stage_model(cluster, m, ("p", "x"), 0, 16, last=False)
    chips = [n.chip for n in cluster.nodes]
    comm = st.allreduce_s(m, profile, 512)
    each = [costmodel.prefill_time(c, profile, m, 0, 16, 512, tp=2) for c in chips]
    # compute-bound prefill waits for the M1 Max, although the M4 Pro has the lower memory bandwidth
    assert st.prefill_s(m, profile, 512, 0) == pytest.approx(max(each) + comm, rel=1e-12)
    assert each[1] > each[0] and chips[0].mem_bw_gbs < chips[1].mem_bw_gbs
    each = [costmodel.decode_time(c, profile, m, 0, 16, 1, 700, tp=2) for c in chips]
    assert st.decode_s(m, profile, 1, 700) == pytest.approx(max(each) + st.allreduce_s(m, profile, 1), rel=1e-12)
    assert st.weight_bytes_node == pytest.approx(m.weight_bytes(0, 16) / 2 + m.embed_bytes() + m.head_bytes())


def test_decode_terms_are_the_decode_step_for_every_context(profile):
    m = catalog.load_model("llama-3.1-8b", 4)
    st = costmodel.stage_model(tp_pair(), m, ("p", "x"), 16, 32, last=True)
    terms = st.decode_terms(m, profile, 3)
    ctx = np.array([0.0, 900.0, 30000.0])
    expected = [max(costmodel.decode_time(c, profile, m, 16, 32, 3, s / 3, tp=2, with_head=True) for c in st.chips)
                + st.allreduce_s(m, profile, 3) for s in ctx]
    assert terms.vector(ctx) == pytest.approx(expected, rel=1e-12)
    assert [terms.at(s) for s in ctx] == pytest.approx(expected, rel=1e-12)


def test_plan_options_are_public_and_checked(profile):
    assert costmodel.PlanOptions(profile).objective == "latency"
    with pytest.raises(UserError, match="objective"):
        costmodel.PlanOptions(profile, objective="fastest")


def test_decode_batch_scale_stretches_a_decode_step_by_its_batch_size(profile, tmp_path):
    """decode_batch_scale[b - 1] multiplies the decode step of b sequences (past the table: its last entry);
    prefill is not scaled; a per-chip table wins over the profile's; a bad table is refused by name."""
    from dataclasses import replace
    cluster = catalog.load_cluster("m2ultra-4x-tb4")
    model = catalog.load_model("llama-3.1-8b", 4)
    st = costmodel.stage_model(cluster, model, (cluster.nodes[0].name,), 0, model.num_layers, True)
    scaled = replace(profile, decode_batch_scale=(1.0, 1.5, 0.8))
    for batch, k in ((1, 1.0), (2, 1.5), (3, 0.8), (7, 0.8)):
        assert st.decode_s(model, scaled, batch, 4000.0) == pytest.approx(k * st.decode_s(model, profile, batch, 4000.0))
    assert st.prefill_s(model, scaled, 512, 0) == st.prefill_s(model, profile, 512, 0)
    chip = cluster.nodes[0].chip.name
    per_chip = replace(scaled, per_chip={chip: {**profile.per_chip.get(chip, {}), "decode_batch_scale": [1.0, 2.0]}})
    assert st.decode_s(model, per_chip, 2, 0.0) == pytest.approx(2.0 * st.decode_s(model, profile, 2, 0.0))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads((costmodel.PROFILE_DIR / "fitted.json").read_text()),
                               "decode_batch_scale": [1.0, -2]}))
    with pytest.raises(UserError, match="decode_batch_scale must be a list"):
        costmodel.load_profile(bad)
