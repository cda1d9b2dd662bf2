"""Real Macs from a hostfile: read mlx.launch's hosts.json, map the plan's ranks to hosts, start ranks over ssh.

The file is mlx.launch's own (`mlx.launch --hostfile`): a JSON list of hosts, or an object
`{"backend": "ring", "envs": ["K=V", ...], "hosts": [...]}`, each host `{"ssh": "mac1.local", "ips": ["10.0.0.1"]}`.
The ring backend connects ranks over `ips[0]`; `ssh` is what ssh is given. `"backend": "jaccl"` (or "jaccl-ring")
runs MLX's RDMA backend over Thunderbolt 5 instead, as mlx.launch does: each host's `rdma` lists, per host of the
file, the RDMA device reaching it (null for itself), and host 0's `ips[0]` is the coordinator. Keys mlx.launch does not read, which
the harness adds (per host, or at the top level as every host's default):

- `name`: the plan node this host runs (default: the ssh host's short name, `mac1` for `me@mac1.local`);
- `python`: the interpreter on that host (default: this one's path), `cwd`: the repository there (default: this
  one's path); like mlx.launch, the repository, its venv and the model folder are expected at the same paths;
- `envs`: extra `K=V` environment for the ranks on that host; `ssh_options`: extra ssh arguments (`["-p", "2222"]`).

An `ssh` of 127.0.0.1 or localhost starts the rank here, without ssh (as mlx.launch does).
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from harness.mlx.errors import UserError

LOCAL = ("127.0.0.1", "localhost")
HOST_KEYS = ("ssh", "ips", "rdma", "name", "python", "cwd", "envs", "ssh_options")
TOP_KEYS = ("backend", "envs", "hosts", "python", "cwd", "ssh_options")
REPO_ROOT = Path(__file__).resolve().parents[2]
# BatchMode: fail at once instead of prompting for a password nobody will type
# -T: no terminal, so the rank's stdin and stdout stay the plain command pipes
SSH = ("ssh", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5")
MAX_HOSTS = 256
BACKENDS = ("ring", "jaccl", "jaccl-ring")


@dataclass(frozen=True)
class Host:
    ssh: str
    ips: tuple[str, ...]
    name: str
    python: str
    cwd: str
    envs: tuple[str, ...] = ()
    ssh_options: tuple[str, ...] = ()
    backend: str = "ring"              # the file's: every host of one file uses the same MLX backend
    rdma: tuple = ()                   # jaccl: per host of the file (by position), its device or None
    index: int = 0                     # position in the file, which `rdma` of the other hosts refers to

    @property
    def local(self) -> bool:
        return self.ssh in LOCAL

    @property
    def address(self) -> str:
        """Where the other ranks reach this host's rank."""
        return self.ips[0] if self.ips else "127.0.0.1"

    def ssh_argv(self, script: str) -> list[str]:
        # the host's options first: for ssh the first value of an option wins, so they can override ours
        return [SSH[0], *self.ssh_options, *SSH[1:], self.ssh, script]


