"""The lab builder on the real kernel, without any firewall loaded.

What a user of `nftsg lab up` would check: every host reaches every other,
TCP and UDP work, a multi-ENI instance answers from the right ENI, a second
apply changes nothing, a changed model converges, and `down` leaves nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from collections.abc import Callable

import pytest
from nftsg.agent import netns
from nftsg.agent.lab import Lab, LabError, lab_namespaces
from nftsg.translators.network import Network
from nftsg.translators.validate import load_network
from probes import ns_exec, ping, reaches, tcp_probe, udp_probe


def _ip_json(ns: str, *args: str) -> list[dict]:  # type: ignore[type-arg]
    out = subprocess.run(
        ["ip", "-n", ns, "-j", *args], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out) if out.strip() else []


def _hosts(network: Network) -> dict[str, tuple[list[str], list[str]]]:
    """host name -> (IPv4 addresses, IPv6 addresses)"""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for inst in network.instances.values():
        enis = [network.enis[e] for e in inst.eni_ids]
        out[inst.instance_id] = (
            [str(a) for e in enis for a in e.ipv4],
            [str(a) for e in enis for a in e.ipv6],
        )
    for ext in network.externals.values():
        out[ext.name] = ([str(a) for a in ext.ipv4], [str(a) for a in ext.ipv6])
    return out


def _snapshot(lab: Lab) -> dict[str, object]:
    """Every link (name -> ifindex, MAC), address and route of the lab."""
    snap: dict[str, object] = {}
    for ns in lab.existing():
        links = {x["ifname"]: (x["ifindex"], x.get("address")) for x in _ip_json(ns, "link")}
        addrs = sorted(
            (x["ifname"], a["local"], a["prefixlen"])
            for x in _ip_json(ns, "addr")
            for a in x.get("addr_info", [])
        )
        routes = [_ip_json(ns, fam, "route", "show", "table", "all") for fam in ("-4", "-6")]
        rules = [_ip_json(ns, fam, "rule") for fam in ("-4", "-6")]
        snap[ns] = (links, addrs, routes, rules)
    return snap


def _tx_packets(ns: str, ifname: str) -> int:
    (link,) = _ip_json(ns, "-s", "link", "show", ifname)
    return int(link["stats64"]["tx"]["packets"])


# -- the demo topology ----------------------------------------------------------


def test_demo_namespaces_are_named_by_kind(demo_lab: Lab, demo_network: Network) -> None:
    p = demo_lab.prefix
    expected = {f"{p}-r-vpc-demo"}
    expected |= {f"{p}-i-{i}" for i in demo_network.instances}
    expected |= {f"{p}-x-{x}" for x in demo_network.externals}
    assert set(demo_lab.existing()) == expected
    assert set(lab_namespaces(p)) == expected
    assert demo_lab.router_ns("vpc-demo") == f"{p}-r-vpc-demo"
    assert demo_lab.host_ns("i-web1") == f"{p}-i-i-web1"
    assert demo_lab.host_ns("eni-web1") == f"{p}-i-i-web1"  # the primary ENI's id
    assert demo_lab.host_ns("office") == f"{p}-x-office"
    with pytest.raises(LabError):
        demo_lab.host_ns("i-nope")
    with pytest.raises(LabError):
        demo_lab.router_ns("vpc-nope")


def test_demo_ports_carry_model_names_macs_and_addresses(
    demo_lab: Lab, demo_network: Network
) -> None:
    router = demo_lab.router_ns("vpc-demo")
    router_links = {x["ifname"] for x in _ip_json(router, "link")}
    for eni in demo_network.enis.values():
        assert eni.ifname in router_links
        (link,) = _ip_json(demo_lab.host_ns(eni.instance_id), "addr", "show", eni.peer_ifname)
        assert link["address"] == eni.mac
        assert link["operstate"] == "UP"
        have = {a["local"] for a in link["addr_info"] if a["scope"] == "global"}
        assert have == {str(a) for a in eni.addresses}
    lo = _ip_json(demo_lab.host_ns("i-web1"), "link", "show", "lo")[0]
    assert "UP" in lo["flags"]


def test_demo_every_host_pings_every_other(demo_lab: Lab, demo_network: Network) -> None:
    hosts = _hosts(demo_network)
    failures = []
    v6_pairs = 0
    for a, b in itertools.permutations(sorted(hosts), 2):
        src = demo_lab.host_ns(a)
        for addr in hosts[b][0]:
            if not reaches(src, addr):
                failures.append((a, addr))
        if hosts[a][1]:
            for addr in hosts[b][1]:
                v6_pairs += 1
                if not reaches(src, addr):
                    failures.append((a, addr))
    assert failures == []
    assert v6_pairs >= 6  # web1, web2, app1 and internet have IPv6


@pytest.mark.parametrize(
    ("src", "dst", "addr", "port", "sport"),
    [
        ("internet", "i-web1", "10.0.1.10", 80, None),
        ("internet", "i-web1", "2001:db8:10:1::10", 443, 40000),
        ("i-web1", "i-app1", "10.0.2.10", 8080, 40001),
        ("i-web2", "i-app1", "2001:db8:10:2::10", 8080, None),
        ("i-app1", "i-db1", "10.0.3.10", 5432, None),
        ("office", "i-bastion", "10.0.9.10", 22, 1024),
    ],
)
def test_demo_tcp_and_udp(
    demo_lab: Lab, src: str, dst: str, addr: str, port: int, sport: int | None
) -> None:
    s, d = demo_lab.host_ns(src), demo_lab.host_ns(dst)
    tcp = tcp_probe(s, d, addr, port, sport=sport)
    assert tcp.ok, tcp.error
    udp = udp_probe(s, d, addr, port, sport=sport)
    assert udp.ok, udp.error
    src_addrs = _hosts_by_ns(demo_lab, src)
    assert tcp.seen_from is not None and tcp.seen_from[0] in src_addrs
    if sport is not None:
        assert tcp.seen_from[1] == sport and udp.seen_from == tcp.seen_from


def _hosts_by_ns(lab: Lab, name: str) -> set[str]:
    return {
        a["local"]
        for x in _ip_json(lab.host_ns(name), "addr")
        for a in x.get("addr_info", [])
        if a["scope"] == "global"
    }


def test_probes_report_failure_quickly(demo_lab: Lab) -> None:
    web1 = demo_lab.host_ns("i-web1")
    started = time.monotonic()
    assert not ping(web1, "10.0.77.7", timeout=0.3)  # inside the VPC, nobody owns it
    assert not ping(web1, "2001:db8:10:77::7", timeout=0.3)
    assert time.monotonic() - started < 1.0


def test_instances_do_not_forward_and_router_does(demo_lab: Lab) -> None:
    def sysctl(ns: str, key: str) -> str:
        with netns.entered(ns):
            with open(f"/proc/sys/{key}") as f:
                return f.read().strip()

    router = demo_lab.router_ns("vpc-demo")
    assert sysctl(router, "net/ipv4/ip_forward") == "1"
    assert sysctl(router, "net/ipv6/conf/all/forwarding") == "1"
    web1 = demo_lab.host_ns("i-web1")
    assert sysctl(web1, "net/ipv4/ip_forward") == "0"
    assert sysctl(web1, "net/ipv6/conf/all/forwarding") == "0"
    assert sysctl(web1, "net/ipv4/conf/eth0/rp_filter") in ("0", "2")


def test_apply_twice_changes_nothing(demo_lab: Lab, demo_network: Network) -> None:
    before = _snapshot(demo_lab)
    demo_lab.apply(demo_network)
    assert _snapshot(demo_lab) == before


# -- exec inside a namespace -------------------------------------------------------


def test_exec_in_namespace(demo_lab: Lab) -> None:
    web1 = demo_lab.host_ns("i-web1")
    here = os.readlink("/proc/thread-self/ns/net")

    assert netns.run_in(web1, _own_links) == ["eth0", "lo"]
    assert os.readlink("/proc/thread-self/ns/net") == here

    with pytest.raises(RuntimeError), netns.entered(web1):
        raise RuntimeError("boom")
    assert os.readlink("/proc/thread-self/ns/net") == here  # restored after an error

    proc = ns_exec(web1, ["ip", "-br", "addr", "show", "eth0"])
    assert proc.returncode == 0 and "10.0.1.10/24" in proc.stdout


def _own_links() -> list[str]:
    import socket

    return sorted(name for _, name in socket.if_nameindex())


def test_missing_namespace_is_refused_not_created(run_prefix: str) -> None:
    name = f"{run_prefix}-i-missing"
    with pytest.raises(netns.NetnsError), netns.entered(name):
        pass
    with pytest.raises(netns.NetnsError):
        netns.iproute(name)
    assert not netns.exists(name)


# -- a multi-ENI instance ------------------------------------------------------------

MULTI = """
vpcs:
  - vpc_id: vpc-m
    cidr_block: 10.1.0.0/16
    ipv6_cidr_block: 2001:db8:20::/56
    vswitches:
      - {vswitch_id: vsw-a, cidr_block: 10.1.1.0/24, ipv6_cidr_block: "2001:db8:20:1::/64"}
      - {vswitch_id: vsw-b, cidr_block: 10.1.2.0/24, ipv6_cidr_block: "2001:db8:20:2::/64"}
