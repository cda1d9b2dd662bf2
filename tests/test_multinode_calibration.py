"""Multi-node rows in `calibrate` (issue 11): the GLM-5 and GLM-5.3-Flash catalog configs hold the published sizes,
and the multi-node rows of harness/catalog/calibration/public_mac_multinode.csv are priced as the planner prices a
pipeline or a tensor-parallel group, held out by source, and reported apart (single/multi-node, plan)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from harness import calibrate as cal
from harness import catalog
from harness.cli import main
from harness.costmodel import Profile

TRUTH = Profile(name="truth", eta_bw=0.6, mu_compute=0.6, step_overhead_s=0.002, layer_overhead_s=0.0,
                link_overhead_us=0.0, ssd_gbs=4.0)
EXO_2295 = "https://github.com/exo-explore/exo/issues/2295"


def test_glm5_preset_is_the_published_config():
    """zai-org/GLM-5 config.json (transformers GlmMoeDsaConfig, xLLM glm5.h; GLM-5 report: 744B total, 40B active)."""
    m = catalog.load_model("glm-5")
    assert (m.num_layers, m.hidden, m.heads, m.kv_heads, m.ffn, m.vocab) == (78, 6144, 64, 64, 12288, 154880)
    assert (m.experts, m.active_experts, m.moe_ffn, m.shared_experts, m.dense_layers) == (256, 8, 2048, 1, (0, 1, 2))
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == \
        (2048, 512, 192, 64, 256)
    assert not m.tie_embeddings
    assert m.total_params == pytest.approx(744e9, rel=0.01)
    assert m.active_params == pytest.approx(40e9, rel=0.03)


def test_glm53_flash_preset_is_the_published_config():
    """zai-org/GLM-5.3-Flash text backbone (transformers Glm5NextTextConfig; stated 320B total, 18B active)."""
    m = catalog.load_model("glm-5.3-flash")
    assert (m.num_layers, m.hidden, m.heads, m.kv_heads, m.ffn, m.vocab) == (45, 4096, 64, 64, 12288, 154880)
    assert (m.experts, m.active_experts, m.moe_ffn, m.shared_experts, m.dense_layers) == (288, 8, 2048, 1, (0, 1, 2))
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == \
        (1536, 512, 256, 0, 256)
    assert m.total_params == pytest.approx(320e9, rel=0.03)
    # what is not modelled (KDA layers priced as MLA, the mHC streams, the vision tower, the MTP layer) leaves the
    # active count under the stated 18B
    assert 0.9 * 18e9 < m.active_params < 18e9


def test_multinode_rows_load_with_their_plan():
    obs, skipped = cal.load_observations(cal.MULTINODE)
    tg = [o for o in obs if o.kind == "tg"]
    assert {(o.model_name, o.strategy, o.nodes, o.link) for o in tg} == {
        ("GLM-5", "tensor", 2, "tb5-rdma"), ("GLM-5", "tensor", 4, "tb5-rdma"),
        ("GLM-5.3-Flash", "pipeline", 4, "tb5-rdma"), ("GLM-5.3-Flash", "pipeline", 4, "wifi")}
    assert len([o for o in tg if o.batch == 1]) == 7 and {o.batch for o in tg} == {1, 16}
    # 8bit (MXFP8): one 8-bit scale per 32 weights; GLM-5.3-Flash: bits per weight from the stated 110 GB
    glm5 = next(o for o in obs if o.model_name == "GLM-5")
    assert glm5.model.bits_per_weight == 8.25
    flash = next(o for o in obs if o.model_name == "GLM-5.3-Flash")
    assert flash.model.weight_bytes(0, 45) + flash.model.embed_bytes() + flash.model.head_bytes() == \
        pytest.approx(110e9, rel=0.01)
    # a run is a prompt then its generation: the 10K prompt starts from nothing cached
    assert {o.context for o in obs if o.kind == "pp"} == {0.0}
    # the two Qwen3-VL rows do not state the model's size
    assert len(skipped) == 2 and all("size" in s for s in skipped)
    tensor, pipeline = (next(o for o in tg if o.strategy == s) for s in ("tensor", "pipeline"))
    _, stages = cal.row_cluster(tensor)
    assert len(stages) == 1 and stages[0].tp == tensor.nodes
    _, stages = cal.row_cluster(pipeline)
    assert [st.end - st.start for st in stages] == [12, 11, 11, 11] and all(st.tp == 1 for st in stages)


def test_loso_breaks_out_multinode_decode_from_those_rows():
    single, _ = cal.load_observations([cal.DATA])
    multi, _ = cal.load_observations(cal.MULTINODE)
    # every rate what TRUTH predicts: held out by source, the multi-node rows come back exactly
    synthetic = [dataclasses.replace(o, published_tok_s=cal.predict(o, TRUTH)) for o in single + multi]
    rows, _ = cal.leave_one_source_out(synthetic, per_chip=False, base=TRUTH)
    summary = cal.loso_summary(rows, [])
    assert set(summary["topology"]) == {"single", "multi-node"}
    assert summary["topology"]["multi-node"]["decode_rows"] == 7
    assert summary["topology"]["multi-node"]["decode_median_abs_error_pct"] < 1.0
    assert "tensor x4 over tb5-rdma" in summary["plan"] and "pipeline x4 over wifi" in summary["plan"]
    # with the published rates, the breakdown is the median over exactly those held-out rows
    rows, _ = cal.leave_one_source_out(single + multi)
    mine = [abs(r["error_pct"]) for r in rows if r["nodes"] > 1 and r["kind"] == "tg"]
    assert len(mine) == 7
    assert cal.loso_summary(rows, [])["topology"]["multi-node"]["decode_median_abs_error_pct"] == \
        round(float(np.median(mine)), 1)


def test_transport_term_leaves_a_held_out_source_out():
    assert cal.fit_transport(exclude_sources=(EXO_2295,))["tcp_hop_latencies"] is None
    single, _ = cal.load_observations([cal.DATA])
    terms = cal.DEFAULT_TERMS + ("transport",)
    assert cal.fit_profile(single, terms=terms).tcp_hop_latencies > 3
    assert cal.fit_profile(single, terms=terms, exclude_sources=(EXO_2295,)).tcp_hop_latencies == 1.0


def test_multinode_rows_stay_out_of_the_roofline_fit():
    single, _ = cal.load_observations([cal.DATA])
    multi, _ = cal.load_observations(cal.MULTINODE)
    assert cal.fit_profile(single + multi, multinode_engines=False) == cal.fit_profile(single)
    # they fit only the step cost of the engine seen on clusters alone (exo): one new engines entry
    both = cal.fit_profile(single + multi)
    assert set(both.engines) - set(cal.fit_profile(single).engines) == {"exo"}
    assert dataclasses.replace(both, engines={k: v for k, v in both.engines.items() if k != "exo"}) == \
        cal.fit_profile(single)


def test_cli_prints_and_writes_the_multinode_breakdown(capsys, tmp_path):
    out = tmp_path / "p.json"
    assert main(["calibrate", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "multi-node" in text and "public_mac_multinode.csv rows" in text
    assert "multi-node leave-one-source-out median |error|, before -> after the engine step cost: decode 35.2 % " \
           "-> 16.0 % (7 rows)" in text
    fit = json.loads(out.read_text())["fit"]
    multi = fit["leave_one_source_out"]["topology"]["multi-node"]
    assert multi["decode_rows"] == 7 and multi["decode_median_abs_error_pct"] is not None
    assert fit["public_rows_never_fitted"]["topology"]["multi-node"]["decode_rows"] == 7
    rows = fit["multinode_rows"]
    assert len(rows) == 12 and all(r["nodes"] > 1 for r in rows)
    assert all((r["held_out_predicted_tok_s"] is None) == (r["batch"] > 1) for r in rows)
    assert all((r["held_out_without_engine_step_tok_s"] is None) == (r["batch"] > 1) for r in rows)
    assert fit["multinode_engines"]["leave_one_source_out"]["before"]["decode_median_abs_error_pct"] == 35.2
