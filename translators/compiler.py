"""Network -> the nftables program of one VPC router (layout: docs/dataplane.md).

Pure and deterministic: the output depends on the model's content, never on the
order of its dicts. Only ids and numbers reach the program.

Rules live in VPC-wide sets keyed by the ENI's port id (the packet mark), so a
rule or membership change is an element change. Cost: the elements an ENI
contributes to a bucket (one priority, policy, family and protocol class of one
direction) are a function of the groups that contribute rules to it, not of the
ENI, so their split into parts is cached under that group signature and reused
by every ENI whose groups give the same bucket. Addresses, ports and protocols
are int spans; overlap checks use an index on the peer CIDR, not all pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .network import (
    PROTOCOL_NUMBERS,
    CidrPeer,
    Eni,
    ExternalHost,
    IPNetwork,
    Network,
    PrefixListPeer,
    Rule,
    SecurityGroup,
)
from .nft import (
    ACCEPT,
    DROP,
    RETURN,
    BaseHook,
    Concat,
    Ct,
    Key,
    Mangle,
    MapData,
    MapLookup,
    Match,
    Meta,
    NftChain,
    NftRule,
    NftSet,
    Payload,
    Program,
    SetRef,
    Span,
    VerdictMap,
    cyclic_gc_paused,
    jump,
    make_map,
    make_set,
    safe_comment,
)

DEFAULT_TABLE = "nftsg"
FAMILIES = ("ipv4", "ipv6")
_BITS = {"ipv4": 32, "ipv6": 128}
_SHORT = {"ipv4": "v4", "ipv6": "v6"}
_ADDR_TYPE = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}
_L3 = {"ipv4": "ip", "ipv6": "ip6"}
IFNAME = ("ifname",)
# Five fields, not six: nftables 1.0.6 packs a concatenation's field types 6 bits
# each into 32 bits, so a sixth field garbles every listing of the set (the kernel
# still matches right). The protocol is therefore matched before the lookup
# (`meta l4proto N`), one set per protocol class.
# Port-less classes (ICMP, ICMPv6, GRE, ALL: their rules match every port) have no
# port fields: nft 1.0.6 cannot list `meta l4proto gre ... th dport` back (it
# aborts) and lists ICMP's as `icmp checksum`.
RULE_SET_TYPE = {
    (fam, ported): (
        ("mark", _ADDR_TYPE[fam], "inet_service", "inet_service", _ADDR_TYPE[fam])
        if ported
        else ("mark", _ADDR_TYPE[fam], _ADDR_TYPE[fam])
    )
    for fam in FAMILIES
    for ported in (True, False)
}
# Protocol classes of the rule sets, in chain order; ALL is matched without `meta l4proto`.
PROTO_CLASSES: dict[str, str] = {
    "TCP": "tcp",
    "UDP": "udp",
    "ICMP": "icmp",
    "ICMPv6": "icmpv6",
    "GRE": "gre",
    "ALL": "all",
}
_CLASS_RANK = {c: i for i, c in enumerate(PROTO_CLASSES.values())}
_CLASS_PROTO = {PROTO_CLASSES[p]: n for p, n in PROTOCOL_NUMBERS.items()}
_PORTED_CLASSES = frozenset({"tcp", "udp"})
INTERVAL = ("interval",)

ALL_PROTOS = Span(0, 255)
ALL_PORTS = Span(0, 65535)
ALL_ADDRS = {fam: Span(0, (1 << bits) - 1) for fam, bits in _BITS.items()}

_NFPROTO = {fam: Match(Meta("nfproto"), fam) for fam in FAMILIES}

# Bucket order inside a chain: priority ascending, drop before accept, ipv4 first,
# then protocol class (the last two only for a stable order: same verdict).
_POLICY_RANK = {"drop": 0, "accept": 1}
_DIRECTIONS = ("egress", "ingress")
# (priority, policy, family, protocol class)
BucketKey = tuple[int, str, str, str]


# A rule-set element: (proto, peer, dport, sport, local).
RuleKey = tuple[Span, Span, Span, Span, Span]


@dataclass(frozen=True, slots=True)
class _Bucket:
    """One ENI's share of one (direction, priority, policy, family, class) bucket: it
    depends only on the ENI's contributing groups (the port id is added later)."""

    parts: tuple[tuple[RuleKey, ...], ...]  # no two elements of one part overlap
    rule_ids: tuple[str, ...]


