"""Random valid topologies and flows, for differential tests against the reference evaluator.

One generator, two drivers: `random_model(seed)` / `random_flows(network, seed, n)`
are plain seeded functions (reproducible anywhere, e.g. in real-namespace
tests), and `models()` / `flows(network)` are hypothesis strategies built from
the very same code, so hypothesis can shrink a failure to a small model.

Models are single-VPC and always valid (`network_of` checks them): IPv4 and
IPv6 vSwitches, 2-8 instances (some with secondary ENIs), 1-5 basic or
advanced groups (never mixed on one ENI), some ENIs in the VPC default group,
0-2 external hosts, and rules over every feature: protocols, port and
source-port ranges, CIDR peers that often cover real endpoints, group
references, prefix lists, local addresses, both policies, few priorities so
that ties happen.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from hypothesis import strategies as st
from nftsg.translators.evaluator import Flow
from nftsg.translators.model import topology_from_data
from nftsg.translators.network import (
    PROTOCOL_NUMBERS,
    CidrPeer,
    GroupPeer,
    IPAddress,
    Network,
    Peer,
    PortRange,
)
from nftsg.translators.validate import build_network

T = TypeVar("T")

VPC_ID = "vpc-rand"
VPC_V4 = "10.0.0.0/16"
VPC_V6 = "2001:db8:10::/56"
EXTERNAL_V4 = ("198.51.100.7", "203.0.113.50", "192.0.2.10")
EXTERNAL_V6 = ("2001:db8:ffff::50", "2001:db8:eeee::7")
PROTOCOLS = ("TCP", "UDP", "ICMP", "ICMPv6", "GRE", "ALL")
PRIORITIES = (1, 1, 2, 5, 100)
PORT_EDGES = (1, 2, 21, 22, 23, 53, 80, 443, 1023, 1024, 8080, 32768, 65534, 65535)
# IP protocol numbers flows use: TCP, UDP, ICMP, ICMPv6, GRE, SCTP (ports, but no rule names it).
FLOW_PROTOCOLS = {4: (6, 17, 1, 47, 132), 6: (6, 17, 58, 47, 132)}
PORTED = frozenset({6, 17, 132})


class Chooser(Protocol):
    """The source of every random decision."""

    def integer(self, lo: int, hi: int) -> int: ...

    def pick(self, options: Sequence[T]) -> T: ...

    def chance(self, percent: int) -> bool: ...


class SeededChooser:
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self._rng.randint(lo, hi)

    def pick(self, options: Sequence[T]) -> T:
        return options[self._rng.randrange(len(options))]

    def chance(self, percent: int) -> bool:
        return self._rng.randrange(100) < percent


class DrawChooser:
    """Decisions drawn from hypothesis, so that failures shrink (towards small, plain models)."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self._draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return int(self._draw(st.integers(lo, hi)))

    def pick(self, options: Sequence[T]) -> T:
        return options[self.integer(0, len(options) - 1)]

    def chance(self, percent: int) -> bool:
        # Shrinks to 0, i.e. to "no": fewer optional features.
        return self.integer(0, 99) >= 100 - percent


# -- models -------------------------------------------------------------------------


@dataclass
class _Plan:
    """What rule generation needs to know about the model built so far."""

    vswitches: list[dict[str, Any]]
    v4_addrs: list[str]
    v6_addrs: list[str]
    externals: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    prefix_lists: list[dict[str, Any]]

    def cidrs(self, ch: Chooser, family: int) -> str:
        """A peer or local CIDR; most cover real endpoints, so that rules match flows."""
        if family == 4:
            pool = ["0.0.0.0/0", VPC_V4, "192.0.2.128/25"]
            pool += [s["cidr_block"] for s in self.vswitches]
            addrs = self.v4_addrs + [x["ip_address"] for x in self.externals if "ip_address" in x]
            lengths = (32, 32, 30, 24)
        else:
            pool = ["::/0", VPC_V6, "2001:db8:dead::/48"]
            pool += [s["ipv6_cidr_block"] for s in self.vswitches if "ipv6_cidr_block" in s]
            addrs = self.v6_addrs + [
                x["ipv6_address"] for x in self.externals if "ipv6_address" in x
            ]
            lengths = (128, 128, 126, 64)
        if addrs and ch.chance(60):
            net = ipaddress.ip_network(f"{ch.pick(addrs)}/{ch.pick(lengths)}", strict=False)
            return str(net)
        return ch.pick(pool)


def _port_range(ch: Chooser) -> str:
    start = ch.pick(PORT_EDGES) if ch.chance(80) else ch.integer(1, 65535)
    if ch.chance(30):
        return f"{start}/{start}"
    end = ch.pick([p for p in PORT_EDGES if p >= start] or [65535])
    return f"{start}/{end}"


