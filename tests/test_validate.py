"""Validation: every ECS error code with its field path, and what a valid model becomes."""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from nftsg.translators import naming
from nftsg.translators.errors import EcsError
from nftsg.translators.model import topology_from_data
from nftsg.translators.network import CidrPeer, GroupPeer, Network, PortRange, PrefixListPeer
from nftsg.translators.quotas import DEFAULT_QUOTAS, Quotas
from nftsg.translators.validate import build_network, rule_family_set

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"

Topo = dict[str, Any]
Mutation = Callable[[Topo], None]


def build(data: Topo, quotas: Quotas = DEFAULT_QUOTAS) -> Network:
    return build_network(topology_from_data(data), quotas)


def rule(**fields: Any) -> dict[str, Any]:
    """An ingress TCP 80 rule from anywhere, with `fields` changed (None removes a field)."""
    out: dict[str, Any] = {
        "direction": "ingress",
        "ip_protocol": "TCP",
        "port_range": "80/80",
        "source_cidr_ip": "0.0.0.0/0",
    }
    out.update(fields)
    return {k: v for k, v in out.items() if v is not None}


def egress(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "direction": "egress",
        "source_cidr_ip": None,
        "dest_cidr_ip": "0.0.0.0/0",
    }
    return rule(**{**base, **fields})


def add_rules(group: int, *rules: dict[str, Any]) -> Mutation:
    return lambda t: t["security_groups"][group].setdefault("permissions", []).extend(rules)


def add_rule(group: int = 0, **fields: Any) -> Mutation:
    return add_rules(group, rule(**fields))


def add_egress(group: int = 0, **fields: Any) -> Mutation:
    return add_rules(group, egress(**fields))


def put(*keys: Any) -> Mutation:
    """put("instances", 1, "private_ip_address", "x"): set one value deep in the data."""
    *where, last, value = keys

    def mutate(t: Topo) -> None:
        node: Any = t
        for key in where:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()


def append(*keys: Any) -> Mutation:
    *where, value = keys

    def mutate(t: Topo) -> None:
        node: Any = t
        for key in where:
            node = node[key]
        node.append(value)

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(t: Topo) -> None:
        for mutation in mutations:
            mutation(t)

    return mutate


def instance(iid: str, address: str, groups: list[str] | None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "instance_id": iid,
        "vswitch_id": "vsw-a1",
        "private_ip_address": address,
    }
    if groups is not None:
        out["security_group_ids"] = groups
    out.update(extra)
    return out


P = "security_groups[0].permissions[1]"  # the rule add_rule() appends to sg-a
ENT = "security_groups[2]"
I2 = "instances[1]"

