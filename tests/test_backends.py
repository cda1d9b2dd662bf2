"""The one backend seam: every registered name builds through `make_backend`, satisfies the whole `Backend`
protocol, and is what every command offers."""
from __future__ import annotations

import inspect
import re

import pytest

from harness import catalog
from harness.backends import BACKEND_NAMES, BackendOptions, Planned, make_backend
from harness.backends.base import Backend
from harness.cli import main
from harness.costmodel import PlanOptions, load_profile
from harness.metrics import STEP_COLUMNS
from harness.runfolder import read_run
from harness.specs import PartitionPlan, UserError
from strategies.registry import get_strategy

MODEL = "qwen2.5-0.5b"


def protocol_members() -> set[str]:
    """The attributes and methods the Backend protocol declares."""
    methods = {name for name, value in vars(Backend).items() if not name.startswith("_") and callable(value)}
    return methods | set(Backend.__annotations__)


@pytest.fixture(scope="module")
def planned() -> Planned:
    cluster, model = catalog.load_cluster("mini-pair"), catalog.load_model(MODEL, 16)
    profile = load_profile()
    plan = get_strategy("uniform")(cluster, model, PlanOptions(profile=profile))
    return Planned(cluster, model, plan, profile, model_source=MODEL)


@pytest.fixture(scope="module")
def options(planned, tmp_path_factory, monkeypatch_module) -> BackendOptions:
    # the mlx twin is built into a folder of this test, not the user's cache
    monkeypatch_module.setenv("HARNESS_CACHE", str(tmp_path_factory.mktemp("cache")))
    return BackendOptions(planned=lambda: planned)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_protocol_declares_what_the_server_and_run_job_use():
    assert protocol_members() == {"name", "model_id", "source", "plan", "encode", "chat_prompt", "load", "generate",
                                  "stats", "step_table", "close"}


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_every_registered_backend_builds_and_has_every_protocol_member(name, options):
    backend = make_backend(name, options)
    missing = {m for m in protocol_members() if not hasattr(backend, m)}
    assert not missing, f"{name} lacks {missing}"
    for method in ("load", "close"):
        assert inspect.iscoroutinefunction(getattr(backend, method))
    assert backend.name == name and backend.source in ("simulated", "measured")
    assert backend.plan is None or isinstance(backend.plan, PartitionPlan)
    steps = backend.step_table(0.0, 0.0)   # not loaded yet: no steps, but the run folder's columns
    assert list(steps.columns) == list(STEP_COLUMNS) and len(steps) == 0
    prompt = backend.chat_prompt([{"role": "user", "content": "hello there"}])
    assert "hello there" in prompt and backend.encode(prompt)


def test_plan_backends_serve_the_plan_they_were_built_with(options, planned):
    assert make_backend("sim", options).plan is planned.plan
    twin = make_backend("mlx", options)   # no model folder: the plan runs on a local twin of the model
    assert twin.plan is planned.plan and twin.split == planned.plan.split() and twin.model_id == f"{MODEL}-twin"
    assert make_backend("instant", options).plan is None


def test_mlx_backend_keeps_a_plan_given_as_plan_json_and_none_for_a_bare_split(options, planned):
    from harness.backends.mlx import MlxBackend
    folder = make_backend("mlx", options).model_path
    assert MlxBackend(folder, planned.plan.to_dict()).plan == planned.plan
    bare = make_backend("mlx", BackendOptions(model_path=str(folder), split=tuple(planned.plan.split())))
    assert bare.plan is None and bare.split == planned.plan.split()


def test_mlx_refuses_a_plan_its_ranks_cannot_run_before_building_a_twin(tmp_path, monkeypatch):
    from dataclasses import replace
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    cluster, model = catalog.load_cluster("mixed"), catalog.load_model("qwen2.5-0.5b", 16, 64)
    plan = get_strategy("uniform")(cluster, model, PlanOptions(profile=load_profile()))
    # qwen2.5-0.5b has 2 KV heads: a TP-3 stage cannot shard them
    trio = tuple(n.name for n in cluster.nodes[:3])
    stage = replace(plan.stages[0], nodes=trio, layer_start=0, layer_end=model.num_layers, tp_degree=3)
    planned = Planned(cluster, model, replace(plan, stages=(stage,)), load_profile(), "qwen2.5-0.5b")
    with pytest.raises(UserError, match="num_key_value_heads = 2"):
        make_backend("mlx", BackendOptions(planned=lambda: planned))
    assert not any(tmp_path.iterdir())            # refused before any twin was built
    with pytest.raises(UserError, match="needs a model folder"):
        make_backend("mlx", BackendOptions(split=(12, 12)))


def test_an_unknown_backend_names_the_known_ones():
    with pytest.raises(UserError, match="known: sim, mlx, instant"):
        make_backend("vllm")


def test_a_plan_backend_without_a_plan_is_a_user_error():
    with pytest.raises(UserError, match="needs a partition plan"):
        make_backend("sim")


@pytest.mark.parametrize("command", ["serve", "bench", "run"])
def test_every_command_offers_exactly_the_registered_backends(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    choices = re.search(r"--backend \{([^}]*)\}", capsys.readouterr().out).group(1)
    assert tuple(choices.split(",")) == BACKEND_NAMES


def test_run_serves_the_experiment_with_the_instant_backend(tmp_path):
    rc = main(["run", "--experiment", "runs/smoke.toml", "--backend", "instant", "--requests", "3", "--rate", "50",
               "--out", str(tmp_path), "--no-report"])
    assert rc == 0
    run = read_run(next(p for p in tmp_path.iterdir() if p.is_dir()))
    assert run.summary["backend"] == "instant" and run.summary["source"] == "measured"
    assert run.summary["metrics"]["completed"] == 3 and (run.requests()["source"] == "measured").all()
    assert len(run.steps()) == 0 and run.plan["strategy"] == "hybrid_optimal"


def test_sim_steps_land_on_the_run_clock_inside_the_requests_window(tmp_path):
    rc = main(["bench", "--backend", "sim", "--cluster", "seed-64gb", "--model", "llama-3.1-8b", "--strategy",
               "uniform", "--speed", "20", "--warmup", "0", "--workload", "all_at_once,n=3,prompt=32,output=4",
               "--out", str(tmp_path)])
    assert rc == 0
    run = read_run(next(tmp_path.iterdir()))
    requests, steps = run.requests(), run.steps()
    slack = 0.05   # asyncio wake-ups and the HTTP hop, in seconds of the run's clock
    assert steps["start_s"].min() >= requests["start_s"].min() - slack
    assert steps["end_s"].max() <= requests["end_s"].max() + slack
