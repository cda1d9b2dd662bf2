"""The catalog: Apple Silicon chips, link kinds, model presets and bundled clusters.

Chips come from apple_silicon_chips.csv (public specifications, with sources); link kinds from links.json;
models are HF/mlx-lm config.json files under models/. Cluster files are JSON in two shapes:

  simple (as in the original project summary):
    {"nodes": [{"name", "ip", "memory_gb", "gpu_cores", "role", "chip"?}], "backend": "ring",
     "network_interface": "...", "use_thunderbolt": true}
  rich:
    {"name": ..., "nodes": [{"name", "chip", "gpu_cores"?, "memory_gb", "usable_fraction"?, "ssd_gbs"?, "host"?,
                "cpu_core"?}],
    a node's "chip" may also be an object with mem_bw_gbs, fp16_tflops, max_mem_gb (a chip not in the catalog),
    or the node may name "host_profile": a `python -m harness profile-host` file (this machine, measured);
    "cpu_core" labels the core a rank is pinned to: ranks of one plan naming the same label time-share it;
     "links": [{"a", "b", "kind", "latency_us"?, "bandwidth_gbps"?}], "default_link": "tb4-tcp"}

Pairs without an explicit link get the default link kind (a full mesh, as a switch or Thunderbolt mesh gives).
Unknown keys at any level are errors naming the file, the key path and the nearest valid key; keys starting
with "_" (e.g. "_about") are notes.
"""
from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path

from harness.catalog.params import PARAMS_FORM, is_params_form, model_from_params
from harness.specs import (MAX_NODES, Chip, Cluster, Link, ModelSpec, Node, UserError, did_you_mean,
                           finite_positive, model_from_config, of_type, read_json, reject_unknown, shown)

HERE = Path(__file__).parent
REPO = HERE.parent.parent
CLUSTER_DIR = REPO / "runs" / "clusters"
MODEL_DIR = HERE / "models"

# M5-family rows give no TFLOPS (per-core matmul units, unpublished); estimate from the M4 40-core rate per core.
_TFLOPS_PER_CORE_FALLBACK = 16.16 / 40


