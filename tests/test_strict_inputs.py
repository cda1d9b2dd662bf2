"""Issue 9, strict inputs: every file the harness reads rejects unknown keys with the file, the key path and the
nearest valid key; a missing cluster file says so; `plan` exits non-zero when nothing fits and reports its own
usage for a bad flag."""
from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import catalog, experiment
from harness.cli import main
from harness.costmodel import load_profile
from harness.specs import UserError
from harness.workloads import build_workload, parse_workload

REPO = Path(__file__).resolve().parent.parent


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(text)
    return path


def write_json(tmp_path: Path, data, name: str = "c.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------ experiment files
@pytest.mark.parametrize("text, key_path, suggestion", [
    ("[workload]\nnum_request = 3\n", "[workload].num_request", "num_requests"),
    ("[load]\nwarmups = 1\n", "[load].warmups", "warmup"),
    ("[load]\nmax_duraton_s = 9\n", "[load].max_duraton_s", "max_duration_s"),
    ("[[targets]]\nmetric = 'a'\nvalue = 1\n[[targets]]\nmetric = 'b'\nthreshhold = 2\n",
     "[[targets]][1].threshhold", None),
    ("[workload]\narrival = { process = 'poisson', rat = 5 }\n", "[workload].arrival.rat", "rate"),
    ("[workload]\nprompt = { dist = 'uniform', low = 1, hihg = 9 }\n", "[workload].prompt.hihg", "high"),
    ("[workload]\nclosed_loop = { concurency = 2 }\n", "[workload].closed_loop.concurency", "concurrency"),
    ("[mlx]\nemulate_link = true\n", "[mlx].emulate_link", "emulate_links"),
    ("modle = 'x'\n", "modle", "model"),
])
def test_experiment_file_rejects_unknown_keys_at_every_depth(tmp_path, text, key_path, suggestion):
    path = write_toml(tmp_path, text)
    with pytest.raises(UserError) as err:
        experiment.load_experiment(path)
    message = str(err.value)
    assert str(path) in message and f"'{key_path}'" in message
    if suggestion:
        assert f"did you mean '{suggestion}'?" in message


def test_target_keys_are_the_fields_reports_read():
    from reports.targets import Target
    assert set(experiment.TARGET_KEYS) == {f.name for f in dataclasses.fields(Target)}


def test_every_committed_experiment_and_cluster_still_loads():
    from harness.validation.spec import read_spec
    for path in sorted((REPO / "runs").glob("*.toml")):
        # validate*.toml describe `harness validate` runs, the rest `harness run` experiments
        read_spec(path) if path.name.startswith("validate") else experiment.load_experiment(path)
    for name in catalog.cluster_names():
        catalog.load_cluster(name)
    load_profile()
    load_profile("default")


def test_run_command_refuses_a_typo_in_load_with_exit_2(tmp_path, capsys):
    path = write_toml(tmp_path, "[load]\nmax_duraton_s = 1\n")
    assert main(["run", "--experiment", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "[load].max_duraton_s" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ cluster files
SIMPLE = {"nodes": [{"name": "a", "ip": "10.0.0.1", "memory_gb": 64, "gpu_cores": 32, "role": "master"},
                    {"name": "b", "ip": "10.0.0.2", "memory_gb": 64, "gpu_cores": 32}],
          "backend": "ring", "network_interface": "en0", "use_thunderbolt": True}
RICH = {"name": "r", "default_link": "10gbe",
        "nodes": [{"name": "a", "chip": "M4 Max", "gpu_cores": 40, "memory_gb": 128},
                  {"name": "b", "chip": {"name": "x", "mem_bw_gbs": 100, "fp16_tflops": 5, "max_mem_gb": 64},
                   "memory_gb": 32, "usable_fraction": 0.7}],
        "links": [{"a": "a", "b": "b", "kind": "tb4-tcp", "latency_us": 20}]}


@pytest.mark.parametrize("base, where, typo, key_path, suggestion", [
    (SIMPLE, (), "use_thunderbolts", "use_thunderbolts", "use_thunderbolt"),
    (SIMPLE, ("nodes", 1), "chipp", "nodes[1].chipp", "chip"),
    (RICH, ("nodes", 1, "chip"), "mem_bw", "nodes[1].chip.mem_bw", "mem_bw_gbs"),
    (RICH, ("links", 0), "latency", "links[0].latency", "latency_us"),
])
def test_cluster_file_rejects_unknown_keys(tmp_path, base, where, typo, key_path, suggestion):
    data = copy.deepcopy(base)
    target = data
    for step in where:
        target = target[step]
    target[typo] = 1
    path = write_json(tmp_path, data)
    with pytest.raises(UserError) as err:
        catalog.load_cluster(str(path))
    assert str(path) in str(err.value) and f"'{key_path}'" in str(err.value)
    assert f"did you mean '{suggestion}'?" in str(err.value)


def test_a_missing_cluster_file_says_file_not_found(tmp_path):
    for name in (str(tmp_path / "gone.json"), "gone.json", "some/dir/gone"):
        with pytest.raises(UserError, match="cluster file not found: ") as err:
            catalog.load_cluster(name)
        assert name in str(err.value) and "unknown cluster" not in str(err.value)


def test_an_unknown_cluster_name_suggests_the_nearest_preset():
    with pytest.raises(UserError, match="unknown cluster 'mixd', did you mean 'mixed'") as err:
        catalog.load_cluster("mixd")
    assert "seed-64gb" in str(err.value)


# ------------------------------------------------------------------------------------------ workloads, traces, profiles
def test_workload_json_file_rejects_unknown_nested_keys(tmp_path):
    path = write_json(tmp_path, {"kind": "synthetic", "output": {"dist": "fixed", "vaule": 8}}, "w.json")
    with pytest.raises(UserError, match=r"'output\.vaule', did you mean 'value'") as err:
        parse_workload(str(path))
    assert str(path) in str(err.value)


def test_workload_dict_keys_depend_on_the_kind():
    with pytest.raises(UserError, match="'turns'"):
        build_workload({"kind": "synthetic", "turns": 3})
    with pytest.raises(UserError, match=r"'arrival\.rate'"):
        build_workload({"arrival": {"process": "bursts", "rate": 2, "burst_size": 2, "interval_s": 1}})


def test_workload_shorthand_rejects_options_its_kind_ignores():
    with pytest.raises(UserError, match="'rat', did you mean 'rate'"):
        parse_workload("poisson,rat=5,n=3")
    with pytest.raises(UserError, match="'prompt'"):
        parse_workload("conversations,prompt=5")   # conversations size turns with user=, not prompt=


def test_trace_row_with_an_unknown_key_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_tokens": 4, "output_tokens": 2}\n'
                    '{"arrival_s": 1, "prompt_tokens": 4, "output_token": 2}\n')
    with pytest.raises(UserError, match=r"t\.jsonl:2: unknown key 'output_token', did you mean 'output_tokens'"):
        build_workload({"kind": "trace", "path": str(path)})


def test_trace_token_counts_must_be_whole_numbers(tmp_path):
    """1.5 tokens used to become 1 without a word; 64.0 is a whole number and stays accepted."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_tokens": 64.0, "output_tokens": 2}\n'
                    '{"arrival_s": 1, "prompt_tokens": 1.5, "output_tokens": 2}\n')
    with pytest.raises(UserError, match=r"t\.jsonl:2: prompt_tokens: found 1\.5; allowed: an integer"):
        build_workload({"kind": "trace", "path": str(path)})
    path.write_text('{"arrival_s": 0, "prompt_tokens": 64.0, "output_tokens": 2, "prefix_tokens": 0}\n')
    assert list(build_workload({"kind": "trace", "path": str(path)}).prompt_tokens) == [64]


def test_profile_file_rejects_unknown_keys(tmp_path):
    data = json.loads((REPO / "harness" / "profiles" / "default.json").read_text())
    data["per_chip"] = {"M2 Ultra": {"eta_bww": 0.5}}
    path = write_json(tmp_path, data, "p.json")
    with pytest.raises(UserError, match=r"'per_chip\.M2 Ultra\.eta_bww', did you mean 'eta_bw'"):
        load_profile(str(path))


# ------------------------------------------------------------------------------------------ plan command
def test_plan_all_exits_non_zero_when_no_strategy_fits(capsys):
    code = main(["plan", "--cluster", "seed-64gb", "--model", "llama-3.1-405b", "--quant", "8", "--strategy", "all"])
    out, err = capsys.readouterr()
    assert code != 0 and "none of the 5 strategies fits" in err
    assert "uniform: uniform:" not in out and "uniform: llama-3.1-405b" in out


def test_plan_fit_messages_name_the_strategy_once_and_never_suggest_it(capsys):
    args = ["plan", "--cluster", "mini-pair", "--model", "qwen2.5-0.5b", "--kv-reserve-tokens", "4000000"]
    for name in ("uniform", "ring_memory_weighted", "compute_balanced", "min_latency", "hybrid_optimal"):
        assert main([*args, "--strategy", name]) == 2
        err = capsys.readouterr().err
        assert err.count(name) == 1 and err.startswith(f"error: {name}: ")


def test_plan_suggestion_never_names_the_failing_strategy():
    from strategies.partitioning._plans import _memory_aware_besides
    assert "hybrid_optimal" not in _memory_aware_besides("hybrid_optimal")
    assert "ring_memory_weighted" not in _memory_aware_besides("ring_memory_weighted")
    assert _memory_aware_besides("uniform") == "ring_memory_weighted or hybrid_optimal"


def test_plan_with_a_bogus_flag_prints_the_plan_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--bogus-flag"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "usage: python -m harness plan" in err and "unrecognized arguments: --bogus-flag" in err


# ------------------------------------------------------------------------------------------ property: renamed keys
def key_paths(data, path=()):
    """Every (path to a dict, key) pair in nested dicts and lists of dicts."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield path, key
            yield from key_paths(value, (*path, key))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            yield from key_paths(item, (*path, i))


def renamed(data, path, key, new_key):
    out = copy.deepcopy(data)
    target = out
    for step in path:
        target = target[step]
    items = list(target.items())
    target.clear()
    target.update((new_key if k == key else k, v) for k, v in items)   # same place, new name
    return out


def toml_path(path, key) -> str:
    """The key path as experiment.py reports it: [table], [[targets]][i], then dotted keys."""
    parts = list(path) + [key]
    head, rest = parts[0], parts[1:]
    if not rest:
        return head
    text = "[[targets]]" if head == "targets" else f"[{head}]"
    for step in rest:
        text += f"[{step}]" if isinstance(step, int) else f".{step}"
    return text


def json_path(path, key) -> str:
    text = ""
    for step in [*path, key]:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def to_toml(data: dict) -> str:
    """Just enough TOML for experiment dicts: scalars, then [tables], then [[arrays of tables]]."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, (dict, list))]
    for name, table in data.items():
        for entry in ([table] if isinstance(table, dict) else table if isinstance(table, list) else []):
            lines.append(f"[{name}]" if isinstance(table, dict) else f"[[{name}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


EXPERIMENT = tomllib.loads((REPO / "runs" / "default.toml").read_text())
EXPERIMENT["mlx"] = {"seed": 1, "emulate_links": False}
EXPERIMENT_KEYS = list(key_paths(EXPERIMENT))
CLUSTER_KEYS = list(key_paths(RICH)) + [(("simple",) + p, k) for p, k in key_paths(SIMPLE)]
suffixes = st.text("xyzq", min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.sampled_from(EXPERIMENT_KEYS), suffix=suffixes)
def test_any_renamed_experiment_key_is_named_in_a_user_error(tmp_path, choice, suffix):
    path, key = choice
    data = renamed(EXPERIMENT, path, key, key + suffix)
    file = write_toml(tmp_path, to_toml(data))
    with pytest.raises(UserError) as err:
        experiment.load_experiment(file)
    assert f"'{toml_path(path, key + suffix)}'" in str(err.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.sampled_from(CLUSTER_KEYS), suffix=suffixes)
def test_any_renamed_cluster_key_is_named_in_a_user_error(tmp_path, choice, suffix):
    path, key = choice
    base = SIMPLE if path[:1] == ("simple",) else RICH
    path = path[1:] if base is SIMPLE else path
    file = write_json(tmp_path, renamed(base, path, key, key + suffix), "mutated.json")
    with pytest.raises(UserError) as err:
        catalog.load_cluster(str(file))
    assert f"'{json_path(path, key + suffix)}'" in str(err.value)


def test_the_toml_writer_of_these_tests_round_trips_the_experiment():
    assert tomllib.loads(to_toml(EXPERIMENT)) == EXPERIMENT
