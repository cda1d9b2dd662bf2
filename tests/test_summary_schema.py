"""summary.json schema 2: every command writes it (validated against the published JSON Schema), memory in use
has one definition, and version-1 folders written by the code before schema 2 are still read."""
import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from harness import catalog, summary
from harness.cli import main
from harness.specs import LoadReport
from reports import check as gate
from reports.run import load_run

V1_RUNS = Path(__file__).parent / "fixtures" / "v1_runs"   # written by `simulate` and `bench` at schema 1


def validate(folder: Path) -> dict:
    body = json.loads((folder / "summary.json").read_text())
    jsonschema.Draft202012Validator.check_schema(summary.schema())
    jsonschema.validate(body, summary.schema(), cls=jsonschema.Draft202012Validator)
    return body


def only_folder(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def test_simulate_writes_a_valid_summary(tmp_path):
    assert main(["simulate", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--strategy", "uniform",
                 "--workload", "poisson,rate=2,n=6,prompt=64,output=8", "--seed", "1", "--quiet",
                 "--out", str(tmp_path), "--run-id", "s", "--slo", "ttft:5000"]) == 0
    body = validate(tmp_path / "s")
    assert body["command"] == "simulate" and body["slo"] == {"ttft": 5000.0}
    assert body["fingerprint"]["plan_stages"] and body["fingerprint"]["cluster_hash"]
    # the plan spans all four nodes of this cluster, so the two memory figures agree
    m = body["metrics"]
    assert 0 < m["plan_memory_used_pct"] == pytest.approx(m["cluster_memory_used_pct"])


def test_run_with_the_sim_backend_writes_a_valid_summary(tmp_path):
    assert main(["run", "--experiment", "runs/smoke.toml", "--out", str(tmp_path), "--no-report"]) == 0
    body = validate(only_folder(tmp_path))
    assert body["command"] == "run" and body["backend"] == "sim" and body["plan"]["strategy"] == "hybrid_optimal"
    assert body["load"]["kv_peak_bytes_per_node"] and body["metrics"]["plan_memory_used_pct"] > 0


def test_bench_with_the_instant_backend_writes_a_valid_summary(tmp_path):
    assert main(["bench", "--backend", "instant", "--workload", "closed,concurrency=2,n=4,prompt=16,output=4",
                 "--out", str(tmp_path), "--label", "b"]) == 0
    body = validate(only_folder(tmp_path))
    assert body["command"] == "bench" and body["metrics"]["completed"] == 4
    assert body["metrics"]["cluster_memory_used_pct"] is None   # no cluster behind the instant backend


def test_memory_used_counts_weights_and_peak_kv_over_plan_or_cluster_nodes():
    cluster = catalog.load_cluster("m2ultra-4x-tb4")     # four equal nodes
    first, second = cluster.nodes[0], cluster.nodes[1]
    report = LoadReport({first.name: 1.0, second.name: 1.0},
                        {first.name: int(first.usable_bytes / 4), second.name: int(second.usable_bytes / 4)},
                        "simulated")
    load = summary.load_section(report, {first.name: first.usable_bytes / 4})
    pcts = summary.memory_pcts(load, cluster)
    # plan: (1/4 + 1/4 weights + 1/4 KV) of two nodes = 37.5 %; cluster: the same bytes over four equal nodes
    assert pcts["plan_memory_used_pct"] == pytest.approx(37.5)
    assert pcts["cluster_memory_used_pct"] == pytest.approx(37.5 * 2 / 4)


@pytest.mark.parametrize("name", ["simulate", "bench"])
def test_version_1_folders_are_read_as_version_2(tmp_path, name):
    folder = shutil.copytree(V1_RUNS / name, tmp_path / name)
    assert json.loads((folder / "summary.json").read_text())["schema_version"] == 1
    run = load_run(folder)
    assert run.summary["schema_version"] == 2 and run.summary["migrated_from"] == 1
    assert run.metrics["completed"] > 0 and not run.metrics_recomputed
    assert "memory_utilisation_pct" not in run.metrics
    assert main(["report", str(folder)]) == 0 and (folder / "report.html").exists()


def test_version_1_simulate_memory_figure_is_the_plan_figure(tmp_path):
    run = load_run(shutil.copytree(V1_RUNS / "simulate", tmp_path / "s"))
    old = json.loads((V1_RUNS / "simulate" / "summary.json").read_text())["metrics"]["memory_utilisation_pct"]
    assert run.metrics["plan_memory_used_pct"] == old


def test_version_1_flat_bench_summary_keeps_its_sections(tmp_path):
    run = load_run(shutil.copytree(V1_RUNS / "bench", tmp_path / "b"))
    assert run.summary["backend"] == "instant" and run.summary["load"]["source"] == "measured"
    assert "load" not in run.metrics and run.metrics["decode_tokens_per_s"] > 0


def test_check_compares_a_version_1_run_with_a_baseline_taken_from_it(tmp_path):
    folder = shutil.copytree(V1_RUNS / "simulate", tmp_path / "s")
    baseline = gate.write_baseline(folder, tmp_path / "b.json")
    assert gate.check(folder, baseline).ok


def test_load_report_bytes_mean_weights_only_in_simulate_and_the_sim_backend(tmp_path):
    """One meaning of LoadReport.memory_bytes_per_node (harness.summary): weights; sim/run.py used to add peak KV."""
    assert main(["simulate", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--strategy", "uniform",
                 "--workload", "poisson,rate=2,n=4,prompt=64,output=8", "--seed", "1", "--quiet",
                 "--out", str(tmp_path), "--run-id", "w"]) == 0
    load = json.loads((tmp_path / "w" / "summary.json").read_text())["load"]
    import argparse
    from harness.planning import add_plan_arguments, make_plan
    from sim.costs import stage_models
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    cluster, model, plan = make_plan(parser.parse_args(["--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b",
                                                        "--strategy", "uniform"]))
    weights = {n: int(st.weight_bytes_node) for st in stage_models(cluster, model, plan) for n in st.nodes}
    assert load["memory_bytes_per_node"] == weights
    assert all(v > 0 for v in load["kv_peak_bytes_per_node"].values())


def test_cluster_hash_of_the_ci_baseline_cluster_is_unchanged():
    """check refuses a baseline whose cluster hash differs: a new Node field left unset must not move the hash of
    clusters that do not use it (the CI smoke baseline is one)."""
    import json
    from pathlib import Path
    from harness.catalog import load_cluster
    from harness.summary import cluster_hash
    baseline = json.loads((Path(__file__).resolve().parents[1] / "runs/baselines/smoke.json").read_text())
    fp = baseline["fingerprint"]
    assert cluster_hash(load_cluster(fp["cluster"])) == fp["cluster_hash"]