# (case id, mutation of the small topology, ECS code, dotted path of the offending field)
ERROR_CASES: list[tuple[str, Mutation, str, str]] = [
    # -- port ranges, per protocol
    ("bare port", add_rule(port_range="22"), "InvalidPortRange.Malformed", f"{P}.port_range"),
    ("port as number", add_rule(port_range=22), "InvalidPortRange.Malformed", f"{P}.port_range"),
    ("tcp port 0", add_rule(port_range="0/22"), "InvalidPortRange.Malformed", f"{P}.port_range"),
    (
        "tcp port 65536",
        add_rule(port_range="1/65536"),
        "InvalidPortRange.Malformed",
        f"{P}.port_range",
    ),
    (
        "tcp start > end",
        add_rule(port_range="80/22"),
        "InvalidPortRange.Malformed",
        f"{P}.port_range",
    ),
    ("tcp -1/-1", add_rule(port_range="-1/-1"), "InvalidPortRange.Malformed", f"{P}.port_range"),
    (
        "udp not numbers",
        add_rule(ip_protocol="UDP", port_range="a/b"),
        "InvalidPortRange.Malformed",
        f"{P}.port_range",
    ),
    (
        "underscore digits",
        add_rule(port_range="1_0/20"),
        "InvalidPortRange.Malformed",
        f"{P}.port_range",
    ),
    ("three parts", add_rule(port_range="1/2/3"), "InvalidPortRange.Malformed", f"{P}.port_range"),
    (
        "icmp real ports",
        add_rule(ip_protocol="ICMP", port_range="8/8"),
        "InvalidPortRange.Malformed",
        f"{P}.port_range",
    ),
    (
        "icmpv6 real ports",
        add_rule(
            ip_protocol="ICMPv6", port_range="1/1", source_cidr_ip=None, ipv6_source_cidr_ip="::/0"
        ),
        "InvalidPortRange.Malformed",
        f"{P}.port_range",
    ),
    (
        "gre 0/0",
        add_rule(ip_protocol="GRE", port_range="0/0"),
        "InvalidPortRange.Malformed",
        f"{P}.port_range",
    ),
    (
        "all full range",
        add_rule(ip_protocol="ALL", port_range="1/65535"),
        "InvalidPortRange.Malformed",
        f"{P}.port_range",
    ),
    ("no port range", add_rule(port_range=None), "MissingParameter.PortRange", f"{P}.port_range"),
    (
        "bare source port",
        add_rule(source_port_range="1024"),
        "InvalidSourcePortRange.Malformed",
        f"{P}.source_port_range",
    ),
    (
        "tcp source -1/-1",
        add_rule(source_port_range="-1/-1"),
        "InvalidSourcePortRange.Malformed",
        f"{P}.source_port_range",
    ),
    (
        "icmp source ports",
        add_rule(ip_protocol="ICMP", port_range="-1/-1", source_port_range="1/2"),
        "InvalidSourcePortRange.Malformed",
        f"{P}.source_port_range",
    ),
    # -- protocol, direction, policy, priority, description, nic type
    ("protocol", add_rule(ip_protocol="SCTP"), "InvalidIpProtocol.Malformed", f"{P}.ip_protocol"),
    ("direction", add_rule(direction="inbound"), "InvalidDirection.Malformed", f"{P}.direction"),
    ("policy", add_rule(policy="allow"), "InvalidPolicy.Malformed", f"{P}.policy"),
    ("priority 0", add_rule(priority=0), "InvalidPriority.Malformed", f"{P}.priority"),
    ("priority 101", add_rule(priority="101"), "InvalidPriority.Malformed", f"{P}.priority"),
    ("priority text", add_rule(priority="high"), "InvalidPriority.Malformed", f"{P}.priority"),
    ("priority fraction", add_rule(priority=1.5), "InvalidPriority.Malformed", f"{P}.priority"),
    ("priority boolean", add_rule(priority=True), "InvalidPriority.Malformed", f"{P}.priority"),
    (
        "description 513",
        add_rule(description="x" * 513),
        "InvalidDescription.Malformed",
        f"{P}.description",
    ),
    (
        "nic type internet",
        add_rule(nic_type="internet"),
        "InvalidNicType.ValueNotSupported",
        f"{P}.nic_type",
    ),
    # -- peers and local addresses
    (
        "ingress v4 and v6 peer",
        add_rule(ipv6_source_cidr_ip="::/0"),
        "InvalidParam.SourceIp",
        f"{P}.ipv6_source_cidr_ip",
    ),
    (
        "egress v4 and v6 peer",
        add_egress(ipv6_dest_cidr_ip="::/0"),
        "InvalidParam.DestIp",
        f"{P}.ipv6_dest_cidr_ip",
    ),
    (
        "v6 value in v4 field",
        add_rule(source_cidr_ip="2001:db8::/32"),
        "InvalidParam.SourceIp",
        f"{P}.source_cidr_ip",
    ),
    (
        "v4 value in v6 field",
        add_egress(dest_cidr_ip=None, ipv6_dest_cidr_ip="10.0.0.0/8"),
        "InvalidParam.DestIp",
        f"{P}.ipv6_dest_cidr_ip",
    ),
    (
        "bad cidr",
        add_rule(source_cidr_ip="10.0.0.0/33"),
        "InvalidParam.SourceIp",
        f"{P}.source_cidr_ip",
    ),
    (
        "ingress local v4 and v6",
        add_rule(dest_cidr_ip="10.0.1.10", ipv6_dest_cidr_ip="2001:db8:1:1::10"),
        "InvalidParam.DestIp",
        f"{P}.ipv6_dest_cidr_ip",
    ),
    (
        "local family differs from peer",
        add_rule(source_cidr_ip=None, ipv6_source_cidr_ip="::/0", dest_cidr_ip="10.0.1.10"),
        "InvalidParam.DestIp",
        f"{P}.dest_cidr_ip",
    ),
    (
        "egress local malformed",
        add_egress(source_cidr_ip="nope"),
        "InvalidParam.SourceIp",
        f"{P}.source_cidr_ip",
    ),
    ("ingress without peer", add_rule(source_cidr_ip=None), "MissingParameter.Source", P),
    (
        "ingress with only a local address",
        add_rule(source_cidr_ip=None, dest_cidr_ip="10.0.1.10"),
        "MissingParameter.Source",
        P,
    ),
    ("egress without peer", add_egress(dest_cidr_ip=None), "MissingParameter.Dest", P),
    (
        "egress with a source group",
        add_egress(source_group_id="sg-b"),
        "InvalidParameter",
        f"{P}.source_group_id",
    ),
    (
        "ingress with a dest prefix list",
        add_rule(dest_prefix_list_id="pl-v4"),
        "InvalidParameter",
        f"{P}.dest_prefix_list_id",
    ),
    (
        "icmp with v6 peer",
        add_rule(
            ip_protocol="icmp", port_range="-1/-1", source_cidr_ip=None, ipv6_source_cidr_ip="::/0"
        ),
        "InvalidParam.Ipv4ProtocolConflictWithIpv6Address",
        f"{P}.ip_protocol",
    ),
    (
        "icmp with v6 prefix list",
        add_rule(
            ip_protocol="ICMP",
            port_range="-1/-1",
            source_cidr_ip=None,
            source_prefix_list_id="pl-v6",
        ),
        "InvalidParam.Ipv4ProtocolConflictWithIpv6Address",
        f"{P}.ip_protocol",
    ),
    (
        "icmp with group peer and v6 local",
        add_rule(
            ip_protocol="ICMP",
            port_range="-1/-1",
            source_cidr_ip=None,
            source_group_id="sg-b",
            ipv6_dest_cidr_ip="2001:db8:1:1::10",
        ),
        "InvalidParam.Ipv4ProtocolConflictWithIpv6Address",
        f"{P}.ip_protocol",
    ),
    (
        "icmpv6 with v4 peer",
        add_egress(ip_protocol="ICMPv6", port_range="-1/-1"),
        "InvalidParam.Ipv6ProtocolConflictWithIpv4Address",
        f"{P}.ip_protocol",
    ),
    (
        "icmpv6 with v4 prefix list",
        add_rule(
            ip_protocol="ICMPv6",
            port_range="-1/-1",
            source_cidr_ip=None,
            source_prefix_list_id="pl-v4",
        ),
        "InvalidParam.Ipv6ProtocolConflictWithIpv4Address",
        f"{P}.ip_protocol",
    ),
    (
        "unknown prefix list",
        add_rule(source_cidr_ip=None, source_prefix_list_id="pl-nope"),
        "InvalidPrefixListId.NotFound",
        f"{P}.source_prefix_list_id",
    ),
    # -- group references
    (
        "unknown referenced group",
        add_rule(source_cidr_ip=None, source_group_id="sg-nope"),
        "InvalidSecurityGroupId.NotFound",
        f"{P}.source_group_id",
    ),
    (
        "advanced group holds a reference",
        add_rule(2, source_cidr_ip=None, source_group_id="sg-b"),
        "InvalidGroupParameter.OperationDenied",
        f"{ENT}.permissions[0].source_group_id",
    ),
    (
        "reference to an advanced group",
        add_rule(source_cidr_ip=None, source_group_id="sg-ent"),
        "InvalidGroupAuthParameter.OperationDenied",
        f"{P}.source_group_id",
    ),
    (
        "ingress reference to another vpc",
        add_rule(source_cidr_ip=None, source_group_id="sg-other"),
        "InvalidSourceGroupId.Mismatch",
        f"{P}.source_group_id",
    ),
    (
        "egress reference to another vpc",
        add_egress(dest_cidr_ip=None, dest_group_id="sg-other"),
        "InvalidDestGroupId.Mismatch",
        f"{P}.dest_group_id",
    ),
    (
        "ingress self reference",
        add_rule(source_cidr_ip=None, source_group_id="sg-a"),
        "InvalidParamter.Conflict",
        f"{P}.source_group_id",
    ),
    (
        "egress self reference",
        add_egress(dest_cidr_ip=None, dest_group_id="sg-a"),
        "InvalidSecurityGroup.IsSame",
        f"{P}.dest_group_id",
    ),
    (
        "21 reference rules",
        add_rules(
            1,
            *(
                rule(source_cidr_ip=None, source_group_id="sg-a", port_range=f"{p}/{p}")
                for p in range(1, 22)
            ),
        ),
        "AuthorizedGroupRule.LimitExceed",
        "security_groups[1].permissions[20]",
    ),
    (
        "201 rules",
        add_rules(1, *(rule(port_range=f"{p}/{p}") for p in range(1, 202))),
        "AuthorizationLimitExceed",
        "security_groups[1].permissions[200]",
    ),
    (
        "prefix list counts as max_entries",
        add_rules(
            1,
            *(
                rule(source_cidr_ip=None, source_prefix_list_id="pl-v4", port_range=f"{p}/{p}")
                for p in range(1, 21)
            ),
            rule(),
        ),
        "AuthorizationLimitExceed",
        "security_groups[1].permissions[20]",
    ),
    # -- duplicates and rule ids
    (
        "duplicate permission",
        add_rule(
            ip_protocol="tcp",
            port_range="22/22",
            source_cidr_ip="192.0.2.0/24",
            description="again",
        ),
        "InvalidParam.DuplicatePermissions",
        P,
    ),
    (
        "malformed rule id",
        add_rule(security_group_rule_id="sgr bad"),
        "InvalidSecurityGroupRuleId.Malformed",
        f"{P}.security_group_rule_id",
    ),
    (
        "repeated rule id",
        both(add_rule(security_group_rule_id="sgr-1"), add_rule(1, security_group_rule_id="sgr-1")),
        "InvalidParam.SecurityGroupRuleIdRepeated",
        "security_groups[1].permissions[0].security_group_rule_id",
    ),
    # -- groups
    (
        "malformed group id",
        put("security_groups", 1, "security_group_id", "sg b"),
        "InvalidSecurityGroupId.Malformed",
        "security_groups[1].security_group_id",
    ),
    (
        "group defined twice",
        put("security_groups", 1, "security_group_id", "sg-a"),
        "InvalidSecurityGroupId.Duplicate",
        "security_groups[1].security_group_id",
    ),
    (
        "group in unknown vpc",
        put("security_groups", 1, "vpc_id", "vpc-nope"),
        "InvalidVpcId.NotFound",
        "security_groups[1].vpc_id",
    ),
    (
        "group type",
        put("security_groups", 1, "security_group_type", "premium"),
        "InvalidSecurityGroupType.Malformed",
        "security_groups[1].security_group_type",
    ),
    (
        "inner policy",
        put("security_groups", 1, "inner_access_policy", "Open"),
        "InvalidInnerAccessPolicy.Malformed",
        "security_groups[1].inner_access_policy",
    ),
    (
        "advanced group with Accept",
        put("security_groups", 2, "inner_access_policy", "accept"),
        "InvalidInnerAccessPolicy.NotSupported",
        f"{ENT}.inner_access_policy",
    ),
    # -- group lists of ENIs
    (
        "group listed twice",
        put("instances", 1, "security_group_ids", ["sg-a", "sg-a"]),
        "InvalidSecurityGroupId.Duplicate",
        f"{I2}.security_group_ids[1]",
    ),
    (
        "unknown group on an ENI",
        put("instances", 1, "security_group_ids", ["sg-a", "sg-nope"]),
        "InvalidSecurityGroupId.NotFound",
        f"{I2}.security_group_ids[1]",
    ),
    (
        "group of another vpc on an ENI",
        put("instances", 1, "security_group_ids", ["sg-other"]),
        "InvalidInstanceId.Mismatch",
        f"{I2}.security_group_ids[0]",
    ),
    (
        "basic and advanced on a primary ENI",
        put("instances", 1, "security_group_ids", ["sg-a", "sg-ent"]),
        "InvalidSecurityGroupType.Mixed",
        f"{I2}.security_group_ids",
    ),
    (
        "basic and advanced on a secondary ENI",
        put("instances", 0, "network_interfaces", 0, "security_group_ids", ["sg-ent", "sg-b"]),
        "InvalidSecurityGroupType.Mixed",
        "instances[0].network_interfaces[0].security_group_ids",
    ),
    (
        "default group id taken by another vpc",
        both(
            append(
                "vpcs",
                {
                    "vpc_id": "a",
                    "cidr_block": "10.2.0.0/16",
                    "vswitches": [{"vswitch_id": "vsw-x", "cidr_block": "10.2.1.0/24"}],
                },
            ),
            append("instances", instance("i-3", "10.0.1.12", None)),
            append("instances", instance("i-4", "10.2.1.12", None, vswitch_id="vsw-x")),
        ),
        "InvalidSecurityGroupId.Duplicate",
        "instances[3].security_group_ids",
    ),
    # -- instances and ENIs
    (
        "malformed instance id",
        put("instances", 1, "instance_id", "i 2"),
        "InvalidInstanceId.Malformed",
        f"{I2}.instance_id",
    ),
    (
        "instance twice",
        put("instances", 1, "instance_id", "i-1"),
        "InvalidInstanceId.Duplicate",
        f"{I2}.instance_id",
    ),
    (
        "unknown vswitch",
        put("instances", 1, "vswitch_id", "vsw-nope"),
        "InvalidVSwitchId.NotFound",
        f"{I2}.vswitch_id",
    ),
    (
        "secondary ENI in another vpc",
        put("instances", 0, "network_interfaces", 0, "vswitch_id", "vsw-b1"),
        "InvalidVSwitchId.Mismatch",
        "instances[0].network_interfaces[0].vswitch_id",
    ),
    (
        "malformed ENI id",
        put("instances", 0, "network_interfaces", 0, "network_interface_id", "eni/1b"),
        "InvalidNetworkInterfaceId.Malformed",
        "instances[0].network_interfaces[0].network_interface_id",
    ),
    (
        "ENI twice",
        put("instances", 1, "network_interface_id", "eni-1b"),
        "InvalidNetworkInterfaceId.Duplicate",
        f"{I2}.network_interface_id",
    ),
    (
        "malformed address",
        put("instances", 1, "private_ip_address", "10.0.1.300"),
        "InvalidPrivateIpAddress.Malformed",
        f"{I2}.private_ip_address",
    ),
    (
        "address outside the vswitch",
        put("instances", 1, "private_ip_address", "10.0.2.11"),
        "InvalidPrivateIpAddress.Mismatch",
        f"{I2}.private_ip_address",
    ),
    (
        "broadcast address",
        put("instances", 1, "private_ip_address", "10.0.1.255"),
        "InvalidPrivateIpAddress.Mismatch",
        f"{I2}.private_ip_address",
    ),
    (
        "address used twice",
        put("instances", 1, "private_ip_address", "10.0.1.10"),
        "InvalidPrivateIpAddress.Duplicated",
        f"{I2}.private_ip_address",
    ),
    (
        "secondary address used twice",
        put("instances", 1, "secondary_private_ip_addresses", ["10.0.1.11"]),
        "InvalidPrivateIpAddress.Duplicated",
        f"{I2}.secondary_private_ip_addresses[0]",
    ),
    (
        "malformed ipv6 address",
        put("instances", 1, "ipv6_address", "2001:db8:1:1::zz"),
        "InvalidIpv6Address.Malformed",
        f"{I2}.ipv6_address",
    ),
    (
        "ipv6 address on a v4-only vswitch",
        put("instances", 0, "network_interfaces", 0, "ipv6_addresses", ["2001:db8:1:2::1"]),
        "InvalidIpv6Address.Mismatch",
        "instances[0].network_interfaces[0].ipv6_addresses[0]",
    ),
    (
        "malformed mac",
        put("instances", 1, "mac_address", "02:00:00:00:00"),
        "InvalidMacAddress.Malformed",
        f"{I2}.mac_address",
    ),
    (
        "multicast mac",
        put("instances", 1, "mac_address", "01:00:5e:00:00:01"),
        "InvalidMacAddress.Malformed",
        f"{I2}.mac_address",
    ),
    (
        "mac used twice",
        both(
            put("instances", 0, "mac_address", "02:00:00:00:00:01"),
            put("instances", 1, "mac_address", "02:00:00:00:00:01"),
        ),
        "InvalidMacAddress.Duplicated",
        f"{I2}.mac_address",
    ),
    (
        "external host named like an instance",
        put("external_hosts", 0, "name", "i-2"),
        "InvalidParameter",
        "external_hosts[0].name",
    ),
    # -- VPCs and vSwitches
    (
        "malformed vpc id",
        put("vpcs", 1, "vpc_id", "vpc b"),
        "InvalidVpcId.Malformed",
        "vpcs[1].vpc_id",
    ),
    ("vpc twice", put("vpcs", 1, "vpc_id", "vpc-a"), "InvalidVpcId.Duplicate", "vpcs[1].vpc_id"),
    (
        "vpc cidr not ipv4",
        put("vpcs", 1, "cidr_block", "2001:db8::/32"),
        "InvalidCidrBlock.Malformed",
        "vpcs[1].cidr_block",
    ),
    (
        "vpc cidr garbage",
        put("vpcs", 1, "cidr_block", "ten"),
        "InvalidCidrBlock.Malformed",
        "vpcs[1].cidr_block",
    ),
    (
        "vpc ipv6 block not ipv6",
        put("vpcs", 0, "ipv6_cidr_block", "10.9.0.0/16"),
        "InvalidIpv6CidrBlock.Malformed",
        "vpcs[0].ipv6_cidr_block",
    ),
    (
        "vswitch outside the vpc",
        put("vpcs", 0, "vswitches", 1, "cidr_block", "10.1.2.0/24"),
        "InvalidCidrBlock.Malformed",
        "vpcs[0].vswitches[1].cidr_block",
    ),
    (
        "vswitches overlap",
        put("vpcs", 0, "vswitches", 1, "cidr_block", "10.0.1.128/25"),
        "InvalidCidrBlock.Overlapped",
        "vpcs[0].vswitches[1].cidr_block",
    ),
    (
        "vswitch ipv6 outside the vpc",
        put("vpcs", 0, "vswitches", 0, "ipv6_cidr_block", "2001:db8:2:1::/64"),
        "InvalidIpv6CidrBlock.Malformed",
        "vpcs[0].vswitches[0].ipv6_cidr_block",
    ),
    (
        "vswitch ipv6 in a v4-only vpc",
        put("vpcs", 1, "vswitches", 0, "ipv6_cidr_block", "2001:db8:9:1::/64"),
        "InvalidIpv6CidrBlock.Malformed",
        "vpcs[1].vswitches[0].ipv6_cidr_block",
    ),
    (
        "malformed vswitch id",
        put("vpcs", 1, "vswitches", 0, "vswitch_id", "-vsw"),
        "InvalidVSwitchId.Malformed",
        "vpcs[1].vswitches[0].vswitch_id",
    ),
    (
        "vswitch twice",
        put("vpcs", 1, "vswitches", 0, "vswitch_id", "vsw-a1"),
        "InvalidVSwitchId.Duplicate",
        "vpcs[1].vswitches[0].vswitch_id",
    ),
    # -- prefix lists
    (
        "malformed prefix list id",
        put("prefix_lists", 1, "prefix_list_id", "pl v6"),
        "InvalidPrefixListId.Malformed",
        "prefix_lists[1].prefix_list_id",
    ),
    (
        "prefix list twice",
        put("prefix_lists", 1, "prefix_list_id", "pl-v4"),
        "InvalidPrefixListId.Duplicate",
        "prefix_lists[1].prefix_list_id",
    ),
    (
        "address family",
        put("prefix_lists", 0, "address_family", "IPv5"),
        "InvalidAddressFamily.Malformed",
        "prefix_lists[0].address_family",
    ),
    (
        "max entries 0",
        put("prefix_lists", 0, "max_entries", 0),
        "InvalidMaxEntries.Malformed",
        "prefix_lists[0].max_entries",
    ),
    (
        "max entries 201",
        put("prefix_lists", 0, "max_entries", 201),
        "InvalidMaxEntries.Malformed",
        "prefix_lists[0].max_entries",
    ),
    (
        "more entries than max",
        put("prefix_lists", 1, "entries", [f"2001:db8:{i}::/48" for i in range(6)]),
        "PrefixListEntriesLimitExceeded",
        "prefix_lists[1].entries",
    ),
    (
        "malformed entry",
        put("prefix_lists", 0, "entries", ["198.51.100.0/24", "bad"]),
        "InvalidCidr.Malformed",
        "prefix_lists[0].entries[1]",
    ),
    (
        "entry of the other family",
        put("prefix_lists", 0, "entries", ["2001:db8::/32"]),
        "InvalidCidr.AddressFamilyMismatch",
        "prefix_lists[0].entries[0]",
    ),
    # -- external hosts
    (
        "malformed external name",
        put("external_hosts", 0, "name", "office lan"),
        "InvalidParameter",
        "external_hosts[0].name",
    ),
    (
        "external in unknown vpc",
        put("external_hosts", 0, "vpc_id", "vpc-nope"),
        "InvalidVpcId.NotFound",
        "external_hosts[0].vpc_id",
    ),
    (
        "external without address",
        put("external_hosts", 0, "ip_address", _DELETE),
        "MissingParameter",
        "external_hosts[0]",
    ),
    (
        "external address malformed",
        put("external_hosts", 0, "ip_address", "2001:db8::7"),
        "InvalidIpAddress.Malformed",
        "external_hosts[0].ip_address",
    ),
    (
        "external address inside the vpc",
        put("external_hosts", 0, "ip_address", "10.0.200.1"),
        "InvalidIpAddress.Malformed",
        "external_hosts[0].ip_address",
    ),
    (
        "external ipv6 inside the vpc",
        put("external_hosts", 0, "ipv6_address", "2001:db8:1:ff::1"),
        "InvalidIpAddress.Malformed",
        "external_hosts[0].ipv6_address",
    ),
]

