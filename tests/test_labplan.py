"""The lab plan (names, ports, addressing) without root."""

from __future__ import annotations

from pathlib import Path

import pytest
from nftsg.agent.lab import Lab, LabError
from nftsg.agent.labplan import build_plan
from nftsg.translators.validate import load_network

DEMO = Path(__file__).resolve().parent.parent / "examples" / "three-tier.yaml"

MULTI = """
vpcs:
  - vpc_id: vpc-m
    cidr_block: 10.1.0.0/16
    vswitches:
      - {vswitch_id: vsw-a, cidr_block: 10.1.1.0/24}
      - {vswitch_id: vsw-b, cidr_block: 10.1.16.0/20}
instances:
  - instance_id: i-multi
    vswitch_id: vsw-a
    private_ip_address: 10.1.1.20
    network_interfaces:
      - {network_interface_id: eni-b, vswitch_id: vsw-b, primary_ip_address: 10.1.17.20}
"""


def test_demo_plan_names_every_namespace_by_kind() -> None:
    network = load_network(DEMO.read_text())
    plan = build_plan(network, "lab1")
    assert plan.namespaces[0] == "lab1-r-vpc-demo"  # routers first
    assert set(plan.hosts) == {f"lab1-i-{i}" for i in network.instances} | {
        "lab1-x-office",
        "lab1-x-internet",
    }
    ports = plan.routers["lab1-r-vpc-demo"]
    assert {p.router_ifname for p in ports} == {e.ifname for e in network.enis.values()} | {
        x.ifname for x in network.externals.values()
    }
    (web1,) = plan.hosts["lab1-i-i-web1"]
    assert (web1.host_ifname, web1.table) == ("eth0", None)
    assert [str(a) for a in web1.ipv4] == ["10.0.1.10/24"]
    assert [str(a) for a in web1.ipv6] == ["2001:db8:10:1::10/64"]
    (office,) = plan.hosts["lab1-x-office"]
    assert [str(a) for a in office.ipv4] == ["198.51.100.7/32"]


def test_multi_eni_instance_gets_one_table_per_eni() -> None:
    plan = build_plan(load_network(MULTI), "p")
    eth0, eth1 = plan.hosts["p-i-i-multi"]
    assert (eth0.host_ifname, eth0.table) == ("eth0", 100)
    assert (eth1.host_ifname, eth1.table) == ("eth1", 101)
    assert [str(a) for a in eth1.ipv4] == ["10.1.17.20/20"]
    assert plan.host_names["eni-b"] == "p-i-i-multi"


@pytest.mark.parametrize("prefix", ["", "a-b", "x/y", "a" * 33])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(LabError):
        Lab(prefix)


def test_names_resolve_against_a_known_model_without_root() -> None:
    lab = Lab("p")
    lab.set_model(load_network(MULTI))
    assert lab.host_ns("i-multi") == lab.host_ns("eni-b") == "p-i-i-multi"
    assert lab.router_ns("vpc-m") == "p-r-vpc-m"
    with pytest.raises(LabError):
        lab.host_ns("i-other")
