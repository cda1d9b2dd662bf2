"""Real Macs from a hostfile: mlx.launch's hosts.json read and checked, the plan's ranks mapped to hosts, and
ranks started over ssh on hosts that stand for Macs (network namespaces running openssh-server, shaped links),
giving the greedy tokens of one process."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from harness.backends.base import GenerationRequest
from harness.backends.mlx import MlxBackend
from harness.mlx import hosts as hostmod
from harness.mlx.errors import UserError
from harness.mlx.launcher import LinkShape
from tests.mlx import sshlab
from tests.mlx.test_mlx_tensor_parallel import _plan, tiny3  # noqa: F401  (tiny3 is a fixture)

GUARD_S = 90


def _write(tmp_path, data) -> str:
    path = tmp_path / "hosts.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_reads_mlx_launch_list_and_object_forms(tmp_path):
    listed = hostmod.read_hostfile(_write(tmp_path, [{"ssh": "me@mac1.local", "ips": ["10.0.0.1"]},
                                                     {"ssh": "mac2", "ips": ["10.0.0.2"], "rdma": []}]))
    assert [(h.ssh, h.address, h.name) for h in listed] == [("me@mac1.local", "10.0.0.1", "mac1"),
                                                            ("mac2", "10.0.0.2", "mac2")]
    obj = hostmod.read_hostfile(_write(tmp_path, {
        "backend": "ring", "envs": ["A=1"], "python": "/opt/py", "ssh_options": ["-p", "2222"],
        "hosts": [{"ssh": "10.0.0.5", "ips": ["10.0.0.5"], "envs": ["B=2"], "cwd": "/srv/h", "name": "studio"}]}))
    assert obj[0] == hostmod.Host(ssh="10.0.0.5", ips=("10.0.0.5",), name="studio", python="/opt/py",
                                  cwd="/srv/h", envs=("A=1", "B=2"), ssh_options=("-p", "2222"))
    assert hostmod.short_name("root@10.0.0.5") == "10.0.0.5"


@pytest.mark.parametrize("data, fragment", [
    ("{not json", "not a JSON hostfile"),
    ({"hosts": "mac1"}, "a list of hosts"),
    ([{"ssh": "mac1"}], "hosts[0].ips: the ring backend needs the IP"),
    ([{"ssh": "mac1", "ips": ["1.2.3.4"], "port": 22}], "hosts[0]: unknown key 'port'"),
    ({"backend": "nccl", "hosts": [{"ssh": "mac1", "ips": ["1.2.3.4"]}]}, "backend 'nccl'"),
    ({"backend": "jaccl", "hosts": [{"ssh": "a", "ips": ["1.2.3.4"]}, {"ssh": "b", "ips": ["1.2.3.5"]}]},
     "hosts[0].rdma has 0 entries for 2 hosts"),
    ({"backend": "jaccl", "hosts": [{"ssh": "a", "ips": ["1.2.3.4"], "rdma": ["rdma_en3", "rdma_en4"]},
                                    {"ssh": "b", "ips": ["1.2.3.5"], "rdma": ["rdma_en3", None]}]},
     "hosts[0].rdma[0] is 'rdma_en3'; a host's entry for itself must be null"),
    ({"backend": "jaccl", "hosts": [{"ssh": "a", "ips": ["1.2.3.4"], "rdma": "rdma_en3"}]}, "hosts[0].rdma: expected a list"),
    ([{"ssh": "", "ips": ["1.2.3.4"]}], "hosts[0].ssh: expected a non-empty string"),
    ([{"ssh": "a", "ips": ["1.2.3.4"], "name": "x"}, {"ssh": "b", "ips": ["1.2.3.5"], "name": "x"}], "'x' is used twice"),
    ([{"ssh": "a", "ips": ["1.2.3.4"], "envs": ["no equals"]}], "is not NAME=VALUE"),
    ([], "'hosts' has 0 entries"),
])
def test_bad_hostfile_names_the_field(tmp_path, data, fragment):
    with pytest.raises(UserError, match="hosts.json") as err:
        hostmod.read_hostfile(_write(tmp_path, data))
    assert fragment in str(err.value)


def _hosts(*names):
    return [hostmod.Host(ssh=n, ips=(f"10.0.0.{i}",), name=n, python="py", cwd="/") for i, n in enumerate(names)]


def test_ranks_map_to_hosts_by_node_name_else_in_layer_order():
    a, b, c = _hosts("a", "b", "c")
    # a pipeline's rank r runs layer-order stage n-1-r (mlx-lm's order)
    assert hostmod.hosts_for_ranks([a, b, c], ["c", "b", "a"], [2, 1, 0]) == [c, b, a]
    assert hostmod.hosts_for_ranks([a, b], ["stage1", "stage0"], [1, 0]) == [b, a]
    with pytest.raises(UserError, match="no host runs plan node 'd'"):
        hostmod.hosts_for_ranks([a, b], ["a", "d"], [1, 0])
    with pytest.raises(UserError, match="3 hosts for 2 ranks"):
        hostmod.hosts_for_ranks([a, b, c], ["x", "y"], [1, 0])


def _jaccl_file(tmp_path, rdma, backend="jaccl"):
    return hostmod.read_hostfile(_write(tmp_path, {"backend": backend, "hosts": [
        {"ssh": "127.0.0.1", "ips": [f"10.0.0.{i}"], "name": name, "rdma": row} for i, (name, row) in enumerate(rdma)]}))


def test_jaccl_devices_follow_the_ranks_not_the_file_order(tmp_path):
    """mlx.launch indexes rdma by file position; ranks map to hosts by plan node, so the matrix is re-indexed."""
    a, b, c = _jaccl_file(tmp_path, [("a", [None, "rdma_ab", "rdma_ac"]), ("b", ["rdma_ba", None, "rdma_bc"]),
                                     ("c", ["rdma_ca", "rdma_cb", None])])
    assert hostmod.ibv_devices([c, a, b]) == [[None, "rdma_ca", "rdma_cb"], ["rdma_ac", None, "rdma_ab"],
                                             ["rdma_bc", "rdma_ba", None]]
    with pytest.raises(UserError, match="every rank its own host"):
        hostmod.ibv_devices([a, a])


def test_jaccl_names_the_pair_without_a_cable_and_the_ring_needs_neighbours_only(tmp_path):
    names = "abcd"
    # a and c (not neighbours on a 4-ring) have no cable between them
    rows = [[None if i == j or {names[i], names[j]} == {"a", "c"} else f"rdma_{names[i]}{names[j]}" for j in range(4)]
            for i in range(4)]
    full = _jaccl_file(tmp_path, list(zip(names, rows)))
    with pytest.raises(UserError, match="no RDMA device on a reaching c"):
        hostmod.ibv_devices(full)
    ring = _jaccl_file(tmp_path, list(zip(names, rows)), backend="jaccl-ring")
    assert hostmod.ibv_devices(ring)[0] == [None, "rdma_ab", None, "rdma_ad"]


def test_jaccl_where_mlx_has_no_rdma_fails_naming_the_backend(tiny, tmp_path):
    """JACCL cannot run on this Linux host: the ranks are started as mlx.launch would start them and the error
    says which backend is missing and what it needs, instead of a bare RuntimeError from mx.distributed.init."""
    layers = json.loads((tiny / "config.json").read_text())["num_hidden_layers"]
    plan = _plan(layers, (("mac-a",), layers // 2), (("mac-b",), layers - layers // 2))
    hosts = _jaccl_file(tmp_path, [("mac-a", [None, "rdma_en3"]), ("mac-b", ["rdma_en3", None])])
    with pytest.raises(Exception, match="jaccl backend is not available on this host") as err:
        asyncio.run(asyncio.wait_for(_greedy(tiny, plan, hosts), GUARD_S))
    assert "Thunderbolt 5" in str(err.value)


def test_remote_script_sets_env_and_files_then_execs(tmp_path):
    """The shell line a host runs, run here by sh: cwd, variables, a file's content behind its variable."""
    host = hostmod.Host(ssh="h", ips=("1.1.1.1",), name="h", python=sys.executable, cwd=str(tmp_path),
                        envs=("EXTRA=x y",))
    code = "import os; print(os.getcwd(), os.environ['K'], os.environ['EXTRA'], open(os.environ['F']).read())"
    script = hostmod.remote_script(host, {"K": "it's", "LD_PRELOAD": "/nonexistent.so"}, {"F": '[["a:1"]]'},
                                   ["python", "-c", code])
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.stdout.split(" ", 1) == [str(tmp_path), "it's x y [[\"a:1\"]]\n"], done.stderr


