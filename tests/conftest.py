"""Pure fixtures shared by the unit tests: example topologies; no root, no side effects."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nftsg.translators.network import Network
from nftsg.translators.validate import load_network

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"

# A small topology that exercises every kind of object: two VPCs, IPv6, prefix
# lists of both families, basic and advanced groups, a secondary ENI.
_SMALL: dict[str, Any] = {
    "vpcs": [
        {
            "vpc_id": "vpc-a",
            "cidr_block": "10.0.0.0/16",
            "ipv6_cidr_block": "2001:db8:1::/56",
            "vswitches": [
                {
                    "vswitch_id": "vsw-a1",
                    "cidr_block": "10.0.1.0/24",
                    "ipv6_cidr_block": "2001:db8:1:1::/64",
                },
                {"vswitch_id": "vsw-a2", "cidr_block": "10.0.2.0/24"},
            ],
        },
        {
            "vpc_id": "vpc-b",
            "cidr_block": "10.1.0.0/16",
            "vswitches": [{"vswitch_id": "vsw-b1", "cidr_block": "10.1.1.0/24"}],
        },
    ],
    "prefix_lists": [
        {
            "prefix_list_id": "pl-v4",
            "address_family": "IPv4",
            "max_entries": 10,
            "entries": ["198.51.100.0/24"],
        },
        {
            "prefix_list_id": "pl-v6",
            "address_family": "IPv6",
            "max_entries": 5,
            "entries": ["2001:db8:ff::/48"],
        },
    ],
    "security_groups": [
        {
            "security_group_id": "sg-a",
            "vpc_id": "vpc-a",
            "permissions": [
                {
                    "direction": "ingress",
                    "ip_protocol": "TCP",
                    "port_range": "22/22",
                    "source_cidr_ip": "192.0.2.0/24",
                }
            ],
        },
        {"security_group_id": "sg-b", "vpc_id": "vpc-a"},
        {"security_group_id": "sg-ent", "vpc_id": "vpc-a", "security_group_type": "enterprise"},
        {"security_group_id": "sg-other", "vpc_id": "vpc-b"},
    ],
    "instances": [
        {
            "instance_id": "i-1",
            "vswitch_id": "vsw-a1",
            "private_ip_address": "10.0.1.10",
            "ipv6_address": "2001:db8:1:1::10",
            "security_group_ids": ["sg-a"],
            "network_interfaces": [
                {
                    "network_interface_id": "eni-1b",
                    "vswitch_id": "vsw-a2",
                    "primary_ip_address": "10.0.2.10",
                    "security_group_ids": ["sg-ent"],
                }
            ],
        },
        {
            "instance_id": "i-2",
            "vswitch_id": "vsw-a1",
            "private_ip_address": "10.0.1.11",
            "security_group_ids": ["sg-a", "sg-b"],
        },
    ],
    "external_hosts": [{"name": "office", "vpc_id": "vpc-a", "ip_address": "198.51.100.7"}],
}


@pytest.fixture
def small_topology() -> dict[str, Any]:
    """A fresh, valid topology as parsed data (a deep copy: tests may edit it)."""
    return copy.deepcopy(_SMALL)


@pytest.fixture
def three_tier_text() -> str:
    return (EXAMPLES_DIR / "three-tier.yaml").read_text()


@pytest.fixture
def three_tier(three_tier_text: str) -> Network:
    return load_network(three_tier_text)


@pytest.fixture
def example_text() -> Callable[[str], str]:
    """Text of any file in examples/, by name."""
    return lambda name: (EXAMPLES_DIR / name).read_text()