def _span(net: IPNetwork) -> Span:
    lo = int(net.network_address)
    return Span(lo, lo | ((1 << (net.max_prefixlen - net.prefixlen)) - 1))


def split_parts(keys: Iterable[RuleKey]) -> list[list[RuleKey]]:
    """Drop duplicates and elements contained in another, then split greedily into
    parts in which no two elements overlap (the kernel's concatenated-interval
    sets reject some overlaps with EEXIST).

    Keys are (proto, peer, dport, sport, local) spans; peer is a CIDR block.
    Elements are visited widest peer first, so every element already placed
    whose peer overlaps the new one has an equal or enclosing peer block:
    looking up the new peer's enclosing block at each size seen so far finds
    all candidates without comparing all pairs. Within equal peers the order
    (lo ascending, hi descending per field) visits containers first.
    """
    parts: list[list[RuleKey]] = []
    placed: dict[tuple[int, int], list[tuple[RuleKey, int]]] = {}
    sizes: list[int] = []  # peer block sizes (hi - lo) seen, descending
    for key in sorted(set(keys), key=_visit_order):
        plo, phi = key[1]
        size = phi - plo
        if not sizes or sizes[-1] != size:
            sizes.append(size)
        busy: set[int] = set()
        subsumed = False
        for s in sizes:
            for other, part in placed.get((s, plo & ~s), ()):
                rel = _relation(other, key)
                if rel == 2:
                    subsumed = True
                    break
                if rel == 1:
                    busy.add(part)
            if subsumed:
                break
        if subsumed:
            continue
        k = 0
        while k in busy:
            k += 1
        if k == len(parts):
            parts.append([])
        parts[k].append(key)
        placed.setdefault((size, plo), []).append((key, k))
    return parts


def _visit_order(k: RuleKey) -> tuple[int, ...]:
    (p0, p1), (a0, a1), (d0, d1), (s0, s1), (l0, l1) = k
    return (a0 - a1, a0, p0, -p1, d0, -d1, s0, -s1, l0, -l1)


def _relation(other: RuleKey, key: RuleKey) -> int:
    """0: disjoint, 1: overlapping, 2: `other` contains `key` (peers already known to nest)."""
    contains = True
    for i in (0, 2, 3, 4):
        olo, ohi = other[i]
        nlo, nhi = key[i]
        if olo > nhi or nlo > ohi:
            return 0
        if olo > nlo or nhi > ohi:
            contains = False
    return 2 if contains else 1


