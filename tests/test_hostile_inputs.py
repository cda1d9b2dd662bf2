"""Issue 14, hostile input: every file the harness reads (model config, cluster, experiment TOML, workload
shorthand) gives a one-line UserError naming the file and field, or works; never another exception, never a
hang, and an absurd size is refused before any table is built.

The regression cases are the ones the issue lists; the hypothesis suite generates each kind of input, valid
and mutated at every depth, and feeds it to the function the CLI calls. It is seeded (derandomize) so CI sees
the same cases every time, and bounded (max_examples) to stay well under a minute.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import math
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import catalog
from harness.cli import build_parser, main
from harness.commands import plan as plan_command
from harness.experiment import load_experiment
from harness.specs import UserError
from harness.workloads import SHORTHAND_KEYS, build_workload, parse_workload

CATALOG_MODEL = catalog.MODEL_DIR / "llama-3.2-3b.json"
HANG_BOUND_S = 20          # a case that takes this long is a hang (each takes well under a second)


class CaseHung(Exception):
    """One input took longer than HANG_BOUND_S."""


@contextlib.contextmanager
def bounded(seconds: float = HANG_BOUND_S):
    """Turn a hang into a test failure instead of a stuck CI job (SIGALRM interrupts the case)."""
    def on_alarm(signum, frame):
        raise CaseHung(f"an input case ran over {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    # repeat every second after the bound: an alarm landing in a gc callback is swallowed, the next one is not
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_clear(err: UserError, *parts: str) -> str:
    """A user error is one line, names what it is given to name, and carries no traceback text."""
    message = str(err)
    assert "\n" not in message and "Traceback" not in message, message
    assert len(message) < 2000, message     # one line, not a dumped file
    for part in parts:
        assert part in message, message
    return message


def plan_args(*argv: str):
    return build_parser().parse_args(["plan", *argv])


def plan_or_user_error(cluster: str, model: str) -> None:
    """What `harness plan` does with these files: a plan (exit 0) or a UserError; anything else fails."""
    args = plan_args("--cluster", cluster, "--model", model, "--json")
    try:
        with bounded(), contextlib.redirect_stdout(io.StringIO()):
            assert plan_command.run(args) == 0
    except UserError as err:
        assert_clear(err)


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------ regression cases
def base_model() -> dict:
    return json.loads(CATALOG_MODEL.read_text())


@pytest.mark.parametrize("field, value, allowed", [
    ("num_hidden_layers", 10**9, "an integer from 1 to 1024"),
    ("num_hidden_layers", "32", "an integer"),
    ("num_hidden_layers", True, "an integer"),
    ("hidden_size", 31.5, "an integer"),
    ("hidden_size", math.nan, "an integer"),
    ("head_dim", [64, 64], "an integer"),
    ("vocab_size", 10**30, "an integer from 1 to"),
    ("num_attention_heads", -4, "an integer from 1 to"),
    ("tie_word_embeddings", "no", "true or false"),
])
def test_a_model_config_field_of_the_wrong_type_or_size_is_refused_before_planning(tmp_path, field, value, allowed):
    path = write(tmp_path / "config.json", base_model() | {field: value})
    with bounded(10), pytest.raises(UserError) as err:
        catalog.load_model(str(path))
    assert_clear(err.value, str(path), field, allowed)


def test_a_billion_layers_is_refused_by_plan_with_exit_2(tmp_path, capsys):
    path = write(tmp_path / "config.json", base_model() | {"num_hidden_layers": 10**9})
    with bounded(10):
        assert main(["plan", "--cluster", "mini-pair", "--model", str(path)]) == 2
    assert "num_hidden_layers: found 1000000000; allowed: an integer from 1 to 1024" in capsys.readouterr().err


CLUSTER = {"nodes": [{"name": "a", "chip": "M4 Pro", "memory_gb": 24}, {"name": "b", "chip": "M4 Pro", "memory_gb": 24}]}


@pytest.mark.parametrize("text, expected", [
    (b'{"nodes": [{"name": "\xff\xfe", "chip": "M4 Pro", "memory_gb": 24}]}', "not UTF-8 text (byte 0xff"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"nodes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"nodes": [], "x": 1' + b"9" * 5000 + b"}", "not valid JSON"),
    (json.dumps({**CLUSTER, "links": [{"a": "a", "b": ["b"], "kind": "1gbe"}]}).encode(), "links[0].b: found ['b']"),
    (json.dumps({**CLUSTER, "links": [{"a": "a", "b": "b", "kind": 5}]}).encode(), "links[0].kind: found 5"),
    (json.dumps({**CLUSTER, "name": ["x"]}).encode(), "name: found ['x']; allowed: a string"),
    (json.dumps({"nodes": [{"name": "a", "chip": 5, "memory_gb": 24}]}).encode(), "nodes[0].chip: found 5"),
    (json.dumps({"nodes": [{"name": "a", "chip": "M4 Pro", "memory_gb": 24, "host": 7}]}).encode(),
     "nodes[0].host: found 7"),
    (json.dumps({"nodes": [{"name": f"n{i}", "chip": "M4 Pro", "memory_gb": 24} for i in range(20_000)]}).encode(),
     "nodes: found 20000 nodes; allowed: 1 to 256"),
])
def test_a_malformed_cluster_file_is_one_clear_line(tmp_path, text, expected):
    path = tmp_path / "cluster.json"
    path.write_bytes(text)
    with bounded(10), pytest.raises(UserError) as err:
        catalog.load_cluster(str(path))
    assert_clear(err.value, str(path), expected)


@pytest.mark.parametrize("text, expected", [
    (b'name = "\xff"\n', "not UTF-8 text"),
    (b"a = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "experiment file"),
    (b"[load]\nmax_duration_s = -1\n", "[load].max_duration_s: found -1; allowed: a finite number > 0"),
    (b"[load]\nmax_duration_s = nan\n", "[load].max_duration_s: found nan"),
    (b"[load]\nwarmup = 'x'\n", "[load].warmup: found 'x'; allowed: an integer"),
    (b"[mlx]\nemulate_links = 'yes'\n", "[mlx].emulate_links: found 'yes'; allowed: true or false"),
    (b"[workload]\narrival = { process = 'poisson', rate = 'fast' }\n", "[workload].arrival.rate: found 'fast'"),
    (b"[workload]\nprompt = { dist = 'uniform', low = 10, high = 5 }\n", "[workload].prompt.low: found 10 above high"),
    (b"[workload]\noutput = 0\n", "[workload].output: found 0; allowed: an integer from 1"),
    (b"[workload]\noutput = { dist = 'fixed', value = -5 }\n", "[workload].output.value: found -5"),
    (b"[workload]\nclosed_loop = { concurrency = 'x' }\n", "[workload].closed_loop.concurrency: found 'x'"),
    (b"quant = 7\n", "quant: found 7; allowed: one of 2, 3, 4"),
    (b"kv_reserve_tokens = -1\n", "kv_reserve_tokens: found -1"),
])
def test_a_malformed_experiment_file_is_refused_when_read(tmp_path, text, expected):
    path = tmp_path / "exp.toml"
    path.write_bytes(text)
    with bounded(10), pytest.raises(UserError) as err:
        load_experiment(path)
    assert_clear(err.value, str(path), expected)


def test_a_negative_duration_is_refused_before_any_run_folder(tmp_path, capsys):
    path = tmp_path / "exp.toml"
    path.write_text('backend = "instant"\n[load]\nmax_duration_s = -1\n')
    out = tmp_path / "out"
    assert main(["run", "--experiment", str(path), "--out", str(out), "--no-report"]) == 2
    assert "[load].max_duration_s: found -1" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("text, expected", [
    ("poisson,rate=abc,n=4", "rate: found 'abc'; allowed: a finite number"),
    ("poisson,rate=nan,n=4", "rate: found 'nan'"),
    ("poisson,rate=1,n=4,prompt=uniform:10:5", "prompt.low: found 10 above high 5"),
    ("poisson,rate=1,n=4,prompt=0", "prompt.value: found 0; allowed: an integer from 1"),
    ("poisson,rate=1,n=4,output=-5", "output.value: found -5"),
    ("poisson,rate=1,n=abc", "n: found 'abc'; allowed: an integer"),
    ("poisson,rate=1,n=0", "num_requests: found 0"),
    ("closed,concurrency=x", "concurrency: found 'x'"),
    ("bursts,burst_size=2.5,interval_s=1", "burst_size: found '2.5'"),
    ("poisson,rate=1,prompt=normal:-3:1", "prompt.mean: found -3.0"),
])
def test_a_bad_workload_shorthand_is_one_clear_line(text, expected):
    with bounded(10), pytest.raises(UserError) as err:
        build_workload(parse_workload(text))
    assert_clear(err.value, repr(text), expected)


def test_a_non_utf8_trace_is_one_clear_line(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(b'{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 5, "prefix_id": "\xff"}\n')
    with pytest.raises(UserError) as err:
        build_workload({"kind": "trace", "path": str(trace)})
    assert_clear(err.value, str(trace), "not UTF-8")


# ------------------------------------------------------------------------------------------ the fuzz suite
FUZZ = settings(derandomize=True, deadline=datetime.timedelta(seconds=10), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SAFE_TEXT = st.text(alphabet="abcxyz019 ._-:/", max_size=8)
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6),
    st.sampled_from([0, -1, -5, 1024, 1025, 10**9, 10**30, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), SAFE_TEXT, st.sampled_from(["32", "M4 Pro", "poisson", ""]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(SAFE_TEXT, st.integers(0, 9), max_size=2),
)


def leaf_slots(data, out=None) -> list:
    """Every (container, key) of a nested dict/list, so a mutation can land at any depth."""
    out = [] if out is None else out
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in list(items):
        out.append((data, key))
        leaf_slots(value, out)
    return out


@st.composite
def mutated(draw, valid):
    """A valid input with one to three values replaced by hostile ones, or keys deleted, at any depth."""
    data = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        slots = leaf_slots(data)
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        if isinstance(container, dict) and draw(st.booleans()):
            del container[key]
        else:
            container[key] = draw(HOSTILE)
    return data


def valid_or_mutated(valid):
    return st.one_of(valid, mutated(valid))


@st.composite
def model_configs(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    head_dim = draw(st.sampled_from([16, 64, 128]))
    cfg = {"model_type": draw(st.sampled_from(["llama", "qwen2", "mistral"])),
           "num_hidden_layers": draw(st.integers(1, 48)), "hidden_size": heads * head_dim,
           "num_attention_heads": heads, "num_key_value_heads": draw(st.sampled_from([1, heads])),
           "intermediate_size": draw(st.integers(1, 16384)), "vocab_size": draw(st.integers(1, 150_000)),
           "tie_word_embeddings": draw(st.booleans())}
    if draw(st.booleans()):
        cfg["head_dim"] = draw(st.sampled_from([32, 64, 128]))
    if draw(st.booleans()):    # mixture of experts
        experts = draw(st.integers(1, 64))
        cfg |= {"num_experts": experts, "num_experts_per_tok": draw(st.integers(1, experts)),
                "moe_intermediate_size": draw(st.integers(1, 2048)), "decoder_sparse_step": draw(st.integers(1, 2)),
                "mlp_only_layers": draw(st.lists(st.integers(0, 47), max_size=3))}
    if draw(st.booleans()):
        cfg = {"text_config": cfg}
    return cfg


@settings(FUZZ, max_examples=120)
@given(config=valid_or_mutated(model_configs()))
def test_fuzz_model_configs_plan_or_one_clear_error(config):
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "config.json", config)
        plan_or_user_error("mini-pair", str(path))


CHIPS = [("M4 Pro", 24), ("M4 Pro", 64), ("M2 Ultra", 192), ("M3 Max", 128), ("M1", 16)]
LINK_KINDS = ["tb5-tcp", "tb4-tcp", "10gbe", "1gbe", "wifi"]


@st.composite
def clusters(draw) -> dict:
    picks = draw(st.lists(st.sampled_from(CHIPS), min_size=1, max_size=4))
    nodes = [{"name": f"n{i}", "chip": chip, "memory_gb": memory} for i, (chip, memory) in enumerate(picks)]
    data = {"name": "fuzz", "nodes": nodes, "default_link": draw(st.sampled_from(LINK_KINDS))}
    if len(nodes) > 1 and draw(st.booleans()):
        data["links"] = [{"a": "n0", "b": "n1", "kind": draw(st.sampled_from(LINK_KINDS)),
                          "latency_us": draw(st.floats(1, 1000)), "bandwidth_gbps": draw(st.floats(0.1, 80))}]
    return data


@st.composite
def cluster_file_bytes(draw) -> bytes:
    """A cluster file as bytes: JSON of a valid or mutated cluster, or one broken as a file (bytes, depth, size)."""
    data = draw(valid_or_mutated(clusters()))
    text = json.dumps(data).encode()
    match draw(st.sampled_from(["json", "json", "non_utf8", "deep", "many_nodes", "truncated"])):
        case "non_utf8":
            at = draw(st.integers(0, len(text)))
            return text[:at] + b"\xff\xfe" + text[at:]
        case "deep":
            depth = draw(st.sampled_from([5, 900, 100_000]))
            return b'{"nodes": ' + b"[" * depth + b"]" * depth + b"}"
        case "many_nodes":
            count = draw(st.sampled_from([256, 257, 20_000]))
            return json.dumps({"nodes": [{"name": f"n{i}", "chip": "M4 Pro", "memory_gb": 24}
                                         for i in range(count)], "default_link": "1gbe"}).encode()
        case "truncated":
            return text[:draw(st.integers(0, len(text)))]
    return text


@settings(FUZZ, max_examples=80)
@given(raw=cluster_file_bytes())
def test_fuzz_cluster_files_plan_or_one_clear_error(raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cluster.json"
        path.write_bytes(raw)
        plan_or_user_error(str(path), "llama-3.2-3b")


def toml_value(value) -> str:
    """A TOML inline value (a tiny writer: the project has no TOML writer and needs none)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value if v is not None) + "]"
    return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items() if v is not None) + "}"


