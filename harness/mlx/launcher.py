"""Start N ranks of MLX's ring backend as local processes, without `mlx.launch`.

Why not `mlx.launch`: for local ring jobs its I/O threads busy-loop (about 1.3 cores), which halves
throughput on a small machine. What it does for 127.0.0.1 is simple: write the ring hostfile (a JSON
list with one list of "ip:port" strings per rank), then start each rank with MLX_RANK and
MLX_HOSTFILE. This module does that, and also:

- pins rank r to core r % ncpu (the worker applies it before importing mlx, so MLX's threads inherit
  it) and sets the BLAS to one thread per rank (all cores when there is one rank);
- preloads an optimised BLAS when one is installed (see `harness.mlx.blas`);
- optionally puts each rank in its own Linux network namespace, joined by a bridge, with `tc tbf`
  rate limits on both directions of each rank's link. This kernel has no netem (nor fq/etf), so
  latency is only applied on request (`emulate_latency`), by userspace delay relays (`harness.mlx.relay`)
  that cap throughput at a few Gbit/s; otherwise a link's latency_us is recorded but not applied;
- always cleans up: rank processes exit when their parent does (the worker watches its parent pid;
  PR_SET_PDEATHSIG would fire when the spawning *thread* exits, e.g. an executor thread), and namespaces, veths
  and the bridge are removed on close, at interpreter exit, and on SIGTERM.

Real Macs: `hosts` (from an mlx.launch hostfile, `harness.mlx.hosts`) starts each rank over ssh on its
host, as mlx.launch does for every host but 127.0.0.1: the same worker, its command pipes carried by the
ssh session, the ring hostfile written to a temporary file there, the ring on each host's `ips[0]` at
`starting_port` + rank. Each Mac needs the repository, the venv and the model folder at the same path (or
the host's `cwd`/`python`), and passwordless ssh. JACCL (RDMA over Thunderbolt 5) is not started from here.
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.mlx import blas
from harness.mlx.hosts import Host, ibv_devices, remote_script
from harness.mlx.hops import hops_env
from harness.mlx.errors import UserError

_LIVE: "set[RankGroup]" = set()
_NS_SEQ = itertools.count()
_LOCK = threading.Lock()
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class LinkShape:
    """Rate limit applied to one rank's link (both directions). latency_us is recorded, not applied."""
    bandwidth_gbps: float
    latency_us: float = 0.0


