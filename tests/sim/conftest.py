"""Small clusters and plans built from the real specs, so engine tests can check numbers by hand."""
from __future__ import annotations

import pytest

from harness.catalog import find_chip, load_model
from harness.costmodel import Profile
from harness.specs import Cluster, Link, Node, PartitionPlan, Stage


def make_profile(**over) -> Profile:
    base = dict(name="test", eta_bw=0.5, mu_compute=0.5, step_overhead_s=0.002, layer_overhead_s=0.0,
                link_overhead_us=20.0,
                ssd_gbs=4.0)
    return Profile(**(base | over))


def make_cluster(n: int, chip: str = "M2 Ultra", memory_gb: float = 192, latency_us: float = 150,
                 bandwidth_gbps: float = 16.0, ssd_gbs: float | None = None) -> Cluster:
    c = find_chip(chip)
    nodes = tuple(Node(f"n{i}", c, memory_gb, 0.75, ssd_gbs=ssd_gbs) for i in range(n))
    links = tuple(Link(a.name, b.name, "tb4-tcp", latency_us, bandwidth_gbps)
                  for i, a in enumerate(nodes) for b in nodes[i + 1:])
    return Cluster("test", nodes, links)


def make_plan(model, groups: list[tuple[str, ...]], splits: list[int]) -> PartitionPlan:
    """Stages in layer order: groups[i] runs splits[i] layers (a group of k nodes is tensor parallel)."""
    stages, start = [], 0
    for g, n in zip(groups, splits):
        stages.append(Stage(nodes=tuple(g), layer_start=start, layer_end=start + n, tp_degree=len(g)))
        start += n
    return PartitionPlan(strategy="test", objective="latency", cluster="test", model=model.name,
                         quant_bits=model.quant_bits, num_layers=model.num_layers, stages=tuple(stages))


def feed_and_probe(env, engine, wl, every: float, sample) -> None:
    """Processes that submit the workload's requests at their arrival times and call sample() every `every`
    simulated seconds (an outside reader of the engine), created in that order."""
    def feed():
        for i in range(len(wl)):
            yield env.timeout(max(wl.arrival_s[i] - env.now, 0))
            engine.submit(int(wl.prompt_tokens[i]), int(wl.output_tokens[i]))

    def probe():
        while True:
            yield env.timeout(every)
            sample()

    env.process(feed())
    env.process(probe())


@pytest.fixture(scope="session")
def llama7b():
    return load_model("llama-2-7b", 4)


@pytest.fixture(scope="session")
def llama70b():
    return load_model("llama-3.1-70b", 4)


@pytest.fixture
def profile():
    return make_profile()
