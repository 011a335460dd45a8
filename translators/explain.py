"""`nftsg explain`: one new flow, named the way an operator names things, and its verdict.

Pure: resolves endpoint names against a `Network`, builds the `Flow`, asks the
reference evaluator and renders its `Decision` as a JSON-able dict. The
command line only reads the file and prints.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

from .errors import EcsError
from .evaluator import PORTED_PROTOCOL_NUMBERS, Decision, Flow, SideDecision, evaluate
from .network import (
    PROTOCOL_NUMBERS,
    CidrPeer,
    Eni,
    ExternalHost,
    Family,
    GroupPeer,
    IPAddress,
    Network,
    PrefixListPeer,
    Rule,
)

# "ALL" as a flow's protocol means "a protocol that no TCP/UDP/ICMP/ICMPv6/GRE
# rule names", so that only ALL rules can match it. 255 is IANA-reserved and
# never names a real protocol.
ALL_PROTOCOL_NUMBER = 255

_PROTOCOL_BY_NAME: dict[str, int] = {
    **{name.lower(): number for name, number in PROTOCOL_NUMBERS.items()},
    "all": ALL_PROTOCOL_NUMBER,
}
_NAME_BY_NUMBER: dict[int, str] = {number: name for name, number in PROTOCOL_NUMBERS.items()}

EndpointKind = Literal["instance", "eni", "external", "address"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What SRC or DST named, and the address chosen for it."""

    query: str
    kind: EndpointKind
    name: str | None  # instance id, ENI id or external host name; None for an IP literal
    address: IPAddress
    vpc_id: str | None  # None for an IP literal: the evaluator finds its owner


def parse_protocol(text: str) -> int:
    """TCP, UDP, ICMP, ICMPv6, GRE, ALL (any case) or an IP protocol number 0..255."""
    raw = text.strip()
    if raw.isdigit():
        number = int(raw)
        if number <= 255:
            return number
    elif raw.lower() in _PROTOCOL_BY_NAME:
        return _PROTOCOL_BY_NAME[raw.lower()]
    raise EcsError(
        "InvalidIpProtocol.Malformed",
        f"protocol {text!r} is not TCP, UDP, ICMP, ICMPv6, GRE, ALL or a number 0..255",
        "protocol",
    )


def protocol_name(number: int) -> str:
    if number == ALL_PROTOCOL_NUMBER:
        return "ALL"
    return _NAME_BY_NUMBER.get(number, str(number))


def _ip_literal(text: str) -> IPAddress | None:
    if "%" in text:  # no zone ids: an address with one is not an address of the model
        return None
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _family_of(address: IPAddress) -> Family:
    return "ipv4" if address.version == 4 else "ipv6"


def choose_family(src: str, dst: str, family: str | None) -> Family:
    """The requested family, else the one of an IP literal, else IPv4; conflicts are errors."""
    wanted: Family | None = None
    if family is not None:
        low = family.strip().lower()
        if low not in ("ipv4", "ipv6"):
            raise EcsError("InvalidParameter", f"family {family!r} is not ipv4 or ipv6", "family")
        wanted = "ipv4" if low == "ipv4" else "ipv6"
    for side, text in (("from", src), ("to", dst)):
        literal = _ip_literal(text)
        if literal is None:
            continue
        literal_family = _family_of(literal)
        if wanted is not None and literal_family != wanted:
            raise EcsError(
                "InvalidParameter",
                f"{literal} is an {literal_family} address but the flow is {wanted}: "
                "IPv4 and IPv6 never mix",
                side,
            )
        wanted = literal_family
    return wanted or "ipv4"


def resolve_endpoint(network: Network, text: str, family: Family, side: str) -> Endpoint:
    """An IP literal, instance id (its primary ENI), ENI id or external host name."""
    literal = _ip_literal(text)
    if literal is not None:
        return Endpoint(text, "address", None, literal, None)
    name = text.strip()
    kind: EndpointKind
    owner: Eni | ExternalHost
    if name in network.instances:
        kind = "instance"
        owner = network.enis[network.instances[name].eni_ids[0]]
    elif name in network.enis:
        kind = "eni"
        owner = network.enis[name]
    elif name in network.externals:
        kind = "external"
        owner = network.externals[name]
    else:
        raise EcsError(
            "InvalidInstanceId.NotFound",
            f"{name!r} is not an IP address, instance id, ENI id or external host name",
            side,
        )
    addresses: tuple[IPAddress, ...] = owner.ipv4 if family == "ipv4" else owner.ipv6
    if not addresses:
        raise EcsError("InvalidParameter", f"{kind} {name} has no {family} address", side)
    return Endpoint(text, kind, name, addresses[0], owner.vpc_id)


