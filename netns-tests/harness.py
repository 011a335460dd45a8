"""`EnforcedLab`: a lab with nftsg enforcing it, driven in-process, for the scenario tests.

One `EnforcedLab` is one lab (its own namespace prefix), one real nft backend,
the daemon's conntrack flow judge (it marks the flows a change denies, deletes
none) and one `Reconciler`, with no daemon in between:

    lab.up(topology)          build the model, create the VPC routers, enforce the
                              rules, then create the instances (rules are in force
                              before the first port exists)
    lab.change(topology)      the same model edited: an incremental sync, then the lab
    lab.expect(src, dst, "tcp", 80, allowed=True)
                              (1) the reference evaluator predicts `allowed` for the
                              flow, (2) a real probe shows the kernel does the same
    lab.assert_second_sync_is_noop()
                              a second sync sends nothing and the kernel holds exactly
                              what was applied
    lab.ruleset(vpc)          the kernel's listing of the table, for ruleset checks

Everything the lab created is removed by `close()` (the fixtures call it in a
`finally`); the session-wide sweep of the run prefix in conftest.py is the
safety net behind it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nftsg.agent import netns
from nftsg.agent.conntrack import prune_flows
from nftsg.agent.lab import Lab
from nftsg.agent.nft_backend import NftBackend
from nftsg.agent.probe import ProbeResult, icmp_checksum, ping_probe, tcp_probe, udp_probe
from nftsg.agent.reconcile import Reconciler, SyncReport
from nftsg.translators.compiler import (
    DEFAULT_CT_MARK_BIT,
    FLAT_ORDERS,
    RULE_SET_TYPE,
    box_of,
)
from nftsg.translators.evaluator import Decision, Flow, SideDecision, evaluate
from nftsg.translators.flatten import Ranked, flatten
from nftsg.translators.model import topology_from_data
from nftsg.translators.network import Eni, IPAddress, Network
from nftsg.translators.nft import Span
from nftsg.translators.tracer import _element
from nftsg.translators.validate import build_network

TABLE = "nftsg"
# An expected drop costs its whole timeout; an expected pass returns at once (the
# pass timeout outlasts one TCP SYN retransmission, 1 s, for a loaded machine).
DROP_TIMEOUT = 0.35
PASS_TIMEOUT = 1.5

# Probe kinds: "ping" (ICMP / ICMPv6 echo), "tcp", "udp", "gre", "icmp-timestamp".
Kind = str
Family = str  # "ipv4" | "ipv6"

PROTO_TCP, PROTO_UDP, PROTO_GRE = 6, 17, 47
PROTO_ICMP, PROTO_ICMPV6 = 1, 58
IFA_F_NODAD = 0x02

# The standard VPC of the scenarios: two vSwitches, both with IPv6.
VPC = "vpc-t"


def topology(
    *,
    security_groups: Iterable[dict[str, Any]] = (),
    instances: Iterable[dict[str, Any]] = (),
    external_hosts: Iterable[dict[str, Any]] = (),
    prefix_lists: Iterable[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A topology dict in the file format, in the scenarios' VPC `vpc-t`
    (vsw-a 10.0.1.0/24 + 2001:db8:1:1::/64, vsw-b 10.0.2.0/24 + 2001:db8:1:2::/64)."""
    return {
        "vpcs": [
            {
                "vpc_id": VPC,
                "cidr_block": "10.0.0.0/16",
                "ipv6_cidr_block": "2001:db8:1::/56",
                "vswitches": [
                    {
                        "vswitch_id": "vsw-a",
                        "cidr_block": "10.0.1.0/24",
                        "ipv6_cidr_block": "2001:db8:1:1::/64",
                    },
                    {
                        "vswitch_id": "vsw-b",
                        "cidr_block": "10.0.2.0/24",
                        "ipv6_cidr_block": "2001:db8:1:2::/64",
                    },
                ],
            }
        ],
        "prefix_lists": list(prefix_lists),
        "security_groups": [{"vpc_id": VPC, **g} for g in security_groups],
        "instances": list(instances),
        "external_hosts": [{"vpc_id": VPC, **x} for x in external_hosts],
    }


def instance(
    instance_id: str,
    ip: str,
    groups: list[str] | None,
    *,
    ipv6: str | None = None,
    vswitch: str = "vsw-a",
    **more: Any,
) -> dict[str, Any]:
    """One instance of the file format (groups None: the VPC default group)."""
    out: dict[str, Any] = {
        "instance_id": instance_id,
        "vswitch_id": vswitch,
        "private_ip_address": ip,
    }
    if groups is not None:
        out["security_group_ids"] = groups
    if ipv6 is not None:
        out["ipv6_address"] = ipv6
    out.update(more)
    return out


