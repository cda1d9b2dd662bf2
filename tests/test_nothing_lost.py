"""Issue 9, "Nothing lost": Ctrl-C, SIGTERM, a failing backend or a closed pipe keep every finished request,
a summary over them and the report, all through the real CLI, server and load generator."""
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.backends.sim import SimBackend, SimBackendConfig
from harness.runfolder import JOURNAL, MARKER, read_run

SLOW = '''name = "slow"
backend = "sim"
cluster = "m2ultra-4x-tb4"
model = "llama-3.1-8b"
quant = 4
strategy = "uniform"
[workload]
kind = "synthetic"
num_requests = 16
seed = 0
arrival = { process = "constant", rate = 3.0 }
prompt = { dist = "fixed", value = 64 }
output = { dist = "fixed", value = 8 }
[load]
warmup = 0
'''


def _experiment(tmp_path: Path) -> Path:
    path = tmp_path / "slow.toml"
    path.write_text(SLOW)
    return path


def _only_folder(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def _journal_lines(root: Path) -> int:
    journals = list(root.glob(f"*/{JOURNAL}"))
    return len(journals[0].read_text().splitlines()) if journals else 0


def _signal_after_finished(args: list[str], out: Path, sig: int, finished: int = 3):
    """Start a real `python -m harness ...`, send `sig` once `finished` requests are journaled."""
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while _journal_lines(out) < finished and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        journaled = _journal_lines(out)
        proc.send_signal(sig)
        text, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    return proc.returncode, text, journaled


def _assert_kept_what_finished(folder: Path, journaled: int, reason: str) -> pd.DataFrame:
    requests = pd.read_parquet(folder / "requests.parquet")
    assert journaled <= len(requests) < 16      # what finished before the signal, and nothing that had not
    assert requests["request_id"].is_unique and requests["success"].all()
    assert requests["end_s"].map(math.isfinite).all() and (requests["source"] == "simulated").all()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stop_reason"] == reason
    assert summary["metrics"]["completed"] == len(requests) and summary["metrics"]["failed"] == 0
    assert (folder / MARKER).read_text().strip() == reason
    assert not (folder / JOURNAL).exists()      # compacted into requests.parquet
    assert len(pd.read_parquet(folder / "steps.parquet")) > 0
    assert read_run(folder, require_complete=False).complete is False
    return requests


def test_sigterm_keeps_the_finished_requests_a_summary_and_the_report(tmp_path):
    rc, out, journaled = _signal_after_finished(["run", "--experiment", str(_experiment(tmp_path))],
                                                tmp_path / "out", signal.SIGTERM)
    assert rc == 143, out
    folder = _only_folder(tmp_path / "out")
    requests = _assert_kept_what_finished(folder, journaled, "terminated (SIGTERM)")
    html = (folder / "report.html").read_text()
    assert "INCOMPLETE RUN" in html and "marked incomplete: terminated (SIGTERM)" in html
    assert f"keeps the {len(requests)} requests that finished" in out and "Traceback" not in out


def test_ctrl_c_in_bench_keeps_the_finished_requests(tmp_path):
    args = ["bench", "--backend", "sim", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b",
            "--workload", "poisson,rate=3,n=16,prompt=64,output=8", "--warmup", "0"]
    rc, out, journaled = _signal_after_finished(args, tmp_path / "out", signal.SIGINT)
    assert rc == 130, out
    _assert_kept_what_finished(_only_folder(tmp_path / "out"), journaled, "interrupted (Ctrl-C)")


class EngineDiesSim(SimBackend):
    """The real sim backend whose engine raises after `tokens` token events (an engine bug mid-run)."""

    def __init__(self, *args, tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_left = tokens

    def _on_tokens(self, t, slots, done):
        self.tokens_left -= len(slots)
        if self.tokens_left < 0:
            raise RuntimeError("engine bug")
        super()._on_tokens(t, slots, done)


class StepsBrokenSim(SimBackend):
    def step_table(self, *args, **kwargs):
        raise RuntimeError("step records lost")


def _inputs(tmp_path):
    from harness.experiment import load_experiment
    from harness.orchestrate import load_inputs
    from harness.workloads import build_workload
    from strategies.registry import get_strategy
    exp = load_experiment(_experiment(tmp_path))
    exp["workload"]["arrival"] = {"process": "constant", "rate": 20.0}
    cluster, model, options = load_inputs(exp)
    plan = get_strategy("uniform")(cluster, model, options)
    args = (cluster, model, plan, options.profile)
    return {**exp, "profile": options.profile.name}, plan, args, build_workload(exp["workload"])


def test_a_backend_that_dies_mid_run_gives_a_failed_run_that_keeps_every_request(tmp_path):
    from harness.orchestrate import run_once
    exp, plan, args, workload = _inputs(tmp_path)
    backend = EngineDiesSim(*args, config=SimBackendConfig(model_id="m"), tokens=40)
    path, _ = run_once(exp, "uniform", plan, backend, workload, tmp_path / "out")
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "failed" and "backend unhealthy" in summary["stop_reason"]
    requests = pd.read_parquet(path / "requests.parquet")
    assert len(requests) == 16 and 0 < requests["success"].sum() < 16
    figures = summary["metrics"]
    assert figures["completed"] == requests["success"].sum() and figures["failed"] == 16 - figures["completed"]
    assert "engine bug" in " ".join(requests["error"])
    from reports import render
    assert (path / MARKER).exists() and "marked incomplete: failed: backend unhealthy" in render([path]).read_text()


def test_an_exception_that_stops_the_run_leaves_the_journal_and_a_report(tmp_path):
    from harness.orchestrate import run_once
    exp, plan, args, workload = _inputs(tmp_path)
    with pytest.raises(RuntimeError, match="step records lost"):
        run_once(exp, "uniform", plan, StepsBrokenSim(*args, config=SimBackendConfig(model_id="m")), workload,
                 tmp_path / "out")
    folder = _only_folder(tmp_path / "out")
    assert (folder / MARKER).read_text().strip() == "failed: RuntimeError: step records lost"
    assert len((folder / JOURNAL).read_text().splitlines()) == 16   # the summary failed too; the rows did not
    assert not (folder / "summary.json").exists()
    assert "INCOMPLETE RUN" in (folder / "report.html").read_text()


def _smoke(out: Path) -> str:
    return f"{sys.executable} -m harness run --experiment runs/smoke.toml --requests 4 --rate 20 --out {out}"


@pytest.mark.parametrize("pipe", ["head -1", "tee {log}"])
def test_output_to_a_pipe_writes_the_same_folder_and_report(tmp_path, pipe):
    out = tmp_path / "out"
    pipe = pipe.format(log=tmp_path / "log.txt")   # the tee file stays out of the checkout
    done = subprocess.run(["bash", "-c", f'{_smoke(out)} | {pipe} >/dev/null; echo "rc=${{PIPESTATUS[0]}}"'],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120, env=None)
    assert done.stdout.strip() == "rc=0", done.stderr
    assert "BrokenPipeError" not in done.stderr and "Exception ignored" not in done.stderr
    folder = _only_folder(out)
    assert read_run(folder).summary["status"] == "complete"
    assert (folder / "report.html").stat().st_size > 10_000


def test_a_reader_that_closes_stdout_does_not_stop_the_run(tmp_path):
    proc = subprocess.Popen(_smoke(tmp_path).split(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert read_run(_only_folder(tmp_path)).complete


def test_the_load_generator_hands_each_finished_row_to_the_sink():
    from harness.backends.instant import InstantBackend
    from harness.serving.loadgen import LoadMode, LoadSink, Target, run_load_sync
    from harness.serving.server import EmbeddedServer
    from harness.workloads import build_workload
    seen = []
    sink = LoadSink(seen.append)
    workload = build_workload({"kind": "synthetic", "num_requests": 5, "seed": 0,
                               "arrival": {"process": "constant", "rate": 100.0},
                               "prompt": {"dist": "fixed", "value": 8}, "output": {"dist": "fixed", "value": 4}})
    with EmbeddedServer(InstantBackend()) as server:
        result = run_load_sync(Target(server.url), workload, LoadMode(), sink=sink)
    assert sorted(r["request_id"] for r in seen) == sorted(r["request_id"] for r in result.rows)
    partial = sink.partial(seen[:2])
    assert partial.rows == seen[:2] and partial.model == result.model and partial.t0_monotonic == result.t0_monotonic
    assert LoadSink().partial([]) is None   # stopped before t=0: nothing to summarise
