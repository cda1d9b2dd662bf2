"""Backends: the one `Backend` protocol (`base`) and its adapters, the SimPy cluster paced in real time
(`sim`), real MLX ranks (`mlx`) and a zero-cost one that measures the server itself (`instant`).

`BACKEND_NAMES` is the one list of backend names every command offers, and `make_backend` holds the one
`match` over them. Adding a backend: its module, a name here and a case in `make_backend`.
Imports stay inside the cases so that `python -m harness --help` loads neither simpy nor mlx.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from harness.specs import UserError

if TYPE_CHECKING:
    from harness.backends.base import Backend
    from harness.costmodel import Profile
    from harness.specs import Cluster, ModelSpec, PartitionPlan

BACKEND_NAMES = ("sim", "mlx", "instant")


@dataclass(frozen=True)
class Planned:
    """A partition plan with what it was made from: the sim backend runs it, the mlx backend builds the model's
    local twin from it."""
    cluster: Cluster
    model: ModelSpec
    plan: PartitionPlan
    profile: Profile
    model_source: str                  # the preset name or config.json the model was read from


@dataclass(frozen=True)
class BackendOptions:
    """Everything any backend may be built with; each backend reads its own fields and ignores the rest."""
    # Called only by a backend that needs the plan, so `serve --backend instant` never plans anything.
    planned: Callable[[], Planned] | None = None
    model_id: str | None = None        # default: the model's name (sim), the model folder's or twin's (mlx)
    # sim
    speed: float = 1.0                 # virtual seconds per wall second
    max_waiting: int | None = None     # QueueFull beyond this many requests waiting
    cache: str = "none"                # prefix-cache policy (sim, and mlx when it runs a plan's twin)
    cache_l4_gb: float = 0.0           # an L4 tier of this size (network storage), for a policy with tiers
    faults: tuple = ()                 # injected faults (sim only): sim.Engine.inject dicts
    # failover (sim, and mlx running a plan's twin): given the failed nodes, the plan on the nodes left
    # (DoesNotFit when none holds it)
    replan: Callable[[frozenset], Planned] | None = None
    # mlx: a model folder with an optional layer split, else a twin of the planned model built locally
    model_path: str | None = None
    split: tuple[int, ...] | None = None
    max_running: int = 16              # largest decode batch
    twin_head_dim: int = 16
    twin_seed: int = 0
    emulate_links: bool = False        # each rank in its own network namespace, shaped like the plan's links
    emulate_latency: bool = False
    hostfile: str | None = None        # mlx.launch hosts.json: ranks start on those hosts over ssh
    # instant
    token_interval_s: float = 0.0


def make_backend(name: str, options: BackendOptions = BackendOptions()) -> Backend:
    """The backend called `name` (one of BACKEND_NAMES), built from `options`, not loaded yet."""
    match name:
        case "sim":
            return _sim_backend(options)
        case "mlx":
            return _mlx_backend(options)
        case "instant":
            from harness.backends.instant import InstantBackend
            return InstantBackend(token_interval_s=options.token_interval_s)
    raise UserError(f"unknown backend {name!r}; known: {', '.join(BACKEND_NAMES)}")


def _planned(options: BackendOptions, backend: str) -> Planned:
    if options.planned is None:
        raise UserError(f"the {backend} backend needs a partition plan (cluster, model and strategy)")
    return options.planned()


def prefix_cache(options: BackendOptions, p: Planned):
    """The plan's prefix cache, sized and keyed the same for every backend (None for policy "none")."""
    from sim.prefix_cache import make_prefix_cache
    return make_prefix_cache(options.cache, p.cluster, p.model, p.plan, p.profile, l4_gb=options.cache_l4_gb)


def _sim_backend(options: BackendOptions):
    from harness.backends.sim import SimBackend, SimBackendConfig
    if not options.speed > 0:
        raise UserError(f"speed must be > 0, got {options.speed}")
    p = _planned(options, "sim")
    cache = prefix_cache(options, p)
    from sim.engine import Engine
    Engine.check_fault_nodes(options.faults, p.cluster)
    replan = None
    if options.replan is not None:
        def replan(failed: frozenset):   # the new plan, and a fresh cache sized for it (the old KV died)
            q = options.replan(failed)
            return q.cluster, q.plan, prefix_cache(options, q)
    config = SimBackendConfig(speed=options.speed, max_waiting=options.max_waiting,
                              model_id=options.model_id or p.model.name, faults=tuple(options.faults),
                              replan=replan)
    return SimBackend(p.cluster, p.model, p.plan, p.profile, config=config, cache=cache)