class _Compiler:
    def __init__(self, network: Network, vpc_id: str, table: str) -> None:
        self.net = network
        self.vpc_id = vpc_id
        self.table = table
        self.enis: list[Eni] = sorted(
            (e for e in network.enis.values() if e.vpc_id == vpc_id), key=lambda e: e.eni_id
        )
        self._net_spans: dict[int, tuple[IPNetwork, Span]] = {}
        self._member_spans: dict[tuple[str, str], tuple[Span, ...]] = {}
        # group id -> direction -> bucket key -> (keys, rule ids)
        self._group_buckets: dict[
            str, dict[str, dict[BucketKey, tuple[set[RuleKey], list[str]]]]
        ] = {}
        self._bucket_cache: dict[tuple[object, ...], _Bucket] = {}

    # ----------------------------------------------------------------- elements

    def net_span(self, net: IPNetwork) -> Span:
        # Keyed by identity: hashing ipaddress networks is slow and collides
        # often; the model's objects live as long as this compiler.
        got = self._net_spans.get(id(net))
        if got is None:
            got = self._net_spans[id(net)] = (net, _span(net))
        return got[1]

    def peer_spans(self, rule: Rule, fam: str) -> tuple[Span, ...]:
        peer = rule.peer
        if isinstance(peer, CidrPeer):
            return (self.net_span(peer.network),)
        if isinstance(peer, PrefixListPeer):
            pl = self.net.prefix_lists[peer.prefix_list_id]
            return tuple(self.net_span(n) for n in pl.entries)
        return self.member_spans(peer.group_id, fam)

    def member_spans(self, group_id: str, fam: str) -> tuple[Span, ...]:
        """Live addresses of the group's members, as /32 or /128 blocks."""
        cached = self._member_spans.get((group_id, fam))
        if cached is None:
            version = 4 if fam == "ipv4" else 6
            out = []
            for eni_id in self.net.members(group_id):
                for addr in self.net.enis[eni_id].addresses:
                    if addr.version == version:
                        out.append(Span(int(addr), int(addr)))
            cached = self._member_spans[(group_id, fam)] = tuple(out)
        return cached

    def rule_families(self, rule: Rule) -> list[str]:
        """The families a rule can match in: its protocol's, its peer's and its local CIDR's."""
        fams = set(FAMILIES)
        if rule.protocol_family is not None:
            fams &= {rule.protocol_family}
        peer = rule.peer
        if isinstance(peer, CidrPeer):
            fams &= {peer.kind}
        elif isinstance(peer, PrefixListPeer):
            fams &= {self.net.prefix_lists[peer.prefix_list_id].family}
        if rule.local is not None:
            fams &= {"ipv4" if rule.local.version == 4 else "ipv6"}
        return [f for f in FAMILIES if f in fams]

    def rule_keys(self, rule: Rule, fam: str) -> list[RuleKey]:
        number = PROTOCOL_NUMBERS.get(rule.protocol)
        proto = ALL_PROTOS if number is None else Span(number, number)
        dport = ALL_PORTS if rule.ports is None else Span(rule.ports.start, rule.ports.end)
        sport = (
            ALL_PORTS
            if rule.source_ports is None
            else Span(rule.source_ports.start, rule.source_ports.end)
        )
        local = ALL_ADDRS[fam] if rule.local is None else self.net_span(rule.local)
        return [(proto, peer, dport, sport, local) for peer in self.peer_spans(rule, fam)]

    def group_buckets(
        self, group: SecurityGroup
    ) -> dict[str, dict[BucketKey, tuple[set[RuleKey], list[str]]]]:
        got = self._group_buckets.get(group.group_id)
        if got is None:
            got = {"egress": {}, "ingress": {}}
            for rule in group.rules:
                cls = PROTO_CLASSES[rule.protocol]
                for fam in self.rule_families(rule):
                    keys, ids = got[rule.direction].setdefault(
                        (rule.priority, rule.policy, fam, cls), (set(), [])
                    )
                    keys.update(self.rule_keys(rule, fam))
                    ids.append(rule.rule_id)
            self._group_buckets[group.group_id] = got
        return got

    def bucket(self, direction: str, bkey: BucketKey, groups: Sequence[SecurityGroup]) -> _Bucket:
        """The bucket pooled from `groups` (those that have rules in it), cached by signature."""
        contributing = [g for g in groups if bkey in self.group_buckets(g)[direction]]
        sig = (direction, bkey, tuple(g.group_id for g in contributing))
        cached = self._bucket_cache.get(sig)
        if cached is None:
            keys: set[RuleKey] = set()
            ids: set[str] = set()
            for g in contributing:
                gkeys, gids = self.group_buckets(g)[direction][bkey]
                keys |= gkeys
                ids.update(gids)
            parts = split_parts(keys)
            cached = _Bucket(tuple(tuple(p) for p in parts), tuple(sorted(ids)))
            self._bucket_cache[sig] = cached
        return cached

    # ----------------------------------------------------------------- chains

    @staticmethod
    def _lookup(direction: str, fam: str, ported: bool) -> Concat:
        l3 = _L3[fam]
        peer, local = ("daddr", "saddr") if direction == "egress" else ("saddr", "daddr")
        ports = (Payload("th", "dport"), Payload("th", "sport")) if ported else ()
        return Concat((Meta("mark"), Payload(l3, peer), *ports, Payload(l3, local)))

    def rule_chain(self, direction: str, sets: list[NftSet]) -> NftChain:
        """`egress` / `ingress`: set the port id, one lookup per VPC-wide (bucket, family,
        class, part), then the default."""
        vpc_groups = [
            g
            for g in sorted(self.net.groups.values(), key=lambda g: g.group_id)
            if g.vpc_id == self.vpc_id
        ]
        bkeys: set[BucketKey] = set()
        for g in vpc_groups:
            bkeys.update(self.group_buckets(g)[direction])
        # bucket key -> part -> elements (port id . peer . dport . sport . local)
        elements: dict[BucketKey, list[list[Key]]] = {b: [[]] for b in bkeys}
        for eni in self.enis:
            groups = sorted(
                (self.net.groups[g] for g in set(eni.group_ids)), key=lambda g: g.group_id
            )
            mine: set[BucketKey] = set()
            for g in groups:
                mine.update(self.group_buckets(g)[direction])
            pid = Span(eni.port_id, eni.port_id)
            for bkey in mine:
                parts = elements[bkey]
                ported = bkey[3] in _PORTED_CLASSES
                for k, part in enumerate(self.bucket(direction, bkey, groups).parts):
                    if k == len(parts):
                        parts.append([])
                    if ported:
                        parts[k].extend((pid, *key[1:]) for key in part)
                    else:  # the port fields are always 0-65535 here
                        parts[k].extend((pid, key[1], key[4]) for key in part)

        port = Meta("iifname" if direction == "egress" else "oifname")
        rules: list[NftRule] = [
            NftRule(
                (Mangle(Meta("mark"), MapLookup(port, SetRef("port_ids"))),),
                f"port id of the {port.key}",
            )
        ]
        lookups = {
            (fam, ported): self._lookup(direction, fam, ported)
            for fam in FAMILIES
            for ported in (True, False)
        }
        for bkey in sorted(
            bkeys, key=lambda b: (b[0], _POLICY_RANK[b[1]], b[2], _CLASS_RANK[b[3]])
        ):
            prio, policy, fam, cls = bkey
            verdict = DROP if policy == "drop" else RETURN
            base = f"{direction}_p{prio}_{policy[0]}_{_SHORT[fam]}_{cls}"
            head: tuple[Match, ...] = (_NFPROTO[fam],)
            if cls in _CLASS_PROTO:
                head += (Match(Meta("l4proto"), _CLASS_PROTO[cls]),)
            for k, elems in enumerate(elements[bkey]):
                name = f"{base}_{k}"
                ported = cls in _PORTED_CLASSES
                sets.append(make_set(name, RULE_SET_TYPE[(fam, ported)], elems, INTERVAL))
                rules.append(
                    NftRule(
                        (*head, Match(lookups[(fam, ported)], SetRef(name)), verdict),
                        f"p{prio} {policy} {fam} {cls} part {k}",
                    )
                )
        if direction == "egress":
            rules.append(
                NftRule(
                    (Match(Meta("iifname"), SetRef("advanced_ports")), DROP),
                    "default egress advanced",
                )
            )
        else:
            rules.append(NftRule((DROP,), "default ingress"))
        return NftChain(direction, tuple(rules))

    # ----------------------------------------------------------------- program

    def program(self) -> Program:
        sets: list[NftSet] = []
        chains: list[NftChain] = []
        externals = sorted(self.net.externals_in_vpc(self.vpc_id), key=lambda x: x.name)

        port_addrs: dict[str, set[Key]] = {"ipv4": set(), "ipv6": set()}
        ports: set[Key] = set()
        port_list: list[Eni | ExternalHost] = [*self.enis, *externals]
        for p in port_list:
            ports.add((p.ifname,))
            for a in p.addresses:
                fam = "ipv4" if a.version == 4 else "ipv6"
                port_addrs[fam].add((p.ifname, Span(int(a), int(a))))
        sets.append(make_set("ports", IFNAME, ports))
        sets.append(make_set("eni_ports", IFNAME, ((e.ifname,) for e in self.enis)))
        sets.append(
            make_set(
                "advanced_ports",
                IFNAME,
                (
                    (e.ifname,)
                    for e in self.enis
                    if any(not self.net.groups[g].is_basic for g in e.group_ids)
                ),
            )
        )
        for fam in FAMILIES:
            sets.append(
                make_set(f"port_addrs_{_SHORT[fam]}", ("ifname", _ADDR_TYPE[fam]), port_addrs[fam])
            )

        # Intra-group shortcut: one port set per basic Accept group of the VPC
        # (kept while empty, so joining it only adds an element).
        intra_groups = sorted(
            g.group_id
            for g in self.net.groups.values()
            if g.vpc_id == self.vpc_id and g.is_basic and g.inner_access_policy == "Accept"
        )
        for gid in intra_groups:
            members = [self.net.enis[e] for e in self.net.members(gid)]
            sets.append(
                make_set(
                    f"intra_{gid}",
                    IFNAME,
                    ((e.ifname,) for e in members if e.vpc_id == self.vpc_id),
                )
            )
        accept_groups = set(intra_groups)

        intra: dict[Key, MapData] = {}
        port_ids: dict[Key, MapData] = {}
        for eni in self.enis:
            port_ids[(eni.ifname,)] = eni.port_id
            mine = sorted(set(eni.group_ids) & accept_groups)
            if mine:
                chains.append(
                    NftChain(
                        f"intra_{eni.eni_id}",
                        tuple(
                            NftRule(
                                (Match(Meta("iifname"), SetRef(f"intra_{gid}")), ACCEPT),
                                safe_comment(f"intra {gid}"),
                            )
                            for gid in mine
                        ),
                    )
                )
                intra[(eni.ifname,)] = jump(f"intra_{eni.eni_id}")
        for direction in _DIRECTIONS:
            chains.append(self.rule_chain(direction, sets))
        maps = [
            make_map("intra_dispatch", IFNAME, intra),
            make_map("port_ids", IFNAME, port_ids, "mark"),
        ]
        chains.append(forward_chain())
        return Program("inet", self.table, tuple(sets), tuple(maps), tuple(chains))


