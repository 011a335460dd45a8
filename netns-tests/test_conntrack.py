"""Conntrack listing and marking in a router namespace forwarding real traffic."""

from __future__ import annotations

import os
import secrets
import select
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from nftsg.agent.conntrack import Conntracker, FlowEntry, as_evaluator_flow

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

A_IP, B_IP, PORT = "10.77.1.1", "10.77.2.1", 5001
FOREIGN = 0x5  # the mark bits of another user of ct marks


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True)


def in_ns(ns: str, *args: str) -> None:
    sh("ip", "netns", "exec", ns, *args)


@pytest.fixture
def lab() -> Iterator[dict[str, str]]:
    """Instances a and b, each behind a veth into router r, which forwards."""
    prefix = "nt" + secrets.token_hex(3)
    names = {role: f"{prefix}-{role}" for role in ("a", "b", "r")}
    made: list[str] = []
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            made.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        r = names["r"]
        for role, subnet in (("a", "10.77.1"), ("b", "10.77.2")):
            ns = names[role]
            sh(
                "ip",
                "link",
                "add",
                f"{prefix}{role}",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                f"r{role}",
                "netns",
                r,
            )
            in_ns(ns, "ip", "addr", "add", f"{subnet}.1/24", "dev", f"{prefix}{role}")
            in_ns(ns, "ip", "link", "set", f"{prefix}{role}", "up")
            in_ns(ns, "ip", "route", "add", "default", "via", f"{subnet}.254")
            in_ns(r, "ip", "addr", "add", f"{subnet}.254/24", "dev", f"r{role}")
            in_ns(r, "ip", "link", "set", f"r{role}", "up")
        in_ns(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # A stateful forward chain, so the router tracks the flows.
        in_ns(
            r,
            "nft",
            "add table inet t; add chain inet t filter_fwd "
            "{ type filter hook forward priority 0; policy accept; }; "
            "add rule inet t filter_fwd ct state established,related accept",
        )
        yield names
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)


SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
while True:
    data = c.recv(100)
    if not data:
        break
    print(data.decode(), flush=True)
"""

CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(c.getsockname()[1], flush=True)
for line in sys.stdin:
    c.sendall(line.strip().encode())
"""

PING = r"""
import socket, struct, sys
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
hdr = struct.pack("!BBHHH", 8, 0, 0, 0x4242, 1) + b"nftsg-ping"
pkt = hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:]
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); r.settimeout(3)
r.sendto(pkt, (sys.argv[1], 0))
while True:
    data, addr = r.recvfrom(200)
    if addr[0] == sys.argv[1] and data[20] == 0:
        break
"""


def set_whole_mark(ns: str, flows: list[FlowEntry], mark: int) -> None:
    from nftsg.agent.conntrack import _tuple_of
    from pyroute2 import Conntrack

    with Conntrack(netns=ns, nfgen_family=socket.AF_INET) as sock:
        for flow in flows:
            orig, extra = _tuple_of(flow)
            sock.entry("set", tuple_orig=orig, mark=mark, **extra)


def pyroute2_flows(ns: str) -> list[FlowEntry]:
    from nftsg.agent.conntrack import _entry_to_flow
    from pyroute2 import Conntrack

    with Conntrack(netns=ns) as sock:
        return [
            _entry_to_flow(e)
            for e in sock.dump_entries()
            if e.tuple_orig.family in (socket.AF_INET, socket.AF_INET6)
        ]


def readline(proc: subprocess.Popen[str], timeout: float) -> str | None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else None


