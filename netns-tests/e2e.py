"""Helpers of the end-to-end tests: drive a lab through the real `nftsg` command line.

Every lab gets a unique prefix and a private state directory, and `cleanup()`
removes it whatever happened: `nftsg lab down`, then a safety net that kills
the lab's agent (by the pid it recorded) and deletes any namespace left with
the lab's prefix. Traffic goes only between the lab's own namespaces.

    with cli_lab(prefix, state_dir) as lab:
        lab.up(topology_file)            # exit 0 asserted
        lab.run("lab", "check")          # CompletedProcess
        lab.table("vpc-demo")            # `nft -a list table` in the VPC router
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from nftsg.agent import netns

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
# The console script of the interpreter running the tests (the project venv).
NFTSG = Path(sys.executable).with_name("nftsg")
TABLE = "nftsg"

CHECK_SUMMARY = re.compile(
    r"^(\d+)/(\d+) probes agree with the evaluator \((\d+) allowed, (\d+) dropped\)$", re.M
)


@dataclass(frozen=True)
class CheckSummary:
    agree: int
    total: int
    allowed: int
    dropped: int
    mismatches: list[str]


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def load_yaml(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


class CliLab:
    """One lab driven through `nftsg`, with its own prefix and state directory."""

    def __init__(self, prefix: str, state_dir: Path) -> None:
        self.prefix = prefix
        self.state_dir = state_dir
        self.agent_pids: set[int] = set()  # every agent pid seen, for the safety net

    # -- running the command line -------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NFTSG_STATE_DIR"] = str(self.state_dir)
        env["NFTSG_PREFIX"] = self.prefix
        return env

    def run(
        self, *args: str, timeout: float = 120, user: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`nftsg ARGS...` with this lab's state dir and prefix in the environment."""
        argv = [str(NFTSG), *args]
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
        proc = subprocess.run(
            argv, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        self._note_agent()
        return proc

    def up(self, topology: Path, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = self.run("lab", "up", str(topology), "--timeout", str(timeout), timeout=timeout + 60)
        assert proc.returncode == 0, (
            f"lab up {topology.name} failed:\n{describe(proc)}\n{self.log_tail()}"
        )
        return proc

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.run("lab", "down", timeout=60)

    def check(self, *extra: str) -> tuple[subprocess.CompletedProcess[str], CheckSummary]:
        proc = self.run("lab", "check", *extra, timeout=300)
        found = CHECK_SUMMARY.findall(proc.stdout)
        assert found, f"lab check printed no summary:\n{describe(proc)}"
        agree, total, allowed, dropped = (int(x) for x in found[-1])
        mismatches = [line.strip() for line in proc.stdout.splitlines() if "MISMATCH" in line]
        return proc, CheckSummary(agree, total, allowed, dropped, mismatches)

    def explain(self, *args: str) -> dict[str, Any]:
        proc = self.run("explain", *args)
        assert proc.returncode == 0, describe(proc)
        result = json.loads(proc.stdout)
        assert isinstance(result, dict)
        return result

    # -- what is there ----------------------------------------------------------------
    def router_ns(self, vpc_id: str) -> str:
        return f"{self.prefix}-r-{vpc_id}"

    def instance_ns(self, instance_id: str) -> str:
        return f"{self.prefix}-i-{instance_id}"

    def external_ns(self, name: str) -> str:
        return f"{self.prefix}-x-{name}"

    def namespaces(self) -> list[str]:
        return sorted(n for n in netns.list_namespaces() if n.startswith(f"{self.prefix}-"))

    def table(self, vpc_id: str) -> str | None:
        """The nftsg table of a VPC router with rule handles (`nft -a list table`), or None."""
        proc = ns_run(self.router_ns(vpc_id), ["nft", "-a", "list", "table", "inet", TABLE])
        return proc.stdout if proc.returncode == 0 else None

    def links(self, namespace: str) -> str:
        """`ip -o link` of a namespace: names and ifindexes (recreated links get new ones)."""
        proc = ns_run(namespace, ["ip", "-o", "link", "show"])
        return "\n".join(line.split("\\")[0] for line in proc.stdout.splitlines())

    def agent_pid(self) -> int | None:
        """The running agent's pid (from its pid file), or None when no agent runs."""
        try:
            pid = int((self.state_dir / "agent.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if agent_alive(pid) else None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.state_dir / "agent.log").read_text(errors="replace")
        except OSError:
            return "(no agent log)"
        return "agent log (tail):\n" + "\n".join(text.splitlines()[-lines:])

    def _note_agent(self) -> None:
        pid = self.agent_pid()
        if pid is not None:
            self.agent_pids.add(pid)

    # -- cleanup ------------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        """Remove the lab whatever state it is in; returns what the safety net had to do."""
        leftovers: list[str] = []
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.down()
        self._note_agent()
        for pid in sorted(self.agent_pids):
            if agent_alive(pid):
                leftovers.append(f"agent pid {pid}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in self.namespaces():
            leftovers.append(f"namespace {name}")
            with contextlib.suppress(netns.NetnsError, OSError):
                netns.delete(name)
        return leftovers


def agent_alive(pid: int) -> bool:
    """A live (not zombie) `nftsg agent` process with this pid."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if re.search(r"^State:\s+Z", status, re.M):
        return False
    return b"agent" in cmdline and b"nftsg" in cmdline


@contextlib.contextmanager
def cli_lab(prefix: str, state_dir: Path) -> Iterator[CliLab]:
    lab = CliLab(prefix, state_dir)
    try:
        yield lab
    finally:
        lab.cleanup()


def ns_run(
    namespace: str, argv: list[str], timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"$ {' '.join(map(str, proc.args))}\nexit {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )


def wait_for(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def expected_check_count(
    doc: dict[str, Any], tcp_ports: int = 5, udp_ports: int = 1
) -> int:
    """How many probes `nftsg lab check` must run for a topology document: every ordered
    pair of hosts of the same VPC, once per family both have, ping + each TCP and UDP port."""
    vpc_of_vswitch = {
        vsw["vswitch_id"]: vpc["vpc_id"] for vpc in doc["vpcs"] for vsw in vpc["vswitches"]
    }
    hosts = [
        (vpc_of_vswitch[i["vswitch_id"]], True, bool(i.get("ipv6_address")))
        for i in doc.get("instances", [])
    ] + [
        (x["vpc_id"], bool(x.get("ip_address")), bool(x.get("ipv6_address")))
        for x in doc.get("external_hosts", [])
    ]
    pairs = 0
    for a, (vpc_a, v4_a, v6_a) in enumerate(hosts):
        for b, (vpc_b, v4_b, v6_b) in enumerate(hosts):
            if a != b and vpc_a == vpc_b:
                pairs += (v4_a and v4_b) + (v6_a and v6_b)
    return pairs * (1 + tcp_ports + udp_ports)


@contextlib.contextmanager
def listening(namespace: str, address: str, port: int) -> Iterator[socket.socket]:
    """A TCP listener in `namespace` (the kernel completes handshakes without accept())."""
    with netns.entered(namespace):
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(16)
        yield sock
    finally:
        sock.close()
