"""The reference evaluator: the decision procedure of docs/semantics.md, executable.

This module is the oracle of every other test (the nft compiler's packet
tracer, the real-namespace traffic tests), so it is written from docs/semantics.md
alone and shares no code with the compiler. It favours being obviously right
over being fast: every rule of every group is looked at for every flow.

A flow is identified by its addresses: the sender is whatever owns `src_ip`
(an ENI or an external host), the receiver whatever owns `dst_ip`. An address
nobody owns is an outside address; no group governs it, so that side is not
evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import EcsError
from .network import (
    PROTOCOL_NUMBERS,
    CidrPeer,
    Direction,
    Eni,
    ExternalHost,
    GroupPeer,
    GroupType,
    IPAddress,
    Network,
    Policy,
    PrefixListPeer,
    Rule,
    SecurityGroup,
)

Reason = Literal["intra-group", "rules", "no-eni", "no-route"]

PROTO_TCP = 6
PROTO_UDP = 17
PORTED_PROTOCOL_NUMBERS = frozenset({PROTO_TCP, PROTO_UDP})


@dataclass(frozen=True, slots=True)
class Flow:
    """The first packet of a new flow, as the VPC router sees it.

    `protocol` is the IP protocol number; `dport`/`sport` are 0 for protocols
    without ports. Only TCP and UDP rules look at ports.
    """

    src_ip: IPAddress
    dst_ip: IPAddress
    protocol: int
    dport: int = 0
    sport: int = 0

    def __post_init__(self) -> None:
        if self.src_ip.version != self.dst_ip.version:
            raise EcsError(
                "InvalidParameter",
                f"a flow cannot go from {self.src_ip} to {self.dst_ip}: IPv4 and IPv6 never mix",
            )
        if not 0 <= self.protocol <= 255:
            raise EcsError("InvalidParameter", f"IP protocol {self.protocol} is not 0..255")
        for name, port in (("dport", self.dport), ("sport", self.sport)):
            if not 0 <= port <= 65535:
                raise EcsError("InvalidParameter", f"{name} {port} is not 0..65535")

    @property
    def version(self) -> int:
        return self.src_ip.version


@dataclass(frozen=True, slots=True)
class SideDecision:
    """One ENI's verdict for one direction of the flow (its egress or its ingress)."""

    eni_id: str
    direction: Direction
    verdict: Policy
    by: Literal["rule", "default"]
    rule: Rule | None  # the deciding rule when `by == "rule"`
    group_type: GroupType


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict for a new flow and why.

    reason: ``intra-group`` (the shortcut of a shared basic Accept group,
    `shortcut_group`), ``rules`` (the sender's egress and the receiver's
    ingress were evaluated: `egress`/`ingress`, None for a side that is not an
    ENI), ``no-eni`` (neither endpoint is an ENI: no group governs the flow,
    nothing to enforce, so it is accepted), ``no-route`` (the endpoints are in
    different VPCs, which are not connected).
    """

    verdict: Policy
    reason: Reason
    src_eni: str | None
    dst_eni: str | None
    src_external: str | None
    dst_external: str | None
    shortcut_group: str | None
    egress: SideDecision | None
    ingress: SideDecision | None


# -- matching -------------------------------------------------------------


def _protocol_matches(rule: Rule, flow: Flow) -> bool:
    if rule.protocol == "ALL":
        return True  # the peer and local checks keep it to the rule's families
    if rule.protocol == "ICMP":
        return flow.version == 4 and flow.protocol == PROTOCOL_NUMBERS["ICMP"]
    if rule.protocol == "ICMPv6":
        return flow.version == 6 and flow.protocol == PROTOCOL_NUMBERS["ICMPv6"]
    return flow.protocol == PROTOCOL_NUMBERS[rule.protocol]


def _ports_match(rule: Rule, flow: Flow) -> bool:
    # `ports`/`source_ports` are None for "every port" (and for protocols without ports).
    if rule.ports is not None and not rule.ports.contains(flow.dport):
        return False
    return rule.source_ports is None or rule.source_ports.contains(flow.sport)


def _peer_matches(network: Network, rule: Rule, peer_ip: IPAddress) -> bool:
    peer = rule.peer
    if isinstance(peer, CidrPeer):
        return peer.network.version == peer_ip.version and peer_ip in peer.network
    if isinstance(peer, GroupPeer):
        # Live membership: whoever is a member right now, no rule edit needed.
        return network.is_member_address(peer.group_id, peer_ip)
    if isinstance(peer, PrefixListPeer):
        entries = network.prefix_lists[peer.prefix_list_id].entries
        return any(net.version == peer_ip.version and peer_ip in net for net in entries)
    raise TypeError(f"unknown peer type {type(peer).__name__}")  # pragma: no cover


def rule_matches(network: Network, rule: Rule, flow: Flow) -> bool:
    """Does `rule`, on the side of the rule's direction, match the flow?

    Ingress rules look at the sender (`src_ip`) as the peer and the receiver
    (`dst_ip`) as the local address; egress rules the other way round. The
    ENI whose side is evaluated owns the local end of the flow, so only the
    rule's optional local CIDR is checked.
    """
    if rule.direction == "ingress":
        peer_ip, local_ip = flow.src_ip, flow.dst_ip
    else:
        peer_ip, local_ip = flow.dst_ip, flow.src_ip
    if not _protocol_matches(rule, flow) or not _ports_match(rule, flow):
        return False
    if rule.local is not None and (
        rule.local.version != local_ip.version or local_ip not in rule.local
    ):
        return False
    return _peer_matches(network, rule, peer_ip)


# -- one side -------------------------------------------------------------


def _default_verdict(group_type: GroupType, direction: Direction) -> Policy:
    if direction == "ingress":
        return "drop"
    return "accept" if group_type == "normal" else "drop"


def _group_type(groups: tuple[SecurityGroup, ...]) -> GroupType:
    # Validation guarantees that all groups of one ENI share one type.
    return groups[0].group_type if groups else "normal"


def evaluate_side(network: Network, eni: Eni, direction: Direction, flow: Flow) -> SideDecision:
    """The verdict of `eni`'s pooled rules of one direction for the flow.

    All rules of that direction from all of the ENI's groups form one pool;
    among the matching ones the smallest priority number wins and a drop at
    that priority beats any accept; no match means the default.
    """
    groups = network.groups_of(eni.eni_id)
    group_type = _group_type(groups)
    matching = [
        rule
        for group in groups
        for rule in group.rules
        if rule.direction == direction and rule_matches(network, rule, flow)
    ]
    if not matching:
        return SideDecision(
            eni_id=eni.eni_id,
            direction=direction,
            verdict=_default_verdict(group_type, direction),
            by="default",
            rule=None,
            group_type=group_type,
        )
    best = min(rule.priority for rule in matching)
    at_best = [rule for rule in matching if rule.priority == best]
    drops = [rule for rule in at_best if rule.policy == "drop"]
    verdict: Policy = "drop" if drops else "accept"
    deciding = min(drops or at_best, key=lambda rule: (rule.group_id, rule.rule_id))
    return SideDecision(
        eni_id=eni.eni_id,
        direction=direction,
        verdict=verdict,
        by="rule",
        rule=deciding,
        group_type=group_type,
    )


# -- the whole flow -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Owner:
    vpc_id: str
    eni: Eni | None
    external: ExternalHost | None


def _owners(network: Network, address: IPAddress) -> dict[str, _Owner]:
    """Who owns the address, per VPC (addresses are unique within a VPC only)."""
    owners: dict[str, _Owner] = {}
    for owner in network.owners_of(address):
        if isinstance(owner, Eni):
            owners[owner.vpc_id] = _Owner(owner.vpc_id, owner, None)
        else:
            owners[owner.vpc_id] = _Owner(owner.vpc_id, None, owner)
    return owners


def _shared_accept_group(network: Network, a: Eni, b: Eni) -> str | None:
    """The first (by id) basic group with inner policy Accept that both ENIs are in."""
    shared = sorted(set(a.group_ids) & set(b.group_ids))
    for group_id in shared:
        group = network.groups[group_id]
        if group.is_basic and group.inner_access_policy == "Accept":
            return group_id
    return None


def _decision(
    verdict: Policy,
    reason: Reason,
    src: _Owner | None,
    dst: _Owner | None,
    *,
    shortcut_group: str | None = None,
    egress: SideDecision | None = None,
    ingress: SideDecision | None = None,
) -> Decision:
    return Decision(
        verdict=verdict,
        reason=reason,
        src_eni=src.eni.eni_id if src and src.eni else None,
        dst_eni=dst.eni.eni_id if dst and dst.eni else None,
        src_external=src.external.name if src and src.external else None,
        dst_external=dst.external.name if dst and dst.external else None,
        shortcut_group=shortcut_group,
        egress=egress,
        ingress=ingress,
    )


def _first(owners: dict[str, _Owner]) -> _Owner | None:
    return owners[min(owners)] if owners else None


def evaluate(network: Network, flow: Flow, *, vpc_id: str | None = None) -> Decision:
    """The verdict for a new flow (docs/semantics.md §"Evaluation of a new flow").

    `vpc_id` names the VPC router the packet is in; it is needed only when the
    flow's addresses are owned in more than one VPC (overlapping address plans).
    Without it the endpoints are looked for in every VPC, smallest id first.
    """
    src_owners = _owners(network, flow.src_ip)
    dst_owners = _owners(network, flow.dst_ip)
    if vpc_id is not None:
        src_owners = {k: v for k, v in src_owners.items() if k == vpc_id}
        dst_owners = {k: v for k, v in dst_owners.items() if k == vpc_id}
    common = sorted(set(src_owners) & set(dst_owners))
    if common:
        src: _Owner | None = src_owners[common[0]]
        dst: _Owner | None = dst_owners[common[0]]
    elif src_owners and dst_owners:
        # Each end lives in a different VPC; VPCs are not connected to each other.
        return _decision("drop", "no-route", _first(src_owners), _first(dst_owners))
    else:
        src, dst = _first(src_owners), _first(dst_owners)

    src_eni = src.eni if src else None
    dst_eni = dst.eni if dst else None
    if src_eni is None and dst_eni is None:
        return _decision("accept", "no-eni", src, dst)

    if src_eni is not None and dst_eni is not None:
        shortcut = _shared_accept_group(network, src_eni, dst_eni)
        if shortcut is not None:
            return _decision("accept", "intra-group", src, dst, shortcut_group=shortcut)

    egress = evaluate_side(network, src_eni, "egress", flow) if src_eni else None
    ingress = evaluate_side(network, dst_eni, "ingress", flow) if dst_eni else None
    sides = [side for side in (egress, ingress) if side is not None]
    verdict: Policy = "accept" if all(side.verdict == "accept" for side in sides) else "drop"
    return _decision(verdict, "rules", src, dst, egress=egress, ingress=ingress)