# -- flows ---------------------------------------------------------------------


def describe_side(side: SideDecision | None) -> str:
    if side is None:
        return "not evaluated (no ENI)"
    if side.rule is None:
        return f"{side.verdict} by the {side.group_type} default of {side.eni_id}"
    r = side.rule
    return (
        f"{side.verdict} by {r.rule_id} of {r.group_id} on {side.eni_id} "
        f"({r.direction} {r.protocol} priority {r.priority} {r.policy})"
    )


def describe_decision(decision: Decision) -> str:
    if decision.reason == "intra-group":
        return f"{decision.verdict}: intra-group shortcut of {decision.shortcut_group}"
    if decision.reason != "rules":
        return f"{decision.verdict}: {decision.reason}"
    return (
        f"{decision.verdict}: sender egress {describe_side(decision.egress)}; "
        f"receiver ingress {describe_side(decision.ingress)}"
    )


# -- raw probes (protocols agent.probe has no probe for) --------------------------


def _raw_socket(namespace: str, version: int, proto: int) -> socket.socket:
    fam = socket.AF_INET if version == 4 else socket.AF_INET6
    return netns.run_in(namespace, lambda: socket.socket(fam, socket.SOCK_RAW, proto))


def _raw_payload(proto: int, nonce: bytes) -> bytes:
    if proto == PROTO_GRE:
        # GRE version 0, no options, a protocol type from the local experimental range.
        return struct.pack("!HH", 0, 0x88B5) + nonce
    if proto == PROTO_ICMP:
        # ICMP timestamp request (type 13): not an echo, to show rules cover every type.
        body = struct.pack("!HH", int.from_bytes(nonce[:2], "big"), 1) + nonce
        return (
            struct.pack("!BBH", 13, 0, icmp_checksum(struct.pack("!BBH", 13, 0, 0) + body)) + body
        )
    raise ValueError(f"no raw payload for protocol {proto}")


def _raw_wait(sock: socket.socket, version: int, nonce: bytes, deadline: float) -> bool:
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return False
        data = sock.recv(4096)
        if version == 4:
            data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets include the IP header
        if nonce in data:
            return True
    return False


def raw_probe(
    src_ns: str,
    dst_ns: str,
    src: IPAddress,
    dst: IPAddress,
    proto: int,
    *,
    reply: bool,
    timeout: float,
) -> ProbeResult:
    """A packet of IP protocol `proto` from src to dst, seen by a raw socket in dst_ns;
    with `reply`, the receiver answers with the same protocol and the sender must see it."""
    started = time.monotonic()
    nonce = os.urandom(12)
    sender = _raw_socket(src_ns, dst.version, proto)
    receiver = _raw_socket(dst_ns, dst.version, proto)
    try:
        sender.bind((str(src), 0))
        receiver.bind((str(dst), 0))
        sender.sendto(_raw_payload(proto, nonce), (str(dst), 0))
        if not _raw_wait(receiver, dst.version, nonce, started + timeout):
            return ProbeResult(False, "request not received", time.monotonic() - started)
        if not reply:
            return ProbeResult(True, "request received", time.monotonic() - started)
        answer = os.urandom(12)
        receiver.sendto(_raw_payload(proto, answer), (str(src), 0))
        if not _raw_wait(sender, dst.version, answer, time.monotonic() + timeout):
            return ProbeResult(False, "reply not received", time.monotonic() - started)
        return ProbeResult(True, "round trip", time.monotonic() - started)
    except OSError as exc:
        return ProbeResult(False, f"raw: {exc}", time.monotonic() - started)
    finally:
        sender.close()
        receiver.close()


# -- the harness -------------------------------------------------------------------


@dataclass
class Observation:
    """One `expect`: the flow, what the evaluator said, what the kernel did."""

    label: str
    flow: Flow
    decision: Decision
    probe: ProbeResult

    @property
    def predicted(self) -> bool:
        return self.decision.verdict == "accept"