instances:
  - instance_id: i-multi
    vswitch_id: vsw-a
    private_ip_address: 10.1.1.20
    ipv6_address: "2001:db8:20:1::20"
    network_interfaces:
      - network_interface_id: eni-multi-b
        vswitch_id: vsw-b
        primary_ip_address: 10.1.2.20
        ipv6_address: "2001:db8:20:2::20"
  - instance_id: i-peer
    vswitch_id: vsw-a
    private_ip_address: 10.1.1.30
    ipv6_address: "2001:db8:20:1::30"
"""


def test_secondary_eni_replies_from_its_own_interface(lab: Lab) -> None:
    lab.apply(load_network(MULTI))
    multi, peer = lab.host_ns("i-multi"), lab.host_ns("i-peer")
    assert lab.host_ns("eni-multi-b") == multi

    for eni_addr, peer_addr in (
        ("10.1.2.20", "10.1.1.30"),
        ("2001:db8:20:2::20", "2001:db8:20:1::30"),
    ):
        # The peer reaches the secondary ENI's address; the instance's reply
        # must go out of eth1 although the peer is on eth0's vSwitch.
        eth0, eth1 = _tx_packets(multi, "eth0"), _tx_packets(multi, "eth1")
        for _ in range(30):
            assert reaches(peer, eni_addr)
        assert tcp_probe(peer, multi, eni_addr, 8000).ok
        assert udp_probe(peer, multi, eni_addr, 8000).ok
        assert _tx_packets(multi, "eth1") - eth1 >= 32
        assert _tx_packets(multi, "eth0") - eth0 < 5

        # Initiated from the secondary address: the peer sees that address.
        seen = tcp_probe(multi, peer, peer_addr, 8001, src=eni_addr).seen_from
        assert seen is not None and seen[0] == eni_addr
        # Not bound: the primary ENI (same vSwitch as the peer) is the source.
        seen = tcp_probe(multi, peer, peer_addr, 8002).seen_from
        assert seen is not None and seen[0] != eni_addr

    rules = _ip_json(multi, "rule")
    assert {r.get("src") for r in rules if r.get("priority") == 1000} == {"10.1.1.20", "10.1.2.20"}


# -- convergence -------------------------------------------------------------------

BASE = """
vpcs:
  - vpc_id: vpc-c
    cidr_block: 10.2.0.0/16
    ipv6_cidr_block: 2001:db8:30::/56
    vswitches:
      - {vswitch_id: vsw-a, cidr_block: 10.2.1.0/24, ipv6_cidr_block: "2001:db8:30:1::/64"}
      - {vswitch_id: vsw-b, cidr_block: 10.2.2.0/24}