def _addresses(
    ch: Chooser, plan: _Plan, vsw: dict[str, Any], used: dict[str, int]
) -> dict[str, Any]:
    """Fresh addresses in `vsw`: a primary IPv4, sometimes more; IPv6 if the vSwitch has it."""
    sid = vsw["vswitch_id"]

    def host() -> int:
        used[sid] = used.get(sid, 9) + 1
        return used[sid]

    net4 = ipaddress.ip_network(vsw["cidr_block"])
    v4 = [str(net4[host()]) for _ in range(1 + int(ch.chance(20)))]
    v6: list[str] = []
    if "ipv6_cidr_block" in vsw and ch.chance(75):
        net6 = ipaddress.ip_network(vsw["ipv6_cidr_block"])
        v6 = [str(net6[host()]) for _ in range(1 + int(ch.chance(15)))]
    plan.v4_addrs.extend(v4)
    plan.v6_addrs.extend(v6)
    out: dict[str, Any] = {"v4": v4}
    if v6:
        out["v6"] = v6
    return out


def _group_list(ch: Chooser, groups: list[dict[str, Any]]) -> list[str] | None:
    """None (the VPC default group) or 1-3 groups of one type."""
    if ch.chance(15):
        return None
    kind = ch.pick(sorted({g["security_group_type"] for g in groups}))
    same = [g["security_group_id"] for g in groups if g["security_group_type"] == kind]
    count = ch.integer(1, min(3, len(same)))
    chosen: list[str] = []
    while len(chosen) < count:
        gid = ch.pick(same)
        if gid not in chosen:
            chosen.append(gid)
    return chosen


def _rule(ch: Chooser, plan: _Plan, group: dict[str, Any]) -> dict[str, Any]:
    ingress = ch.chance(55)
    protocol = ch.pick(PROTOCOLS)
    rule: dict[str, Any] = {
        "direction": "ingress" if ingress else "egress",
        "ip_protocol": protocol,
        "port_range": _port_range(ch) if protocol in ("TCP", "UDP") else "-1/-1",
        "policy": "accept" if ch.chance(60) else "drop",
        "priority": ch.pick(PRIORITIES),
    }
    if protocol in ("TCP", "UDP") and ch.chance(25):
        rule["source_port_range"] = _port_range(ch)

    # The families the protocol allows; the peer and the local address narrow them.
    families = {"ICMP": [4], "ICMPv6": [6]}.get(protocol, [4, 6])
    gid = group["security_group_id"]
    basic = group["security_group_type"] == "normal"
    others = [
        g["security_group_id"]
        for g in plan.groups
        if g["security_group_type"] == "normal" and g["security_group_id"] != gid
    ]
    lists = [p for p in plan.prefix_lists if int(p["address_family"][-1]) in families]
    kinds = ["cidr", "cidr"] + (["group"] if basic and others else []) + (["pl"] if lists else [])
    kind = ch.pick(kinds)
    side = "source" if ingress else "dest"
    if kind == "cidr":
        family = ch.pick(families)
        key = f"{side}_cidr_ip" if family == 4 else f"ipv6_{side}_cidr_ip"
        rule[key] = plan.cidrs(ch, family)
        families = [family]
    elif kind == "group":
        rule[f"{side}_group_id"] = ch.pick(others)
    else:
        plist = ch.pick(lists)
        rule[f"{side}_prefix_list_id"] = plist["prefix_list_id"]
        families = [int(plist["address_family"][-1])]
    if ch.chance(20):
        family = ch.pick(families)
        local = "dest" if ingress else "source"
        key = f"{local}_cidr_ip" if family == 4 else f"ipv6_{local}_cidr_ip"
        rule[key] = plan.cidrs(ch, family)
    return rule


