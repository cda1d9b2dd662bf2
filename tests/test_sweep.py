"""Sweeps (issue 13 item 4): a grid from a TOML file, run by a process pool or Ray, resumable, one report."""
import json

import pandas as pd
import pytest

from harness.cli import main
from harness.runfolder import MARKER
from harness.specs import UserError
from harness.sweep import expand, load_sweep, point_id

SMALL = """
name = "tiny"
[base]
cluster = "mini-pair"
model = "qwen2.5-0.5b"
quant = 16
workload = "poisson,rate=1,n=8,prompt=64,output=8"
seed = 3
no_load = true
[grid]
strategy = ["uniform", "ring_memory_weighted"]
rate = [0.5, 2.0]
"""


def sweep_file(tmp_path, text=SMALL, name="tiny.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_grid_expands_to_every_combination_with_stable_ids(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path))
    points = expand(sweep)
    assert [p["values"] for p in points] == [
        {"strategy": "uniform", "rate": 0.5}, {"strategy": "uniform", "rate": 2.0},
        {"strategy": "ring_memory_weighted", "rate": 0.5}, {"strategy": "ring_memory_weighted", "rate": 2.0}]
    assert [p["id"] for p in expand(load_sweep(sweep_file(tmp_path)))] == [p["id"] for p in points]
    assert len({p["id"] for p in points}) == 4 and points[0]["id"] == point_id(points[0]["settings"])


@pytest.mark.parametrize("text, message", [
    ("colour = 1\n" + SMALL, "colour"),
    (SMALL.replace('rate = [0.5, 2.0]', 'rate = 0.5'), r"\[grid\].rate: expected a non-empty list"),
    (SMALL.replace('seed = 3', 'sed = 3'), "setting 'sed' is not a `simulate` option"),
    (SMALL.replace('seed = 3', 'out = "x"'), "setting 'out' is not a `simulate` option"),
    (SMALL.replace('rate = [0.5, 2.0]', 'rate = [0.5, -1]'), "rate: expected requests/s > 0"),
    (SMALL.replace('"poisson,rate=1,n=8,prompt=64,output=8"', '"closed,concurrency=2,n=8"'),
     "no arrival rate to set"),
    (SMALL.replace('no_load = true', 'no_load = "yes"'), "no_load: found 'yes'; allowed: true or false"),
])
def test_bad_sweep_files_are_refused_before_anything_runs(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_sweep(sweep_file(tmp_path, text))


def test_a_sweep_runs_every_point_writes_one_folder_and_resumes(tmp_path, capsys):
    path = sweep_file(tmp_path)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "2"]) == 0
    folder = out / "tiny"
    table = pd.read_parquet(folder / "results.parquet")
    assert list(table["status"]) == ["complete"] * 4 and (table["completed"] == 8).all()
    saved = json.loads((folder / "sweep.json").read_text())
    assert saved["schema_version"] == "harness.sweep/1" and saved["source"] == "simulated"
    assert saved["sweep"]["grid"]["rate"] == [0.5, 2.0] and "environment" in saved
    page = (folder / "report.html").read_text()
    assert "Sweep report: tiny" in page and page.count("data:image/png;base64,") >= 3
    first = expand(load_sweep(path))[0]["id"]
    config = json.loads((folder / "points" / first / "config.json").read_text())
    assert config["workload"]["arrival"]["rate"] == 0.5 and config["strategy"] == "uniform"
    capsys.readouterr()

    (folder / "points" / first / MARKER).write_text("interrupted\n")       # as an interrupted point leaves it
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 points, 3 already done, 1 interrupted earlier and run again" in text and "[1/1]" in text
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    assert "4 points, 4 already done" in capsys.readouterr().out
    (folder / "report.html").unlink()
    assert main(["report", str(folder)]) == 0 and (folder / "report.html").exists()   # from sweep.json alone


def test_a_point_that_does_not_fit_is_recorded_and_the_others_still_run(tmp_path, capsys):
    text = SMALL.replace('strategy = ["uniform", "ring_memory_weighted"]', 'model = ["qwen2.5-0.5b", "llama-3.1-405b"]')
    out = tmp_path / "out"
    assert main(["sweep", str(sweep_file(tmp_path, text)), "--out", str(out), "--workers", "1"]) == 1
    table = pd.read_csv(out / "tiny" / "results.csv")
    assert list(table["status"][:2]) == ["complete", "complete"]
    assert all(s.startswith("error: hybrid_optimal: llama-3.1-405b at 16-bit needs at least")
               for s in table["status"][2:])


def test_another_sweep_into_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    assert main(["sweep", str(sweep_file(tmp_path)), "--out", str(out), "--workers", "1", "--no-report"]) == 0
    other = sweep_file(tmp_path, SMALL.replace("seed = 3", "seed = 4"), "other.toml")
    assert main(["sweep", str(other), "--out", str(out)]) == 2    # same name "tiny", other settings


@pytest.fixture
def local_ray():
    """Ray's own local cluster, started here (the sweep then uses it as it is); skipped where Ray cannot start."""
    ray = pytest.importorskip("ray")
    try:
        ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2)
    except Exception as exc:      # e.g. no shared memory in a container: say so rather than fail the suite
        pytest.skip(f"Ray cannot start a local cluster here: {exc}")
    yield ray
    ray.shutdown()


def test_ray_runs_the_same_points_as_the_process_pool(tmp_path, local_ray):
    path = sweep_file(tmp_path)
    assert main(["sweep", str(path), "--out", str(tmp_path / "pool"), "--no-report"]) == 0
    assert main(["sweep", str(path), "--out", str(tmp_path / "ray"), "--executor", "ray", "--no-report"]) == 0
    assert local_ray.is_initialized()      # the sweep ran on this cluster and left it to its owner
    pool = pd.read_csv(tmp_path / "pool" / "tiny" / "results.csv")
    ray = pd.read_csv(tmp_path / "ray" / "tiny" / "results.csv")
    pd.testing.assert_frame_equal(pool, ray)      # seeded simulations: the executor changes nothing
