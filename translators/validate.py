"""Topology -> checked `Network`, with ECS error codes (semantics.md).

`build_network` either returns a complete, valid `Network` or raises one
`EcsError` (code, message, field path). It never returns anything partial.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from . import model as m
from . import naming
from .errors import EcsError
from .network import (
    PORTED_PROTOCOLS,
    CidrPeer,
    Eni,
    ExternalHost,
    GroupPeer,
    Instance,
    IPNetwork,
    Network,
    Peer,
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
    """ECS port range syntax. Returns None for ``-1/-1`` (every port)."""
    if raw is None or str(raw).strip() == "":
        if required:
            raise EcsError("MissingParameter.PortRange", "PortRange is required", path)
        return None
    text = str(raw).strip()
    parts = text.split("/")
    if len(parts) != 2:
        raise EcsError(code, f"port range {text!r} must be start/end (e.g. 22/22 or -1/-1)", path)
    try:
        start, end = int(parts[0]), int(parts[1])
    except ValueError:
        raise EcsError(code, f"port range {text!r} must be two integers", path) from None
    if protocol in PORTED_PROTOCOLS:
        if not (1 <= start <= 65535 and 1 <= end <= 65535):
            raise EcsError(code, f"{protocol} port range {text!r} must be within 1..65535", path)
        if start > end:
            raise EcsError(code, f"port range {text!r}: start is greater than end", path)
        return PortRange(start, end)
    if (start, end) != (-1, -1):
        raise EcsError(code, f"{protocol} takes the port range -1/-1, not {text!r}", path)
    return None


def parse_network(raw: str, path: str, code: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(raw.strip(), strict=False)
    except ValueError:
        raise EcsError(code, f"{raw!r} is not an IP address or CIDR block", path) from None


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
        self.instances: dict[str, Instance] = {}
        self.externals: dict[str, ExternalHost] = {}
        self.used_addresses: dict[tuple[str, str], str] = {}
        self.default_groups_needed: set[str] = set()

    # -- VPCs, vSwitches, prefix lists ------------------------------------
    def build_vpcs(self) -> None:
        for i, vpc in enumerate(self.topo.vpcs):
            path = f"vpcs[{i}]"
            _check_id(vpc.vpc_id, f"{path}.vpc_id", "InvalidVpcId.Malformed")
            if vpc.vpc_id in self.vpcs:
                raise EcsError("InvalidVpcId.Duplicate", f"VPC {vpc.vpc_id} is defined twice", path)
            cidr = parse_network(vpc.cidr_block, f"{path}.cidr_block", "InvalidCidrBlock.Malformed")
            if cidr.version != 4:
                raise EcsError("InvalidCidrBlock.Malformed", "cidr_block must be IPv4", path)
            v6 = None
            if vpc.ipv6_cidr_block:
                v6 = parse_network(
                    vpc.ipv6_cidr_block, f"{path}.ipv6_cidr_block", "InvalidIpv6CidrBlock.Malformed"
                )
                if v6.version != 6:
                    raise EcsError("InvalidIpv6CidrBlock.Malformed", "must be IPv6", path)
            switches = []
            for j, vsw in enumerate(vpc.vswitches):
                spath = f"{path}.vswitches[{j}]"
                _check_id(vsw.vswitch_id, f"{spath}.vswitch_id", "InvalidVSwitchId.Malformed")
                if vsw.vswitch_id in self.vswitches:
                    raise EcsError(
                        "InvalidVSwitchId.Duplicate", f"vSwitch {vsw.vswitch_id} twice", spath
                    )
                scidr = parse_network(
                    vsw.cidr_block, f"{spath}.cidr_block", "InvalidCidrBlock.Malformed"
                )
                if scidr.version != 4 or not scidr.subnet_of(cidr):  # type: ignore[arg-type]
                    raise EcsError(
                        "InvalidCidrBlock.Malformed",
                        f"vSwitch CIDR {scidr} is not inside the VPC CIDR {cidr}",
                        f"{spath}.cidr_block",
                    )
                s6 = None
                if vsw.ipv6_cidr_block:
                    s6 = parse_network(
                        vsw.ipv6_cidr_block,
                        f"{spath}.ipv6_cidr_block",
                        "InvalidIpv6CidrBlock.Malformed",
                    )
                    if s6.version != 6:
                        raise EcsError("InvalidIpv6CidrBlock.Malformed", "must be IPv6", spath)
                sw = VSwitch(vsw.vswitch_id, vpc.vpc_id, scidr, s6)  # type: ignore[arg-type]
                self.vswitches[sw.vswitch_id] = sw
                switches.append(sw)
            self.vpcs[vpc.vpc_id] = Vpc(vpc.vpc_id, cidr, v6, tuple(switches))  # type: ignore[arg-type]

    def build_prefix_lists(self) -> None:
        for i, pl in enumerate(self.topo.prefix_lists):
            path = f"prefix_lists[{i}]"
            _check_id(pl.prefix_list_id, f"{path}.prefix_list_id", "InvalidPrefixListId.Malformed")
            if pl.prefix_list_id in self.prefix_lists:
                raise EcsError("InvalidPrefixListId.Duplicate", "prefix list defined twice", path)
            fam_raw = pl.address_family.strip().lower()
            if fam_raw not in ("ipv4", "ipv6"):
                raise EcsError(
                    "InvalidAddressFamily.Malformed",
                    "address_family is IPv4 or IPv6",
                    f"{path}.address_family",
                )
            family = "ipv4" if fam_raw == "ipv4" else "ipv6"
            if not 1 <= pl.max_entries <= 200:
                raise EcsError(
                    "InvalidMaxEntries.Malformed", "max_entries is 1..200", f"{path}.max_entries"
                )
            if len(pl.entries) > pl.max_entries:
                raise EcsError(
                    "PrefixListEntriesLimitExceeded",
                    f"{len(pl.entries)} entries exceed max_entries {pl.max_entries}",
                    f"{path}.entries",
                )
            entries = []
            for j, raw in enumerate(pl.entries):
                net = parse_network(raw, f"{path}.entries[{j}]", "InvalidCidr.Malformed")
                if (net.version == 4) != (family == "ipv4"):
                    raise EcsError(
                        "InvalidCidr.AddressFamilyMismatch",
                        f"{net} is not an {pl.address_family} CIDR",
                        f"{path}.entries[{j}]",
                    )
                entries.append(net)
            self.prefix_lists[pl.prefix_list_id] = PrefixList(
                pl.prefix_list_id,
                family,  # type: ignore[arg-type]
                pl.max_entries,
                tuple(sorted(set(entries), key=lambda n: (n.version, n))),  # type: ignore[arg-type]
                pl.prefix_list_name or "",
            )

    # -- groups and rules -------------------------------------------------
    def index_groups(self) -> None:
        for i, sg in enumerate(self.topo.security_groups):
            path = f"security_groups[{i}]"
            _check_id(
                sg.security_group_id, f"{path}.security_group_id", "InvalidSecurityGroupId.Malformed"
            )
            if sg.security_group_id in self.raw_groups:
                raise EcsError(
                    "InvalidSecurityGroupId.Duplicate",
                    f"security group {sg.security_group_id} is defined twice",
                    path,
                )
            if sg.vpc_id not in self.vpcs:
                raise EcsError(
                    "InvalidVpcId.NotFound", f"VPC {sg.vpc_id} does not exist", f"{path}.vpc_id"
                )
            self.raw_groups[sg.security_group_id] = (i, sg)

    def group_type_of(self, gid: str) -> str:
        _, sg = self.raw_groups[gid]
        return sg.security_group_type

    def build_groups(self) -> None:
        for gid, (i, sg) in self.raw_groups.items():
            path = f"security_groups[{i}]"
            gtype = sg.security_group_type.strip().lower()
            if gtype not in ("normal", "enterprise"):
                raise EcsError(
                    "InvalidSecurityGroupType.Malformed",
                    "security_group_type is normal or enterprise",
                    f"{path}.security_group_type",
                )
            inner_raw = sg.inner_access_policy
            if gtype == "enterprise":
                if inner_raw is not None and inner_raw.strip().lower() != "drop":
                    raise EcsError(
                        "InvalidSecurityGroup.InvalidNetworkType",
                        "advanced (enterprise) groups always isolate their members; "
                        "inner_access_policy cannot be Accept",
                        f"{path}.inner_access_policy",
                    )
                inner = "Drop"
            else:
                low = (inner_raw or "Accept").strip().lower()
                if low not in ("accept", "drop"):
                    raise EcsError(
                        "InvalidInnerAccessPolicy.Malformed",
                        "inner_access_policy is Accept or Drop",
                        f"{path}.inner_access_policy",
                    )
                inner = "Accept" if low == "accept" else "Drop"
            rules: list[Rule] = []
            seen: dict[tuple[object, ...], int] = {}
            ref_rules = 0
            for j, perm in enumerate(sg.permissions):
                rule = self.build_rule(gid, gtype, sg.vpc_id, perm, f"{path}.permissions[{j}]")
                ident = rule.identity()
                if ident in seen:
                    raise EcsError(
                        "InvalidParam.DuplicatePermissions",
                        f"permissions[{j}] repeats permissions[{seen[ident]}]",
                        f"{path}.permissions[{j}]",
                    )
                seen[ident] = j
                if isinstance(rule.peer, GroupPeer):
                    ref_rules += 1
                rules.append(rule)
            if ref_rules > self.quotas.group_reference_rules_per_group:
                raise EcsError(
                    "AuthorizedGroupRule.LimitExceed",
                    f"{ref_rules} group-reference rules exceed the limit of "
                    f"{self.quotas.group_reference_rules_per_group}",
                    f"{path}.permissions",
                )
            weight = sum(self.rule_weight(r) for r in rules)
            if weight > self.quotas.rules_per_group:
                raise EcsError(
                    "AuthorizationLimitExceed",
                    f"group {gid} has {weight} rules (prefix lists count as their max_entries); "
                    f"the limit is {self.quotas.rules_per_group}",
                    f"{path}.permissions",
                )
            self.groups[gid] = SecurityGroup(
                group_id=gid,
                vpc_id=sg.vpc_id,
                group_type=gtype,  # type: ignore[arg-type]
                inner_access_policy=inner,  # type: ignore[arg-type]
                rules=tuple(rules),
                name=sg.security_group_name or "",
                description=sg.description or "",
                managed=sg.service_managed,
                tags=tuple(sorted(sg.tags.items())),
            )

    def rule_weight(self, rule: Rule) -> int:
        if isinstance(rule.peer, PrefixListPeer):
            return self.prefix_lists[rule.peer.prefix_list_id].max_entries
        return 1

    def build_rule(self, gid: str, gtype: str, vpc_id: str, p: m.Permission, path: str) -> Rule:
        direction_raw = p.direction.strip().lower()
        if direction_raw not in ("ingress", "egress"):
            raise EcsError(
                "InvalidDirection.Malformed", "direction is ingress or egress", f"{path}.direction"
            )
        ingress = direction_raw == "ingress"
        side = "Source" if ingress else "Dest"
        protocol = normalise_protocol(p.ip_protocol, f"{path}.ip_protocol")
        ports = parse_port_range(
            p.port_range,
            protocol,
            f"{path}.port_range",
            code="InvalidPortRange.Malformed",
            required=True,
        )
        sports = parse_port_range(
            p.source_port_range,
            protocol,
            f"{path}.source_port_range",
            code="InvalidSourcePortRange.Malformed",
            required=False,
        )
        policy = p.policy.strip().lower()
        if policy not in ("accept", "drop"):
            raise EcsError("InvalidPolicy.Malformed", "policy is accept or drop", f"{path}.policy")
        try:
            priority = int(str(p.priority).strip())
        except ValueError:
            priority = 0
        if not 1 <= priority <= 100:
            raise EcsError(
                "InvalidPriority.Malformed", "priority is an integer 1..100", f"{path}.priority"
            )
        if p.description is not None and len(p.description) > 512:
            raise EcsError(
                "InvalidDescription.Malformed",
                "description is at most 512 characters",
                f"{path}.description",
            )

        # Peer side and local side, named as the API names them.
        if ingress:
            v4_raw, v6_raw = p.source_cidr_ip, p.ipv6_source_cidr_ip
            group_raw, pl_raw = p.source_group_id, p.source_prefix_list_id
            lv4_raw, lv6_raw = p.dest_cidr_ip, p.ipv6_dest_cidr_ip
            v4_name, v6_name = "source_cidr_ip", "ipv6_source_cidr_ip"
            lv4_name, lv6_name = "dest_cidr_ip", "ipv6_dest_cidr_ip"
            group_name, pl_name = "source_group_id", "source_prefix_list_id"
        else:
            v4_raw, v6_raw = p.dest_cidr_ip, p.ipv6_dest_cidr_ip
            group_raw, pl_raw = p.dest_group_id, p.dest_prefix_list_id
            lv4_raw, lv6_raw = p.source_cidr_ip, p.ipv6_source_cidr_ip
            v4_name, v6_name = "dest_cidr_ip", "ipv6_dest_cidr_ip"
            lv4_name, lv6_name = "source_cidr_ip", "ipv6_source_cidr_ip"
            group_name, pl_name = "dest_group_id", "dest_prefix_list_id"
        ip_code = f"InvalidParam.{side}Ip"
        local_code = f"InvalidParam.{'Dest' if ingress else 'Source'}Ip"
        if v4_raw and v6_raw:
            raise EcsError(
                ip_code,
                f"{v4_name} and {v6_name} cannot both be set in one rule",
                f"{path}.{v6_name}",
            )
        peer: Peer
        if v4_raw or v6_raw:
            name = v4_name if v4_raw else v6_name
            net = parse_network(v4_raw or v6_raw or "", f"{path}.{name}", ip_code)
            if (net.version == 4) != bool(v4_raw):
                raise EcsError(
                    ip_code, f"{name} must be an IPv{4 if v4_raw else 6} CIDR", f"{path}.{name}"
                )
            peer = CidrPeer(net)
        elif group_raw:
            peer = self.group_peer(gid, gtype, vpc_id, group_raw, ingress, f"{path}.{group_name}")
        elif pl_raw:
            if pl_raw not in self.prefix_lists:
                raise EcsError(
                    "InvalidPrefixListId.NotFound",
                    f"prefix list {pl_raw} does not exist",
                    f"{path}.{pl_name}",
                )
            peer = PrefixListPeer(pl_raw)
        else:
            raise EcsError(
                f"MissingParameter.{side}",
                f"an {direction_raw} rule needs a peer: {v4_name}, {v6_name}, "
                f"{group_name} or {pl_name}",
                path,
            )

        if lv4_raw and lv6_raw:
            raise EcsError(
                local_code, f"{lv4_name} and {lv6_name} cannot both be set", f"{path}.{lv6_name}"
            )
        local: IPNetwork | None = None
        if lv4_raw or lv6_raw:
            lname = lv4_name if lv4_raw else lv6_name
            local = parse_network(lv4_raw or lv6_raw or "", f"{path}.{lname}", local_code)
            if (local.version == 4) != bool(lv4_raw):
                raise EcsError(
                    local_code, f"{lname} must be an IPv{4 if lv4_raw else 6} CIDR", f"{path}.{lname}"
                )

        peer_family = self.peer_family(peer)
        families = {peer_family} if peer_family else {"ipv4", "ipv6"}
        if local is not None:
            lfam = "ipv4" if local.version == 4 else "ipv6"
            if peer_family and lfam != peer_family:
                raise EcsError(
                    local_code,
                    f"the local address {local} and the peer are of different IP versions",
                    path,
                )
            families = {lfam}
        if protocol == "ICMP" and "ipv4" not in families:
            raise EcsError(
                "InvalidParam.Ipv4ProtocolConflictWithIpv6Address",
                "ICMP is an IPv4 protocol and cannot be used with an IPv6 address",
                f"{path}.ip_protocol",
            )
        if protocol == "ICMPv6" and "ipv6" not in families:
            raise EcsError(
                "InvalidParam.Ipv6ProtocolConflictWithIpv4Address",
                "ICMPv6 is an IPv6 protocol and cannot be used with an IPv4 address",
                f"{path}.ip_protocol",
            )

        rid = p.security_group_rule_id
        if rid is not None:
            _check_id(rid, f"{path}.security_group_rule_id", "InvalidParam.SecurityGroupRuleId")
        rule = Rule(
            rule_id=rid or "",
            group_id=gid,
            direction="ingress" if ingress else "egress",
            protocol=protocol,
            ports=ports,
            source_ports=sports,
            peer=peer,
            local=local,
            policy="accept" if policy == "accept" else "drop",
            priority=priority,
            description=p.description or "",
        )
        if not rid:
            from dataclasses import replace

            rule = replace(rule, rule_id=naming.rule_id(gid, repr(rule.identity())))
        return rule

    def peer_family(self, peer: Peer) -> str | None:
        if isinstance(peer, CidrPeer):
            return peer.kind
        if isinstance(peer, PrefixListPeer):
            return self.prefix_lists[peer.prefix_list_id].family
        return None

    def group_peer(
        self, gid: str, gtype: str, vpc_id: str, ref: str, ingress: bool, path: str
    ) -> GroupPeer:
        if ref not in self.raw_groups:
            raise EcsError(
                "InvalidSecurityGroupId.NotFound", f"security group {ref} does not exist", path
            )
        if gtype == "enterprise":
            raise EcsError(
                "InvalidGroupParameter.OperationDenied",
                "an advanced (enterprise) security group cannot hold group-reference rules",
                path,
            )
        if self.group_type_of(ref).strip().lower() == "enterprise":
            raise EcsError(
                "InvalidGroupAuthParameter.OperationDenied",
                f"{ref} is an advanced (enterprise) group and cannot be referenced",
                path,
            )
        if ref == gid:
            if ingress:
                raise EcsError("InvalidParamter.Conflict", "a group cannot reference itself", path)
            raise EcsError("InvalidSecurityGroup.IsSame", "a group cannot reference itself", path)
        _, ref_sg = self.raw_groups[ref]
        if ref_sg.vpc_id != vpc_id:
            code = "InvalidSourceGroupId.Mismatch" if ingress else "InvalidDestGroupId.Mismatch"
            raise EcsError(code, f"{ref} is in another VPC ({ref_sg.vpc_id})", path)
        return GroupPeer(ref)

    # -- instances, ENIs, external hosts ----------------------------------
    def _addresses(
        self,
        vsw: VSwitch,
        owner: str,
        v4s: Iterable[str],
        v6s: Iterable[str],
        path: str,
    ) -> tuple[tuple[ipaddress.IPv4Address, ...], tuple[ipaddress.IPv6Address, ...]]:
        out4: list[ipaddress.IPv4Address] = []
        out6: list[ipaddress.IPv6Address] = []
        for raw in v4s:
            try:
                a4 = ipaddress.IPv4Address(raw.strip())
            except ValueError:
                raise EcsError(
                    "InvalidPrivateIpAddress.Malformed", f"{raw!r} is not an IPv4 address", path
                ) from None
            if a4 not in vsw.cidr:
                raise EcsError(
                    "InvalidPrivateIpAddress.Mismatch",
                    f"{a4} is not inside vSwitch {vsw.vswitch_id} ({vsw.cidr})",
                    path,
                )
            out4.append(a4)
        for raw in v6s:
            try:
                a6 = ipaddress.IPv6Address(raw.strip())
            except ValueError:
                raise EcsError(
                    "InvalidIpv6Address.Malformed", f"{raw!r} is not an IPv6 address", path
                ) from None
            if vsw.ipv6_cidr is None or a6 not in vsw.ipv6_cidr:
                raise EcsError(
                    "InvalidIpv6Address.Mismatch",
                    f"{a6} is not inside vSwitch {vsw.vswitch_id}'s IPv6 CIDR",
                    path,
                )
            out6.append(a6)
        for a in (*out4, *out6):
            key = (vsw.vpc_id, str(a))
            if key in self.used_addresses:
                raise EcsError(
                    "InvalidPrivateIpAddress.Duplicated",
                    f"{a} is already used by {self.used_addresses[key]}",
                    path,
                )
            self.used_addresses[key] = owner
        return tuple(out4), tuple(out6)

    def _group_list(
        self, eni_id: str, vpc_id: str, ids: tuple[str, ...] | None, path: str
    ) -> tuple[str, ...]:
        if not ids:
            self.default_groups_needed.add(vpc_id)
            return (naming.default_group_id(vpc_id),)
        if len(set(ids)) != len(ids):
            raise EcsError(
                "InvalidSecurityGroupId.Duplicate", f"{eni_id} lists a group twice", path
            )
        if len(ids) > self.quotas.groups_per_eni:
            raise EcsError(
                "InstanceSecurityGroupLimitExceeded",
                f"{eni_id} is in {len(ids)} groups; the limit is {self.quotas.groups_per_eni}",
                path,
            )
        types = set()
        for k, gid in enumerate(ids):
            if gid not in self.raw_groups:
                raise EcsError(
                    "InvalidSecurityGroupId.NotFound",
                    f"security group {gid} does not exist",
                    f"{path}[{k}]",
                )
            _, sg = self.raw_groups[gid]
            if sg.vpc_id != vpc_id:
                raise EcsError(
                    "InvalidInstanceId.Mismatch",
                    f"{eni_id} is in VPC {vpc_id} but group {gid} is in {sg.vpc_id}",
                    f"{path}[{k}]",
                )
            types.add(sg.security_group_type.strip().lower())
        if len(types) > 1:
            raise EcsError(
                "InvalidSecurityGroupType.Mixed",
                f"{eni_id} mixes basic (normal) and advanced (enterprise) security groups; "
                "all groups of one network interface must be of the same type",
                path,
            )
        return tuple(ids)

    def _mac(self, raw: str | None, ident: str, path: str) -> str:
        if raw is None:
            return naming.derived_mac(ident)
        parts = raw.strip().lower().split(":")
        if len(parts) != 6 or not all(len(x) == 2 for x in parts):
            raise EcsError("InvalidMacAddress.Malformed", f"{raw!r} is not a MAC address", path)
        try:
            first = int(parts[0], 16)
            [int(x, 16) for x in parts]
        except ValueError:
            raise EcsError("InvalidMacAddress.Malformed", f"{raw!r} is not a MAC", path) from None
        if first & 1:
            raise EcsError("InvalidMacAddress.Malformed", f"{raw!r} is a multicast MAC", path)
        return ":".join(parts)

    def _vswitch(self, vsw_id: str, path: str) -> VSwitch:
        vsw = self.vswitches.get(vsw_id)
        if vsw is None:
            raise EcsError("InvalidVSwitchId.NotFound", f"vSwitch {vsw_id} does not exist", path)
        return vsw

    def _add_eni(self, eni: Eni, path: str) -> None:
        _check_id(eni.eni_id, path, "InvalidNetworkInterfaceId.Malformed")
        if eni.eni_id in self.enis:
            raise EcsError(
                "InvalidNetworkInterfaceId.Duplicate", f"ENI {eni.eni_id} is defined twice", path
            )
        self.enis[eni.eni_id] = eni

    def build_instances(self) -> None:
        for i, inst in enumerate(self.topo.instances):
            path = f"instances[{i}]"
            _check_id(inst.instance_id, f"{path}.instance_id", "InvalidInstanceId.Malformed")
            if inst.instance_id in self.instances:
                raise EcsError(
                    "InvalidInstanceId.Duplicate", f"instance {inst.instance_id} twice", path
                )
            vsw = self._vswitch(inst.vswitch_id, f"{path}.vswitch_id")
            primary_id = inst.network_interface_id or naming.default_primary_eni_id(
                inst.instance_id
            )
            v6 = [*([inst.ipv6_address] if inst.ipv6_address else []), *inst.ipv6_addresses]
            a4, a6 = self._addresses(
                vsw,
                primary_id,
                [inst.private_ip_address, *inst.secondary_private_ip_addresses],
                v6,
                path,
            )
            groups = self._group_list(
                primary_id, vsw.vpc_id, inst.security_group_ids, f"{path}.security_group_ids"
            )
            enis = [
                Eni(
                    eni_id=primary_id,
                    instance_id=inst.instance_id,
                    vpc_id=vsw.vpc_id,
                    vswitch_id=vsw.vswitch_id,
                    primary=True,
                    mac=self._mac(inst.mac_address, primary_id, f"{path}.mac_address"),
                    ipv4=a4,
                    ipv6=a6,
                    group_ids=groups,
                    ifname=naming.port_ifname("e", primary_id),
                    peer_ifname="eth0",
                    device_index=0,
                )
            ]
            for j, nic in enumerate(inst.network_interfaces):
                npath = f"{path}.network_interfaces[{j}]"
                nvsw = self._vswitch(nic.vswitch_id or inst.vswitch_id, f"{npath}.vswitch_id")
                if nvsw.vpc_id != vsw.vpc_id:
                    raise EcsError(
                        "InvalidVSwitchId.Mismatch",
                        "a secondary ENI must be in the instance's VPC",
                        f"{npath}.vswitch_id",
                    )
                nv6 = [*([nic.ipv6_address] if nic.ipv6_address else []), *nic.ipv6_addresses]
                n4, n6 = self._addresses(
                    nvsw,
                    nic.network_interface_id,
                    [nic.primary_ip_address, *nic.secondary_private_ip_addresses],
                    nv6,
                    npath,
                )
                ngroups = self._group_list(
                    nic.network_interface_id,
                    nvsw.vpc_id,
                    nic.security_group_ids,
                    f"{npath}.security_group_ids",
                )
                enis.append(
                    Eni(
                        eni_id=nic.network_interface_id,
                        instance_id=inst.instance_id,
                        vpc_id=nvsw.vpc_id,
                        vswitch_id=nvsw.vswitch_id,
                        primary=False,
                        mac=self._mac(
                            nic.mac_address, nic.network_interface_id, f"{npath}.mac_address"
                        ),
                        ipv4=n4,
                        ipv6=n6,
                        group_ids=ngroups,
                        ifname=naming.port_ifname("e", nic.network_interface_id),
                        peer_ifname=f"eth{j + 1}",
                        device_index=j + 1,
                    )
                )
            for k, eni in enumerate(enis):
                self._add_eni(eni, f"{path}" if k == 0 else f"{path}.network_interfaces[{k - 1}]")
            self.instances[inst.instance_id] = Instance(
                inst.instance_id, vsw.vpc_id, tuple(e.eni_id for e in enis)
            )

    def build_externals(self) -> None:
        for i, ext in enumerate(self.topo.external_hosts):
            path = f"external_hosts[{i}]"
            _check_id(ext.name, f"{path}.name")
            if ext.name in self.externals or ext.name in self.instances or ext.name in self.enis:
                raise EcsError("InvalidParameter", f"name {ext.name} is already used", path)
            if ext.vpc_id not in self.vpcs:
                raise EcsError(
                    "InvalidVpcId.NotFound", f"VPC {ext.vpc_id} does not exist", f"{path}.vpc_id"
                )
            if not ext.ip_address and not ext.ipv6_address:
                raise EcsError(
                    "MissingParameter", "an external host needs ip_address or ipv6_address", path
                )
            a4: tuple[ipaddress.IPv4Address, ...] = ()
            a6: tuple[ipaddress.IPv6Address, ...] = ()
            vpc = self.vpcs[ext.vpc_id]
            try:
                if ext.ip_address:
                    a4 = (ipaddress.IPv4Address(ext.ip_address.strip()),)
                if ext.ipv6_address:
                    a6 = (ipaddress.IPv6Address(ext.ipv6_address.strip()),)
            except ValueError as exc:
                raise EcsError("InvalidIpAddress.Malformed", str(exc), path) from None
            for a in (*a4, *a6):
                inside = a in vpc.cidr if a.version == 4 else (vpc.ipv6_cidr and a in vpc.ipv6_cidr)
                if inside:
                    raise EcsError(
                        "InvalidIpAddress.Malformed",
                        f"external host address {a} is inside the VPC's CIDR",
                        path,
                    )
                key = (ext.vpc_id, str(a))
                if key in self.used_addresses:
                    raise EcsError(
                        "InvalidPrivateIpAddress.Duplicated",
                        f"{a} is already used by {self.used_addresses[key]}",
                        path,
                    )
                self.used_addresses[key] = ext.name
            self.externals[ext.name] = ExternalHost(
                name=ext.name,
                vpc_id=ext.vpc_id,
                mac=self._mac(ext.mac_address, "ext:" + ext.name, f"{path}.mac_address"),
                ipv4=a4,
                ipv6=a6,
                ifname=naming.port_ifname("x", ext.name),
            )

    # -- defaults and cross-object limits -----------------------------------
    def add_default_groups(self) -> None:
        for vpc_id in sorted(self.default_groups_needed):
            gid = naming.default_group_id(vpc_id)
            if gid in self.groups:
                continue  # the file defines it explicitly
            rules = []
            for proto, ports in (("TCP", PortRange(22, 22)), ("TCP", PortRange(3389, 3389)),
                                 ("ICMP", None)):
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
                from dataclasses import replace

                rules.append(replace(rule, rule_id=naming.rule_id(gid, repr(rule.identity()))))
            self.groups[gid] = SecurityGroup(
                group_id=gid,
                vpc_id=vpc_id,
                group_type="normal",
                inner_access_policy="Accept",
                rules=tuple(rules),
                name="default",
                description="default security group of the VPC, created on demand",
                is_vpc_default=True,
            )

    def check_limits(self) -> None:
        members: dict[str, list[Eni]] = {}
        for eni in self.enis.values():
            for gid in eni.group_ids:
                members.setdefault(gid, []).append(eni)
        for gid, enis in sorted(members.items()):
            group = self.groups[gid]
            if group.is_basic:
                count = sum(len(e.addresses) for e in enis)
                if count > self.quotas.private_addresses_per_basic_group:
                    raise EcsError(
                        "SecurityGroupInstanceLimitExceeded",
                        f"group {gid} holds {count} private addresses; "
                        f"the limit is {self.quotas.private_addresses_per_basic_group}",
                        gid,
                    )
            elif len(enis) > self.quotas.enis_per_advanced_group:
                raise EcsError(
                    "SecurityGroupInstanceLimitExceeded",
                    f"advanced group {gid} has {len(enis)} ENIs; "
                    f"the limit is {self.quotas.enis_per_advanced_group}",
                    gid,
                )
        for eni in self.enis.values():
            total = sum(
                self.rule_weight(r) for gid in eni.group_ids for r in self.groups[gid].rules
            )
            if total > self.quotas.rules_per_eni:
                raise EcsError(
                    "AuthorizationLimitExceed",
                    f"{eni.eni_id} is subject to {total} rules across its groups; "
                    f"the limit is {self.quotas.rules_per_eni}",
                    eni.eni_id,
                )
        ifnames: dict[str, str] = {}
        for owner, ifname in [
            *((e.eni_id, e.ifname) for e in self.enis.values()),
            *((x.name, x.ifname) for x in self.externals.values()),
        ]:
            if ifname in ifnames:  # a 48-bit hash collision: never silently share a port
                raise EcsError(
                    "InvalidParameter", f"{owner} and {ifnames[ifname]} map to one port name", owner
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


def build_network(topo: m.Topology, quotas: Quotas = DEFAULT_QUOTAS) -> Network:
    """Check the whole topology and return the normalised network, or raise `EcsError`."""
    return _Builder(topo, quotas).build()


def load_network(text: str, quotas: Quotas = DEFAULT_QUOTAS, *, source: str = "") -> Network:
    """Parse topology text (YAML or JSON) and build the checked network."""
    return build_network(m.parse_topology_text(text, source=source or "<topology>"), quotas)
