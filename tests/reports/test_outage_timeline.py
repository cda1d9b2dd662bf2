"""The outage timeline (issue 14): a run with failures or faults shows when traffic failed and where the fault was."""
import reports
from harness.cli import main
from reports import plots

SIM = ["simulate", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--strategy", "uniform", "--no-load",
       "--workload", "poisson,rate=4,n=24,prompt=64,output=16", "--seed", "2", "--quiet"]


def test_a_failed_node_is_drawn_where_its_requests_failed(tmp_path):
    assert main(SIM + ["--fail", "studio1@2", "--out", str(tmp_path), "--run-id", "down"]) == 1
    run = reports.load_run(tmp_path / "down")
    failed = run.requests[~run.requests["success"].astype(bool)]
    shift = plots.fault_clock_shift(failed, run.config["faults"], plots.clock_zero(run))
    # simulate counts fault times from the workload's start: on the requests' axis the failure is where it was set
    assert shift is not None and abs(shift) < 0.5
    plot = plots.outage_timeline(run)
    assert plot is not None and "Dashed lines" in plot.caption and f"{len(failed)} of 24 requests failed" in plot.caption
    page = reports.render(tmp_path / "down").read_text()
    assert "Outage timeline" in page


def test_a_healthy_run_has_no_outage_timeline(tmp_path):
    assert main(SIM + ["--out", str(tmp_path), "--run-id", "ok"]) == 0
    assert plots.outage_timeline(reports.load_run(tmp_path / "ok")) is None
    assert "Outage timeline" not in reports.render(tmp_path / "ok").read_text()


def test_a_rank_lost_on_real_ranks_is_drawn_where_its_request_failed():
    """Real ranks inject nothing: a failover's record (a rank died or stalled) is the fault, dated by the first
    request whose error names its node."""
    import pandas as pd
    import pytest
    failed = pd.DataFrame({"error": ["rank 0 (stage 1, node mini-b) killed by signal 9", "other"],
                           "end_s": [113.5, 120.0]})
    lost = {"kind": "rank_lost", "node": "mini-b", "at_s": 13.2}
    assert plots.fault_clock_shift(failed, [lost], t0=100.0) == pytest.approx(0.3)
    assert plots.fault_clock_shift(failed, [lost | {"node": "mini-c"}], t0=100.0) is None
    assert plots.fault_label(lost) == "rank_lost mini-b"