def toml_text(data: dict) -> str:
    return "".join(f"{json.dumps(str(k))} = {toml_value(v)}\n" for k, v in data.items() if v is not None)


LENGTHS = st.one_of(st.integers(1, 2048), st.builds(lambda v: {"dist": "fixed", "value": v}, st.integers(1, 2048)),
                    st.builds(lambda lo, extra: {"dist": "uniform", "low": lo, "high": lo + extra},
                              st.integers(1, 512), st.integers(0, 512)),
                    st.builds(lambda m, s: {"dist": "lognormal", "mean": m, "sigma": s, "min": 1, "max": 4096},
                              st.floats(1, 1000), st.floats(0, 1)))
ARRIVALS = st.one_of(st.builds(lambda r: {"process": "poisson", "rate": r}, st.floats(0.01, 100)),
                     st.just({"process": "all_at_once"}),
                     st.builds(lambda b, i: {"process": "bursts", "burst_size": b, "interval_s": i},
                               st.integers(1, 16), st.floats(0.1, 10)))


@st.composite
def experiments(draw) -> dict:
    workload = {"kind": "synthetic", "num_requests": draw(st.integers(1, 200)), "seed": draw(st.integers(0, 9)),
                "arrival": draw(ARRIVALS), "prompt": draw(LENGTHS), "output": draw(LENGTHS)}
    if draw(st.booleans()):
        workload["closed_loop"] = {"concurrency": draw(st.integers(1, 8))}
    return {"name": "fuzz", "backend": draw(st.sampled_from(["sim", "instant"])), "cluster": "mini-pair",
            "model": "llama-3.2-3b", "quant": draw(st.sampled_from([4, 8, 16])), "strategy": "uniform",
            "kv_reserve_tokens": draw(st.integers(0, 8192)), "workload": workload,
            "load": {"warmup": draw(st.integers(0, 3)), "max_duration_s": draw(st.floats(0.5, 600))},
            "targets": [{"metric": "median_ttft_ms", "op": draw(st.sampled_from(["<", ">="])),
                         "value": draw(st.floats(1, 1000))}],
            "mlx": {"seed": draw(st.integers(0, 9)), "emulate_links": draw(st.booleans())}}


