"""Real-traffic scenarios: state. Replies and related ICMP errors, changes applied to
flows that already exist, session tracking, anti-spoofing, rejected changes.

docs/semantics.md §State, §Limits and §"API behaviours" (a rejected change
touches nothing); docs/design.md §Anti-spoofing. Long-lived flows send a
record every 2 ms in background threads while the model changes under them.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness import (
    DROP_TIMEOUT,
    EnforcedLab,
    TcpStream,
    UdpStream,
    instance,
    topology,
)
from nftsg.agent import netns
from nftsg.translators.errors import EcsError
from nftsg.translators.evaluator import Flow, evaluate

OFFICE = {"name": "office", "ip_address": "198.51.100.7", "ipv6_address": "2001:db8:ffff::7"}
INTERNET = {"name": "internet", "ip_address": "203.0.113.50", "ipv6_address": "2001:db8:ffff::50"}

# A flow's verdict may flip only inside this window after change() returned;
# after it, no record of a cut flow may arrive.
CUT_GRACE = 0.02
CUT_WINDOW = 0.3


@pytest.fixture
def lab(lab_prefix: str) -> Iterator[EnforcedLab]:
    enforced = EnforcedLab(lab_prefix)
    try:
        yield enforced
    finally:
        enforced.close()


def deny_all_egress() -> list[dict[str, Any]]:
    return [
        {"direction": "egress", "ip_protocol": "ALL", "port_range": "-1/-1",
         "dest_cidr_ip": "0.0.0.0/0", "policy": "drop", "priority": 1},
        {"direction": "egress", "ip_protocol": "ALL", "port_range": "-1/-1",
         "ipv6_dest_cidr_ip": "::/0", "policy": "drop", "priority": 1},
    ]


# -- replies and related errors -----------------------------------------------------


def test_replies_pass_although_the_servers_egress_denies_everything(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {"security_group_id": "sg-srv",
                 "permissions": [
                     {"direction": "ingress", "ip_protocol": "TCP", "port_range": "80/80",
                      "source_cidr_ip": "0.0.0.0/0"},
                     {"direction": "ingress", "ip_protocol": "UDP", "port_range": "53/53",
                      "source_cidr_ip": "0.0.0.0/0"},
                     {"direction": "ingress", "ip_protocol": "TCP", "port_range": "80/80",
                      "ipv6_source_cidr_ip": "::/0"},
                     {"direction": "ingress", "ip_protocol": "UDP", "port_range": "53/53",
                      "ipv6_source_cidr_ip": "::/0"},
                     *deny_all_egress(),
                 ]},
            ],
            instances=[instance("i-srv", "10.0.1.10", ["sg-srv"], ipv6="2001:db8:1:1::10")],
            external_hosts=[INTERNET],
        )
    )
    assert lab.rules_of("eni-srv", "egress") == {(1, "drop"): {("*", "*", "*", "*", "*")}}
    # Replies are accepted by conntrack before any group rule is looked at.
    forward = [r.get("comment") for r in lab.kernel_rules("forward")]
    assert forward.index("conntrack") < forward.index("sender egress")
    for family in ("ipv4", "ipv6"):
        lab.expect("internet", "i-srv", "tcp", 80, family=family, allowed=True)
        lab.expect("internet", "i-srv", "udp", 53, family=family, allowed=True)
        lab.expect("i-srv", "internet", "tcp", 80, family=family, allowed=False)
        lab.expect("i-srv", "internet", "udp", 53, family=family, allowed=False)
    lab.assert_second_sync_is_noop()


def _udp_refused(lab: EnforcedLab, src: str, dst: str, port: int, family: str) -> bool:
    """A datagram to a port nobody listens on; True when the ICMP port-unreachable
    error made it back (the connected socket reports ECONNREFUSED)."""
    d_ip = lab.address(dst, family)
    s_ip = lab.address(src, family)
    fam = socket.AF_INET if d_ip.version == 4 else socket.AF_INET6
    sock = netns.run_in(lab.ns(src), lambda: socket.socket(fam, socket.SOCK_DGRAM))
    try:
        sock.bind((str(s_ip), 0))
        sock.connect((str(d_ip), port))
        sock.settimeout(DROP_TIMEOUT)
        sock.send(b"anyone?")
        try:
            sock.recv(64)
        except ConnectionRefusedError:
            return True
        except TimeoutError:
            return False
        return False
    finally:
        sock.close()


def test_icmp_errors_related_to_an_allowed_flow_pass(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {"security_group_id": "sg-srv",
                 "permissions": [
                     {"direction": "ingress", "ip_protocol": "UDP", "port_range": "7000/7000",
                      "source_cidr_ip": "0.0.0.0/0"},
                     {"direction": "ingress", "ip_protocol": "UDP", "port_range": "7000/7000",
                      "ipv6_source_cidr_ip": "::/0"},
                     *deny_all_egress(),
                 ]},
            ],
            instances=[instance("i-srv", "10.0.1.10", ["sg-srv"], ipv6="2001:db8:1:1::10")],
            external_hosts=[INTERNET, OFFICE],
        )
    )
    assert lab.network is not None
    for family, ext in (("ipv4", "internet"), ("ipv6", "office")):
        allowed = Flow(lab.address(ext, family), lab.address("i-srv", family), 17, 7000, 40000)
        denied = Flow(lab.address(ext, family), lab.address("i-srv", family), 17, 7001, 40000)
        assert evaluate(lab.network, allowed).verdict == "accept"
        assert evaluate(lab.network, denied).verdict == "drop"
        # Nobody listens on i-srv: its kernel answers with port unreachable, which the
        # server's egress would drop as a new flow; as a related error it passes.
        assert _udp_refused(lab, ext, "i-srv", 7000, family), f"no ICMP error back ({family})"
        assert not _udp_refused(lab, ext, "i-srv", 7001, family), f"{family} 7001 got through"
    lab.assert_second_sync_is_noop()


def test_drops_are_silent_no_reset_and_no_icmp_error(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {"security_group_id": "sg-srv",
                 "permissions": [
                     {"direction": "ingress", "ip_protocol": "TCP", "port_range": "1/1000",
                      "source_cidr_ip": "0.0.0.0/0"},
                     {"direction": "ingress", "ip_protocol": "TCP", "port_range": "25/25",
                      "source_cidr_ip": "0.0.0.0/0", "policy": "drop"},
                 ]},
            ],
            instances=[instance("i-srv", "10.0.1.10", ["sg-srv"])],
            external_hosts=[INTERNET],
        )
    )
    assert lab.rules_of("eni-srv", "ingress") == {
        (1, "accept"): {("tcp", "*", "1-1000", "*", "*")},
        (1, "drop"): {("tcp", "*", "25", "*", "*")},
    }
    assert lab.network is not None

    def connect(port: int) -> str:
        sock = netns.run_in(lab.ns("internet"), lambda: socket.socket())
        try:
            sock.settimeout(DROP_TIMEOUT)
            sock.connect(("10.0.1.10", port))
            return "connected"
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timed out"
        finally:
            sock.close()

    # Nobody listens on i-srv: an allowed port answers with a reset...
    assert evaluate(lab.network, Flow(lab.address("internet"), lab.address("i-srv"), 6, 24,
                                      40000)).verdict == "accept"
    assert connect(24) == "refused"
    # ... a port dropped by a rule or by the default says nothing at all.
    for port in (25, 2000):
        assert evaluate(lab.network, Flow(lab.address("internet"), lab.address("i-srv"), 6, port,
                                          40000)).verdict == "drop"
        assert connect(port) == "timed out"
    assert not _udp_refused(lab, "internet", "i-srv", 53, "ipv4")
    lab.assert_second_sync_is_noop()


# -- changes under existing flows --------------------------------------------------------


def _service(
    allow: bool,
    *,
    extra: tuple[dict[str, Any], ...] = (),
    spare_groups: tuple[str, ...] = ("sg-client",),
    client_inner: str = "Accept",
) -> dict[str, Any]:
    """i-srv serves TCP 80 and UDP 9000 to 10.0.1.20/32 (i-client) when `allow`."""
    rules: list[dict[str, Any]] = list(extra)
    if allow:
        rules += [
            {"direction": "ingress", "ip_protocol": "TCP", "port_range": "80/80",
             "source_cidr_ip": "10.0.1.20/32", "priority": 10},
            {"direction": "ingress", "ip_protocol": "UDP", "port_range": "9000/9000",
             "source_cidr_ip": "10.0.1.20/32", "priority": 10},
        ]
    return topology(
        security_groups=[
            {"security_group_id": "sg-srv", "permissions": rules},
            {"security_group_id": "sg-client", "inner_access_policy": client_inner},
            {"security_group_id": "sg-ops"},
        ],
        instances=[
            instance("i-srv", "10.0.1.10", ["sg-srv"]),
            instance("i-client", "10.0.1.20", ["sg-client"]),
            instance("i-spare", "10.0.1.30", list(spare_groups)),
        ],
        external_hosts=[OFFICE],
    )


def _streams(lab: EnforcedLab) -> tuple[TcpStream, UdpStream]:
    src, dst = lab.address("i-client"), lab.address("i-srv")
    tcp = TcpStream(lab.ns("i-client"), lab.ns("i-srv"), src, dst, 80)
    udp = UdpStream(lab.ns("i-client"), lab.ns("i-srv"), src, dst, 9000)
    assert tcp.wait_for(25, 2.0) and udp.wait_for(25, 2.0), "streams did not start"
    return tcp, udp


def test_established_flows_lose_nothing_while_unrelated_things_change(lab: EnforcedLab) -> None:
    lab.up(_service(True))
    tcp, udp = _streams(lab)
    try:
        steps = [
            # an unrelated rule in the server's own chain
            _service(True, extra=({"direction": "ingress", "ip_protocol": "TCP",
                                   "port_range": "8443/8443", "source_cidr_ip": "198.51.100.0/24",
                                   "priority": 5},)),
            # a new rule that allows the same flows at a better priority: verdict unchanged
            _service(True, extra=({"direction": "ingress", "ip_protocol": "ALL",
                                   "port_range": "-1/-1", "source_cidr_ip": "10.0.1.0/24",
                                   "priority": 1},)),
            # membership and inner policy of other groups
            _service(True, spare_groups=("sg-ops",)),
            _service(True, spare_groups=("sg-ops",), client_inner="Drop"),
        ]
        for step in steps:
            report = lab.change(step)
            assert any(report.commands.values()), "the change sent nothing"
            assert not any(report.flows_cut.values()), f"flows cut: {report.flows_cut}"
            time.sleep(0.1)
        assert lab.rules_of("eni-srv", "ingress") == {
            (10, "accept"): {("tcp", "10.0.1.20", "80", "*", "*"),
                             ("udp", "10.0.1.20", "9000", "*", "*")}
        }
        assert tcp.finish() and udp.finish(), "records still missing after 2 s"
        retransmitted = tcp.retransmissions()
    finally:
        tcp.close()
        udp.close()
    assert tcp.log.errors == [] and udp.log.errors == []
    assert tcp.sequence() == list(range(tcp.sent)), "TCP records lost or reordered"
    assert retransmitted == 0, f"{retransmitted} TCP segments had to be sent again"
    missing = sorted(set(range(udp.sent)) - set(udp.sequence()))
    assert missing == [], f"{len(missing)} of {udp.sent} UDP datagrams lost: {missing[:10]}"
    lab.expect("i-client", "i-srv", "tcp", 80, allowed=True)
    lab.assert_second_sync_is_noop()


def test_tcp_stream_has_no_retransmission_across_a_rule_change(lab: EnforcedLab) -> None:
    lab.up(_service(True))
    stream = TcpStream(lab.ns("i-client"), lab.ns("i-srv"), lab.address("i-client"),
                       lab.address("i-srv"), 80)
    try:
        assert stream.wait_for(25, 2.0)
        before = stream.retransmissions()
        lab.change(_service(True, extra=({"direction": "egress", "ip_protocol": "UDP",
                                          "port_range": "53/53", "dest_cidr_ip": "0.0.0.0/0",
                                          "policy": "drop"},)))
        mark = stream.count()
        assert stream.wait_for(mark + 50, 2.0), "the stream stalled after the change"
        assert stream.retransmissions() == before, "segments were lost during the change"
    finally:
        stream.close()
    assert stream.log.errors == []
    lab.assert_second_sync_is_noop()


def _assert_cut(stream: TcpStream | UdpStream, since: float, what: str) -> None:
    time.sleep(CUT_WINDOW)
    leaked = stream.arrivals_between(since + CUT_GRACE, since + CUT_WINDOW)
    assert leaked == 0, f"{what}: {leaked} records got through after the change returned"


def test_revoking_the_rule_cuts_an_established_tcp_flow_and_restoring_revives_it(
    lab: EnforcedLab,
) -> None:
    lab.up(_service(True))
    stream = TcpStream(lab.ns("i-client"), lab.ns("i-srv"), lab.address("i-client"),
                       lab.address("i-srv"), 80)
    try:
        assert stream.wait_for(25, 2.0)
        report = lab.change(_service(False))
        cut_at = time.monotonic()
        assert sum(report.flows_cut.values()) >= 1
        assert lab.rules_of("eni-srv", "ingress") == {}
        _assert_cut(stream, cut_at, "revoked TCP flow")
        lab.expect("i-client", "i-srv", "tcp", 80, allowed=False)
        lab.assert_second_sync_is_noop()

        # Allowed again before the session timed out: the same connection goes on.
        lab.change(_service(True))
        mark = stream.count()
        assert stream.wait_for(mark + 25, 5.0), "the connection did not resume"
        assert stream.finish(), "records still missing after 2 s"
    finally:
        stream.close()
    assert stream.log.errors == []
    # TCP retransmitted what was dropped: nothing is missing, nothing out of order.
    assert stream.sequence() == list(range(stream.sent))
    lab.expect("i-client", "i-srv", "tcp", 80, allowed=True)
    lab.assert_second_sync_is_noop()


def test_revoking_the_rule_cuts_an_established_udp_flow_and_restoring_revives_it(
    lab: EnforcedLab,
) -> None:
    lab.up(_service(True))
    stream = UdpStream(lab.ns("i-client"), lab.ns("i-srv"), lab.address("i-client"),
                       lab.address("i-srv"), 9000)
    try:
        assert stream.wait_for(25, 2.0)
        lab.change(_service(False))
        cut_at = time.monotonic()
        _assert_cut(stream, cut_at, "revoked UDP flow")
        # The stream's server socket holds UDP 9000 on i-srv, so a fresh probe there
        # cannot bind; TCP 80 was revoked by the same change.
        lab.expect("i-client", "i-srv", "tcp", 80, allowed=False)
        lab.assert_second_sync_is_noop()

        lab.change(_service(True))
        mark = stream.count()
        assert stream.wait_for(mark + 25, 2.0), "the UDP flow did not resume"
    finally:
        stream.close()
    lab.assert_second_sync_is_noop()


def test_leaving_the_referenced_group_cuts_the_flow_and_rejoining_revives_it(
    lab: EnforcedLab,
) -> None:
    def topo(client_groups: list[str]) -> dict[str, Any]:
        return topology(
            security_groups=[
                {"security_group_id": "sg-db",
                 "permissions": [{"direction": "ingress", "ip_protocol": "TCP",
                                  "port_range": "5432/5432", "source_group_id": "sg-app"}]},
                {"security_group_id": "sg-app"},
                {"security_group_id": "sg-other"},
            ],
            instances=[
                instance("i-db", "10.0.1.10", ["sg-db"], ipv6="2001:db8:1:1::10"),
                instance("i-app", "10.0.1.20", client_groups, ipv6="2001:db8:1:1::20"),
            ],
        )

    lab.up(topo(["sg-app"]))
    stream = TcpStream(lab.ns("i-app"), lab.ns("i-db"), lab.address("i-app", "ipv6"),
                       lab.address("i-db", "ipv6"), 5432)
    try:
        assert stream.wait_for(25, 2.0)
        lab.change(topo(["sg-other"]))  # ModifyNetworkInterfaceAttribute: a new group list
        cut_at = time.monotonic()
        assert "2001:db8:1:1::20" not in str(lab.rules_of("eni-db", "ingress"))
        _assert_cut(stream, cut_at, "flow of an ENI that left the referenced group")
        lab.expect("i-app", "i-db", "tcp", 5432, family="ipv6", allowed=False)

        lab.change(topo(["sg-app", "sg-other"]))
        mark = stream.count()
        assert stream.wait_for(mark + 25, 5.0), "the connection did not resume"
    finally:
        stream.close()
    assert stream.log.errors == []
    lab.expect("i-app", "i-db", "tcp", 5432, family="ipv6", allowed=True)
    lab.assert_second_sync_is_noop()


def test_switching_inner_policy_to_drop_cuts_intra_group_flows(lab: EnforcedLab) -> None:
    def topo(policy: str) -> dict[str, Any]:
        return topology(
            security_groups=[{"security_group_id": "sg-peers", "inner_access_policy": policy}],
            instances=[
                instance("i-a", "10.0.1.10", ["sg-peers"]),
                instance("i-b", "10.0.1.20", ["sg-peers"]),
            ],
        )

    lab.up(topo("Accept"))
    stream = UdpStream(lab.ns("i-a"), lab.ns("i-b"), lab.address("i-a"), lab.address("i-b"), 4789)
    try:
        assert stream.wait_for(25, 2.0)
        lab.change(topo("Drop"))
        cut_at = time.monotonic()
        assert "intra_sg-peers" not in lab.kernel_sets()
        _assert_cut(stream, cut_at, "intra-group flow after the policy became Drop")
        lab.expect("i-a", "i-b", "tcp", 22, allowed=False)

        lab.change(topo("Accept"))
        mark = stream.count()
        assert stream.wait_for(mark + 25, 2.0), "the flow did not resume"
    finally:
        stream.close()
    lab.expect("i-a", "i-b", "tcp", 22, allowed=True)
    lab.assert_second_sync_is_noop()


def test_sessions_are_tracked_for_at_most_910_seconds_idle(lab: EnforcedLab) -> None:
    lab.up(_service(True))
    stream = TcpStream(lab.ns("i-client"), lab.ns("i-srv"), lab.address("i-client"),
                       lab.address("i-srv"), 80)
    try:
        assert stream.wait_for(5, 2.0)
        listing = subprocess.run(
            ["ip", "netns", "exec", lab.router(), "conntrack", "-L", "-p", "tcp",
             "--dport", "80", "--sport", str(stream.sport)],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout
    finally:
        stream.close()
    match = re.search(r"^tcp\s+6\s+(\d+)\s+ESTABLISHED", listing, re.M)
    assert match, f"no established entry for the flow in the router:\n{listing}"
    assert int(match.group(1)) <= 910, f"an idle established session lives {match.group(1)} s"
    lab.assert_second_sync_is_noop()


def test_removing_a_prefix_list_entry_cuts_flows_from_that_range(lab: EnforcedLab) -> None:
    def topo(entries: list[str]) -> dict[str, Any]:
        return topology(
            prefix_lists=[{"prefix_list_id": "pl-partners", "address_family": "IPv4",
                           "max_entries": 5, "entries": entries}],
            security_groups=[
                {"security_group_id": "sg-api",
                 "permissions": [{"direction": "ingress", "ip_protocol": "UDP",
                                  "port_range": "8125/8125",
                                  "source_prefix_list_id": "pl-partners"}]},
            ],
            instances=[instance("i-api", "10.0.1.10", ["sg-api"])],
            external_hosts=[OFFICE, INTERNET],
        )

    lab.up(topo(["198.51.100.0/24", "203.0.113.0/24"]))
    office = UdpStream(lab.ns("office"), lab.ns("i-api"), lab.address("office"),
                       lab.address("i-api"), 8125)
    try:
        assert office.wait_for(25, 2.0)
        report = lab.change(topo(["203.0.113.0/24"]))
        cut_at = time.monotonic()
        assert not any(report.full.values())
        assert lab.rules_of("eni-api", "ingress") == {
            (1, "accept"): {("udp", "203.0.113.0/24", "8125", "*", "*")}
        }
        _assert_cut(office, cut_at, "flow from a removed prefix-list entry")
    finally:
        office.close()
    lab.expect("office", "i-api", "udp", 8125, allowed=False)
    lab.expect("internet", "i-api", "udp", 8125, allowed=True)
    lab.assert_second_sync_is_noop()


# -- anti-spoofing --------------------------------------------------------------------


def _open_topology() -> dict[str, Any]:
    everything = [
        {"direction": "ingress", "ip_protocol": "ALL", "port_range": "-1/-1",
         "source_cidr_ip": "0.0.0.0/0"},
        {"direction": "ingress", "ip_protocol": "ALL", "port_range": "-1/-1",
         "ipv6_source_cidr_ip": "::/0"},
    ]
    return topology(
        security_groups=[
            {"security_group_id": "sg-open", "inner_access_policy": "Drop",
             "permissions": everything},
        ],
        instances=[
            instance("i-a", "10.0.1.10", ["sg-open"], ipv6="2001:db8:1:1::10"),
            instance("i-b", "10.0.1.20", ["sg-open"], ipv6="2001:db8:1:1::20"),
            instance("i-c", "10.0.1.30", ["sg-open"], ipv6="2001:db8:1:1::30"),
        ],
        external_hosts=[INTERNET],
    )


def test_packets_with_an_address_the_model_does_not_know_are_dropped(lab: EnforcedLab) -> None:
    lab.up(_open_topology())
    a_port = lab.eni("i-a").ifname
    assert {"concat": [a_port, "10.0.1.10"]} in lab.kernel_sets()["port_addrs_v4"]
    assert [r["comment"] for r in lab.kernel_rules("forward")][:2] == [
        "anti-spoofing ipv4", "anti-spoofing ipv6"]
    # The rules would accept anything from anywhere into i-b: only anti-spoofing stops these.
    lab.expect("i-a", "i-b", "udp", 5000, allowed=True)
    assert lab.send_udp_from("i-a", "10.0.1.10", "i-b", 5000, add_address=False)
    assert not lab.send_udp_from("i-a", "10.0.1.99", "i-b", 5000, add_address=True)
    assert not lab.send_udp_from("i-a", "2001:db8:1:1::99", "i-b", 5000, family="ipv6",
                                 add_address=True)
    assert not lab.send_udp_from("internet", "203.0.113.51", "i-b", 5000, add_address=True)
    # The forged addresses were removed again: genuine traffic is unaffected.
    lab.expect("i-a", "i-b", "udp", 5000, family="ipv6", allowed=True)
    lab.assert_second_sync_is_noop()


def test_packets_with_another_enis_address_are_dropped(lab: EnforcedLab) -> None:
    lab.up(_open_topology())
    assert lab.network is not None
    # i-c's own flow to i-b is allowed; i-a pretending to be i-c is not.
    for family, forged in (("ipv4", "10.0.1.30"), ("ipv6", "2001:db8:1:1::30")):
        flow = Flow(lab.address("i-c", family), lab.address("i-b", family), 17, 5000, 40000)
        assert evaluate(lab.network, flow).verdict == "accept"
        assert lab.send_udp_from("i-c", forged, "i-b", 5000, family=family, add_address=False)
        assert not lab.send_udp_from("i-a", forged, "i-b", 5000, family=family, add_address=True)
    lab.assert_second_sync_is_noop()


# -- a rejected change touches nothing -------------------------------------------------


def test_a_rejected_change_leaves_rules_and_traffic_as_they_were(lab: EnforcedLab) -> None:
    good = _service(True)
    lab.up(good)
    before = (lab.kernel_sets(), {c: lab.kernel_rules(c) for c in lab.kernel_chains()})
    mixed = _service(True)
    mixed["security_groups"].append(
        {"security_group_id": "sg-ent", "vpc_id": "vpc-t", "security_group_type": "enterprise"})
    mixed["instances"][0]["security_group_ids"] = ["sg-srv", "sg-ent"]
    too_many = _service(True)
    too_many["security_groups"] += [
        {"security_group_id": f"sg-x{i}", "vpc_id": "vpc-t"} for i in range(10)]
    too_many["instances"][0]["security_group_ids"] = ["sg-srv"] + [f"sg-x{i}" for i in range(10)]
    bare_port = _service(True, extra=({"direction": "ingress", "ip_protocol": "TCP",
                                       "port_range": "22", "source_cidr_ip": "0.0.0.0/0"},))
    ref_advanced = _service(True, extra=({"direction": "ingress", "ip_protocol": "TCP",
                                          "port_range": "22/22", "source_group_id": "sg-ent"},))
    ref_advanced["security_groups"].append(
        {"security_group_id": "sg-ent", "vpc_id": "vpc-t", "security_group_type": "enterprise"})
    for bad, code in ((mixed, "InvalidSecurityGroupType.Mixed"),
                      (ref_advanced, "InvalidGroupAuthParameter.OperationDenied"),
                      (too_many, "InstanceSecurityGroupLimitExceeded"),
                      (bare_port, "InvalidPortRange.Malformed")):
        with pytest.raises(EcsError) as caught:
            lab.change(bad)
        assert caught.value.code == code
    after = (lab.kernel_sets(), {c: lab.kernel_rules(c) for c in lab.kernel_chains()})
    assert after == before
    lab.expect("i-client", "i-srv", "tcp", 80, allowed=True)
    lab.expect("office", "i-srv", "tcp", 22, allowed=False)
    lab.assert_second_sync_is_noop()

