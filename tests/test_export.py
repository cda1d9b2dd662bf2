"""`harness export`: per-request CSV / JSON lines and the vLLM bench result file, from real simulated run folders."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from harness.cli import main
from harness.export import traffic
from harness.metrics import REQUEST_COLUMNS, per_request
from harness.runfolder import RunWriter
from harness.summary import migrate
from harness.workloads import parse_workload

SIMULATE = ["simulate", "--workload", "poisson,rate=1,n=8,prompt=64,output=16", "--cluster", "seed-64gb",
            "--model", "llama-3.1-8b", "--strategy", "uniform", "--quiet"]


def simulate(out, seed: int, run_id: str):
    assert main([*SIMULATE, "--seed", str(seed), "--out", str(out), "--run-id", run_id]) == 0
    return out / run_id


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("runs"), 1, "sim-a")


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A private copy, for tests that change the folder or write into it."""
    return shutil.copytree(run_dir, tmp_path / run_dir.name)


def summary_metrics(folder) -> dict:
    return migrate(json.loads((folder / "summary.json").read_text()))["metrics"]


def stored(folder) -> pd.DataFrame:
    return pd.read_parquet(folder / "requests.parquet")


def test_csv_has_a_row_a_request_with_raw_timestamps_and_derived_latencies(run_copy, capsys):
    assert main(["export", str(run_copy)]) == 0
    assert "requests.csv (8 requests, csv)" in capsys.readouterr().out
    rows, raw = pd.read_csv(run_copy / "requests.csv"), stored(run_copy)
    assert len(rows) == 8 and set(REQUEST_COLUMNS) <= set(rows.columns)
    assert (rows["run_id"] == "sim-a").all()
    np.testing.assert_array_equal(rows["start_s"], raw["start_s"])
    np.testing.assert_allclose(rows["ttft_ms"], per_request(raw)["ttft_ms"])
    assert [json.loads(c) for c in rows["chunk_times_s"]] == [list(c) for c in raw["chunk_times_s"]]
    created = json.loads((run_copy / "environment.json").read_text())["created_utc"]
    assert (rows["run_created_utc"] == created).all()


def test_jsonl_rows_read_back_with_lists_and_latencies(run_copy):
    assert main(["export", str(run_copy), "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in (run_copy / "requests.jsonl").read_text().splitlines()]
    raw = stored(run_copy)
    assert len(rows) == 8 and rows[0]["run_id"] == "sim-a"
    assert [r["chunk_times_s"] for r in rows] == [list(c) for c in raw["chunk_times_s"]]
    np.testing.assert_allclose([r["e2el_ms"] for r in rows], per_request(raw)["e2el_ms"])


def test_vllm_result_has_vllms_fields_and_the_summarys_figures(run_copy):
    assert main(["export", str(run_copy), "--format", "vllm"]) == 0
    result = json.loads((run_copy / "vllm.json").read_text())
    figures, raw = summary_metrics(run_copy), stored(run_copy)
    for key in ("mean_ttft_ms", "p99_tpot_ms", "median_itl_ms", "mean_e2el_ms", "request_throughput", "duration"):
        assert result[key] == pytest.approx(figures[key], rel=1e-12), key
    assert result["num_prompts"] == 8 and result["completed"] == 8 and result["request_goodput"] is None
    assert (result["model_id"], result["source"], result["request_rate"], result["burstiness"]) == \
        ("llama-3.1-8b", "simulated", 1.0, 1.0)
    np.testing.assert_allclose(np.array(result["ttfts"]) * 1e3, per_request(raw)["ttft_ms"])
    assert [len(i) for i in result["itls"]] == [15] * 8 and result["generated_texts"] == [""] * 8
    pooled = np.concatenate(result["itls"]) * 1e3
    assert pooled.mean() == pytest.approx(figures["mean_itl_ms"])
    assert result["input_lens"] == [64] * 8 and result["errors"] == [""] * 8


def test_several_runs_into_one_file_and_to_stdout(run_dir, tmp_path, capsys):
    other = simulate(tmp_path, 2, "sim-b")
    out = tmp_path / "both.csv"
    assert main(["export", str(run_dir), str(other), "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    assert rows.groupby("run_id").size().to_dict() == {"sim-a": 8, "sim-b": 8}
    capsys.readouterr()
    assert main(["export", str(run_dir), str(other), "--format", "vllm", "--out", "-"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["run_id"] for r in results] == ["sim-a", "sim-b"]


def test_missing_folder_or_parquet_is_exit_2_with_the_file_named(run_copy, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (run_copy / "requests.parquet").unlink()
    assert main(["export", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "requests.parquet is missing" in err and "incomplete" not in err


def test_a_bad_folder_writes_nothing_for_the_good_ones(run_copy, tmp_path, capsys):
    assert main(["export", str(run_copy), str(tmp_path / "nope")]) == 2
    assert not (run_copy / "requests.csv").exists()
    assert main(["export", str(run_copy), "--out", str(tmp_path / "no-dir" / "x.csv")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert not list(tmp_path.glob("**/.x.csv.tmp-*"))


def cut_short_run(root, rows: list[dict]):
    """A run folder as a killed process leaves it: the INCOMPLETE marker and the journal, no parquet."""
    writer = RunWriter(root, run_id="cut")
    for row in rows:
        writer.journal.append(row)
    writer.journal.close()
    return writer.path


def test_interrupted_run_exports_its_journal_and_says_so(run_dir, tmp_path, capsys):
    # journal rows as the load generator appends them: plain lists, not the arrays parquet reads back
    rows = [{**r, "chunk_times_s": list(r["chunk_times_s"])} for r in stored(run_dir).head(3).to_dict("records")]
    rows[2] = {**rows[2], "success": False, "error": "boom", "output_tokens": 0}
    folder = cut_short_run(tmp_path, rows)
    assert main(["export", str(folder), "--format", "vllm"]) == 0
    err = capsys.readouterr().err
    assert "incomplete (running)" in err and "3 finished requests from requests.journal.jsonl" in err
    result = json.loads((folder / "vllm.json").read_text())
    assert (result["completed"], result["failed"], result["num_prompts"]) == (2, 1, 3)
    assert result["ttfts"][2] == 0.0 and result["itls"][2] == [] and result["errors"] == ["", "", "boom"]
    assert result["ttfts"][0] == pytest.approx(rows[0]["first_token_s"] - rows[0]["start_s"])
    assert main(["export", str(folder), "--format", "jsonl"]) == 0
    lines = [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines()]
    assert lines[2]["tpot_ms"] is None and lines[2]["error"] == "boom"   # undefined is null: strict JSON


def test_vllm_traffic_fields_follow_the_workload_or_the_bench_load_mode():
    closed = parse_workload("closed,concurrency=4,n=8,prompt=64,output=16")
    assert traffic({"workload": closed}) == {"request_rate": "inf", "burstiness": 1.0, "max_concurrency": 4}
    burst = parse_workload("bursts,burst_size=4,interval_s=2,n=8")
    assert traffic({"workload": burst})["request_rate"] is None
    mode = {"kind": "constant", "value": 3.0, "seed": 0}
    assert traffic({"workload": closed, "mode": mode}) == \
        {"request_rate": 3.0, "burstiness": None, "max_concurrency": None}


def test_interrupted_run_without_finished_requests_is_exit_2(tmp_path, capsys):
    folder = cut_short_run(tmp_path, [])
    assert main(["export", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "requests.parquet is missing" in err and "incomplete (running)" in err