instances:
  - instance_id: i-a
    vswitch_id: vsw-a
    private_ip_address: 10.2.1.10
    ipv6_address: "2001:db8:30:1::10"
  - {instance_id: i-b, vswitch_id: vsw-a, private_ip_address: 10.2.1.11}
  - {instance_id: i-c, vswitch_id: vsw-b, private_ip_address: 10.2.2.12}
external_hosts:
  - {name: net, vpc_id: vpc-c, ip_address: 203.0.113.9, ipv6_address: "2001:db8:ff::9"}
"""

CHANGED = """
vpcs:
  - vpc_id: vpc-c
    cidr_block: 10.2.0.0/16
    ipv6_cidr_block: 2001:db8:30::/56
    vswitches:
      - {vswitch_id: vsw-a, cidr_block: 10.2.1.0/24, ipv6_cidr_block: "2001:db8:30:1::/64"}
      - {vswitch_id: vsw-b, cidr_block: 10.2.2.0/24}
instances:
  - instance_id: i-a
    vswitch_id: vsw-a
    private_ip_address: 10.2.1.10
    ipv6_address: "2001:db8:30:1::10"
    network_interfaces:
      - {network_interface_id: eni-a-2, vswitch_id: vsw-b, primary_ip_address: 10.2.2.10}
  - instance_id: i-b
    vswitch_id: vsw-a
    private_ip_address: 10.2.1.21
    ipv6_address: "2001:db8:30:1::21"
  - {instance_id: i-d, vswitch_id: vsw-b, private_ip_address: 10.2.2.13}
