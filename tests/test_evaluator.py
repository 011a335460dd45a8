"""The reference evaluator against docs/semantics.md, one small model per verdict family."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nftsg.translators.errors import EcsError
from nftsg.translators.evaluator import (
    Decision,
    Flow,
    evaluate,
    evaluate_side,
    rule_matches,
)
from nftsg.translators.model import topology_from_data
from nftsg.translators.network import Eni, ExternalHost, IPAddress, Network
from nftsg.translators.validate import build_network, load_network

TCP, UDP, ICMP, ICMPV6, GRE, SCTP = 6, 17, 1, 58, 47, 132
PROTO_NUMBERS = {"TCP": TCP, "UDP": UDP, "ICMP": ICMP, "ICMPv6": ICMPV6, "GRE": GRE}

VPC = {
    "vpc_id": "vpc-t",
    "cidr_block": "10.0.0.0/16",
    "ipv6_cidr_block": "2001:db8:1::/56",
    "vswitches": [
        {
            "vswitch_id": "vsw-1",
            "cidr_block": "10.0.1.0/24",
            "ipv6_cidr_block": "2001:db8:1:1::/64",
        }
    ],
}
EXTERNALS = [
    {
        "name": "office",
        "vpc_id": "vpc-t",
        "ip_address": "198.51.100.7",
        "ipv6_address": "2001:db8:ffff::7",
    },
    {"name": "internet", "vpc_id": "vpc-t", "ip_address": "203.0.113.50"},
]


# -- model builders ---------------------------------------------------------------


def group(gid: str, *permissions: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"security_group_id": gid, "vpc_id": "vpc-t", "permissions": list(permissions), **fields}


def ingress(protocol: str, ports: str = "-1/-1", **fields: Any) -> dict[str, Any]:
    return {"direction": "ingress", "ip_protocol": protocol, "port_range": ports, **fields}


def egress(protocol: str, ports: str = "-1/-1", **fields: Any) -> dict[str, Any]:
    return {"direction": "egress", "ip_protocol": protocol, "port_range": ports, **fields}


def instance(iid: str, ip: str, groups: list[str] | None, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"instance_id": iid, "vswitch_id": "vsw-1", "private_ip_address": ip}
    if groups is not None:
        data["security_group_ids"] = groups
    return {**data, **fields}


def network(
    groups: list[dict[str, Any]],
    instances: list[dict[str, Any]],
    **extra: Any,
) -> Network:
    data = {
        "vpcs": [VPC],
        "security_groups": groups,
        "instances": instances,
        "external_hosts": EXTERNALS,
        **extra,
    }
    return build_network(topology_from_data(data))


def address(net: Network, name: str, version: int = 4) -> IPAddress:
    """An instance's primary ENI address, an ENI's, an external host's, or a literal."""
    if name in net.instances:
        owner: Eni | ExternalHost = net.enis[net.instances[name].eni_ids[0]]
    elif name in net.enis:
        owner = net.enis[name]
    elif name in net.externals:
        owner = net.externals[name]
    else:
        return ipaddress.ip_address(name)
    addresses: tuple[IPAddress, ...] = owner.ipv4 if version == 4 else owner.ipv6
    return addresses[0]


def check(
    net: Network,
    src: str,
    dst: str,
    protocol: str | int = "TCP",
    dport: int = 0,
    sport: int = 0,
    version: int = 4,
) -> Decision:
    number = PROTO_NUMBERS[protocol] if isinstance(protocol, str) else protocol
    flow = Flow(address(net, src, version), address(net, dst, version), number, dport, sport)
    return evaluate(net, flow)


ANY4 = {"source_cidr_ip": "0.0.0.0/0"}


# -- priority, ties, pooling ---------------------------------------------------------


