"""Issue 14 item 5: SIGTERM is handled like Ctrl-C by every command that writes a run folder, and a folder whose
writer was killed outright (SIGKILL) is marked interrupted, cleaned of temporary files and keeps its finished
requests, by the next command that reads it. Real signals to real `python -m harness` processes."""
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.metrics import STEP_COLUMNS
from harness.runfolder import JOURNAL, MARKER, RunWriter, Terminated, read_run

BENCH = ["bench", "--backend", "sim", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b",
         "--workload", "poisson,rate=3,n=16,prompt=64,output=8", "--warmup", "0", "--no-report"]
# virtual time: long enough (seconds of wall time) to be caught streaming its steps
SIMULATE = ["simulate", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--quiet",
            "--workload", "poisson,rate=50,n=200000,prompt=64,output=8"]


def _start(args: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _folder(out: Path) -> Path | None:
    folders = [p for p in out.glob("*") if p.is_dir()] if out.exists() else []
    return folders[0] if folders else None


def _journaled(out: Path) -> int:
    folder = _folder(out)
    journal = folder / JOURNAL if folder else None
    return len(journal.read_text().splitlines()) if journal and journal.exists() else 0


def _wait_until(ready, proc: subprocess.Popen, bound_s: float = 90) -> None:
    deadline = time.monotonic() + bound_s
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0]
    assert ready(), "the command did not get far enough in time"


def _signal(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        text, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, text


def _temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# ------------------------------------------------------------------------------------------ SIGTERM

def test_sigterm_to_simulate_marks_the_folder_interrupted_and_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "out"
    proc = _start(SIMULATE, out)
    _wait_until(lambda: (f := _folder(out)) is not None and any(f.glob(".steps.parquet.tmp-*")), proc)
    rc, text = _signal(proc, signal.SIGTERM)
    assert rc == 143 and "terminated" in text and "Traceback" not in text, text
    folder = _folder(out)
    assert (folder / MARKER).read_text().strip() == "terminated (SIGTERM)"
    assert _temporary_files(folder) == []
    assert read_run(folder, require_complete=False).status == "terminated (SIGTERM)"


def test_sigterm_to_bench_keeps_the_finished_requests_like_ctrl_c(tmp_path):
    out = tmp_path / "out"
    proc = _start(BENCH, out)
    _wait_until(lambda: _journaled(out) >= 3, proc)
    rc, text = _signal(proc, signal.SIGTERM)
    assert rc == 143 and "Traceback" not in text, text
    folder = _folder(out)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stop_reason"] == "terminated (SIGTERM)"
    assert summary["metrics"]["completed"] >= 3 and _temporary_files(folder) == []
    assert "keeps the" in text and "requests that finished" in text


@pytest.fixture
def sigterm_raises_like_the_cli():
    """What `python -m harness` installs for each command (harness.cli), for a test that signals itself."""
    def raise_terminated(_signum, _frame):
        raise Terminated()
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_in_the_middle_of_a_write_leaves_no_temporary_file(tmp_path, sigterm_raises_like_the_cli):
    """SIGTERM raises in whatever the main thread is doing, a parquet write included: the writer's exit
    removes what that write left."""
    with pytest.raises(Terminated):
        with RunWriter(tmp_path, label="x") as writer:
            writer.table_stream("steps.parquet", STEP_COLUMNS)   # open: its temporary file is on disk
            os.kill(os.getpid(), signal.SIGTERM)                 # the CLI's handler: raises Terminated
            time.sleep(5)
    assert _temporary_files(writer.path) == []
    assert (writer.path / MARKER).read_text().strip() == "terminated (SIGTERM)"


# ------------------------------------------------------------------------------------------ SIGKILL

def test_a_killed_bench_is_marked_interrupted_by_the_next_report_and_keeps_its_requests(tmp_path, capsys):
    out = tmp_path / "out"
    proc = _start(BENCH, out)
    _wait_until(lambda: _journaled(out) >= 3, proc)
    pid = proc.pid
    assert _signal(proc, signal.SIGKILL)[0] == -signal.SIGKILL
    folder = _folder(out)
    assert (folder / MARKER).read_text().startswith("running")   # what the killed writer left
    finished = _journaled(out)

    assert main(["report", str(folder), "--out", str(tmp_path / "r.html")]) == 0
    status = (folder / MARKER).read_text().strip()
    assert status == f"interrupted (writer pid {pid} on {platform.node()} is gone: killed before it finished)"
    assert status in capsys.readouterr().out
    assert _journaled(out) == finished >= 3 and _temporary_files(folder) == []
    assert read_run(folder, require_complete=False).status == status
    assert main(["export", str(folder), "--format", "vllm"]) == 0   # the finished requests are still there
    assert json.loads((folder / "vllm.json").read_text())["completed"] == finished


def test_a_killed_simulate_loses_its_temporary_steps_file_when_the_folder_is_next_read(tmp_path):
    out = tmp_path / "out"
    proc = _start(SIMULATE, out)
    _wait_until(lambda: (f := _folder(out)) is not None and any(f.glob(".steps.parquet.tmp-*")), proc)
    _signal(proc, signal.SIGKILL)
    folder = _folder(out)
    assert _temporary_files(folder) == [f".steps.parquet.tmp-{proc.pid}"]
    run = read_run(folder, require_complete=False)
    assert not run.complete and run.status.startswith(f"interrupted (writer pid {proc.pid} ")
    assert _temporary_files(folder) == []


def test_a_live_writer_in_another_process_is_left_alone(tmp_path):
    out = tmp_path / "out"
    proc = _start(SIMULATE, out)
    try:
        _wait_until(lambda: (f := _folder(out)) is not None and any(f.glob(".steps.parquet.tmp-*")), proc)
        folder = _folder(out)
        assert read_run(folder, require_complete=False).status == "running"
        assert _temporary_files(folder) == [f".steps.parquet.tmp-{proc.pid}"]
    finally:
        proc.kill()
        proc.wait()


def _marker_of(tmp_path: Path, identity: dict) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / MARKER).write_text("running\n" + json.dumps(identity) + "\n")
    (folder / f".steps.parquet.tmp-{identity['pid']}").write_bytes(b"half")
    return folder


