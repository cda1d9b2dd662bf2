"""Fault injection in the simulator: a node that fails takes its stage down at that virtual time; what was
unfinished fails with the reason recorded and what comes later is refused, never silently dropped."""
from __future__ import annotations

import pytest

import sim
from tests.sim.conftest import make_cluster, make_plan, make_profile
from harness.catalog import load_model
from harness.cli import main
from harness.runfolder import read_run
from harness.workloads import build_workload, parse_workload


@pytest.fixture(scope="module")
def setup():
    model = load_model("llama-3.1-8b", 4, 64)
    cluster = make_cluster(3)
    plan = make_plan(model, [("n0",), ("n1",)], [16, 16])     # n2 idles
    return cluster, model, plan, make_profile()


def _run(setup, spec, faults=()):
    result = sim.simulate(*setup, build_workload(parse_workload(spec)), include_load=False, faults=faults)
    return result.requests.to_pandas()


def test_a_failed_node_fails_what_is_unfinished_and_refuses_what_comes_later(setup):
    spec = "poisson,rate=2,n=60,prompt=256,output=64,seed=3"
    clean = _run(setup, spec)
    at = float(clean["end_s"].median())
    rows = _run(setup, spec, faults=[dict(kind="node_down", node="n1", at_s=at)])
    assert len(rows) == len(clean)                                  # every request is in the records
    done_before = clean["end_s"] < at
    assert rows["success"].tolist() == done_before.tolist()        # finished before the fault: untouched
    failed = rows[~rows["success"]]
    assert failed["error"].str.contains("node n1 failed").all()
    assert (failed["end_s"] >= at - 1e-9).all()
    late = failed[failed["start_s"] > at]
    assert len(late) and (late["output_tokens"] == 0).all()        # refused on arrival


def test_a_node_outside_the_plan_changes_nothing(setup):
    spec = "poisson,rate=2,n=40,prompt=256,output=64,seed=1"
    clean, faulty = _run(setup, spec), _run(setup, spec, faults=[dict(kind="node_down", node="n2", at_s=1.0)])
    assert clean.drop(columns=["chunk_times_s"]).equals(faulty.drop(columns=["chunk_times_s"]))


def test_a_closed_loop_after_a_failure_records_every_refusal(setup):
    rows = _run(setup, "closed,concurrency=4,n=3000,prompt=64,output=8", faults=[dict(kind="node_down", node="n0", at_s=0.5)])
    assert len(rows) == 3000 and not rows["success"].all()        # no recursion through 3000 refusals


@pytest.mark.parametrize("fault", [dict(kind="straggler", node="n1", factor=3.0),
                                   dict(kind="slow_link", node="n0", peer="n1", factor=1000.0)])
def test_a_degradation_slows_only_what_comes_after_it(setup, fault):
    spec = "poisson,rate=1,n=40,prompt=256,output=64,seed=2"
    clean = _run(setup, spec)
    at = float(clean["end_s"].quantile(0.25))
    slow = _run(setup, spec, faults=[fault | {"at_s": at}])
    assert slow["success"].all()                                      # degraded, not down
    before = clean["end_s"] < at - 1.0                                # done well before it: untouched
    assert before.any() and (slow["end_s"][before] == clean["end_s"][before]).all()
    e2e = lambda r: (r["end_s"] - r["start_s"])[~before].mean()
    assert e2e(slow) > 1.3 * e2e(clean)


