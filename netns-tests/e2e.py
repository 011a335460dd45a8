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
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import probes
import yaml
from nftsg.agent import netns
from nftsg.translators.evaluator import Flow
from nftsg.translators.network import IPAddress as IPAddr
from nftsg.translators.network import Network

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


def expected_check_count(doc: dict[str, Any], tcp_ports: int = 5, udp_ports: int = 1) -> int:
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


# -- probing one evaluator Flow with real packets ---------------------------------------

_CRC32C = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _l4_payload(protocol: int, sport: int, dport: int, token: bytes) -> bytes:
    if protocol == 47:  # GRE version 0 carrying "IPv4" (never decapsulated: no tunnel here)
        return b"\x00\x00\x08\x00" + token
    if protocol == 132:  # SCTP INIT, valid enough for conntrack's SCTP tracker
        init = struct.pack(
            "!BBHIIHHI", 1, 0, 20, int.from_bytes(token[:4], "big") or 1, 65535, 1, 1, 1
        )
        ports_vtag = struct.pack("!HHI", sport, dport, 0)  # an INIT carries verification tag 0
        csum = crc32c(ports_vtag + b"\0\0\0\0" + init)
        return ports_vtag + struct.pack("<I", csum) + init  # CRC32c, little-endian on the wire
    return token  # any other protocol: the token is the whole payload


def raw_probe(
    src_ns: str,
    dst_ns: str,
    src: IPAddr,
    dst: IPAddr,
    protocol: int,
    sport: int = 0,
    dport: int = 0,
    timeout: float = 0.3,
) -> tuple[bool, str]:
    """One packet of IP protocol `protocol` from src to dst; ok when dst_ns receives it.

    For protocols without a probe of their own (GRE, SCTP, ICMP of the other
    family): the request alone is what the firewall decides on for a new flow.
    """
    family = socket.AF_INET6 if dst.version == 6 else socket.AF_INET
    token = os.urandom(8)
    payload = _l4_payload(protocol, sport, dport, token)
    with netns.entered(dst_ns):
        receiver = socket.socket(family, socket.SOCK_RAW, protocol)
    with netns.entered(src_ns):
        sender = socket.socket(family, socket.SOCK_RAW, protocol)
    try:
        sender.bind((str(src), 0))
        sender.sendto(payload, (str(dst), 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([receiver], [], [], left)
            if not ready:
                break
            data, _peer = receiver.recvfrom(4096)
            if family == socket.AF_INET:
                data = data[(data[0] & 0x0F) * 4 :]
            if data == payload:
                return True, "received"
        return False, "not received"
    except OSError as exc:
        return False, f"raw: {exc}"
    finally:
        sender.close()
        receiver.close()


def namespace_of_address(lab: CliLab, network: Network, address: IPAddr) -> str:
    eni = network.eni_by_address(address)
    if eni is not None:
        return lab.instance_ns(eni.instance_id)
    ext = network.external_by_address(address)
    if ext is None:
        raise KeyError(f"nobody owns {address}")
    return lab.external_ns(ext.name)


def probe_flow(lab: CliLab, network: Network, flow: Flow, timeout: float = 0.3) -> tuple[bool, str]:
    """Send `flow` with real packets (its addresses, protocol and ports); True if it got through.

    TCP: handshake and data both ways; UDP: request and answer; ICMP echo in its
    own family: request and reply; anything else: the request arrives.
    """
    src_ns = namespace_of_address(lab, network, flow.src_ip)
    dst_ns = namespace_of_address(lab, network, flow.dst_ip)
    if flow.protocol == 6:
        p = probes.tcp_probe(
            src_ns,
            dst_ns,
            flow.dst_ip,
            flow.dport,
            sport=flow.sport,
            timeout=timeout,
            src=flow.src_ip,
        )
        return p.ok, p.error or "tcp round trip"
    if flow.protocol == 17:
        p = probes.udp_probe(
            src_ns,
            dst_ns,
            flow.dst_ip,
            flow.dport,
            sport=flow.sport,
            timeout=timeout,
            src=flow.src_ip,
        )
        return p.ok, p.error or "udp round trip"
    if flow.protocol == (1 if flow.version == 4 else 58):
        ok = probes.ping(src_ns, flow.dst_ip, timeout=timeout, src=flow.src_ip)
        return ok, "echo reply" if ok else "no echo reply"
    return raw_probe(
        src_ns, dst_ns, flow.src_ip, flow.dst_ip, flow.protocol, flow.sport, flow.dport, timeout
    )


def flow_label(network: Network, flow: Flow) -> str:
    def who(address: IPAddr) -> str:
        eni = network.eni_by_address(address)
        if eni is not None:
            return f"{eni.instance_id}/{eni.eni_id}"
        ext = network.external_by_address(address)
        return ext.name if ext is not None else "?"

    ports = f" dport {flow.dport} sport {flow.sport}" if flow.protocol in (6, 17, 132) else ""
    return (
        f"{who(flow.src_ip)} {flow.src_ip} -> {who(flow.dst_ip)} {flow.dst_ip} "
        f"proto {flow.protocol}{ports}"
    )
