"""Benchmarks of the strategy search (hot path of `plan` and of `run --strategy all`).

Run with figures: .venv/bin/python -m pytest tests/test_bench_strategies.py --benchmark-enable
(in the normal test run each body runs once, as a test)."""
import pytest

from harness import catalog
from harness.costmodel import load_profile
from harness.costmodel import PlanOptions
from strategies.registry import get_strategy

CASES = [("mixed", "llama-3.1-70b"), ("m4pro-8x-mini", "llama-3.1-405b"), ("m2ultra-4x-tb4", "deepseek-v3")]


@pytest.mark.parametrize("cluster, model", CASES)
def test_bench_hybrid_optimal(benchmark, cluster, model):
    c, m = catalog.load_cluster(cluster), catalog.load_model(model, 4)
    options = PlanOptions(load_profile())
    plan = benchmark(get_strategy("hybrid_optimal"), c, m, options)
    assert plan.problems() == []
