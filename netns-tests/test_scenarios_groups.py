"""Real-traffic scenarios: pooled rules and priorities, several groups per ENI, secondary
ENIs, 5-tuple rules, group references, intra-group policy, advanced groups, prefix lists.

docs/semantics.md §Vocabulary, §"A rule", §"Group references" and §"Evaluation of
a new flow" (every step, and what it means for Drop-policy and advanced groups).
Every test checks the kernel's ruleset, the traffic against the reference
evaluator, and that a second sync sends nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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


def tcp_in(port: str, cidr: str = "0.0.0.0/0", **more: Any) -> dict[str, Any]:
    return {"direction": "ingress", "ip_protocol": "TCP", "port_range": port,
            "source_cidr_ip": cidr, **more}


# -- priorities and pooling -----------------------------------------------------


def test_smaller_priority_number_wins_either_way(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-srv",
                    "permissions": [
                        tcp_in("80/80", priority=1),
                        tcp_in("80/80", policy="drop", priority=2),
                        tcp_in("443/443", priority=2),
                        tcp_in("443/443", policy="drop", priority=1),
                    ],
                },
            ],
            instances=[instance("i-srv", "10.0.1.10", ["sg-srv"])],
            external_hosts=[INTERNET],
        )
    )
    assert lab.rules_of("eni-srv", "ingress") == {
        (1, "accept"): {("tcp", "*", "80", "*", "*")},
        (1, "drop"): {("tcp", "*", "443", "*", "*")},
        (2, "accept"): {("tcp", "*", "443", "*", "*")},
        (2, "drop"): {("tcp", "*", "80", "*", "*")},
    }
    lab.expect("internet", "i-srv", "tcp", 80, allowed=True)
    lab.expect("internet", "i-srv", "tcp", 443, allowed=False)
    lab.assert_second_sync_is_noop()


def test_drop_wins_a_priority_tie_within_one_group(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-srv",
                    "permissions": [
                        tcp_in("80/80", priority=5),
                        tcp_in("80/80", "203.0.113.0/24", policy="drop", priority=5),
                        tcp_in("81/81", priority=5),
                    ],
                },
            ],
            instances=[instance("i-srv", "10.0.1.10", ["sg-srv"])],
            external_hosts=[INTERNET, OFFICE],
        )
    )
    rules = lab.rules_of("eni-srv", "ingress")
    assert rules[(5, "drop")] == {("tcp", "203.0.113.0/24", "80", "*", "*")}
    # Within one priority the drop set is looked up before the accept set.
    assert lab.bucket_order("eni-srv", "ingress") == [(5, "drop"), (5, "accept")]
    lab.expect("internet", "i-srv", "tcp", 80, allowed=False)
    lab.expect("office", "i-srv", "tcp", 80, allowed=True)
    lab.expect("internet", "i-srv", "tcp", 81, allowed=True)
    lab.assert_second_sync_is_noop()


def test_rules_pool_across_groups_and_drop_wins_ties_across_groups(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {"security_group_id": "sg-a",
                 "permissions": [tcp_in("80/80", priority=5), tcp_in("22/22", priority=50)]},
                {"security_group_id": "sg-b",
                 "permissions": [tcp_in("80/80", policy="drop", priority=5),
                                 tcp_in("8080/8080", priority=7),
                                 tcp_in("22/22", "198.51.100.0/24", policy="drop", priority=10)]},
            ],
            instances=[instance("i-srv", "10.0.1.10", ["sg-a", "sg-b"])],
            external_hosts=[INTERNET, OFFICE],
        )
    )
    assert lab.rules_of("eni-srv", "ingress") == {
        (5, "accept"): {("tcp", "*", "80", "*", "*")},
        (5, "drop"): {("tcp", "*", "80", "*", "*")},
        (7, "accept"): {("tcp", "*", "8080", "*", "*")},
        (10, "drop"): {("tcp", "198.51.100.0/24", "22", "*", "*")},
        (50, "accept"): {("tcp", "*", "22", "*", "*")},
    }
    lab.expect("internet", "i-srv", "tcp", 80, allowed=False)  # tie across groups: drop
    lab.expect("internet", "i-srv", "tcp", 8080, allowed=True)  # only sg-b allows it
    lab.expect("internet", "i-srv", "tcp", 22, allowed=True)  # only sg-a allows it
    # sg-b's drop at 10 beats sg-a's accept at 50: no per-group order.
    lab.expect("office", "i-srv", "tcp", 22, allowed=False)
    lab.assert_second_sync_is_noop()


def test_egress_priorities_allow_one_port_out_of_a_deny_all(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-app",
                    "permissions": [
                        {"direction": "egress", "ip_protocol": "ALL", "port_range": "-1/-1",
                         "dest_cidr_ip": "0.0.0.0/0", "policy": "drop", "priority": 10},
                        {"direction": "egress", "ip_protocol": "TCP", "port_range": "443/443",
                         "dest_cidr_ip": "203.0.113.0/24", "priority": 1},
                    ],
                },
            ],
            instances=[instance("i-app", "10.0.1.10", ["sg-app"], ipv6="2001:db8:1:1::10")],
            external_hosts=[INTERNET, OFFICE],
        )
    )
    assert lab.rules_of("eni-app", "egress") == {
        (1, "accept"): {("tcp", "203.0.113.0/24", "443", "*", "*")},
        (10, "drop"): {("*", "*", "*", "*", "*")},
    }
    lab.expect("i-app", "internet", "tcp", 443, allowed=True)
    lab.expect("i-app", "internet", "tcp", 80, allowed=False)
    lab.expect("i-app", "office", "tcp", 443, allowed=False)
    lab.expect("i-app", "internet", "ping", allowed=False)
    lab.expect("i-app", "internet", "tcp", 443, family="ipv6", allowed=True)  # IPv4 rules only
    lab.assert_second_sync_is_noop()


# -- secondary ENIs and local addresses ---------------------------------------------------


def test_secondary_eni_follows_its_own_groups(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {"security_group_id": "sg-web", "permissions": [tcp_in("80/80")]},
                {"security_group_id": "sg-mgmt",
                 "permissions": [
                     tcp_in("22/22"),
                     {"direction": "egress", "ip_protocol": "ALL", "port_range": "-1/-1",
                      "dest_cidr_ip": "0.0.0.0/0", "policy": "drop"},
                 ]},
            ],
            instances=[
                instance(
                    "i-web", "10.0.1.10", ["sg-web"],
                    network_interfaces=[
                        {"network_interface_id": "eni-web-mgmt", "vswitch_id": "vsw-b",
                         "primary_ip_address": "10.0.2.10", "security_group_ids": ["sg-mgmt"]},
                    ],
                ),
            ],
            external_hosts=[INTERNET],
        )
    )
    assert lab.rules_of("eni-web", "ingress") == {(1, "accept"): {("tcp", "*", "80", "*", "*")}}
    assert lab.rules_of("eni-web-mgmt", "ingress") == {
        (1, "accept"): {("tcp", "*", "22", "*", "*")}
    }
    lab.expect("internet", "i-web", "tcp", 80, allowed=True)
    lab.expect("internet", "i-web", "tcp", 22, allowed=False)
    lab.expect("internet", "eni-web-mgmt", "tcp", 22, allowed=True)
    lab.expect("internet", "eni-web-mgmt", "tcp", 80, allowed=False)
    # Leaving from the secondary ENI's address meets sg-mgmt's egress, not sg-web's.
    lab.expect("i-web", "internet", "tcp", 443, allowed=True)
    lab.expect("eni-web-mgmt", "internet", "tcp", 443, allowed=False)
    lab.assert_second_sync_is_noop()


def test_local_address_rules_select_one_address_of_an_eni(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {
                    "security_group_id": "sg-multi",
                    "permissions": [
                        tcp_in("80/80", dest_cidr_ip="10.0.1.11/32"),
                        {"direction": "egress", "ip_protocol": "TCP", "port_range": "443/443",
                         "dest_cidr_ip": "0.0.0.0/0", "source_cidr_ip": "10.0.1.11/32",
                         "policy": "drop"},
                    ],
                },
            ],
            instances=[
                instance("i-multi", "10.0.1.10", ["sg-multi"],
                         secondary_private_ip_addresses=["10.0.1.11"]),
            ],
            external_hosts=[INTERNET],
        )
    )
    assert lab.rules_of("eni-multi", "ingress") == {
        (1, "accept"): {("tcp", "*", "80", "*", "10.0.1.11")}
    }
    assert lab.rules_of("eni-multi", "egress") == {
        (1, "drop"): {("tcp", "*", "443", "*", "10.0.1.11")}
    }
    lab.expect("internet", "i-multi", "tcp", 80, dst_ip="10.0.1.11", allowed=True)
    lab.expect("internet", "i-multi", "tcp", 80, dst_ip="10.0.1.10", allowed=False)
    lab.expect("i-multi", "internet", "tcp", 443, src_ip="10.0.1.11", allowed=False)
    lab.expect("i-multi", "internet", "tcp", 443, src_ip="10.0.1.10", allowed=True)
    lab.assert_second_sync_is_noop()


# -- group references -------------------------------------------------------------------


def _db_topology(app_members: list[str]) -> dict[str, Any]:
    """i-db accepts TCP 5432 from whoever is in sg-app; i-c is in sg-app or not."""
    return topology(
        security_groups=[
            {"security_group_id": "sg-db",
             "permissions": [
                 {"direction": "ingress", "ip_protocol": "TCP", "port_range": "5432/5432",
                  "source_group_id": "sg-app"},
             ]},
            {"security_group_id": "sg-app"},
            {"security_group_id": "sg-other"},
        ],
        instances=[
            instance("i-db", "10.0.1.10", ["sg-db"], ipv6="2001:db8:1:1::10"),
            instance("i-a", "10.0.1.20", ["sg-app"], ipv6="2001:db8:1:1::20"),
            instance("i-c", "10.0.2.30", ["sg-other", *app_members], ipv6="2001:db8:1:2::30",
                     vswitch="vsw-b"),
        ],
    )


def test_group_reference_follows_membership(lab: EnforcedLab) -> None:
    lab.up(_db_topology([]))
    assert lab.rules_of("eni-db", "ingress") == {
        (1, "accept"): {("tcp", "10.0.1.20", "5432", "*", "*"),
                        ("tcp", "2001:db8:1:1::20", "5432", "*", "*")}
    }
    for family in ("ipv4", "ipv6"):
        lab.expect("i-a", "i-db", "tcp", 5432, family=family, allowed=True)
        lab.expect("i-c", "i-db", "tcp", 5432, family=family, allowed=False)
    lab.assert_second_sync_is_noop()

    # i-c joins sg-app: the rule is not edited, the membership set changes by elements.
    report = lab.change(_db_topology(["sg-app"]))
    assert not any(report.full.values())
    assert lab.rules_of("eni-db", "ingress") == {
        (1, "accept"): {("tcp", "10.0.1.20", "5432", "*", "*"),
                        ("tcp", "2001:db8:1:1::20", "5432", "*", "*"),
                        ("tcp", "10.0.2.30", "5432", "*", "*"),
                        ("tcp", "2001:db8:1:2::30", "5432", "*", "*")}
    }
    for family in ("ipv4", "ipv6"):
        lab.expect("i-c", "i-db", "tcp", 5432, family=family, allowed=True)
        lab.expect("i-c", "i-db", "tcp", 5433, family=family, allowed=False)
    lab.assert_second_sync_is_noop()

    # ... and leaves it again.
    lab.change(_db_topology([]))
    assert "10.0.2.30" not in str(lab.rules_of("eni-db", "ingress"))
    for family in ("ipv4", "ipv6"):
        lab.expect("i-c", "i-db", "tcp", 5432, family=family, allowed=False)
        lab.expect("i-a", "i-db", "tcp", 5432, family=family, allowed=True)
    lab.assert_second_sync_is_noop()


def test_egress_group_reference_and_an_empty_group(lab: EnforcedLab) -> None:
    def topo(backend_members: list[str]) -> dict[str, Any]:
        return topology(
            security_groups=[
                {"security_group_id": "sg-front",
                 "permissions": [
                     {"direction": "egress", "ip_protocol": "UDP", "port_range": "9000/9000",
                      "dest_group_id": "sg-back", "priority": 1},
                     {"direction": "egress", "ip_protocol": "ALL", "port_range": "-1/-1",
                      "dest_cidr_ip": "10.0.0.0/16", "policy": "drop", "priority": 2},
                 ]},
                {"security_group_id": "sg-back",
                 "permissions": [{"direction": "ingress", "ip_protocol": "UDP",
                                  "port_range": "9000/9000", "source_cidr_ip": "10.0.0.0/16"}]},
                {"security_group_id": "sg-spare",
                 "permissions": [{"direction": "ingress", "ip_protocol": "UDP",
                                  "port_range": "9000/9000", "source_cidr_ip": "10.0.0.0/16"}]},
            ],
            instances=[
                instance("i-front", "10.0.1.10", ["sg-front"]),
                instance("i-back", "10.0.1.20", backend_members),
            ],
        )

    # The referenced group has no members yet: the reference matches nobody.
    lab.up(topo(["sg-spare"]))
    assert lab.rules_of("eni-front", "egress") == {
        (2, "drop"): {("*", "10.0.0.0/16", "*", "*", "*")}
    }
    lab.expect("i-front", "i-back", "udp", 9000, allowed=False)
    lab.assert_second_sync_is_noop()

    lab.change(topo(["sg-back"]))
    assert lab.rules_of("eni-front", "egress")[(1, "accept")] == {
        ("udp", "10.0.1.20", "9000", "*", "*")
    }
    lab.expect("i-front", "i-back", "udp", 9000, allowed=True)
    lab.expect("i-front", "i-back", "udp", 9001, allowed=False)
    lab.assert_second_sync_is_noop()


def test_cidr_given_with_a_group_wins_over_the_group(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {"security_group_id": "sg-srv",
                 "permissions": [
                     {"direction": "ingress", "ip_protocol": "TCP", "port_range": "80/80",
                      "source_cidr_ip": "10.0.2.0/24", "source_group_id": "sg-cli"},
                 ]},
                {"security_group_id": "sg-cli"},
                {"security_group_id": "sg-other"},
            ],
            instances=[
                instance("i-srv", "10.0.1.10", ["sg-srv"]),
                instance("i-member", "10.0.1.20", ["sg-cli"]),
                instance("i-outsider", "10.0.2.20", ["sg-other"], vswitch="vsw-b"),
            ],
        )
    )
    assert lab.rules_of("eni-srv", "ingress") == {
        (1, "accept"): {("tcp", "10.0.2.0/24", "80", "*", "*")}
    }
    lab.expect("i-outsider", "i-srv", "tcp", 80, allowed=True)
    lab.expect("i-member", "i-srv", "tcp", 80, allowed=False)
    lab.assert_second_sync_is_noop()


# -- intra-group policy -------------------------------------------------------------------


def test_intra_group_accept_beats_custom_drop_rules(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {"security_group_id": "sg-cluster", "inner_access_policy": "Accept",
                 "permissions": [
                     {"direction": "ingress", "ip_protocol": "ALL", "port_range": "-1/-1",
                      "source_cidr_ip": "0.0.0.0/0", "policy": "drop"},
                     {"direction": "egress", "ip_protocol": "ALL", "port_range": "-1/-1",
                      "dest_cidr_ip": "0.0.0.0/0", "policy": "drop"},
                     {"direction": "ingress", "ip_protocol": "ALL", "port_range": "-1/-1",
                      "ipv6_source_cidr_ip": "::/0", "policy": "drop"},
                 ]},
                {"security_group_id": "sg-outside",
                 "permissions": [{"direction": "ingress", "ip_protocol": "ALL",
                                  "port_range": "-1/-1", "source_cidr_ip": "0.0.0.0/0"}]},
            ],
            instances=[
                instance("i-n1", "10.0.1.10", ["sg-cluster"], ipv6="2001:db8:1:1::10"),
                instance("i-n2", "10.0.2.10", ["sg-cluster"], ipv6="2001:db8:1:2::10",
                         vswitch="vsw-b"),
                instance("i-out", "10.0.1.30", ["sg-outside"]),
            ],
        )
    )
    n1, n2 = lab.eni("i-n1").ifname, lab.eni("i-n2").ifname
    assert sorted(lab.kernel_sets()["intra_sg-cluster"]) == sorted([n1, n2])
    for kind, port in (("tcp", 80), ("udp", 53), ("ping", None)):
        lab.expect("i-n1", "i-n2", kind, port, allowed=True)
        lab.expect("i-n2", "i-n1", kind, port, family="ipv6", allowed=True)
    lab.expect("i-out", "i-n1", "tcp", 80, allowed=False)
    lab.expect("i-n1", "i-out", "tcp", 80, allowed=False)
    lab.assert_second_sync_is_noop()


def test_sharing_one_accept_group_is_enough_even_with_a_shared_drop_group(
    lab: EnforcedLab,
) -> None:
    lab.up(
        topology(
            security_groups=[
                {"security_group_id": "sg-open", "inner_access_policy": "Accept"},
                {"security_group_id": "sg-iso", "inner_access_policy": "Drop"},
            ],
            instances=[
                instance("i-a", "10.0.1.10", ["sg-iso", "sg-open"]),
                instance("i-b", "10.0.1.20", ["sg-iso", "sg-open"]),
                instance("i-c", "10.0.1.30", ["sg-iso"]),
            ],
        )
    )
    assert "intra_sg-iso" not in lab.kernel_sets()
    assert len(lab.kernel_sets()["intra_sg-open"]) == 2
    lab.expect("i-a", "i-b", "tcp", 80, allowed=True)
    lab.expect("i-b", "i-a", "ping", allowed=True)
    lab.expect("i-c", "i-a", "tcp", 80, allowed=False)
    lab.expect("i-a", "i-c", "tcp", 80, allowed=False)
    lab.assert_second_sync_is_noop()


def test_drop_policy_group_isolates_members_unless_cidr_or_prefix_list_rules_allow(
    lab: EnforcedLab,
) -> None:
    def topo(rules: list[dict[str, Any]]) -> dict[str, Any]:
        return topology(
            prefix_lists=[{"prefix_list_id": "pl-a", "address_family": "IPv4", "max_entries": 5,
                           "entries": ["10.0.1.20/32"]}],
            security_groups=[
                {"security_group_id": "sg-iso", "inner_access_policy": "Drop",
                 "permissions": rules},
            ],
            instances=[
                instance("i-a", "10.0.1.10", ["sg-iso"]),
                instance("i-b", "10.0.1.20", ["sg-iso"]),
            ],
        )

    lab.up(topo([]))
    assert "intra_sg-iso" not in lab.kernel_sets()
    lab.expect("i-b", "i-a", "tcp", 80, allowed=False)
    lab.expect("i-b", "i-a", "ping", allowed=False)
    lab.assert_second_sync_is_noop()

    lab.change(topo([
        tcp_in("80/80", "10.0.1.0/24"),
        {"direction": "ingress", "ip_protocol": "ICMP", "port_range": "-1/-1",
         "source_prefix_list_id": "pl-a"},
    ]))
    assert lab.rules_of("eni-a", "ingress") == {
        (1, "accept"): {("tcp", "10.0.1.0/24", "80", "*", "*"),
                        ("icmp", "10.0.1.20", "*", "*", "*")}
    }
    lab.expect("i-b", "i-a", "tcp", 80, allowed=True)
    lab.expect("i-b", "i-a", "tcp", 81, allowed=False)
    lab.expect("i-b", "i-a", "ping", allowed=True)
    lab.expect("i-a", "i-b", "ping", allowed=False)  # the prefix list holds i-b only
    lab.assert_second_sync_is_noop()


# -- advanced groups ------------------------------------------------------------------


def test_advanced_group_needs_cidr_rules_on_both_sides(lab: EnforcedLab) -> None:
    def topo(rules: list[dict[str, Any]]) -> dict[str, Any]:
        return topology(
            security_groups=[
                {"security_group_id": "sg-ent", "security_group_type": "enterprise",
                 "permissions": rules},
            ],
            instances=[
                instance("i-a", "10.0.1.10", ["sg-ent"], ipv6="2001:db8:1:1::10"),
                instance("i-b", "10.0.1.20", ["sg-ent"], ipv6="2001:db8:1:1::20"),
            ],
            external_hosts=[INTERNET],
        )

    ingress_80 = tcp_in("80/80", "10.0.1.0/24")
    egress_80 = {"direction": "egress", "ip_protocol": "TCP", "port_range": "80/80",
                 "dest_cidr_ip": "10.0.1.0/24"}

    # No rules: no intra-group path, and egress defaults to drop.
    lab.up(topo([]))
    assert "intra_sg-ent" not in lab.kernel_sets()
    assert lab.default_verdict("eni-a", "egress") == "drop"
    lab.expect("i-a", "i-b", "tcp", 80, allowed=False)
    lab.expect("i-a", "i-b", "ping", family="ipv6", allowed=False)
    lab.expect("i-a", "internet", "tcp", 80, allowed=False)
    lab.expect("internet", "i-a", "tcp", 80, allowed=False)
    lab.assert_second_sync_is_noop()

    # The receiver's ingress alone is not enough...
    lab.change(topo([ingress_80]))
    lab.expect("i-a", "i-b", "tcp", 80, allowed=False)
    lab.assert_second_sync_is_noop()

    # ... the sender's egress is needed too.
    lab.change(topo([ingress_80, egress_80]))
    assert lab.rules_of("eni-a", "egress") == {
        (1, "accept"): {("tcp", "10.0.1.0/24", "80", "*", "*")}
    }
    lab.expect("i-a", "i-b", "tcp", 80, allowed=True)
    lab.expect("i-b", "i-a", "tcp", 80, allowed=True)
    lab.expect("i-a", "i-b", "tcp", 81, allowed=False)
    lab.expect("i-a", "i-b", "tcp", 80, family="ipv6", allowed=False)
    lab.expect("i-a", "internet", "tcp", 80, allowed=False)  # egress covers 10.0.1.0/24 only
    lab.assert_second_sync_is_noop()


def test_advanced_group_egress_rule_to_an_external_host(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            security_groups=[
                {"security_group_id": "sg-ent", "security_group_type": "enterprise",
                 "permissions": [
                     {"direction": "egress", "ip_protocol": "TCP", "port_range": "443/443",
                      "ipv6_dest_cidr_ip": "2001:db8:ffff::/48"},
                     {"direction": "ingress", "ip_protocol": "ICMPv6", "port_range": "-1/-1",
                      "ipv6_source_cidr_ip": "2001:db8:ffff::/48"},
                 ]},
            ],
            instances=[instance("i-a", "10.0.1.10", ["sg-ent"], ipv6="2001:db8:1:1::10")],
            external_hosts=[INTERNET],
        )
    )
    assert lab.rules_of("eni-a", "egress") == {
        (1, "accept"): {("tcp", "2001:db8:ffff::/48", "443", "*", "*")}
    }
    lab.expect("i-a", "internet", "tcp", 443, family="ipv6", allowed=True)
    lab.expect("i-a", "internet", "tcp", 443, allowed=False)
    lab.expect("i-a", "internet", "tcp", 80, family="ipv6", allowed=False)
    lab.expect("internet", "i-a", "ping", family="ipv6", allowed=True)
    lab.expect("i-a", "internet", "ping", family="ipv6", allowed=False)
    lab.assert_second_sync_is_noop()


# -- prefix lists ---------------------------------------------------------------------


def test_prefix_list_rule_follows_the_list_entries(lab: EnforcedLab) -> None:
    def topo(entries: list[str]) -> dict[str, Any]:
        return topology(
            prefix_lists=[{"prefix_list_id": "pl-office", "address_family": "IPv4",
                           "max_entries": 5, "entries": entries}],
            security_groups=[
                {"security_group_id": "sg-bastion",
                 "permissions": [
                     {"direction": "ingress", "ip_protocol": "TCP", "port_range": "22/22",
                      "source_prefix_list_id": "pl-office"},
                 ]},
            ],
            instances=[instance("i-bastion", "10.0.1.10", ["sg-bastion"])],
            external_hosts=[OFFICE, INTERNET],
        )

    lab.up(topo(["198.51.100.0/24"]))
    assert lab.rules_of("eni-bastion", "ingress") == {
        (1, "accept"): {("tcp", "198.51.100.0/24", "22", "*", "*")}
    }
    lab.expect("office", "i-bastion", "tcp", 22, allowed=True)
    lab.expect("internet", "i-bastion", "tcp", 22, allowed=False)
    lab.assert_second_sync_is_noop()

    report = lab.change(topo(["198.51.100.0/24", "203.0.113.50/32"]))
    assert not any(report.full.values())
    assert ("tcp", "203.0.113.50", "22", "*", "*") in lab.rules_of("eni-bastion", "ingress")[
        (1, "accept")
    ]
    lab.expect("internet", "i-bastion", "tcp", 22, allowed=True)
    lab.assert_second_sync_is_noop()

    lab.change(topo(["203.0.113.50/32"]))
    assert lab.rules_of("eni-bastion", "ingress") == {
        (1, "accept"): {("tcp", "203.0.113.50", "22", "*", "*")}
    }
    lab.expect("office", "i-bastion", "tcp", 22, allowed=False)
    lab.expect("internet", "i-bastion", "tcp", 22, allowed=True)
    lab.assert_second_sync_is_noop()


def test_ipv6_prefix_list_on_egress(lab: EnforcedLab) -> None:
    lab.up(
        topology(
            prefix_lists=[{"prefix_list_id": "pl-mirrors", "address_family": "IPv6",
                           "max_entries": 5, "entries": ["2001:db8:ffff::50/128"]}],
            security_groups=[
                {"security_group_id": "sg-build",
                 "permissions": [
                     {"direction": "egress", "ip_protocol": "TCP", "port_range": "443/443",
                      "dest_prefix_list_id": "pl-mirrors", "priority": 1},
                     {"direction": "egress", "ip_protocol": "ALL", "port_range": "-1/-1",
                      "ipv6_dest_cidr_ip": "::/0", "policy": "drop", "priority": 2},
                 ]},
            ],
            instances=[instance("i-build", "10.0.1.10", ["sg-build"], ipv6="2001:db8:1:1::10")],
            external_hosts=[OFFICE, INTERNET],
        )
    )
    assert lab.rules_of("eni-build", "egress") == {
        (1, "accept"): {("tcp", "2001:db8:ffff::50", "443", "*", "*")},
        (2, "drop"): {("*", "*", "*", "*", "*")},
    }
    lab.expect("i-build", "internet", "tcp", 443, family="ipv6", allowed=True)
    lab.expect("i-build", "office", "tcp", 443, family="ipv6", allowed=False)
    lab.expect("i-build", "office", "tcp", 443, allowed=True)  # IPv4 untouched
    lab.assert_second_sync_is_noop()


# -- one router and one table per VPC ------------------------------------------------------


def test_each_vpc_has_its_own_router_table_and_groups(lab: EnforcedLab) -> None:
    topo = topology(
        security_groups=[
            {"security_group_id": "sg-t",
             "permissions": [tcp_in("80/80", "10.0.0.0/8")]},
            {"security_group_id": "sg-u", "vpc_id": "vpc-u",
             "permissions": [tcp_in("80/80", "10.0.0.0/8")]},
        ],
        instances=[
            instance("i-t1", "10.0.1.10", ["sg-t"]),
            instance("i-t2", "10.0.1.20", ["sg-t"]),
            instance("i-u1", "10.1.1.10", ["sg-u"], vswitch="vsw-u"),
        ],
    )
    topo["vpcs"].append({"vpc_id": "vpc-u", "cidr_block": "10.1.0.0/16",
                         "vswitches": [{"vswitch_id": "vsw-u", "cidr_block": "10.1.1.0/24"}]})
    lab.up(topo)
    assert lab.router("vpc-t") != lab.router("vpc-u")
    u1 = lab.eni("i-u1").ifname
    assert u1 in lab.kernel_sets("vpc-u")["ports"]
    assert u1 not in lab.kernel_sets("vpc-t")["ports"]
    assert lab.rules_of("eni-u1", "ingress", "vpc-u") == {
        (1, "accept"): {("tcp", "10.0.0.0/8", "80", "*", "*")}
    }
    assert lab.rules_of("eni-u1", "ingress", "vpc-t") == {}
    assert lab.rules_of("eni-t1", "ingress", "vpc-u") == {}
    lab.expect("i-t1", "i-t2", "tcp", 80, allowed=True)
    # VPCs are not connected: the rules would allow 10.0.0.0/8, but there is no path.
    lab.expect("i-t1", "i-u1", "tcp", 80, allowed=False)
    lab.expect("i-u1", "i-t1", "tcp", 80, allowed=False)
    lab.assert_second_sync_is_noop()
