import json

import pytest

from harness import catalog
from harness.specs import UserError

PUBLISHED_PARAMS_B = {  # model cards: total (active) parameters in billions
    "llama-3.1-8b": (8.03, None),
    "llama-3.1-70b": (70.6, None),
    "llama-3.1-405b": (405.9, None),
    "llama-2-7b": (6.74, None),
    "qwen2.5-7b": (7.61, None),
    "qwen2.5-32b": (32.5, None),
    "qwen2.5-72b": (72.7, None),
    "mistral-7b": (7.25, None),
    "qwen3-235b-a22b": (235.0, 22.0),
    "qwen3-30b-a3b": (30.5, 3.3),
    "deepseek-v3": (671.0, 37.0),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_B))
def test_derived_parameter_counts_match_published(name):
    total, active = PUBLISHED_PARAMS_B[name]
    spec = catalog.load_model(name)
    assert spec.total_params / 1e9 == pytest.approx(total, rel=0.015)
    if active:
        assert spec.active_params / 1e9 == pytest.approx(active, rel=0.03)


def test_quantized_bytes_count_scales_and_biases():
    m16 = catalog.load_model("llama-3.1-70b", 16)
    m4 = catalog.load_model("llama-3.1-70b", 4, 64)
    assert m4.bits_per_weight == 4.5  # 4 bits + (16-bit scale + 16-bit bias) / 64
    ratio = m4.weight_bytes(0, 80) / m16.weight_bytes(0, 80)
    assert ratio == pytest.approx(4.5 / 16, rel=1e-3)  # norms stay half precision: a hair above
    assert ratio > 4.5 / 16


def test_kv_bytes_per_token_gqa_and_mla():
    llama = catalog.load_model("llama-3.1-70b")
    assert llama.kv_bytes_per_token() == 80 * 2 * 8 * 128 * 2
    ds = catalog.load_model("deepseek-v3")
    assert ds.kv_bytes_per_token() == 61 * (512 + 64) * 2  # compressed latent + rope key


def test_moe_decode_reads_fewer_bytes_than_stored_and_grows_with_batch():
    m = catalog.load_model("qwen3-235b-a22b", 4)
    one = m.decode_read_bytes(0, m.num_layers, 1)
    assert one < 0.15 * m.weight_bytes(0, m.num_layers)
    assert one < m.decode_read_bytes(0, m.num_layers, 8) < m.weight_bytes(0, m.num_layers)


def test_deepseek_first_three_layers_are_dense():
    m = catalog.load_model("deepseek-v3", 4)
    assert m.dense_layers == (0, 1, 2)
    assert m.weight_bytes(0, 1) < m.weight_bytes(3, 4) / 10


def test_every_catalog_chip_bin_is_loaded():
    chips = catalog.chips()
    assert len(chips) == 35
    assert {c.name for c in chips} >= {"M1", "M2 Ultra", "M3 Ultra", "M4 Max", "M5 Ultra"}
    assert all(c.mem_bw_gbs > 0 and c.fp16_tflops > 0 for c in chips)
    assert [c.tflops_assumed for c in chips if c.name.startswith("M5")] == [True] * 5
    assert catalog.find_chip("M4 Max", 40).rdma and not catalog.find_chip("M2 Ultra", 76).rdma


def test_simple_cluster_shape_infers_chip_and_thunderbolt_links():
    c = catalog.load_cluster("seed-64gb")
    assert {n.chip.name for n in c.nodes} == {"M1 Max"}
    assert c.link("mac0", "mac3").kind == "tb4-tcp"
    assert c.nodes[0].host == "10.0.0.1" and c.nodes[0].role == "coordinator"


def test_rich_cluster_has_explicit_and_default_links():
    c = catalog.load_cluster("mixed")
    assert c.link("studio-m3u", "studio-m4max").kind == "tb5-rdma"
    assert c.link("mbp-m2max", "studio-m3u").kind == "tb4-tcp"
    assert len(c.links) == 6


def write(tmp_path, data) -> str:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