# (case id, mutation, quotas, ECS code, path): the limits, made small enough to reach.
QUOTA_CASES: list[tuple[str, Mutation, Quotas, str, str]] = [
    (
        "groups per ENI",
        lambda t: None,
        Quotas(groups_per_eni=1),
        "InstanceSecurityGroupLimitExceeded",
        f"{I2}.security_group_ids",
    ),
    (
        "rules per group",
        add_rule(),
        Quotas(rules_per_group=1),
        "AuthorizationLimitExceed",
        P,
    ),
    (
        "reference rules per group",
        add_rules(
            1,
            rule(source_cidr_ip=None, source_group_id="sg-a"),
            rule(source_cidr_ip=None, source_group_id="sg-a", port_range="81/81"),
        ),
        Quotas(group_reference_rules_per_group=1),
        "AuthorizedGroupRule.LimitExceed",
        "security_groups[1].permissions[1]",
    ),
    (
        # i-2 is in sg-a (1 rule) and sg-b; one prefix-list rule of max_entries 10 in sg-b.
        "rules per ENI, prefix list weighted",
        add_rule(1, source_cidr_ip=None, source_prefix_list_id="pl-v4"),
        Quotas(rules_per_eni=10),
        "AuthorizationLimitExceed",
        f"{I2}.security_group_ids",
    ),
    (
        # sg-a: i-1 has two addresses (IPv4 and IPv6), i-2 a third.
        "addresses per basic group",
        lambda t: None,
        Quotas(private_addresses_per_basic_group=2),
        "SecurityGroupInstanceLimitExceeded",
        f"{I2}.security_group_ids",
    ),
    (
        "ENIs per advanced group",
        append("instances", instance("i-3", "10.0.1.12", ["sg-ent"])),
        Quotas(enis_per_advanced_group=1),
        "SecurityGroupInstanceLimitExceeded",
        "instances[2].security_group_ids",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "code", "path"),
    [pytest.param(m, c, p, id=i) for i, m, c, p in ERROR_CASES],
)
def test_invalid_topology_is_rejected_with_ecs_code_and_path(
    small_topology: Topo, mutate: Mutation, code: str, path: str
) -> None:
    build(small_topology)  # the unmodified topology is valid: the mutation is the cause
    mutate(small_topology)
    with pytest.raises(EcsError) as caught:
        build(small_topology)
    assert (caught.value.code, caught.value.path) == (code, path), caught.value.message
    assert caught.value.message


