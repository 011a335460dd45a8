"""Topology -> checked `Network`, with ECS error codes (docs/semantics.md).

`build_network` either returns a complete, valid `Network` or raises one
`EcsError` (code, message, dotted field path). It never returns anything partial.

Decisions where ECS leaves room, written down once (all of them are listed in
docs/semantics.md §"Decisions where Alibaba's documents are silent or disagree"):
- Peer precedence is CIDR > group > prefix list, as ECS does: the losers are
  ignored and not validated either, so a CIDR rule that also names a group that
  does not exist is accepted (the group id is dropped).
- A peer field of the other side (``dest_group_id`` on an ingress rule...) has
  no meaning; it is rejected rather than silently ignored.
- A rule id given in the file is kept; otherwise the id is derived from the
  group and the rule's identity, so it is stable across loads and orders.
- The VPC default group (`naming.default_group_id`) is created on demand: when
  an ENI has no group, or a rule references it. A file may define it itself.
- Rules of a group are sorted canonically and an ENI's group list is sorted:
  neither order means anything in ECS (rules are pooled), so the same model in
  any order yields an equal `Network`.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from . import model as m
from . import naming
from .bindings import check_bindings
from .errors import EcsError
from .network import (
    PORTED_PROTOCOLS,
    CidrPeer,
    Direction,
    Eni,
    ExternalHost,
    Family,
    GroupPeer,
    GroupType,
    InnerPolicy,
    Instance,
    IPNetwork,
    Network,
    Peer,
    Policy,
    PortRange,
    PrefixList,
    PrefixListPeer,
    Protocol,
    Rule,
    SecurityGroup,
    Vpc,
    VSwitch,
)
from .quotas import DEFAULT_QUOTAS, Quotas

_PROTOCOLS: dict[str, Protocol] = {
    "tcp": "TCP",
    "udp": "UDP",
    "icmp": "ICMP",
    "icmpv6": "ICMPv6",
    "gre": "GRE",
    "all": "ALL",
}

# int() alone would also take "1_000" and " 22 ", which ECS does not.
_INTEGER = re.compile(r"^-?[0-9]+$")

DESCRIPTION_MAX = 512
PREFIX_LIST_MAX_ENTRIES = 200


def _check_id(value: str, path: str, code: str = "InvalidParameter") -> None:
    if not naming.ID_PATTERN.match(value):
        raise EcsError(
            code,
            f"{value!r} is not a valid id (letters, digits, '_', '.', '-'; at most 64)",
            path,
        )


def normalise_protocol(raw: str, path: str) -> Protocol:
    proto = _PROTOCOLS.get(raw.strip().lower())
    if proto is None:
        raise EcsError(
            "InvalidIpProtocol.Malformed",
            f"IpProtocol {raw!r} is not one of TCP, UDP, ICMP, ICMPv6, GRE, ALL",
            path,
        )
    return proto


def parse_port_range(
    raw: str | None, protocol: Protocol, path: str, *, code: str, required: bool
) -> PortRange | None:
    """ECS port range syntax ``start/end``. Returns None for ``-1/-1`` (every port)."""
    if raw is None or str(raw).strip() == "":
        if required:
            raise EcsError("MissingParameter.PortRange", "PortRange is required", path)
        return None
    text = str(raw).strip()
    parts = text.split("/")
    if len(parts) != 2:
        raise EcsError(code, f"port range {text!r} must be start/end (e.g. 22/22, or -1/-1)", path)
    if not all(_INTEGER.match(part) for part in parts):
        raise EcsError(code, f"port range {text!r} must be two integers", path)
    start, end = int(parts[0]), int(parts[1])
    if protocol in PORTED_PROTOCOLS:
        if not (1 <= start <= 65535 and 1 <= end <= 65535):
            raise EcsError(code, f"{protocol} port range {text!r} must be within 1..65535", path)
        if start > end:
            raise EcsError(code, f"port range {text!r}: start is greater than end", path)
        return PortRange(start, end)
    if (start, end) != (-1, -1):
        raise EcsError(code, f"{protocol} takes the port range -1/-1, not {text!r}", path)
    return None


def strict_address_text(raw: str) -> str:
    """The address text to parse: stripped, and without a zone id, which Python's
    ipaddress accepts ("2001:db8::10%dup") and would keep as part of the address,
    so that two spellings of one address would not compare equal."""
    text = raw.strip()
    if "%" in text:
        raise ValueError(f"{raw!r} carries a zone id")
    return text


@functools.lru_cache(maxsize=65536)
def _network_of(text: str) -> IPNetwork | None:
    # CIDRs repeat across rules and across every re-validation of a stored
    # model; ipaddress parsing is the costliest step of validating a rule.
    if "%" in text:  # a zone id ("fe80::1%eth0") names no network: refused everywhere
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def parse_network(raw: str, path: str, code: str) -> IPNetwork:
    net = _network_of(raw.strip())
    if net is None:
        raise EcsError(code, f"{raw!r} is not an IP address or CIDR block", path)
    return net


def parse_priority(raw: int | str | None, path: str) -> int:
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return 1
    text = str(raw).strip()
    if not _INTEGER.match(text) or not 1 <= int(text) <= 100:
        raise EcsError(
            "InvalidPriority.Malformed", f"priority is an integer 1..100, not {raw!r}", path
        )
    return int(text)


def parse_policy(raw: str | None, path: str) -> Policy:
    low = "accept" if raw is None or raw.strip() == "" else raw.strip().lower()
    if low == "accept":
        return "accept"
    if low == "drop":
        return "drop"
    raise EcsError("InvalidPolicy.Malformed", f"policy is accept or drop, not {raw!r}", path)


def _peer_text(peer: Peer) -> str:
    if isinstance(peer, CidrPeer):
        return f"cidr:{peer.network}"
    if isinstance(peer, GroupPeer):
        return f"group:{peer.group_id}"
    return f"prefix_list:{peer.prefix_list_id}"


def rule_identity_text(rule: Rule) -> str:
    """`Rule.identity()` as canonical text: the input of derived rule ids and of sorting.

    Spelled out field by field (not `repr`) so that ids never change with a
    dataclass's representation.
    """
    return "|".join(
        (
            rule.direction,
            rule.protocol,
            str(rule.ports) if rule.ports else "-1/-1",
            str(rule.source_ports) if rule.source_ports else "",
            _peer_text(rule.peer),
            str(rule.local) if rule.local else "",
            rule.policy,
            str(rule.priority),
        )
    )


def _rule_order(rule: Rule) -> tuple[str, int, bool, str]:
    return (rule.direction, rule.priority, rule.policy != "drop", rule_identity_text(rule))


def _families(
    protocol: Protocol, peer_family: Family | None, local: IPNetwork | None
) -> frozenset[Family]:
    """IP families a rule can match: its protocol, peer and local address must all exist there."""
    fams: set[Family] = {"ipv4", "ipv6"}
    if peer_family is not None:
        fams &= {peer_family}
    if local is not None:
        fams &= {"ipv4" if local.version == 4 else "ipv6"}
    if protocol == "ICMP":
        fams &= {"ipv4"}
    elif protocol == "ICMPv6":
        fams &= {"ipv6"}
    return frozenset(fams)


def rule_family_set(network: Network, rule: Rule) -> frozenset[Family]:
    """The IP families in which `rule` can match any packet (never empty for a valid rule).

    A CIDR or prefix-list peer, a local address, ICMP and ICMPv6 each bind a
    rule to one family; a group peer matches its members' addresses of both.
    """
    peer_family: Family | None = None
    if isinstance(rule.peer, CidrPeer):
        peer_family = "ipv4" if rule.peer.network.version == 4 else "ipv6"
    elif isinstance(rule.peer, PrefixListPeer):
        peer_family = network.prefix_lists[rule.peer.prefix_list_id].family
    return _families(rule.protocol, peer_family, rule.local)


@dataclass(frozen=True, slots=True)
class _Side:
    """Which permission fields are the peer and which the local address, per direction."""

    direction: Direction
    peer_label: str  # Source / Dest, as in ECS's codes
    v4: str
    v6: str
    group: str
    prefix_list: str
    local_v4: str
    local_v6: str
    foreign: tuple[str, str]  # the other side's group / prefix-list fields

    @property
    def peer_ip_code(self) -> str:
        return f"InvalidParam.{self.peer_label}Ip"

    @property
    def local_ip_code(self) -> str:
        return "InvalidParam.DestIp" if self.peer_label == "Source" else "InvalidParam.SourceIp"


_INGRESS = _Side(
    "ingress",
    "Source",
    "source_cidr_ip",
    "ipv6_source_cidr_ip",
    "source_group_id",
    "source_prefix_list_id",
    "dest_cidr_ip",
    "ipv6_dest_cidr_ip",
    ("dest_group_id", "dest_prefix_list_id"),
)
_EGRESS = _Side(
    "egress",
    "Dest",
    "dest_cidr_ip",
    "ipv6_dest_cidr_ip",
    "dest_group_id",
    "dest_prefix_list_id",
    "source_cidr_ip",
    "ipv6_source_cidr_ip",
    ("source_group_id", "source_prefix_list_id"),
)


def _field(p: m.Permission, name: str) -> str | None:
    value = getattr(p, name)
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    return str(value)


class _Builder:
    def __init__(self, topo: m.Topology, quotas: Quotas) -> None:
        self.topo = topo
        self.quotas = quotas
        self.vpcs: dict[str, Vpc] = {}
        self.vswitches: dict[str, VSwitch] = {}
        self.prefix_lists: dict[str, PrefixList] = {}
        self.raw_groups: dict[str, tuple[int, m.SecurityGroup]] = {}
        self.groups: dict[str, SecurityGroup] = {}
        self.enis: dict[str, Eni] = {}
        self.eni_paths: dict[str, str] = {}  # ENI id -> path of its security_group_ids
        self.instances: dict[str, Instance] = {}
        self.externals: dict[str, ExternalHost] = {}
        self.names: dict[str, str] = {}  # instance, ENI and external-host names -> path
        self.used_addresses: dict[tuple[str, str], str] = {}
        self.used_macs: dict[tuple[str, str], str] = {}
        self.rule_ids: dict[str, str] = {}  # rule id -> path of its permission
        # Default group id -> its VPC, for VPCs whose default group is needed.
        self.default_groups_needed: dict[str, str] = {}

    # -- VPCs, vSwitches, prefix lists ------------------------------------
    def build_vpcs(self) -> None:
        for i, vpc in enumerate(self.topo.vpcs):
            path = f"vpcs[{i}]"
            _check_id(vpc.vpc_id, f"{path}.vpc_id", "InvalidVpcId.Malformed")
            if vpc.vpc_id in self.vpcs:
                raise EcsError(
                    "InvalidVpcId.Duplicate", f"VPC {vpc.vpc_id} is defined twice", f"{path}.vpc_id"
                )
            cidr = parse_network(vpc.cidr_block, f"{path}.cidr_block", "InvalidCidrBlock.Malformed")
            if not isinstance(cidr, ipaddress.IPv4Network):
                raise EcsError(
                    "InvalidCidrBlock.Malformed", "cidr_block must be IPv4", f"{path}.cidr_block"
                )
            v6 = self._ipv6_block(vpc.ipv6_cidr_block, f"{path}.ipv6_cidr_block")
            switches: list[VSwitch] = []
            for j, vsw in enumerate(vpc.vswitches):
                switches.append(
                    self._vswitch_of(vpc.vpc_id, cidr, v6, vsw, f"{path}.vswitches[{j}]")
                )
            self.vpcs[vpc.vpc_id] = Vpc(
                vpc.vpc_id, cidr, v6, tuple(sorted(switches, key=lambda s: s.vswitch_id))
            )

    def _ipv6_block(self, raw: str | None, path: str) -> ipaddress.IPv6Network | None:
        if not raw:
            return None
        net = parse_network(raw, path, "InvalidIpv6CidrBlock.Malformed")
        if not isinstance(net, ipaddress.IPv6Network):
            raise EcsError("InvalidIpv6CidrBlock.Malformed", f"{raw!r} is not IPv6", path)
        return net

    def _vswitch_of(
        self,
        vpc_id: str,
        vpc_cidr: ipaddress.IPv4Network,
        vpc_v6: ipaddress.IPv6Network | None,
        vsw: m.VSwitch,
        path: str,
    ) -> VSwitch:
        _check_id(vsw.vswitch_id, f"{path}.vswitch_id", "InvalidVSwitchId.Malformed")
        if vsw.vswitch_id in self.vswitches:
            raise EcsError(
                "InvalidVSwitchId.Duplicate",
                f"vSwitch {vsw.vswitch_id} is defined twice",
                f"{path}.vswitch_id",
            )
        cidr = parse_network(vsw.cidr_block, f"{path}.cidr_block", "InvalidCidrBlock.Malformed")
        if not isinstance(cidr, ipaddress.IPv4Network) or not cidr.subnet_of(vpc_cidr):
            raise EcsError(
                "InvalidCidrBlock.Malformed",
                f"vSwitch CIDR {cidr} is not inside the VPC CIDR {vpc_cidr}",
                f"{path}.cidr_block",
            )
        for other in self.vswitches.values():
            if other.vpc_id == vpc_id and other.cidr.overlaps(cidr):
                raise EcsError(
                    "InvalidCidrBlock.Overlapped",
                    f"vSwitch CIDR {cidr} overlaps vSwitch {other.vswitch_id} ({other.cidr})",
                    f"{path}.cidr_block",
                )
        v6 = self._ipv6_block(vsw.ipv6_cidr_block, f"{path}.ipv6_cidr_block")
        if v6 is not None and (vpc_v6 is None or not v6.subnet_of(vpc_v6)):
            raise EcsError(
                "InvalidIpv6CidrBlock.Malformed",
                f"vSwitch IPv6 CIDR {v6} is not inside the VPC's IPv6 CIDR ({vpc_v6 or 'none'})",
                f"{path}.ipv6_cidr_block",
            )
        switch = VSwitch(vsw.vswitch_id, vpc_id, cidr, v6)
        self.vswitches[switch.vswitch_id] = switch
        return switch

    def build_prefix_lists(self) -> None:
        for i, pl in enumerate(self.topo.prefix_lists):
            path = f"prefix_lists[{i}]"
            _check_id(pl.prefix_list_id, f"{path}.prefix_list_id", "InvalidPrefixListId.Malformed")
            if pl.prefix_list_id in self.prefix_lists:
                raise EcsError(
                    "InvalidPrefixListId.Duplicate",
                    f"prefix list {pl.prefix_list_id} is defined twice",
                    f"{path}.prefix_list_id",
                )
            fam_raw = pl.address_family.strip().lower()
            if fam_raw not in ("ipv4", "ipv6"):
                raise EcsError(
                    "InvalidAddressFamily.Malformed",
                    "address_family is IPv4 or IPv6",
                    f"{path}.address_family",
                )
            family: Family = "ipv4" if fam_raw == "ipv4" else "ipv6"
            if not 1 <= pl.max_entries <= PREFIX_LIST_MAX_ENTRIES:
                raise EcsError(
                    "InvalidMaxEntries.Malformed",
                    f"max_entries is 1..{PREFIX_LIST_MAX_ENTRIES}",
                    f"{path}.max_entries",
                )
            if len(pl.entries) > pl.max_entries:
                raise EcsError(
                    "PrefixListEntriesLimitExceeded",
                    f"{len(pl.entries)} entries exceed max_entries {pl.max_entries}",
                    f"{path}.entries",
                )
            entries: list[IPNetwork] = []
            for j, raw in enumerate(pl.entries):
                net = parse_network(raw, f"{path}.entries[{j}]", "InvalidCidr.Malformed")
                if (net.version == 4) != (family == "ipv4"):
                    raise EcsError(
                        "InvalidCidr.AddressFamilyMismatch",
                        f"{net} is not an {pl.address_family} CIDR",
                        f"{path}.entries[{j}]",
                    )
                entries.append(net)
            unique = sorted(set(entries), key=lambda n: (int(n.network_address), n.prefixlen))
            self.prefix_lists[pl.prefix_list_id] = PrefixList(
                pl.prefix_list_id, family, pl.max_entries, tuple(unique), pl.prefix_list_name or ""
            )

    # -- groups and rules -------------------------------------------------
    def index_groups(self) -> None:
        for i, sg in enumerate(self.topo.security_groups):
            path = f"security_groups[{i}]"
            _check_id(
                sg.security_group_id,
                f"{path}.security_group_id",
                "InvalidSecurityGroupId.Malformed",
            )
            if sg.security_group_id in self.raw_groups:
                raise EcsError(
                    "InvalidSecurityGroupId.Duplicate",
                    f"security group {sg.security_group_id} is defined twice",
                    f"{path}.security_group_id",
                )
            if sg.vpc_id not in self.vpcs:
                raise EcsError(
                    "InvalidVpcId.NotFound", f"VPC {sg.vpc_id} does not exist", f"{path}.vpc_id"
                )
            self.raw_groups[sg.security_group_id] = (i, sg)

    def group_type(self, sg: m.SecurityGroup, path: str) -> GroupType:
        low = sg.security_group_type.strip().lower()
        if low == "normal":
            return "normal"
        if low == "enterprise":
            return "enterprise"
        raise EcsError(
            "InvalidSecurityGroupType.Malformed",
            f"security_group_type is normal (basic) or enterprise (advanced), "
            f"not {sg.security_group_type!r}",
            f"{path}.security_group_type",
        )

    def inner_policy(self, sg: m.SecurityGroup, gtype: GroupType, path: str) -> InnerPolicy:
        raw = sg.inner_access_policy
        low = "" if raw is None else raw.strip().lower()
        if low not in ("", "accept", "drop"):
            raise EcsError(
                "InvalidInnerAccessPolicy.Malformed",
                f"inner_access_policy is Accept or Drop, not {raw!r}",
                f"{path}.inner_access_policy",
            )
        if gtype == "enterprise":
            if low == "accept":
                raise EcsError(
                    "InvalidInnerAccessPolicy.NotSupported",
                    "an advanced (enterprise) group always isolates its members: its "
                    "inner_access_policy is Drop and cannot be Accept",
                    f"{path}.inner_access_policy",
                )
            return "Drop"
        return "Drop" if low == "drop" else "Accept"

    def build_groups(self) -> None:
        for gid, (i, sg) in self.raw_groups.items():
            path = f"security_groups[{i}]"
            gtype = self.group_type(sg, path)
            inner = self.inner_policy(sg, gtype, path)
            rules: list[Rule] = []
            seen: dict[tuple[object, ...], int] = {}
            ref_rules = 0
            weight = 0
            for j, perm in enumerate(sg.permissions):
                ppath = f"{path}.permissions[{j}]"
                rule = self.build_rule(gid, gtype, sg.vpc_id, perm, ppath)
                ident = rule.identity()
                if ident in seen:
                    raise EcsError(
                        "InvalidParam.DuplicatePermissions",
                        f"permissions[{j}] repeats permissions[{seen[ident]}] "
                        "(same direction, protocol, ports, peer, local address, policy, priority)",
                        ppath,
                    )
                seen[ident] = j
                if isinstance(rule.peer, GroupPeer):
                    ref_rules += 1
                    if ref_rules > self.quotas.group_reference_rules_per_group:
                        raise EcsError(
                            "AuthorizedGroupRule.LimitExceed",
                            f"group {gid} has more than "
                            f"{self.quotas.group_reference_rules_per_group} group-reference rules",
                            ppath,
                        )
                weight += self.rule_weight(rule)
                if weight > self.quotas.rules_per_group:
                    raise EcsError(
                        "AuthorizationLimitExceed",
                        f"group {gid} has more than {self.quotas.rules_per_group} rules "
                        "(a prefix list counts as its max_entries)",
                        ppath,
                    )
                rules.append(self.register_rule_id(rule, perm, ppath))
            self.groups[gid] = SecurityGroup(
                group_id=gid,
                vpc_id=sg.vpc_id,
                group_type=gtype,
                inner_access_policy=inner,
                rules=tuple(sorted(rules, key=_rule_order)),
                name=sg.security_group_name or "",
                description=sg.description or "",
                managed=sg.service_managed,
                tags=tuple(sorted(sg.tags.items())),
                is_vpc_default=naming.default_group_id(sg.vpc_id) == gid,
            )

    def register_rule_id(self, rule: Rule, perm: m.Permission, path: str) -> Rule:
        given = perm.security_group_rule_id
        if given is not None:
            _check_id(
                given, f"{path}.security_group_rule_id", "InvalidSecurityGroupRuleId.Malformed"
            )
        rid = given or naming.rule_id(rule.group_id, rule_identity_text(rule))
        if rid in self.rule_ids:
            raise EcsError(
                "InvalidParam.SecurityGroupRuleIdRepeated",
                f"rule id {rid} is already used at {self.rule_ids[rid]}",
                f"{path}.security_group_rule_id",
            )
        self.rule_ids[rid] = path
        return replace(rule, rule_id=rid)

    def rule_weight(self, rule: Rule) -> int:
        if isinstance(rule.peer, PrefixListPeer):
            return self.prefix_lists[rule.peer.prefix_list_id].max_entries
        return 1

    def build_rule(
        self, gid: str, gtype: GroupType, vpc_id: str, p: m.Permission, path: str
    ) -> Rule:
        """One permission -> a `Rule` without its id (`register_rule_id` assigns it)."""
        direction_raw = p.direction.strip().lower()
        if direction_raw not in ("ingress", "egress"):
            raise EcsError(
                "InvalidDirection.Malformed",
                f"direction is ingress or egress, not {p.direction!r}",
                f"{path}.direction",
            )
        side = _INGRESS if direction_raw == "ingress" else _EGRESS
        protocol = normalise_protocol(p.ip_protocol, f"{path}.ip_protocol")
        ports = parse_port_range(
            p.port_range,
            protocol,
            f"{path}.port_range",
            code="InvalidPortRange.Malformed",
            required=True,
        )
        source_ports = parse_port_range(
            p.source_port_range,
            protocol,
            f"{path}.source_port_range",
            code="InvalidSourcePortRange.Malformed",
            required=False,
        )
        policy = parse_policy(p.policy, f"{path}.policy")
        priority = parse_priority(p.priority, f"{path}.priority")
        if p.description is not None and len(p.description) > DESCRIPTION_MAX:
            raise EcsError(
                "InvalidDescription.Malformed",
                f"description is at most {DESCRIPTION_MAX} characters, not {len(p.description)}",
                f"{path}.description",
            )
        if p.nic_type is not None and p.nic_type.strip().lower() not in ("", "intranet"):
            raise EcsError(
                "InvalidNicType.ValueNotSupported",
                f"a VPC security group rule takes nic_type intranet, not {p.nic_type!r}",
                f"{path}.nic_type",
            )
        for name in side.foreign:
            if _field(p, name) is not None:
                raise EcsError(
                    "InvalidParameter",
                    f"{name} has no meaning in an {side.direction} rule "
                    f"(its peer is the {side.peer_label.lower()})",
                    f"{path}.{name}",
                )
        peer = self.build_peer(gid, gtype, vpc_id, p, side, path)
        local = self.build_local(p, side, path)
        self.check_families(protocol, peer, local, side, path)
        return Rule(
            rule_id="",
            group_id=gid,
            direction=side.direction,
            protocol=protocol,
            ports=ports,
            source_ports=source_ports,
            peer=peer,
            local=local,
            policy=policy,
            priority=priority,
            description=p.description or "",
        )

    def build_peer(
        self, gid: str, gtype: GroupType, vpc_id: str, p: m.Permission, side: _Side, path: str
    ) -> Peer:
        v4_raw, v6_raw = _field(p, side.v4), _field(p, side.v6)
        if v4_raw and v6_raw:
            raise EcsError(
                side.peer_ip_code,
                f"{side.v4} and {side.v6} cannot both be set in one rule",
                f"{path}.{side.v6}",
            )
        # CIDR > group > prefix list; whatever loses is ignored, as ECS does.
        if v4_raw or v6_raw:
            return CidrPeer(self.cidr(v4_raw, v6_raw, side.v4, side.v6, side.peer_ip_code, path))
        group_raw = _field(p, side.group)
        if group_raw:
            return self.group_peer(gid, gtype, vpc_id, group_raw, side, f"{path}.{side.group}")
        pl_raw = _field(p, side.prefix_list)
        if pl_raw:
            if pl_raw not in self.prefix_lists:
                raise EcsError(
                    "InvalidPrefixListId.NotFound",
                    f"prefix list {pl_raw} does not exist",
                    f"{path}.{side.prefix_list}",
                )
            return PrefixListPeer(pl_raw)
        raise EcsError(
            f"MissingParameter.{side.peer_label}",
            f"an {side.direction} rule needs a peer: {side.v4}, {side.v6}, "
            f"{side.group} or {side.prefix_list}",
            path,
        )

    def cidr(
        self, v4_raw: str | None, v6_raw: str | None, v4: str, v6: str, code: str, path: str
    ) -> IPNetwork:
        name = v4 if v4_raw else v6
        raw = v4_raw or v6_raw or ""
        net = parse_network(raw, f"{path}.{name}", code)
        if (net.version == 4) != bool(v4_raw):
            raise EcsError(
                code,
                f"{name} takes an IPv{4 if v4_raw else 6} CIDR, not {raw!r}",
                f"{path}.{name}",
            )
        return net

    def build_local(self, p: m.Permission, side: _Side, path: str) -> IPNetwork | None:
        lv4_raw, lv6_raw = _field(p, side.local_v4), _field(p, side.local_v6)
        if lv4_raw and lv6_raw:
            raise EcsError(
                side.local_ip_code,
                f"{side.local_v4} and {side.local_v6} cannot both be set in one rule",
                f"{path}.{side.local_v6}",
            )
        if not (lv4_raw or lv6_raw):
            return None
        return self.cidr(lv4_raw, lv6_raw, side.local_v4, side.local_v6, side.local_ip_code, path)

    def check_families(
        self, protocol: Protocol, peer: Peer, local: IPNetwork | None, side: _Side, path: str
    ) -> None:
        peer_family = self.peer_family(peer)
        if local is not None and peer_family is not None:
            if (local.version == 4) != (peer_family == "ipv4"):
                lname = side.local_v4 if local.version == 4 else side.local_v6
                raise EcsError(
                    side.local_ip_code,
                    f"the local address {local} and the peer are of different IP versions",
                    f"{path}.{lname}",
                )
        if _families(protocol, peer_family, local):
            return
        if protocol == "ICMP":
            raise EcsError(
                "InvalidParam.Ipv4ProtocolConflictWithIpv6Address",
                "ICMP is an IPv4 protocol and cannot be used with an IPv6 address (use ICMPv6)",
                f"{path}.ip_protocol",
            )
        raise EcsError(
            "InvalidParam.Ipv6ProtocolConflictWithIpv4Address",
            "ICMPv6 is an IPv6 protocol and cannot be used with an IPv4 address (use ICMP)",
            f"{path}.ip_protocol",
        )

    def peer_family(self, peer: Peer) -> Family | None:
        if isinstance(peer, CidrPeer):
            return "ipv4" if peer.network.version == 4 else "ipv6"
        if isinstance(peer, PrefixListPeer):
            return self.prefix_lists[peer.prefix_list_id].family
        return None

    def vpc_of_default_group(self, gid: str) -> str | None:
        """The VPC whose on-demand default group has this id, if any (and none is defined)."""
        if gid in self.raw_groups:
            return None
        for vpc_id in self.vpcs:
            if naming.default_group_id(vpc_id) == gid:
                return vpc_id
        return None

    def group_peer(
        self, gid: str, gtype: GroupType, vpc_id: str, ref: str, side: _Side, path: str
    ) -> GroupPeer:
        if gtype == "enterprise":
            raise EcsError(
                "InvalidGroupParameter.OperationDenied",
                "an advanced (enterprise) security group cannot hold group-reference rules",
                path,
            )
        if ref == gid:
            if side.direction == "ingress":
                # "Paramter" is ECS's own spelling of this code.
                raise EcsError("InvalidParamter.Conflict", "a group cannot reference itself", path)
            raise EcsError("InvalidSecurityGroup.IsSame", "a group cannot reference itself", path)
        default_vpc = self.vpc_of_default_group(ref)
        if default_vpc is not None:
            ref_vpc, ref_type = default_vpc, "normal"
        elif ref in self.raw_groups:
            ref_sg = self.raw_groups[ref][1]
            ref_vpc, ref_type = ref_sg.vpc_id, ref_sg.security_group_type.strip().lower()
        else:
            raise EcsError(
                "InvalidSecurityGroupId.NotFound", f"security group {ref} does not exist", path
            )
        if ref_type == "enterprise":
            raise EcsError(
                "InvalidGroupAuthParameter.OperationDenied",
                f"{ref} is an advanced (enterprise) group and cannot be referenced",
                path,
            )
        if ref_vpc != vpc_id:
            code = f"Invalid{side.peer_label}GroupId.Mismatch"
            raise EcsError(
                code, f"{ref} is in VPC {ref_vpc}, not in this group's VPC {vpc_id}", path
            )
        if default_vpc is not None:
            self.default_groups_needed[ref] = default_vpc
        return GroupPeer(ref)

    # -- instances, ENIs, external hosts ----------------------------------
    def _addresses(
        self,
        vsw: VSwitch,
        owner: str,
        v4s: Iterable[tuple[str, str]],
        v6s: Iterable[tuple[str, str]],
    ) -> tuple[tuple[ipaddress.IPv4Address, ...], tuple[ipaddress.IPv6Address, ...]]:
        """Check (address, field path) pairs against the vSwitch and every address in use."""
        out4: list[ipaddress.IPv4Address] = []
        out6: list[ipaddress.IPv6Address] = []
        for raw, path in v4s:
            try:
                a4 = ipaddress.IPv4Address(strict_address_text(raw))
            except ValueError:
                raise EcsError(
                    "InvalidPrivateIpAddress.Malformed", f"{raw!r} is not an IPv4 address", path
                ) from None
            if a4 not in vsw.cidr or a4 in (vsw.cidr.network_address, vsw.cidr.broadcast_address):
                raise EcsError(
                    "InvalidPrivateIpAddress.Mismatch",
                    f"{a4} is not a host address of vSwitch {vsw.vswitch_id} ({vsw.cidr})",
                    path,
                )
            self._claim(vsw.vpc_id, str(a4), owner, path)
            out4.append(a4)
        for raw, path in v6s:
            try:
                a6 = ipaddress.IPv6Address(strict_address_text(raw))
            except ValueError:
                raise EcsError(
                    "InvalidIpv6Address.Malformed", f"{raw!r} is not an IPv6 address", path
                ) from None
            if vsw.ipv6_cidr is None or a6 not in vsw.ipv6_cidr:
                raise EcsError(
                    "InvalidIpv6Address.Mismatch",
                    f"{a6} is not inside vSwitch {vsw.vswitch_id}'s IPv6 CIDR "
                    f"({vsw.ipv6_cidr or 'none'})",
                    path,
                )
            self._claim(vsw.vpc_id, str(a6), owner, path)
            out6.append(a6)
        return tuple(out4), tuple(out6)

    def _claim(self, vpc_id: str, address: str, owner: str, path: str) -> None:
        key = (vpc_id, address)
        if key in self.used_addresses:
            raise EcsError(
                "InvalidPrivateIpAddress.Duplicated",
                f"{address} is already used by {self.used_addresses[key]}",
                path,
            )
        self.used_addresses[key] = owner

    def _claim_name(self, name: str, path: str) -> None:
        # `nftsg lab exec NAME` resolves instances, ENIs and external hosts alike.
        if name in self.names:
            raise EcsError(
                "InvalidParameter",
                f"the name {name} is already used at {self.names[name]}; instance ids, "
                "ENI ids and external host names must all differ",
                path,
            )
        self.names[name] = path

    def _group_list(
        self, eni_id: str, vpc_id: str, ids: tuple[str, ...] | None, path: str
    ) -> tuple[str, ...]:
        if not ids:
            return (self._default_group_for(vpc_id, path),)
        if len(ids) > self.quotas.groups_per_eni:
            raise EcsError(
                "InstanceSecurityGroupLimitExceeded",
                f"{eni_id} is in {len(ids)} groups; the limit is {self.quotas.groups_per_eni}",
                path,
            )
        types: dict[str, str] = {}
        for k, gid in enumerate(ids):
            if gid in ids[:k]:
                raise EcsError(
                    "InvalidSecurityGroupId.Duplicate",
                    f"{eni_id} lists group {gid} twice",
                    f"{path}[{k}]",
                )
            default_vpc = self.vpc_of_default_group(gid)
            if default_vpc is not None:
                group_vpc, gtype = default_vpc, "normal"
            elif gid in self.raw_groups:
                group_vpc = self.raw_groups[gid][1].vpc_id
                gtype = self.groups[gid].group_type
            else:
                raise EcsError(
                    "InvalidSecurityGroupId.NotFound",
                    f"security group {gid} does not exist",
                    f"{path}[{k}]",
                )
            if group_vpc != vpc_id:
                raise EcsError(
                    "InvalidInstanceId.Mismatch",
                    f"{eni_id} is in VPC {vpc_id} but group {gid} is in {group_vpc}",
                    f"{path}[{k}]",
                )
            if default_vpc is not None:
                self.default_groups_needed[gid] = default_vpc
            types.setdefault(gtype, gid)
        if len(types) > 1:
            raise EcsError(
                "InvalidSecurityGroupType.Mixed",
                f"{eni_id} mixes basic (normal, e.g. {types['normal']}) and advanced "
                f"(enterprise, e.g. {types['enterprise']}) security groups; all groups of "
                "one network interface must be of the same type",
                path,
            )
        return tuple(sorted(ids))

    def _default_group_for(self, vpc_id: str, path: str) -> str:
        gid = naming.default_group_id(vpc_id)
        if gid in self.raw_groups:
            owner_vpc = self.raw_groups[gid][1].vpc_id
        else:
            owner_vpc = self.default_groups_needed.setdefault(gid, vpc_id)
        if owner_vpc != vpc_id:
            raise EcsError(
                "InvalidSecurityGroupId.Duplicate",
                f"the default group id {gid} of VPC {vpc_id} is taken by VPC {owner_vpc}; "
                "give this network interface a security group explicitly",
                path,
            )
        return gid

    def _mac(self, raw: str | None, ident: str, vpc_id: str, owner: str, path: str) -> str:
        if raw is None:
            mac = naming.derived_mac(ident)
        else:
            parts = raw.strip().lower().split(":")
            if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-f]{2}", x) for x in parts):
                raise EcsError("InvalidMacAddress.Malformed", f"{raw!r} is not a MAC address", path)
            if int(parts[0], 16) & 1:
                raise EcsError("InvalidMacAddress.Malformed", f"{raw!r} is a multicast MAC", path)
            mac = ":".join(parts)
        # The VPC router pins one neighbour entry per MAC: two ports cannot share one.
        key = (vpc_id, mac)
        if key in self.used_macs:
            raise EcsError(
                "InvalidMacAddress.Duplicated",
                f"MAC {mac} is already used by {self.used_macs[key]}",
                path,
            )
        self.used_macs[key] = owner
        return mac

    def _vswitch(self, vsw_id: str, path: str) -> VSwitch:
        vsw = self.vswitches.get(vsw_id)
        if vsw is None:
            raise EcsError("InvalidVSwitchId.NotFound", f"vSwitch {vsw_id} does not exist", path)
        return vsw

    def _eni(
        self,
        *,
        eni_id: str,
        instance_id: str,
        vsw: VSwitch,
        primary: bool,
        index: int,
        v4: list[tuple[str, str]],
        v6: list[tuple[str, str]],
        mac: str | None,
        group_ids: tuple[str, ...] | None,
        path: str,
    ) -> Eni:
        id_path = f"{path}.network_interface_id"
        _check_id(eni_id, id_path, "InvalidNetworkInterfaceId.Malformed")
        if eni_id in self.enis:
            raise EcsError(
                "InvalidNetworkInterfaceId.Duplicate", f"ENI {eni_id} is defined twice", id_path
            )
        self._claim_name(eni_id, id_path)
        a4, a6 = self._addresses(vsw, eni_id, v4, v6)
        groups_path = f"{path}.security_group_ids"
        groups = self._group_list(eni_id, vsw.vpc_id, group_ids, groups_path)
        eni = Eni(
            eni_id=eni_id,
            instance_id=instance_id,
            vpc_id=vsw.vpc_id,
            vswitch_id=vsw.vswitch_id,
            primary=primary,
            mac=self._mac(mac, eni_id, vsw.vpc_id, eni_id, f"{path}.mac_address"),
            ipv4=a4,
            ipv6=a6,
            group_ids=groups,
            ifname=naming.port_ifname("e", eni_id),
            peer_ifname=f"eth{index}",
            device_index=index,
        )
        self.enis[eni_id] = eni
        self.eni_paths[eni_id] = groups_path
        return eni

    def build_instances(self) -> None:
        for i, inst in enumerate(self.topo.instances):
            path = f"instances[{i}]"
            _check_id(inst.instance_id, f"{path}.instance_id", "InvalidInstanceId.Malformed")
            if inst.instance_id in self.instances:
                raise EcsError(
                    "InvalidInstanceId.Duplicate",
                    f"instance {inst.instance_id} is defined twice",
                    f"{path}.instance_id",
                )
            self._claim_name(inst.instance_id, f"{path}.instance_id")
            vsw = self._vswitch(inst.vswitch_id, f"{path}.vswitch_id")
            enis = [
                self._eni(
                    eni_id=inst.network_interface_id
                    or naming.default_primary_eni_id(inst.instance_id),
                    instance_id=inst.instance_id,
                    vsw=vsw,
                    primary=True,
                    index=0,
                    v4=_v4_fields(
                        inst.private_ip_address,
                        inst.secondary_private_ip_addresses,
                        path,
                        "private_ip_address",
                    ),
                    v6=_v6_fields(inst.ipv6_address, inst.ipv6_addresses, path),
                    mac=inst.mac_address,
                    group_ids=inst.security_group_ids,
                    path=path,
                )
            ]
            for j, nic in enumerate(inst.network_interfaces):
                npath = f"{path}.network_interfaces[{j}]"
                nvsw = self._vswitch(nic.vswitch_id or inst.vswitch_id, f"{npath}.vswitch_id")
                if nvsw.vpc_id != vsw.vpc_id:
                    raise EcsError(
                        "InvalidVSwitchId.Mismatch",
                        f"a secondary ENI must be in the instance's VPC {vsw.vpc_id}",
                        f"{npath}.vswitch_id",
                    )
                enis.append(
                    self._eni(
                        eni_id=nic.network_interface_id,
                        instance_id=inst.instance_id,
                        vsw=nvsw,
                        primary=False,
                        index=j + 1,
                        v4=_v4_fields(
                            nic.primary_ip_address,
                            nic.secondary_private_ip_addresses,
                            npath,
                            "primary_ip_address",
                        ),
                        v6=_v6_fields(nic.ipv6_address, nic.ipv6_addresses, npath),
                        mac=nic.mac_address,
                        group_ids=nic.security_group_ids,
                        path=npath,
                    )
                )
            self.instances[inst.instance_id] = Instance(
                inst.instance_id, vsw.vpc_id, tuple(e.eni_id for e in enis)
            )

    def build_externals(self) -> None:
        for i, ext in enumerate(self.topo.external_hosts):
            path = f"external_hosts[{i}]"
            _check_id(ext.name, f"{path}.name")
            self._claim_name(ext.name, f"{path}.name")
            if ext.vpc_id not in self.vpcs:
                raise EcsError(
                    "InvalidVpcId.NotFound", f"VPC {ext.vpc_id} does not exist", f"{path}.vpc_id"
                )
            if not ext.ip_address and not ext.ipv6_address:
                raise EcsError(
                    "MissingParameter", "an external host needs ip_address or ipv6_address", path
                )
            vpc = self.vpcs[ext.vpc_id]
            a4: tuple[ipaddress.IPv4Address, ...] = ()
            a6: tuple[ipaddress.IPv6Address, ...] = ()
            if ext.ip_address:
                address = self._external_address(ext.ip_address, 4, vpc, ext.name, path)
                assert isinstance(address, ipaddress.IPv4Address)
                a4 = (address,)
            if ext.ipv6_address:
                address = self._external_address(ext.ipv6_address, 6, vpc, ext.name, path)
                assert isinstance(address, ipaddress.IPv6Address)
                a6 = (address,)
            self.externals[ext.name] = ExternalHost(
                name=ext.name,
                vpc_id=ext.vpc_id,
                mac=self._mac(
                    ext.mac_address, "ext:" + ext.name, ext.vpc_id, ext.name, f"{path}.mac_address"
                ),
                ipv4=a4,
                ipv6=a6,
                ifname=naming.port_ifname("x", ext.name),
            )

    def _external_address(
        self, raw: str, version: int, vpc: Vpc, owner: str, host_path: str
    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        path = f"{host_path}.{'ip_address' if version == 4 else 'ipv6_address'}"
        try:
            address = ipaddress.ip_address(strict_address_text(raw))
        except ValueError:
            address = None
        if address is None or address.version != version:
            raise EcsError(
                "InvalidIpAddress.Malformed", f"{raw!r} is not an IPv{version} address", path
            )
        block = vpc.cidr if version == 4 else vpc.ipv6_cidr
        if block is not None and address in block:
            raise EcsError(
                "InvalidIpAddress.Malformed",
                f"external host address {address} is inside the VPC's CIDR {block}",
                path,
            )
        self._claim(vpc.vpc_id, str(address), owner, path)
        return address

    # -- defaults and cross-object limits -----------------------------------
    def add_default_groups(self) -> None:
        for gid, vpc_id in sorted(self.default_groups_needed.items()):
            if gid in self.groups:
                continue  # the file defines it itself
            rules = []
            for proto, ports in (
                ("TCP", PortRange(22, 22)),
                ("TCP", PortRange(3389, 3389)),
                ("ICMP", None),
            ):
                rule = Rule(
                    rule_id="",
                    group_id=gid,
                    direction="ingress",
                    protocol=proto,  # type: ignore[arg-type]
                    ports=ports,
                    source_ports=None,
                    peer=CidrPeer(ipaddress.IPv4Network("0.0.0.0/0")),
                    local=None,
                    policy="accept",
                    priority=100,
                    description="default security group rule",
                )
                rules.append(replace(rule, rule_id=naming.rule_id(gid, rule_identity_text(rule))))
            self.groups[gid] = SecurityGroup(
                group_id=gid,
                vpc_id=vpc_id,
                group_type="normal",
                inner_access_policy="Accept",
                rules=tuple(sorted(rules, key=_rule_order)),
                name="default",
                description="default security group of the VPC, created on demand",
                is_vpc_default=True,
            )

    def check_limits(self) -> None:
        addresses: dict[str, int] = {}
        members: dict[str, int] = {}
        for eni in self.enis.values():  # file order: the ENI that crosses a limit is named
            path = self.eni_paths[eni.eni_id]
            for gid in eni.group_ids:
                group = self.groups[gid]
                if group.is_basic:
                    addresses[gid] = addresses.get(gid, 0) + len(eni.addresses)
                    if addresses[gid] > self.quotas.private_addresses_per_basic_group:
                        raise EcsError(
                            "SecurityGroupInstanceLimitExceeded",
                            f"group {gid} would hold more than "
                            f"{self.quotas.private_addresses_per_basic_group} private addresses",
                            path,
                        )
                else:
                    members[gid] = members.get(gid, 0) + 1
                    if members[gid] > self.quotas.enis_per_advanced_group:
                        raise EcsError(
                            "SecurityGroupInstanceLimitExceeded",
                            f"advanced group {gid} would have more than "
                            f"{self.quotas.enis_per_advanced_group} ENIs",
                            path,
                        )
            total = sum(
                self.rule_weight(r) for gid in eni.group_ids for r in self.groups[gid].rules
            )
            if total > self.quotas.rules_per_eni:
                raise EcsError(
                    "AuthorizationLimitExceed",
                    f"{eni.eni_id} is subject to {total} rules across its groups "
                    f"(a prefix list counts as its max_entries); "
                    f"the limit is {self.quotas.rules_per_eni}",
                    path,
                )
        ifnames: dict[str, str] = {}
        for owner, ifname in [
            *((e.eni_id, e.ifname) for e in self.enis.values()),
            *((x.name, x.ifname) for x in self.externals.values()),
        ]:
            if ifname in ifnames:  # a 48-bit hash collision: never silently share a port
                raise EcsError(
                    "InvalidParameter",
                    f"{owner} and {ifnames[ifname]} map to one port name",
                    self.names[owner],
                )
            ifnames[ifname] = owner

    def build(self) -> Network:
        self.build_vpcs()
        self.build_prefix_lists()
        self.index_groups()
        self.build_groups()
        self.build_instances()
        self.build_externals()
        self.add_default_groups()
        self.check_limits()
        return Network(
            vpcs=dict(sorted(self.vpcs.items())),
            groups=dict(sorted(self.groups.items())),
            enis=dict(sorted(self.enis.items())),
            instances=dict(sorted(self.instances.items())),
            externals=dict(sorted(self.externals.items())),
            prefix_lists=dict(sorted(self.prefix_lists.items())),
            region_id=self.topo.region_id or "",
        )


def _v4_fields(
    primary: str, secondaries: tuple[str, ...], path: str, primary_name: str
) -> list[tuple[str, str]]:
    return [
        (primary, f"{path}.{primary_name}"),
        *((a, f"{path}.secondary_private_ip_addresses[{k}]") for k, a in enumerate(secondaries)),
    ]


def _v6_fields(one: str | None, many: tuple[str, ...], path: str) -> list[tuple[str, str]]:
    return [
        *([(one, f"{path}.ipv6_address")] if one else []),
        *((a, f"{path}.ipv6_addresses[{k}]") for k, a in enumerate(many)),
    ]


def build_network(topo: m.Topology, quotas: Quotas = DEFAULT_QUOTAS) -> Network:
    """Check the whole topology and return the normalised network, or raise `EcsError`."""
    network = _Builder(topo, quotas).build()
    if topo.bindings:
        check_bindings(topo, network)  # host mode; the agent reads them again
    return network


def load_network(text: str, quotas: Quotas = DEFAULT_QUOTAS, *, source: str = "") -> Network:
    """Parse topology text (YAML or JSON) and build the checked network."""
    return build_network(m.parse_topology_text(text, source=source or "<topology>"), quotas)


def rule_checker(
    network: Network, raw_groups: dict[str, tuple[int, m.SecurityGroup]], quotas: Quotas
) -> _Builder:
    """A builder primed with an already checked network, to check single rules.

    `actions.py` validates one permission against the existing VPCs, prefix
    lists and groups without re-validating the rest of the model.
    """
    builder = _Builder(m.Topology(), quotas)
    builder.vpcs = network.vpcs
    builder.prefix_lists = network.prefix_lists
    builder.raw_groups = raw_groups
    return builder


def rule_sort_key(rule: Rule) -> tuple[str, int, bool, str]:
    """The canonical order of a group's rules (as `build_network` sorts them)."""
    return _rule_order(rule)