@pytest.mark.parametrize("data, words", [
    ("{not json", ["not valid JSON", "line 1"]),
    ({"nodes": []}, ["'nodes'", "non-empty"]),
    ({"nodes": [{"name": "a", "gpu_cores": 76}]}, ["nodes[0].memory_gb", "missing"]),
    ({"nodes": [{"name": "a", "memory_gb": "lots", "gpu_cores": 76}]}, ["nodes[0].memory_gb", "positive number", "'lots'"]),
    ({"nodes": [{"name": "a", "memory_gb": 192, "gpu_cores": 60}]}, ["ambiguous", "M2 Ultra", "M3 Ultra", '"chip"']),
    ({"nodes": [{"name": "a", "memory_gb": 64, "chip": "M9"}]}, ["unknown chip 'M9'", "M2 Ultra"]),
    ({"nodes": [{"name": "a", "memory_gb": 512, "chip": "M2 Ultra"}]}, ["512 GB", "192 GB"]),
    ({"nodes": [{"name": "a", "memory_gb": 64, "chip": "M1 Max"}, {"name": "a", "memory_gb": 64, "chip": "M1 Max"}]},
     ["unique", "a"]),
    ({"nodes": [{"name": "a", "memory_gb": 192, "chip": "M2 Ultra"}, {"name": "b", "memory_gb": 192, "chip": "M2 Ultra"}],
      "links": [{"a": "a", "b": "b", "kind": "tb5-rdma"}]}, ["links[0]", "RDMA needs Thunderbolt 5"]),
    ({"nodes": [{"name": "a", "memory_gb": 64, "chip": "M1 Max"}], "links": [{"a": "a", "b": "z", "kind": "1gbe"}]},
     ["links[0]", "'z'"]),
    ({"nodes": [{"name": "a", "memory_gb": 64, "chip": "M1 Max"}], "default_link": "carrier-pigeon"},
     ["default_link", "carrier-pigeon", "known kinds"]),
])
def test_bad_cluster_files_name_file_field_and_expectation(tmp_path, data, words):
    path = write(tmp_path, data)
    with pytest.raises(UserError) as err:
        catalog.load_cluster(path)
    message = str(err.value)
    assert path in message
    for w in words:
        assert w in message


def test_model_config_errors_name_the_field(tmp_path):
    cfg = json.loads((catalog.MODEL_DIR / "llama-3.1-8b.json").read_text())
    del cfg["hidden_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="hidden_size"):
        catalog.load_model(str(path))
    with pytest.raises(UserError, match="known|one of"):
        catalog.load_model("no-such-model")
    with pytest.raises(UserError, match="bits"):
        catalog.load_model("llama-3.1-8b", 7)


def test_model_folder_with_config_json_loads(tmp_path):
    (tmp_path / "config.json").write_text((catalog.MODEL_DIR / "qwen2.5-0.5b.json").read_text())
    spec = catalog.load_model(str(tmp_path), 4)
    assert spec.num_layers == 24 and spec.tie_embeddings and spec.quant_bits == 4


def test_a_measured_host_can_be_a_cluster_node(tmp_path):
    """profile-host output describes this machine as a chip: a cluster of it can be planned and simulated."""
    from harness.costmodel import load_profile
    from harness.costmodel import PlanOptions
    from strategies.registry import get_strategy
    host = {"chip": {"name": "host-cpu", "gpu_bin": "cpu", "gpu_cores": 0, "mem_bw_gbs": 6.0, "fp16_tflops": 0.1,
                     "max_mem_gb": 24, "thunderbolt": "none", "ssd_gbs": 3.0},
            "profile": {"name": "host-cpu", "eta_bw": 1.0, "mu_compute": 1.0, "step_overhead_s": 0.002,
                        "layer_overhead_s": 0.0, "link_overhead_us": 0.0, "ssd_gbs": 3.0},
            "source": "measured"}
    (tmp_path / "host.json").write_text(json.dumps(host))
    cluster_file = tmp_path / "pair.json"
    cluster_file.write_text(json.dumps({"name": "pair", "default_link": "loopback", "nodes": [
        {"name": "rank-a", "host_profile": "host.json", "memory_gb": 12},
        {"name": "rank-b", "chip": host["chip"], "memory_gb": 12, "ssd_gbs": 1.5}]}))
    cluster = catalog.load_cluster(str(cluster_file))
    a, b = cluster.nodes
    assert a.chip.mem_bw_gbs == 6.0 and a.ssd_gbs == 3.0 and b.ssd_gbs == 1.5 and not a.chip.rdma
    profile = load_profile(tmp_path / "host.json")
    assert profile.step_overhead_s == 0.002
    plan = get_strategy("uniform")(cluster, catalog.load_model("qwen2.5-0.5b", 16), PlanOptions(profile))
    assert plan.split() == [12, 12]
    # one token streams each stage's fp16 weights at the measured bandwidth (theoretical)
    assert plan.stages[0].decode_ms > 1e3 * catalog.load_model("qwen2.5-0.5b", 16).weight_bytes(0, 12) / 6e9


def test_a_bad_host_profile_names_the_field(tmp_path):
    (tmp_path / "host.json").write_text(json.dumps({"chip": {"name": "x", "mem_bw_gbs": -1}}))
    path = write(tmp_path, {"nodes": [{"name": "a", "host_profile": "host.json", "memory_gb": 8}]})
    with pytest.raises(UserError, match="host_profile .*mem_bw_gbs.*positive"):
        catalog.load_cluster(path)


def test_float32_models_for_cpu_hosts():
    m32, m16 = catalog.load_model("qwen2.5-0.5b", 32), catalog.load_model("qwen2.5-0.5b", 16)
    assert m32.bits_per_weight == 32 and m32.weight_bytes(0, 24) == pytest.approx(2 * m16.weight_bytes(0, 24), rel=1e-3)
    assert m32.kv_bytes_per_token() == 2 * m16.kv_bytes_per_token()