@lru_cache(maxsize=1)
def chips() -> tuple[Chip, ...]:
    out = []
    with open(HERE / "apple_silicon_chips.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            cores = int(row["gpu_cores"])
            tflops = row["fp16_tflops"].strip()
            out.append(Chip(
                name=row["chip"], gpu_bin=row["gpu_bin"], gpu_cores=cores,
                mem_bw_gbs=float(row["mem_bw_gbs"]),
                fp16_tflops=float(tflops) if tflops else round(cores * _TFLOPS_PER_CORE_FALLBACK, 2),
                max_mem_gb=float(row["max_unified_mem_gb"]),
                thunderbolt=row["thunderbolt"], tflops_assumed=not tflops,
            ))
    return tuple(out)


def chip_names() -> list[str]:
    return sorted({c.name for c in chips()})


def find_chip(name: str, gpu_cores: int | None = None, memory_gb: float | None = None, where: str = "") -> Chip:
    """A chip by name, choosing the GPU bin by cores (or by memory where the bin caps it); errors list choices."""
    bins = [c for c in chips() if c.name.lower() == name.strip().lower()]
    if not bins:
        raise UserError(f"{where}unknown chip {name!r}; known chips: {', '.join(chip_names())}")
    if gpu_cores is not None:
        match = [c for c in bins if c.gpu_cores == gpu_cores]
        if not match:
            raise UserError(f"{where}{name} has no {gpu_cores}-core GPU bin; bins: "
                            f"{', '.join(str(c.gpu_cores) for c in bins)}")
        return match[0]
    if memory_gb is not None:  # some bins cap memory (M4 Max 32-core: 36 GB), which settles the bin
        bins = [c for c in bins if c.max_mem_gb >= memory_gb] or bins
    return max(bins, key=lambda c: c.gpu_cores)  # otherwise the full chip, the usual cluster build


def infer_chip(memory_gb: float, gpu_cores: int, where: str = "") -> Chip:
    """The chip for a node given only memory and GPU cores, when exactly one chip fits; else a clear error."""
    match = [c for c in chips() if c.gpu_cores == gpu_cores and c.max_mem_gb >= memory_gb]
    names = sorted({c.name for c in match})
    if len(names) == 1:
        return match[0]
    if not names:
        raise UserError(f"{where}no Apple Silicon chip has a {gpu_cores}-core GPU with {memory_gb:g} GB; "
                        f"add \"chip\": one of {', '.join(chip_names())}")
    raise UserError(f"{where}{gpu_cores} GPU cores with {memory_gb:g} GB is ambiguous ({', '.join(names)}); "
                    f"add \"chip\": \"{names[-1]}\" (or another) to the node")


@lru_cache(maxsize=1)
def link_kinds() -> dict[str, dict]:
    data = json.loads((HERE / "links.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def make_link(a: str, b: str, kind: str, where: str = "", latency_us=None, bandwidth_gbps=None) -> Link:
    kinds = link_kinds()
    if kind not in kinds:
        raise UserError(f"{where}unknown link kind {kind!r}; known kinds: {', '.join(kinds)}")
    base = kinds[kind]
    lat = base["latency_us"] if latency_us is None else finite_positive(latency_us, f"{where}latency_us")
    bw = base["bandwidth_gbps"] if bandwidth_gbps is None else finite_positive(bandwidth_gbps, f"{where}bandwidth_gbps")
    return Link(a, b, kind, float(lat), float(bw))


# ----------------------------------------------------------------------------------------------- models
def model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_DIR.glob("*.json"))


def load_model(name_or_path: str, quant_bits: int | float | str = 16, group_size: int = 64) -> ModelSpec:
    """A catalog preset by name, any HF/mlx-lm config.json (or a model folder holding one), or parameter
    counts (`params=235b,active=22b,layers=94`, harness.catalog.params). `quant_bits` is anything
    harness.specs.quant_value accepts: 4, 4.5, "mixed:4/6"."""
    path = Path(name_or_path)
    if is_params_form(name_or_path) and not path.exists():
        return model_from_params(name_or_path).with_quant(quant_bits, _group_size(group_size))
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        config = read_json(path, "model config")
        name = path.parent.name if path.name == "config.json" else path.stem
        origin = str(path)
    elif (MODEL_DIR / f"{name_or_path}.json").exists():
        config = json.loads((MODEL_DIR / f"{name_or_path}.json").read_text())
        name, origin = name_or_path, f"model preset {name_or_path}"
    else:
        raise UserError(f"unknown model {name_or_path!r}: give a config.json path, parameter counts "
                        f"({PARAMS_FORM}) or one of: {', '.join(model_names())}")
    return model_from_config(config, name, quant_bits, group_size, origin)


def _group_size(group_size: int) -> int:
    """The group-size check model_from_config makes, for models built from parameter counts."""
    if group_size not in (32, 64, 128):
        raise UserError(f"group size {group_size} is not supported; choose 32, 64 or 128")
    return group_size


# ----------------------------------------------------------------------------------------------- clusters
def cluster_names() -> list[str]:
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.json"))


def default_usable_fraction(memory_gb: float) -> float:
    """macOS lets the GPU wire about 2/3 of RAM up to 36 GB and 3/4 above (raise with iogpu.wired_limit_mb)."""
    return 0.667 if memory_gb <= 36 else 0.75


# Every key the parser reads, per level; anything else is a typo and an error (keys starting with "_" are notes).
CLUSTER_KEYS = ("name", "nodes", "links", "default_link",                          # rich shape
                "backend", "network_interface", "use_thunderbolt", "ethernet")      # simple shape
NODE_KEYS = ("name", "chip", "gpu_cores", "memory_gb", "usable_fraction", "ssd_gbs", "host", "host_profile",
             "ip", "role", "cpu_core")
LINK_KEYS = ("a", "b", "kind", "latency_us", "bandwidth_gbps")


def load_cluster(name_or_path: str) -> Cluster:
    """A cluster JSON file, or a bundled cluster by name."""
    path = Path(name_or_path)
    if not path.exists():
        path = _bundled_cluster(name_or_path)
    return parse_cluster(read_json(path, "cluster"), path.stem, str(path))


def _bundled_cluster(name: str) -> Path:
    """Something that looks like a path is a missing file; anything else must name a bundled cluster."""
    if name.endswith(".json") or "/" in name:
        raise UserError(f"cluster file not found: {name}")
    path = CLUSTER_DIR / f"{name}.json"
    if not path.exists():
        raise UserError(f"unknown cluster {name!r}{did_you_mean(name, cluster_names())} (bundled clusters: "
                        f"{', '.join(cluster_names())}); or give a cluster JSON file path")
    return path


def parse_cluster(data: dict, default_name: str = "cluster", origin: str = "cluster") -> Cluster:
    """Parse either cluster shape; the whole file is checked before anything is returned."""
    reject_unknown(data, CLUSTER_KEYS, origin)
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise UserError(f"{origin}: field 'nodes' must be a non-empty list of node objects")
    if len(raw_nodes) > MAX_NODES:   # links are a full mesh: n nodes make n(n-1)/2 of them
        raise UserError(f"{origin}: nodes: found {len(raw_nodes)} nodes; allowed: 1 to {MAX_NODES}")
    for key in ("name", "default_link", "ethernet", "backend", "network_interface"):
        if data.get(key) is not None:
            of_type(data[key], str, f"{origin}: {key}", "a string")
    if data.get("use_thunderbolt") is not None:
        of_type(data["use_thunderbolt"], bool, f"{origin}: use_thunderbolt", "true or false")
    nodes = tuple(_parse_node(n, i, origin) for i, n in enumerate(raw_nodes))
    names = [n.name for n in nodes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{origin}: node names must be unique; repeated: {', '.join(dupes)}")
    default_kind = data.get("default_link") or _default_link_kind(data, nodes)
    links = _parse_links(data.get("links", []), nodes, default_kind, origin)
    return Cluster(name=str(data.get("name", default_name)), nodes=nodes, links=links)


def _parse_node(raw, i: int, origin: str) -> Node:
    where = f"{origin}: nodes[{i}]"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected an object with name, memory_gb and chip or gpu_cores")
    reject_unknown(raw, NODE_KEYS, origin, f"nodes[{i}]")
    name = raw.get("name") or raw.get("ip") or f"node{i}"
    if not isinstance(name, str):
        raise UserError(f"{where}.name: expected a string, got {shown(name)}")
    for key in ("host", "ip", "role", "host_profile", "cpu_core"):
        if raw.get(key) is not None:
            of_type(raw[key], str, f"{where}.{key}", "a string")
    if raw.get("chip") is not None and not isinstance(raw["chip"], (str, dict)):
        raise UserError(f"{where}.chip: found {shown(raw['chip'])}; allowed: a chip name or an object")
    if "memory_gb" not in raw:
        raise UserError(f"{where}.memory_gb: missing; expected the node's RAM in GB, e.g. 64")
    memory = finite_positive(raw["memory_gb"], f"{where}.memory_gb")
    cores = raw.get("gpu_cores")
    if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores <= 0):
        raise UserError(f"{where}.gpu_cores: expected a positive integer, got {cores!r}")
    if isinstance(raw.get("chip"), dict) or raw.get("host_profile"):
        chip, measured_ssd = _custom_chip(raw, i, origin)
        raw = {"ssd_gbs": measured_ssd, **raw}
    elif raw.get("chip"):
        chip = find_chip(str(raw["chip"]), cores, memory, where=f"{where}.chip: ")
    elif cores is not None:
        chip = infer_chip(memory, cores, where=f"{where}: ")
    else:
        raise UserError(f"{where}: give \"chip\" (e.g. \"M2 Ultra\") or \"gpu_cores\" so the chip can be inferred")
    if memory > chip.max_mem_gb:
        raise UserError(f"{where}.memory_gb: {memory:g} GB is more than {chip.name} {chip.gpu_cores}-core "
                        f"supports ({chip.max_mem_gb:g} GB)")
    frac = raw.get("usable_fraction", default_usable_fraction(memory))
    frac = finite_positive(frac, f"{where}.usable_fraction")
    if frac > 1:
        raise UserError(f"{where}.usable_fraction: expected a share of RAM in (0, 1], got {frac}")
    ssd = raw.get("ssd_gbs")
    return Node(name=name, chip=chip, memory_gb=memory, usable_fraction=frac,
                ssd_gbs=None if ssd is None else finite_positive(ssd, f"{where}.ssd_gbs"),
                host=raw.get("host") or raw.get("ip"), role=raw.get("role"), cpu_core=raw.get("cpu_core"))


CHIP_FIELDS = ("mem_bw_gbs", "fp16_tflops", "max_mem_gb")
CHIP_KEYS = ("name", "gpu_bin", "gpu_cores", "thunderbolt", *CHIP_FIELDS, "ssd_gbs")


def _custom_chip(raw: dict, i: int, origin: str) -> tuple[Chip, float | None]:
    """A chip not in the catalog: inline ({"name", "mem_bw_gbs", "fp16_tflops", "max_mem_gb", ...}) or the
    "chip" of a `python -m harness profile-host` file (path relative to the cluster file), so this very
    machine can be simulated and its plan run on it."""
    where = f"{origin}: nodes[{i}]"
    if raw.get("host_profile"):
        path = Path(raw["host_profile"])
        if not path.is_absolute() and Path(origin).exists():
            path = Path(origin).parent / path
        data = read_json(path, "host profile").get("chip")
        where = f"{where}.host_profile {path}"
        if not isinstance(data, dict):
            raise UserError(f"{where}: no \"chip\" object; write one with `python -m harness profile-host --out FILE`")
        reject_unknown(data, CHIP_KEYS, f"host profile {path}", "chip")
    else:
        data, where = raw["chip"], f"{where}.chip"
        reject_unknown(data, CHIP_KEYS, origin, f"nodes[{i}].chip")
    values = {k: finite_positive(data.get(k), f"{where}.{k}") for k in CHIP_FIELDS}
    cores = data.get("gpu_cores", 0)
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 0:
        raise UserError(f"{where}.gpu_cores: expected an integer >= 0, got {cores!r}")
    chip = Chip(name=str(data.get("name", "custom")), gpu_bin=str(data.get("gpu_bin", "custom")), gpu_cores=cores,
                thunderbolt=str(data.get("thunderbolt", "none")), **values)
    ssd = data.get("ssd_gbs")
    return chip, (finite_positive(ssd, f"{where}.ssd_gbs") if ssd is not None else None)


def _default_link_kind(data: dict, nodes: tuple[Node, ...]) -> str:
    """Simple-shape files: Thunderbolt (TB5 when every chip has it, else TB4) when use_thunderbolt, else 1 GbE."""
    if data.get("use_thunderbolt"):
        return "tb5-tcp" if all(n.chip.rdma for n in nodes) else "tb4-tcp"
    return data.get("ethernet", "1gbe")


def _parse_links(raw_links, nodes, default_kind: str, origin: str) -> tuple[Link, ...]:
    if not isinstance(raw_links, list):
        raise UserError(f"{origin}: field 'links' must be a list of {{a, b, kind}} objects")
    names = {n.name for n in nodes}
    by_node = {n.name: n for n in nodes}
    explicit: dict[frozenset, Link] = {}
    for i, raw in enumerate(raw_links):
        where = f"{origin}: links[{i}]"
        if isinstance(raw, dict):
            reject_unknown(raw, LINK_KEYS, origin, f"links[{i}]")
        if not isinstance(raw, dict) or not {"a", "b", "kind"} <= raw.keys():
            raise UserError(f"{where}: expected an object with a, b and kind")
        a, b = raw["a"], raw["b"]
        for key in ("a", "b", "kind"):
            of_type(raw[key], str, f"{where}.{key}", "a string")
        for end in (a, b):
            if end not in names:
                raise UserError(f"{where}: node {end!r} is not in the cluster ({', '.join(sorted(names))})")
        if a == b:
            raise UserError(f"{where}: a link joins two different nodes, got {a!r} twice")
        if raw["kind"].endswith("rdma") and not (by_node[a].chip.rdma and by_node[b].chip.rdma):
            raise UserError(f"{where}: RDMA needs Thunderbolt 5 on both ends; {a} or {b} lacks it")
        explicit[frozenset((a, b))] = make_link(a, b, raw["kind"], f"{where}.", raw.get("latency_us"),
                                                raw.get("bandwidth_gbps"))
    if default_kind not in link_kinds():
        raise UserError(f"{origin}: default_link {default_kind!r} is unknown; known kinds: {', '.join(link_kinds())}")
    links = []
    ordered = [n.name for n in nodes]
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            links.append(explicit.get(frozenset((a, b))) or make_link(a, b, default_kind))
    return tuple(links)
