"""Hosts that stand for remote Macs: one network namespace each (harness.mlx.launcher.Netns, optionally with
shaped links), each running Debian's openssh-server with a temporary key, reached from this machine over a
bridge address. Ranks are then started on them over ssh exactly as on a Mac. Needs root, iproute2 and sshd."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from harness.mlx.launcher import LinkShape, Netns

SSHD = "/usr/sbin/sshd"


def available() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None if Path(SSHD).exists() else "needs openssh-server (apt-get install openssh-server)"


class SshLab:
    def __init__(self, n: int, shapes: list[LinkShape | None] | None = None):
        self.netns = Netns(n, shapes or [None] * n)
        self.dir = Path(tempfile.mkdtemp(prefix="harness-sshlab-"))
        self.key = self.dir / "id_ed25519"
        self.sshd: list[subprocess.Popen] = []

    @property
    def addresses(self) -> list[str]:
        return self.netns.addresses

    def ssh_options(self) -> list[str]:
        return ["-i", str(self.key), "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]

    def hostfile(self, names: list[str] | None = None, **extra) -> Path:
        """An mlx.launch hostfile for the lab's hosts (named `names`, else by order), written in the lab."""
        hosts = [{"ssh": f"root@{ip}", "ips": [ip]} | ({"name": names[i]} if names else {})
                 for i, ip in enumerate(self.addresses)]
        path = self.dir / "hosts.json"
        path.write_text(json.dumps({"ssh_options": self.ssh_options(), "hosts": hosts} | extra, indent=1))
        return path

    def __enter__(self) -> "SshLab":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self.netns.setup()
        bridge_ip = self.addresses[0].rsplit(".", 1)[0] + ".1"   # this machine's address on the hosts' bridge
        subprocess.run(["ip", "addr", "add", f"{bridge_ip}/24", "dev", self.netns.bridge], check=True)
        for name in ("id_ed25519", "host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], check=True)
        Path("/run/sshd").mkdir(exist_ok=True)   # sshd's privilege-separation directory
        for ns, ip in zip(self.netns.names, self.addresses):
            self.sshd.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", "/dev/null", "-o", f"ListenAddress={ip}",
                 "-o", f"HostKey={self.dir / 'host_key'}", "-o", f"AuthorizedKeysFile={self.key}.pub",
                 "-o", "PermitRootLogin=prohibit-password", "-o", "StrictModes=no", "-o", "UsePAM=no",
                 "-o", "PidFile=none"],
                stdout=subprocess.DEVNULL, stderr=open(self.dir / f"sshd-{ns}.log", "wb")))
        for ip in self.addresses:
            _wait_port(ip, 22)

    def close(self) -> None:
        for proc in self.sshd:
            proc.kill()
            proc.wait()
        self.sshd.clear()
        self.netns.teardown()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_port(ip: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {ip}:{port} did not start within {timeout_s} s")
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.mlx.sshlab --names a,b -- CMD ...`: run CMD while the lab's hosts are up, with
    `{hostfile}` in CMD replaced by their hostfile (e.g. `python -m harness run ... --hostfile {hostfile}`)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m tests.mlx.sshlab")
    p.add_argument("--names", required=True, help="plan node names, one host each, comma separated")
    p.add_argument("--gbps", type=float, default=None, help="shape every host's link to this rate")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if why := available():
        raise SystemExit(f"sshlab: {why}")
    names = args.names.split(",")
    shapes = [LinkShape(args.gbps) if args.gbps else None for _ in names]
    with SshLab(len(names), shapes) as lab:
        hostfile = str(lab.hostfile(names=names))
        print(f"sshlab: {len(names)} hosts up ({', '.join(f'{n}={a}' for n, a in zip(names, lab.addresses))})",
              flush=True)
        cmd = [a.replace("{hostfile}", hostfile) for a in args.command if a != "--"]
        return subprocess.run(cmd).returncode


if __name__ == "__main__":
    raise SystemExit(main())
