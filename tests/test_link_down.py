"""A link that drops (issue 14): `kind = "link_down"` in [[faults]]. A flap (duration_s) delays the transfers that
would cross the link until it is back and fails nothing; a drop for good fails what crosses it, refuses what
comes later, and with failover is handled as losing one end (the one holding fewer layers)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import sim
from harness.catalog import load_model
from harness.cli import main
from harness.workloads import build_workload, parse_workload
from sim.engine import Engine
from tests.sim.conftest import make_cluster, make_plan, make_profile

SPEC = "poisson,rate=2,n=60,prompt=256,output=64,seed=3"
PIPELINE = ([("n0",), ("n1",)], [16, 16])          # the link n0-n1 carries the hops; n2 idles
TENSOR_PARALLEL = ([("n0", "n1")], [32])            # the link n0-n1 carries the all-reduces


def simulate(layout, faults=()):
    model = load_model("llama-3.1-8b", 4, 64)
    plan = make_plan(model, *layout)
    result = sim.simulate(make_cluster(3), model, plan, make_profile(), build_workload(parse_workload(SPEC)),
                          include_load=False, faults=faults)
    return result.requests.to_pandas()


def e2e(rows):
    return rows["end_s"] - rows["start_s"]


@pytest.fixture(scope="module")
def clean():
    return {"pipeline": simulate(PIPELINE), "tp": simulate(TENSOR_PARALLEL)}


@pytest.mark.parametrize("name, layout", [("pipeline", PIPELINE), ("tp", TENSOR_PARALLEL)])
def test_a_flap_delays_the_requests_in_flight_by_about_the_outage_and_fails_none(clean, name, layout):
    before, duration = clean[name], 2.0
    at = float(before["end_s"].median())
    flap = simulate(layout, [dict(kind="link_down", node="n0", peer="n1", at_s=at, duration_s=duration)])
    assert flap["success"].all() and (flap["error"] == "").all()
    done_before = before["end_s"] < at
    assert (flap["end_s"][done_before] - before["end_s"][done_before]).abs().max() < 1e-9   # untouched
    in_flight = (before["start_s"] < at) & (before["end_s"] > at + 0.05)   # still needed the link after at
    growth = (e2e(flap) - e2e(before))[in_flight]
    assert in_flight.sum() >= 3
    # at least the outage; more only by the backlog of arrivals it held back
    assert (growth >= 0.95 * duration).all() and (growth <= 2.2 * duration).all()


def test_a_flap_run_reproduces_exactly():
    fault = [dict(kind="link_down", node="n0", peer="n1", at_s=20.0, duration_s=1.5)]
    first, second = simulate(PIPELINE, fault), simulate(PIPELINE, fault)
    assert first.drop(columns=["chunk_times_s"]).equals(second.drop(columns=["chunk_times_s"]))


def test_a_link_the_plan_does_not_use_changes_nothing(clean):
    for fault in (dict(kind="link_down", node="n1", peer="n2", at_s=10.0),
                  dict(kind="link_down", node="n0", peer="n2", at_s=10.0, duration_s=5.0)):
        rows = simulate(PIPELINE, [fault])
        assert rows.drop(columns=["chunk_times_s"]).equals(clean["pipeline"].drop(columns=["chunk_times_s"]))


def test_a_permanent_drop_fails_the_crossing_requests_with_the_link_named(clean):
    before = clean["pipeline"]
    at = float(before["end_s"].median())
    rows = simulate(PIPELINE, [dict(kind="link_down", node="n0", peer="n1", at_s=at)])
    assert len(rows) == len(before)                                   # every request is in the records
    assert rows["success"].tolist() == (before["end_s"] < at).tolist()
    failed = rows[~rows["success"]]
    assert failed["error"].str.startswith(f"link n0-n1 down at {at:g} s").all()
    assert (failed["end_s"] >= at - 1e-9).all()
    late = failed[failed["start_s"] > at]
    assert len(late) and (late["output_tokens"] == 0).all()         # refused on arrival


@pytest.mark.parametrize("layout, lost", [
    (([("n0",), ("n1",)], [20, 12]), "n1"),          # fewer layers
    (([("n0",), ("n1",)], [12, 20]), "n0"),
    (([("n0",), ("n1",)], [16, 16]), "n1"),          # a tie: the later one in the plan
    (([("n1",), ("n0",)], [16, 16]), "n0"),
])
def test_failover_loses_the_end_with_fewer_layers(layout, lost):
    import simpy
    model = load_model("llama-3.1-8b", 4, 64)
    engine = Engine(simpy.Environment(), make_cluster(3), model, make_plan(model, *layout), make_profile())
    assert engine.end_to_lose(frozenset(("n0", "n1"))) == lost


def experiment(tmp_path, fault: str, failover: bool = False):
    text = open("runs/smoke.toml").read().replace('strategy = "hybrid_optimal"', 'strategy = "uniform"')
    text = text.replace("num_requests = 8", "num_requests = 24")
    text += f'\n[[faults]]\nkind = "link_down"\n{fault}\n'
    if failover:
        text = text.replace('backend = "sim"', 'backend = "sim"\nfailover = true')
    path = tmp_path / "link.toml"
    path.write_text(text)
    return path


def test_failover_after_a_permanent_drop_serves_on_the_remaining_plan(tmp_path):
    out = tmp_path / "out"
    path = experiment(tmp_path, 'node = "studio1"\npeer = "studio2"\nat_s = 0.5', failover=True)
    assert main(["run", "--experiment", str(path), "--out", str(out), "--no-report"]) == 1   # some failed
    (folder,) = out.iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    requests = pd.read_parquet(folder / "requests.parquet")
    (failover,) = summary["run"]["failovers"]
    assert failover["failed_node"] == "studio2"                      # 8 layers each: the later one goes
    assert failover["fault"].startswith("link studio1-studio2 down at 0.5 s")
    assert all("studio2" not in stage["nodes"] for stage in failover["plan"])
    assert summary["status"] == "complete"
    errors = requests["error"].fillna("")
    assert errors.str.contains("link studio1-studio2 down at 0.5 s").any()
    later = requests[requests["start_s"] > requests.loc[~requests["success"], "end_s"].max()]
    assert len(later) > 0 and later["success"].all()                # served again on the plan left
    import reports
    from reports import plots
    plot = plots.outage_timeline(reports.load_run(folder))
    assert plot is not None and "Dashed lines" in plot.caption       # the drop is drawn on the timeline


@pytest.mark.parametrize("fault, message", [
    ('node = "studio1"\nat_s = 1', "link_down needs peer"),
    ('node = "studio1"\npeer = "studio2"', "link_down needs at_s"),
    ('node = "studio1"\npeer = "studio1"\nat_s = 1', "peer: found 'studio1'; allowed: a node other than node"),
    ('node = "studio1"\npeer = "studio2"\nat_s = 1\nfactor = 2', "link_down takes no factor"),
    ('node = "studio1"\npeer = "studio2"\nat_s = 1\nduration_s = 0', "duration_s: found 0; allowed: a finite number > 0"),
    ('node = "studio1"\npeer = "studio2"\nat_s = 1\nduration_s = "5"', "duration_s: found '5'"),
    ('node = "studio1"\npeer = "studio2"\nat_s = -2', "at_s: found -2"),
    ('node = "studio1"\npeer = 3\nat_s = 1', "peer: found 3; allowed: a node name"),
    ('node = "studio1"\npeer = "nope"\nat_s = 1', "no node 'nope' in cluster"),
])
def test_bad_link_down_keys_give_a_one_line_error(tmp_path, capsys, fault, message):
    path = experiment(tmp_path, fault)
    assert main(["run", "--experiment", str(path), "--out", str(tmp_path / "out"), "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_duration_on_another_kind_is_refused(tmp_path, capsys):
    path = tmp_path / "e.toml"
    path.write_text('[[faults]]\nkind = "node_down"\nnode = "studio-m3u"\nat_s = 1\nduration_s = 3\n')
    assert main(["run", "--experiment", str(path), "--out", str(tmp_path / "out"), "--no-report"]) == 2
    assert "node_down takes no duration_s (it is for link_down)" in capsys.readouterr().err


def test_simulate_link_down_flag(tmp_path, capsys):
    from harness.runfolder import read_run
    args = ["simulate", "--cluster", "mixed", "--model", "llama-3.1-8b", "--strategy", "uniform",
            "--workload", "poisson,rate=1,n=20,prompt=128,output=32", "--quiet", "--no-load", "--out", str(tmp_path)]
    assert main(args + ["--link-down", "studio-m3u@3"]) == 2 and "A,B@SECONDS[:DURATION]" in capsys.readouterr().err
    assert main(args + ["--link-down", "studio-m3u,x@3"]) == 2 and "no node 'x'" in capsys.readouterr().err
    assert main(args + ["--link-down", "studio-m3u,studio-m3u@3"]) == 2 and "no link between" in capsys.readouterr().err
    assert main(args + ["--link-down", "studio-m3u,studio-m4max@3:0"]) == 2
    assert main(args + ["--run-id", "clean"]) == 0
    plan = json.loads((tmp_path / "clean" / "plan.json").read_text())["stages"]
    a, b = plan[0]["nodes"][0], plan[1]["nodes"][0]                      # the first hop of the pipeline
    assert main(args + ["--link-down", f"{a},{b}@5:2", "--run-id", "flap"]) == 0          # nothing fails
    assert main(args + ["--link-down", f"{a},{b}@5", "--run-id", "drop"]) == 1            # failed requests: exit 1
    clean, flap = read_run(tmp_path / "clean").requests(), read_run(tmp_path / "flap").requests()
    assert flap["success"].all() and flap["end_s"].max() > clean["end_s"].max()
    drop = read_run(tmp_path / "drop").requests()
    assert drop.loc[~drop["success"], "error"].str.contains(f"link {a}-{b} down at").all()


def test_the_outage_timeline_dates_the_faults_by_the_drop_not_the_flap():
    from reports.plots import fault_clock_shift, fault_label
    failed = pd.DataFrame({"end_s": [105.0, 107.0], "error": ["link a-b down at 40 s (fault injected)"] * 2})
    flap = dict(kind="link_down", node="a", peer="b", at_s=12, duration_s=3)
    drop = dict(kind="link_down", node="a", peer="b", at_s=40)
    assert fault_clock_shift(failed, [flap, drop], t0=100.0) == pytest.approx(5.0 - 40)
    assert fault_clock_shift(failed, [flap], t0=100.0) is None
    assert fault_label(drop) == "link_down a-b"