@dataclass
class RankProcess:
    rank: int
    proc: subprocess.Popen
    log_path: Path
    netns: str | None = None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel just handed out; held together so they are distinct."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ring_hostfile(addresses: list[str], ports: list[int]) -> list[list[str]]:
    return [[f"{a}:{p}"] for a, p in zip(addresses, ports)]


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Netns:
    """Per-rank namespaces on a private bridge, with tbf rate limits. Needs root and iproute2."""

    SUBNET = "10.213.{tag}.{host}"

    def __init__(self, n: int, shapes: list[LinkShape | None]):
        if os.geteuid() != 0:
            raise UserError("network namespaces need root; run as root or drop the link emulation option")
        # unique per group in this process and short: Linux interface names are at most 15 characters
        self.tag = (os.getpid() % 1000) * 100 + next(_NS_SEQ) % 100
        self.n = n
        self.shapes = shapes
        self.names = [f"hx{self.tag}r{r}" for r in range(n)]
        self.bridge = f"hx{self.tag}b"
        self.addresses = [self.SUBNET.format(tag=self.tag % 250, host=r + 2) for r in range(n)]
        self.created: list[tuple[str, str]] = []   # ("netns"|"link", name), removed in reverse

    def setup(self) -> None:
        _install_sigterm()
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self.created.append(("link", self.bridge))
        _run(["ip", "link", "set", self.bridge, "up"])
        for r, ns in enumerate(self.names):
            host_if, ns_if = f"hx{self.tag}h{r}", f"hx{self.tag}n{r}"
            _run(["ip", "netns", "add", ns])
            self.created.append(("netns", ns))
            _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if])
            self.created.append(("link", host_if))
            _run(["ip", "link", "set", ns_if, "netns", ns])
            _run(["ip", "link", "set", host_if, "master", self.bridge, "up"])
            exec_ns = ["ip", "netns", "exec", ns]
            _run(exec_ns + ["ip", "addr", "add", f"{self.addresses[r]}/24", "dev", ns_if])
            _run(exec_ns + ["ip", "link", "set", ns_if, "up"])
            _run(exec_ns + ["ip", "link", "set", "lo", "up"])
            shape = self.shapes[r] if r < len(self.shapes) else None
            if shape is not None:
                self._shape(["tc"], host_if, shape)            # traffic into the rank
                self._shape(exec_ns + ["tc"], ns_if, shape)    # traffic out of the rank

    @staticmethod
    def _shape(tc: list[str], dev: str, shape: LinkShape) -> None:
        rate_bit = int(shape.bandwidth_gbps * 1e9)
        # burst must hold at least one timer tick of traffic at this rate, or tbf under-delivers
        burst = max(64 * 1024, rate_bit // 8 // 250)
        _run(tc + ["qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_bit}bit",
                   "burst", str(burst), "latency", "100ms"])

    def wrap(self, rank: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[rank]] + argv

    def teardown(self) -> None:
        while self.created:
            kind, name = self.created.pop()
            if kind == "netns":
                _run(["ip", "netns", "del", name], check=False)
            else:
                _run(["ip", "link", "del", name], check=False)


@dataclass
class RankGroup:
    """N running rank processes. Close it (or use `with`) to stop them and remove namespaces."""
    ranks: list[RankProcess]
    workdir: Path
    hostfile: list[list[str]] | None
    netns: Netns | None = None
    blas_path: str | None = None
    closed: bool = field(default=False)
    helpers: list = field(default_factory=list)   # relay processes, stopped after the ranks
    own_workdir: bool = False     # a temporary folder launch() made: removed on close unless a rank failed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __hash__(self):
        return id(self)

    def dead(self) -> list[tuple[int, int]]:
        """(rank, exit code) of every rank process that has exited."""
        return [(r.rank, r.proc.returncode) for r in self.ranks if r.proc.poll() is not None]

    def close(self, grace_s: float = 2.0) -> None:
        if self.closed:
            return
        self.closed = True
        failed = any(r.proc.poll() not in (None, 0) for r in self.ranks)   # exited on its own, before stop
        for r in self.ranks:
            if r.proc.poll() is None and r.proc.stdin and not r.proc.stdin.closed:
                try:
                    r.proc.stdin.write(b'{"op": "stop"}\n')
                    r.proc.stdin.flush()
                except (BrokenPipeError, OSError, ValueError):
                    pass
        deadline = time.monotonic() + grace_s
        for r in self.ranks:
            try:
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
            for stream in (r.proc.stdin, r.proc.stdout):
                try:
                    if stream:
                        stream.close()
                except OSError:
                    pass
        for h in self.helpers:
            if h.poll() is None:
                h.kill()
            h.wait()
            if h.stdout:
                h.stdout.close()
        if self.netns:
            self.netns.teardown()
        with _LOCK:
            _LIVE.discard(self)
        if self.own_workdir and not failed:   # a failed rank's log stays for whoever reads the error
            shutil.rmtree(self.workdir, ignore_errors=True)


def worker_argv(model: str, split: list[int], extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "harness.mlx.worker", "--model", str(model),
            "--split", ",".join(str(s) for s in split), *extra]


def launch(model: str | Path, split: list[int], *, links: list[LinkShape | None] | None = None,
           use_blas: bool | str = True, pin: bool = True, worker_args: list[str] = (),
           workdir: Path | None = None, command: list[str] | None = None,
           emulate_latency: bool = False, stage_tp: list[int] | None = None,
           hosts: list[Host] | None = None, starting_port: int = 5000) -> RankGroup:
    """Start the ranks of `split` (layer counts per stage) and `stage_tp` (TP degree per stage, default all 1):
    one rank per stage for a pipeline (one process when len(split) == 1), K ranks on one ring for a single
    TP stage, or, for pipelined TP stages, one ring per TP stage and TCP hops between stages
    (`harness.mlx.hops`; ranks numbered in layer order). Returns once they are spawned;
    the caller reads each rank's "ready" line. `links` (one per rank) puts ranks in namespaces;
    with `emulate_latency`, ring traffic also goes through delay relays (`harness.mlx.relay`) that add
    each link's latency_us one way. `command` replaces the worker's argv (e.g. a ring micro-benchmark).
    `hosts` (one per rank, rank order) starts each rank on its host, over ssh unless it is 127.0.0.1."""
    stage_tp = list(stage_tp or [1] * len(split))
    if len(stage_tp) != len(split) or min(stage_tp) < 1:
        raise UserError(f"stage_tp {stage_tp} must give a TP degree >= 1 for each of the {len(split)} stages")
    hybrid = len(split) > 1 and max(stage_tp) > 1
    n = sum(stage_tp) if max(stage_tp) > 1 else len(split)
    if max(stage_tp) > 1 and not hybrid:
        worker_args = [*worker_args, "--tp", str(stage_tp[0])]
    own_workdir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="harness-ranks-"))
    workdir.mkdir(parents=True, exist_ok=True)
    blas_path = blas.find_openblas() if use_blas is True else (use_blas or None)
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = host_cores()
    if hosts is not None and (len(hosts) != n or links is not None):
        raise UserError(f"{len(hosts)} hosts for {n} ranks" if len(hosts) != n else
                        "link emulation puts ranks in namespaces on this machine; with a hostfile the hosts' "
                        "own links are used: drop one of the two")
    netns = Netns(n, links) if links is not None and n > 1 else None
    group = RankGroup([], workdir, None, netns, blas_path, own_workdir=own_workdir)
    with _LOCK:
        _LIVE.add(group)
    try:
        wiring = [(None, r, {}) for r in range(n)]      # (ring hostfile, rank on that ring, extra env)
        if n > 1:
            if netns:
                netns.setup()
                addresses, ports = netns.addresses, [5000 + r for r in range(2 * n)]
            elif hosts is not None:   # another host's free ports cannot be asked for: mlx.launch's fixed ones
                addresses, ports = [h.address for h in hosts], [starting_port + r for r in range(2 * n)]
            else:
                addresses, ports = ["127.0.0.1"] * n, free_ports(2 * n)
            if hosts is not None and hosts[0].backend != "ring":
                if hybrid:
                    raise UserError(f"backend {hosts[0].backend!r}: pipelined TP stages run one ring per stage "
                                    "with TCP hops between them; use backend \"ring\" for this plan")
                wiring = _jaccl_wiring(workdir, hosts, starting_port)
            elif hybrid:
                if emulate_latency:
                    raise UserError("latency emulation covers ring links only; run pipelined TP stages without it")
                wiring = _hybrid_wiring(workdir, stage_tp, addresses, ports[:n], ports[n:])
            else:
                group.hostfile = ring_hostfile(addresses, ports[:n])
                hostfile_path = workdir / "hostfile.json"
                hostfile_path.write_text(json.dumps(group.hostfile))
                wiring = [(hostfile_path, r, {}) for r in range(n)]
        if n > 1 and not hybrid and netns and emulate_latency and any(l and l.latency_us > 0 for l in links):
            wiring = [(h, r, {}) for r, h in enumerate(_start_relays(group, addresses, ports[:n], links))]
        for rank in range(n):
            hostfile, ring_rank, extra = wiring[rank]
            env = _rank_env(ring_rank, n, hostfile, blas_path, cores if pin else None, ncpu, rank) | extra
            argv = list(command) if command else worker_argv(str(model), split, list(worker_args))
            if netns:
                argv = netns.wrap(rank, argv)
            elif hosts is not None and not hosts[rank].local:
                argv = _over_ssh(hosts[rank], argv, ring_rank, n, hostfile, blas_path, ncpu, extra)
            log_path = workdir / f"rank{rank}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                        env=env, cwd=str(REPO_ROOT))
            group.ranks.append(RankProcess(rank, proc, log_path, netns.names[rank] if netns else None))
    except BaseException:
        group.close(grace_s=0.5)
        raise
    return group


