import json

import numpy as np
import pandas as pd
import pytest

from harness.metrics import REQUEST_COLUMNS, STEP_COLUMNS
from harness.runfolder import JOURNAL, MARKER, RunWriter, Terminated, environment, read_run
from harness.specs import UserError


def requests_df(n=3):
    return pd.DataFrame({"request_id": [f"r{i}" for i in range(n)], "source": "simulated",
                         "scheduled_s": np.arange(n, dtype=float), "start_s": np.arange(n, dtype=float),
                         "first_token_s": np.arange(n) + 0.1, "end_s": np.arange(n) + 0.3,
                         "prompt_tokens": 5, "output_tokens": 2, "cached_tokens": 0,
                         "chunk_times_s": [[i + 0.1, i + 0.3] for i in range(n)], "success": True, "error": ""})


def steps_df():
    return pd.DataFrame({"step": [0], "stage": [0], "node": ["a"], "kind": ["decode"], "start_s": [0.0],
                         "end_s": [0.1], "batch_size": [1], "tokens": [1], "kv_bytes": [10], "compute_s": [0.1], "source": ["simulated"]})


def test_complete_run_reads_back(tmp_path):
    with RunWriter(tmp_path, label="x") as w:
        w.write_json("config.json", {"a": 1, "nan": float("nan")})
        w.write_json("environment.json", environment())
        w.write_json("plan.json", {"stages": []})
        w.write_requests(requests_df())
        w.write_steps(steps_df())
        w.finish({"source": "simulated", "metrics": {"completed": 3}})
    run = read_run(w.path)
    assert run.complete and not (w.path / MARKER).exists()
    assert run.summary["status"] == "complete" and run.summary["schema_version"] == 1
    assert run.config == {"a": 1, "nan": None}
    req = run.requests()
    assert list(req.columns) == list(REQUEST_COLUMNS) and list(run.steps().columns) == list(STEP_COLUMNS)
    assert list(req.chunk_times_s[1]) == [1.1, 1.3]
    assert not [p for p in w.path.iterdir() if p.name.startswith(".")]   # no temporary files left


def test_interrupted_run_stays_marked_incomplete(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with RunWriter(tmp_path, label="x") as w:
            w.write_json("config.json", {})
            raise KeyboardInterrupt
    assert (w.path / MARKER).read_text().startswith("interrupted")
    assert not (w.path / "summary.json").exists()
    with pytest.raises(UserError, match="incomplete"):
        read_run(w.path)
    assert read_run(w.path, require_complete=False).complete is False


def test_failure_reason_is_kept(tmp_path):
    with pytest.raises(RuntimeError):
        with RunWriter(tmp_path, label="x") as w:
            raise RuntimeError("boom")
    assert "boom" in (w.path / MARKER).read_text()


def test_a_failed_write_leaves_no_file_that_looks_complete(tmp_path):
    w = RunWriter(tmp_path)
    bad = requests_df().drop(columns=["error"])
    with pytest.raises(ValueError):
        w.write_requests(bad)
    assert not (w.path / "requests.parquet").exists()


def test_existing_folder_is_refused(tmp_path):
    RunWriter(tmp_path, run_id="same")
    with pytest.raises(UserError, match="exists"):
        RunWriter(tmp_path, run_id="same")


def test_environment_is_json_and_names_versions():
    env = environment({"backend": "sim"})
    json.dumps(env)
    assert env["backend"] == "sim" and "numpy" in env["packages"] and "python" in env


def test_journal_keeps_rows_as_they_finish_and_the_requests_write_compacts_it(tmp_path):
    w = RunWriter(tmp_path)
    rows = requests_df(2).to_dict("records")
    rows[1]["first_token_s"] = float("nan")          # a request that failed before its first token
    for row in rows:
        w.journal.append(row)
    with open(w.path / JOURNAL, "a") as fh:          # the process died in the middle of a line
        fh.write('{"request_id": "r9", "sta')
    back = w.journal.rows()
    assert [r["request_id"] for r in back] == ["r0", "r1"]
    assert np.isnan(back[1]["first_token_s"]) and back[0]["chunk_times_s"] == [0.1, 0.3]
    w.write_requests(pd.DataFrame(back))
    assert not (w.path / JOURNAL).exists() and len(read_run(w.path, require_complete=False).requests()) == 2


def test_a_stopped_run_gets_a_summary_that_says_so_and_stays_incomplete(tmp_path):
    with pytest.raises(Terminated):
        with RunWriter(tmp_path) as w:
            w.stop("interrupted", "terminated (SIGTERM)")
            w.finish({"completed": 1})
            raise Terminated
    summary = json.loads((w.path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stop_reason"] == "terminated (SIGTERM)"
    assert (w.path / MARKER).read_text().strip() == "terminated (SIGTERM)"
    assert read_run(w.path, require_complete=False).status == "terminated (SIGTERM)"


def test_sigterm_without_a_summary_is_named_in_the_marker(tmp_path):
    with pytest.raises(Terminated):
        with RunWriter(tmp_path) as w:
            raise Terminated
    assert (w.path / MARKER).read_text().strip() == "terminated (SIGTERM)"
