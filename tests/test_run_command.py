"""`harness run` end to end: real server on 127.0.0.1, real load generator, real run folders and reports."""
import json

from harness.cli import main
from harness.runfolder import read_run


def test_run_smoke_writes_a_complete_folder_with_report_and_targets(tmp_path, capsys):
    assert main(["run", "--experiment", "runs/smoke.toml", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    run = read_run(folder)
    assert run.complete
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metrics"]["completed"] == 8 and summary["metrics"]["failed"] == 0
    assert summary["source"] == "simulated" and summary["plan"]["strategy"] == "hybrid_optimal"
    assert [t["name"] for t in summary["targets"]] == ["Time to first token", "Decode speed"]
    assert (run.requests()["source"] == "simulated").all()
    assert (folder / "report.html").stat().st_size > 10_000
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == "llama-3.1-8b" and config["workload"]["num_requests"] == 8
    assert "report:" in out and "target Time to first token" in out
    rate = summary["plan"]["predicted"]["sustainable_rate_rps"]
    assert f"plan's sustainable rate (theoretical): {rate:.3g} requests/s of 256+32 tokens" in out
    assert f"the workload offers 4 requests/s ({100 * 4 / rate:.0f} % of it)" in out


def test_run_all_strategies_compares_them(tmp_path, capsys):
    rc = main(["run", "--experiment", "runs/smoke.toml", "--strategy", "all", "--requests", "2", "--rate", "50",
               "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "strategy comparison" in out and "comparison report:" in out
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 5
    assert len(list(tmp_path.glob("compare-*.html"))) == 1


def test_run_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert main(["run", "--experiment", "runs/smoke.toml", "--requests", "0", "--out", str(tmp_path)]) == 2
    assert "--requests" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "llama-3.1-8b"\n')
    assert main(["run", "--experiment", str(bad), "--out", str(tmp_path)]) == 2
    assert "unknown key 'modle'" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_run_over_http_reuses_shared_prefixes(tmp_path):
    exp = tmp_path / "chat.toml"
    exp.write_text('''name = "chat"
cluster = "m2ultra-4x-tb4"
model = "llama-3.1-8b"
cache = "lru"
[workload]
kind = "conversations"
conversations = 2
turns = 2
system_prompt_tokens = 512
user = 32
output = 8
think_time_s = 1.5
arrival = { process = "constant", rate = 4.0 }
[load]
warmup = 0
''')
    assert main(["run", "--experiment", str(exp), "--out", str(tmp_path), "--no-report"]) == 0
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["cache"]["policy"] == "lru" and summary["cache"]["blocks_hit"] >= 2 * 8
    requests = read_run(folder).requests().sort_values("start_s")
    # the server reports usage.prompt_tokens_details.cached_tokens: second turns hit their 512-token prefix
    assert list(requests["cached_tokens"] >= 512) == [False, False, True, True]


def test_ctrl_c_leaves_the_folder_incomplete_and_the_report_says_so(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", "--requests", "20", "--rate", "0.5",
                             "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:   # wait until requests are in flight
            if "sending" in line or time.monotonic() > deadline:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (folder / "INCOMPLETE").read_text().strip() == "interrupted (Ctrl-C)"
    summary = json.loads((folder / "summary.json").read_text())   # over the requests that finished (issue 9)
    assert summary["status"] == "interrupted" and summary["stop_reason"] == "interrupted (Ctrl-C)"
    assert summary["metrics"]["completed"] == len(read_run(folder, require_complete=False).requests()) < 20
    assert "INCOMPLETE" in (folder / "report.html").read_text()
    assert "Traceback" not in out


def test_run_on_real_mlx_ranks_measures_the_plan_split(tmp_path):
    """The plan for two Mac minis runs as two local MLX ranks on the model's scaled twin."""
    rc = main(["run", "--experiment", "runs/smoke.toml", "--backend", "mlx", "--cluster", "mini-pair",
               "--model", "qwen2.5-0.5b", "--quant", "16", "--strategy", "uniform", "--requests", "2", "--rate", "4",
               "--out", str(tmp_path), "--no-report"])
    assert rc == 0
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    run = read_run(folder)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["source"] == "measured" and summary["metrics"]["completed"] == 2
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["split"] == [12, 12]
    steps = run.steps()
    assert set(steps["node"]) >= {"mini-a", "mini-b"} and (steps["source"] == "measured").all()


def test_unknown_mlx_option_is_named(tmp_path, capsys):
    exp = tmp_path / "x.toml"
    exp.write_text('backend = "mlx"\ncluster = "mini-pair"\nmodel = "qwen2.5-0.5b"\nquant = 16\n'
                   'strategy = "uniform"\n[mlx]\nemulate_link = true\n')
    assert main(["run", "--experiment", str(exp), "--out", str(tmp_path)]) == 2
    assert "emulate_link" in capsys.readouterr().err


def test_a_run_whose_requests_failed_exits_non_zero(tmp_path, capsys):
    """A node down mid-run fails requests: the exit code says so, as `simulate`'s does."""
    experiment = tmp_path / "fault.toml"
    node = "studio1"
    experiment.write_text(open("runs/smoke.toml").read().replace('strategy = "hybrid_optimal"', 'strategy = "uniform"')
                          + f'\n[[faults]]\nkind = "node_down"\nnode = "{node}"\nat_s = 0.5\n')
    assert main(["run", "--experiment", str(experiment), "--out", str(tmp_path / "out"), "--no-report"]) == 1
    assert "request(s) failed" in capsys.readouterr().err
    (folder,) = (tmp_path / "out").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metrics"]["completed"] == 0
    # no request was served: the plan's predictions must not pass the latency targets in its place
    assert [t["status"] for t in summary["targets"]] == ["no data", "no data"]