class EnforcedLab:
    """A lab under nftsg enforcement, driven in-process (see the module docstring)."""

    def __init__(
        self, prefix: str, *, table: str = TABLE, ct_mark_bit: int = DEFAULT_CT_MARK_BIT
    ) -> None:
        self.prefix = prefix
        self.table = table
        self.lab = Lab(prefix)
        self.backend = NftBackend()
        self.reconciler = Reconciler(
            self.backend,
            self.lab.router_ns,
            table=table,
            prune_flows=prune_flows,  # the daemon's flow judge: marks, never deletes
            namespace_exists=netns.exists,
            ct_mark_bit=ct_mark_bit,
        )
        self.network: Network | None = None
        self.reports: list[SyncReport] = []
        self._rng = random.Random()

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> EnforcedLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.backend.close()
        finally:
            self.lab.destroy()

    # -- model -> kernel -----------------------------------------------------------
    @staticmethod
    def build(topo: dict[str, Any]) -> Network:
        return build_network(topology_from_data(topo))

    def up(self, topo: dict[str, Any]) -> SyncReport:
        """First build: router namespaces, then the rules, then the instances."""
        network = self.build(topo)
        ensure_routers = getattr(self.lab, "ensure_routers", None)
        if ensure_routers is not None:
            ensure_routers(network)
        else:
            # Lab.apply adopts namespaces that already exist, so creating the
            # routers first lets the rules be in force before any port exists.
            for vpc_id in network.vpcs:
                ns = self.lab.router_ns(vpc_id)
                if not netns.exists(ns):
                    netns.create(ns)
        report = self.reconciler.sync(network)
        self.lab.apply(network)
        self.network = network
        self.reports.append(report)
        self.assert_listable()
        return report

    def change(self, topo: dict[str, Any]) -> SyncReport:
        """An edited model: validated first (a rejected model raises and changes
        nothing), then an incremental sync, then the lab."""
        network = self.build(topo)
        report = self.reconciler.sync(network)
        self.lab.apply(network)
        self.network = network
        self.reports.append(report)
        self.assert_listable()
        return report

    def assert_listable(self) -> None:
        """`nft list table` works in every router: an operator can read the ruleset.

        Run by the `nft` tool in a child process, because a ruleset that nft cannot
        render makes libnftables abort, which must fail one test, not kill the run.
        """
        for vpc_id in self._net().vpcs:
            done = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.router(vpc_id),
                    "nft",
                    "list",
                    "table",
                    "inet",
                    self.table,
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert done.returncode == 0, (
                f"`nft list table inet {self.table}` fails in the router of {vpc_id} "
                f"(rc {done.returncode}): {done.stderr.strip()[-300:]}"
            )

    def router(self, vpc_id: str = VPC) -> str:
        return self.lab.router_ns(vpc_id)

    def ns(self, name: str) -> str:
        return self.lab.host_ns(name)

    # -- addresses ----------------------------------------------------------------
    def _net(self) -> Network:
        assert self.network is not None, "call up() first"
        return self.network

    def eni(self, name: str) -> Eni:
        """The ENI named by an ENI id, or an instance id (its primary ENI)."""
        net = self._net()
        if name in net.enis:
            return net.enis[name]
        return net.enis[net.instances[name].eni_ids[0]]

    def address(self, name: str, family: Family = "ipv4") -> IPAddress:
        """First address of that family of an instance (primary ENI), ENI or external host."""
        net = self._net()
        if name in net.externals:
            ext = net.externals[name]
            addrs: tuple[IPAddress, ...] = ext.ipv4 if family == "ipv4" else ext.ipv6
        else:
            eni = self.eni(name)
            addrs = eni.ipv4 if family == "ipv4" else eni.ipv6
        assert addrs, f"{name} has no {family} address in the model"
        return addrs[0]

    # -- traffic ------------------------------------------------------------------
    def observe(
        self,
        src: str,
        dst: str,
        kind: Kind,
        port: int | None = None,
        sport: int | None = None,
        family: Family = "ipv4",
        *,
        src_ip: str | None = None,
        dst_ip: str | None = None,
        timeout: float = PASS_TIMEOUT,
    ) -> Observation:
        s_ip = ipaddress.ip_address(src_ip) if src_ip else self.address(src, family)
        d_ip = ipaddress.ip_address(dst_ip) if dst_ip else self.address(dst, family)
        src_ns, dst_ns = self.ns(src), self.ns(dst)
        if kind in ("tcp", "udp"):
            assert port is not None, f"a {kind} probe needs a port"
            sp = sport if sport is not None else self._rng.randint(20000, 60000)
            proto = PROTO_TCP if kind == "tcp" else PROTO_UDP
            flow = Flow(s_ip, d_ip, proto, port, sp)
            fn = tcp_probe if kind == "tcp" else udp_probe
            result = fn(src_ns, dst_ns, d_ip, port, src=s_ip, sport=sp, timeout=timeout)
            what = f"{kind} {s_ip}:{sp} -> {d_ip}:{port}"
        elif kind == "ping":
            flow = Flow(s_ip, d_ip, PROTO_ICMP if d_ip.version == 4 else PROTO_ICMPV6)
            result = ping_probe(src_ns, d_ip, src=s_ip, timeout=timeout)
            what = f"ping {s_ip} -> {d_ip}"
        elif kind == "gre":
            flow = Flow(s_ip, d_ip, PROTO_GRE)
            result = raw_probe(src_ns, dst_ns, s_ip, d_ip, PROTO_GRE, reply=True, timeout=timeout)
            what = f"gre {s_ip} -> {d_ip}"
        elif kind == "icmp-timestamp":
            assert d_ip.version == 4
            flow = Flow(s_ip, d_ip, PROTO_ICMP)
            result = raw_probe(src_ns, dst_ns, s_ip, d_ip, PROTO_ICMP, reply=False, timeout=timeout)
            what = f"icmp timestamp request {s_ip} -> {d_ip}"
        else:
            raise ValueError(f"unknown probe kind {kind!r}")
        decision = evaluate(self._net(), flow)
        return Observation(f"{src} -> {dst}: {what}", flow, decision, result)

    def expect(
        self,
        src: str,
        dst: str,
        kind: Kind,
        port: int | None = None,
        sport: int | None = None,
        family: Family = "ipv4",
        *,
        allowed: bool,
        src_ip: str | None = None,
        dst_ip: str | None = None,
    ) -> Observation:
        """Assert that the evaluator predicts `allowed` and that the kernel does it."""
        obs = self.observe(
            src,
            dst,
            kind,
            port,
            sport,
            family,
            src_ip=src_ip,
            dst_ip=dst_ip,
            timeout=PASS_TIMEOUT if allowed else DROP_TIMEOUT,
        )
        want = "allowed" if allowed else "dropped"
        problems = []
        if obs.predicted != allowed:
            problems.append("the evaluator disagrees with the scenario")
        if obs.probe.ok != allowed:
            problems.append("the kernel disagrees with the scenario")
        assert not problems, (
            f"{obs.label}: expected {want}; " + " and ".join(problems) + "\n"
            f"  evaluator: {describe_decision(obs.decision)}\n"
            f"  kernel:    {'passed' if obs.probe.ok else 'dropped'} ({obs.probe.detail}, "
            f"{obs.probe.seconds:.3f} s)"
        )
        return obs

    # -- the three checks of a real-namespace test ------------------------------------
    def assert_second_sync_is_noop(self) -> None:
        report = self.reconciler.sync(self._net())
        sent = {ns: n for ns, n in report.commands.items() if n}
        assert not sent, f"a second sync of the same model sent commands: {sent}"
        drifted = self.reconciler.verify()
        assert drifted == [], f"the kernel differs from the applied program in {drifted}"

    def ruleset(self, vpc_id: str = VPC) -> dict[str, Any]:
        listing = self.backend.list_table(self.router(vpc_id), "inet", self.table)
        assert listing is not None, f"no table inet {self.table} in {self.router(vpc_id)}"
        return listing

    def kernel_chains(self, vpc_id: str = VPC) -> dict[str, dict[str, Any]]:
        return {
            item["chain"]["name"]: item["chain"]
            for item in self.ruleset(vpc_id)["nftables"]
            if "chain" in item
        }

    def kernel_rules(self, chain: str, vpc_id: str = VPC) -> list[dict[str, Any]]:
        return [
            item["rule"]
            for item in self.ruleset(vpc_id)["nftables"]
            if "rule" in item and item["rule"]["chain"] == chain
        ]

    def kernel_sets(self, vpc_id: str = VPC) -> dict[str, list[Any]]:
        """Set and map name -> its elements, as the kernel lists them."""
        out: dict[str, list[Any]] = {}
        for item in self.ruleset(vpc_id)["nftables"]:
            for kind in ("set", "map"):
                if kind in item:
                    out[item[kind]["name"]] = list(item[kind].get("elem", []))
        return out

    def rules_of(
        self, eni_id: str, direction: str, vpc_id: str = VPC, *, family: str | None = None
    ) -> SideRules:
        """What the kernel decides on the ENI's side (see `kernel_side`); compares equal
        to the expected rules {(priority, policy): {(proto, peer, dport, sport, local)}}
        that decide the same."""
        return kernel_side(self, eni_id, direction, vpc_id, family)

    def enforced_ports(self, vpc_id: str = VPC) -> set[str]:
        """Router ports whose traffic meets group rules (ENIs; external hosts are not)."""
        return {elem[0] for elem in self.kernel_sets(vpc_id)["egress_dispatch"]}

    def default_verdict(self, eni_id: str, direction: str) -> str:
        """The verdict of the last rule of the ENI's chain: its default for that direction
        (ingress: drop; egress: `return` (on to the receiver's side) for basic groups,
        drop for advanced ones)."""
        last = self.kernel_rules(kernel_chain(self, eni_id, direction))[-1]["expr"]
        return next(iter(last[-1]))

    # -- anti-spoofing -------------------------------------------------------------
    def send_udp_from(
        self,
        src: str,
        src_ip: str,
        dst: str,
        port: int,
        *,
        family: Family = "ipv4",
        add_address: bool,
        timeout: float = DROP_TIMEOUT,
    ) -> bool:
        """One datagram from instance `src` with source `src_ip` to `dst`; True when it
        arrived. With `add_address`, `src_ip` is first added to the instance's
        interface (it is not in the model) and removed afterwards."""
        forged = ipaddress.ip_address(src_ip)
        d_ip = self.address(dst, family)
        src_ns = self.ns(src)
        ifname = self.eni(src).peer_ifname if src not in self._net().externals else "eth0"
        ipr = netns.iproute(src_ns)
        try:
            index = ipr.link_lookup(ifname=ifname)[0]
            plen = 32 if forged.version == 4 else 128
            fam = socket.AF_INET if forged.version == 4 else socket.AF_INET6
            if add_address:
                extra = {} if forged.version == 4 else {"flags": IFA_F_NODAD}
                ipr.addr(
                    "add", index=index, address=str(forged), prefixlen=plen, family=fam, **extra
                )
            try:
                return _udp_oneway(src_ns, self.ns(dst), forged, d_ip, port, timeout)
            finally:
                if add_address:
                    ipr.addr("del", index=index, address=str(forged), prefixlen=plen, family=fam)
        finally:
            ipr.close()