needs_lab = pytest.mark.skipif(sshlab.available() is not None, reason=str(sshlab.available()))


@needs_lab
def test_preflight_names_the_host_and_what_is_missing(tmp_path):
    with sshlab.SshLab(1) as lab:
        host = hostmod.read_hostfile(lab.hostfile())[0]
        hostmod.preflight([host], sys.prefix)                       # everything there: no error
        with pytest.raises(UserError, match=rf"root@{lab.addresses[0]}: the model folder /nonexistent/m"):
            hostmod.preflight([host], "/nonexistent/m")
        stranger = hostmod.Host(ssh="root@10.213.254.254", ips=("10.213.254.254",), name="x", python="py",
                                cwd="/", ssh_options=tuple(lab.ssh_options()) + ("-o", "ConnectTimeout=1"))
        with pytest.raises(UserError, match="root@10.213.254.254: ssh failed"):
            hostmod.preflight([stranger], "/")


async def _greedy(model, plan, hosts=None):
    backend = MlxBackend(model, plan, hosts=hosts)
    try:
        report = await backend.load()
        assert all(r.proc.args[0] == ("ssh" if hosts else sys.executable) for r in backend._group.ranks)
        vocab = backend.config["vocab_size"]
        req = GenerationRequest("r0", [(5 * i + 1) % vocab for i in range(24)], max_tokens=12, ignore_eos=True)
        tokens = await asyncio.wait_for(_collect(backend, req), GUARD_S)
        return tokens, report
    finally:
        await backend.close()