def test_judge_sets_and_clears_only_its_bit_of_the_mark(
    lab: dict[str, str], run_prefix: str
) -> None:
    r = lab["r"]
    py = sys.executable
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab["b"], py, "-c", SERVER, str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    client = None
    try:
        assert readline(server, 5) == "listening"
        client = subprocess.Popen(
            ["ip", "netns", "exec", lab["a"], py, "-c", CLIENT, B_IP, str(PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        sport_text = readline(client, 5)
        assert sport_text is not None and sport_text.isdigit()
        sport = int(sport_text)
        assert client.stdin is not None
        client.stdin.write("before\n")
        client.stdin.flush()
        assert readline(server, 5) == "before"
        in_ns(lab["a"], py, "-c", PING, B_IP)

        with Conntracker() as ct:
            flows = ct.list_flows(r)
            # The agent's own dump parser reads what pyroute2's decoder reads.
            assert sorted(flows, key=repr) == sorted(pyroute2_flows(r), key=repr)
            # The count that lets an empty table go unwalked is this namespace's own.
            assert ct.count(r) == len(flows) == 2
            empty = run_prefix + secrets.token_hex(3) + "-empty"
            subprocess.run(["ip", "netns", "add", empty], check=True)
            try:
                assert ct.count(empty) == 0 and ct.list_flows(empty) == []
            finally:
                ct.release(empty)
                subprocess.run(["ip", "netns", "delete", empty], check=False)
            tcp = [f for f in flows if f.proto == socket.IPPROTO_TCP]
            icmp = [f for f in flows if f.proto == socket.IPPROTO_ICMP]
            assert [(f.src, f.dst, f.sport, f.dport, f.state) for f in tcp] == [
                (A_IP, B_IP, sport, PORT, "ESTABLISHED")
            ]
            assert [(f.src, f.dst, f.sport, f.dport, f.icmp_id) for f in icmp] == [
                (A_IP, B_IP, 0, 0, 0x4242)
            ]

            # Another user of ct marks on the host marks every flow with 0x5.
            # (pyroute2 directly, whole-mark writes as such a user does; the
            # conntrack tool's -U fails with EOPNOTSUPP on this kernel.)
            set_whole_mark(r, flows, FOREIGN)

            def still_allowed(flow: FlowEntry) -> bool:
                return not (flow.proto == socket.IPPROTO_TCP and flow.dport == PORT)

            # What the reconciler passes: the evaluator's new-flow question.
            asked = [as_evaluator_flow(f) for f in flows]
            assert {(str(q.dst_ip), q.protocol, q.dport) for q in asked} == {
                (B_IP, socket.IPPROTO_TCP, PORT),
                (B_IP, socket.IPPROTO_ICMP, 0),
            }

            bit = 0x100
            assert ct.judge(r, still_allowed, bit) == 1
            marks = {f.proto: f.mark for f in ct.list_flows(r)}
            # The revoked flow got our bit beside the foreign ones; the other kept its mark.
            assert marks == {socket.IPPROTO_TCP: FOREIGN | bit, socket.IPPROTO_ICMP: FOREIGN}
            assert ct.judge(r, still_allowed, bit) == 0  # already cut
            assert ct.judge(r, lambda flow: True, bit) == 0  # revived, none cut
            marks = {f.proto: f.mark for f in ct.list_flows(r)}
            assert marks == {socket.IPPROTO_TCP: FOREIGN, socket.IPPROTO_ICMP: FOREIGN}
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_missing_namespace_is_refused() -> None:
    from nftsg.agent.conntrack import ConntrackError

    name = "nt" + secrets.token_hex(3) + "-none"
    with Conntracker() as ct, pytest.raises(ConntrackError):
        ct.list_flows(name)
    assert not os.path.exists(f"/run/netns/{name}")


def test_prune_flows_uses_the_evaluator_flow(lab: dict[str, str]) -> None:
    from nftsg.agent.conntrack import prune_flows
    from nftsg.translators.compiler import DEFAULT_CT_MARK_BIT

    in_ns(lab["a"], sys.executable, "-c", PING, B_IP)
    asked = []

    def deny_icmp(flow: object) -> bool:
        asked.append(flow)
        return getattr(flow, "protocol", None) != socket.IPPROTO_ICMP

    assert prune_flows(lab["r"], deny_icmp) == 1
    assert len(asked) == 1
    # The denied flow is marked (the ruleset drops marked flows both ways), not
    # deleted: its entry keeps the flow's direction, and a later allow revives it.
    with Conntracker() as ct:
        (entry,) = ct.list_flows(lab["r"])
    assert entry.proto == socket.IPPROTO_ICMP and entry.mark == DEFAULT_CT_MARK_BIT
    assert prune_flows(lab["r"], deny_icmp) == 0  # already cut: nothing to do
    assert prune_flows(lab["r"], lambda flow: True) == 0  # revived, none cut
    with Conntracker() as ct:
        (entry,) = ct.list_flows(lab["r"])
    assert entry.mark == 0