def _jaccl_wiring(workdir: Path, hosts: list[Host], port: int) -> list[tuple[None, int, dict]]:
    """MLX's JACCL backend, as mlx.launch starts it: the coordinator on rank 0's host, the RDMA device matrix in
    a file (MLX_IBV_DEVICES), the rank in MLX_RANK; HARNESS_MLX_BACKEND tells the worker which backend to init."""
    devices = workdir / "ibv-devices.json"
    devices.write_text(json.dumps(ibv_devices(hosts)))
    env = {"HARNESS_MLX_BACKEND": hosts[0].backend, "MLX_JACCL_COORDINATOR": f"{hosts[0].address}:{port}",
           "MLX_IBV_DEVICES": str(devices), **({"MLX_JACCL_RING": "1"} if hosts[0].backend == "jaccl-ring" else {})}
    return [(None, r, {**env, "MLX_RANK": str(r)}) for r in range(len(hosts))]


def _hybrid_wiring(workdir: Path, stage_tp: list[int], addresses: list[str], ring_ports: list[int],
                   hop_ports: list[int]) -> list[tuple[Path | None, int, dict]]:
    """Pipelined TP stages: a ring hostfile per TP stage (its members only) and every rank's hop addresses."""
    starts = [sum(stage_tp[:s]) for s in range(len(stage_tp))]
    stages = [list(range(a, a + k)) for a, k in zip(starts, stage_tp)]
    hop_addrs = [f"{a}:{p}" for a, p in zip(addresses, hop_ports)]
    wiring = []
    for members in stages:
        path = None
        if len(members) > 1:
            path = workdir / f"hostfile-stage{stages.index(members)}.json"
            path.write_text(json.dumps(ring_hostfile([addresses[g] for g in members],
                                                     [ring_ports[g] for g in members])))
        wiring += [(path, m, hops_env(g, stages, hop_addrs)) for m, g in enumerate(members)]
    return wiring