def test_smaller_priority_number_wins() -> None:
    accept_first = network(
        [
            group(
                "sg-a",
                ingress("TCP", "80/80", **ANY4, priority=1),
                ingress("TCP", "80/80", **ANY4, policy="drop", priority=2),
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-a"])],
    )
    decision = check(accept_first, "office", "i-a", dport=80)
    assert decision.verdict == "accept"
    assert decision.ingress is not None and decision.ingress.by == "rule"
    assert decision.ingress.rule is not None and decision.ingress.rule.priority == 1

    drop_first = network(
        [
            group(
                "sg-a",
                ingress("TCP", "80/80", **ANY4, policy="drop", priority=1),
                ingress("TCP", "80/80", **ANY4, priority=2),
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-a"])],
    )
    decision = check(drop_first, "office", "i-a", dport=80)
    assert decision.verdict == "drop"
    assert decision.ingress is not None and decision.ingress.rule is not None
    assert (decision.ingress.rule.priority, decision.ingress.rule.policy) == (1, "drop")


def test_drop_wins_a_tie_within_one_group() -> None:
    net = network(
        [
            group(
                "sg-a",
                ingress("TCP", "80/80", **ANY4, priority=5),
                ingress(
                    "TCP", "1/65535", source_cidr_ip="198.51.100.0/24", policy="drop", priority=5
                ),
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-a"])],
    )
    decision = check(net, "office", "i-a", dport=80)
    assert decision.verdict == "drop"
    assert decision.ingress is not None and decision.ingress.rule is not None
    assert decision.ingress.rule.policy == "drop"
    # The drop rule does not cover the internet host: the accept rule decides there.
    assert check(net, "internet", "i-a", dport=80).verdict == "accept"


def test_drop_wins_a_tie_across_groups_of_one_eni() -> None:
    net = network(
        [
            group("sg-allow", egress("UDP", "53/53", dest_cidr_ip="0.0.0.0/0", priority=7)),
            group(
                "sg-deny", egress("ALL", dest_cidr_ip="203.0.113.0/24", policy="drop", priority=7)
            ),
        ],
        [instance("i-a", "10.0.1.1", ["sg-allow", "sg-deny"])],
    )
    decision = check(net, "i-a", "internet", "UDP", dport=53)
    assert decision.verdict == "drop"
    assert decision.egress is not None and decision.egress.rule is not None
    assert decision.egress.rule.group_id == "sg-deny"
    assert check(net, "i-a", "office", "UDP", dport=53).verdict == "accept"


def test_tie_of_several_drop_rules_reports_the_smallest_group_and_rule_id() -> None:
    net = network(
        [
            group("sg-b", ingress("TCP", "22/22", **ANY4, policy="drop", priority=3)),
            group("sg-a", ingress("ALL", **ANY4, policy="drop", priority=3)),
        ],
        [instance("i-a", "10.0.1.1", ["sg-b", "sg-a"])],
    )
    decision = check(net, "office", "i-a", dport=22)
    assert decision.ingress is not None and decision.ingress.rule is not None
    assert decision.ingress.rule.group_id == "sg-a"


def test_rules_of_all_groups_are_pooled_without_group_order() -> None:
    net = network(
        [
            # The first group listed allows web traffic at a weak priority...
            group("sg-web", ingress("TCP", "80/80", **ANY4, priority=50)),
            # ...a later group drops the internet more strongly, and opens office SSH.
            group(
                "sg-guard",
                ingress("ALL", source_cidr_ip="203.0.113.0/24", policy="drop", priority=10),
                ingress("TCP", "22/22", source_cidr_ip="198.51.100.0/24", priority=60),
            ),
        ],
        [instance("i-a", "10.0.1.1", ["sg-web", "sg-guard"])],
    )
    assert check(net, "office", "i-a", dport=80).verdict == "accept"
    assert check(net, "office", "i-a", dport=22).verdict == "accept"
    internet = check(net, "internet", "i-a", dport=80)
    assert internet.verdict == "drop"
    assert internet.ingress is not None and internet.ingress.rule is not None
    assert internet.ingress.rule.group_id == "sg-guard"
    assert check(net, "office", "i-a", dport=443).verdict == "drop"


# -- intra-group policy ----------------------------------------------------------------


def test_intra_group_accept_beats_custom_drop_rules() -> None:
    net = network(
        [
            group(
                "sg-a",
                ingress("ALL", **ANY4, policy="drop", priority=1),
                egress("ALL", dest_cidr_ip="0.0.0.0/0", policy="drop", priority=1),
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-a"]), instance("i-b", "10.0.1.2", ["sg-a"])],
    )
    decision = check(net, "i-a", "i-b", dport=5000)
    assert decision.verdict == "accept"
    assert decision.reason == "intra-group"
    assert decision.shortcut_group == "sg-a"
    assert decision.egress is None and decision.ingress is None
    assert (decision.src_eni, decision.dst_eni) == ("eni-a", "eni-b")
    # The same drop rules stop everybody else.
    assert check(net, "office", "i-a", dport=5000).verdict == "drop"


def test_sharing_one_accept_group_is_enough_even_with_a_shared_drop_group() -> None:
    net = network(
        [group("sg-open"), group("sg-iso", inner_access_policy="Drop")],
        [
            instance("i-a", "10.0.1.1", ["sg-iso", "sg-open"]),
            instance("i-b", "10.0.1.2", ["sg-iso", "sg-open"]),
            instance("i-c", "10.0.1.3", ["sg-iso"]),
        ],
    )
    decision = check(net, "i-a", "i-b", dport=22)
    assert (decision.verdict, decision.reason, decision.shortcut_group) == (
        "accept",
        "intra-group",
        "sg-open",
    )
    only_drop = check(net, "i-a", "i-c", dport=22)
    assert (only_drop.verdict, only_drop.reason) == ("drop", "rules")


def test_drop_policy_group_isolates_members_unless_cidr_or_prefix_list_rules_allow() -> None:
    isolated = network(
        [group("sg-iso", inner_access_policy="Drop")],
        [instance("i-a", "10.0.1.1", ["sg-iso"]), instance("i-b", "10.0.1.2", ["sg-iso"])],
    )
    decision = check(isolated, "i-a", "i-b", dport=22)
    assert (decision.verdict, decision.reason) == ("drop", "rules")
    assert decision.egress is not None and decision.egress.verdict == "accept"
    assert decision.ingress is not None
    assert (decision.ingress.verdict, decision.ingress.by) == ("drop", "default")

    by_cidr = network(
        [
            group(
                "sg-iso",
                ingress("TCP", "22/22", source_cidr_ip="10.0.1.0/24"),
                inner_access_policy="Drop",
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-iso"]), instance("i-b", "10.0.1.2", ["sg-iso"])],
    )
    assert check(by_cidr, "i-a", "i-b", dport=22).verdict == "accept"
    assert check(by_cidr, "i-a", "i-b", dport=23).verdict == "drop"

    by_prefix_list = network(
        [
            group(
                "sg-iso",
                ingress("TCP", "22/22", source_prefix_list_id="pl-lan"),
                inner_access_policy="Drop",
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-iso"]), instance("i-b", "10.0.1.2", ["sg-iso"])],
        prefix_lists=[{"prefix_list_id": "pl-lan", "max_entries": 2, "entries": ["10.0.1.0/28"]}],
    )
    assert check(by_prefix_list, "i-a", "i-b", dport=22).verdict == "accept"


def test_advanced_groups_deny_both_directions_and_have_no_intra_group_path() -> None:
    bare = network(
        [group("sg-ent", security_group_type="enterprise")],
        [instance("i-a", "10.0.1.1", ["sg-ent"]), instance("i-b", "10.0.1.2", ["sg-ent"])],
    )
    decision = check(bare, "i-a", "i-b", dport=22)
    assert (decision.verdict, decision.reason, decision.shortcut_group) == ("drop", "rules", None)
    assert decision.egress is not None and decision.ingress is not None
    assert (decision.egress.verdict, decision.egress.by) == ("drop", "default")
    assert decision.egress.group_type == "enterprise"
    assert (decision.ingress.verdict, decision.ingress.by) == ("drop", "default")
    # Egress to the outside is closed by default too.
    assert check(bare, "i-a", "internet", dport=443).verdict == "drop"

    ingress_only = network(
        [
            group(
                "sg-ent",
                ingress("TCP", "22/22", source_cidr_ip="10.0.1.0/24"),
                security_group_type="enterprise",
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-ent"]), instance("i-b", "10.0.1.2", ["sg-ent"])],
    )
    decision = check(ingress_only, "i-a", "i-b", dport=22)
    assert decision.verdict == "drop"
    assert decision.ingress is not None and decision.ingress.verdict == "accept"
    assert decision.egress is not None and decision.egress.verdict == "drop"

    both = network(
        [
            group(
                "sg-ent",
                ingress("TCP", "22/22", source_cidr_ip="10.0.1.0/24"),
                egress("TCP", "22/22", dest_cidr_ip="10.0.1.0/24"),
                security_group_type="enterprise",
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-ent"]), instance("i-b", "10.0.1.2", ["sg-ent"])],
    )
    assert check(both, "i-a", "i-b", dport=22).verdict == "accept"


# -- group references ----------------------------------------------------------------------


def _reference_model(client_groups: list[str]) -> Network:
    return network(
        [
            group("sg-db", ingress("TCP", "5432/5432", source_group_id="sg-app")),
            group("sg-app"),
            group("sg-other"),
        ],
        [
            instance("i-db", "10.0.1.1", ["sg-db"]),
            instance("i-client", "10.0.1.2", client_groups, ipv6_address="2001:db8:1:1::2"),
        ],
    )


def test_group_reference_follows_membership_without_editing_the_rule() -> None:
    outsider = _reference_model(["sg-other"])
    member = _reference_model(["sg-other", "sg-app"])
    assert check(outsider, "i-client", "i-db", dport=5432).verdict == "drop"
    decision = check(member, "i-client", "i-db", dport=5432)
    assert decision.verdict == "accept"
    assert decision.ingress is not None and decision.ingress.rule is not None
    # The very same rule (same id), only the membership changed.
    assert [r.rule_id for r in outsider.groups["sg-db"].rules] == [decision.ingress.rule.rule_id]
    # A group reference covers every private address of the member, IPv6 included.
    ipv6 = Flow(
        address(member, "i-client", 6),
        ipaddress.ip_address("2001:db8:1:1::1"),
        TCP,
        5432,
    )
    rule = member.groups["sg-db"].rules[0]
    assert rule_matches(member, rule, ipv6)
    assert not rule_matches(outsider, rule, ipv6)


# -- families, ports, protocols ------------------------------------------------------------


def test_ipv4_cidr_never_matches_ipv6_traffic() -> None:
    net = network(
        [group("sg-a", ingress("ALL", **ANY4), ingress("ICMP", **ANY4, priority=2))],
        [instance("i-a", "10.0.1.1", ["sg-a"], ipv6_address="2001:db8:1:1::1")],
    )
    assert check(net, "office", "i-a", dport=80).verdict == "accept"
    v6 = check(net, "office", "i-a", dport=80, version=6)
    assert (v6.verdict, v6.ingress and v6.ingress.by) == ("drop", "default")
    assert check(net, "office", "i-a", "ICMPv6", version=6).verdict == "drop"


def test_icmp_and_icmpv6_rules_stay_in_their_family() -> None:
    net = network(
        [
            group(
                "sg-a",
                ingress("ICMP", **ANY4),
                ingress("ICMPv6", ipv6_source_cidr_ip="::/0"),
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-a"], ipv6_address="2001:db8:1:1::1")],
    )
    assert check(net, "office", "i-a", "ICMP").verdict == "accept"
    assert check(net, "office", "i-a", "ICMPv6", version=6).verdict == "accept"
    # Protocol numbers in the wrong family match neither rule.
    assert check(net, "office", "i-a", ICMPV6).verdict == "drop"
    assert check(net, "office", "i-a", ICMP, version=6).verdict == "drop"


def _ranged_model() -> Network:
    return network(
        [
            group(
                "sg-a",
                ingress("TCP", "1000/2000", **ANY4),
                ingress("UDP", "53/53", **ANY4, source_port_range="1024/4096"),
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-a"])],
    )


@pytest.mark.parametrize(
    ("port", "verdict"), [(999, "drop"), (1000, "accept"), (2000, "accept"), (2001, "drop")]
)
def test_port_range_edges(port: int, verdict: str) -> None:
    assert check(_ranged_model(), "office", "i-a", dport=port, sport=40000).verdict == verdict


@pytest.mark.parametrize(
    ("sport", "verdict"), [(1023, "drop"), (1024, "accept"), (4096, "accept"), (4097, "drop")]
)
def test_source_port_range_edges(sport: int, verdict: str) -> None:
    net = _ranged_model()
    assert check(net, "office", "i-a", "UDP", dport=53, sport=sport).verdict == verdict
    # A TCP rule's port range says nothing about UDP.
    assert check(net, "office", "i-a", "UDP", dport=1500, sport=sport).verdict == "drop"


RANGED = _ranged_model()


@given(dport=st.integers(1, 65535), sport=st.integers(1, 65535))
def test_tcp_accepted_exactly_inside_the_range(dport: int, sport: int) -> None:
    decision = check(RANGED, "office", "i-a", dport=dport, sport=sport)
    assert (decision.verdict == "accept") == (1000 <= dport <= 2000)


def test_all_gre_and_other_protocols() -> None:
    net = network(
        [
            group(
                "sg-a",
                ingress("GRE", source_cidr_ip="198.51.100.0/24"),
                ingress("ALL", source_cidr_ip="203.0.113.0/24"),
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-a"])],
    )
    assert check(net, "office", "i-a", GRE).verdict == "accept"
    assert check(net, "office", "i-a", dport=80).verdict == "drop"
    assert check(net, "office", "i-a", SCTP).verdict == "drop"
    for protocol, port in ((TCP, 1), (UDP, 65535), (ICMP, 0), (GRE, 0), (SCTP, 0)):
        assert check(net, "internet", "i-a", protocol, dport=port).verdict == "accept"


def test_prefix_list_entries_are_peers() -> None:
    net = network(
        [
            group(
                "sg-a",
                ingress("TCP", "22/22", source_prefix_list_id="pl-office"),
                ingress("TCP", "22/22", source_prefix_list_id="pl-office6"),
            )
        ],
        [instance("i-a", "10.0.1.1", ["sg-a"], ipv6_address="2001:db8:1:1::1")],
        prefix_lists=[
            {"prefix_list_id": "pl-office", "max_entries": 3, "entries": ["198.51.100.0/24"]},
            {
                "prefix_list_id": "pl-office6",
                "address_family": "IPv6",
                "max_entries": 3,
                "entries": ["2001:db8:ffff::/48"],
            },
        ],
    )
    assert check(net, "office", "i-a", dport=22).verdict == "accept"
    assert check(net, "office", "i-a", dport=22, version=6).verdict == "accept"
    assert check(net, "internet", "i-a", dport=22).verdict == "drop"


def test_local_address_of_five_tuple_rules() -> None:
    net = network(
        [
            group(
                "sg-a",
                ingress("TCP", "80/80", **ANY4, dest_cidr_ip="10.0.1.11/32"),
                egress(
                    "ALL", dest_cidr_ip="0.0.0.0/0", source_cidr_ip="10.0.1.10/32", policy="drop"
                ),
            )
        ],
        [instance("i-a", "10.0.1.10", ["sg-a"], secondary_private_ip_addresses=["10.0.1.11"])],
    )
    assert check(net, "office", "10.0.1.11", dport=80).verdict == "accept"
    assert check(net, "office", "10.0.1.10", dport=80).verdict == "drop"
    assert check(net, "10.0.1.10", "office", dport=443).verdict == "drop"
    assert check(net, "10.0.1.11", "office", dport=443).verdict == "accept"


# -- default group, external hosts, reasons ----------------------------------------------------


DEFAULT_GROUP_MODEL = """
vpcs:
  - vpc_id: vpc-t
    cidr_block: 10.0.0.0/16
    vswitches: [{vswitch_id: vsw-1, cidr_block: 10.0.1.0/24}]
instances:
  - {instance_id: i-a, vswitch_id: vsw-1, private_ip_address: 10.0.1.1}
  - {instance_id: i-b, vswitch_id: vsw-1, private_ip_address: 10.0.1.2}
external_hosts:
  - {name: internet, vpc_id: vpc-t, ip_address: 203.0.113.50}
"""


@pytest.mark.parametrize(
    ("protocol", "port", "verdict"),
    [
        ("TCP", 22, "accept"),
        ("TCP", 3389, "accept"),
        ("ICMP", 0, "accept"),
        ("TCP", 80, "drop"),
        ("TCP", 23, "drop"),
        ("UDP", 22, "drop"),
        ("GRE", 0, "drop"),
    ],
)
def test_default_group_opens_ssh_rdp_and_icmp_from_anywhere(
    protocol: str, port: int, verdict: str
) -> None:
    net = load_network(DEFAULT_GROUP_MODEL)
    decision = check(net, "internet", "i-a", protocol, dport=port)
    assert decision.verdict == verdict
    assert decision.ingress is not None
    assert decision.ingress.by == ("rule" if verdict == "accept" else "default")


def test_default_group_egress_is_open_and_members_reach_each_other() -> None:
    net = load_network(DEFAULT_GROUP_MODEL)
    out = check(net, "i-a", "internet", dport=8443)
    assert (out.verdict, out.egress and out.egress.by, out.ingress) == ("accept", "default", None)
    inner = check(net, "i-a", "i-b", dport=8443)
    assert inner.reason == "intra-group"
    assert inner.shortcut_group == net.enis["eni-a"].group_ids[0]


def test_external_hosts_only_the_eni_side_is_evaluated() -> None:
    net = network(
        [group("sg-a", egress("ALL", dest_cidr_ip="0.0.0.0/0", policy="drop"))],
        [instance("i-a", "10.0.1.1", ["sg-a"])],
    )
    inbound = check(net, "office", "i-a", dport=80)
    assert (inbound.src_external, inbound.dst_eni, inbound.egress) == ("office", "eni-a", None)
    assert inbound.ingress is not None and inbound.verdict == "drop"
    outbound = check(net, "i-a", "office", dport=80)
    assert (outbound.src_eni, outbound.dst_external, outbound.ingress) == ("eni-a", "office", None)
    assert outbound.egress is not None and outbound.egress.by == "rule"
    assert outbound.verdict == "drop"
    # Neither side an ENI: no group governs it.
    neither = check(net, "office", "internet", dport=80)
    assert (neither.verdict, neither.reason, neither.egress, neither.ingress) == (
        "accept",
        "no-eni",
        None,
        None,
    )
    # An address nobody owns is an outside address, like an external host.
    unknown = check(net, "i-a", "192.0.2.1", dport=80)
    assert (unknown.dst_eni, unknown.dst_external, unknown.ingress) == (None, None, None)
    assert unknown.verdict == "drop"


def test_eni_to_itself_and_between_enis_of_one_instance_is_a_normal_flow() -> None:
    net = network(
        [group("sg-iso", inner_access_policy="Drop"), group("sg-mgmt")],
        [
            instance(
                "i-a",
                "10.0.1.1",
                ["sg-iso"],
                network_interfaces=[
                    {
                        "network_interface_id": "eni-a-mgmt",
                        "primary_ip_address": "10.0.1.5",
                        "security_group_ids": ["sg-mgmt"],
                    }
                ],
            )
        ],
    )
    to_self = check(net, "i-a", "i-a", dport=22)
    assert (to_self.verdict, to_self.reason) == ("drop", "rules")
    mgmt_to_self = check(net, "eni-a-mgmt", "eni-a-mgmt", dport=22)
    assert (mgmt_to_self.verdict, mgmt_to_self.reason) == ("accept", "intra-group")
    across = check(net, "eni-a-mgmt", "i-a", dport=22)
    assert (across.src_eni, across.dst_eni, across.verdict) == ("eni-a-mgmt", "eni-a", "drop")
    back = check(net, "i-a", "eni-a-mgmt", dport=22)
    assert back.ingress is not None and back.ingress.eni_id == "eni-a-mgmt"


def test_flows_between_vpcs_have_no_route() -> None:
    other_vpc = {
        "vpc_id": "vpc-u",
        "cidr_block": "10.1.0.0/16",
        "vswitches": [{"vswitch_id": "vsw-u", "cidr_block": "10.1.0.0/24"}],
    }
    net = build_network(
        topology_from_data(
            {
                "vpcs": [VPC, other_vpc],
                "security_groups": [
                    group("sg-a", ingress("ALL", source_cidr_ip="0.0.0.0/0")),
                    {
                        **group("sg-u", ingress("ALL", source_cidr_ip="0.0.0.0/0")),
                        "vpc_id": "vpc-u",
                    },
                ],
                "instances": [
                    instance("i-a", "10.0.1.1", ["sg-a"]),
                    {**instance("i-u", "10.1.0.1", ["sg-u"]), "vswitch_id": "vsw-u"},
                ],
            }
        )
    )
    decision = check(net, "i-a", "i-u", dport=80)
    assert (decision.verdict, decision.reason) == ("drop", "no-route")
    assert (decision.src_eni, decision.dst_eni) == ("eni-a", "eni-u")


def test_evaluate_side_reports_the_side_and_its_default() -> None:
    net = network([group("sg-a")], [instance("i-a", "10.0.1.1", ["sg-a"])])
    flow = Flow(address(net, "office"), address(net, "i-a"), TCP, 80)
    side = evaluate_side(net, net.enis["eni-a"], "ingress", flow)
    assert (side.eni_id, side.direction, side.verdict, side.by, side.rule) == (
        "eni-a",
        "ingress",
        "drop",
        "default",
        None,
    )
    assert side.group_type == "normal"


def test_flow_rejects_mixed_families() -> None:
    with pytest.raises(EcsError):
        Flow(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("2001:db8::1"), TCP, 80)