@pytest.mark.parametrize(
    ("mutate", "quotas", "code", "path"),
    [pytest.param(m, q, c, p, id=i) for i, m, q, c, p in QUOTA_CASES],
)
def test_quota_is_enforced(
    small_topology: Topo, mutate: Mutation, quotas: Quotas, code: str, path: str
) -> None:
    mutate(small_topology)
    build(small_topology)  # within the default quotas
    with pytest.raises(EcsError) as caught:
        build(small_topology, quotas)
    assert (caught.value.code, caught.value.path) == (code, path), caught.value.message


def test_every_error_code_of_validation_has_a_case() -> None:
    """A code added to validate.py without a test here fails this test."""
    source = (Path(__file__).resolve().parent.parent / "translators" / "validate.py").read_text()
    literal = set(
        re.findall(
            r'"((?:Invalid|Missing|Authori[sz]|Instance|SecurityGroup|Prefix)'
            r'[A-Za-z]*(?:\.[A-Za-z]+)?)"',
            source,
        )
    )
    # Codes composed from the rule's side (Source / Dest) in validate.py.
    composed = {
        "MissingParameter.Source",
        "MissingParameter.Dest",
        "InvalidParam.SourceIp",
        "InvalidParam.DestIp",
        "InvalidSourceGroupId.Mismatch",
        "InvalidDestGroupId.Mismatch",
    }
    tested = {c for _, _, c, _ in ERROR_CASES} | {c for _, _, _, c, _ in QUOTA_CASES}
    assert literal | composed <= tested, sorted((literal | composed) - tested)


