"""Model loading before serving: each node reads its shard from local SSD, or receives it from a peer that
has the weights when they are not local (peer sends share links FIFO, so several nodes fed by one peer wait
for each other)."""
from __future__ import annotations

import simpy

from harness import costmodel
from harness.costmodel import Profile
from harness.specs import Cluster, UserError
from sim.costs import StageModel


def load_nodes(env: simpy.Environment, cluster: Cluster, stages: tuple[StageModel, ...], profile: Profile,
               local: set[str] | None = None) -> tuple[dict[str, float], list[tuple]]:
    """Start one loading process per node; returns ({node: load end time}, step rows), filled as they run.

    `local`: nodes that hold the weights on their SSD (None = all of them).
    """
    done: dict[str, float] = {}
    rows: list[tuple] = []
    names = [n for st in stages for n in st.nodes]
    have = set(names) if local is None else set(local)
    if not have:
        raise UserError("no node holds the weights locally; name at least one in weights_local")
    links: dict[tuple, simpy.Resource] = {}
    for st in stages:
        for name in st.nodes:
            env.process(_load_one(env, cluster, profile, st, name, have, links, done, rows))
    return done, rows


def _load_one(env, cluster, profile, st: StageModel, name: str, have: set, links: dict, done: dict, rows: list):
    node = cluster.node(name)
    nbytes = st.weight_bytes_node
    begin = env.now
    if name in have:
        yield env.timeout(costmodel.load_time(nbytes, profile, node.ssd_gbs))
    else:
        src = min(have, key=lambda other: -cluster.link(other, name).bandwidth_gbps)  # fastest link to a holder
        link = cluster.link(src, name)
        res = links.setdefault((src, name), simpy.Resource(env, capacity=1))
        with res.request() as turn:
            yield turn
            # the peer streams from its SSD over the link: the slower of the two sets the pace
            read = costmodel.load_time(nbytes, profile, cluster.node(src).ssd_gbs)
            send = nbytes * 8 / (link.bandwidth_gbps * 1e9)
            yield env.timeout(max(read, send))
        yield env.timeout(costmodel.hop_latency_s(link, profile))
    done[name] = env.now
    rows.append((st.index, name, begin, env.now, int(nbytes)))
