"""Host mode's bindings: checked against the model, and how the lab plan leaves them alone."""

from __future__ import annotations

from typing import Any

import pytest
from nftsg.agent.labplan import build_plan
from nftsg.translators.bindings import Binding, bound_eni_ids, check_bindings
from nftsg.translators.errors import EcsError
from nftsg.translators.model import topology_from_data
from nftsg.translators.validate import build_network


def doc(*bindings: dict[str, Any]) -> dict[str, Any]:
    return {
        "vpcs": [
            {
                "vpc_id": "vpc-b",
                "cidr_block": "10.2.0.0/16",
                "vswitches": [{"vswitch_id": "vsw-b", "cidr_block": "10.2.1.0/24"}],
            }
        ],
        "instances": [
            {"instance_id": "i-vm", "vswitch_id": "vsw-b", "private_ip_address": "10.2.1.10"},
            {
                "instance_id": "i-ctr",
                "vswitch_id": "vsw-b",
                "private_ip_address": "10.2.1.11",
                "network_interfaces": [
                    {"network_interface_id": "eni-ctr-b", "primary_ip_address": "10.2.1.12"}
                ],
            },
            {"instance_id": "i-lab", "vswitch_id": "vsw-b", "private_ip_address": "10.2.1.13"},
        ],
        "bindings": list(bindings),
    }


def checked(*bindings: dict[str, Any]) -> dict[str, Binding]:
    topology = topology_from_data(doc(*bindings))
    return check_bindings(topology, build_network(topology))


def test_bindings_by_name_and_by_mac() -> None:
    out = checked(
        {"network_interface_id": "eni-vm", "ifname": "vnet3"},
        {"NetworkInterfaceId": "eni-ctr", "Netns": "cni-42", "MacAddress": "02-AB-00-00-00-01"},
    )
    assert out == {
        "eni-ctr": Binding("eni-ctr", "cni-42", None, "02:ab:00:00:00:01"),
        "eni-vm": Binding("eni-vm", "", "vnet3", None),
    }


BAD = [
    (
        {"network_interface_id": "eni-nope", "ifname": "x"},
        "InvalidNetworkInterfaceId.NotFound",
        "bindings[0].network_interface_id",
    ),
    ({"network_interface_id": "eni-vm"}, "MissingParameter", "bindings[0]"),
    (
        {"network_interface_id": "eni-vm", "ifname": "x", "mac_address": "02:00:00:00:00:01"},
        "InvalidParameter",
        "bindings[0]",
    ),
    ({"network_interface_id": "eni-vm", "ifname": "a/b"}, "InvalidParameter", "bindings[0].ifname"),
    (
        {"network_interface_id": "eni-vm", "ifname": "sixteen-bytes-xx"},
        "InvalidParameter",
        "bindings[0].ifname",
    ),
    (
        {"network_interface_id": "eni-vm", "ifname": "has space"},
        "InvalidParameter",
        "bindings[0].ifname",
    ),
    (
        {"network_interface_id": "eni-vm", "ifname": "x", "netns": "../etc"},
        "InvalidParameter",
        "bindings[0].netns",
    ),
    (
        {"network_interface_id": "eni-vm", "mac_address": "02:00:00:00:00"},
        "InvalidMacAddress.Malformed",
        "bindings[0].mac_address",
    ),
    (
        {"network_interface_id": "eni-vm", "mac_address": "01:00:5e:00:00:01"},
        "InvalidMacAddress.Malformed",
        "bindings[0].mac_address",
    ),
]


@pytest.mark.parametrize(("binding", "code", "path"), BAD)
def test_bad_bindings_name_the_field(binding: dict[str, Any], code: str, path: str) -> None:
    with pytest.raises(EcsError) as err:
        build_network(topology_from_data(doc(binding)))  # validation checks them too
    assert (err.value.code, err.value.path) == (code, path)


def test_one_binding_per_eni_and_one_eni_per_interface() -> None:
    with pytest.raises(EcsError, match="bound twice"):
        checked(
            {"network_interface_id": "eni-vm", "ifname": "a"},
            {"network_interface_id": "eni-vm", "ifname": "b"},
        )
    with pytest.raises(EcsError, match="bound to both eni-vm and eni-ctr"):
        checked(
            {"network_interface_id": "eni-vm", "ifname": "a", "netns": "n"},
            {"network_interface_id": "eni-ctr", "ifname": "a", "netns": "n"},
        )
    # The same name in two namespaces is two interfaces.
    assert (
        len(
            checked(
                {"network_interface_id": "eni-vm", "ifname": "a", "netns": "n1"},
                {"network_interface_id": "eni-ctr", "ifname": "a", "netns": "n2"},
            )
        )
        == 2
    )


def test_unknown_binding_fields_are_refused() -> None:
    with pytest.raises(EcsError, match="unknown field 'namespace'"):
        topology_from_data(doc({"network_interface_id": "eni-vm", "namespace": "x"}))


def test_lab_plan_keeps_bound_ports_but_builds_no_instance_side() -> None:
    topology = topology_from_data(
        doc(
            {"network_interface_id": "eni-vm", "ifname": "vnet3"},
            {"network_interface_id": "eni-ctr-b", "ifname": "veth9"},
        )
    )
    network = build_network(topology)
    bound = bound_eni_ids(topology)
    plan = build_plan(network, "hm", bound)
    ports = {p.key: p for p in plan.routers["hm-r-vpc-b"]}
    assert set(ports) == set(network.enis)
    assert {k for k, p in ports.items() if p.bound} == {"eni-vm", "eni-ctr-b"}
    assert ports["eni-vm"].router_ifname == network.enis["eni-vm"].ifname
    # i-vm is wholly bound: no namespace; i-ctr keeps its lab-built primary only.
    assert set(plan.hosts) == {"hm-i-i-ctr", "hm-i-i-lab"}
    assert [p.key for p in plan.hosts["hm-i-i-ctr"]] == ["eni-ctr"]
    assert "i-vm" not in plan.host_names and "eni-vm" not in plan.host_names
    # Without bindings the plan is as before.
    assert not any(p.bound for p in build_plan(network, "hm").routers["hm-r-vpc-b"])