def _start_relays(group: RankGroup, addresses: list[str], ports: list[int],
                  links: list[LinkShape | None]) -> list[Path]:
    """One delay relay per (rank, ring neighbour), inside the rank's namespace, and a hostfile per rank
    whose neighbour entries point at those relays (a rank's own entry stays its real listen address,
    which is what it binds). Each ring connection then crosses exactly one relay."""
    n = len(addresses)
    lat = [(l.latency_us if l else 0.0) for l in links]
    paths = []
    for r in range(n):
        entries = ring_hostfile(addresses, ports)
        for j in {(r - 1) % n, (r + 1) % n} - {r}:
            relay_port = 6000 + j
            delay_ms = max(lat[r], lat[j]) / 1e3
            argv = group.netns.wrap(r, [sys.executable, "-m", "harness.mlx.relay", "--listen",
                                        f"127.0.0.1:{relay_port}", "--to", f"{addresses[j]}:{ports[j]}",
                                        "--delay-ms", str(delay_ms)])
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=str(REPO_ROOT))
            group.helpers.append(proc)
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"delay relay for rank {r} -> {j} did not start")
            entries[j] = [f"127.0.0.1:{relay_port}"]
        path = group.workdir / f"hostfile-rank{r}.json"
        path.write_text(json.dumps(entries))
        paths.append(path)
    return paths


def _over_ssh(host: Host, argv: list[str], ring_rank: int, n: int, hostfile: Path | None, blas_path: str | None,
              ncpu: int, extra: dict) -> list[str]:
    """The ssh command that starts `argv` as this rank on `host`: only the harness's own variables travel
    (not this machine's environment), and no core pinning (this machine's cores mean nothing there)."""
    env = compute_env(ring_rank, n, blas_path, None, ncpu) | extra
    files = {}
    if "MLX_IBV_DEVICES" in env:   # a file here: its content travels, written to a file there
        files["MLX_IBV_DEVICES"] = Path(env.pop("MLX_IBV_DEVICES")).read_text()
    if hostfile is not None:
        env["MLX_RANK"] = str(ring_rank)
        files["MLX_HOSTFILE"] = Path(hostfile).read_text()
    return host.ssh_argv(remote_script(host, env, files, argv))


def _rank_env(rank: int, n: int, hostfile: Path | None, blas_path: str | None, cores: list[int] | None,
              ncpu: int, process: int | None = None) -> dict[str, str]:
    """`rank` is the rank on the ring in `hostfile`; `process` the rank among all n processes (cores follow it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("HARNESS_HOPS", None)
    env.update(compute_env(rank if process is None else process, n, blas_path, cores, ncpu))
    if hostfile is not None:
        env["MLX_RANK"] = str(rank)
        env["MLX_HOSTFILE"] = str(hostfile)
    else:
        env.pop("MLX_HOSTFILE", None)
        env.pop("MLX_RANK", None)
    if cores is None or n <= 1:
        env.pop("HARNESS_CPU_CORE", None)
    return env


def compute_env(rank: int, n: int, blas_path: str | None, cores: list[int] | None, ncpu: int) -> dict[str, str]:
    """What decides a rank's compute speed: its BLAS threads and the core it is pinned to. `profile-host --ranks N`
    measures with exactly this, so the simulator's per-rank chip is the rank the backend starts."""
    # one BLAS thread per rank when ranks share the cores; all cores for a single process
    env = blas.blas_env(threads=1 if n > 1 else ncpu, preload=blas_path)
    if cores is not None and n > 1:
        env["HARNESS_CPU_CORE"] = str(cores[rank % len(cores)])
    return env


def host_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _close_all() -> None:
    with _LOCK:
        groups = list(_LIVE)
    for g in groups:
        g.close(grace_s=0.5)


def _on_sigterm(signum, frame):
    _close_all()
    raise SystemExit(128 + signum)


def _install_sigterm() -> None:
    # without a handler SIGTERM skips atexit, and namespaces would outlive the process
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


atexit.register(_close_all)