def _check_port(value: int | None, what: str) -> int:
    if value is None:
        return 0
    if not 1 <= value <= 65535:
        raise EcsError(f"InvalidParameter.{what}", f"{what} {value} is not 1..65535", what.lower())
    return value


def build_flow(
    network: Network,
    src: str,
    dst: str,
    protocol: str,
    port: int | None = None,
    source_port: int | None = None,
    family: str | None = None,
) -> tuple[Flow, Endpoint, Endpoint]:
    """Resolve the names and build the flow `explain` evaluates."""
    number = parse_protocol(protocol)
    fam = choose_family(src, dst, family)
    if number == PROTOCOL_NUMBERS["ICMP"] and fam == "ipv6":
        raise EcsError(
            "InvalidParam.Ipv4ProtocolConflictWithIpv6Address",
            "ICMP is an IPv4 protocol; for IPv6 use ICMPv6",
            "protocol",
        )
    if number == PROTOCOL_NUMBERS["ICMPv6"] and fam == "ipv4":
        raise EcsError(
            "InvalidParam.Ipv6ProtocolConflictWithIpv4Address",
            "ICMPv6 is an IPv6 protocol; for IPv4 use ICMP",
            "protocol",
        )
    if number in PORTED_PROTOCOL_NUMBERS:
        if port is None:
            raise EcsError(
                "MissingParameter.Port", f"{protocol_name(number)} needs a destination port", "port"
            )
    elif port is not None or source_port is not None:
        raise EcsError(
            "InvalidParameter.Port",
            f"ports apply to TCP and UDP only, not to {protocol_name(number)}",
            "port" if port is not None else "source_port",
        )
    dport = _check_port(port, "Port")
    sport = _check_port(source_port, "SourcePort")
    src_end = resolve_endpoint(network, src, fam, "from")
    dst_end = resolve_endpoint(network, dst, fam, "to")
    flow = Flow(src_end.address, dst_end.address, number, dport, sport)
    return flow, src_end, dst_end


# -- rendering ----------------------------------------------------------------


def rule_to_dict(rule: Rule) -> dict[str, Any]:
    peer = rule.peer
    if isinstance(peer, CidrPeer):
        peer_kind, peer_value = peer.kind, str(peer.network)
    elif isinstance(peer, GroupPeer):
        peer_kind, peer_value = "group", peer.group_id
    elif isinstance(peer, PrefixListPeer):
        peer_kind, peer_value = "prefix_list", peer.prefix_list_id
    else:  # pragma: no cover - the Peer union is closed
        raise TypeError(f"unknown peer type {type(peer).__name__}")
    return {
        "rule_id": rule.rule_id,
        "group_id": rule.group_id,
        "direction": rule.direction,
        "policy": rule.policy,
        "priority": rule.priority,
        "ip_protocol": rule.protocol,
        "port_range": str(rule.ports) if rule.ports else "-1/-1",
        "source_port_range": str(rule.source_ports) if rule.source_ports else None,
        "peer_kind": peer_kind,
        "peer": peer_value,
        "local": str(rule.local) if rule.local else None,
        "description": rule.description,
    }


def _default_of(side: SideDecision) -> str:
    if side.direction == "ingress" or side.group_type == "enterprise":
        return "drop"
    return "accept"


def side_to_dict(network: Network, side: SideDecision | None) -> dict[str, Any] | None:
    if side is None:
        return None
    return {
        "eni": side.eni_id,
        "direction": side.direction,
        "verdict": side.verdict,
        "by": side.by,
        "rule": rule_to_dict(side.rule) if side.rule else None,
        "default": _default_of(side),
        "group_type": side.group_type,
        "groups": list(network.enis[side.eni_id].group_ids),
    }


