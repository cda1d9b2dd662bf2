"""What-ifs on a cluster before anyone buys or cables anything: every link of one kind (`--link KIND`), or
one more Mac (`--add-node CHIP[/CORES]:MEM`). Pure functions from a Cluster to a Cluster.

A link kind a pair cannot carry is downgraded, and the downgrade is noted, rather than refused: Thunderbolt 5
RDMA needs TB5 on both ends, and a TB5 cable between a TB5 and a TB4 Mac runs at TB4, so asking "what if every
link were tb5-rdma" of a cluster with an M2 Max gives RDMA where both ends have TB5 and tb4-tcp to the M2 Max.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

from harness import catalog
from harness.specs import Chip, Cluster, Link, Node, UserError

NODE_SPEC = re.compile(r"^\s*(?P<chip>[^/:]+?)\s*(?:/\s*(?P<cores>\d+))?\s*:\s*(?P<mem>\d+(?:\.\d+)?)\s*$")
NODE_SPEC_HELP = "CHIP[/GPU_CORES]:MEMORY_GB, e.g. 'M4 Max:128' or 'M3 Ultra/80:256'"
MAX_ADDED_NODES = 64


def parse_node_spec(text: str, where: str = "--add-node") -> Node:
    """A catalog Mac from 'M4 Max:128' (the full GPU bin unless /CORES names another); name set by add_nodes."""
    match = NODE_SPEC.match(str(text))
    if not match:
        raise UserError(f"{where}: {text!r} is not {NODE_SPEC_HELP}")
    memory = float(match["mem"])
    cores = int(match["cores"]) if match["cores"] else None
    if memory <= 0:
        raise UserError(f"{where}: {text!r}: memory must be more than 0 GB")
    chip = catalog.find_chip(match["chip"], cores, memory, where=f"{where}: {text!r}: ")
    if memory > chip.max_mem_gb:
        raise UserError(f"{where}: {text!r}: {chip.name} {chip.gpu_cores}-core takes at most {chip.max_mem_gb:g} GB")
    return Node(name="", chip=chip, memory_gb=memory, usable_fraction=catalog.default_usable_fraction(memory))


def fitting_kind(kind: str, a: Chip, b: Chip) -> str:
    """The link kind a pair of Macs can actually carry when `kind` is asked for."""
    needs_tb5 = kind in ("tb5-rdma", "tb5-tcp")
    return "tb4-tcp" if needs_tb5 and not (a.rdma and b.rdma) else kind   # chip.rdma: has Thunderbolt 5


def usual_kind(cluster: Cluster) -> str:
    """The link kind most of the cluster's pairs use (a new Mac is cabled like the others; a tie goes to the
    faster kind, the earlier in the catalog); TB4 for a one-node cluster."""
    kinds = Counter(link.kind for link in cluster.links)
    order = list(catalog.link_kinds())
    return min(kinds, key=lambda k: (-kinds[k], order.index(k))) if kinds else "tb4-tcp"


def add_nodes(cluster: Cluster, specs, kind: str | None = None) -> Cluster:
    """The cluster with one more Mac per spec, joined to every node by `kind` (default: the usual kind)."""
    specs = list(specs or ())
    if len(specs) > MAX_ADDED_NODES:
        raise UserError(f"--add-node: {len(specs)} nodes given; allowed: at most {MAX_ADDED_NODES}")
    kind = kind or usual_kind(cluster)
    nodes, links = list(cluster.nodes), list(cluster.links)
    for i, spec in enumerate(specs, 1):
        node = parse_node_spec(spec)
        node = replace(node, name=_added_name(node, i, {n.name for n in nodes}))
        links += [_link(other, node, kind) for other in nodes]
        nodes.append(node)
    label = "+".join(str(s).replace(" ", "") for s in specs)
    return Cluster(name=f"{cluster.name}+{label}" if specs else cluster.name, nodes=tuple(nodes), links=tuple(links))


def _added_name(node: Node, i: int, taken: set[str]) -> str:
    base = f"added{i}-{node.chip.name.lower().replace(' ', '')}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def _link(a: Node, b: Node, kind: str) -> Link:
    return catalog.make_link(a.name, b.name, fitting_kind(kind, a.chip, b.chip))


def with_link(cluster: Cluster, kind: str) -> tuple[Cluster, list[str]]:
    """Every pair joined by `kind` (where the pair can carry it), and notes naming the downgraded pairs."""
    if kind not in catalog.link_kinds():
        raise UserError(f"--link: unknown link kind {kind!r}; known kinds: {', '.join(catalog.link_kinds())}")
    links = tuple(_link(cluster.node(l.a), cluster.node(l.b), kind) for l in cluster.links)
    downgraded = [f"{l.a}-{l.b}" for l in links if l.kind != kind]
    notes = [f"--link {kind}: {len(downgraded)} pair(s) cannot carry it (Thunderbolt 5 needed on both ends) and "
             f"use tb4-tcp: {', '.join(downgraded)}"] if downgraded else []
    return Cluster(name=f"{cluster.name}@{kind}", nodes=cluster.nodes, links=links), notes


def apply(cluster: Cluster, link: str | None = None, added=()) -> tuple[Cluster, list[str]]:
    """Added nodes first (cabled like the cluster, or by `link`), then every link set to `link`."""
    cluster = add_nodes(cluster, added, link)
    return with_link(cluster, link) if link else (cluster, [])
