"""The checked, normalised network: what `validate.build_network` returns.

Everything here is already valid: protocols are normalised (``TCP``,
``ICMPv6``...), port ranges parsed, the winning peer chosen, default groups
created, rule ids assigned. The evaluator and the nft compiler read only these
types, never the raw topology. Plain frozen dataclasses: the compiler walks
tens of thousands of rules and pydantic's per-object cost would show.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

Direction = Literal["ingress", "egress"]
Protocol = Literal["TCP", "UDP", "ICMP", "ICMPv6", "GRE", "ALL"]
Policy = Literal["accept", "drop"]
GroupType = Literal["normal", "enterprise"]
InnerPolicy = Literal["Accept", "Drop"]
Family = Literal["ipv4", "ipv6"]

# IANA protocol numbers of the protocols a rule can name (ALL has none).
PROTOCOL_NUMBERS: dict[str, int] = {"TCP": 6, "UDP": 17, "ICMP": 1, "ICMPv6": 58, "GRE": 47}
PORTED_PROTOCOLS = frozenset({"TCP", "UDP"})


@dataclass(frozen=True, slots=True)
class PortRange:
    """Inclusive port range; 1..65535 for TCP/UDP."""

    start: int
    end: int

    def contains(self, port: int) -> bool:
        return self.start <= port <= self.end

    def __str__(self) -> str:
        return f"{self.start}/{self.end}"


@dataclass(frozen=True, slots=True)
class CidrPeer:
    network: IPNetwork

    @property
    def kind(self) -> str:
        return "ipv4" if self.network.version == 4 else "ipv6"


@dataclass(frozen=True, slots=True)
class GroupPeer:
    group_id: str

    @property
    def kind(self) -> str:
        return "group"


@dataclass(frozen=True, slots=True)
class PrefixListPeer:
    prefix_list_id: str

    @property
    def kind(self) -> str:
        return "prefix_list"


Peer: TypeAlias = CidrPeer | GroupPeer | PrefixListPeer


@dataclass(frozen=True, slots=True)
class Rule:
    """One normalised permission of a group.

    `ports` is None for protocols whose ECS port range is ``-1/-1`` (ICMP,
    ICMPv6, GRE, ALL): they match every port. `source_ports` is None when no
    source port range was given. `local` is the optional local-address match
    (dest_cidr_ip on ingress, source_cidr_ip on egress).
    """

    rule_id: str
    group_id: str
    direction: Direction
    protocol: Protocol
    ports: PortRange | None
    source_ports: PortRange | None
    peer: Peer
    local: IPNetwork | None
    policy: Policy
    priority: int
    description: str = ""

    def identity(self) -> tuple[object, ...]:
        """ECS's notion of "the same permission" (ids and descriptions aside)."""
        return (
            self.direction,
            self.protocol,
            self.ports,
            self.source_ports,
            self.peer,
            self.local,
            self.policy,
            self.priority,
        )

    @property
    def protocol_family(self) -> Family | None:
        """The only family this rule's protocol exists in, if it is family-bound."""
        if self.protocol == "ICMP":
            return "ipv4"
        if self.protocol == "ICMPv6":
            return "ipv6"
        return None


@dataclass(frozen=True, slots=True)
class SecurityGroup:
    group_id: str
    vpc_id: str
    group_type: GroupType
    inner_access_policy: InnerPolicy
    rules: tuple[Rule, ...]
    name: str = ""
    description: str = ""
    managed: bool = False
    tags: tuple[tuple[str, str], ...] = ()
    is_vpc_default: bool = False

    @property
    def is_basic(self) -> bool:
        return self.group_type == "normal"


@dataclass(frozen=True, slots=True)
class Eni:
    """A network interface: the unit of enforcement.

    `ifname` is the name of its host-side veth end in the VPC router namespace
    (stable, derived from the id, at most 15 bytes); `peer_ifname` its name
    inside the instance namespace.
    """

    eni_id: str
    instance_id: str
    vpc_id: str
    vswitch_id: str
    primary: bool
    mac: str
    ipv4: tuple[ipaddress.IPv4Address, ...]
    ipv6: tuple[ipaddress.IPv6Address, ...]
    group_ids: tuple[str, ...]
    ifname: str
    peer_ifname: str
    device_index: int

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        return (*self.ipv4, *self.ipv6)


