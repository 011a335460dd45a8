"""Real traffic, real conntrack: other users' bits of the ct mark live beside ours.

A foreign mark (0x5) is written on both flows of a client the way another user
of ct marks would; revoking TCP cuts only the TCP flow, the UDP flow goes on,
and every foreign bit is still set through the cut and the revival.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from harness import EnforcedLab, TcpStream, UdpStream
from nftsg.agent.conntrack import Conntracker, FlowEntry, _tuple_of
from nftsg.translators.compiler import DEFAULT_CT_MARK_BIT
from test_scenarios_state import _assert_cut, _service

FOREIGN = 0x5


@pytest.fixture(params=[DEFAULT_CT_MARK_BIT, 0x100, 0x80000000], ids=hex)
def lab(request: pytest.FixtureRequest, lab_prefix: str) -> Iterator[EnforcedLab]:
    enforced = EnforcedLab(lab_prefix, ct_mark_bit=request.param)
    try:
        yield enforced
    finally:
        enforced.close()


def _flows(lab: EnforcedLab) -> dict[int, FlowEntry]:
    with Conntracker() as ct:
        return {
            f.proto: f
            for f in ct.list_flows(lab.router("vpc-t"))
            if f.src == str(lab.address("i-client")) and f.dport in (80, 9000)
        }


def _set_whole_mark(lab: EnforcedLab, flows: list[FlowEntry], mark: int) -> None:
    from pyroute2 import Conntrack

    with Conntrack(netns=lab.router("vpc-t"), nfgen_family=socket.AF_INET) as sock:
        for flow in flows:
            orig, extra = _tuple_of(flow)
            sock.entry("set", tuple_orig=orig, mark=mark, **extra)


def test_foreign_mark_bits_survive_a_revocation_and_a_revival(lab: EnforcedLab) -> None:
    bit = lab.reconciler.ct_mark_bit
    lab.up(_service(True))
    # The kernel's forward chain reads the configured bit, listed as compiled.
    (rule,) = [r for r in lab.kernel_rules("forward") if "denies" in r.get("comment", "")]
    program = lab.reconciler.applied[lab.router("vpc-t")]
    (compiled,) = [
        c["add"]["rule"]
        for c in program.full_sync_commands()
        if "rule" in c.get("add", {}) and "denies" in c["add"]["rule"].get("comment", "")
    ]
    assert rule["expr"] == compiled["expr"]
    assert str(bit) in str(rule["expr"])
    src, dst = lab.address("i-client"), lab.address("i-srv")
    tcp = TcpStream(lab.ns("i-client"), lab.ns("i-srv"), src, dst, 80)
    udp = UdpStream(lab.ns("i-client"), lab.ns("i-srv"), src, dst, 9000)
    try:
        assert tcp.wait_for(25, 2.0) and udp.wait_for(25, 2.0), "streams did not start"
        flows = _flows(lab)
        assert set(flows) == {socket.IPPROTO_TCP, socket.IPPROTO_UDP}
        _set_whole_mark(lab, list(flows.values()), FOREIGN)

        # Revoke TCP 80 only: keep the UDP rule.
        topo = _service(True)
        sg = topo["security_groups"][0]
        sg["permissions"] = [p for p in sg["permissions"] if p["ip_protocol"] != "TCP"]
        report = lab.change(topo)
        cut_at = time.monotonic()
        assert sum(report.flows_cut.values()) == 1
        _assert_cut(tcp, cut_at, "revoked TCP flow with foreign bits")
        mark = udp.count()
        assert udp.wait_for(mark + 25, 2.0), "the UDP flow with foreign bits stopped"
        marks = {p: f.mark for p, f in _flows(lab).items()}
        assert marks == {socket.IPPROTO_TCP: FOREIGN | bit, socket.IPPROTO_UDP: FOREIGN}
        lab.assert_second_sync_is_noop()

        # Restored: the same TCP connection goes on, foreign bits intact.
        lab.change(_service(True))
        mark = tcp.count()
        assert tcp.wait_for(mark + 25, 5.0), "the connection did not resume"
        marks = {p: f.mark for p, f in _flows(lab).items()}
        assert marks == {socket.IPPROTO_TCP: FOREIGN, socket.IPPROTO_UDP: FOREIGN}
    finally:
        tcp.close()
        udp.close()
    lab.assert_second_sync_is_noop()