def _endpoint_dict(
    network: Network, end: Endpoint, eni_id: str | None, external: str | None
) -> dict[str, Any]:
    instance = network.enis[eni_id].instance_id if eni_id else None
    return {
        "query": end.query,
        "kind": end.kind,
        "address": str(end.address),
        "instance": instance,
        "eni": eni_id,
        "external": external,
        "vpc_id": (
            network.enis[eni_id].vpc_id
            if eni_id
            else network.externals[external].vpc_id
            if external
            else None
        ),
    }


def _label(eni_id: str | None, external: str | None, address: IPAddress) -> str:
    return eni_id or external or str(address)


def _side_summary(side: SideDecision) -> str:
    if side.rule is None:
        return f"{side.direction} of {side.eni_id}: no rule matches, default {side.verdict}"
    rule = side.rule
    return (
        f"{side.direction} of {side.eni_id}: {side.verdict} by {rule.rule_id} of {rule.group_id} "
        f"(priority {rule.priority}, {rule.policy})"
    )


def summarise(decision: Decision, flow: Flow) -> str:
    src = _label(decision.src_eni, decision.src_external, flow.src_ip)
    dst = _label(decision.dst_eni, decision.dst_external, flow.dst_ip)
    head = f"{decision.verdict}: {src} -> {dst} {protocol_name(flow.protocol)}"
    if flow.protocol in PORTED_PROTOCOL_NUMBERS:
        head += f"/{flow.dport}"
    if decision.reason == "intra-group":
        return (
            f"{head}: both are in {decision.shortcut_group}, whose inner_access_policy "
            "is Accept (intra-group access beats custom rules)"
        )
    if decision.reason == "no-route":
        return f"{head}: the endpoints are in different VPCs, which are not connected"
    if decision.reason == "no-eni":
        return f"{head}: neither endpoint is an ENI, so no security group applies"
    sides = [_side_summary(s) for s in (decision.egress, decision.ingress) if s is not None]
    return f"{head}: " + "; ".join(sides)


def _owned_in(network: Network, address: IPAddress, vpc_id: str) -> bool:
    return any(address in e.addresses for e in network.enis_in_vpc(vpc_id)) or any(
        address in x.addresses for x in network.externals_in_vpc(vpc_id)
    )


def _owned_anywhere(network: Network, address: IPAddress) -> bool:
    return any(_owned_in(network, address, vpc_id) for vpc_id in network.vpcs)


def _pinned_vpc(network: Network, src: Endpoint, dst: Endpoint) -> str | None:
    """The VPC a named endpoint lives in, when that is where the flow happens.

    It matters only when address plans of VPCs overlap: an instance named on
    one side says which owner of the other side's address is meant. A literal
    owned only in another VPC keeps the flow cross-VPC (no route).
    """
    named = {end.vpc_id for end in (src, dst) if end.vpc_id is not None}
    if len(named) != 1:
        return None
    vpc_id = named.pop()
    for end in (src, dst):
        if (
            end.vpc_id is None
            and _owned_anywhere(network, end.address)
            and not _owned_in(network, end.address, vpc_id)
        ):
            return None
    return vpc_id


def explain(
    network: Network,
    src: str,
    dst: str,
    protocol: str,
    port: int | None = None,
    source_port: int | None = None,
    family: str | None = None,
) -> dict[str, Any]:
    """The verdict of the reference evaluator for one new flow, as a JSON-able dict."""
    flow, src_end, dst_end = build_flow(network, src, dst, protocol, port, source_port, family)
    decision = evaluate(network, flow, vpc_id=_pinned_vpc(network, src_end, dst_end))
    return {
        "verdict": decision.verdict,
        "reason": decision.reason,
        "summary": summarise(decision, flow),
        "flow": {
            "family": _family_of(flow.src_ip),
            "src_ip": str(flow.src_ip),
            "dst_ip": str(flow.dst_ip),
            "protocol": protocol_name(flow.protocol),
            "protocol_number": flow.protocol,
            "port": flow.dport,
            "source_port": flow.sport,
        },
        "from": _endpoint_dict(network, src_end, decision.src_eni, decision.src_external),
        "to": _endpoint_dict(network, dst_end, decision.dst_eni, decision.dst_external),
        "shortcut_group": decision.shortcut_group,
        "egress": side_to_dict(network, decision.egress),
        "ingress": side_to_dict(network, decision.ingress),
    }