def _mlx_backend(options: BackendOptions):
    from harness.backends.mlx import MlxBackend
    if options.faults:
        raise UserError("[[faults]] are injected into the simulator: run them with backend = \"sim\" (on real "
                        "ranks, stop or kill a rank process instead)")
    if options.model_path is None:
        if options.split:
            raise UserError("a layer split needs a model folder (--model-path); a twin runs the plan's split")
        return _mlx_twin_backend(options)
    if options.replan is not None:
        raise UserError("failover on the mlx backend re-plans the model on the nodes left: it needs a plan "
                        "(cluster, model, strategy); drop --model-path to run the plan's twin")
    if options.cache != "none":
        raise UserError(f"--cache {options.cache} on the mlx backend needs a plan (cluster, model, strategy) to size "
                        "the cache as the simulator does; drop --model-path to run the plan's twin, or use --cache none")
    split = list(options.split) if options.split else None
    return MlxBackend(options.model_path, split, model_id=options.model_id, max_running=options.max_running,
                      hosts=_hosts(options))


def _hosts(options: BackendOptions):
    """The hostfile's hosts (harness.mlx.hosts), or None to start every rank on this machine."""
    if options.hostfile is None:
        return None
    if options.emulate_links:
        raise UserError("emulate_links shapes links between ranks on this machine; with a hostfile the hosts' own "
                        "links are used: drop one of the two")
    from harness.mlx.hosts import read_hostfile
    return read_hostfile(options.hostfile)


def _mlx_twin_backend(options: BackendOptions):
    """Real MLX ranks on this machine running the plan's split on a locally built scaled twin of the model:
    same layers and head layout, smaller width (harness.mlx.modelbuild), so the plan applies unchanged."""
    from harness.backends.mlx import MlxBackend, links_for_plan, rank_layout
    from harness.mlx.modelbuild import build, twin_config
    from sim.costs import kv_pool_tokens, stage_models
    from sim.engine import EngineConfig
    p = _planned(options, "mlx")
    _hosts(options)   # a bad hostfile fails before the twin is built
    _check_l4_dir(options)
    config = twin_config(p.model_source, head_dim=options.twin_head_dim)
    rank_layout(p.plan, config)   # a plan the ranks cannot run fails now, not after a long build
    twin = build(config, seed=options.twin_seed)
    links = links_for_plan(p.plan, p.cluster) if options.emulate_links else None
    # the policy sized and keyed exactly as the sim backend's, so both make the same hit/miss decisions
    cache = prefix_cache(options, p)
    # the KV budget the simulator's engine gets for this plan (less the cache's L1 share), in its blocks
    kv_tokens = cache.engine_kv_tokens if cache else kv_pool_tokens(p.cluster, stage_models(p.cluster, p.model, p.plan))
    return MlxBackend(twin.path, p.plan, model_id=options.model_id or f"{p.model_source}-twin",
                      max_running=options.max_running, links=links,
                      emulate_latency=options.emulate_latency and links is not None, cache=cache,
                      kv_budget_tokens=kv_tokens, kv_block_tokens=EngineConfig().kv_block_tokens,
                      hosts=_hosts(options), replan=_mlx_replan(options, config, links is not None))


def _check_l4_dir(options: BackendOptions) -> None:
    """Ranks started here spill L4 into HARNESS_L4_DIR: a wrong one fails now, not at the first spill (a remote
    host's own value is checked by its rank)."""
    import os
    l4_dir = os.environ.get("HARNESS_L4_DIR")
    if options.cache_l4_gb and l4_dir and not os.path.isdir(l4_dir):
        raise UserError(f"HARNESS_L4_DIR={l4_dir}: not a folder (mount the shared storage there, or unset it)")


def _mlx_replan(options: BackendOptions, config: dict, shaped: bool):
    """failed nodes -> what MlxBackend restarts on: the plan on the nodes left (the same twin runs it: it has
    every layer), its links, a fresh cache and KV budget sized for it, as the sim backend's failover makes them."""
    if options.replan is None:
        return None
    from harness.backends.mlx import links_for_plan, rank_layout
    from sim.costs import kv_pool_tokens, stage_models

    def replan(failed: frozenset) -> dict:
        q = options.replan(failed)
        rank_layout(q.plan, config)
        cache = prefix_cache(options, q)
        kv = cache.engine_kv_tokens if cache else kv_pool_tokens(q.cluster, stage_models(q.cluster, q.model, q.plan))
        return {"plan": q.plan, "links": links_for_plan(q.plan, q.cluster) if shaped else None, "cache": cache,
                "kv_budget_tokens": kv}
    return replan
