"""Targets are described from the experiment (model, nodes, prompt lengths), a target that does not apply is
n/a with its reason, and a target that could never be checked is refused when the experiment is read (issue 9)."""
import json
from pathlib import Path

import jsonschema
import pytest

from harness import summary as summary_schema
from harness.cli import main
from reports import load_run
from reports.html import targets_view
from reports.run import Run
from reports.targets import evaluate
from report_runs import write_run


def only_folder(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def valid_summary(folder: Path) -> dict:
    body = json.loads((folder / "summary.json").read_text())
    jsonschema.validate(body, summary_schema.schema(), cls=jsonschema.Draft202012Validator)
    return body


def by_metric(targets: list[dict]) -> dict[str, dict]:
    return {t["metric"]: t for t in targets}


def simulate_8b(out: Path, *extra: str) -> dict:
    assert main(["simulate", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--strategy", "uniform",
                 "--workload", "poisson,rate=2,n=4,prompt=512,output=8", "--seed", "1", "--quiet",
                 "--out", str(out), "--run-id", "s", *extra]) == 0
    return valid_summary(out / "s")


def test_an_8b_run_is_described_as_8b_with_its_prompt_length(tmp_path):
    targets = by_metric(simulate_8b(tmp_path)["targets"])
    assert targets["load_time_s"]["note"].startswith("Llama 3.1 8B (4-bit) loaded on 4 nodes of m2ultra-4x-tb4")
    assert "512-token prompts" in targets["median_ttft_ms"]["note"]
    assert "of every node of m2ultra-4x-tb4; the plan uses 4 of them" in targets["cluster_memory_used_pct"]["note"]
    assert not any("70B model loaded" in t["note"] for t in targets.values())
    # the design's 70B figures are applied to the 8B model, and the note says so
    for metric in ("load_time_s", "decode_tokens_per_s"):
        assert "for a 70B model; applied unchanged to this 8B model" in targets[metric]["note"]
    assert "70B" not in targets["median_ttft_ms"]["note"]


def test_a_70b_run_carries_no_caveat_and_the_report_shows_the_note(run_dir):
    view = targets_view(load_run(run_dir))        # the fixture's plan: Llama 3.1 70B over 4 nodes
    load = next(row for row in view.rows if row.metric == "model load time")   # the catalogue label
    assert "Llama 3.1 70B (4-bit) loaded on 4 nodes of test-cluster" in load.notes
    assert "applied unchanged" not in load.notes


def test_a_note_of_the_experiment_wins_over_the_generated_one(tmp_path):
    targets = [{"metric": "median_ttft_ms", "op": "<", "value": 100, "note": "the chat prompts"}]
    (result,) = evaluate(load_run(write_run(tmp_path, "own-note", targets=targets)))
    assert result.note == "the chat prompts"


def test_a_conversation_workload_is_described_by_its_system_prompt_and_turns(tmp_path):
    run = Run(path=tmp_path, config={"workload": {"kind": "conversations", "system_prompt_tokens": 1000,
                                                  "user": {"dist": "fixed", "value": 100}},
                                     "targets": [{"metric": "p99_ttft_ms", "value": 500}]})
    assert "1000-token system prompt and 100-token turns" in evaluate(run)[0].note


def test_run_on_the_instant_backend_marks_load_and_memory_not_applicable(tmp_path, capsys):
    rc = main(["run", "--experiment", "runs/default.toml", "--model", "llama-3.1-8b", "--backend", "instant",
               "--requests", "3", "--rate", "50", "--out", str(tmp_path), "--no-report"])
    assert rc == 0
    folder = only_folder(tmp_path)
    targets = by_metric(valid_summary(folder)["targets"])
    assert targets["load_time_s"]["status"] == "n/a" and targets["load_time_s"]["observed"] is None
    assert targets["load_time_s"]["reason"] == "the instant backend loads no model"
    assert targets["cluster_memory_used_pct"]["status"] == "n/a"       # the plan.json is one instant never served
    assert targets["median_ttft_ms"]["status"] == "pass"
    assert "target Model load < 60 s: n/a (the instant backend loads no model)" in capsys.readouterr().out
    view = targets_view(load_run(folder))
    assert view.rows[0].status == "n/a (the instant backend loads no model)" and view.rows[0].status_class == "na"
    assert view.verdict == "2 of 4 targets pass, 0 fail, 2 not applicable."


def test_a_run_without_simulated_loading_marks_load_not_applicable(tmp_path):
    load = by_metric(simulate_8b(tmp_path, "--no-load")["targets"])["load_time_s"]
    assert (load["status"], load["reason"]) == ("n/a", "model loading not simulated (--no-load)")


def test_memory_on_an_outside_server_is_not_applicable(tmp_path):
    run = Run(path=tmp_path, config={"command": "bench", "target": "http://127.0.0.1:9/v1", "args": {"backend": "sim"}},
              metrics={"median_ttft_ms": 40.0})
    results = {r.target.metric: r for r in evaluate(run)}
    assert results["cluster_memory_used_pct"].status == "n/a"
    assert "outside server" in results["load_time_s"].not_applicable
    assert results["median_ttft_ms"].status == "pass"


def test_the_schema_refuses_an_unknown_status_and_a_reasonless_n_a(tmp_path):
    body = simulate_8b(tmp_path)
    for bad in ({"status": "maybe"}, {"status": "n/a", "reason": None}):
        broken = dict(body, targets=[dict(body["targets"][0], **bad)])
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, summary_schema.schema(), cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("field, line, message", [
    ("op", 'op = "=~"', "[[targets]][1] op: found '=~'; allowed: <, <=, >, >="),
    ("value", 'value = "fast"', "[[targets]][1] value: found 'fast'; allowed: a finite number"),
    ("metric", 'metric = "median_ttft"', "[[targets]][1] metric: found 'median_ttft', did you mean"),
])
def test_a_target_that_cannot_be_checked_is_refused_before_the_run(tmp_path, capsys, field, line, message):
    fields = {"metric": 'metric = "median_ttft_ms"', "op": 'op = "<"', "value": "value = 100"} | {field: line}
    experiment = tmp_path / "bad.toml"
    experiment.write_text('[[targets]]\nmetric = "load_time_s"\nvalue = 60\n\n[[targets]]\n'
                          + "\n".join(fields.values()) + "\n")
    out = tmp_path / "out"
    assert main(["run", "--experiment", str(experiment), "--out", str(out), "--no-report"]) == 2
    error = capsys.readouterr().err
    assert f"experiment file {experiment}: {message}" in error
    assert not out.exists()                       # refused when the file was read: nothing ran
