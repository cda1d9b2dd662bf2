"""`python -m harness serve` and `python -m harness bench`, run as a user runs them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


from tests.server.conftest import free_port, wait_healthy
import openai

from harness.cli import main
from harness.runfolder import read_run

ROOT = Path(__file__).resolve().parents[2]


def test_bench_embedded_instant_writes_a_complete_run_folder(tmp_path, capsys):
    rc = main(["bench", "--backend", "instant", "--mode", "concurrent", "--sweep", "1,4",
               "--workload", "all_at_once,n=20,prompt=16,output=8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    (sweep,) = tmp_path.iterdir()   # a sweep is one run folder; each point is a run folder under points/
    runs = sorted((sweep / "points").iterdir())
    assert len(runs) == 2
    for path in runs:
        run = read_run(path)
        df = run.requests()
        assert len(df) == 20 and df["success"].all() and (df["output_tokens"] == 8).all()
        assert run.summary["metrics"]["completed"] == 20 and run.summary["source"] == "measured"
        assert run.config["mode"]["kind"] == "concurrent"
    assert "sweep (measured)" in out and "concurrent=4" in out


def test_bench_embedded_sim_records_simulated_steps(tmp_path):
    rc = main(["bench", "--backend", "sim", "--cluster", "seed-64gb", "--model", "llama-3.1-8b",
               "--strategy", "uniform", "--speed", "20", "--warmup", "0",
               "--workload", "all_at_once,n=2,prompt=32,output=4", "--out", str(tmp_path)])
    assert rc == 0
    run = read_run(next(tmp_path.iterdir()))
    assert run.summary["source"] == "simulated" and run.summary["backend"] == "sim"
    assert (run.requests()["source"] == "simulated").all()
    steps = run.steps()
    assert len(steps) > 0 and (steps["source"] == "simulated").all()
    assert run.plan["strategy"] == "uniform"


def test_bench_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert main(["bench", "--backend", "instant", "--mode", "concurrent", "--out", str(tmp_path)]) == 2
    assert "--concurrency" in capsys.readouterr().err
    assert main(["bench", "--backend", "instant", "--slo", "ttft=5", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_serve_standalone_answers_the_openai_sdk():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness", "serve", "--backend", "instant", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="instant", prompt="a b c", max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        proc.terminate()
        proc.wait(10)