def test_simulate_fail_flag(tmp_path, capsys):
    args = ["simulate", "--cluster", "mixed", "--model", "llama-3.1-8b", "--strategy", "uniform",
            "--workload", "poisson,rate=1,n=20,prompt=128,output=32", "--quiet", "--out", str(tmp_path)]
    assert main(args + ["--fail", "nope@3"]) == 2 and "no node 'nope'" in capsys.readouterr().err
    assert main(args + ["--fail", "studio-m3u"]) == 2 and "NODE@SECONDS" in capsys.readouterr().err
    assert main(args + ["--straggler", "studio-m3u@1:0.5"]) == 2 and "FACTOR >= 1" in capsys.readouterr().err
    assert main(args + ["--slow-link", "studio-m3u,x@1:2"]) == 2 and "no node 'x'" in capsys.readouterr().err
    assert main(args + ["--slow-link", "studio-m3u,studio-m4max@1:50", "--run-id", "s"]) == 0
    assert main(args + ["--fail", "studio-m3u@5", "--run-id", "f"]) == 1     # failed requests: exit 1
    requests = read_run(tmp_path / "f").requests()
    assert (~requests["success"]).any() and requests["error"].str.contains("studio-m3u failed").any()
    import reports
    html = reports.render([tmp_path / "f"]).read_text()      # the report says how many failed, and why
    failed = int((~requests["success"]).sum())
    assert f"FAILED REQUESTS: " in html and f": {failed} of {len(requests)}" in html
    assert "studio-m3u failed at" in html and html.index('id="failed-1"') < html.index("<h2")


def test_the_real_time_sim_backend_goes_down_at_its_fault(tmp_path):
    """Behind the real server: a stream in flight ends with an error, /health says why, new requests get 503."""
    import httpx
    from harness import catalog
    from harness.backends.sim import SimBackend, SimBackendConfig
    from harness.costmodel import PlanOptions, load_profile
    from harness.serving.server import EmbeddedServer
    from strategies.registry import get_strategy
    cluster, model = catalog.load_cluster("mixed"), catalog.load_model("llama-3.1-8b", 4, 64)
    plan = get_strategy("uniform")(cluster, model, PlanOptions(profile=load_profile()))
    fault = dict(kind="node_down", node=plan.stages[1].nodes[0], at_s=2.0)
    backend = SimBackend(cluster, model, plan, load_profile(), config=SimBackendConfig(speed=5.0, faults=(fault,)))
    body = {"prompt": [1, 2, 3], "max_tokens": 5000, "ignore_eos": True, "stream": True}
    with EmbeddedServer(backend) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            lines = [line for line in resp.iter_lines() if line]
        assert "failed at 2 s" in lines[-2] or "failed at 2 s" in lines[-1]
        health = client.get("/health")
        assert health.status_code == 503 and "failed at 2 s" in health.json()["error"]
        assert client.post("/v1/completions", json=body | {"stream": False}).status_code == 503


@pytest.mark.parametrize("fault, message", [
    ({"kind": "meteor", "node": "a", "at_s": 1}, "allowed: node_down, straggler, slow_link"),
    ({"kind": "straggler", "node": "a", "at_s": 1}, "straggler needs factor"),
    ({"kind": "slow_link", "node": "a", "at_s": 1, "factor": 2}, "slow_link needs peer"),
    ({"kind": "node_down", "node": "a", "at_s": -1}, "at_s: found -1"),
    ({"kind": "node_down", "node": "a", "at_s": 1, "when": 2}, "when"),
])
def test_experiment_faults_are_checked_when_read(tmp_path, fault, message):
    from harness.experiment import load_experiment
    from harness.specs import UserError
    body = ", ".join(f"{k} = {v!r}".replace("'", '"') for k, v in fault.items())
    path = tmp_path / "e.toml"
    path.write_text(f"[[faults]]\n{body.replace(', ', chr(10))}\n")
    with pytest.raises(UserError, match=message):
        load_experiment(path)


def test_run_refuses_a_fault_on_a_node_the_cluster_lacks(tmp_path, capsys):
    path = tmp_path / "e.toml"
    path.write_text('[[faults]]\nkind = "node_down"\nnode = "nope"\nat_s = 1\n')
    assert main(["run", "--experiment", str(path), "--out", str(tmp_path)]) == 2
    assert "no node 'nope'" in capsys.readouterr().err
