"""Real-traffic scenarios: protocols, address families, port ranges, external hosts, defaults.

Each test builds a small topology, enforces it with nftsg, and checks three
things: the ruleset in the kernel, the traffic (the reference evaluator's
prediction, the scenario's expectation and the kernel's behaviour all agree),
and that a second sync changes nothing. docs/semantics.md §"A rule",
§Defaults and §Vocabulary (external hosts, default group).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import EnforcedLab, instance, topology

OFFICE = {"name": "office", "ip_address": "198.51.100.7", "ipv6_address": "2001:db8:ffff::7"}
INTERNET = {"name": "internet", "ip_address": "203.0.113.50", "ipv6_address": "2001:db8:ffff::50"}


@pytest.fixture
def lab(lab_prefix: str) -> Iterator[EnforcedLab]:
    enforced = EnforcedLab(lab_prefix)
    try:
        yield enforced
    finally:
        enforced.close()


def test_tcp_ingress_rule_opens_one_port_in_one_direction(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-web",
                    "permissions": [
                        {"direction": "ingress", "ip_protocol": "TCP", "port_range": "80/80",
                         "source_cidr_ip": "10.0.0.0/16"},
                    ],
                },
                {"security_group_id": "sg-client"},
            ],
            instances=[
                instance("i-web", "10.0.1.10", ["sg-web"]),
                instance("i-client", "10.0.1.20", ["sg-client"]),
            ],
        )
    )
    forward = lab.kernel_chains()["forward"]
    assert (forward["hook"], forward["policy"]) == ("forward", "drop")
    assert lab.rules_of("eni-web", "ingress") == {
        (1, "accept"): {("tcp", "10.0.0.0/16", "80", "*", "*")}
    }
    assert lab.default_verdict("eni-web", "ingress") == "drop"
    assert lab.default_verdict("eni-web", "egress") == "return"  # basic: egress open

    lab.expect("i-client", "i-web", "tcp", 80, allowed=True)
    lab.expect("i-client", "i-web", "tcp", 81, allowed=False)
    lab.expect("i-client", "i-web", "ping", allowed=False)
    # The other direction meets the client's ingress, which has no rule.
    lab.expect("i-web", "i-client", "tcp", 80, allowed=False)
    lab.assert_second_sync_is_noop()


def test_udp_request_and_reply_in_both_families(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-dns",
                    "permissions": [
                        {"direction": "ingress", "ip_protocol": "UDP", "port_range": "53/53",
                         "source_cidr_ip": "10.0.1.0/24"},
                        {"direction": "ingress", "ip_protocol": "UDP", "port_range": "53/53",
                         "ipv6_source_cidr_ip": "2001:db8:1:1::/64"},
                    ],
                },
                {"security_group_id": "sg-client"},
            ],
            instances=[
                instance("i-dns", "10.0.1.10", ["sg-dns"], ipv6="2001:db8:1:1::10"),
                instance("i-client", "10.0.1.20", ["sg-client"], ipv6="2001:db8:1:1::20"),
            ],
        )
    )
    assert lab.rules_of("eni-dns", "ingress") == {
        (1, "accept"): {
            ("udp", "10.0.1.0/24", "53", "*", "*"),
            ("udp", "2001:db8:1:1::/64", "53", "*", "*"),
        }
    }
    for family in ("ipv4", "ipv6"):
        lab.expect("i-client", "i-dns", "udp", 53, family=family, allowed=True)
        lab.expect("i-client", "i-dns", "udp", 54, family=family, allowed=False)
        lab.expect("i-client", "i-dns", "tcp", 53, family=family, allowed=False)
        lab.expect("i-dns", "i-client", "udp", 53, family=family, allowed=False)
    lab.assert_second_sync_is_noop()


def test_icmp_rule_pings_ipv4_only_and_icmpv6_rule_adds_ipv6(lab: EnforcedLab) -> None:
    def topo(with_icmpv6: bool) -> dict[str, object]:
        rules = [{"direction": "ingress", "ip_protocol": "ICMP", "port_range": "-1/-1",
                  "source_cidr_ip": "0.0.0.0/0"}]
        if with_icmpv6:
            rules.append({"direction": "ingress", "ip_protocol": "ICMPv6", "port_range": "-1/-1",
                          "ipv6_source_cidr_ip": "::/0"})
        return topology(
            security_groups=[
                {"security_group_id": "sg-ping", "permissions": rules},
                {"security_group_id": "sg-client"},
            ],
            instances=[
                instance("i-target", "10.0.1.10", ["sg-ping"], ipv6="2001:db8:1:1::10"),
                instance("i-client", "10.0.1.20", ["sg-client"], ipv6="2001:db8:1:1::20"),
            ],
        )

    lab.up(topo(with_icmpv6=False))
    assert lab.rules_of("eni-target", "ingress") == {(1, "accept"): {("icmp", "*", "*", "*", "*")}}
    lab.expect("i-client", "i-target", "ping", allowed=True)
    lab.expect("i-client", "i-target", "ping", family="ipv6", allowed=False)
    lab.expect("i-target", "i-client", "ping", allowed=False)
    lab.assert_second_sync_is_noop()

    lab.change(topo(with_icmpv6=True))
    assert ("icmpv6", "*", "*", "*", "*") in lab.rules_of("eni-target", "ingress")[(1, "accept")]
    lab.expect("i-client", "i-target", "ping", family="ipv6", allowed=True)
    lab.expect("i-client", "i-target", "ping", allowed=True)
    lab.expect("i-target", "i-client", "ping", family="ipv6", allowed=False)
    lab.assert_second_sync_is_noop()


def test_icmp_rule_covers_every_icmp_type(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-target",
                    "permissions": [
                        {"direction": "ingress", "ip_protocol": "ICMP", "port_range": "-1/-1",
                         "source_cidr_ip": "10.0.1.20/32"},
                    ],
                },
                {"security_group_id": "sg-client"},
            ],
            instances=[
                instance("i-target", "10.0.1.10", ["sg-target"]),
                instance("i-client", "10.0.1.20", ["sg-client"]),
                instance("i-other", "10.0.1.30", ["sg-client"]),
            ],
        )
    )
    assert lab.rules_of("eni-target", "ingress") == {
        (1, "accept"): {("icmp", "10.0.1.20", "*", "*", "*")}
    }
    lab.expect("i-client", "i-target", "ping", allowed=True)
    lab.expect("i-client", "i-target", "icmp-timestamp", allowed=True)
    lab.expect("i-other", "i-target", "icmp-timestamp", allowed=False)
    lab.assert_second_sync_is_noop()


def test_ipv4_rule_does_not_open_ipv6_and_ipv6_rule_does_not_open_ipv4(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-web",
                    "permissions": [
                        {"direction": "ingress", "ip_protocol": "TCP", "port_range": "80/80",
                         "source_cidr_ip": "0.0.0.0/0"},
                        {"direction": "ingress", "ip_protocol": "TCP", "port_range": "443/443",
                         "ipv6_source_cidr_ip": "::/0"},
                    ],
                },
            ],
            instances=[instance("i-web", "10.0.1.10", ["sg-web"], ipv6="2001:db8:1:1::10")],
            external_hosts=[INTERNET],
        )
    )
    assert lab.rules_of("eni-web", "ingress", family="ipv4") == {
        (1, "accept"): {("tcp", "*", "80", "*", "*")}
    }
    assert lab.rules_of("eni-web", "ingress", family="ipv6") == {
        (1, "accept"): {("tcp", "*", "443", "*", "*")}
    }
    lab.expect("internet", "i-web", "tcp", 80, allowed=True)
    lab.expect("internet", "i-web", "tcp", 80, family="ipv6", allowed=False)
    lab.expect("internet", "i-web", "tcp", 443, family="ipv6", allowed=True)
    lab.expect("internet", "i-web", "tcp", 443, allowed=False)
    lab.assert_second_sync_is_noop()


def test_tcp_port_range_edges(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-app",
                    "permissions": [
                        # Protocol names are case-insensitive on input.
                        {"direction": "ingress", "ip_protocol": "tcp", "port_range": "8000/8010",
                         "source_cidr_ip": "10.0.1.0/24"},
                    ],
                },
                {"security_group_id": "sg-client"},
            ],
            instances=[
                instance("i-app", "10.0.1.10", ["sg-app"]),
                instance("i-client", "10.0.1.20", ["sg-client"]),
            ],
        )
    )
    assert lab.rules_of("eni-app", "ingress") == {
        (1, "accept"): {("tcp", "10.0.1.0/24", "8000-8010", "*", "*")}
    }
    lab.expect("i-client", "i-app", "tcp", 8000, allowed=True)
    lab.expect("i-client", "i-app", "tcp", 8010, allowed=True)
    lab.expect("i-client", "i-app", "tcp", 7999, allowed=False)
    lab.expect("i-client", "i-app", "tcp", 8011, allowed=False)
    lab.assert_second_sync_is_noop()


def test_udp_port_range_edges_over_ipv6(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-media",
                    "permissions": [
                        {"direction": "ingress", "ip_protocol": "UDP", "port_range": "5000/5005",
                         "ipv6_source_cidr_ip": "::/0"},
                    ],
                },
            ],
            instances=[instance("i-media", "10.0.1.10", ["sg-media"], ipv6="2001:db8:1:1::10")],
            external_hosts=[INTERNET],
        )
    )
    assert lab.rules_of("eni-media", "ingress") == {
        (1, "accept"): {("udp", "*", "5000-5005", "*", "*")}
    }
    for port, ok in ((5000, True), (5005, True), (4999, False), (5006, False)):
        lab.expect("internet", "i-media", "udp", port, family="ipv6", allowed=ok)
    lab.expect("internet", "i-media", "udp", 5000, allowed=False)  # no IPv4 rule
    lab.assert_second_sync_is_noop()


def test_tcp_source_port_range_edges(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-api",
                    "permissions": [
                        {"direction": "ingress", "ip_protocol": "TCP", "port_range": "443/443",
                         "source_port_range": "40000/40010", "source_cidr_ip": "0.0.0.0/0"},
                    ],
                },
            ],
            instances=[instance("i-api", "10.0.1.10", ["sg-api"])],
            external_hosts=[OFFICE],
        )
    )
    assert lab.rules_of("eni-api", "ingress") == {
        (1, "accept"): {("tcp", "*", "443", "40000-40010", "*")}
    }
    for sport, ok in ((40000, True), (40010, True), (39999, False), (40011, False)):
        lab.expect("office", "i-api", "tcp", 443, sport=sport, allowed=ok)
    lab.assert_second_sync_is_noop()


def test_udp_source_port_range_edges(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-ntp",
                    "permissions": [
                        {"direction": "ingress", "ip_protocol": "UDP", "port_range": "123/123",
                         "source_port_range": "123/124", "source_cidr_ip": "10.0.0.0/16"},
                    ],
                },
                {"security_group_id": "sg-client"},
            ],
            instances=[
                instance("i-ntp", "10.0.1.10", ["sg-ntp"]),
                instance("i-client", "10.0.2.20", ["sg-client"], vswitch="vsw-b"),
            ],
        )
    )
    assert lab.rules_of("eni-ntp", "ingress") == {
        (1, "accept"): {("udp", "10.0.0.0/16", "123", "123-124", "*")}
    }
    for sport, ok in ((123, True), (124, True), (122, False), (125, False)):
        lab.expect("i-client", "i-ntp", "udp", 123, sport=sport, allowed=ok)
    lab.assert_second_sync_is_noop()


def test_all_protocol_rule_opens_tcp_udp_icmp_and_gre_of_its_family(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-trust",
                    "permissions": [
                        {"direction": "ingress", "ip_protocol": "all", "port_range": "-1/-1",
                         "source_cidr_ip": "10.0.1.20/32"},
                    ],
                },
                {"security_group_id": "sg-client"},
            ],
            instances=[
                instance("i-trust", "10.0.1.10", ["sg-trust"], ipv6="2001:db8:1:1::10"),
                instance("i-friend", "10.0.1.20", ["sg-client"], ipv6="2001:db8:1:1::20"),
                instance("i-stranger", "10.0.1.30", ["sg-client"]),
            ],
        )
    )
    assert lab.rules_of("eni-trust", "ingress") == {
        (1, "accept"): {("*", "10.0.1.20", "*", "*", "*")}
    }
    lab.expect("i-friend", "i-trust", "tcp", 80, allowed=True)
    lab.expect("i-friend", "i-trust", "tcp", 65535, allowed=True)
    lab.expect("i-friend", "i-trust", "udp", 9999, allowed=True)
    lab.expect("i-friend", "i-trust", "ping", allowed=True)
    lab.expect("i-friend", "i-trust", "gre", allowed=True)
    lab.expect("i-stranger", "i-trust", "tcp", 80, allowed=False)
    lab.expect("i-stranger", "i-trust", "ping", allowed=False)
    # An IPv4 peer: the same host over IPv6 is not covered.
    lab.expect("i-friend", "i-trust", "tcp", 80, family="ipv6", allowed=False)
    lab.expect("i-friend", "i-trust", "ping", family="ipv6", allowed=False)
    lab.assert_second_sync_is_noop()


def test_gre_rule_opens_gre_only(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-tunnel",
                    "permissions": [
                        {"direction": "ingress", "ip_protocol": "GRE", "port_range": "-1/-1",
                         "source_cidr_ip": "10.0.1.0/24"},
                        {"direction": "ingress", "ip_protocol": "GRE", "port_range": "-1/-1",
                         "ipv6_source_cidr_ip": "2001:db8:1:1::/64"},
                    ],
                },
                {"security_group_id": "sg-client"},
            ],
            instances=[
                instance("i-tunnel", "10.0.1.10", ["sg-tunnel"], ipv6="2001:db8:1:1::10"),
                instance("i-peer", "10.0.1.20", ["sg-client"], ipv6="2001:db8:1:1::20"),
                instance("i-far", "10.0.2.20", ["sg-client"], vswitch="vsw-b"),
            ],
        )
    )
    assert lab.rules_of("eni-tunnel", "ingress") == {
        (1, "accept"): {("gre", "10.0.1.0/24", "*", "*", "*"),
                        ("gre", "2001:db8:1:1::/64", "*", "*", "*")}
    }
    # First, before any GRE flow exists: GRE has no ports, so once i-peer's flow to
    # i-tunnel is established, packets back from i-tunnel are its replies.
    lab.expect("i-tunnel", "i-peer", "gre", allowed=False)
    lab.expect("i-peer", "i-tunnel", "gre", allowed=True)
    lab.expect("i-peer", "i-tunnel", "gre", family="ipv6", allowed=True)
    lab.expect("i-peer", "i-tunnel", "tcp", 80, allowed=False)
    lab.expect("i-peer", "i-tunnel", "ping", allowed=False)
    lab.expect("i-far", "i-tunnel", "gre", allowed=False)
    lab.assert_second_sync_is_noop()


def test_egress_drop_rule_of_a_basic_group(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-locked",
                    "permissions": [
                        {"direction": "egress", "ip_protocol": "TCP", "port_range": "443/443",
                         "dest_cidr_ip": "0.0.0.0/0", "policy": "drop"},
                    ],
                },
            ],
            instances=[instance("i-locked", "10.0.1.10", ["sg-locked"], ipv6="2001:db8:1:1::10")],
            external_hosts=[INTERNET],
        )
    )
    assert lab.rules_of("eni-locked", "egress") == {(1, "drop"): {("tcp", "*", "443", "*", "*")}}
    assert lab.default_verdict("eni-locked", "egress") == "return"
    lab.expect("i-locked", "internet", "tcp", 443, allowed=False)
    lab.expect("i-locked", "internet", "tcp", 80, allowed=True)  # basic: egress default accept
    lab.expect("i-locked", "internet", "udp", 443, allowed=True)
    lab.expect("i-locked", "internet", "tcp", 443, family="ipv6", allowed=True)
    lab.assert_second_sync_is_noop()


def test_external_hosts_only_the_eni_side_is_evaluated(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-web",
                    "permissions": [
                        {"direction": "ingress", "ip_protocol": "TCP", "port_range": "22/22",
                         "source_cidr_ip": "198.51.100.0/24"},
                        {"direction": "egress", "ip_protocol": "TCP", "port_range": "25/25",
                         "dest_cidr_ip": "203.0.113.0/24", "policy": "drop"},
                    ],
                },
            ],
            instances=[instance("i-web", "10.0.1.10", ["sg-web"])],
            external_hosts=[OFFICE, INTERNET],
        )
    )
    ports = set(lab.kernel_sets()["ports"])
    assert len(ports) == 3 and lab.eni("i-web").ifname in ports
    # External hosts' ports are routed but meet no group rule of their own.
    assert lab.enforced_ports() == {lab.eni("i-web").ifname}

    lab.expect("office", "i-web", "tcp", 22, allowed=True)
    lab.expect("internet", "i-web", "tcp", 22, allowed=False)
    lab.expect("i-web", "internet", "tcp", 80, allowed=True)
    lab.expect("i-web", "internet", "tcp", 25, allowed=False)
    # Neither end is an ENI: no group governs the flow.
    lab.expect("office", "internet", "tcp", 25, allowed=True)
    lab.assert_second_sync_is_noop()


def test_default_group_allows_ssh_rdp_icmp_and_open_egress(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            instances=[
                instance(
                    "i-a", "10.0.1.10", None, ipv6="2001:db8:1:1::10",
                    network_interfaces=[
                        {"network_interface_id": "eni-a2", "vswitch_id": "vsw-b",
                         "primary_ip_address": "10.0.2.10"},
                    ],
                ),
                instance("i-b", "10.0.1.20", None),
            ],
            external_hosts=[INTERNET],
        )
    )
    net = lab.network
    assert net is not None
    assert net.groups["sg-default-t"].is_vpc_default
    assert net.enis["eni-a"].group_ids == net.enis["eni-a2"].group_ids == ("sg-default-t",)
    assert lab.rules_of("eni-a", "ingress") == {
        (100, "accept"): {
            ("tcp", "*", "22", "*", "*"),
            ("tcp", "*", "3389", "*", "*"),
            ("icmp", "*", "*", "*", "*"),
        }
    }
    assert lab.rules_of("eni-a", "egress") == {}

    lab.expect("internet", "i-a", "tcp", 22, allowed=True)
    lab.expect("internet", "i-a", "tcp", 3389, allowed=True)
    lab.expect("internet", "i-a", "ping", allowed=True)
    lab.expect("internet", "i-a", "tcp", 80, allowed=False)
    lab.expect("internet", "i-a", "udp", 22, allowed=False)
    lab.expect("internet", "i-a", "ping", family="ipv6", allowed=False)  # IPv4 rules only
    lab.expect("internet", "eni-a2", "tcp", 22, allowed=True)  # secondary ENI, no group given
    lab.expect("internet", "eni-a2", "tcp", 80, allowed=False)
    lab.expect("i-a", "internet", "tcp", 80, allowed=True)
    lab.expect("i-a", "internet", "udp", 53, family="ipv6", allowed=True)
    # The default group's inner policy is Accept: members talk freely.
    lab.expect("i-b", "i-a", "tcp", 80, allowed=True)
    lab.assert_second_sync_is_noop()


def test_group_without_rules_drops_inbound_and_leaves_outbound_open(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[{"security_group_id": "sg-empty"}],
            instances=[instance("i-a", "10.0.1.10", ["sg-empty"], ipv6="2001:db8:1:1::10")],
            external_hosts=[INTERNET],
        )
    )
    assert lab.rules_of("eni-a", "ingress") == {}
    assert lab.default_verdict("eni-a", "ingress") == "drop"
    for family in ("ipv4", "ipv6"):
        lab.expect("internet", "i-a", "tcp", 22, family=family, allowed=False)
        lab.expect("internet", "i-a", "udp", 53, family=family, allowed=False)
        lab.expect("internet", "i-a", "ping", family=family, allowed=False)
        lab.expect("i-a", "internet", "tcp", 443, family=family, allowed=True)
        lab.expect("i-a", "internet", "ping", family=family, allowed=True)
    lab.assert_second_sync_is_noop()


def test_rules_of_a_managed_group_are_enforced(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-managed",
                    "service_managed": True,
                    "permissions": [
                        {"direction": "ingress", "ip_protocol": "TCP", "port_range": "6443/6443",
                         "source_cidr_ip": "203.0.113.0/24"},
                    ],
                },
            ],
            instances=[instance("i-node", "10.0.1.10", ["sg-managed"])],
            external_hosts=[INTERNET, OFFICE],
        )
    )
    assert lab.rules_of("eni-node", "ingress") == {
        (1, "accept"): {("tcp", "203.0.113.0/24", "6443", "*", "*")}
    }
    lab.expect("internet", "i-node", "tcp", 6443, allowed=True)
    lab.expect("office", "i-node", "tcp", 6443, allowed=False)
    lab.assert_second_sync_is_noop()