# -- positive behaviour -----------------------------------------------------


def test_small_topology_is_valid_and_complete(small_topology: Topo) -> None:
    net = build(small_topology)
    assert list(net.vpcs) == ["vpc-a", "vpc-b"]
    assert list(net.groups) == ["sg-a", "sg-b", "sg-ent", "sg-other"]
    assert list(net.enis) == ["eni-1", "eni-1b", "eni-2"]
    assert net.instances["i-1"].eni_ids == ("eni-1", "eni-1b")
    assert net.enis["eni-1b"].group_ids == ("sg-ent",)
    assert net.enis["eni-1b"].peer_ifname == "eth1"
    assert net.members("sg-a") == ("eni-1", "eni-2")


def test_primary_and_secondary_eni_may_differ_in_group_type(small_topology: Topo) -> None:
    net = build(small_topology)
    assert net.groups_of("eni-1")[0].group_type == "normal"
    assert net.groups_of("eni-1b")[0].group_type == "enterprise"


def test_eni_without_group_gets_the_vpc_default_group(small_topology: Topo) -> None:
    small_topology["instances"].append(instance("i-3", "10.0.1.12", None))
    net = build(small_topology)
    gid = naming.default_group_id("vpc-a")
    assert net.enis["eni-3"].group_ids == (gid,)
    group = net.groups[gid]
    assert (group.vpc_id, group.group_type, group.inner_access_policy) == (
        "vpc-a",
        "normal",
        "Accept",
    )
    assert group.is_vpc_default
    anywhere = CidrPeer(ipaddress.IPv4Network("0.0.0.0/0"))
    got = {(r.direction, r.protocol, r.ports, r.peer, r.policy, r.priority) for r in group.rules}
    assert got == {
        ("ingress", "TCP", PortRange(22, 22), anywhere, "accept", 100),
        ("ingress", "TCP", PortRange(3389, 3389), anywhere, "accept", 100),
        ("ingress", "ICMP", None, anywhere, "accept", 100),
    }
    assert len(group.rules) == 3
    assert all(r.source_ports is None and r.local is None for r in group.rules)
    assert all(r.rule_id.startswith("sgr-") for r in group.rules)