async def _collect(backend, req):
    return [ev.token_id async for ev in backend.generate(req)]


@needs_lab
@pytest.mark.slow
def test_pipeline_over_ssh_on_shaped_links_equals_one_process(tiny):
    """Two 'Macs' (namespaces with sshd, 1 Gbit/s links), the plan's nodes mapped by name, ranks started
    over ssh: the same greedy tokens as one process on this machine."""
    layers = json.loads((tiny / "config.json").read_text())["num_hidden_layers"]
    plan = _plan(layers, (("mac-a",), layers // 2), (("mac-b",), layers - layers // 2))
    local, _ = asyncio.run(_greedy(tiny, None))
    with sshlab.SshLab(2, [LinkShape(1.0), LinkShape(1.0)]) as lab:
        hosts = hostmod.read_hostfile(lab.hostfile(names=["mac-b", "mac-a"]))
        remote, report = asyncio.run(_greedy(tiny, plan, hosts))
    assert remote == local
    assert any(f"on root@{lab.addresses[0]} (ssh)" in note for note in report.notes)


@needs_lab
@pytest.mark.slow
def test_tensor_parallel_pair_over_ssh_equals_one_process(tiny3):
    """A TP-2 stage (mlx-lm shard() on a ring of two ranks) on two ssh hosts mapped in order."""
    layers = json.loads((tiny3 / "config.json").read_text())["num_hidden_layers"]
    plan = _plan(layers, (("a", "b"), layers))
    local, _ = asyncio.run(_greedy(tiny3, None))
    with sshlab.SshLab(2) as lab:
        remote, _ = asyncio.run(_greedy(tiny3, plan, hostmod.read_hostfile(lab.hostfile())))
    assert remote == local


def test_run_with_a_bad_hostfile_fails_before_any_work(tmp_path):
    bad = _write(tmp_path, [{"ssh": "mac1"}])
    done = subprocess.run([sys.executable, "-m", "harness", "run", "--backend", "mlx", "--hostfile", bad,
                           "--out", str(tmp_path / "out"), "--no-report"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "hosts[0].ips: the ring backend needs the IP" in done.stderr
    assert not (tmp_path / "out").exists()


@needs_lab
@pytest.mark.slow
def test_jaccl_over_ssh_carries_the_device_file_and_fails_naming_the_backend(tiny):
    """Over ssh the RDMA device matrix travels as a file written on the host (as mlx.launch passes it); the rank
    there reaches mx.distributed and reports that this host has no JACCL."""
    layers = json.loads((tiny / "config.json").read_text())["num_hidden_layers"]
    plan = _plan(layers, (("mac-a",), layers // 2), (("mac-b",), layers - layers // 2))
    with sshlab.SshLab(2) as lab:
        path = lab.hostfile(names=["mac-a", "mac-b"], backend="jaccl")
        data = json.loads(path.read_text())
        for i, h in enumerate(data["hosts"]):
            h["rdma"] = [None if j == i else "rdma_en3" for j in range(2)]
        path.write_text(json.dumps(data))
        with pytest.raises(Exception, match="jaccl backend is not available on this host"):
            asyncio.run(asyncio.wait_for(_greedy(tiny, plan, hostmod.read_hostfile(path)), GUARD_S))