def read_hostfile(path: str | Path) -> list[Host]:
    """The hosts of an mlx.launch hostfile, checked; one line naming the file and the field when it is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: hostfile not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"{path}: not a JSON hostfile ({str(exc).splitlines()[0][:120]})") from None
    top = _top_level(data, path)
    if not 1 <= len(top["hosts"]) <= MAX_HOSTS:
        raise UserError(f"{path}: 'hosts' has {len(top['hosts'])} entries; give 1 to {MAX_HOSTS}")
    hosts = [_host(h, top, f"{path}: hosts[{i}]", i) for i, h in enumerate(top["hosts"])]
    _check_unique([h.name for h in hosts], path)
    if hosts[0].backend != "ring":
        _check_rdma(hosts, path)
    return hosts


def _top_level(data, path: Path) -> dict:
    if isinstance(data, list):
        data = {"hosts": data}
    if not isinstance(data, dict) or not isinstance(data.get("hosts"), list):
        raise UserError(f"{path}: expected a list of hosts or an object with a 'hosts' list (mlx.launch's format)")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(TOP_KEYS)}")
    backend = data.get("backend", "ring") or "ring"
    if backend not in BACKENDS:
        raise UserError(f"{path}: backend {backend!r}: the harness starts ranks on MLX's {', '.join(BACKENDS)} "
                        "backends (TCP ring over Thunderbolt or Ethernet, or RDMA over Thunderbolt 5)")
    return {**data, "backend": backend}


def _host(entry, top: dict, where: str, index: int) -> Host:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object like {{\"ssh\": \"mac1.local\", \"ips\": [\"10.0.0.1\"]}}")
    unknown = sorted(set(entry) - set(HOST_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(HOST_KEYS)}")
    ssh = _text(entry.get("ssh"), f"{where}.ssh")
    ips = _texts(entry.get("ips", []), f"{where}.ips")
    if not ips and ssh not in LOCAL:
        raise UserError(f"{where}.ips: the ring backend needs the IP the other Macs reach {ssh} on, "
                        "e.g. \"ips\": [\"192.168.1.11\"] (its Thunderbolt bridge or Ethernet address)")
    pick = lambda key, default: entry.get(key, top.get(key, default))  # noqa: E731  (host value, else the file's)
    envs = _texts(top.get("envs", []), f"{where}.envs") + _texts(entry.get("envs", []), f"{where}.envs")
    for e in envs:
        if "=" not in e or not e.split("=", 1)[0].replace("_", "a").isalnum():
            raise UserError(f"{where}.envs: {e!r} is not NAME=VALUE")
    return Host(ssh=ssh, ips=ips, name=_text(entry.get("name", short_name(ssh)), f"{where}.name"),
                python=_text(pick("python", sys.executable), f"{where}.python"),
                cwd=_text(pick("cwd", str(REPO_ROOT)), f"{where}.cwd"), envs=envs,
                ssh_options=_texts(pick("ssh_options", []), f"{where}.ssh_options"), backend=top["backend"],
                rdma=_rdma(entry.get("rdma", []), f"{where}.rdma"), index=index)


def _rdma(value, where: str) -> tuple:
    """mlx.launch's rdma list: per host, a device name, a list of them (several cables), or null."""
    if not isinstance(value, list):
        raise UserError(f"{where}: expected a list with one RDMA device (or null) per host, found "
                        f"{json.dumps(value)[:60]}")
    return tuple(v if v is None or isinstance(v, str) else _texts(v, f"{where}[{i}]") for i, v in enumerate(value))


def _check_rdma(hosts: list[Host], path: Path) -> None:
    """What JACCL needs of the file itself: a device list per host as long as the host list, null for itself."""
    for h in hosts:
        if len(h.rdma) != len(hosts):
            raise UserError(f"{path}: hosts[{h.index}].rdma has {len(h.rdma)} entries for {len(hosts)} hosts; "
                            f"backend {h.backend!r} needs one per host, e.g. [null, \"rdma_en3\"] on the first of two")
        if h.rdma[h.index] is not None:
            raise UserError(f"{path}: hosts[{h.index}].rdma[{h.index}] is {h.rdma[h.index]!r}; a host's entry for "
                            "itself must be null")


def ibv_devices(rank_hosts: list[Host]) -> list[list]:
    """MLX_IBV_DEVICES for JACCL in rank order: row r, column s is the device on rank r's host reaching rank s's
    host. Every pair JACCL connects must have one (all pairs; neighbours on the ring for jaccl-ring)."""
    n, ring = len(rank_hosts), rank_hosts[0].backend == "jaccl-ring"
    if len({h.name for h in rank_hosts}) != n:
        raise UserError("JACCL connects Macs pairwise over Thunderbolt: give every rank its own host "
                        f"(ranks on {', '.join(h.name for h in rank_hosts)})")
    matrix = [[None if r == s else h.rdma[rank_hosts[s].index] for s in range(n)] for r, h in enumerate(rank_hosts)]
    pairs = {(r, (r + 1) % n) for r in range(n)} | {((r + 1) % n, r) for r in range(n)} if ring else \
        {(r, s) for r in range(n) for s in range(n)}
    missing = sorted((r, s) for r, s in pairs if r != s and matrix[r][s] is None)
    if missing:
        r, s = missing[0]
        raise UserError(f"hostfile: no RDMA device on {rank_hosts[r].name} reaching {rank_hosts[s].name} "
                        f"(hosts[{rank_hosts[r].index}].rdma[{rank_hosts[s].index}] is null); JACCL needs a "
                        "Thunderbolt 5 cable between them, listed as its rdma_ device")
    return matrix


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: expected a non-empty string, found {json.dumps(value)[:60]}")
    return value


def _texts(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise UserError(f"{where}: expected a list of strings, found {json.dumps(value)[:60]}")
    return tuple(_text(v, f"{where}[{i}]") for i, v in enumerate(value))


def _check_unique(names: list[str], path: Path) -> None:
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{path}: host name {twice[0]!r} is used twice; give each host its own \"name\"")


def short_name(ssh: str) -> str:
    """`me@mac1.local` -> `mac1`: how a plan's node names usually match hosts."""
    host = ssh.rsplit("@", 1)[-1]
    return host if host.replace(".", "").isdigit() else host.split(".")[0]