external_hosts:
  - {name: net, vpc_id: vpc-c, ip_address: 203.0.113.9, ipv6_address: "2001:db8:ff::9"}
"""


def test_apply_converges_to_a_changed_model(lab: Lab) -> None:
    lab.apply(load_network(BASE))
    p = lab.prefix
    router = lab.router_ns("vpc-c")
    a, net = lab.host_ns("i-a"), lab.host_ns("net")
    assert reaches(net, "10.2.1.11") and reaches(net, "10.2.2.12")
    links_a = {x["ifname"]: x["ifindex"] for x in _ip_json(a, "link")}
    links_r = {x["ifname"]: x["ifindex"] for x in _ip_json(router, "link")}

    changed = load_network(CHANGED)
    lab.apply(changed)

    assert set(lab.existing()) == {
        f"{p}-r-vpc-c",
        f"{p}-i-i-a",
        f"{p}-i-i-b",
        f"{p}-i-i-d",
        f"{p}-x-net",
    }
    # What stayed was not recreated.
    after_a = {x["ifname"]: x["ifindex"] for x in _ip_json(a, "link")}
    assert after_a["eth0"] == links_a["eth0"] and "eth1" in after_a
    after_r = {x["ifname"]: x["ifindex"] for x in _ip_json(router, "link")}
    for name, index in links_r.items():
        if name in after_r:
            assert after_r[name] == index
    # Gone: i-c and its port, i-b's old address (route and neighbour too).
    ports = {e.ifname for e in changed.enis.values()} | {
        x.ifname for x in changed.externals.values()
    }
    assert set(after_r) == ports | {"lo"}
    assert not ping(net, "10.2.1.11", timeout=0.3)
    assert not ping(net, "10.2.2.12", timeout=0.3)
    router_routes = {r["dst"] for r in _ip_json(router, "route")}
    assert "10.2.1.11" not in router_routes and "10.2.2.12" not in router_routes
    assert "10.2.1.11" not in {n["dst"] for n in _ip_json(router, "neigh")}
    # New and changed: reachable on every new address.
    for addr in ("10.2.1.21", "2001:db8:30:1::21", "10.2.2.13", "10.2.2.10", "10.2.1.10"):
        assert reaches(net, addr), addr
    assert tcp_probe(net, lab.host_ns("i-a"), "10.2.2.10", 22).ok
    assert _hosts_by_ns(lab, "i-b") == {"10.2.1.21", "2001:db8:30:1::21"}

    # Back to the base model: the secondary ENI and its policy routing go away.
    lab.apply(load_network(BASE))
    assert {x["ifname"] for x in _ip_json(a, "link")} == {"lo", "eth0"}
    assert [r for r in _ip_json(a, "rule") if r.get("priority") == 1000] == []
    assert reaches(net, "10.2.2.12") and reaches(net, "10.2.1.11") and reaches(net, "10.2.1.10")


def test_apply_repairs_a_port_deleted_behind_its_back(lab: Lab) -> None:
    network = load_network(BASE)
    lab.apply(network)
    router, net = lab.router_ns("vpc-c"), lab.host_ns("net")
    eni = network.enis[network.instances["i-b"].eni_ids[0]]
    subprocess.run(["ip", "-n", router, "link", "del", eni.ifname], check=True)
    assert not ping(net, "10.2.1.11", timeout=0.3)
    lab.apply(network)
    assert reaches(net, "10.2.1.11")


def test_destroy_leaves_nothing_and_is_idempotent(make_lab: Callable[[], Lab]) -> None:
    lab = make_lab()
    lab.apply(load_network(BASE))
    assert lab.existing()
    lab.destroy()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{lab.prefix}-" not in listed
    lab.destroy()
    assert lab.existing() == []


# -- scale ----------------------------------------------------------------------------


def _many(n: int) -> str:
    instances = [
        {
            "instance_id": f"i-n{i}",
            "vswitch_id": "vsw-a" if i % 2 else "vsw-b",
            "private_ip_address": f"10.3.{1 if i % 2 else 2}.{10 + i}",
            "ipv6_address": f"2001:db8:40:{1 if i % 2 else 2}::{10 + i:x}",
        }
        for i in range(n)
    ]
    topo = {
        "vpcs": [
            {
                "vpc_id": "vpc-s",
                "cidr_block": "10.3.0.0/16",
                "ipv6_cidr_block": "2001:db8:40::/56",
                "vswitches": [
                    {
                        "vswitch_id": "vsw-a",
                        "cidr_block": "10.3.1.0/24",
                        "ipv6_cidr_block": "2001:db8:40:1::/64",
                    },
                    {
                        "vswitch_id": "vsw-b",
                        "cidr_block": "10.3.2.0/24",
                        "ipv6_cidr_block": "2001:db8:40:2::/64",
                    },
                ],
            }
        ],
        "instances": instances,
    }
    return json.dumps(topo)


def test_apply_time_demo_and_50_instances(
    make_lab: Callable[[], Lab], demo_network: Network, capsys: pytest.CaptureFixture[str]
) -> None:
    timings = {}
    demo = make_lab()
    started = time.perf_counter()
    demo.apply(demo_network)
    timings["demo build"] = time.perf_counter() - started
    demo.destroy()

    big = make_lab()
    network = load_network(_many(50))
    started = time.perf_counter()
    big.apply(network)
    timings["50 instances build"] = time.perf_counter() - started
    started = time.perf_counter()
    big.apply(network)
    timings["50 instances re-apply"] = time.perf_counter() - started
    assert reaches(big.host_ns("i-n0"), "10.3.1.59")
    assert reaches(big.host_ns("i-n49"), "2001:db8:40:2::10")
    with capsys.disabled():
        print("\n" + ", ".join(f"{k}: {v * 1000:.0f} ms" for k, v in timings.items()))
    assert timings["50 instances build"] < 10