@dataclass(frozen=True, slots=True)
class ExternalHost:
    """A host outside every group (the internet, an office), attached to a VPC router."""

    name: str
    vpc_id: str
    mac: str
    ipv4: tuple[ipaddress.IPv4Address, ...]
    ipv6: tuple[ipaddress.IPv6Address, ...]
    ifname: str

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        return (*self.ipv4, *self.ipv6)


@dataclass(frozen=True, slots=True)
class PrefixList:
    prefix_list_id: str
    family: Family
    max_entries: int
    entries: tuple[IPNetwork, ...]
    name: str = ""


@dataclass(frozen=True, slots=True)
class VSwitch:
    vswitch_id: str
    vpc_id: str
    cidr: ipaddress.IPv4Network
    ipv6_cidr: ipaddress.IPv6Network | None


@dataclass(frozen=True, slots=True)
class Vpc:
    vpc_id: str
    cidr: ipaddress.IPv4Network
    ipv6_cidr: ipaddress.IPv6Network | None
    vswitches: tuple[VSwitch, ...]


@dataclass(frozen=True, slots=True)
class Instance:
    instance_id: str
    vpc_id: str
    eni_ids: tuple[str, ...]  # primary first, then secondaries in file order


@dataclass(frozen=True)
class Network:
    """The whole checked model. Mappings are keyed by id and sorted by id.

    Lookup helpers are the only logic here; semantics live in `evaluator.py`
    and the nftables program in `compiler.py`.
    """

    vpcs: dict[str, Vpc]
    groups: dict[str, SecurityGroup]
    enis: dict[str, Eni]
    instances: dict[str, Instance]
    externals: dict[str, ExternalHost]
    prefix_lists: dict[str, PrefixList]
    region_id: str = ""
    _members: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    # Indexes, so that judging a flow (the agent judges every tracked flow after a
    # change) costs lookups, not scans of every ENI.
    _owners: dict[IPAddress, tuple[Eni | ExternalHost, ...]] = field(
        default_factory=dict, repr=False
    )
    _member_addresses: dict[str, frozenset[IPAddress]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        members: dict[str, list[str]] = {gid: [] for gid in self.groups}
        owners: dict[IPAddress, list[Eni | ExternalHost]] = {}
        for eni in self.enis.values():
            for gid in eni.group_ids:
                members.setdefault(gid, []).append(eni.eni_id)
            for address in eni.addresses:
                owners.setdefault(address, []).append(eni)
        for ext in self.externals.values():
            for address in ext.addresses:
                owners.setdefault(address, []).append(ext)
        self._members.update({gid: tuple(sorted(ids)) for gid, ids in members.items()})
        self._owners.update({a: tuple(o) for a, o in owners.items()})
        self._member_addresses.update(
            {gid: frozenset(self.member_addresses(gid)) for gid in self._members}
        )

    def owners_of(self, address: IPAddress) -> tuple[Eni | ExternalHost, ...]:
        """The ENIs and external hosts holding the address (one per VPC at most)."""
        return self._owners.get(address, ())

    def is_member_address(self, group_id: str, address: IPAddress) -> bool:
        """Is the address one of the current members' private addresses?"""
        return address in self._member_addresses.get(group_id, frozenset())

    def members(self, group_id: str) -> tuple[str, ...]:
        """Ids of the ENIs that are members of the group right now (sorted)."""
        return self._members.get(group_id, ())

    def member_addresses(self, group_id: str) -> tuple[IPAddress, ...]:
        """Private addresses (primary, secondary, IPv6) of the group's members."""
        out: list[IPAddress] = []
        for eni_id in self.members(group_id):
            out.extend(self.enis[eni_id].addresses)
        return tuple(out)

    def enis_in_vpc(self, vpc_id: str) -> tuple[Eni, ...]:
        return tuple(e for e in self.enis.values() if e.vpc_id == vpc_id)

    def externals_in_vpc(self, vpc_id: str) -> tuple[ExternalHost, ...]:
        return tuple(x for x in self.externals.values() if x.vpc_id == vpc_id)

    def groups_of(self, eni_id: str) -> tuple[SecurityGroup, ...]:
        return tuple(self.groups[g] for g in self.enis[eni_id].group_ids)

    def eni_by_address(self, address: IPAddress) -> Eni | None:
        for owner in self.owners_of(address):
            if isinstance(owner, Eni):
                return owner
        return None

    def external_by_address(self, address: IPAddress) -> ExternalHost | None:
        for owner in self.owners_of(address):
            if isinstance(owner, ExternalHost):
                return owner
        return None