def hosts_for_ranks(hosts: list[Host], rank_node: list[str], rank_stage: list[int], path="hostfile") -> list[Host]:
    """The host of each rank: the host named like the rank's node, else (no node named at all) the hosts in
    layer order, host 0 running the first layers, when there are exactly as many hosts as ranks."""
    by_name = {h.name: h for h in hosts}
    nodes = [n.split("#")[0] for n in rank_node]
    if any(n in by_name for n in nodes):
        missing = sorted({n for n in nodes if n not in by_name})
        if missing:
            raise UserError(f"{path}: no host runs plan node {missing[0]!r}; add an entry with \"name\": "
                            f"\"{missing[0]}\" (hosts named: {', '.join(sorted(by_name))})")
        return [by_name[n] for n in nodes]
    if len(hosts) != len(rank_node):
        raise UserError(f"{path}: {len(hosts)} hosts for {len(rank_node)} ranks, and no host is named like a plan "
                        f"node ({', '.join(dict.fromkeys(nodes))}); list one host per rank or name them")
    layer_order = sorted(range(len(rank_node)), key=lambda r: (rank_stage[r], r))
    out: list[Host] = [hosts[0]] * len(rank_node)
    for host, rank in zip(hosts, layer_order):
        out[rank] = host
    return out


def remote_script(host: Host, env: dict[str, str], files: dict[str, str], argv: list[str]) -> str:
    """The POSIX shell line that starts `argv` on `host`: its cwd, `env`, each of `files` written to a temporary
    file whose path goes in that variable (how mlx.launch passes MLX_HOSTFILE), the host's envs; exec, so the
    rank IS the ssh session and ends with it."""
    q = shlex.quote
    parts = [f"cd {q(host.cwd)} || exit 91", f"export PYTHONPATH={q(host.cwd)}"]
    for key, value in env.items():
        if key == "LD_PRELOAD":   # a library found here may not exist there
            parts.append(f"if [ -e {q(value)} ]; then export LD_PRELOAD={q(value)}; fi")
        else:
            parts.append(f"export {key}={q(value)}")
    for key, content in files.items():
        parts.append(f"f=$(mktemp) && printf '%s' {q(content)} > \"$f\" && export {key}=\"$f\"")
    parts += [f"export {q(e.split('=', 1)[0])}={q(e.split('=', 1)[1])}" for e in host.envs]
    parts.append("exec " + " ".join(q(a) for a in [host.python, *argv[1:]]))
    return "; ".join(parts)


PREFLIGHT_CODES = {91: "its cwd {cwd} does not exist (clone the repository there or set \"cwd\")",
                   92: "python {python} is not there (set \"python\" to the venv's interpreter on that host)",
                   93: "python {python} cannot import mlx and the harness (run ./setup.sh there)",
                   94: "the model folder {model} is not there (copy it to the same path on every host)"}


def preflight(hosts: list[Host], model: str, timeout_s: float = 30.0) -> None:
    """Before any rank starts: every remote host answers ssh, has the repository, a python with mlx and the
    model folder. One error naming each host that does not, and what to fix."""
    remote = list({h.ssh: h for h in hosts if not h.local}.values())
    with ThreadPoolExecutor(max_workers=min(16, len(remote) or 1)) as pool:
        problems = [p for p in pool.map(lambda h: _check_host(h, model, timeout_s), remote) if p]
    if problems:
        raise UserError("cannot start ranks: " + "; ".join(problems))


def _check_host(host: Host, model: str, timeout_s: float) -> str | None:
    q = shlex.quote
    script = (f"cd {q(host.cwd)} 2>/dev/null || exit 91; command -v {q(host.python)} >/dev/null || exit 92; "
              f"PYTHONPATH={q(host.cwd)} {q(host.python)} -c 'import mlx.core, harness.mlx.worker' "
              f">/dev/null 2>&1 || exit 93; [ -e {q(model)} ] || exit 94")
    try:
        done = subprocess.run(host.ssh_argv(script), capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"{host.ssh}: ssh did not answer within {timeout_s:.0f} s"
    except FileNotFoundError:
        return "no ssh client here (install openssh-client)"
    if done.returncode == 0:
        return None
    if done.returncode in PREFLIGHT_CODES:
        return f"{host.ssh}: " + PREFLIGHT_CODES[done.returncode].format(cwd=host.cwd, python=host.python, model=model)
    why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return f"{host.ssh}: ssh failed ({why}); check that `ssh {host.ssh}` logs in without a password"
