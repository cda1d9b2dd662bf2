"""The terminal tables of `run` (strategy comparison) and `bench` (sweep) label their columns from the metric
catalogue and read schema-2 summaries."""
from types import SimpleNamespace

from harness.commands.bench import sweep_table
from harness.commands.run import _comparison

FIGURES = {"request_throughput": 1.5, "output_throughput": 48.0, "median_ttft_ms": 120.0, "median_tpot_ms": 20.0,
           "p99_e2el_ms": 900.0, "p99_dispatch_delay_ms": 0.25}


def test_strategy_comparison_has_labelled_columns():
    done = SimpleNamespace(strategy="uniform", error=None, summary={"source": "simulated", "metrics": FIGURES})
    failed = SimpleNamespace(strategy="tp", error="does not fit", summary=None)
    text = _comparison([done, failed])
    assert "request throughput (req/s)" in text and "median TTFT (ms)" in text and "median_ttft_ms" not in text
    assert "120.00" in text and "does not fit" in text


def test_sweep_table_has_labelled_columns_and_tolerates_missing_figures():
    text = sweep_table([("concurrent=2", {"metrics": FIGURES}),
                        ("concurrent=4", {"metrics": {**FIGURES, "p99_dispatch_delay_ms": None}})])
    assert text.startswith("sweep (measured):") and "p99 dispatch lag (ms)" in text
    assert "0.250" in text and text.splitlines()[-1].rstrip().endswith("-")