def test_empty_group_list_also_means_default_group(small_topology: Topo) -> None:
    small_topology["instances"][1]["security_group_ids"] = []
    net = build(small_topology)
    assert net.enis["eni-2"].group_ids == (naming.default_group_id("vpc-a"),)


def test_no_default_group_when_every_eni_has_a_group(small_topology: Topo) -> None:
    net = build(small_topology)
    assert not any(g.is_vpc_default for g in net.groups.values())


def test_default_group_defined_in_the_file_is_used_as_written(small_topology: Topo) -> None:
    gid = naming.default_group_id("vpc-a")
    small_topology["security_groups"].append(
        {"security_group_id": gid, "vpc_id": "vpc-a", "inner_access_policy": "Drop"}
    )
    small_topology["instances"].append(instance("i-3", "10.0.1.12", None))
    net = build(small_topology)
    group = net.groups[gid]
    assert group.rules == ()
    assert group.inner_access_policy == "Drop"
    assert group.is_vpc_default


def test_rule_may_reference_the_on_demand_default_group(small_topology: Topo) -> None:
    gid = naming.default_group_id("vpc-a")
    add_rule(source_cidr_ip=None, source_group_id=gid)(small_topology)
    net = build(small_topology)
    assert gid in net.groups and net.groups[gid].is_vpc_default
    assert GroupPeer(gid) in {r.peer for r in net.groups["sg-a"].rules}