@settings(FUZZ, max_examples=120)
@given(data=valid_or_mutated(experiments()), corrupt=st.sampled_from([None, None, None, 0, 7]))
def test_fuzz_experiment_files_load_or_one_clear_error(data, corrupt):
    raw = toml_text(data).encode()
    if corrupt is not None:
        raw = raw[:corrupt] + b"\xc3\x28" + raw[corrupt:]     # an invalid UTF-8 sequence
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "exp.toml"
        path.write_bytes(raw)
        try:
            with bounded():
                exp = load_experiment(path)
                build_workload(exp["workload"])     # what `run` builds before it starts anything
        except UserError as err:
            assert_clear(err, str(path))


GOOD_SHORT_VALUES = st.sampled_from(["1", "5", "0.5", "512", "uniform:10:100", "normal:512:64",
                                     "lognormal:200:0.6"])
BAD_SHORT_VALUES = st.sampled_from(["abc", "0", "-5", "nan", "inf", "1e400", "uniform:10:5", "uniform:a:b",
                                    "normal:-1:3", "lognormal:5:-1", "", "10**9", "99999999999999999999",
                                    "10000001", "2.5", "poisson", "fixed:3"])
SHORT_VALUES = st.one_of(GOOD_SHORT_VALUES, GOOD_SHORT_VALUES, BAD_SHORT_VALUES)
ANY_SHORT_KEY = st.sampled_from(sorted({k for keys in SHORTHAND_KEYS.values() for k in keys} | {"bogus"}))