def _udp_oneway(
    src_ns: str, dst_ns: str, src: IPAddress, dst: IPAddress, port: int, timeout: float
) -> bool:
    fam = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    server = netns.run_in(dst_ns, lambda: socket.socket(fam, socket.SOCK_DGRAM))
    client = netns.run_in(src_ns, lambda: socket.socket(fam, socket.SOCK_DGRAM))
    try:
        server.bind((str(dst), port))
        client.bind((str(src), 0))
        token = os.urandom(8)
        client.sendto(token, (str(dst), port))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([server], [], [], left)
            if not ready:
                return False
            data, peer = server.recvfrom(64)
            if data == token:
                assert ipaddress.ip_address(peer[0]) == src
                return True
        return False
    finally:
        client.close()
        server.close()


# -- long-lived flows (docs/semantics.md §State) -----------------------------------------

_RECORD = struct.Struct("!Qd")  # sequence number, send time


@dataclass
class StreamLog:
    received: list[tuple[int, float]] = field(default_factory=list)  # (seq, arrival)
    errors: list[str] = field(default_factory=list)


class _Stream:
    """Sends numbered records every `interval` from a client to a server in another
    namespace, in a background thread; another thread records their arrival."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.sent = 0
        self.log = StreamLog()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _start(self, send: Any, receive: Any) -> None:
        self._threads = [
            threading.Thread(target=send, daemon=True),
            threading.Thread(target=receive, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def count(self) -> int:
        return len(self.log.received)

    def arrivals_between(self, start: float, end: float) -> int:
        return sum(1 for _, t in list(self.log.received) if start <= t <= end)

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= count:
                return True
            time.sleep(0.005)
        return self.count() >= count

    def finish(self, timeout: float = 2.0) -> bool:
        """Stop sending, then wait until everything sent has arrived (True) or `timeout`."""
        self._stop.set()
        if self._threads:
            self._threads[0].join(timeout=timeout)
        return self.wait_for(self.sent, timeout)

    def sequence(self) -> list[int]:
        return [seq for seq, _ in self.log.received]


class TcpStream(_Stream):
    """One established TCP connection carrying a steady stream of records."""

    def __init__(
        self,
        src_ns: str,
        dst_ns: str,
        src: IPAddress,
        dst: IPAddress,
        port: int,
        interval: float = 0.002,
    ) -> None:
        super().__init__(interval)
        fam = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        listener = netns.run_in(dst_ns, lambda: socket.socket(fam, socket.SOCK_STREAM))
        self.client = netns.run_in(src_ns, lambda: socket.socket(fam, socket.SOCK_STREAM))
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((str(dst), port))
            listener.listen(1)
            self.client.bind((str(src), 0))
            self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.client.settimeout(PASS_TIMEOUT)
            self.client.connect((str(dst), port))
            listener.settimeout(PASS_TIMEOUT)
            self.server, _ = listener.accept()
        finally:
            listener.close()
        self.sport = self.client.getsockname()[1]
        self._start(self._send, self._receive)

    def _send(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.sendall(_RECORD.pack(self.sent, time.monotonic()))
            except OSError as exc:
                self.log.errors.append(f"send: {exc}")
                return
            self.sent += 1
            time.sleep(self.interval)

    def _receive(self) -> None:
        buf = b""
        self.server.settimeout(0.05)
        while True:
            try:
                chunk = self.server.recv(65536)
            except TimeoutError:
                if self._stop.is_set() and self.count() >= self.sent:
                    return
                continue
            except OSError as exc:
                self.log.errors.append(f"recv: {exc}")
                return
            if not chunk:
                return
            now = time.monotonic()
            buf += chunk
            while len(buf) >= _RECORD.size:
                seq, _ = _RECORD.unpack(buf[: _RECORD.size])
                buf = buf[_RECORD.size :]
                self.log.received.append((seq, now))

    def retransmissions(self) -> int:
        """tcpi_total_retrans of the sending socket: every lost segment counts here."""
        info = self.client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return int(struct.unpack_from("I", info, 100)[0])

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=3)
        self.client.close()
        self.server.close()


class UdpStream(_Stream):
    """A steady stream of numbered datagrams; each is echoed back by the server, and the
    arrival of the echo at the client is what is recorded (request and reply both pass)."""

    def __init__(
        self,
        src_ns: str,
        dst_ns: str,
        src: IPAddress,
        dst: IPAddress,
        port: int,
        interval: float = 0.002,
    ) -> None:
        super().__init__(interval)
        fam = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        self.server = netns.run_in(dst_ns, lambda: socket.socket(fam, socket.SOCK_DGRAM))
        self.client = netns.run_in(src_ns, lambda: socket.socket(fam, socket.SOCK_DGRAM))
        self.server.bind((str(dst), port))
        self.client.bind((str(src), 0))
        self.client.connect((str(dst), port))
        self.sport = self.client.getsockname()[1]
        self._echo = threading.Thread(target=self._serve, daemon=True)
        self._echo.start()
        self._start(self._send, self._receive)

    def _serve(self) -> None:
        self.server.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data, peer = self.server.recvfrom(64)
            except TimeoutError:
                continue
            except OSError:
                return
            self.server.sendto(data, peer)

    def _send(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.send(_RECORD.pack(self.sent, time.monotonic()))
            except OSError as exc:
                self.log.errors.append(f"send: {exc}")
            self.sent += 1
            time.sleep(self.interval)

    def _receive(self) -> None:
        self.client.settimeout(0.05)
        while True:
            try:
                data = self.client.recv(64)
            except TimeoutError:
                if self._stop.is_set():
                    return
                continue
            except OSError as exc:
                self.log.errors.append(f"recv: {exc}")
                if self._stop.is_set():
                    return
                continue
            seq, _ = _RECORD.unpack(data[: _RECORD.size])
            self.log.received.append((seq, time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        for t in (*self._threads, self._echo):
            t.join(timeout=3)
        self.client.close()
        self.server.close()


# -- the rules of one ENI as the kernel holds them -------------------------------------
#
# Layout-neutral: the ENI's chain of a direction is found through the kernel's dispatch
# map (`egress_dispatch` / `ingress_dispatch`: port -> jump chain), and what that chain
# looks up is read as prioritised boxes (`proto . peer . dport . sport . local`):
# - a flat set (v5, docs/dataplane.md): disjoint boxes, all of the chain's one
#   non-default verdict;
# - bucket sets (v4 `g_<group>_..._p<prio>_<a|d>_<v4|v6>_<part>`, or the flat layout's
#   fallback `b_<profile>_...`): boxes ranked by (priority, drop first).
# Either way the kernel's decision on that side is the region where the deciding box
# has the non-default verdict; `flatten` writes that region canonically (disjoint boxes,
# independent of how it was written), and the scenarios' expected rules, stated in the
# words of the model as {(priority, policy): {(proto, peer, dport, sport, local)}},
# are flattened the same way and compared. So a shadowed rule, or a rule the kernel
# holds as a hole carved out of another box, compares by what it decides.
# Everything that reads the layout is here.

_BUCKET_SET = re.compile(r"^[gb]_(.+)_(in|out)_p(\d+)_([ad])_(v4|v6)_(\d+)$")
_FLAT_SET = re.compile(r"^f_(.+)_(in|out)_(v4|v6)$")
_FAM_OF = {"v4": "ipv4", "v6": "ipv6"}
_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 47: "gre"}
_PROTO_NUMBERS = {name: number for number, name in _PROTO_NAMES.items()}
_BITS = {"ipv4": 32, "ipv6": 128}
_DOMAIN = {
    fam: (Span(0, 255), addrs, Span(0, 65535), Span(0, 65535), addrs)
    for fam, addrs in ((f, Span(0, (1 << b) - 1)) for f, b in _BITS.items())
}
# The kernel's rule sets list their fields in the compiler's key order; boxes here
# are in the model's order (proto, peer, dport, sport, local).
_SET_TYPES = RULE_SET_TYPE
_NO_LIMIT = 1 << 40
Atoms = tuple[str, str, str, str, str]
Buckets = dict[tuple[int, str], set[Atoms]]


def _show_addr(span: Span, fam: str) -> str:
    bits = _BITS[fam]
    if span == _DOMAIN[fam][1]:
        return "*"
    addr = ipaddress.ip_address(span.lo) if fam == "ipv4" else ipaddress.IPv6Address(span.lo)
    if span.lo == span.hi:
        return str(addr)
    size = span.hi - span.lo + 1
    if size & (size - 1) == 0 and span.lo % size == 0:
        return f"{addr}/{bits - size.bit_length() + 1}"
    top = ipaddress.ip_address(span.hi) if fam == "ipv4" else ipaddress.IPv6Address(span.hi)
    return f"{addr}-{top}"


def _show_num(span: Span, full: Span, names: dict[int, str] | None = None) -> str:
    if span == full:
        return "*"
    if span.lo == span.hi:
        return (names or {}).get(span.lo, str(span.lo))
    return f"{span.lo}-{span.hi}"


def _show_box(box: tuple[Span, ...], fam: str) -> Atoms:
    dom = _DOMAIN[fam]
    return (
        _show_num(box[0], dom[0], _PROTO_NAMES),
        _show_addr(box[1], fam),
        _show_num(box[2], dom[2]),
        _show_num(box[3], dom[3]),
        _show_addr(box[4], fam),
    )


def _parse_num(text: str, full: Span, names: dict[str, int] | None = None) -> Span:
    if text == "*":
        return full
    if text in (names or {}):
        n = (names or {})[text]
        return Span(n, n)
    lo, _, hi = text.partition("-")
    return Span(int(lo), int(hi or lo))


def _parse_addr(text: str, fam: str) -> Span | None:
    """The span of an address atom in `fam`; None if the atom is of the other family."""
    if text == "*":
        return _DOMAIN[fam][1]
    if ("." in text) != (fam == "ipv4"):
        return None
    if "-" in text:
        lo, hi = text.split("-")
        return Span(int(ipaddress.ip_address(lo)), int(ipaddress.ip_address(hi)))
    net = ipaddress.ip_network(text, strict=False)
    return Span(int(net.network_address), int(net.broadcast_address))


def _bound(proto: str, peer: str, local: str) -> bool:
    """Whether the atoms name a family (an address, ICMP or ICMPv6), unlike "*"."""
    return proto in ("icmp", "icmpv6") or peer != "*" or local != "*"


def _expected_boxes(expected: Buckets, fam: str, want: str, *, wild: bool) -> set[Atoms]:
    """The region where `expected` decides `want` in `fam`, canonically, as atoms;
    elements that name no family count in `fam` only if `wild`."""
    ranked = []
    dom = _DOMAIN[fam]
    for (priority, policy), elements in expected.items():
        for proto, peer, dport, sport, local in elements:
            if (proto, fam) in (("icmp", "ipv6"), ("icmpv6", "ipv4")):
                continue
            if not wild and not _bound(proto, peer, local):
                continue
            p, loc = _parse_addr(peer, fam), _parse_addr(local, fam)
            if p is None or loc is None:
                continue
            box = (_parse_num(proto, dom[0], _PROTO_NUMBERS), p,
                   _parse_num(dport, dom[2]), _parse_num(sport, dom[3]), loc)
            ranked.append(Ranked(box, (priority, 0 if policy == "drop" else 1), policy == want))
    boxes = flatten(ranked, dom, FLAT_ORDERS, _NO_LIMIT) or []
    return {_show_box(b, fam) for b in boxes}


@dataclass
class SideRules:
    """One side (ENI, direction) of the kernel's decision: per family the canonical
    disjoint boxes where the verdict is `want`, the chain's non-default one ("accept"
    where the default is drop, "drop" where it is `return`). Equal to a dict of expected
    buckets {(priority, policy): {atoms}} when that dict decides the same everywhere.
    Atoms show "*" for 0.0.0.0/0 and ::/0 alike, so an element naming no family (no
    address, not ICMP/ICMPv6) may stand for a rule of either family or both: per
    family, the kernel must equal the expected rules with such elements or without
    them (a model mixing both kinds needs `family=`)."""

    want: str
    boxes: dict[str, set[Atoms]]

    def atoms(self) -> set[Atoms]:
        return set().union(*self.boxes.values())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SideRules):
            return self.want == other.want and self.boxes == other.boxes
        if isinstance(other, dict):
            return all(
                got == _expected_boxes(other, f, self.want, wild=True)
                or got == _expected_boxes(other, f, self.want, wild=False)
                for f, got in self.boxes.items()
            )
        return NotImplemented

    def __repr__(self) -> str:
        return f"SideRules({self.want}: {dict((f, sorted(b)) for f, b in self.boxes.items())})"


def kernel_chain(lab: EnforcedLab, eni_id: str, direction: str, vpc_id: str = VPC) -> str:
    """The chain the kernel's dispatch map jumps to for the ENI's port on that side."""
    dispatch = "egress_dispatch" if direction == "egress" else "ingress_dispatch"
    ifname = lab.eni(eni_id).ifname
    for elem in lab.kernel_sets(vpc_id)[dispatch]:
        port, verdict = elem
        if port == ifname:
            return str(verdict["jump"]["target"])
    raise AssertionError(f"{eni_id} ({ifname}) is not in {dispatch}")


def _ranked_lookups(
    lab: EnforcedLab, chain: str, vpc_id: str
) -> tuple[str, dict[str, list[Ranked]]]:
    """(the chain's non-default verdict, per family its lookups as ranked boxes)."""
    sets = lab.kernel_sets(vpc_id)
    rules = lab.kernel_rules(chain, vpc_id)
    default = next(iter(rules[-1]["expr"][-1]))
    want = "accept" if default == "drop" else "drop"
    out: dict[str, list[Ranked]] = {"ipv4": [], "ipv6": []}
    for rule in rules[:-1]:
        for ref in re.findall(r'"@([^"]+)"', json.dumps(rule["expr"])):
            if (m := _FLAT_SET.match(ref)) is not None:
                fam, rank, wanted = _FAM_OF[m.group(3)], (0, 0), True
            elif (m := _BUCKET_SET.match(ref)) is not None:
                policy = "drop" if m.group(4) == "d" else "accept"
                fam, rank = _FAM_OF[m.group(5)], (int(m.group(3)), 0 if policy == "drop" else 1)
                wanted = policy == want
            else:
                continue
            for raw in sets[ref]:
                fields = _element(_SET_TYPES[fam], raw, ranges_ok=True)
                box = box_of([Span(int(lo), int(hi)) for lo, hi in fields])
                out[fam].append(Ranked(box, rank, wanted))
    return want, out


def kernel_side(
    lab: EnforcedLab, eni_id: str, direction: str, vpc_id: str = VPC, family: str | None = None
) -> SideRules:
    """The region where the kernel's chain for the ENI's side decides its non-default
    verdict, canonically flattened, per family (only `family` if given)."""
    fams = [family] if family is not None else ["ipv4", "ipv6"]
    if lab.eni(eni_id).vpc_id != vpc_id:  # another VPC's router never sees the ENI
        assert lab.eni(eni_id).ifname not in str(lab.kernel_sets(vpc_id)), eni_id
        return SideRules("accept" if direction == "ingress" else "drop", {f: set() for f in fams})
    want, ranked = _ranked_lookups(lab, kernel_chain(lab, eni_id, direction, vpc_id), vpc_id)
    boxes = {}
    for fam in fams:
        flat = flatten(ranked[fam], _DOMAIN[fam], FLAT_ORDERS, _NO_LIMIT) or []
        boxes[fam] = {_show_box(b, fam) for b in flat}
    return SideRules(want, boxes)