def test_a_reused_pid_does_not_pass_for_the_writer(tmp_path):
    """This test's own pid is alive, but it is not the process that started the folder."""
    folder = _marker_of(tmp_path, {"pid": os.getpid(), "host": platform.node(), "started": "an earlier process"})
    assert read_run(folder, require_complete=False).status.startswith("interrupted (writer pid")
    assert _temporary_files(folder) == []


def test_a_writer_on_another_host_cannot_be_judged_from_here(tmp_path):
    """A shared disk: a pid on another machine says nothing about this one."""
    folder = _marker_of(tmp_path, {"pid": 999_999_999, "host": "another-host", "started": "1"})
    assert read_run(folder, require_complete=False).status == "running"
    assert _temporary_files(folder) == [".steps.parquet.tmp-999999999"]


# ------------------------------------------------------------------------------------------ exit code

def test_a_process_that_loaded_mlx_exits_with_the_commands_code_after_its_atexit_work(tmp_path):
    """MLX's threads may abort the interpreter's own teardown (exit 134): such a process leaves through
    os._exit, after the atexit handlers and a flushed console."""
    pytest.importorskip("mlx.core")
    script = ("import atexit, sys, mlx.core\n"
              "from harness.cli import exit_process\n"
              f"atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').write('ran'))\n"
              "print('buffered, not yet flushed', end='')\n"
              "exit_process(3)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 3 and done.stdout == "buffered, not yet flushed", done.stderr
    assert (tmp_path / "atexit").read_text() == "ran"


def test_bench_on_real_mlx_ranks_exits_0_after_writing_a_complete_folder(tmp_path):
    pytest.importorskip("mlx_lm")
    from harness.mlx import modelbuild
    model = modelbuild.build(modelbuild.qwen2_config("tiny"), cache_dir=tmp_path / "models").path
    for attempt in range(2):   # the abort came in 2 runs of 7
        out = tmp_path / f"out{attempt}"
        done = subprocess.run([sys.executable, "-m", "harness", "bench", "--backend", "mlx", "--model-path", str(model),
                               "--workload", "all_at_once,n=4,prompt=16,output=8", "--warmup", "0", "--no-report",
                               "--out", str(out)], capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert read_run(_folder(out)).summary["metrics"]["completed"] == 4