def _identity(rule: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    # The generator writes every permission in one normal form (CIDRs normalised,
    # no "-1/-1" source ranges, policy always given), so equal dicts are equal rules.
    norm = {k: str(v) for k, v in rule.items() if k != "description"}
    return tuple(sorted(norm.items()))


def build_model(ch: Chooser) -> dict[str, Any]:
    """A valid single-VPC topology (as the YAML file would hold it), driven by `ch`."""
    vswitches: list[dict[str, Any]] = []
    for k in range(1, ch.integer(1, 3) + 1):
        vsw: dict[str, Any] = {"vswitch_id": f"vsw-{k}", "cidr_block": f"10.0.{k}.0/24"}
        if ch.chance(75):
            vsw["ipv6_cidr_block"] = f"2001:db8:10:{k}::/64"
        vswitches.append(vsw)
    plan = _Plan(vswitches, [], [], [], [], [])

    for k in range(ch.integer(0, 2)):
        ext: dict[str, Any] = {"name": f"ext-{k}", "vpc_id": VPC_ID}
        has_v4 = ch.chance(80)
        if has_v4:
            ext["ip_address"] = EXTERNAL_V4[k]
        if not has_v4 or ch.chance(50):
            ext["ipv6_address"] = EXTERNAL_V6[k]
        plan.externals.append(ext)

    for k in range(ch.integer(1, 5)):
        group: dict[str, Any] = {
            "security_group_id": f"sg-{k}",
            "vpc_id": VPC_ID,
            "security_group_type": "enterprise" if ch.chance(30) else "normal",
        }
        if group["security_group_type"] == "normal":
            group["inner_access_policy"] = "Accept" if ch.chance(60) else "Drop"
        plan.groups.append(group)

    used: dict[str, int] = {}
    instances: list[dict[str, Any]] = []
    for k in range(ch.integer(2, 8)):
        vsw = ch.pick(vswitches)
        addrs = _addresses(ch, plan, vsw, used)
        inst: dict[str, Any] = {
            "instance_id": f"i-{k}",
            "vswitch_id": vsw["vswitch_id"],
            "private_ip_address": addrs["v4"][0],
            "secondary_private_ip_addresses": addrs["v4"][1:],
            "ipv6_addresses": addrs.get("v6", []),
        }
        groups = _group_list(ch, plan.groups)
        if groups is not None:
            inst["security_group_ids"] = groups
        nics = []
        for j in range(ch.integer(1, 2) if ch.chance(30) else 0):
            nvsw = ch.pick(vswitches)
            naddrs = _addresses(ch, plan, nvsw, used)
            nic: dict[str, Any] = {
                "network_interface_id": f"eni-{k}-{j + 1}",
                "vswitch_id": nvsw["vswitch_id"],
                "primary_ip_address": naddrs["v4"][0],
                "secondary_private_ip_addresses": naddrs["v4"][1:],
                "ipv6_addresses": naddrs.get("v6", []),
            }
            ngroups = _group_list(ch, plan.groups)
            if ngroups is not None:
                nic["security_group_ids"] = ngroups
            nics.append(nic)
        if nics:
            inst["network_interfaces"] = nics
        instances.append(inst)

    for k in range(ch.integer(0, 2)):
        family = ch.pick([4, 6])
        entries = sorted({plan.cidrs(ch, family) for _ in range(ch.integer(1, 3))})
        plan.prefix_lists.append(
            {
                "prefix_list_id": f"pl-{k}",
                "address_family": f"IPv{family}",
                "max_entries": len(entries) + ch.integer(0, 2),
                "entries": entries,
            }
        )

    for group in plan.groups:
        rules: list[dict[str, Any]] = []
        seen: set[tuple[tuple[str, str], ...]] = set()
        for _ in range(ch.integer(0, 6)):
            batch = [_rule(ch, plan, group)]
            if ch.chance(25):
                # A twin with the other policy, at the same or another priority:
                # independent rules rarely overlap, and ties are what pooling is about.
                twin = {
                    **batch[0],
                    "policy": "drop" if batch[0]["policy"] == "accept" else "accept",
                }
                if ch.chance(50):
                    twin["priority"] = ch.pick(PRIORITIES)
                batch.append(twin)
            for rule in batch:
                if _identity(rule) not in seen:  # ECS refuses a permission given twice
                    seen.add(_identity(rule))
                    rules.append(rule)
        group["permissions"] = rules

    vpc: dict[str, Any] = {
        "vpc_id": VPC_ID,
        "cidr_block": VPC_V4,
        "ipv6_cidr_block": VPC_V6,
        "vswitches": vswitches,
    }
    return {
        "vpcs": [vpc],
        "prefix_lists": plan.prefix_lists,
        "security_groups": plan.groups,
        "instances": instances,
        "external_hosts": plan.externals,
    }


def network_of(model: dict[str, Any]) -> Network:
    """The checked network of a generated model (raises `EcsError` if the generator erred)."""
    return build_network(topology_from_data(model))


def random_model(seed: int) -> dict[str, Any]:
    """A valid random topology, the same for the same seed."""
    return build_model(SeededChooser(seed))


@st.composite
def models(draw: Callable[[st.SearchStrategy[Any]], Any]) -> dict[str, Any]:
    """Hypothesis strategy of valid random topologies."""
    return build_model(DrawChooser(draw))


# -- flows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """An address and the router-side port it lives behind."""

    address: IPAddress
    ifname: str
    owner: str  # ENI id or external host name


def endpoints(network: Network) -> list[Endpoint]:
    out = [
        Endpoint(a, eni.ifname, eni.eni_id) for eni in network.enis.values() for a in eni.addresses
    ]
    out += [Endpoint(a, x.ifname, x.name) for x in network.externals.values() for a in x.addresses]
    return out


def endpoint_of(network: Network, address: IPAddress) -> Endpoint:
    for ep in endpoints(network):
        if ep.address == address:
            return ep
    raise KeyError(f"no ENI or external host owns {address}")


def _port_edges(network: Network) -> list[int]:
    """Ports at and next to every port-range edge of the model, and a few common ones."""
    edges = set(PORT_EDGES)
    for group in network.groups.values():
        for rule in group.rules:
            for pr in (rule.ports, rule.source_ports):
                if pr is not None:
                    edges.update({pr.start - 1, pr.start, pr.end, pr.end + 1})
    return sorted(p for p in edges if 1 <= p <= 65535)


def _covers(network: Network, peer: Peer, address: IPAddress) -> bool:
    """Whether a rule's peer names `address` (only to steer flows; the evaluator judges)."""
    if isinstance(peer, CidrPeer):
        return address.version == peer.network.version and address in peer.network
    if isinstance(peer, GroupPeer):
        return address in network.member_addresses(peer.group_id)
    entries = network.prefix_lists[peer.prefix_list_id].entries
    return any(address.version == n.version and address in n for n in entries)


def _port_in(ch: Chooser, pr: PortRange | None, edges: list[int]) -> int:
    if pr is None:
        return ch.pick(edges)
    return ch.pick([pr.start, pr.end, ch.integer(pr.start, pr.end)])


def _rule_flow(ch: Chooser, network: Network, eps: list[Endpoint], edges: list[int]) -> Flow | None:
    """A flow that the local side of some rule would look at: the rule's ENI at one end, an
    endpoint its peer covers at the other, its protocol and ports. Random flows rarely hit
    two rules at once; these hit ties of priority and policy often."""
    eni = ch.pick(list(network.enis.values()))
    rules = [r for g in network.groups_of(eni.eni_id) for r in g.rules]
    if not rules:
        return None
    rule = ch.pick(rules)
    locals_ = [
        a
        for a in eni.addresses
        if rule.local is None or (a.version == rule.local.version and a in rule.local)
    ]
    if rule.protocol_family is not None:
        locals_ = [a for a in locals_ if a.version == (4 if rule.protocol_family == "ipv4" else 6)]
    if not locals_:
        return None
    local = ch.pick(locals_)
    peers = [
        e
        for e in eps
        if e.ifname != eni.ifname
        and e.address.version == local.version
        and _covers(network, rule.peer, e.address)
    ]
    if not peers:
        return None
    peer = ch.pick(peers).address
    proto = PROTOCOL_NUMBERS.get(rule.protocol) or ch.pick(FLOW_PROTOCOLS[local.version])
    sport = dport = 0
    if proto in PORTED:
        dport = _port_in(ch, rule.ports, edges)
        sport = _port_in(ch, rule.source_ports, edges)
    src, dst = (peer, local) if rule.direction == "ingress" else (local, peer)
    return Flow(src, dst, proto, dport=dport, sport=sport)


def _random_flow(ch: Chooser, eps: list[Endpoint], edges: list[int]) -> Flow | None:
    src = ch.pick(eps)
    peers = [e for e in eps if e.address.version == src.address.version and e.ifname != src.ifname]
    if not peers:
        return None
    dst = ch.pick(peers)
    version = src.address.version
    # Now and then the other family's ICMP: only ALL rules can match it.
    proto = ch.pick(FLOW_PROTOCOLS[version]) if ch.chance(95) else (58 if version == 4 else 1)
    sport = dport = 0
    if proto in PORTED:
        dport = ch.pick(edges) if ch.chance(85) else ch.integer(1, 65535)
        sport = ch.pick(edges) if ch.chance(50) else ch.integer(1024, 65535)
    return Flow(src.address, dst.address, proto, dport=dport, sport=sport)


def build_flows(ch: Chooser, network: Network, n: int) -> list[Flow]:
    """`n` flows between endpoints of the model (ENIs and external hosts), both families:
    half aimed at some rule, half at random."""
    eps = endpoints(network)
    edges = _port_edges(network)
    flows: list[Flow] = []
    while len(flows) < n:
        if ch.chance(50):
            flow = _rule_flow(ch, network, eps, edges)
        else:
            flow = _random_flow(ch, eps, edges)
        if flow is not None:
            flows.append(flow)
    return flows


def random_flows(network: Network, seed: int, n: int) -> list[Flow]:
    """`n` random flows of the model, the same for the same seed and network."""
    return build_flows(SeededChooser(seed), network, n)


def flows(network: Network, n: int = 20) -> st.SearchStrategy[list[Flow]]:
    """Hypothesis strategy of `n` flows of the model."""

    @st.composite
    def _flows(draw: Callable[[st.SearchStrategy[Any]], Any]) -> list[Flow]:
        return build_flows(DrawChooser(draw), network, n)

    return _flows()
