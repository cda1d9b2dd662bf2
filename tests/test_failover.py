"""Failover on the sim backend (issue 14): after a node fails, the cluster is planned again on the nodes left,
reloads, and serves on; requests in flight fail, new ones get 503 while it reloads, later ones succeed."""
import json

import pandas as pd

from harness.cli import main


def experiment(tmp_path, failover: bool):
    text = open("runs/smoke.toml").read().replace('strategy = "hybrid_optimal"', 'strategy = "uniform"')
    text = text.replace("num_requests = 8", "num_requests = 24")
    text += '\n[[faults]]\nkind = "node_down"\nnode = "studio1"\nat_s = 0.5\n'
    if failover:
        text = text.replace('backend = "sim"', 'backend = "sim"\nfailover = true')
    path = tmp_path / f"fault-{failover}.toml"
    path.write_text(text)
    return path


def run_folder(tmp_path, failover: bool):
    out = tmp_path / f"out-{failover}"
    assert main(["run", "--experiment", str(experiment(tmp_path, failover)), "--out", str(out), "--no-report"]) == 1
    (folder,) = out.iterdir()
    run_folder.last = folder
    return json.loads((folder / "summary.json").read_text()), pd.read_parquet(folder / "requests.parquet")


def test_the_cluster_serves_on_without_the_failed_node(tmp_path):
    summary, requests = run_folder(tmp_path, failover=True)
    (failover,) = summary["run"]["failovers"]
    assert failover["failed_node"] == "studio1" and failover["at_s"] >= 0.5
    assert failover["serving_again_s"] > failover["at_s"]           # the moved weights are reloaded first
    assert all("studio1" not in stage["nodes"] for stage in failover["plan"])
    assert sum(len(stage["nodes"]) for stage in failover["plan"]) == 3
    assert summary["status"] == "complete"
    later = requests[requests["start_s"] > requests.loc[~requests["success"], "end_s"].max()]
    assert len(later) > 0 and later["success"].all()                # served again after the outage
    assert requests["error"].fillna("").str.contains("failing over after studio1 failed").any()
    import reports
    from reports import plots
    plot = plots.outage_timeline(reports.load_run(run_folder.last))      # the report shows outage and recovery
    assert plot is not None and "Dashed lines" in plot.caption


def test_without_failover_every_later_request_fails(tmp_path):
    summary, requests = run_folder(tmp_path, failover=False)
    assert "failovers" not in summary["run"]
    late = requests[requests["start_s"] > 1.0]
    assert len(late) > 0 and not late["success"].any()


def test_the_fault_is_drawn_on_the_backends_clock_even_when_nothing_failed_in_flight(tmp_path):
    """A fault with no request in flight fails only later arrivals (503 while reloading), so no failure dates it:
    the sim backend's recorded clock places it instead, before the first 503."""
    import reports
    from reports import plots
    summary, _ = run_folder(tmp_path, failover=True)
    run = reports.load_run(run_folder.last)
    busy = run.requests["error"].fillna("").str.contains("node studio1 failed")
    run.requests = run.requests[~busy]                      # as if none had been in flight
    plot = plots.outage_timeline(run)
    assert plot is not None and "Dashed lines" in plot.caption
    zero, t0 = summary["run"]["fault_clock_zero_s"], plots.clock_zero(run)
    at = zero + 0.5 - t0                                    # the fault, on the plot's axis
    refused = run.requests[run.requests["error"].fillna("").str.contains("failing over")]
    assert at <= float(refused["start_s"].min()) - t0 + 1e-6