def test_values_are_normalised(small_topology: Topo) -> None:
    small_topology["security_groups"][1]["permissions"] = [
        rule(ip_protocol="tcp", policy="DROP", priority="7", source_cidr_ip="10.9.8.7/8"),
        rule(
            ip_protocol="IcMpV6",
            port_range="-1/-1",
            source_cidr_ip=None,
            ipv6_source_cidr_ip="2001:DB8::1",
        ),
        egress(ip_protocol="all", port_range="-1/-1", policy=None, priority=None),
        rule(
            ip_protocol="Udp",
            port_range="53/53",
            source_port_range="1024/65535",
            dest_cidr_ip="10.0.1.11",
        ),
        rule(ip_protocol="gre", port_range="-1/-1", nic_type="Intranet"),
    ]
    rules = {r.protocol: r for r in build(small_topology).groups["sg-b"].rules}
    assert set(rules) == {"TCP", "ICMPv6", "ALL", "UDP", "GRE"}
    assert (rules["TCP"].policy, rules["TCP"].priority) == ("drop", 7)
    assert rules["TCP"].peer == CidrPeer(ipaddress.IPv4Network("10.0.0.0/8"))
    assert rules["ICMPv6"].peer == CidrPeer(ipaddress.IPv6Network("2001:db8::1/128"))
    assert rules["ICMPv6"].ports is None
    assert (rules["ALL"].direction, rules["ALL"].policy, rules["ALL"].priority) == (
        "egress",
        "accept",
        1,
    )
    assert rules["UDP"].source_ports == PortRange(1024, 65535)
    assert rules["UDP"].local == ipaddress.IPv4Network("10.0.1.11/32")
    assert rules["GRE"].ports is None and rules["GRE"].source_ports is None


def test_group_defaults(small_topology: Topo) -> None:
    net = build(small_topology)
    assert net.groups["sg-b"].inner_access_policy == "Accept"
    assert net.groups["sg-ent"].inner_access_policy == "Drop"
    small_topology["security_groups"][2]["inner_access_policy"] = "DROP"
    assert build(small_topology).groups["sg-ent"].inner_access_policy == "Drop"


def test_managed_group_loads_with_its_flag(small_topology: Topo) -> None:
    small_topology["security_groups"][1]["service_managed"] = True
    add_rule(1)(small_topology)
    net = build(small_topology)
    assert net.groups["sg-b"].managed and not net.groups["sg-a"].managed
    assert len(net.groups["sg-b"].rules) == 1


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"source_group_id": "sg-b", "source_prefix_list_id": "pl-v4"},
            CidrPeer(ipaddress.IPv4Network("0.0.0.0/0")),
        ),
        (
            {"source_cidr_ip": None, "ipv6_source_cidr_ip": "::/0", "source_group_id": "sg-b"},
            CidrPeer(ipaddress.IPv6Network("::/0")),
        ),
        (
            {"source_cidr_ip": None, "source_group_id": "sg-b", "source_prefix_list_id": "pl-v4"},
            GroupPeer("sg-b"),
        ),
        (
            {"source_cidr_ip": None, "source_prefix_list_id": "pl-v4"},
            PrefixListPeer("pl-v4"),
        ),
        # The ignored group is not validated: it may not exist, be advanced, or be itself.
        ({"source_group_id": "sg-nope"}, CidrPeer(ipaddress.IPv4Network("0.0.0.0/0"))),
        ({"source_group_id": "sg-ent"}, CidrPeer(ipaddress.IPv4Network("0.0.0.0/0"))),
        ({"source_group_id": "sg-a"}, CidrPeer(ipaddress.IPv4Network("0.0.0.0/0"))),
        (
            {"source_cidr_ip": None, "source_group_id": "sg-b", "source_prefix_list_id": "pl-no"},
            GroupPeer("sg-b"),
        ),
    ],
)
def test_peer_precedence_cidr_then_group_then_prefix_list(
    small_topology: Topo, fields: dict[str, Any], expected: object
) -> None:
    add_rule(**fields)(small_topology)
    rules = build(small_topology).groups["sg-a"].rules
    assert expected in {r.peer for r in rules if r.ports == PortRange(80, 80)}