NEEDED_OPTIONS = {"poisson": ("rate=2",), "constant": ("rate=2",), "bursts": ("burst_size=4", "interval_s=1")}


@st.composite
def shorthands(draw) -> str:
    """A CLI workload shorthand: mostly the options its head reads (valid or hostile values), sometimes any."""
    heads = st.sampled_from(list(SHORTHAND_KEYS))
    head = draw(st.one_of(heads, heads, heads, st.sampled_from(["weird", ""])))
    own_keys = st.sampled_from(SHORTHAND_KEYS.get(head) or ("n",))
    options = draw(st.lists(st.tuples(st.one_of(own_keys, own_keys, ANY_SHORT_KEY), SHORT_VALUES), max_size=4))
    parts = [head, *NEEDED_OPTIONS.get(head, ())] + [f"{k}={v}" for k, v in options]
    if draw(st.integers(0, 4)) == 0:
        parts.append(draw(SAFE_TEXT))    # a stray part, sometimes without '='
    return ",".join(parts)


@settings(FUZZ, max_examples=250)
@given(text=shorthands())
def test_fuzz_workload_shorthands_build_or_one_clear_error(text):
    try:
        with bounded():
            build_workload(parse_workload(text))
    except UserError as err:
        assert_clear(err)


@pytest.mark.parametrize("value", ["-1", "0", "nan", "abc"])
def test_bench_refuses_a_duration_that_is_not_positive(value, capsys):
    from harness.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--backend", "instant", "--max-duration-s", value])
    assert exc.value.code == 2 and "--max-duration-s" in capsys.readouterr().err