def forward_chain() -> NftChain:
    """The base chain, in the order of dataplane.md; every rule there is static."""
    anti_spoof = [
        NftRule(
            (
                _NFPROTO[fam],
                Match(
                    Concat((Meta("iifname"), Payload(_L3[fam], "saddr"))),
                    SetRef(f"port_addrs_{_SHORT[fam]}"),
                    "!=",
                ),
                DROP,
            ),
            f"anti-spoofing {fam}",
        )
        for fam in FAMILIES
    ]
    return NftChain(
        "forward",
        (
            *anti_spoof,
            NftRule(
                (
                    VerdictMap(
                        Ct("state"),
                        (("invalid", DROP), ("established", ACCEPT), ("related", ACCEPT)),
                    ),
                ),
                "conntrack",
            ),
            NftRule((VerdictMap(Meta("oifname"), SetRef("intra_dispatch")),), "intra-group"),
            NftRule((Match(Meta("iifname"), SetRef("eni_ports")), jump("egress")), "sender egress"),
            NftRule(
                (Match(Meta("oifname"), SetRef("eni_ports")), jump("ingress")), "receiver ingress"
            ),
            NftRule((Match(Meta("oifname"), SetRef("ports")), ACCEPT), "known ports"),
        ),
        BaseHook("filter", "forward", 0, "drop"),
    )


def compile_vpc(network: Network, vpc_id: str, table: str = DEFAULT_TABLE) -> Program:
    """The program of the VPC router of `vpc_id`."""
    if vpc_id not in network.vpcs:
        raise KeyError(f"unknown VPC {vpc_id!r}")
    with cyclic_gc_paused():
        return _Compiler(network, vpc_id, table).program()


def compile_all(network: Network, table: str = DEFAULT_TABLE) -> dict[str, Program]:
    """One program per VPC, keyed (and ordered) by VPC id."""
    return {vpc_id: compile_vpc(network, vpc_id, table) for vpc_id in sorted(network.vpcs)}