def test_rule_ids_are_stable_unique_and_kept_when_given(small_topology: Topo) -> None:
    add_rule(security_group_rule_id="sgr-mine")(small_topology)
    add_rule(1, port_range="22/22", source_cidr_ip="192.0.2.0/24")(small_topology)
    first, second = build(small_topology), build(small_topology)
    ids = [r.rule_id for g in first.groups.values() for r in g.rules]
    assert len(ids) == len(set(ids))
    assert all(i.startswith("sgr-") for i in ids)
    assert "sgr-mine" in ids
    assert ids == [r.rule_id for g in second.groups.values() for r in g.rules]
    # The same permission in two groups gets two ids.
    a = {r.identity(): r.rule_id for r in first.groups["sg-a"].rules}
    b = {r.identity(): r.rule_id for r in first.groups["sg-b"].rules}
    shared = set(a) & set(b)
    assert shared and all(a[k] != b[k] for k in shared)


def test_rule_id_does_not_depend_on_description_or_position(small_topology: Topo) -> None:
    before = build(small_topology).groups["sg-a"].rules[0].rule_id
    perms = small_topology["security_groups"][0]["permissions"]
    perms[0]["description"] = "ssh from the lab"
    perms.insert(0, rule())
    after = {r.ports: r.rule_id for r in build(small_topology).groups["sg-a"].rules}
    assert after[PortRange(22, 22)] == before


def _shuffled(data: Topo, rng: random.Random) -> Topo:
    out = {k: list(v) if isinstance(v, list) else v for k, v in data.items()}
    for key in ("vpcs", "prefix_lists", "security_groups", "instances", "external_hosts"):
        rng.shuffle(out[key])
    out["security_groups"] = [dict(g) for g in out["security_groups"]]
    for group in out["security_groups"]:
        perms = list(group.get("permissions", []))
        rng.shuffle(perms)
        group["permissions"] = perms
    out["instances"] = [dict(i) for i in out["instances"]]
    for inst in out["instances"]:
        if inst.get("security_group_ids"):
            groups = list(inst["security_group_ids"])
            rng.shuffle(groups)
            inst["security_group_ids"] = groups
    return out


def _three_tier_plus() -> Topo:
    """The example, with a two-group ENI and a default-group ENI, so every order matters."""
    data: Topo = yaml.safe_load((EXAMPLES_DIR / "three-tier.yaml").read_text())
    data["instances"][0]["security_group_ids"] = ["sg-web", "sg-bastion"]
    data["instances"].append(instance("i-x", "10.0.1.99", None, vswitch_id="vsw-web"))
    return data


@settings(max_examples=25, deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_same_model_in_another_order_gives_an_equal_network(rng: random.Random) -> None:
    data = _three_tier_plus()
    reference = build(data)
    shuffled = build(_shuffled(data, rng))
    assert shuffled == reference
    # dict equality ignores order: the order itself must be canonical too.
    assert list(shuffled.groups) == sorted(shuffled.groups)
    assert list(shuffled.enis) == sorted(shuffled.enis)
    for group in shuffled.groups.values():
        assert group.rules == reference.groups[group.group_id].rules


def test_three_tier_example_loads(three_tier: Network) -> None:
    assert set(three_tier.groups) == {"sg-web", "sg-app", "sg-db", "sg-bastion"}
    assert three_tier.groups["sg-app"].inner_access_policy == "Drop"
    web = three_tier.groups["sg-web"].rules
    assert GroupPeer("sg-bastion") in {r.peer for r in web}
    assert three_tier.externals["office"].ipv4 == (ipaddress.IPv4Address("198.51.100.7"),)


def test_rule_family_set(small_topology: Topo) -> None:
    small_topology["security_groups"][1]["permissions"] = [
        rule(port_range="1/1"),
        rule(port_range="2/2", source_cidr_ip=None, source_group_id="sg-a"),
        rule(port_range="3/3", source_cidr_ip=None, source_prefix_list_id="pl-v6"),
        rule(ip_protocol="ICMP", port_range="-1/-1", source_cidr_ip=None, source_group_id="sg-a"),
        rule(
            port_range="5/5",
            source_cidr_ip=None,
            source_group_id="sg-a",
            ipv6_dest_cidr_ip="2001:db8:1:1::/64",
        ),
    ]
    net = build(small_topology)
    got = {
        (r.protocol, r.ports.start if r.ports else None): rule_family_set(net, r)
        for r in net.groups["sg-b"].rules
    }
    assert got == {
        ("TCP", 1): {"ipv4"},
        ("TCP", 2): {"ipv4", "ipv6"},
        ("TCP", 3): {"ipv6"},
        ("ICMP", None): {"ipv4"},
        ("TCP", 5): {"ipv6"},
    }


def test_nothing_is_returned_from_a_rejected_model(small_topology: Topo) -> None:
    # The error comes from the last object checked (limits): no partial network escapes.
    with pytest.raises(EcsError):
        build(small_topology, Quotas(enis_per_advanced_group=0))
